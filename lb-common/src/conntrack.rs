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
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` of the last packet seen (refreshed at most once a second).
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);

/// The flow was seen to close (TCP FIN or RST).
pub const CT_FLAG_CLOSING: u16 = 1 << 0;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both types are repr(C), contain only integers and have no implicit padding (checked
    // by the size assertions above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtValue {}
}
