//! lb-cni as a container runtime runs it: Debian's `bridge` plugin with `host-local` IPAM creates
//! each pod's veth (inside a node namespace the test made), then `lb-cni` is called with the
//! CNI_* environment, the network configuration on stdin and bridge's result as prevResult.
//! Also the agent's own attachment (agent mode, following link events) and how the two share
//! the pinned links.
use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use lb_tests::{
    cluster::{agent_bin, echo_service_yaml, NODE_NAME},
    spawn_in, tcp_requests, BpfFs, ChildGuard, EchoServer, Netns, Node, RUN_DIR,
};
use serde_json::{json, Value};

/// Where Debian's containernetworking-plugins puts `bridge` and `host-local`.
const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
const POD_SUBNET: &str = "198.18.64.0/24";
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORT: u16 = 80;
const TARGET: u16 = 8080;
const NETWORK: &str = "lbtest";

fn require_cni_plugins() {
    lb_tests::require_root();
    for plugin in ["bridge", "host-local"] {
        let path = Path::new(CNI_PLUGIN_DIR).join(plugin);
        assert!(
            path.is_file(),
            "{} is missing: install Debian's containernetworking-plugins (`cargo xtask setup` \
             does, or `apt-get install containernetworking-plugins`)",
            path.display()
        );
    }
}

/// `LB_CNI_BIN`, else next to the agent binary (`cargo xtask test` sets LB_AGENT_BIN).
fn lb_cni_bin() -> PathBuf {
    let path = match std::env::var_os("LB_CNI_BIN") {
        Some(p) => PathBuf::from(p),
        None => agent_bin()
            .expect("the agent binary")
            .with_file_name("lb-cni"),
    };
    assert!(
        path.is_file(),
        "lb-cni binary not found at {}: build it with `cargo build -p lb-userspace` (or set \
         LB_CNI_BIN)",
        path.display()
    );
    path
}

