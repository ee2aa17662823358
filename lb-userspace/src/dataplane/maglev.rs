//! Building Maglev lookup tables (pure; the writer stores them, see `lb_common::maglev`).
//!
//! Population follows the Maglev paper (Eisenbud et al., NSDI 2016): every backend walks its
//! own permutation of the `M` slots and, taking turns, each claims the next slot of its
//! permutation that nobody has claimed yet, until all `M` slots are taken. Every backend ends up
//! with `M/N` slots give or take one, and a change of one backend mostly moves only the slots it
//! gains or loses.
//!
//! The result depends only on the backends' addresses and ports and on `M`: backends are
//! ordered by address first, so every node with the same backend set builds the same table,
//! whatever ids its agent gave the backends.
use std::collections::BTreeMap;

use lb_common::maglev::{
    chunks, permutation, MaglevChunk, CHUNK_SLOTS, MAX_TABLE_SIZE, MIN_TABLE_SIZE,
};

use super::BackendAddr;

/// A validated table size `M`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSize(u32);

impl TableSize {
    /// `M` must be prime (so every backend's permutation visits every slot) and within
    /// `MIN_TABLE_SIZE..=MAX_TABLE_SIZE`.
    pub fn new(m: u32) -> Result<Self, String> {
        if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&m) {
            return Err(format!(
                "Maglev table size {m} is outside {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE}"
            ));
        }
        if !lb_common::maglev::is_prime(m) {
            let below = (MIN_TABLE_SIZE..m)
                .rev()
                .find(|&n| lb_common::maglev::is_prime(n));
            let above = (m..=MAX_TABLE_SIZE).find(|&n| lb_common::maglev::is_prime(n));
            return Err(format!(
                "Maglev table size {m} is not prime (nearest primes: {}, {})",
                below.map_or("none".into(), |n| n.to_string()),
                above.map_or("none".into(), |n| n.to_string()),
            ));
        }
        Ok(Self(m))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for TableSize {
    fn default() -> Self {
        Self(lb_common::maglev::DEFAULT_TABLE_SIZE)
    }
}

impl std::str::FromStr for TableSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let m: u32 = s
            .trim()
            .parse()
            .map_err(|_| format!("Maglev table size {s:?} is not a number"))?;
        Self::new(m)
    }
}

impl std::fmt::Display for TableSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The table for `backends`: entry `s` is the index (into the sorted, deduplicated backend
/// list also returned) of the backend slot `s` belongs to. Empty without backends.
pub fn build(backends: &[BackendAddr], size: TableSize) -> (Vec<BackendAddr>, Vec<usize>) {
    let mut sorted: Vec<BackendAddr> = backends.to_vec();
    sorted.sort_by_key(|b| (b.addr, b.port, b.proto));
    sorted.dedup_by_key(|b| (b.addr, b.port, b.proto));
    let m = size.get() as u64;
    if sorted.is_empty() {
        return (sorted, Vec::new());
    }
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|b| {
            let (offset, skip) = permutation(
                lb_common::ipv4_to_net(b.addr),
                lb_common::port_to_net(b.port),
                size.get(),
            );
            (offset as u64, skip as u64)
        })
        .collect();
    let mut next = vec![0u64; sorted.len()];
    let mut table = vec![usize::MAX; m as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m) as usize;
            while table[slot] != usize::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m) as usize;
            }
            table[slot] = i;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    (sorted, table)
}

/// The table as the chunks of the `LB_MAGLEV` map, for backends whose ids `id_of` gives.
pub fn chunks_for(
    backends: &[BackendAddr],
    size: TableSize,
    id_of: impl Fn(&BackendAddr) -> u32,
) -> BTreeMap<u16, MaglevChunk> {
    let (sorted, table) = build(backends, size);
    let mut out = BTreeMap::new();
    if table.is_empty() {
        return out;
    }
    let ids: Vec<u32> = sorted.iter().map(id_of).collect();
    for c in 0..chunks(size.get()) as usize {
        let mut chunk = MaglevChunk {
            table_size: size.get(),
            ..Default::default()
        };
        for (i, slot) in (c * CHUNK_SLOTS..((c + 1) * CHUNK_SLOTS).min(table.len())).enumerate() {
            chunk.backend_ids[i] = ids[table[slot]];
        }
        out.insert(c as u16, chunk);
    }
    out
}

