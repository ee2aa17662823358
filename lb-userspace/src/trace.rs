//! `lbctl trace`: what would the data path do with a packet from SRC to DST:PORT/PROTO? The real
//! tc program runs on a synthesized packet through BPF_PROG_TEST_RUN against the live pinned maps,
//! so the answer can never disagree with the data path. The packet carries the trace mark
//! ([`lb_common::TRACE_MARK`]), which makes the program decide without recording anything: no
//! conntrack entry and no counter is left behind.
use std::{
    net::{IpAddr, SocketAddrV4},
    path::Path,
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions},
};
use lb_common::{
    conntrack::CT_DIR_FORWARD,
    ipv4_to_net,
    maglev::{MaglevKey, CHUNK_SLOTS},
    map_names, port_to_net, proto,
    service::{SVC_FLAG_MAGLEV, SVC_FLAG_SOURCE_RANGES},
    AffinityKey, AffinityValue, CtKey, CtValue, ServiceKey, SourceRangeKey,
};
use serde::Serialize;

use crate::{
    dataplane::{bpf::BpfMaps, Dataplane, FrontendAddr},
    inspect::protocol_name,
    loader,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no pinned map {0}: is an agent running with this --bpffs directory?")]
    NotPinned(String),
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::Error),
    #[error("reading {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("BPF_PROG_TEST_RUN: {0}")]
    TestRun(aya::programs::ProgramError),
    #[error("building the trace packet: {0}")]
    Packet(String),
}

/// What the data path would do, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    pub protocol: String,
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    /// `pass`, `drop`, `reject` or `dnat`.
    pub verdict: &'static str,
    /// The backend the packet was sent to, for `dnat`.
    pub backend: Option<SocketAddrV4>,
    /// Slot of that backend in the frontend (1-based), and how many there are.
    pub slot: Option<u16>,
    pub backends: Option<u16>,
    /// `maglev` or `random`: how the frontend picks a backend for new flows.
    pub scheduler: Option<&'static str>,
    /// For a Maglev frontend: the flow's slot in the table (0-based) and its table size.
    pub maglev_slot: Option<u32>,
    pub maglev_table_size: Option<u32>,
    pub reason: String,
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// The program sent the packet elsewhere: a reject (the answer goes back to the client), or a
/// hairpin flow the program routes itself.
const TC_ACT_REDIRECT: u32 = 7;

fn packet(src: SocketAddrV4, dst: SocketAddrV4, protocol: u8) -> Result<Vec<u8>, Error> {
    let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.ip().octets(), dst.ip().octets(), 64);
    let mut out = Vec::new();
    let written = match protocol {
        proto::TCP => builder
            .tcp(src.port(), dst.port(), 1, 64240)
            .syn()
            .write(&mut out, &[]),
        proto::UDP => builder
            .udp(src.port(), dst.port())
            .write(&mut out, b"lbctl trace"),
        other => {
            return Err(Error::Packet(format!(
                "protocol {other} is not traced (TCP and UDP are)"
            )))
        }
    };
    written.map_err(|e| Error::Packet(e.to_string()))?;
    Ok(out)
}

