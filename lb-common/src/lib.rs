//! The ABI between the kernel programs (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]`, has its padding spelled out as named fields that are
//! always zero, and carries a compile-time size assertion, so the two sides can never disagree on a
//! layout. Addresses and ports are stored in **network byte order**, exactly as they sit in packet
//! headers: the kernel side compares and copies them without swapping, and userspace converts with
//! [`ipv4_to_net`] / [`port_to_net`] and back.
//!
//! ```text
//!  services   HASH     ServiceKey{addr,port,proto,scope,slot} -> ServiceValue
//!                        slot 0     = master: count of backend slots, rev_nat_id, flags
//!                        slot 1..=n = one backend id each
//!  backends   HASH     u32 backend id -> BackendValue{addr,port,proto,flags}
//!  rev_nat    HASH     u16 rev_nat_id -> RevNatValue{addr,port} (the frontend replies come from)
//!  conntrack  LRU_HASH CtKey{5-tuple as seen on the wire, direction} -> CtValue
//!  affinity LRU_HASH AffinityKey{client,group} -> AffinityValue{backend,last_used}
//!  fe_stats   PERCPU_HASH u32 rev_nat_id -> TrafficCounters
//!  be_stats   PERCPU_HASH u32 backend id -> TrafficCounters
//!  drops      PERCPU_ARRAY u32 drop reason -> u64 packets
//!  src_ranges LPM_TRIE {prefixlen, SourceRangeKey{rev_nat_id, addr}} -> u8 (1 = allowed)
//!  reject_bkt PERCPU_ARRAY u32 0 -> RejectBucket (rate limit of rejects)
//!  maglev     HASH     MaglevKey{table = rev_nat_id, chunk} -> MaglevChunk (64 slots of a table)
//!  sock       LRU_HASH SockKey{socket cookie, address, direction} -> SockValue (host processes)
//! ```
#![no_std]

pub mod conntrack;
pub mod csum;
pub mod legacy;
pub mod maglev;
pub mod reject;
pub mod service;
pub mod sock;
pub mod stats;

pub use conntrack::{CtKey, CtValue};
pub use reject::RejectBucket;
pub use service::{
    AffinityKey, AffinityValue, BackendValue, RevNatValue, ServiceKey, ServiceValue, SourceRangeKey,
};
pub use sock::{SockKey, SockValue};
pub use stats::TrafficCounters;

/// Version of the map layout. Bumped whenever a key or value changes shape; the agent refuses to
/// adopt pinned maps written with another version.
///
/// 1: first layout. 2: conntrack values grew from 24 to 32 bytes (`peer_addr`/`peer_port` for
/// SNAT); service key scope 1 became the external-traffic set.
pub const ABI_VERSION: u32 = 2;

/// Map names. They are the names of the `static`s in the kernel object and of the pins in bpffs.
pub mod map_names {
    pub const SERVICES: &str = "LB_SERVICES";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const REV_NAT: &str = "LB_REV_NAT";
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    /// LRU_HASH [`crate::AffinityKey`] -> [`crate::AffinityValue`]: ClientIP session affinity.
    pub const AFFINITY: &str = "LB_AFFINITY";
    pub const FRONTEND_STATS: &str = "LB_FE_STATS";
    pub const BACKEND_STATS: &str = "LB_BE_STATS";
    /// PERCPU_ARRAY u32 reason ([`crate::stats::drop_reason`]) -> u64 packets.
    pub const DROPS: &str = "LB_DROPS";
    /// LRU_HASH [`crate::SockKey`] -> [`crate::SockValue`]: what the host-process socket hooks
    /// remember per socket.
    pub const SOCK: &str = "LB_SOCK";
    /// ARRAY of one u32: the [`crate::ABI_VERSION`] of the maps pinned beside it. Created and
    /// read by userspace only; its own layout never changes.
    pub const META: &str = "LB_META";
    /// LPM_TRIE `{prefixlen, SourceRangeKey}` -> u8: the loadBalancerSourceRanges of frontends
    /// flagged `SVC_FLAG_SOURCE_RANGES`.
    pub const SOURCE_RANGES: &str = "LB_SRC_RANGES";
    /// PERCPU_ARRAY of one [`crate::RejectBucket`]: the reject rate limit's state.
    pub const REJECT_BUCKET: &str = "LB_REJECT_BKT";
    /// HASH (no prealloc) [`crate::maglev::MaglevKey`] -> [`crate::maglev::MaglevChunk`]: the
    /// Maglev lookup tables, in chunks.
    pub const MAGLEV: &str = "LB_MAGLEV";
}

