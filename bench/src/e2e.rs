//! End to end in namespaces: short TCP connections per second and UDP request/response rates
//! through a ClusterIP (from a pod on the node) and a NodePort (from an external client), for
//! lb, kube-proxy's iptables and nftables layouts, and direct to the pod addresses.
//!
//! Each contender gets its own identical testbed, built once per scale and left idle while the
//! others are measured; rounds are interleaved (lb, iptables, nftables, direct, lb, ...) so that
//! load from other processes on the machine spreads over all of them, and medians are reported.
//!
//! ```text
//!   client pod 198.18.1.10 --veth-- node ns --veth-- backend pods 198.18.2.1, 198.18.2.2
//!                                      | up0 198.19.64.1/24 (lb: XDP)
//!   external client 198.19.64.2 -------+
//! ```
use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::{fabric::ethtool, spawn_in, BpfFs, ChildGuard, EchoServer, Netns, Node, Pod};

use crate::{
    kube_proxy,
    scenario::{Scenario, NODE_NAME, PORT, TARGET_NODE_PORT, TARGET_PORT},
    Args, Plan, Results,
};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const BACKENDS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 2, 1), Ipv4Addr::new(198, 18, 2, 2)];
const NODE_UPLINK: Ipv4Addr = Ipv4Addr::new(198, 19, 64, 1);
const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 64, 2);
const NODE_UPLINK_MAC: &str = "02:00:00:00:40:01";
const EXT_CLIENT_MAC: &str = "02:00:00:00:40:02";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Lb,
    Iptables,
    Nftables,
    Direct,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Lb, Mode::Iptables, Mode::Nftables, Mode::Direct];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Lb => "lb",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Direct => "direct",
        }
    }
}

/// A directory under /run/lb-tests removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let dir = PathBuf::from(lb_tests::RUN_DIR).join(format!(
            "{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One contender's testbed. Field order is drop order: the agent stops before its namespaces go.
pub struct Bed {
    pub mode: Mode,
    pub agent: Option<ChildGuard>,
    _servers: Vec<EchoServer>,
    _backends: Vec<Pod>,
    pub client: Pod,
    pub ext: Netns,
    pub node: Node,
    _bpffs: Option<BpfFs>,
    _dir: Option<TempDir>,
}

/// How a rules load ended.
#[derive(Debug, Clone, Copy)]
pub enum Loaded {
    /// The program finished (successfully) after this long.
    Done(Duration),
    /// The program was still running at the limit and was killed: nothing was committed (both
    /// `nft -f` and `iptables-restore` commit at the end of their input).
    Stopped(Duration),
}

/// Writes `text` to a file and runs `program args... file` (nft) or `program args... < file`
/// inside `ns`; returns how long the program ran.
pub fn load_rules(ns: &Netns, program: &str, args: &[&str], text: &str) -> Result<Duration> {
    match load_rules_within(ns, program, args, text, None)? {
        Loaded::Done(d) => Ok(d),
        Loaded::Stopped(d) => bail!("{program} stopped after {:.1}s", d.as_secs_f64()),
    }
}

