//! Child processes (agents, tools) run inside a namespace, logged to a file and never leaked.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{Netns, RUN_DIR};

/// How long a child gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

/// A child process whose stdout and stderr go to a log file under [`RUN_DIR`]. Drop stops
/// it (SIGTERM, then SIGKILL after 3 s) and reaps it; when dropped while the test panics it
/// prints the log, so a failing test shows what the process said.
///
/// Only the child itself is signalled: run the program directly, or `exec` it from a shell.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    program: String,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

/// Spawns `cmd` inside `ns` (entering it is idempotent, so `cmd` may come from
/// [`Netns::cmd`] or be a plain `Command`), with stdin from /dev/null and both output
/// streams to a fresh log file named after `tag`.
pub fn spawn_in(ns: &Netns, mut cmd: Command, tag: &str) -> Result<ChildGuard> {
    crate::ensure_initialized();
    std::fs::create_dir_all(RUN_DIR).with_context(|| format!("create {RUN_DIR}"))?;
    let log_path = Path::new(RUN_DIR).join(format!("{}.log", crate::unique_name(tag)));
    let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let program = crate::describe(&cmd);
    ns.enter_on_spawn(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    match cmd.spawn() {
        Ok(child) => Ok(ChildGuard {
            child,
            program,
            log_path,
            status: None,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&log_path);
            Err(e).with_context(|| format!("spawn `{program}` in {}", ns.name()))
        }
    }
}

impl ChildGuard {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the child has not exited yet (reaps it if it has).
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Everything the child wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    /// The log file, for tools that want to tail it.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Waits until the log contains `needle` (e.g. a readiness message); fails early if the
    /// child exits, and the error carries the log.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read before checking for exit, so a last line written just before exiting counts.
            let logs = self.logs();
            if logs.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.poll_exit() {
                bail!(
                    "`{}` exited ({status}) before logging {needle:?}; its log:\n{}",
                    self.program,
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "`{}` did not log {needle:?} within {timeout:?}; its log:\n{logs}",
                    self.program
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself (stopping it if it does not) and
    /// returns its exit status; for processes that are expected to fail fast.
    pub fn stop_waiting(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.poll_exit() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop().expect("stop the process")
    }

    /// Stops the child as drop does (SIGTERM, SIGKILL after 3 s) and returns how it ended,
    /// for tests that restart a process and keep the guard.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.poll_exit() {
            return Ok(status);
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.poll_exit() {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.signal(libc::SIGKILL);
        let status = self
            .child
            .wait()
            .with_context(|| format!("wait for `{}`", self.program))?;
        self.status = Some(status);
        Ok(status)
    }

    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet
        // (status is None), so its pid cannot have been reused.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("lb-tests: warning: {e:#}");
        }
        if std::thread::panicking() {
            eprintln!(
                "---- log of `{}` ({}) ----\n{}---- end of log ----",
                self.program,
                self.log_path.display(),
                self.logs()
            );
        }
        let _ = std::fs::remove_file(&self.log_path);
    }
}
