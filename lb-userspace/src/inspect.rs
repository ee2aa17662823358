//! A read-only view of the pinned maps for `lbctl`: frontends with their backends, connection
//! counts from conntrack, and summed per-CPU counters. Reading pins directly means it works while
//! the agent is down, and it can never disagree with what the kernel uses.
use std::{collections::BTreeMap, net::SocketAddrV4, path::Path};

use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use lb_common::{
    conntrack::{reply_key_of, timeout_ns, CT_DIR_FORWARD, CT_FLAG_CLOSING, CT_FLAG_SEEN_REPLY},
    map_names, net_to_ipv4, net_to_port, proto,
    service::{
        BACKEND_FLAG_LOCAL, BACKEND_FLAG_TERMINATING, SCOPE_EXTERNAL, SCOPE_INTERNAL,
        SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_FE, SVC_FLAG_MASQUERADE, SVC_FLAG_REJECT_EMPTY,
        SVC_FLAG_SOURCE_RANGES,
    },
    CtKey, CtValue, ServiceKey, ServiceValue, TrafficCounters,
};
use serde::Serialize;

use crate::dataplane::{bpf::BpfMaps, BackendAddr, Dataplane, FrontendAddr};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::Error),
    #[error("{op} {map} under {dir}: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        dir: String,
        source: Box<aya::maps::MapError>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Summed counters, serializable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
}

impl From<TrafficCounters> for Counters {
    fn from(c: TrafficCounters) -> Self {
        Self {
            packets_in: c.packets_in,
            bytes_in: c.bytes_in,
            packets_out: c.packets_out,
            bytes_out: c.bytes_out,
            new_flows: c.new_flows,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: SocketAddrV4,
    /// TCP flows not seen closing.
    pub active_connections: usize,
    /// TCP flows that saw FIN/RST, and UDP flows (as ipvsadm counts them).
    pub inactive_connections: usize,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize)]
pub struct FrontendView {
    pub address: SocketAddrV4,
    pub protocol: String,
    /// `internal` (traffic from this node's pods) or `external` (from outside the node).
    pub scope: String,
    pub rev_nat_id: u16,
    pub scheduler: &'static str,
    pub flags: Vec<&'static str>,
    pub counters: Counters,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowView {
    pub protocol: String,
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub backend: SocketAddrV4,
    pub backend_id: u32,
    pub closing: bool,
    /// `syn` (TCP, no answer yet), `established` (TCP), `closing` (TCP after FIN or RST), or
    /// `open` (UDP): the state whose timeout applies.
    pub state: &'static str,
    /// Seconds since the last packet either way (refreshed at most once a second).
    pub idle_seconds: u64,
    /// Seconds left before the flow expires if it stays idle.
    pub expires_in_seconds: u64,
}

/// Everything lbctl shows, read once.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub frontends: Vec<FrontendView>,
    pub flows: Vec<FlowView>,
}

pub fn protocol_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        other => format!("proto-{other}"),
    }
}

/// `internal` or `external`: which traffic a frontend entry serves.
pub fn scope_name(scope: u8) -> String {
    match scope {
        SCOPE_INTERNAL => "internal".into(),
        SCOPE_EXTERNAL => "external".into(),
        other => format!("scope-{other}"),
    }
}

/// The names of a frontend's `SVC_FLAG_*` bits, plus `no-backends` when it has no slot.
pub fn frontend_flags(master: &ServiceValue) -> Vec<&'static str> {
    let mut flags = Vec::new();
    for (bit, name) in [
        (SVC_FLAG_CLUSTER_IP, "ClusterIP"),
        (SVC_FLAG_EXTERNAL_FE, "external-frontend"),
        (SVC_FLAG_MASQUERADE, "masquerade"),
        (SVC_FLAG_SOURCE_RANGES, "source-ranges"),
    ] {
        if master.flags & bit != 0 {
            flags.push(name);
        }
    }
    if master.count == 0 {
        flags.push("no-backends");
        if master.flags & SVC_FLAG_REJECT_EMPTY != 0 {
            flags.push("reject");
        }
    }
    flags
}

