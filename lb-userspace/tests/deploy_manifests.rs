//! Every manifest in deploy/ parses into k8s-openapi types, and the invariants an operator relies
//! on hold: least-privilege RBAC, a DaemonSet that can run the data path on every node and whose
//! probes reach the agent's health endpoint, settings the agent actually accepts, an image recipe.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn load() -> Manifests {
    let dir = deploy_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut out = Manifests::default();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} document {}: {e}", file.display(), i + 1));
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            let what = format!("{} document {} ({kind})", file.display(), i + 1);
            fn parse<T: serde::de::DeserializeOwned>(v: serde_yaml::Value, what: &str) -> T {
                serde_yaml::from_value(v).unwrap_or_else(|e| panic!("{what}: {e}"))
            }
            match kind.as_str() {
                "Namespace" => out.namespaces.push(parse(value, &what)),
                "ServiceAccount" => out.service_accounts.push(parse(value, &what)),
                "ClusterRole" => out.cluster_roles.push(parse(value, &what)),
                "ClusterRoleBinding" => out.bindings.push(parse(value, &what)),
                "ConfigMap" => out.config_maps.push(parse(value, &what)),
                "DaemonSet" => out.daemon_sets.push(parse(value, &what)),
                other => panic!("{what}: unexpected kind {other:?}; teach this test about it"),
            }
        }
    }
    out
}

fn one<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what} in deploy/");
    &items[0]
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_uses() {
    let m = load();
    let role = one(&m.cluster_roles, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "unexpected rule shape: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for field in [group, resource, verb] {
                        assert!(!field.contains('*'), "wildcard in ClusterRole: {rule:?}");
                    }
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    let mut wanted = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            wanted.insert((group, resource, verb));
        }
    }
    for verb in ["create", "patch"] {
        wanted.insert(("events.k8s.io", "events", verb));
    }
    assert_eq!(
        granted, wanted,
        "ClusterRole rules differ from what the agent needs"
    );
}

#[test]
fn binding_ties_the_role_to_the_daemonsets_service_account() {
    let m = load();
    let namespace = one(&m.namespaces, "Namespace")
        .metadata
        .name
        .clone()
        .unwrap();
    let account = one(&m.service_accounts, "ServiceAccount");
    assert_eq!(account.metadata.namespace.as_ref(), Some(&namespace));
    let role = one(&m.cluster_roles, "ClusterRole");
    let binding = one(&m.bindings, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_ref(), Some(&namespace));
    let ds = one(&m.daemon_sets, "DaemonSet");
    assert_eq!(ds.metadata.namespace.as_ref(), Some(&namespace));
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_ref(),
        account.metadata.name.as_ref()
    );
}

#[test]
fn daemonset_runs_privileged_on_every_node_with_probes_on_the_agents_endpoint() {
    let m = load();
    let ds = one(&m.daemon_sets, "DaemonSet");
    let spec = ds.spec.as_ref().unwrap();
    let strategy = spec.update_strategy.as_ref().expect("no updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    // Moving host processes' stale UDP sockets needs their /proc/<pid>/fd (pidfd_getfd).
    assert_eq!(pod.host_pid, Some(true), "hostPID");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "no catch-all toleration (operator: Exists, no key, no effect): {tolerations:?}"
    );

    let container = one(&pod.containers, "container in the DaemonSet");
    let privileged = container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged);
    assert_eq!(
        privileged,
        Some(true),
        "the agent container must be privileged"
    );

    // Host paths mounted where the agent expects them.
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    for (host_path, mount_path) in [
        ("/sys/fs/bpf", "/sys/fs/bpf"),
        ("/sys/fs/cgroup", "/sys/fs/cgroup"),
    ] {
        let volume = volumes
            .iter()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == host_path))
            .unwrap_or_else(|| panic!("no hostPath volume for {host_path}"));
        let mounted = container
            .volume_mounts
            .iter()
            .flatten()
            .any(|vm| vm.name == volume.name && vm.mount_path == mount_path);
        assert!(mounted, "{host_path} is not mounted at {mount_path}");
    }
    let bpffs_arg = container
        .args
        .iter()
        .flatten()
        .find(|a| a.starts_with("--bpffs"));
    assert!(
        bpffs_arg.is_some_and(|a| a.trim_start_matches("--bpffs=").starts_with("/sys/fs/bpf/")),
        "--bpffs must be under the mounted /sys/fs/bpf: {bpffs_arg:?}"
    );

    // Probes hit the agent's health endpoint on its default port (hostNetwork: the node's port).
    let health_port: i32 = lb_userspace::health::DEFAULT_BIND_ADDRESS
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    for (probe, path) in [
        (&container.readiness_probe, "/readyz"),
        (&container.liveness_probe, "/healthz"),
    ] {
        let http = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(http.path.as_deref(), Some(path));
        assert_eq!(
            http.port,
            IntOrString::Int(health_port),
            "{path} probe port"
        );
    }

    // The node name comes from the downward API.
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "LB_NODE_NAME")
        .expect("LB_NODE_NAME not set");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"));

    // Settings come from the ConfigMap that exists.
    let config_map = one(&m.config_maps, "ConfigMap");
    let from = container
        .env_from
        .iter()
        .flatten()
        .filter_map(|e| e.config_map_ref.as_ref())
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>();
    assert_eq!(from, vec![config_map.metadata.name.as_deref().unwrap()]);
}

