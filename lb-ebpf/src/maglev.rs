//! Maglev backend choice: the flow's slot in its frontend's lookup table (built by the agent,
//! see `lb_common::maglev`).
use lb_common::{
    maglev::{flow_hash, MaglevKey, CHUNK_SLOTS},
    service::SVC_FLAG_MAGLEV,
    ServiceValue,
};

use crate::{maps::MAGLEV, packet::Flow};

/// The table size `M` the agent loaded this object with (`--maglev-table-size`). Zero until
/// the loader overrides it, which turns Maglev lookups off.
#[no_mangle]
static LB_MAGLEV_TABLE_SIZE: u32 = 0;

/// The backend id of the flow's Maglev slot, for a frontend that has a table. `None` when the
/// frontend uses random selection, or its table is missing or built for another size (the agent
/// is rebuilding it): the caller then picks a random slot.
#[inline(always)]
pub fn pick(flow: &Flow, master: &ServiceValue) -> Option<u32> {
    if master.flags & SVC_FLAG_MAGLEV == 0 {
        return None;
    }
    // SAFETY: a plain read of a global; volatile so the compiler does not fold in the default
    // value the loader overrides.
    let m = unsafe { core::ptr::read_volatile(&LB_MAGLEV_TABLE_SIZE) };
    if m == 0 {
        return None;
    }
    let slot = flow_hash(
        flow.src_addr,
        flow.dst_addr,
        flow.src_port,
        flow.dst_port,
        flow.proto,
    ) % m;
    let key = MaglevKey {
        table: master.rev_nat_id,
        chunk: (slot / CHUNK_SLOTS as u32) as u16,
    };
    // SAFETY: only read, within this program run.
    let chunk = unsafe { MAGLEV.get(key) }?;
    if chunk.table_size != m {
        return None;
    }
    let id = chunk.backend_ids[slot as usize % CHUNK_SLOTS];
    (id != 0).then_some(id)
}
