//! The model kept up to date change by change, so that one changed object costs the work of its
//! Service, not of the whole cluster.
//!
//! A Service's ServicePorts depend on the Service, its EndpointSlices, the configuration and this
//! node's zone, and on other Services only through [`ClaimKey`]s: a NodePort or an address:port
//! that the oldest claimant gets. [`Incremental::update`] therefore recomputes:
//! - every Service whose object or one of whose slices changed (a slice that moves from one
//!   Service to another, by its label, dirties both);
//! - together with every Service that shares a claim key with those, transitively (the keys a
//!   Service would claim were it alone are a superset of those it claims among others, so the
//!   closure over them cannot miss a competitor); that group is recomputed in claim order with
//!   fresh claims, which gives exactly what [`super::build`] would give for it, since no Service
//!   outside the group asks for any of its keys;
//! - everything, when the configuration or the zone changed.
//!
//! The result is identical to [`super::build`] over the same objects; a test checks that over
//! random change sequences.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Service;

use super::{
    endpoints::slice_service,
    names, serves,
    service::{add_service, claim_order, ClaimKey, Claims},
    warn, Config, IpFamily, Model, ServicePort, ServicePortId, Warning, ZONE_LABEL,
};
use crate::sources::{Changes, Name, Store};

/// What one Service contributes (its ServicePorts themselves live in the model).
#[derive(Debug, Clone, Default)]
struct Computed {
    ports: Vec<(IpFamily, ServicePortId)>,
    warnings: Vec<Warning>,
    /// The claim keys it asks for when it is alone.
    keys: SmallSet<ClaimKey>,
}

