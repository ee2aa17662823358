//! Per-CPU traffic counters, one entry per frontend (keyed by rev_nat_id) and one per backend
//! (keyed by backend id). Userspace creates a zeroed entry when it allocates the id and deletes it
//! when it frees the id, so counts never leak from one frontend or backend to the next; the
//! kernel only increments its own CPU's copy, which needs no atomics.

/// Counters of one frontend or backend on one CPU. "in" is client to backend, "out" the replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Flows that were given a backend (conntrack misses).
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 40);

impl TrafficCounters {
    /// Sum of the per-CPU copies.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a TrafficCounters>) -> TrafficCounters {
        per_cpu
            .into_iter()
            .fold(TrafficCounters::default(), |a, c| TrafficCounters {
                packets_in: a.packets_in + c.packets_in,
                bytes_in: a.bytes_in + c.bytes_in,
                packets_out: a.packets_out + c.packets_out,
                bytes_out: a.bytes_out + c.bytes_out,
                new_flows: a.new_flows + c.new_flows,
            })
    }
}

/// Why the data path dropped (or refused) a packet: the index into the `LB_DROPS` per-CPU array,
/// whose values are `u64` packet counts.
pub mod drop_reason {
    /// A new flow to a frontend whose ServicePort has no usable endpoint.
    pub const NO_BACKEND: u32 = 0;
    /// A new external flow under externalTrafficPolicy=Local on a node without a local endpoint.
    pub const NO_LOCAL_BACKEND: u32 = 1;
    /// A new SNATed flow found no free source port after `SNAT_PORT_TRIES` tries.
    pub const SNAT_PORTS_EXHAUSTED: u32 = 2;
    /// A rewrite helper failed halfway; the packet was dropped rather than sent half-translated.
    pub const REWRITE_FAILED: u32 = 3;
    /// A slot or backend entry was missing during a lookup (an update in flight).
    pub const MAP_INCONSISTENT: u32 = 4;
    /// A translated packet had no route (FIB lookup failed) towards its new destination.
    pub const NO_ROUTE: u32 = 5;
    /// A translated packet was larger than the MTU towards its new destination.
    pub const MTU_EXCEEDED: u32 = 6;
    /// A new flow to a ServicePort without any endpoint was refused: a TCP RST or an ICMP port
    /// unreachable went back to the client instead (the packet itself is consumed).
    pub const REJECTED: u32 = 7;
    /// As [`REJECTED`], but over the per-CPU reject rate limit: dropped without an answer.
    pub const REJECT_RATE_LIMITED: u32 = 8;
    /// A new flow to a LoadBalancer frontend from a source outside its loadBalancerSourceRanges.
    pub const SOURCE_RANGE: u32 = 9;
    /// Size of the array: room for reasons added later without recreating the pinned map
    /// (userspace recreates an older, smaller one).
    pub const COUNT: u32 = 16;
    /// Names for metrics and `lbctl`, indexed by reason.
    pub const NAMES: [&str; 10] = [
        "no_backend",
        "no_local_backend",
        "snat_ports_exhausted",
        "rewrite_failed",
        "map_inconsistent",
        "no_route",
        "mtu_exceeded",
        "rejected",
        "reject_rate_limited",
        "source_range",
    ];
    const _: () = assert!(NAMES.len() as u32 <= COUNT);
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), five u64 and no padding (size asserted above): any bit pattern is valid.
    unsafe impl aya::Pod for super::TrafficCounters {}
}
