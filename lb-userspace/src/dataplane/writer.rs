//! Diff-and-apply of desired frontends onto the maps, make-before-break.
//!
//! Order of one apply:
//! 1. insert backends that are new;
//! 2. for every new or changed frontend: its rev-NAT entry, then its slots `1..=n`, then the
//!    chunks of its Maglev table that differ from what the map holds, then its master entry with
//!    count `n` and its flags (so the master never names a slot or a table that is not written
//!    yet);
//! 3. only then delete what is no longer needed: slots past the new count and Maglev chunks the
//!    frontend no longer has, whole frontends that went away (master first, so lookups stop
//!    before the slots and tables vanish), their rev-NAT entries, and finally backends no
//!    frontend references.
//!
//! A Maglev table is rewritten in place, chunk by chunk, and only the chunks whose content
//! changed: a backend change rewrites the chunks holding the ~M/N slots that moved. Each chunk
//! write replaces the whole 64-slot value at once, and every id in old and new chunks names a
//! backend that exists throughout (new backends are inserted first, orphans deleted last), so a
//! packet racing the update lands on an old or a new choice, never on nothing.
//!
//! Source ranges (loadBalancerSourceRanges) follow the same rule: a frontend's new ranges are
//! written before its master (which carries `SVC_FLAG_SOURCE_RANGES`), ranges it no longer has
//! are deleted after it, so a flagged master never lacks its entries. Entries of a rev_nat_id no
//! master uses (an interrupted apply) are deleted first thing, before the id can be reused.
//!
//! A packet racing the update therefore always finds either the old or the new backend set, and
//! every backend id a slot names still exists. Cilium deletes orphaned backends first and drops
//! new flows in that window; we delete them last.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ipnet::Ipv4Net;
use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    service::{BACKEND_FLAG_TERMINATING, SVC_FLAG_MAGLEV},
    ServiceKey, ServiceValue,
};

use super::{
    maglev::{self, TableSize},
    BackendAddr, Batched, Dataplane, Desired, DesiredFrontend, Error, FrontendAddr, Result,
    StatsOf,
};

/// What the writer believes one frontend holds in the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Programmed {
    rev_nat_id: u16,
    flags: u16,
    /// Backend id of slot i+1.
    slots: Vec<u32>,
    /// Session affinity: (timeout in seconds, group), zeroes when off.
    affinity: (u32, u16),
    /// Source-range entries under `rev_nat_id`.
    source_ranges: BTreeSet<Ipv4Net>,
    /// The chunks of its Maglev table, by chunk number (empty without one).
    maglev: BTreeMap<u16, MaglevChunk>,
}

/// Counts of map operations, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_changed: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub map_writes: usize,
    pub map_deletes: usize,
    /// Maglev chunks written (included in `map_writes`).
    pub maglev_chunk_writes: usize,
}

/// How many desired frontends use a backend (in their slots or as draining), and how many of
/// them say its endpoint is terminating.
#[derive(Debug, Clone, Copy, Default)]
struct Refs {
    users: u32,
    terminating: u32,
}

