//! Builds the kernel object (`lb-ebpf`, binary `lb`) with the nightly toolchain through aya-build
//! and leaves it in OUT_DIR, where src/loader.rs embeds it.
use std::{path::PathBuf, process::Command};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../lb-ebpf").canonicalize()?;
    check_toolchain()?;
    let root_dir = ebpf_dir.to_str().expect("lb-ebpf path is not UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Fails early with the fix, instead of a cargo error from deep inside the nightly build.
fn check_toolchain() -> anyhow::Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    if !matches!(nightly, Ok(ref o) if o.status.success()) {
        anyhow::bail!(
            "building the eBPF object needs the nightly toolchain with rust-src; run `cargo xtask setup`"
        );
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(linker, Ok(ref o) if o.status.success()) {
        anyhow::bail!("bpf-linker was not found on PATH; run `cargo xtask setup` (it installs bpf-linker for LLVM 22 into ~/.cargo/bin)");
    }
    Ok(())
}
