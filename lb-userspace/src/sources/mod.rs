//! Where Services and EndpointSlices come from. Every source publishes [`Changes`]: the objects
//! that were added, modified or deleted since its previous publication (its first publication
//! names every object). The agent keeps the objects and recomputes only what the changed ones
//! touch; [`Store`] applies changes for code that wants the whole set as [`Objects`].
pub mod feed;
mod inotify;
pub mod kube;
pub mod manifests;

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// All the objects the model reads, as one set (for the reference model and tests).
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Node objects; the model reads the zone label of its own.
    pub nodes: Vec<Node>,
}

/// `(namespace, name)`; cluster-scoped objects (Nodes) have an empty namespace. A missing
/// namespace on a namespaced object means `default`, as kubectl has it.
pub type Name = (String, String);

/// The key of an object: what two versions of "the same object" share.
pub fn name_of(meta: &ObjectMeta, namespaced: bool) -> Name {
    let namespace = match (namespaced, &meta.namespace) {
        (false, _) => String::new(),
        (true, Some(ns)) => ns.clone(),
        (true, None) => "default".to_string(),
    };
    (namespace, meta.name.clone().unwrap_or_default())
}

/// Objects added or modified (`Some`) and deleted (`None`) since a source's previous publication.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    pub services: BTreeMap<Name, Option<Arc<Service>>>,
    pub endpoint_slices: BTreeMap<Name, Option<Arc<EndpointSlice>>>,
    pub nodes: BTreeMap<Name, Option<Arc<Node>>>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoint_slices.is_empty() && self.nodes.is_empty()
    }

    /// Number of objects named.
    pub fn len(&self) -> usize {
        self.services.len() + self.endpoint_slices.len() + self.nodes.len()
    }

    /// Folds `later` into `self`: for an object named in both, the later state wins.
    pub fn merge(&mut self, later: Changes) {
        self.services.extend(later.services);
        self.endpoint_slices.extend(later.endpoint_slices);
        self.nodes.extend(later.nodes);
    }

    /// Every object of `objects`, as the changes from nothing to them. A name given twice keeps
    /// the first object, as the model does.
    pub fn from_objects(objects: Objects) -> Changes {
        fn add<K>(out: &mut BTreeMap<Name, Option<Arc<K>>>, name: Name, obj: K) {
            out.entry(name).or_insert_with(|| Some(Arc::new(obj)));
        }
        let mut c = Changes::default();
        for s in objects.services {
            add(&mut c.services, name_of(&s.metadata, true), s);
        }
        for s in objects.endpoint_slices {
            add(&mut c.endpoint_slices, name_of(&s.metadata, true), s);
        }
        for n in objects.nodes {
            add(&mut c.nodes, name_of(&n.metadata, false), n);
        }
        c
    }
}

/// Records in `out` how `now` differs from `prev`, and makes `prev` equal to `now`. An object
/// counts as unchanged when it is the same allocation or carries the same non-empty
/// resourceVersion (a relist hands out new allocations of unchanged objects).
pub(crate) fn diff_into<K: k8s_openapi::Metadata<Ty = ObjectMeta>>(
    prev: &mut BTreeMap<Name, Arc<K>>,
    now: BTreeMap<Name, Arc<K>>,
    out: &mut BTreeMap<Name, Option<Arc<K>>>,
) {
    for name in prev.keys() {
        if !now.contains_key(name) {
            out.insert(name.clone(), None);
        }
    }
    for (name, new) in &now {
        let same = prev.get(name).is_some_and(|old| {
            Arc::ptr_eq(old, new) || {
                let (a, b) = (
                    &old.metadata().resource_version,
                    &new.metadata().resource_version,
                );
                a.is_some() && a == b
            }
        });
        if !same {
            out.insert(name.clone(), Some(Arc::clone(new)));
        }
    }
    *prev = now;
}

/// The current objects, kept by applying [`Changes`].
#[derive(Debug, Clone, Default)]
pub struct Store {
    pub services: BTreeMap<Name, Arc<Service>>,
    pub endpoint_slices: BTreeMap<Name, Arc<EndpointSlice>>,
    pub nodes: BTreeMap<Name, Arc<Node>>,
}

impl Store {
    pub fn apply(&mut self, changes: &Changes) {
        fn apply<K>(map: &mut BTreeMap<Name, Arc<K>>, changes: &BTreeMap<Name, Option<Arc<K>>>) {
            for (name, obj) in changes {
                match obj {
                    Some(o) => map.insert(name.clone(), Arc::clone(o)),
                    None => map.remove(name),
                };
            }
        }
        apply(&mut self.services, &changes.services);
        apply(&mut self.endpoint_slices, &changes.endpoint_slices);
        apply(&mut self.nodes, &changes.nodes);
    }

    /// A copy of every object, for code that reads the whole set (tests, the reference model).
    pub fn objects(&self) -> Objects {
        Objects {
            services: self.services.values().map(|s| (**s).clone()).collect(),
            endpoint_slices: self
                .endpoint_slices
                .values()
                .map(|s| (**s).clone())
                .collect(),
            nodes: self.nodes.values().map(|n| (**n).clone()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, rv: Option<&str>) -> Arc<Service> {
        let mut s = Service::default();
        s.metadata.name = Some(name.into());
        s.metadata.resource_version = rv.map(String::from);
        Arc::new(s)
    }

    fn key(name: &str) -> Name {
        ("default".into(), name.into())
    }

    #[test]
    fn diff_reports_added_changed_and_deleted_but_not_relisted_unchanged() {
        let a = svc("a", Some("1"));
        let mut prev = BTreeMap::from([(key("a"), a), (key("b"), svc("b", Some("5")))]);
        let mut out = BTreeMap::new();
        // A relist: new allocations; a unchanged (same version), b gone, c new.
        let now = BTreeMap::from([(key("a"), svc("a", Some("1"))), (key("c"), svc("c", None))]);
        diff_into(&mut prev, now, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[&key("b")].is_none());
        assert!(out[&key("c")].is_some());
        // Same allocation without a version: unchanged; a new one without a version: changed.
        let mut out = BTreeMap::new();
        let now = prev.clone();
        diff_into(&mut prev, now, &mut out);
        assert!(out.is_empty());
        let now = BTreeMap::from([(key("a"), svc("a", Some("1"))), (key("c"), svc("c", None))]);
        diff_into(&mut prev, now, &mut out);
        assert_eq!(out.keys().collect::<Vec<_>>(), vec![&key("c")]);
    }

    #[test]
    fn later_changes_win_and_the_store_follows() {
        let mut first = Changes::default();
        first.services.insert(key("a"), Some(svc("a", Some("1"))));
        first.services.insert(key("b"), Some(svc("b", Some("1"))));
        let mut later = Changes::default();
        later.services.insert(key("a"), None);
        first.merge(later);
        let mut store = Store::default();
        store.apply(&first);
        assert_eq!(store.services.keys().collect::<Vec<_>>(), vec![&key("b")]);
        assert_eq!(store.objects().services.len(), 1);
    }
}
