use super::*;
use crate::sources::manifests::parse_into;
use std::path::Path;

fn model_of(yaml: &str, config: &Config) -> (Model, Vec<Warning>) {
    let (mut objects, mut doc_warnings) = (Objects::default(), Vec::new());
    parse_into(
        Path::new("test.yaml"),
        yaml,
        &mut objects,
        &mut doc_warnings,
    );
    assert!(doc_warnings.is_empty(), "{doc_warnings:?}");
    build(&objects, config)
}

fn cfg() -> Config {
    Config {
        node_name: "node-a".into(),
        service_proxy_name: None,
    }
}

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
fn each_port_and_protocol_is_its_own_service_port() {
    let (model, warnings) = model_of(WEB, &cfg());
    assert!(warnings.is_empty(), "{warnings:?}");
    let ids: Vec<String> = model.service_ports.keys().map(|k| k.to_string()).collect();
    assert_eq!(ids, ["shop/web:dns/UDP", "shop/web:http/TCP"]);
}

#[test]
fn slices_are_unioned_and_duplicates_count_once() {
    let (model, _) = model_of(WEB, &cfg());
    let http = model
        .service_ports
        .values()
        .find(|p| p.id.port_name == "http")
        .unwrap();
    let addrs: Vec<String> = http
        .endpoints
        .iter()
        .map(|e| format!("{}:{}", e.addr, e.port))
        .collect();
    assert_eq!(
        addrs,
        ["198.18.1.2:8080", "198.18.1.3:8080", "198.18.2.2:8080"]
    );
    assert_eq!(
        http.backends,
        vec![
            ("198.18.1.2".parse().unwrap(), 8080),
            ("198.18.2.2".parse().unwrap(), 8080)
        ],
        "only ready endpoints receive new flows while any is ready"
    );
}

#[test]
fn slice_ports_are_matched_by_name_and_protocol() {
    let (model, _) = model_of(WEB, &cfg());
    let dns = model
        .service_ports
        .values()
        .find(|p| p.id.port_name == "dns")
        .unwrap();
    assert_eq!(dns.frontends[0].port, 53);
    // Only web-1 lists the dns port.
    assert_eq!(dns.backends, vec![("198.18.1.2".parse().unwrap(), 5353)]);
}

#[test]
fn serving_terminating_endpoints_are_used_when_none_is_ready() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: s, namespace: d}
spec: {clusterIP: 198.19.0.11, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, namespace: d, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [198.18.1.2], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [198.18.1.3], conditions: {ready: false, serving: false, terminating: true}}
"#;
    let (model, _) = model_of(yaml, &cfg());
    let sp = model.service_ports.values().next().unwrap();
    assert_eq!(sp.backends, vec![("198.18.1.2".parse().unwrap(), 8080)]);
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
    let (model, warnings) = model_of(yaml, &cfg());
    assert!(model.service_ports.is_empty());
    assert!(warnings.is_empty(), "{warnings:?}");
}

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
    let (model, warnings) = model_of(yaml, &cfg());
    let text: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        text.iter()
            .any(|w| w.starts_with("Service d/bad-ip spec.clusterIP:")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|w| w.starts_with("Service d/mixed spec.ports[0].port:")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|w| w.starts_with("Service d/mixed spec.ports[1].protocol:")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|w| w.starts_with("EndpointSlice d/mixed-1 endpoints[0].addresses[0]:")),
        "{text:?}"
    );
    let ids: Vec<String> = model.service_ports.keys().map(|k| k.to_string()).collect();
    assert_eq!(ids, ["d/mixed:c/TCP"]);
    assert_eq!(
        model.service_ports.values().next().unwrap().backends.len(),
        1
    );
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
    let (model, _) = model_of(yaml, &cfg());
    let names: Vec<&str> = model
        .service_ports
        .keys()
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(names, ["plain"]);
    let named = Config {
        service_proxy_name: Some("lb".into()),
        ..cfg()
    };
    let (model, _) = model_of(yaml, &named);
    let names: Vec<&str> = model
        .service_ports
        .keys()
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(names, ["mine"]);
}

#[test]
fn dump_is_canonical() {
    let (model, _) = model_of(WEB, &cfg());
    let expected = "\
shop/web:dns/UDP
  frontend ClusterIp 198.19.0.10:53
  endpoint 198.18.1.2:5353 ready=true serving=true terminating=false node=node-a backend
  endpoint 198.18.1.3:5353 ready=false serving=true terminating=true node=- unused
shop/web:http/TCP
  frontend ClusterIp 198.19.0.10:80
  endpoint 198.18.1.2:8080 ready=true serving=true terminating=false node=node-a backend
  endpoint 198.18.1.3:8080 ready=false serving=true terminating=true node=- unused
  endpoint 198.18.2.2:8080 ready=true serving=true terminating=false node=- backend
";
    assert_eq!(model.to_string(), expected);
}