/// Runs the data path on one synthesized packet against the maps pinned under `bpffs`.
pub fn trace(
    bpffs: &Path,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    protocol: u8,
) -> Result<Trace, Error> {
    // Loading with pins that do not exist would create empty maps: refuse instead.
    for name in [
        map_names::SERVICES,
        map_names::BACKENDS,
        map_names::REV_NAT,
        map_names::CONNTRACK,
        map_names::SOURCE_RANGES,
    ] {
        if !bpffs.join(name).exists() {
            return Err(Error::NotPinned(bpffs.join(name).display().to_string()));
        }
    }
    let maps = BpfMaps::from_pins(bpffs)?;
    let ct_data =
        MapData::from_pin(bpffs.join(map_names::CONNTRACK)).map_err(|source| Error::Map {
            map: map_names::CONNTRACK,
            source,
        })?;
    let conntrack: HashMap<_, CtKey, CtValue> = HashMap::try_from(Map::LruHashMap(ct_data))
        .map_err(|source| Error::Map {
            map: map_names::CONNTRACK,
            source,
        })?;
    let key = CtKey {
        src_addr: ipv4_to_net(*src.ip()),
        dst_addr: ipv4_to_net(*dst.ip()),
        src_port: port_to_net(src.port()),
        dst_port: port_to_net(dst.port()),
        proto: protocol,
        dir: CT_DIR_FORWARD,
        _pad: 0,
    };
    let established = conntrack.get(&key, 0).ok();
    // A trace runs the pod-side program: it shows what a packet from a pod on this node hits.
    let fe = FrontendAddr::internal(*dst.ip(), dst.port(), protocol);
    let services: std::collections::BTreeMap<ServiceKey, _> =
        maps.services()?.into_iter().collect();
    let master = services.get(&fe.key(0)).copied();

    // The program must hash with the table size the agent built the tables for.
    let chunks = maps.maglev_chunks()?;
    let table_size = chunks
        .first()
        .map(|(_, c)| c.table_size)
        .unwrap_or(lb_common::maglev::DEFAULT_TABLE_SIZE);
    let maglev = master.filter(|m| m.flags & SVC_FLAG_MAGLEV != 0).map(|m| {
        let slot = crate::dataplane::maglev::slot_of(
            ipv4_to_net(*src.ip()),
            ipv4_to_net(*dst.ip()),
            port_to_net(src.port()),
            port_to_net(dst.port()),
            protocol,
            table_size,
        );
        let key = MaglevKey {
            table: m.rev_nat_id,
            chunk: (slot as usize / CHUNK_SLOTS) as u16,
        };
        let id = chunks
            .iter()
            .find(|(k, c)| *k == key && c.table_size == table_size)
            .map(|(_, c)| c.backend_ids[slot as usize % CHUNK_SLOTS]);
        (slot, id)
    });

    let mut ebpf = loader::load(&loader::LoadOptions {
        bpffs: bpffs.to_path_buf(),
        conntrack_size: lb_common::map_sizes::CONNTRACK,
        reject_limit: loader::RejectLimit::default(),
        maglev_table_size: table_size,
    })?;
    let input = packet(src, dst, protocol)?;
    let mut output = vec![0u8; input.len() + 64];
    // __sk_buff up to and including `mark` (offset 8); len and pkt_type must be zero.
    let mut ctx = [0u8; 12];
    ctx[8..12].copy_from_slice(&lb_common::TRACE_MARK.to_ne_bytes());
    let result = loader::tc_program(&mut ebpf)?
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut output),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .map_err(Error::TestRun)?;
    output.truncate(result.data_size_out as usize);
    let out_dst = etherparse::SlicedPacket::from_ethernet(&output)
        .ok()
        .and_then(|p| match (p.net, p.transport) {
            (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Tcp(t))) => {
                Some(SocketAddrV4::new(
                    ip.header().destination_addr(),
                    t.destination_port(),
                ))
            }
            (Some(etherparse::NetSlice::Ipv4(ip)), Some(etherparse::TransportSlice::Udp(u))) => {
                Some(SocketAddrV4::new(
                    ip.header().destination_addr(),
                    u.destination_port(),
                ))
            }
            _ => None,
        });

    let mut t = Trace {
        protocol: protocol_name(protocol),
        source: src,
        destination: dst,
        verdict: "pass",
        backend: None,
        slot: None,
        backends: master.map(|m| m.count),
        scheduler: master.map(|m| {
            if m.flags & SVC_FLAG_MAGLEV != 0 {
                "maglev"
            } else {
                "random"
            }
        }),
        maglev_slot: maglev.map(|(slot, _)| slot),
        maglev_table_size: maglev.map(|_| table_size),
        reason: String::new(),
    };
    let rewritten = out_dst.filter(|d| *d != dst);
    let outside_ranges = match master {
        Some(m) if m.flags & SVC_FLAG_SOURCE_RANGES != 0 => {
            let key = aya::maps::lpm_trie::Key::new(
                SourceRangeKey::ID_BITS + 32,
                SourceRangeKey::new(m.rev_nat_id, ipv4_to_net(*src.ip())),
            );
            maps.source_ranges.get(&key, 0).is_err()
        }
        _ => false,
    };
    match (result.return_value, rewritten) {
        (TC_ACT_REDIRECT, _) if master.is_some_and(|m| m.count == 0) => {
            t.verdict = "reject";
            t.reason = format!(
                "frontend {dst}/{} belongs to a Service without endpoints: new flows are refused \
                 with {} (rate-limited per CPU)",
                t.protocol,
                if protocol == proto::TCP {
                    "a TCP reset"
                } else {
                    "an ICMP port unreachable"
                }
            );
        }
        (TC_ACT_SHOT, _) => {
            t.verdict = "drop";
            t.reason = match master {
                _ if outside_ranges => format!(
                    "source range: {} is outside the loadBalancerSourceRanges of frontend {dst}/{}",
                    src.ip(),
                    t.protocol
                ),
                Some(m) if m.count == 0 => format!(
                    "frontend {dst}/{} has no usable backend: new flows are dropped",
                    t.protocol
                ),
                _ => "dropped".into(),
            };
        }
        (TC_ACT_OK | TC_ACT_REDIRECT, Some(backend)) => {
            t.verdict = "dnat";
            t.backend = Some(backend);
            let backends: std::collections::BTreeMap<u32, _> =
                maps.backends()?.into_iter().collect();
            t.slot = master.and_then(|m| {
                (1..=m.count).find(|&s| {
                    services
                        .get(&fe.key(s))
                        .and_then(|v| backends.get(&v.backend_id))
                        .is_some_and(|b| {
                            lb_common::net_to_ipv4(b.addr) == *backend.ip()
                                && lb_common::net_to_port(b.port) == backend.port()
                        })
                })
            });
            let affinity = master.filter(|m| m.affinity_timeout != 0).map(|m| {
                (
                    m.affinity_timeout,
                    affinity_entry(bpffs, src, m.affinity_group),
                )
            });
            let maglev_backend = maglev
                .and_then(|(_, id)| id)
                .and_then(|id| backends.get(&id));
            let slot = t.slot.map(|s| s.to_string()).unwrap_or_else(|| "?".into());
            // Affinity is checked first in the data path; when it has no usable entry the
            // scheduler (Maglev or random) decides.
            let no_affinity = match affinity {
                Some((timeout, _)) => format!(
                    "session affinity (ClientIP, {timeout} s) has no usable entry for this client, so "
                ),
                None => String::new(),
            };
            t.reason = match (established, affinity, maglev) {
                (Some(_), _, _) => format!("established flow: conntrack keeps it on {backend}"),
                (None, Some((timeout, Some((entry, age)))), _) if entry == backend => format!(
                    "new flow to frontend {dst}/{}: session affinity (ClientIP, {timeout} s): this client's last new connection, {age} s ago, went to {backend} (slot {slot})",
                    t.protocol,
                ),
                (None, _, Some((mslot, _))) => match maglev_backend {
                    Some(b)
                        if lb_common::net_to_ipv4(b.addr) == *backend.ip()
                            && lb_common::net_to_port(b.port) == backend.port() =>
                    {
                        format!(
                            "new flow to frontend {dst}/{}: {no_affinity}Maglev slot {mslot} (of {table_size}) -> backend {backend}; the same tuple always gets this backend while the backend set is unchanged",
                            t.protocol
                        )
                    }
                    _ => format!(
                        "new flow to frontend {dst}/{}: {no_affinity}Maglev slot {mslot} (of {table_size}) has no usable entry (table being rebuilt): random choice picked {backend}",
                        t.protocol
                    ),
                },
                (None, _, None) => format!(
                    "new flow to frontend {dst}/{}: {no_affinity}random choice among {} backends picked {backend} (slot {slot}); another run may pick another",
                    t.protocol,
                    t.backends.unwrap_or(0),
                ),
            };
            if src.ip() == backend.ip() {
                t.reason.push_str(
                    "; hairpin: the client is the backend, so the flow is source-NATed to the frontend address",
                );
            }
        }
        (TC_ACT_OK, None) => {
            t.reason = match master {
                None => format!(
                    "no frontend {dst}/{}: not load-balanced, passes untouched",
                    t.protocol
                ),
                Some(_) => "passes untouched".into(),
            };
        }
        (other, _) => t.reason = format!("unexpected verdict {other}"),
    }
    Ok(t)
}

