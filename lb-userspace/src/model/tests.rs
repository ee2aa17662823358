//! One test per kube-proxy behaviour; docs/SEMANTICS.md points here.
use std::{net::SocketAddr, path::Path};

use super::*;
use crate::sources::manifests::parse_into;

fn objects(yaml: &str) -> Objects {
    let (mut objects, mut doc_warnings) = (Objects::default(), Vec::new());
    parse_into(
        Path::new("test.yaml"),
        yaml,
        &mut objects,
        &mut doc_warnings,
    );
    assert!(doc_warnings.is_empty(), "{doc_warnings:?}");
    objects
}

fn model_of(yaml: &str, config: &Config) -> (Model, Vec<Warning>) {
    build(&objects(yaml), config)
}

fn cfg() -> Config {
    Config {
        node_name: "node-a".into(),
        node_addresses: vec!["198.18.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        ..Default::default()
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The only ServicePort of the given family and port name.
fn port<'a>(m: &'a Model, family: IpFamily, port_name: &str) -> &'a ServicePort {
    let found: Vec<_> = m
        .service_ports
        .values()
        .filter(|p| p.family == family && p.id.port_name == port_name)
        .collect();
    assert_eq!(found.len(), 1, "{m}");
    found[0]
}

fn v4(m: &Model) -> &ServicePort {
    port(m, IpFamily::V4, "")
}

fn warned(w: &[Warning], prefix: &str) -> bool {
    w.iter().any(|w| w.to_string().starts_with(prefix))
}

/// A Service `d/s` with one unnamed TCP port 80 -> 8080 plus `extra` spec lines, and a slice with
/// the given endpoint lines.
fn svc(extra_spec: &str, endpoints: &[&str]) -> String {
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: s, namespace: d}}
spec:
  clusterIP: 198.19.0.10
  ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]
{extra_spec}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s-1, namespace: d, labels: {{kubernetes.io/service-name: s}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
"
    );
    for e in endpoints {
        y.push_str(&format!("- {e}\n"));
    }
    if endpoints.is_empty() {
        y = y.replace("endpoints:\n", "endpoints: []\n");
    }
    y
}

const LOCAL_READY: &str = "{addresses: [198.18.1.1], nodeName: node-a}";
const REMOTE_READY: &str = "{addresses: [198.18.2.1], nodeName: node-b}";
const LOCAL_TERMINATING: &str =
    "{addresses: [198.18.1.9], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}";

// ---- types ----------------------------------------------------------------------------------

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [198.18.1.2], nodeName: node-a}
- {addresses: [198.18.1.3], conditions: {ready: false, serving: true, terminating: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: [198.18.1.2]}
- {addresses: [198.18.2.2], conditions: {ready: true}}
"#;

#[test]
fn cluster_ip_service_gets_one_cluster_ip_frontend_per_port() {
    let (m, w) = model_of(WEB, &cfg());
    assert!(w.is_empty(), "{w:?}");
    let http = port(&m, IpFamily::V4, "http");
    assert_eq!(
        http.frontends,
        vec![Frontend {
            kind: FrontendKind::ClusterIp,
            addr: "198.19.0.10".parse().unwrap(),
            port: 80
        }]
    );
}

#[test]
fn node_port_service_gets_a_frontend_on_every_node_address_of_the_family() {
    let (m, _) = model_of(&svc("  type: NodePort", &[REMOTE_READY]), &cfg());
    let kinds: Vec<(FrontendKind, String)> = v4(&m)
        .frontends
        .iter()
        .map(|f| (f.kind, SocketAddr::new(f.addr, f.port).to_string()))
        .collect();
    assert_eq!(
        kinds,
        [
            (FrontendKind::ClusterIp, "198.19.0.10:80".into()),
            (FrontendKind::NodePort, "198.18.0.2:30080".into())
        ]
    );
}

#[test]
fn load_balancer_ingress_ips_become_frontends_except_ip_mode_proxy() {
    let yaml = svc(
        "  type: LoadBalancer\nstatus:\n  loadBalancer:\n    ingress:\n    - {ip: 198.19.5.1}\n    - {ip: 198.19.5.2, ipMode: Proxy}\n    - {ip: 198.19.5.3, ipMode: VIP}\n    - {hostname: lb.example.invalid}",
        &[REMOTE_READY],
    );
    let (m, w) = model_of(&yaml, &cfg());
    assert!(w.is_empty(), "{w:?}");
    let lb: Vec<String> = v4(&m)
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::LoadBalancer)
        .map(|f| f.addr.to_string())
        .collect();
    assert_eq!(lb, ["198.19.5.1", "198.19.5.3"]);
}

#[test]
fn external_ips_become_frontends_on_the_service_port() {
    let (m, _) = model_of(&svc("  externalIPs: [198.19.6.1]", &[REMOTE_READY]), &cfg());
    let ext: Vec<&Frontend> = v4(&m)
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::ExternalIp)
        .collect();
    assert_eq!(ext.len(), 1);
    assert_eq!(
        (ext[0].addr.to_string(), ext[0].port),
        ("198.19.6.1".to_string(), 80)
    );
}

#[test]
fn headless_and_external_name_services_are_ignored() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: h, namespace: d}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: e, namespace: d}
spec: {type: ExternalName, externalName: example.invalid}
"#;
    let (m, w) = model_of(yaml, &cfg());
    assert!(m.service_ports.is_empty());
    assert!(w.is_empty(), "{w:?}");
}

