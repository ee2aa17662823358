//! The Kubernetes source against an in-process API server that speaks the real wire protocol:
//! the kube-rs watchers and reflectors that run in production are the code under test. Each
//! scenario feeds the published snapshots through the model and the real [`Writer`] into the
//! fake dataplane, as the agent's loop does, and checks what ends up programmed.
mod fake_apiserver;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use fake_apiserver::{FakeApiServer, Kind};
use lb_userspace::{
    control::Control,
    dataplane::{self, fake::FakeMaps, FrontendAddr, Writer},
    model,
    sources::{
        feed::{Feed, Snapshot},
        kube::{self, ApiConfig, KubeOptions},
    },
};
use serde_json::{json, Value};

/// Bound on every wait for convergence. Generous: after a fault kube-runtime backs off 0.8 s,
/// doubling, with jitter.
const CONVERGE: Duration = Duration::from_secs(30);
const NODE: &str = "node-a";

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default",
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "type": "ClusterIP",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn slice(name: &str, service: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| {
            json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": "node-b",
                        "targetRef": {"kind": "Pod", "name": format!("pod-{a}")}})
        })
        .collect();
    json!({
        "metadata": {"name": name, "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

fn node(name: &str, zone: &str, address: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone,
                                              "kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": address},
                                 {"type": "Hostname", "address": name}],
                   "images": [{"names": ["registry.k8s.io/pause:3.9"], "sizeBytes": 1}]}
    })
}

/// What the fake maps hold, readable: `"198.19.0.10:80/6" -> ["198.18.1.1:8080", ...]`.
type Programmed = BTreeMap<String, Vec<String>>;

fn programmed(maps: &FakeMaps) -> Programmed {
    let mut out = Programmed::new();
    for (key, master) in maps.services.iter().filter(|(k, _)| k.slot == 0) {
        let fe = FrontendAddr::from_key(key);
        let mut backends: Vec<String> = (1..=master.count)
            .map(|slot| {
                let id = maps.services[&lb_common::ServiceKey { slot, ..*key }].backend_id;
                let b = dataplane::BackendAddr::from_value(&maps.backends[&id]);
                format!("{}:{}", b.addr, b.port)
            })
            .collect();
        backends.sort();
        out.insert(format!("{}:{}/{}", fe.addr, fe.port, fe.proto), backends);
    }
    out
}

fn want(entries: &[(&str, &[&str])]) -> Programmed {
    entries
        .iter()
        .map(|(vip, backends)| {
            (
                format!("{vip}:80/6"),
                backends.iter().map(|b| format!("{b}:8080")).collect(),
            )
        })
        .collect()
}

/// The agent's loop, with the fake dataplane: take the newest snapshot and run the agent's own
/// pipeline ([`Control`]) on it.
struct Agent {
    feed: Feed,
    control: Control,
    maps: FakeMaps,
    applies: usize,
    last: Option<Snapshot>,
    /// Services per applied snapshot, to show no snapshot ever lost the state.
    services_per_apply: Vec<usize>,
}

impl Agent {
    fn start(server: &FakeApiServer, maps: FakeMaps) -> Self {
        let feed = kube::start(
            ApiConfig::Given(Box::new(server.kube_config())),
            KubeOptions::new(NODE),
        )
        .expect("starting the Kubernetes source against the fake API server");
        let writer = Writer::adopt(&maps).expect("adopting the fake maps");
        Self {
            feed,
            control: Control::new(writer),
            maps,
            applies: 0,
            last: None,
            services_per_apply: Vec::new(),
        }
    }

    /// Applies the next snapshot if one comes within `timeout`; false if none came.
    fn apply_next(&mut self, timeout: Duration) -> bool {
        let Some(snapshot) = self
            .feed
            .next(timeout)
            .expect("the Kubernetes source stopped")
        else {
            return false;
        };
        let config = model::Config {
            node_name: NODE.into(),
            node_addresses: snapshot.node_addresses.clone().unwrap_or_default(),
            ..Default::default()
        };
        self.control
            .sync(&snapshot.changes, &config, &mut self.maps)
            .result
            .expect("applying to the fake maps");
        // The incremental model is the one a full rebuild from the same objects gives.
        let store = self.control.incremental().store();
        let (rebuilt, _) = model::build(&store.objects(), &config);
        assert_eq!(*self.control.model(), rebuilt);
        assert_eq!(*self.control.desired(), dataplane::desired(&rebuilt));
        self.applies += 1;
        self.services_per_apply.push(store.services.len());
        self.last = Some(snapshot);
        true
    }

