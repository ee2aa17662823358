//! End to end: new flows to a Service without endpoints are refused by the data path itself (a
//! TCP reset, an ICMP port unreachable), from a pod through tc and from outside through XDP; and
//! loadBalancerSourceRanges keep clients outside the ranges away from a LoadBalancer IP.
use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{map_names, stats::drop_reason};
use lb_tests::{
    cluster::{echo_service_yaml, lbctl_bin, OneNode},
    fabric::{MultiNode, NodeSpec},
    tcp_request_from_here, tcp_requests, Netns,
};

const T: Duration = Duration::from_secs(3);

/// Connects from `ns` and returns the error, which must be there.
fn tcp_connect_error(ns: &Netns, to: SocketAddrV4) -> std::io::Error {
    ns.run(|| TcpStream::connect_timeout(&to.into(), T))
        .expect_err("the connection must fail")
}

/// Sends one datagram from a connected UDP socket in `ns` and waits for the answer; returns the
/// error, which must be there.
fn udp_error(ns: &Netns, to: SocketAddrV4) -> std::io::Error {
    ns.run(|| -> std::io::Result<usize> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(to)?;
        s.set_read_timeout(Some(T))?;
        s.send(b"anyone there?")?;
        let mut buf = [0u8; 512];
        s.recv(&mut buf)
    })
    .expect_err("the datagram must not be answered")
}

/// `lbctl ARGS` against the agent whose pins are in `bpffs`, as JSON.
fn lbctl(bpffs: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(lbctl_bin().unwrap())
        .arg("--bpffs")
        .arg(bpffs)
        .args(["--output", "json"])
        .args(args)
        .output()
        .expect("run lbctl");
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lbctl prints JSON")
}

/// `lbctl trace SRC DST`.
fn trace(bpffs: &std::path::Path, src: &str, dst: &str) -> serde_json::Value {
    lbctl(bpffs, &["trace", src, dst])
}

/// A drop counter of the agent whose pins are in `bpffs`, summed over CPUs.
fn drops(bpffs: &std::path::Path, reason: u32) -> u64 {
    let data = MapData::from_pin(bpffs.join(map_names::DROPS)).expect("drop counters pinned");
    let drops: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(data)).unwrap();
    drops.get(&reason, 0).unwrap().iter().sum()
}

#[test]
fn pod_to_a_cluster_ip_without_endpoints_is_refused_over_tcp_and_udp() {
    let vip = Ipv4Addr::new(198, 19, 0, 20);
    let bed = OneNode::start(
        "rej-pod",
        &[("be-1", Ipv4Addr::new(198, 18, 2, 1))],
        8080,
        &echo_service_yaml(vip, 80, 8080, &[]),
    )
    .expect("start the one-node testbed");
    let to = SocketAddrV4::new(vip, 80);
    let services = lbctl(bed.bpffs.path(), &["services"]);
    let tcp = services
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["protocol"] == "TCP" && f["address"] == to.to_string())
        .unwrap_or_else(|| panic!("no TCP frontend {to}: {services:#}"));
    assert_eq!(
        tcp["flags"],
        serde_json::json!(["ClusterIP", "no-backends", "reject"])
    );
    for proto in ["tcp", "udp"] {
        let t = trace(bed.bpffs.path(), "198.18.1.10", &format!("{to}/{proto}"));
        assert_eq!(t["verdict"], "reject", "{t:#}");
    }
    assert_eq!(
        drops(bed.bpffs.path(), drop_reason::REJECTED),
        0,
        "a trace sends nothing and counts nothing"
    );
    let e = tcp_connect_error(&bed.client.ns, to);
    assert_eq!(
        e.kind(),
        ErrorKind::ConnectionRefused,
        "TCP: {e}\nagent log:\n{}",
        bed.agent.logs()
    );
    let e = udp_error(&bed.client.ns, to);
    assert_eq!(
        e.kind(),
        ErrorKind::ConnectionRefused,
        "UDP on a connected socket: {e}\nagent log:\n{}",
        bed.agent.logs()
    );
    assert_eq!(drops(bed.bpffs.path(), drop_reason::REJECTED), 2);

    // With an endpoint the same frontend serves again.
    bed.write_manifests(&echo_service_yaml(
        vip,
        80,
        8080,
        &[Ipv4Addr::new(198, 18, 2, 1)],
    ))
    .unwrap();
    bed.wait_for_tcp(to, Duration::from_secs(10))
        .expect("served once it has an endpoint");
}

const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
/// A second address of the external client, outside the source ranges.
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 20);
const LB_EMPTY: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
const LB_GUARDED: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 2);
const LB_LOCAL: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 3);
const BE: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);

