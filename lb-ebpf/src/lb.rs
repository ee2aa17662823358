//! The load-balancing core shared by every hook: conntrack, service lookup, backend selection.
//! It decides and records state; the hook applies the rewrite.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use lb_common::{
    conntrack::{CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING},
    service::SCOPE_CLUSTER,
    CtKey, CtValue, ServiceKey, TrafficCounters,
};

use crate::{
    maps::{BACKENDS, BACKEND_STATS, CONNTRACK, FRONTEND_STATS, SERVICES},
    packet::{Flow, TCP_FIN, TCP_RST},
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

/// Refreshes the entry's timestamp and marks it closing on a TCP FIN or RST.
#[inline(always)]
fn refresh(entry: *mut CtValue, now: u64, flow: &Flow, record: bool) {
    if !record {
        return;
    }
    // SAFETY: `entry` comes from a successful map lookup and points into the map value, which
    // stays valid for the rest of this program run; the writes are plain aligned stores.
    unsafe {
        if now.wrapping_sub((*entry).last_seen_ns) > CT_REFRESH_NS {
            (*entry).last_seen_ns = now;
        }
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && (*entry).flags & CT_FLAG_CLOSING == 0 {
            (*entry).flags |= CT_FLAG_CLOSING;
        }
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

/// Decides what to do with one packet of `len` bytes and, when `record` is set (always, except
/// for `lbctl trace` packets), records the flow state and counters.
#[inline(always)]
pub fn process(flow: &Flow, len: u64, record: bool) -> Verdict {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    // 1. A reply from a backend of a flow we translated.
    if let Some(entry) = CONNTRACK.get_ptr_mut(ct_key(flow, CT_DIR_REPLY)) {
        refresh(entry, now, flow, record);
        // SAFETY: see `refresh`.
        let (addr, port, rev_nat_id, backend_id) = unsafe {
            (
                (*entry).nat_addr,
                (*entry).nat_port,
                (*entry).rev_nat_id,
                (*entry).backend_id,
            )
        };
        if record {
            count(rev_nat_id, backend_id, len, Direction::Out, false);
        }
        return Verdict::RevNat { addr, port };
    }

    // 2. A packet of a flow that already has its backend, as long as that backend still exists
    // with the address the flow was given (ids are reused after a backend is deleted).
    let fwd_key = ct_key(flow, CT_DIR_FORWARD);
    if let Some(entry) = CONNTRACK.get_ptr_mut(fwd_key) {
        // SAFETY: see `refresh`.
        let (backend_id, addr, port, rev_nat_id) = unsafe {
            (
                (*entry).backend_id,
                (*entry).nat_addr,
                (*entry).nat_port,
                (*entry).rev_nat_id,
            )
        };
        // SAFETY: the value is only read, and copied out before any map update.
        if let Some(backend) = unsafe { BACKENDS.get(backend_id) } {
            if backend.addr == addr && backend.port == port {
                refresh(entry, now, flow, record);
                if record {
                    count(rev_nat_id, backend_id, len, Direction::In, false);
                }
                return Verdict::Dnat { addr, port };
            }
        }
    }

    // 3. A new flow to a frontend.
    let master_key = ServiceKey::new(flow.dst_addr, flow.dst_port, flow.proto, SCOPE_CLUSTER, 0);
    // SAFETY: the value is copied out immediately.
    let master = match unsafe { SERVICES.get(master_key) } {
        Some(m) => *m,
        None => return Verdict::Pass,
    };
    if master.count == 0 {
        return Verdict::Drop;
    }
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let pick = unsafe { bpf_get_prandom_u32() } % master.count as u32;
    let slot_key = ServiceKey::new(
        flow.dst_addr,
        flow.dst_port,
        flow.proto,
        SCOPE_CLUSTER,
        pick as u16 + 1,
    );
    // SAFETY: copied out immediately.
    let backend_id = match unsafe { SERVICES.get(slot_key) } {
        Some(s) => s.backend_id,
        None => return Verdict::Drop,
    };
    // SAFETY: copied out immediately.
    let backend = match unsafe { BACKENDS.get(backend_id) } {
        Some(b) => *b,
        None => return Verdict::Drop,
    };

    let forward = CtValue {
        backend_id,
        rev_nat_id: master.rev_nat_id,
        flags: 0,
        nat_addr: backend.addr,
        nat_port: backend.port,
        _pad: 0,
        last_seen_ns: now,
    };
    let reply_key = CtKey {
        src_addr: backend.addr,
        dst_addr: flow.src_addr,
        src_port: backend.port,
        dst_port: flow.src_port,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let reply = CtValue {
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        ..forward
    };
    // Reply entry first: once the forward entry exists, the backend may answer at any moment.
    // If the table cannot take the entries the flow still goes through, untracked; the next
    // packet tries again.
    if record {
        let _ = CONNTRACK.insert(reply_key, reply, 0);
        let _ = CONNTRACK.insert(fwd_key, forward, 0);
        count(master.rev_nat_id, backend_id, len, Direction::In, true);
    }
    Verdict::Dnat {
        addr: backend.addr,
        port: backend.port,
    }
}
