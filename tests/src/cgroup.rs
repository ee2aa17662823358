//! cgroup v2 directories for the agent's `--cgroup`: the host-process socket hooks act on every
//! process in the cgroup, so a test gives its agent a cgroup of its own (never the root, which
//! would translate the sockets of every other test on the machine).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};

/// A cgroup `lbt-<tag>-<pid>-<counter>` under the cgroup2 mount, removed on drop (after the
/// processes in it have exited: drop it after their guards).
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

/// The cgroup2 mount point, from `/proc/self/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount in /proc/self/mounts: the host-process tests need cgroup v2")
}

impl TestCgroup {
    /// Creates the cgroup.
    pub fn new(tag: &str) -> Result<TestCgroup> {
        crate::ensure_initialized();
        let path = cgroup2_mount()?.join(format!("lbt-{}", crate::unique_name(tag)));
        std::fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    /// The cgroup directory, for the agent's `--cgroup`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd`'s process join this cgroup before exec, so every socket it opens is in it.
    pub fn add_on_spawn(&self, cmd: &mut Command) {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOENT));
        // SAFETY: runs between fork and exec, where only async-signal-safe code is allowed: one
        // write(2) of a constant ("0" is the writing process) on a descriptor opened before the
        // fork; io::Error from errno allocates nothing.
        unsafe {
            cmd.pre_exec(move || match &procs {
                Ok(f) => {
                    if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                }
                Err(errno) => Err(std::io::Error::from_raw_os_error(*errno)),
            });
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A process still inside (a leaked child) keeps the cgroup busy: kill it first.
        if let Ok(mut kill) = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.kill"))
        {
            let _ = kill.write_all(b"1");
        }
        for _ in 0..50 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => {
                    eprintln!("lb-tests: warning: remove {}: {e}", self.path.display());
                    return;
                }
            }
        }
        eprintln!("lb-tests: warning: {} stays busy", self.path.display());
    }
}

/// An empty cgroup shared by the agents of this test process that serve no host process: the
/// agent attaches its socket hooks to `--cgroup` (default: the cgroup2 root, which would reach
/// every process on the machine). Removed by [`crate::cleanup_stale`] once the process is gone.
pub fn idle_cgroup() -> &'static Path {
    static IDLE: OnceLock<PathBuf> = OnceLock::new();
    IDLE.get_or_init(|| {
        let cg = TestCgroup::new("idle").expect("create the tests' idle cgroup");
        let path = cg.path.clone();
        std::mem::forget(cg);
        path
    })
}

/// Removes `lbt-*` cgroups of test processes that are gone.
pub(crate) fn remove_stale_cgroups() {
    let Ok(root) = cgroup2_mount() else { return };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_prefix("lbt-") else {
            continue;
        };
        if crate::is_stale(stem) {
            if let Err(e) = std::fs::remove_dir(entry.path()) {
                eprintln!(
                    "lb-tests: warning: removing stale cgroup {}: {e}",
                    entry.path().display()
                );
            }
        }
    }
}
