//! Conntrack garbage collection: deletes the entries of flows that expired.
//!
//! The data path already treats an expired flow's next packet as a new flow, and the table is an
//! LRU, so nothing breaks without this sweep; it keeps the table (and `lbctl conntrack`,
//! ActiveConn/InActConn) to live flows, and frees SNAT ports and table room early. A flow is
//! judged as a whole: its forward entry and the reply entry that belongs to it, with the state of
//! both (SYN, established, closing) and the later of their two timestamps. A reply entry whose
//! forward entry is gone (LRU eviction) is judged alone.
use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{
    conntrack::{expired, reply_key_of, CT_DIR_FORWARD},
    map_names, CtKey, CtValue,
};

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Entries looked at.
    pub scanned: usize,
    /// Entries deleted (two per expired flow, one per expired orphan).
    pub deleted: usize,
}

/// The keys of `entries` that belong to flows expired at `now_ns`.
pub fn expired_keys(entries: &[(CtKey, CtValue)], now_ns: u64) -> Vec<CtKey> {
    let by_key: HashMap<CtKey, CtValue> = entries.iter().copied().collect();
    let mut claimed = HashSet::new();
    let mut out = Vec::new();
    for (k, v) in entries.iter().filter(|(k, _)| k.dir == CT_DIR_FORWARD) {
        let rk = reply_key_of(k, v);
        let reply = by_key.get(&rk);
        if reply.is_some() {
            claimed.insert(rk);
        }
        let (flags, last) = match reply {
            Some(r) => (v.flags | r.flags, v.last_seen_ns.max(r.last_seen_ns)),
            None => (v.flags, v.last_seen_ns),
        };
        if expired(k.proto, flags, last, now_ns) {
            out.push(*k);
            if reply.is_some() {
                out.push(rk);
            }
        }
    }
    for (k, v) in entries
        .iter()
        .filter(|(k, _)| k.dir != CT_DIR_FORWARD && !claimed.contains(k))
    {
        if expired(k.proto, v.flags, v.last_seen_ns, now_ns) {
            out.push(*k);
        }
    }
    out
}

/// Opens the pinned conntrack map under `bpffs`.
pub fn open(bpffs: &Path) -> Result<BpfHashMap<MapData, CtKey, CtValue>> {
    let path = bpffs.join(map_names::CONNTRACK);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening the conntrack map pinned at {}", path.display()))?;
    BpfHashMap::try_from(Map::LruHashMap(data)).context("the conntrack pin is not an LRU hash")
}

