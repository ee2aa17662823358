use std::net::Ipv4Addr;

use lb_common::maglev::{MaglevChunk, MaglevKey};

use super::*;
use crate::dataplane::{fake::FakeMaps, DesiredFrontend};

fn fe(last: u8, port: u16) -> FrontendAddr {
    FrontendAddr::internal(Ipv4Addr::new(198, 19, 0, last), port, lb_common::proto::TCP)
}

fn be(last: u8) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::new(198, 18, 1, last),
        port: 8080,
        proto: lb_common::proto::TCP,
        local: false,
    }
}

fn desired(entries: &[(FrontendAddr, &[u8])]) -> Desired {
    entries
        .iter()
        .map(|(f, bs)| {
            (
                *f,
                DesiredFrontend {
                    service_port: "ns/svc:p/TCP".into(),
                    backends: bs.iter().map(|b| be(*b)).collect(),
                    flags: 0,
                    ..Default::default()
                },
            )
        })
        .collect()
}

/// The backends a frontend's slots name, as addresses, in slot order.
fn programmed(maps: &FakeMaps, f: FrontendAddr) -> Option<Vec<u8>> {
    let master = maps.services.get(&f.key(0))?;
    Some(
        (1..=master.count)
            .map(|s| {
                let id = maps.services[&f.key(s)].backend_id;
                maps.backends[&id].addr.to_ne_bytes()[3]
            })
            .collect(),
    )
}

#[test]
fn first_apply_programs_every_frontend_and_backend() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    let stats = w
        .apply(
            &mut maps,
            &desired(&[(fe(10, 80), &[1, 2, 3]), (fe(11, 53), &[3])]),
        )
        .unwrap();
    assert_eq!(programmed(&maps, fe(10, 80)), Some(vec![1, 2, 3]));
    assert_eq!(programmed(&maps, fe(11, 53)), Some(vec![3]));
    assert_eq!(maps.backends.len(), 3, "backend 3 is shared, stored once");
    assert_eq!(maps.rev_nat.len(), 2);
    assert_eq!(stats.backends_added, 3);
    assert_eq!(stats.frontends_changed, 2);
}

#[test]
fn removed_backend_leaves_slots_and_backend_map_orphans_deleted_last() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1, 2, 3])]))
        .unwrap();
    maps.log.clear();
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1, 3])]))
        .unwrap();
    assert_eq!(programmed(&maps, fe(10, 80)), Some(vec![1, 3]));
    assert_eq!(maps.backends.len(), 2);
    assert_eq!(
        maps.log,
        [
            "put service slot 2",
            "put service slot 0",
            "delete service slot 3",
            "delete backend 2"
        ],
        "slot rewritten, master shrunk, stale slot and orphan deleted last"
    );
}

#[test]
fn frontend_without_backends_keeps_a_master_with_count_zero() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1])])).unwrap();
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[])])).unwrap();
    assert_eq!(programmed(&maps, fe(10, 80)), Some(vec![]));
    assert!(maps.backends.is_empty());
}

#[test]
fn removed_frontend_loses_master_slots_and_rev_nat() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(
        &mut maps,
        &desired(&[(fe(10, 80), &[1, 2]), (fe(11, 80), &[2])]),
    )
    .unwrap();
    w.apply(&mut maps, &desired(&[(fe(11, 80), &[2])])).unwrap();
    assert_eq!(programmed(&maps, fe(10, 80)), None);
    assert_eq!(
        maps.services.len(),
        2,
        "master and one slot of the remaining frontend"
    );
    assert_eq!(maps.rev_nat.len(), 1);
    assert_eq!(maps.backends.len(), 1);
}

#[test]
fn unchanged_state_writes_nothing() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    let d = desired(&[(fe(10, 80), &[1, 2])]);
    w.apply(&mut maps, &d).unwrap();
    let stats = w.apply(&mut maps, &d).unwrap();
    assert_eq!(stats, ApplyStats::default());
}

#[test]
fn restarted_writer_adopts_ids_and_changes_nothing() {
    let mut maps = FakeMaps::default();
    let d = desired(&[(fe(10, 80), &[1, 2]), (fe(11, 53), &[3])]);
    Writer::adopt(&maps).unwrap().apply(&mut maps, &d).unwrap();
    let before = maps.clone();
    let mut again = Writer::adopt(&maps).unwrap();
    let stats = again.apply(&mut maps, &d).unwrap();
    assert_eq!(stats, ApplyStats::default());
    assert_eq!(maps.services, before.services);
    assert_eq!(maps.backends, before.backends);
}

