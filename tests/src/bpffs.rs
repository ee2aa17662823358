//! Private bpffs mounts, so that each test's pinned maps and links are its own.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::RUN_DIR;

/// A fresh bpffs mounted at `/run/lb-tests/<tag>-<pid>-<counter>/`, in the test's mount
/// namespace (which processes from [`crate::Netns::cmd`] share). Unmounted and removed on
/// drop, which also releases whatever is pinned in it.
#[derive(Debug)]
pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    /// Creates the directory and mounts a new bpffs instance on it.
    pub fn new(tag: &str) -> Result<BpfFs> {
        crate::ensure_initialized();
        let path = Path::new(RUN_DIR).join(crate::unique_name(tag));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        if let Err(e) = mount_bpffs(&path) {
            let _ = std::fs::remove_dir(&path);
            return Err(e).with_context(|| format!("mount a bpffs on {}", path.display()));
        }
        Ok(BpfFs { path })
    }

    /// The mount point, e.g. for the agent's `--bpffs` option.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.path) {
            eprintln!("lb-tests: warning: unmount {}: {e}", self.path.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("lb-tests: warning: remove {}: {e}", self.path.display());
        }
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: all strings are NUL-terminated and outlive the call; bpffs takes no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lazily detaches `path` (MNT_DETACH: open files or running programs don't block it).
fn unmount(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: target is NUL-terminated and outlives the call.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes entries of [`RUN_DIR`] (bpffs mounts, logs) whose creating process is gone.
pub(crate) fn remove_stale_entries() {
    let Ok(entries) = std::fs::read_dir(RUN_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = name.strip_suffix(".log").unwrap_or(&name);
        if !crate::is_stale(stem) {
            continue;
        }
        let path = entry.path();
        let result = if path.is_dir() {
            // Mounts may be stacked; EINVAL means nothing (more) is mounted here.
            for _ in 0..8 {
                if unmount(&path).is_err() {
                    break;
                }
            }
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = result {
            eprintln!("lb-tests: warning: removing stale {}: {e}", path.display());
        }
    }
}
