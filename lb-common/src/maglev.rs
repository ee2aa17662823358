//! Maglev consistent hashing: the flow hash both sides use, the per-backend permutation seeds,
//! and the layout of the lookup tables.
//!
//! A frontend whose master entry carries [`crate::service::SVC_FLAG_MAGLEV`] has a lookup table of
//! `M` backend ids (`M` prime, the agent's `--maglev-table-size`). A new flow goes to
//! `table[flow_hash(tuple) % M]`. The table is stored in chunks of [`CHUNK_SLOTS`] ids in the
//! `LB_MAGLEV` hash map, keyed by the frontend's rev_nat_id (unique per frontend and scope) and the
//! chunk number, so a lookup is a single map access and memory is used only by frontends that
//! have a table:
//!
//! ```text
//!  LB_MAGLEV  HASH (no prealloc)  MaglevKey{table = rev_nat_id, chunk} -> MaglevChunk{table_size, ids[64]}
//!             slot s of table t is MaglevKey{t, s / 64}.backend_ids[s % 64]
//! ```
//!
//! The hash is fixed (not seeded per node): every node computes the same slot for the same
//! tuple, and since tables are built from backend addresses (not from node-local ids), every node
//! with the same backend set picks the same backend. That is what lets an upstream router spread
//! one flow's packets over several nodes (ECMP) without breaking it.

/// Backend ids per chunk of a Maglev table.
pub const CHUNK_SLOTS: usize = 64;

/// Smallest and largest table size the agent accepts. The upper bound keeps slot numbers and
/// chunk numbers within 16 bits (65521 is the largest prime below 2^16).
pub const MIN_TABLE_SIZE: u32 = 31;
pub const MAX_TABLE_SIZE: u32 = 65_521;
/// Default table size: 1021 slots, 16 chunks, about 4 KiB per Maglev frontend. See
/// docs/ARCHITECTURE.md for the trade-off.
pub const DEFAULT_TABLE_SIZE: u32 = 1021;

/// Key of the `LB_MAGLEV` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MaglevKey {
    /// The rev_nat_id of the frontend (and scope) the table belongs to.
    pub table: u16,
    /// Chunk number: slots `chunk * 64 .. chunk * 64 + 64`.
    pub chunk: u16,
}
const _: () = assert!(core::mem::size_of::<MaglevKey>() == 4);

/// Value of the `LB_MAGLEV` map: 64 consecutive slots of one table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevChunk {
    /// The `M` the table was built for. The kernel ignores a chunk whose size differs from the
    /// one it was loaded with (a table being rebuilt after the size changed) and falls back to a
    /// random slot.
    pub table_size: u32,
    /// Backend ids; 0 past the end of the table.
    pub backend_ids: [u32; CHUNK_SLOTS],
}
const _: () = assert!(core::mem::size_of::<MaglevChunk>() == 4 + 4 * CHUNK_SLOTS);

impl Default for MaglevChunk {
    fn default() -> Self {
        Self {
            table_size: 0,
            backend_ids: [0; CHUNK_SLOTS],
        }
    }
}

/// Number of chunks a table of `table_size` slots takes.
#[inline(always)]
pub const fn chunks(table_size: u32) -> u32 {
    table_size.div_ceil(CHUNK_SLOTS as u32)
}

/// Whether `n` is prime (trial division; for validating the table size, not for the data path).
pub const fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d as u64 * d as u64 <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// A 64-bit finalizer with good avalanche (the constants of MurmurHash3's fmix64).
#[inline(always)]
const fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Fixed seed of the flow hash (the same on every node, see the module doc).
const FLOW_SEED: u64 = 0x6c62_5f6d_6167_6c76;
/// Seeds of the two backend hashes (offset and skip of the permutation).
const OFFSET_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const SKIP_SEED: u64 = 0xd1b5_4a32_d192_ed03;

/// The hash of a flow's 5-tuple as the client sends it. Arguments are in network order, exactly
/// as they sit in the packet and in the maps; they are converted to numbers first so the result
/// does not depend on the machine's byte order.
#[inline(always)]
pub const fn flow_hash(
    src_addr: u32,
    dst_addr: u32,
    src_port: u16,
    dst_port: u16,
    proto: u8,
) -> u32 {
    let addrs = ((u32::from_be(src_addr) as u64) << 32) | u32::from_be(dst_addr) as u64;
    let rest = ((u16::from_be(src_port) as u64) << 24)
        | ((u16::from_be(dst_port) as u64) << 8)
        | proto as u64;
    let h = mix(mix(addrs ^ FLOW_SEED) ^ rest);
    (h ^ (h >> 32)) as u32
}

#[inline(always)]
const fn backend_hash(addr: u32, port: u16, seed: u64) -> u64 {
    mix((((u32::from_be(addr) as u64) << 16) | u16::from_be(port) as u64) ^ seed)
}

/// The backend's permutation of the table as in the Maglev paper: it prefers slots
/// `offset, offset + skip, offset + 2 skip, ...` (mod `table_size`). `table_size` being prime and
/// `skip` in `1..table_size` makes this visit every slot exactly once. Address and port in
/// network order.
pub const fn permutation(addr: u32, port: u16, table_size: u32) -> (u32, u32) {
    let m = table_size as u64;
    let offset = backend_hash(addr, port, OFFSET_SEED) % m;
    let skip = backend_hash(addr, port, SKIP_SEED) % (m - 1) + 1;
    (offset as u32, skip as u32)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers only, no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::MaglevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MaglevChunk {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert!(is_prime(1021) && is_prime(65_521) && is_prime(31) && is_prime(2));
        assert!(!is_prime(1024) && !is_prime(1) && !is_prime(0) && !is_prime(65_535));
        assert!(
            is_prime(DEFAULT_TABLE_SIZE) && is_prime(MIN_TABLE_SIZE) && is_prime(MAX_TABLE_SIZE)
        );
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = flow_hash(1, 2, 3, 4, 6);
        assert_ne!(base, flow_hash(9, 2, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 9, 3, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 9, 4, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 9, 6));
        assert_ne!(base, flow_hash(1, 2, 3, 4, 17));
        assert_eq!(base, flow_hash(1, 2, 3, 4, 6));
    }

    #[test]
    fn permutation_skip_is_in_range() {
        for a in 0..1000u32 {
            let (o, s) = permutation(a.to_be(), 80u16.to_be(), 31);
            assert!(o < 31 && (1..31).contains(&s));
        }
    }
}
