//! From the model to BPF map contents.
//!
//! [`desired`] turns a [`Model`](crate::model::Model) into the frontends and backend lists the
//! maps must hold; the [`Writer`] diffs that against what the maps hold and applies the difference
//! through a [`Dataplane`] in an order that never shows a packet a frontend without backends or a
//! slot that points nowhere. [`bpf::BpfMaps`] is the real thing; [`fake::FakeMaps`] keeps the maps
//! in memory and checks the ordering invariants after every single operation.
mod batch;
pub mod bpf;
pub mod fake;
pub mod maglev;
mod writer;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use ipnet::{IpNet, Ipv4Net};
use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    service::{
        BACKEND_FLAG_LOCAL, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_CLUSTER_IP,
        SVC_FLAG_EXTERNAL_FE, SVC_FLAG_LOCAL_BACKENDS, SVC_FLAG_MAGLEV, SVC_FLAG_MASQUERADE,
        SVC_FLAG_REJECT_EMPTY, SVC_FLAG_SOURCE_RANGES,
    },
    BackendValue, RevNatValue, ServiceKey, ServiceValue,
};

use crate::model::{
    FrontendKind, IpFamily, Model, Origin, Protocol, Scheduler, ServicePort, WhenEmpty,
};
pub use batch::{Batched, Puts};
pub use writer::{ApplyStats, Writer};

/// A frontend as the maps see it: address, port, protocol and the traffic it serves
/// ([`SCOPE_INTERNAL`]: from this node's pods; [`SCOPE_EXTERNAL`]: from outside the node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// A backend as the maps see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// The endpoint runs on this node: external traffic to it is not source-NATed.
    pub local: bool,
}

impl BackendAddr {
    pub fn to_value(self) -> BackendValue {
        BackendValue {
            addr: lb_common::ipv4_to_net(self.addr),
            port: lb_common::port_to_net(self.port),
            proto: self.proto,
            flags: if self.local { BACKEND_FLAG_LOCAL } else { 0 },
        }
    }

    pub fn from_value(v: &BackendValue) -> Self {
        Self {
            addr: lb_common::net_to_ipv4(v.addr),
            port: lb_common::net_to_port(v.port),
            proto: v.proto,
            local: v.flags & BACKEND_FLAG_LOCAL != 0,
        }
    }
}

impl FrontendAddr {
    /// A frontend for traffic from this node's pods.
    pub fn internal(addr: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            scope: SCOPE_INTERNAL,
        }
    }

    /// A frontend for traffic from outside the node.
    pub fn external(addr: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port,
            proto,
            scope: SCOPE_EXTERNAL,
        }
    }

    pub fn key(self, slot: u16) -> ServiceKey {
        ServiceKey::new(
            lb_common::ipv4_to_net(self.addr),
            lb_common::port_to_net(self.port),
            self.proto,
            self.scope,
            slot,
        )
    }

    pub fn from_key(k: &ServiceKey) -> Self {
        Self {
            addr: lb_common::net_to_ipv4(k.addr),
            port: lb_common::net_to_port(k.port),
            proto: k.proto,
            scope: k.scope,
        }
    }

    pub fn rev_nat_value(self) -> RevNatValue {
        RevNatValue {
            addr: lb_common::ipv4_to_net(self.addr),
            port: lb_common::port_to_net(self.port),
            _pad: 0,
        }
    }
}

/// What one frontend must carry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DesiredFrontend {
    /// The ServicePort it belongs to, for logs and dumps.
    pub service_port: String,
    /// The backends new flows may get, one slot each.
    pub backends: Vec<BackendAddr>,
    pub flags: u16,
    /// The ServicePort's other serving endpoints (terminating ones, ones outside this traffic's
    /// set): not in the slots, but kept in the backends map so that UDP flows already on them
    /// stay there. (TCP flows keep their backend in any case.)
    pub draining: Vec<BackendAddr>,
    /// Backends, in `backends` or `draining`, whose endpoint is terminating: session affinity
    /// does not return new connections to them.
    pub terminating: BTreeSet<BackendAddr>,
    pub affinity: Option<AffinityWant>,
    /// The only sources new flows may come from (loadBalancerSourceRanges of a LoadBalancer
    /// frontend); empty means any. Non-empty goes with [`SVC_FLAG_SOURCE_RANGES`].
    pub source_ranges: Vec<Ipv4Net>,
}

/// ClientIP session affinity of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AffinityWant {
    pub timeout_seconds: u32,
    /// The frontend whose rev_nat_id keys the affinity map for the whole ServicePort (its
    /// ClusterIP frontend), so that a client sticks to one backend whichever frontend it uses.
    pub group: FrontendAddr,
}

/// The desired map contents, keyed by frontend.
pub type Desired = BTreeMap<FrontendAddr, DesiredFrontend>;

