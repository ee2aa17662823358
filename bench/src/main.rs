//! `lb-bench`: measures the data path and the agent against kube-proxy's iptables and nftables
//! rule layouts and a no-load-balancer baseline, all in the same run on the same machine, and
//! writes the report (Markdown and JSON). `cargo xtask bench` builds it in release mode and runs
//! it; see docs/BENCHMARKS.md for how to read the output.
//!
//! Everything runs inside network namespaces and private bpffs mounts made by the `lb-tests`
//! testbed; nothing is configured in the root namespace.
mod control;
mod e2e;
mod kube_proxy;
mod packet;
mod report;
mod scenario;

use std::{path::PathBuf, time::Instant};

use anyhow::{bail, Result};
use clap::Parser;
use serde::Serialize;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "lb-bench",
    about = "Benchmarks lb against kube-proxy's iptables and nftables layouts"
)]
pub struct Args {
    /// Small sizes and short runs, for development; the report says it is a quick run.
    #[arg(long)]
    pub quick: bool,
    /// Which parts to run, comma separated: packet, e2e, control, memory (default: all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<Part>,
    /// Interleaved rounds per end-to-end figure (median reported); default 3, quick 1.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Length of one end-to-end measurement in milliseconds; default 1500, quick 500.
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Stop kube-proxy's single `nft -f` transaction that programs the control-plane size from
    /// empty after this many seconds and report a lower bound (0: no limit). The kernel's cost of
    /// that transaction grows with the square of its size (about 300 s at 10k x 10 here).
    #[arg(long)]
    pub nft_limit_s: Option<u64>,
    /// The lb-agent binary to benchmark.
    #[arg(long, env = "LB_AGENT_BIN")]
    pub agent_bin: PathBuf,
    /// Where docs/BENCHMARKS.md and docs/benchmarks.json are written.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// The command line that started the run, recorded in the report.
    #[arg(long, default_value = "lb-bench")]
    pub command: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Packet,
    E2e,
    Control,
    Memory,
}

/// Sizes and durations of one run, derived from the flags.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub duration_ms: u64,
    /// Services in the per-packet runs.
    pub packet_scales: Vec<usize>,
    /// Single BPF_PROG_TEST_RUN runs per path and size.
    pub packet_samples: usize,
    /// Services in the end-to-end runs.
    pub e2e_scales: Vec<usize>,
    /// Client threads of the end-to-end load generator.
    pub e2e_threads: usize,
    /// Services and endpoints per service of the control-plane and memory runs.
    pub control_services: usize,
    pub control_endpoints: usize,
    /// Single changes timed for the agent, iptables-restore and nft.
    pub changes_agent: usize,
    pub changes_iptables: usize,
    pub changes_nft: usize,
    /// The agent's --poll-interval-ms in the control-plane run.
    pub poll_interval_ms: u64,
    /// Limit of the single `nft -f` from empty, in seconds (None: wait for it).
    pub nft_limit_s: Option<u64>,
}

impl Plan {
    fn from_args(args: &Args) -> Plan {
        let q = args.quick;
        Plan {
            quick: q,
            rounds: args.rounds.unwrap_or(if q { 1 } else { 3 }),
            duration_ms: args.duration_ms.unwrap_or(if q { 500 } else { 1500 }),
            packet_scales: vec![1, 1_000, 10_000, 100_000],
            packet_samples: if q { 500 } else { 5_000 },
            e2e_scales: if q {
                vec![1, 1_000]
            } else {
                vec![1, 1_000, 10_000]
            },
            e2e_threads: 4,
            control_services: if q { 1_000 } else { 10_000 },
            control_endpoints: 10,
            changes_agent: if q { 20 } else { 1_000 },
            changes_iptables: if q { 10 } else { 20 },
            changes_nft: if q { 10 } else { 20 },
            poll_interval_ms: 200,
            nft_limit_s: match args.nft_limit_s {
                Some(0) => None,
                Some(s) => Some(s),
                None => Some(60),
            },
        }
    }

