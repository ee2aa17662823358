//! `lb-agent cleanup`: after an agent ran with pods attached, cleanup leaves no pins and no TCX
//! programs on the pod interfaces (asked of the kernel), the ClusterIP is no longer translated,
//! and a bpffs the agent mounted itself is unmounted. Refused while the agent runs. On a node with
//! an uplink, the XDP link goes too and the NodePort stops answering.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use lb_tests::{
    cluster::{agent_bin, echo_service_yaml, OneNode},
    fabric::{MultiNode, NodeSpec},
    spawn_in, tcp_request, Netns, Node,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

fn cleanup(bpffs: &Path) -> Output {
    Command::new(agent_bin().unwrap())
        .arg("cleanup")
        .arg("--bpffs")
        .arg(bpffs)
        .output()
        .expect("run lb-agent cleanup")
}

/// Programs attached to the TCX hooks of `iface` in the node, as the kernel reports them.
fn tcx_programs(node: &Node, iface: &str) -> usize {
    node.ns.run(|| {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .map(|t| {
                SchedClassifier::query_tcx(iface, t)
                    .unwrap_or_else(|e| panic!("query TCX of {iface}: {e}"))
                    .1
                    .len()
            })
            .sum()
    })
}

#[test]
fn cleanup_removes_every_pin_and_attachment_and_is_refused_while_the_agent_runs() {
    let ips = [Ipv4Addr::new(198, 18, 2, 1), Ipv4Addr::new(198, 18, 2, 2)];
    let mut bed = OneNode::start(
        "cleanup",
        &[("be-1", ips[0]), ("be-2", ips[1])],
        8080,
        &echo_service_yaml(VIP, 80, 8080, &ips),
    )
    .unwrap();
    let to = SocketAddrV4::new(VIP, 80);
    bed.wait_for_tcp(to, Duration::from_secs(10)).unwrap();
    let ifaces = bed.node.pod_ifaces();
    for iface in &ifaces {
        assert_eq!(
            tcx_programs(&bed.node, iface),
            2,
            "ingress and egress on {iface}"
        );
    }

    let refused = cleanup(bed.bpffs.path());
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("an lb-agent is running with --bpffs"),
        "{stderr}"
    );
    bed.wait_for_tcp(to, Duration::from_secs(2))
        .expect("a refused cleanup leaves the data path alone");

    assert!(bed.agent.stop().unwrap().success(), "{}", bed.agent.logs());
    let out = cleanup(bed.bpffs.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for iface in &ifaces {
        assert!(stdout.contains(&format!("links/{iface}\n")), "{stdout}");
        assert!(
            stdout.contains(&format!("links-egress/{iface}\n")),
            "{stdout}"
        );
    }
    for pin in [
        "progs/lb_tc_ingress",
        "LB_CONNTRACK",
        "LB_SERVICES",
        "LB_META",
    ] {
        assert!(stdout.contains(&format!("/{pin}\n")), "{pin} in:\n{stdout}");
    }
    let left: Vec<_> = std::fs::read_dir(bed.bpffs.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        // maps.debug and progs.debug: the kernel's own files in every bpffs mount.
        .filter(|p| !p.to_string_lossy().ends_with(".debug"))
        .collect();
    assert!(left.is_empty(), "nothing left: {left:?}");

    // The kernel frees a link an RCU grace period after its last pin goes.
    let deadline = Instant::now() + Duration::from_secs(5);
    for iface in &ifaces {
        while tcx_programs(&bed.node, iface) != 0 {
            assert!(Instant::now() < deadline, "{iface} still has TCX programs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Nothing translates the ClusterIP any more: nothing answers there.
    assert!(tcp_request(&bed.client.ns, to, Duration::from_millis(500)).is_err());

    let again = cleanup(bed.bpffs.path());
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to remove"));
}

#[test]
fn cleanup_unmounts_a_bpffs_the_agent_mounted_itself() {
    lb_tests::require_root();
    let node = Node::new("cleanmnt").unwrap();
    let run = Path::new(lb_tests::RUN_DIR);
    // Named like the testbed's entries, so a killed run's mount is swept by the next one.
    let dir = run.join(format!("cleanmnt-{}-900", std::process::id()));
    let manifests = run.join(format!("cleanmnt_m-{}-901", std::process::id()));
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("services.yaml"), "").unwrap();

    let mut cmd = Command::new(agent_bin().unwrap());
    cmd.arg("--cgroup")
        .arg(lb_tests::idle_cgroup())
        .arg("--manifests")
        .arg(&manifests)
        .args(["--node-name", "node-1", "--pod-iface-pattern", ""])
        .arg("--bpffs")
        .arg(&dir);
    let mut agent = spawn_in(&node.ns, cmd, "cleanmnt").unwrap();
    agent
        .wait_for_log("maps programmed", Duration::from_secs(20))
        .unwrap();
    assert!(
        dir.join("mounted_by_lb_agent").is_dir(),
        "the agent mounted a bpffs and marked it: {}",
        agent.logs()
    );
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}: {}", agent.logs());

    let out = cleanup(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("unmounted the bpffs the agent had mounted"),
        "{stdout}"
    );
    assert!(!dir.exists(), "the mount point the agent created is gone");
    std::fs::remove_dir_all(&manifests).unwrap();
}

/// Whether the kernel reports an XDP program on `iface` (`ip link` prints `xdp`, `xdpgeneric` or
/// `xdpdrv` with the program id when one is attached).
fn has_xdp(ns: &Netns, iface: &str) -> bool {
    ns.ip_output(&["-d", "link", "show", "dev", iface])
        .unwrap()
        .contains("prog/xdp")
}

#[test]
fn cleanup_removes_the_xdp_links_of_the_uplinks() {
    const NODE1: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
    const BE: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
    let yaml = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  type: NodePort
  clusterIP: 198.19.0.10
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: demo
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
- {{addresses: [{BE}], conditions: {{ready: true}}, nodeName: node-1}}
"
    );
    let mut bed = MultiNode::start(
        "cleanxdp",
        &[NodeSpec {
            name: "node-1",
            addr: NODE1,
            pod_net: Ipv4Addr::new(198, 18, 2, 0),
            backends: &[("be-1", BE)],
        }],
        Ipv4Addr::new(198, 18, 100, 10),
        &[],
        &yaml,
    )
    .unwrap();
    let to = SocketAddrV4::new(NODE1, 30080);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcp_request(&bed.client, to, Duration::from_millis(500)).is_err() {
        assert!(
            Instant::now() < deadline,
            "NodePort never answered:\n{}",
            bed.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let node = &mut bed.nodes[0];
    assert!(has_xdp(&node.node.ns, "eth0"), "XDP on the uplink");
    assert!(
        node.agent.stop().unwrap().success(),
        "{}",
        node.agent.logs()
    );
    assert!(
        has_xdp(&node.node.ns, "eth0"),
        "the pinned link outlives the agent"
    );

    let out = cleanup(node.bpffs.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("links-xdp/eth0\n"), "{stdout}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while has_xdp(&node.node.ns, "eth0") {
        assert!(Instant::now() < deadline, "eth0 still has an XDP program");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Nothing listens on the nodePort itself: without the program, nothing answers there.
    assert!(tcp_request(&bed.client, to, Duration::from_millis(500)).is_err());
}