/// The backend the affinity map names for `client` in `group`, and how many seconds ago it was
/// last used; `None` when there is no entry (or the map cannot be read).
fn affinity_entry(bpffs: &Path, client: SocketAddrV4, group: u16) -> Option<(SocketAddrV4, u64)> {
    let data = MapData::from_pin(bpffs.join(map_names::AFFINITY)).ok()?;
    let map: HashMap<_, AffinityKey, AffinityValue> =
        HashMap::try_from(Map::LruHashMap(data)).ok()?;
    let key = AffinityKey {
        client_addr: ipv4_to_net(*client.ip()),
        group,
        _pad: 0,
    };
    let v = map.get(&key, 0).ok()?;
    let age = crate::conntrack_gc::monotonic_ns().saturating_sub(v.last_used_ns) / 1_000_000_000;
    Some((
        SocketAddrV4::new(
            lb_common::net_to_ipv4(v.backend_addr),
            lb_common::net_to_port(v.backend_port),
        ),
        age,
    ))
}

/// Parses `ADDR:PORT/PROTO` (PROTO is tcp or udp, default tcp).
pub fn parse_destination(s: &str) -> Option<(SocketAddrV4, u8)> {
    let (addr, protocol) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p.to_ascii_lowercase()),
        None => (s, "tcp".to_string()),
    };
    let protocol = match protocol.as_str() {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        _ => return None,
    };
    Some((addr.parse().ok()?, protocol))
}

/// Parses a source `ADDR` or `ADDR:PORT` (port defaults to 40000).
pub fn parse_source(s: &str) -> Option<SocketAddrV4> {
    s.parse().ok().or_else(|| match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Some(SocketAddrV4::new(a, 40000)),
        _ => None,
    })
}
