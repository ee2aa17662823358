//! The agent's health endpoints for the kubelet's probes, over plain HTTP/1.1:
//! - `GET /healthz`: 200 while the process serves requests (liveness).
//! - `GET /readyz`: 200 once the source completed its first full sync and the maps were programmed
//!   from it, 503 before (readiness: a rolling update waits for it before replacing the next node).
//! - `GET /metrics`: the Prometheus metrics ([`crate::metrics`]), when the agent passes them.
//!
//! The same small server (one request per connection) answers the healthCheckNodePorts
//! ([`crate::service_health`]) and `--metrics-bind-address`.
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
    #[error(
        "binding the HTTP endpoint {addr} (health, metrics or a healthCheckNodePort): {source}"
    )]
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

/// An HTTP response of the small server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status line after the version, e.g. `200 OK`.
    pub status: &'static str,
    pub content_type: &'static str,
    /// Headers besides Content-Type, Content-Length and Connection.
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn text(status: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.into(),
        }
    }
}

/// What a server answers: method and path (query stripped) to a response.
pub type Handler = dyn Fn(&str, &str) -> Response + Send + Sync;

/// Serves `listener` on a background thread named `name` until the listener is shut down
/// (`shutdown(2)` on its descriptor makes `accept` fail, which ends the thread).
pub fn serve_listener(
    listener: TcpListener,
    name: String,
    handler: Arc<Handler>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    if let Err(e) = answer(stream, &*handler) {
                        tracing::debug!("http: {e}");
                    }
                }
                // EINVAL after shutdown(2): the owner closed this server.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => tracing::debug!("http accept: {e}"),
            }
        }
    })
}

/// Binds `addr` and serves the endpoints on a background thread for the life of the process:
/// `/healthz`, `/readyz`, and `/metrics` when `metrics` is given. Returns the bound address
/// (useful with port 0).
pub fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    let handler = move |method: &str, path: &str| route(method, path, &health, metrics.as_deref());
    serve_listener(listener, "health".into(), Arc::new(handler)).map_err(Error::Thread)?;
    Ok(bound)
}

/// Binds `addr` and serves only `/metrics` there (kube-proxy's `--metrics-bind-address`).
pub fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<crate::metrics::Metrics>,
) -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    let handler = move |method: &str, path: &str| match (method, path) {
        ("GET" | "HEAD", "/metrics") => metrics_response(&metrics),
        ("GET" | "HEAD", _) => Response::text("404 Not Found", "not found\n"),
        _ => Response::text("405 Method Not Allowed", "only GET\n"),
    };
    serve_listener(listener, "metrics".into(), Arc::new(handler)).map_err(Error::Thread)?;
    Ok(bound)
}

fn metrics_response(metrics: &crate::metrics::Metrics) -> Response {
    Response {
        status: "200 OK",
        content_type: crate::metrics::CONTENT_TYPE,
        headers: Vec::new(),
        body: metrics.render(),
    }
}

fn route(
    method: &str,
    path: &str,
    health: &Health,
    metrics: Option<&crate::metrics::Metrics>,
) -> Response {
    match (method, path) {
        ("GET" | "HEAD", "/healthz" | "/livez") => Response::text("200 OK", "ok\n"),
        ("GET" | "HEAD", "/readyz") if health.is_ready() => Response::text("200 OK", "ok\n"),
        ("GET" | "HEAD", "/readyz") => Response::text(
            "503 Service Unavailable",
            "not ready: waiting for the first full sync and apply\n",
        ),
        ("GET" | "HEAD", "/metrics") if metrics.is_some() => {
            metrics_response(metrics.expect("checked"))
        }
        ("GET" | "HEAD", _) => Response::text("404 Not Found", "not found\n"),
        _ => Response::text("405 Method Not Allowed", "only GET\n"),
    }
}

fn answer(stream: TcpStream, handler: &Handler) -> std::io::Result<()> {
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
    let response = handler(method, path);
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    if method != "HEAD" {
        head.push_str(&response.body);
    }
    (&stream).write_all(head.as_bytes())?;
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
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&health), None).unwrap();
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 503"));
        health.set_ready();
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
    }
}