/// The slot a flow hashes to: `flow_hash(tuple) % M` (arguments in network order).
pub fn slot_of(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, size: u32) -> u32 {
    lb_common::maglev::flow_hash(src, dst, sport, dport, proto) % size
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn be(i: u32) -> BackendAddr {
        let a = 0xc612_0000u32 + 256 + i; // 198.18.1.x and up
        BackendAddr {
            addr: Ipv4Addr::from(a),
            port: 8080,
            proto: lb_common::proto::TCP,
            local: false,
        }
    }

    fn backends(n: u32) -> Vec<BackendAddr> {
        (1..=n).map(be).collect()
    }

    /// A deterministic stream of client tuples (xorshift), network order.
    fn tuples(n: usize) -> Vec<(u32, u32, u16, u16, u8)> {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let client = Ipv4Addr::new(198, 19, (s >> 8) as u8, (s >> 16) as u8);
                (
                    lb_common::ipv4_to_net(client),
                    lb_common::ipv4_to_net(Ipv4Addr::new(198, 18, 100, 1)),
                    ((s >> 32) as u16 | 1024).to_be(),
                    80u16.to_be(),
                    lb_common::proto::TCP,
                )
            })
            .collect()
    }

    /// Which backend (by address) each tuple lands on.
    fn route(
        bs: &[BackendAddr],
        size: TableSize,
        flows: &[(u32, u32, u16, u16, u8)],
    ) -> Vec<BackendAddr> {
        let (sorted, table) = build(bs, size);
        flows
            .iter()
            .map(|&(s, d, sp, dp, p)| sorted[table[slot_of(s, d, sp, dp, p, size.get()) as usize]])
            .collect()
    }

    #[test]
    fn table_size_must_be_prime_and_in_range() {
        assert_eq!(TableSize::new(1021).unwrap().get(), 1021);
        let e = TableSize::new(1024).unwrap_err();
        assert!(
            e.contains("not prime") && e.contains("1021") && e.contains("1031"),
            "{e}"
        );
        assert!(TableSize::new(7).unwrap_err().contains("outside"));
        assert!(TableSize::new(65_537).unwrap_err().contains("outside"));
        assert!("abc"
            .parse::<TableSize>()
            .unwrap_err()
            .contains("not a number"));
        assert_eq!("4093".parse::<TableSize>().unwrap().get(), 4093);
    }

    #[test]
    fn every_slot_is_filled_and_each_backend_gets_about_m_over_n() {
        for (n, m) in [(1, 31), (3, 1021), (7, 1021), (10, 4093), (50, 4093)] {
            let size = TableSize::new(m).unwrap();
            let (sorted, table) = build(&backends(n), size);
            assert_eq!(table.len(), m as usize);
            assert!(table.iter().all(|&i| i < sorted.len()), "every slot filled");
            let mut counts = vec![0usize; n as usize];
            for &i in &table {
                counts[i] += 1;
            }
            // The round-robin fill gives every backend floor(M/N) or ceil(M/N) slots, except
            // that the last round stops part-way.
            let fair = m as usize / n as usize;
            for c in counts {
                assert!(
                    c == fair || c == fair + 1,
                    "n={n} m={m}: {c} slots, fair {fair}"
                );
            }
        }
    }

    #[test]
    fn table_depends_on_addresses_not_input_order_or_ids() {
        let size = TableSize::default();
        let mut bs = backends(5);
        let a = chunks_for(&bs, size, |b| b.addr.octets()[3] as u32);
        bs.reverse();
        bs.push(be(3)); // duplicate
        let b = chunks_for(&bs, size, |b| b.addr.octets()[3] as u32);
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.values().all(|c| c.table_size == 1021));
        // Slots past M in the last chunk are empty; every other entry names a backend.
        let last = &a[&15];
        assert!(last.backend_ids[1021 - 15 * 64..].iter().all(|&id| id == 0));
        assert!(last.backend_ids[..1021 - 15 * 64].iter().all(|&id| id != 0));
    }

    /// Adding or removing one of N backends moves about 1/N of flows, and almost only flows
    /// to or from that backend.
    #[test]
    fn one_backend_change_moves_about_one_nth_of_flows() {
        let flows = tuples(200_000);
        for (n, m) in [(5u32, 1021u32), (10, 1021), (20, 4093)] {
            let size = TableSize::new(m).unwrap();
            let before = route(&backends(n), size, &flows);

            // Remove backend 1 (the first in address order).
            let after = route(&backends(n)[1..], size, &flows);
            let removed = be(1);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            let frac = moved as f64 / flows.len() as f64;
            let ideal = 1.0 / n as f64;
            // Flows of the surviving backends: how many of them moved needlessly.
            let survivors = before.iter().filter(|b| **b != removed).count();
            let needless = before
                .iter()
                .zip(&after)
                .filter(|(a, b)| **a != removed && a != b)
                .count();
            let needless_frac = needless as f64 / survivors as f64;
            println!("remove 1 of {n} (M={m}): moved {frac:.4} (ideal {ideal:.4}), surviving flows moved {needless_frac:.4}");
            // At least the removed backend's own flows move; on top of that Maglev moves a few
            // percent of the others (its known disruption, smaller as M/N grows).
            assert!(
                frac >= ideal * 0.9 && frac <= ideal + 0.035,
                "remove: moved {frac}, ideal {ideal}"
            );
            assert!(
                needless_frac < 0.035,
                "remove: {needless_frac} of surviving flows moved"
            );

            // Add backend n+1.
            let grown = route(&backends(n + 1), size, &flows);
            let added = be(n + 1);
            let moved = before.iter().zip(&grown).filter(|(a, b)| a != b).count();
            let frac = moved as f64 / flows.len() as f64;
            let ideal = 1.0 / (n + 1) as f64;
            let to_new = grown.iter().filter(|b| **b == added).count();
            let needless = moved
                - before
                    .iter()
                    .zip(&grown)
                    .filter(|(a, b)| a != b && **b == added)
                    .count();
            let needless_frac = needless as f64 / flows.len() as f64;
            println!("add 1 to {n} (M={m}): moved {frac:.4} (ideal {ideal:.4}), moved elsewhere {needless_frac:.4}");
            assert!(
                frac >= ideal * 0.9 && frac <= ideal + 0.035,
                "add: moved {frac}, ideal {ideal}"
            );
            assert!(
                to_new > 0 && needless_frac < 0.035,
                "add: {needless_frac} moved between old backends"
            );
        }
    }

    #[test]
    fn flows_spread_evenly_over_backends() {
        let flows = tuples(100_000);
        let n = 8;
        let routed = route(&backends(n), TableSize::default(), &flows);
        for b in backends(n) {
            let share = routed.iter().filter(|r| **r == b).count() as f64 / flows.len() as f64;
            assert!(
                (share - 1.0 / n as f64).abs() < 0.02,
                "{}: share {share}",
                b.addr
            );
        }
    }
}
