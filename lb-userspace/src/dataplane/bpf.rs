//! The real dataplane: the pinned BPF maps.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    HashMap, IterableMap, Map, MapData, PerCpuHashMap, PerCpuValues,
};
use ipnet::Ipv4Net;
use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    map_names, BackendValue, RevNatValue, ServiceKey, ServiceValue, SourceRangeKey,
    TrafficCounters,
};

use super::{Dataplane, Error, Puts, Result, StatsOf};

/// Handles on the service maps. Built from a loaded object (the agent) or from the pins in a
/// bpffs directory (lbctl, tests), so both read the very same maps.
pub struct BpfMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, BackendValue>,
    pub rev_nat: HashMap<MapData, u16, RevNatValue>,
    pub frontend_stats: PerCpuHashMap<MapData, u32, TrafficCounters>,
    pub backend_stats: PerCpuHashMap<MapData, u32, TrafficCounters>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    /// Possible CPUs: a per-CPU value has one slot each.
    nr_cpus: usize,
    /// Queued puts go out with BPF_MAP_UPDATE_BATCH; false once the kernel refused it (then
    /// one update per element, as before kernel 5.6).
    batch_updates: bool,
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| Error::Map {
        op: "count possible CPUs",
        map: map_names::FRONTEND_STATS,
        source: aya::maps::MapError::IoError(e),
    })
}

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { op, map, source }
}

impl BpfMaps {
    /// Opens the maps pinned under `dir` (the agent's `--bpffs` directory).
    pub fn from_pins(dir: &Path) -> Result<Self> {
        fn open<K: aya::Pod, V: aya::Pod>(
            dir: &Path,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, V>> {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err("open pin", name))?;
            HashMap::try_from(Map::HashMap(data)).map_err(map_err("open", name))
        }
        fn open_per_cpu(
            dir: &Path,
            name: &'static str,
        ) -> Result<PerCpuHashMap<MapData, u32, TrafficCounters>> {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err("open pin", name))?;
            PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(map_err("open", name))
        }
        Ok(Self {
            services: open(dir, map_names::SERVICES)?,
            backends: open(dir, map_names::BACKENDS)?,
            rev_nat: open(dir, map_names::REV_NAT)?,
            frontend_stats: open_per_cpu(dir, map_names::FRONTEND_STATS)?,
            backend_stats: open_per_cpu(dir, map_names::BACKEND_STATS)?,
            source_ranges: {
                let name = map_names::SOURCE_RANGES;
                let data = MapData::from_pin(dir.join(name)).map_err(map_err("open pin", name))?;
                LpmTrie::try_from(Map::LpmTrie(data)).map_err(map_err("open", name))?
            },
            maglev: open(dir, map_names::MAGLEV)?,
            nr_cpus: nr_cpus()?,
            batch_updates: true,
        })
    }

    /// Takes the maps out of a freshly loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self> {
        fn take<K: aya::Pod, V: aya::Pod>(
            ebpf: &mut aya::Ebpf,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, V>> {
            let map = ebpf
                .take_map(name)
                .ok_or(aya::maps::MapError::InvalidName { name: name.into() })
                .map_err(map_err("take", name))?;
            HashMap::try_from(map).map_err(map_err("open", name))
        }
        fn take_per_cpu(
            ebpf: &mut aya::Ebpf,
            name: &'static str,
        ) -> Result<PerCpuHashMap<MapData, u32, TrafficCounters>> {
            let map = ebpf
                .take_map(name)
                .ok_or(aya::maps::MapError::InvalidName { name: name.into() })
                .map_err(map_err("take", name))?;
            PerCpuHashMap::try_from(map).map_err(map_err("open", name))
        }
        Ok(Self {
            services: take(ebpf, map_names::SERVICES)?,
            backends: take(ebpf, map_names::BACKENDS)?,
            rev_nat: take(ebpf, map_names::REV_NAT)?,
            frontend_stats: take_per_cpu(ebpf, map_names::FRONTEND_STATS)?,
            backend_stats: take_per_cpu(ebpf, map_names::BACKEND_STATS)?,
            source_ranges: {
                let name = map_names::SOURCE_RANGES;
                let map = ebpf
                    .take_map(name)
                    .ok_or(aya::maps::MapError::InvalidName { name: name.into() })
                    .map_err(map_err("take", name))?;
                LpmTrie::try_from(map).map_err(map_err("open", name))?
            },
            maglev: take(ebpf, map_names::MAGLEV)?,
            nr_cpus: nr_cpus()?,
            batch_updates: true,
        })
    }
}