/// The names of a backend's `BACKEND_FLAG_*` bits.
pub fn backend_flags(flags: u8) -> Vec<&'static str> {
    [
        (BACKEND_FLAG_LOCAL, "local"),
        (BACKEND_FLAG_TERMINATING, "terminating"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC is what
    // bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Reads the maps pinned under `dir`.
pub fn read(dir: &Path) -> Result<Snapshot> {
    let maps = BpfMaps::from_pins(dir)?;
    let map_err = |op, map: &'static str| {
        let dir = dir.display().to_string();
        move |source| Error::Map {
            op,
            map,
            dir,
            source: Box::new(source),
        }
    };
    let ct_data = MapData::from_pin(dir.join(map_names::CONNTRACK))
        .map_err(map_err("open", map_names::CONNTRACK))?;
    let conntrack: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(ct_data))
        .map_err(map_err("open", map_names::CONNTRACK))?;
    let entries: BTreeMap<CtKey, CtValue> = conntrack
        .iter()
        .collect::<std::result::Result<_, _>>()
        .map_err(map_err("iterate", map_names::CONNTRACK))?;
    let sum = |map: &PerCpuHashMap<MapData, u32, TrafficCounters>,
               name|
     -> Result<BTreeMap<u32, Counters>> {
        map.iter()
            .map(|e| e.map(|(k, v)| (k, TrafficCounters::sum(v.iter()).into())))
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err("iterate", name))
    };
    let fe_stats = sum(&maps.frontend_stats, map_names::FRONTEND_STATS)?;
    let be_stats = sum(&maps.backend_stats, map_names::BACKEND_STATS)?;

    let now = monotonic_ns();
    let mut flows = Vec::new();
    // (active, inactive) per frontend (rev_nat_id) and backend id: a backend shared by several
    // frontends has separate counts under each, as ipvsadm shows them per virtual server.
    let mut conns: BTreeMap<(u16, u32), (usize, usize)> = BTreeMap::new();
    for (k, v) in entries.iter().filter(|(k, _)| k.dir == CT_DIR_FORWARD) {
        let reply = entries.get(&reply_key_of(k, v));
        let flags = v.flags | reply.map_or(0, |r| r.flags);
        let last_seen = v.last_seen_ns.max(reply.map_or(0, |r| r.last_seen_ns));
        let closing = flags & CT_FLAG_CLOSING != 0;
        let state = match (k.proto, closing, flags & CT_FLAG_SEEN_REPLY != 0) {
            (proto::TCP, true, _) => "closing",
            (proto::TCP, false, true) => "established",
            (proto::TCP, false, false) => "syn",
            _ => "open",
        };
        let idle_ns = now.saturating_sub(last_seen);
        let c = conns.entry((v.rev_nat_id, v.backend_id)).or_default();
        if k.proto == proto::TCP && !closing {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
        let sock = |a: u32, p: u16| SocketAddrV4::new(net_to_ipv4(a), net_to_port(p));
        flows.push(FlowView {
            protocol: protocol_name(k.proto),
            client: sock(k.src_addr, k.src_port),
            frontend: sock(k.dst_addr, k.dst_port),
            backend: sock(v.nat_addr, v.nat_port),
            backend_id: v.backend_id,
            closing,
            state,
            idle_seconds: idle_ns / 1_000_000_000,
            expires_in_seconds: timeout_ns(k.proto, flags).saturating_sub(idle_ns) / 1_000_000_000,
        });
    }

    let backends: BTreeMap<u32, BackendAddr> = maps
        .backends()?
        .into_iter()
        .map(|(id, v)| (id, BackendAddr::from_value(&v)))
        .collect();
    let services: BTreeMap<_, _> = maps.services()?.into_iter().collect();
    let mut frontends = Vec::new();
    for (key, master) in services.iter().filter(|(k, _)| k.slot == 0) {
        let fe = FrontendAddr::from_key(key);
        let mut views = Vec::new();
        for slot in 1..=master.count {
            let Some(slot_value) = services.get(&lb_common::ServiceKey { slot, ..*key }) else {
                continue;
            };
            let id = slot_value.backend_id;
            let Some(b) = backends.get(&id) else { continue };
            let (active, inactive) = conns
                .get(&(master.rev_nat_id, id))
                .copied()
                .unwrap_or_default();
            views.push(BackendView {
                id,
                address: SocketAddrV4::new(b.addr, b.port),
                active_connections: active,
                inactive_connections: inactive,
                counters: be_stats.get(&id).copied().unwrap_or_default(),
            });
        }
        frontends.push(FrontendView {
            address: SocketAddrV4::new(fe.addr, fe.port),
            protocol: protocol_name(fe.proto),
            scope: scope_name(fe.scope),
            rev_nat_id: master.rev_nat_id,
            scheduler: if master.flags & lb_common::service::SVC_FLAG_MAGLEV != 0 {
                "maglev"
            } else {
                "random"
            },
            flags: frontend_flags(master),
            counters: fe_stats
                .get(&(master.rev_nat_id as u32))
                .copied()
                .unwrap_or_default(),
            backends: views,
        });
    }
    frontends.sort_by_key(|f| {
        (
            *f.address.ip(),
            f.address.port(),
            f.protocol.clone(),
            f.scope.clone(),
        )
    });
    flows.sort_by_key(|f| (f.frontend, f.client, f.protocol.clone()));
    Ok(Snapshot { frontends, flows })
}