#[test]
fn service_proxy_name_label_selects_who_serves_an_object() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: mine, namespace: d, labels: {service.kubernetes.io/service-proxy-name: lb}}
spec: {clusterIP: 198.19.0.13, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: d}
spec: {clusterIP: 198.19.0.14, ports: [{port: 80}]}
"#;
    let names = |c: &Config| -> Vec<String> {
        model_of(yaml, c)
            .0
            .service_ports
            .values()
            .map(|p| p.id.name.clone())
            .collect()
    };
    assert_eq!(names(&cfg()), ["plain"]);
    assert_eq!(
        names(&Config {
            service_proxy_name: Some("lb".into()),
            ..cfg()
        }),
        ["mine"]
    );
}

// ---- ports ----------------------------------------------------------------------------------

#[test]
fn each_port_and_protocol_is_its_own_service_port() {
    let (m, _) = model_of(WEB, &cfg());
    let ids: Vec<String> = m.service_ports.values().map(|p| p.id.to_string()).collect();
    assert_eq!(ids, ["shop/web:dns/UDP", "shop/web:http/TCP"]);
}

#[test]
fn sctp_port_is_kept_with_a_warning_that_the_data_path_does_not_carry_it() {
    let (m, w) = model_of(
        &svc("", &[]).replace(
            "{port: 80, targetPort: 8080, nodePort: 30080}",
            "{port: 80, protocol: SCTP}",
        ),
        &cfg(),
    );
    assert_eq!(v4(&m).id.protocol, Protocol::Sctp);
    assert!(
        warned(&w, "Service d/s spec.ports[0].protocol: SCTP"),
        "{w:?}"
    );
    assert!(
        crate::dataplane::desired(&m).is_empty(),
        "SCTP is not programmed"
    );
}

#[test]
fn slice_ports_are_matched_by_name_and_protocol() {
    let (m, _) = model_of(WEB, &cfg());
    let dns = port(&m, IpFamily::V4, "dns");
    assert_eq!(dns.frontends[0].port, 53);
    assert_eq!(
        dns.cluster_backends,
        vec![sa("198.18.1.2:5353")],
        "only web-1 lists dns; .3 is not ready"
    );
}

#[test]
fn named_target_port_may_resolve_to_different_numbers_per_slice() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s, namespace: d}
spec: {clusterIP: 198.19.0.10, ports: [{name: http, port: 80, targetPort: web}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-old, namespace: d, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.1.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-new, namespace: d, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{name: http, port: 9090}]
endpoints: [{addresses: [198.18.1.2]}]
"#;
    let (m, _) = model_of(yaml, &cfg());
    assert_eq!(
        port(&m, IpFamily::V4, "http").cluster_backends,
        vec![sa("198.18.1.1:8080"), sa("198.18.1.2:9090")]
    );
}

// ---- EndpointSlices -------------------------------------------------------------------------

#[test]
fn slices_are_unioned_and_the_same_ip_port_counts_once() {
    let (m, _) = model_of(WEB, &cfg());
    let http = port(&m, IpFamily::V4, "http");
    let addrs: Vec<String> = http
        .endpoints
        .iter()
        .map(|e| e.socket_addr().to_string())
        .collect();
    assert_eq!(
        addrs,
        ["198.18.1.2:8080", "198.18.1.3:8080", "198.18.2.2:8080"]
    );
}

#[test]
fn duplicate_endpoint_keeps_the_local_copy() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s, namespace: d}
spec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-a, namespace: d, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.18.1.1], nodeName: node-b}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-b, namespace: d, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.18.1.1], nodeName: node-a}]
"#;
    let (m, _) = model_of(yaml, &cfg());
    assert_eq!(v4(&m).endpoints.len(), 1);
    assert!(v4(&m).endpoints[0].local);
}

#[test]
fn slice_without_service_name_label_is_ignored() {
    let yaml = svc("", &[REMOTE_READY]).replace(
        "labels: {kubernetes.io/service-name: s}",
        "labels: {app: s}",
    );
    let (m, _) = model_of(&yaml, &cfg());
    assert!(v4(&m).endpoints.is_empty());
    assert!(!v4(&m).has_any_endpoints);
}

#[test]
fn only_the_first_address_of_an_endpoint_is_used() {
    let (m, _) = model_of(&svc("", &["{addresses: [198.18.1.1, 198.18.1.2]}"]), &cfg());
    assert_eq!(v4(&m).cluster_backends, vec![sa("198.18.1.1:8080")]);
}

#[test]
fn unset_conditions_mean_ready_serving_not_terminating() {
    let (m, _) = model_of(&svc("", &["{addresses: [198.18.1.1]}"]), &cfg());
    let e = &v4(&m).endpoints[0];
    assert!(e.ready && e.serving && !e.terminating);
}

#[test]
fn endpoint_without_node_name_is_never_local() {
    let (m, _) = model_of(&svc("", &["{addresses: [198.18.1.1]}"]), &cfg());
    assert!(!v4(&m).endpoints[0].local);
    let (m, _) = model_of(&svc("", &[LOCAL_READY]), &cfg());
    assert!(v4(&m).endpoints[0].local);
}

// ---- endpoint choice ------------------------------------------------------------------------

#[test]
fn ready_endpoints_are_chosen_while_any_is_ready() {
    let (m, _) = model_of(WEB, &cfg());
    assert_eq!(
        port(&m, IpFamily::V4, "http").cluster_backends,
        vec![sa("198.18.1.2:8080"), sa("198.18.2.2:8080")]
    );
}

