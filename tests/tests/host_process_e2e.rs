//! Host processes end to end: a process in the node's own network namespace, inside the agent's
//! `--cgroup`, reaches a ClusterIP and a NodePort through the socket hooks (connect4, sendmsg4,
//! recvmsg4, getpeername4), sees the frontend wherever it reads an address, and a connected UDP
//! socket whose backend is deleted is moved to a live backend by the agent (or, when its
//! frontend has no endpoints left, aborted).
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use lb_common::{SockKey, SockValue, TrafficCounters};
use lb_tests::{
    cluster::{agent_bin, OneNode, NODE_NAME},
    spawn_in, Netns, TestCgroup, POD_GATEWAY,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// A ClusterIP whose Service has no endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
const TARGET: u16 = 8080;
/// The node's address in the testbed (the only one it has), so the NodePort frontend.
const NODE_ADDR: Ipv4Addr = POD_GATEWAY;
/// ECONNABORTED, ECONNREFUSED, ENETUNREACH, EDESTADDRREQ.
const ECONNABORTED: i32 = 103;
const ECONNREFUSED: i32 = 111;
const ENETUNREACH: i32 = 101;
const EDESTADDRREQ: i32 = 89;

fn backends() -> Vec<(&'static str, Ipv4Addr)> {
    vec![
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
    ]
}

/// Service `demo/echo` (NodePort, TCP and UDP) with `ready` as endpoints, and `demo/empty`
/// without any.
fn manifests(ready: &[Ipv4Addr]) -> String {
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  type: NodePort
  clusterIP: {VIP}
  ports:
  - {{name: http, port: {PORT}, protocol: TCP, targetPort: {TARGET}, nodePort: {NODE_PORT}}}
  - {{name: udp, port: {PORT}, protocol: UDP, targetPort: {TARGET}, nodePort: {NODE_PORT}}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: demo}}
spec:
  clusterIP: {EMPTY_VIP}
  ports:
  - {{name: http, port: {PORT}, protocol: TCP, targetPort: {TARGET}}}
  - {{name: udp, port: {PORT}, protocol: UDP, targetPort: {TARGET}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: demo
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
- {{name: http, port: {TARGET}, protocol: TCP}}
- {{name: udp, port: {TARGET}, protocol: UDP}}
endpoints:
"
    );
    for b in ready {
        yaml.push_str(&format!(
            "- {{addresses: [{b}], conditions: {{ready: true}}, nodeName: {}}}\n",
            lb_tests::cluster::NODE_NAME
        ));
    }
    yaml
}

fn start(tag: &str) -> OneNode {
    let ips: Vec<Ipv4Addr> = backends().iter().map(|b| b.1).collect();
    let bed = OneNode::start(tag, &backends(), TARGET, &manifests(&ips))
        .expect("start the one-node testbed");
    bed.wait_for_tcp(SocketAddrV4::new(VIP, PORT), Duration::from_secs(10))
        .expect("ClusterIP answers pods");
    bed
}

/// `lb-sock-client` running in a namespace (and a cgroup, or not), driven line by line.
struct HostClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HostClient {
    fn start(ns: &Netns, cgroup: Option<&TestCgroup>) -> HostClient {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lb-sock-client"));
        ns.enter_on_spawn(&mut cmd);
        if let Some(cg) = cgroup {
            cg.add_on_spawn(&mut cmd);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lb-sock-client");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        HostClient {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends one command, returns the answer line.
    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("write to lb-sock-client");
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read from lb-sock-client");
        assert!(n > 0, "lb-sock-client exited during {command:?}");
        line.trim_end().to_string()
    }

    /// Sends a command that must succeed; returns the answer without "ok ".
    fn ok(&mut self, bed: &OneNode, command: &str) -> String {
        let answer = self.ask(command);
        match answer.strip_prefix("ok ") {
            Some(rest) => rest.to_string(),
            None => panic!(
                "{command:?} failed: {answer}\nagent log:\n{}",
                bed.agent.logs()
            ),
        }
    }
}

impl Drop for HostClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `new_flows` counters summed over every frontend and over every backend.
fn new_flows(bed: &OneNode) -> (u64, u64) {
    let read = |name: &str| -> u64 {
        let data = MapData::from_pin(bed.bpffs.path().join(name)).unwrap();
        let map: PerCpuHashMap<_, u32, TrafficCounters> =
            PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).unwrap();
        map.iter()
            .map(|e| TrafficCounters::sum(e.unwrap().1.iter()).new_flows)
            .sum()
    };
    (
        read(lb_common::map_names::FRONTEND_STATS),
        read(lb_common::map_names::BACKEND_STATS),
    )
}

/// How many entries the host-process socket map holds.
fn sock_entries(bed: &OneNode) -> usize {
    let data = MapData::from_pin(bed.bpffs.path().join(lb_common::map_names::SOCK)).unwrap();
    let map: HashMap<_, SockKey, SockValue> = HashMap::try_from(Map::LruHashMap(data)).unwrap();
    map.keys().count()
}

/// The errno of a failed answer ("err <errno> <message>").
fn errno(answer: &str) -> Option<i32> {
    answer.strip_prefix("err ")?.split(' ').next()?.parse().ok()
}

/// The backend name at the start of an answer ("be-1 198.18.0.1:40000 ...").
fn backend(answer: &str) -> String {
    answer.split(' ').next().unwrap_or("").to_string()
}

/// The value of `key=` in an answer.
fn field<'a>(answer: &'a str, key: &str) -> &'a str {
    answer
        .split(' ')
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {answer:?}"))
}

