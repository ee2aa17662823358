//! `cargo xtask setup`: installs what a fresh Debian 12 (bookworm) machine lacks to build and test
//! the workspace, and nothing else. Every check is a cheap probe, so a machine that has everything
//! gets through in well under a second.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::cmd::{self, Found};

/// aya-build compiles the eBPF crate with `rustup run nightly cargo build -Z build-std=core`.
const NIGHTLY: &str = "nightly";
/// rust-src for `-Z build-std=core`; clippy for linting the eBPF crate on its own target.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];
/// For the lint step on the host crates (a `--profile minimal` toolchain has neither).
const ACTIVE_COMPONENTS: &[&str] = &["rustfmt", "clippy"];
/// LLVM 22 development files (bpf-linker links against them; from bookworm-security), and the
/// tools the data-path tests use: ip, ethtool, nsenter and mount, sysctl; the CNI plugins
/// (`bridge`, `host-local` in /usr/lib/cni) that the lb-cni tests chain after; iptables and
/// nftables for the kube-proxy baselines of `cargo xtask bench`.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libclang-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "ethtool",
    "util-linux",
    "procps",
    "containernetworking-plugins",
    "iptables",
    "nftables",
];
const LLVM_MAJOR: u32 = 22;
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn setup(workspace: &Path) -> Result<()> {
    let start = Instant::now();
    let mut installed = Vec::new();

    let rustup = rustup()?;
    let nightly = nightly_toolchain(&rustup, &mut installed)?;
    nightly_components(&rustup, &mut installed)?;
    let active = active_components(&rustup, workspace, &mut installed)?;
    debian_packages(&mut installed)?;
    // Before bpf-linker: building it needs this LLVM.
    let llvm = llvm_config()?;
    let linker = bpf_linker(workspace, &mut installed)?;

    let present = format!(
        "nightly {nightly} with {}, {active} with {}, {} Debian packages, llvm {llvm}, \
         bpf-linker {linker}",
        NIGHTLY_COMPONENTS.join(" and "),
        ACTIVE_COMPONENTS.join(" and "),
        DEBIAN_PACKAGES.len(),
    );
    let elapsed = start.elapsed().as_secs_f64();
    if installed.is_empty() {
        println!("setup: everything present ({present}) in {elapsed:.1}s");
    } else {
        println!(
            "setup: installed {}; everything present now ({present}) in {elapsed:.1}s",
            installed.join(", ")
        );
    }
    Ok(())
}

fn rustup() -> Result<PathBuf> {
    let found = cmd::find_tool("rustup").ok_or_else(|| {
        anyhow!(
            "rustup not found on PATH nor in {}. To fix: install it from https://rustup.rs \
             (the eBPF build runs `rustup run nightly cargo build`)",
            cargo_bin_display()
        )
    })?;
    put_on_path(&found, "rustup")?;
    Ok(found.path)
}

fn nightly_toolchain(rustup: &Path, installed: &mut Vec<String>) -> Result<String> {
    let list = cmd::output(Command::new(rustup).args(["toolchain", "list"]))?;
    if !has_nightly(&list) {
        let mut install = Command::new(rustup);
        install.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]);
        println!(
            "setup: nightly toolchain: missing, installing: {}",
            cmd::display(&install)
        );
        cmd::run_tee(&mut install).context(
            "installing the nightly toolchain failed. To fix: check that this machine can reach \
             static.rust-lang.org, then run `rustup toolchain install nightly --profile minimal` \
             and `cargo xtask setup` again",
        )?;
        installed.push("nightly toolchain".into());
    }
    let version = cmd::output(Command::new(rustup).args(["run", NIGHTLY, "rustc", "--version"]))
        .context("the nightly toolchain is installed but its rustc does not run. To fix: `rustup toolchain uninstall nightly`, then `cargo xtask setup`")?;
    let version = version.trim();
    println!("setup: nightly toolchain: ok ({version})");
    rustc_release(version)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("unexpected `rustc --version` output from nightly: {version:?}"))
}

