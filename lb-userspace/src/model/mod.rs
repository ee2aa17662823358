//! The service model: Services, EndpointSlices and this node in; per ServicePort and IP family the
//! frontends, the backend sets and the flags kube-proxy would program out. Pure code: no kernel, no
//! I/O, no clock. docs/SEMANTICS.md lists every behaviour with its status and its test.
//!
//! The data path asks one question of it, [`ServicePort::traffic`]: for a packet arriving on this
//! frontend from this kind of source, which backends may a new flow go to, is it masqueraded, and
//! what happens when there are none.
mod endpoints;
pub mod incremental;
mod service;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;

use crate::sources::Objects;

pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub(crate) const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub(crate) const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// kube-proxy's default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The API server caps a slice at 1000 endpoints; more is not a slice we were meant to see.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::proto::TCP,
            Protocol::Udp => lb_common::proto::UDP,
            Protocol::Sctp => lb_common::proto::SCTP,
        }
    }

    pub(crate) fn parse(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// `namespace/name:port-name/PROTOCOL`, the identity kube-proxy gives a ServicePort.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortId {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}:{}/{}",
            self.namespace, self.name, self.port_name, self.protocol
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    /// NodePort, LoadBalancer and externalIP frontends take traffic from outside the cluster.
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIp)
    }
}

/// An address and port that traffic for a ServicePort arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub addr: IpAddr,
    pub port: u16,
}

/// One endpoint of a ServicePort, after port resolution.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Shared by the endpoints of a ServicePort on the same node: the model holds an endpoint
    /// per backend (100,000 at 10k Services x 10 endpoints) and they are on few nodes.
    pub node_name: Option<Arc<str>>,
    /// On this node (its nodeName is ours; an endpoint without nodeName is never local).
    pub local: bool,
    /// Zones from `hints.forZones`.
    pub zone_hints: BTreeSet<String>,
    /// Nodes from `hints.forNodes`.
    pub node_hints: BTreeSet<String>,
}

impl Endpoint {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

/// Which topology filter the cluster set went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// No filter: hints absent, incomplete, or not matching this node.
    None,
    /// `PreferSameNode`: endpoints hinted for this node.
    SameNode,
    /// Zone hints (`PreferClose` or topology-aware routing): endpoints hinted for this zone.
    SameZone,
}

/// Where a packet comes from, as far as the choice of backends is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A pod on this node.
    Pod,
    /// A process in this node's host network namespace.
    HostProcess,
    /// Anything off this node (clients outside the cluster, other nodes).
    External,
}

/// What happens to a new flow that finds no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenEmpty {
    /// The ServicePort has no usable endpoint anywhere: refuse (TCP RST / ICMP port unreachable).
    Reject,
    /// Endpoints exist, just none this traffic policy may use: drop silently, as kube-proxy does.
    Drop,
}

/// The answer to "a new flow arrives on this frontend from there".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traffic<'a> {
    pub backends: &'a [SocketAddr],
    /// SNAT the flow to the node: external traffic under Cluster policy, and host processes.
    pub masquerade: bool,
    pub when_empty: WhenEmpty,
}

/// How new flows of a frontend pick among its backends (annotation [`SCHEDULER_ANNOTATION`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scheduler {
    /// Maglev consistent hashing of the flow's 5-tuple: the same tuple gets the same backend on
    /// every node, and a backend change moves about 1/N of flows.
    Maglev,
    /// A uniformly random backend per new flow.
    Random,
}

/// The Service annotation that chooses the scheduler: `maglev` or `random`.
pub const SCHEDULER_ANNOTATION: &str = "lb.io/scheduler";

impl Scheduler {
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim() {
            "maglev" => Some(Self::Maglev),
            "random" => Some(Self::Random),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Maglev => "maglev",
            Self::Random => "random",
        }
    }
}

/// ClientIP session affinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Affinity {
    pub timeout_seconds: u32,
}

