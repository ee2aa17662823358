//! Developer tasks for the workspace: `cargo xtask <command>` (aliased in .cargo/config.toml).
mod bench;
mod cargo;
mod cmd;
mod demo;
mod run;
mod setup;
mod steps;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use crate::steps::Steps;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for the lb workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian 12 machine lacks (nightly + rust-src, LLVM 22, bpf-linker,
    /// iproute2/ethtool/util-linux/procps); quick when everything is there
    Setup,
    /// Run setup, then build every binary of the workspace
    Build {
        /// Build with the release profile
        #[arg(long)]
        release: bool,
    },
    /// Run setup, lint, build, then every test, privileged data-path tests included (needs root)
    Test {
        /// Skip the fmt and clippy checks
        #[arg(long)]
        no_lint: bool,
    },
    /// Check formatting and run clippy (warnings denied) on the host crates and the eBPF crate
    Lint,
    /// Run setup and build, then load-balance requests to a ClusterIP in a throwaway testbed
    /// (needs root)
    Demo,
    /// Run setup and build, then run lb-agent on this machine against the local kubeconfig (or
    /// --manifests), logging to the terminal; Ctrl-C detaches it (needs root)
    Run(run::RunArgs),
    /// Run setup and a release build, then benchmark lb against kube-proxy's iptables and
    /// nftables layouts and a direct baseline; writes docs/BENCHMARKS.md and
    /// docs/benchmarks.json (needs root; the default run is meant to stay under 20 minutes)
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let workspace = workspace_root();
    let result = match cli.command {
        Task::Setup => setup::setup(&workspace),
        Task::Build { release } => build(&workspace, release),
        Task::Test { no_lint } => test(&workspace, no_lint),
        Task::Demo => {
            let mut steps = Steps::new("demo");
            if steps.run("setup", || setup::setup(&workspace))
                && steps.run("build", || cargo::build(&workspace, false))
            {
                steps.run("demo", || demo::demo(&workspace));
            }
            steps.finish()
        }
        Task::Run(args) => {
            let mut steps = Steps::new("run");
            if steps.run("setup", || setup::setup(&workspace))
                && steps.run("build", || cargo::build(&workspace, args.release))
            {
                // Replaces this process on success; returns only if the agent could not start.
                steps.run("agent", || run::run(&workspace, &args));
            }
            steps.finish()
        }
        Task::Bench(args) => {
            let mut steps = Steps::new("bench");
            if steps.run("setup", || setup::setup(&workspace))
                && steps.run("build", || cargo::build(&workspace, true))
            {
                steps.run("bench", || bench::bench(&workspace, &args));
            }
            steps.finish()
        }
        Task::Lint => {
            let mut steps = Steps::new("lint");
            lint(&mut steps, &workspace);
            steps.finish()
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The parent of xtask's own directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a directory of the workspace")
        .to_path_buf()
}

fn build(workspace: &Path, release: bool) -> Result<()> {
    let mut steps = Steps::new("build");
    if steps.run("setup", || setup::setup(workspace)) {
        steps.run("build", || cargo::build(workspace, release));
    }
    steps.finish()
}

fn lint(steps: &mut Steps, workspace: &Path) {
    // All of them, even after a failure: one run reports every problem.
    steps.run("fmt", || cargo::fmt_check(workspace));
    steps.run("clippy", || cargo::clippy_host(workspace));
    steps.run("clippy-ebpf", || cargo::clippy_ebpf(workspace));
}

fn test(workspace: &Path, no_lint: bool) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask test needs root: the data-path tests create network namespaces and load \
             BPF programs\n(run it as root, as CI does, e.g. `sudo -E env \"PATH=$PATH\" cargo xtask \
             test`; `cargo xtask build` and `cargo xtask lint` work without root)"
        );
    }
    let mut steps = Steps::new("test");
    if !steps.run("setup", || setup::setup(workspace)) {
        return steps.finish();
    }
    if no_lint {
        steps.skip("lint", "--no-lint");
    } else {
        // A lint failure fails the task but does not stop the tests: one run reports everything.
        lint(&mut steps, workspace);
    }
    if steps.run("build", || cargo::build(workspace, false)) {
        steps.run("test", || cargo::test(workspace));
    } else {
        steps.skip("test", "the build failed");
    }
    steps.finish()
}

/// An error and its causes, one per line.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        text.push_str("\n  caused by: ");
        text.push_str(&cause.to_string());
    }
    text
}
