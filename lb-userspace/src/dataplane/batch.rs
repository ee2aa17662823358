//! Queued map writes, flushed with one batch per map.
//!
//! Programming 10k Services from empty is ~250k single-element writes; one bpf(2) call each
//! costs more than the model and the diff together. [`Batched`] sits between the
//! [`Writer`](super::Writer) and a [`Dataplane`]: it queues puts per map and hands them over at
//! a barrier as one [`Puts`], which [`Dataplane::put_many`] writes map by map (the real maps with
//! one `BPF_MAP_UPDATE_BATCH` each).
//!
//! Make-before-break survives the reordering because the maps are flushed in dependency order:
//! counters, backends, rev-NAT, source ranges, Maglev chunks, services. Whatever an entry names
//! (a slot its backend, a master its slots, rev-NAT entry, ranges and table) lives in a map
//! flushed earlier, or earlier in the services queue, whose order is the writer's call order
//! (slots before their master). Nothing the writer puts must land *after* something else it
//! puts; what must come later are deletes, and every delete flushes the queue first.
//!
//! Queued puts that were never flushed (the apply failed before its end) are dropped: the
//! writer then re-reads the maps, so it works from what they really hold.
use ipnet::Ipv4Net;
use lb_common::{
    maglev::{MaglevChunk, MaglevKey},
    BackendValue, RevNatValue, ServiceKey, ServiceValue,
};

use super::{Dataplane, Result, StatsOf};

/// Puts queued for one flush, per map, each in call order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Puts {
    /// rev_nat_ids whose frontend counters are zeroed (reused ids that may hold a previous
    /// user's counts; other ids get their entry from the data path at their first packet).
    pub frontend_stats: Vec<u16>,
    /// Backend ids whose counters are zeroed (as above).
    pub backend_stats: Vec<u32>,
    pub backends: Vec<(u32, BackendValue)>,
    pub rev_nats: Vec<(u16, RevNatValue)>,
    pub source_ranges: Vec<(u16, Ipv4Net)>,
    pub maglev: Vec<(MaglevKey, MaglevChunk)>,
    /// Slots and masters, in the writer's order (a frontend's slots before its master).
    pub services: Vec<(ServiceKey, ServiceValue)>,
}

impl Puts {
    pub fn len(&self) -> usize {
        self.frontend_stats.len()
            + self.backend_stats.len()
            + self.backends.len()
            + self.rev_nats.len()
            + self.source_ranges.len()
            + self.maglev.len()
            + self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the puts one at a time, in the flush order (see the module doc). The fallback of
    /// [`Dataplane::put_many`], and the whole of it for the in-memory maps, whose checks after
    /// every single operation then see the order a batching dataplane produces.
    pub fn write_one_by_one<D: Dataplane + ?Sized>(&self, dp: &mut D) -> Result<()> {
        for &id in &self.frontend_stats {
            dp.reset_stats(StatsOf::Frontend(id))?;
        }
        for &id in &self.backend_stats {
            dp.reset_stats(StatsOf::Backend(id))?;
        }
        for &(id, value) in &self.backends {
            dp.put_backend(id, value)?;
        }
        for &(id, value) in &self.rev_nats {
            dp.put_rev_nat(id, value)?;
        }
        for &(id, range) in &self.source_ranges {
            dp.put_source_range(id, range)?;
        }
        for &(key, value) in &self.maglev {
            dp.put_maglev_chunk(key, value)?;
        }
        for &(key, value) in &self.services {
            dp.put_service(key, value)?;
        }
        Ok(())
    }
}

/// A write queue in front of a [`Dataplane`], with the writer's put/delete calls. Puts are
/// queued; a delete, and [`Batched::flush`], write the queue first (see the module doc).
pub struct Batched<'a, D: Dataplane> {
    dp: &'a mut D,
    queue: Puts,
}

impl<'a, D: Dataplane> Batched<'a, D> {
    pub fn new(dp: &'a mut D) -> Self {
        Self {
            dp,
            queue: Puts::default(),
        }
    }

