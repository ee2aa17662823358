//! The agent's side of attachment: pins its program for `lb-cni`, moves existing pinned links to
//! it, attaches to the `--iface` interfaces and, in `agent` attach mode, to every interface whose
//! name matches the pod interface patterns, following netlink link events as pods come and go.
//!
//! Links are pinned exactly as `lb-cni` pins them ([`crate::attach`]), so whichever of the two
//! sees an interface first attaches it and the other leaves it alone.
use std::{
    ffi::CStr,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{programs::SchedClassifier, Ebpf};
use tracing::{debug, info, warn};

use crate::{
    attach::{self, AttachOutcome},
    loader,
    netlink::{LinkChange, RouteSocket},
};

/// Host-side interface names of common CNI plugins: `veth*` (bridge, ptp, flannel, kindnet,
/// kube-router, Docker), `cali*` (Calico), `lxc*` (Cilium), `gke*` (GKE), `eni*` (AWS VPC CNI),
/// `azv*` (Azure CNI).
pub const DEFAULT_POD_IFACE_PATTERNS: &str = "veth*,cali*,lxc*,gke*,eni*,azv*";

/// Who attaches the tc program to pod interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// The agent attaches to interfaces matching --pod-iface-pattern as they appear.
    Agent,
    /// `lb-cni`, chained after the cluster's CNI plugin, attaches each pod's interface; the agent
    /// attaches only the --iface interfaces.
    Cni,
}

