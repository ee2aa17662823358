//! Connection-tracking entries.
//!
//! A load-balanced flow has two entries. The forward entry is keyed by the tuple the client sends
//! (client -> frontend) and says which backend the flow was given. The reply entry is keyed by the
//! tuple the backend sends back (backend -> client) and says which frontend address and port to put
//! back as the source. Each entry carries what it needs to rewrite a packet, so a flow keeps working
//! even while its service entries are being replaced.

/// Key of the conntrack map: the 5-tuple exactly as it appears in the packet, plus a direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CtKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// [`CT_DIR_FORWARD`] or [`CT_DIR_REPLY`].
    pub dir: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

/// client -> frontend, before DNAT.
pub const CT_DIR_FORWARD: u8 = 0;
/// backend -> client, before reverse NAT.
pub const CT_DIR_REPLY: u8 = 1;

/// Value of the conntrack map.
///
/// Every entry says how to rewrite the packets it matches:
/// - forward entry: destination becomes `nat_addr:nat_port` (the backend); with
///   [`CT_FLAG_SNAT`] the source also becomes `peer_addr:peer_port` (this node's address and the
///   SNAT port allocated for the flow);
/// - reply entry: source becomes `nat_addr:nat_port` (the frontend); with [`CT_FLAG_SNAT`] the
///   destination also becomes `peer_addr:peer_port` (the original client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    /// Backend id the flow was given (both directions).
    pub backend_id: u32,
    pub rev_nat_id: u16,
    /// `CT_FLAG_*` bits.
    pub flags: u16,
    /// Forward: the backend address written as destination. Reply: the frontend address written
    /// as source. Network order.
    pub nat_addr: u32,
    /// The port that goes with `nat_addr`, network order.
    pub nat_port: u16,
    /// The port that goes with `peer_addr`, network order (zero without [`CT_FLAG_SNAT`]).
    pub peer_port: u16,
    /// With [`CT_FLAG_SNAT`] only: forward, the node address written as source; reply, the
    /// client address written as destination. Network order.
    pub peer_addr: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last packet seen (refreshed at most once a second).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 32);

/// The flow was seen to close (TCP FIN or RST).
pub const CT_FLAG_CLOSING: u16 = 1 << 0;
/// The flow is source-NATed to this node (external traffic to a backend on another node):
/// `peer_addr`/`peer_port` are meaningful.
pub const CT_FLAG_SNAT: u16 = 1 << 1;
/// The flow came in from outside the node (XDP on an uplink).
pub const CT_FLAG_EXTERNAL: u16 = 1 << 2;
/// The flow's frontend is a NodePort, LoadBalancer IP or externalIP: its replies get a source
/// that may be one of the node's own addresses, which the stack's input routing drops as
/// martian, so the program routes them itself (FIB lookup and redirect).
pub const CT_FLAG_ROUTE_REPLY: u16 = 1 << 3;
/// Set on a reply entry once a packet has come back from the backend: for TCP the handshake got
/// an answer, and the flow moves from the short SYN timeout to the long established one.
pub const CT_FLAG_SEEN_REPLY: u16 = 1 << 4;
/// A hairpin flow: a pod reached itself through a frontend, so the flow is source-NATed to the
/// frontend address (`peer_addr`/`peer_port` as with [`CT_FLAG_SNAT`], which is also set).
pub const CT_FLAG_HAIRPIN: u16 = 1 << 5;

/// Source ports the data path allocates for SNATed flows, inclusive. Above Linux's default
/// ephemeral range (32768-60999, `net.ipv4.ip_local_port_range`) so they never collide with the
/// node's own connections, and above the NodePort range (30000-32767).
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
/// Random ports tried for one new SNATed flow before it is dropped (counted as exhausted).
pub const SNAT_PORT_TRIES: u32 = 8;

/// Idle timeouts, in seconds, after which a flow is expired. A flow is idle when neither of its
/// entries saw a packet for that long; its state is the union of both entries' flags. An expired
/// flow's next packet is treated as a new flow, the agent's conntrack GC deletes expired entries,
/// and a SNAT port whose flow expired may be given to a new one. (Entries also leave by LRU
/// eviction when the table is full.) The values are Cilium's defaults.
pub mod timeout {
    /// TCP before any reply (a SYN without an answer).
    pub const TCP_SYN: u64 = 60;
    /// TCP after FIN or RST.
    pub const TCP_CLOSING: u64 = 10;
    /// TCP once the backend answered and until FIN or RST.
    pub const TCP: u64 = 21_600;
    /// UDP and everything else.
    pub const OTHER: u64 = 60;
}

/// The idle timeout, in nanoseconds, of a flow of protocol `proto` whose entries carry `flags`
/// (the union of the forward and reply entries' flags where both are known).
#[inline(always)]
pub const fn timeout_ns(proto: u8, flags: u16) -> u64 {
    let secs = if proto == crate::proto::TCP {
        if flags & CT_FLAG_CLOSING != 0 {
            timeout::TCP_CLOSING
        } else if flags & CT_FLAG_SEEN_REPLY != 0 {
            timeout::TCP
        } else {
            timeout::TCP_SYN
        }
    } else {
        timeout::OTHER
    };
    secs * 1_000_000_000
}

/// The shortest of the timeouts, in nanoseconds: an entry idle for less than this is alive
/// whatever its state, which spares the data path a second lookup on every packet.
pub const MIN_TIMEOUT_NS: u64 = timeout::TCP_CLOSING * 1_000_000_000;

/// Whether a flow whose last packet (either direction) was at `last_seen_ns` has expired at
/// `now_ns`.
#[inline(always)]
pub const fn expired(proto: u8, flags: u16, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.wrapping_sub(last_seen_ns) > timeout_ns(proto, flags) && now_ns > last_seen_ns
}

/// The key of the reply entry that belongs to the forward entry `fwd`/`v`: the backend answers
/// to the client, or to the SNAT address and port.
#[inline(always)]
pub const fn reply_key_of(fwd: &CtKey, v: &CtValue) -> CtKey {
    let snat = v.flags & CT_FLAG_SNAT != 0;
    CtKey {
        src_addr: v.nat_addr,
        dst_addr: if snat { v.peer_addr } else { fwd.src_addr },
        src_port: v.nat_port,
        dst_port: if snat { v.peer_port } else { fwd.src_port },
        proto: fwd.proto,
        dir: CT_DIR_REPLY,
        _pad: 0,
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), contain only integers and have no implicit padding (checked
    // by the size assertions above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtValue {}
}
