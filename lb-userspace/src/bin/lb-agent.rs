//! lb-agent: the node agent. Reads Services and EndpointSlices, computes what kube-proxy would do,
//! programs the BPF maps and keeps the programs attached.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    control::Control,
    dataplane::{bpf::BpfMaps, maglev::TableSize, Writer},
    health::{self, Health},
    loader,
    metrics::Metrics,
    model,
    service_health::{self, ServiceHealthServers},
    sock_destroy::{find_stale, move_or_destroy, SockMap},
    sources::{
        feed::{Feed, Snapshot},
        kube,
    },
    upgrade::{self, Upgrade},
};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF Service load balancer: node agent (kube-proxy replacement)",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// Without a command, the agent runs with the flags below.
    #[command(subcommand)]
    command: Option<Command>,
    /// Read Services and EndpointSlices from YAML files in DIR and follow changes (no cluster needed).
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Watch a cluster through this kubeconfig (default: in-cluster config, then KUBECONFIG).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// This node's name; decides which endpoints are local. Default: the host name.
    #[arg(long, value_name = "NAME", env = "LB_NODE_NAME")]
    node_name: Option<String>,
    /// Where maps (and later programs and links) are pinned. A bpffs is mounted there if the
    /// directory is not on one already.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Interface to attach the pod-side tc program to (repeatable), besides the pod interfaces
    /// --attach-mode and --pod-iface-pattern select.
    #[arg(long = "iface", value_name = "IF")]
    ifaces: Vec<String>,
    #[command(flatten)]
    attach: lb_userspace::pod_interfaces::AttachArgs,
    /// The node's external interface (repeatable): the XDP program there serves NodePort,
    /// LoadBalancer and externalIP traffic from outside the node. Default: the interfaces that
    /// carry an IPv4 default route.
    #[arg(
        long = "uplink",
        value_name = "IF",
        value_delimiter = ',',
        env = "LB_UPLINKS"
    )]
    uplinks: Vec<String>,
    /// XDP mode on the uplinks: `auto` (native, generic when the driver has no native XDP),
    /// `native` or `generic`.
    #[arg(long, value_enum, default_value_t = lb_userspace::uplink::XdpModeArg::Auto, env = "LB_XDP_MODE")]
    xdp_mode: lb_userspace::uplink::XdpModeArg,
    /// cgroup v2 directory for the host-process socket hooks: processes in it and below reach
    /// ClusterIPs and NodePorts through socket-address translation (default: the cgroup2 root,
    /// found in /proc/self/mounts).
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// Restrict NodePort addresses to these CIDRs (default: all local addresses).
    #[arg(
        long,
        value_name = "CIDR,...",
        value_delimiter = ',',
        env = "LB_NODEPORT_ADDRESSES"
    )]
    nodeport_addresses: Vec<String>,
    /// Serve only objects whose service.kubernetes.io/service-proxy-name label is NAME.
    #[arg(long, value_name = "NAME", env = "LB_SERVICE_PROXY_NAME")]
    service_proxy_name: Option<String>,
    /// Conntrack table capacity (entries; two per flow). Applies when the map is first created.
    #[arg(long, default_value_t = lb_common::map_sizes::CONNTRACK, env = "LB_CONNTRACK_SIZE")]
    conntrack_size: u32,
    /// How often expired conntrack entries are deleted, in seconds (0: never; the table is an
    /// LRU and the data path ignores expired entries either way).
    #[arg(long, default_value_t = 30, env = "LB_CONNTRACK_GC_INTERVAL")]
    conntrack_gc_interval: u64,
    /// Most TCP resets / ICMP port unreachables each CPU sends per second (and back to back) for
    /// new flows to Services without endpoints; past it such packets are dropped.
    #[arg(
        long,
        default_value_t = lb_common::reject::DEFAULT_REJECT_RATE,
        env = "LB_REJECT_RATE",
        value_parser = clap::value_parser!(u32).range(0..=lb_userspace::loader::RejectLimit::MAX as i64)
    )]
    reject_rate: u32,
    /// Slots per Maglev lookup table (a prime in 31..=65521). Each Maglev frontend costs about
    /// 4 bytes per slot; backends of one frontend get within about N/M of an even share.
    #[arg(long, value_name = "M", default_value_t = TableSize::default(), env = "LB_MAGLEV_TABLE_SIZE")]
    maglev_table_size: TableSize,
    /// How often the manifests directory is scanned for changed files, in milliseconds, when no
    /// inotify event woke the scan earlier (inotify wakes it as soon as a file changes).
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// Where /healthz (liveness) and /readyz (ready after the first full sync and apply) are served.
    #[arg(long, value_name = "ADDR:PORT", default_value = health::DEFAULT_BIND_ADDRESS, env = "LB_HEALTH_BIND_ADDRESS")]
    health_bind_address: std::net::SocketAddr,
    /// Also serve /metrics alone on this address (kube-proxy's is 127.0.0.1:10249). /metrics is
    /// always served on --health-bind-address as well; this adds a second listener.
    #[arg(long, value_name = "ADDR:PORT", env = "LB_METRICS_BIND_ADDRESS")]
    metrics_bind_address: Option<std::net::SocketAddr>,
    /// What happens to the data path when the agent stops. `keep` (default): programs stay
    /// attached through their pinned links and keep serving from the pinned maps, and a restarted
    /// agent adopts them, so a restart or upgrade drops nothing; required with lb-cni, whose
    /// attachments the agent cannot redo. `detach`: remove every pinned attachment and the
    /// program pin (maps stay), for dev nodes (`cargo xtask run`).
    #[arg(long, value_enum, default_value_t = OnExit::Keep, env = "LB_ON_EXIT")]
    on_exit: OnExit,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "LB_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Remove every program, link and map the agent pinned under DIR (detaching the data path),
    /// and the bpffs mount if the agent made it. Refused while an agent runs on DIR.
    Cleanup {
        /// The agent's pin directory.
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lb")]
        bpffs: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnExit {
    Keep,
    Detach,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() {
    let args = Args::parse();
    if let Some(Command::Cleanup { bpffs }) = &args.command {
        std::process::exit(cleanup(bpffs));
    }
    // Unset: info. Set but invalid: refuse, rather than silently log at another level.
    let filter = match std::env::var("LB_LOG") {
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
        Ok(directive) => match tracing_subscriber::EnvFilter::try_new(&directive) {
            Ok(f) => f,
            Err(e) => {
                eprintln!(
                    "lb-agent: LB_LOG={directive:?} is not a valid filter directive ({e}); \
                     examples: LB_LOG=debug, LB_LOG=info,lb_userspace::uplink=debug"
                );
                std::process::exit(2);
            }
        },
    };
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    if let Err(e) = run(args) {
        error!("{e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.manifests.is_some() && args.kubeconfig.is_some() {
        bail!("--manifests and --kubeconfig both given: pick one source");
    }
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => lb_userspace::cgroup_hooks::default_cgroup()?,
    };
    let nodeport_cidrs = args
        .nodeport_addresses
        .iter()
        .map(|c| {
            c.trim()
                .parse::<ipnet::IpNet>()
                .with_context(|| format!("--nodeport-addresses: {c:?} is not a CIDR"))
        })
        .collect::<Result<Vec<_>>>()?;
    let node_name = match args.node_name.clone() {
        Some(n) => n,
        None => hostname().context("--node-name not given and the host name cannot be read")?,
    };

    // The source starts first: it reads the manifests (or lists the API) on its own thread while
    // the programs load, and what it found waits in the feed until the loop takes it.
    let feed = match &args.manifests {
        Some(dir) => {
            info!(node = %node_name, manifests = %dir.display(), "following manifests");
            Feed::manifests(dir.clone(), Duration::from_millis(args.poll_interval_ms))
                .context("starting the manifests source")?
        }
        None => {
            let api = kube::api_config(args.kubeconfig.as_deref());
            info!(node = %node_name, ?api, "watching the Kubernetes API; nothing is applied before the first full sync");
            kube::start(api, kube::KubeOptions::new(node_name.clone()))?
        }
    };

    let mounted = loader::ensure_bpffs(&args.bpffs)?;
    // Held until exit: two agents on one pin directory would hand out the same ids.
    let _pin_lock = lb_userspace::pin_lock::PinDirLock::acquire(&args.bpffs)?;
    info!(bpffs = %args.bpffs.display(), mounted, "pin directory ready");
    // The layout version of what is pinned: adopt, migrate, or refuse (before anything is reused).
    let upgrade = upgrade::prepare(&args.bpffs)?;
    match &upgrade {
        Upgrade::Fresh => info!(
            version = lb_common::ABI_VERSION,
            "no pinned maps: creating them"
        ),
        Upgrade::Current => info!(version = lb_common::ABI_VERSION, "adopting the pinned maps"),
        Upgrade::FromV1 { aside } => warn!(
            from = 1,
            to = lb_common::ABI_VERSION,
            aside = %aside.display(),
            "pinned maps have layout version 1: migrating the conntrack entries to the new layout"
        ),
    }
    let mut ebpf = loader::load(&loader::LoadOptions {
        bpffs: args.bpffs.clone(),
        conntrack_size: args.conntrack_size,
        reject_limit: loader::RejectLimit::per_second(args.reject_rate),
        maglev_table_size: args.maglev_table_size.get(),
    })?;
    let copied = upgrade.before_attach(&args.bpffs)?;
    // Pinned links (shared with lb-cni), --iface, and pod interfaces as they appear.
    lb_userspace::pod_interfaces::attach(&mut ebpf, &args.bpffs, &args.ifaces, &args.attach)?;
    let uplinks = if args.uplinks.is_empty() {
        lb_userspace::uplink::detect()
    } else {
        args.uplinks.clone()
    };
    lb_userspace::uplink::attach_all(
        loader::xdp_program(&mut ebpf)?,
        &args.bpffs,
        &uplinks,
        args.xdp_mode,
    )?;
    // Host processes: socket hooks on the cgroup.
    lb_userspace::cgroup_hooks::load(&mut ebpf)?;
    lb_userspace::cgroup_hooks::attach_all(&mut ebpf, &args.bpffs, &cgroup)?;
    let late = upgrade.finish(&args.bpffs)?;
    if matches!(upgrade, Upgrade::FromV1 { .. }) {
        info!(
            copied,
            copied_after_attach = late,
            version = lb_common::ABI_VERSION,
            "conntrack migrated; the version 1 map is released"
        );
    }
    let mut maps = BpfMaps::from_ebpf(&mut ebpf)?;
    let mut sockets = SockMap::open(&args.bpffs)?;
    let writer = Writer::adopt_with_table_size(&maps, args.maglev_table_size)?;
    info!(
        frontends = writer.frontend_count(),
        backends = writer.backend_count(),
        "adopted existing map state"
    );
    let mut control = Control::new(writer);

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let local_node_addresses = local_addresses().context("listing this node's addresses")?;
    let mut config = model::Config {
        node_name: node_name.clone(),
        node_addresses: local_node_addresses.clone(),
        nodeport_cidrs,
        service_proxy_name: args.service_proxy_name.clone(),
        zone: None,
    };
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::new(args.bpffs.clone()));
    let health_addr = health::serve(
        args.health_bind_address,
        Arc::clone(&health),
        Some(Arc::clone(&metrics)),
    )?;
    info!(%health_addr, "serving /healthz, /readyz and /metrics");
    let mut hc_servers =
        ServiceHealthServers::new(std::net::Ipv4Addr::UNSPECIFIED, Arc::clone(&health));
    if let Some(addr) = args.metrics_bind_address {
        let metrics_addr = health::serve_metrics(addr, Arc::clone(&metrics))?;
        info!(%metrics_addr, "serving /metrics");
    }
    let _gc = (args.conntrack_gc_interval > 0).then(|| {
        conntrack_gc(
            args.bpffs.clone(),
            Duration::from_secs(args.conntrack_gc_interval),
            Arc::clone(&stop),
        )
    });
    // The stop flag is checked at least this often while the source is quiet.
    let tick = Duration::from_millis(200);
    // After a failed apply, when to try again (a newer snapshot tries at once).
    let mut retry_at: Option<Instant> = None;
    // The source's view of this node's addresses (the Node object) wins over interfaces.
    let mut source_node_addresses = None;
    // Syncs since the heap was last trimmed: incremental ones free memory too (replaced objects,
    // the changed file's parse), which glibc keeps unless asked to give it back.
    let mut untrimmed_syncs = false;
    while !stop.load(Ordering::Relaxed) {
        let snapshot = match feed.next(tick)? {
            Some(s) => {
                source_node_addresses = s.node_addresses.clone();
                s
            }
            // Nothing new: a retry applies everything the model holds.
            None if retry_at.is_some_and(|at| Instant::now() >= at) => Snapshot::default(),
            None => {
                // Quiet for a tick: trim now, where it costs no change any latency.
                if std::mem::take(&mut untrimmed_syncs) {
                    release_free_memory();
                }
                continue;
            }
        };
        untrimmed_syncs = true;
        config.node_addresses = source_node_addresses
            .clone()
            .unwrap_or_else(|| local_node_addresses.clone());
        if sync(
            snapshot,
            &config,
            &mut control,
            &mut maps,
            &mut sockets,
            &metrics,
            &mut hc_servers,
        ) {
            health.set_ready();
            retry_at = None;
        } else {
            retry_at = Some(Instant::now() + RETRY_AFTER);
        }
    }
    drop(feed);
    match args.on_exit {
        OnExit::Keep => info!(
            "stopping: the data path stays attached through its pinned links and maps; a restarted agent adopts it"
        ),
        OnExit::Detach => {
            let detached = detach_everything(&args.bpffs);
            info!(detached, "stopping: detached the pinned attachments (--on-exit detach); maps stay pinned");
        }
    }
    drop(ebpf);
    Ok(())
}

/// Gives the heap's free memory back to the system (every malloc arena; a few ms at 10k Services).
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `lb-agent cleanup`: prints what it removed; 0 when nothing of ours is left.
fn cleanup(bpffs: &std::path::Path) -> i32 {
    match lb_userspace::cleanup::cleanup(bpffs) {
        Ok(report) => {
            if report.not_bpffs {
                println!(
                    "{} is not on a bpffs: nothing is pinned there",
                    bpffs.display()
                );
            }
            for path in &report.removed {
                println!("removed {}", path.display());
            }
            if report.unmounted {
                println!(
                    "unmounted the bpffs the agent had mounted on {}",
                    bpffs.display()
                );
            }
            if report.left.is_empty() {
                if report.removed.is_empty() && !report.not_bpffs {
                    println!("nothing to remove under {}", bpffs.display());
                }
                0
            } else {
                for path in &report.left {
                    eprintln!("left {}: not created by lb-agent", path.display());
                }
                1
            }
        }
        Err(e) => {
            eprintln!("lb-agent cleanup: {e}");
            1
        }
    }
}

/// Sweeps expired flows out of the conntrack map every `every`, until `stop`.
fn conntrack_gc(
    bpffs: std::path::PathBuf,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut next = Instant::now() + every;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + every;
            let started = Instant::now();
            match lb_userspace::conntrack_gc::open(&bpffs)
                .and_then(|mut map| lb_userspace::conntrack_gc::sweep(&mut map))
            {
                Ok(s) => tracing::debug!(
                    scanned = s.scanned,
                    deleted = s.deleted,
                    took_ms = started.elapsed().as_millis() as u64,
                    "conntrack GC"
                ),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "conntrack GC failed; retrying at the next interval")
                }
            }
        }
    })
}

