//! `lb-agent cleanup`: removes everything the agent (and lb-cni) pinned under a `--bpffs`
//! directory, which detaches the data path, and the bpffs mount if the agent made it.
//!
//! - Links: every pin under `links/`, `links-egress/`, `links-xdp/` and `links-cgroup/` (at any
//!   depth). A pinned
//!   link lives only as long as its pin, so removing the pin detaches it (the kernel frees it
//!   after an RCU grace period).
//! - Programs: everything under `progs/`, including temporary pins of an interrupted restart.
//! - Maps: the agent's maps, `LB_META`, and a conntrack map left aside by an interrupted upgrade.
//! - Then the empty directories; and when the agent mounted the bpffs on this directory itself
//!   (it leaves a `mounted_by_lb_agent` directory there), the mount and the directory. A bpffs the
//!   agent found already mounted (by systemd on /sys/fs/bpf, by a DaemonSet hostPath, by a test)
//!   belongs to whoever mounted it and stays.
//!
//! Anything else found under the directory is not ours: it is left and reported, and the command
//! fails so a script notices. Refused while an agent runs on the directory (it holds the lock):
//! removing the pins under a running agent would detach the data path it believes it serves.
use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
};

use lb_common::map_names;

use crate::{attach, cgroup_hooks, loader, pin_lock, upgrade};

/// Where the XDP links are pinned, one per interface (`<bpffs>/links-xdp/<ifname>`).
pub const XDP_LINK_PIN_DIR: &str = "links-xdp";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "an lb-agent is running with --bpffs {dir} (it holds the directory's lock): stop it first; \
         cleanup would detach the data path under it"
    )]
    AgentRunning { dir: PathBuf },
    #[error(transparent)]
    Lock(pin_lock::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Loader(#[from] loader::Error),
}

/// What cleanup did.
#[derive(Debug, Default)]
pub struct Report {
    /// Pins and directories removed, in order.
    pub removed: Vec<PathBuf>,
    /// Entries that are not the agent's, left in place.
    pub left: Vec<PathBuf>,
    /// The bpffs mount the agent had made on the directory was removed.
    pub unmounted: bool,
    /// The directory is not on a bpffs (nothing can be pinned there).
    pub not_bpffs: bool,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

/// Removes what the agent pinned under `dir`. See the module documentation.
pub fn cleanup(dir: &Path) -> Result<Report, Error> {
    let mut report = Report::default();
    if !dir.exists() {
        return Ok(report);
    }
    if !loader::is_bpffs(dir)? {
        report.not_bpffs = true;
        return Ok(report);
    }
    let lock = match pin_lock::PinDirLock::acquire(dir) {
        Ok(lock) => lock,
        Err(pin_lock::Error::Busy { .. }) => return Err(Error::AgentRunning { dir: dir.into() }),
        Err(e) => return Err(Error::Lock(e)),
    };
    for sub in [
        attach::LINK_PIN_DIR,
        attach::EGRESS_LINK_PIN_DIR,
        XDP_LINK_PIN_DIR,
        cgroup_hooks::CGROUP_LINK_PIN_DIR,
        attach::PROGRAM_PIN_DIR,
    ] {
        let path = dir.join(sub);
        if !path.is_dir() {
            continue;
        }
        // lb-cni takes this lock to attach; hold it so no attachment appears while we remove.
        let _links_lock = if sub == attach::LINK_PIN_DIR {
            Some(flock(&path)?)
        } else {
            None
        };
        remove_tree(&path, &mut report)?;
    }
    let maps = loader::PINNED_MAPS
        .iter()
        .map(|(name, _, _)| *name)
        .chain([map_names::META, upgrade::CONNTRACK_V1_ASIDE]);
    for name in maps {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => report.removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &path)(e)),
        }
    }
    let marker = dir.join(loader::MOUNT_MARKER);
    let ours = marker.is_dir();
    for entry in std::fs::read_dir(dir)
        .map_err(io("listing", dir))?
        .flatten()
    {
        let path = entry.path();
        // The kernel's own files at the root of a bpffs mount (maps.debug, progs.debug from
        // bpf_preload): bpffs refuses dots in the names of pins and directories, so a dotted name
        // was made by the kernel, not by anyone's pin.
        let kernel_made = entry.file_name().to_string_lossy().contains('.');
        if path != marker && !kernel_made {
            report.left.push(path);
        }
    }
    drop(lock);
    if ours && report.left.is_empty() {
        std::fs::remove_dir(&marker).map_err(io("removing", &marker))?;
        report.removed.push(marker);
        unmount(dir)?;
        report.unmounted = true;
        // The mount point, created by the agent too; a non-empty one stays (and is not ours).
        if std::fs::remove_dir(dir).is_ok() {
            report.removed.push(dir.into());
        }
    }
    Ok(report)
}

/// Removes `path` and everything below it, recording each removal.
fn remove_tree(path: &Path, report: &mut Report) -> Result<(), Error> {
    let meta = std::fs::symlink_metadata(path).map_err(io("reading", path))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io("listing", path))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for entry in entries {
            remove_tree(&entry, report)?;
        }
        std::fs::remove_dir(path).map_err(io("removing", path))?;
    } else {
        std::fs::remove_file(path).map_err(io("removing", path))?;
    }
    report.removed.push(path.into());
    Ok(())
}

fn flock(dir: &Path) -> Result<File, Error> {
    let file = File::open(dir).map_err(io("opening", dir))?;
    loop {
        // SAFETY: flock on a descriptor we own; it only blocks.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(file);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io("locking", dir)(e));
        }
    }
}

fn unmount(dir: &Path) -> Result<(), Error> {
    let target = CString::new(dir.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: `target` is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io("unmounting", dir)(std::io::Error::last_os_error()));
    }
    Ok(())
}
