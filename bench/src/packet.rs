//! Per-packet cost of the kernel programs, measured with BPF_PROG_TEST_RUN on the real object at
//! several map sizes.
//!
//! The measured frontends are programmed by the agent's own writer; the filler Services are
//! written straight into the maps with the `lb_common` types (a writer run over 100k Services
//! would measure the writer, not the data path). Paths:
//! - tc new flow: a SYN to a ClusterIP with no conntrack entry. Each sample is one run
//!   (`repeat` 1) after both conntrack entries of the previous run were deleted, so every sample
//!   really takes the miss path: service lookup, backend choice, two conntrack inserts, DNAT.
//! - tc established: an ACK of that flow (conntrack hit, DNAT).
//! - tc reply: the backend's answer (reply conntrack hit, reverse NAT).
//! - tc non-service: a packet to a pod address (one failed service lookup).
//! - XDP NodePort to a remote backend, new flow (as above, conntrack cleared before each run,
//!   which also frees the SNAT port: service lookup, SNAT port allocation, DNAT+SNAT, FIB
//!   lookup, XDP_TX) and established (conntrack hit, DNAT+SNAT, FIB lookup, XDP_TX).
//!
//! Every sample is one run (`repeat` 1) and the figure is the median of the kernel-measured run
//! times. `repeat` N is not used: the kernel runs the program N times on the same buffer without
//! restoring it, so every run after the first would see the already translated packet and
//! measure another path.
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions},
    Ebpf,
};
use etherparse::PacketBuilder;
use lb_common::{
    ipv4_to_net, map_names, port_to_net, proto,
    service::{SCOPE_INTERNAL, SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_FE, SVC_FLAG_MASQUERADE},
    BackendValue, CtKey, CtValue, RevNatValue, ServiceKey, ServiceValue,
};
use lb_tests::{BpfFs, Netns};
use lb_userspace::{
    dataplane::{bpf::BpfMaps, BackendAddr, Desired, DesiredFrontend, FrontendAddr, Writer},
    loader,
};

use crate::{Args, Plan, Results};