/// A failed apply is retried this long after, unless a newer snapshot arrives first.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Removes every pinned attachment and the program pin; returns how many interfaces it detached.
fn detach_everything(bpffs: &std::path::Path) -> usize {
    use lb_userspace::attach;
    let mut detached = 0;
    match attach::pinned_interfaces(bpffs) {
        Ok(ifaces) => {
            for iface in ifaces {
                match attach::detach_pinned(bpffs, &iface) {
                    Ok(true) => detached += 1,
                    Ok(false) => {}
                    Err(e) => warn!(iface, "detaching: {e}"),
                }
            }
        }
        Err(e) => warn!("listing pinned attachments: {e}"),
    }
    match lb_userspace::cgroup_hooks::detach_all(bpffs) {
        Ok(n) => detached += n,
        Err(e) => warn!("detaching the host-process socket hooks: {e}"),
    }
    match lb_userspace::uplink::detach_all(bpffs) {
        Ok(uplinks) => detached += uplinks.len(),
        Err(e) => warn!("detaching uplinks: {e}"),
    }
    for pin in [
        attach::program_pin_path(bpffs),
        attach::egress_program_pin_path(bpffs),
    ] {
        if let Err(e) = std::fs::remove_file(&pin) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(pin = %pin.display(), "removing the program pin: {e}");
            }
        }
    }
    detached
}

