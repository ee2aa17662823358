//! The real dataplane: the pinned BPF maps.
use std::path::Path;

use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    HashMap, Map, MapData, PerCpuHashMap, PerCpuValues,
};
use ipnet::Ipv4Net;
use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    map_names, BackendValue, RevNatValue, ServiceKey, ServiceValue, SourceRangeKey,
    TrafficCounters,
};

use super::{Dataplane, Error, Result, StatsOf};

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
    use super::*;

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