#[test]
fn serving_terminating_endpoints_are_used_when_none_is_ready() {
    let not_serving =
        "{addresses: [198.18.1.3], conditions: {ready: false, serving: false, terminating: true}}";
    let (m, _) = model_of(&svc("", &[LOCAL_TERMINATING, not_serving]), &cfg());
    assert_eq!(v4(&m).cluster_backends, vec![sa("198.18.1.9:8080")]);
    assert!(v4(&m).has_any_endpoints);
}

#[test]
fn no_usable_endpoint_means_new_flows_are_rejected_on_every_frontend() {
    let not_ready = "{addresses: [198.18.1.3], conditions: {ready: false, serving: false}}";
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  externalIPs: [198.19.6.1]",
            &[not_ready],
        ),
        &cfg(),
    );
    let sp = v4(&m);
    assert!(!sp.has_any_endpoints);
    for fe in &sp.frontends {
        for origin in [Origin::Pod, Origin::External, Origin::HostProcess] {
            let t = sp.traffic(fe, origin);
            assert!(t.backends.is_empty());
            assert_eq!(t.when_empty, WhenEmpty::Reject, "{fe:?} from {origin:?}");
        }
    }
}

#[test]
fn local_set_is_chosen_the_same_way_among_local_endpoints() {
    let (m, _) = model_of(&svc("", &[LOCAL_TERMINATING, REMOTE_READY]), &cfg());
    let sp = v4(&m);
    assert_eq!(
        sp.cluster_backends,
        vec![sa("198.18.2.1:8080")],
        "a ready endpoint exists: no terminating one"
    );
    assert_eq!(
        sp.local_backends,
        vec![sa("198.18.1.9:8080")],
        "no local ready one: local serving-terminating"
    );
    let (m, _) = model_of(&svc("", &[LOCAL_TERMINATING, LOCAL_READY]), &cfg());
    assert_eq!(v4(&m).local_backends, vec![sa("198.18.1.1:8080")]);
}

// ---- traffic policies -----------------------------------------------------------------------

fn external_frontend(sp: &ServicePort) -> Frontend {
    *sp.frontends
        .iter()
        .find(|f| f.kind.is_external())
        .expect("an external frontend")
}

fn cluster_ip_frontend(sp: &ServicePort) -> Frontend {
    *sp.frontends
        .iter()
        .find(|f| f.kind == FrontendKind::ClusterIp)
        .unwrap()
}

#[test]
fn etp_local_external_traffic_uses_local_endpoints_and_keeps_the_client_ip() {
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  externalTrafficPolicy: Local",
            &[LOCAL_READY, REMOTE_READY],
        ),
        &cfg(),
    );
    let sp = v4(&m);
    let t = sp.traffic(&external_frontend(sp), Origin::External);
    assert_eq!(t.backends, [sa("198.18.1.1:8080")]);
    assert!(!t.masquerade);
}

#[test]
fn etp_local_without_local_endpoint_drops_external_traffic() {
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  externalTrafficPolicy: Local",
            &[REMOTE_READY],
        ),
        &cfg(),
    );
    let sp = v4(&m);
    let t = sp.traffic(&external_frontend(sp), Origin::External);
    assert!(t.backends.is_empty());
    assert_eq!(t.when_empty, WhenEmpty::Drop);
}

#[test]
fn etp_local_pods_on_this_node_use_the_cluster_set() {
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  externalTrafficPolicy: Local",
            &[REMOTE_READY],
        ),
        &cfg(),
    );
    let sp = v4(&m);
    let t = sp.traffic(&external_frontend(sp), Origin::Pod);
    assert_eq!(
        (t.backends, t.masquerade),
        (&[sa("198.18.2.1:8080")][..], false)
    );
}

#[test]
fn etp_local_host_processes_use_the_cluster_set_masqueraded() {
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  externalTrafficPolicy: Local",
            &[REMOTE_READY],
        ),
        &cfg(),
    );
    let sp = v4(&m);
    let t = sp.traffic(&external_frontend(sp), Origin::HostProcess);
    assert_eq!(
        (t.backends, t.masquerade),
        (&[sa("198.18.2.1:8080")][..], true)
    );
}

#[test]
fn etp_is_ignored_without_external_frontends_and_never_affects_cluster_ip() {
    let (m, _) = model_of(
        &svc("  externalTrafficPolicy: Local", &[REMOTE_READY]),
        &cfg(),
    );
    assert!(
        !v4(&m).external_policy_local,
        "a ClusterIP Service has no external traffic"
    );
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  externalTrafficPolicy: Local",
            &[REMOTE_READY],
        ),
        &cfg(),
    );
    let sp = v4(&m);
    let t = sp.traffic(&cluster_ip_frontend(sp), Origin::Pod);
    assert_eq!(t.backends, [sa("198.18.2.1:8080")]);
}

#[test]
fn cluster_policy_external_traffic_is_masqueraded() {
    let (m, _) = model_of(&svc("  type: NodePort", &[REMOTE_READY]), &cfg());
    let sp = v4(&m);
    let t = sp.traffic(&external_frontend(sp), Origin::External);
    assert_eq!(
        (t.backends, t.masquerade),
        (&[sa("198.18.2.1:8080")][..], true)
    );
}

#[test]
fn pod_to_cluster_ip_keeps_its_source() {
    let (m, _) = model_of(&svc("", &[REMOTE_READY]), &cfg());
    let sp = v4(&m);
    assert!(!sp.traffic(&cluster_ip_frontend(sp), Origin::Pod).masquerade);
}

