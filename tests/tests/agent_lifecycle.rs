//! The agent's life cycle on a node: one agent per pin directory, the data path kept when an
//! agent stops (`--on-exit keep`, the default) and adopted by the next one, and removed when it
//! stops with `--on-exit detach`.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use lb_tests::{
    cluster::{agent_bin, echo_service_yaml, OneNode, NODE_NAME},
    spawn_in, tcp_request, tcp_requests,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

fn agent_command(bed: &OneNode, extra: &[&str]) -> Command {
    let mut cmd = Command::new(agent_bin().unwrap());
    cmd.arg("--cgroup")
        .arg(bed.host_cgroup.path())
        .arg("--manifests")
        .arg(bed.manifests_dir())
        .args(["--node-name", NODE_NAME, "--poll-interval-ms", "100"])
        .arg("--bpffs")
        .arg(bed.bpffs.path())
        // The first agent holds the default health port in this namespace.
        .args(["--health-bind-address", "127.0.0.1:10299"])
        .args(extra);
    for iface in bed.node.pod_ifaces() {
        cmd.args(["--iface", &iface]);
    }
    cmd
}

#[test]
fn second_agent_on_the_same_pin_directory_is_refused() {
    let ips = [Ipv4Addr::new(198, 18, 2, 1)];
    let bed = OneNode::start(
        "lock",
        &[("be-1", ips[0])],
        8080,
        &echo_service_yaml(VIP, 80, 8080, &ips),
    )
    .unwrap();
    let mut second = spawn_in(&bed.node.ns, agent_command(&bed, &[]), "lock2").unwrap();
    let status = second.stop_waiting(Duration::from_secs(10));
    assert!(
        !status.success(),
        "the second agent must exit with an error"
    );
    assert!(
        second.logs().contains("another lb-agent is already using"),
        "{}",
        second.logs()
    );
    // The first one is untouched.
    bed.wait_for_tcp(SocketAddrV4::new(VIP, 80), Duration::from_secs(5))
        .unwrap();
}

#[test]
fn stopped_agent_keeps_the_data_path_and_a_detaching_successor_removes_it() {
    let ips = [Ipv4Addr::new(198, 18, 2, 1), Ipv4Addr::new(198, 18, 2, 2)];
    let backends = [("be-1", ips[0]), ("be-2", ips[1])];
    let mut bed = OneNode::start(
        "onexit",
        &backends,
        8080,
        &echo_service_yaml(VIP, 80, 8080, &ips),
    )
    .unwrap();
    let to = SocketAddrV4::new(VIP, 80);
    bed.wait_for_tcp(to, Duration::from_secs(10)).unwrap();

    // Default --on-exit keep: with no agent running, the ClusterIP still works.
    assert!(bed.agent.stop().unwrap().success(), "{}", bed.agent.logs());
    assert!(
        bed.agent.logs().contains("the data path stays attached"),
        "{}",
        bed.agent.logs()
    );
    let replies = tcp_requests(&bed.client.ns, to, 20, TIMEOUT);
    assert!(
        replies.iter().all(|r| r.is_ok()),
        "without an agent: {replies:?}"
    );
    let links = bed.bpffs.path().join("links");
    let pinned = std::fs::read_dir(&links).unwrap().count();
    assert_eq!(
        pinned,
        bed.node.pod_ifaces().len(),
        "one pinned link per pod interface"
    );

    // A successor adopts what is there, then detaches everything when it stops.
    let mut successor = spawn_in(
        &bed.node.ns,
        agent_command(&bed, &["--on-exit", "detach"]),
        "onexit2",
    )
    .unwrap();
    successor
        .wait_for_log("maps programmed", Duration::from_secs(20))
        .unwrap();
    assert!(tcp_request(&bed.client.ns, to, TIMEOUT).is_ok());
    assert!(successor.stop().unwrap().success(), "{}", successor.logs());
    assert!(
        successor.logs().contains("detached the pinned attachments"),
        "{}",
        successor.logs()
    );
    assert_eq!(
        std::fs::read_dir(&links).unwrap().count(),
        0,
        "no pinned links left"
    );
    // Without a program nothing translates the ClusterIP any more: nothing answers there.
    assert!(tcp_request(&bed.client.ns, to, Duration::from_millis(500)).is_err());
}