    /// Applies snapshots until the maps hold `want`, or fails naming `what`.
    fn converge(&mut self, want: &Programmed, what: &str) {
        let deadline = Instant::now() + CONVERGE;
        while programmed(&self.maps) != *want {
            let now = Instant::now();
            assert!(
                now < deadline,
                "{what}: not converged after {CONVERGE:?}\n  programmed: {:?}\n  wanted:     {want:?}",
                programmed(&self.maps)
            );
            self.apply_next(deadline - now);
        }
    }
}

fn seeded_server() -> FakeApiServer {
    let server = FakeApiServer::start();
    server.apply(Kind::Node, node(NODE, "zone-1", "192.0.2.10"));
    server.apply(Kind::Node, node("node-b", "zone-2", "192.0.2.11"));
    server.apply(Kind::Service, service("web", "198.19.0.10"));
    server.apply(Kind::EndpointSlice, slice("web-1", "web", &["198.18.1.1"]));
    server
}

fn lists_of(requests: &[fake_apiserver::Request], kind: Kind) -> usize {
    requests
        .iter()
        .filter(|r| r.kind == Some(kind) && !r.watch && !r.refused)
        .count()
}

#[test]
fn services_and_slices_created_updated_and_deleted_converge() {
    let server = seeded_server();
    let mut agent = Agent::start(&server, FakeMaps::default());
    agent.converge(&want(&[("198.19.0.10", &["198.18.1.1"])]), "initial sync");

    // The snapshots carry the trimmed objects and this node's facts.
    let snapshot = agent.last.clone().unwrap();
    let objects = agent.control.incremental().store().objects();
    assert_eq!(
        snapshot.node_addresses,
        Some(vec!["192.0.2.10".parse().unwrap()]),
        "the Node's InternalIP becomes the node address"
    );
    assert_eq!(objects.nodes.len(), 1, "only our own Node is watched");
    let own = &objects.nodes[0];
    assert_eq!(
        own.metadata
            .labels
            .as_ref()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        vec!["topology.kubernetes.io/zone"]
    );
    assert!(own.spec.is_none() && own.status.as_ref().unwrap().images.is_none());
    let svc = &objects.services[0];
    assert!(svc.metadata.annotations.is_none() && svc.metadata.managed_fields.is_none());
    assert!(objects.endpoint_slices[0].endpoints[0].target_ref.is_none());

    server.apply(
        Kind::EndpointSlice,
        slice("web-1", "web", &["198.18.1.1", "198.18.1.2"]),
    );
    agent.converge(
        &want(&[("198.19.0.10", &["198.18.1.1", "198.18.1.2"])]),
        "slice update",
    );

    server.apply(Kind::Service, service("api", "198.19.0.20"));
    server.apply(Kind::EndpointSlice, slice("api-1", "api", &["198.18.2.1"]));
    agent.converge(
        &want(&[
            ("198.19.0.10", &["198.18.1.1", "198.18.1.2"]),
            ("198.19.0.20", &["198.18.2.1"]),
        ]),
        "second service",
    );

    server.delete(Kind::EndpointSlice, "default", "api-1");
    agent.converge(
        &want(&[
            ("198.19.0.10", &["198.18.1.1", "198.18.1.2"]),
            ("198.19.0.20", &[]),
        ]),
        "slice deleted: the frontend stays, with no backends",
    );

    server.delete(Kind::Service, "default", "web");
    server.bookmark();
    agent.converge(&want(&[("198.19.0.20", &[])]), "service deleted");
}

#[test]
fn watch_cut_mid_stream_resumes_and_converges() {
    let server = seeded_server();
    let mut agent = Agent::start(&server, FakeMaps::default());
    agent.converge(&want(&[("198.19.0.10", &["198.18.1.1"])]), "initial sync");

    for round in 0..3 {
        let watches_before = server.requests().iter().filter(|r| r.watch).count();
        server.cut_watches();
        // Changes made while the watches are down must arrive through the resumed watch.
        let backend = format!("198.18.1.{}", 10 + round);
        server.apply(Kind::EndpointSlice, slice("web-1", "web", &[&backend]));
        server.wait_for_requests("three new watches after the cut", CONVERGE, |r| {
            r.iter().filter(|r| r.watch).count() >= watches_before + 3
        });
        agent.converge(
            &want(&[("198.19.0.10", &[backend.as_str()])]),
            &format!("after cut {round}"),
        );
    }
    assert!(
        agent.services_per_apply.iter().all(|n| *n == 1),
        "a snapshot lost the service during a cut: {:?}",
        agent.services_per_apply
    );
}

