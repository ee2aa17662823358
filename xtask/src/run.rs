//! `cargo xtask run`: the agent on this machine, for development. Builds, then replaces itself
//! with `lb-agent` (exec), so the terminal's Ctrl-C reaches the agent directly and it detaches
//! its programs as it does on SIGINT in production.
use std::{
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Result};

use crate::{cargo, cmd};

/// Where the dev agent serves /healthz and /readyz unless told otherwise: not kube-proxy's
/// 10256, which a node still running kube-proxy has taken.
pub const DEV_HEALTH_BIND_ADDRESS: &str = "127.0.0.1:10266";

#[derive(clap::Args, Debug, Default)]
pub struct RunArgs {
    /// Watch the cluster of this kubeconfig (default: $KUBECONFIG, else ~/.kube/config)
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// Read Services and EndpointSlices from this directory instead of a cluster
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Interface to attach to (repeatable; default: the pod interfaces the agent detects)
    #[arg(long = "iface", value_name = "IF")]
    pub ifaces: Vec<String>,
    /// Leave the data path attached when the agent stops (`--on-exit keep`); by default the dev
    /// agent detaches on Ctrl-C (`--on-exit detach`)
    #[arg(long)]
    pub keep_datapath: bool,
    /// Build and run the release profile
    #[arg(long)]
    pub release: bool,
    /// More lb-agent flags, after `--` (e.g. `-- --node-name worker-1`)
    #[arg(last = true, value_name = "AGENT_ARGS")]
    pub agent_args: Vec<String>,
}

/// The agent's command line. `env_kubeconfig` and `home` are $KUBECONFIG and $HOME.
pub fn agent_command(
    agent: &Path,
    args: &RunArgs,
    env_kubeconfig: Option<OsString>,
    home: Option<PathBuf>,
) -> Result<Command> {
    let mut command = Command::new(agent);
    match (&args.manifests, &args.kubeconfig) {
        (Some(dir), _) => {
            command.arg("--manifests").arg(dir);
        }
        (None, Some(file)) => {
            command.arg("--kubeconfig").arg(file);
        }
        (None, None) => {
            // KUBECONFIG may list several files; the agent takes one, so use the first.
            let from_env = env_kubeconfig
                .filter(|v| !v.is_empty())
                .and_then(|v| std::env::split_paths(&v).next());
            let file = match (from_env, home) {
                (Some(file), _) => file,
                (None, Some(home)) => home.join(".kube/config"),
                (None, None) => {
                    bail!("no kubeconfig: pass --kubeconfig FILE, set KUBECONFIG, or use --manifests DIR")
                }
            };
            if !file.is_file() {
                bail!(
                    "kubeconfig {} does not exist: pass --kubeconfig FILE or --manifests DIR",
                    file.display()
                );
            }
            command.arg("--kubeconfig").arg(file);
        }
    }
    for iface in &args.ifaces {
        command.arg("--iface").arg(iface);
    }
    command
        .arg("--on-exit")
        .arg(if args.keep_datapath { "keep" } else { "detach" });
    let health_given = args
        .agent_args
        .iter()
        .any(|a| a.starts_with("--health-bind-address"));
    if !health_given {
        command.args(["--health-bind-address", DEV_HEALTH_BIND_ADDRESS]);
    }
    command.args(&args.agent_args);
    Ok(command)
}

pub fn run(workspace: &Path, args: &RunArgs) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask run needs root: the agent loads BPF programs and attaches them \
             (e.g. `sudo -E env \"PATH=$PATH\" cargo xtask run`)"
        );
    }
    let profile = if args.release { "release" } else { "debug" };
    let agent = cargo::target_dir(workspace).join(profile).join("lb-agent");
    // Under sudo, $HOME is root's; the invoking user's kubeconfig is what a developer means.
    let home = std::env::var_os("SUDO_USER")
        .filter(|u| !u.is_empty() && u != "root")
        .map(|u| PathBuf::from("/home").join(u))
        .filter(|h| h.join(".kube/config").is_file())
        .or_else(|| std::env::var_os("HOME").map(PathBuf::from));
    let mut command = agent_command(&agent, args, std::env::var_os("KUBECONFIG"), home)?;
    println!("run: {}", cmd::display(&command));
    println!("run: Ctrl-C stops the agent and detaches its programs; the maps stay pinned");
    // Only returns on failure.
    let error = command.exec();
    bail!("starting {}: {error}", agent.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(command: &Command) -> Vec<String> {
        command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn manifests_run_passes_ifaces_and_extra_args() {
        let args = RunArgs {
            manifests: Some("examples".into()),
            ifaces: vec!["veth1".into(), "veth2".into()],
            agent_args: vec!["--node-name".into(), "n1".into()],
            ..Default::default()
        };
        let command = agent_command(Path::new("/x/lb-agent"), &args, None, None).unwrap();
        assert_eq!(
            argv(&command),
            [
                "--manifests",
                "examples",
                "--iface",
                "veth1",
                "--iface",
                "veth2",
                "--on-exit",
                "detach",
                "--health-bind-address",
                DEV_HEALTH_BIND_ADDRESS,
                "--node-name",
                "n1"
            ]
        );
    }

    #[test]
    fn kubeconfig_defaults_to_the_first_kubeconfig_entry_then_home() {
        let dir = std::env::temp_dir().join(format!("xtask-run-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".kube")).unwrap();
        let in_home = dir.join(".kube/config");
        let in_env = dir.join("other");
        std::fs::write(&in_home, "").unwrap();
        std::fs::write(&in_env, "").unwrap();
        let args = RunArgs::default();
        let agent = Path::new("lb-agent");

        let env = std::env::join_paths([&in_env, &in_home]).unwrap();
        let command = agent_command(agent, &args, Some(env), Some(dir.clone())).unwrap();
        assert_eq!(
            argv(&command)[..2],
            ["--kubeconfig".to_string(), in_env.display().to_string()]
        );

        let command = agent_command(agent, &args, None, Some(dir.clone())).unwrap();
        assert_eq!(
            argv(&command)[..2],
            ["--kubeconfig".to_string(), in_home.display().to_string()]
        );

        std::fs::remove_file(&in_home).unwrap();
        let err = agent_command(agent, &args, None, Some(dir.clone())).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keep_datapath_and_own_health_address_are_passed_through() {
        let args = RunArgs {
            kubeconfig: Some("/k".into()),
            keep_datapath: true,
            agent_args: vec!["--health-bind-address=0.0.0.0:1".into()],
            ..Default::default()
        };
        let command = agent_command(Path::new("lb-agent"), &args, None, None).unwrap();
        assert_eq!(
            argv(&command),
            [
                "--kubeconfig",
                "/k",
                "--on-exit",
                "keep",
                "--health-bind-address=0.0.0.0:1"
            ]
        );
    }
}
