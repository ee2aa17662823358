//! lb-cni: the chained CNI plugin (run by the container runtime with CNI_COMMAND set), and its
//! installer (`lb-cni install` / `lb-cni uninstall`, run by the DaemonSet).
use std::{
    io::{Read, Write},
    path::PathBuf,
};

use clap::{Parser, Subcommand};
use lb_userspace::cni::{self, install, CniError, Environment, Output};

#[derive(Parser, Debug)]
#[command(
    name = "lb-cni",
    version,
    about = "Chained CNI plugin attaching the lb data path to every pod; run by the container \
             runtime with CNI_COMMAND set, or with a subcommand to install it"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Copy this binary into BIN_DIR and chain lb-cni into the node's CNI configuration.
    Install {
        /// The runtime's CNI configuration directory.
        #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
        conflist_dir: PathBuf,
        /// The runtime's CNI binary directory.
        #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The agent's --bpffs, written into the plugin entry.
        #[arg(long, value_name = "DIR", default_value = cni::DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Remove the lb-cni entry from the CNI configuration and the binary from BIN_DIR.
    Uninstall {
        /// The runtime's CNI configuration directory.
        #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
        conflist_dir: PathBuf,
        /// The runtime's CNI binary directory.
        #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
    },
}

fn main() {
    if std::env::var_os("CNI_COMMAND").is_some() {
        let output = plugin();
        let _ = std::io::stdout().write_all(output.stdout.as_bytes());
        std::process::exit(output.exit_code);
    }
    let args = Args::parse();
    if let Err(e) = run_installer(args.command) {
        eprintln!("lb-cni: {e:#}");
        std::process::exit(1);
    }
}

/// One plugin invocation. A panic still yields a CNI error on stdout: the runtime shows that
/// to the user, while a bare crash leaves it guessing.
fn plugin() -> Output {
    let env = Environment::read(|name| std::env::var(name).ok());
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let error = CniError::new(
            cni::codes::DECODING_FAILURE,
            "cannot read stdin",
            e.to_string(),
        );
        return error_output(error);
    }
    std::panic::catch_unwind(|| cni::run(&env, &stdin)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        error_output(CniError::new(
            cni::codes::INTERNAL,
            "lb-cni panicked (a bug)",
            what,
        ))
    })
}

fn error_output(error: CniError) -> Output {
    let body = serde_json::json!({
        "cniVersion": "1.0.0", "code": error.code, "msg": error.msg, "details": error.details
    });
    Output {
        stdout: format!("{body}\n"),
        exit_code: 1,
    }
}

fn run_installer(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Install {
            conflist_dir,
            bin_dir,
            bpffs,
        } => {
            let me = std::env::current_exe()?;
            let changes = install::install(&conflist_dir, &bin_dir, &bpffs, &me)?;
            report("installed", &changes);
        }
        Command::Uninstall {
            conflist_dir,
            bin_dir,
        } => {
            let changes = install::uninstall(&conflist_dir, &bin_dir)?;
            report("uninstalled", &changes);
        }
    }
    Ok(())
}

fn report(what: &str, changes: &install::Changes) {
    if changes == &install::Changes::default() {
        println!("lb-cni {what}: nothing to change");
    }
    if let Some(binary) = &changes.binary {
        println!("lb-cni {what}: {}", binary.display());
    }
    for config in &changes.configs {
        println!("lb-cni {what}: edited {}", config.display());
    }
}
