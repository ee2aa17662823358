//! End to end, real TCP and UDP between namespaces: what happens to flows while the endpoint set
//! changes (terminating endpoints drain, deleted ones keep their TCP connections and lose their
//! UDP flows, rolling replacement and a thousand rewrites under load without one failed or
//! mis-routed connection), ClientIP session affinity, and hairpin.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{OneNode, CLIENT_IP, NODE_NAME},
    tcp_connect, tcp_request, EchoServer, Node, Reply,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORT: u16 = 80;
const TARGET: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);
/// Long enough for the agent (polling every 100 ms) to see a manifests change and apply it.
const SETTLE: Duration = Duration::from_millis(700);

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, n)
}

fn name(n: u8) -> String {
    format!("be-{n}")
}

/// An endpoint's conditions.
#[derive(Clone, Copy)]
enum Cond {
    Ready,
    /// Terminating but still serving (graceful shutdown).
    Terminating,
}

/// Service `demo/echo` with TCP and UDP port 80 -> 8080, endpoints `eps`, and `extra` spec lines.
fn yaml(eps: &[(u8, Cond)], extra: &str) -> String {
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: http, port: {PORT}, protocol: TCP, targetPort: {TARGET}}}
  - {{name: udp-echo, port: {PORT}, protocol: UDP, targetPort: {TARGET}}}
{extra}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-1, namespace: demo, labels: {{kubernetes.io/service-name: echo}}}}
addressType: IPv4
ports:
- {{name: http, port: {TARGET}, protocol: TCP}}
- {{name: udp-echo, port: {TARGET}, protocol: UDP}}
endpoints:
"
    );
    for (n, c) in eps {
        let cond = match c {
            Cond::Ready => "{ready: true}",
            Cond::Terminating => "{ready: false, serving: true, terminating: true}",
        };
        y.push_str(&format!(
            "- {{addresses: [{}], conditions: {cond}, nodeName: {NODE_NAME}}}\n",
            ip(*n)
        ));
    }
    if eps.is_empty() {
        y = y.replace("endpoints:\n", "endpoints: []\n");
    }
    y
}

fn start(tag: &str, pods: &[u8], eps: &[(u8, Cond)], extra: &str) -> OneNode {
    let names: Vec<String> = pods.iter().map(|&n| name(n)).collect();
    let backends: Vec<(&str, Ipv4Addr)> = pods
        .iter()
        .zip(&names)
        .map(|(&n, s)| (s.as_str(), ip(n)))
        .collect();
    let bed = OneNode::start(tag, &backends, TARGET, &yaml(eps, extra)).expect("start the testbed");
    if !eps.is_empty() {
        bed.wait_for_tcp(SocketAddrV4::new(VIP, PORT), Duration::from_secs(10))
            .expect("ClusterIP answers");
    }
    bed
}

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, PORT)
}

fn must<T>(bed: &OneNode, what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}\nagent log:\n{}", bed.agent.logs()))
}

fn backends_of(bed: &OneNode, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            must(
                bed,
                &format!("request {i}"),
                tcp_request(&bed.client.ns, vip(), TIMEOUT),
            )
            .backend
        })
        .collect()
}

#[test]
fn terminating_endpoint_drains_its_connections_and_gets_no_new_ones() {
    let bed = start(
        "fse-drain",
        &[1, 2],
        &[(1, Cond::Ready), (2, Cond::Ready)],
        "",
    );
    // Long-lived connections until both backends hold some.
    let mut conns = Vec::new();
    while conns.len() < 20 {
        conns.push(must(
            &bed,
            "connect",
            tcp_connect(&bed.client.ns, vip(), TIMEOUT),
        ));
    }
    let on_1: Vec<_> = conns
        .iter_mut()
        .filter(|c| c.reply.backend == "be-1")
        .collect();
    assert!(!on_1.is_empty(), "some connection on be-1");

    // be-1 terminates gracefully.
    bed.write_manifests(&yaml(&[(1, Cond::Terminating), (2, Cond::Ready)], ""))
        .unwrap();
    std::thread::sleep(SETTLE);
    assert_eq!(
        backends_of(&bed, 20),
        BTreeSet::from([name(2)]),
        "new connections avoid be-1"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        let echo = must(
            &bed,
            "draining connection",
            c.roundtrip(&format!("drain {i}"), TIMEOUT),
        );
        assert_eq!(echo, format!("drain {i}"));
    }

    // Its endpoint is deleted: established TCP connections still reach it (as with kube-proxy,
    // conntrack keeps them; the pod decides when they end).
    bed.write_manifests(&yaml(&[(2, Cond::Ready)], "")).unwrap();
    std::thread::sleep(SETTLE);
    for (i, c) in conns.iter_mut().enumerate() {
        let echo = must(
            &bed,
            "connection after deletion",
            c.roundtrip(&format!("after {i}"), TIMEOUT),
        );
        assert_eq!(echo, format!("after {i}"));
    }
    assert_eq!(backends_of(&bed, 10), BTreeSet::from([name(2)]));
}

