//! External traffic end to end: an external client on the fabric reaches NodePort, LoadBalancer
//! IP and externalIP frontends of two nodes, each running its own agent on the same manifests.
//! Backends answer with their name and the client address they saw, which tells whether a flow
//! was source-NATed (the node's address) or not (the client's own).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_tests::{
    fabric::{MultiNode, NodeSpec},
    tcp_request_from_here, tcp_requests, udp_requests, Reply,
};

const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
/// LoadBalancer ingress IPs and externalIPs, routed to node-1 by the client's routes.
const LB_CLUSTER: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
const LB_LOCAL: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 2);
const EXT_CLUSTER: Ipv4Addr = Ipv4Addr::new(198, 19, 201, 1);
const EXT_LOCAL: Ipv4Addr = Ipv4Addr::new(198, 19, 201, 2);

/// A LoadBalancer Service `demo/NAME` (TCP and UDP `port` -> 8080) with a NodePort, an LB
/// ingress IP and an externalIP, and its endpoints (address, node).
fn lb_service(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    lb_ip: Ipv4Addr,
    external_ip: Ipv4Addr,
    local: bool,
    endpoints: &[(Ipv4Addr, &str)],
) -> String {
    let policy = if local { "Local" } else { "Cluster" };
    let health = if local {
        "\n  healthCheckNodePort: 32000"
    } else {
        ""
    };
    let mut y = format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: {cluster_ip}
  externalTrafficPolicy: {policy}{health}
  externalIPs: [{external_ip}]
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: {node_port}}}
  - {{name: udp, port: 80, protocol: UDP, targetPort: 8080, nodePort: {node_port}}}
status:
  loadBalancer:
    ingress: [{{ip: {lb_ip}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: demo
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: udp, port: 8080, protocol: UDP}}
endpoints:
"
    );
    for (addr, node) in endpoints {
        y.push_str(&format!(
            "- {{addresses: [{addr}], conditions: {{ready: true}}, nodeName: {node}}}\n"
        ));
    }
    y
}

const BE_1A: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const BE_1B: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const BE_2A: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const BE_2B: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);

fn manifests() -> String {
    [
        lb_service(
            "web",
            "198.19.0.10",
            30080,
            LB_CLUSTER,
            EXT_CLUSTER,
            false,
            &[(BE_1A, "node-1"), (BE_2A, "node-2")],
        ),
        lb_service(
            "web-local",
            "198.19.0.11",
            30081,
            LB_LOCAL,
            EXT_LOCAL,
            true,
            &[(BE_1B, "node-1"), (BE_2B, "node-2")],
        ),
        // Only a backend on node-2: everything through node-1 is source-NATed.
        lb_service(
            "web-remote",
            "198.19.0.12",
            30082,
            Ipv4Addr::new(198, 19, 200, 3),
            Ipv4Addr::new(198, 19, 201, 3),
            false,
            &[(BE_2A, "node-2")],
        ),
    ]
    .concat()
}

fn start(tag: &str) -> MultiNode {
    let routes: &[&[&str]] = &[
        &["198.19.200.0/24", "via", "198.18.100.1"],
        &["198.19.201.0/24", "via", "198.18.100.1"],
    ];
    MultiNode::start(
        tag,
        &[
            NodeSpec {
                name: "node-1",
                addr: NODE1,
                pod_net: Ipv4Addr::new(198, 18, 2, 0),
                backends: &[("be-1a", BE_1A), ("be-1b", BE_1B)],
            },
            NodeSpec {
                name: "node-2",
                addr: NODE2,
                pod_net: Ipv4Addr::new(198, 18, 3, 0),
                backends: &[("be-2a", BE_2A), ("be-2b", BE_2B)],
            },
        ],
        CLIENT,
        routes,
        &manifests(),
    )
    .expect("start the two-node testbed")
}

