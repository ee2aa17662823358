//! lbctl against live maps: real flows through a ClusterIP, then `lbctl services`, `stats` and
//! `conntrack` (JSON output) must agree with what the test did; `lbctl dump` is canonical and
//! unmoved by traffic; pins of another layout version are refused.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use lb_tests::{
    cluster::{echo_service_yaml, lbctl_bin, OneNode, CLIENT_IP},
    tcp_connect, tcp_requests, udp_requests, BpfFs,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const TIMEOUT: Duration = Duration::from_secs(2);

fn lbctl_at(bpffs: &Path, args: &[&str]) -> Output {
    Command::new(lbctl_bin().unwrap())
        .arg("--bpffs")
        .arg(bpffs)
        .args(args)
        .output()
        .expect("run lbctl")
}

fn lbctl_text(bed: &OneNode, args: &[&str]) -> String {
    let out = lbctl_at(bed.bpffs.path(), args);
    assert!(
        out.status.success(),
        "lbctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn lbctl(bed: &OneNode, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&lbctl_text(bed, &all)).expect("lbctl prints JSON")
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
            f.as_object_mut().unwrap().remove("expires_in_seconds");
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

/// An externalIP Service with externalTrafficPolicy=Cluster: one endpoint on this node (be-1),
/// one on another node (not local; no pod needed, nothing is sent to it).
const EXTERNAL_IP_SERVICE: &str = "---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: demo}
spec:
  clusterIP: 198.19.0.20
  externalIPs: [198.19.201.1]
  ports:
  - {name: http, port: 8000, protocol: TCP, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: ext-1
  namespace: demo
  labels: {kubernetes.io/service-name: ext}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- {addresses: [198.18.2.1], conditions: {ready: true}, nodeName: node-1}
- {addresses: [198.18.9.9], conditions: {ready: true}, nodeName: node-2}
";

/// (address, protocol, scope, flags, {(backend address, backend flags)}) of each dumped frontend.
type Shape = (
    String,
    String,
    String,
    Vec<String>,
    BTreeSet<(String, Vec<String>)>,
);

fn shape(dump: &Value) -> Vec<Shape> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    dump.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let slots = f["slots"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    assert_eq!(s["missing"], false, "{f:#}");
                    (
                        s["address"].as_str().unwrap().to_string(),
                        strings(&s["flags"]),
                    )
                })
                .collect();
            (
                f["address"].as_str().unwrap().to_string(),
                f["protocol"].as_str().unwrap().to_string(),
                f["scope"].as_str().unwrap().to_string(),
                strings(&f["flags"]),
                slots,
            )
        })
        .collect()
}