const TC_ACT_OK: u32 = 0;
const XDP_TX: u32 = 3;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
/// Above the filler addresses (198.18.3.248 and up), so no filler replaces it.
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 250);
const BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// The uplink namespace of the XDP runs (as in the XDP fixtures).
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const EXT_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);
const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const NODE_PORT: u16 = 30080;
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x64, 0x01];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x64, 0x02];
const EXT_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x64, 0x0a];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub fn run(_args: &Args, plan: &Plan, results: &mut Results) -> Result<()> {
    results.notes.push(format!(
        "Per-packet: BPF_PROG_TEST_RUN of the real object, {} single runs (repeat 1) per path \
         and size, median of the kernel-measured run time. The sizes are loaded side by side \
         and sampled in turn (1, 1k, 10k, 100k, 1, ...), so machine noise hits them alike. \
         New-flow samples each start with the flow's conntrack entries deleted, so every one \
         is a conntrack miss. repeat N is not used because the kernel reruns the program on \
         the already translated buffer. A single run's time includes the kernel's timer reads \
         around it (a constant of some tens of ns).",
        plan.packet_samples
    ));
    let uplink = Uplink::new()?;
    let mut beds = Vec::new();
    for &n in &plan.packet_scales {
        eprintln!("lb-bench: packet: loading the maps with {n} services");
        beds.push((n, Bed::new(n)?));
    }
    let syn = tcp(
        (CLIENT_MAC, NODE_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        true,
        false,
    );
    let ack = tcp(
        (CLIENT_MAC, NODE_MAC),
        (CLIENT, 40000),
        (VIP, 80),
        false,
        true,
    );
    let reply = tcp(
        (NODE_MAC, CLIENT_MAC),
        (BACKEND, 8080),
        (CLIENT, 40000),
        false,
        true,
    );
    let other = tcp(
        (CLIENT_MAC, NODE_MAC),
        (CLIENT, 40000),
        (BACKEND, 8080),
        true,
        false,
    );
    let np_syn = tcp(
        (EXT_CLIENT_MAC, UPLINK_MAC),
        (EXT_CLIENT, 40000),
        (NODE, NODE_PORT),
        true,
        false,
    );
    let np_ack = tcp(
        (EXT_CLIENT_MAC, UPLINK_MAC),
        (EXT_CLIENT, 40000),
        (NODE, NODE_PORT),
        false,
        true,
    );
    let ifindex = uplink.ifindex;
    type Setup<'a> = &'a (dyn Fn(&mut Bed) -> Result<()> + Sync);
    type Sample<'a> = &'a (dyn Fn(&mut Bed) -> Result<f64> + Sync);
    let no_setup: Setup = &|_| Ok(());
    let open_tc_flow: Setup = &|bed| bed.run_tc(&syn, 1).map(drop);
    let open_xdp_flow: Setup = &|bed| bed.run_xdp(&np_syn, ifindex, 1).map(drop);
    let paths: [(&str, bool, Setup, Sample); 6] = [
        ("tc new flow (ClusterIP SYN)", true, no_setup, &|bed| {
            bed.run_tc(&syn, 1)
        }),
        ("tc established flow", false, open_tc_flow, &|bed| {
            bed.run_tc(&ack, 1)
        }),
        ("tc reply (reverse NAT)", false, open_tc_flow, &|bed| {
            bed.run_tc(&reply, 1)
        }),
        ("tc non-service packet", false, no_setup, &|bed| {
            bed.run_tc(&other, 1)
        }),
        (
            "XDP NodePort to a remote backend, new flow",
            true,
            no_setup,
            &|bed| bed.run_xdp(&np_syn, ifindex, 1),
        ),
        (
            "XDP NodePort to a remote backend, established",
            false,
            open_xdp_flow,
            &|bed| bed.run_xdp(&np_ack, ifindex, 1),
        ),
    ];
    for (path, new_flow, setup, sample) in paths {
        eprintln!("lb-bench: packet: {path}");
        // XDP runs look up routes in the uplink's namespace: everything runs there.
        let samples = uplink.ns.run(|| -> Result<Vec<Vec<f64>>> {
            let mut samples = vec![Vec::with_capacity(plan.packet_samples); beds.len()];
            for (_, bed) in beds.iter_mut() {
                bed.clear_conntrack()?;
                setup(bed)?;
            }
            for _ in 0..plan.packet_samples {
                for (i, (_, bed)) in beds.iter_mut().enumerate() {
                    if new_flow {
                        bed.clear_conntrack()?;
                    }
                    samples[i].push(sample(bed)?);
                    if new_flow && bed.conntrack.keys().count() != 2 {
                        bail!("a new-flow run did not create exactly two conntrack entries");
                    }
                }
            }
            Ok(samples)
        })?;
        for ((n, _), s) in beds.iter().zip(samples) {
            results
                .figure(
                    &format!("per-packet {path}, {n} services"),
                    "lb",
                    "ns/packet",
                    false,
                )
                .samples = s;
        }
    }
    Ok(())
}

/// The real object loaded with fresh maps holding `n` Services.
struct Bed {
    ebpf: Ebpf,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    // Dropped last: unmounts the pins.
    _bpffs: BpfFs,
}

impl Bed {
    fn new(n: usize) -> Result<Bed> {
        let bpffs = BpfFs::new("bench-pkt")?;
        let mut ebpf = loader::load(&loader::LoadOptions {
            bpffs: bpffs.path().to_path_buf(),
            conntrack_size: 65_536,
            reject_limit: loader::RejectLimit::default(),
            maglev_table_size: lb_common::maglev::DEFAULT_TABLE_SIZE,
        })
        .context("load the eBPF object")?;
        let mut maps = BpfMaps::from_ebpf(&mut ebpf)?;
        let mut writer = Writer::adopt(&maps)?;
        let mut desired = Desired::new();
        desired.insert(
            FrontendAddr::internal(VIP, 80, proto::TCP),
            DesiredFrontend {
                service_port: "bench/target:tcp".into(),
                backends: vec![BackendAddr {
                    addr: BACKEND,
                    port: 8080,
                    proto: proto::TCP,
                    local: true,
                }],
                flags: SVC_FLAG_CLUSTER_IP,
                ..Default::default()
            },
        );
        desired.insert(
            FrontendAddr::external(NODE, NODE_PORT, proto::TCP),
            DesiredFrontend {
                service_port: "bench/target-np:tcp".into(),
                backends: vec![BackendAddr {
                    addr: REMOTE_BACKEND,
                    port: 8080,
                    proto: proto::TCP,
                    local: false,
                }],
                flags: SVC_FLAG_EXTERNAL_FE | SVC_FLAG_MASQUERADE,
                ..Default::default()
            },
        );
        writer.apply(&mut maps, &desired)?;
        fill(&mut maps, n.saturating_sub(1))?;
        let ct = MapData::from_pin(bpffs.path().join(map_names::CONNTRACK))?;
        let conntrack = HashMap::try_from(Map::LruHashMap(ct))?;
        Ok(Bed {
            ebpf,
            conntrack,
            _bpffs: bpffs,
        })
    }

    fn run_tc(&mut self, input: &[u8], repeat: u32) -> Result<f64> {
        let prog = loader::tc_program(&mut self.ebpf)?;
        let mut out = vec![0u8; input.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })?;
        if r.return_value != TC_ACT_OK {
            bail!(
                "tc program returned {} (expected TC_ACT_OK)",
                r.return_value
            );
        }
        Ok(r.duration.as_nanos() as f64)
    }

    fn run_xdp(&mut self, input: &[u8], ifindex: u32, repeat: u32) -> Result<f64> {
        let prog = loader::xdp_program(&mut self.ebpf)?;
        let mut out = vec![0u8; input.len() + 256];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(input.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let r = prog.test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })?;
        if r.return_value != XDP_TX {
            let entries = self.conntrack.keys().count();
            bail!(
                "XDP program returned {} (expected XDP_TX); {entries} conntrack entries; output {:02x?}",
                r.return_value,
                &out[..r.data_size_out as usize]
            );
        }
        Ok(r.duration.as_nanos() as f64)
    }

    fn clear_conntrack(&mut self) -> Result<()> {
        let keys: Vec<CtKey> = self.conntrack.keys().collect::<Result<_, _>>()?;
        for k in keys {
            self.conntrack.remove(&k)?;
        }
        Ok(())
    }
}

