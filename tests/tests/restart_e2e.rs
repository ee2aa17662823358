//! Restart survival: node-1's agent is restarted five times in a row, alternating SIGTERM and
//! SIGKILL, while, for each target, a long-lived TCP connection exchanges a message every 50 ms
//! and a loop keeps opening new short connections. The targets are a ClusterIP (from a pod on
//! node-1, through tc) and a NodePort (from a client outside the nodes to node-1's address,
//! through XDP on node-1's uplink). The Service has one backend on node-1 and one on node-2 (the
//! NodePort flows to it are source-NATed by node-1). Nothing may fail, the long-lived flows'
//! conntrack entries must be the very same before and after, and backend ids must not change.
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
    cluster::{agent_bin, lbctl_bin},
    fabric::{MultiNode, NodeSpec},
    spawn_in, tcp_connect, tcp_request, ChildGuard, Netns,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const NODE_PORT: u16 = 30080;
const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 10);
const BE_LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const BE_REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const RESTARTS: usize = 5;

/// A NodePort Service (externalTrafficPolicy=Cluster) on VIP:80 and nodePort 30080, with one
/// endpoint on each node.
fn manifests() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  type: NodePort
  clusterIP: {VIP}
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: {NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: demo
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
- {{addresses: [{BE_LOCAL}], conditions: {{ready: true}}, nodeName: node-1}}
- {{addresses: [{BE_REMOTE}], conditions: {{ready: true}}, nodeName: node-2}}
"
    )
}

/// Where clients connect, from which namespace and which address.
struct Target<'a> {
    name: &'static str,
    ns: &'a Netns,
    client: Ipv4Addr,
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

/// node-1's agent command line, as [`MultiNode`] starts it.
fn agent_command(manifests: &Path, bpffs: &Path, ifaces: &[String]) -> Command {
    let mut cmd = Command::new(agent_bin().unwrap());
    cmd.arg("--cgroup")
        .arg(lb_tests::idle_cgroup())
        .arg("--manifests")
        .arg(manifests)
        .args(["--node-name", "node-1", "--poll-interval-ms", "100"])
        .args(["--uplink", "eth0"])
        .arg("--bpffs")
        .arg(bpffs);
    for iface in ifaces {
        cmd.args(["--iface", iface]);
    }
    cmd
}