/// `ipvsadm -Ln`-style table.
pub fn services_table(s: &Snapshot) -> String {
    let mut out = String::from(
        "Prot Frontend              Scope    Scheduler Flags\n  -> Backend               Id       ActiveConn InActConn\n",
    );
    for f in &s.frontends {
        out.push_str(&format!(
            "{:<4} {:<21} {:<8} {:<9} {}\n",
            f.protocol,
            f.address.to_string(),
            f.scope,
            f.scheduler,
            f.flags.join(",")
        ));
        for b in &f.backends {
            out.push_str(&format!(
                "  -> {:<21} {:<8} {:<10} {}\n",
                b.address.to_string(),
                b.id,
                b.active_connections,
                b.inactive_connections
            ));
        }
    }
    out
}

/// `ipvsadm -Ln --stats`-style table.
pub fn stats_table(s: &Snapshot) -> String {
    let mut out = String::from(
        "Prot Frontend              Scope       Conns   InPkts  OutPkts  InBytes OutBytes\n  -> Backend\n",
    );
    let row = |name: String, c: &Counters| {
        format!(
            "{name:<36} {:>7} {:>8} {:>8} {:>8} {:>8}\n",
            c.new_flows, c.packets_in, c.packets_out, c.bytes_in, c.bytes_out
        )
    };
    for f in &s.frontends {
        out.push_str(&row(
            format!(
                "{:<4} {:<21} {}",
                f.protocol,
                f.address.to_string(),
                f.scope
            ),
            &f.counters,
        ));
        for b in &f.backends {
            out.push_str(&row(format!("  -> {}", b.address), &b.counters));
        }
    }
    out
}

/// One line per tracked flow.
pub fn conntrack_table(flows: &[&FlowView]) -> String {
    let mut out = String::from(
        "Prot Client                Frontend              Backend               State       Idle  Expires\n",
    );
    for f in flows {
        out.push_str(&format!(
            "{:<4} {:<21} {:<21} {:<21} {:<11} {:<5} {}s\n",
            f.protocol,
            f.client.to_string(),
            f.frontend.to_string(),
            f.backend.to_string(),
            f.state,
            format!("{}s", f.idle_seconds),
            f.expires_in_seconds
        ));
    }
    out
}

