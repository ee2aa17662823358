//! The host-process socket hooks: four cgroup v2 sock_addr programs attached to the agent's
//! `--cgroup` through pinned bpf_links, so they keep translating while the agent restarts, and
//! adopted (`BPF_LINK_UPDATE`) by the next agent.
//!
//! ```text
//! <bpffs>/links-cgroup/connect4      one pinned link per hook, attached to the --cgroup directory
//! <bpffs>/links-cgroup/sendmsg4
//! <bpffs>/links-cgroup/recvmsg4
//! <bpffs>/links-cgroup/getpeername4
//! ```
//!
//! A cgroup bpf_link always attaches as one of many (the kernel takes no flags for it, and
//! behaves as with `BPF_F_ALLOW_MULTI`): programs of other tools on the same cgroup keep running, and two agents on nested cgroups both see a socket of the inner one (the inner
//! one's programs run first; once they have translated the address, the outer ones find a
//! backend, not a frontend, and leave it alone).
use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, ProgramError},
    Ebpf,
};
use lb_common::program_names;

use crate::bpf_link;
use tracing::info;

/// Directory (under the bpffs dir) of the pinned cgroup links.
pub const CGROUP_LINK_PIN_DIR: &str = "links-cgroup";

/// The hooks: pin name, program name, kernel attach type (`enum bpf_attach_type`).
pub const HOOKS: [(&str, &str, u32); 4] = [
    ("connect4", program_names::SOCK_CONNECT4, 10),
    ("sendmsg4", program_names::SOCK_SENDMSG4, 14),
    ("recvmsg4", program_names::SOCK_RECVMSG4, 19),
    ("getpeername4", program_names::SOCK_GETPEERNAME4, 29),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--cgroup not given and no cgroup2 mount found in /proc/self/mounts: host processes \
         cannot be served; mount cgroup2 or name the cgroup with --cgroup"
    )]
    NoCgroup2,
    #[error("reading /proc/self/mounts: {0}")]
    Mounts(io::Error),
    #[error("opening the cgroup {path} (--cgroup): {source}")]
    OpenCgroup { path: PathBuf, source: io::Error },
    #[error("--cgroup {path} is not a cgroup v2 directory (no cgroup.procs in it)")]
    NotCgroup2 { path: PathBuf },
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("loading program {name} into the kernel: {source}")]
    Load {
        name: &'static str,
        source: ProgramError,
    },
    #[error("attaching {name} to the cgroup {cgroup}: {source}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        source: ProgramError,
    },
    #[error("the cgroup attachment of {name} is not a bpf_link: {source}")]
    NotLink {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("pinning the link of {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "pointing the pinned link {path} at the new program {name} (BPF_LINK_UPDATE): {source}"
    )]
    Update {
        name: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The cgroup2 mount point in `mounts` (the text of `/proc/self/mounts`): the last one listed,
/// which is the visible one when several are stacked (in a container, the host's `/sys/fs/cgroup`
/// mounted over the runtime's own view of the container's cgroup).
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

/// The cgroup2 mount point of this machine: where the hooks go without `--cgroup`.
pub fn default_cgroup() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(Error::Mounts)?;
    cgroup2_mount_in(&mounts).ok_or(Error::NoCgroup2)
}

/// Loads the four programs of a loaded object into the kernel.
pub fn load(ebpf: &mut Ebpf) -> Result<()> {
    for (_, name, _) in HOOKS {
        program(ebpf, name)?
            .load()
            .map_err(|source| Error::Load { name, source })?;
    }
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr> {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(Error::MissingProgram(name))
}

/// `<bpffs>/links-cgroup/<hook>`.
pub fn link_pin_path(bpffs: &Path, hook: &str) -> PathBuf {
    bpffs.join(CGROUP_LINK_PIN_DIR).join(hook)
}

/// How the hooks were set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// New links.
    Attached,
    /// The previous agent's links on the same cgroup now run this agent's programs.
    Adopted,
}

