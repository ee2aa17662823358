//! lbctl against live maps: real flows through a ClusterIP, then `lbctl services`, `stats` and
//! `conntrack` (JSON output) must agree with what the test did.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use lb_tests::{
    cluster::{echo_service_yaml, lbctl_bin, OneNode, CLIENT_IP},
    tcp_connect, tcp_requests, udp_requests,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

fn lbctl(bed: &OneNode, args: &[&str]) -> Value {
    let out = Command::new(lbctl_bin().unwrap())
        .arg("--bpffs")
        .arg(bed.bpffs.path())
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

fn frontend<'a>(list: &'a Value, proto: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|f| f["protocol"] == proto && f["address"] == "198.19.0.10:80")
        .unwrap_or_else(|| panic!("no {proto} frontend in {list:#}"))
}

fn sum(backends: &Value, f: impl Fn(&Value) -> u64) -> u64 {
    backends.as_array().unwrap().iter().map(f).sum()
}

/// One node serving the echo Service on VIP:80 from `backends`, ready for requests.
fn start(tag: &str, backends: &[(&str, Ipv4Addr)]) -> (OneNode, Vec<Ipv4Addr>) {
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.1).collect();
    let yaml = echo_service_yaml(VIP, 80, 8080, &ips);
    let bed = OneNode::start(tag, backends, 8080, &yaml).unwrap();
    bed.wait_for_tcp(SocketAddrV4::new(VIP, 80), Duration::from_secs(10))
        .unwrap();
    (bed, ips)
}

#[test]
fn lbctl_shows_frontends_connections_counters_and_flows_as_they_are() {
    let backends = [
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
        ("be-3", Ipv4Addr::new(198, 18, 2, 3)),
    ];
    let (bed, ips) = start("lbctl", &backends);
    let to = SocketAddrV4::new(VIP, 80);
    let open: Vec<_> = (0..2)
        .map(|_| tcp_connect(&bed.client.ns, to, TIMEOUT).unwrap())
        .collect();
    assert!(tcp_requests(&bed.client.ns, to, 20, TIMEOUT)
        .iter()
        .all(|r| r.is_ok()));
    assert!(udp_requests(&bed.client.ns, to, 10, TIMEOUT)
        .iter()
        .all(|r| r.is_ok()));
    // Let the closes of the short connections reach conntrack.
    std::thread::sleep(Duration::from_millis(300));

    let services = lbctl(&bed, &["services"]);
    let tcp = frontend(&services, "TCP");
    assert_eq!(tcp["scheduler"], "random");
    assert_eq!(tcp["flags"], serde_json::json!(["ClusterIP"]));
    let addrs: Vec<&str> = tcp["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs.len(), 3);
    for ip in &ips {
        assert!(addrs.contains(&format!("{ip}:8080").as_str()), "{addrs:?}");
    }
    assert_eq!(
        sum(&tcp["backends"], |b| b["active_connections"]
            .as_u64()
            .unwrap()),
        2,
        "the two open connections"
    );
    let tcp_flows = tcp["counters"]["new_flows"].as_u64().unwrap();
    assert!(
        tcp_flows >= 22,
        "2 open + 20 short (+ readiness probes): {tcp_flows}"
    );
    assert_eq!(
        sum(&tcp["backends"], |b| b["active_connections"]
            .as_u64()
            .unwrap()
            + b["inactive_connections"].as_u64().unwrap()),
        tcp_flows,
        "every TCP flow counted is tracked, open or closing"
    );
    assert_eq!(
        sum(&tcp["backends"], |b| b["counters"]["new_flows"]
            .as_u64()
            .unwrap()),
        tcp_flows
    );
    let udp = frontend(&services, "UDP");
    assert_eq!(udp["counters"]["new_flows"], 10);
    assert_eq!(udp["counters"]["packets_in"], 10);
    assert_eq!(udp["counters"]["packets_out"], 10);

    let stats = lbctl(&bed, &["stats"]);
    assert_eq!(frontend(&stats, "UDP")["counters"], udp["counters"]);

    let flows = lbctl(&bed, &["conntrack", "--client", &CLIENT_IP.to_string()]);
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len() as u64, tcp_flows + 10);
    let open_tcp: Vec<&Value> = flows
        .iter()
        .filter(|f| f["protocol"] == "TCP" && f["closing"] == false)
        .collect();
    assert_eq!(open_tcp.len(), 2);
    let one_backend = open[0].reply.backend.clone();
    let be_ip = backends.iter().find(|b| b.0 == one_backend).unwrap().1;
    let by_backend = lbctl(&bed, &["conntrack", "--backend", &format!("{be_ip}:8080")]);
    assert!(by_backend
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["backend"] == format!("{be_ip}:8080")));
    assert!(!by_backend.as_array().unwrap().is_empty());
    let nobody = lbctl(&bed, &["conntrack", "--client", "198.18.99.99"]);
    assert_eq!(nobody, serde_json::json!([]));
    drop(open);
}

