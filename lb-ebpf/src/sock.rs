//! Host processes: cgroup v2 sock_addr hooks for sockets of processes in the node's own network
//! namespace (below the agent's `--cgroup`; sockets of other namespaces are left alone). Instead of translating packets, they translate the
//! address a socket is connected or sending to, once, with the same service lookup and backend
//! choice as the packet path ([`crate::lb::select`]); recvmsg4 and getpeername4 put the frontend
//! back where the application reads addresses. The map layout is in [`lb_common::sock`].
use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{
    proto,
    service::SCOPE_INTERNAL,
    sock::{SOCK_DIR_FORWARD, SOCK_DIR_REVERSE},
    SockKey, SockValue,
};

use crate::{
    lb::{select, Pick, Verdict},
    maps::{counters, BACKENDS, BACKEND_STATS, FRONTEND_STATS, SOCK},
    packet::Flow,
};

/// A sock_addr program lets the call go on.
const ALLOW: i32 = 1;
/// A sock_addr program fails the call (with the error set by `bpf_set_retval`, else EPERM).
const REFUSE: i32 = 0;
/// `ECONNREFUSED`: what a client of a frontend without endpoints gets, as from kube-proxy's
/// reject rule (ICMP port unreachable).
const ECONNREFUSED: i32 = 111;
const AF_INET: u32 = 2;

/// The network namespace the hooks serve: the agent's (the node's), set by the loader
/// (`SO_NETNS_COOKIE` of the agent's namespace). A cgroup reaches processes in every namespace,
/// pods included; their sockets are left alone here and their packets are served by tc. Zero
/// (the loader could not read the cookie, kernels before 5.14) serves every namespace.
#[no_mangle]
static HOST_NETNS_COOKIE: u64 = 0;

/// The fields of the context the hooks use, read once.
struct Target {
    cookie: u64,
    addr: u32,
    /// Network order, as in the maps.
    port: u16,
    proto: u8,
}

#[inline(always)]
fn target(ctx: &SockAddrContext) -> Option<Target> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands every sock_addr program a valid context; these fields are
    // readable with 4-byte loads in all four hooks.
    let (family, addr, port, protocol) = unsafe {
        (
            (*sa).user_family,
            (*sa).user_ip4,
            (*sa).user_port,
            (*sa).protocol,
        )
    };
    let proto = match protocol {
        p if p == proto::TCP as u32 => proto::TCP,
        p if p == proto::UDP as u32 => proto::UDP,
        _ => return None,
    };
    if family != AF_INET {
        return None;
    }
    // SAFETY: a volatile read of a global the loader may have rewritten; it must not be folded
    // to its initial value.
    let host = unsafe { core::ptr::read_volatile(&HOST_NETNS_COOKIE) };
    // SAFETY: bpf_get_netns_cookie accepts a sock_addr context.
    if host != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != host {
        return None;
    }
    Some(Target {
        // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        // The port sits in the low 16 bits of user_port, in network order.
        port: port as u16,
        proto,
    })
}

/// Rewrites the address the application passed (or will read).
#[inline(always)]
fn rewrite(ctx: &SockAddrContext, addr: u32, port: u16) {
    // SAFETY: user_ip4 and user_port are writable in all four hooks.
    unsafe {
        (*ctx.sock_addr).user_ip4 = addr;
        (*ctx.sock_addr).user_port = port as u32;
    }
}

#[inline(always)]
fn key(cookie: u64, addr: u32, port: u16, proto: u8, dir: u8) -> SockKey {
    SockKey {
        cookie,
        addr,
        port,
        proto,
        dir,
    }
}

/// Counts a socket given a backend as a new flow of its frontend and backend (no packet counts:
/// the packets of these flows are never seen translated).
#[inline(always)]
fn count_new_flow(rev_nat_id: u16, backend_id: u32) {
    for c in [
        counters(&FRONTEND_STATS, rev_nat_id as u32),
        counters(&BACKEND_STATS, backend_id),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: this CPU's copy of a per-CPU map value; nothing else writes it meanwhile.
        unsafe { (*c).new_flows += 1 };
    }
}

/// What to do with a call to a possible frontend.
enum Choice {
    /// Not a frontend: leave the call alone.
    NotFrontend,
    /// A frontend without a backend this traffic may use.
    NoBackend,
    /// Translate to this backend.
    Backend(Pick),
}