#[test]
fn itp_local_cluster_ip_traffic_uses_local_endpoints_only() {
    let (m, _) = model_of(
        &svc(
            "  internalTrafficPolicy: Local",
            &[LOCAL_READY, REMOTE_READY],
        ),
        &cfg(),
    );
    let sp = v4(&m);
    assert_eq!(
        sp.traffic(&cluster_ip_frontend(sp), Origin::Pod).backends,
        [sa("198.18.1.1:8080")]
    );
    let desired = crate::dataplane::desired(&m);
    assert_eq!(
        desired.values().next().unwrap().backends.len(),
        1,
        "the data path gets the local set"
    );
}

#[test]
fn itp_local_without_local_endpoint_drops() {
    let (m, _) = model_of(
        &svc("  internalTrafficPolicy: Local", &[REMOTE_READY]),
        &cfg(),
    );
    let sp = v4(&m);
    let t = sp.traffic(&cluster_ip_frontend(sp), Origin::Pod);
    assert!(t.backends.is_empty());
    assert_eq!(t.when_empty, WhenEmpty::Drop);
}

#[test]
fn hairpin_flow_from_an_endpoint_to_itself_is_masqueraded() {
    assert!(needs_hairpin_masquerade(
        "198.18.1.1".parse().unwrap(),
        sa("198.18.1.1:8080")
    ));
    assert!(!needs_hairpin_masquerade(
        "198.18.1.2".parse().unwrap(),
        sa("198.18.1.1:8080")
    ));
}

// ---- NodePort addresses ---------------------------------------------------------------------

#[test]
fn nodeport_addresses_restrict_the_node_port_frontends() {
    let config = Config {
        node_addresses: vec!["198.18.0.2".parse().unwrap(), "198.18.9.2".parse().unwrap()],
        nodeport_cidrs: vec!["198.18.9.0/24".parse().unwrap()],
        ..cfg()
    };
    let (m, _) = model_of(&svc("  type: NodePort", &[REMOTE_READY]), &config);
    let np: Vec<String> = v4(&m)
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::NodePort)
        .map(|f| f.addr.to_string())
        .collect();
    assert_eq!(np, ["198.18.9.2"]);
}

// ---- session affinity -----------------------------------------------------------------------

#[test]
fn client_ip_affinity_defaults_to_10800_seconds() {
    let (m, _) = model_of(&svc("  sessionAffinity: ClientIP", &[REMOTE_READY]), &cfg());
    assert_eq!(
        v4(&m).affinity,
        Some(Affinity {
            timeout_seconds: 10_800
        })
    );
    let (m, _) = model_of(
        &svc("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}", &[REMOTE_READY]),
        &cfg(),
    );
    assert_eq!(
        v4(&m).affinity,
        Some(Affinity {
            timeout_seconds: 60
        })
    );
    let (m, _) = model_of(&svc("", &[REMOTE_READY]), &cfg());
    assert_eq!(v4(&m).affinity, None);
}

#[test]
fn affinity_is_per_service_port_across_all_its_frontends() {
    // One ServicePort carries the affinity for every frontend (ClusterIP, NodePort, externalIP).
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  externalIPs: [198.19.6.1]\n  sessionAffinity: ClientIP",
            &[REMOTE_READY],
        ),
        &cfg(),
    );
    assert_eq!(m.service_ports.len(), 1);
    assert_eq!(v4(&m).frontends.len(), 3);
    assert!(v4(&m).affinity.is_some());
}

// ---- loadBalancerSourceRanges ---------------------------------------------------------------

#[test]
fn lb_source_ranges_are_trimmed_split_by_family_and_allow_the_node() {
    let yaml = svc(
        "  type: LoadBalancer\n  clusterIPs: [198.19.0.10, 'fd00::10']\n  ipFamilies: [IPv4, IPv6]\n  loadBalancerSourceRanges: [' 203.0.113.0/24 ', 'fd00:1::/64', 'bogus']\nstatus: {loadBalancer: {ingress: [{ip: 198.19.5.1}, {ip: 'fd00::5:1'}]}}",
        &[REMOTE_READY],
    );
    let (m, w) = model_of(&yaml, &cfg());
    assert!(
        warned(&w, "Service d/s spec.loadBalancerSourceRanges[2]:"),
        "{w:?}"
    );
    let r4: Vec<String> = v4(&m)
        .lb_source_ranges
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(r4, ["198.18.0.2/32", "203.0.113.0/24"]);
    let r6: Vec<String> = port(&m, IpFamily::V6, "")
        .lb_source_ranges
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(r6, ["fd00::2/128", "fd00:1::/64"]);
}

#[test]
fn lb_source_ranges_guard_only_the_lb_ip_frontends_in_both_scopes() {
    use lb_common::service::SVC_FLAG_SOURCE_RANGES;
    let yaml = svc(
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [203.0.113.0/24]\nstatus: {loadBalancer: {ingress: [{ip: 198.19.5.1}]}}",
        &[REMOTE_READY],
    );
    let (m, _) = model_of(&yaml, &cfg());
    let desired = crate::dataplane::desired(&m);
    let mut guarded = 0;
    for (fe, d) in &desired {
        if fe.addr == std::net::Ipv4Addr::new(198, 19, 5, 1) {
            guarded += 1;
            assert_ne!(d.flags & SVC_FLAG_SOURCE_RANGES, 0, "{fe:?}");
            let r: Vec<String> = d.source_ranges.iter().map(|r| r.to_string()).collect();
            assert_eq!(r, ["198.18.0.2/32", "203.0.113.0/24"], "{fe:?}");
        } else {
            assert_eq!(d.flags & SVC_FLAG_SOURCE_RANGES, 0, "{fe:?}");
            assert!(d.source_ranges.is_empty(), "{fe:?}");
        }
    }
    assert_eq!(guarded, 2, "the LB IP's pod-side and external entries");
}