/// Keeps the maps equal to the desired state. Adopts whatever a previous agent left in the maps.
///
/// [`Writer::apply`] takes the whole desired state; [`Writer::apply_changes`] only the frontends
/// that changed, which costs in proportion to the change, not to the number of frontends. For
/// that the writer counts, per backend, the desired frontends that use it, so that it knows
/// without a full scan when a backend becomes an orphan. Those counts are known only after a
/// full apply: a writer fresh from [`Writer::adopt`] (or re-adopted after a failed operation)
/// [`needs a full apply`](Writer::needs_full_apply) first.
pub struct Writer {
    frontends: BTreeMap<FrontendAddr, Programmed>,
    /// The backends each desired frontend uses and those it calls terminating.
    uses: HashMap<FrontendAddr, (Vec<BackendAddr>, Vec<BackendAddr>)>,
    refs: HashMap<BackendAddr, Refs>,
    needs_full: bool,
    backend_ids: HashMap<BackendAddr, u32>,
    used_backend_ids: HashSet<u32>,
    /// Backend ids whose map entry carries `BACKEND_FLAG_TERMINATING`.
    terminating_ids: HashSet<u32>,
    used_rev_nat_ids: HashSet<u16>,
    /// Slot entries found at adoption that no master names (an apply interrupted mid-way).
    stray_slots: Vec<ServiceKey>,
    /// rev-NAT ids allocated (and written) for frontends whose master is not written yet.
    new_rev_nat: BTreeMap<FrontendAddr, u16>,
    /// Source-range entries found at adoption whose rev_nat_id no master uses.
    stray_ranges: Vec<(u16, Ipv4Net)>,
    /// Next id to try; ids are handed out round-robin so a freed id is not reused at once.
    next_backend_id: u32,
    next_rev_nat_id: u16,
    maglev_size: TableSize,
    /// Maglev chunks found at adoption whose table no master names.
    stray_chunks: Vec<MaglevKey>,
    /// Ids not in use whose counter entry may hold counts: found at adoption, or freed since (a
    /// packet still in flight can create an entry again right after its delete, as the data
    /// path creates an id's entry at its first packet). Such an id is zeroed before it is handed
    /// out again; any other id starts without an entry, which saves a per-CPU allocation per
    /// backend and frontend in a first sync.
    stats_may_exist: HashSet<StatsOf>,
}

const MAX_BACKEND_ID: u32 = lb_common::map_sizes::BACKENDS;
/// Slots are numbered by a u16 and slot 0 is the master.
const MAX_SLOTS: usize = u16::MAX as usize;
const MAX_REV_NAT_ID: u16 = u16::MAX;

impl Writer {
    /// Reads the maps and takes over what is there, so that a restart reconciles instead of
    /// flushing: existing ids stay the same and established flows keep their entries.
    pub fn adopt(dp: &impl Dataplane) -> Result<Self> {
        Self::adopt_with_table_size(dp, TableSize::default())
    }

    /// As [`Writer::adopt`], building Maglev tables of `maglev_size` slots. Tables of another
    /// size found in the maps are rewritten by the next apply.
    pub fn adopt_with_table_size(dp: &impl Dataplane, maglev_size: TableSize) -> Result<Self> {
        let mut backend_ids = HashMap::new();
        let mut terminating_ids = HashSet::new();
        let mut max_backend = 0;
        for (id, value) in dp.backends()? {
            backend_ids.insert(BackendAddr::from_value(&value), id);
            if value.flags & BACKEND_FLAG_TERMINATING != 0 {
                terminating_ids.insert(id);
            }
            max_backend = max_backend.max(id);
        }
        let mut frontends = BTreeMap::new();
        let services = dp.services()?;
        let slots: HashMap<_, _> = services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .map(|(k, v)| ((FrontendAddr::from_key(k), k.slot), v.backend_id))
            .collect();
        let mut tables: BTreeMap<u16, BTreeMap<u16, MaglevChunk>> = BTreeMap::new();
        for (key, chunk) in dp.maglev_chunks()? {
            tables
                .entry(key.table)
                .or_default()
                .insert(key.chunk, chunk);
        }
        let mut max_rev_nat = 0;
        for (key, master) in services.iter().filter(|(k, _)| k.slot == 0) {
            let fe = FrontendAddr::from_key(key);
            let slots = (1..=master.count)
                .map(|s| slots.get(&(fe, s)).copied().unwrap_or(0))
                .collect();
            max_rev_nat = max_rev_nat.max(master.rev_nat_id);
            frontends.insert(
                fe,
                Programmed {
                    rev_nat_id: master.rev_nat_id,
                    flags: master.flags,
                    slots,
                    affinity: (master.affinity_timeout, master.affinity_group),
                    source_ranges: BTreeSet::new(),
                    maglev: tables.remove(&master.rev_nat_id).unwrap_or_default(),
                },
            );
        }
        let stray_chunks = tables
            .into_iter()
            .flat_map(|(table, chunks)| {
                chunks
                    .into_keys()
                    .map(move |chunk| MaglevKey { table, chunk })
            })
            .collect();
        let mut stray_ranges = Vec::new();
        {
            let by_rev_nat: HashMap<u16, FrontendAddr> = frontends
                .iter()
                .map(|(fe, p): (&FrontendAddr, &Programmed)| (p.rev_nat_id, *fe))
                .collect();
            for (id, range) in dp.source_ranges()? {
                match by_rev_nat.get(&id) {
                    Some(fe) => {
                        frontends
                            .get_mut(fe)
                            .expect("listed above")
                            .source_ranges
                            .insert(range);
                    }
                    None => stray_ranges.push((id, range)),
                }
            }
        }
        let used_backend_ids: HashSet<u32> = backend_ids.values().copied().collect();
        let used_rev_nat_ids: HashSet<u16> = frontends
            .values()
            .map(|p: &Programmed| p.rev_nat_id)
            .collect();
        let stats_may_exist = dp
            .stats_keys()?
            .into_iter()
            .filter(|of| match of {
                StatsOf::Frontend(id) => !used_rev_nat_ids.contains(id),
                StatsOf::Backend(id) => !used_backend_ids.contains(id),
            })
            .collect();
        let mut writer = Self {
            frontends,
            uses: HashMap::new(),
            refs: HashMap::new(),
            needs_full: true,
            backend_ids,
            used_backend_ids,
            terminating_ids,
            used_rev_nat_ids,
            stray_slots: Vec::new(),
            new_rev_nat: BTreeMap::new(),
            stray_ranges,
            next_backend_id: max_backend % MAX_BACKEND_ID + 1,
            next_rev_nat_id: max_rev_nat % MAX_REV_NAT_ID + 1,
            maglev_size,
            stray_chunks,
            stats_may_exist,
        };
        // Slots past a master's count, or of frontends without a master, are leftovers of an
        // interrupted apply: the next apply deletes those it does not rewrite.
        writer.stray_slots = services
            .iter()
            .filter(|(k, _)| {
                k.slot != 0
                    && writer
                        .frontends
                        .get(&FrontendAddr::from_key(k))
                        .is_none_or(|p| k.slot as usize > p.slots.len())
            })
            .map(|(k, _)| *k)
            .collect();
        Ok(writer)
    }

