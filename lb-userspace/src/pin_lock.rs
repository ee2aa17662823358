//! One agent per pin directory. Two agents writing the same maps would hand out the same backend
//! and rev-NAT ids for different things and route each other's flows to strangers, so the agent
//! takes an exclusive `flock` on the directory for as long as it runs. The lock goes away with
//! the process, also on SIGKILL, so there is nothing stale to clean up.
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening {path} to lock it: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another lb-agent is already using {path} (it holds the directory's lock): run one agent per \
         --bpffs directory"
    )]
    Busy { path: PathBuf },
    #[error("locking {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held for the life of the agent; dropping it releases the lock.
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
}

impl PinDirLock {
    /// Takes the lock without waiting; fails at once if another process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, Error> {
        let file = File::open(dir).map_err(|source| Error::Open {
            path: dir.into(),
            source,
        })?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::Busy { path: dir.into() }
            } else {
                Error::Lock {
                    path: dir.into(),
                    source: err,
                }
            });
        }
        Ok(Self { _dir: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_the_first_lets_go() {
        let dir = std::env::temp_dir().join(format!("lb-pinlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = PinDirLock::acquire(&dir).unwrap();
        // flock locks belong to the open file description, so a second open conflicts even
        // within one process, exactly as a second agent would.
        let second = PinDirLock::acquire(&dir).unwrap_err();
        assert!(matches!(second, Error::Busy { .. }), "{second}");
        assert!(second
            .to_string()
            .contains("another lb-agent is already using"));
        drop(first);
        PinDirLock::acquire(&dir).expect("free again once the first holder is gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
