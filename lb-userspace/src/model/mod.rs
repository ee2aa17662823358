//! The service model: Services and EndpointSlices in, per ServicePort the frontends and backends
//! kube-proxy would program out. Pure code: no kernel, no I/O.
//!
//! Implemented so far (see docs/SEMANTICS.md for the full list and its status): ClusterIP frontends
//! over IPv4 for TCP and UDP; each (port, protocol) is its own ServicePort; slice ports matched to
//! service ports by (name, protocol); the union of all slices labelled with the service name, one
//! copy of each ip:port; unset conditions read as ready/serving/not terminating; ready endpoints,
//! else serving-and-terminating ones; `service.kubernetes.io/service-proxy-name` filtering.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::sources::Objects;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::proto::TCP,
            Protocol::Udp => lb_common::proto::UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
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
}

/// An address and port that traffic for a ServicePort arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub kind: FrontendKind,
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// One endpoint of a ServicePort, after port resolution.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub id: ServicePortId,
    pub frontends: Vec<Frontend>,
    /// Every endpoint the slices list for this port, sorted.
    pub endpoints: Vec<Endpoint>,
    /// The endpoints new flows may go to, as kube-proxy picks them: the ready ones, or when none
    /// is ready the serving-and-terminating ones. Empty means new flows are refused.
    pub backends: Vec<(Ipv4Addr, u16)>,
}

/// Everything the data path needs, keyed by ServicePort.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    pub service_ports: BTreeMap<ServicePortId, ServicePort>,
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

#[derive(Debug, Clone, Default)]
pub struct Config {
    /// This node's name; decides which endpoints are local.
    pub node_name: String,
    /// When set, serve only objects whose `service.kubernetes.io/service-proxy-name` label names
    /// us. When unset, serve only objects without that label (they belong to another proxy),
    /// which is what kube-proxy does.
    pub service_proxy_name: Option<String>,
}

/// Builds the model. Never fails: bad input becomes warnings.
pub fn build(objects: &Objects, config: &Config) -> (Model, Vec<Warning>) {
    let mut warnings = Vec::new();
    let mut model = Model::default();
    let slices = slices_by_service(&objects.endpoint_slices, config);
    let mut seen = BTreeSet::new();
    for svc in &objects.services {
        let (ns, name) = names(&svc.metadata);
        if !serves(svc.metadata.labels.as_ref(), config) {
            continue;
        }
        let object = format!("Service {ns}/{name}");
        if !seen.insert((ns.clone(), name.clone())) {
            warnings.push(warn(
                &object,
                "metadata.name",
                "duplicate Service; the first one is used",
            ));
            continue;
        }
        let svc_slices = slices
            .get(&(ns.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        add_service(
            svc,
            &ns,
            &name,
            &object,
            svc_slices,
            &mut model,
            &mut warnings,
        );
    }
    warnings.sort();
    (model, warnings)
}

fn warn(object: &str, field: &str, message: impl Into<String>) -> Warning {
    Warning {
        object: object.to_string(),
        field: field.to_string(),
        message: message.into(),
    }
}

fn names(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn serves(labels: Option<&BTreeMap<String, String>>, config: &Config) -> bool {
    let label = labels.and_then(|l| l.get(PROXY_NAME_LABEL));
    match (&config.service_proxy_name, label) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some(ours), Some(theirs)) => ours == theirs,
        (Some(_), None) => false,
    }
}

fn slices_by_service<'a>(
    slices: &'a [EndpointSlice],
    config: &Config,
) -> BTreeMap<(String, String), Vec<&'a EndpointSlice>> {
    let mut by_service: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for slice in slices {
        if !serves(slice.metadata.labels.as_ref(), config) {
            continue;
        }
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            // kube-proxy ignores slices it cannot tie to a Service.
            continue;
        };
        let (ns, _) = names(&slice.metadata);
        by_service
            .entry((ns, service.clone()))
            .or_default()
            .push(slice);
    }
    by_service
}

