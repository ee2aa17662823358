//! Self-tests of the testbed, without any load balancer: they need root and fail without it.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::*;

const TIMEOUT: Duration = Duration::from_secs(2);

fn two_pods(tag: &str) -> (Node, Pod, Pod) {
    let node = Node::new(tag).expect("node");
    let a = node
        .add_pod("a", Ipv4Addr::new(198, 18, 1, 1))
        .expect("pod a");
    let b = node
        .add_pod("b", Ipv4Addr::new(198, 18, 1, 2))
        .expect("pod b");
    (node, a, b)
}

#[test]
fn pod_to_pod_tcp_and_udp() {
    require_root();
    let (node, a, b) = two_pods("p2p");
    assert_eq!(
        node.pod_ifaces(),
        [a.host_iface.clone(), b.host_iface.clone()]
    );
    let server = EchoServer::start(&b.ns, "b", 8080, 9090).expect("echo server");

    let reply = tcp_request(&a.ns, SocketAddrV4::new(b.ip, 8080), TIMEOUT).expect("tcp");
    assert_eq!(reply.backend, "b");
    assert_eq!(*reply.peer.ip(), a.ip);

    let reply = udp_request(&a.ns, SocketAddrV4::new(b.ip, 9090), TIMEOUT).expect("udp");
    assert_eq!(reply.backend, "b");
    assert_eq!(*reply.peer.ip(), a.ip);

    // Every request is a new flow: a new source port each time.
    for replies in [
        tcp_requests(&a.ns, SocketAddrV4::new(b.ip, 8080), 50, TIMEOUT),
        udp_requests(&a.ns, SocketAddrV4::new(b.ip, 9090), 50, TIMEOUT),
    ] {
        let replies: Vec<Reply> = replies.into_iter().map(|r| r.expect("reply")).collect();
        assert!(replies
            .iter()
            .all(|r| r.backend == "b" && *r.peer.ip() == a.ip));
        let mut ports: Vec<u16> = replies.iter().map(|r| r.peer.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 50, "source ports repeat");
    }

    // A held connection keeps echoing.
    let mut conn = tcp_connect(&a.ns, SocketAddrV4::new(b.ip, 8080), TIMEOUT).expect("connect");
    assert_eq!(conn.reply.backend, "b");
    assert_eq!(conn.roundtrip("ping", TIMEOUT).expect("echo"), "ping");
    assert_eq!(conn.roundtrip("pong", TIMEOUT).expect("echo"), "pong");

    // Drop stops the server quickly even with a connection open.
    let started = Instant::now();
    drop(server);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "slow stop: {:?}",
        started.elapsed()
    );
    assert!(conn.roundtrip("gone?", TIMEOUT).is_err());
    let err = tcp_request(&a.ns, SocketAddrV4::new(b.ip, 8080), TIMEOUT).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("198.18.1.2:8080") && text.contains("refused"),
        "{text}"
    );
    let err = udp_request(&a.ns, SocketAddrV4::new(b.ip, 9090), TIMEOUT).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("198.18.1.2:9090") && text.contains("refused"),
        "{text}"
    );
}

#[test]
fn unanswered_request_times_out_with_the_target_in_the_error() {
    require_root();
    let (_node, a, _b) = two_pods("timeout");
    // The node has no route for it; the ICMP unreachable it sends is not reported to UDP
    // sockets (only port unreachable is), so this is a timeout.
    let to = SocketAddrV4::new(Ipv4Addr::new(198, 19, 9, 9), 80);
    let err = udp_request(&a.ns, to, Duration::from_millis(300)).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("198.19.9.9:80") && text.contains("timed out"),
        "{text}"
    );
}

#[test]
fn netns_is_deleted_on_drop() {
    require_root();
    let ns = Netns::new("drop").expect("netns");
    let path = ns.path().to_path_buf();
    assert!(path.exists());
    assert!(Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(ns.name())));
    drop(ns);
    assert!(!path.exists(), "{} still exists", path.display());
}

#[test]
fn netns_is_deleted_when_the_test_panics() {
    require_root();
    let seen: Mutex<Option<PathBuf>> = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let ns = Netns::new("panic").expect("netns");
        *seen.lock().unwrap() = Some(ns.path().to_path_buf());
        ns.run(|| panic!("deliberate panic inside the namespace"));
    });
    assert!(
        result.is_err(),
        "the panic was not propagated by Netns::run"
    );
    let path = seen.lock().unwrap().clone().expect("namespace was created");
    assert!(!path.exists(), "{} survived the panic", path.display());
}

