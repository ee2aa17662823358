//! The maps, pinned by name so that userspace (agent and lbctl) and later program instances find
//! them under the agent's `--bpffs` directory. Layouts and names come from lb-common.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    map_sizes, AffinityKey, AffinityValue, BackendValue, CtKey, CtValue, RejectBucket, RevNatValue,
    ServiceKey, ServiceValue, SockKey, SockValue, SourceRangeKey, TrafficCounters,
    BPF_F_NO_PREALLOC,
};

/// Flag of bpf_map_update_elem: only create, never overwrite.
const BPF_NOEXIST: u64 = 1;

#[map(name = "LB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(map_sizes::SERVICES, 0);

#[map(name = "LB_BACKENDS")]
pub static BACKENDS: HashMap<u32, BackendValue> = HashMap::pinned(map_sizes::BACKENDS, 0);

#[map(name = "LB_REV_NAT")]
pub static REV_NAT: HashMap<u16, RevNatValue> = HashMap::pinned(map_sizes::REV_NAT, 0);

#[map(name = "LB_CONNTRACK")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(map_sizes::CONNTRACK, 0);

#[map(name = "LB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(map_sizes::AFFINITY, 0);
#[map(name = "LB_SOCK")]
pub static SOCK: LruHashMap<SockKey, SockValue> = LruHashMap::pinned(map_sizes::SOCK, 0);

#[map(name = "LB_FE_STATS")]
pub static FRONTEND_STATS: PerCpuHashMap<u32, TrafficCounters> =
    PerCpuHashMap::pinned(map_sizes::FRONTEND_STATS, BPF_F_NO_PREALLOC);

#[map(name = "LB_BE_STATS")]
pub static BACKEND_STATS: PerCpuHashMap<u32, TrafficCounters> =
    PerCpuHashMap::pinned(map_sizes::BACKEND_STATS, BPF_F_NO_PREALLOC);

#[map(name = "LB_DROPS")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(lb_common::stats::drop_reason::COUNT, 0);

#[map(name = "LB_SRC_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::pinned(map_sizes::SOURCE_RANGES, 0);

#[map(name = "LB_REJECT_BKT")]
pub static REJECT_BUCKET: PerCpuArray<RejectBucket> = PerCpuArray::pinned(1, 0);
/// Maglev lookup tables in chunks of 64 slots; entries exist only for frontends that use Maglev.
#[map(name = "LB_MAGLEV")]
pub static MAGLEV: HashMap<MaglevKey, MaglevChunk> =
    HashMap::pinned(map_sizes::MAGLEV_CHUNKS, BPF_F_NO_PREALLOC);

/// This CPU's counters of `id` in `map` (a frontend's or a backend's), created zeroed by the first
/// packet that counts there: the agent does not write an entry per id up front, which for 10k
/// Services x 10 endpoints cost 60k per-CPU allocations in its first sync. An id the agent hands
/// out again is zeroed by the agent before anything names it (see the writer's
/// `stats_may_exist`), so a new user never inherits counts.
#[inline(always)]
pub fn counters(
    map: &PerCpuHashMap<u32, TrafficCounters>,
    id: u32,
) -> Option<*mut TrafficCounters> {
    if let Some(c) = map.get_ptr_mut(id) {
        return Some(c);
    }
    // Another CPU may create it between the lookup and the insert (EEXIST): the lookup after
    // finds that one.
    let _ = map.insert(id, TrafficCounters::default(), BPF_NOEXIST);
    map.get_ptr_mut(id)
}

/// Counts one dropped packet under `reason` ([`lb_common::stats::drop_reason`]).
#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(c) = DROPS.get_ptr_mut(reason) {
        // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it meanwhile.
        unsafe { *c += 1 };
    }
}