#[test]
fn expired_resource_version_relists_and_converges() {
    let server = seeded_server();
    server.apply(Kind::Service, service("old", "198.19.0.30"));
    let mut agent = Agent::start(&server, FakeMaps::default());
    agent.converge(
        &want(&[("198.19.0.10", &["198.18.1.1"]), ("198.19.0.30", &[])]),
        "initial sync",
    );
    let lists_before = lists_of(&server.requests(), Kind::Service);

    // Cut the watches, change things (a delete among them) and forget the history: resuming
    // gets 410 Gone, and only a relist can see that "old" was deleted.
    // No list can happen before the history expires: only a 410 makes the watcher relist.
    let requests_at_expiry = server.requests().len();
    server.cut_watches();
    server.delete(Kind::Service, "default", "old");
    server.apply(Kind::EndpointSlice, slice("web-1", "web", &["198.18.1.7"]));
    server.expire_history();

    agent.converge(&want(&[("198.19.0.10", &["198.18.1.7"])]), "after 410 Gone");
    // Whether a watch resumed before the expiry (and got 410 on its open stream) or after (and
    // got it on resuming), every kind must relist.
    server.wait_for_gone_sent(3, CONVERGE);
    server.wait_for_requests("a relist of Services after 410 Gone", CONVERGE, |r| {
        lists_of(r, Kind::Service) > lists_before
    });

    // And once more while the watches are open: 410 as an ERROR event on a live stream. First
    // wait until every kind watches again (some may still be backing off from the first 410).
    server.wait_for_requests("every kind relisted and watching again", CONVERGE, |r| {
        [Kind::Service, Kind::EndpointSlice, Kind::Node]
            .iter()
            .all(|k| {
                let mine: Vec<_> = r[requests_at_expiry..]
                    .iter()
                    .filter(|r| r.kind == Some(*k))
                    .collect();
                mine.iter()
                    .position(|r| !r.watch)
                    .is_some_and(|list| mine[list..].iter().any(|r| r.watch))
            })
    });
    let gone_before = server.gone_sent();
    server.apply(Kind::EndpointSlice, slice("web-1", "web", &["198.18.1.8"]));
    server.expire_history();
    server.apply(Kind::EndpointSlice, slice("web-1", "web", &["198.18.1.9"]));
    agent.converge(
        &want(&[("198.19.0.10", &["198.18.1.9"])]),
        "after 410 on open watches",
    );
    server.wait_for_gone_sent(gone_before + 3, CONVERGE);
    assert!(
        agent.services_per_apply.iter().all(|n| *n >= 1),
        "a relist published a partial state: {:?}",
        agent.services_per_apply
    );
}

#[test]
fn api_outage_keeps_the_last_state_and_converges_after() {
    let server = seeded_server();
    let mut agent = Agent::start(&server, FakeMaps::default());
    agent.converge(&want(&[("198.19.0.10", &["198.18.1.1"])]), "initial sync");
    let before = programmed(&agent.maps);

    server.set_unavailable(true);
    // Wait until the reconnects have been refused a few times (with backoff between them).
    server.wait_for_requests("three refused reconnects", CONVERGE, |r| {
        r.iter().filter(|r| r.refused).count() >= 3
    });
    // Whatever the source did meanwhile, the programmed state is unchanged.
    while agent.apply_next(Duration::from_millis(10)) {}
    assert_eq!(
        programmed(&agent.maps),
        before,
        "the outage changed the maps"
    );

    server.apply(Kind::Service, service("api", "198.19.0.20"));
    server.apply(Kind::EndpointSlice, slice("api-1", "api", &["198.18.2.1"]));
    server.set_unavailable(false);
    agent.converge(
        &want(&[
            ("198.19.0.10", &["198.18.1.1"]),
            ("198.19.0.20", &["198.18.2.1"]),
        ]),
        "after the outage",
    );
    assert!(
        agent.services_per_apply.iter().all(|n| *n >= 1),
        "an empty snapshot was applied: {:?}",
        agent.services_per_apply
    );
}