#[test]
fn adoption_removes_leftovers_of_an_interrupted_apply() {
    let mut maps = FakeMaps::default();
    Writer::adopt(&maps)
        .unwrap()
        .apply(&mut maps, &desired(&[(fe(10, 80), &[1, 2])]))
        .unwrap();
    // A slot past the master's count, as an agent killed between steps would leave it.
    let stray = fe(10, 80).key(7);
    maps.services.insert(
        stray,
        ServiceValue {
            backend_id: 1,
            ..Default::default()
        },
    );
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1, 2])]))
        .unwrap();
    assert!(!maps.services.contains_key(&stray));
}

#[test]
fn random_update_sequences_keep_every_frontend_consistent() {
    // A small deterministic generator: the fake checks consistency after every operation.
    let mut seed: u64 = 0x5eed;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    for round in 0..300 {
        let mut entries = Vec::new();
        for f in 0..(next(6) as u8) {
            let count = next(8) as usize;
            let bs: Vec<u8> = (0..count)
                .map(|_| next(20) as u8 + 1)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            entries.push((fe(f, 80), bs));
        }
        let d: Desired = entries
            .iter()
            .map(|(f, bs)| {
                (
                    *f,
                    DesiredFrontend {
                        service_port: String::new(),
                        backends: bs.iter().map(|b| be(*b)).collect(),
                        flags: 0,
                        ..Default::default()
                    },
                )
            })
            .collect();
        w.apply(&mut maps, &d)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        for (f, bs) in &entries {
            assert_eq!(programmed(&maps, *f).as_ref(), Some(bs), "round {round}");
        }
        assert_eq!(
            maps.services.keys().filter(|k| k.slot == 0).count(),
            entries.len()
        );
        let referenced: BTreeSet<u32> = maps
            .services
            .values()
            .filter(|v| v.backend_id != 0)
            .map(|v| v.backend_id)
            .collect();
        assert_eq!(
            referenced.len(),
            maps.backends.len(),
            "round {round}: no orphan backends remain"
        );
    }
}

/// A dataplane that fails the n-th service write, like a full map would.
struct FailingMaps {
    inner: FakeMaps,
    fail_service_write: usize,
    service_writes: usize,
}

impl crate::dataplane::Dataplane for FailingMaps {
    fn services(&self) -> Result<Vec<(lb_common::ServiceKey, ServiceValue)>> {
        self.inner.services()
    }
    fn backends(&self) -> Result<Vec<(u32, lb_common::BackendValue)>> {
        self.inner.backends()
    }
    fn rev_nats(&self) -> Result<Vec<(u16, lb_common::RevNatValue)>> {
        self.inner.rev_nats()
    }
    fn put_service(&mut self, key: lb_common::ServiceKey, value: ServiceValue) -> Result<()> {
        self.service_writes += 1;
        if self.service_writes == self.fail_service_write {
            return Err(Error::Fake("map full".into()));
        }
        self.inner.put_service(key, value)
    }
    fn delete_service(&mut self, key: lb_common::ServiceKey) -> Result<()> {
        self.inner.delete_service(key)
    }
    fn put_backend(&mut self, id: u32, value: lb_common::BackendValue) -> Result<()> {
        self.inner.put_backend(id, value)
    }
    fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.inner.delete_backend(id)
    }
    fn put_rev_nat(&mut self, id: u16, value: lb_common::RevNatValue) -> Result<()> {
        self.inner.put_rev_nat(id, value)
    }
    fn delete_rev_nat(&mut self, id: u16) -> Result<()> {
        self.inner.delete_rev_nat(id)
    }
    fn stats_keys(&self) -> Result<Vec<crate::dataplane::StatsOf>> {
        self.inner.stats_keys()
    }
    fn reset_stats(&mut self, of: crate::dataplane::StatsOf) -> Result<()> {
        self.inner.reset_stats(of)
    }
    fn delete_stats(&mut self, of: crate::dataplane::StatsOf) -> Result<()> {
        self.inner.delete_stats(of)
    }
    fn source_ranges(&self) -> Result<Vec<(u16, ipnet::Ipv4Net)>> {
        self.inner.source_ranges()
    }
    fn put_source_range(&mut self, rev_nat_id: u16, range: ipnet::Ipv4Net) -> Result<()> {
        self.inner.put_source_range(rev_nat_id, range)
    }
    fn delete_source_range(&mut self, rev_nat_id: u16, range: ipnet::Ipv4Net) -> Result<()> {
        self.inner.delete_source_range(rev_nat_id, range)
    }
    fn maglev_chunks(&self) -> Result<Vec<(MaglevKey, MaglevChunk)>> {
        self.inner.maglev_chunks()
    }
    fn put_maglev_chunk(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<()> {
        self.inner.put_maglev_chunk(key, value)
    }
    fn delete_maglev_chunk(&mut self, key: MaglevKey) -> Result<()> {
        self.inner.delete_maglev_chunk(key)
    }
}