#[test]
fn lbctl_trace_explains_new_and_established_flows_and_leaves_no_state() {
    let backends = [
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
    ];
    let (bed, ips) = start("trace", &backends);
    let to = SocketAddrV4::new(VIP, 80);
    let conn = tcp_connect(&bed.client.ns, to, TIMEOUT).unwrap();
    let client_port = conn.stream().local_addr().unwrap().port();
    // Flows without their idle time, which may tick between two reads.
    let flows = |bed: &OneNode| -> Vec<Value> {
        let mut v = lbctl(bed, &["conntrack"]);
        for f in v.as_array_mut().unwrap() {
            f.as_object_mut().unwrap().remove("idle_seconds");
        }
        v.as_array().unwrap().clone()
    };
    let flows_before = flows(&bed);
    let counters_before = lbctl(&bed, &["stats"]);

    // A new flow: one of the two backends, with its slot.
    let new = lbctl(&bed, &["trace", "198.18.1.10:45678", "198.19.0.10:80/tcp"]);
    assert_eq!(new["verdict"], "dnat", "{new:#}");
    assert_eq!(new["backends"], 2);
    let chosen = new["backend"].as_str().unwrap();
    assert!(
        ips.iter().any(|ip| chosen == format!("{ip}:8080")),
        "{new:#}"
    );
    assert!(
        new["reason"].as_str().unwrap().starts_with("new flow"),
        "{new:#}"
    );
    assert!(matches!(new["slot"].as_u64(), Some(1 | 2)), "{new:#}");

    // The open connection's own tuple: conntrack keeps it on its backend.
    let est = lbctl(
        &bed,
        &[
            "trace",
            &format!("{CLIENT_IP}:{client_port}"),
            "198.19.0.10:80/tcp",
        ],
    );
    let mine = backends
        .iter()
        .find(|b| b.0 == conn.reply.backend)
        .unwrap()
        .1;
    assert_eq!(est["backend"], format!("{mine}:8080"), "{est:#}");
    assert!(
        est["reason"]
            .as_str()
            .unwrap()
            .starts_with("established flow"),
        "{est:#}"
    );

    // Not a frontend, and the wrong protocol.
    let pass = lbctl(&bed, &["trace", "198.18.1.10", "198.18.2.1:8080/tcp"]);
    assert_eq!(pass["verdict"], "pass");
    let udp_pass = lbctl(&bed, &["trace", "198.18.1.10", "198.19.0.10:81/udp"]);
    assert_eq!(udp_pass["verdict"], "pass");

    // Traces wrote nothing: same flows, same counters.
    assert_eq!(
        flows(&bed),
        flows_before,
        "a trace must not create conntrack entries"
    );
    assert_eq!(
        lbctl(&bed, &["stats"]),
        counters_before,
        "a trace must not count"
    );
    drop(conn);
}

#[test]
fn connection_counts_are_per_frontend_when_backends_are_shared() {
    let backends = [
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
    ];
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.1).collect();
    // A second Service on the same pods and port: its frontend shares the backend ids.
    let other = "---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: demo}
