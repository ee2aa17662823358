//! `lb-agent cleanup`: after an agent ran with pods attached, cleanup leaves no pins and no TCX
//! programs on the pod interfaces (asked of the kernel), the ClusterIP is no longer translated,
//! and a bpffs the agent mounted itself is unmounted. Refused while the agent runs.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, Output},
    time::{Duration, Instant},
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use lb_tests::{
    cluster::{agent_bin, echo_service_yaml, OneNode},
    spawn_in, tcp_request, Node,
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
