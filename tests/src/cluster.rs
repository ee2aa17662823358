//! A one-node cluster running the real `lb-agent`: a node namespace, a client pod, echo backend
//! pods, a private bpffs and a manifests directory the agent follows. The ClusterIP end-to-end
//! tests and `cargo xtask demo` both drive this.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{spawn_in, tcp_request, BpfFs, ChildGuard, EchoServer, Node, Pod, TestCgroup, RUN_DIR};

/// The client pod's address in [`OneNode`].
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
/// The name the agent is given with `--node-name`.
pub const NODE_NAME: &str = "node-1";

/// Finds the agent binary: `LB_AGENT_BIN` (set by `cargo xtask test`), else the workspace's
/// `target/debug/lb-agent`.
pub fn agent_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("LB_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb-agent"),
    };
    if !path.is_file() {
        bail!(
            "lb-agent binary not found at {}: run the tests through `cargo xtask test`, or build it \
             first with `cargo build -p lb-userspace` (or set LB_AGENT_BIN)",
            path.display()
        );
    }
    Ok(path)
}

/// Finds the lbctl binary: `LBCTL_BIN` (set by `cargo xtask test`), else the workspace's
/// `target/debug/lbctl`.
pub fn lbctl_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("LBCTL_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lbctl"),
    };
    if !path.is_file() {
        bail!(
            "lbctl binary not found at {}: run the tests through `cargo xtask test`, or build it \
             first with `cargo build -p lb-userspace` (or set LBCTL_BIN)",
            path.display()
        );
    }
    Ok(path)
}

/// The manifests directory; removed on drop.
pub(crate) struct ManifestsDir(pub(crate) PathBuf);

impl Drop for ManifestsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One node with an agent, a client pod and backend pods. Fields drop in order: the agent stops
/// first, then the servers, the pods, the node, and last the bpffs and the manifests.
pub struct OneNode {
    /// The running agent (its log is printed if a test panics).
    pub agent: ChildGuard,
    /// Backend pods with their servers, in the order given to [`OneNode::start`].
    pub backends: Vec<(EchoServer, Pod)>,
    /// The client pod, at [`CLIENT_IP`].
    pub client: Pod,
    /// The node namespace the agent runs in.
    pub node: Node,
    /// The agent's `--cgroup`: processes started in it (and in [`OneNode::node`]'s namespace)
    /// are host processes the socket hooks serve.
    pub host_cgroup: TestCgroup,
    /// The agent's pin directory.
    pub bpffs: BpfFs,
    manifests: ManifestsDir,
}

impl OneNode {
    /// Builds the node and pods, starts an echo server (TCP and UDP on `port`) in every backend
    /// pod, writes `manifests` and starts the agent attached to every pod interface.
    pub fn start(
        tag: &str,
        backends: &[(&str, Ipv4Addr)],
        port: u16,
        manifests: &str,
    ) -> Result<Self> {
        crate::require_root();
        let agent_bin = agent_bin()?;
        let node = Node::new(tag)?;
        let client = node.add_pod("client", CLIENT_IP)?;
        let mut pods = Vec::new();
        for (name, ip) in backends {
            let pod = node.add_pod(name, *ip)?;
            let server = EchoServer::start(&pod.ns, name, port, port)?;
            pods.push((server, pod));
        }
        let bpffs = BpfFs::new(tag)?;
        let host_cgroup = TestCgroup::new(tag)?;
        let dir = PathBuf::from(RUN_DIR).join(crate::unique_name(&format!("{tag}_m")));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let manifests_dir = ManifestsDir(dir);
        write_atomically(&manifests_dir.0, manifests)?;

        let mut cmd = Command::new(agent_bin);
        cmd.arg("--cgroup")
            .arg(host_cgroup.path())
            .arg("--manifests")
            .arg(&manifests_dir.0)
            .args(["--node-name", NODE_NAME])
            .arg("--bpffs")
            .arg(bpffs.path())
            .args(["--poll-interval-ms", "100"]);
        for iface in node.pod_ifaces() {
            cmd.args(["--iface", &iface]);
        }
        let mut agent = spawn_in(&node.ns, cmd, tag)?;
        agent
            .wait_for_log("maps programmed", Duration::from_secs(20))
            .context("waiting for the agent's first sync")?;
        Ok(Self {
            agent,
            backends: pods,
            client,
            node,
            host_cgroup,
            bpffs,
            manifests: manifests_dir,
        })
    }

    /// The directory the agent follows, for starting another agent on the same node.
    pub fn manifests_dir(&self) -> &Path {
        &self.manifests.0
    }

    /// Replaces the manifests the agent follows (atomically: the agent never reads half a file).
    pub fn write_manifests(&self, yaml: &str) -> Result<()> {
        write_atomically(&self.manifests.0, yaml)
    }

    /// Waits until a TCP request to `to` from the client is answered; the error carries the agent
    /// log, which is what explains a failure here.
    pub fn wait_for_tcp(&self, to: SocketAddrV4, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            match tcp_request(&self.client.ns, to, Duration::from_millis(500)) {
                Ok(_) => return Ok(()),
                Err(e) if start.elapsed() > timeout => {
                    bail!(
                        "{to} did not answer within {timeout:?}: {e:#}\nagent log:\n{}",
                        self.agent.logs()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

pub(crate) fn write_atomically(dir: &Path, yaml: &str) -> Result<()> {
    let tmp = dir.join(".services.yaml.tmp");
    std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("services.yaml"))
        .context("renaming the manifests file into place")
}

/// Builds the manifests of one ClusterIP Service `demo/echo` with ports `port`/TCP and `port`/UDP
/// (named `http` and `udp-echo`) whose endpoints are `backends`, all ready, on [`NODE_NAME`], each
/// serving on `target_port`.
pub fn echo_service_yaml(
    vip: Ipv4Addr,
    port: u16,
    target_port: u16,
    backends: &[Ipv4Addr],
) -> String {
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: demo}}
spec:
  clusterIP: {vip}
  ports:
  - {{name: http, port: {port}, protocol: TCP, targetPort: {target_port}}}
  - {{name: udp-echo, port: {port}, protocol: UDP, targetPort: {target_port}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: demo
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
ports:
- {{name: http, port: {target_port}, protocol: TCP}}
- {{name: udp-echo, port: {target_port}, protocol: UDP}}
endpoints:
"
    );
    for b in backends {
        yaml.push_str(&format!(
            "- {{addresses: [{b}], conditions: {{ready: true}}, nodeName: {NODE_NAME}}}\n"
        ));
    }
    yaml
}
