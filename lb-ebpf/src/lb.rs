//! The load-balancing core shared by every hook: conntrack, service lookup, backend selection.
//! It decides and records state; the hook applies the rewrite.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use lb_common::{
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING},
    service::SCOPE_INTERNAL,
    stats::drop_reason,
    CtKey, CtValue, ServiceKey, TrafficCounters,
};

use crate::{
    maps::{count_drop, BACKENDS, BACKEND_STATS, CONNTRACK, FRONTEND_STATS, SERVICES},
    packet::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// What the hook must do with a packet.
pub enum Verdict {
    /// Not load-balanced traffic: leave it alone.
    Pass,
    /// Drop it (a frontend with no usable backend).
    Drop,
    /// Rewrite the destination (DNAT to a backend).
    Dnat { addr: u32, port: u16 },
    /// Rewrite the source (a backend's reply gets the frontend back).
    RevNat { addr: u32, port: u16 },
}

/// A drop, counted under `reason` unless the packet is a trace.
#[inline(always)]
fn drop(reason: u32, record: bool) -> Verdict {
    if record {
        count_drop(reason);
    }
    Verdict::Drop
}

/// Conntrack `last_seen_ns` is refreshed at most this often, to spare a map write per packet.
const CT_REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
fn ct_key(flow: &Flow, dir: u8) -> CtKey {
    CtKey {
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        dir,
        _pad: 0,
    }
}

/// Refreshes the entry's timestamp (at most once a second) and marks it closing on a TCP FIN or
/// RST. Returns whether the timestamp was renewed, which callers use as their once-a-second tick.
#[inline(always)]
fn refresh(entry: *mut CtValue, now: u64, flow: &Flow) -> bool {
    // SAFETY: `entry` comes from a successful map lookup and points into the map value, which
    // stays valid for the rest of this program run; the writes are plain aligned stores.
    unsafe {
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && (*entry).flags & CT_FLAG_CLOSING == 0 {
            (*entry).flags |= CT_FLAG_CLOSING;
        }
        if now.wrapping_sub((*entry).last_seen_ns) > CT_REFRESH_NS {
            (*entry).last_seen_ns = now;
            return true;
        }
    }
    false
}

/// The reply entry that goes with a flow given `backend_addr:backend_port`.
#[inline(always)]
fn reply_key(flow: &Flow, backend_addr: u32, backend_port: u16) -> CtKey {
    CtKey {
        src_addr: backend_addr,
        dst_addr: flow.src_addr,
        src_port: backend_port,
        dst_port: flow.src_port,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

/// The reply entry's value: the forward entry with the frontend as the address to restore.
#[inline(always)]
fn reply_value(forward: &CtValue, flow: &Flow) -> CtValue {
    CtValue {
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        ..*forward
    }
}

/// Which way a counted packet went.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to backend.
    In,
    /// Backend to client.
    Out,
}

#[inline(always)]
fn add(counters: Option<*mut TrafficCounters>, len: u64, dir: Direction, new_flow: bool) {
    let Some(c) = counters else { return };
    // SAFETY: the pointer comes from a successful lookup in a per-CPU map: it is this CPU's copy,
    // which nothing else writes while this program runs on this CPU.
    unsafe {
        match dir {
            Direction::In => {
                (*c).packets_in += 1;
                (*c).bytes_in += len;
            }
            Direction::Out => {
                (*c).packets_out += 1;
                (*c).bytes_out += len;
            }
        }
        if new_flow {
            (*c).new_flows += 1;
        }
    }
}

/// Counts a packet for its frontend and its backend. Entries are created by userspace with the
/// ids; a missing one (an id being freed right now) is simply not counted.
#[inline(always)]
fn count(rev_nat_id: u16, backend_id: u32, len: u64, dir: Direction, new_flow: bool) {
    add(
        FRONTEND_STATS.get_ptr_mut(rev_nat_id as u32),
        len,
        dir,
        new_flow,
    );
    add(BACKEND_STATS.get_ptr_mut(backend_id), len, dir, new_flow);
}

/// Reverse NAT only: the last hop before a client pod. A reply of a flow this node translated
/// gets its frontend back as source, wherever the backend is; everything else passes.
#[inline(always)]
pub fn process_reply(flow: &Flow, len: u64) -> Verdict {
    if let Some(entry) = CONNTRACK.get_ptr_mut(ct_key(flow, CT_DIR_REPLY)) {
        // SAFETY: see `refresh`; the value is copied out.
        let v = unsafe { *entry };
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        refresh(entry, unsafe { bpf_ktime_get_ns() }, flow);
        count(v.rev_nat_id, v.backend_id, len, Direction::Out, false);
        return Verdict::RevNat {
            addr: v.nat_addr,
            port: v.nat_port,
        };
    }
    Verdict::Pass
}

/// Decides what to do with one packet of `len` bytes and, when `record` is set (always, except
/// for `lbctl trace` packets), records the flow state and counters.
#[inline(always)]
pub fn process(flow: &Flow, len: u64, record: bool) -> Verdict {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    // 1. A reply from a backend of a flow we translated.
    if let Some(entry) = CONNTRACK.get_ptr_mut(ct_key(flow, CT_DIR_REPLY)) {
        // SAFETY: see `refresh`; the value is copied out.
        let v = unsafe { *entry };
        if record {
            refresh(entry, now, flow);
            count(v.rev_nat_id, v.backend_id, len, Direction::Out, false);
        }
        return Verdict::RevNat {
            addr: v.nat_addr,
            port: v.nat_port,
        };
    }

    // 2. A packet of a flow that already has its backend, as long as that backend still exists
    // with the address the flow was given (ids are reused after a backend is deleted), and the
    // packet is not a new connection reusing the ports of one that closed.
    let fwd_key = ct_key(flow, CT_DIR_FORWARD);
    let mut stale = false;
    if let Some(entry) = CONNTRACK.get_ptr_mut(fwd_key) {
        // SAFETY: see `refresh`; the value is copied out.
        let v = unsafe { *entry };
        let fresh_syn =
            flow.proto == lb_common::proto::TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let reused_ports = fresh_syn && v.flags & CT_FLAG_CLOSING != 0;
        // SAFETY: the value is only read.
        let backend_alive = unsafe { BACKENDS.get(v.backend_id) }
            .is_some_and(|b| b.addr == v.nat_addr && b.port == v.nat_port);
        if backend_alive && !reused_ports {
            if record {
                if refresh(entry, now, flow) {
                    // LRU eviction can take the reply entry alone; without it replies would go
                    // out with the backend's address. Checked once a second, not per packet.
                    let rk = reply_key(flow, v.nat_addr, v.nat_port);
                    if CONNTRACK.get_ptr(rk).is_none() {
                        let _ = CONNTRACK.insert(rk, reply_value(&v, flow), 0);
                    }
                }
                count(v.rev_nat_id, v.backend_id, len, Direction::In, false);
            }
            return Verdict::Dnat {
                addr: v.nat_addr,
                port: v.nat_port,
            };
        }
        stale = true;
    }

    // 3. A new flow to a frontend.
    let master_key = ServiceKey::new(flow.dst_addr, flow.dst_port, flow.proto, SCOPE_INTERNAL, 0);
    // SAFETY: the value is copied out immediately.
    let master = match unsafe { SERVICES.get(master_key) } {
        Some(m) => *m,
        None => return Verdict::Pass,
    };
    if master.count == 0 {
        return drop(drop_reason::NO_BACKEND, record);
    }
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let pick = unsafe { bpf_get_prandom_u32() } % master.count as u32;
    let slot_key = ServiceKey::new(
        flow.dst_addr,
        flow.dst_port,
        flow.proto,
        SCOPE_INTERNAL,
        pick as u16 + 1,
    );
    // SAFETY: copied out immediately.
    let backend_id = match unsafe { SERVICES.get(slot_key) } {
        Some(s) => s.backend_id,
        None => return drop(drop_reason::MAP_INCONSISTENT, record),
    };
    // SAFETY: copied out immediately.
    let backend = match unsafe { BACKENDS.get(backend_id) } {
        Some(b) => *b,
        None => return drop(drop_reason::MAP_INCONSISTENT, record),
    };
    if !record {
        return Verdict::Dnat {
            addr: backend.addr,
            port: backend.port,
        };
    }

    let forward = CtValue {
        backend_id,
        rev_nat_id: master.rev_nat_id,
        flags: 0,
        nat_addr: backend.addr,
        nat_port: backend.port,
        peer_port: 0,
        peer_addr: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    // A stale entry is replaced. Otherwise the entry must not exist yet: if another CPU created
    // it for this flow's first packets meanwhile, follow its choice so one flow never has two
    // backends. (If the table cannot take the entries, the flow goes through untracked and the
    // next packet tries again.)
    let flags = if stale { BPF_ANY } else { BPF_NOEXIST };
    if CONNTRACK.insert(fwd_key, forward, flags as u64).is_err() && !stale {
        // SAFETY: copied out immediately.
        if let Some(other) = unsafe { CONNTRACK.get(fwd_key) } {
            let other = *other;
            count(
                other.rev_nat_id,
                other.backend_id,
                len,
                Direction::In,
                false,
            );
            return Verdict::Dnat {
                addr: other.nat_addr,
                port: other.nat_port,
            };
        }
    }
    let _ = CONNTRACK.insert(
        reply_key(flow, backend.addr, backend.port),
        reply_value(&forward, flow),
        0,
    );
    count(master.rev_nat_id, backend_id, len, Direction::In, true);
    Verdict::Dnat {
        addr: backend.addr,
        port: backend.port,
    }
}