#[test]
fn lbctl_dump_is_canonical_sorted_and_unmoved_by_traffic() {
    let backends = [
        ("be-1", Ipv4Addr::new(198, 18, 2, 1)),
        ("be-2", Ipv4Addr::new(198, 18, 2, 2)),
    ];
    let ips: Vec<Ipv4Addr> = backends.iter().map(|b| b.1).collect();
    let yaml = echo_service_yaml(VIP, 80, 8080, &ips) + EXTERNAL_IP_SERVICE;
    let mut bed = OneNode::start("lbdump", &backends, 8080, &yaml).unwrap();
    let to = SocketAddrV4::new(VIP, 80);
    bed.wait_for_tcp(to, Duration::from_secs(10)).unwrap();

    let dump = lbctl(&bed, &["dump"]);
    let local = |a: &str| (a.to_string(), vec!["local".to_string()]);
    let remote = (String::from("198.18.9.9:8080"), Vec::new());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let both_echo: BTreeSet<_> = [local("198.18.2.1:8080"), local("198.18.2.2:8080")].into();
    let ext_backends: BTreeSet<_> = [local("198.18.2.1:8080"), remote].into();
    let fe = |addr: &str, proto: &str, scope: &str, flags: &[&str], b: &BTreeSet<_>| -> Shape {
        (addr.into(), proto.into(), scope.into(), s(flags), b.clone())
    };
    // Sorted by address, port, protocol, scope. The externalIP has an internal entry (for pods,
    // no masquerade) and an external one (from outside: eTP=Cluster source-NATs remote backends).
    assert_eq!(
        shape(&dump),
        vec![
            fe(
                "198.19.0.10:80",
                "TCP",
                "internal",
                &["ClusterIP"],
                &both_echo
            ),
            fe(
                "198.19.0.10:80",
                "UDP",
                "internal",
                &["ClusterIP"],
                &both_echo
            ),
            fe(
                "198.19.0.20:8000",
                "TCP",
                "internal",
                &["ClusterIP"],
                &ext_backends
            ),
            fe(
                "198.19.201.1:8000",
                "TCP",
                "internal",
                &["external-frontend"],
                &ext_backends
            ),
            fe(
                "198.19.201.1:8000",
                "TCP",
                "external",
                &["external-frontend", "masquerade"],
                &ext_backends
            ),
        ],
        "{dump:#}"
    );
    // Slots are numbered from 1 in order; ids and rev_nat ids agree with `lbctl services`.
    let services = lbctl(&bed, &["services"]);
    let mut rev_nats = BTreeSet::new();
    for f in dump.as_array().unwrap() {
        let slots: Vec<u64> = f["slots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["slot"].as_u64().unwrap())
            .collect();
        assert_eq!(slots, (1..=slots.len() as u64).collect::<Vec<_>>());
        assert!(
            rev_nats.insert(f["rev_nat_id"].as_u64().unwrap()),
            "{dump:#}"
        );
        let same = services
            .as_array()
            .unwrap()
            .iter()
            .find(|s| {
                s["address"] == f["address"]
                    && s["protocol"] == f["protocol"]
                    && s["scope"] == f["scope"]
            })
            .unwrap_or_else(|| panic!("{f:#} not in {services:#}"));
        assert_eq!(same["rev_nat_id"], f["rev_nat_id"]);
        let ids = |list: &Value, key: &str| -> BTreeSet<(String, u64)> {
            list.as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        b["address"].as_str().unwrap().to_string(),
                        b[key].as_u64().unwrap(),
                    )
                })
                .collect()
        };
        assert_eq!(ids(&same["backends"], "id"), ids(&f["slots"], "backend_id"));
    }

    // The text form says the same, a line per frontend and per slot.
    let text = lbctl_text(&bed, &["dump"]);
    let lines: Vec<&str> = text.lines().collect();
    let slot_count: usize = shape(&dump).iter().map(|f| f.4.len()).sum();
    assert_eq!(
        lines.len(),
        dump.as_array().unwrap().len() + slot_count,
        "{text}"
    );
    assert!(
        lines[0].starts_with("198.19.0.10:80/TCP internal rev_nat=")
            && lines[0].ends_with("flags=ClusterIP affinity=0s backends=2"),
        "{text}"
    );
    assert!(
        text.contains(" external rev_nat=")
            && text.contains("flags=external-frontend,masquerade affinity=0s backends=2"),
        "{text}"
    );
    assert!(
        text.contains(" 198.18.9.9:8080\n"),
        "remote backend without flags: {text}"
    );

    // Traffic moves counters and conntrack, not the dump; and it reads the same with the agent down.
    assert!(tcp_requests(&bed.client.ns, to, 10, TIMEOUT)
        .iter()
        .all(|r| r.is_ok()));
    assert_eq!(lbctl_text(&bed, &["dump"]), text);
    assert!(bed.agent.stop().unwrap().success(), "{}", bed.agent.logs());
    assert_eq!(lbctl_text(&bed, &["dump"]), text, "with the agent stopped");
    assert_eq!(lbctl(&bed, &["dump"]), dump);
}

#[test]
fn lbctl_refuses_pins_of_another_layout_version_naming_both() {
    lb_tests::require_root();
    let bpffs = BpfFs::new("lbver").unwrap();
    let ours = lb_common::ABI_VERSION;
    let dir = bpffs.path().display().to_string();

    let out = lbctl_at(bpffs.path(), &["services"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("nothing of lb-agent is pinned under {dir}")),
        "{stderr}"
    );

    for (found, fix) in [
        (
            ours + 1,
            "use the lbctl shipped with the agent that pinned them",
        ),
        (1, "start the newer lb-agent (it migrates the maps"),
    ] {
        lb_userspace::upgrade::write_version(bpffs.path(), found).unwrap();
        for cmd in [
            &["services"][..],
            &["-o", "json", "dump"],
            &["conntrack"],
            &["stats"],
        ] {
            let out = lbctl_at(bpffs.path(), cmd);
            assert!(!out.status.success(), "{cmd:?} with version {found}");
            assert!(out.stdout.is_empty(), "nothing printed on stdout");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains(&format!(
                    "the maps pinned under {dir} have layout version {found}, but this lbctl \
                     reads layout version {ours}: {fix}"
                )),
                "{cmd:?}: {stderr}"
            );
        }
    }
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
