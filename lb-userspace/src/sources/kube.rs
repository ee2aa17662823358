//! The Kubernetes API source: kube-rs reflectors on Services and EndpointSlices in all namespaces
//! and on this node's own Node object, publishing [`Snapshot`]s of what changed to the agent.
//!
//! What it guarantees, and how:
//! - **Nothing before the first full sync.** No snapshot is published until every watched kind has
//!   completed its first list. A Service list without its EndpointSlices would look like "every
//!   service lost its backends", and the writer would remove what is programmed.
//! - **Outages keep the last state.** Watch failures never empty a store: kube-runtime's watcher
//!   resumes from the last resourceVersion after a disconnect, relists after 410 Gone, and its
//!   reflector buffers a relist and swaps it in only once the list is complete. Errors are logged
//!   and backed off ([`WatchStreamExt::default_backoff`]: 0.8 s doubling to 30 s, with jitter);
//!   they never produce a snapshot.
//! - **Bursts are coalesced.** After a change the source waits for a quiet period
//!   ([`KubeOptions::quiet`]) but no longer than [`KubeOptions::max_delay`] from the first change,
//!   then publishes one snapshot; the feed merges snapshots the agent has not taken yet.
//! - **Small caches.** Objects are trimmed to the fields the model reads before they are stored.
//!
//! The reflectors run on a current-thread tokio runtime in the source's own thread; the agent's
//! apply loop stays synchronous and does not care which source it is fed by.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Node, NodeSpec, NodeStatus, Service},
    discovery::v1::EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt,
    },
    Api, Client,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{
    diff_into,
    feed::{Feed, Publisher, Snapshot},
    name_of, Changes, Name,
};
use crate::model::ZONE_LABEL;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    ReadKubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("using kubeconfig {path}: {source}")]
    UseKubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes API configuration: not in a pod ({in_cluster}), and no usable kubeconfig \
         from KUBECONFIG or ~/.kube/config ({kubeconfig}); pass --kubeconfig FILE or --manifests DIR"
    )]
    Infer {
        in_cluster: kube::config::InClusterError,
        kubeconfig: kube::config::KubeconfigError,
    },
    #[error("creating the Kubernetes client: {0}")]
    Client(kube::Error),
    #[error("starting the Kubernetes source: {0}")]
    Runtime(std::io::Error),
    #[error("the Kubernetes source thread ended before it started")]
    ThreadEnded,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the API server and credentials come from.
#[derive(Debug, Clone)]
pub enum ApiConfig {
    /// In-cluster service account, then KUBECONFIG, then ~/.kube/config.
    Infer,
    /// `--kubeconfig FILE`, its current context.
    Kubeconfig(PathBuf),
    /// A ready configuration (tests point it at a fake API server).
    Given(Box<kube::Config>),
}

impl ApiConfig {
    async fn resolve(self) -> Result<kube::Config> {
        match self {
            // In a pod the service account wins (kube's own `infer` prefers a kubeconfig).
            ApiConfig::Infer => match kube::Config::incluster() {
                Ok(config) => Ok(config),
                Err(in_cluster) => kube::Config::from_kubeconfig(&KubeConfigOptions::default())
                    .await
                    .map_err(|kubeconfig| Error::Infer {
                        in_cluster,
                        kubeconfig,
                    }),
            },
            ApiConfig::Kubeconfig(path) => {
                let kubeconfig =
                    Kubeconfig::read_from(&path).map_err(|source| Error::ReadKubeconfig {
                        path: path.clone(),
                        source,
                    })?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|source| Error::UseKubeconfig { path, source })
            }
            ApiConfig::Given(config) => Ok(*config),
        }
    }
}

#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// This node; its Node object is watched with a field selector.
    pub node_name: String,
    /// After a change, publish once nothing else changed for this long...
    pub quiet: Duration,
    /// ...or this long after the first unpublished change, whichever comes first, so a steady
    /// stream of changes still reaches the maps.
    pub max_delay: Duration,
}

impl KubeOptions {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// Starts the reflectors on their own thread. Returns once the API configuration is resolved and
/// the client created (so a bad kubeconfig fails the agent's start), not when synced.
pub fn start(api: ApiConfig, options: KubeOptions) -> Result<Feed> {
    let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let feed = Feed::spawn(
        "kubernetes",
        Box::new(move || {
            // The receiver is gone when the source already ended; nothing to stop then.
            let _ = stop_tx.send(());
        }),
        move |publisher| {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(Error::Runtime(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let client = match api.resolve().await {
                    Ok(config) => Client::try_from(config).map_err(Error::Client),
                    Err(e) => Err(e),
                };
                let client = match client {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                tokio::select! {
                    _ = stop_rx => debug!("Kubernetes source stopping"),
                    _ = run(client, options, publisher) => {}
                }
            });
            // Dropping the runtime cancels the reflector tasks and closes their connections.
        },
    )
    .map_err(Error::Runtime)?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok(feed),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::ThreadEnded),
    }
}

