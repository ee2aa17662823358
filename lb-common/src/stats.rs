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

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), five u64 and no padding (size asserted above): any bit pattern is valid.
    unsafe impl aya::Pod for super::TrafficCounters {}
}
