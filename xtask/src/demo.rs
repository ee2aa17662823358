//! `cargo xtask demo`: the main job, shown in a throwaway testbed. One node namespace with a client
//! pod and three backend pods, the real agent following `examples/`, requests through the
//! ClusterIP, and a table of which backend answered.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use lb_tests::{cluster::OneNode, tcp_requests, udp_requests, Reply};

use crate::{cargo, cmd};

/// What examples/echo.yaml describes.
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("echo-1", Ipv4Addr::new(198, 18, 2, 1)),
    ("echo-2", Ipv4Addr::new(198, 18, 2, 2)),
    ("echo-3", Ipv4Addr::new(198, 18, 2, 3)),
];
const REQUESTS: usize = 30;

pub fn demo(workspace: &Path) -> Result<()> {
    if !cmd::is_root() {
        bail!("cargo xtask demo needs root: it creates network namespaces and loads BPF programs");
    }
    let debug = cargo::target_dir(workspace).join("debug");
    // The testbed finds the agent here (cluster::agent_bin).
    std::env::set_var("LB_AGENT_BIN", debug.join("lb-agent"));

    let manifests = read_examples(&workspace.join("examples"))?;
    println!(
        "demo: starting a node namespace with a client pod (198.18.1.10) and backend pods {}",
        BACKENDS.map(|b| b.0).join(", ")
    );
    let bed = OneNode::start("demo", &BACKENDS, TARGET_PORT, &manifests)?;
    let vip = SocketAddrV4::new(VIP, PORT);
    bed.wait_for_tcp(vip, Duration::from_secs(10))?;
    println!("demo: lb-agent programmed the maps; `lbctl dump` shows:");
    let lbctl = |what: &str| -> Result<()> {
        let out = cmd::output(
            Command::new(debug.join("lbctl"))
                .arg("--bpffs")
                .arg(bed.bpffs.path())
                .arg(what),
        )
        .with_context(|| format!("running lbctl {what}"))?;
        for line in out.lines() {
            println!("    {line}");
        }
        Ok(())
    };
    lbctl("dump")?;
    println!("demo: the agent logs each sync:");
    for line in bed
        .agent
        .logs()
        .lines()
        .filter(|l| l.contains("maps programmed"))
    {
        println!("    {}", strip_ansi(line));
    }

    let timeout = Duration::from_secs(2);
    let mut counts: BTreeMap<&str, [usize; 2]> = BACKENDS.iter().map(|b| (b.0, [0, 0])).collect();
    let mut failures = 0;
    for (col, proto, replies) in [
        (
            0,
            "TCP",
            tcp_requests(&bed.client.ns, vip, REQUESTS, timeout),
        ),
        (
            1,
            "UDP",
            udp_requests(&bed.client.ns, vip, REQUESTS, timeout),
        ),
    ] {
        println!("demo: {REQUESTS} {proto} requests from the client pod to {vip}:");
        for (i, reply) in replies.into_iter().enumerate() {
            match reply {
                Ok(Reply { backend, peer }) => {
                    println!(
                        "    {proto} #{:02} answered by {backend} (it saw the client as {peer})",
                        i + 1
                    );
                    match counts.get_mut(backend.as_str()) {
                        Some(c) => c[col] += 1,
                        None => {
                            println!("    !! unknown backend {backend:?}");
                            failures += 1;
                        }
                    }
                }
                Err(e) => {
                    println!("    {proto} #{:02} FAILED: {e:#}", i + 1);
                    failures += 1;
                }
            }
        }
    }

    println!("\n    backend   address        TCP   UDP");
    for (name, ip) in BACKENDS {
        let [tcp, udp] = counts[name];
        println!("    {name:<9} {:<14} {tcp:>4}  {udp:>4}", ip.to_string());
    }
    println!("\ndemo: `lbctl services` and `lbctl stats` read the same maps (connection counts include the readiness probes):");
    lbctl("services")?;
    lbctl("stats")?;
    let idle: Vec<&str> = counts
        .iter()
        .filter(|(_, c)| c[0] == 0 || c[1] == 0)
        .map(|(n, _)| *n)
        .collect();
    drop(bed);
    println!("demo: testbed removed");
    if failures > 0 {
        bail!("{failures} requests failed");
    }
    if !idle.is_empty() {
        bail!("backends that got no TCP or no UDP request: {idle:?}");
    }
    println!(
        "demo: ok: {} requests, every one answered, every backend used",
        2 * REQUESTS
    );
    Ok(())
}

/// Every YAML file of examples/, as one multi-document stream.
fn read_examples(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut out = String::new();
    for f in files {
        out.push_str(
            &std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
        );
        out.push_str("\n---\n");
    }
    Ok(out)
}

/// The agent colours its text log; the demo prints it plain.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