#[test]
fn host_process_reaches_cluster_ip_over_tcp_and_udp_and_sees_the_frontend() {
    let bed = start("host-cip");
    let mut client = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
    let frontend = SocketAddrV4::new(VIP, PORT).to_string();
    let names: BTreeSet<String> = backends().iter().map(|b| b.0.to_string()).collect();

    let flows_before = new_flows(&bed);
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let answer = client.ok(&bed, &format!("tcp {frontend}"));
        assert!(names.contains(&backend(&answer)), "{answer}");
        assert_eq!(field(&answer, "peer="), frontend, "getpeername: {answer}");
        seen.insert(backend(&answer));
    }
    assert_eq!(seen, names, "20 TCP connections used both backends");
    // Each connect is one new flow of its frontend and of its backend.
    let flows_after = new_flows(&bed);
    assert_eq!(
        (
            flows_after.0 - flows_before.0,
            flows_after.1 - flows_before.1
        ),
        (20, 20),
        "new flows counted (frontends, backends)"
    );

    // Unconnected UDP: sendto the frontend, recvfrom reports the frontend.
    let answer = client.ok(&bed, &format!("udp-sendto {frontend}"));
    assert!(names.contains(&backend(&answer)), "{answer}");
    assert_eq!(
        field(&answer, "from="),
        frontend,
        "recvfrom source: {answer}"
    );
    // Later datagrams of that socket to the frontend stay on its backend.
    let first = backend(&answer);
    for _ in 0..5 {
        let again = client.ok(&bed, &format!("udp-sendto {frontend}"));
        assert_eq!(backend(&again), first, "unconnected UDP changed backend");
    }

    // Connected UDP: getpeername and recvfrom report the frontend.
    let answer = client.ok(&bed, &format!("udp-connect {frontend}"));
    assert_eq!(field(&answer, "peer="), frontend);
    let answer = client.ok(&bed, "udp-send");
    assert!(names.contains(&backend(&answer)), "{answer}");
    assert_eq!(
        field(&answer, "from="),
        frontend,
        "recvfrom source: {answer}"
    );
}

