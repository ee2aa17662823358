//! Service, backend and reverse-NAT map entries.

/// Key of the services map: one frontend (address, port, protocol), a scope and a slot.
///
/// Slot 0 is the frontend's master entry; slots `1..=count` each name one backend. `scope` says
/// which traffic the entry serves: [`SCOPE_INTERNAL`] for traffic from this node's pods (tc on pod
/// interfaces), [`SCOPE_EXTERNAL`] for traffic from outside the node (XDP on uplinks). Only
/// NodePort, LoadBalancer and externalIP frontends have an external entry; its backend set follows
/// externalTrafficPolicy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    /// Frontend IPv4 address, network order.
    pub addr: u32,
    /// Frontend port, network order.
    pub port: u16,
    /// IP protocol number ([`crate::proto`]).
    pub proto: u8,
    pub scope: u8,
    pub slot: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);

/// Traffic from this node's pods.
pub const SCOPE_INTERNAL: u8 = 0;
/// Traffic from outside the node.
pub const SCOPE_EXTERNAL: u8 = 1;

impl ServiceKey {
    pub const fn new(addr: u32, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self {
            addr,
            port,
            proto,
            scope,
            slot,
            _pad: 0,
        }
    }
}

/// Value of the services map.
///
/// In a master entry (slot 0) `count`, `rev_nat_id` and `flags` are meaningful and `backend_id` is
/// zero. In a backend slot only `backend_id` is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    pub backend_id: u32,
    /// Number of backend slots (master only). Zero means the frontend has no usable endpoints.
    pub count: u16,
    pub rev_nat_id: u16,
    /// `SVC_FLAG_*` bits (master only).
    pub flags: u16,
    /// ClientIP session affinity: the id the affinity map is keyed by, shared by every frontend
    /// of the ServicePort (the rev_nat_id of its ClusterIP frontend). Zero when affinity is off
    /// (master only).
    pub affinity_group: u16,
    /// Session-affinity timeout in seconds, 0 when affinity is off (master only).
    pub affinity_timeout: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// The frontend is a ClusterIP.
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
/// The frontend is a NodePort, LoadBalancer ingress IP or externalIP.
pub const SVC_FLAG_EXTERNAL_FE: u16 = 1 << 1;
/// New flows to a backend on another node are source-NATed to this node (external traffic
/// under externalTrafficPolicy=Cluster), so replies come back through it.
pub const SVC_FLAG_MASQUERADE: u16 = 1 << 2;
/// The ServicePort has no usable endpoint anywhere: new flows are refused rather than dropped
/// (a count of zero without this flag means "endpoints exist, none this traffic may use").
pub const SVC_FLAG_REJECT_EMPTY: u16 = 1 << 3;
/// The frontend (a LoadBalancer ingress IP) accepts new flows only from the sources listed for
/// its rev_nat_id in the source-ranges map.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 5;

/// Data part of a source-ranges LPM trie key (`bpf_lpm_trie_key` is a `u32` prefix length
/// followed by this). The first 32 bits (rev_nat_id and padding) always match in full, so the
/// prefix length of an entry is `32 + CIDR length`; the address is matched by its CIDR prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceRangeKey {
    /// The frontend's rev_nat_id (one per frontend and scope).
    pub rev_nat_id: u16,
    pub _pad: u16,
    /// Source address (or CIDR base), network order.
    pub addr: u32,
}
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 8);

impl SourceRangeKey {
    /// Bits of the key before the address: rev_nat_id and padding.
    pub const ID_BITS: u32 = 32;

    pub const fn new(rev_nat_id: u16, addr: u32) -> Self {
        Self {
            rev_nat_id,
            _pad: 0,
            addr,
        }
    }
}

/// The slots hold only backends on this node (internalTrafficPolicy=Local for the internal scope,
/// externalTrafficPolicy=Local for the external one): session affinity may only return a flow
/// to a local backend.
pub const SVC_FLAG_LOCAL_BACKENDS: u16 = 1 << 6;

/// Key of the session-affinity map: a client address and the ServicePort's affinity group.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AffinityKey {
    /// Client IPv4 address, network order.
    pub client_addr: u32,
    /// [`ServiceValue::affinity_group`].
    pub group: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

/// Value of the session-affinity map: the backend the client's last new connection got.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// The backend's address and port (network order) when the entry was written: backend ids
    /// are reused, so an entry only counts while the id still names this backend.
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad: u16,
    pub _pad2: u32,
    /// `bpf_ktime_get_ns()` of the last new connection that used this entry.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 24);
/// New flows pick their backend from the frontend's Maglev table (keyed by its rev_nat_id in
/// `LB_MAGLEV`) instead of a random slot. The slots are written as well, for inspection and as
/// the fallback while a table is being rebuilt.
pub const SVC_FLAG_MAGLEV: u16 = 1 << 4;

/// Value of the backends map, keyed by a `u32` backend id (ids start at 1; 0 means none).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendValue {
    /// Backend IPv4 address, network order.
    pub addr: u32,
    /// Backend port, network order.
    pub port: u16,
    pub proto: u8,
    /// `BACKEND_FLAG_*` bits.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<BackendValue>() == 8);

/// The endpoint is terminating (serving, not ready); it receives no new flows while ready ones exist.
pub const BACKEND_FLAG_TERMINATING: u8 = 1 << 0;
/// The endpoint runs on this node.
pub const BACKEND_FLAG_LOCAL: u8 = 1 << 1;

/// Value of the reverse-NAT map, keyed by a `u16` rev_nat_id: the frontend replies must come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNatValue {
    /// Frontend address, network order.
    pub addr: u32,
    /// Frontend port, network order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are repr(C), contain only integers and have no implicit padding
    // (checked by the size assertions above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RevNatValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceRangeKey {}
}
