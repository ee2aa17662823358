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

/// Source ports the data path allocates for SNATed flows, inclusive. Above Linux's default
/// ephemeral range (32768-60999, `net.ipv4.ip_local_port_range`) so they never collide with the
/// node's own connections, and above the NodePort range (30000-32767).
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
/// Random ports tried for one new SNATed flow before it is dropped (counted as exhausted).
pub const SNAT_PORT_TRIES: u32 = 8;

/// Idle timeouts, in seconds, after which an entry is expired: a SNAT port whose entry expired
/// may be given to a new flow. (Entries also leave by LRU eviction when the table is full.)
pub mod timeout {
    /// TCP after FIN or RST.
    pub const TCP_CLOSING: u64 = 10;
    /// TCP otherwise.
    pub const TCP: u64 = 21_600;
    /// UDP and everything else.
    pub const OTHER: u64 = 60;
}

/// The idle timeout of an entry, in nanoseconds.
#[inline(always)]
pub const fn timeout_ns(proto: u8, flags: u16) -> u64 {
    let secs = if proto == crate::proto::TCP {
        if flags & CT_FLAG_CLOSING != 0 {
            timeout::TCP_CLOSING
        } else {
            timeout::TCP
        }
    } else {
        timeout::OTHER
    };
    secs * 1_000_000_000
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), contain only integers and have no implicit padding (checked
    // by the size assertions above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtValue {}
}