#[test]
fn host_process_reaches_a_node_port_on_the_node_address() {
    let bed = start("host-np");
    let mut client = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
    let frontend = SocketAddrV4::new(NODE_ADDR, NODE_PORT).to_string();
    let names: BTreeSet<String> = backends().iter().map(|b| b.0.to_string()).collect();

    let answer = client.ok(&bed, &format!("tcp {frontend}"));
    assert!(names.contains(&backend(&answer)), "{answer}");
    assert_eq!(field(&answer, "peer="), frontend, "getpeername: {answer}");

    let answer = client.ok(&bed, &format!("udp-sendto {frontend}"));
    assert!(names.contains(&backend(&answer)), "{answer}");
    assert_eq!(
        field(&answer, "from="),
        frontend,
        "recvfrom source: {answer}"
    );
}

#[test]
fn host_process_gets_connection_refused_from_a_service_without_endpoints() {
    let bed = start("host-empty");
    let mut client = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
    let frontend = SocketAddrV4::new(EMPTY_VIP, PORT);
    let answer = client.ask(&format!("tcp {frontend}"));
    assert_eq!(errno(&answer), Some(ECONNREFUSED), "TCP connect: {answer}");
    let answer = client.ask(&format!("udp-sendto {frontend}"));
    assert_eq!(errno(&answer), Some(ECONNREFUSED), "UDP sendto: {answer}");
}

#[test]
fn process_outside_the_agent_cgroup_is_not_translated() {
    let bed = start("host-out");
    // Same namespace, not in the cgroup: the ClusterIP is just an address without a route.
    let mut outside = HostClient::start(&bed.node.ns, None);
    let answer = outside.ask(&format!("tcp {}", SocketAddrV4::new(VIP, PORT)));
    assert_eq!(errno(&answer), Some(ENETUNREACH), "{answer}");
    // The control: inside the cgroup the same connect is served.
    let mut inside = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
    inside.ok(&bed, &format!("tcp {}", SocketAddrV4::new(VIP, PORT)));
}

#[test]
fn connected_udp_socket_whose_backend_is_deleted_is_moved_to_a_live_one_without_an_error() {
    let mut bed = start("host-udp-move");
    // The agent runs outside the hosts' cgroup: its connect of the socket must run the hooks of
    // the socket's cgroup, not its own.
    let members = std::fs::read_to_string(bed.host_cgroup.path().join("cgroup.procs")).unwrap();
    assert!(
        !members.lines().any(|p| p == bed.agent.pid().to_string()),
        "the agent is in the host cgroup"
    );
    let mut client = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
    let frontend = SocketAddrV4::new(VIP, PORT).to_string();
    client.ok(&bed, &format!("udp-connect {frontend}"));
    let answer = client.ok(&bed, "udp-send");
    let gone = backend(&answer);
    let (live_name, live_ip) = backends()
        .into_iter()
        .find(|b| b.0 != gone)
        .expect("another backend");

    // Remove the socket's backend from the endpoints (its pod still answers: a datagram that
    // still went there would be answered by the wrong backend, not lost).
    bed.write_manifests(&manifests(&[live_ip]))
        .expect("rewrite manifests");
    bed.agent
        .wait_for_log(
            "moved a connected UDP socket of a host process to a live backend",
            Duration::from_secs(10),
        )
        .expect("the agent moves the socket");
    assert!(
        !bed.agent
            .logs()
            .contains("destroyed a connected UDP socket"),
        "{}",
        bed.agent.logs()
    );

    // The same socket, not connected again by the application: no error, the live backend
    // answers, and every address it reads is still the frontend.
    for _ in 0..5 {
        let answer = client.ok(&bed, "udp-send");
        assert_eq!(backend(&answer), live_name, "{answer}");
        assert_eq!(
            field(&answer, "from="),
            frontend,
            "recvfrom source: {answer}"
        );
    }
    let answer = client.ok(&bed, "udp-peer");
    assert_eq!(field(&answer, "peer="), frontend, "getpeername: {answer}");
    // The old backend's entry is gone, the new one's is there: forward + reverse of the socket.
    assert_eq!(sock_entries(&bed), 2, "socket map entries after the move");
}

