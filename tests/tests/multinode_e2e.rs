//! Two nodes: a client pod on node A reaches a ClusterIP whose backends run on node A and on
//! node B. Replies from node B's backend enter node A through its uplink, where no program runs;
//! the egress program on the client pod's interface must give them the ClusterIP back.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    cluster::{echo_service_yaml, OneNode, CLIENT_IP},
    tcp_requests, udp_requests, EchoServer, Node,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const NODE_A_FABRIC: &str = "198.18.100.1";
const NODE_B_FABRIC: &str = "198.18.100.2";

/// Node B with one backend pod, joined to node A by a veth pair (the "fabric"), with routes for
/// each other's pods. No agent runs on node B: nothing there knows the ClusterIP.
fn node_b(bed: &OneNode) -> (Node, lb_tests::Pod, EchoServer) {
    let b = Node::new("mn-b").unwrap();
    let pod = b.add_pod("be-remote", REMOTE_BACKEND).unwrap();
    let server = EchoServer::start(&pod.ns, "be-remote", 8080, 8080).unwrap();
    let a = &bed.node.ns;
    a.ip(&[
        "link",
        "add",
        "fab0",
        "type",
        "veth",
        "peer",
        "name",
        "fab0",
        "netns",
        b.ns.name(),
    ])
    .unwrap();
    for (ns, addr) in [(a, NODE_A_FABRIC), (&b.ns, NODE_B_FABRIC)] {
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "fab0"])
            .unwrap();
        ns.ip(&["link", "set", "fab0", "up"]).unwrap();
    }
    a.ip(&[
        "route",
        "add",
        &format!("{REMOTE_BACKEND}/32"),
        "via",
        NODE_B_FABRIC,
    ])
    .unwrap();
    b.ns.ip(&[
        "route",
        "add",
        &format!("{CLIENT_IP}/32"),
        "via",
        NODE_A_FABRIC,
    ])
    .unwrap();
    (b, pod, server)
}

fn tally(replies: Vec<anyhow::Result<lb_tests::Reply>>, bed: &OneNode) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (i, r) in replies.into_iter().enumerate() {
        let r =
            r.unwrap_or_else(|e| panic!("request {i}: {e:#}\nagent log:\n{}", bed.agent.logs()));
        assert_eq!(*r.peer.ip(), CLIENT_IP);
        *counts.entry(r.backend).or_insert(0) += 1;
    }
    counts
}

#[test]
fn cluster_ip_reaches_backends_on_another_node_and_replies_are_translated() {
    let yaml = echo_service_yaml(VIP, 80, 8080, &[LOCAL_BACKEND, REMOTE_BACKEND]);
    let bed = OneNode::start("mn-a", &[("be-local", LOCAL_BACKEND)], 8080, &yaml).unwrap();
    let (_b, _pod, _server) = node_b(&bed);
    let to = SocketAddrV4::new(VIP, 80);
    bed.wait_for_tcp(to, Duration::from_secs(10)).unwrap();
    for counts in [
        tally(
            tcp_requests(&bed.client.ns, to, 40, Duration::from_secs(2)),
            &bed,
        ),
        tally(
            udp_requests(&bed.client.ns, to, 40, Duration::from_secs(2)),
            &bed,
        ),
    ] {
        assert_eq!(counts.values().sum::<usize>(), 40, "{counts:?}");
        assert!(
            counts.get("be-remote").copied().unwrap_or(0) >= 5,
            "remote backend used: {counts:?}"
        );
        assert!(
            counts.get("be-local").copied().unwrap_or(0) >= 5,
            "local backend used: {counts:?}"
        );
    }
}