/// A set kept as a sorted vector, allocated to its size while small. The index sets here hold
/// one or two members almost always (a Service's slices, the claimants of a key), where a
/// `BTreeSet` costs a whole B-tree node (over 500 bytes for a [`Name`]); at 10,000 Services that
/// difference was most of the model's bookkeeping memory. Iteration is in order, as a
/// `BTreeSet`'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SmallSet<T>(Vec<T>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    /// Members past which the vector grows as usual (amortised) rather than to its size.
    const EXACT_UP_TO: usize = 8;

    pub(crate) fn insert(&mut self, value: T) -> bool {
        match self.0.binary_search(&value) {
            Ok(_) => false,
            Err(at) => {
                if self.0.len() == self.0.capacity() && self.0.len() < Self::EXACT_UP_TO {
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, value);
                true
            }
        }
    }

    pub(crate) fn remove(&mut self, value: &T) -> bool {
        match self.0.binary_search(value) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<T: Ord> FromIterator<T> for SmallSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v: Vec<T> = iter.into_iter().collect();
        v.sort();
        v.dedup();
        v.shrink_to_fit();
        Self(v)
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// What an update changed.
#[derive(Debug, Default)]
pub struct Update {
    /// The ServicePorts of every recomputed Service, before...
    pub before: Vec<ServicePort>,
    /// ...and the keys of those it has now, in the model ([`changed_ports`] looks them up there).
    /// Keys rather than copies: on a full recompute copies were a second model (22 MiB at 10k
    /// Services), allocated interleaved with the model itself and so freed into holes the
    /// allocator cannot give back to the system.
    pub after: Vec<(IpFamily, ServicePortId)>,
    /// The warnings of the recomputed Services (the others' were reported when they were).
    pub warnings: Vec<Warning>,
    /// Services recomputed.
    pub recomputed: usize,
    /// Everything was recomputed (first update, configuration or zone changed).
    pub full: bool,
}

#[derive(Default)]
pub struct Incremental {
    store: Store,
    /// The configuration and zone the model was computed with (`None`: nothing computed yet).
    computed_with: Option<(Config, Option<String>)>,
    /// Served, labelled slices by the Service they name, and the reverse.
    slices_of: BTreeMap<Name, SmallSet<Name>>,
    service_of: BTreeMap<Name, Name>,
    computed: BTreeMap<Name, Computed>,
    /// Which Services ask for each claim key.
    claimants: HashMap<ClaimKey, SmallSet<Name>>,
    model: Model,
}

impl Incremental {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The objects as they are now.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Every current warning, sorted.
    pub fn warnings(&self) -> Vec<Warning> {
        let mut all: Vec<Warning> = self
            .computed
            .values()
            .flat_map(|c| c.warnings.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Applies `changes` under `config` and recomputes what they touch.
    pub fn update(&mut self, changes: &Changes, config: &Config) -> Update {
        let mut dirty: BTreeSet<Name> = changes.services.keys().cloned().collect();
        for (name, slice) in &changes.endpoint_slices {
            if let Some(old) = self.service_of.remove(name) {
                if let Some(set) = self.slices_of.get_mut(&old) {
                    set.remove(name);
                    if set.is_empty() {
                        self.slices_of.remove(&old);
                    }
                }
                dirty.insert(old);
            }
            let owner = slice
                .as_ref()
                .filter(|s| serves(s.metadata.labels.as_ref(), config))
                .and_then(|s| slice_service(s));
            if let Some(owner) = owner {
                self.slices_of
                    .entry(owner.clone())
                    .or_default()
                    .insert(name.clone());
                self.service_of.insert(name.clone(), owner.clone());
                dirty.insert(owner);
            }
        }
        self.store.apply(changes);
        let zone = config.zone.clone().or_else(|| {
            self.store
                .nodes
                .values()
                .find(|n| n.metadata.name.as_deref() == Some(config.node_name.as_str()))
                .and_then(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned())
        });
        let full = self.computed_with.as_ref() != Some(&(config.clone(), zone.clone()));
        if full {
            // Which slices a Service has depends on the proxy name the configuration serves.
            if self
                .computed_with
                .as_ref()
                .is_some_and(|(c, _)| c.service_proxy_name != config.service_proxy_name)
            {
                self.regroup_slices(config);
            }
            self.computed_with = Some((config.clone(), zone.clone()));
            let all: BTreeSet<Name> = self
                .store
                .services
                .keys()
                .chain(self.computed.keys())
                .cloned()
                .collect();
            return self.recompute(all, config, zone.as_deref(), true);
        }
        // The competitors of the dirty Services, transitively, through the keys they ask for now
        // and asked for before.
        let mut group = BTreeSet::new();
        let mut queue: Vec<Name> = dirty.into_iter().collect();
        while let Some(name) = queue.pop() {
            if !group.insert(name.clone()) {
                continue;
            }
            let mut keys: BTreeSet<ClaimKey> = self
                .computed
                .get(&name)
                .map(|c| c.keys.iter().cloned().collect())
                .unwrap_or_default();
            if let Some(svc) = self.store.services.get(&name) {
                let (alone, _) = self.compute(svc, config, zone.as_deref(), &mut Claims::default());
                keys.extend(alone.keys.0);
            }
            for key in &keys {
                for other in self.claimants.get(key).into_iter().flatten() {
                    if !group.contains(other) {
                        queue.push(other.clone());
                    }
                }
            }
        }
        self.recompute(group, config, zone.as_deref(), false)
    }

    fn regroup_slices(&mut self, config: &Config) {
        self.slices_of.clear();
        self.service_of.clear();
        for (name, slice) in &self.store.endpoint_slices {
            if !serves(slice.metadata.labels.as_ref(), config) {
                continue;
            }
            if let Some(owner) = slice_service(slice) {
                self.slices_of
                    .entry(owner.clone())
                    .or_default()
                    .insert(name.clone());
                self.service_of.insert(name.clone(), owner);
            }
        }
    }

    /// Recomputes `group` in claim order with fresh claims and replaces its contributions.
    fn recompute(
        &mut self,
        group: BTreeSet<Name>,
        config: &Config,
        zone: Option<&str>,
        full: bool,
    ) -> Update {
        let mut update = Update {
            full,
            recomputed: group.len(),
            ..Default::default()
        };
        // Out with the old.
        for name in &group {
            if let Some(old) = self.computed.remove(name) {
                for key in &old.keys {
                    if let Some(set) = self.claimants.get_mut(key) {
                        set.remove(name);
                        if set.is_empty() {
                            self.claimants.remove(key);
                        }
                    }
                }
                for key in old.ports {
                    if let Some(sp) = self.model.service_ports.remove(&key) {
                        update.before.push(sp);
                    }
                }
            }
        }
        // In with the new, oldest first.
        let mut members: Vec<(Name, std::sync::Arc<Service>)> = group
            .iter()
            .filter_map(|n| Some((n.clone(), self.store.services.get(n)?.clone())))
            .filter(|(_, s)| serves(s.metadata.labels.as_ref(), config))
            .collect();
        members.sort_by_cached_key(|(_, s)| claim_order(s));
        let mut claims = Claims::default();
        for (name, svc) in members {
            let (mut computed, ports) = self.compute(&svc, config, zone, &mut claims);
            if claims.refused {
                // What it asks for alone, for the index: here some keys were already taken.
                computed.keys = self
                    .compute(&svc, config, zone, &mut Claims::default())
                    .0
                    .keys;
                claims.refused = false;
            }
            for key in &computed.keys {
                self.claimants
                    .entry(key.clone())
                    .or_default()
                    .insert(name.clone());
            }
            for sp in ports {
                let key = (sp.family, sp.id.clone());
                update.after.push(key.clone());
                self.model.service_ports.insert(key.clone(), sp);
                computed.ports.push(key);
            }
            update.warnings.extend(computed.warnings.iter().cloned());
            // Kept until the Service is recomputed: no spare capacity (a Vec grows to 4 first).
            computed.ports.shrink_to_fit();
            self.computed.insert(name, computed);
        }
        update.warnings.sort();
        update.warnings.dedup();
        update
    }

    /// One Service's contribution and its ServicePorts, claiming from `claims`; `keys` holds
    /// what it asked for.
    fn compute(
        &self,
        svc: &Service,
        config: &Config,
        zone: Option<&str>,
        claims: &mut Claims,
    ) -> (Computed, Vec<ServicePort>) {
        let (ns, name) = names(&svc.metadata);
        let object = format!("Service {ns}/{name}");
        let mut out = Computed::default();
        if name.is_empty() {
            out.warnings
                .push(warn(&object, "metadata.name", "missing; Service skipped"));
            return (out, Vec::new());
        }
        let slices: Vec<&k8s_openapi::api::discovery::v1::EndpointSlice> = self
            .slices_of
            .get(&(ns.clone(), name.clone()))
            .into_iter()
            .flatten()
            .filter_map(|s| self.store.endpoint_slices.get(s).map(|a| &**a))
            .collect();
        let mut model = Model::default();
        claims.touched.clear();
        add_service(
            svc,
            &ns,
            &name,
            &object,
            &slices,
            config,
            zone,
            claims,
            &mut model,
            &mut out.warnings,
        );
        out.keys = claims.touched.drain(..).collect();
        (out, model.service_ports.into_values().collect())
    }
}

/// The ServicePorts of `update` by key, before and after: `(before, after)` per ServicePort that
/// changed, appeared or went away. `model` is the model the update left (for the after side).
#[allow(clippy::type_complexity)]
pub fn changed_ports<'a>(
    update: &'a Update,
    model: &'a Model,
) -> BTreeMap<(IpFamily, ServicePortId), (Option<&'a ServicePort>, Option<&'a ServicePort>)> {
    let mut out: BTreeMap<_, (Option<&ServicePort>, Option<&ServicePort>)> = BTreeMap::new();
    for sp in &update.before {
        out.entry((sp.family, sp.id.clone())).or_default().0 = Some(sp);
    }
    for key in &update.after {
        if let Some(sp) = model.service_ports.get(key) {
            out.entry(key.clone()).or_default().1 = Some(sp);
        }
    }
    out.retain(|_, (a, b)| a != b);
    out
}
