//! healthCheckNodePort servers end to end: a LoadBalancer Service with
//! externalTrafficPolicy=Local in the manifests makes the agent answer on its healthCheckNodePort
//! as kube-proxy does, from a client in another namespace; the count follows the EndpointSlice,
//! and the listener goes away with the Service.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{OneNode, NODE_NAME},
    http_get, HttpResponse, POD_GATEWAY,
};

const HC_PORT: u16 = 32100;
const TIMEOUT: Duration = Duration::from_secs(2);

/// `web/front`, a LoadBalancer with eTP=Local; `local` endpoints on this node, one elsewhere.
fn manifests(local: &[Ipv4Addr]) -> String {
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: front, namespace: web}}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.30
  externalTrafficPolicy: Local
  healthCheckNodePort: {HC_PORT}
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 31080}}
status: {{loadBalancer: {{ingress: [{{ip: 198.19.5.1}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: front-1
  namespace: web
  labels: {{kubernetes.io/service-name: front}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
- {{addresses: [198.18.9.9], conditions: {{ready: true}}, nodeName: node-2}}
"
    );
    for ip in local {
        yaml.push_str(&format!(
            "- {{addresses: [{ip}], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}\n"
        ));
    }
    yaml
}

/// Polls the health check from the client pod (through its gateway, which is the node) until
/// `accept` holds.
fn wait_for(bed: &OneNode, what: &str, accept: impl Fn(&anyhow::Result<HttpResponse>) -> bool) {
    let to = SocketAddrV4::new(POD_GATEWAY, HC_PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = http_get(&bed.client.ns, to, "/healthz", TIMEOUT);
        if accept(&got) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last answer {got:?}\nagent log:\n{}",
            bed.agent.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn local_endpoints(r: &HttpResponse) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(v["service"]["namespace"], "web");
    assert_eq!(v["service"]["name"], "front");
    assert_eq!(v["serviceProxyHealthy"], true);
    v["localEndpoints"].as_u64().unwrap()
}

#[test]
fn health_check_node_port_answers_like_kube_proxy_and_follows_the_endpoints() {
    let local = [Ipv4Addr::new(198, 18, 2, 1), Ipv4Addr::new(198, 18, 2, 2)];
    let bed = OneNode::start(
        "hcnp",
        &[("be-1", local[0]), ("be-2", local[1])],
        8080,
        &manifests(&local),
    )
    .unwrap();

    wait_for(&bed, "two local endpoints", |r| {
        r.as_ref()
            .is_ok_and(|r| r.status == 200 && local_endpoints(r) == 2)
    });
    let r = http_get(
        &bed.client.ns,
        SocketAddrV4::new(POD_GATEWAY, HC_PORT),
        "/",
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));

    bed.write_manifests(&manifests(&local[..1])).unwrap();
    wait_for(&bed, "one local endpoint", |r| {
        r.as_ref()
            .is_ok_and(|r| r.status == 200 && local_endpoints(r) == 1)
    });

    // Only the remote endpoint left: 503, count 0 (the load balancer skips this node).
    bed.write_manifests(&manifests(&[])).unwrap();
    wait_for(&bed, "no local endpoint", |r| {
        r.as_ref()
            .is_ok_and(|r| r.status == 503 && local_endpoints(r) == 0)
    });

    // The Service is gone: so is the listener.
    bed.write_manifests("").unwrap();
    wait_for(&bed, "listener closed", |r| r.is_err());
    assert!(
        bed.agent
            .logs()
            .contains("closing healthCheckNodePort listener"),
        "{}",
        bed.agent.logs()
    );
}
