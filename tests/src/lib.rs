//! Testbed for the integration tests: network namespaces playing nodes and pods, echo
//! backends, private bpffs mounts and supervised child processes.
//!
//! Everything a test builds lives in its own namespaces and under [`RUN_DIR`], named
//! `<tag>-<pid>-<counter>`, so tests can run in parallel (and reuse the same addresses) and a
//! later run can remove what a killed run left behind ([`cleanup_stale`]).
//!
//! ```no_run
//! use std::net::{Ipv4Addr, SocketAddrV4};
//! use std::time::Duration;
//!
//! lb_tests::require_root();
//! let node = lb_tests::Node::new("demo")?;
//! let client = node.add_pod("client", Ipv4Addr::new(198, 18, 1, 1))?;
//! let backend = node.add_pod("web", Ipv4Addr::new(198, 18, 1, 2))?;
//! let _server = lb_tests::EchoServer::start(&backend.ns, "web", 8080, 8080)?;
//! let to = SocketAddrV4::new(backend.ip, 8080);
//! let reply = lb_tests::tcp_request(&client.ns, to, Duration::from_secs(1))?;
//! assert_eq!((reply.backend.as_str(), *reply.peer.ip()), ("web", client.ip));
//! # anyhow::Ok(())
//! ```

#![warn(missing_docs)]

mod backend;
mod bpffs;
mod cgroup;
pub mod cluster;
pub mod fabric;
mod http;
mod netns;
mod process;
mod topology;

pub use backend::{
    tcp_connect, tcp_request, tcp_request_from_here, tcp_requests, udp_request, udp_requests,
    EchoServer, Reply, TcpConn,
};
pub use bpffs::BpfFs;
pub use cgroup::{cgroup2_mount, idle_cgroup, TestCgroup};
pub use http::{http_get, prometheus_sample, HttpResponse};
pub use netns::Netns;
pub use process::{spawn_in, ChildGuard};
pub use topology::{Node, Pod, POD_GATEWAY};

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use anyhow::{bail, Context, Result};

/// Directory holding the bpffs mounts and process logs of the tests; entries are named
/// `<tag>-<pid>-<counter>` so stale ones can be told from live ones.
pub const RUN_DIR: &str = "/run/lb-tests";

/// Fails the calling test unless it can build namespaces and load programs: a privileged test
/// that skips silently would look like a pass.
pub fn require_root() {
    const HOW: &str = "this test needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF): run it \
                       through `cargo xtask test` as root";
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(euid == 0, "{HOW} (euid is {euid})");
    assert!(on_path("ip"), "{HOW}; also, `ip` (iproute2) is not on PATH");
}

/// Removes what dead test processes left behind: `lbt-*` namespaces and entries of
/// [`RUN_DIR`] (bpffs mounts are detached first) whose pid is not running. Called once per
/// process by the first [`Netns`], [`BpfFs`] or [`spawn_in`]; failures are only reported on
/// stderr because they must not fail an unrelated test.
pub fn cleanup_stale() {
    netns::remove_stale_namespaces();
    bpffs::remove_stale_entries();
    cgroup::remove_stale_cgroups();
}

/// Runs [`cleanup_stale`] once per process, then makes `/run/netns` a mount point with a
/// single `ip netns add`, because parallel first calls race on setting it up.
fn ensure_initialized() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        cleanup_stale();
        let name = format!("lbt-{}", unique_name("init"));
        let warm_up = run_checked(Command::new("ip").args(["netns", "add", &name]))
            .and_then(|_| run_checked(Command::new("ip").args(["netns", "del", &name])));
        if let Err(e) = warm_up {
            eprintln!("lb-tests: warning: preparing /run/netns: {e:#}");
        }
    });
}

/// `<tag>-<pid>-<counter>`: unique within the process through the counter and across
/// processes through the pid, which also tells [`cleanup_stale`] whether the owner is alive.
fn unique_name(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tag: String = tag
        .chars()
        .take(12)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}-{}-{n}", std::process::id())
}

/// The pid inside a name made by [`unique_name`], if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplitn(3, '-');
    let counter = parts.next()?;
    let pid = parts.next()?;
    parts.next()?;
    counter.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Whether an entry named by [`unique_name`] belongs to a process that is gone.
fn is_stale(name: &str) -> bool {
    match owner_pid(name) {
        Some(pid) => !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

/// Runs a command to completion and returns its stdout; the error names the command and
/// carries its stderr, which is what one needs to debug a failed setup step.
fn run_checked(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command line as a shell would show it, for error messages.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

#[cfg(test)]
mod tests;