/// A UDP socket in the client pod, connected to the ClusterIP: one flow for its whole life.
fn udp_client(bed: &OneNode) -> UdpSocket {
    bed.client.ns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(vip()).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    })
}

fn udp_ask(bed: &OneNode, s: &UdpSocket) -> Reply {
    s.send(b"hi").unwrap();
    let mut buf = [0u8; 256];
    let n = s
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("UDP answer: {e}\nagent log:\n{}", bed.agent.logs()));
    Reply::parse(std::str::from_utf8(&buf[..n]).unwrap()).unwrap()
}

#[test]
fn udp_flow_moves_to_a_live_backend_when_its_endpoint_is_deleted_and_stays_while_terminating() {
    let bed = start(
        "fse-udp",
        &[1, 2],
        &[(1, Cond::Ready), (2, Cond::Ready)],
        "",
    );
    let s = udp_client(&bed);
    let first = udp_ask(&bed, &s).backend;
    for _ in 0..5 {
        assert_eq!(udp_ask(&bed, &s).backend, first, "one flow, one backend");
    }
    let n: u8 = first[3..].parse().unwrap();
    let other = 3 - n;
    // Terminating but serving: the flow stays.
    bed.write_manifests(&yaml(&[(n, Cond::Terminating), (other, Cond::Ready)], ""))
        .unwrap();
    std::thread::sleep(SETTLE);
    assert_eq!(
        udp_ask(&bed, &s).backend,
        first,
        "a draining UDP flow stays"
    );
    // Deleted: the next datagram goes to the live backend, and the flow stays there.
    bed.write_manifests(&yaml(&[(other, Cond::Ready)], ""))
        .unwrap();
    std::thread::sleep(SETTLE);
    for _ in 0..5 {
        assert_eq!(udp_ask(&bed, &s).backend, name(other));
    }
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend_per_service_port() {
    let bed = start(
        "fse-affinity",
        &[1, 2, 3],
        &[(1, Cond::Ready), (2, Cond::Ready), (3, Cond::Ready)],
        "  sessionAffinity: ClientIP",
    );
    let tcp = backends_of(&bed, 30);
    assert_eq!(tcp.len(), 1, "every TCP connection on one backend: {tcp:?}");
    let udp: BTreeSet<String> = (0..20)
        .map(|_| {
            must(
                &bed,
                "UDP request",
                lb_tests::udp_request(&bed.client.ns, vip(), TIMEOUT),
            )
            .backend
        })
        .collect();
    assert_eq!(
        udp.len(),
        1,
        "every UDP flow (new socket each) on one backend: {udp:?}"
    );
    // The sticky backend terminates: the client moves, and sticks to its new backend.
    let old: u8 = tcp.first().unwrap()[3..].parse().unwrap();
    let eps: Vec<(u8, Cond)> = [1, 2, 3]
        .iter()
        .map(|&n| {
            (
                n,
                if n == old {
                    Cond::Terminating
                } else {
                    Cond::Ready
                },
            )
        })
        .collect();
    bed.write_manifests(&yaml(&eps, "  sessionAffinity: ClientIP"))
        .unwrap();
    std::thread::sleep(SETTLE);
    let moved = backends_of(&bed, 20);
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(!moved.contains(&name(old)));
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    let bed = start("fse-hairpin", &[1], &[(1, Cond::Ready)], "");
    let me = &bed.backends[0].1;
    for _ in 0..5 {
        let r = must(&bed, "hairpin request", tcp_request(&me.ns, vip(), TIMEOUT));
        assert_eq!(r.backend, "be-1");
        assert_eq!(
            *r.peer.ip(),
            VIP,
            "the pod sees the frontend as its peer, not itself"
        );
    }
    let r = must(
        &bed,
        "hairpin UDP",
        lb_tests::udp_request(&me.ns, vip(), TIMEOUT),
    );
    assert_eq!((r.backend.as_str(), *r.peer.ip()), ("be-1", VIP));
    // Other clients are not source-NATed.
    let r = must(&bed, "client", tcp_request(&bed.client.ns, vip(), TIMEOUT));
    assert_eq!(*r.peer.ip(), CLIENT_IP);
}

/// One request: the generations before and after it, and its answer.
type Outcome = (usize, usize, anyhow::Result<Reply>);

/// Requests in a loop from `threads` threads of the client pod until `stop`, recording for each
/// the generation of the endpoint set before and after it, and its answer.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(ns: &lb_tests::Netns, generation: &Arc<AtomicUsize>, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let generation = Arc::clone(generation);
                let ns_path = ns.path().to_path_buf();
                std::thread::spawn(move || {
                    let ns = std::fs::File::open(&ns_path).unwrap();
                    // SAFETY: setns on this thread only, with a namespace fd we opened.
                    let rc = unsafe {
                        libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                    };
                    assert_eq!(rc, 0, "setns into the client pod");
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let before = generation.load(Ordering::SeqCst);
                        let r = lb_tests::tcp_request_from_here(
                            SocketAddrV4::new(CLIENT_IP, 0),
                            vip(),
                            TIMEOUT,
                        );
                        let after = generation.load(Ordering::SeqCst);
                        out.push((before, after, r));
                    }
                    out
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// Every request succeeded and was answered by a backend of an endpoint set in force at some
/// moment while it ran. Returns the number of requests.
fn check(results: Vec<Outcome>, sets: &[BTreeSet<String>], log: &str) -> usize {
    let n = results.len();
    let mut failures = Vec::new();
    for (before, after, r) in results {
        match r {
            Err(e) => failures.push(format!("generation {before}..{after}: {e:#}")),
            Ok(reply) => {
                let allowed: BTreeSet<&String> = sets[before..=after].iter().flatten().collect();
                if !allowed.contains(&reply.backend) {
                    failures.push(format!(
                        "mis-routed: {} answered during generations {before}..{after}, sets {:?}",
                        reply.backend,
                        &sets[before..=after]
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} requests failed or were mis-routed; first: {:#?}\nagent log:\n{log}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    n
}

#[test]
fn rolling_replacement_of_every_backend_under_load_fails_no_request() {
    let bed = start(
        "fse-rolling",
        &[1, 2, 3, 4, 5, 6],
        &[(1, Cond::Ready), (2, Cond::Ready), (3, Cond::Ready)],
        "",
    );
    // Long-lived connections to the old backends, which must survive the roll.
    let mut conns: Vec<_> = (0..6)
        .map(|_| must(&bed, "connect", tcp_connect(&bed.client.ns, vip(), TIMEOUT)))
        .collect();
    let generation = Arc::new(AtomicUsize::new(0));
    // The backends each generation may answer from (an endpoint the agent has not picked up
    // yet keeps answering: the set in force spans the previous and the next manifest).
    let mut sets: Vec<BTreeSet<String>> = vec![[1, 2, 3].iter().map(|&n| name(n)).collect()];
    let load = Load::start(&bed.client.ns, &generation, 2);
    let mut eps: Vec<(u8, Cond)> = vec![(1, Cond::Ready), (2, Cond::Ready), (3, Cond::Ready)];
    let step = |eps: &Vec<(u8, Cond)>, sets: &mut Vec<BTreeSet<String>>| {
        let ready: BTreeSet<String> = eps
            .iter()
            .filter(|(_, c)| matches!(c, Cond::Ready))
            .map(|(n, _)| name(*n))
            .collect();
        // While the agent catches up, answers may come from either set.
        let mut both = sets.last().unwrap().clone();
        both.extend(ready.iter().cloned());
        sets.push(both);
        generation.fetch_add(1, Ordering::SeqCst);
        bed.write_manifests(&yaml(eps, "")).unwrap();
        std::thread::sleep(SETTLE);
        sets.push(ready);
        generation.fetch_add(1, Ordering::SeqCst);
    };
    for (old, new) in [(1u8, 4u8), (2, 5), (3, 6)] {
        eps.push((new, Cond::Ready));
        step(&eps, &mut sets);
        eps.iter_mut().find(|(n, _)| *n == old).unwrap().1 = Cond::Terminating;
        step(&eps, &mut sets);
        eps.retain(|(n, _)| *n != old);
        step(&eps, &mut sets);
    }
    std::thread::sleep(Duration::from_secs(1));
    let results = load.finish();
    let n = check(results, &sets, &bed.agent.logs());
    assert!(n >= 100, "the load ran: {n} requests");
    assert_eq!(
        backends_of(&bed, 20),
        [4, 5, 6].iter().map(|&n| name(n)).collect(),
        "only the new backends serve new connections"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        assert!(["be-1", "be-2", "be-3"].contains(&c.reply.backend.as_str()));
        must(
            &bed,
            "long-lived connection",
            c.roundtrip(&format!("still {i}"), TIMEOUT),
        );
    }
}

/// The endpoint set is rewritten a thousand times, straight through the agent's writer into the
/// maps the attached programs use, while two threads open connections in a tight loop: not one
/// fails, and every one is answered by a backend that was in the set at some moment while it ran.
#[test]
fn a_thousand_endpoint_set_rewrites_under_load_fail_or_misroute_nothing() {
    use lb_userspace::{
        dataplane::{bpf::BpfMaps, BackendAddr, Desired, DesiredFrontend, FrontendAddr, Writer},
        loader,
    };
    lb_tests::require_root();
    let node = Node::new("fse-1000").expect("node");
    let client = node.add_pod("client", CLIENT_IP).expect("client pod");
    let mut servers: Vec<(EchoServer, lb_tests::Pod)> = Vec::new();
    for n in 1..=4u8 {
        let pod = node.add_pod(&name(n), ip(n)).expect("backend pod");
        let server = EchoServer::start(&pod.ns, &name(n), TARGET, TARGET).expect("echo server");
        servers.push((server, pod));
    }
    let bpffs = lb_tests::BpfFs::new("fse-1000").expect("bpffs");
    let mut ebpf = node.ns.run(|| {
        let mut ebpf = loader::load(&loader::LoadOptions {
            bpffs: bpffs.path().to_path_buf(),
            conntrack_size: 65_536,
            reject_limit: Default::default(),
            maglev_table_size: lb_common::maglev::DEFAULT_TABLE_SIZE,
        })
        .expect("load");
        for iface in node.pod_ifaces() {
            loader::attach_tc(&mut ebpf, &iface).expect("attach");
        }
        ebpf
    });
    let mut maps = BpfMaps::from_ebpf(&mut ebpf).expect("maps");
    let mut writer = Writer::adopt(&maps).expect("writer");
    let desired = |set: &BTreeSet<u8>| -> Desired {
        [(
            FrontendAddr::internal(VIP, PORT, lb_common::proto::TCP),
            DesiredFrontend {
                service_port: "demo/echo:http/TCP".into(),
                backends: set
                    .iter()
                    .map(|&n| BackendAddr {
                        addr: ip(n),
                        port: TARGET,
                        proto: lb_common::proto::TCP,
                        local: true,
                    })
                    .collect(),
                flags: lb_common::service::SVC_FLAG_CLUSTER_IP,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect()
    };
    // Sets always hold at least one backend; which ones, and how many, changes every time.
    let set_of = |i: usize| -> BTreeSet<u8> {
        let bits = (i * 7 + 3) % 15 + 1;
        (1..=4u8).filter(|n| bits & (1 << (n - 1)) != 0).collect()
    };
    let names_of = |s: &BTreeSet<u8>| s.iter().map(|&n| name(n)).collect::<BTreeSet<_>>();
    let first = set_of(0);
    writer
        .apply(&mut maps, &desired(&first))
        .expect("first apply");
    let sets = Arc::new(Mutex::new(vec![names_of(&first)]));
    let generation = Arc::new(AtomicUsize::new(0));
    let load = Load::start(&client.ns, &generation, 2);
    let started = Instant::now();
    let mut writes = 0;
    for i in 1..=1000 {
        let set = set_of(i);
        // The generation moves on before the apply and again after it: during the apply, a
        // packet may see the old or the new set.
        let mut both = sets.lock().unwrap().last().unwrap().clone();
        both.extend(names_of(&set));
        sets.lock().unwrap().push(both);
        generation.fetch_add(1, Ordering::SeqCst);
        let stats = writer.apply(&mut maps, &desired(&set)).expect("apply");
        writes += stats.map_writes + stats.map_deletes;
        sets.lock().unwrap().push(names_of(&set));
        generation.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
    }
    let results = load.finish();
    let sets = sets.lock().unwrap().clone();
    let per_backend: BTreeMap<String, usize> =
        results.iter().fold(BTreeMap::new(), |mut m, (_, _, r)| {
            if let Ok(r) = r {
                *m.entry(r.backend.clone()).or_default() += 1;
            }
            m
        });
    let n = check(results, &sets, "(no agent: the test drives the writer)");
    eprintln!(
        "{n} connections during 1000 rewrites ({writes} map operations) in {:?}: {per_backend:?}",
        started.elapsed()
    );
    assert!(
        n >= 200,
        "the load ran alongside the rewrites: {n} connections"
    );
    assert_eq!(
        per_backend.len(),
        4,
        "every backend served: {per_backend:?}"
    );
    drop(ebpf);
}
