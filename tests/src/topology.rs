//! A node namespace routing between pod namespaces, wired like a Calico-style CNI: every pod
//! has a /32 on `eth0` and a default route to a link-local-style gateway answered by the node.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::Netns;

/// The pods' default gateway. It is a local address on the node's `lo`, so the node answers
/// ARP for it at once on every pod veth (see [`Node::new`]).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// The test address block, 198.18.0.0/15 (RFC 2544 benchmarking): nothing real uses it.
const BLOCK: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);

/// A node: a namespace that forwards between its pods' veths (ip_forward on, rp_filter off).
/// Nothing is configured in the root namespace and there is no route out.
#[derive(Debug)]
pub struct Node {
    /// The node's namespace, where the host sides of the pod veths live.
    pub ns: Netns,
    next_iface: AtomicU32,
    ifaces: Mutex<Vec<String>>,
}

/// A pod: a namespace with `eth0` (its IP as a /32) whose peer is `host_iface` in the node.
#[derive(Debug)]
pub struct Pod {
    /// The pod's namespace; dropping the pod deletes it and the veth pair.
    pub ns: Netns,
    /// The pod IP, on `eth0`.
    pub ip: Ipv4Addr,
    /// The name given to [`Node::add_pod`].
    pub name: String,
    /// Name of the host-side veth in the node namespace (`lbh<N>`), where programs attach.
    pub host_iface: String,
}

impl Node {
    /// Creates the node namespace: forwarding on, rp_filter and arp_ignore off (a new
    /// namespace inherits the root namespace's IPv4 defaults, which may be strict), and
    /// [`POD_GATEWAY`] on `lo`.
    ///
    /// Why not pure proxy ARP for the gateway: the kernel only proxies an address it has a
    /// route for through another device, and the node has no such route; even with one, the
    /// reply waits a random part of `proxy_delay` (up to 0.8 s).
    pub fn new(tag: &str) -> Result<Node> {
        let ns = Netns::new(tag)?;
        ns.sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.arp_ignore", "0"),
            ("net.ipv4.conf.default.arp_ignore", "0"),
        ])?;
        ns.ip(&["addr", "add", &format!("{POD_GATEWAY}/32"), "dev", "lo"])?;
        Ok(Node {
            ns,
            next_iface: AtomicU32::new(0),
            ifaces: Mutex::new(Vec::new()),
        })
    }

    /// Creates a pod namespace named after `name`, with `ip` (in 198.18.0.0/15) on `eth0`
    /// and a default route via [`POD_GATEWAY`], and routes `ip` to it from the node.
    pub fn add_pod(&self, name: &str, ip: Ipv4Addr) -> Result<Pod> {
        if !in_block(ip) || ip == POD_GATEWAY {
            bail!(
                "pod IP {ip} must be in {}/{} and not {POD_GATEWAY}",
                BLOCK.0,
                BLOCK.1
            );
        }
        let host_iface = format!("lbh{}", self.next_iface.fetch_add(1, Ordering::Relaxed));
        let ns = Netns::new(name)?;
        let pod = Pod {
            ns,
            ip,
            name: name.to_string(),
            host_iface,
        };
        // From here on, dropping `pod` on error removes the pod side and thus the veth pair.
        self.wire(&pod)
            .with_context(|| format!("wiring pod {name} ({ip}) to node {}", self.ns.name()))?;
        self.ifaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pod.host_iface.clone());
        Ok(pod)
    }

    /// Names of the host-side veths of the pods added so far, in creation order.
    pub fn pod_ifaces(&self) -> Vec<String> {
        self.ifaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn wire(&self, pod: &Pod) -> Result<()> {
        let host = pod.host_iface.as_str();
        let gateway = POD_GATEWAY.to_string();
        // Before the veth exists, so that eth0 is created with these defaults.
        pod.ns.sysctls(&[
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ])?;
        self.ns.ip(&[
            "link",
            "add",
            host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.ns.name(),
        ])?;
        pod.ns
            .ip(&["addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"])?;
        pod.ns.ip(&["link", "set", "eth0", "up"])?;
        pod.ns
            .ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
        pod.ns
            .ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        // proxy_arp as a CNI would set it; proxy_delay 0 so that proxied answers (for any
        // address a program routes elsewhere) are not held back.
        self.ns.sysctls(&[
            (&format!("net.ipv4.conf.{host}.proxy_arp"), "1"),
            (&format!("net.ipv4.conf.{host}.rp_filter"), "0"),
            (&format!("net.ipv4.neigh.{host}.proxy_delay"), "0"),
        ])?;
        self.ns.ip(&["link", "set", host, "up"])?;
        self.ns
            .ip(&["route", "add", &format!("{}/32", pod.ip), "dev", host])?;
        Ok(())
    }
}

fn in_block(ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - BLOCK.1);
    u32::from(ip) & mask == u32::from(BLOCK.0)
}