/// Applies one snapshot; true when the maps now hold everything the model holds.
fn sync(
    snapshot: Snapshot,
    config: &model::Config,
    control: &mut Control,
    maps: &mut BpfMaps,
    sockets: &mut SockMap,
    metrics: &Metrics,
    hc_servers: &mut ServiceHealthServers,
) -> bool {
    let started = Instant::now();
    for w in &snapshot.warnings {
        warn!("{w}");
    }
    let synced = control.sync(&snapshot.changes, config, maps);
    for w in &synced.warnings {
        warn!("{w}");
    }
    let (changed_at, objects_changed) = (snapshot.changed_at, snapshot.changes.len());
    // Dropped before the trim below: the changes' maps and names (on the first sync, one entry
    // per object) are freed memory the trim can give back.
    drop(snapshot);
    metrics.desired_changed(
        synced
            .frontend_changes
            .iter()
            .map(|(fe, (before, after))| (*fe, before.as_ref(), after.as_ref())),
    );
    // Health checks report the model (local endpoints), whatever the maps; they follow every sync.
    hc_servers.sync(&service_health::wanted(control.model()));
    // The frontend changes (on a full sync, a copy of every desired frontend) go before the trim.
    let lb_userspace::control::Synced {
        result,
        full_model,
        recomputed,
        full_apply,
        ..
    } = synced;
    if full_model {
        // A full sync (and the source's first full parse, on its threads) frees most of what it
        // allocated; give it back to the system, or the agent's RSS keeps the peak.
        release_free_memory();
    }
    match result {
        Ok(stats) => {
            let latency = changed_at.map(|t| t.elapsed());
            metrics.synced(latency.map(|l| l.as_secs_f64()));
            let store = control.incremental().store();
            info!(
                services = store.services.len(),
                slices = store.endpoint_slices.len(),
                service_ports = control.model().service_ports.len(),
                frontends = control.desired().len(),
                objects_changed,
                services_recomputed = recomputed,
                full = full_apply,
                changed = stats.frontends_changed,
                removed = stats.frontends_removed,
                backends_added = stats.backends_added,
                backends_removed = stats.backends_removed,
                elapsed_us = started.elapsed().as_micros() as u64,
                since_change_us = latency.map(|l| l.as_micros() as u64),
                "maps programmed"
            );
            if stats.frontends_changed > 0 || stats.frontends_removed > 0 {
                destroy_stale_udp_sockets(maps, sockets);
            }
            true
        }
        Err(e) => {
            metrics.sync_failed();
            error!(
                "programming maps failed: {e}; retrying everything in {RETRY_AFTER:?} or on the next change"
            );
            false
        }
    }
}