#[test]
fn connected_udp_socket_whose_frontend_has_no_endpoints_left_is_aborted_and_reconnects_later() {
    let mut bed = start("host-udp-del");
    let mut client = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
    let frontend = SocketAddrV4::new(VIP, PORT).to_string();
    client.ok(&bed, &format!("udp-connect {frontend}"));
    client.ok(&bed, "udp-send");

    // Every endpoint removed: connect4 refuses the agent's connect, so the socket cannot be
    // moved and is destroyed instead.
    bed.write_manifests(&manifests(&[]))
        .expect("rewrite manifests");
    bed.agent
        .wait_for_log(
            "destroyed a connected UDP socket of a host process instead of moving it",
            Duration::from_secs(10),
        )
        .expect("the agent destroys the socket");
    let logs = bed.agent.logs();
    assert!(
        logs.contains("the frontend has no endpoints any more"),
        "the reason is logged: {logs}"
    );

    // The application's next receive reports the abort; the socket is no longer connected, so
    // a send without an address is refused.
    let answer = client.ask("udp-recv");
    assert_eq!(
        errno(&answer),
        Some(ECONNABORTED),
        "recv after deletion: {answer}"
    );
    let answer = client.ask("udp-send");
    assert_eq!(
        errno(&answer),
        Some(EDESTADDRREQ),
        "send after the abort: {answer}"
    );
    // Without endpoints a new connect is refused; once an endpoint is back it reaches it.
    let answer = client.ask(&format!("udp-reconnect {frontend}"));
    assert_eq!(errno(&answer), Some(ECONNREFUSED), "{answer}");
    let (live_name, live_ip) = backends()[1];
    bed.write_manifests(&manifests(&[live_ip]))
        .expect("rewrite manifests");
    let mut answer = client.ask(&format!("udp-reconnect {frontend}"));
    for _ in 0..100 {
        if answer.starts_with("ok ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        answer = client.ask(&format!("udp-reconnect {frontend}"));
    }
    assert_eq!(field(&answer, "peer="), frontend, "{answer}");
    for _ in 0..5 {
        let answer = client.ok(&bed, "udp-send");
        assert_eq!(backend(&answer), live_name, "{answer}");
        assert_eq!(field(&answer, "from="), frontend);
    }
}

#[test]
fn connected_udp_socket_no_process_holds_is_aborted_instead_of_moved() {
    let mut bed = start("host-udp-noowner");
    let mut client = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
    let frontend = SocketAddrV4::new(VIP, PORT).to_string();
    client.ok(&bed, &format!("udp-connect {frontend}"));
    let gone = backend(&client.ok(&bed, "udp-send"));
    let live_ip = backends().into_iter().find(|b| b.0 != gone).unwrap().1;
    // The socket waits in a unix socket's queue (SCM_RIGHTS), closed by its process: no
    // /proc/<pid>/fd links to it, so the agent cannot take a duplicate.
    client.ok(&bed, "udp-stash");

    bed.write_manifests(&manifests(&[live_ip]))
        .expect("rewrite manifests");
    bed.agent
        .wait_for_log(
            "destroyed a connected UDP socket of a host process instead of moving it",
            Duration::from_secs(10),
        )
        .expect("the agent destroys the socket");
    let logs = bed.agent.logs();
    assert!(
        logs.contains("no process of this PID namespace has the socket open"),
        "the reason is logged: {logs}"
    );
    assert!(!logs.contains("moved a connected UDP socket"), "{logs}");

    client.ok(&bed, "udp-unstash");
    let answer = client.ask("udp-recv");
    assert_eq!(errno(&answer), Some(ECONNABORTED), "{answer}");
}

#[test]
fn socket_hooks_outlive_the_agent_are_adopted_on_restart_and_removed_by_cleanup() {
    let mut bed = start("host-restart");
    let mut client = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
    let to = format!("tcp {}", SocketAddrV4::new(VIP, PORT));
    client.ok(&bed, &to);

    // Stopped with the default --on-exit keep: the pinned links keep translating.
    assert!(bed.agent.stop().unwrap().success(), "{}", bed.agent.logs());
    client.ok(&bed, &to);

    // A new agent on the same cgroup and pins takes the links over.
    let mut cmd = Command::new(agent_bin().unwrap());
    cmd.arg("--cgroup")
        .arg(bed.host_cgroup.path())
        .arg("--manifests")
        .arg(bed.manifests_dir())
        .args(["--node-name", NODE_NAME, "--poll-interval-ms", "100"])
        .arg("--bpffs")
        .arg(bed.bpffs.path());
    for iface in bed.node.pod_ifaces() {
        cmd.args(["--iface", &iface]);
    }
    let mut second = spawn_in(&bed.node.ns, cmd, "host-restart2").unwrap();
    second
        .wait_for_log(
            "host-process socket hooks of the previous agent now run this agent's programs",
            Duration::from_secs(20),
        )
        .unwrap();
    second
        .wait_for_log("maps programmed", Duration::from_secs(20))
        .unwrap();
    client.ok(&bed, &to);
    assert!(second.stop().unwrap().success(), "{}", second.logs());

    // Cleanup removes the links: the ClusterIP is an unroutable address again.
    let out = bed
        .node
        .ns
        .run(|| {
            Command::new(agent_bin().unwrap())
                .arg("cleanup")
                .arg("--bpffs")
                .arg(bed.bpffs.path())
                .output()
        })
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("links-cgroup/connect4"), "{printed}");
    // The kernel releases a link whose last reference went away from a work queue: wait for it.
    let mut answer = client.ask(&to);
    for _ in 0..50 {
        if errno(&answer) == Some(ENETUNREACH) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        answer = client.ask(&to);
    }
    assert_eq!(errno(&answer), Some(ENETUNREACH), "after cleanup: {answer}");
}