    /// Number of frontends currently programmed.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// Number of backends currently programmed.
    pub fn backend_count(&self) -> usize {
        self.backend_ids.len()
    }

    /// Makes the maps hold exactly `desired`. After a failed map operation the writer re-reads
    /// the maps, so that the next apply works from what they really hold rather than from what
    /// this one meant to write.
    pub fn apply(&mut self, dp: &mut impl Dataplane, desired: &Desired) -> Result<ApplyStats> {
        let mut changes: Vec<(FrontendAddr, Option<&DesiredFrontend>)> =
            desired.iter().map(|(fe, d)| (*fe, Some(d))).collect();
        changes.extend(
            self.frontends
                .keys()
                .filter(|fe| !desired.contains_key(fe))
                .map(|fe| (*fe, None)),
        );
        changes.sort_by_key(|(fe, _)| *fe);
        self.run(dp, &changes, true)
    }

    /// Applies the changed frontends only: `Some` to write, `None` to remove; frontends not
    /// named stay as they are. Same order and guarantees as [`Writer::apply`]. Refused while
    /// [`Writer::needs_full_apply`].
    pub fn apply_changes(
        &mut self,
        dp: &mut impl Dataplane,
        changes: &BTreeMap<FrontendAddr, Option<DesiredFrontend>>,
    ) -> Result<ApplyStats> {
        if self.needs_full {
            return Err(Error::NeedsFullApply);
        }
        let changes: Vec<(FrontendAddr, Option<&DesiredFrontend>)> =
            changes.iter().map(|(fe, d)| (*fe, d.as_ref())).collect();
        self.run(dp, &changes, false)
    }

    /// True until a full [`Writer::apply`] succeeded (after adoption, or after a failure).
    pub fn needs_full_apply(&self) -> bool {
        self.needs_full
    }

    fn run(
        &mut self,
        dp: &mut impl Dataplane,
        changes: &[(FrontendAddr, Option<&DesiredFrontend>)],
        full: bool,
    ) -> Result<ApplyStats> {
        let result = self.apply_once(dp, changes, full);
        match &result {
            Ok(_) if full => self.needs_full = false,
            Ok(_) => {}
            Err(_) => {
                if let Ok(actual) = Writer::adopt_with_table_size(dp, self.maglev_size) {
                    *self = actual;
                }
                // Whatever happened, the counts may be off now.
                self.needs_full = true;
            }
        }
        result
    }