/// Everything the data path needs for one ServicePort in one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub id: ServicePortId,
    pub family: IpFamily,
    /// Sorted.
    pub frontends: Vec<Frontend>,
    /// Every endpoint the slices list for this port and family, sorted.
    pub endpoints: Vec<Endpoint>,
    /// Backends for traffic under Cluster policy (after topology). Sorted.
    pub cluster_backends: Vec<SocketAddr>,
    /// Backends for traffic under Local policy: local ready, else local serving-and-terminating.
    pub local_backends: Vec<SocketAddr>,
    /// Any ready or serving-and-terminating endpoint anywhere.
    pub has_any_endpoints: bool,
    pub topology: Topology,
    /// externalTrafficPolicy=Local (always false without external frontends).
    pub external_policy_local: bool,
    /// internalTrafficPolicy=Local.
    pub internal_policy_local: bool,
    pub affinity: Option<Affinity>,
    /// The scheduler the Service's annotation asks for; `None` means the defaults: Maglev for
    /// traffic from outside the node, random for traffic from this node's pods.
    pub scheduler: Option<Scheduler>,
    /// Sources allowed to reach LoadBalancer frontends; empty means everyone. Holds the Service's
    /// loadBalancerSourceRanges of this family plus the node's own addresses.
    pub lb_source_ranges: Vec<IpNet>,
    /// healthCheckNodePort of an eTP=Local LoadBalancer Service, with the number of local ready
    /// endpoints kube-proxy's health server reports.
    pub health_check: Option<HealthCheck>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    pub local_endpoints: usize,
}

impl ServicePort {
    /// The scheduler of new flows from `origin` (see [`ServicePort::scheduler`]).
    pub fn scheduler_for(&self, origin: Origin) -> Scheduler {
        self.scheduler.unwrap_or(match origin {
            Origin::External => Scheduler::Maglev,
            Origin::Pod | Origin::HostProcess => Scheduler::Random,
        })
    }

    /// Which backends a new flow on `frontend` from `origin` may use, whether it is masqueraded,
    /// and what happens when there are none.
    pub fn traffic(&self, frontend: &Frontend, origin: Origin) -> Traffic<'_> {
        let when_empty = if self.has_any_endpoints {
            WhenEmpty::Drop
        } else {
            WhenEmpty::Reject
        };
        if !frontend.kind.is_external() {
            let backends = if self.internal_policy_local {
                &self.local_backends
            } else {
                &self.cluster_backends
            };
            return Traffic {
                backends,
                masquerade: false,
                when_empty,
            };
        }
        match (self.external_policy_local, origin) {
            // Local policy keeps the client address and never leaves the node.
            (true, Origin::External) => Traffic {
                backends: &self.local_backends,
                masquerade: false,
                when_empty,
            },
            // Pods on this node short-circuit to the cluster set; host processes too, masqueraded.
            (true, Origin::Pod) => Traffic {
                backends: &self.cluster_backends,
                masquerade: false,
                when_empty,
            },
            (true, Origin::HostProcess) | (false, _) => Traffic {
                backends: &self.cluster_backends,
                masquerade: true,
                when_empty,
            },
        }
    }
}

/// Hairpin: an endpoint that reaches its own Service and is given itself as backend must be
/// SNATed to the node, or it would answer itself directly and drop its own reply as a stranger's.
/// Applies on every frontend and under every policy.
pub fn needs_hairpin_masquerade(client: IpAddr, backend: SocketAddr) -> bool {
    client == backend.ip()
}

/// Everything the data path needs, keyed by family then ServicePort.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    pub service_ports: BTreeMap<(IpFamily, ServicePortId), ServicePort>,
}

/// A problem in the input, naming the object and field. Only the bad part is skipped.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Warning {
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.object, self.field, self.message)
    }
}