/// One pass over the map: reads every entry, then deletes those of expired flows. An entry that
/// a packet refreshed between the read and the delete is lost (its flow is balanced anew, as
/// after an LRU eviction); with timeouts of ten seconds and more that window is negligible.
pub fn sweep(map: &mut BpfHashMap<MapData, CtKey, CtValue>) -> Result<Sweep> {
    let entries: Vec<(CtKey, CtValue)> = map.iter().filter_map(|e| e.ok()).collect();
    let keys = expired_keys(&entries, monotonic_ns());
    let mut deleted = 0;
    for k in &keys {
        // Already gone (evicted, or deleted by the data path) is fine.
        if map.remove(k).is_ok() {
            deleted += 1;
        }
    }
    Ok(Sweep {
        scanned: entries.len(),
        deleted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{
        conntrack::{
            CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_HAIRPIN, CT_FLAG_SEEN_REPLY, CT_FLAG_SNAT,
        },
        proto,
    };

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 100_000 * S;

    /// A flow client:40000 -> vip:80 on backend:8080, with the forward and reply timestamps
    /// `fwd_age`/`reply_age` seconds ago and the reply entry's flags.
    fn flow(
        p: u8,
        port: u16,
        fwd_age: u64,
        reply_age: u64,
        reply_flags: u16,
    ) -> [(CtKey, CtValue); 2] {
        let fwd = CtKey {
            src_addr: 1,
            dst_addr: 2,
            src_port: port,
            dst_port: 80,
            proto: p,
            dir: CT_DIR_FORWARD,
            _pad: 0,
        };
        let v = CtValue {
            backend_id: 1,
            rev_nat_id: 1,
            nat_addr: 3,
            nat_port: 8080,
            last_seen_ns: NOW - fwd_age * S,
            ..Default::default()
        };
        let rk = reply_key_of(&fwd, &v);
        let r = CtValue {
            nat_addr: 2,
            nat_port: 80,
            flags: reply_flags,
            last_seen_ns: NOW - reply_age * S,
            ..v
        };
        [(fwd, v), (rk, r)]
    }

    fn expired_ports(entries: &[(CtKey, CtValue)]) -> Vec<(u8, u16, u8)> {
        let mut v: Vec<_> = expired_keys(entries, NOW)
            .iter()
            .map(|k| {
                let port = if k.dir == CT_DIR_FORWARD {
                    k.src_port
                } else {
                    k.dst_port
                };
                (k.proto, port, k.dir)
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn tcp_timeouts_follow_the_state_of_both_entries() {
        let t = proto::TCP;
        let mut entries = Vec::new();
        // SYN without answer: 60 s.
        entries.extend(flow(t, 1, 61, 61, 0));
        entries.extend(flow(t, 2, 59, 59, 0));
        // Established: 6 h.
        entries.extend(flow(t, 3, 61, 61, CT_FLAG_SEEN_REPLY));
        entries.extend(flow(t, 4, 21_601, 21_601, CT_FLAG_SEEN_REPLY));
        // Closing (FIN or RST seen either way): 10 s.
        entries.extend(flow(t, 5, 11, 11, CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING));
        entries.extend(flow(t, 6, 9, 9, CT_FLAG_SEEN_REPLY | CT_FLAG_CLOSING));
        // The later timestamp of the two counts.
        entries.extend(flow(t, 7, 70, 5, 0));
        assert_eq!(
            expired_ports(&entries),
            vec![
                (t, 1, CT_DIR_FORWARD),
                (t, 1, CT_DIR_REPLY),
                (t, 4, CT_DIR_FORWARD),
                (t, 4, CT_DIR_REPLY),
                (t, 5, CT_DIR_FORWARD),
                (t, 5, CT_DIR_REPLY),
            ]
        );
    }

    #[test]
    fn udp_has_its_own_timeout() {
        let u = proto::UDP;
        let mut entries = Vec::new();
        entries.extend(flow(u, 1, 61, 61, CT_FLAG_SEEN_REPLY));
        entries.extend(flow(u, 2, 59, 200, 0));
        assert_eq!(
            expired_ports(&entries),
            vec![(u, 1, CT_DIR_FORWARD), (u, 1, CT_DIR_REPLY)]
        );
    }

    #[test]
    fn orphaned_reply_entries_are_judged_alone() {
        let t = proto::TCP;
        let [_, old] = flow(t, 1, 0, 61, 0);
        let [_, young] = flow(t, 2, 0, 30, 0);
        assert_eq!(expired_ports(&[old, young]), vec![(t, 1, CT_DIR_REPLY)]);
    }

    #[test]
    fn snat_and_hairpin_flows_pair_with_their_reply_entries() {
        let t = proto::TCP;
        let [(fk, mut fv), _] = flow(t, 1, 61, 61, 0);
        fv.flags = CT_FLAG_SNAT | CT_FLAG_HAIRPIN;
        fv.peer_addr = 2;
        fv.peer_port = 1;
        let rk = reply_key_of(&fk, &fv);
        // The reply entry is recent: the flow lives, both entries stay.
        let rv = CtValue {
            last_seen_ns: NOW - 5 * S,
            ..fv
        };
        assert!(expired_keys(&[(fk, fv), (rk, rv)], NOW).is_empty());
        let rv_old = CtValue {
            last_seen_ns: NOW - 61 * S,
            ..fv
        };
        let mut got = expired_keys(&[(fk, fv), (rk, rv_old)], NOW);
        got.sort();
        let mut want = vec![fk, rk];
        want.sort();
        assert_eq!(got, want);
    }
}
