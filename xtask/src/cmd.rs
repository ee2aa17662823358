//! Running external commands: stream their output, and fail with an error that names the command,
//! its exit status and (where we captured it) the last lines of its stderr.
use std::{
    env,
    ffi::OsStr,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{anyhow, bail, Result};

/// How many lines of a failed command's stderr an error message quotes.
const STDERR_TAIL_LINES: usize = 20;

/// The command as a shell line, with the environment variables set on it in front
/// (`LLVM_PREFIX=/usr/lib/llvm-22 cargo install ...`).
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs the command with stdin, stdout and stderr inherited (cargo keeps its colours and progress
/// bar). Fails if it cannot be started or exits unsuccessfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| spawn_error(cmd, e))?;
    check(cmd, status, "")
}

/// Like [`run`], but stderr goes through us so that a failure can quote its last lines. For the
/// installers (apt-get, rustup, cargo install), whose errors scroll away under their progress.
pub fn run_tee(cmd: &mut Command) -> Result<()> {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, e))?;
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let mut captured = Vec::new();
    let mut buf = [0u8; 8192];
    let mut out = io::stderr();
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Forward chunks as they come, partial lines included (progress output).
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
                captured.extend_from_slice(&buf[..n]);
                // Only the tail is ever quoted: keep memory bounded on chatty commands.
                if captured.len() > 256 * 1024 {
                    captured.drain(..captured.len() - 64 * 1024);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let status = child.wait().map_err(|e| spawn_error(cmd, e))?;
    check(cmd, status, &String::from_utf8_lossy(&captured))
}

/// Runs the command with its output captured and returns its stdout. For quick probes
/// (`rustup toolchain list`, `bpf-linker --version`); failures quote the captured stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, e))?;
    check(cmd, out.status, &String::from_utf8_lossy(&out.stderr))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`output`], but also returns stdout and stderr of an unsuccessful run instead of failing,
/// for commands whose exit status is not the answer (`dpkg-query` exits 1 if any package is
/// unknown but still reports the others; `ldd` exits 1 on static executables).
pub fn output_any_status(cmd: &mut Command) -> Result<(ExitStatus, String, String)> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(cmd, e))?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn check(cmd: &Command, status: ExitStatus, stderr: &str) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    let tail = tail_lines(stderr, STDERR_TAIL_LINES);
    if tail.is_empty() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    let quoted: Vec<String> = tail.iter().map(|l| format!("    | {l}")).collect();
    bail!(
        "`{}` failed ({status}); last lines of its stderr:\n{}",
        display(cmd),
        quoted.join("\n")
    )
}

fn spawn_error(cmd: &Command, e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::NotFound {
        anyhow!(
            "`{}` could not be started: {} not found",
            display(cmd),
            cmd.get_program().to_string_lossy()
        )
    } else {
        anyhow!("`{}` could not be started: {e}", display(cmd))
    }
}

/// The last `n` non-empty lines of `text`, with carriage-return progress redraws collapsed to
/// their final state.
pub fn tail_lines(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.rsplit('\r').next().unwrap_or(l).trim_end())
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// `$CARGO_HOME/bin`, or `~/.cargo/bin`: where rustup and `cargo install` put their binaries,
/// which a non-login shell (CI, sudo) may not have on PATH.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    match env::var_os("CARGO_HOME") {
        Some(home) if !home.is_empty() => Some(PathBuf::from(home).join("bin")),
        _ => env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".cargo").join("bin")),
    }
}

/// Where a tool was found.
pub struct Found {
    pub path: PathBuf,
    /// False if it was only found in [`cargo_bin_dir`].
    pub on_path: bool,
}

/// Looks `name` up on PATH, then in [`cargo_bin_dir`].
pub fn find_tool(name: &str) -> Option<Found> {
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Some(Found {
                    path: candidate,
                    on_path: true,
                });
            }
        }
    }
    let candidate = cargo_bin_dir()?.join(name);
    is_executable(&candidate).then_some(Found {
        path: candidate,
        on_path: false,
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Appends `dir` to this process's PATH, so that every command we start (and theirs: rustc looks
/// for `bpf-linker` on PATH) finds the tools in it.
pub fn add_to_path(dir: &Path) -> Result<()> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if dirs.iter().any(|d| d == dir) {
        return Ok(());
    }
    dirs.push(dir.to_path_buf());
    let joined = env::join_paths(dirs)?;
    // xtask is single-threaded when this runs (steps run one after another).
    env::set_var("PATH", joined);
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_and_shows_env() {
        let mut cmd = Command::new("cargo");
        cmd.args(["install", "bpf-linker", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22");
        assert_eq!(
            display(&cmd),
            "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --features llvm-22"
        );
        let mut cmd = Command::new("dpkg-query");
        cmd.args(["-W", "-f=${Status}", "it's"]);
        assert_eq!(display(&cmd), r"dpkg-query -W '-f=${Status}' 'it'\''s'");
    }

    #[test]
    fn tail_keeps_last_nonempty_lines_and_collapses_progress() {
        let text = "a\n\nb\r\nprogress 10%\rprogress 100%\nc\n";
        assert_eq!(tail_lines(text, 2), vec!["progress 100%", "c"]);
        assert_eq!(tail_lines(text, 10), vec!["a", "b", "progress 100%", "c"]);
        assert!(tail_lines("", 3).is_empty());
    }

    #[test]
    fn failure_names_command_status_and_stderr() {
        let err = output(Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`sh -c 'echo one >&2; echo two >&2; exit 3'` failed (exit status: 3)")
        );
        assert!(err.contains("| one\n    | two"), "{err}");

        let err = run(&mut Command::new("/nonexistent/tool"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/tool not found"), "{err}");
    }
}