#[inline(always)]
fn choose(t: &Target) -> Choice {
    let flow = Flow {
        // The source is not known before the socket is bound. Address 0 stands for "the node"
        // (source ranges allow it; affinity keys all host processes together, as kube-proxy
        // sees them all as the node's address). The port is random so that a Maglev frontend
        // spreads host connections instead of hashing them all to one slot.
        src_addr: 0,
        dst_addr: t.addr,
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        src_port: unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() } as u16,
        dst_port: t.port,
        proto: t.proto,
        l4_off: 0,
        l4_csum_off: 0,
        l4_csum: 0,
        tcp_flags: 0,
    };
    match select(&flow, SCOPE_INTERNAL, true) {
        Ok(pick) => Choice::Backend(pick),
        Err(Verdict::Pass) => Choice::NotFrontend,
        Err(_) => Choice::NoBackend,
    }
}

/// Records the socket's backend (and, for UDP, which backend later datagrams to the frontend
/// reuse), counts the new flow and rewrites the destination.
#[inline(always)]
fn assign(ctx: &SockAddrContext, t: &Target, pick: &Pick) {
    let backend = pick.backend;
    if t.proto == proto::UDP {
        let forward = SockValue {
            addr: backend.addr,
            backend_id: pick.backend_id,
            port: backend.port,
            rev_nat_id: pick.rev_nat_id,
        };
        let _ = SOCK.insert(
            key(t.cookie, t.addr, t.port, t.proto, SOCK_DIR_FORWARD),
            forward,
            BPF_ANY as u64,
        );
    }
    let reverse = SockValue {
        addr: t.addr,
        backend_id: pick.backend_id,
        port: t.port,
        rev_nat_id: pick.rev_nat_id,
    };
    let _ = SOCK.insert(
        key(
            t.cookie,
            backend.addr,
            backend.port,
            t.proto,
            SOCK_DIR_REVERSE,
        ),
        reverse,
        BPF_ANY as u64,
    );
    count_new_flow(pick.rev_nat_id, pick.backend_id);
    rewrite(ctx, backend.addr, backend.port);
}

/// Fails the call with ECONNREFUSED.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: bpf_set_retval is available to connect4 and sendmsg4, the only callers.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REFUSE
}

/// `connect()` of a TCP or UDP socket: a frontend address becomes a backend chosen now. A
/// reconnect (UDP) chooses again.
#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    let Some(t) = target(&ctx) else {
        return ALLOW;
    };
    match choose(&t) {
        Choice::NotFrontend => ALLOW,
        Choice::NoBackend => refuse(),
        Choice::Backend(pick) => {
            assign(&ctx, &t, &pick);
            ALLOW
        }
    }
}

/// `sendto()`/`sendmsg()` with an address on an unconnected UDP socket: datagrams of one socket
/// to one frontend keep their backend while it exists, so request and answer stay together.
/// (The kernel does not run this hook for connected sockets: their address was translated by
/// connect4.)
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    let Some(t) = target(&ctx) else {
        return ALLOW;
    };
    let fwd = key(t.cookie, t.addr, t.port, t.proto, SOCK_DIR_FORWARD);
    // SAFETY: copied out immediately.
    if let Some(v) = unsafe { SOCK.get(fwd) }.copied() {
        // SAFETY: only read.
        let alive = unsafe { BACKENDS.get(v.backend_id) }
            .is_some_and(|b| b.addr == v.addr && b.port == v.port);
        if alive {
            rewrite(&ctx, v.addr, v.port);
            return ALLOW;
        }
    }
    match choose(&t) {
        Choice::NotFrontend => ALLOW,
        Choice::NoBackend => refuse(),
        Choice::Backend(pick) => {
            assign(&ctx, &t, &pick);
            ALLOW
        }
    }
}

/// Puts the frontend back in an address the application reads, when the socket was translated
/// to that backend.
#[inline(always)]
fn restore(ctx: &SockAddrContext) {
    let Some(t) = target(ctx) else { return };
    let rev = key(t.cookie, t.addr, t.port, t.proto, SOCK_DIR_REVERSE);
    // SAFETY: copied out immediately.
    if let Some(v) = unsafe { SOCK.get(rev) }.copied() {
        rewrite(ctx, v.addr, v.port);
    }
}

/// `recvfrom()`/`recvmsg()` on a UDP socket: a datagram from a backend this socket was sent to
/// is reported as coming from the frontend.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    ALLOW
}

/// `getpeername()`: a socket connected to a frontend reports the frontend, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx);
    ALLOW
}