#[test]
fn failed_apply_leaves_consistent_maps_and_the_next_apply_works_from_what_they_hold() {
    let mut maps = FailingMaps {
        inner: FakeMaps::default(),
        fail_service_write: usize::MAX,
        service_writes: 0,
    };
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1, 2, 3])]))
        .unwrap();
    // Rewriting the three slots fails at the third write, before the master.
    maps.fail_service_write = maps.service_writes + 3;
    assert!(w
        .apply(&mut maps, &desired(&[(fe(10, 80), &[4, 5, 6])]))
        .is_err());
    maps.inner.check_consistent().unwrap();
    // The next apply must not trust the failed one: slots 1 and 2 hold 4 and 5 now.
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1, 2])]))
        .unwrap();
    assert_eq!(programmed(&maps.inner, fe(10, 80)), Some(vec![1, 2]));
    let referenced: BTreeSet<u32> = maps
        .inner
        .services
        .values()
        .filter(|v| v.backend_id != 0)
        .map(|v| v.backend_id)
        .collect();
    assert_eq!(
        referenced.len(),
        maps.inner.backends.len(),
        "no orphans and nothing missing"
    );
}

#[test]
fn frontend_with_more_backends_than_slots_is_capped_not_wrapped() {
    let mut maps = FakeMaps {
        skip_checks: true,
        ..Default::default()
    };
    let mut w = Writer::adopt(&maps).unwrap();
    let many: Vec<BackendAddr> = (0..70_000u32)
        .map(|i| BackendAddr {
            addr: Ipv4Addr::from(0xc612_0000 + i),
            port: 8080,
            proto: lb_common::proto::TCP,
            local: false,
        })
        .collect();
    let d: Desired = [(
        fe(10, 80),
        DesiredFrontend {
            service_port: "ns/big:p/TCP".into(),
            backends: many,
            flags: 0,
            ..Default::default()
        },
    )]
    .into_iter()
    .collect();
    w.apply(&mut maps, &d).unwrap();
    assert_eq!(maps.services[&fe(10, 80).key(0)].count, u16::MAX);
    maps.skip_checks = false;
    maps.check_consistent().unwrap();
}

#[test]
fn terminating_backend_is_kept_flagged_in_place_and_deleted_when_it_stops_serving() {
    use lb_common::service::BACKEND_FLAG_TERMINATING;
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1, 2])]))
        .unwrap();
    let id_of = |maps: &FakeMaps, n: u8| {
        maps.backends
            .iter()
            .find(|(_, b)| b.addr.to_ne_bytes()[3] == n)
            .map(|(id, b)| (*id, b.flags))
    };
    let (id1, _) = id_of(&maps, 1).unwrap();
    // Backend 1 terminates: out of the slots, kept with the flag, same id.
    let mut d = desired(&[(fe(10, 80), &[2])]);
    let entry = d.get_mut(&fe(10, 80)).unwrap();
    entry.draining = vec![be(1)];
    entry.terminating = [be(1)].into_iter().collect();
    maps.log.clear();
    let stats = w.apply(&mut maps, &d).unwrap();
    assert_eq!(programmed(&maps, fe(10, 80)), Some(vec![2]));
    assert_eq!(
        id_of(&maps, 1),
        Some((id1, BACKEND_FLAG_TERMINATING)),
        "rewritten in place"
    );
    assert_eq!(stats.backends_added + stats.backends_removed, 0);
    // The flag is set before the slots drop the backend (one write), and nothing is deleted but
    // the slot past the new count.
    assert_eq!(maps.log.first().unwrap(), &format!("put backend {id1}"));
    // Unchanged state writes nothing.
    maps.log.clear();
    w.apply(&mut maps, &d).unwrap();
    assert!(maps.log.is_empty(), "{:?}", maps.log);
    // It stops serving: deleted.
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[2])])).unwrap();
    assert_eq!(id_of(&maps, 1), None);
    // A restarted writer adopts the flag and changes nothing.
    w.apply(&mut maps, &d).unwrap();
    let mut again = Writer::adopt(&maps).unwrap();
    maps.log.clear();
    again.apply(&mut maps, &d).unwrap();
    assert!(maps.log.is_empty(), "{:?}", maps.log);
}