/// The three reflectors and the publishing loop. Runs until the runtime is dropped.
async fn run(client: Client, options: KubeOptions, publisher: Publisher) {
    let changed = Arc::new(Notify::new());
    let services = spawn_reflector(
        "Service",
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        trim_service,
        Arc::clone(&changed),
    );
    let slices = spawn_reflector(
        "EndpointSlice",
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        trim_endpoint_slice,
        Arc::clone(&changed),
    );
    let nodes = spawn_reflector(
        "Node",
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={}", options.node_name)),
        trim_node,
        Arc::clone(&changed),
    );

    // The first full sync of every kind; until then nothing is published, so nothing programmed
    // is removed. A store's readiness only fails if its reflector task ended, which it never does.
    let ready = futures::future::join3(
        services.wait_until_ready(),
        slices.wait_until_ready(),
        nodes.wait_until_ready(),
    )
    .await;
    if let (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) = ready {
        warn!("Kubernetes source: a reflector ended before its first sync: {e}");
        return;
    }
    let mut published = Published::default();
    let mut snapshot = |changed_at| {
        let mut s = snapshot(
            &services,
            &slices,
            &nodes,
            &mut published,
            &options.node_name,
        );
        s.changed_at = Some(changed_at);
        s
    };
    let first = snapshot(std::time::Instant::now());
    info!(
        services = first.changes.services.len(),
        slices = first.changes.endpoint_slices.len(),
        node_found = !first.changes.nodes.is_empty(),
        "Kubernetes source: first full sync of Services, EndpointSlices and this Node"
    );
    if first.changes.nodes.is_empty() {
        warn!(node = %options.node_name, "no Node object with this name: check --node-name; using the addresses of local interfaces and no zone");
    }
    publisher.publish(first);

    loop {
        changed.notified().await;
        let first_change = tokio::time::Instant::now();
        let hard_deadline = first_change + options.max_delay;
        loop {
            let quiet_deadline = tokio::time::Instant::now() + options.quiet;
            let wake = quiet_deadline.min(hard_deadline);
            tokio::select! {
                _ = changed.notified() => {
                    if tokio::time::Instant::now() >= hard_deadline {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(wake) => break,
            }
        }
        publisher.publish(snapshot(first_change.into_std()));
    }
}

/// Runs `watcher → backoff → trim → reflector` for one kind on the runtime and returns its store.
/// Every change that reaches the store (an applied or deleted object, or a completed relist)
/// wakes the publishing loop.
fn spawn_reflector<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    changed: Arc<Notify>,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff().modify(trim));
    tokio::spawn(drive(kind, stream, changed));
    store
}

async fn drive<K>(
    kind: &'static str,
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    changed: Arc<Notify>,
) {
    let mut stream = std::pin::pin!(stream);
    let mut synced_once = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => changed.notify_one(),
            Ok(watcher::Event::InitDone) => {
                if synced_once {
                    info!(kind, "relisted");
                }
                synced_once = true;
                changed.notify_one();
            }
            // A relist in progress: the store keeps serving the previous state until InitDone.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) => {
                warn!(
                    kind,
                    "watch failed, keeping the last known state and retrying with backoff: {e}"
                )
            }
        }
    }
}

/// What the source last published, to tell what changed since.
#[derive(Default)]
struct Published {
    services: BTreeMap<Name, Arc<Service>>,
    slices: BTreeMap<Name, Arc<EndpointSlice>>,
    nodes: BTreeMap<Name, Arc<Node>>,
}

/// The changes between what was last published and the stores now. A store keeps the same
/// allocation for an object that did not change, and a relist's copies carry the same
/// resourceVersion, so the comparison is cheap and a relist republishes nothing unchanged.
fn snapshot(
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
    nodes: &Store<Node>,
    published: &mut Published,
    node_name: &str,
) -> Snapshot {
    fn keyed<K>(store: &Store<K>, namespaced: bool) -> BTreeMap<Name, Arc<K>>
    where
        K: kube::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Clone,
        K::DynamicType: std::hash::Hash + Eq + Clone,
    {
        store
            .state()
            .into_iter()
            .map(|o| (name_of(o.metadata(), namespaced), o))
            .collect()
    }
    let mut changes = Changes::default();
    diff_into(
        &mut published.services,
        keyed(services, true),
        &mut changes.services,
    );
    diff_into(
        &mut published.slices,
        keyed(slices, true),
        &mut changes.endpoint_slices,
    );
    diff_into(
        &mut published.nodes,
        keyed(nodes, false),
        &mut changes.nodes,
    );
    let node_addresses = published
        .nodes
        .values()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
        .map(|n| node_addresses(n))
        .filter(|a| !a.is_empty());
    Snapshot {
        changes,
        node_addresses,
        warnings: Vec::new(),
        changed_at: None,
    }
}