/// A LoadBalancer Service `demo/NAME` (TCP and UDP 80 -> 8080, NodePort `node_port`) with LB IP
/// `lb_ip`, the given source ranges, and endpoints (address, node).
fn lb_service(
    name: &str,
    cluster_ip: &str,
    node_port: u16,
    lb_ip: Ipv4Addr,
    ranges: &[&str],
    endpoints: &[(Ipv4Addr, &str)],
) -> String {
    let ranges = if ranges.is_empty() {
        String::new()
    } else {
        format!("\n  loadBalancerSourceRanges: [{}]", ranges.join(", "))
    };
    let mut y = format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec:
  type: LoadBalancer
  clusterIP: {cluster_ip}{ranges}
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

fn start_external(tag: &str) -> MultiNode {
    let manifests = [
        lb_service("empty", "198.19.0.30", 30090, LB_EMPTY, &[], &[]),
        lb_service(
            "guarded",
            "198.19.0.31",
            30091,
            LB_GUARDED,
            &["198.18.100.8/30"],
            &[(BE, "node-1")],
        ),
        // externalTrafficPolicy=Local with its only endpoint on another node.
        lb_service(
            "local-elsewhere",
            "198.19.0.32",
            30092,
            LB_LOCAL,
            &[],
            &[(Ipv4Addr::new(198, 18, 3, 1), "node-2")],
        )
        .replace(
            "  type: LoadBalancer\n",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n",
        ),
    ]
    .concat();
    let bed = MultiNode::start(
        tag,
        &[NodeSpec {
            name: "node-1",
            addr: NODE1,
            pod_net: Ipv4Addr::new(198, 18, 2, 0),
            backends: &[("be-1", BE)],
        }],
        CLIENT,
        &[&["198.19.200.0/24", "via", "198.18.100.1"]],
        &manifests,
    )
    .expect("start the testbed");
    bed.client
        .ip(&["addr", "add", &format!("{OUTSIDER}/24"), "dev", "eth0"])
        .unwrap();
    bed
}

#[test]
fn external_client_to_a_nodeport_and_lb_ip_without_endpoints_is_refused_through_xdp() {
    let bed = start_external("rej-ext");
    for to in [
        SocketAddrV4::new(NODE1, 30090),
        SocketAddrV4::new(LB_EMPTY, 80),
    ] {
        let e = tcp_connect_error(&bed.client, to);
        assert_eq!(
            e.kind(),
            ErrorKind::ConnectionRefused,
            "TCP {to}: {e}\nagent log:\n{}",
            bed.logs()
        );
        let e = udp_error(&bed.client, to);
        assert_eq!(
            e.kind(),
            ErrorKind::ConnectionRefused,
            "UDP {to}: {e}\nagent log:\n{}",
            bed.logs()
        );
    }
    assert_eq!(drops(bed.nodes[0].bpffs.path(), drop_reason::REJECTED), 4);
}

#[test]
fn lb_ip_serves_clients_inside_its_source_ranges_only() {
    let bed = start_external("srcrange");
    let to = SocketAddrV4::new(LB_GUARDED, 80);
    // 198.18.100.10 is inside 198.18.100.8/30.
    for (i, r) in tcp_requests(&bed.client, to, 5, T).into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("request {i} from inside: {e:#}\nagent log:\n{}", bed.logs()));
    }
    // 198.18.100.20 is not: its SYNs are dropped, nothing answers.
    let outside = bed
        .client
        .run(|| tcp_request_from_here(SocketAddrV4::new(OUTSIDER, 0), to, Duration::from_secs(2)));
    assert!(outside.is_err(), "a client outside the ranges got through");
    let t = trace(
        bed.nodes[0].bpffs.path(),
        &OUTSIDER.to_string(),
        &format!("{to}/tcp"),
    );
    assert_eq!(t["verdict"], "drop", "{t:#}");
    assert!(
        t["reason"].as_str().unwrap().starts_with("source range"),
        "{t:#}"
    );
    assert!(drops(bed.nodes[0].bpffs.path(), drop_reason::SOURCE_RANGE) >= 1);
    // The NodePort of the same Service is not guarded (ranges apply to LB IPs only).
    let np = bed.client.run(|| {
        tcp_request_from_here(
            SocketAddrV4::new(OUTSIDER, 0),
            SocketAddrV4::new(NODE1, 30091),
            T,
        )
    });
    np.unwrap_or_else(|e| panic!("NodePort from outside the ranges: {e:#}\n{}", bed.logs()));
}

#[test]
fn local_policy_without_a_local_endpoint_drops_external_traffic_instead_of_refusing_it() {
    let bed = start_external("etp-none");
    for to in [
        SocketAddrV4::new(NODE1, 30092),
        SocketAddrV4::new(LB_LOCAL, 80),
    ] {
        let e = tcp_connect_error(&bed.client, to);
        assert_eq!(
            e.kind(),
            ErrorKind::TimedOut,
            "{to}: dropped, so the client hears nothing: {e}\nagent log:\n{}",
            bed.logs()
        );
    }
    let pins = bed.nodes[0].bpffs.path();
    assert!(drops(pins, drop_reason::NO_LOCAL_BACKEND) >= 2);
    assert_eq!(drops(pins, drop_reason::REJECTED), 0);
}
