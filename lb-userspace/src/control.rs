//! The control loop's pipeline, from a source's changes to the maps: the incremental model,
//! the desired frontends, and the writer. The agent runs it for every snapshot; tests run the
//! same code against the fake dataplane.
//!
//! Work per sync is in proportion to what changed: the model recomputes the Services the changes
//! touch, only their frontends are translated, and only frontends whose desired content differs
//! reach the writer. A full apply of everything happens once at start (the writer adopts the
//! maps and reconciles them) and after a failed map operation.
use std::collections::BTreeMap;

use crate::{
    dataplane::{
        self, ApplyStats, Dataplane, Desired, DesiredFrontend, FrontendAddr, Result, Writer,
    },
    model::{
        incremental::{changed_ports, Incremental},
        Config, Model, Warning,
    },
    sources::Changes,
};

pub struct Control {
    model: Incremental,
    desired: Desired,
    writer: Writer,
}

/// What one sync did.
#[derive(Debug)]
pub struct Synced {
    /// Services the model recomputed, and whether that was all of them.
    pub recomputed: usize,
    pub full_model: bool,
    /// The writer wrote everything (first sync, or after a failure) rather than the changes.
    pub full_apply: bool,
    /// Warnings of the recomputed Services.
    pub warnings: Vec<Warning>,
    /// Desired frontends that changed: before and after.
    pub frontend_changes:
        BTreeMap<FrontendAddr, (Option<DesiredFrontend>, Option<DesiredFrontend>)>,
    /// The map writes; an error leaves the writer needing a full apply, which the next sync does.
    pub result: Result<ApplyStats>,
}

impl Control {
    pub fn new(writer: Writer) -> Self {
        Self {
            model: Incremental::new(),
            desired: Desired::new(),
            writer,
        }
    }

    pub fn model(&self) -> &Model {
        self.model.model()
    }

    pub fn incremental(&self) -> &Incremental {
        &self.model
    }

    /// Every desired frontend.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Folds `changes` into the model and programs the difference. With no changes it still
    /// retries a full apply the writer needs.
    pub fn sync(&mut self, changes: &Changes, config: &Config, dp: &mut impl Dataplane) -> Synced {
        let update = self.model.update(changes, config);
        let delta =
            dataplane::desired_changes(changed_ports(&update, self.model.model()).into_values());
        let mut frontend_changes = BTreeMap::new();
        for (fe, want) in &delta {
            let before = match want {
                Some(d) => self.desired.insert(*fe, d.clone()),
                None => self.desired.remove(fe),
            };
            frontend_changes.insert(*fe, (before, want.clone()));
        }
        let full_apply = self.writer.needs_full_apply();
        let result = if full_apply {
            self.writer.apply(dp, &self.desired)
        } else {
            self.writer.apply_changes(dp, &delta)
        };
        Synced {
            recomputed: update.recomputed,
            full_model: update.full,
            full_apply,
            warnings: update.warnings,
            frontend_changes,
            result,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path, sync::Arc};

    use lb_common::service::BACKEND_FLAG_TERMINATING;

    use super::*;
    use crate::{
        dataplane::{fake::FakeMaps, BackendAddr},
        model,
        sources::{manifests::parse_into, Name, Objects, Store},
    };

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    fn parse(yaml: &str) -> Objects {
        let (mut objects, mut warnings) = (Objects::default(), Vec::new());
        parse_into(Path::new("gen.yaml"), yaml, &mut objects, &mut warnings);
        assert!(warnings.is_empty(), "{warnings:?}\n{yaml}");
        objects
    }

    /// A random version of Service `svc-i`: few addresses and NodePorts, so that Services
    /// compete for them; creation times that tie or not; sometimes another proxy's.
    fn random_service(rng: &mut Rng, i: usize) -> Arc<k8s_openapi::api::core::v1::Service> {
        let ip = rng.pick(&["198.19.0.1", "198.19.0.2", "198.19.0.3", "198.19.0.4"]);
        let created = rng.pick(&["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"]);
        let label = if rng.below(8) == 0 {
            ", labels: {service.kubernetes.io/service-proxy-name: other}"
        } else {
            ""
        };
        let (kind, node_port) = match rng.below(3) {
            0 => ("ClusterIP", String::new()),
            1 => (
                "NodePort",
                format!(", nodePort: {}", rng.pick(&[30001, 30002])),
            ),
            _ => (
                "LoadBalancer",
                format!(", nodePort: {}", rng.pick(&[30001, 30003])),
            ),
        };
        let policy = rng.pick(&["Cluster", "Local"]);
        let affinity = if rng.below(3) == 0 {
            "ClientIP"
        } else {
            "None"
        };
        let udp = if rng.below(3) == 0 {
            "\n  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}"
        } else {
            ""
        };
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: d, creationTimestamp: \"{created}\"{label}}}\nspec:\n  type: {kind}\n  clusterIP: {ip}\n  externalTrafficPolicy: {policy}\n  sessionAffinity: {affinity}\n  ports:\n  - {{name: web, port: 80, protocol: TCP, targetPort: 8080{node_port}}}{udp}\n"
        );
        Arc::new(parse(&yaml).services.remove(0))
    }

