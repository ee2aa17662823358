//! EndpointSlices to endpoints, and kube-proxy's choice among them (its `CategorizeEndpoints`):
//! the cluster set with topology, and the local set.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    names, serves, warn, Config, Endpoint, IpFamily, Protocol, Topology, Warning,
    MAX_ENDPOINTS_PER_SLICE, SERVICE_NAME_LABEL,
};

/// The Service a slice belongs to: its namespace and its `kubernetes.io/service-name` label.
pub(super) fn slice_service(slice: &EndpointSlice) -> Option<(String, String)> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let (ns, _) = names(&slice.metadata);
    Some((ns, service.clone()))
}

/// Slices grouped by the Service their `kubernetes.io/service-name` label names; unlabelled
/// slices are ignored, as kube-proxy does.
pub(super) fn slices_by_service<'a>(
    slices: &'a [EndpointSlice],
    config: &Config,
) -> BTreeMap<(String, String), Vec<&'a EndpointSlice>> {
    let mut by_service: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for slice in slices {
        if !serves(slice.metadata.labels.as_ref(), config) {
            continue;
        }
        let Some(service) = slice_service(slice) else {
            continue;
        };
        by_service.entry(service).or_default().push(slice);
    }
    // Input order must not matter.
    for list in by_service.values_mut() {
        list.sort_by_key(|s| names(&s.metadata));
    }
    by_service
}

/// The endpoints of one ServicePort in one family across all its slices. The same ip:port in two
/// slices counts once, and a copy on this node wins.
pub(super) fn collect(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    family: IpFamily,
    config: &Config,
    warnings: &mut Vec<Warning>,
) -> Vec<Endpoint> {
    let want_type = match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    };
    let mut out: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    // The node names seen so far, so that endpoints on one node share one allocation.
    let mut nodes: HashMap<&str, Arc<str>> = HashMap::new();
    for slice in slices {
        let (ns, name) = names(&slice.metadata);
        let object = format!("EndpointSlice {ns}/{name}");
        // FQDN slices and the other family's slices are not for this ServicePort.
        if slice.address_type != want_type {
            continue;
        }
        let Some((pi, port)) = slice.ports.iter().flatten().enumerate().find(|(_, p)| {
            p.name.as_deref().unwrap_or_default() == port_name
                && Protocol::parse(p.protocol.as_deref()) == Some(protocol)
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
                &format!("ports[{pi}].port"),
                format!(
                    "{:?} is not a port in 1..65535; the slice is skipped for port {port_name:?}",
                    port.port
                ),
            ));
            continue;
        };
        if slice.endpoints.len() > MAX_ENDPOINTS_PER_SLICE {
            warnings.push(warn(
                &object,
                "endpoints",
                format!(
                    "{} endpoints, more than the {MAX_ENDPOINTS_PER_SLICE} the API allows; the rest are skipped",
                    slice.endpoints.len()
                ),
            ));
        }
        for (i, ep) in slice
            .endpoints
            .iter()
            .take(MAX_ENDPOINTS_PER_SLICE)
            .enumerate()
        {
            // kube-proxy uses only the first address of an endpoint.
            let Some(first) = ep.addresses.first() else {
                warnings.push(warn(
                    &object,
                    &format!("endpoints[{i}].addresses"),
                    "empty; endpoint skipped",
                ));
                continue;
            };
            let addr = match first.trim().parse::<IpAddr>() {
                Ok(a) if IpFamily::of(&a) == family => a,
                Ok(a) => {
                    warnings.push(warn(
                        &object,
                        &format!("endpoints[{i}].addresses[0]"),
                        format!("{a} is not {family} although the slice's addressType is {want_type}; endpoint skipped"),
                    ));
                    continue;
                }
                Err(_) => {
                    warnings.push(warn(
                        &object,
                        &format!("endpoints[{i}].addresses[0]"),
                        format!("{first:?} is not an IP address; endpoint skipped"),
                    ));
                    continue;
                }
            };
            let cond = ep.conditions.as_ref();
            let hints = ep.hints.as_ref();
            let endpoint = Endpoint {
                addr,
                port,
                ready: cond.and_then(|c| c.ready).unwrap_or(true),
                serving: cond.and_then(|c| c.serving).unwrap_or(true),
                terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
                local: ep
                    .node_name
                    .as_deref()
                    .is_some_and(|n| !n.is_empty() && n == config.node_name),
                node_name: ep
                    .node_name
                    .as_deref()
                    .map(|n| Arc::clone(nodes.entry(n).or_insert_with(|| Arc::from(n)))),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
            };
            match out.get(&endpoint.socket_addr()) {
                Some(existing) if existing.local || !endpoint.local => {}
                _ => {
                    out.insert(endpoint.socket_addr(), endpoint);
                }
            }
        }
    }
    out.into_values().collect()
}

/// The result of categorizing a ServicePort's endpoints.
pub(super) struct Sets {
    pub cluster: Vec<SocketAddr>,
    pub local: Vec<SocketAddr>,
    pub has_any: bool,
    pub topology: Topology,
}

/// kube-proxy's choice. The cluster set: ready endpoints (filtered by topology when hints allow),
/// else serving-and-terminating ones. The local set, chosen the same way among local endpoints
/// and never filtered by topology.
pub(super) fn categorize(
    endpoints: &[Endpoint],
    traffic_distribution: Option<&str>,
    node_name: &str,
    zone: Option<&str>,
) -> Sets {
    let topology = topology_mode(endpoints, traffic_distribution, node_name, zone);
    let fits = |ep: &Endpoint| match topology {
        Topology::None => true,
        Topology::SameNode => ep.node_hints.contains(node_name),
        Topology::SameZone => zone.is_some_and(|z| ep.zone_hints.contains(z)),
    };
    let mut cluster: Vec<SocketAddr> = endpoints
        .iter()
        .filter(|e| e.ready && fits(e))
        .map(Endpoint::socket_addr)
        .collect();
    if cluster.is_empty() {
        cluster = endpoints
            .iter()
            .filter(|e| e.serving && e.terminating && fits(e))
            .map(Endpoint::socket_addr)
            .collect();
    }
    let local_ready: Vec<SocketAddr> = endpoints
        .iter()
        .filter(|e| e.local && e.ready)
        .map(Endpoint::socket_addr)
        .collect();
    let local = if !local_ready.is_empty() {
        local_ready
    } else {
        endpoints
            .iter()
            .filter(|e| e.local && e.serving && e.terminating)
            .map(Endpoint::socket_addr)
            .collect()
    };
    let has_any = endpoints
        .iter()
        .any(|e| e.ready || (e.serving && e.terminating));
    Sets {
        cluster,
        local,
        has_any,
        topology,
    }
}

/// Hints are used only when every ready endpoint carries them and at least one matches this node
/// (PreferSameNode) or zone; otherwise kube-proxy ignores them all.
fn topology_mode(
    endpoints: &[Endpoint],
    traffic_distribution: Option<&str>,
    node_name: &str,
    zone: Option<&str>,
) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    if traffic_distribution == Some("PreferSameNode")
        && ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| e.node_hints.contains(node_name))
    {
        return Topology::SameNode;
    }
    let zones: BTreeSet<&str> = zone.into_iter().collect();
    if ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready
            .iter()
            .any(|e| e.zone_hints.iter().any(|z| zones.contains(z.as_str())))
    {
        return Topology::SameZone;
    }
    Topology::None
}
