//! Services to ServicePorts: types, families, frontends, policies, affinity, source ranges, and the
//! conflicts between Services (two claiming one NodePort or one frontend).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    endpoints, names, serves, warn, Affinity, Config, Frontend, FrontendKind, HealthCheck,
    IpFamily, Model, Protocol, Scheduler, ServicePort, ServicePortId, Warning,
    DEFAULT_AFFINITY_TIMEOUT, SCHEDULER_ANNOTATION,
};
use crate::sources::Objects;

type SlicesByService<'a> = BTreeMap<(String, String), Vec<&'a EndpointSlice>>;

/// Something only one Service may have: a NodePort, or an address:port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum ClaimKey {
    NodePort(u16, Protocol),
    Frontend(IpAddr, u16, Protocol),
}

/// What earlier Services already claimed, so a later one that collides is the one skipped. It
/// also records which keys were asked for and whether one was refused: a Service's outcome
/// depends on other Services only through those keys, which is what lets the incremental model
/// recompute a changed Service together with just the Services it competes with.
#[derive(Default)]
pub(super) struct Claims {
    owners: BTreeMap<ClaimKey, String>,
    pub(super) touched: Vec<ClaimKey>,
    pub(super) refused: bool,
}

impl Claims {
    /// Claims `key` for `object`; the owner's name when an earlier Service has it.
    fn claim(&mut self, key: ClaimKey, object: &str) -> Result<(), String> {
        self.touched.push(key.clone());
        let owner = self.owners.entry(key).or_insert_with(|| object.to_string());
        if owner == object {
            Ok(())
        } else {
            self.refused = true;
            Err(owner.clone())
        }
    }
}

/// The order in which Services claim: the oldest first, names breaking ties, so that input order
/// never matters.
pub(super) fn claim_order(
    svc: &Service,
) -> (Option<k8s_openapi::jiff::Timestamp>, (String, String)) {
    (
        svc.metadata.creation_timestamp.as_ref().map(|t| t.0),
        names(&svc.metadata),
    )
}

pub(super) fn add_services(
    objects: &Objects,
    config: &Config,
    zone: Option<&str>,
    slices: &SlicesByService<'_>,
    model: &mut Model,
    warnings: &mut Vec<Warning>,
) {
    // The oldest Service keeps a contested NodePort or frontend, as the API server's allocator
    // would have it; names break ties so that input order never matters.
    let mut services: Vec<&Service> = objects
        .services
        .iter()
        .filter(|s| serves(s.metadata.labels.as_ref(), config))
        .collect();
    services.sort_by_key(|s| claim_order(s));
    let mut seen = BTreeSet::new();
    let mut claims = Claims::default();
    for svc in services {
        let (ns, name) = names(&svc.metadata);
        let object = format!("Service {ns}/{name}");
        if name.is_empty() {
            warnings.push(warn(&object, "metadata.name", "missing; Service skipped"));
            continue;
        }
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
            config,
            zone,
            &mut claims,
            model,
            warnings,
        );
    }
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim().parse().ok()
}