fn nightly_components(rustup: &Path, installed: &mut Vec<String>) -> Result<()> {
    let list = cmd::output(Command::new(rustup).args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))?;
    let missing = missing_components(&list, NIGHTLY_COMPONENTS);
    if !missing.is_empty() {
        let mut add = Command::new(rustup);
        add.args(["component", "add"])
            .args(&missing)
            .args(["--toolchain", NIGHTLY]);
        println!(
            "setup: nightly components: {} missing, installing: {}",
            missing.join(", "),
            cmd::display(&add)
        );
        cmd::run_tee(&mut add).with_context(|| {
            format!(
                "adding {} to the nightly toolchain failed. To fix: check network access, then \
                 run `{}` by hand",
                missing.join(", "),
                cmd::display(&add)
            )
        })?;
        installed.extend(missing.iter().map(|c| format!("{c} (nightly)")));
    }
    println!(
        "setup: nightly components: ok ({})",
        NIGHTLY_COMPONENTS.join(", ")
    );
    Ok(())
}

/// rustfmt and clippy on the toolchain that `cargo` in the workspace resolves to (the default, a
/// `rust-toolchain.toml`, or `RUSTUP_TOOLCHAIN`).
fn active_components(
    rustup: &Path,
    workspace: &Path,
    installed: &mut Vec<String>,
) -> Result<String> {
    let active = cmd::output(
        Command::new(rustup)
            .args(["show", "active-toolchain"])
            .current_dir(workspace),
    )?;
    let active = active
        .split_whitespace()
        .next()
        .unwrap_or("active")
        .to_owned();
    let list = cmd::output(
        Command::new(rustup)
            .args(["component", "list", "--installed"])
            .current_dir(workspace),
    )?;
    let missing = missing_components(&list, ACTIVE_COMPONENTS);
    if !missing.is_empty() {
        let mut add = Command::new(rustup);
        add.args(["component", "add"])
            .args(&missing)
            .current_dir(workspace);
        println!(
            "setup: {active} components: {} missing, installing: {}",
            missing.join(", "),
            cmd::display(&add)
        );
        cmd::run_tee(&mut add).with_context(|| {
            format!(
                "adding {} to {active} failed. To fix: check network access, then run `{}` in \
                 {} by hand",
                missing.join(", "),
                cmd::display(&add),
                workspace.display()
            )
        })?;
        installed.extend(missing.iter().map(|c| format!("{c} ({active})")));
    }
    println!(
        "setup: {active} components: ok ({})",
        ACTIVE_COMPONENTS.join(", ")
    );
    Ok(active)
}

fn debian_packages(installed: &mut Vec<String>) -> Result<()> {
    let mut missing = missing_debian_packages().context(
        "could not ask dpkg which packages are installed: setup only knows Debian-like systems",
    )?;
    if !missing.is_empty() {
        if !cmd::is_root() {
            bail!(
                "missing Debian packages: {list}. Installing them needs root. To fix: run \
                 `cargo xtask setup` as root, or `sudo apt-get update && sudo apt-get install -y \
                 {list}`",
                list = missing.join(" ")
            );
        }
        let mut update = Command::new("apt-get");
        update.arg("update");
        println!(
            "setup: Debian packages: {} missing, running: {}",
            missing.join(" "),
            cmd::display(&update)
        );
        cmd::run_tee(&mut update).context(
            "`apt-get update` failed. To fix: check the apt sources (/etc/apt/sources.list*, \
             bookworm-security is needed for LLVM 22) and network access",
        )?;
        let mut install = Command::new("apt-get");
        install
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing);
        println!(
            "setup: Debian packages: installing: {}",
            cmd::display(&install)
        );
        cmd::run_tee(&mut install).with_context(|| {
            format!(
                "installing {} failed. To fix: check that apt can see them (`apt-cache policy \
                 {}`; LLVM 22 comes from bookworm-security)",
                missing.join(" "),
                missing.join(" ")
            )
        })?;
        installed.append(&mut missing);
        let still = missing_debian_packages()?;
        if !still.is_empty() {
            bail!(
                "apt-get install succeeded but dpkg still lists these as not installed: {}",
                still.join(" ")
            );
        }
    }
    println!("setup: Debian packages: ok ({})", DEBIAN_PACKAGES.join(" "));
    Ok(())
}

fn missing_debian_packages() -> Result<Vec<String>> {
    // dpkg-query exits 1 if it knows nothing of a package, but still reports the others.
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package}\t${Status}\n"])
        .args(DEBIAN_PACKAGES);
    let (_status, stdout, _stderr) = cmd::output_any_status(&mut query)?;
    Ok(missing_packages(&stdout, DEBIAN_PACKAGES)
        .into_iter()
        .map(str::to_owned)
        .collect())
}

