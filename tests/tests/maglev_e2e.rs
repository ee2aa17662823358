//! Maglev across nodes: two nodes, each with its own agent, serve one LoadBalancer IP. The
//! external client sends the same UDP tuple first through node-1, then (its route switched, as an
//! upstream router's ECMP would) through node-2; both nodes must pick the same backend, because
//! Maglev is the default for external traffic and the table depends only on backend addresses.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use lb_tests::{
    fabric::{MultiNode, NodeSpec},
    Reply,
};

const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const NODE2: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 210, 1);
const BACKENDS: [(Ipv4Addr, &str); 4] = [
    (Ipv4Addr::new(198, 18, 2, 1), "node-1"),
    (Ipv4Addr::new(198, 18, 2, 2), "node-1"),
    (Ipv4Addr::new(198, 18, 3, 1), "node-2"),
    (Ipv4Addr::new(198, 18, 3, 2), "node-2"),
];

/// A LoadBalancer Service (UDP 80 -> 8080, externalTrafficPolicy Cluster, no scheduler
/// annotation: the default applies) with the four backends.
fn manifests() -> String {
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: mg, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.30
  externalTrafficPolicy: Cluster
  ports:
  - {{name: udp, port: 80, protocol: UDP, targetPort: 8080, nodePort: 30090}}
status:
  loadBalancer:
    ingress: [{{ip: {LB_IP}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: mg-1
  namespace: demo
  labels: {{kubernetes.io/service-name: mg}}
addressType: IPv4
ports:
- {{name: udp, port: 8080, protocol: UDP}}
endpoints:
"
    );
    for (addr, node) in BACKENDS {
        y.push_str(&format!(
            "- {{addresses: [{addr}], conditions: {{ready: true}}, nodeName: {node}}}\n"
        ));
    }
    y
}

/// One UDP request from the client's `port` to the LB IP; the backend that answered.
fn ask(bed: &MultiNode, port: u16) -> String {
    let reply = bed.client.run(|| -> anyhow::Result<Reply> {
        let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT, port))?;
        socket.connect(SocketAddrV4::new(LB_IP, 80))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        socket.send(b"hi")?;
        let mut buf = [0u8; 512];
        let len = socket.recv(&mut buf)?;
        Reply::parse(&String::from_utf8_lossy(&buf[..len]))
    });
    reply
        .unwrap_or_else(|e| panic!("UDP from port {port}: {e:#}\nagent logs:\n{}", bed.logs()))
        .backend
}

fn route_lb_via(bed: &MultiNode, node: Ipv4Addr) {
    bed.client
        .ip(&[
            "route",
            "replace",
            "198.19.210.0/24",
            "via",
            &node.to_string(),
        ])
        .unwrap();
}

#[test]
fn both_nodes_send_the_same_external_tuple_to_the_same_backend() {
    let bed = MultiNode::start(
        "maglev-2n",
        &[
            NodeSpec {
                name: "node-1",
                addr: NODE1,
                pod_net: Ipv4Addr::new(198, 18, 2, 0),
                backends: &[("be-1a", BACKENDS[0].0), ("be-1b", BACKENDS[1].0)],
            },
            NodeSpec {
                name: "node-2",
                addr: NODE2,
                pod_net: Ipv4Addr::new(198, 18, 3, 0),
                backends: &[("be-2a", BACKENDS[2].0), ("be-2b", BACKENDS[3].0)],
            },
        ],
        CLIENT,
        &[&["198.19.210.0/24", "via", "198.18.100.1"]],
        &manifests(),
    )
    .expect("start the two-node testbed");

    let ports: Vec<u16> = (0..24).map(|i| 41_000 + i * 7).collect();
    let via_node1: Vec<String> = ports.iter().map(|&p| ask(&bed, p)).collect();
    route_lb_via(&bed, NODE2);
    let via_node2: Vec<String> = ports.iter().map(|&p| ask(&bed, p)).collect();
    for (i, port) in ports.iter().enumerate() {
        assert_eq!(
            via_node1[i], via_node2[i],
            "client port {port}: node-1 chose {}, node-2 chose {}",
            via_node1[i], via_node2[i]
        );
    }
    let distinct: std::collections::BTreeSet<&String> = via_node1.iter().collect();
    assert!(
        distinct.len() >= 3,
        "24 tuples over 4 backends reach most of them: {distinct:?}"
    );
    // And the same tuple again through node-1: still tracked or chosen again, same backend.
    route_lb_via(&bed, NODE1);
    assert_eq!(ask(&bed, ports[0]), via_node1[0]);
}