/// [`load_rules`], killing the program if it is still running after `limit`.
pub fn load_rules_within(
    ns: &Netns,
    program: &str,
    args: &[&str],
    text: &str,
    limit: Option<Duration>,
) -> Result<Loaded> {
    let dir = TempDir::new("bench-rules")?;
    let path = dir.0.join("rules");
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    let mut cmd = ns.cmd(program);
    cmd.args(args);
    if program == "nft" {
        cmd.arg(&path);
    } else {
        cmd.stdin(std::fs::File::open(&path)?);
    }
    let errors = dir.0.join("stderr");
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&errors)?);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("run {program} (installed by `cargo xtask setup`)"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if limit.is_some_and(|l| start.elapsed() >= l) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Loaded::Stopped(start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let took = start.elapsed();
    if !status.success() {
        bail!(
            "{program} {} failed ({status}): {}",
            args.join(" "),
            std::fs::read_to_string(&errors)
                .unwrap_or_default()
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(Loaded::Done(took))
}

/// Lines per `nft -f` transaction when a testbed is filled in pieces.
pub const NFT_LINES_PER_TRANSACTION: usize = 20_000;

/// Loads an `nft` script as consecutive transactions of at most [`NFT_LINES_PER_TRANSACTION`]
/// lines. The ruleset is the same as the single transaction's, but the kernel's cost of binding
/// each anonymous verdict map (it walks the whole pending transaction) stays bounded; see the
/// control-plane part for the single transaction kube-proxy sends.
pub fn load_nft_in_pieces(ns: &Netns, script: &str) -> Result<Duration> {
    let mut total = Duration::ZERO;
    for piece in kube_proxy::split_lines(script, NFT_LINES_PER_TRANSACTION) {
        total += load_rules(ns, "nft", &["-f"], &piece)?;
    }
    Ok(total)
}

/// Starts the agent in `node` on the manifests in `dir`; returns it once its first sync is done.
pub fn start_agent(
    agent_bin: &std::path::Path,
    node: &Node,
    dir: &std::path::Path,
    bpffs: &BpfFs,
    extra: &[&str],
    poll_ms: u64,
) -> Result<ChildGuard> {
    let mut cmd = Command::new(agent_bin);
    // The host-process socket hooks go on an idle cgroup of the test helpers, never the
    // machine's root cgroup.
    cmd.arg("--cgroup")
        .arg(lb_tests::idle_cgroup())
        .arg("--manifests")
        .arg(dir)
        .args(["--node-name", NODE_NAME])
        .arg("--bpffs")
        .arg(bpffs.path())
        .args(["--poll-interval-ms", &poll_ms.to_string()])
        .args(["--log-format", "json"])
        .args(extra);
    spawn_in(&node.ns, cmd, "bench-agent")
}

impl Bed {
    fn new(mode: Mode, scenario: &Scenario, args: &Args) -> Result<Bed> {
        let node = Node::new(&format!("bench-{}", mode.name()))?;
        let client = node.add_pod("client", CLIENT_IP)?;
        // Many short connections from one address: widen the port range. Clients close with
        // RST (SO_LINGER 0), so no TIME_WAIT piles up either.
        client
            .ns
            .sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for (i, ip) in BACKENDS.iter().enumerate() {
            let pod = node.add_pod(&format!("be-{i}"), *ip)?;
            servers.push(EchoServer::start(
                &pod.ns,
                &format!("be-{i}"),
                TARGET_PORT,
                TARGET_PORT,
            )?);
            backends.push(pod);
        }
        // The external client, on a link of its own to the node's uplink.
        let ext = Netns::new(&format!("bench-{}-ext", mode.name()))?;
        ext.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        node.ns.ip(&[
            "link",
            "add",
            "up0",
            "address",
            NODE_UPLINK_MAC,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            EXT_CLIENT_MAC,
            "netns",
            ext.name(),
        ])?;
        node.ns
            .ip(&["addr", "add", &format!("{NODE_UPLINK}/24"), "dev", "up0"])?;
        node.ns.ip(&["link", "set", "up0", "up"])?;
        ext.ip(&["addr", "add", &format!("{EXT_CLIENT}/24"), "dev", "eth0"])?;
        ext.ip(&["link", "set", "eth0", "up"])?;
        ext.ip(&["route", "add", "default", "via", &NODE_UPLINK.to_string()])?;
        node.ns.ip(&[
            "neigh",
            "replace",
            &EXT_CLIENT.to_string(),
            "lladdr",
            EXT_CLIENT_MAC,
            "dev",
            "up0",
            "nud",
            "permanent",
        ])?;
        ext.ip(&[
            "neigh",
            "replace",
            &NODE_UPLINK.to_string(),
            "lladdr",
            NODE_UPLINK_MAC,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        // XDP sees bytes: no partial checksums from the sender; and the peer of an XDP
        // interface needs GRO (NAPI) to take XDP_TX frames.
        ethtool(&ext, &["-K", "eth0", "tx", "off"])?;
        ethtool(&ext, &["-K", "eth0", "gro", "on"])?;
        node.ns.sysctl("net.ipv4.conf.up0.rp_filter", "0")?;

        let mut bed = Bed {
            mode,
            agent: None,
            _servers: servers,
            _backends: backends,
            client,
            ext,
            node,
            _bpffs: None,
            _dir: None,
        };
        let ports = scenario.ports(None);
        match mode {
            Mode::Lb => {
                let dir = TempDir::new("bench-manifests")?;
                for (name, yaml) in scenario.manifest_files() {
                    std::fs::write(dir.0.join(name), yaml)?;
                }
                let bpffs = BpfFs::new("bench-e2e")?;
                let mut extra: Vec<String> = vec!["--uplink".into(), "up0".into()];
                for iface in bed.node.pod_ifaces() {
                    extra.push("--iface".into());
                    extra.push(iface);
                }
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                let mut agent =
                    start_agent(&args.agent_bin, &bed.node, &dir.0, &bpffs, &extra, 200)?;
                agent
                    .wait_for_log("maps programmed", Duration::from_secs(300))
                    .context("waiting for the agent's first sync")?;
                bed.agent = Some(agent);
                bed._bpffs = Some(bpffs);
                bed._dir = Some(dir);
            }
            Mode::Iptables => {
                let took = load_rules(
                    &bed.node.ns,
                    "iptables-restore",
                    &[],
                    &kube_proxy::iptables_rules(&ports),
                )?;
                eprintln!(
                    "lb-bench: e2e: iptables-restore of {} services took {:.1}s",
                    scenario.services,
                    took.as_secs_f64()
                );
            }
            Mode::Nftables => {
                let took = load_nft_in_pieces(&bed.node.ns, &kube_proxy::nft_rules(&ports))?;
                eprintln!(
                    "lb-bench: e2e: nft -f of {} services (in transactions of at most {NFT_LINES_PER_TRANSACTION} lines) took {:.1}s",
                    scenario.services,
                    took.as_secs_f64()
                );
            }
            Mode::Direct => {}
        }
        Ok(bed)
    }

    /// Where the ClusterIP test's client thread `t` connects.
    fn cluster_target(&self, scenario: &Scenario, t: usize) -> SocketAddrV4 {
        match self.mode {
            Mode::Direct => SocketAddrV4::new(BACKENDS[t % BACKENDS.len()], TARGET_PORT),
            _ => SocketAddrV4::new(scenario.target_cluster_ip(), PORT),
        }
    }

    fn node_port_target(&self, t: usize) -> SocketAddrV4 {
        match self.mode {
            Mode::Direct => SocketAddrV4::new(BACKENDS[t % BACKENDS.len()], TARGET_PORT),
            _ => SocketAddrV4::new(NODE_UPLINK, TARGET_NODE_PORT),
        }
    }
}

/// The four measurements of one contender.
#[derive(Clone, Copy)]
enum Test {
    ClusterTcp,
    ClusterUdp,
    NodePortTcp,
    NodePortUdp,
}

impl Test {
    const ALL: [Test; 4] = [
        Test::ClusterTcp,
        Test::ClusterUdp,
        Test::NodePortTcp,
        Test::NodePortUdp,
    ];

    fn group(self, services: usize) -> String {
        let what = match self {
            Test::ClusterTcp => "ClusterIP TCP connections/s",
            Test::ClusterUdp => "ClusterIP UDP request/responses/s",
            Test::NodePortTcp => "NodePort TCP connections/s",
            Test::NodePortUdp => "NodePort UDP request/responses/s",
        };
        format!("e2e {what}, {services} services")
    }
}

pub fn run(args: &Args, plan: &Plan, results: &mut Results) -> Result<()> {
    results.notes.push(format!(
        "End to end: {} client threads for {} ms per measurement, {} interleaved round(s). TCP: \
         connect, read the backend's one-line greeting, close with RST (SO_LINGER 0, so no \
         TIME_WAIT); each connection is a new flow. UDP: each thread sends a 64-byte datagram on \
         its own connected socket and waits for the answer (one flow per thread; lost answers \
         time out after 200 ms and are not counted). Backends: 2 echo pods (a thread per \
         connection). The target Service sits at index n/2 of the {} Services (the middle of \
         iptables' KUBE-SERVICES chain); the filler Services have 1 endpoint each. Direct: the \
         client threads go to the two pod addresses in turn. The nftables testbeds are loaded in \
         transactions of at most {NFT_LINES_PER_TRANSACTION} lines, which leaves the same table \
         as one transaction but keeps the kernel's cost of the load linear (see the control \
         plane's nftables note).",
        plan.e2e_threads,
        plan.duration_ms,
        plan.rounds,
        plan.e2e_scales
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("/")
    ));
    let duration = Duration::from_millis(plan.duration_ms);
    for &n in &plan.e2e_scales {
        let scenario = Scenario {
            services: n,
            endpoints_per_service: 1,
            target_endpoints: BACKENDS.to_vec(),
        };
        eprintln!("lb-bench: e2e: building 4 testbeds with {n} services");
        let mut beds = Vec::new();
        for mode in Mode::ALL {
            let t = Instant::now();
            beds.push(Bed::new(mode, &scenario, args).with_context(|| {
                format!("building the {} testbed with {n} services", mode.name())
            })?);
            eprintln!(
                "lb-bench: e2e: {} testbed ready in {:.1}s",
                mode.name(),
                t.elapsed().as_secs_f64()
            );
        }
        // Warm-up: every path once, which also checks that each contender really serves.
        for bed in &beds {
            for test in Test::ALL {
                let r = measure(bed, &scenario, test, 1, Duration::from_millis(200));
                if r.ok == 0 {
                    bail!(
                        "{} does not serve {}: {} errors, last: {}{}",
                        bed.mode.name(),
                        test.group(n),
                        r.errors,
                        r.last_error.unwrap_or_default(),
                        bed.agent
                            .as_ref()
                            .map(|a| format!("\nagent log:\n{}", a.logs()))
                            .unwrap_or_default()
                    );
                }
            }
        }
        for round in 0..plan.rounds {
            for bed in &beds {
                for test in Test::ALL {
                    let r = measure(bed, &scenario, test, plan.e2e_threads, duration);
                    let rate = r.ok as f64 / r.elapsed.as_secs_f64();
                    eprintln!(
                        "lb-bench: e2e: round {round} {} {}: {rate:.0}/s ({} errors)",
                        bed.mode.name(),
                        test.group(n),
                        r.errors
                    );
                    let fig = results.figure(&test.group(n), bed.mode.name(), "per s", true);
                    fig.samples.push(rate);
                    if r.errors > 0 {
                        let total: u64 = r.errors
                            + fig
                                .note
                                .as_deref()
                                .and_then(|n| n.split(' ').next()?.parse().ok())
                                .unwrap_or(0);
                        fig.note = Some(format!("{total} failed requests over all rounds"));
                    }
                }
            }
        }
    }
    Ok(())
}

struct Measured {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    last_error: Option<String>,
}

fn measure(bed: &Bed, scenario: &Scenario, test: Test, threads: usize, d: Duration) -> Measured {
    let ns = match test {
        Test::ClusterTcp | Test::ClusterUdp => &bed.client.ns,
        Test::NodePortTcp | Test::NodePortUdp => &bed.ext,
    };
    let targets: Vec<SocketAddrV4> = (0..threads)
        .map(|t| match test {
            Test::ClusterTcp | Test::ClusterUdp => bed.cluster_target(scenario, t),
            Test::NodePortTcp | Test::NodePortUdp => bed.node_port_target(t),
        })
        .collect();
    let tcp = matches!(test, Test::ClusterTcp | Test::NodePortTcp);
    ns.run(|| {
        let stop = AtomicBool::new(false);
        let start = Instant::now();
        let outcomes: Vec<(u64, u64, Option<String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = targets
                .iter()
                .map(|&to| {
                    let stop = &stop;
                    s.spawn(move || {
                        if tcp {
                            tcp_loop(to, stop)
                        } else {
                            udp_loop(to, stop)
                        }
                    })
                })
                .collect();
            std::thread::sleep(d);
            stop.store(true, Ordering::Relaxed);
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or((0, 1, Some("client thread panicked".into())))
                })
                .collect()
        });
        let elapsed = start.elapsed();
        Measured {
            ok: outcomes.iter().map(|o| o.0).sum(),
            errors: outcomes.iter().map(|o| o.1).sum(),
            elapsed,
            last_error: outcomes.into_iter().filter_map(|o| o.2).next_back(),
        }
    })
}

const TIMEOUT: Duration = Duration::from_millis(1000);

/// Connections until `stop`: (completed, failed, last error).
fn tcp_loop(to: SocketAddrV4, stop: &AtomicBool) -> (u64, u64, Option<String>) {
    let (mut ok, mut failed, mut last) = (0, 0, None);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        let result = (|| -> std::io::Result<()> {
            let stream = TcpStream::connect_timeout(&to.into(), TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            set_linger_zero(&stream)?;
            let mut reader = BufReader::new(&stream);
            line.clear();
            reader.read_line(&mut line)?;
            if !line.ends_with('\n') {
                return Err(std::io::Error::other(
                    "connection closed before the greeting",
                ));
            }
            Ok(())
        })();
        match result {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                last = Some(format!("TCP {to}: {e}"));
            }
        }
    }
    (ok, failed, last)
}

fn set_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a pointer to a live linger struct and its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Request/responses on one connected socket until `stop`.
fn udp_loop(to: SocketAddrV4, stop: &AtomicBool) -> (u64, u64, Option<String>) {
    let (mut ok, mut failed, mut last) = (0, 0, None);
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.connect(to).map(|_| s))
        .and_then(|s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .map(|_| s)
        }) {
        Ok(s) => s,
        Err(e) => return (0, 1, Some(format!("UDP socket to {to}: {e}"))),
    };
    let payload = [b'x'; 64];
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let r = socket.send(&payload).and_then(|_| socket.recv(&mut buf));
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                last = Some(format!("UDP {to}: {e}"));
            }
        }
    }
    (ok, failed, last)
}