fn collect<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>> {
    map.iter()
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(map_err("iterate", name))
}

/// Tries before an insert that keeps failing with ENOMEM is reported.
const ENOMEM_TRIES: u32 = 8;
/// First pause after an ENOMEM; doubled on each further try (1+2+...+128 ms at most, 255 ms).
const ENOMEM_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// Runs `insert` again while it fails with ENOMEM, pausing a little longer each time.
///
/// The per-CPU stats maps are created without preallocation, so the kernel allocates each
/// element on insert from per-CPU caches that it refills in the background (bpf_mem_alloc).
/// Thousands of inserts in a row, as when 10k Services are programmed from empty, can drain a
/// cache before the refill ran; the insert then fails with ENOMEM although memory is there.
/// Retrying after a short pause lets the refill run. Other errors, and an ENOMEM that persists,
/// are returned as they are.
fn retry_enomem<T>(
    mut insert: impl FnMut() -> std::result::Result<T, aya::maps::MapError>,
) -> std::result::Result<T, aya::maps::MapError> {
    let mut pause = ENOMEM_FIRST_PAUSE;
    let mut tries = 1;
    loop {
        match insert() {
            Err(e) if tries < ENOMEM_TRIES && is_enomem(&e) => {
                std::thread::sleep(pause);
                pause *= 2;
                tries += 1;
            }
            other => return other,
        }
    }
}

fn is_enomem(e: &aya::maps::MapError) -> bool {
    matches!(
        e,
        aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOMEM)
    )
}