/// A directory under RUN_DIR, named so that the testbed's stale cleanup recognises it.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> ScratchDir {
        let dir = Path::new(RUN_DIR).join(format!("{tag}-{}-0", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a plugin printed and whether it succeeded.
#[derive(Debug)]
struct PluginRun {
    success: bool,
    stdout: String,
    stderr: String,
}

impl PluginRun {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin output is not JSON ({e}): {self:?}"))
    }

    fn expect_success(self, what: &str) -> Self {
        assert!(
            self.success,
            "{what} failed; stdout: {}; stderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    /// The CNI error code of a failed run (which must print an error object).
    fn error_code(&self) -> u64 {
        assert!(!self.success, "expected a CNI error, got success: {self:?}");
        let error = self.json();
        assert!(error["msg"].is_string(), "error without msg: {error}");
        assert!(
            error["cniVersion"].is_string(),
            "error without cniVersion: {error}"
        );
        error["code"].as_u64().expect("error code")
    }
}

/// A pod network namespace plus the identity a runtime gives it.
struct CniPod {
    ns: Netns,
    container_id: String,
    ip: Option<Ipv4Addr>,
    bridge_result: Option<Value>,
}

/// A node namespace, its bpffs, the host-local lease directory and the manifests directory.
struct CniNode {
    agent: Option<ChildGuard>,
    node: Node,
    bpffs: BpfFs,
    manifests: ScratchDir,
    ipam: ScratchDir,
    tag: String,
}

impl CniNode {
    fn new(tag: &str) -> CniNode {
        require_cni_plugins();
        lb_cni_bin();
        let node = Node::new(tag).expect("node namespace");
        let bpffs = BpfFs::new(tag).expect("bpffs");
        let manifests = ScratchDir::new(&format!("{tag}_m"));
        std::fs::write(manifests.0.join("services.yaml"), "# nothing yet\n").unwrap();
        CniNode {
            agent: None,
            node,
            bpffs,
            manifests,
            ipam: ScratchDir::new(&format!("{tag}_ipam")),
            tag: tag.into(),
        }
    }

    /// Starts (or restarts) the agent with `extra` flags and waits for its first sync.
    fn start_agent(&mut self, extra: &[&str]) {
        if let Some(mut old) = self.agent.take() {
            old.stop().expect("stop the previous agent");
        }
        let mut cmd = std::process::Command::new(agent_bin().expect("agent binary"));
        cmd.arg("--cgroup")
            .arg(lb_tests::idle_cgroup())
            .arg("--manifests")
            .arg(&self.manifests.0)
            .args(["--node-name", NODE_NAME])
            .arg("--bpffs")
            .arg(self.bpffs.path())
            .args(["--poll-interval-ms", "100"])
            .args(extra);
        let mut agent = spawn_in(&self.node.ns, cmd, &self.tag).expect("spawn the agent");
        agent
            .wait_for_log("maps programmed", Duration::from_secs(20))
            .expect("the agent's first sync");
        self.agent = Some(agent);
    }

    fn write_manifests(&self, yaml: &str) {
        let tmp = self.manifests.0.join(".services.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.manifests.0.join("services.yaml")).unwrap();
    }

    fn agent_logs(&self) -> String {
        self.agent.as_ref().map(|a| a.logs()).unwrap_or_default()
    }

    fn bridge_conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam.0,
            }
        })
    }

    fn lb_cni_conf(&self, prev_result: Option<&Value>) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "lb-cni",
            "bpffs": self.bpffs.path(),
        });
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    /// Runs `plugin` inside the node namespace as a runtime does.
    fn run_plugin(
        &self,
        plugin: &Path,
        command: &str,
        pod: &CniPod,
        netns: Option<&Path>,
        stdin: &[u8],
    ) -> PluginRun {
        let mut cmd = self.node.ns.cmd(plugin);
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PLUGIN_DIR)
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=test",
            )
            .env_remove("CNI_NETNS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = netns {
            cmd.env("CNI_NETNS", netns);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", plugin.display()));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin)
            .expect("write the configuration");
        let out = child.wait_with_output().expect("wait for the plugin");
        PluginRun {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn bridge(&self, command: &str, pod: &CniPod) -> PluginRun {
        let conf = serde_json::to_vec(&self.bridge_conf()).unwrap();
        self.run_plugin(
            &Path::new(CNI_PLUGIN_DIR).join("bridge"),
            command,
            pod,
            Some(pod.ns.path()),
            &conf,
        )
    }

    fn lb_cni(&self, command: &str, pod: &CniPod) -> PluginRun {
        let conf = serde_json::to_vec(&self.lb_cni_conf(pod.bridge_result.as_ref())).unwrap();
        self.lb_cni_raw(command, pod, Some(pod.ns.path()), &conf)
    }

    fn lb_cni_raw(
        &self,
        command: &str,
        pod: &CniPod,
        netns: Option<&Path>,
        stdin: &[u8],
    ) -> PluginRun {
        self.run_plugin(&lb_cni_bin(), command, pod, netns, stdin)
    }

    /// A pod namespace wired by `bridge` (no lb-cni yet).
    fn bridged_pod(&self, name: &str) -> CniPod {
        let mut pod = CniPod {
            ns: Netns::new(name).expect("pod namespace"),
            container_id: format!("{}-{name}-{}", self.tag, std::process::id()),
            ip: None,
            bridge_result: None,
        };
        let result = self.bridge("ADD", &pod).expect_success("bridge ADD").json();
        let address = result["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("bridge result without an address: {result}"));
        pod.ip = Some(address.split('/').next().unwrap().parse().expect("pod IP"));
        pod.bridge_result = Some(result);
        pod
    }

    /// A pod wired by `bridge` then `lb-cni`, as the chained conflist does.
    fn chained_pod(&self, name: &str) -> CniPod {
        let pod = self.bridged_pod(name);
        let out = self.lb_cni("ADD", &pod).expect_success("lb-cni ADD");
        assert_eq!(
            out.json(),
            *pod.bridge_result.as_ref().unwrap(),
            "ADD must print prevResult unchanged"
        );
        pod
    }

    /// The host-side veth of a pod (from bridge's result: the interface without a sandbox
    /// whose name is not the bridge).
    fn host_iface(&self, pod: &CniPod) -> String {
        let result = pod.bridge_result.as_ref().expect("a bridged pod");
        result["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i.get("sandbox").is_none() && i["name"] != "cni0")
            .and_then(|i| i["name"].as_str())
            .unwrap_or_else(|| panic!("no host veth in {result}"))
            .to_string()
    }

    fn link_pin(&self, iface: &str) -> PathBuf {
        lb_userspace::attach::link_pin_path(self.bpffs.path(), iface)
    }

    /// How many TCX ingress programs run on `iface` in the node namespace.
    fn tcx_programs(&self, iface: &str) -> usize {
        let iface = iface.to_string();
        self.node.ns.run(move || {
            SchedClassifier::query_tcx(&iface, TcAttachType::Ingress)
                .map(|(_, programs)| programs.len())
                .unwrap_or_else(|e| panic!("query TCX programs of {iface}: {e}"))
        })
    }

    fn wait_until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}\nagent log:\n{}",
                self.agent_logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn chained_lb_cni_load_balances_pod_traffic_to_a_cluster_ip() {
    let mut bed = CniNode::new("cni-lb");
    bed.start_agent(&["--attach-mode", "cni"]);
    let client = bed.chained_pod("client");
    let backends: Vec<(CniPod, EchoServer)> = ["be-1", "be-2"]
        .iter()
        .map(|name| {
            let pod = bed.chained_pod(name);
            let server = EchoServer::start(&pod.ns, name, TARGET, TARGET).expect("echo server");
            (pod, server)
        })
        .collect();
    for pod in std::iter::once(&client).chain(backends.iter().map(|(p, _)| p)) {
        bed.lb_cni("CHECK", pod).expect_success("lb-cni CHECK");
        assert_eq!(bed.tcx_programs(&bed.host_iface(pod)), 1);
    }
    let ips: Vec<Ipv4Addr> = backends.iter().map(|(p, _)| p.ip.unwrap()).collect();
    bed.write_manifests(&echo_service_yaml(VIP, PORT, TARGET, &ips));

    let to = SocketAddrV4::new(VIP, PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb_tests::tcp_request(&client.ns, to, Duration::from_millis(500)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{to} never answered\nagent log:\n{}",
            bed.agent_logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut counts = BTreeMap::new();
    for (i, reply) in tcp_requests(&client.ns, to, 30, Duration::from_secs(2))
        .into_iter()
        .enumerate()
    {
        let reply = reply.unwrap_or_else(|e| {
            panic!(
                "request {i} failed: {e:#}\nagent log:\n{}",
                bed.agent_logs()
            )
        });
        assert_eq!(
            Some(*reply.peer.ip()),
            client.ip,
            "the client's address is kept"
        );
        *counts.entry(reply.backend).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 2, "both backends serve: {counts:?}");
}

#[test]
fn add_twice_is_idempotent_and_del_removes_the_attachment() {
    let mut bed = CniNode::new("cni-del");
    bed.start_agent(&["--attach-mode", "cni"]);
    let pod = bed.chained_pod("pod");
    let iface = bed.host_iface(&pod);
    let again = bed.lb_cni("ADD", &pod).expect_success("second lb-cni ADD");
    assert_eq!(again.json(), *pod.bridge_result.as_ref().unwrap());
    assert_eq!(bed.tcx_programs(&iface), 1, "one attachment after two ADDs");
    assert!(bed.link_pin(&iface).exists());

    let del = bed.lb_cni("DEL", &pod).expect_success("lb-cni DEL");
    assert_eq!(del.stdout.trim(), "", "DEL prints nothing");
    assert!(!bed.link_pin(&iface).exists(), "DEL removes the pin");
    // The kernel releases an unpinned link after an RCU grace period: wait, briefly.
    bed.wait_until("DEL detached", || bed.tcx_programs(&iface) == 0);
    bed.lb_cni("DEL", &pod).expect_success("a repeated DEL");

    // Everything gone: the namespace path does not exist any more.
    let gone = Path::new("/run/netns/lbt-does-not-exist");
    let conf = serde_json::to_vec(&bed.lb_cni_conf(None)).unwrap();
    bed.lb_cni_raw("DEL", &pod, Some(gone), &conf)
        .expect_success("DEL without the pod's namespace");
    bed.lb_cni_raw("DEL", &pod, None, &conf)
        .expect_success("DEL without CNI_NETNS");
}

#[test]
fn del_after_the_pod_namespace_vanished_sweeps_the_dead_pin() {
    let mut bed = CniNode::new("cni-sweep");
    bed.start_agent(&["--attach-mode", "cni"]);
    let pod = bed.chained_pod("pod");
    let iface = bed.host_iface(&pod);
    assert!(bed.link_pin(&iface).exists());
    // Stop the agent so that only lb-cni's DEL can clean up.
    bed.agent.take().unwrap().stop().unwrap();
    let CniPod {
        ns, container_id, ..
    } = pod;
    let netns_path = ns.path().to_path_buf();
    drop(ns);
    // The kernel tears a deleted namespace down asynchronously; DEL is about the state after.
    bed.wait_until(&format!("{iface} is gone from the node"), || {
        let iface = iface.clone();
        bed.node
            .ns
            .run(move || lb_userspace::attach::ifindex(&iface).is_none())
    });
    let leftover = CniPod {
        ns: Netns::new("other").unwrap(),
        container_id,
        ip: None,
        bridge_result: None,
    };
    let conf = serde_json::to_vec(&bed.lb_cni_conf(None)).unwrap();
    bed.lb_cni_raw("DEL", &leftover, Some(&netns_path), &conf)
        .expect_success("DEL of a pod whose namespace is gone");
    assert!(
        !bed.link_pin(&iface).exists(),
        "the pin of the vanished interface is swept"
    );
}

#[test]
fn check_reports_a_missing_attachment() {
    let mut bed = CniNode::new("cni-check");
    bed.start_agent(&["--attach-mode", "cni"]);
    let pod = bed.chained_pod("pod");
    bed.lb_cni("CHECK", &pod)
        .expect_success("CHECK of an attached pod");
    let iface = bed.host_iface(&pod);
    std::fs::remove_file(bed.link_pin(&iface)).expect("remove the pin");
    bed.wait_until("removing the pin detached", || {
        bed.tcx_programs(&iface) == 0
    });
    let check = bed.lb_cni("CHECK", &pod);
    assert_eq!(check.error_code(), 102, "{check:?}");
    assert!(
        check.json()["msg"].as_str().unwrap().contains(&iface),
        "{check:?}"
    );
    // ADD repairs it.
    bed.lb_cni("ADD", &pod)
        .expect_success("ADD after the pin was lost");
    bed.lb_cni("CHECK", &pod)
        .expect_success("CHECK after repair");
}

#[test]
fn malformed_config_and_missing_agent_get_cni_errors_not_crashes() {
    let bed = CniNode::new("cni-bad");
    let pod = bed.bridged_pod("pod");
    let garbage = bed.lb_cni_raw("ADD", &pod, Some(pod.ns.path()), b"{\"cniVersion\": ");
    assert_eq!(garbage.error_code(), 6, "{garbage:?}");
    let old =
        serde_json::to_vec(&json!({"cniVersion": "0.2.0", "name": NETWORK, "type": "lb-cni"}))
            .unwrap();
    let old_version = bed.lb_cni_raw("ADD", &pod, Some(pod.ns.path()), &old);
    assert_eq!(old_version.error_code(), 1, "{old_version:?}");
    let unchained = serde_json::to_vec(&bed.lb_cni_conf(None)).unwrap();
    let unchained = bed.lb_cni_raw("ADD", &pod, Some(pod.ns.path()), &unchained);
    assert_eq!(unchained.error_code(), 7, "{unchained:?}");
    // No agent has pinned its program in this bpffs: transient, the runtime retries.
    let no_agent = bed.lb_cni("ADD", &pod);
    assert_eq!(no_agent.error_code(), 11, "{no_agent:?}");
    assert!(
        no_agent.json()["msg"]
            .as_str()
            .unwrap()
            .contains("agent not running"),
        "{no_agent:?}"
    );
    let version = bed.lb_cni_raw("VERSION", &pod, None, b"{\"cniVersion\":\"0.4.0\"}");
    let version = version.expect_success("VERSION").json();
    assert_eq!(version["supportedVersions"], json!(["0.4.0", "1.0.0"]));
}

#[test]
fn agent_mode_attaches_new_veths_and_never_twice_with_lb_cni() {
    let mut bed = CniNode::new("cni-agent");
    // lb-cni attaches the first pod while the agent only pins its program.
    bed.start_agent(&["--attach-mode", "cni"]);
    let by_cni = bed.chained_pod("by-cni");
    let by_cni_iface = bed.host_iface(&by_cni);

    // An agent in agent mode (default patterns include veth*) finds lb-cni's pin.
    bed.start_agent(&[]);
    let logs = bed.agent_logs();
    assert!(
        logs.contains("already attached"),
        "the agent saw lb-cni's pin: {logs}"
    );
    assert_eq!(bed.tcx_programs(&by_cni_iface), 1);

    // A veth created after the agent started is attached through link events.
    let late = bed.bridged_pod("late");
    let late_iface = bed.host_iface(&late);
    bed.wait_until(&format!("the agent attached {late_iface}"), || {
        bed.link_pin(&late_iface).exists()
    });
    assert_eq!(bed.tcx_programs(&late_iface), 1);
    // lb-cni running afterwards (a chained config) sees the agent's pin.
    bed.lb_cni("ADD", &late)
        .expect_success("lb-cni ADD after the agent");
    bed.lb_cni("CHECK", &late).expect_success("lb-cni CHECK");
    assert_eq!(bed.tcx_programs(&late_iface), 1, "never attached twice");

    // The pod goes away without a DEL: the agent removes the dead pin.
    drop(late);
    bed.wait_until(
        &format!("the agent removed the pin of {late_iface}"),
        || !bed.link_pin(&late_iface).exists(),
    );
    assert!(bed.link_pin(&by_cni_iface).exists());
}