/// (backend, address it saw) -> count; every request must have succeeded.
fn tally(
    bed: &MultiNode,
    replies: Vec<anyhow::Result<Reply>>,
) -> BTreeMap<(String, Ipv4Addr), usize> {
    let mut out = BTreeMap::new();
    for (i, r) in replies.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("request {i}: {e:#}\nagent logs:\n{}", bed.logs()));
        *out.entry((r.backend, *r.peer.ip())).or_insert(0) += 1;
    }
    out
}

const N: usize = 40;
const T: Duration = Duration::from_secs(3);

#[test]
fn cluster_policy_reaches_backends_on_both_nodes_through_every_external_frontend() {
    let bed = start("ext-cluster");
    for to in [
        SocketAddrV4::new(NODE1, 30080),
        SocketAddrV4::new(LB_CLUSTER, 80),
        SocketAddrV4::new(EXT_CLUSTER, 80),
    ] {
        for (what, counts) in [
            ("TCP", tally(&bed, tcp_requests(&bed.client, to, N, T))),
            ("UDP", tally(&bed, udp_requests(&bed.client, to, N, T))),
        ] {
            // The local backend sees the client itself; the remote one sees node-1 (SNAT), so
            // its replies come back through node-1 and are translated there.
            let local = counts.get(&("be-1a".into(), CLIENT)).copied().unwrap_or(0);
            let remote = counts.get(&("be-2a".into(), NODE1)).copied().unwrap_or(0);
            assert_eq!(
                local + remote,
                N,
                "{what} {to}: only be-1a (seeing the client) and be-2a (seeing node-1): {counts:?}"
            );
            assert!(
                local >= 5 && remote >= 5,
                "{what} {to}: both nodes' backends used: {counts:?}"
            );
        }
    }
}

#[test]
fn local_policy_uses_only_this_nodes_backends_and_keeps_the_client_address() {
    let bed = start("ext-local");
    for to in [
        SocketAddrV4::new(NODE1, 30081),
        SocketAddrV4::new(LB_LOCAL, 80),
        SocketAddrV4::new(EXT_LOCAL, 80),
    ] {
        for (what, counts) in [
            ("TCP", tally(&bed, tcp_requests(&bed.client, to, 20, T))),
            ("UDP", tally(&bed, udp_requests(&bed.client, to, 20, T))),
        ] {
            assert_eq!(
                counts,
                BTreeMap::from([(("be-1b".to_string(), CLIENT), 20)]),
                "{what} {to}: node-1's own backend, client address kept"
            );
        }
    }
    // Through node-2's NodePort the same service answers from node-2's backend.
    let counts = tally(
        &bed,
        tcp_requests(&bed.client, SocketAddrV4::new(NODE2, 30081), 10, T),
    );
    assert_eq!(
        counts,
        BTreeMap::from([(("be-2b".to_string(), CLIENT), 10)])
    );
}

#[test]
fn two_hundred_concurrent_clients_sharing_a_source_port_all_complete_through_snat() {
    let bed = start("ext-snat");
    // 200 client addresses on the client's interface, routed back to it by node-1.
    for i in 1..=200u32 {
        let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 101, 0)) + i);
        bed.client
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])
            .unwrap();
    }
    bed.nodes[0]
        .node
        .ns
        .ip(&["route", "add", "198.18.101.0/24", "via", "198.18.100.10"])
        .unwrap();
    let to = SocketAddrV4::new(NODE1, 30082);
    let results: Vec<anyhow::Result<Reply>> = bed.client.run(|| {
        std::thread::scope(|s| {
            let handles: Vec<_> = (1..=200u32)
                .map(|i| {
                    let from = SocketAddrV4::new(
                        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 101, 0)) + i),
                        40000,
                    );
                    s.spawn(move || tcp_request_from_here(from, to, Duration::from_secs(10)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    });
    let mut ports = std::collections::BTreeSet::new();
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("client {i}: {e:#}\nagent logs:\n{}", bed.logs()));
        assert_eq!((r.backend.as_str(), *r.peer.ip()), ("be-2a", NODE1));
        ports.insert(r.peer.port());
    }
    assert_eq!(ports.len(), 200, "each client had its own SNAT port");
}