#[test]
fn lb_source_ranges_of_the_other_family_only_leave_the_frontend_open() {
    // kube-proxy applies each family's ranges to that family's frontends; an IPv4 LB IP with
    // only IPv6 ranges has none and is open.
    let yaml = svc(
        "  type: LoadBalancer\n  loadBalancerSourceRanges: ['fd00:1::/64']\nstatus: {loadBalancer: {ingress: [{ip: 198.19.5.1}]}}",
        &[REMOTE_READY],
    );
    let (m, _) = model_of(&yaml, &cfg());
    assert!(v4(&m).lb_source_ranges.is_empty());
    assert!(crate::dataplane::desired(&m)
        .values()
        .all(|d| d.source_ranges.is_empty()));
}

#[test]
fn lb_source_ranges_do_nothing_without_lb_ingress() {
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  loadBalancerSourceRanges: [203.0.113.0/24]",
            &[REMOTE_READY],
        ),
        &cfg(),
    );
    assert!(
        v4(&m).lb_source_ranges.is_empty(),
        "never applied to NodePort or ClusterIP"
    );
}

// ---- topology -------------------------------------------------------------------------------

fn zoned(zone_a: &str, zone_b: &str) -> String {
    svc(
        "",
        &[
            &format!("{{addresses: [198.18.1.1], nodeName: node-a, hints: {{forZones: [{{name: {zone_a}}}]}}}}"),
            &format!("{{addresses: [198.18.2.1], nodeName: node-b, hints: {{forZones: [{{name: {zone_b}}}]}}}}"),
        ],
    )
}

fn in_zone(zone: &str) -> Config {
    Config {
        zone: Some(zone.into()),
        ..cfg()
    }
}

#[test]
fn zone_hints_filter_the_cluster_set_when_all_ready_endpoints_have_hints() {
    let (m, _) = model_of(&zoned("z1", "z2"), &in_zone("z2"));
    assert_eq!(v4(&m).topology, Topology::SameZone);
    assert_eq!(v4(&m).cluster_backends, vec![sa("198.18.2.1:8080")]);
}

#[test]
fn zone_hints_are_ignored_when_none_matches_this_zone() {
    let (m, _) = model_of(&zoned("z1", "z2"), &in_zone("z3"));
    assert_eq!(v4(&m).topology, Topology::None);
    assert_eq!(v4(&m).cluster_backends.len(), 2);
}

#[test]
fn zone_hints_are_ignored_when_one_ready_endpoint_lacks_them() {
    let yaml = svc(
        "",
        &[
            "{addresses: [198.18.1.1], hints: {forZones: [{name: z1}]}}",
            "{addresses: [198.18.2.1]}",
        ],
    );
    let (m, _) = model_of(&yaml, &in_zone("z1"));
    assert_eq!(v4(&m).cluster_backends.len(), 2);
}

#[test]
fn node_zone_comes_from_the_node_object_label() {
    let yaml = format!(
        "{}---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: z1}}}}\n",
        zoned("z1", "z2")
    );
    let (m, _) = model_of(&yaml, &cfg());
    assert_eq!(v4(&m).cluster_backends, vec![sa("198.18.1.1:8080")]);
}

#[test]
fn prefer_same_node_uses_node_hints() {
    let yaml = svc(
        "  trafficDistribution: PreferSameNode",
        &[
            "{addresses: [198.18.1.1], nodeName: node-a, hints: {forNodes: [{name: node-a}], forZones: [{name: z1}]}}",
            "{addresses: [198.18.1.2], nodeName: node-x, hints: {forNodes: [{name: node-x}], forZones: [{name: z1}]}}",
        ],
    );
    let (m, _) = model_of(&yaml, &in_zone("z1"));
    assert_eq!(v4(&m).topology, Topology::SameNode);
    assert_eq!(v4(&m).cluster_backends, vec![sa("198.18.1.1:8080")]);
    // Without PreferSameNode the same hints mean zone routing: both are in z1.
    let (m, _) = model_of(
        &yaml.replace("  trafficDistribution: PreferSameNode\n", ""),
        &in_zone("z1"),
    );
    assert_eq!(
        (v4(&m).topology, v4(&m).cluster_backends.len()),
        (Topology::SameZone, 2)
    );
}

#[test]
fn local_policy_sets_are_never_filtered_by_topology() {
    let yaml = svc(
        "  type: NodePort\n  externalTrafficPolicy: Local",
        &[
            "{addresses: [198.18.1.1], nodeName: node-a, hints: {forZones: [{name: z9}]}}",
            "{addresses: [198.18.2.1], nodeName: node-b, hints: {forZones: [{name: z1}]}}",
        ],
    );
    let (m, _) = model_of(&yaml, &in_zone("z1"));
    assert_eq!(v4(&m).cluster_backends, vec![sa("198.18.2.1:8080")]);
    assert_eq!(
        v4(&m).local_backends,
        vec![sa("198.18.1.1:8080")],
        "local endpoint kept although hinted elsewhere"
    );
}

