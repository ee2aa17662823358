//! The load-balancing core shared by every hook: conntrack, service lookup, backend selection.
//! It decides and records state; the hook applies the rewrite.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use lb_common::{
    conntrack::{
        expired, reply_key_of, CT_DIR_FORWARD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_EXTERNAL,
        CT_FLAG_HAIRPIN, CT_FLAG_ROUTE_REPLY, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT, MIN_TIMEOUT_NS,
        SNAT_PORT_MAX, SNAT_PORT_MIN, SNAT_PORT_TRIES,
    },
    service::{
        BACKEND_FLAG_LOCAL, BACKEND_FLAG_TERMINATING, SCOPE_EXTERNAL, SCOPE_INTERNAL,
        SVC_FLAG_EXTERNAL_FE, SVC_FLAG_LOCAL_BACKENDS, SVC_FLAG_MASQUERADE, SVC_FLAG_SOURCE_RANGES,
    },
    stats::drop_reason,
    AffinityKey, AffinityValue, BackendValue, CtKey, CtValue, ServiceKey, ServiceValue,
    TrafficCounters,
};

use crate::{
    maglev,
    maps::{
        count_drop, counters, AFFINITY, BACKENDS, BACKEND_STATS, CONNTRACK, FRONTEND_STATS,
        SERVICES,
    },
    packet::{Flow, IcmpError, IcmpNat, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// What the hook must do with a packet.
pub enum Verdict {
    /// Not load-balanced traffic: leave it alone.
    Pass,
    /// Drop it (a frontend with no usable backend).
    Drop,
    /// Answer it in place with a TCP RST or an ICMP port unreachable from the frontend, sent
    /// back the way it came (a ServicePort without endpoints; see [`crate::reject`]).
    Reject,
    /// Rewrite it.
    Nat(Nat),
}

/// The addresses a translated packet leaves with (network order). Fields equal to the packet's
/// own are left alone by the rewrite.
#[derive(Clone, Copy)]
pub struct Nat {
    pub src_addr: u32,
    pub src_port: u16,
    pub dst_addr: u32,
    pub dst_port: u16,
    /// The hook routes the packet itself (FIB lookup, then redirect) instead of handing it to
    /// the stack: packets of SNATed flows (XDP), and replies of external flows, whose new
    /// source may be one of the node's own addresses, which the stack's input routing would
    /// drop as martian (tc).
    pub transmit: bool,
}

impl Nat {
    /// Forward direction of a tracked flow: to the backend, from the SNAT address if any.
    #[inline(always)]
    fn forward(flow: &Flow, v: &CtValue) -> Nat {
        let snat = v.flags & CT_FLAG_SNAT != 0;
        Nat {
            src_addr: if snat { v.peer_addr } else { flow.src_addr },
            src_port: if snat { v.peer_port } else { flow.src_port },
            dst_addr: v.nat_addr,
            dst_port: v.nat_port,
            transmit: snat,
        }
    }

    /// Reply direction: from the frontend, to the original client if the flow was SNATed.
    #[inline(always)]
    fn reply(flow: &Flow, v: &CtValue) -> Nat {
        let snat = v.flags & CT_FLAG_SNAT != 0;
        Nat {
            src_addr: v.nat_addr,
            src_port: v.nat_port,
            dst_addr: if snat { v.peer_addr } else { flow.dst_addr },
            dst_port: if snat { v.peer_port } else { flow.dst_port },
            transmit: v.flags & (CT_FLAG_SNAT | CT_FLAG_ROUTE_REPLY) != 0,
        }
    }
}

/// A drop, counted under `reason` unless the packet is a trace.
#[inline(always)]
pub fn drop(reason: u32, record: bool) -> Verdict {
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
/// RST; `state` is set too when missing ([`CT_FLAG_SEEN_REPLY`] on reply entries). Returns
/// whether the timestamp was renewed, which callers use as their once-a-second tick.
#[inline(always)]
fn refresh(entry: *mut CtValue, now: u64, flow: &Flow, state: u16) -> bool {
    // SAFETY: `entry` comes from a successful map lookup and points into the map value, which
    // stays valid for the rest of this program run; the writes are plain aligned stores.
    unsafe {
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 && (*entry).flags & CT_FLAG_CLOSING == 0 {
            (*entry).flags |= CT_FLAG_CLOSING;
        }
        if (*entry).flags & state != state {
            (*entry).flags |= state;
        }
        if now.wrapping_sub((*entry).last_seen_ns) > CT_REFRESH_NS {
            (*entry).last_seen_ns = now;
            return true;
        }
    }
    false
}

/// The key of the reply entry that goes with a flow's forward entry: the backend answers to the
/// client, or to the SNAT address and port.
#[inline(always)]
fn reply_key(flow: &Flow, forward: &CtValue) -> CtKey {
    reply_key_of(&ct_key(flow, CT_DIR_FORWARD), forward)
}

/// The reply entry's value: the frontend as the source to restore and, with SNAT, the client
/// as the destination.
#[inline(always)]
fn reply_value(forward: &CtValue, flow: &Flow) -> CtValue {
    let snat = forward.flags & CT_FLAG_SNAT != 0;
    CtValue {
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        peer_addr: if snat { flow.src_addr } else { 0 },
        peer_port: if snat { flow.src_port } else { 0 },
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

/// Counts a packet for its frontend and its backend (entries are created by the first packet).
#[inline(always)]
fn count(rev_nat_id: u16, backend_id: u32, len: u64, dir: Direction, new_flow: bool) {
    add(
        counters(&FRONTEND_STATS, rev_nat_id as u32),
        len,
        dir,
        new_flow,
    );
    add(counters(&BACKEND_STATS, backend_id), len, dir, new_flow);
}

/// Reverse NAT only: the last hop before a client pod. A reply of a flow this node translated
/// gets its frontend back as source, wherever the backend is; everything else passes.
#[inline(always)]
pub fn process_reply(flow: &Flow, len: u64) -> Verdict {
    if let Some(entry) = CONNTRACK.get_ptr_mut(ct_key(flow, CT_DIR_REPLY)) {
        // SAFETY: see `refresh`; the value is copied out.
        let v = unsafe { *entry };
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        refresh(
            entry,
            unsafe { bpf_ktime_get_ns() },
            flow,
            CT_FLAG_SEEN_REPLY,
        );
        count(v.rev_nat_id, v.backend_id, len, Direction::Out, false);
        return Verdict::Nat(Nat::reply(flow, &v));
    }
    Verdict::Pass
}

/// The outcome of looking a packet up in conntrack.
enum Tracked {
    /// A reply of a tracked flow.
    Reply(CtValue),
    /// A packet of a tracked flow whose backend is still there.
    Forward(CtValue),
    /// Not tracked; `stale` when a forward entry exists but must be replaced.
    New { stale: bool },
}

/// Steps 1 and 2 of every hook: replies and packets of flows that already have their backend.
#[inline(always)]
fn lookup_tracked(flow: &Flow, len: u64, now: u64, record: bool) -> Tracked {
    // 1. A reply from a backend of a flow we translated.
    if let Some(entry) = CONNTRACK.get_ptr_mut(ct_key(flow, CT_DIR_REPLY)) {
        // SAFETY: see `refresh`; the value is copied out.
        let v = unsafe { *entry };
        if record {
            refresh(entry, now, flow, CT_FLAG_SEEN_REPLY);
            count(v.rev_nat_id, v.backend_id, len, Direction::Out, false);
        }
        return Tracked::Reply(v);
    }

    // 2. A packet of a flow that already has its backend. The flow stays there unless it expired,
    // or it is a new TCP connection reusing the ports of one that closed, or it is not TCP and
    // its backend is gone (no longer a serving endpoint; ids are reused, so the id must still
    // name the address the flow was given): UDP flows are then re-balanced on their next
    // datagram, while TCP connections keep their backend to the end, as with kube-proxy.
    let fwd_key = ct_key(flow, CT_DIR_FORWARD);
    let Some(entry) = CONNTRACK.get_ptr_mut(fwd_key) else {
        return Tracked::New { stale: false };
    };
    // SAFETY: see `refresh`; the value is copied out.
    let v = unsafe { *entry };
    let tcp = flow.proto == lb_common::proto::TCP;
    let fresh_syn = tcp && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let reused_ports = fresh_syn && v.flags & CT_FLAG_CLOSING != 0;
    // SAFETY: the value is only read.
    let backend_alive = unsafe { BACKENDS.get(v.backend_id) }
        .is_some_and(|b| b.addr == v.nat_addr && b.port == v.nat_port);
    if (!tcp && !backend_alive) || reused_ports || flow_expired(flow, &v, now) {
        return Tracked::New { stale: true };
    }
    if record {
        if refresh(entry, now, flow, 0) {
            // LRU eviction can take the reply entry alone; without it replies would go out with
            // the backend's address. Checked once a second, not per packet.
            let rk = reply_key(flow, &v);
            match CONNTRACK.get_ptr_mut(rk) {
                None => {
                    let _ = CONNTRACK.insert(rk, reply_value(&v, flow), 0);
                }
                Some(r) => {
                    // SAFETY: points into the map value (see `refresh`).
                    let (peer_addr, peer_port) = unsafe { ((*r).peer_addr, (*r).peer_port) };
                    // A SNAT port whose flow expired may have gone to another flow: this flow
                    // lost its port and is treated as new.
                    if v.flags & CT_FLAG_SNAT != 0
                        && (peer_addr != flow.src_addr || peer_port != flow.src_port)
                    {
                        return Tracked::New { stale: true };
                    }
                    // The reply entry carries the flow's last activity too, so that a flow
                    // sending one way only (UDP) keeps its SNAT port.
                    // SAFETY: as above; a plain aligned store.
                    unsafe { (*r).last_seen_ns = now };
                }
            }
        }
        // A TCP flow whose backend left keeps going, but its id may name another backend by
        // now: count it for the frontend only.
        let backend_id = if backend_alive { v.backend_id } else { 0 };
        count(v.rev_nat_id, backend_id, len, Direction::In, false);
    }
    Tracked::Forward(v)
}

/// Whether the flow of forward entry `v` expired: neither direction saw a packet within the
/// timeout of the flow's state. The reply entry is only read when the forward entry alone has
/// been idle longer than the shortest timeout.
#[inline(always)]
fn flow_expired(flow: &Flow, v: &CtValue, now: u64) -> bool {
    if now.wrapping_sub(v.last_seen_ns) <= MIN_TIMEOUT_NS || now < v.last_seen_ns {
        return false;
    }
    // SAFETY: copied out immediately.
    let (flags, last) = match unsafe { CONNTRACK.get(reply_key(flow, v)) }.copied() {
        Some(r) => (
            v.flags | r.flags,
            if r.last_seen_ns > v.last_seen_ns {
                r.last_seen_ns
            } else {
                v.last_seen_ns
            },
        ),
        None => (v.flags, v.last_seen_ns),
    };
    expired(flow.proto, flags, last, now)
}

/// Decides what to do with one packet from a pod on this node (tc) of `len` bytes and, when
/// `record` is set (always, except for `lbctl trace` packets), records the flow state and
/// counters.
#[inline(always)]
pub fn process(flow: &Flow, len: u64, record: bool) -> Verdict {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let stale = match lookup_tracked(flow, len, now, record) {
        Tracked::Reply(v) => return Verdict::Nat(Nat::reply(flow, &v)),
        Tracked::Forward(v) => return Verdict::Nat(Nat::forward(flow, &v)),
        Tracked::New { stale } => stale,
    };
    // 3. A new flow to a frontend.
    let pick = match select(flow, SCOPE_INTERNAL, record) {
        Ok(p) => p,
        Err(v) => return v,
    };
    // A pod that reaches itself through a frontend (hairpin) would get its own address as the
    // source, which its stack drops as martian, and would answer itself locally: the flow is
    // source-NATed to the frontend address (keeping the client's port), so the answer comes
    // back out of the pod to be translated.
    let hairpin = pick.backend.addr == flow.src_addr;
    if !record {
        return Verdict::Nat(Nat {
            src_addr: if hairpin {
                flow.dst_addr
            } else {
                flow.src_addr
            },
            src_port: flow.src_port,
            dst_addr: pick.backend.addr,
            dst_port: pick.backend.port,
            transmit: hairpin,
        });
    }
    if hairpin {
        return commit_hairpin(flow, &pick, stale, len, now);
    }
    commit(flow, &pick, None, 0, stale, len, now)
}

/// Records a hairpin flow: its reply entry is keyed by the backend (the pod itself) answering the
/// frontend address and the client's port, and turns the answer back into frontend -> client.
#[inline(always)]
fn commit_hairpin(flow: &Flow, pick: &Pick, stale: bool, len: u64, now: u64) -> Verdict {
    let rk = CtKey {
        src_addr: pick.backend.addr,
        dst_addr: flow.dst_addr,
        src_port: pick.backend.port,
        dst_port: flow.src_port,
        proto: flow.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    let flags = CT_FLAG_SNAT | CT_FLAG_HAIRPIN;
    let reply = CtValue {
        backend_id: pick.backend_id,
        rev_nat_id: pick.rev_nat_id,
        flags,
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        peer_port: flow.src_port,
        peer_addr: flow.src_addr,
        _pad: 0,
        last_seen_ns: now,
    };
    // BPF_ANY: the only other flow with this reply tuple is this one's previous life.
    if CONNTRACK.insert(rk, reply, BPF_ANY as u64).is_err() {
        return drop(drop_reason::MAP_INCONSISTENT, true);
    }
    commit(
        flow,
        pick,
        Some((flow.dst_addr, flow.src_port)),
        CT_FLAG_HAIRPIN,
        stale,
        len,
        now,
    )
}

/// A new flow's backend.
pub struct Pick {
    pub backend_id: u32,
    pub backend: BackendValue,
    pub rev_nat_id: u16,
    /// The frontend's `SVC_FLAG_*`.
    pub svc_flags: u16,
    /// A forward entry exists and is to be replaced.
    pub stale: bool,
}

/// Step 3: the frontend's master entry in `scope`, then its Maglev slot or a random slot. `Err` carries the verdict
/// when there is nothing to pick (not a frontend: pass; no backend: drop).
#[inline(always)]
pub fn select(flow: &Flow, scope: u8, record: bool) -> Result<Pick, Verdict> {
    let master_key = ServiceKey::new(flow.dst_addr, flow.dst_port, flow.proto, scope, 0);
    // SAFETY: the value is copied out immediately.
    let master = match unsafe { SERVICES.get(master_key) } {
        Some(m) => *m,
        None => return Err(Verdict::Pass),
    };
    // Host-process sockets (cgroup hooks) come with no source address (0): they are the node,
    // which the ranges always allow (the model adds the node's addresses to every list).
    if master.flags & SVC_FLAG_SOURCE_RANGES != 0
        && flow.src_addr != 0
        && !crate::source_ranges::allowed(master.rev_nat_id, flow.src_addr)
    {
        return Err(drop(drop_reason::SOURCE_RANGE, record));
    }
    if master.count == 0 {
        return Err(crate::reject::when_empty(flow, scope, master.flags, record));
    }
    if master.affinity_timeout != 0 {
        if let Some(pick) = affinity_pick(flow, &master, record) {
            return Ok(pick);
        }
    }
    let backend_id = match maglev::pick(flow, &master) {
        Some(id) => id,
        None => random_slot(flow, scope, master.count)
            .ok_or_else(|| drop(drop_reason::MAP_INCONSISTENT, record))?,
    };
    // SAFETY: copied out immediately.
    let backend = match unsafe { BACKENDS.get(backend_id) } {
        Some(b) => *b,
        None => return Err(drop(drop_reason::MAP_INCONSISTENT, record)),
    };
    if master.affinity_timeout != 0 && record {
        affinity_store(flow, &master, backend_id, &backend);
    }
    Ok(Pick {
        backend_id,
        backend,
        rev_nat_id: master.rev_nat_id,
        svc_flags: master.flags,
        stale: false,
    })
}

#[inline(always)]
fn affinity_key(flow: &Flow, master: &ServiceValue) -> AffinityKey {
    AffinityKey {
        client_addr: flow.src_addr,
        group: master.affinity_group,
        _pad: 0,
    }
}

/// ClientIP session affinity: the backend this client's last new connection to the ServicePort
/// got, if that was within the timeout and the backend is still usable for this frontend (it
/// still exists under the same id, is not terminating, and is local when the frontend's slots
/// are local-only). A hit is refreshed: each new connection restarts the timeout.
#[inline(always)]
fn affinity_pick(flow: &Flow, master: &ServiceValue, record: bool) -> Option<Pick> {
    let entry = AFFINITY.get_ptr_mut(affinity_key(flow, master))?;
    // SAFETY: points into the map value (see `refresh`); copied out.
    let a = unsafe { *entry };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(a.last_used_ns) > master.affinity_timeout as u64 * 1_000_000_000 {
        return None;
    }
    // SAFETY: copied out immediately.
    let backend = unsafe { BACKENDS.get(a.backend_id) }.copied()?;
    let local_only = master.flags & SVC_FLAG_LOCAL_BACKENDS != 0;
    if backend.addr != a.backend_addr
        || backend.port != a.backend_port
        || backend.flags & BACKEND_FLAG_TERMINATING != 0
        || (local_only && backend.flags & BACKEND_FLAG_LOCAL == 0)
    {
        return None;
    }
    if record {
        // SAFETY: as above; a plain aligned store into the map value.
        unsafe { (*entry).last_used_ns = now };
    }
    Some(Pick {
        backend_id: a.backend_id,
        backend,
        rev_nat_id: master.rev_nat_id,
        svc_flags: master.flags,
        stale: false,
    })
}

/// Remembers the backend a new connection got, for the client's next ones.
#[inline(always)]
fn affinity_store(flow: &Flow, master: &ServiceValue, backend_id: u32, backend: &BackendValue) {
    let value = AffinityValue {
        backend_id,
        backend_addr: backend.addr,
        backend_port: backend.port,
        _pad: 0,
        _pad2: 0,
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        last_used_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = AFFINITY.insert(affinity_key(flow, master), value, BPF_ANY as u64);
}

/// The backend id of a random slot among the frontend's `count` slots.
#[inline(always)]
fn random_slot(flow: &Flow, scope: u8, count: u16) -> Option<u32> {
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let pick = unsafe { bpf_get_prandom_u32() } % count as u32;
    let slot_key = ServiceKey::new(
        flow.dst_addr,
        flow.dst_port,
        flow.proto,
        scope,
        pick as u16 + 1,
    );
    // SAFETY: copied out immediately.
    unsafe { SERVICES.get(slot_key) }.map(|s| s.backend_id)
}

/// Records a new flow (forward and reply entries, counters) and returns its translation.
/// `snat` is the (address, port) the flow is source-NATed to, whose reply entry the caller has
/// already claimed.
#[inline(always)]
fn commit(
    flow: &Flow,
    pick: &Pick,
    snat: Option<(u32, u16)>,
    extra_flags: u16,
    stale: bool,
    len: u64,
    now: u64,
) -> Verdict {
    let extra_flags = if pick.svc_flags & SVC_FLAG_EXTERNAL_FE != 0 {
        extra_flags | CT_FLAG_ROUTE_REPLY
    } else {
        extra_flags
    };
    let (flags, peer_addr, peer_port) = match snat {
        Some((a, p)) => (extra_flags | CT_FLAG_SNAT, a, p),
        None => (extra_flags, 0, 0),
    };
    let forward = CtValue {
        backend_id: pick.backend_id,
        rev_nat_id: pick.rev_nat_id,
        flags,
        nat_addr: pick.backend.addr,
        nat_port: pick.backend.port,
        peer_port,
        peer_addr,
        _pad: 0,
        last_seen_ns: now,
    };
    let fwd_key = ct_key(flow, CT_DIR_FORWARD);
    // A stale entry is replaced. Otherwise the entry must not exist yet: if another CPU created
    // it for this flow's first packets meanwhile, follow its choice so one flow never has two
    // backends. (If the table cannot take the entries, the flow goes through untracked and the
    // next packet tries again.)
    let insert_flags = if stale { BPF_ANY } else { BPF_NOEXIST };
    if CONNTRACK
        .insert(fwd_key, forward, insert_flags as u64)
        .is_err()
        && !stale
    {
        // SAFETY: copied out immediately.
        if let Some(other) = unsafe { CONNTRACK.get(fwd_key) }.copied() {
            if snat.is_some() {
                // The SNAT port claimed for this packet is not needed after all.
                let _ = CONNTRACK.remove(reply_key(flow, &forward));
            }
            count(
                other.rev_nat_id,
                other.backend_id,
                len,
                Direction::In,
                false,
            );
            return Verdict::Nat(Nat::forward(flow, &other));
        }
    }
    if snat.is_none() {
        let _ = CONNTRACK.insert(reply_key(flow, &forward), reply_value(&forward, flow), 0);
    }
    count(pick.rev_nat_id, pick.backend_id, len, Direction::In, true);
    Verdict::Nat(Nat::forward(flow, &forward))
}

/// What the XDP hook must do for a packet from outside the node.
pub enum External {
    Done(Verdict),
    /// A new flow to a backend on another node under Cluster policy: the hook finds this
    /// node's address towards the backend (FIB lookup) and calls [`commit_snat`].
    NeedSnat(Pick),
}

/// The external-traffic path (XDP on uplinks): replies of flows this node SNATed, packets of
/// tracked flows, and new flows to NodePort, LoadBalancer and externalIP frontends.
#[inline(always)]
pub fn process_external(flow: &Flow, len: u64) -> External {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let stale = match lookup_tracked(flow, len, now, true) {
        // Replies of flows without SNAT (a pod's flow to a backend on another node) are the
        // pod interface's business (tc egress): leave them to it.
        Tracked::Reply(v) if v.flags & CT_FLAG_SNAT == 0 => return External::Done(Verdict::Pass),
        Tracked::Reply(v) => return External::Done(Verdict::Nat(Nat::reply(flow, &v))),
        Tracked::Forward(v) => return External::Done(Verdict::Nat(Nat::forward(flow, &v))),
        Tracked::New { stale } => stale,
    };
    let mut pick = match select(flow, SCOPE_EXTERNAL, true) {
        Ok(p) => p,
        Err(v) => return External::Done(v),
    };
    pick.stale = stale;
    if pick.backend.flags & BACKEND_FLAG_LOCAL != 0 || pick.svc_flags & SVC_FLAG_MASQUERADE == 0 {
        // Local backend, or Local policy: DNAT only, the client's address is kept.
        return External::Done(commit(flow, &pick, None, CT_FLAG_EXTERNAL, stale, len, now));
    }
    External::NeedSnat(pick)
}

/// Allocates a SNAT port on `node_addr` for a new external flow to a remote backend and records
/// the flow. Ports are tried at random in `SNAT_PORT_MIN..=SNAT_PORT_MAX`; a port is free when
/// no reply entry holds it for this backend, or the one holding it has expired.
#[inline(always)]
pub fn commit_snat(flow: &Flow, pick: &Pick, node_addr: u32, len: u64) -> Verdict {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    let flags = CT_FLAG_SNAT | CT_FLAG_EXTERNAL;
    let reply = CtValue {
        backend_id: pick.backend_id,
        rev_nat_id: pick.rev_nat_id,
        flags,
        nat_addr: flow.dst_addr,
        nat_port: flow.dst_port,
        peer_port: flow.src_port,
        peer_addr: flow.src_addr,
        _pad: 0,
        last_seen_ns: now,
    };
    let mut i = 0;
    while i < SNAT_PORT_TRIES {
        i += 1;
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let port = (SNAT_PORT_MIN as u32 + unsafe { bpf_get_prandom_u32() } % span) as u16;
        let port = port.to_be();
        let rk = CtKey {
            src_addr: pick.backend.addr,
            dst_addr: node_addr,
            src_port: pick.backend.port,
            dst_port: port,
            proto: flow.proto,
            dir: CT_DIR_REPLY,
            _pad: 0,
        };
        // Free, or held by an entry idle past its timeout (whose flow is re-balanced if it ever
        // sends again).
        let claimed = CONNTRACK.insert(rk, reply, BPF_NOEXIST as u64).is_ok() || {
            // SAFETY: copied out immediately.
            let held_by_expired = unsafe { CONNTRACK.get(rk) }
                .is_some_and(|old| expired(flow.proto, old.flags, old.last_seen_ns, now));
            held_by_expired && CONNTRACK.insert(rk, reply, BPF_ANY as u64).is_ok()
        };
        if claimed {
            return commit(
                flow,
                pick,
                Some((node_addr, port)),
                CT_FLAG_EXTERNAL,
                pick.stale,
                len,
                now,
            );
        }
    }
    drop(drop_reason::SNAT_PORTS_EXHAUSTED, true)
}

/// An ICMP error about a packet of a flow this node translated, travelling back towards the
/// client: the translation that gives the client an error about its own packet, and whether the
/// flow was SNATed (the XDP hook then transmits it itself).
#[inline(always)]
pub fn icmp_error(e: &IcmpError) -> Option<(IcmpNat, bool)> {
    // The quoted packet is one we sent to the backend; its reply entry is keyed by the tuple
    // the backend sends from.
    let key = CtKey {
        src_addr: e.inner_dst_addr,
        dst_addr: e.inner_src_addr,
        src_port: e.inner_dst_port,
        dst_port: e.inner_src_port,
        proto: e.inner_proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    };
    // SAFETY: copied out immediately.
    let v = unsafe { CONNTRACK.get(key) }.copied()?;
    let snat = v.flags & CT_FLAG_SNAT != 0;
    Some((
        IcmpNat {
            // An error from the backend itself comes from the frontend; one from a router on
            // the way keeps the router's address.
            outer_src: if e.src_addr == e.inner_dst_addr {
                v.nat_addr
            } else {
                e.src_addr
            },
            outer_dst: if snat { v.peer_addr } else { e.dst_addr },
            inner_src: if snat {
                (v.peer_addr, v.peer_port)
            } else {
                (e.inner_src_addr, e.inner_src_port)
            },
            inner_dst: (v.nat_addr, v.nat_port),
        },
        snat,
    ))
}