spec:
  clusterIP: 198.19.0.40
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other-1
  namespace: demo
  labels: {kubernetes.io/service-name: other}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- {addresses: [198.18.2.1], conditions: {ready: true}, nodeName: node-1}
- {addresses: [198.18.2.2], conditions: {ready: true}, nodeName: node-1}
";
    let yaml = echo_service_yaml(VIP, 80, 8080, &ips) + other;
    let bed = OneNode::start("ctshare", &backends, 8080, &yaml).unwrap();
    let to = SocketAddrV4::new(VIP, 80);
    bed.wait_for_tcp(to, Duration::from_secs(10)).unwrap();
    let open: Vec<_> = (0..3)
        .map(|_| tcp_connect(&bed.client.ns, to, TIMEOUT).unwrap())
        .collect();

    let services = lbctl(&bed, &["services"]);
    let list = services.as_array().unwrap();
    let find = |addr: &str| {
        list.iter()
            .find(|f| f["protocol"] == "TCP" && f["address"] == addr)
            .unwrap_or_else(|| panic!("no TCP {addr} in {services:#}"))
    };
    let (echo, other) = (find("198.19.0.10:80"), find("198.19.0.40:80"));
    let ids = |f: &Value| -> Vec<u64> {
        let mut v: Vec<u64> = f["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_u64().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids(echo), ids(other), "the frontends share backend ids");
    assert_eq!(
        sum(&echo["backends"], |b| b["active_connections"]
            .as_u64()
            .unwrap()),
        3
    );
    assert_eq!(
        sum(&other["backends"], |b| b["active_connections"]
            .as_u64()
            .unwrap()
            + b["inactive_connections"].as_u64().unwrap()),
        0,
        "no flow went through the other frontend: {other:#}"
    );
    drop(open);
}

#[test]
fn lbctl_shows_the_maglev_scheduler_and_traces_the_slot_a_flow_really_takes() {
    let backends = [
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
        ("be-3", Ipv4Addr::new(198, 18, 2, 3)),
    ];
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.1).collect();
    // The pod-side default is random; the annotation asks for Maglev.
    let yaml = echo_service_yaml(VIP, 80, 8080, &ips).replacen(
        "metadata: {name: echo, namespace: demo}",
        "metadata: {name: echo, namespace: demo, annotations: {lb.io/scheduler: maglev}}",
        1,
    );
    let bed = OneNode::start("lbctl-maglev", &backends, 8080, &yaml).unwrap();
    bed.wait_for_tcp(SocketAddrV4::new(VIP, 80), Duration::from_secs(10))
        .unwrap();

    let services = lbctl(&bed, &["services"]);
    assert_eq!(frontend(&services, "TCP")["scheduler"], "maglev");

    for port in [45_001u16, 45_002, 45_003, 45_004] {
        let src = format!("{CLIENT_IP}:{port}");
        let t = lbctl(&bed, &["trace", &src, "198.19.0.10:80/tcp"]);
        assert_eq!(t["verdict"], "dnat", "{t:#}");
        assert_eq!(t["scheduler"], "maglev", "{t:#}");
        assert_eq!(t["maglev_table_size"], 1021, "{t:#}");
        let slot = t["maglev_slot"].as_u64().expect("a Maglev slot");
        let backend = t["backend"].as_str().unwrap();
        let reason = t["reason"].as_str().unwrap();
        assert!(
            reason.contains(&format!(
                "Maglev slot {slot} (of 1021) -> backend {backend}"
            )),
            "{t:#}"
        );
        // The same tuple for real lands where the trace said.
        let from = SocketAddrV4::new(CLIENT_IP, port);
        let reply = bed
            .client
            .ns
            .run(|| lb_tests::tcp_request_from_here(from, SocketAddrV4::new(VIP, 80), TIMEOUT))
            .unwrap();
        let served = backends.iter().find(|b| b.0 == reply.backend).unwrap().1;
        assert_eq!(backend, format!("{served}:8080"), "port {port}: {t:#}");
    }
}
