//! `/metrics` in the Prometheus text format.
//!
//! Two kinds of metrics:
//! - the agent's own, kept in memory: the sync latency histogram (from the moment a source saw a
//!   change to the moment the maps held it) and the sync error counter;
//! - the data path's, read from the pinned maps at scrape time: per-frontend and per-backend
//!   traffic counters (per-CPU, summed), drops by reason, and the fill level of every map.
//!
//! Reading the maps at scrape time means the numbers are exactly what `lbctl stats` shows, and
//! nothing is copied between scrapes. The cost is one map walk per scrape: counting conntrack
//! entries walks its keys (about 0.5 µs per entry, so ~0.1 s for a full default table of 262144).
//!
//! Labels name what the maps only know by id: the frontend's address, protocol and scope
//! (`internal`: from this node's pods, `external`: from outside) come from its master entry, the ServicePort (`namespace/name:port`) from the agent's last sync, and backend
//! counters (one per backend id, shared by every frontend using that address) carry every
//! ServicePort that uses the backend, comma-separated.
use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuHashMap};
use lb_common::{map_names, stats::drop_reason, TrafficCounters};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};

use crate::{
    dataplane::{bpf::BpfMaps, BackendAddr, Dataplane, DesiredFrontend, FrontendAddr},
    inspect::{protocol_name, scope_name},
};

/// The agent's metrics; shared between the sync loop and the HTTP server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    sync_errors: Counter,
    service_ports: Arc<Mutex<ServicePorts>>,
}

/// ServicePort names per frontend and per backend, as the desired state has them.
///
/// Kept compact: there is an entry per backend (100,000 at 10k Services x 10 endpoints) and
/// nearly every backend belongs to one ServicePort. A `BTreeMap<String, u32>` per backend cost a
/// whole B-tree node plus a copy of the name, about 30 MiB at that size; a backend's names are
/// kept inline when there is one ([`Named::One`]) and the name is shared by the frontend's
/// backends (one allocation per frontend).
#[derive(Debug, Default)]
struct ServicePorts {
    frontends: BTreeMap<FrontendAddr, Arc<str>>,
    /// Per backend, its ServicePorts (sorted by name) with the number of frontends through which
    /// it is one.
    backends: BTreeMap<BackendAddr, Named>,
}

/// A backend's ServicePorts with their frontend counts, sorted by name; never empty.
#[derive(Debug)]
enum Named {
    One([(Arc<str>, u32); 1]),
    Many(Vec<(Arc<str>, u32)>),
}

impl Named {
    fn list(&self) -> &[(Arc<str>, u32)] {
        match self {
            Named::One(one) => one,
            Named::Many(many) => many,
        }
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.list().binary_search_by(|(n, _)| (**n).cmp(name))
    }

    /// Counts one more frontend of `name`.
    fn add(&mut self, name: &Arc<str>) {
        match (self.find(name), &mut *self) {
            (Ok(at), Named::One(list)) => list[at].1 += 1,
            (Ok(at), Named::Many(list)) => list[at].1 += 1,
            (Err(at), Named::One([first])) => {
                let mut list = Vec::with_capacity(2);
                list.push(first.clone());
                list.insert(at, (Arc::clone(name), 1));
                *self = Named::Many(list);
            }
            (Err(at), Named::Many(list)) => list.insert(at, (Arc::clone(name), 1)),
        }
    }

    /// Counts one frontend of `name` less; false when none is left.
    fn remove(&mut self, name: &str) -> bool {
        let Ok(at) = self.find(name) else {
            return true;
        };
        match self {
            Named::One([(_, n)]) => {
                *n -= 1;
                *n > 0
            }
            Named::Many(list) => {
                list[at].1 -= 1;
                if list[at].1 == 0 {
                    list.remove(at);
                }
                if let [only] = list.as_slice() {
                    *self = Named::One([only.clone()]);
                }
                true
            }
        }
    }
}

