//! An in-memory dataplane for tests. After every operation it checks what a packet could observe
//! at that instant: every master's slots `1..=count` exist and name existing backends, and every
//! master's rev-NAT entry exists, and every master flagged Maglev has a complete table whose
//! entries name existing backends. A writer that breaks make-before-break fails here.
use std::collections::BTreeMap;

use ipnet::Ipv4Net;
use lb_common::{
    maglev::{chunks, MaglevChunk, MaglevKey, CHUNK_SLOTS},
    service::{SVC_FLAG_MAGLEV, SVC_FLAG_SOURCE_RANGES},
    BackendValue, RevNatValue, ServiceKey, ServiceValue,
};

use super::{Dataplane, Error, Result, StatsOf};

#[derive(Debug, Default, Clone)]
pub struct FakeMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub rev_nat: BTreeMap<u16, RevNatValue>,
    pub maglev: BTreeMap<MaglevKey, MaglevChunk>,
    /// Whose counters were zeroed by the writer for their current user.
    pub stats: std::collections::BTreeSet<StatsOf>,
    /// Ids whose counter entry may hold counts of a previous user: deleted entries are put here,
    /// as a packet still in flight may create them again (the data path creates an entry at
    /// its first packet). Nothing may name such an id before the writer zeroes it.
    pub stale_stats: std::collections::BTreeSet<StatsOf>,
    /// Source-range entries: (rev_nat_id, range).
    pub source_ranges: std::collections::BTreeSet<(u16, Ipv4Net)>,
    /// Every operation, in order, for tests that look at the sequence.
    pub log: Vec<String>,
    /// Skip the per-operation consistency check (quadratic), for tests of sheer size.
    pub skip_checks: bool,
    /// Refuse every service-map write, as a full or broken map would.
    pub fail_writes: bool,
}

impl FakeMaps {
    /// Checks that a packet arriving now would find a consistent frontend.
    pub fn check_consistent(&self) -> Result<()> {
        if self.skip_checks {
            return Ok(());
        }
        for (key, master) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            if self
                .stale_stats
                .contains(&StatsOf::Frontend(master.rev_nat_id))
            {
                return Err(Error::Fake(format!(
                    "{key:?}: counters of rev_nat {} hold a previous user's counts",
                    master.rev_nat_id
                )));
            }
            if !self.rev_nat.contains_key(&master.rev_nat_id) {
                return Err(Error::Fake(format!(
                    "{key:?}: rev_nat {} missing",
                    master.rev_nat_id
                )));
            }
            // A frontend flagged for source ranges with no entry would refuse everyone.
            if master.flags & SVC_FLAG_SOURCE_RANGES != 0
                && !self
                    .source_ranges
                    .iter()
                    .any(|(id, _)| *id == master.rev_nat_id)
            {
                return Err(Error::Fake(format!(
                    "{key:?}: flagged for source ranges, but rev_nat {} has none",
                    master.rev_nat_id
                )));
            }
            for slot in 1..=master.count {
                let slot_key = ServiceKey { slot, ..*key };
                let Some(v) = self.services.get(&slot_key) else {
                    return Err(Error::Fake(format!("{key:?}: slot {slot} missing")));
                };
                if self.stale_stats.contains(&StatsOf::Backend(v.backend_id)) {
                    return Err(Error::Fake(format!(
                        "{key:?}: counters of backend {} hold a previous user's counts",
                        v.backend_id
                    )));
                }
                if !self.backends.contains_key(&v.backend_id) {
                    return Err(Error::Fake(format!(
                        "{key:?}: slot {slot} names missing backend {}",
                        v.backend_id
                    )));
                }
            }
            if master.flags & SVC_FLAG_MAGLEV != 0 && master.count > 0 {
                self.check_maglev(key, master.rev_nat_id)?;
            }
        }
        Ok(())
    }

    /// A Maglev frontend's table: every chunk present, every slot naming an existing backend.
    /// While a table is rebuilt for another size (the agent restarted with a new
    /// `--maglev-table-size`), chunks of both sizes coexist; the kernel ignores chunks of the
    /// wrong size and missing ones (random fallback), so then only the backend ids are checked.
    fn check_maglev(&self, key: &ServiceKey, table: u16) -> Result<()> {
        let chunks_of: Vec<(&MaglevKey, &MaglevChunk)> = self
            .maglev
            .iter()
            .filter(|(k, _)| k.table == table)
            .collect();
        let sizes: std::collections::BTreeSet<u32> =
            chunks_of.iter().map(|(_, c)| c.table_size).collect();
        let Some(&m) = sizes.first() else {
            return Err(Error::Fake(format!(
                "{key:?}: Maglev table {table} missing"
            )));
        };
        if sizes.len() == 1 {
            for c in 0..chunks(m) as u16 {
                if !self.maglev.contains_key(&MaglevKey { table, chunk: c }) {
                    return Err(Error::Fake(format!(
                        "{key:?}: Maglev chunk {table}/{c} missing"
                    )));
                }
            }
        }
        for (k, chunk) in chunks_of {
            let used = (chunk.table_size as usize)
                .saturating_sub(k.chunk as usize * CHUNK_SLOTS)
                .min(CHUNK_SLOTS);
            for &id in &chunk.backend_ids[..used] {
                if !self.backends.contains_key(&id) {
                    return Err(Error::Fake(format!(
                        "{key:?}: Maglev chunk {table}/{} names missing backend {id}",
                        k.chunk
                    )));
                }
            }
        }
        Ok(())
    }

    fn after(&mut self, op: String) -> Result<()> {
        self.log.push(op);
        self.check_consistent()
    }
}