// ---- dual-stack -----------------------------------------------------------------------------

#[test]
fn dual_stack_families_are_independent() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s, namespace: d}
spec: {clusterIP: 198.19.0.10, clusterIPs: [198.19.0.10, 'fd00::10'], ipFamilies: [IPv4, IPv6], ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-v4, namespace: d, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [198.18.1.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-v6, namespace: d, labels: {kubernetes.io/service-name: s}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00::1:1']}, {addresses: ['fd00::1:2']}]
"#;
    let (m, w) = model_of(yaml, &cfg());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(v4(&m).cluster_backends, vec![sa("198.18.1.1:8080")]);
    assert_eq!(
        port(&m, IpFamily::V6, "").cluster_backends,
        vec![sa("[fd00::1:1]:8080"), sa("[fd00::1:2]:8080")]
    );
    assert_eq!(
        crate::dataplane::desired(&m).len(),
        1,
        "only the IPv4 frontend is programmed today"
    );
}

#[test]
fn endpoint_of_the_wrong_family_is_dropped_with_a_warning() {
    let (m, w) = model_of(
        &svc("", &["{addresses: ['fd00::1']}", REMOTE_READY]),
        &cfg(),
    );
    assert!(
        warned(
            &w,
            "EndpointSlice d/s-1 endpoints[0].addresses[0]: fd00::1 is not IPv4"
        ),
        "{w:?}"
    );
    assert_eq!(v4(&m).endpoints.len(), 1);
}

// ---- health check ---------------------------------------------------------------------------

#[test]
fn health_check_node_port_reports_local_ready_endpoints() {
    let yaml = svc(
        "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\nstatus: {loadBalancer: {ingress: [{ip: 198.19.5.1}]}}",
        &[LOCAL_READY, LOCAL_TERMINATING, REMOTE_READY],
    );
    let (m, _) = model_of(&yaml, &cfg());
    assert_eq!(
        v4(&m).health_check,
        Some(HealthCheck {
            node_port: 32000,
            local_endpoints: 1
        })
    );
    let (m, _) = model_of(
        &yaml.replace("  externalTrafficPolicy: Local\n", ""),
        &cfg(),
    );
    assert_eq!(
        v4(&m).health_check,
        None,
        "only eTP=Local Services have one"
    );
}

// ---- bad input ------------------------------------------------------------------------------

#[test]
fn bad_fields_warn_with_object_and_field_and_skip_only_the_bad_part() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: bad-ip, namespace: d}
spec: {clusterIP: 300.1.1.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: mixed, namespace: d}
spec: {clusterIP: 198.19.0.12, ports: [{name: a, port: 70000}, {name: b, port: 81, protocol: ICMP}, {name: c, port: 82}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: mixed-1, namespace: d, labels: {kubernetes.io/service-name: mixed}}
addressType: IPv4
ports: [{name: c, port: 8082}]
endpoints:
- {addresses: [not-an-ip]}
- {addresses: [198.18.1.9]}
"#;
    let (m, w) = model_of(yaml, &cfg());
    assert!(warned(&w, "Service d/bad-ip spec.clusterIPs[0]:"), "{w:?}");
    assert!(
        warned(
            &w,
            "Service d/mixed spec.ports[0].port: 70000 is outside 1..65535"
        ),
        "{w:?}"
    );
    assert!(
        warned(
            &w,
            "Service d/mixed spec.ports[1].protocol: unknown protocol \"ICMP\""
        ),
        "{w:?}"
    );
    assert!(
        warned(&w, "EndpointSlice d/mixed-1 endpoints[0].addresses[0]:"),
        "{w:?}"
    );
    let ids: Vec<String> = m.service_ports.values().map(|p| p.id.to_string()).collect();
    assert_eq!(ids, ["d/mixed:c/TCP"]);
    assert_eq!(
        m.service_ports
            .values()
            .next()
            .unwrap()
            .cluster_backends
            .len(),
        1
    );
}

#[test]
fn two_services_claiming_one_node_port_the_older_keeps_it() {
    let two = |first_ts: &str, second_ts: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: one, namespace: d, creationTimestamp: '{first_ts}'}}\nspec: {{type: NodePort, clusterIP: 198.19.0.1, ports: [{{port: 80, nodePort: 30000}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: two, namespace: d, creationTimestamp: '{second_ts}'}}\nspec: {{type: NodePort, clusterIP: 198.19.0.2, ports: [{{port: 80, nodePort: 30000}}]}}\n"
        )
    };
    let node_port_owner = |m: &Model| -> Vec<String> {
        m.service_ports
            .values()
            .filter(|p| p.frontends.iter().any(|f| f.kind == FrontendKind::NodePort))
            .map(|p| p.id.name.clone())
            .collect()
    };
    let (m, w) = model_of(&two("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"), &cfg());
    assert_eq!(node_port_owner(&m), ["one"]);
    assert!(
        warned(
            &w,
            "Service d/two spec.ports[0].nodePort: 30000/TCP is already used by Service d/one"
        ),
        "{w:?}"
    );
    assert_eq!(m.service_ports.len(), 2, "the loser keeps its ClusterIP");
    let (m, _) = model_of(&two("2026-03-01T00:00:00Z", "2026-02-01T00:00:00Z"), &cfg());
    assert_eq!(node_port_owner(&m), ["two"]);
}