impl ServicePorts {
    /// Follows one frontend's change (see [`Metrics::desired_changed`]).
    fn change(
        &mut self,
        fe: FrontendAddr,
        before: Option<&DesiredFrontend>,
        after: Option<&DesiredFrontend>,
    ) {
        if let Some(d) = before {
            self.frontends.remove(&fe);
            for b in &d.backends {
                if let Some(named) = self.backends.get_mut(b) {
                    if !named.remove(&d.service_port) {
                        self.backends.remove(b);
                    }
                }
            }
        }
        if let Some(d) = after {
            let name: Arc<str> = Arc::from(d.service_port.as_str());
            for b in &d.backends {
                match self.backends.entry(*b) {
                    std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().add(&name),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(Named::One([(Arc::clone(&name), 1)]));
                    }
                }
            }
            self.frontends.insert(fe, name);
        }
    }

    /// The `service_port` label of a frontend.
    fn frontend_label(&self, fe: &FrontendAddr) -> String {
        self.frontends
            .get(fe)
            .map(|n| n.to_string())
            .unwrap_or_default()
    }

    /// The `service_port` label of a backend: its ServicePorts, sorted, comma-separated.
    fn backend_label(&self, b: &BackendAddr) -> String {
        self.backends
            .get(b)
            .map(|named| {
                named
                    .list()
                    .iter()
                    .map(|(n, _)| &**n)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    }
}

impl Metrics {
    /// Metrics of an agent whose maps are pinned under `bpffs`.
    pub fn new(bpffs: PathBuf) -> Self {
        let mut registry = Registry::default();
        // 1 ms to ~33 s: a sync is milliseconds, a coalesced burst of API changes up to seconds.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "lb_sync_duration_seconds",
            "Time from a source seeing a change (manifests poll, API watch event) to the maps \
             holding it",
            sync_duration.clone(),
        );
        let sync_errors = Counter::default();
        registry.register(
            "lb_sync_errors",
            "Syncs whose map updates failed (retried)",
            sync_errors.clone(),
        );
        let service_ports = Arc::new(Mutex::new(ServicePorts::default()));
        registry.register_collector(Box::new(MapCollector {
            bpffs,
            service_ports: Arc::clone(&service_ports),
        }));
        Self {
            registry,
            sync_duration,
            sync_errors,
            service_ports,
        }
    }

    /// Records a successful sync, `seconds` after the change it carries.
    pub fn synced(&self, seconds: Option<f64>) {
        if let Some(s) = seconds {
            self.sync_duration.observe(s);
        }
    }

    /// Follows the desired state's changes (`(frontend, before, after)`) for the names that
    /// label the series.
    pub fn desired_changed<'a>(
        &self,
        changes: impl IntoIterator<
            Item = (
                FrontendAddr,
                Option<&'a DesiredFrontend>,
                Option<&'a DesiredFrontend>,
            ),
        >,
    ) {
        let mut names = self.service_ports.lock().unwrap_or_else(|e| e.into_inner());
        for (fe, before, after) in changes {
            names.change(fe, before, after);
        }
    }

    /// Records a failed sync.
    pub fn sync_failed(&self) {
        self.sync_errors.inc();
    }

    /// The text exposition (`text/plain; version=0.0.4`... as OpenMetrics text, which Prometheus
    /// reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("encoding /metrics: {e}");
        }
        out
    }
}

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads the pinned maps on every scrape.
#[derive(Debug)]
struct MapCollector {
    bpffs: PathBuf,
    service_ports: Arc<Mutex<ServicePorts>>,
}

