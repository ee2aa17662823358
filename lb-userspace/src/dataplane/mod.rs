//! From the model to BPF map contents.
//!
//! [`desired`] turns a [`Model`](crate::model::Model) into the frontends and backend lists the
//! maps must hold; the [`Writer`] diffs that against what the maps hold and applies the difference
//! through a [`Dataplane`] in an order that never shows a packet a frontend without backends or a
//! slot that points nowhere. [`bpf::BpfMaps`] is the real thing; [`fake::FakeMaps`] keeps the maps
//! in memory and checks the ordering invariants after every single operation.
pub mod bpf;
pub mod fake;
mod writer;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use lb_common::{BackendValue, RevNatValue, ServiceKey, ServiceValue};

use crate::model::{FrontendKind, IpFamily, Model, Origin, Protocol};
pub use writer::{ApplyStats, Writer};

/// A frontend as the maps see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

/// A backend as the maps see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl BackendAddr {
    pub fn to_value(self) -> BackendValue {
        BackendValue {
            addr: lb_common::ipv4_to_net(self.addr),
            port: lb_common::port_to_net(self.port),
            proto: self.proto,
            flags: 0,
        }
    }

    pub fn from_value(v: &BackendValue) -> Self {
        Self {
            addr: lb_common::net_to_ipv4(v.addr),
            port: lb_common::net_to_port(v.port),
            proto: v.proto,
        }
    }
}

impl FrontendAddr {
    pub fn key(self, slot: u16) -> ServiceKey {
        ServiceKey::new(
            lb_common::ipv4_to_net(self.addr),
            lb_common::port_to_net(self.port),
            self.proto,
            lb_common::service::SCOPE_INTERNAL,
            slot,
        )
    }

    pub fn from_key(k: &ServiceKey) -> Self {
        Self {
            addr: lb_common::net_to_ipv4(k.addr),
            port: lb_common::net_to_port(k.port),
            proto: k.proto,
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

/// Translates the model into per-frontend backend lists for what the data path carries today:
/// IPv4 ClusterIP frontends for TCP and UDP, with the backends a pod's new flow may use
/// ([`crate::model::ServicePort::traffic`] from [`Origin::Pod`], so internalTrafficPolicy=Local is honoured).
/// NodePort, LoadBalancer and externalIP frontends wait for the XDP path; IPv6 and SCTP for their
/// own data path (the model already warned about SCTP).
pub fn desired(model: &Model) -> Desired {
    let mut out = Desired::new();
    for sp in model.service_ports.values() {
        if sp.family != IpFamily::V4 || sp.id.protocol == Protocol::Sctp {
            continue;
        }
        let proto = sp.id.protocol.number();
        for fe in sp
            .frontends
            .iter()
            .filter(|f| f.kind == FrontendKind::ClusterIp)
        {
            let IpAddr::V4(addr) = fe.addr else { continue };
            let traffic = sp.traffic(fe, Origin::Pod);
            let backends = traffic
                .backends
                .iter()
                .filter_map(|b| match b {
                    SocketAddr::V4(v4) => Some(BackendAddr {
                        addr: *v4.ip(),
                        port: v4.port(),
                        proto,
                    }),
                    SocketAddr::V6(_) => None,
                })
                .collect();
            out.insert(
                FrontendAddr {
                    addr,
                    port: fe.port,
                    proto,
                },
                DesiredFrontend {
                    service_port: sp.id.to_string(),
                    backends,
                    flags: lb_common::service::SVC_FLAG_CLUSTER_IP,
                },
            );
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
}

/// Whose counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatsOf {
    Frontend(u16),
    Backend(u32),
}
