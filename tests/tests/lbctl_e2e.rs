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

#[test]
fn lbctl_shows_frontends_connections_counters_and_flows_as_they_are() {
    let backends = [
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
        ("be-3", Ipv4Addr::new(198, 18, 2, 3)),
    ];
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.1).collect();
    let bed = OneNode::start(
        "lbctl",
        &backends,
        8080,
        &echo_service_yaml(VIP, 80, 8080, &ips),
    )
    .unwrap();
    let to = SocketAddrV4::new(VIP, 80);
    bed.wait_for_tcp(to, Duration::from_secs(10)).unwrap();
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
