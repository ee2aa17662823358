//! The agent's own health endpoints on kube-proxy's port 10256: `/healthz` (and `/livez`) answer
//! 200 as long as the process serves, `/readyz` answers 503 until the first full sync has been
//! programmed and 200 after. And `--log-format json` makes every log line a JSON object; an invalid
//! `LB_LOG` is refused rather than ignored.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster::{agent_bin, echo_service_yaml, OneNode},
    http_get, spawn_in, BpfFs, Node, RUN_DIR,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const HEALTH: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 10256);
const T: Duration = Duration::from_secs(2);

/// A kubeconfig whose API server refuses every connection: the agent never gets a first list.
struct DeadKubeconfig(std::path::PathBuf);

impl DeadKubeconfig {
    fn new(tag: &str) -> Self {
        let path =
            std::path::Path::new(RUN_DIR).join(format!("{tag}-{}.kubeconfig", std::process::id()));
        std::fs::create_dir_all(RUN_DIR).unwrap();
        // 127.0.0.1:1 in the node namespace: nothing listens, connections are refused at once.
        std::fs::write(
            &path,
            "apiVersion: v1
kind: Config
clusters:
- name: dead
  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}
users:
- name: nobody
  user: {token: unused}
contexts:
- name: dead
  context: {cluster: dead, user: nobody}
current-context: dead
",
        )
        .unwrap();
        Self(path)
    }
}

impl Drop for DeadKubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn readyz_is_503_until_the_first_sync_while_healthz_is_200() {
    lb_tests::require_root();
    let node = Node::new("notready").unwrap();
    let bpffs = BpfFs::new("notready").unwrap();
    let kubeconfig = DeadKubeconfig::new("notready");
    let mut cmd = Command::new(agent_bin().unwrap());
    cmd.arg("--cgroup")
        .arg(lb_tests::idle_cgroup())
        .arg("--kubeconfig")
        .arg(&kubeconfig.0)
        .args(["--node-name", "node-1", "--pod-iface-pattern", ""])
        .arg("--bpffs")
        .arg(bpffs.path());
    let mut agent = spawn_in(&node.ns, cmd, "notready").unwrap();

    // The health server comes up before any sync; wait for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let live = loop {
        match http_get(&node.ns, HEALTH, "/healthz", T) {
            Ok(r) => break r,
            Err(e) => {
                assert!(agent.is_running(), "the agent exited: {}", agent.logs());
                assert!(
                    Instant::now() < deadline,
                    "no health server: {e:#}\n{}",
                    agent.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));
    let livez = http_get(&node.ns, HEALTH, "/livez", T).unwrap();
    assert_eq!(livez.status, 200);
    // Give the source time to fail a few times: still alive, still not ready.
    std::thread::sleep(Duration::from_secs(2));
    let ready = http_get(&node.ns, HEALTH, "/readyz", T).unwrap();
    assert_eq!(ready.status, 503, "{}: {}", ready.body, agent.logs());
    assert!(agent.is_running(), "{}", agent.logs());
    assert!(
        !agent.logs().contains("maps programmed"),
        "{}",
        agent.logs()
    );
    assert_eq!(
        http_get(&node.ns, HEALTH, "/healthz", T).unwrap().status,
        200
    );
    assert_eq!(http_get(&node.ns, HEALTH, "/nope", T).unwrap().status, 404);
}

#[test]
fn readyz_is_200_after_the_first_sync_and_json_logs_are_json() {
    lb_tests::require_root();
    let ips = [Ipv4Addr::new(198, 18, 2, 1)];
    // OneNode's agent inherits the environment: LB_LOG_FORMAT is the flag's variable.
    let bed = {
        let _env = EnvVar::set("LB_LOG_FORMAT", "json");
        OneNode::start(
            "readyjson",
            &[("be-1", ips[0])],
            8080,
            &echo_service_yaml(VIP, 80, 8080, &ips),
        )
        .unwrap()
    };
    // OneNode returned once "maps programmed" was logged: ready from then on.
    let ready = http_get(&bed.node.ns, HEALTH, "/readyz", T).unwrap();
    assert_eq!((ready.status, ready.body.as_str()), (200, "ok\n"));
    let logs = bed.agent.logs();
    let mut messages = Vec::new();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\n{logs}"));
        assert!(v["level"].is_string(), "{line}");
        messages.push(
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(
        messages.iter().any(|m| m == "maps programmed"),
        "{messages:?}"
    );
}

/// Sets an environment variable for the agents spawned while it lives.
struct EnvVar(&'static str);

impl EnvVar {
    fn set(name: &'static str, value: &str) -> Self {
        std::env::set_var(name, value);
        Self(name)
    }
}

impl Drop for EnvVar {
    fn drop(&mut self) {
        std::env::remove_var(self.0);
    }
}

#[test]
fn an_invalid_lb_log_directive_is_refused_naming_it() {
    let out = Command::new(agent_bin().unwrap())
        .env("LB_LOG", "lb=[bad")
        .arg("--cgroup")
        .arg(lb_tests::idle_cgroup())
        .args(["--manifests", "/nonexistent", "--node-name", "node-1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("LB_LOG=\"lb=[bad\" is not a valid filter directive"),
        "{stderr}"
    );
}
