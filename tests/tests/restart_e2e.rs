//! Restart survival: the agent is restarted five times in a row, alternating SIGTERM and SIGKILL,
//! while a long-lived TCP connection exchanges a message every 50 ms and a loop keeps opening new
//! short connections, through a ClusterIP. Nothing may fail, the long-lived flow's conntrack
//! entries must be the very same before and after, and backend ids must not change.
//!
//! Each target is one `Target` in `targets`: the NodePort half (a client outside the node
//! reaching `<node address>:<nodePort>`) slots in as another entry once the data path serves
//! NodePorts.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{conntrack, map_names, CtKey, CtValue};
use lb_tests::{
    cluster::{agent_bin, echo_service_yaml, lbctl_bin, OneNode, CLIENT_IP, NODE_NAME},
    spawn_in, tcp_connect, tcp_request, ChildGuard, Netns,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const RESTARTS: usize = 5;

/// Where clients connect, and from which namespace.
struct Target<'a> {
    name: &'static str,
    ns: &'a Netns,
    to: SocketAddrV4,
}

/// Failures and successes of one kind of traffic, with the first errors for the report.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, what: &str, r: anyhow::Result<()>) {
        match r {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = self.errors.lock().unwrap();
                if errors.len() < 10 {
                    errors.push(format!("{what}: {e:#}"));
                }
            }
        }
    }
}

/// The agent's command line as [`OneNode`] starts it.
fn agent_command(manifests: &Path, bpffs: &Path, ifaces: &[String]) -> Command {
    let mut cmd = Command::new(agent_bin().unwrap());
    cmd.arg("--cgroup")
        .arg(lb_tests::idle_cgroup())
        .arg("--manifests")
        .arg(manifests)
        .args(["--node-name", NODE_NAME, "--poll-interval-ms", "100"])
        .arg("--bpffs")
        .arg(bpffs);
    for iface in ifaces {
        cmd.args(["--iface", iface]);
    }
    cmd
}

fn lbctl(bed: &OneNode, args: &[&str]) -> Value {
    let out = Command::new(lbctl_bin().unwrap())
        .arg("--bpffs")
        .arg(bed.bpffs.path())
        .args(["--output", "json"])
        .args(args)
        .output()
        .expect("run lbctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Backend address -> id, for every frontend.
fn backend_ids(bed: &OneNode) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for f in lbctl(bed, &["services"]).as_array().unwrap() {
        for b in f["backends"].as_array().unwrap() {
            out.push((
                f["protocol"].as_str().unwrap().to_string(),
                b["address"].as_str().unwrap().to_string(),
                b["id"].as_u64().unwrap(),
            ));
        }
    }
    out.sort();
    out
}

/// The forward and reply conntrack entries of one TCP flow from the client, read from the pin,
/// without their last-seen time (which moves with every second of traffic).
fn flow_entries(bed: &OneNode, client_port: u16, frontend: SocketAddrV4) -> Vec<(CtKey, CtValue)> {
    let data = MapData::from_pin(bed.bpffs.path().join(map_names::CONNTRACK)).unwrap();
    let ct: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
    let fwd = CtKey {
        src_addr: lb_common::ipv4_to_net(CLIENT_IP),
        dst_addr: lb_common::ipv4_to_net(*frontend.ip()),
        src_port: client_port.to_be(),
        dst_port: frontend.port().to_be(),
        proto: lb_common::proto::TCP,
        dir: conntrack::CT_DIR_FORWARD,
        _pad: 0,
    };
    let fwd_v = ct
        .get(&fwd, 0)
        .expect("forward entry of the long-lived flow");
    let reply = CtKey {
        src_addr: fwd_v.nat_addr,
        dst_addr: fwd.src_addr,
        src_port: fwd_v.nat_port,
        dst_port: fwd.src_port,
        dir: conntrack::CT_DIR_REPLY,
        ..fwd
    };
    let reply_v = ct
        .get(&reply, 0)
        .expect("reply entry of the long-lived flow");
    [(fwd, fwd_v), (reply, reply_v)]
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                CtValue {
                    last_seen_ns: 0,
                    ..v
                },
            )
        })
        .collect()
}

