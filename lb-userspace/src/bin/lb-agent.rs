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
use clap::{Parser, ValueEnum};
use lb_userspace::{
    dataplane::{self, bpf::BpfMaps, Writer},
    loader, model,
    sources::manifests::{self, DirWatcher},
};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF Service load balancer: node agent (kube-proxy replacement)"
)]
struct Args {
    /// Read Services and EndpointSlices from YAML files in DIR and follow changes (no cluster needed).
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Watch a cluster through this kubeconfig (default: in-cluster config, then KUBECONFIG).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// This node's name; decides which endpoints are local. Default: the host name.
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// Where maps (and later programs and links) are pinned. A bpffs is mounted there if the
    /// directory is not on one already.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Interface to attach the pod-side tc program to (repeatable). Default: every veth.
    #[arg(long = "iface", value_name = "IF")]
    ifaces: Vec<String>,
    /// cgroup v2 directory for the host-process socket hooks (default: the cgroup2 root).
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// Restrict NodePort addresses to these CIDRs (default: all local addresses).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// Serve only objects whose service.kubernetes.io/service-proxy-name label is NAME.
    #[arg(long, value_name = "NAME")]
    service_proxy_name: Option<String>,
    /// Conntrack table capacity (entries; two per flow). Applies when the map is first created.
    #[arg(long, default_value_t = lb_common::map_sizes::CONNTRACK)]
    conntrack_size: u32,
    /// How often the manifests directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    let Some(manifests_dir) = args.manifests.clone() else {
        bail!(
            "no source given: the Kubernetes API source (--kubeconfig / in-cluster) is not implemented yet; \
             pass --manifests DIR"
        );
    };
    if args.kubeconfig.is_some() {
        bail!(
            "--kubeconfig: the Kubernetes API source is not implemented yet; use --manifests DIR"
        );
    }
    if let Some(cgroup) = &args.cgroup {
        warn!(cgroup = %cgroup.display(), "--cgroup given, but host-process socket hooks are not implemented yet: host processes are not load-balanced");
    }
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

    let mounted = loader::ensure_bpffs(&args.bpffs)?;
    info!(bpffs = %args.bpffs.display(), mounted, "pin directory ready");
    let mut ebpf = loader::load(&loader::LoadOptions {
        bpffs: args.bpffs.clone(),
        conntrack_size: args.conntrack_size,
    })?;
    let ifaces = if args.ifaces.is_empty() {
        let found = loader::detect_pod_interfaces();
        info!(?found, "no --iface given: attaching to every veth");
        found
    } else {
        args.ifaces.clone()
    };
    for iface in &ifaces {
        loader::attach_tc(&mut ebpf, iface)?;
        info!(iface, "attached tc ingress program");
    }
    let mut maps = BpfMaps::from_ebpf(&mut ebpf)?;
    let mut writer = Writer::adopt(&maps)?;
    info!(
        frontends = writer.frontend_count(),
        backends = writer.backend_count(),
        "adopted existing map state"
    );

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let node_addresses = local_addresses().context("listing this node's addresses")?;
    info!(
        ?node_addresses,
        "node addresses (NodePort frontends and allowed LB sources)"
    );
    warn!("NodePort, LoadBalancer and externalIP frontends are computed but not served yet: only ClusterIP traffic from pods is load-balanced");
    let config = model::Config {
        node_name: node_name.clone(),
        node_addresses,
        nodeport_cidrs,
        service_proxy_name: args.service_proxy_name.clone(),
        zone: None,
    };
    info!(node = %node_name, manifests = %manifests_dir.display(), "following manifests");
    let mut watcher = DirWatcher::new(&manifests_dir);
    let poll = Duration::from_millis(args.poll_interval_ms);
    while !stop.load(Ordering::Relaxed) {
        match watcher.changed() {
            Ok(true) => sync(&manifests_dir, &config, &mut writer, &mut maps),
            Ok(false) => {}
            // A vanished directory keeps the last programmed state: never flush on a read error.
            Err(e) => warn!("{e}; keeping the current state"),
        }
        std::thread::sleep(poll);
    }
    info!("stopping: detaching programs; maps stay pinned so established flows survive a restart");
    drop(ebpf);
    Ok(())
}

fn sync(dir: &std::path::Path, config: &model::Config, writer: &mut Writer, maps: &mut BpfMaps) {
    let started = Instant::now();
    let (objects, doc_warnings) = match manifests::load_dir(dir) {
        Ok(x) => x,
        Err(e) => {
            warn!("{e}; keeping the current state");
            return;
        }
    };
    for w in &doc_warnings {
        warn!("manifest {w}");
    }
    let (model, warnings) = model::build(&objects, config);
    for w in &warnings {
        warn!("{w}");
    }
    let desired = dataplane::desired(&model);
    match writer.apply(maps, &desired) {
        Ok(stats) => info!(
            services = objects.services.len(),
            slices = objects.endpoint_slices.len(),
            service_ports = model.service_ports.len(),
            frontends = desired.len(),
            changed = stats.frontends_changed,
            removed = stats.frontends_removed,
            backends_added = stats.backends_added,
            backends_removed = stats.backends_removed,
            elapsed_us = started.elapsed().as_micros() as u64,
            "maps programmed"
        ),
        Err(e) => error!("programming maps failed: {e}; will retry on the next change"),
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