/// The Node's InternalIP and ExternalIP addresses, sorted: the default NodePort addresses.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Keeps what identifies an object, the labels (service-name and proxy-name selection) and the
/// annotations the model reads; drops managedFields, other annotations, owner references and
/// the rest.
fn trim_metadata(meta: &mut ObjectMeta) {
    let annotations = meta.annotations.take().and_then(|mut all| {
        all.retain(|k, _| k == crate::model::SCHEDULER_ANNOTATION);
        (!all.is_empty()).then_some(all)
    });
    *meta = ObjectMeta {
        annotations,
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        labels: meta.labels.take(),
        // The model breaks ClusterIP conflicts by age, as the API server's allocator would.
        creation_timestamp: meta.creation_timestamp.take(),
        ..ObjectMeta::default()
    };
}

/// Spec and `status.loadBalancer` are read; conditions are not.
pub fn trim_service(service: &mut Service) {
    trim_metadata(&mut service.metadata);
    if let Some(status) = service.status.as_mut() {
        status.conditions = None;
    }
}

/// Endpoint addresses, conditions, node, zone and hints are read; target references and
/// hostnames are not.
pub fn trim_endpoint_slice(slice: &mut EndpointSlice) {
    trim_metadata(&mut slice.metadata);
    for endpoint in &mut slice.endpoints {
        endpoint.target_ref = None;
        endpoint.hostname = None;
        endpoint.deprecated_topology = None;
    }
}

/// Only the zone label and the addresses: a Node's images, conditions and capacity are large and
/// change often (heartbeats do not, since Leases, but kubelet status updates do).
pub fn trim_node(node: &mut Node) {
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .cloned();
    trim_metadata(&mut node.metadata);
    node.metadata.labels = zone.map(|z| BTreeMap::from([(ZONE_LABEL.to_string(), z)]));
    node.spec = None::<NodeSpec>;
    node.status = node.status.take().map(|s| NodeStatus {
        addresses: s.addresses,
        ..NodeStatus::default()
    });
}

/// `--kubeconfig` if given, else inferred (in-cluster, then KUBECONFIG, then ~/.kube/config).
pub fn api_config(kubeconfig: Option<&Path>) -> ApiConfig {
    match kubeconfig {
        Some(path) => ApiConfig::Kubeconfig(path.to_path_buf()),
        None => ApiConfig::Infer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_is_trimmed_to_zone_label_and_addresses() {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "node-a",
                "labels": {ZONE_LABEL: "z1", "kubernetes.io/hostname": "node-a"},
                "annotations": {"big": "x"},
                "managedFields": [{"manager": "kubelet"}]
            },
            "spec": {"podCIDR": "10.0.0.0/24"},
            "status": {
                "addresses": [
                    {"type": "Hostname", "address": "node-a"},
                    {"type": "InternalIP", "address": "10.0.0.2"},
                    {"type": "ExternalIP", "address": "203.0.113.7"}
                ],
                "images": [{"names": ["pause"]}]
            }
        }))
        .unwrap();
        trim_node(&mut node);
        assert_eq!(
            node.metadata.labels,
            Some(BTreeMap::from([(ZONE_LABEL.to_string(), "z1".to_string())]))
        );
        assert!(node.metadata.annotations.is_none() && node.metadata.managed_fields.is_none());
        assert!(node.spec.is_none());
        assert!(node.status.as_ref().unwrap().images.is_none());
        assert_eq!(
            node_addresses(&node),
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "203.0.113.7".parse().unwrap()
            ]
        );
    }

    #[test]
    fn service_keeps_only_the_scheduler_annotation() {
        let mut svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "annotations": {
                    crate::model::SCHEDULER_ANNOTATION: "random",
                    "kubectl.kubernetes.io/last-applied-configuration": "{...}"
                }
            }
        }))
        .unwrap();
        trim_service(&mut svc);
        assert_eq!(
            svc.metadata.annotations,
            Some(BTreeMap::from([(
                crate::model::SCHEDULER_ANNOTATION.to_string(),
                "random".to_string()
            )]))
        );
    }
}