#[test]
fn five_restarts_in_a_row_drop_nothing_and_keep_conntrack_and_ids() {
    let backends = [
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
        ("be-3", Ipv4Addr::new(198, 18, 2, 3)),
    ];
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.1).collect();
    let mut bed = OneNode::start(
        "restart",
        &backends,
        8080,
        &echo_service_yaml(VIP, 80, 8080, &ips),
    )
    .unwrap();
    bed.wait_for_tcp(SocketAddrV4::new(VIP, 80), Duration::from_secs(10))
        .unwrap();
    let targets = [Target {
        name: "ClusterIP",
        ns: &bed.client.ns,
        to: SocketAddrV4::new(VIP, 80),
    }];
    // NodePort: once served, push a Target whose ns is a client outside the node and whose `to`
    // is the node's address and the Service's nodePort.

    let ids_before = backend_ids(&bed);
    let (manifests, bpffs, ifaces) = (
        bed.manifests_dir().to_path_buf(),
        bed.bpffs.path().to_path_buf(),
        bed.node.pod_ifaces(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let long = Tally::default();
    let short = Tally::default();
    let mut conns = Vec::new();
    for t in &targets {
        let conn = tcp_connect(t.ns, t.to, Duration::from_secs(2)).unwrap();
        let port = conn.stream().local_addr().unwrap().port();
        conns.push((t, conn, port));
    }
    let entries_before: Vec<_> = conns
        .iter()
        .map(|(t, _, port)| flow_entries(&bed, *port, t.to))
        .collect();

    // The long-lived connections come back from their threads still open.
    let (agent_pids, open) = std::thread::scope(|s| {
        let mut long_threads = Vec::new();
        for (t, mut conn, _) in std::mem::take(&mut conns) {
            let (stop, long) = (&stop, &long);
            long_threads.push(s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let text = format!("ping {n}");
                    let r = conn
                        .roundtrip(&text, Duration::from_secs(2))
                        .and_then(|echo| {
                            anyhow::ensure!(
                                echo.trim_end() == text,
                                "echoed {echo:?} for {text:?}"
                            );
                            Ok(())
                        });
                    long.record(t.name, r);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                conn
            }));
        }
        for t in &targets {
            let (stop, short) = (&stop, &short);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    short.record(
                        t.name,
                        tcp_request(t.ns, t.to, Duration::from_secs(2)).map(drop),
                    );
                }
            });
        }

        let mut pids = Vec::new();
        for i in 0..RESTARTS {
            std::thread::sleep(Duration::from_millis(400));
            pids.push(bed.agent.pid());
            if i % 2 == 0 {
                let status = bed.agent.stop().unwrap();
                assert!(status.success(), "SIGTERM: {status}\n{}", bed.agent.logs());
            } else {
                // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
                unsafe { libc::kill(bed.agent.pid() as libc::pid_t, libc::SIGKILL) };
                let status = bed.agent.stop().unwrap();
                assert!(!status.success(), "SIGKILL ends it: {status}");
            }
            let mut next: ChildGuard = spawn_in(
                &bed.node.ns,
                agent_command(&manifests, &bpffs, &ifaces),
                &format!("restart{i}"),
            )
            .unwrap();
            next.wait_for_log("maps programmed", Duration::from_secs(20))
                .unwrap();
            bed.agent = next;
        }
        std::thread::sleep(Duration::from_millis(400));
        stop.store(true, Ordering::Relaxed);
        let open: Vec<_> = long_threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        (pids, open)
    });
    assert_eq!(agent_pids.len(), RESTARTS);

    let (long_ok, long_failed) = (
        long.ok.load(Ordering::Relaxed),
        long.failed.load(Ordering::Relaxed),
    );
    let (short_ok, short_failed) = (
        short.ok.load(Ordering::Relaxed),
        short.failed.load(Ordering::Relaxed),
    );
    assert_eq!(
        (long_failed, short_failed),
        (0, 0),
        "long-lived: {long_ok} ok; new connections: {short_ok} ok; errors: {:?} {:?}",
        long.errors.lock().unwrap(),
        short.errors.lock().unwrap()
    );
    // The streams really ran through the restarts (5 x ~0.4 s plus the restarts themselves).
    assert!(
        long_ok >= 30,
        "only {long_ok} messages on the long-lived connection"
    );
    assert!(short_ok >= 30, "only {short_ok} new connections");

    // The long-lived flow kept its very entries (backend id, NAT target, flags), and ids stayed.
    let conns_after: Vec<(u16, SocketAddrV4)> = targets
        .iter()
        .zip(&entries_before)
        .map(|(t, e)| (lb_common::net_to_port(e[0].0.src_port), t.to))
        .collect();
    for ((port, to), before) in conns_after.iter().zip(&entries_before) {
        assert_eq!(
            &flow_entries(&bed, *port, *to),
            before,
            "conntrack of the long-lived flow"
        );
    }
    assert_eq!(backend_ids(&bed), ids_before, "backend ids");
    drop(open);
}
