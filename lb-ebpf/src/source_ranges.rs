//! loadBalancerSourceRanges: a LoadBalancer frontend flagged `SVC_FLAG_SOURCE_RANGES` takes new
//! flows only from sources its entries in the LPM trie cover.
use aya_ebpf::maps::lpm_trie::Key;
use lb_common::SourceRangeKey;

use crate::maps::SOURCE_RANGES;

/// Whether `src_addr` (network order) may open a flow to the frontend with `rev_nat_id`.
#[inline(always)]
pub fn allowed(rev_nat_id: u16, src_addr: u32) -> bool {
    let key = Key::new(
        SourceRangeKey::ID_BITS + 32,
        SourceRangeKey::new(rev_nat_id, src_addr),
    );
    SOURCE_RANGES.get(&key).is_some()
}