#[test]
fn enormous_slice_is_capped_with_a_warning() {
    let many: Vec<String> = (0..1200)
        .map(|i| format!("{{addresses: [198.18.{}.{}]}}", i / 250, i % 250 + 1))
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let (m, w) = model_of(&svc("", &refs), &cfg());
    assert!(
        warned(&w, "EndpointSlice d/s-1 endpoints: 1200 endpoints"),
        "{w:?}"
    );
    assert_eq!(v4(&m).endpoints.len(), MAX_ENDPOINTS_PER_SLICE);
}

#[test]
fn service_without_spec_or_cluster_ip_is_skipped_with_a_warning() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: d}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: d}\nspec: {ports: [{port: 80}]}\n";
    let (m, w) = model_of(yaml, &cfg());
    assert!(m.service_ports.is_empty());
    assert!(warned(&w, "Service d/a spec: missing"), "{w:?}");
    assert!(
        warned(&w, "Service d/b spec.clusterIP: no usable ClusterIP"),
        "{w:?}"
    );
}

// ---- properties -----------------------------------------------------------------------------

/// Deterministic pseudo-random generator for the property test.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
    fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
        options[self.next(options.len() as u64) as usize]
    }
}

fn arbitrary_objects(rng: &mut Lcg) -> String {
    let ips = [
        "198.19.0.1",
        "198.19.0.2",
        "fd00::1",
        "None",
        "",
        "300.0.0.1",
        "x",
        " 198.19.0.3 ",
    ];
    let protos = ["TCP", "UDP", "SCTP", "ICMP", ""];
    let ports = ["80", "0", "70000", "-1", "65535", "53"];
    let types = [
        "ClusterIP",
        "NodePort",
        "LoadBalancer",
        "ExternalName",
        "Weird",
    ];
    let policies = ["Local", "Cluster", "Other"];
    let ep_ips = ["198.18.1.1", "198.18.1.2", "fd00::5", "bad", "198.18.1.1"];
    let nodes = ["node-a", "node-b", ""];
    let mut y = String::new();
    for s in 0..rng.next(4) {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{}, namespace: d}}\nspec:\n  type: {}\n  clusterIP: '{}'\n  externalTrafficPolicy: {}\n  internalTrafficPolicy: {}\n  externalIPs: ['{}']\n  sessionAffinity: {}\n  ports:\n",
            s % 3,
            rng.pick(&types),
            rng.pick(&ips),
            rng.pick(&policies),
            rng.pick(&policies),
            rng.pick(&ips),
            rng.pick(&["ClientIP", "None", "Sticky"]),
        ));
        for p in 0..rng.next(3) {
            y.push_str(&format!(
                "  - {{name: p{p}, port: {}, protocol: '{}', nodePort: {}}}\n",
                rng.pick(&ports),
                rng.pick(&protos),
                rng.pick(&["30000", "30001", "0", "99999"])
            ));
        }
        for slice in 0..rng.next(3) {
            y.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{}-{slice}, namespace: d, labels: {{kubernetes.io/service-name: s{}}}}}\naddressType: {}\nports: [{{name: p{}, port: {}, protocol: '{}'}}]\nendpoints:\n",
                s % 3,
                s % 3,
                rng.pick(&["IPv4", "IPv6", "FQDN"]),
                rng.next(3),
                rng.pick(&ports),
                rng.pick(&protos),
            ));
            for _ in 0..rng.next(4) {
                y.push_str(&format!(
                    "- {{addresses: ['{}'], nodeName: '{}', conditions: {{ready: {}, serving: {}, terminating: {}}}}}\n",
                    rng.pick(&ep_ips),
                    rng.pick(&nodes),
                    rng.pick(&["true", "false"]),
                    rng.pick(&["true", "false"]),
                    rng.pick(&["true", "false"]),
                ));
            }
            y.push_str("- {addresses: ['198.18.9.9']}\n");
        }
    }
    y
}

#[test]
fn arbitrary_objects_never_panic_and_output_is_stable_and_order_independent() {
    let mut rng = Lcg(42);
    for case in 0..500 {
        let yaml = arbitrary_objects(&mut rng);
        let (mut objects, mut doc_warnings) = (Objects::default(), Vec::new());
        parse_into(Path::new("p.yaml"), &yaml, &mut objects, &mut doc_warnings);
        let first = build(&objects, &cfg());
        assert_eq!(
            first,
            build(&objects, &cfg()),
            "case {case}: same input, same output"
        );
        objects.services.reverse();
        objects.endpoint_slices.reverse();
        let reversed = build(&objects, &cfg());
        assert_eq!(
            first.0.to_string(),
            reversed.0.to_string(),
            "case {case}: input order changed the model\n{yaml}"
        );
        let _ = crate::dataplane::desired(&first.0);
    }
}

#[test]
fn dump_is_canonical() {
    let (m, _) = model_of(WEB, &cfg());
    let expected = "\
shop/web:dns/UDP IPv4
  frontend ClusterIp 198.19.0.10:53
  endpoint 198.18.1.2:5353 ready=true serving=true terminating=false node=node-a (local) uses=cluster,local
  endpoint 198.18.1.3:5353 ready=false serving=true terminating=true node=- uses=-
shop/web:http/TCP IPv4
  frontend ClusterIp 198.19.0.10:80
  endpoint 198.18.1.2:8080 ready=true serving=true terminating=false node=node-a (local) uses=cluster,local
  endpoint 198.18.1.3:8080 ready=false serving=true terminating=true node=- uses=-
  endpoint 198.18.2.2:8080 ready=true serving=true terminating=false node=- uses=cluster
";
    assert_eq!(m.to_string(), expected);
}