#[test]
fn affinity_group_is_the_rev_nat_id_of_the_group_frontend_for_every_frontend() {
    use crate::dataplane::AffinityWant;
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    let group = fe(10, 80);
    let mut d = desired(&[(fe(10, 80), &[1, 2]), (fe(20, 30080), &[1, 2])]);
    for entry in d.values_mut() {
        entry.affinity = Some(AffinityWant {
            timeout_seconds: 10800,
            group,
        });
    }
    w.apply(&mut maps, &d).unwrap();
    let m1 = maps.services[&fe(10, 80).key(0)];
    let m2 = maps.services[&fe(20, 30080).key(0)];
    assert_eq!(m1.affinity_timeout, 10800);
    assert_eq!(m1.affinity_group, m1.rev_nat_id);
    assert_eq!(
        m2.affinity_group, m1.rev_nat_id,
        "shared by the ServicePort"
    );
    assert_ne!(m2.rev_nat_id, m1.rev_nat_id);
    // Turning affinity off rewrites the masters.
    w.apply(
        &mut maps,
        &desired(&[(fe(10, 80), &[1, 2]), (fe(20, 30080), &[1, 2])]),
    )
    .unwrap();
    let m2 = maps.services[&fe(20, 30080).key(0)];
    assert_eq!((m2.affinity_timeout, m2.affinity_group), (0, 0));
}

fn with_ranges(f: FrontendAddr, backends: &[u8], ranges: &[&str]) -> Desired {
    let mut d = desired(&[(f, backends)]);
    let fe = d.get_mut(&f).unwrap();
    fe.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
    if !ranges.is_empty() {
        fe.flags |= lb_common::service::SVC_FLAG_SOURCE_RANGES;
    }
    d
}

#[test]
fn source_ranges_are_written_before_the_flag_and_deleted_after_it() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(
        &mut maps,
        &with_ranges(fe(10, 443), &[1], &["203.0.113.0/24"]),
    )
    .unwrap();
    let master = maps
        .log
        .iter()
        .position(|l| l == "put service slot 0")
        .unwrap();
    let range = maps
        .log
        .iter()
        .position(|l| l.starts_with("put source range"))
        .unwrap();
    assert!(range < master, "{:?}", maps.log);

    // Another list: the new entry first, the master untouched, the old entry last.
    maps.log.clear();
    w.apply(
        &mut maps,
        &with_ranges(fe(10, 443), &[1], &["198.51.100.0/24"]),
    )
    .unwrap();
    let id = maps.services[&fe(10, 443).key(0)].rev_nat_id;
    assert_eq!(
        maps.log,
        [
            format!("put source range {id} 198.51.100.0/24"),
            "put service slot 0".to_string(),
            format!("delete source range {id} 203.0.113.0/24"),
        ]
    );

    // No list: flag cleared on the master before the entry goes.
    maps.log.clear();
    w.apply(&mut maps, &with_ranges(fe(10, 443), &[1], &[]))
        .unwrap();
    assert_eq!(
        maps.log,
        [
            "put service slot 0".to_string(),
            format!("delete source range {id} 198.51.100.0/24"),
        ]
    );
    assert!(maps.source_ranges.is_empty());
}