#[test]
fn sysctl_and_run_affect_only_the_namespace() {
    require_root();
    let root_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let node = Node::new("sysctl").expect("node");
    assert_eq!(node.ns.read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    // Cross-check with a separate process entered through cmd().
    let out = node
        .ns
        .cmd("cat")
        .arg("/proc/sys/net/ipv4/ip_forward")
        .output()
        .expect("cat");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let root_after = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(root_before, root_after, "the root namespace changed");

    // The thread sees only the namespace's interfaces; the caller's thread is untouched.
    let pod = node.add_pod("p", Ipv4Addr::new(198, 18, 0, 5)).unwrap();
    assert_eq!(node.ns.run(interfaces), ["lbh0", "lo"]);
    assert_eq!(pod.ns.run(interfaces), ["eth0", "lo"]);
    assert!(!interfaces().contains(&"lbh0".to_string()));
    assert_eq!(
        node.ns.read_sysctl("net.ipv4.conf.lbh0.proxy_arp").unwrap(),
        "1"
    );
}

/// Interfaces of the calling thread's network namespace (/proc/thread-self, not /proc/self,
/// which shows the main thread's).
fn interfaces() -> Vec<String> {
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
    let mut names: Vec<String> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn bpffs_is_mounted_visible_to_children_and_removed() {
    require_root();
    let ns = Netns::new("bpffs").expect("netns");
    let fs = BpfFs::new("bpffs").expect("bpffs");
    let path = fs.path().to_path_buf();
    // A process from cmd() keeps our mount namespace, so it sees the bpffs (ip netns exec
    // would not).
    let out = ns
        .cmd("stat")
        .args(["-f", "-c", "%T"])
        .arg(&path)
        .output()
        .expect("stat");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bpf_fs");
    drop(fs);
    assert!(!path.exists(), "{} still exists", path.display());
}

#[test]
fn child_runs_in_namespace_logs_and_is_stopped() {
    require_root();
    let ns = Netns::new("child").expect("netns");
    let mut cmd = ns.cmd("sh");
    cmd.args(["-c", "echo started; exec sleep 30"]);
    let mut child = spawn_in(&ns, cmd, "sleeper").expect("spawn");
    child.wait_for_log("started", TIMEOUT).expect("log");
    assert!(child.is_running());
    let pid = child.pid();
    let log_path = child.log_path().to_path_buf();
    let started = Instant::now();
    drop(child);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "SIGTERM was not enough"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "child still exists"
    );
    assert!(!log_path.exists());

    // A child ignoring SIGTERM gets SIGKILL after the grace period.
    let mut cmd = ns.cmd("sh");
    cmd.args([
        "-c",
        "trap '' TERM; echo ready; while :; do sleep 0.1; done",
    ]);
    let mut child = spawn_in(&ns, cmd, "stubborn").expect("spawn");
    child.wait_for_log("ready", TIMEOUT).expect("log");
    let status = child.stop().expect("stop");
    assert!(!status.success());
    assert!(!child.is_running());
}

#[test]
fn child_in_namespace_sees_its_interfaces() {
    require_root();
    let node = Node::new("ipchild").expect("node");
    let _pod = node.add_pod("p", Ipv4Addr::new(198, 18, 0, 9)).unwrap();
    let out = node
        .ns
        .cmd("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lbh0@"), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
}

#[test]
fn cleanup_removes_only_dead_owners() {
    require_root();
    // Make sure the once-per-process cleanup already ran, so it cannot race with this test.
    drop(Netns::new("cleanup").expect("netns"));
    // No pid can be this large (pid_max is at most 2^22).
    let dead = "lbt-stale-99999999-0";
    let status = Command::new("ip")
        .args(["netns", "add", dead])
        .status()
        .unwrap();
    assert!(status.success());
    let dead_dir = Path::new(RUN_DIR).join("stale-99999999-0");
    std::fs::create_dir_all(&dead_dir).unwrap();
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&dead_dir)
        .status()
        .unwrap();
    assert!(status.success());
    let dead_log = Path::new(RUN_DIR).join("stale-99999999-1.log");
    std::fs::write(&dead_log, "old").unwrap();
    let live = Netns::new("alive").expect("netns");
    let live_fs = BpfFs::new("alive").expect("bpffs");

    cleanup_stale();

    assert!(!Path::new("/run/netns").join(dead).exists());
    assert!(!dead_dir.exists());
    assert!(!dead_log.exists());
    assert!(live.path().exists());
    assert!(live_fs.path().exists());
}

#[test]
fn bad_pod_address_is_rejected() {
    require_root();
    let node = Node::new("badip").expect("node");
    assert!(node.add_pod("x", Ipv4Addr::new(10, 0, 0, 1)).is_err());
    assert!(node.add_pod("x", POD_GATEWAY).is_err());
    assert!(node.pod_ifaces().is_empty());
}

#[test]
fn reply_parsing() {
    let r = Reply::parse("b 198.18.1.1:40000\n").unwrap();
    assert_eq!(r.backend, "b");
    assert_eq!(r.peer, "198.18.1.1:40000".parse().unwrap());
    assert!(Reply::parse("garbage").is_err());
}
