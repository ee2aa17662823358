//! Wakes the manifests poller as soon as something happens in its directory, so a change is
//! picked up in about a millisecond instead of after half a poll interval on average. The poll
//! interval stays as the fallback: the directory's fingerprint is still compared every interval
//! (inotify misses changes behind symlinks into other directories, and queue overflows).
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

/// Events that mean a file in the directory may have changed.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

pub struct DirEvents {
    fd: OwnedFd,
}

impl DirEvents {
    pub fn watch(dir: &Path) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: valid descriptor and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), MASK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits up to `timeout` for an event. After the first one, keeps reading until the
    /// directory has been quiet for `settle` (bounded by `timeout`), so a file written in several
    /// pieces is read once it is complete rather than half-way. True when something happened.
    pub fn wait(&self, timeout: Duration, settle: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        if !self.poll_once(timeout)? {
            return Ok(false);
        }
        loop {
            let incomplete = self.drain()?;
            let now = Instant::now();
            if !incomplete || now >= deadline {
                return Ok(true);
            }
            // A write without its close yet: give the writer `settle` to finish.
            if !self.poll_once(settle.min(deadline - now))? {
                return Ok(true);
            }
        }
    }

    fn poll_once(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            0 => Ok(false),
            _ => Ok(true),
        }
    }

    /// Reads every queued event; true when the last event on the queue was a bare modification
    /// (a writer that has not closed the file yet).
    fn drain(&self) -> io::Result<bool> {
        let mut buf = [0u8; 8192];
        let mut last_modify = false;
        loop {
            // SAFETY: reading into a local buffer of the given size.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(last_modify),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            let mut off = 0usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            while off + header <= n as usize {
                // SAFETY: the kernel writes whole events; read_unaligned copes with alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
                last_modify = ev.mask & libc::IN_MODIFY != 0;
                off += header + ev.len as usize;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_into_the_directory_wakes_the_waiter() {
        let dir = std::env::temp_dir().join(format!("lb-inotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let events = DirEvents::watch(&dir).unwrap();
        assert!(!events
            .wait(Duration::from_millis(20), Duration::from_millis(5))
            .unwrap());
        let tmp = std::env::temp_dir().join(format!("lb-inotify-{}.tmp", std::process::id()));
        std::fs::write(&tmp, "x").unwrap();
        std::fs::rename(&tmp, dir.join("a.yaml")).unwrap();
        let t = Instant::now();
        assert!(events
            .wait(Duration::from_secs(10), Duration::from_millis(5))
            .unwrap());
        assert!(t.elapsed() < Duration::from_secs(5));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