pub(crate) fn warn(object: &str, field: &str, message: impl Into<String>) -> Warning {
    Warning {
        object: object.to_string(),
        field: field.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// This node's name; decides which endpoints are local.
    pub node_name: String,
    /// This node's addresses: NodePort frontends (filtered by `nodeport_cidrs`) and sources always
    /// allowed through loadBalancerSourceRanges.
    pub node_addresses: Vec<IpAddr>,
    /// `--nodeport-addresses`; empty means every node address.
    pub nodeport_cidrs: Vec<IpNet>,
    /// When set, serve only objects whose `service.kubernetes.io/service-proxy-name` label names
    /// us. When unset, serve only objects without that label (they belong to another proxy),
    /// which is what kube-proxy does.
    pub service_proxy_name: Option<String>,
    /// This node's zone. When unset it is read from the Node object named `node_name` among the
    /// inputs (label topology.kubernetes.io/zone), if there is one.
    pub zone: Option<String>,
}

pub(crate) fn serves(labels: Option<&BTreeMap<String, String>>, config: &Config) -> bool {
    let label = labels.and_then(|l| l.get(PROXY_NAME_LABEL));
    match (&config.service_proxy_name, label) {
        (None, None) => true,
        (Some(ours), Some(theirs)) => ours == theirs,
        _ => false,
    }
}

pub(crate) fn names(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Builds the model. Never fails and never panics: bad input becomes warnings. The output does
/// not depend on the order of the inputs.
pub fn build(objects: &Objects, config: &Config) -> (Model, Vec<Warning>) {
    let mut warnings = Vec::new();
    let zone = config.zone.clone().or_else(|| {
        objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(config.node_name.as_str()))
            .and_then(|n| n.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned())
    });
    let slices = endpoints::slices_by_service(&objects.endpoint_slices, config);
    let mut model = Model::default();
    service::add_services(
        objects,
        config,
        zone.as_deref(),
        &slices,
        &mut model,
        &mut warnings,
    );
    warnings.sort();
    warnings.dedup();
    (model, warnings)
}

impl fmt::Display for Model {
    /// The canonical dump: sorted, one ServicePort per block, stable across runs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for sp in self.service_ports.values() {
            write!(f, "{} {}", sp.id, sp.family)?;
            if sp.external_policy_local {
                write!(f, " externalTrafficPolicy=Local")?;
            }
            if sp.internal_policy_local {
                write!(f, " internalTrafficPolicy=Local")?;
            }
            if let Some(a) = sp.affinity {
                write!(f, " affinity=ClientIP/{}s", a.timeout_seconds)?;
            }
            match sp.topology {
                Topology::None => {}
                Topology::SameNode => write!(f, " topology=PreferSameNode")?,
                Topology::SameZone => write!(f, " topology=zone")?,
            }
            writeln!(f)?;
            for fe in &sp.frontends {
                writeln!(
                    f,
                    "  frontend {:?} {}",
                    fe.kind,
                    SocketAddr::new(fe.addr, fe.port)
                )?;
            }
            if !sp.lb_source_ranges.is_empty() {
                let ranges: Vec<String> =
                    sp.lb_source_ranges.iter().map(|r| r.to_string()).collect();
                writeln!(f, "  lb source ranges {}", ranges.join(","))?;
            }
            if let Some(hc) = sp.health_check {
                writeln!(
                    f,
                    "  health check node port {} local endpoints {}",
                    hc.node_port, hc.local_endpoints
                )?;
            }
            for ep in &sp.endpoints {
                let sa = ep.socket_addr();
                let mut uses = Vec::new();
                if sp.cluster_backends.contains(&sa) {
                    uses.push("cluster");
                }
                if sp.local_backends.contains(&sa) {
                    uses.push("local");
                }
                writeln!(
                    f,
                    "  endpoint {sa} ready={} serving={} terminating={} node={}{} uses={}",
                    ep.ready,
                    ep.serving,
                    ep.terminating,
                    ep.node_name.as_deref().unwrap_or("-"),
                    if ep.local { " (local)" } else { "" },
                    if uses.is_empty() {
                        "-".to_string()
                    } else {
                        uses.join(",")
                    },
                )?;
            }
            if !sp.has_any_endpoints {
                writeln!(f, "  no endpoints: new flows are rejected")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
