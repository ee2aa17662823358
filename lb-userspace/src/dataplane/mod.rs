//! From the model to BPF map contents.
//!
//! [`desired`] turns a [`Model`](crate::model::Model) into the frontends and backend lists the
//! maps must hold; the [`Writer`] diffs that against what the maps hold and applies the difference
//! through a [`Dataplane`] in an order that never shows a packet a frontend without backends or a
//! slot that points nowhere. [`bpf::BpfMaps`] is the real thing; [`fake::FakeMaps`] keeps the maps
//! in memory and checks the ordering invariants after every single operation.
pub mod bpf;
pub mod fake;
pub mod maglev;
mod writer;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    service::{
        BACKEND_FLAG_LOCAL, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_CLUSTER_IP,
        SVC_FLAG_EXTERNAL_FE, SVC_FLAG_MAGLEV, SVC_FLAG_MASQUERADE, SVC_FLAG_REJECT_EMPTY,
    },
    BackendValue, RevNatValue, ServiceKey, ServiceValue,
};

use crate::model::{FrontendKind, IpFamily, Model, Origin, Protocol, Scheduler, WhenEmpty};
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// The ServicePort it belongs to, for logs and dumps.
    pub service_port: String,
    pub backends: Vec<BackendAddr>,
    pub flags: u16,
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
        if sp.family != IpFamily::V4 || sp.id.protocol == Protocol::Sctp {
            continue;
        }
        let proto = sp.id.protocol.number();
        let local: BTreeSet<SocketAddr> = sp
            .endpoints
            .iter()
            .filter(|e| e.local)
            .map(|e| e.socket_addr())
            .collect();
        let backends_of = |list: &[SocketAddr]| -> Vec<BackendAddr> {
            list.iter()
                .filter_map(|b| match b {
                    SocketAddr::V4(v4) => Some(BackendAddr {
                        addr: *v4.ip(),
                        port: v4.port(),
                        proto,
                        local: local.contains(b),
                    }),
                    SocketAddr::V6(_) => None,
                })
                .collect()
        };
        for fe in &sp.frontends {
            let IpAddr::V4(addr) = fe.addr else { continue };
            let kind_flag = if fe.kind == FrontendKind::ClusterIp {
                SVC_FLAG_CLUSTER_IP
            } else {
                SVC_FLAG_EXTERNAL_FE
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
                    service_port: sp.id.to_string(),
                    backends: backends_of(internal.backends),
                    flags: kind_flag | empty_flag(&internal) | maglev_flag(Origin::Pod),
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
                        service_port: sp.id.to_string(),
                        backends: backends_of(external.backends),
                        flags: kind_flag
                            | masquerade
                            | empty_flag(&external)
                            | maglev_flag(Origin::External),
                    },
                );
            }
        }
    }
    out
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
    /// Creates zeroed counters for a frontend (keyed by its rev_nat_id) or a backend.
    fn reset_stats(&mut self, of: StatsOf) -> Result<()>;
    fn delete_stats(&mut self, of: StatsOf) -> Result<()>;
    /// Every chunk of every Maglev table.
    fn maglev_chunks(&self) -> Result<Vec<(MaglevKey, MaglevChunk)>>;
    fn put_maglev_chunk(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<()>;
    fn delete_maglev_chunk(&mut self, key: MaglevKey) -> Result<()>;
}

/// Whose counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatsOf {
    Frontend(u16),
    Backend(u32),
}