/// Reads a port number field, warning when it is not in 1..65535.
fn port_field(
    value: i32,
    object: &str,
    field: &str,
    warnings: &mut Vec<Warning>,
    what: &str,
) -> Option<u16> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            warnings.push(warn(
                object,
                field,
                format!("{value} is outside 1..65535; {what} skipped"),
            ));
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn add_service(
    svc: &Service,
    ns: &str,
    name: &str,
    object: &str,
    slices: &[&EndpointSlice],
    config: &Config,
    zone: Option<&str>,
    claims: &mut Claims,
    model: &mut Model,
    warnings: &mut Vec<Warning>,
) {
    let Some(spec) = &svc.spec else {
        warnings.push(warn(object, "spec", "missing; Service skipped"));
        return;
    };
    let (has_node_ports, is_lb) = match spec.type_.as_deref() {
        None | Some("ClusterIP") => (false, false),
        Some("NodePort") => (true, false),
        Some("LoadBalancer") => (true, true),
        Some("ExternalName") => return,
        Some(other) => {
            warnings.push(warn(
                object,
                "spec.type",
                format!("unknown type {other:?}; Service skipped"),
            ));
            return;
        }
    };

    // One ClusterIP per family; the families of the ClusterIPs are the families served.
    let cluster_ip_strings: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => vec![],
    };
    if cluster_ip_strings.iter().any(|ip| ip.trim() == "None") {
        return; // headless: nothing to balance
    }
    let mut cluster_ips: BTreeMap<IpFamily, IpAddr> = BTreeMap::new();
    for (i, raw) in cluster_ip_strings.iter().enumerate() {
        match parse_ip(raw) {
            Some(ip) => {
                cluster_ips.entry(IpFamily::of(&ip)).or_insert(ip);
            }
            None => warnings.push(warn(
                object,
                &format!("spec.clusterIPs[{i}]"),
                format!("{raw:?} is not an IP address; skipped"),
            )),
        }
    }
    if cluster_ips.is_empty() {
        warnings.push(warn(
            object,
            "spec.clusterIP",
            "no usable ClusterIP; Service skipped",
        ));
        return;
    }

    let mut external_ips = Vec::new();
    for (i, raw) in spec.external_ips.iter().flatten().enumerate() {
        match parse_ip(raw) {
            Some(ip) => external_ips.push(ip),
            None => warnings.push(warn(
                object,
                &format!("spec.externalIPs[{i}]"),
                format!("{raw:?} is not an IP address; skipped"),
            )),
        }
    }
    let mut lb_ips = Vec::new();
    if is_lb {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            // ipMode Proxy: the load balancer proxies to the node, traffic never arrives addressed
            // to the LB IP, and capturing it here would break hairpin through the real LB.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(raw) = &ing.ip else { continue };
            match parse_ip(raw) {
                Some(ip) => lb_ips.push(ip),
                None => warnings.push(warn(
                    object,
                    &format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{raw:?} is not an IP address; skipped"),
                )),
            }
        }
    }
    for ip in external_ips.iter().chain(&lb_ips) {
        if !cluster_ips.contains_key(&IpFamily::of(ip)) {
            warnings.push(warn(
                object,
                "spec.externalIPs/status.loadBalancer",
                format!(
                    "{ip} is {} but the Service has no {} ClusterIP; skipped",
                    IpFamily::of(ip),
                    IpFamily::of(ip)
                ),
            ));
        }
    }

    let policy = |field: &str, value: Option<&str>, warnings: &mut Vec<Warning>| match value {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            warnings.push(warn(
                object,
                field,
                format!("unknown policy {other:?}; Cluster is used"),
            ));
            false
        }
    };
    let etp_local = policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
        warnings,
    );
    let itp_local = policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
        warnings,
    );

    let affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let configured = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let timeout_seconds = match configured {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(t) if (1..=86_400).contains(&t) => t as u32,
                Some(t) => {
                    warnings.push(warn(
                        object,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is outside 1..86400; the default {DEFAULT_AFFINITY_TIMEOUT} is used"),
                    ));
                    DEFAULT_AFFINITY_TIMEOUT
                }
            };
            Some(Affinity { timeout_seconds })
        }
        None | Some("None") => None,
        Some(other) => {
            warnings.push(warn(
                object,
                "spec.sessionAffinity",
                format!("unknown value {other:?}; no affinity"),
            ));
            None
        }
    };

    let scheduler = match svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SCHEDULER_ANNOTATION))
    {
        None => None,
        Some(raw) => match Scheduler::parse(raw) {
            Some(s) => Some(s),
            None => {
                warnings.push(warn(
                    object,
                    &format!("metadata.annotations[{SCHEDULER_ANNOTATION}]"),
                    format!(
                        "unknown scheduler {raw:?} (expected maglev or random); the defaults are used (maglev for external traffic, random for pods)"
                    ),
                ));
                None
            }
        },
    };

    let mut source_ranges = Vec::new();
    for (i, raw) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match raw.trim().parse::<IpNet>() {
            Ok(net) => source_ranges.push(net.trunc()),
            Err(_) => warnings.push(warn(
                object,
                &format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{raw:?} is not a CIDR; entry skipped"),
            )),
        }
    }
    let health_check_port = match spec.health_check_node_port {
        Some(p) if is_lb && etp_local => port_field(
            p,
            object,
            "spec.healthCheckNodePort",
            warnings,
            "health check",
        ),
        _ => None,
    };

    let node_port_addrs: Vec<IpAddr> = config
        .node_addresses
        .iter()
        .copied()
        .filter(|a| {
            config.nodeport_cidrs.is_empty() || config.nodeport_cidrs.iter().any(|c| c.contains(a))
        })
        .collect();

    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        warnings.push(warn(object, "spec.ports", "no ports; nothing to balance"));
    }
    for (i, port) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let Some(protocol) = Protocol::parse(port.protocol.as_deref()) else {
            warnings.push(warn(
                object,
                &format!("{field}.protocol"),
                format!(
                    "unknown protocol {:?}; port skipped",
                    port.protocol.as_deref().unwrap_or_default()
                ),
            ));
            continue;
        };
        if protocol == Protocol::Sctp {
            warnings.push(warn(
                object,
                &format!("{field}.protocol"),
                "SCTP is kept in the model but the data path does not carry it yet: this port is not load-balanced",
            ));
        }
        let Some(svc_port) = port_field(
            port.port,
            object,
            &format!("{field}.port"),
            warnings,
            "port",
        ) else {
            continue;
        };
        let node_port = match port.node_port {
            Some(np) if has_node_ports && np != 0 => port_field(
                np,
                object,
                &format!("{field}.nodePort"),
                warnings,
                "NodePort",
            ),
            _ => None,
        };
        let node_port = node_port.filter(|np| {
            match claims.claim(ClaimKey::NodePort(*np, protocol), object) {
                Ok(()) => true,
                Err(owner) => {
                    warnings.push(warn(
                        object,
                        &format!("{field}.nodePort"),
                        format!("{np}/{protocol} is already used by {owner}; NodePort skipped for this Service"),
                    ));
                    false
                }
            }
        });
        let port_name = port.name.clone().unwrap_or_default();
        let id = ServicePortId {
            namespace: ns.to_string(),
            name: name.to_string(),
            port_name: port_name.clone(),
            protocol,
        };

        for (&family, &cluster_ip) in &cluster_ips {
            let mut frontends = vec![Frontend {
                kind: FrontendKind::ClusterIp,
                addr: cluster_ip,
                port: svc_port,
            }];
            if let Some(np) = node_port {
                frontends.extend(
                    node_port_addrs
                        .iter()
                        .filter(|a| IpFamily::of(a) == family)
                        .map(|&addr| Frontend {
                            kind: FrontendKind::NodePort,
                            addr,
                            port: np,
                        }),
                );
            }
            frontends.extend(
                lb_ips
                    .iter()
                    .filter(|a| IpFamily::of(a) == family)
                    .map(|&addr| Frontend {
                        kind: FrontendKind::LoadBalancer,
                        addr,
                        port: svc_port,
                    }),
            );
            frontends.extend(
                external_ips
                    .iter()
                    .filter(|a| IpFamily::of(a) == family)
                    .map(|&addr| Frontend {
                        kind: FrontendKind::ExternalIp,
                        addr,
                        port: svc_port,
                    }),
            );
            // An address:port can carry one Service only; the older one keeps it.
            frontends.retain(|fe| {
                match claims.claim(ClaimKey::Frontend(fe.addr, fe.port, protocol), object) {
                    Ok(()) => true,
                    Err(owner) => {
                        warnings.push(warn(
                            object,
                            &field,
                            format!(
                                "{:?} frontend {} is already used by {owner}; skipped",
                                fe.kind,
                                SocketAddr::new(fe.addr, fe.port)
                            ),
                        ));
                        false
                    }
                }
            });
            frontends.sort();
            frontends.dedup();
            if !frontends.iter().any(|f| f.kind == FrontendKind::ClusterIp) {
                continue;
            }
            let externally_accessible = frontends.iter().any(|f| f.kind.is_external());
            let family_ranges: Vec<IpNet> = source_ranges
                .iter()
                .copied()
                .filter(|r| IpFamily::of(&r.addr()) == family)
                .collect();
            let lb_source_ranges = if family_ranges.is_empty() || lb_ips.is_empty() {
                Vec::new()
            } else {
                // The node's own addresses may always reach its LB frontends.
                let mut r = family_ranges;
                r.extend(
                    config
                        .node_addresses
                        .iter()
                        .filter(|a| IpFamily::of(a) == family)
                        .map(|a| IpNet::from(*a)),
                );
                r.sort();
                r.dedup();
                r
            };

            let endpoints =
                endpoints::collect(slices, &port_name, protocol, family, config, warnings);
            let sets = endpoints::categorize(
                &endpoints,
                spec.traffic_distribution.as_deref(),
                &config.node_name,
                zone,
            );
            let external_policy_local = etp_local && externally_accessible;
            let health_check =
                health_check_port
                    .filter(|_| external_policy_local)
                    .map(|node_port| HealthCheck {
                        node_port,
                        local_endpoints: endpoints.iter().filter(|e| e.local && e.ready).count(),
                    });
            model.service_ports.insert(
                (family, id.clone()),
                ServicePort {
                    id: id.clone(),
                    family,
                    frontends: fitted(frontends),
                    endpoints: fitted(endpoints),
                    cluster_backends: fitted(sets.cluster),
                    local_backends: fitted(sets.local),
                    has_any_endpoints: sets.has_any,
                    topology: sets.topology,
                    external_policy_local,
                    internal_policy_local: itp_local,
                    affinity,
                    scheduler,
                    lb_source_ranges: fitted(lb_source_ranges),
                    health_check,
                },
            );
        }
    }
}

/// `v` without spare capacity. Vectors collected from filtered iterators grow by doubling (16
/// slots for 10 backends); the model keeps a ServicePort for as long as its Service is unchanged,
/// 10,000 of them at the scale the agent is measured at.
fn fitted<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}