/// Default map capacities. The conntrack size can be changed by the agent before load.
pub mod map_sizes {
    /// Frontend master entries plus one entry per backend slot.
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 131_072;
    pub const REV_NAT: u32 = 65_536;
    /// Two entries per flow (forward and reply).
    pub const CONNTRACK: u32 = 262_144;
    /// One per (client address, ServicePort with affinity) pair in use.
    pub const AFFINITY: u32 = 65_536;
    /// One per frontend (rev_nat ids are u16).
    pub const FRONTEND_STATS: u32 = 65_536;
    /// One per backend.
    pub const BACKEND_STATS: u32 = BACKENDS;
    /// Source-range entries over all LoadBalancer frontends.
    pub const SOURCE_RANGES: u32 = 65_536;
    /// Maglev tables the chunk map is sized for (the agent multiplies by the chunks per table
    /// when it creates the map). Entries are allocated on use, so unused capacity costs only
    /// the hash buckets.
    pub const MAGLEV_TABLES: u32 = 16_384;
    /// Chunk capacity compiled into the object: enough for [`MAGLEV_TABLES`] tables of the
    /// default size. The agent overrides it for other sizes.
    pub const MAGLEV_CHUNKS: u32 =
        MAGLEV_TABLES * crate::maglev::chunks(crate::maglev::DEFAULT_TABLE_SIZE);
    /// Host-process sockets: two entries per (socket, frontend) in use.
    pub const SOCK: u32 = 65_536;
}

/// `BPF_F_NO_PREALLOC`: the stats maps allocate an entry only when userspace creates it, so
/// their memory follows the number of frontends and backends, not the capacity times CPUs.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Program names in the kernel object.
pub mod program_names {
    /// tc ingress on pod-facing interfaces: service lookup, DNAT and reverse NAT.
    pub const TC_INGRESS: &str = "lb_tc_ingress";
    /// tc egress on pod-facing interfaces: reverse NAT of replies that reach a client pod from
    /// anywhere, in particular from backends on other nodes (they arrive through the uplink).
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// XDP on node uplinks: NodePort, LoadBalancer and externalIP traffic from outside the node.
    pub const XDP: &str = "lb_xdp";
    /// cgroup connect4: a host process connects to a frontend; the socket gets a backend.
    pub const SOCK_CONNECT4: &str = "lb_sock_connect4";
    /// cgroup sendmsg4: an unconnected UDP datagram to a frontend goes to a backend.
    pub const SOCK_SENDMSG4: &str = "lb_sock_sendmsg4";
    /// cgroup recvmsg4: a datagram from a backend is reported as coming from the frontend.
    pub const SOCK_RECVMSG4: &str = "lb_sock_recvmsg4";
    /// cgroup getpeername4: a translated socket reports the frontend as its peer.
    pub const SOCK_GETPEERNAME4: &str = "lb_sock_getpeername4";
}

/// `skb->mark` of a packet synthesized by `lbctl trace` and run through BPF_PROG_TEST_RUN. The
/// programs treat a packet as a trace only when it has this mark *and* no ingress interface
/// (`ingress_ifindex == 0`), which a real packet at tc ingress never has; a trace decides exactly
/// as a real packet would but writes no conntrack entry and no counter.
pub const TRACE_MARK: u32 = 0x7ace_0001;

/// Name of the kernel object's global holding the Maglev table size `M` the agent was started
/// with (set at load time; 0 disables Maglev lookups, which then fall back to a random slot).
pub const MAGLEV_TABLE_SIZE_GLOBAL: &str = "LB_MAGLEV_TABLE_SIZE";

/// IP protocol numbers as used in keys.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
    pub const ICMP: u8 = 1;
}

/// Converts an IPv4 address to the network-order `u32` stored in maps.
#[inline]
pub const fn ipv4_to_net(addr: core::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Converts a network-order `u32` from a map back to an address.
#[inline]
pub const fn net_to_ipv4(addr: u32) -> core::net::Ipv4Addr {
    let b = addr.to_ne_bytes();
    core::net::Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// Converts a host-order port to the network-order `u16` stored in maps.
#[inline]
pub const fn port_to_net(port: u16) -> u16 {
    port.to_be()
}

/// Converts a network-order port from a map back to host order.
#[inline]
pub const fn net_to_port(port: u16) -> u16 {
    u16::from_be(port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::Ipv4Addr;

    #[test]
    fn address_conversion_keeps_wire_order() {
        let a = Ipv4Addr::new(198, 18, 0, 10);
        let n = ipv4_to_net(a);
        assert_eq!(n.to_ne_bytes(), [198, 18, 0, 10]);
        assert_eq!(net_to_ipv4(n), a);
        assert_eq!(port_to_net(80).to_ne_bytes(), [0, 80]);
        assert_eq!(net_to_port(port_to_net(8080)), 8080);
    }
}
