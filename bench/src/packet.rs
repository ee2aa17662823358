//! Per-packet cost of the kernel programs, measured with BPF_PROG_TEST_RUN on the real object at
//! several map sizes.
//!
//! The measured frontends are programmed by the agent's own writer; the filler Services are
//! written straight into the maps with the `lb_common` types (a writer run over 100k Services
//! would measure the writer, not the data path). Paths:
//! - tc new flow: a SYN to a ClusterIP with no conntrack entry. Each sample is one run
//!   (`repeat` 1) after both conntrack entries of the previous run were deleted, so every sample
//!   really takes the miss path: service lookup, backend choice, two conntrack inserts, DNAT.
//! - tc established: an ACK of that flow, `repeat` N (conntrack hit, DNAT).
//! - tc reply: the backend's answer, `repeat` N (reply conntrack hit, reverse NAT).
//! - tc non-service: a packet to a pod address, `repeat` N (one failed service lookup).
//! - XDP NodePort to a remote backend, new flow (as above, one run per sample with conntrack
//!   cleared, which also frees the SNAT port) and established (`repeat` N): service lookup, SNAT
//!   port allocation, DNAT+SNAT, FIB lookup, XDP_TX.
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
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
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
        "Per-packet: BPF_PROG_TEST_RUN on the real object; established/reply/non-service paths \
         with repeat={}, new-flow paths as {} single runs each with the flow's conntrack entries \
         deleted before it (so every sample is a conntrack miss); figure = kernel-reported \
         duration per run, median over samples (repeat paths: {} runs of repeat each).",
        plan.packet_repeat, plan.packet_new_flow_samples, REPEAT_SAMPLES
    ));
    let uplink = Uplink::new()?;
    for &n in &plan.packet_scales {
        eprintln!("lb-bench: packet: {n} services");
        let mut bed = Bed::new(n)?;
        let group = |path: &str| format!("per-packet {path}, {n} services");
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

        let samples = bed.single_runs(plan.packet_new_flow_samples, |bed| bed.run_tc(&syn, 1))?;
        results
            .figure(&group("tc new flow (ClusterIP SYN)"), "lb", "ns/packet", false)
            .samples = samples;

        bed.clear_conntrack()?;
        bed.run_tc(&syn, 1)?;
        let s = bed.repeated(plan.packet_repeat, |bed, r| bed.run_tc(&ack, r))?;
        results
            .figure(&group("tc established flow"), "lb", "ns/packet", false)
            .samples = s;
        let s = bed.repeated(plan.packet_repeat, |bed, r| bed.run_tc(&reply, r))?;
        results
            .figure(&group("tc reply (reverse NAT)"), "lb", "ns/packet", false)
            .samples = s;
        let s = bed.repeated(plan.packet_repeat, |bed, r| bed.run_tc(&other, r))?;
        results
            .figure(&group("tc non-service packet"), "lb", "ns/packet", false)
            .samples = s;
        bed.clear_conntrack()?;

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
        let s = uplink.ns.run(|| {
            bed.single_runs(plan.packet_new_flow_samples, |bed| {
                bed.run_xdp(&np_syn, ifindex, 1)
            })
        })?;
        results
            .figure(
                &group("XDP NodePort to a remote backend, new flow"),
                "lb",
                "ns/packet",
                false,
            )
            .samples = s;
        bed.clear_conntrack()?;
        let s = uplink.ns.run(|| -> Result<Vec<f64>> {
            bed.run_xdp(&np_syn, ifindex, 1)?;
            bed.repeated(plan.packet_repeat, |bed, r| bed.run_xdp(&np_ack, ifindex, r))
        })?;
        results
            .figure(
                &group("XDP NodePort to a remote backend, established"),
                "lb",
                "ns/packet",
                false,
            )
            .samples = s;
    }
    Ok(())
}

/// Samples of a `repeat` path.
const REPEAT_SAMPLES: usize = 5;

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
            bail!("tc program returned {} (expected TC_ACT_OK)", r.return_value);
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
            bail!("XDP program returned {} (expected XDP_TX)", r.return_value);
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

    /// `samples` single runs, each after the conntrack table was emptied.
    fn single_runs(
        &mut self,
        samples: usize,
        mut run: impl FnMut(&mut Bed) -> Result<f64>,
    ) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(samples);
        for _ in 0..samples {
            self.clear_conntrack()?;
            out.push(run(self)?);
            if self.conntrack.keys().count() != 2 {
                bail!("a new-flow run did not create exactly two conntrack entries");
            }
        }
        Ok(out)
    }

    /// [`REPEAT_SAMPLES`] runs of `repeat` each; the kernel reports the mean per run.
    fn repeated(
        &mut self,
        repeat: u32,
        mut run: impl FnMut(&mut Bed, u32) -> Result<f64>,
    ) -> Result<Vec<f64>> {
        (0..REPEAT_SAMPLES).map(|_| run(self, repeat)).collect()
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
                _pad: 0,
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