fn llvm_config() -> Result<String> {
    let path = format!("{LLVM_PREFIX}/bin/llvm-config");
    let version = cmd::output(Command::new(&path).arg("--version")).with_context(|| {
        format!(
            "{path} does not run. To fix: `apt-get install llvm-22-dev` (from bookworm-security)"
        )
    })?;
    let version = version.trim().to_owned();
    if llvm_major(&version) != Some(LLVM_MAJOR) {
        bail!(
            "`{path} --version` says {version:?}, expected {LLVM_MAJOR}.x. To fix: reinstall \
             llvm-22-dev (`apt-get install --reinstall llvm-22-dev`)"
        );
    }
    println!("setup: LLVM: ok ({path} --version: {version})");
    Ok(version)
}

/// What is wrong with the installed bpf-linker, if anything.
enum LinkerState {
    Ok { version: String, llvm: String },
    Missing,
    Unusable(String),
}

fn bpf_linker(workspace: &Path, installed: &mut Vec<String>) -> Result<String> {
    let found = cmd::find_tool("bpf-linker");
    let state = probe_bpf_linker(found.as_ref());
    let (version, llvm) = match state {
        LinkerState::Ok { version, llvm } => (version, llvm),
        LinkerState::Missing | LinkerState::Unusable(_) => {
            let why = match &state {
                LinkerState::Unusable(why) => why.clone(),
                _ => "not installed".to_owned(),
            };
            install_bpf_linker(workspace, &why, found.is_some())?;
            installed.push("bpf-linker".into());
            let found = cmd::find_tool("bpf-linker");
            match probe_bpf_linker(found.as_ref()) {
                LinkerState::Ok { version, llvm } => (version, llvm),
                LinkerState::Missing => bail!(
                    "cargo install bpf-linker succeeded but bpf-linker is neither on PATH nor in \
                     {}",
                    cargo_bin_display()
                ),
                LinkerState::Unusable(why) => {
                    bail!("bpf-linker was just installed but is still unusable: {why}")
                }
            }
        }
    };
    // rustc finds the linker on PATH, also when aya-build runs it from lb-userspace's build script.
    if let Some(found) = cmd::find_tool("bpf-linker") {
        put_on_path(&found, "bpf-linker")?;
    }
    println!("setup: bpf-linker: ok ({version}, {llvm})");
    Ok(version
        .strip_prefix("bpf-linker ")
        .unwrap_or(&version)
        .to_owned())
}

fn probe_bpf_linker(found: Option<&Found>) -> LinkerState {
    let Some(found) = found else {
        return LinkerState::Missing;
    };
    let version = match cmd::output(Command::new(&found.path).arg("--version")) {
        Ok(v) => v.trim().to_owned(),
        Err(e) => return LinkerState::Unusable(format!("`--version` fails: {e:#}")),
    };
    // A bpf-linker built against another LLVM would produce objects our LLVM 22 toolchain (and
    // rustc's bitcode) disagree with. ldd is a cheap way to see which libLLVM it loads; a
    // statically linked build shows none, and we take it on trust.
    let llvm = match cmd::output_any_status(Command::new("ldd").arg(&found.path)) {
        Err(_) => "ldd not available, LLVM version not checked".to_owned(),
        Ok((_status, stdout, _stderr)) => match ldd_llvm(&stdout) {
            LddLlvm::None => "no shared libLLVM: statically linked".to_owned(),
            LddLlvm::NotFound(lib) => {
                return LinkerState::Unusable(format!("it needs {lib}, which is not installed"))
            }
            LddLlvm::Linked { lib, major } if major == LLVM_MAJOR => format!("linked to {lib}"),
            LddLlvm::Linked { lib, .. } => {
                return LinkerState::Unusable(format!(
                    "it is linked to {lib}, not LLVM {LLVM_MAJOR}"
                ))
            }
        },
    };
    LinkerState::Ok { version, llvm }
}

