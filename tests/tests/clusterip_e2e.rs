//! End to end: real TCP and UDP from a client pod through a ClusterIP to backend pods, with the
//! real agent following a manifests directory inside a node namespace.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    cluster::{echo_service_yaml, OneNode, CLIENT_IP},
    tcp_connect, tcp_requests, udp_requests, Reply,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORT: u16 = 80;
const TARGET: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);

fn backends() -> Vec<(&'static str, Ipv4Addr)> {
    vec![
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
        ("be-3", Ipv4Addr::new(198, 18, 2, 3)),
    ]
}

fn start(tag: &str) -> OneNode {
    let ips: Vec<Ipv4Addr> = backends().iter().map(|b| b.1).collect();
    let bed = OneNode::start(
        tag,
        &backends(),
        TARGET,
        &echo_service_yaml(VIP, PORT, TARGET, &ips),
    )
    .expect("start the one-node testbed");
    bed.wait_for_tcp(SocketAddrV4::new(VIP, PORT), Duration::from_secs(10))
        .expect("ClusterIP answers");
    bed
}

/// Counts answers per backend; every request must have succeeded and every backend must have
/// seen the client's own address (pod-to-ClusterIP traffic keeps its source).
fn tally(bed: &OneNode, replies: Vec<anyhow::Result<Reply>>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (i, r) in replies.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| {
            panic!(
                "request {i} failed: {e:#}\nagent log:\n{}",
                bed.agent.logs()
            )
        });
        assert_eq!(
            *r.peer.ip(),
            CLIENT_IP,
            "backend {} saw {}",
            r.backend,
            r.peer
        );
        *counts.entry(r.backend).or_insert(0) += 1;
    }
    counts
}

#[test]
fn sixty_tcp_connections_to_a_cluster_ip_reach_every_backend() {
    let bed = start("e2e-tcp");
    let counts = tally(
        &bed,
        tcp_requests(&bed.client.ns, SocketAddrV4::new(VIP, PORT), 60, TIMEOUT),
    );
    assert_eq!(counts.values().sum::<usize>(), 60);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, n) in &counts {
        assert!(*n >= 10, "{backend} served only {n} of 60: {counts:?}");
    }
}

#[test]
fn sixty_udp_flows_to_a_cluster_ip_reach_every_backend() {
    let bed = start("e2e-udp");
    let counts = tally(
        &bed,
        udp_requests(&bed.client.ns, SocketAddrV4::new(VIP, PORT), 60, TIMEOUT),
    );
    assert_eq!(counts.values().sum::<usize>(), 60);
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (backend, n) in &counts {
        assert!(*n >= 10, "{backend} served only {n} of 60: {counts:?}");
    }
}

#[test]
fn backend_removed_from_the_manifest_gets_no_new_flow_after_one_second() {
    let bed = start("e2e-remove");
    let keep: Vec<Ipv4Addr> = backends().iter().take(2).map(|b| b.1).collect();
    bed.write_manifests(&echo_service_yaml(VIP, PORT, TARGET, &keep))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let to = SocketAddrV4::new(VIP, PORT);
    let tcp = tally(&bed, tcp_requests(&bed.client.ns, to, 30, TIMEOUT));
    let udp = tally(&bed, udp_requests(&bed.client.ns, to, 30, TIMEOUT));
    for counts in [&tcp, &udp] {
        assert!(
            !counts.contains_key("be-3"),
            "removed backend still got new flows: {counts:?}"
        );
        assert_eq!(counts.values().sum::<usize>(), 30);
    }
}

#[test]
fn established_connection_survives_changes_to_the_endpoint_set() {
    let bed = start("e2e-estab");
    let to = SocketAddrV4::new(VIP, PORT);
    let mut conn = tcp_connect(&bed.client.ns, to, TIMEOUT).expect("connect");
    let mine = conn.reply.backend.clone();
    // Remove every other backend, then add them back: the open connection must not notice.
    let only_mine: Vec<Ipv4Addr> = backends()
        .iter()
        .filter(|b| b.0 == mine)
        .map(|b| b.1)
        .collect();
    let all: Vec<Ipv4Addr> = backends().iter().map(|b| b.1).collect();
    for (round, set) in [&only_mine, &all, &only_mine].into_iter().enumerate() {
        bed.write_manifests(&echo_service_yaml(VIP, PORT, TARGET, set))
            .unwrap();
        std::thread::sleep(Duration::from_millis(400));
        let echoed = conn
            .roundtrip(&format!("round {round}"), TIMEOUT)
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\nagent log:\n{}", bed.agent.logs()));
        assert_eq!(echoed.trim(), format!("round {round}"));
    }
    // While only `mine` is listed, every new connection goes there too.
    let counts = tally(&bed, tcp_requests(&bed.client.ns, to, 10, TIMEOUT));
    assert_eq!(counts.keys().collect::<Vec<_>>(), [&mine]);
}
