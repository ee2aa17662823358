//! `cargo xtask bench`: setup, a release build, then `lb-bench`, which measures lb against
//! kube-proxy's iptables and nftables layouts in one run and writes docs/BENCHMARKS.md and
//! docs/benchmarks.json.
use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::{cargo, cmd};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Small sizes and short measurements, for development (the report says so)
    #[arg(long)]
    pub quick: bool,
    /// Only these parts, comma separated: packet, e2e, control, memory
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Interleaved rounds per end-to-end figure (default 3; quick 1)
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Length of one end-to-end measurement in milliseconds (default 1500; quick 500)
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Stop kube-proxy's single nft transaction from empty after this many seconds and report a
    /// lower bound (default 60; 0 waits for it, about 5 minutes at 10k x 10 here)
    #[arg(long)]
    pub nft_limit_s: Option<u64>,
}

impl BenchArgs {
    /// The command line as the user would type it, for the report.
    fn command_line(&self) -> String {
        let mut c = String::from("cargo xtask bench");
        if self.quick {
            c.push_str(" --quick");
        }
        if !self.only.is_empty() {
            c.push_str(&format!(" --only {}", self.only.join(",")));
        }
        if let Some(r) = self.rounds {
            c.push_str(&format!(" --rounds {r}"));
        }
        if let Some(d) = self.duration_ms {
            c.push_str(&format!(" --duration-ms {d}"));
        }
        if let Some(s) = self.nft_limit_s {
            c.push_str(&format!(" --nft-limit-s {s}"));
        }
        c
    }
}

pub fn bench(workspace: &Path, args: &BenchArgs) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask bench needs root: it creates network namespaces, loads BPF programs and \
             iptables/nftables rules"
        );
    }
    let release = cargo::target_dir(workspace).join("release");
    let mut c = Command::new(release.join("lb-bench"));
    c.current_dir(workspace)
        .arg("--agent-bin")
        .arg(release.join("lb-agent"))
        .arg("--out-dir")
        .arg(workspace.join("docs"))
        .args(["--command", &args.command_line()]);
    if args.quick {
        c.arg("--quick");
    }
    if !args.only.is_empty() {
        c.args(["--only", &args.only.join(",")]);
    }
    if let Some(r) = args.rounds {
        c.args(["--rounds", &r.to_string()]);
    }
    if let Some(d) = args.duration_ms {
        c.args(["--duration-ms", &d.to_string()]);
    }
    if let Some(s) = args.nft_limit_s {
        c.args(["--nft-limit-s", &s.to_string()]);
    }
    println!("bench: {}", cmd::display(&c));
    cmd::run_tee(&mut c)
}