    fn apply_once(
        &mut self,
        dp: &mut impl Dataplane,
        changes: &[(FrontendAddr, Option<&DesiredFrontend>)],
        full: bool,
    ) -> Result<ApplyStats> {
        // Puts are queued and written in batches at the next delete and at the end; the order
        // they land in keeps the guarantees above (see `batch`).
        let dp = &mut Batched::new(dp);
        let mut stats = ApplyStats::default();

        // 0. Source ranges no master names: harmless now, wrong once their id is reused.
        for (id, range) in std::mem::take(&mut self.stray_ranges) {
            dp.delete_source_range(id, range)?;
            stats.map_deletes += 1;
        }

        // Who uses which backend, after this apply. A full apply counts from scratch.
        let mut touched: BTreeSet<BackendAddr> = BTreeSet::new();
        if full {
            self.uses.clear();
            self.refs.clear();
            touched.extend(self.backend_ids.keys().copied());
        }
        for (fe, want) in changes {
            if let Some((used, terminating)) = self.uses.remove(fe) {
                for b in &used {
                    let r = self.refs.entry(*b).or_default();
                    r.users = r.users.saturating_sub(1);
                    touched.insert(*b);
                }
                for b in &terminating {
                    let r = self.refs.entry(*b).or_default();
                    r.terminating = r.terminating.saturating_sub(1);
                }
            }
            if let Some(want) = want {
                let mut used: Vec<BackendAddr> = want
                    .backends
                    .iter()
                    .chain(&want.draining)
                    .copied()
                    .collect();
                used.sort();
                used.dedup();
                let terminating: Vec<BackendAddr> = want.terminating.iter().copied().collect();
                for b in &used {
                    self.refs.entry(*b).or_default().users += 1;
                    touched.insert(*b);
                }
                for b in &terminating {
                    self.refs.entry(*b).or_default().terminating += 1;
                }
                self.uses.insert(*fe, (used, terminating));
            }
        }

        // 1. New backends, and backends whose terminating state changed (rewritten in place: the
        // id, and so the flows on it, stay).
        for b in &touched {
            let refs = self.refs.get(b).copied().unwrap_or_default();
            if refs.users == 0 {
                continue;
            }
            let is_terminating = refs.terminating > 0;
            let mut value = b.to_value();
            if is_terminating {
                value.flags |= BACKEND_FLAG_TERMINATING;
            }
            match self.backend_ids.get(b) {
                None => {
                    let id = self.alloc_backend_id()?;
                    // A previous user's counts go before a slot names the id.
                    if self.stats_may_exist.remove(&StatsOf::Backend(id)) {
                        dp.reset_stats(StatsOf::Backend(id))?;
                    }
                    dp.put_backend(id, value)?;
                    self.backend_ids.insert(*b, id);
                    self.used_backend_ids.insert(id);
                    if is_terminating {
                        self.terminating_ids.insert(id);
                    }
                    stats.backends_added += 1;
                    stats.map_writes += 1;
                }
                Some(&id) if self.terminating_ids.contains(&id) != is_terminating => {
                    dp.put_backend(id, value)?;
                    if is_terminating {
                        self.terminating_ids.insert(id);
                    } else {
                        self.terminating_ids.remove(&id);
                    }
                    stats.map_writes += 1;
                }
                Some(_) => {}
            }
        }

        // rev-NAT ids of new frontends first, so that affinity groups can name them.
        for (fe, _) in changes.iter().filter(|(_, want)| want.is_some()) {
            if !self.frontends.contains_key(fe) && !self.new_rev_nat.contains_key(fe) {
                let id = self.alloc_rev_nat_id()?;
                if self.stats_may_exist.remove(&StatsOf::Frontend(id)) {
                    dp.reset_stats(StatsOf::Frontend(id))?;
                }
                dp.put_rev_nat(id, fe.rev_nat_value())?;
                self.used_rev_nat_ids.insert(id);
                self.new_rev_nat.insert(*fe, id);
                stats.map_writes += 1;
            }
        }

        // 2. New and changed frontends, each slots-then-master.
        for (fe, want) in changes {
            let Some(want) = want else { continue };
            if want.backends.len() > MAX_SLOTS {
                tracing::warn!(
                    service_port = %want.service_port,
                    backends = want.backends.len(),
                    "more backends than a frontend can hold; only the first {MAX_SLOTS} are used"
                );
            }
            let slots: Vec<u32> = want
                .backends
                .iter()
                .take(MAX_SLOTS)
                .map(|b| self.backend_ids[b])
                .collect();
            let affinity = match want.affinity {
                Some(a) => (a.timeout_seconds, self.rev_nat_id_of(&a.group).unwrap_or(0)),
                None => (0, 0),
            };
            // A group frontend that does not exist would key every client of the ServicePort
            // to id 0: no affinity then, rather than a shared wrong one.
            let affinity = if affinity.1 == 0 { (0, 0) } else { affinity };
            let ranges: BTreeSet<Ipv4Net> = want.source_ranges.iter().map(|r| r.trunc()).collect();
            let table = if want.flags & SVC_FLAG_MAGLEV != 0 {
                maglev::chunks_for(&want.backends, self.maglev_size, |b| self.backend_ids[b])
            } else {
                BTreeMap::new()
            };
            let old = self.frontends.get(fe).cloned();
            if old.as_ref().is_some_and(|o| {
                o.slots == slots
                    && o.flags == want.flags
                    && o.affinity == affinity
                    && o.source_ranges == ranges
                    && o.maglev == table
            }) {
                continue;
            }
            let rev_nat_id = match &old {
                Some(o) => o.rev_nat_id,
                None => self.new_rev_nat[fe],
            };
            let old_ranges = old
                .as_ref()
                .map(|o| o.source_ranges.clone())
                .unwrap_or_default();
            for range in ranges.difference(&old_ranges) {
                dp.put_source_range(rev_nat_id, *range)?;
                stats.map_writes += 1;
            }
            let old_slots = old.as_ref().map(|o| o.slots.as_slice()).unwrap_or(&[]);
            for (i, &id) in slots.iter().enumerate() {
                if old_slots.get(i) != Some(&id) {
                    let value = ServiceValue {
                        backend_id: id,
                        ..Default::default()
                    };
                    dp.put_service(fe.key(i as u16 + 1), value)?;
                    stats.map_writes += 1;
                }
            }
            let old_table = old.as_ref().map(|o| &o.maglev);
            // Highest chunk first: when the table size grows, the chunks past the old end exist
            // before chunk 0 takes the new size, so a table whose chunks all have one size is
            // always complete (the kernel ignores chunks of another size).
            for (&chunk, value) in table.iter().rev() {
                if old_table.and_then(|t| t.get(&chunk)) != Some(value) {
                    let key = MaglevKey {
                        table: rev_nat_id,
                        chunk,
                    };
                    dp.put_maglev_chunk(key, *value)?;
                    stats.map_writes += 1;
                    stats.maglev_chunk_writes += 1;
                }
            }
            let master = ServiceValue {
                backend_id: 0,
                count: slots.len() as u16,
                rev_nat_id,
                flags: want.flags,
                affinity_group: affinity.1,
                affinity_timeout: affinity.0,
            };
            dp.put_service(fe.key(0), master)?;
            stats.map_writes += 1;
            // 3a. Slots past the new count, now that the master no longer names them.
            for slot in slots.len()..old_slots.len() {
                dp.delete_service(fe.key(slot as u16 + 1))?;
                stats.map_deletes += 1;
            }
            for range in old_ranges.difference(&ranges) {
                dp.delete_source_range(rev_nat_id, *range)?;
                stats.map_deletes += 1;
            }
            // Chunks of a table the frontend no longer has (Maglev turned off, no backends
            // left, or a smaller table size).
            for &chunk in old_table.into_iter().flat_map(|t| t.keys()) {
                if !table.contains_key(&chunk) {
                    dp.delete_maglev_chunk(MaglevKey {
                        table: rev_nat_id,
                        chunk,
                    })?;
                    stats.map_deletes += 1;
                }
            }
            stats.frontends_changed += 1;
            self.frontends.insert(
                *fe,
                Programmed {
                    rev_nat_id,
                    flags: want.flags,
                    slots,
                    affinity,
                    source_ranges: ranges,
                    maglev: table,
                },
            );
            self.new_rev_nat.remove(fe);
        }

        // 3b. Frontends that went away: master, slots, rev-NAT.
        for (fe, _) in changes.iter().filter(|(_, want)| want.is_none()) {
            let Some(p) = self.frontends.remove(fe) else {
                continue;
            };
            dp.delete_service(fe.key(0))?;
            for slot in 1..=p.slots.len() {
                dp.delete_service(fe.key(slot as u16))?;
            }
            for range in &p.source_ranges {
                dp.delete_source_range(p.rev_nat_id, *range)?;
                stats.map_deletes += 1;
            }
            for &chunk in p.maglev.keys() {
                dp.delete_maglev_chunk(MaglevKey {
                    table: p.rev_nat_id,
                    chunk,
                })?;
            }
            dp.delete_rev_nat(p.rev_nat_id)?;
            dp.delete_stats(StatsOf::Frontend(p.rev_nat_id))?;
            self.stats_may_exist.insert(StatsOf::Frontend(p.rev_nat_id));
            self.used_rev_nat_ids.remove(&p.rev_nat_id);
            stats.map_deletes += 2 + p.slots.len() + p.maglev.len();
            stats.frontends_removed += 1;
        }
        for key in std::mem::take(&mut self.stray_slots) {
            let fe = FrontendAddr::from_key(&key);
            let still_used = self
                .frontends
                .get(&fe)
                .is_some_and(|p| (key.slot as usize) <= p.slots.len());
            if !still_used {
                dp.delete_service(key)?;
                stats.map_deletes += 1;
            }
        }

        for key in std::mem::take(&mut self.stray_chunks) {
            // A table whose rev_nat id a frontend has taken since is that frontend's now.
            let taken = self
                .frontends
                .values()
                .any(|p| p.rev_nat_id == key.table && p.maglev.contains_key(&key.chunk));
            if !taken {
                dp.delete_maglev_chunk(key)?;
                stats.map_deletes += 1;
            }
        }

        // 3c. Backends nobody references any more, last.
        for b in touched {
            if self.refs.get(&b).is_some_and(|r| r.users > 0) {
                continue;
            }
            self.refs.remove(&b);
            let Some(id) = self.backend_ids.remove(&b) else {
                continue;
            };
            dp.delete_backend(id)?;
            dp.delete_stats(StatsOf::Backend(id))?;
            self.stats_may_exist.insert(StatsOf::Backend(id));
            self.used_backend_ids.remove(&id);
            self.terminating_ids.remove(&id);
            stats.backends_removed += 1;
            stats.map_deletes += 1;
        }
        dp.flush()?;
        Ok(stats)
    }