fn lbctl(bpffs: &Path, args: &[&str]) -> Value {
    let out = Command::new(lbctl_bin().unwrap())
        .arg("--bpffs")
        .arg(bpffs)
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

/// (frontend, scope, backend address, backend id), for every frontend.
fn backend_ids(bpffs: &Path) -> Vec<(String, String, String, u64)> {
    let mut out = Vec::new();
    for f in lbctl(bpffs, &["services"]).as_array().unwrap() {
        for b in f["backends"].as_array().unwrap() {
            out.push((
                f["address"].as_str().unwrap().to_string(),
                f["scope"].as_str().unwrap().to_string(),
                b["address"].as_str().unwrap().to_string(),
                b["id"].as_u64().unwrap(),
            ));
        }
    }
    out.sort();
    out
}

/// The forward and reply conntrack entries of one TCP flow, read from the pin, without their
/// last-seen time (which moves with every second of traffic).
fn flow_entries(
    bpffs: &Path,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
) -> Vec<(CtKey, CtValue)> {
    let data = MapData::from_pin(bpffs.join(map_names::CONNTRACK)).unwrap();
    let ct: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
    let client_port = client.port();
    let fwd = CtKey {
        src_addr: lb_common::ipv4_to_net(*client.ip()),
        dst_addr: lb_common::ipv4_to_net(*frontend.ip()),
        src_port: client_port.to_be(),
        dst_port: frontend.port().to_be(),
        proto: lb_common::proto::TCP,
        dir: conntrack::CT_DIR_FORWARD,
        _pad: 0,
    };
    let fwd_v = ct.get(&fwd, 0).unwrap_or_else(|e| {
        panic!("forward entry of the long-lived flow {client} -> {frontend}: {e}")
    });
    // A source-NATed flow's replies come back to node-1's address and SNAT port.
    let (dst_addr, dst_port) = if fwd_v.flags & conntrack::CT_FLAG_SNAT != 0 {
        (fwd_v.peer_addr, fwd_v.peer_port)
    } else {
        (fwd.src_addr, fwd.src_port)
    };
    let reply = CtKey {
        src_addr: fwd_v.nat_addr,
        dst_addr,
        src_port: fwd_v.nat_port,
        dst_port,
        dir: conntrack::CT_DIR_REPLY,
        ..fwd
    };
    let reply_v = ct.get(&reply, 0).unwrap_or_else(|e| {
        panic!("reply entry of the long-lived flow {client} -> {frontend}: {e}")
    });
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
    let mut bed = MultiNode::start(
        "restart",
        &[
            NodeSpec {
                name: "node-1",
                addr: NODE1,
                pod_net: Ipv4Addr::new(198, 18, 2, 0),
                // The ClusterIP client is a pod on node-1 (its echo server goes unused).
                backends: &[("be-local", BE_LOCAL), ("client", POD_CLIENT)],
            },
            NodeSpec {
                name: "node-2",
                addr: NODE2,
                pod_net: Ipv4Addr::new(198, 18, 3, 0),
                backends: &[("be-remote", BE_REMOTE)],
            },
        ],
        EXTERNAL_CLIENT,
        &[],
        &manifests(),
    )
    .expect("start the two-node testbed");
    let manifests = bed.manifests_dir().to_path_buf();
    let MultiNode { nodes, client, .. } = &mut bed;
    let node1 = &mut nodes[0];
    let (bpffs, ifaces) = (node1.bpffs.path().to_path_buf(), node1.node.pod_ifaces());
    let agent = &mut node1.agent;
    let targets = [
        Target {
            name: "ClusterIP",
            ns: &node1.backends[1].1.ns,
            client: POD_CLIENT,
            to: SocketAddrV4::new(VIP, 80),
        },
        Target {
            name: "NodePort",
            ns: client,
            client: EXTERNAL_CLIENT,
            to: SocketAddrV4::new(NODE1, NODE_PORT),
        },
    ];
    // Both frontends answer, from both backends, before anything is measured.
    for t in &targets {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            if let Ok(r) = tcp_request(t.ns, t.to, Duration::from_millis(500)) {
                seen.insert(r.backend);
            }
            if seen.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            seen.len(),
            2,
            "{}: both backends answer: {seen:?}\n{}",
            t.name,
            agent.logs()
        );
    }

    let ids_before = backend_ids(&bpffs);
    let stop = Arc::new(AtomicBool::new(false));
    let long = Tally::default();
    let short = Tally::default();
    // One long-lived connection per target and backend: through the NodePort, the one to the
    // remote backend is source-NATed by node-1, the other is not.
    let mut conns = Vec::new();
    for t in &targets {
        let mut by_backend = std::collections::BTreeMap::new();
        for _ in 0..100 {
            let conn = tcp_connect(t.ns, t.to, Duration::from_secs(2)).unwrap();
            by_backend.entry(conn.reply.backend.clone()).or_insert(conn);
            if by_backend.len() == 2 {
                break;
            }
        }
        assert_eq!(
            by_backend.len(),
            2,
            "{}: a connection to each backend",
            t.name
        );
        for conn in by_backend.into_values() {
            let port = conn.stream().local_addr().unwrap().port();
            conns.push((t, conn, SocketAddrV4::new(t.client, port)));
        }
    }
    let entries_before: Vec<_> = conns
        .iter()
        .map(|(t, _, from)| flow_entries(&bpffs, *from, t.to))
        .collect();
    let snat = |e: &Vec<(CtKey, CtValue)>| e[0].1.flags & conntrack::CT_FLAG_SNAT != 0;
    assert_eq!(
        entries_before.iter().filter(|e| snat(e)).count(),
        1,
        "exactly one long-lived flow (NodePort to node-2's backend) is source-NATed"
    );
    let long_lived: Vec<(SocketAddrV4, SocketAddrV4, String)> = conns
        .iter()
        .map(|(t, conn, from)| (*from, t.to, conn.reply.backend.clone()))
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
            pids.push(agent.pid());
            if i % 2 == 0 {
                let status = agent.stop().unwrap();
                assert!(status.success(), "SIGTERM: {status}\n{}", agent.logs());
            } else {
                // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
                unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGKILL) };
                let status = agent.stop().unwrap();
                assert!(!status.success(), "SIGKILL ends it: {status}");
            }
            let mut next: ChildGuard = spawn_in(
                &node1.node.ns,
                agent_command(&manifests, &bpffs, &ifaces),
                &format!("restart{i}"),
            )
            .unwrap();
            next.wait_for_log("maps programmed", Duration::from_secs(20))
                .unwrap();
            *agent = next;
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
    eprintln!(
        "{RESTARTS} restarts: {long_ok} messages on {} long-lived connections, {short_ok} new \
         connections, {long_failed} + {short_failed} failures",
        long_lived.len()
    );
    let n = targets.len() as u64;
    assert!(
        long_ok >= 30 * n,
        "only {long_ok} messages on the long-lived connections"
    );
    assert!(short_ok >= 30 * n, "only {short_ok} new connections");

    // The long-lived flows kept their very entries (backend id, NAT targets, flags), and ids
    // stayed.
    for ((from, to, backend), before) in long_lived.iter().zip(&entries_before) {
        assert_eq!(
            &flow_entries(&bpffs, *from, *to),
            before,
            "conntrack of the long-lived flow {from} -> {to} (backend {backend})"
        );
    }
    assert_eq!(backend_ids(&bpffs), ids_before, "backend ids");
    drop(open);
}