#[test]
fn terminating_endpoints_leave_the_slots_but_stay_in_the_maps_for_their_flows() {
    let not_serving =
        "{addresses: [198.18.1.8], nodeName: node-a, conditions: {ready: false, serving: false, terminating: true}}";
    let (m, _) = model_of(
        &svc("", &[LOCAL_READY, LOCAL_TERMINATING, not_serving]),
        &cfg(),
    );
    let desired = crate::dataplane::desired(&m);
    let ip = |d: &[crate::dataplane::BackendAddr]| -> Vec<String> {
        d.iter().map(|b| b.addr.to_string()).collect()
    };
    for (fe, d) in &desired {
        assert_eq!(
            ip(&d.backends),
            ["198.18.1.1"],
            "{fe:?}: new flows, ready only"
        );
        assert_eq!(
            ip(&d.draining),
            ["198.18.1.9"],
            "{fe:?}: the serving-terminating one is kept for its flows, the other is gone"
        );
        let terminating: Vec<_> = d.terminating.iter().copied().collect();
        assert_eq!(ip(&terminating), ["198.18.1.9"]);
        assert_eq!(d.affinity, None);
    }
}

#[test]
fn client_ip_affinity_is_grouped_by_the_cluster_ip_frontend() {
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}",
            &[LOCAL_READY, REMOTE_READY],
        ),
        &cfg(),
    );
    let desired = crate::dataplane::desired(&m);
    assert!(
        desired.len() >= 3,
        "ClusterIP, NodePort internal and external"
    );
    let group = crate::dataplane::FrontendAddr::internal(
        "198.19.0.10".parse().unwrap(),
        80,
        lb_common::proto::TCP,
    );
    for (fe, d) in &desired {
        let a = d.affinity.expect("every frontend carries the affinity");
        assert_eq!(a.timeout_seconds, 600, "{fe:?}");
        assert_eq!(a.group, group, "{fe:?}");
    }
}

#[test]
fn local_only_slots_are_flagged_for_affinity() {
    use lb_common::service::SVC_FLAG_LOCAL_BACKENDS;
    let (m, _) = model_of(
        &svc(
            "  type: NodePort\n  externalTrafficPolicy: Local",
            &[LOCAL_READY, REMOTE_READY],
        ),
        &cfg(),
    );
    for (fe, d) in &crate::dataplane::desired(&m) {
        let local_only = fe.scope == lb_common::service::SCOPE_EXTERNAL;
        assert_eq!(
            d.flags & SVC_FLAG_LOCAL_BACKENDS != 0,
            local_only,
            "{fe:?}: {d:?}"
        );
    }
}

// ---- scheduler (lb.io/scheduler) ------------------------------------------------------------

fn with_scheduler(value: &str) -> String {
    svc("  type: NodePort", &[REMOTE_READY]).replacen(
        "metadata: {name: s, namespace: d}",
        &format!(
            "metadata: {{name: s, namespace: d, annotations: {{lb.io/scheduler: '{value}'}}}}"
        ),
        1,
    )
}

/// (internal entries flagged Maglev, external entries flagged Maglev) of the desired maps.
fn maglev_scopes(m: &Model) -> (Vec<bool>, Vec<bool>) {
    let desired = crate::dataplane::desired(m);
    let flagged = |scope| {
        desired
            .iter()
            .filter(|(fe, _)| fe.scope == scope)
            .map(|(_, d)| d.flags & lb_common::service::SVC_FLAG_MAGLEV != 0)
            .collect::<Vec<_>>()
    };
    (
        flagged(lb_common::service::SCOPE_INTERNAL),
        flagged(lb_common::service::SCOPE_EXTERNAL),
    )
}

#[test]
fn scheduler_defaults_to_maglev_for_external_traffic_and_random_for_pods() {
    let (m, w) = model_of(&svc("  type: NodePort", &[REMOTE_READY]), &cfg());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(v4(&m).scheduler, None);
    assert_eq!(v4(&m).scheduler_for(Origin::External), Scheduler::Maglev);
    assert_eq!(v4(&m).scheduler_for(Origin::Pod), Scheduler::Random);
    let (internal, external) = maglev_scopes(&m);
    assert_eq!(internal, [false, false], "ClusterIP and NodePort, pod side");
    assert_eq!(external, [true], "NodePort from outside");
}

#[test]
fn scheduler_annotation_applies_to_both_scopes() {
    let (m, w) = model_of(&with_scheduler("maglev"), &cfg());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(v4(&m).scheduler, Some(Scheduler::Maglev));
    assert_eq!(maglev_scopes(&m), (vec![true, true], vec![true]));

    let (m, w) = model_of(&with_scheduler("random"), &cfg());
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(maglev_scopes(&m), (vec![false, false], vec![false]));
}

#[test]
fn unknown_scheduler_is_reported_and_the_defaults_are_used() {
    let (m, w) = model_of(&with_scheduler("round-robin"), &cfg());
    assert!(
        warned(
            &w,
            "Service d/s metadata.annotations[lb.io/scheduler]: unknown scheduler \"round-robin\""
        ),
        "{w:?}"
    );
    assert_eq!(v4(&m).scheduler, None);
    assert_eq!(maglev_scopes(&m), (vec![false, false], vec![true]));
}