    pub fn wants(&self, only: &[Part], part: Part) -> bool {
        only.is_empty() || only.contains(&part)
    }
}

/// One measured figure: every sample of one metric for one mode, in one group of figures that
/// are compared with each other (same scale, same path).
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// What is compared, e.g. "ClusterIP TCP connections/s, 10000 services".
    pub group: String,
    /// "lb", "iptables", "nftables", "direct".
    pub mode: String,
    pub unit: String,
    /// Whether a larger value is better (rates) or worse (times, sizes).
    pub higher_is_better: bool,
    pub samples: Vec<f64>,
    /// Free-form remark shown with the figure (e.g. errors seen).
    pub note: Option<String>,
    /// The samples are where the measurement was stopped: the real value is larger.
    pub lower_bound: bool,
}

impl Figure {
    pub fn new(group: &str, mode: &str, unit: &str, higher_is_better: bool) -> Figure {
        Figure {
            group: group.to_owned(),
            mode: mode.to_owned(),
            unit: unit.to_owned(),
            higher_is_better,
            samples: Vec::new(),
            note: None,
            lower_bound: false,
        }
    }

    pub fn median(&self) -> f64 {
        percentile(&self.samples, 50.0)
    }
}

/// The `p`th percentile (nearest rank) of `samples`; NaN when there are none.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Everything a run produced, in the order it was measured.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub figures: Vec<Figure>,
    /// Facts the report states beside the figures (how a path was measured, sizes).
    pub notes: Vec<String>,
    /// Parts that failed, with the error; the report lists them.
    pub failures: Vec<String>,
}

impl Results {
    pub fn push(&mut self, f: Figure) {
        self.figures.push(f);
    }

    /// The figure of (group, mode), created on first use.
    pub fn figure(
        &mut self,
        group: &str,
        mode: &str,
        unit: &str,
        higher_is_better: bool,
    ) -> &mut Figure {
        let i = match self
            .figures
            .iter()
            .position(|f| f.group == group && f.mode == mode)
        {
            Some(i) => i,
            None => {
                self.figures
                    .push(Figure::new(group, mode, unit, higher_is_better));
                self.figures.len() - 1
            }
        };
        &mut self.figures[i]
    }
}

/// What runs one part of the benchmark.
type PartFn = fn(&Args, &Plan, &mut Results) -> Result<()>;

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("lb-bench needs root: it creates network namespaces, loads BPF programs and nftables/iptables rules");
    }
    if !args.agent_bin.is_file() {
        bail!("--agent-bin {} does not exist", args.agent_bin.display());
    }
    let plan = Plan::from_args(&args);
    let started = Instant::now();
    let mut results = Results::default();
    let facts = report::MachineFacts::collect();
    eprintln!("lb-bench: plan {plan:?}");

    let parts: [(Part, PartFn); 3] = [
        (Part::Packet, packet::run),
        (Part::E2e, e2e::run),
        (Part::Control, control::run),
    ];
    for (part, run) in parts {
        // Memory is measured on the control-plane testbed.
        let wanted = plan.wants(&args.only, part)
            || (part == Part::Control && plan.wants(&args.only, Part::Memory));
        if !wanted {
            continue;
        }
        let t = Instant::now();
        eprintln!("lb-bench: {part:?} ...");
        if let Err(e) = run(&args, &plan, &mut results) {
            eprintln!("lb-bench: {part:?} failed: {e:#}");
            results.failures.push(format!("{part:?}: {e:#}"));
        }
        eprintln!(
            "lb-bench: {part:?} done in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    let elapsed = started.elapsed();
    report::write(&args, &plan, &facts, &results, elapsed)?;
    if !results.failures.is_empty() {
        bail!(
            "{} part(s) failed (the report lists them): {}",
            results.failures.len(),
            results.failures.join("; ")
        );
    }
    Ok(())
}
