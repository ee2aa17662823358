//! Several nodes on one layer-2 fabric, with an external client: the testbed for traffic that
//! comes from outside the cluster (NodePort, LoadBalancer IPs, externalIPs).
//!
//! ```text
//!   client ns (eth0 198.18.100.10/24, routes to LB IPs / externalIPs via a node)
//!        |
//!   fabric ns: bridge br0 ---- node-1 ns (eth0 = uplink, XDP)  -- pod veths (tc) -- pods
//!                       \----- node-2 ns (eth0 = uplink, XDP)  -- pod veths (tc) -- pods
//! ```
//!
//! Every node runs its own `lb-agent` (own `--node-name`, own bpffs) on the same manifests. Nodes
//! route each other's pod ranges over the fabric; the client has no route to pods at all.
//!
//! Checksum offload: XDP sees bytes, not the skb's checksum state, and a veth sender with tx
//! checksum offload leaves a partial checksum (pseudo-header only) that a real NIC never
//! delivers. Every interface whose packets reach an uplink (the client's, the pods') therefore
//! has tx checksumming off, so the testbed behaves like a wire. The fabric ends of the uplinks
//! have GRO on: a veth only accepts XDP_TX frames when its peer can take them (NAPI).
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    cluster::{agent_bin, write_atomically, ManifestsDir},
    spawn_in, BpfFs, ChildGuard, EchoServer, Netns, Node, Pod, RUN_DIR,
};

/// The bridge namespace.
pub struct Fabric {
    /// Holds `br0` and the fabric ends of every plugged interface.
    pub ns: Netns,
    next: AtomicU32,
}

impl Fabric {
    /// A namespace with an up bridge `br0` and nothing else.
    pub fn new(tag: &str) -> Result<Fabric> {
        let ns = Netns::new(&format!("{tag}-fab"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Fabric {
            ns,
            next: AtomicU32::new(0),
        })
    }

    /// Plugs `ns` into the bridge through a veth named `iface` there, with `addr`/24.
    pub fn plug(&self, ns: &Netns, iface: &str, addr: Ipv4Addr) -> Result<()> {
        let port = format!("fp{}", self.next.fetch_add(1, Ordering::Relaxed));
        self.ns.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            iface,
            "netns",
            ns.name(),
        ])?;
        self.ns.ip(&["link", "set", &port, "master", "br0"])?;
        self.ns.ip(&["link", "set", &port, "up"])?;
        ethtool(&self.ns, &["-K", &port, "gro", "on"])?;
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", iface])?;
        ns.ip(&["link", "set", iface, "up"])?;
        ethtool(ns, &["-K", iface, "tx", "off"])?;
        Ok(())
    }
}

/// Runs ethtool in `ns`, failing with its output.
pub fn ethtool(ns: &Netns, args: &[&str]) -> Result<()> {
    let out = ns
        .cmd("ethtool")
        .args(args)
        .output()
        .context("running ethtool (installed by `cargo xtask setup`)")?;
    if !out.status.success() {
        anyhow::bail!(
            "ethtool {} in {}: {}",
            args.join(" "),
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What one node of a [`MultiNode`] bed runs.
pub struct NodeSpec<'a> {
    /// `--node-name`, and `nodeName` of its endpoints in the manifests.
    pub name: &'a str,
    /// Its uplink address on the fabric (/24).
    pub addr: Ipv4Addr,
    /// The /24 its pods live in (routed to it by the other nodes).
    pub pod_net: Ipv4Addr,
    /// Backend pods: name and IP (in `pod_net`); each runs an echo server on TCP and UDP 8080.
    pub backends: &'a [(&'a str, Ipv4Addr)],
}

/// One running node: fields drop in order, the agent first.
pub struct ClusterNode {
    /// The node's agent.
    pub agent: ChildGuard,
    /// Backend pods with their servers.
    pub backends: Vec<(EchoServer, Pod)>,
    /// The node namespace.
    pub node: Node,
    /// Its uplink address.
    pub addr: Ipv4Addr,
    /// The agent's pin directory.
    pub bpffs: BpfFs,
}