/// One backend slot of a frontend in [`dump`]. A slot whose backend id is not in the backends
/// map (which the agent's update order never leaves behind) shows as `missing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DumpSlot {
    pub slot: u16,
    pub backend_id: u32,
    pub address: Option<SocketAddrV4>,
    pub flags: Vec<&'static str>,
    pub missing: bool,
}

/// One frontend entry (master slot and its backend slots) in [`dump`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DumpFrontend {
    pub address: SocketAddrV4,
    pub protocol: String,
    pub scope: String,
    pub rev_nat_id: u16,
    pub flags: Vec<&'static str>,
    /// Session-affinity timeout in seconds, 0 when affinity is off.
    pub affinity_timeout: u32,
    pub slots: Vec<DumpSlot>,
}

/// The service and backend maps in canonical form: frontends sorted by address, port, protocol
/// and scope; slots in order. Counters and conntrack are left out, so two dumps of the same
/// programmed state are equal whatever the traffic.
pub fn dump(maps: &impl Dataplane) -> Result<Vec<DumpFrontend>> {
    let backends: BTreeMap<u32, lb_common::BackendValue> = maps.backends()?.into_iter().collect();
    let services: BTreeMap<ServiceKey, ServiceValue> = maps.services()?.into_iter().collect();
    let mut out = Vec::new();
    for (key, master) in services.iter().filter(|(k, _)| k.slot == 0) {
        let fe = FrontendAddr::from_key(key);
        let slots = (1..=master.count)
            .map(|slot| {
                let id = services
                    .get(&ServiceKey { slot, ..*key })
                    .map(|v| v.backend_id)
                    .unwrap_or(0);
                match backends.get(&id) {
                    Some(b) => {
                        let addr = BackendAddr::from_value(b);
                        DumpSlot {
                            slot,
                            backend_id: id,
                            address: Some(SocketAddrV4::new(addr.addr, addr.port)),
                            flags: backend_flags(b.flags),
                            missing: false,
                        }
                    }
                    None => DumpSlot {
                        slot,
                        backend_id: id,
                        address: None,
                        flags: Vec::new(),
                        missing: true,
                    },
                }
            })
            .collect();
        out.push((
            fe,
            DumpFrontend {
                address: SocketAddrV4::new(fe.addr, fe.port),
                protocol: protocol_name(fe.proto),
                scope: scope_name(fe.scope),
                rev_nat_id: master.rev_nat_id,
                flags: frontend_flags(master),
                affinity_timeout: master.affinity_timeout,
                slots,
            },
        ));
    }
    out.sort_by_key(|(fe, _)| *fe);
    Ok(out.into_iter().map(|(_, d)| d).collect())
}

/// [`dump`] as text: one line per frontend, one per slot.
pub fn dump_text(frontends: &[DumpFrontend]) -> String {
    let mut out = String::new();
    for f in frontends {
        let flags = if f.flags.is_empty() {
            "-".to_string()
        } else {
            f.flags.join(",")
        };
        out.push_str(&format!(
            "{}/{} {} rev_nat={} flags={} affinity={}s backends={}\n",
            f.address,
            f.protocol,
            f.scope,
            f.rev_nat_id,
            flags,
            f.affinity_timeout,
            f.slots.len()
        ));
        for s in &f.slots {
            match s.address {
                Some(addr) if !s.missing => {
                    out.push_str(&format!(
                        "  slot {}: backend {} {addr}{}\n",
                        s.slot,
                        s.backend_id,
                        if s.flags.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", s.flags.join(","))
                        }
                    ));
                }
                _ => out.push_str(&format!(
                    "  slot {}: backend {} MISSING\n",
                    s.slot, s.backend_id
                )),
            }
        }
    }
    out
}
