//! The agent's health endpoints for the kubelet's probes, over plain HTTP/1.1:
//! - `GET /healthz`: 200 while the process serves requests (liveness).
//! - `GET /readyz`: 200 once the source completed its first full sync and the maps were programmed
//!   from it, 503 before (readiness: a rolling update waits for it before replacing the next node).
//!
//! Std only: one thread, one short request per connection, no keep-alive. Probes are a few
//! requests a minute; a web framework would be most of the binary.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

/// kube-proxy's healthz port; the DaemonSet's probes use it.
pub const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0:10256";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the health endpoint to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting the health endpoint thread: {0}")]
    Thread(std::io::Error),
}

/// Shared with the agent's loop, which flips readiness.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Binds `addr` and serves the endpoints on a background thread for the life of the process.
/// Returns the bound address (useful with port 0).
pub fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = answer(stream, &health) {
                    tracing::debug!("health endpoint: {e}");
                }
            }
        })
        .map_err(Error::Thread)?;
    Ok(bound)
}

fn answer(stream: TcpStream, health: &Health) -> std::io::Result<()> {
    // A client that connects and says nothing must not block the probes behind it for long.
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Headers are read and ignored, so the client sees its request consumed before the answer.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz" | "/livez") => ("200 OK", "ok\n"),
        ("GET" | "HEAD", "/readyz") if health.is_ready() => ("200 OK", "ok\n"),
        ("GET" | "HEAD", "/readyz") => (
            "503 Service Unavailable",
            "not ready: waiting for the first full sync and apply\n",
        ),
        ("GET" | "HEAD", _) => ("404 Not Found", "not found\n"),
        _ => ("405 Method Not Allowed", "only GET\n"),
    };
    let body = if method == "HEAD" { "" } else { body };
    write!(
        &stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    (&stream).flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn readyz_turns_ready_only_when_told_and_healthz_is_always_ok() {
        let health = Arc::new(Health::default());
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&health)).unwrap();
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 503"));
        health.set_ready();
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
    }
}