/// The agent's attachment flags (flattened into its command line).
#[derive(clap::Args, Debug, Clone)]
pub struct AttachArgs {
    /// Who attaches the tc program to pod interfaces: `agent` (this agent, following interfaces
    /// whose names match --pod-iface-pattern) or `cni` (the chained `lb-cni` plugin).
    #[arg(long, value_enum, default_value_t = AttachMode::Agent, env = "LB_ATTACH_MODE")]
    pub attach_mode: AttachMode,
    /// Glob patterns (`*`, `?`) of pod interface names the agent attaches to in `agent` mode, as
    /// they appear; an empty value turns following off.
    #[arg(
        long,
        value_name = "GLOB,...",
        value_delimiter = ',',
        default_value = DEFAULT_POD_IFACE_PATTERNS,
        env = "LB_POD_IFACE_PATTERN"
    )]
    pub pod_iface_pattern: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error(transparent)]
    Attach(#[from] attach::Error),
    #[error("subscribing to netlink link events: {0}")]
    Subscribe(io::Error),
    #[error("starting the interface follower thread: {0}")]
    Thread(io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which interface names the agent attaches to by itself.
#[derive(Debug, Clone)]
struct Selection {
    explicit: Vec<String>,
    patterns: Vec<String>,
}

impl Selection {
    fn matches(&self, iface: &str) -> bool {
        self.explicit.iter().any(|e| e == iface)
            || self.patterns.iter().any(|p| glob_matches(p, iface))
    }
}

/// Sets up attachment for the agent (see the module doc). `explicit` are the `--iface` names:
/// failing to attach one of them is an error, as before pinned links existed. On kernels without
/// TCX the links cannot be pinned: the agent then attaches `explicit` (or every veth) the old
/// way, for its own lifetime, and `lb-cni` cannot be used.
pub fn attach(ebpf: &mut Ebpf, bpffs: &Path, explicit: &[String], args: &AttachArgs) -> Result<()> {
    if !attach::tcx_supported() {
        let ifaces = if explicit.is_empty() {
            loader::detect_pod_interfaces()
        } else {
            explicit.to_vec()
        };
        warn!(
            ?ifaces,
            "this kernel has no TCX (Linux 6.6+): attaching with netlink tc filters for the \
             agent's lifetime; pinned links, link events and lb-cni are unavailable"
        );
        for iface in &ifaces {
            loader::attach_tc(ebpf, iface)?;
            info!(iface, "attached tc ingress program");
        }
        return Ok(());
    }
    // The egress program first: attaching an interface opens it from its pin.
    attach::pin_egress_program(loader::tc_egress_program(ebpf)?, bpffs)?;
    let program = loader::tc_program(ebpf)?;
    let pin = attach::pin_program(program, bpffs)?;
    let adopted = attach::adopt_pinned_links(program, bpffs)?;
    info!(pin = %pin.display(), adopted, "tc program pinned; pinned links now run it");

    let patterns: Vec<String> = match args.attach_mode {
        AttachMode::Agent => args
            .pod_iface_pattern
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
        AttachMode::Cni => Vec::new(),
    };
    let selection = Selection {
        explicit: explicit.to_vec(),
        patterns,
    };
    // Subscribed before the scan, so an interface created in between is seen by one or the other.
    let events = RouteSocket::link_events().map_err(Error::Subscribe)?;
    for iface in explicit {
        let outcome = attach::attach_pinned(program, bpffs, iface)?;
        log_outcome(iface, outcome);
    }
    attach_matching(program, bpffs, &selection);
    info!(
        mode = ?args.attach_mode,
        patterns = ?selection.patterns,
        "following link events for pod interfaces"
    );
    // The thread opens the program from its pin: the `Ebpf` stays with the main thread.
    let mut follower_program = attach::pinned_program(bpffs)?;
    let bpffs: PathBuf = bpffs.into();
    std::thread::Builder::new()
        .name("pod-ifaces".into())
        .spawn(move || follow(events, &mut follower_program, &bpffs, &selection))
        .map_err(Error::Thread)?;
    Ok(())
}

fn log_outcome(iface: &str, outcome: AttachOutcome) {
    match outcome {
        AttachOutcome::Attached => info!(iface, "attached tc ingress program (pinned link)"),
        AttachOutcome::AlreadyAttached => {
            info!(
                iface,
                "already attached through its pinned link (lb-cni or an earlier agent)"
            )
        }
    }
}

/// Attaches every current interface the selection matches; failures are logged (an interface
/// may vanish while we look at it).
fn attach_matching(program: &mut SchedClassifier, bpffs: &Path, selection: &Selection) {
    if selection.patterns.is_empty() {
        return;
    }
    for iface in interface_names() {
        if selection.matches(&iface) {
            match attach::attach_pinned(program, bpffs, &iface) {
                Ok(outcome) => log_outcome(&iface, outcome),
                Err(e) => warn!(iface, "{e}"),
            }
        }
    }
}

fn follow(events: RouteSocket, program: &mut SchedClassifier, bpffs: &Path, selection: &Selection) {
    loop {
        let messages = match events.receive() {
            Ok(messages) => messages,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                warn!("link events were lost (socket buffer full): rescanning interfaces");
                attach_matching(program, bpffs, selection);
                if let Err(e) = attach::sweep_stale(bpffs) {
                    warn!("{e}");
                }
                continue;
            }
            Err(e) => {
                warn!("reading link events: {e}; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        for message in messages {
            let Some(iface) = message.name else { continue };
            match message.change {
                // Also sent for every state change: attach_pinned finds the pin and stops there.
                LinkChange::New if selection.matches(&iface) => {
                    match attach::attach_pinned(program, bpffs, &iface) {
                        Ok(AttachOutcome::Attached) => log_outcome(&iface, AttachOutcome::Attached),
                        Ok(AttachOutcome::AlreadyAttached) => {}
                        Err(e) => warn!(iface, "{e}"),
                    }
                }
                LinkChange::New => {}
                // In both modes: a pod deleted without a CNI DEL leaves a dead pin behind.
                LinkChange::Deleted => match attach::remove_if_stale(bpffs, &iface) {
                    Ok(true) => info!(iface, "interface gone: removed its pinned link"),
                    Ok(false) => debug!(iface, "interface gone"),
                    Err(e) => warn!(iface, "{e}"),
                },
            }
        }
    }
}

/// Names of the interfaces in this network namespace (`if_nameindex`, which asks the kernel
/// through netlink: /sys/class/net may belong to another namespace).
fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return names;
    }
    let mut cur = head;
    // SAFETY: every entry up to the terminating one is valid and its name NUL-terminated.
    unsafe {
        while (*cur).if_index != 0 {
            names.push(
                CStr::from_ptr((*cur).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    names
}

/// Shell-style glob with `*` (any run) and `?` (one character), matched against the whole name.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it currently stands for.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_prefixes_wildcards_and_whole_names() {
        assert!(glob_matches("veth*", "veth1a2b3c"));
        assert!(glob_matches("veth*", "veth"));
        assert!(!glob_matches("veth*", "eth0"));
        assert!(glob_matches("lbh?", "lbh3"));
        assert!(!glob_matches("lbh?", "lbh12"));
        assert!(glob_matches("*-host", "pod1-host"));
        assert!(glob_matches("a*b*c", "axxbyyc"));
        assert!(!glob_matches("a*b*c", "axxbyy"));
        assert!(glob_matches("cni0", "cni0"));
        assert!(!glob_matches("cni0", "cni01"));
    }

    #[test]
    fn default_patterns_cover_common_cni_names_but_not_bridges_or_uplinks() {
        let selection = Selection {
            explicit: vec!["lbh0".into()],
            patterns: DEFAULT_POD_IFACE_PATTERNS
                .split(',')
                .map(String::from)
                .collect(),
        };
        for name in [
            "veth12ab", "cali0123", "lxc9f", "gke77", "eni3", "azv1", "lbh0",
        ] {
            assert!(selection.matches(name), "{name}");
        }
        for name in ["eth0", "cni0", "docker0", "lo", "lbh1", "cilium_host"] {
            assert!(!selection.matches(name), "{name}");
        }
    }
}