#[test]
fn restart_against_changed_server_removes_nothing_before_the_first_full_sync() {
    let server = seeded_server();
    server.apply(Kind::Service, service("gone", "198.19.0.40"));
    server.apply(
        Kind::EndpointSlice,
        slice("gone-1", "gone", &["198.18.4.1"]),
    );
    let mut first = Agent::start(&server, FakeMaps::default());
    let initial = want(&[
        ("198.19.0.10", &["198.18.1.1"]),
        ("198.19.0.40", &["198.18.4.1"]),
    ]);
    first.converge(&initial, "first agent");
    // The agent stops; the maps (pinned, in the real thing) stay.
    let maps = std::mem::take(&mut first.maps);
    drop(first);

    // While it is down: one service goes, another comes, a slice changes.
    server.delete(Kind::EndpointSlice, "default", "gone-1");
    server.delete(Kind::Service, "default", "gone");
    server.apply(Kind::Service, service("new", "198.19.0.50"));
    server.apply(Kind::EndpointSlice, slice("new-1", "new", &["198.18.5.1"]));
    server.apply(Kind::EndpointSlice, slice("web-1", "web", &["198.18.1.3"]));

    // Services and slices list at once; the Node list hangs. Not every kind has synced, so
    // nothing may be applied: not even the new Services (a partial view is never published).
    server.hold_lists(Kind::Node);
    let mut second = Agent::start(&server, maps);
    assert_eq!(
        programmed(&second.maps),
        initial,
        "adopting changed the maps"
    );
    server.wait_for_requests(
        "Services and EndpointSlices listed and watched",
        CONVERGE,
        |r| {
            [Kind::Service, Kind::EndpointSlice]
                .iter()
                .all(|k| r.iter().any(|r| r.kind == Some(*k) && r.watch))
        },
    );
    assert!(
        !second.apply_next(Duration::from_millis(500)),
        "a snapshot was published before the Node list completed"
    );
    assert_eq!(
        programmed(&second.maps),
        initial,
        "state was removed before the first full sync"
    );

    server.release(Kind::Node);
    second.converge(
        &want(&[
            ("198.19.0.10", &["198.18.1.3"]),
            ("198.19.0.50", &["198.18.5.1"]),
        ]),
        "restarted agent after its first full sync",
    );
    assert_eq!(second.applies, 1, "one full snapshot, one apply");
}

#[test]
fn burst_of_10000_changes_is_coalesced_into_few_applies() {
    let server = seeded_server();
    for i in 0..100 {
        server.apply(
            Kind::Service,
            service(&format!("svc-{i}"), &format!("198.19.1.{i}")),
        );
    }
    let mut agent = Agent::start(&server, FakeMaps::default());
    let mut expected = want(&[("198.19.0.10", &["198.18.1.1"])]);
    for i in 0..100 {
        expected.insert(format!("198.19.1.{i}:80/6"), Vec::new());
    }
    agent.converge(&expected, "initial sync of 101 services");
    let applies_before = agent.applies;

    // 10,000 slice changes across the 100 services, as fast as the server takes them: each
    // service's slice is rewritten 100 times; the last write names backend 198.18.200.<i>.
    let started = Instant::now();
    for round in 0..100u32 {
        for i in 0..100u32 {
            let backend = if round == 99 {
                format!("198.18.200.{i}")
            } else {
                format!("198.18.{round}.{i}")
            };
            server.apply(
                Kind::EndpointSlice,
                slice(&format!("svc-{i}-1"), &format!("svc-{i}"), &[&backend]),
            );
        }
    }
    for i in 0..100 {
        expected.insert(
            format!("198.19.1.{i}:80/6"),
            vec![format!("198.18.200.{i}:8080")],
        );
    }
    agent.converge(&expected, "after the burst");
    let applies = agent.applies - applies_before;
    eprintln!(
        "10000 changes: {applies} applies, converged in {:?}",
        started.elapsed()
    );
    assert!(
        applies < 20,
        "10000 changes took {applies} applies; the source should coalesce them"
    );
}

#[test]
fn kubeconfig_file_reaches_the_server() {
    let server = seeded_server();
    let dir = std::env::temp_dir().join(format!("lb-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config");
    std::fs::write(&path, server.kubeconfig_yaml()).unwrap();
    let feed = kube::start(ApiConfig::Kubeconfig(path), KubeOptions::new(NODE))
        .expect("starting from a kubeconfig file");
    let snapshot = feed
        .next(CONVERGE)
        .expect("source stopped")
        .expect("no snapshot within the wait through --kubeconfig");
    assert_eq!(snapshot.changes.services.len(), 1);
    drop(feed);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreadable_kubeconfig_fails_the_start_with_its_path() {
    let err = match kube::start(
        ApiConfig::Kubeconfig("/nonexistent/lb-kubeconfig".into()),
        KubeOptions::new(NODE),
    ) {
        Ok(_) => panic!("a missing kubeconfig was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("/nonexistent/lb-kubeconfig"), "{err}");
}