    /// A random version of slice `slice-j`, labelled for one of the Services.
    fn random_slice(
        rng: &mut Rng,
        j: usize,
        services: usize,
    ) -> Arc<k8s_openapi::api::discovery::v1::EndpointSlice> {
        let owner = rng.below(services);
        let mut endpoints = String::new();
        for _ in 0..rng.below(4) {
            let addr = rng.pick(&["198.18.1.1", "198.18.1.2", "198.18.2.1", "198.18.2.2"]);
            let node = rng.pick(&["node-a", "node-b"]);
            let (ready, serving, terminating) = *rng.pick(&[
                (true, true, false),
                (false, true, true),
                (false, false, true),
            ]);
            let zone = rng.pick(&["z1", "z2"]);
            endpoints.push_str(&format!(
                "- {{addresses: [{addr}], nodeName: {node}, conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}, hints: {{forZones: [{{name: {zone}}}]}}}}\n"
            ));
        }
        let endpoints = if endpoints.is_empty() {
            "endpoints: []\n".to_string()
        } else {
            format!("endpoints:\n{endpoints}")
        };
        let yaml = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: slice-{j}, namespace: d, labels: {{kubernetes.io/service-name: svc-{owner}}}}}\naddressType: IPv4\nports: [{{name: web, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]\n{endpoints}"
        );
        Arc::new(parse(&yaml).endpoint_slices.remove(0))
    }

    fn random_node(rng: &mut Rng) -> Arc<k8s_openapi::api::core::v1::Node> {
        let zone = rng.pick(&["z1", "z2"]);
        let yaml = format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n"
        );
        Arc::new(parse(&yaml).nodes.remove(0))
    }

    fn key(name: String) -> Name {
        ("d".into(), name)
    }

    /// The maps hold exactly `desired`: every frontend with its backends in slot order and its
    /// flags, every backend some frontend uses (flagged terminating when one says so), nothing
    /// else.
    fn assert_maps_hold(maps: &FakeMaps, desired: &Desired) {
        let masters: BTreeSet<FrontendAddr> = maps
            .services
            .keys()
            .filter(|k| k.slot == 0)
            .map(FrontendAddr::from_key)
            .collect();
        assert_eq!(
            masters,
            desired.keys().copied().collect(),
            "frontends in the maps"
        );
        let mut used = BTreeSet::new();
        let mut terminating = BTreeSet::new();
        for (fe, want) in desired {
            let master = maps.services[&fe.key(0)];
            assert_eq!(master.flags, want.flags, "{fe:?}");
            let slots: Vec<BackendAddr> = (1..=master.count)
                .map(|s| {
                    BackendAddr::from_value(&maps.backends[&maps.services[&fe.key(s)].backend_id])
                })
                .collect();
            assert_eq!(slots, want.backends, "{fe:?}");
            used.extend(want.backends.iter().chain(&want.draining).copied());
            terminating.extend(want.terminating.iter().copied());
        }
        assert_eq!(
            maps.services.keys().filter(|k| k.slot != 0).count(),
            desired.values().map(|d| d.backends.len()).sum::<usize>(),
            "no stray slots"
        );
        let in_maps: BTreeSet<BackendAddr> = maps
            .backends
            .values()
            .map(BackendAddr::from_value)
            .collect();
        assert_eq!(in_maps, used, "backends in the maps");
        for v in maps.backends.values() {
            let b = BackendAddr::from_value(v);
            assert_eq!(
                v.flags & BACKEND_FLAG_TERMINATING != 0,
                terminating.contains(&b),
                "{b:?}"
            );
        }
    }

    #[test]
    fn random_changes_give_what_a_full_rebuild_gives_in_the_model_and_in_the_maps() {
        const SERVICES: usize = 6;
        const SLICES: usize = 8;
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut config = Config {
            node_name: "node-a".into(),
            node_addresses: vec!["198.18.0.2".parse().unwrap()],
            ..Default::default()
        };
        let mut maps = FakeMaps::default();
        let mut control = Control::new(Writer::adopt(&maps).unwrap());
        let mut store = Store::default();
        let (mut partial_syncs, mut recomputed, mut conflicts) = (0, 0, 0);
        for step in 0..600 {
            let mut changes = Changes::default();
            for _ in 0..1 + rng.below(3) {
                match rng.below(10) {
                    0..=3 => {
                        let i = rng.below(SERVICES);
                        let obj = (rng.below(5) != 0).then(|| random_service(&mut rng, i));
                        changes.services.insert(key(format!("svc-{i}")), obj);
                    }
                    4..=8 => {
                        let j = rng.below(SLICES);
                        let obj = (rng.below(5) != 0).then(|| random_slice(&mut rng, j, SERVICES));
                        changes
                            .endpoint_slices
                            .insert(key(format!("slice-{j}")), obj);
                    }
                    _ => {
                        let obj = (rng.below(3) != 0).then(|| random_node(&mut rng));
                        changes.nodes.insert((String::new(), "node-a".into()), obj);
                    }
                }
            }
            if rng.below(40) == 0 {
                config.node_addresses = vec![if step % 2 == 0 {
                    "198.18.0.2".parse().unwrap()
                } else {
                    "198.18.0.3".parse().unwrap()
                }];
            }
            store.apply(&changes);
            let synced = control.sync(&changes, &config, &mut maps);
            synced.result.expect("applying to the fake maps");
            if !synced.full_apply {
                partial_syncs += 1;
                recomputed += synced.recomputed;
            }
            let (want, warnings) = model::build(&store.objects(), &config);
            conflicts += warnings
                .iter()
                .filter(|w| w.message.contains("already used by"))
                .count();
            assert_eq!(*control.model(), want, "step {step}: model");
            assert_eq!(
                control.incremental().warnings(),
                warnings,
                "step {step}: warnings"
            );
            let desired = dataplane::desired(&want);
            assert_eq!(*control.desired(), desired, "step {step}: desired");
            assert_maps_hold(&maps, &desired);
        }
        assert!(partial_syncs > 500, "{partial_syncs}");
        assert!(
            conflicts > 50,
            "the generator must produce conflicts: {conflicts}"
        );
        assert!(
            recomputed < partial_syncs * SERVICES,
            "changes should not recompute everything: {recomputed} over {partial_syncs} syncs"
        );
    }

    #[test]
    fn a_failed_apply_is_followed_by_a_full_one() {
        let mut rng = Rng(7);
        let config = Config {
            node_name: "node-a".into(),
            ..Default::default()
        };
        let mut maps = FakeMaps::default();
        let mut control = Control::new(Writer::adopt(&maps).unwrap());
        let mut changes = Changes::default();
        changes
            .services
            .insert(key("svc-0".into()), Some(random_service(&mut rng, 0)));
        let mut slice = random_slice(&mut rng, 0, 1);
        while slice.endpoints.is_empty() {
            slice = random_slice(&mut rng, 0, 1);
        }
        changes
            .endpoint_slices
            .insert(key("slice-0".into()), Some(slice));
        assert!(control.sync(&changes, &config, &mut maps).full_apply);
        // The next change hits a broken map: the writer re-adopts and wants a full apply.
        let mut broken = maps.clone();
        broken.fail_writes = true;
        let mut more = Changes::default();
        more.services
            .insert(key("svc-1".into()), Some(random_service(&mut rng, 1)));
        let failed = control.sync(&more, &config, &mut broken);
        assert!(failed.result.is_err());
        broken.fail_writes = false;
        let retried = control.sync(&Changes::default(), &config, &mut broken);
        assert!(retried.full_apply && retried.result.is_ok());
        assert_maps_hold(&broken, control.desired());
    }
}