#[test]
fn removed_frontend_takes_its_source_ranges_along() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(
        &mut maps,
        &with_ranges(fe(10, 443), &[1], &["203.0.113.0/24", "198.51.100.7/32"]),
    )
    .unwrap();
    assert_eq!(maps.source_ranges.len(), 2);
    w.apply(&mut maps, &desired(&[])).unwrap();
    assert!(maps.source_ranges.is_empty());
    assert!(maps.services.is_empty());
}

#[test]
fn adoption_keeps_source_ranges_and_deletes_those_of_no_frontend() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    let d = with_ranges(fe(10, 443), &[1], &["203.0.113.0/24"]);
    w.apply(&mut maps, &d).unwrap();
    // Left over by an interrupted apply: an id no master uses.
    maps.source_ranges
        .insert((999, "192.0.2.0/24".parse().unwrap()));
    let mut w = Writer::adopt(&maps).unwrap();
    maps.log.clear();
    w.apply(&mut maps, &d).unwrap();
    assert_eq!(maps.log, ["delete source range 999 192.0.2.0/24"]);
    assert_eq!(maps.source_ranges.len(), 1);
}

// ---- Maglev tables ----------------------------------------------------------------------

fn maglev_desired(entries: &[(FrontendAddr, &[u8], bool)]) -> Desired {
    entries
        .iter()
        .map(|(f, bs, maglev)| {
            (
                *f,
                DesiredFrontend {
                    service_port: "ns/svc:p/TCP".into(),
                    backends: bs.iter().map(|b| be(*b)).collect(),
                    flags: if *maglev { SVC_FLAG_MAGLEV } else { 0 },
                    ..Default::default()
                },
            )
        })
        .collect()
}

/// The chunks of a frontend's table in the fake maps.
fn table_of(maps: &FakeMaps, f: FrontendAddr) -> BTreeMap<u16, MaglevChunk> {
    let table = maps.services[&f.key(0)].rev_nat_id;
    maps.maglev
        .iter()
        .filter(|(k, _)| k.table == table)
        .map(|(k, v)| (k.chunk, *v))
        .collect()
}

/// The table the pure builder gives for these backends, with the ids the writer allocated.
fn expected_table(maps: &FakeMaps, bs: &[u8], size: TableSize) -> BTreeMap<u16, MaglevChunk> {
    let backends: Vec<BackendAddr> = bs.iter().map(|b| be(*b)).collect();
    maglev::chunks_for(&backends, size, |b| {
        *maps
            .backends
            .iter()
            .find(|(_, v)| BackendAddr::from_value(v) == *b)
            .expect("backend programmed")
            .0
    })
}

#[test]
fn maglev_frontend_gets_its_whole_table_before_its_master() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    let stats = w
        .apply(
            &mut maps,
            &maglev_desired(&[(fe(10, 80), &[1, 2, 3], true)]),
        )
        .unwrap();
    assert_eq!(stats.maglev_chunk_writes, 16, "1021 slots in 16 chunks");
    assert_eq!(
        table_of(&maps, fe(10, 80)),
        expected_table(&maps, &[1, 2, 3], TableSize::default())
    );
    let master_at = maps
        .log
        .iter()
        .position(|l| l == "put service slot 0")
        .unwrap();
    let last_chunk_at = maps
        .log
        .iter()
        .rposition(|l| l.starts_with("put maglev"))
        .unwrap();
    assert!(last_chunk_at < master_at, "{:?}", maps.log);
    assert_eq!(
        maps.services[&fe(10, 80).key(0)].flags & SVC_FLAG_MAGLEV,
        SVC_FLAG_MAGLEV
    );
}

#[test]
fn random_frontends_have_no_table() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(
        &mut maps,
        &maglev_desired(&[(fe(10, 80), &[1, 2, 3], false)]),
    )
    .unwrap();
    assert!(maps.maglev.is_empty());
}