/// One frontend or backend and its summed counters.
struct Row {
    labels: Vec<(&'static str, String)>,
    counters: TrafficCounters,
}

/// What one scrape read from the maps.
#[derive(Default)]
struct MapsView {
    frontends: Vec<Row>,
    backends: Vec<Row>,
    drops: Vec<(&'static str, u64)>,
    /// (map name, entries, capacity)
    fill: Vec<(&'static str, u64, u64)>,
}

impl MapCollector {
    fn read(&self) -> Result<MapsView, String> {
        let dir = &self.bpffs;
        let names = self.service_ports.lock().unwrap_or_else(|e| e.into_inner());
        let maps = BpfMaps::from_pins(dir).map_err(|e| e.to_string())?;
        let sum = |m: &PerCpuHashMap<MapData, u32, TrafficCounters>, name: &str| {
            m.iter()
                .map(|e| e.map(|(k, v)| (k, TrafficCounters::sum(v.iter()))))
                .collect::<Result<BTreeMap<u32, TrafficCounters>, _>>()
                .map_err(|e| format!("reading {name}: {e}"))
        };
        let fe_stats = sum(&maps.frontend_stats, map_names::FRONTEND_STATS)?;
        let be_stats = sum(&maps.backend_stats, map_names::BACKEND_STATS)?;
        let mut view = MapsView::default();
        let services = maps.services().map_err(|e| e.to_string())?;
        for (key, master) in services.iter().filter(|(k, _)| k.slot == 0) {
            let fe = FrontendAddr::from_key(key);
            // No entry yet: no packet yet (the data path creates it at the first).
            let c = fe_stats
                .get(&(master.rev_nat_id as u32))
                .copied()
                .unwrap_or_default();
            view.frontends.push(Row {
                labels: vec![
                    ("service_port", names.frontend_label(&fe)),
                    ("frontend", SocketAddrV4::new(fe.addr, fe.port).to_string()),
                    ("protocol", protocol_name(fe.proto)),
                    // NodePort, LoadBalancer and externalIP frontends have an entry per scope,
                    // each with its own counters.
                    ("scope", scope_name(fe.scope)),
                ],
                counters: c,
            });
        }
        for (id, value) in maps.backends().map_err(|e| e.to_string())? {
            let b = BackendAddr::from_value(&value);
            let c = be_stats.get(&id).copied().unwrap_or_default();
            let sp = names.backend_label(&b);
            view.backends.push(Row {
                labels: vec![
                    ("service_port", sp),
                    ("backend", SocketAddrV4::new(b.addr, b.port).to_string()),
                    ("protocol", protocol_name(b.proto)),
                ],
                counters: c,
            });
        }
        view.frontends.sort_by(|a, b| a.labels.cmp(&b.labels));
        view.backends.sort_by(|a, b| a.labels.cmp(&b.labels));
        drop(names);

        let drops_data = MapData::from_pin(dir.join(map_names::DROPS))
            .map_err(|e| format!("opening {}: {e}", map_names::DROPS))?;
        let drops: PerCpuArray<_, u64> = PerCpuArray::try_from(Map::PerCpuArray(drops_data))
            .map_err(|e| format!("opening {}: {e}", map_names::DROPS))?;
        for (reason, name) in drop_reason::NAMES.iter().enumerate() {
            let per_cpu = drops
                .get(&(reason as u32), 0)
                .map_err(|e| format!("reading {} [{reason}]: {e}", map_names::DROPS))?;
            view.drops.push((name, per_cpu.iter().sum()));
        }
        for name in FILL_MAPS {
            let (entries, capacity) = fill_level(dir, name)?;
            view.fill.push((name, entries, capacity));
        }
        Ok(view)
    }
}

/// Maps whose fill level is reported (the drop counters are a fixed array).
const FILL_MAPS: [&str; 6] = [
    map_names::SERVICES,
    map_names::BACKENDS,
    map_names::REV_NAT,
    map_names::CONNTRACK,
    map_names::FRONTEND_STATS,
    map_names::BACKEND_STATS,
];

/// Entries (by walking the keys) and capacity of the hash map pinned as `name`.
fn fill_level(dir: &Path, name: &str) -> Result<(u64, u64), String> {
    let err = |e: aya::maps::MapError| format!("counting entries of {name}: {e}");
    let data = MapData::from_pin(dir.join(name)).map_err(err)?;
    let info = data.info().map_err(err)?;
    let entries = count_keys(&data, info.key_size() as usize)
        .map_err(|e| format!("counting entries of {name}: {e}"))?;
    Ok((entries, info.max_entries() as u64))
}

/// Walks the keys of any hash-like map with `BPF_MAP_GET_NEXT_KEY` (aya's key iterator wants the
/// value type too, which does not matter for counting).
fn count_keys(map: &MapData, key_size: usize) -> std::io::Result<u64> {
    use std::os::fd::{AsFd, AsRawFd};
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut first = true;
    let mut n = 0u64;
    loop {
        let attr = Attr {
            map_fd: fd,
            _pad: 0,
            // A null key asks for the first one.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: the kernel reads `key_size` bytes from `key` (when not null) and writes
        // `key_size` bytes into `next`; both buffers have that size and outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const Attr,
                std::mem::size_of::<Attr>() as u32,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(n);
            }
            return Err(e);
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}

impl Collector for MapCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = match self.read() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(bpffs = %self.bpffs.display(), "reading the maps for /metrics: {e}");
                return Ok(());
            }
        };
        type Get = fn(&TrafficCounters) -> u64;
        let directional: [(&str, &str, Get, Get); 2] = [
            (
                "packets",
                "Packets, in: client to backend, out: replies",
                |c| c.packets_in,
                |c| c.packets_out,
            ),
            (
                "bytes",
                "Bytes (whole frames as tc sees them), in: client to backend, out: replies",
                |c| c.bytes_in,
                |c| c.bytes_out,
            ),
        ];
        for (kind, rows) in [("frontend", &view.frontends), ("backend", &view.backends)] {
            for (what, help, get_in, get_out) in directional {
                let name = format!("lb_{kind}_{what}");
                let mut m = encoder.encode_descriptor(
                    &name,
                    &format!("{help}, per {kind}"),
                    None,
                    MetricType::Counter,
                )?;
                for row in rows {
                    for (dir, get) in [("in", get_in), ("out", get_out)] {
                        let mut labels = row.labels.clone();
                        labels.push(("direction", dir.to_string()));
                        ConstCounter::new(get(&row.counters)).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            let name = format!("lb_{kind}_new_flows");
            let mut m = encoder.encode_descriptor(
                &name,
                &format!("New flows given a backend (conntrack misses), per {kind}"),
                None,
                MetricType::Counter,
            )?;
            for row in rows {
                ConstCounter::new(row.counters.new_flows).encode(m.encode_family(&row.labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "lb_drops",
            "Packets the data path dropped, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &view.drops {
            ConstCounter::new(*n).encode(m.encode_family(&[("reason", *reason)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "lb_map_entries",
            "Entries in each BPF map",
            None,
            MetricType::Gauge,
        )?;
        for (map, entries, _) in &view.fill {
            ConstGauge::new(*entries as i64).encode(m.encode_family(&[("map", *map)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "lb_map_capacity",
            "Capacity (max_entries) of each BPF map",
            None,
            MetricType::Gauge,
        )?;
        for (map, _, capacity) in &view.fill {
            ConstGauge::new(*capacity as i64).encode(m.encode_family(&[("map", *map)])?)?;
        }
        Ok(())
    }
}

/// Shared handle for the HTTP server.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend(sp: &str, backends: &[BackendAddr]) -> DesiredFrontend {
        DesiredFrontend {
            service_port: sp.into(),
            backends: backends.to_vec(),
            ..Default::default()
        }
    }

    fn backend(last: u8) -> BackendAddr {
        BackendAddr {
            addr: std::net::Ipv4Addr::new(198, 18, 0, last),
            port: 8080,
            proto: 6,
            local: false,
        }
    }

    #[test]
    fn labels_follow_frontends_coming_and_going() {
        let mut names = ServicePorts::default();
        let (b1, b2) = (backend(1), backend(2));
        let a_cluster = FrontendAddr::internal(std::net::Ipv4Addr::new(198, 19, 0, 1), 80, 6);
        let a_node = FrontendAddr::external(std::net::Ipv4Addr::new(198, 18, 0, 100), 30080, 6);
        let b_cluster = FrontendAddr::internal(std::net::Ipv4Addr::new(198, 19, 0, 2), 80, 6);
        let a = frontend("ns/a:http", &[b1, b2]);
        let b = frontend("ns/b:http", &[b1]);
        // Two frontends of ns/a (ClusterIP and NodePort) and one of ns/b share backend b1.
        names.change(a_cluster, None, Some(&a));
        names.change(a_node, None, Some(&a));
        names.change(b_cluster, None, Some(&b));
        assert_eq!(names.frontend_label(&a_node), "ns/a:http");
        assert_eq!(names.backend_label(&b1), "ns/a:http,ns/b:http");
        assert_eq!(names.backend_label(&b2), "ns/a:http");
        // A name that sorts first, on a backend that has one (b2) and one that has several (b1).
        let z_cluster = FrontendAddr::internal(std::net::Ipv4Addr::new(198, 19, 0, 3), 80, 6);
        let z = frontend("ns/0:http", &[b1, b2]);
        names.change(z_cluster, None, Some(&z));
        assert_eq!(names.backend_label(&b1), "ns/0:http,ns/a:http,ns/b:http");
        assert_eq!(names.backend_label(&b2), "ns/0:http,ns/a:http");
        names.change(z_cluster, Some(&z), None);
        assert_eq!(names.backend_label(&b2), "ns/a:http");
        // ns/a keeps b1 while one of its frontends still uses it.
        names.change(a_cluster, Some(&a), None);
        assert_eq!(names.backend_label(&b1), "ns/a:http,ns/b:http");
        assert_eq!(names.frontend_label(&a_cluster), "");
        names.change(a_node, Some(&a), Some(&frontend("ns/a:http", &[b2])));
        assert_eq!(names.backend_label(&b1), "ns/b:http");
        assert_eq!(names.backend_label(&b2), "ns/a:http");
        names.change(b_cluster, Some(&b), None);
        names.change(a_node, Some(&frontend("ns/a:http", &[b2])), None);
        assert_eq!(names.backend_label(&b1), "");
        assert!(names.backends.is_empty() && names.frontends.is_empty());
    }
}