    /// The rev_nat_id of a frontend programmed or being programmed by this apply.
    fn rev_nat_id_of(&self, fe: &FrontendAddr) -> Option<u16> {
        self.frontends
            .get(fe)
            .map(|p| p.rev_nat_id)
            .or_else(|| self.new_rev_nat.get(fe).copied())
    }

    fn alloc_backend_id(&mut self) -> Result<u32> {
        for _ in 0..MAX_BACKEND_ID {
            let id = self.next_backend_id;
            self.next_backend_id = id % MAX_BACKEND_ID + 1;
            if !self.used_backend_ids.contains(&id) {
                return Ok(id);
            }
        }
        Err(Error::IdsExhausted {
            what: "backend",
            max: MAX_BACKEND_ID,
        })
    }

    fn alloc_rev_nat_id(&mut self) -> Result<u16> {
        for _ in 0..MAX_REV_NAT_ID {
            let id = self.next_rev_nat_id;
            self.next_rev_nat_id = id % MAX_REV_NAT_ID + 1;
            if !self.used_rev_nat_ids.contains(&id) {
                return Ok(id);
            }
        }
        Err(Error::IdsExhausted {
            what: "rev_nat",
            max: MAX_REV_NAT_ID as u32,
        })
    }
}

#[cfg(test)]
mod tests;