/// Translates the model into per-frontend backend lists for what the data path carries: IPv4
/// TCP and UDP frontends. Every frontend (ClusterIP, NodePort, LoadBalancer, externalIP) gets an
/// internal entry with the backends a pod's new flow may use ([`Origin::Pod`]: so
/// internalTrafficPolicy=Local is honoured, and pods reach eTP=Local services through the cluster
/// set as kube-proxy does); NodePort, LoadBalancer and externalIP frontends also get an external
/// entry with the backends traffic from outside may use ([`Origin::External`]: local ones only
/// under eTP=Local) and the masquerade flag. IPv6 and SCTP wait for their own data path (the
/// model already warned about SCTP). [`SVC_FLAG_MAGLEV`] follows the Service's scheduler for
/// each scope (by default Maglev for the external entry, random for the internal one).
pub fn desired(model: &Model) -> Desired {
    let mut out = Desired::new();
    for sp in model.service_ports.values() {
        desired_of(sp, &mut out);
    }
    out
}

/// The frontends whose desired content differs between two versions of some ServicePorts
/// (`(before, after)` per ServicePort, as [`crate::model::incremental::changed_ports`] gives):
/// `Some` for a frontend to write, `None` for one to remove.
pub fn desired_changes<'a>(
    ports: impl IntoIterator<Item = (Option<&'a ServicePort>, Option<&'a ServicePort>)>,
) -> BTreeMap<FrontendAddr, Option<DesiredFrontend>> {
    let (mut before, mut after) = (Desired::new(), Desired::new());
    for (old, new) in ports {
        if let Some(sp) = old {
            desired_of(sp, &mut before);
        }
        if let Some(sp) = new {
            desired_of(sp, &mut after);
        }
    }
    let mut out: BTreeMap<FrontendAddr, Option<DesiredFrontend>> = before
        .keys()
        .filter(|fe| !after.contains_key(fe))
        .map(|fe| (*fe, None))
        .collect();
    for (fe, want) in after {
        if before.get(&fe) != Some(&want) {
            out.insert(fe, Some(want));
        }
    }
    out
}