fn add_service(
    svc: &Service,
    ns: &str,
    name: &str,
    object: &str,
    slices: &[&EndpointSlice],
    model: &mut Model,
    warnings: &mut Vec<Warning>,
) {
    let Some(spec) = &svc.spec else {
        warnings.push(warn(object, "spec", "missing; Service skipped"));
        return;
    };
    match spec.type_.as_deref() {
        None | Some("ClusterIP") => {}
        Some("ExternalName") => return,
        Some(other) => {
            // NodePort and LoadBalancer also get their ClusterIP; the external frontends come
            // with the external-traffic work.
            if !matches!(other, "NodePort" | "LoadBalancer") {
                warnings.push(warn(
                    object,
                    "spec.type",
                    format!("unknown type {other:?}; Service skipped"),
                ));
                return;
            }
        }
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") => {
            warnings.push(warn(object, "spec.clusterIP", "missing; Service skipped"));
            return;
        }
        // Headless services have no frontend to balance.
        Some("None") => return,
        Some(ip) => match ip.trim().parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => v4,
            Ok(std::net::IpAddr::V6(_)) => {
                warnings.push(warn(
                    object,
                    "spec.clusterIP",
                    format!(
                        "{ip} is IPv6, which the data path does not carry yet; Service skipped"
                    ),
                ));
                return;
            }
            Err(_) => {
                warnings.push(warn(
                    object,
                    "spec.clusterIP",
                    format!("{ip:?} is not an IP address; Service skipped"),
                ));
                return;
            }
        },
    };
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => {
                warnings.push(warn(
                    object,
                    &format!("{field}.protocol"),
                    "SCTP is not carried by the data path yet; port skipped",
                ));
                continue;
            }
            other => {
                warnings.push(warn(
                    object,
                    &format!("{field}.protocol"),
                    format!("unknown protocol {other:?}; port skipped"),
                ));
                continue;
            }
        };
        let Ok(svc_port) =
            u16::try_from(port.port)
                .map_err(drop)
                .and_then(|p| if p == 0 { Err(()) } else { Ok(p) })
        else {
            warnings.push(warn(
                object,
                &format!("{field}.port"),
                format!("{} is outside 1..65535; port skipped", port.port),
            ));
            continue;
        };
        let port_name = port.name.clone().unwrap_or_default();
        let id = ServicePortId {
            namespace: ns.to_string(),
            name: name.to_string(),
            port_name: port_name.clone(),
            protocol,
        };
        let endpoints = endpoints_for(slices, &port_name, protocol, warnings);
        let backends = choose_backends(&endpoints);
        model.service_ports.insert(
            id.clone(),
            ServicePort {
                id,
                frontends: vec![Frontend {
                    kind: FrontendKind::ClusterIp,
                    addr: cluster_ip,
                    port: svc_port,
                }],
                endpoints,
                backends,
            },
        );
    }
}

/// The endpoints of one ServicePort across all its slices; one copy of each ip:port.
fn endpoints_for(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    warnings: &mut Vec<Warning>,
) -> Vec<Endpoint> {
    let mut out: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        let (ns, name) = names(&slice.metadata);
        let object = format!("EndpointSlice {ns}/{name}");
        if slice.address_type != "IPv4" {
            // IPv6 slices are for the IPv6 twin of the data path, not an error.
            continue;
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol.to_string()
        }) else {
            continue;
        };
        let Some(port) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            warnings.push(warn(
                &object,
                "ports[].port",
                format!("port {port_name:?} has no number in 1..65535; slice skipped for it"),
            ));
            continue;
        };
        for (i, ep) in slice.endpoints.iter().enumerate() {
            // kube-proxy uses only the first address of an endpoint.
            let Some(first) = ep.addresses.first() else {
                warnings.push(warn(
                    &object,
                    &format!("endpoints[{i}].addresses"),
                    "empty; endpoint skipped",
                ));
                continue;
            };
            let Ok(addr) = first.trim().parse::<Ipv4Addr>() else {
                warnings.push(warn(
                    &object,
                    &format!("endpoints[{i}].addresses[0]"),
                    format!("{first:?} is not an IPv4 address; endpoint skipped"),
                ));
                continue;
            };
            let cond = ep.conditions.as_ref();
            let endpoint = Endpoint {
                addr,
                port,
                ready: cond.and_then(|c| c.ready).unwrap_or(true),
                serving: cond.and_then(|c| c.serving).unwrap_or(true),
                terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                node_name: ep.node_name.clone(),
            };
            out.entry((addr, port)).or_insert(endpoint);
        }
    }
    out.into_values().collect()
}

fn choose_backends(endpoints: &[Endpoint]) -> Vec<(Ipv4Addr, u16)> {
    let ready: Vec<_> = endpoints
        .iter()
        .filter(|e| e.ready)
        .map(|e| (e.addr, e.port))
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints
        .iter()
        .filter(|e| e.serving && e.terminating)
        .map(|e| (e.addr, e.port))
        .collect()
}

impl fmt::Display for Model {
    /// The canonical dump: sorted, one ServicePort per block, stable across runs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for sp in self.service_ports.values() {
            writeln!(f, "{}", sp.id)?;
            for fe in &sp.frontends {
                writeln!(f, "  frontend {:?} {}:{}", fe.kind, fe.addr, fe.port)?;
            }
            for ep in &sp.endpoints {
                let chosen = sp.backends.contains(&(ep.addr, ep.port));
                writeln!(
                    f,
                    "  endpoint {}:{} ready={} serving={} terminating={} node={} {}",
                    ep.addr,
                    ep.port,
                    ep.ready,
                    ep.serving,
                    ep.terminating,
                    ep.node_name.as_deref().unwrap_or("-"),
                    if chosen { "backend" } else { "unused" }
                )?;
            }
            if sp.backends.is_empty() {
                writeln!(f, "  no backends: new flows are refused")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