    /// Writes everything queued. The queue is empty afterwards even if that failed: the caller
    /// re-reads the maps after a failure rather than retrying.
    pub fn flush(&mut self) -> Result<()> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let queue = std::mem::take(&mut self.queue);
        self.dp.put_many(&queue)
    }

    pub fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        self.queue.services.push((key, value));
        Ok(())
    }
    pub fn put_backend(&mut self, id: u32, value: BackendValue) -> Result<()> {
        self.queue.backends.push((id, value));
        Ok(())
    }
    pub fn put_rev_nat(&mut self, id: u16, value: RevNatValue) -> Result<()> {
        self.queue.rev_nats.push((id, value));
        Ok(())
    }
    pub fn reset_stats(&mut self, of: StatsOf) -> Result<()> {
        match of {
            StatsOf::Frontend(id) => self.queue.frontend_stats.push(id),
            StatsOf::Backend(id) => self.queue.backend_stats.push(id),
        }
        Ok(())
    }
    pub fn put_source_range(&mut self, rev_nat_id: u16, range: Ipv4Net) -> Result<()> {
        self.queue.source_ranges.push((rev_nat_id, range));
        Ok(())
    }
    pub fn put_maglev_chunk(&mut self, key: MaglevKey, value: MaglevChunk) -> Result<()> {
        self.queue.maglev.push((key, value));
        Ok(())
    }

    pub fn delete_service(&mut self, key: ServiceKey) -> Result<()> {
        self.flush()?;
        self.dp.delete_service(key)
    }
    pub fn delete_backend(&mut self, id: u32) -> Result<()> {
        self.flush()?;
        self.dp.delete_backend(id)
    }
    pub fn delete_rev_nat(&mut self, id: u16) -> Result<()> {
        self.flush()?;
        self.dp.delete_rev_nat(id)
    }
    pub fn delete_stats(&mut self, of: StatsOf) -> Result<()> {
        self.flush()?;
        self.dp.delete_stats(of)
    }
    pub fn delete_source_range(&mut self, rev_nat_id: u16, range: Ipv4Net) -> Result<()> {
        self.flush()?;
        self.dp.delete_source_range(rev_nat_id, range)
    }
    pub fn delete_maglev_chunk(&mut self, key: MaglevKey) -> Result<()> {
        self.flush()?;
        self.dp.delete_maglev_chunk(key)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::dataplane::{fake::FakeMaps, FrontendAddr};

    fn key(slot: u16) -> ServiceKey {
        FrontendAddr::internal(Ipv4Addr::new(198, 19, 0, 1), 80, lb_common::proto::TCP).key(slot)
    }

    #[test]
    fn puts_land_map_by_map_in_dependency_order_and_a_delete_flushes_them_first() {
        let mut maps = FakeMaps {
            // Ordering only: these entries do not form whole frontends.
            skip_checks: true,
            ..Default::default()
        };
        let mut b = Batched::new(&mut maps);
        // Called in an order that names things before they exist.
        b.put_service(key(1), ServiceValue::default()).unwrap();
        b.put_service(key(0), ServiceValue::default()).unwrap();
        b.put_rev_nat(5, RevNatValue::default()).unwrap();
        b.put_backend(7, BackendValue::default()).unwrap();
        b.delete_service(key(2)).unwrap();
        b.put_backend(8, BackendValue::default()).unwrap();
        assert_eq!(
            b.dp.log,
            [
                "put backend 7",
                "put rev_nat 5",
                "put service slot 1",
                "put service slot 0",
                "delete service slot 2",
            ],
            "queued puts go first, backends before rev-NAT before services (in call order)"
        );
        b.flush().unwrap();
        assert_eq!(b.dp.log.last().map(String::as_str), Some("put backend 8"));
        b.flush().unwrap();
        assert_eq!(b.dp.log.len(), 6, "an empty queue writes nothing");
    }

    #[test]
    fn a_failed_flush_reports_the_error_and_drops_the_queue() {
        let mut maps = FakeMaps {
            fail_writes: true,
            ..Default::default()
        };
        let mut b = Batched::new(&mut maps);
        b.put_backend(7, BackendValue::default()).unwrap();
        b.put_service(key(0), ServiceValue::default()).unwrap();
        assert!(b.flush().is_err());
        assert!(b.queue.is_empty());
        // The backend, flushed before the failing service write, is there.
        assert!(maps.backends.contains_key(&7));
        assert!(maps.services.is_empty());
    }
}