/// Adds the frontends of one ServicePort to `out` (see [`desired`]).
pub fn desired_of(sp: &ServicePort, out: &mut Desired) {
    if sp.family != IpFamily::V4 || sp.id.protocol == Protocol::Sctp {
        return;
    }
    {
        let proto = sp.id.protocol.number();
        let local: BTreeSet<SocketAddr> = sp
            .endpoints
            .iter()
            .filter(|e| e.local)
            .map(|e| e.socket_addr())
            .collect();
        let serving: Vec<SocketAddr> = sp
            .endpoints
            .iter()
            .filter(|e| e.ready || e.serving)
            .map(|e| e.socket_addr())
            .collect();
        let terminating_eps: BTreeSet<SocketAddr> = sp
            .endpoints
            .iter()
            .filter(|e| e.terminating && (e.ready || e.serving))
            .map(|e| e.socket_addr())
            .collect();
        let group = sp
            .frontends
            .iter()
            .filter(|f| f.addr.is_ipv4())
            .min_by_key(|f| f.kind != FrontendKind::ClusterIp)
            .and_then(|f| match f.addr {
                IpAddr::V4(a) => Some(FrontendAddr::internal(a, f.port, proto)),
                IpAddr::V6(_) => None,
            });
        let affinity = sp.affinity.zip(group).map(|(a, group)| AffinityWant {
            timeout_seconds: a.timeout_seconds,
            group,
        });
        // Sized to its content: a desired frontend's backends live until its ServicePort changes.
        let backends_of = |list: &[SocketAddr]| -> Vec<BackendAddr> {
            let mut v: Vec<BackendAddr> = list
                .iter()
                .filter_map(|b| match b {
                    SocketAddr::V4(v4) => Some(BackendAddr {
                        addr: *v4.ip(),
                        port: v4.port(),
                        proto,
                        local: local.contains(b),
                    }),
                    SocketAddr::V6(_) => None,
                })
                .collect();
            v.shrink_to_fit();
            v
        };
        let terminating: BTreeSet<BackendAddr> = backends_of(&serving)
            .into_iter()
            .filter(|b| terminating_eps.contains(&SocketAddr::from((b.addr, b.port))))
            .collect();
        let all_serving = backends_of(&serving);
        let entry = |backends: Vec<BackendAddr>, flags: u16| {
            let local_only = !backends.is_empty() && backends.iter().all(|b| b.local);
            DesiredFrontend {
                service_port: sp.id.to_string(),
                draining: all_serving
                    .iter()
                    .filter(|b| !backends.contains(b))
                    .copied()
                    .collect(),
                backends,
                flags: flags
                    | if local_only {
                        SVC_FLAG_LOCAL_BACKENDS
                    } else {
                        0
                    },
                terminating: terminating.clone(),
                affinity,
                source_ranges: Vec::new(),
            }
        };
        for fe in &sp.frontends {
            let IpAddr::V4(addr) = fe.addr else { continue };
            let kind_flag = if fe.kind == FrontendKind::ClusterIp {
                SVC_FLAG_CLUSTER_IP
            } else {
                SVC_FLAG_EXTERNAL_FE
            };
            // loadBalancerSourceRanges guard the LoadBalancer ingress IPs, from pods and from
            // outside alike, as kube-proxy's firewall chains do.
            let source_ranges: Vec<Ipv4Net> = if fe.kind == FrontendKind::LoadBalancer {
                sp.lb_source_ranges
                    .iter()
                    .filter_map(|r| match r {
                        IpNet::V4(v4) => Some(*v4),
                        IpNet::V6(_) => None,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let range_flag = if source_ranges.is_empty() {
                0
            } else {
                SVC_FLAG_SOURCE_RANGES
            };
            let maglev_flag = |origin| {
                if sp.scheduler_for(origin) == Scheduler::Maglev {
                    SVC_FLAG_MAGLEV
                } else {
                    0
                }
            };
            let internal = sp.traffic(fe, Origin::Pod);
            let empty_flag = |t: &crate::model::Traffic| {
                if t.when_empty == WhenEmpty::Reject {
                    SVC_FLAG_REJECT_EMPTY
                } else {
                    0
                }
            };
            out.insert(
                FrontendAddr::internal(addr, fe.port, proto),
                DesiredFrontend {
                    source_ranges: source_ranges.clone(),
                    ..entry(
                        backends_of(internal.backends),
                        kind_flag | empty_flag(&internal) | range_flag | maglev_flag(Origin::Pod),
                    )
                },
            );
            if fe.kind.is_external() {
                let external = sp.traffic(fe, Origin::External);
                let masquerade = if external.masquerade {
                    SVC_FLAG_MASQUERADE
                } else {
                    0
                };
                out.insert(
                    FrontendAddr::external(addr, fe.port, proto),
                    DesiredFrontend {
                        source_ranges,
                        ..entry(
                            backends_of(external.backends),
                            kind_flag
                                | masquerade
                                | empty_flag(&external)
                                | range_flag
                                | maglev_flag(Origin::External),
                        )
                    },
                );
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} on map {map}: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("no free {what} id: all {max} are in use")]
    IdsExhausted { what: &'static str, max: u32 },
    #[error("the writer needs a full apply first (it was adopted or an apply failed)")]
    NeedsFullApply,
    /// A batch write stopped part way: the first `done` of `total` elements were written.
    #[error("batch update of map {map}: {done} of {total} written, then: {source}")]
    Batch {
        map: &'static str,
        done: usize,
        total: usize,
        source: std::io::Error,
    },
    #[error("fake dataplane: {0}")]
    Fake(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The map operations the writer needs. One implementation per backend store.
pub trait Dataplane {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>>;
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>>;
    fn rev_nats(&self) -> Result<Vec<(u16, RevNatValue)>>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<()>;
    fn put_backend(&mut self, id: u32, value: BackendValue) -> Result<()>;
    fn delete_backend(&mut self, id: u32) -> Result<()>;
    fn put_rev_nat(&mut self, id: u16, value: RevNatValue) -> Result<()>;
    fn delete_rev_nat(&mut self, id: u16) -> Result<()>;
    /// Whose counter entries exist (the data path creates an id's entry at its first packet).
    fn stats_keys(&self) -> Result<Vec<StatsOf>>;
    /// Writes zeroed counters for a frontend (keyed by its rev_nat_id) or a backend: for an id
    /// handed out again whose entry may hold a previous user's counts (the data path creates
    /// the entries of other ids at their first packet).
    fn reset_stats(&mut self, of: StatsOf) -> Result<()>;
    fn delete_stats(&mut self, of: StatsOf) -> Result<()>;
    /// Every source-range entry: (frontend rev_nat_id, range).
    fn source_ranges(&self) -> Result<Vec<(u16, Ipv4Net)>>;
    fn put_source_range(&mut self, rev_nat_id: u16, range: Ipv4Net) -> Result<()>;
    fn delete_source_range(&mut self, rev_nat_id: u16, range: Ipv4Net) -> Result<()>;
    /// Every chunk of every Maglev table.
    fn maglev_chunks(&self) -> Result<Vec<(MaglevKey, MaglevChunk)>>;
    fn put_maglev_chunk(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<()>;
    fn delete_maglev_chunk(&mut self, key: MaglevKey) -> Result<()>;
    /// Writes queued puts map by map in the order [`Puts::write_one_by_one`] uses, each map's
    /// puts in their order; a dataplane with a cheaper bulk write overrides it. Any element
    /// that fails makes the whole call fail (the caller re-reads the maps then).
    fn put_many(&mut self, puts: &Puts) -> Result<()> {
        puts.write_one_by_one(self)
    }
}

/// Whose counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatsOf {
    Frontend(u16),
    Backend(u32),
}
