//! Named network namespaces owned by a test.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::run_checked;

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/run/netns";

/// A network namespace the test owns, created with `ip netns add` and deleted on drop (also
/// while unwinding from a failed assertion).
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `lbt-<tag>-<pid>-<counter>` with `lo` up; the name is unique per process and
    /// per call, so parallel tests never collide.
    pub fn new(tag: &str) -> Result<Netns> {
        crate::ensure_initialized();
        let name = format!("lbt-{}", crate::unique_name(tag));
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        // Built before the next step so that a failure still deletes the namespace.
        let ns = Netns {
            path: Path::new(NETNS_DIR).join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The name `ip -n` and `ip netns` know it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the handle that `setns` and other tools open.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a fresh thread that joined this namespace (other threads stay where they
    /// are) and returns its result; a panic in `f` is propagated. Sockets keep the namespace
    /// they were created in, so they may be returned and used from any thread.
    ///
    /// Panics if the namespace cannot be entered.
    pub fn run<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd: OwnedFd = File::open(&self.path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path.display()))
            .into();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("ns {}", self.name))
                .spawn_scoped(scope, move || {
                    if let Err(e) = enter(fd.as_fd()) {
                        panic!("cannot enter network namespace {}: {e}", self.name);
                    }
                    drop(fd);
                    f()
                })
                .expect("cannot spawn a thread");
            match handle.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A `Command` whose process enters only this network namespace before exec. Unlike
    /// `ip netns exec`, it keeps the caller's mount namespace and `/sys`, so the child sees
    /// the test's bpffs pins.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.enter_on_spawn(&mut cmd);
        cmd
    }

    /// Makes an existing `Command` enter this network namespace before exec (what
    /// [`Netns::cmd`] does). If the namespace cannot be opened, spawning fails with the error.
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        // Opened now so that the child only has to call setns; O_CLOEXEC (std's default)
        // keeps it from leaking into the program.
        let fd = File::open(&self.path)
            .map(OwnedFd::from)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::ENOENT));
        // SAFETY: the hook runs between fork and exec, where only async-signal-safe code is
        // allowed: it makes one syscall and builds io::Errors from errno, which allocate
        // nothing.
        unsafe {
            cmd.pre_exec(move || match &fd {
                Ok(fd) => enter(fd.as_fd()),
                Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
            });
        }
    }

    /// Runs `ip -n NAME ARGS...`; the error carries the command line and ip's stderr.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        self.ip_output(args).map(drop)
    }

    /// Like [`Netns::ip`] but returns stdout, for queries such as `ip -j route`.
    pub fn ip_output(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Sets one sysctl of this namespace; `key` is dotted (`net.ipv4.ip_forward`) or a path
    /// under /proc/sys (needed when an interface name contains a dot).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.sysctls(&[(key, value)])
    }

    /// Sets several sysctls from one namespaced thread. /proc/sys/net resolves to the
    /// namespace of the thread that opens it, so no process needs to be spawned.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        self.run(|| {
            settings.iter().try_for_each(|(key, value)| {
                std::fs::write(sysctl_path(key), value).with_context(|| {
                    format!("sysctl {key}={value} in network namespace {}", self.name)
                })
            })
        })
    }

    /// Reads a sysctl of this namespace (trimmed), e.g. to check what a program changed.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        self.run(|| {
            std::fs::read_to_string(sysctl_path(key))
                .map(|v| v.trim().to_string())
                .with_context(|| format!("read sysctl {key} in network namespace {}", self.name))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Interfaces inside go with the namespace; sockets still open keep it alive
        // (unnamed) until they close.
        if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("lb-tests: warning: {e:#}");
        }
    }
}

/// Moves the calling thread (only) into the network namespace behind `fd`.
fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads the descriptor, which the borrow keeps open; CLONE_NEWNET
    // changes the namespace of the calling thread and nothing else in the process.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    let relative = if key.contains('/') {
        key.trim_start_matches('/').to_string()
    } else {
        key.replace('.', "/")
    };
    Path::new("/proc/sys").join(relative)
}

/// Deletes `lbt-*` namespaces whose creating process is gone.
pub(crate) fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("lbt-") else {
            continue;
        };
        if crate::is_stale(rest) {
            // Children of a killed test run live on in its namespaces (agents, servers).
            if let Ok(meta) = entry.metadata() {
                kill_processes_in(meta.ino());
            }
            if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &name])) {
                eprintln!("lb-tests: warning: removing stale namespace: {e:#}");
            }
        }
    }
}

/// SIGKILLs every process whose network namespace has inode `ino`.
fn kill_processes_in(ino: u64) {
    let wanted = format!("net:[{ino}]");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let in_ns = std::fs::read_link(entry.path().join("ns/net"))
            .is_ok_and(|link| link.as_os_str() == wanted.as_str());
        if in_ns {
            eprintln!("lb-tests: killing pid {pid}, left running in a stale test namespace");
            // SAFETY: kill has no memory-safety preconditions; the process is an orphan of a
            // dead test run, found by its namespace.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}
