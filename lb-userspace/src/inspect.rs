//! A read-only view of the pinned maps for `lbctl`: frontends with their backends, connection
//! counts from conntrack, and summed per-CPU counters. Reading pins directly means it works while
//! the agent is down, and it can never disagree with what the kernel uses.
use std::{collections::BTreeMap, net::SocketAddrV4, path::Path};

use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use lb_common::{
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING},
    map_names, net_to_ipv4, net_to_port, proto, CtKey, CtValue, TrafficCounters,
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
    /// Seconds since the last packet (conntrack refreshes at most once a second).
    pub idle_seconds: u64,
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
        let reply_key = CtKey {
            src_addr: v.nat_addr,
            dst_addr: k.src_addr,
            src_port: v.nat_port,
            dst_port: k.src_port,
            proto: k.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        let reply_closing = entries
            .get(&reply_key)
            .is_some_and(|r| r.flags & CT_FLAG_CLOSING != 0);
        let closing = v.flags & CT_FLAG_CLOSING != 0 || reply_closing;
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
            idle_seconds: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
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
        let mut flags = Vec::new();
        if master.flags & lb_common::service::SVC_FLAG_CLUSTER_IP != 0 {
            flags.push("ClusterIP");
        }
        if key.scope == lb_common::service::SCOPE_EXTERNAL {
            // The entry for traffic from outside the node (its backend set and scheduler may
            // differ from the pod-side entry of the same address).
            flags.push("external");
        }
        if master.count == 0 {
            flags.push("no-backends");
        }
        frontends.push(FrontendView {
            address: SocketAddrV4::new(fe.addr, fe.port),
            protocol: protocol_name(fe.proto),
            rev_nat_id: master.rev_nat_id,
            scheduler: if master.flags & lb_common::service::SVC_FLAG_MAGLEV != 0 {
                "maglev"
            } else {
                "random"
            },
            flags,
            counters: fe_stats
                .get(&(master.rev_nat_id as u32))
                .copied()
                .unwrap_or_default(),
            backends: views,
        });
    }
    frontends.sort_by_key(|f| (*f.address.ip(), f.address.port(), f.protocol.clone()));
    flows.sort_by_key(|f| (f.frontend, f.client, f.protocol.clone()));
    Ok(Snapshot { frontends, flows })
}

/// `ipvsadm -Ln`-style table.
pub fn services_table(s: &Snapshot) -> String {
    let mut out = String::from("Prot Frontend              Scheduler Flags\n  -> Backend               Id       ActiveConn InActConn\n");
    for f in &s.frontends {
        out.push_str(&format!(
            "{:<4} {:<21} {:<9} {}\n",
            f.protocol,
            f.address.to_string(),
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
        "Prot Frontend                 Conns   InPkts  OutPkts  InBytes OutBytes\n  -> Backend\n",
    );
    let row = |name: String, c: &Counters| {
        format!(
            "{name:<30} {:>7} {:>8} {:>8} {:>8} {:>8}\n",
            c.new_flows, c.packets_in, c.packets_out, c.bytes_in, c.bytes_out
        )
    };
    for f in &s.frontends {
        out.push_str(&row(
            format!("{:<4} {}", f.protocol, f.address),
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
        "Prot Client                Frontend              Backend               State   Idle\n",
    );
    for f in flows {
        out.push_str(&format!(
            "{:<4} {:<21} {:<21} {:<21} {:<7} {}s\n",
            f.protocol,
            f.client.to_string(),
            f.frontend.to_string(),
            f.backend.to_string(),
            if f.closing { "closing" } else { "open" },
            f.idle_seconds
        ));
    }
    out
}