fn install_bpf_linker(workspace: &Path, why: &str, replace: bool) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let install = |locked: bool| {
        let mut c = Command::new(&cargo);
        c.env("LLVM_PREFIX", LLVM_PREFIX)
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{LLVM_MAJOR}"))
            .current_dir(workspace);
        if locked {
            c.arg("--locked");
        }
        if replace {
            // Without it cargo keeps an installed bpf-linker of the same version.
            c.arg("--force");
        }
        c
    };
    let start = Instant::now();
    let mut locked = install(true);
    println!(
        "setup: bpf-linker: {why}, installing (takes a few minutes): {}",
        cmd::display(&locked)
    );
    let result = match cmd::run_tee(&mut locked) {
        Ok(()) => Ok(()),
        Err(e) => {
            let mut unlocked = install(false);
            println!(
                "setup: bpf-linker: the --locked install failed ({}), retrying: {}",
                first_line(&format!("{e:#}")),
                cmd::display(&unlocked)
            );
            cmd::run_tee(&mut unlocked)
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    result.with_context(|| {
        format!(
            "installing bpf-linker failed after {elapsed:.0}s. To fix: make sure llvm-22-dev, \
             libclang-22-dev, libpolly-22-dev and libzstd-dev are installed (`cargo xtask setup` \
             as root) and crates.io is reachable, then run the command above by hand"
        )
    })?;
    println!("setup: bpf-linker: installed in {elapsed:.1}s");
    Ok(())
}

/// Makes sure commands we start find `found` by name (`rustup run` and rustc look tools up on
/// PATH), when it was only found in ~/.cargo/bin.
fn put_on_path(found: &Found, name: &str) -> Result<()> {
    if found.on_path {
        return Ok(());
    }
    let dir = found.path.parent().expect("a tool path has a directory");
    println!(
        "setup: {name} is in {}, which is not on PATH: adding it for the commands xtask runs \
         (add it to your shell's PATH too)",
        dir.display()
    );
    cmd::add_to_path(dir)
}

fn cargo_bin_display() -> String {
    cmd::cargo_bin_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "~/.cargo/bin".into())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

// --- Parsing of tool output (pure, unit-tested) ---

/// Whether `rustup toolchain list` shows the floating `nightly` toolchain
/// (`nightly-x86_64-unknown-linux-gnu (default)`), not only dated ones (`nightly-2024-01-01-...`),
/// which `rustup run nightly` does not use.
fn has_nightly(toolchain_list: &str) -> bool {
    toolchain_list.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or("");
        name == NIGHTLY
            || name
                .strip_prefix("nightly-")
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| !c.is_ascii_digit())
    })
}

/// Which of `wanted` are absent from `rustup component list --installed` (lines such as
/// `rust-src` or `clippy-x86_64-unknown-linux-gnu`).
fn missing_components<'a>(installed: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    wanted
        .iter()
        .copied()
        .filter(|want| {
            !installed.lines().map(str::trim).any(|line| {
                line == *want
                    || line
                        .strip_prefix(want)
                        .is_some_and(|rest| rest.starts_with('-'))
            })
        })
        .collect()
}

/// Which of `wanted` dpkg does not report as `install ok installed`, from the output of
/// `dpkg-query -W -f='${Package}\t${Status}\n' PKG...`. A package dpkg knows nothing of has no
/// line at all; a removed one is `deinstall ok config-files`.
fn missing_packages<'a>(dpkg_output: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    wanted
        .iter()
        .copied()
        .filter(|want| {
            !dpkg_output.lines().any(|line| {
                let mut fields = line.splitn(2, '\t');
                let name = fields.next().unwrap_or("").trim();
                let status = fields.next().unwrap_or("").trim();
                // Multi-arch packages may be reported as name:arch.
                let name = name.split(':').next().unwrap_or(name);
                name == *want && status == "install ok installed"
            })
        })
        .collect()
}

/// `1.97.0-nightly` from `rustc 1.97.0-nightly (e50aa6fba 2026-05-19)`.
fn rustc_release(version: &str) -> Option<&str> {
    let mut words = version.split_whitespace();
    (words.next()? == "rustc").then_some(())?;
    words.next()
}

/// The major version of `llvm-config --version` output (`22.1.8`).
fn llvm_major(version: &str) -> Option<u32> {
    version.trim().split('.').next()?.parse().ok()
}

#[derive(Debug, PartialEq)]
enum LddLlvm {
    /// No libLLVM in the list (static build, or ldd's "not a dynamic executable").
    None,
    /// `libLLVM.so.22.1 => not found`.
    NotFound(String),
    Linked {
        lib: String,
        major: u32,
    },
}