#[test]
fn maglev_table_is_rewritten_by_diff_only_where_it_changed() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(
        &mut maps,
        &maglev_desired(&[
            (fe(10, 80), &[1, 2, 3, 4], true),
            (fe(11, 80), &[5, 6], true),
        ]),
    )
    .unwrap();
    let before = table_of(&maps, fe(10, 80));
    let other_before = table_of(&maps, fe(11, 80));
    maps.log.clear();
    // One backend of one frontend goes away.
    let stats = w
        .apply(
            &mut maps,
            &maglev_desired(&[(fe(10, 80), &[1, 2, 4], true), (fe(11, 80), &[5, 6], true)]),
        )
        .unwrap();
    let after = table_of(&maps, fe(10, 80));
    assert_eq!(
        after,
        expected_table(&maps, &[1, 2, 4], TableSize::default())
    );
    let changed = before
        .iter()
        .filter(|(c, v)| after.get(c) != Some(v))
        .count();
    assert_eq!(
        stats.maglev_chunk_writes, changed,
        "exactly the chunks that differ"
    );
    assert_eq!(
        table_of(&maps, fe(11, 80)),
        other_before,
        "the other table is untouched"
    );
    // The removed backend is deleted last, after the table stopped naming it.
    assert_eq!(
        maps.log.last().map(String::as_str),
        Some("delete backend 3")
    );
    // Slots that did not belong to the removed backend keep their backend.
    let id3 = 3;
    let kept = before
        .values()
        .zip(after.values())
        .flat_map(|(b, a)| b.backend_ids.iter().zip(a.backend_ids.iter()))
        .filter(|(b, _)| **b != id3 && **b != 0)
        .filter(|(b, a)| b == a)
        .count();
    let survivors = before
        .values()
        .flat_map(|c| c.backend_ids.iter())
        .filter(|b| **b != id3 && **b != 0)
        .count();
    assert!(
        kept as f64 / survivors as f64 > 0.95,
        "{kept} of {survivors} kept"
    );

    // The same state again writes nothing.
    let stats = w
        .apply(
            &mut maps,
            &maglev_desired(&[(fe(10, 80), &[1, 2, 4], true), (fe(11, 80), &[5, 6], true)]),
        )
        .unwrap();
    assert_eq!(stats, ApplyStats::default());
}

#[test]
fn switching_maglev_off_deletes_the_table_after_the_master() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(&mut maps, &maglev_desired(&[(fe(10, 80), &[1, 2], true)]))
        .unwrap();
    maps.log.clear();
    w.apply(&mut maps, &maglev_desired(&[(fe(10, 80), &[1, 2], false)]))
        .unwrap();
    assert!(maps.maglev.is_empty());
    assert_eq!(maps.log[0], "put service slot 0", "{:?}", maps.log);
    assert!(maps.log[1..].iter().all(|l| l.starts_with("delete maglev")));
    // And back on: the table is complete before the flag is set (the fake checks it).
    w.apply(&mut maps, &maglev_desired(&[(fe(10, 80), &[1, 2], true)]))
        .unwrap();
    assert_eq!(table_of(&maps, fe(10, 80)).len(), 16);
}

#[test]
fn removed_or_emptied_maglev_frontend_loses_its_table() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(
        &mut maps,
        &maglev_desired(&[(fe(10, 80), &[1, 2], true), (fe(11, 80), &[3], true)]),
    )
    .unwrap();
    w.apply(&mut maps, &maglev_desired(&[(fe(10, 80), &[], true)]))
        .unwrap();
    assert!(
        maps.maglev.is_empty(),
        "no backends: no table; frontend gone: no table"
    );
    assert_eq!(maps.services[&fe(10, 80).key(0)].count, 0);
}

#[test]
fn restarted_writer_with_another_table_size_rebuilds_tables_and_drops_strays() {
    let mut maps = FakeMaps::default();
    let mut w = Writer::adopt(&maps).unwrap();
    let d = maglev_desired(&[(fe(10, 80), &[1, 2, 3], true)]);
    w.apply(&mut maps, &d).unwrap();
    // A chunk of a table no master names (an interrupted apply).
    maps.maglev.insert(
        MaglevKey {
            table: 999,
            chunk: 3,
        },
        MaglevChunk::default(),
    );

    let same = Writer::adopt(&maps).unwrap().apply(&mut maps, &d).unwrap();
    assert_eq!(same.maglev_chunk_writes, 0, "same size: adopted as is");
    assert!(
        !maps.maglev.keys().any(|k| k.table == 999),
        "stray chunk deleted"
    );

    let size = TableSize::new(4093).unwrap();
    let mut w = Writer::adopt_with_table_size(&maps, size).unwrap();
    let stats = w.apply(&mut maps, &d).unwrap();
    assert_eq!(stats.maglev_chunk_writes, 64, "4093 slots in 64 chunks");
    assert_eq!(
        table_of(&maps, fe(10, 80)),
        expected_table(&maps, &[1, 2, 3], size)
    );

    // And back to a smaller size: the chunks past the new end are deleted.
    let mut w = Writer::adopt(&maps).unwrap();
    w.apply(&mut maps, &d).unwrap();
    assert_eq!(table_of(&maps, fe(10, 80)).len(), 16);
}

