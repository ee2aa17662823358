//! The cargo invocations behind `build`, `lint` and `test`.
//!
//! lb-ebpf is a `#![no_std]`/`#![no_main]` crate for the BPF target: it cannot be built (or even
//! clippy-checked: "unwinding panics are not supported without std") for the host, which is why it
//! is not among the workspace's default-members. The host commands therefore run on
//! `--workspace --exclude lb-ebpf`; lb-userspace's build script compiles it for BPF through
//! aya-build, and the lint step checks it on its own target with the nightly toolchain.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Result};

use crate::cmd;

const EBPF_PACKAGE: &str = "lb-ebpf";
/// aya-build's target on little-endian hosts (x86_64, aarch64).
const EBPF_TARGET: &str = "bpfel-unknown-none";

/// The cargo that runs xtask (so the same toolchain builds everything), in the workspace root.
fn cargo(workspace: &Path) -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace);
    c
}

/// Prints the step's command on one line, then runs it.
fn announce_and_run(step: &str, mut command: Command) -> Result<()> {
    println!("{step}: {}", cmd::display(&command));
    cmd::run(&mut command)
}

/// `cargo build` of every binary of the host crates.
pub fn build(workspace: &Path, release: bool) -> Result<()> {
    let mut c = cargo(workspace);
    c.args(["build", "--workspace", "--exclude", EBPF_PACKAGE, "--bins"]);
    if release {
        c.arg("--release");
    }
    announce_and_run("build", c)
}

pub fn fmt_check(workspace: &Path) -> Result<()> {
    let mut c = cargo(workspace);
    c.args(["fmt", "--all", "--", "--check"]);
    announce_and_run("fmt", c)
}

/// clippy on the host crates, all targets (tests, examples), warnings denied.
pub fn clippy_host(workspace: &Path) -> Result<()> {
    let mut c = cargo(workspace);
    c.args([
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    announce_and_run("clippy", c)
}

/// clippy on the eBPF crate for the BPF target, the way aya-build compiles it (nightly,
/// `-Z build-std=core`).
pub fn clippy_ebpf(workspace: &Path) -> Result<()> {
    let rustup = cmd::find_tool("rustup")
        .map(|f| f.path)
        .unwrap_or_else(|| "rustup".into());
    let mut c = Command::new(rustup);
    c.current_dir(workspace).args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        EBPF_PACKAGE,
        // Its lib and bins: a test harness cannot exist on a no_std target.
        "--target",
        EBPF_TARGET,
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]);
    announce_and_run("clippy-ebpf", c)
}

/// `cargo test` of the host crates, with the paths of the freshly built binaries that the
/// integration tests start.
pub fn test(workspace: &Path) -> Result<()> {
    let debug = target_dir(workspace).join("debug");
    let agent = debug.join("lb-agent");
    let lbctl = debug.join("lbctl");
    let cni = debug.join("lb-cni");
    for bin in [&agent, &lbctl, &cni] {
        if !bin.is_file() {
            bail!(
                "{} does not exist although `cargo build` succeeded: was the binary renamed? \
                 (the tests get it through LB_AGENT_BIN / LBCTL_BIN / LB_CNI_BIN)",
                bin.display()
            );
        }
    }
    let mut c = cargo(workspace);
    c.env("LB_AGENT_BIN", &agent)
        .env("LBCTL_BIN", &lbctl)
        .env("LB_CNI_BIN", &cni)
        .args([
            "test",
            "--workspace",
            "--exclude",
            EBPF_PACKAGE,
            "--no-fail-fast",
        ]);
    announce_and_run("test", c)
}

/// Cargo's target directory: what `cargo metadata` says (it knows about CARGO_TARGET_DIR and
/// `build.target-dir` in config files), else CARGO_TARGET_DIR, else `<workspace>/target`.
pub fn target_dir(workspace: &Path) -> PathBuf {
    let mut metadata = cargo(workspace);
    metadata.args(["metadata", "--format-version", "1", "--no-deps"]);
    let from_metadata =
        cmd::output(&mut metadata).map(|json| json_string_field(&json, "target_directory"));
    match from_metadata {
        Ok(Some(dir)) => return PathBuf::from(dir),
        Ok(None) => eprintln!(
            "xtask: no target_directory in the output of `{}`; guessing",
            cmd::display(&metadata)
        ),
        Err(e) => eprintln!("xtask: {e:#}; guessing the target directory"),
    }
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace.join(dir),
        _ => workspace.join("target"),
    }
}

/// The string value of the last `"key":"..."` in a JSON document, unescaped. Enough for cargo
/// metadata's top-level `target_directory`, which comes after the packages; spares a JSON parser.
fn json_string_field(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\":");
    let start = json.rfind(&needle)? + needle.len();
    let rest = json[start..].trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other), // \" \\ \/
            },
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field() {
        let json = r#"{"packages":[{"name":"x","metadata":null}],"target_directory":"/work/main/target","version":1,"workspace_root":"/work/main"}"#;
        assert_eq!(
            json_string_field(json, "target_directory").as_deref(),
            Some("/work/main/target")
        );
        let json = r#"{"target_directory": "/tmp/a \"b\"\\c\/d\u00e9"}"#;
        assert_eq!(
            json_string_field(json, "target_directory").as_deref(),
            Some("/tmp/a \"b\"\\c/dé")
        );
        assert_eq!(
            json_string_field(r#"{"version":1}"#, "target_directory"),
            None
        );
        assert_eq!(
            json_string_field(r#"{"target_directory":"/unterminated"#, "target_directory"),
            None
        );
    }
}