/// Deleting a key that is already gone is not an error: the goal state is reached.
fn tolerate_missing(
    r: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        // aya's per-CPU hash map passes the kernel's ENOENT through as a syscall error; a
        // counter entry is missing whenever no packet reached its id.
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

impl Dataplane for BpfMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>> {
        collect(&self.services, map_names::SERVICES)
    }
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>> {
        collect(&self.backends, map_names::BACKENDS)
    }
    fn rev_nats(&self) -> Result<Vec<(u16, RevNatValue)>> {
        collect(&self.rev_nat, map_names::REV_NAT)
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        retry_enomem(|| self.services.insert(key, value, 0))
            .map_err(map_err("insert", map_names::SERVICES))
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<()> {
        tolerate_missing(self.services.remove(&key)).map_err(map_err("delete", map_names::SERVICES))
    }
    fn put_backend(&mut self, id: u32, value: BackendValue) -> Result<()> {
        retry_enomem(|| self.backends.insert(id, value, 0))
            .map_err(map_err("insert", map_names::BACKENDS))
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        tolerate_missing(self.backends.remove(&id)).map_err(map_err("delete", map_names::BACKENDS))
    }
    fn put_rev_nat(&mut self, id: u16, value: RevNatValue) -> Result<()> {
        retry_enomem(|| self.rev_nat.insert(id, value, 0))
            .map_err(map_err("insert", map_names::REV_NAT))
    }
    fn stats_keys(&self) -> Result<Vec<StatsOf>> {
        let mut out = Vec::new();
        for id in self.frontend_stats.keys() {
            let id = id.map_err(map_err("iterate", map_names::FRONTEND_STATS))?;
            // Frontend ids are u16 (rev-NAT ids); a larger key is nobody's.
            if let Ok(id) = u16::try_from(id) {
                out.push(StatsOf::Frontend(id));
            }
        }
        for id in self.backend_stats.keys() {
            out.push(StatsOf::Backend(
                id.map_err(map_err("iterate", map_names::BACKEND_STATS))?,
            ));
        }
        Ok(out)
    }
    fn reset_stats(&mut self, of: StatsOf) -> Result<()> {
        let nr_cpus = self.nr_cpus;
        // A fresh value per try: the insert takes it by value.
        let zero = || {
            PerCpuValues::try_from(vec![TrafficCounters::default(); nr_cpus])
                .map_err(aya::maps::MapError::IoError)
        };
        match of {
            StatsOf::Frontend(id) => {
                retry_enomem(|| self.frontend_stats.insert(id as u32, zero()?, 0))
                    .map_err(map_err("insert", map_names::FRONTEND_STATS))
            }
            StatsOf::Backend(id) => retry_enomem(|| self.backend_stats.insert(id, zero()?, 0))
                .map_err(map_err("insert", map_names::BACKEND_STATS)),
        }
    }
    fn delete_stats(&mut self, of: StatsOf) -> Result<()> {
        match of {
            StatsOf::Frontend(id) => tolerate_missing(self.frontend_stats.remove(&(id as u32)))
                .map_err(map_err("delete", map_names::FRONTEND_STATS)),
            StatsOf::Backend(id) => tolerate_missing(self.backend_stats.remove(&id))
                .map_err(map_err("delete", map_names::BACKEND_STATS)),
        }
    }
    fn delete_rev_nat(&mut self, id: u16) -> Result<()> {
        tolerate_missing(self.rev_nat.remove(&id)).map_err(map_err("delete", map_names::REV_NAT))
    }
    fn maglev_chunks(&self) -> Result<Vec<(MaglevKey, MaglevChunk)>> {
        collect(&self.maglev, map_names::MAGLEV)
    }
    fn put_maglev_chunk(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<()> {
        self.maglev
            .insert(key, value, 0)
            .map_err(map_err("insert", map_names::MAGLEV))
    }
    fn delete_maglev_chunk(&mut self, key: MaglevKey) -> Result<()> {
        tolerate_missing(self.maglev.remove(&key)).map_err(map_err("delete", map_names::MAGLEV))
    }
    fn source_ranges(&self) -> Result<Vec<(u16, Ipv4Net)>> {
        let mut out = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(map_err("iterate", map_names::SOURCE_RANGES))?;
            let data = key.data();
            let len = key.prefix_len().saturating_sub(SourceRangeKey::ID_BITS);
            // Entries are only ever written by `put_source_range`, so the length is valid.
            if let Ok(net) = Ipv4Net::new(lb_common::net_to_ipv4(data.addr), len as u8) {
                out.push((data.rev_nat_id, net));
            }
        }
        Ok(out)
    }
    fn put_source_range(&mut self, rev_nat_id: u16, range: Ipv4Net) -> Result<()> {
        self.source_ranges
            .insert(&range_key(rev_nat_id, range), 1, 0)
            .map_err(map_err("insert", map_names::SOURCE_RANGES))
    }
    fn delete_source_range(&mut self, rev_nat_id: u16, range: Ipv4Net) -> Result<()> {
        tolerate_missing(self.source_ranges.remove(&range_key(rev_nat_id, range)))
            .map_err(map_err("delete", map_names::SOURCE_RANGES))
    }
    fn put_many(&mut self, puts: &Puts) -> Result<()> {
        if !self.batch_updates {
            return puts.write_one_by_one(self);
        }
        match self.put_batches(puts) {
            Ok(()) => Ok(()),
            Err(BatchError::Failed(e)) => Err(e),
            Err(BatchError::Unsupported { map, source }) => {
                tracing::warn!(
                    map,
                    error = %source,
                    "the kernel refuses batch map updates (BPF_MAP_UPDATE_BATCH, Linux 5.6+); \
                     writing map entries one at a time from now on, which is slower"
                );
                self.batch_updates = false;
                // From the start: writing again what earlier batches wrote is harmless (the
                // same values, in the same order), and keeps the order whole.
                puts.write_one_by_one(self)
            }
        }
    }
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel's internal ENOTSUPP, which bpf(2) returns for a map type without batch operations
/// (not in libc: it is not a POSIX errno).
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr`, used by the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch write did not write everything.
#[derive(Debug)]
enum BatchError {
    /// The kernel has no batch update for this map (before 5.6, or a map type without it); it
    /// wrote nothing.
    Unsupported {
        map: &'static str,
        source: io::Error,
    },
    Failed(Error),
}

/// The bytes of a slice of plain-data map keys or values, as bpf(2) reads them.
fn as_bytes<T: aya::Pod>(items: &[T]) -> &[u8] {
    // SAFETY: `Pod` types are plain data of `size_of::<T>()` bytes each, valid to read as bytes.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast(), std::mem::size_of_val(items)) }
}

/// One BPF_MAP_UPDATE_BATCH of `count` elements: keys of `key_size` bytes back to back in
/// `keys`, values of `value_stride` bytes in `values`. The kernel writes element by element in
/// order and stops at the first failure; returns how many it wrote and that failure.
fn update_batch_once(
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> (usize, Option<io::Error>) {
    let mut attr = BatchAttr {
        map_fd: fd.as_raw_fd() as u32,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: count as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid `union bpf_attr` prefix of the size passed; `keys` and `values`
    // hold `count` keys and values of the map's sizes (checked by the caller), and the kernel
    // only reads them. It writes back `count`, in `attr`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc == 0 {
        (count, None)
    } else {
        let err = io::Error::last_os_error();
        // The kernel writes the count back once it went through elements, and stops before the
        // one that failed, so a failed call that wrote back reports fewer than were asked for.
        // A count left as it was means the call failed before the first element.
        let done = attr.count as usize;
        (if done < count { done } else { 0 }, Some(err))
    }
}

/// Writes `keys[i]` with the i-th `value_stride`-byte value of `values`, in order, in as few
/// BPF_MAP_UPDATE_BATCH calls as it takes. An ENOMEM part way (the per-CPU caches of a map
/// without preallocation ran dry, see [`retry_enomem`]) pauses and goes on from the element that
/// failed; the pauses start over whenever an element got written. Anything else that stops the
/// batch is an error naming how far it got: the writer re-reads the maps after a failed apply.
fn update_batch<K: aya::Pod>(
    fd: BorrowedFd<'_>,
    map: &'static str,
    keys: &[K],
    values: &[u8],
    value_stride: usize,
) -> std::result::Result<(), BatchError> {
    assert_eq!(values.len(), keys.len() * value_stride, "one value per key");
    let key_bytes = as_bytes(keys);
    let key_size = std::mem::size_of::<K>();
    let (mut done, mut tries, mut pause) = (0, 1, ENOMEM_FIRST_PAUSE);
    while done < keys.len() {
        // bpf(2) takes a u32 count.
        let n = (keys.len() - done).min(u32::MAX as usize);
        let (wrote, err) = update_batch_once(
            fd,
            &key_bytes[done * key_size..],
            &values[done * value_stride..],
            n,
        );
        done += wrote;
        let Some(err) = err else { break };
        let errno = err.raw_os_error();
        if done == 0 && matches!(errno, Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)) {
            return Err(BatchError::Unsupported { map, source: err });
        }
        if errno == Some(libc::ENOMEM) {
            if wrote > 0 {
                (tries, pause) = (1, ENOMEM_FIRST_PAUSE);
            }
            if tries < ENOMEM_TRIES {
                std::thread::sleep(pause);
                pause *= 2;
                tries += 1;
                continue;
            }
        }
        return Err(BatchError::Failed(Error::Batch {
            map,
            done,
            total: keys.len(),
            source: err,
        }));
    }
    Ok(())
}

/// Batch-writes a plain hash map's entries.
fn update_batch_pairs<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    map: &'static str,
    entries: &[(K, V)],
) -> std::result::Result<(), BatchError> {
    if entries.is_empty() {
        return Ok(());
    }
    let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
    let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
    update_batch(fd, map, &keys, as_bytes(&values), std::mem::size_of::<V>())
}

/// Batch-creates zeroed per-CPU counters. A per-CPU value in a batch is one
/// `value_size` rounded up to 8 bytes per possible CPU.
///
/// These are now the bulk of a first sync's map time: the stats maps are not preallocated (their
/// size would be multiplied by the possible CPUs), so every new element costs the kernel a
/// per-CPU allocation, batch or not (50k elements: ~0.3 s here, against ~0.04 s for a
/// preallocated per-CPU map or a plain hash map).
fn zero_stats_batch(
    fd: BorrowedFd<'_>,
    map: &'static str,
    keys: &[u32],
    nr_cpus: usize,
) -> std::result::Result<(), BatchError> {
    if keys.is_empty() {
        return Ok(());
    }
    let stride = std::mem::size_of::<TrafficCounters>().next_multiple_of(8) * nr_cpus;
    let values = vec![0u8; keys.len() * stride];
    update_batch(fd, map, keys, &values, stride)
}

impl BpfMaps {
    /// [`Puts`] with one BPF_MAP_UPDATE_BATCH per map, in the order of
    /// [`Puts::write_one_by_one`]. Source ranges go one at a time: a frontend has a handful at
    /// most, so a batch would buy nothing, and the fallback then depends on the hash maps alone.
    fn put_batches(&mut self, puts: &Puts) -> std::result::Result<(), BatchError> {
        let frontend_ids: Vec<u32> = puts.frontend_stats.iter().map(|&id| id as u32).collect();
        zero_stats_batch(
            self.frontend_stats.map().fd().as_fd(),
            map_names::FRONTEND_STATS,
            &frontend_ids,
            self.nr_cpus,
        )?;
        zero_stats_batch(
            self.backend_stats.map().fd().as_fd(),
            map_names::BACKEND_STATS,
            &puts.backend_stats,
            self.nr_cpus,
        )?;
        update_batch_pairs(
            self.backends.map().fd().as_fd(),
            map_names::BACKENDS,
            &puts.backends,
        )?;
        update_batch_pairs(
            self.rev_nat.map().fd().as_fd(),
            map_names::REV_NAT,
            &puts.rev_nats,
        )?;
        for &(id, range) in &puts.source_ranges {
            self.put_source_range(id, range)
                .map_err(BatchError::Failed)?;
        }
        update_batch_pairs(
            self.maglev.map().fd().as_fd(),
            map_names::MAGLEV,
            &puts.maglev,
        )?;
        update_batch_pairs(
            self.services.map().fd().as_fd(),
            map_names::SERVICES,
            &puts.services,
        )
    }
}

/// The LPM key of one frontend's range: rev_nat_id and padding match in full, the address by
/// the range's prefix.
fn range_key(rev_nat_id: u16, range: Ipv4Net) -> LpmKey<SourceRangeKey> {
    let range = range.trunc();
    LpmKey::new(
        SourceRangeKey::ID_BITS + range.prefix_len() as u32,
        SourceRangeKey::new(rev_nat_id, lb_common::ipv4_to_net(range.addr())),
    )
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, os::fd::FromRawFd};

    use lb_common::{maglev::CHUNK_SLOTS, proto};

    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
    const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
    const BPF_F_NO_PREALLOC: u32 = 1;

    /// A fresh, unpinned map (tests run as root), as the kernel's `MapData`.
    fn create_map<K, V>(map_type: u32, max_entries: u32, flags: u32) -> MapData {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let attr = CreateAttr {
            map_type,
            key_size: std::mem::size_of::<K>() as u32,
            value_size: std::mem::size_of::<V>() as u32,
            max_entries,
            map_flags: flags,
        };
        // SAFETY: a valid `union bpf_attr` prefix of the size passed; the kernel only reads it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                &attr as *const CreateAttr,
                std::mem::size_of::<CreateAttr>(),
            )
        };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: the kernel just handed us this fd; nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        MapData::from_fd(fd).expect("map from fd")
    }

    /// The agent's seven maps, unpinned, the services map holding at most `services_max`.
    fn real_maps(services_max: u32) -> BpfMaps {
        let hash = |data| Map::HashMap(data);
        BpfMaps {
            services: HashMap::try_from(hash(create_map::<ServiceKey, ServiceValue>(
                BPF_MAP_TYPE_HASH,
                services_max,
                0,
            )))
            .unwrap(),
            backends: HashMap::try_from(hash(create_map::<u32, BackendValue>(
                BPF_MAP_TYPE_HASH,
                4096,
                0,
            )))
            .unwrap(),
            rev_nat: HashMap::try_from(hash(create_map::<u16, RevNatValue>(
                BPF_MAP_TYPE_HASH,
                4096,
                0,
            )))
            .unwrap(),
            frontend_stats: counters_map(),
            backend_stats: counters_map(),
            source_ranges: LpmTrie::try_from(Map::LpmTrie(
                create_map::<LpmKey<SourceRangeKey>, u8>(
                    BPF_MAP_TYPE_LPM_TRIE,
                    64,
                    BPF_F_NO_PREALLOC,
                ),
            ))
            .unwrap(),
            maglev: HashMap::try_from(hash(create_map::<MaglevKey, MaglevChunk>(
                BPF_MAP_TYPE_HASH,
                64,
                BPF_F_NO_PREALLOC,
            )))
            .unwrap(),
            nr_cpus: nr_cpus().unwrap(),
            batch_updates: true,
        }
    }

    /// A counters map as the agent's stats maps are made (per-CPU, not preallocated).
    fn counters_map() -> PerCpuHashMap<MapData, u32, TrafficCounters> {
        PerCpuHashMap::try_from(Map::PerCpuHashMap(create_map::<u32, TrafficCounters>(
            BPF_MAP_TYPE_PERCPU_HASH,
            4096,
            BPF_F_NO_PREALLOC,
        )))
        .unwrap()
    }

    fn service_key(i: u16, slot: u16) -> ServiceKey {
        ServiceKey::new(
            lb_common::ipv4_to_net(Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8)),
            lb_common::port_to_net(80),
            proto::TCP,
            lb_common::service::SCOPE_INTERNAL,
            slot,
        )
    }

    /// Entries in key order, to compare a map's contents with what was written.
    fn sorted<K: Ord + Copy, V>(mut v: Vec<(K, V)>) -> Vec<(K, V)> {
        v.sort_by_key(|(k, _)| *k);
        v
    }

    #[test]
    fn batched_puts_land_every_element_in_every_map() {
        let mut maps = real_maps(4096);
        let puts = Puts {
            frontend_stats: (1..=100).collect(),
            backend_stats: (1..=300).collect(),
            backends: (1..=300u32)
                .map(|id| {
                    let b = super::super::BackendAddr {
                        addr: Ipv4Addr::new(198, 18, (id >> 8) as u8, id as u8),
                        port: 8080,
                        proto: proto::TCP,
                        local: id % 2 == 0,
                    };
                    (id, b.to_value())
                })
                .collect(),
            rev_nats: (1..=100u16)
                .map(|id| {
                    let fe = super::super::FrontendAddr::internal(
                        Ipv4Addr::new(198, 19, 0, id as u8),
                        80,
                        proto::TCP,
                    );
                    (id, fe.rev_nat_value())
                })
                .collect(),
            source_ranges: vec![
                (7, "203.0.113.0/24".parse().unwrap()),
                (7, "198.51.100.0/25".parse().unwrap()),
            ],
            maglev: (0..3u16)
                .map(|chunk| {
                    let mut backend_ids = [0; CHUNK_SLOTS];
                    for (i, id) in backend_ids.iter_mut().enumerate() {
                        *id = (chunk as u32 * 7 + i as u32) % 300 + 1;
                    }
                    (
                        MaglevKey { table: 3, chunk },
                        MaglevChunk {
                            table_size: 131,
                            backend_ids,
                        },
                    )
                })
                .collect(),
            // Three slots then the master, for 100 frontends.
            services: (1..=100u16)
                .flat_map(|i| {
                    (1..=3u16)
                        .map(move |slot| {
                            let value = ServiceValue {
                                backend_id: (i as u32 * 3 + slot as u32) % 300 + 1,
                                ..Default::default()
                            };
                            (service_key(i, slot), value)
                        })
                        .chain(std::iter::once((
                            service_key(i, 0),
                            ServiceValue {
                                count: 3,
                                rev_nat_id: i,
                                ..Default::default()
                            },
                        )))
                })
                .collect(),
        };
        maps.put_many(&puts).unwrap();
        assert!(
            maps.batch_updates,
            "this kernel has batch updates: no fallback"
        );

        assert_eq!(
            sorted(maps.services().unwrap()),
            sorted(puts.services.clone())
        );
        assert_eq!(
            sorted(maps.backends().unwrap()),
            sorted(puts.backends.clone())
        );
        assert_eq!(
            sorted(maps.rev_nats().unwrap()),
            sorted(puts.rev_nats.clone())
        );
        let set = |v: Vec<(u16, Ipv4Net)>| v.into_iter().collect::<std::collections::BTreeSet<_>>();
        assert_eq!(
            set(maps.source_ranges().unwrap()),
            set(puts.source_ranges.clone())
        );
        assert_eq!(
            sorted(maps.maglev_chunks().unwrap()),
            sorted(puts.maglev.clone())
        );
        let zero = vec![TrafficCounters::default(); maps.nr_cpus];
        let keys = |m: &PerCpuHashMap<MapData, u32, TrafficCounters>| -> Vec<u32> {
            let mut keys: Vec<u32> = m.keys().map(|k| k.unwrap()).collect();
            keys.sort();
            keys
        };
        assert_eq!(
            keys(&maps.frontend_stats),
            puts.frontend_stats
                .iter()
                .map(|&id| id as u32)
                .collect::<Vec<_>>()
        );
        assert_eq!(keys(&maps.backend_stats), puts.backend_stats);
        for id in [1, 100] {
            let got = maps.frontend_stats.get(&id, 0).unwrap();
            assert_eq!(got.iter().copied().collect::<Vec<_>>(), zero);
        }
        for id in [1, 150, 300] {
            let got = maps.backend_stats.get(&id, 0).unwrap();
            assert_eq!(got.iter().copied().collect::<Vec<_>>(), zero);
        }
    }

    #[test]
    fn batch_that_stops_part_way_reports_how_far_it_got() {
        // Room for 4 entries; 6 puts: the kernel writes 4 in order, then the map is full.
        let mut maps = real_maps(4);
        let puts = Puts {
            services: (1..=6u16)
                .map(|i| {
                    let value = ServiceValue {
                        backend_id: i as u32,
                        ..Default::default()
                    };
                    (service_key(i, 1), value)
                })
                .collect(),
            ..Default::default()
        };
        let err = maps.put_many(&puts).unwrap_err();
        match err {
            Error::Batch {
                map,
                done,
                total,
                source,
            } => {
                assert_eq!(map, map_names::SERVICES);
                assert_eq!((done, total), (4, 6));
                assert_eq!(source.raw_os_error(), Some(libc::E2BIG), "{source}");
            }
            other => panic!("expected a batch error, got {other}"),
        }
        assert_eq!(
            sorted(maps.services().unwrap()),
            sorted(puts.services[..4].to_vec()),
            "the first four, in order, are written"
        );
    }

    #[test]
    fn map_without_batch_update_is_told_apart_from_a_failure() {
        // A queue map has no batch update in the kernel: that must read as "unsupported" (the
        // fallback's cue, as on kernels before 5.6), not as a failed write.
        const BPF_MAP_TYPE_QUEUE: u32 = 22;
        let queue = create_map::<(), u32>(BPF_MAP_TYPE_QUEUE, 8, 0);
        let r = update_batch(queue.fd().as_fd(), "queue", &[0u32], &[0u8; 4], 4);
        assert!(
            matches!(r, Err(BatchError::Unsupported { map: "queue", .. })),
            "{r:?}"
        );
    }

    #[test]
    fn writer_programs_real_maps_through_batches_and_a_restart_finds_nothing_to_do() {
        use super::super::Writer;
        let mut maps = real_maps(4096);
        let mut w = Writer::adopt(&maps).unwrap();
        let mut want = super::super::Desired::new();
        for i in 0..50u8 {
            want.insert(
                super::super::FrontendAddr::internal(Ipv4Addr::new(198, 19, 1, i), 80, proto::TCP),
                super::super::DesiredFrontend {
                    service_port: format!("ns/svc{i}:http/TCP"),
                    backends: (0..4u8)
                        .map(|b| super::super::BackendAddr {
                            addr: Ipv4Addr::new(198, 18, i, b),
                            port: 8080,
                            proto: proto::TCP,
                            local: false,
                        })
                        .collect(),
                    ..Default::default()
                },
            );
        }
        let first = w.apply(&mut maps, &want).unwrap();
        assert_eq!(first.frontends_changed, 50);
        assert_eq!(first.backends_added, 200);
        assert_eq!(maps.services().unwrap().len(), 50 * 5);
        assert_eq!(maps.backends().unwrap().len(), 200);
        let mut again = Writer::adopt(&maps).unwrap();
        let second = again.apply(&mut maps, &want).unwrap();
        assert_eq!(second.map_writes + second.map_deletes, 0, "{second:?}");
    }

    fn enomem() -> aya::maps::MapError {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })
    }

    #[test]
    fn insert_failing_with_enomem_a_few_times_is_retried_until_it_succeeds() {
        let mut calls = 0;
        let r = retry_enomem(|| {
            calls += 1;
            if calls < 3 {
                Err(enomem())
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3);
    }

    #[test]
    fn persistent_enomem_is_reported_after_the_last_try() {
        let mut calls = 0;
        let r: std::result::Result<(), _> = retry_enomem(|| {
            calls += 1;
            Err(enomem())
        });
        assert!(is_enomem(&r.unwrap_err()));
        assert_eq!(calls, ENOMEM_TRIES);
    }

    #[test]
    fn other_errors_are_not_retried() {
        let mut calls = 0;
        let r: std::result::Result<(), _> = retry_enomem(|| {
            calls += 1;
            Err(aya::maps::MapError::KeyNotFound)
        });
        assert!(matches!(r, Err(aya::maps::MapError::KeyNotFound)));
        assert_eq!(calls, 1);
    }
}