#[test]
fn configmap_sets_only_variables_the_agent_or_its_client_reads() {
    let m = load();
    let config_map = one(&m.config_maps, "ConfigMap");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .arg("--help")
        .output()
        .expect("running lb-agent --help");
    let help = String::from_utf8_lossy(&help.stdout);
    // Read outside clap: the log filter, and the in-cluster API address (kube-rs).
    let other = [
        "LB_LOG",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
    ];
    for key in config_map.data.iter().flatten().map(|(k, _)| k) {
        assert!(
            other.contains(&key.as_str()) || help.contains(&format!("[env: {key}=")),
            "ConfigMap key {key} is not an environment variable lb-agent reads (see lb-agent --help)"
        );
    }
    let data = config_map.data.as_ref().unwrap();
    assert!(
        data.contains_key("KUBERNETES_SERVICE_HOST"),
        "without kube-proxy the agent must be told the API server's real address"
    );
}

#[test]
fn containerfile_builds_with_xtask_and_ships_all_binaries_on_bookworm_slim() {
    let path = deploy_dir().join("Containerfile");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(text.contains("cargo xtask build --release"));
    assert!(text.contains("FROM docker.io/library/debian:bookworm-slim"));
    for binary in [
        "target/release/lb-agent",
        "target/release/lbctl",
        "target/release/lb-cni",
    ] {
        assert!(text.contains(binary), "the image does not get {binary}");
    }
}

/// The host paths a container mounts, as (hostPath, mountPath).
fn host_mounts(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    container: &k8s_openapi::api::core::v1::Container,
) -> Vec<(String, String)> {
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|vm| {
            let v = volumes.iter().find(|v| v.name == vm.name)?;
            Some((v.host_path.as_ref()?.path.clone(), vm.mount_path.clone()))
        })
        .collect()
}

/// Runs a manifest's command with its /host/... mounts and /usr/local/bin replaced by local
/// paths, so the test exercises exactly what the DaemonSet would run on a node.
fn run_manifest_command(
    command: &[String],
    root: &Path,
    attach_mode: &str,
) -> std::process::Output {
    let lb_cni = env!("CARGO_BIN_EXE_lb-cni");
    let rewrite = |s: &str| {
        s.replace("/host/etc/cni/net.d", root.join("net.d").to_str().unwrap())
            .replace("/host/opt/cni/bin", root.join("bin").to_str().unwrap())
            .replace("/usr/local/bin/lb-cni", lb_cni)
            .replace("/sys/fs/bpf/lb", root.join("bpffs/lb").to_str().unwrap())
    };
    let argv: Vec<String> = command.iter().map(|a| rewrite(a)).collect();
    std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env("LB_ATTACH_MODE", attach_mode)
        .output()
        .expect("run the manifest's command")
}

#[test]
fn chained_mode_install_and_cleanup_commands_edit_the_node_cni_config() {
    let m = load();
    let pod = one(&m.daemon_sets, "DaemonSet")
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    let init = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "install-cni")
        .expect("no install-cni init container");
    let mounts = host_mounts(&pod, init);
    for want in [
        ("/etc/cni/net.d", "/host/etc/cni/net.d"),
        ("/opt/cni/bin", "/host/opt/cni/bin"),
    ] {
        assert!(
            mounts.contains(&(want.0.into(), want.1.into())),
            "{want:?} not mounted: {mounts:?}"
        );
    }
    let config_map = one(&m.config_maps, "ConfigMap");
    assert!(config_map
        .data
        .as_ref()
        .unwrap()
        .contains_key("LB_ATTACH_MODE"));

    let root = std::env::temp_dir().join(format!("lb-deploy-cni-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("net.d")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let conflist = root.join("net.d/10-bridge.conflist");
    let original =
        r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","bridge":"cni0"}]}"#;
    std::fs::write(&conflist, original).unwrap();
    let command = init.command.clone().unwrap();

    // Agent mode: the node's CNI configuration is left alone.
    let out = run_manifest_command(&command, &root, "agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&conflist).unwrap(), original);

    // Chained mode, twice: lb-cni appended once after the cluster's plugin, binary installed.
    for _ in 0..2 {
        let out = run_manifest_command(&command, &root, "cni");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let edited: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    let types: Vec<&str> = edited["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bridge", "lb-cni"]);
    assert!(root.join("bin/lb-cni").is_file());

    // The node cleanup DaemonSet (outside deploy/, never applied with it) removes both again,
    // and the pins (standing in for /sys/fs/bpf/lb here: a directory with a file in it).
    std::fs::create_dir_all(root.join("bpffs/lb/links")).unwrap();
    std::fs::write(root.join("bpffs/lb/links/veth0"), "").unwrap();
    let cleanup_path = deploy_dir().join("uninstall/node-cleanup.yaml");
    let cleanup: DaemonSet = serde_yaml::from_str(&std::fs::read_to_string(&cleanup_path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", cleanup_path.display()));
    let cleanup_pod = cleanup.spec.unwrap().template.spec.unwrap();
    let uninstall = cleanup_pod
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.name == "cleanup")
        .unwrap();
    let cleanup_mounts = host_mounts(&cleanup_pod, uninstall);
    for m in mounts
        .iter()
        .chain([&("/sys/fs/bpf".to_string(), "/sys/fs/bpf".to_string())])
    {
        assert!(
            cleanup_mounts.contains(m),
            "cleanup does not mount {m:?}: {cleanup_mounts:?}"
        );
    }
    let out = run_manifest_command(uninstall.command.as_ref().unwrap(), &root, "cni");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conflist).unwrap()).unwrap();
    let types: Vec<&str> = after["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bridge"]);
    assert!(!root.join("bin/lb-cni").exists());
    assert!(!root.join("bpffs/lb").exists(), "pins removed");
    std::fs::remove_dir_all(&root).unwrap();
}