/// `n` filler ClusterIP Services with one backend each, written directly into the maps; ids
/// above the writer's (which start at 1).
fn fill(maps: &mut BpfMaps, n: usize) -> Result<()> {
    const FIRST_ID: u32 = 1_000;
    for i in 0..n {
        let addr = ipv4_to_net(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(198, 18, 0, 16)) + i as u32 + 1_000,
        ));
        if addr == ipv4_to_net(VIP) {
            bail!("filler Service {i} would take the measured ClusterIP {VIP}");
        }
        let backend_id = FIRST_ID + i as u32;
        let rev_nat_id = (FIRST_ID as usize + i % 60_000) as u16;
        maps.backends.insert(
            backend_id,
            BackendValue {
                addr: ipv4_to_net(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(198, 18, 64, 0)) + (i % 49_152) as u32,
                )),
                port: port_to_net(8080),
                proto: proto::TCP,
                flags: 0,
            },
            0,
        )?;
        if i < 60_000 {
            maps.rev_nat.insert(
                rev_nat_id,
                RevNatValue {
                    addr,
                    port: port_to_net(80),
                    _pad: 0,
                },
                0,
            )?;
        }
        maps.services.insert(
            ServiceKey::new(addr, port_to_net(80), proto::TCP, SCOPE_INTERNAL, 0),
            ServiceValue {
                backend_id: 0,
                count: 1,
                rev_nat_id,
                flags: SVC_FLAG_CLUSTER_IP,
                affinity_group: 0,
                affinity_timeout: 0,
            },
            0,
        )?;
        maps.services.insert(
            ServiceKey::new(addr, port_to_net(80), proto::TCP, SCOPE_INTERNAL, 1),
            ServiceValue {
                backend_id,
                ..Default::default()
            },
            0,
        )?;
    }
    Ok(())
}

fn tcp(
    macs: ([u8; 6], [u8; 6]),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    syn: bool,
    ack: bool,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
    if syn {
        b = b.syn();
    }
    if ack {
        b = b.ack(2000);
    }
    let mut v = Vec::new();
    b.write(&mut v, &[0u8; 64])
        .expect("a packet of fixed size always builds");
    v
}

/// The namespace XDP packets "arrive" in: an uplink with the node's address, static neighbours
/// for the other node and the client, and a route to the other node's pods.
struct Uplink {
    ns: Netns,
    ifindex: u32,
}

impl Uplink {
    fn new() -> Result<Uplink> {
        let ns = Netns::new("bench-up")?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let (up, node2, client) = (mac(UPLINK_MAC), mac(NODE2_MAC), mac(EXT_CLIENT_MAC));
        for args in [
            vec!["link", "add", "up0", "type", "veth", "peer", "name", "up0p"],
            vec!["link", "set", "up0", "address", &up],
            vec!["addr", "add", "198.18.100.1/24", "dev", "up0"],
            vec!["link", "set", "up0p", "up"],
            vec!["link", "set", "up0", "up"],
            vec![
                "neigh",
                "replace",
                "198.18.100.2",
                "lladdr",
                &node2,
                "dev",
                "up0",
                "nud",
                "permanent",
            ],
            vec![
                "neigh",
                "replace",
                "198.18.100.10",
                "lladdr",
                &client,
                "dev",
                "up0",
                "nud",
                "permanent",
            ],
            vec!["route", "add", "198.18.3.0/24", "via", "198.18.100.2"],
        ] {
            ns.ip(&args)?;
        }
        let ifindex = ns
            .run(|| lb_userspace::attach::ifindex("up0"))
            .context("up0 has no ifindex")?;
        Ok(Uplink { ns, ifindex })
    }
}