#[test]
fn process_of_a_pod_namespace_in_the_cgroup_is_left_to_the_packet_path() {
    let bed = start("host-podns");
    // In the agent's cgroup but in the client pod's namespace: the socket hooks leave it alone
    // (no socket entry is made) and tc load-balances its packets as for any pod.
    let mut pod = HostClient::start(&bed.client.ns, Some(&bed.host_cgroup));
    let answer = pod.ok(&bed, &format!("tcp {}", SocketAddrV4::new(VIP, PORT)));
    assert_eq!(
        field(&answer, "peer="),
        SocketAddrV4::new(VIP, PORT).to_string()
    );
    assert_eq!(sock_entries(&bed), 0, "a pod socket was translated");
    // The control: a host process's connect makes its entry.
    let mut host = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
    host.ok(&bed, &format!("tcp {}", SocketAddrV4::new(VIP, PORT)));
    assert_eq!(
        sock_entries(&bed),
        1,
        "one reverse entry for the host TCP socket"
    );
}

#[test]
fn two_agents_with_their_own_cgroups_and_pins_do_not_interfere() {
    let start_named = |tag: &str, name: &'static str| {
        let ip = Ipv4Addr::new(198, 18, 2, 1);
        let bed = OneNode::start(tag, &[(name, ip)], TARGET, &manifests(&[ip]))
            .expect("start a one-node testbed");
        bed.wait_for_tcp(SocketAddrV4::new(VIP, PORT), Duration::from_secs(10))
            .expect("ClusterIP answers pods");
        bed
    };
    // Same ClusterIP on both nodes, different backends.
    let a = start_named("host-two-a", "node-a-be");
    let b = start_named("host-two-b", "node-b-be");
    let to = format!("tcp {}", SocketAddrV4::new(VIP, PORT));
    for (bed, name) in [(&a, "node-a-be"), (&b, "node-b-be")] {
        let mut client = HostClient::start(&bed.node.ns, Some(&bed.host_cgroup));
        for _ in 0..5 {
            assert_eq!(backend(&client.ok(bed, &to)), name);
        }
    }
    // A process of node A's namespace in node B's cgroup: B's hooks leave it alone (another
    // namespace), A's do not see it (another cgroup).
    let mut crossed = HostClient::start(&a.node.ns, Some(&b.host_cgroup));
    let answer = crossed.ask(&to);
    assert_eq!(errno(&answer), Some(ENETUNREACH), "{answer}");
}