/// The libLLVM an executable loads, from `ldd` output. Names seen in the wild:
/// `libLLVM.so.22.1` (Debian 22), `libLLVM-17.so.1` / `libLLVM-17.so` (older Debian), `libLLVM.so.18`.
fn ldd_llvm(ldd_output: &str) -> LddLlvm {
    for line in ldd_output.lines() {
        let line = line.trim();
        let Some(start) = line.find("libLLVM") else {
            continue;
        };
        let lib = line[start..].split_whitespace().next().unwrap_or("");
        if line.contains("=> not found") {
            return LddLlvm::NotFound(lib.to_owned());
        }
        let rest = &lib["libLLVM".len()..];
        let rest = rest
            .strip_prefix(".so.")
            .or_else(|| rest.strip_prefix('-'))
            .unwrap_or("");
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(major) = digits.parse() {
            return LddLlvm::Linked {
                lib: lib.to_owned(),
                major,
            };
        }
    }
    LddLlvm::None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nightly_detection() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n\
                    1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(list));
        assert!(has_nightly("nightly-aarch64-unknown-linux-gnu (default)\n"));
        assert!(!has_nightly("stable-x86_64-unknown-linux-gnu (default)\n"));
        assert!(!has_nightly(
            "nightly-2024-01-01-x86_64-unknown-linux-gnu\nstable-x86_64-unknown-linux-gnu\n"
        ));
        assert!(!has_nightly("no installed toolchains\n"));
        assert!(!has_nightly(""));
    }

    #[test]
    fn component_detection() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\n\
                    rust-docs-x86_64-unknown-linux-gnu\nrust-src\n\
                    rust-std-x86_64-unknown-linux-gnu\nrustc-x86_64-unknown-linux-gnu\n";
        assert!(missing_components(list, &["rust-src", "clippy"]).is_empty());
        assert_eq!(
            missing_components(list, &["rustfmt", "clippy"]),
            ["rustfmt"]
        );
        let minimal = "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n\
                       rustc-x86_64-unknown-linux-gnu\n";
        assert_eq!(
            missing_components(minimal, &["rust-src", "clippy"]),
            ["rust-src", "clippy"]
        );
        // rust-src must not match rust-std or a bogus prefix.
        assert_eq!(
            missing_components("rust-srcfoo\n", &["rust-src"]),
            ["rust-src"]
        );
    }

    #[test]
    fn package_detection() {
        let out = "llvm-22-dev\tinstall ok installed\n\
                   libzstd-dev\tinstall ok installed\n\
                   ethtool\tdeinstall ok config-files\n\
                   procps:amd64\tinstall ok installed\n";
        assert_eq!(
            missing_packages(
                out,
                &[
                    "llvm-22-dev",
                    "libzstd-dev",
                    "ethtool",
                    "procps",
                    "bogus-pkg"
                ]
            ),
            ["ethtool", "bogus-pkg"]
        );
        assert_eq!(missing_packages("", &["iproute2"]), ["iproute2"]);
    }

    #[test]
    fn dpkg_query_on_this_machine() {
        // Runs the real query with a package no system has: it must be reported missing, and the
        // exit status 1 that dpkg-query gives for it must not hide the real answers.
        if cmd::find_tool("dpkg-query").is_none() {
            return;
        }
        let mut query = Command::new("dpkg-query");
        query.args([
            "-W",
            "-f=${Package}\t${Status}\n",
            "xtask-bogus-package",
            "dpkg",
        ]);
        let (status, stdout, _) = cmd::output_any_status(&mut query).unwrap();
        assert!(!status.success());
        assert_eq!(
            missing_packages(&stdout, &["xtask-bogus-package", "dpkg"]),
            ["xtask-bogus-package"]
        );
    }

    #[test]
    fn version_parsing() {
        assert_eq!(
            rustc_release("rustc 1.97.0-nightly (e50aa6fba 2026-05-19)"),
            Some("1.97.0-nightly")
        );
        assert_eq!(rustc_release("error: something"), None);
        assert_eq!(llvm_major("22.1.8\n"), Some(22));
        assert_eq!(llvm_major("21.1.0"), Some(21));
        assert_eq!(llvm_major(""), None);
    }

    #[test]
    fn ldd_parsing() {
        let debian22 = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f8ab0e00000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f8ab0c00000)\n";
        assert_eq!(
            ldd_llvm(debian22),
            LddLlvm::Linked {
                lib: "libLLVM.so.22.1".into(),
                major: 22
            }
        );
        let old = "\tlibLLVM-17.so.1 => /lib/x86_64-linux-gnu/libLLVM-17.so.1 (0x1)\n";
        assert_eq!(
            ldd_llvm(old),
            LddLlvm::Linked {
                lib: "libLLVM-17.so.1".into(),
                major: 17
            }
        );
        assert_eq!(
            ldd_llvm("\tlibLLVM.so.22.1 => not found\n"),
            LddLlvm::NotFound("libLLVM.so.22.1".into())
        );
        assert_eq!(ldd_llvm("\tnot a dynamic executable\n"), LddLlvm::None);
        assert_eq!(ldd_llvm("\tstatically linked\n"), LddLlvm::None);
    }
}