impl Dataplane for FakeMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn rev_nats(&self) -> Result<Vec<(u16, RevNatValue)>> {
        Ok(self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        if self.fail_writes {
            return Err(Error::Fake(format!(
                "injected failure writing slot {}",
                key.slot
            )));
        }
        self.services.insert(key, value);
        self.after(format!("put service slot {}", key.slot))
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<()> {
        self.services.remove(&key);
        self.after(format!("delete service slot {}", key.slot))
    }
    fn put_backend(&mut self, id: u32, value: BackendValue) -> Result<()> {
        self.backends.insert(id, value);
        self.after(format!("put backend {id}"))
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.backends.remove(&id);
        self.after(format!("delete backend {id}"))
    }
    fn put_rev_nat(&mut self, id: u16, value: RevNatValue) -> Result<()> {
        self.rev_nat.insert(id, value);
        self.after(format!("put rev_nat {id}"))
    }
    fn delete_rev_nat(&mut self, id: u16) -> Result<()> {
        self.rev_nat.remove(&id);
        self.after(format!("delete rev_nat {id}"))
    }
    fn stats_keys(&self) -> Result<Vec<StatsOf>> {
        Ok(self.stats.union(&self.stale_stats).copied().collect())
    }
    fn reset_stats(&mut self, of: StatsOf) -> Result<()> {
        self.stale_stats.remove(&of);
        self.stats.insert(of);
        // Not logged: the writer tests read the log as the sequence of service-map changes.
        self.check_consistent()
    }
    fn delete_stats(&mut self, of: StatsOf) -> Result<()> {
        self.stats.remove(&of);
        // The worst case: a packet in flight counts there again right after the delete.
        self.stale_stats.insert(of);
        self.check_consistent()
    }
    fn source_ranges(&self) -> Result<Vec<(u16, Ipv4Net)>> {
        Ok(self.source_ranges.iter().copied().collect())
    }
    fn put_source_range(&mut self, rev_nat_id: u16, range: Ipv4Net) -> Result<()> {
        self.source_ranges.insert((rev_nat_id, range));
        self.after(format!("put source range {rev_nat_id} {range}"))
    }
    fn delete_source_range(&mut self, rev_nat_id: u16, range: Ipv4Net) -> Result<()> {
        self.source_ranges.remove(&(rev_nat_id, range));
        self.after(format!("delete source range {rev_nat_id} {range}"))
    }
    fn maglev_chunks(&self) -> Result<Vec<(MaglevKey, MaglevChunk)>> {
        Ok(self.maglev.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn put_maglev_chunk(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<()> {
        self.maglev.insert(key, value);
        self.after(format!("put maglev {}/{}", key.table, key.chunk))
    }
    fn delete_maglev_chunk(&mut self, key: MaglevKey) -> Result<()> {
        self.maglev.remove(&key);
        self.after(format!("delete maglev {}/{}", key.table, key.chunk))
    }
}