/// Nodes, an external client and the fabric between them, each node with its agent.
pub struct MultiNode {
    /// The nodes, in the order given.
    pub nodes: Vec<ClusterNode>,
    /// The external client's namespace (`eth0` on the fabric).
    pub client: Netns,
    /// The client's fabric address.
    pub client_addr: Ipv4Addr,
    /// The bridge.
    pub fabric: Fabric,
    manifests: ManifestsDir,
}

impl MultiNode {
    /// Builds the fabric, the nodes with their pods and servers, and the client at
    /// `client_addr` with `client_routes` (`ip route add` arguments, e.g. an LB IP via a node),
    /// writes `manifests` and starts one agent per node with `--uplink eth0`.
    pub fn start(
        tag: &str,
        nodes: &[NodeSpec],
        client_addr: Ipv4Addr,
        client_routes: &[&[&str]],
        manifests: &str,
    ) -> Result<MultiNode> {
        crate::require_root();
        let agent_bin = agent_bin()?;
        let fabric = Fabric::new(tag)?;
        let dir = PathBuf::from(RUN_DIR).join(crate::unique_name(&format!("{tag}_m")));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let manifests_dir = ManifestsDir(dir);
        write_atomically(&manifests_dir.0, manifests)?;

        let client = Netns::new(&format!("{tag}-client"))?;
        fabric.plug(&client, "eth0", client_addr)?;
        for route in client_routes {
            let mut args = vec!["route", "add"];
            args.extend_from_slice(route);
            client.ip(&args)?;
        }

        let mut built = Vec::new();
        for (i, spec) in nodes.iter().enumerate() {
            let node = Node::new(&format!("{tag}-n{i}"))?;
            fabric.plug(&node.ns, "eth0", spec.addr)?;
            let mut backends = Vec::new();
            for (name, ip) in spec.backends {
                let pod = node.add_pod(name, *ip)?;
                ethtool(&pod.ns, &["-K", "eth0", "tx", "off"])?;
                let server = EchoServer::start(&pod.ns, name, 8080, 8080)?;
                backends.push((server, pod));
            }
            built.push((spec, node, backends));
        }
        // Every node routes the other nodes' pod ranges over the fabric.
        for (spec, node, _) in &built {
            for other in nodes.iter().filter(|o| o.name != spec.name) {
                node.ns.ip(&[
                    "route",
                    "add",
                    &format!("{}/24", other.pod_net),
                    "via",
                    &other.addr.to_string(),
                ])?;
            }
        }
        let mut running = Vec::new();
        for (spec, node, backends) in built {
            let bpffs = BpfFs::new(&format!("{tag}-{}", spec.name))?;
            let mut cmd = Command::new(&agent_bin);
            // No host process is served in these tests: an empty cgroup keeps the socket hooks
            // away from every other process.
            cmd.arg("--cgroup")
                .arg(crate::idle_cgroup())
                .arg("--manifests")
                .arg(&manifests_dir.0)
                .args(["--node-name", spec.name])
                .arg("--bpffs")
                .arg(bpffs.path())
                .args(["--uplink", "eth0", "--poll-interval-ms", "100"]);

            for iface in node.pod_ifaces() {
                cmd.args(["--iface", &iface]);
            }
            let mut agent = spawn_in(&node.ns, cmd, &format!("{tag}-{}", spec.name))?;
            agent
                .wait_for_log("maps programmed", Duration::from_secs(20))
                .with_context(|| format!("waiting for the first sync of {}", spec.name))?;
            running.push(ClusterNode {
                agent,
                backends,
                node,
                addr: spec.addr,
                bpffs,
            });
        }
        Ok(MultiNode {
            nodes: running,
            client,
            client_addr,
            fabric,
            manifests: manifests_dir,
        })
    }

    /// The directory every agent follows, for restarting an agent on the same manifests.
    pub fn manifests_dir(&self) -> &std::path::Path {
        &self.manifests.0
    }

    /// Replaces the manifests every agent follows.
    pub fn write_manifests(&self, yaml: &str) -> Result<()> {
        write_atomically(&self.manifests.0, yaml)
    }

    /// Every agent's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.agent.logs())
            .collect::<Vec<_>>()
            .join("\n")
    }
}
