//! `/metrics` against live maps: traffic through a ClusterIP must show up on /metrics exactly as
//! `lbctl stats` reads it, the sync latency histogram must have observations, and datagrams to a
//! Service without endpoints must be counted as drops with their reason.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::Command,
    time::Duration,
};

use lb_tests::{
    cluster::{echo_service_yaml, lbctl_bin, OneNode},
    http_get, prometheus_sample, tcp_requests, udp_requests,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// A Service with no EndpointSlice at all; its externalIP gives it an internal and an external
/// frontend entry on the same address.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const TIMEOUT: Duration = Duration::from_secs(2);
/// The agent's default --health-bind-address, inside the node namespace.
const HEALTH: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256);

fn empty_service_yaml() -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: demo}}
spec:
  clusterIP: {EMPTY_VIP}
  externalIPs: [198.19.201.5]
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: 53}}
"
    )
}

fn lbctl_stats(bed: &OneNode) -> Value {
    let out = Command::new(lbctl_bin().unwrap())
        .arg("--bpffs")
        .arg(bed.bpffs.path())
        .args(["--output", "json", "stats"])
        .output()
        .expect("run lbctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn metrics_match_the_traffic_and_lbctl_and_count_drops_by_reason() {
    let backends = [
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
    ];
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.1).collect();
    let yaml = echo_service_yaml(VIP, 80, 8080, &ips) + &empty_service_yaml();
    let bed = OneNode::start("metrics", &backends, 8080, &yaml).unwrap();
    let to = SocketAddrV4::new(VIP, 80);
    bed.wait_for_tcp(to, Duration::from_secs(10)).unwrap();

    assert!(udp_requests(&bed.client.ns, to, 10, TIMEOUT)
        .iter()
        .all(|r| r.is_ok()));
    assert!(tcp_requests(&bed.client.ns, to, 5, TIMEOUT)
        .iter()
        .all(|r| r.is_ok()));
    // Three datagrams to the Service without endpoints: refused (ICMP port unreachable), each
    // counted once.
    let sock = bed
        .client
        .ns
        .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .unwrap();
    for _ in 0..3 {
        sock.send_to(b"hello\n", SocketAddrV4::new(EMPTY_VIP, 53))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));

    let metrics = http_get(&bed.node.ns, HEALTH, "/metrics", TIMEOUT).unwrap();
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    let text = &metrics.body;
    // Every series once: the externalIP's two entries differ by their scope label.
    let mut series = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name_labels, _) = line.rsplit_once(' ').unwrap();
        assert!(
            series.insert(name_labels),
            "{name_labels} twice in /metrics:\n{text}"
        );
    }
    for scope in ["internal", "external"] {
        assert_eq!(
            prometheus_sample(
                text,
                "lb_frontend_new_flows_total",
                &[("frontend", "198.19.201.5:53"), ("scope", scope)]
            ),
            Some(0.0),
            "{scope} entry of the externalIP:\n{text}"
        );
    }
    let fe = |name: &str, proto: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![
            ("frontend", "198.19.0.10:80"),
            ("protocol", proto),
            ("scope", "internal"),
            (
                "service_port",
                if proto == "UDP" {
                    "demo/echo:udp-echo/UDP"
                } else {
                    "demo/echo:http/TCP"
                },
            ),
        ];
        labels.extend_from_slice(extra);
        prometheus_sample(text, name, &labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in /metrics:\n{text}")) as u64
    };
    // UDP: exactly what the test sent (each request is a new flow with one reply).
    assert_eq!(
        fe("lb_frontend_packets_total", "UDP", &[("direction", "in")]),
        10
    );
    assert_eq!(
        fe("lb_frontend_packets_total", "UDP", &[("direction", "out")]),
        10
    );
    assert_eq!(fe("lb_frontend_new_flows_total", "UDP", &[]), 10);

    // Every frontend and backend counter equals what lbctl reads from the same maps.
    let stats = lbctl_stats(&bed);
    for f in stats.as_array().unwrap() {
        let proto = f["protocol"].as_str().unwrap();
        let addr = f["address"].as_str().unwrap();
        if addr != "198.19.0.10:80" {
            continue;
        }
        let c = &f["counters"];
        assert_eq!(
            fe("lb_frontend_new_flows_total", proto, &[]),
            c["new_flows"].as_u64().unwrap()
        );
        assert_eq!(
            fe("lb_frontend_bytes_total", proto, &[("direction", "in")]),
            c["bytes_in"].as_u64().unwrap()
        );
        assert_eq!(
            fe("lb_frontend_bytes_total", proto, &[("direction", "out")]),
            c["bytes_out"].as_u64().unwrap()
        );
        for b in f["backends"].as_array().unwrap() {
            let labels = [
                ("backend", b["address"].as_str().unwrap()),
                ("protocol", proto),
                ("direction", "in"),
            ];
            let got = prometheus_sample(text, "lb_backend_packets_total", &labels)
                .unwrap_or_else(|| panic!("no backend sample {labels:?}:\n{text}"));
            assert_eq!(got as u64, b["counters"]["packets_in"].as_u64().unwrap());
        }
    }
    // TCP: at least the 5 requests (plus readiness probes of wait_for_tcp).
    assert!(fe("lb_frontend_new_flows_total", "TCP", &[]) >= 5);

    assert_eq!(
        prometheus_sample(text, "lb_drops_total", &[("reason", "rejected")]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        prometheus_sample(text, "lb_drops_total", &[("reason", "no_backend")]),
        Some(0.0),
        "{text}"
    );
    let syncs = prometheus_sample(text, "lb_sync_duration_seconds_count", &[]).unwrap();
    assert!(syncs >= 1.0, "the first sync is observed: {text}");
    assert_eq!(
        prometheus_sample(text, "lb_sync_errors_total", &[]),
        Some(0.0)
    );
    // Fill levels: 5 frontends (TCP, UDP, the empty one's ClusterIP and its externalIP's two
    // scopes) and 2 backends per protocol.
    assert_eq!(
        prometheus_sample(text, "lb_map_entries", &[("map", "LB_REV_NAT")]),
        Some(5.0)
    );
    assert_eq!(
        prometheus_sample(text, "lb_map_entries", &[("map", "LB_BACKENDS")]),
        Some(4.0)
    );
    assert_eq!(
        prometheus_sample(text, "lb_map_capacity", &[("map", "LB_CONNTRACK")]),
        Some(lb_common::map_sizes::CONNTRACK as f64)
    );
    let ct = prometheus_sample(text, "lb_map_entries", &[("map", "LB_CONNTRACK")]).unwrap();
    assert!(ct >= 2.0 * 15.0, "two entries per flow: {ct}");

    // A change to the manifests is one more observation of the histogram.
    bed.write_manifests(&echo_service_yaml(VIP, 80, 8080, &ips[..1]))
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = http_get(&bed.node.ns, HEALTH, "/metrics", TIMEOUT)
            .unwrap()
            .body;
        let n = prometheus_sample(&text, "lb_sync_duration_seconds_count", &[]).unwrap();
        if n > syncs {
            assert_eq!(
                prometheus_sample(&text, "lb_map_entries", &[("map", "LB_REV_NAT")]),
                Some(2.0)
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new sync observed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