#[test]
fn random_update_sequences_with_maglev_keep_every_table_complete() {
    let mut seed: u64 = 0xbadc0de;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut maps = FakeMaps::default();
    let size = TableSize::new(131).unwrap();
    let mut w = Writer::adopt_with_table_size(&maps, size).unwrap();
    for round in 0..200 {
        let mut entries = Vec::new();
        for f in 0..(next(5) as u8) {
            let bs: Vec<u8> = (0..next(6))
                .map(|_| next(12) as u8 + 1)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            entries.push((fe(f, 80), bs, next(2) == 0));
        }
        let d = maglev_desired(
            &entries
                .iter()
                .map(|(f, b, m)| (*f, b.as_slice(), *m))
                .collect::<Vec<_>>(),
        );
        w.apply(&mut maps, &d)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        for (f, bs, m) in &entries {
            let want = if *m {
                expected_table(&maps, bs, size)
            } else {
                BTreeMap::new()
            };
            assert_eq!(table_of(&maps, *f), want, "round {round}");
        }
        let tables: BTreeSet<u16> = maps.maglev.keys().map(|k| k.table).collect();
        let expected = entries
            .iter()
            .filter(|(_, b, m)| *m && !b.is_empty())
            .count();
        assert_eq!(tables.len(), expected, "round {round}: no stale tables");
    }
}

#[test]
fn counters_are_left_to_the_data_path_unless_an_id_may_hold_a_previous_users_counts() {
    // Counter entries of ids 1 (backend and frontend) and 7 (backend) are in the maps with no
    // user, as after a crash between freeing an id and deleting its counters.
    let mut maps = FakeMaps::default();
    for of in [
        StatsOf::Backend(1),
        StatsOf::Frontend(1),
        StatsOf::Backend(7),
    ] {
        maps.stale_stats.insert(of);
    }
    let mut w = Writer::adopt(&maps).unwrap();
    // Ids 1 and 2 are handed out: the fake refuses a slot or master naming an id whose stale
    // counters were not zeroed first, so this passing means id 1 was reset.
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1, 2])]))
        .unwrap();
    assert_eq!(
        maps.stats,
        [StatsOf::Frontend(1), StatsOf::Backend(1)]
            .into_iter()
            .collect(),
        "only the ids that may hold counts are written; backend 2 gets its entry from its first packet"
    );
    assert!(maps.stale_stats.contains(&StatsOf::Backend(7)));

    // Freeing backend 2 deletes its counters; a packet in flight may create them again (the fake
    // assumes it does), so when the id comes round again it is zeroed before use.
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1])])).unwrap();
    assert!(maps.stale_stats.contains(&StatsOf::Backend(2)));
    let mut w = Writer::adopt(&maps).unwrap();
    w.next_backend_id = 2;
    w.apply(&mut maps, &desired(&[(fe(10, 80), &[1, 3])]))
        .unwrap();
    assert_eq!(
        w.backend_ids[&be(3)],
        2,
        "the freed id was handed out again"
    );
    assert!(maps.stats.contains(&StatsOf::Backend(2)));
    assert!(!maps.stale_stats.contains(&StatsOf::Backend(2)));
}

#[test]
fn a_writer_that_skips_zeroing_a_reused_id_is_caught_by_the_fake() {
    let mut maps = FakeMaps::default();
    maps.stale_stats.insert(StatsOf::Backend(1));
    let mut w = Writer::adopt(&maps).unwrap();
    // As if the adoption had not seen the stale entry.
    w.stats_may_exist.clear();
    let err = w
        .apply(&mut maps, &desired(&[(fe(10, 80), &[1])]))
        .unwrap_err();
    assert!(err.to_string().contains("previous user"), "{err}");
}