/// Connected UDP sockets of host processes whose backend went away are moved to a live backend
/// (connected again to their frontend through a duplicate of their descriptor), or destroyed when
/// that is impossible (see lb_userspace::sock_destroy; each socket is logged there). A failure is
/// logged; the next change tries again.
fn destroy_stale_udp_sockets(maps: &BpfMaps, sockets: &mut SockMap) {
    let stale = match find_stale(sockets, &maps.services, &maps.backends) {
        Ok(s) => s,
        Err(e) => {
            warn!("looking for UDP sockets of host processes whose backend went away: {e}");
            return;
        }
    };
    if stale.is_empty() {
        return;
    }
    match move_or_destroy(sockets, &maps.services, &maps.backends, &stale) {
        Ok(done) => info!(
            moved = done.moved,
            destroyed = done.destroyed,
            forgotten = done.forgotten,
            "handled UDP sockets of host processes whose backend went away"
        ),
        Err(e) => warn!("moving UDP sockets of host processes whose backend went away: {e}"),
    }
}

fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_string())
}

/// Every address configured in this network namespace except loopback and IPv6 link-local:
/// kube-proxy's default set of NodePort addresses.
fn local_addresses() -> Result<Vec<std::net::IpAddr>> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned and has not been freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            let addr = match family {
                libc::AF_INET => {
                    // SAFETY: AF_INET means the sockaddr is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))))
                }
                libc::AF_INET6 => {
                    // SAFETY: AF_INET6 means the sockaddr is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                }
                _ => None,
            };
            if let Some(a) = addr {
                let link_local_v6 =
                    matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
                if !a.is_loopback() && !link_local_v6 && !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    Ok(out)
}