/// Attaches the four hooks to `cgroup` (or adopts the links pinned for it). Links pinned for
/// another cgroup (the flag changed) are replaced: the new link is made first, then the old pin
/// removed, so sockets of the new cgroup are never without a hook once this returns.
pub fn attach_all(ebpf: &mut Ebpf, bpffs: &Path, cgroup: &Path) -> Result<Outcome> {
    if !cgroup.join("cgroup.procs").is_file() || !cgroup.join("cgroup.controllers").is_file() {
        return Err(Error::NotCgroup2 {
            path: cgroup.into(),
        });
    }
    let dir = File::open(cgroup).map_err(|source| Error::OpenCgroup {
        path: cgroup.into(),
        source,
    })?;
    let cgroup_id = dir
        .metadata()
        .map_err(|source| Error::OpenCgroup {
            path: cgroup.into(),
            source,
        })?
        .ino();
    let pin_dir = bpffs.join(CGROUP_LINK_PIN_DIR);
    std::fs::create_dir_all(&pin_dir).map_err(|source| Error::Io {
        op: "creating",
        path: pin_dir.clone(),
        source,
    })?;
    let mut outcome = Outcome::Adopted;
    for (hook, name, attach_type) in HOOKS {
        let path = link_pin_path(bpffs, hook);
        let prog = program(ebpf, name)?;
        if let Some(link) = open_pinned(&path)? {
            let info = link_info(&link, &path)?;
            if info.cgroup_id == cgroup_id && info.attach_type == attach_type {
                let prog_fd = prog
                    .fd()
                    .map_err(|source| Error::Load { name, source })?
                    .as_fd()
                    .as_raw_fd();
                bpf_link::update_link(&link, prog_fd).map_err(|source| Error::Update {
                    name,
                    path: path.clone(),
                    source,
                })?;
                continue;
            }
        }
        outcome = Outcome::Attached;
        let id = prog
            // A link takes no attach flags; it is one of many by nature.
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(|source| Error::Attach {
                name,
                cgroup: cgroup.into(),
                source,
            })?;
        let link = prog.take_link(id).map_err(|source| Error::Attach {
            name,
            cgroup: cgroup.into(),
            source,
        })?;
        let link = FdLink::try_from(link).map_err(|source| Error::NotLink { name, source })?;
        unpin(&path)?;
        link.pin(&path).map_err(|source| Error::Pin {
            name,
            path: path.clone(),
            source,
        })?;
    }
    match outcome {
        Outcome::Attached => {
            info!(cgroup = %cgroup.display(), "host-process socket hooks attached")
        }
        Outcome::Adopted => info!(
            cgroup = %cgroup.display(),
            "host-process socket hooks of the previous agent now run this agent's programs"
        ),
    }
    Ok(outcome)
}

/// Removes the pinned cgroup links under `bpffs`, which detaches them; returns how many.
pub fn detach_all(bpffs: &Path) -> Result<usize> {
    let mut n = 0;
    for (hook, _, _) in HOOKS {
        if unpin(&link_pin_path(bpffs, hook))? {
            n += 1;
        }
    }
    Ok(n)
}

fn unpin(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::Io {
            op: "removing",
            path: path.into(),
            source,
        }),
    }
}

/// What the kernel says about a pinned cgroup link.
struct CgroupLinkInfo {
    /// 0 once the cgroup is gone (the kernel detached the link).
    cgroup_id: u64,
    attach_type: u32,
}

/// The link pinned at `path`, `None` without a pin.
fn open_pinned(path: &Path) -> Result<Option<OwnedFd>> {
    bpf_link::open_pinned(path).map_err(|source| Error::Io {
        op: "opening the pinned link",
        path: path.into(),
        source,
    })
}

fn link_info(link: &OwnedFd, path: &Path) -> Result<CgroupLinkInfo> {
    let info = bpf_link::link_info(link).map_err(|source| Error::Io {
        op: "reading the info of the pinned link",
        path: path.into(),
        source,
    })?;
    let (cgroup_id, attach_type) = info.cgroup_id_and_attach_type();
    Ok(CgroupLinkInfo {
        cgroup_id,
        attach_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_among_v1_hierarchies() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
        let stacked = "cgroup2 /sys/fs/cgroup cgroup2 ro,nsdelegate 0 0\n\
                       cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(stacked),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }
}
