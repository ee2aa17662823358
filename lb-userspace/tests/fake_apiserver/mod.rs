//! An in-process Kubernetes API server for tests, speaking the wire protocol kube-rs speaks to a
//! real one, on 127.0.0.1 only:
//! - list: `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`
//!   (`fieldSelector=metadata.name=X` honoured), a `*List` with `metadata.resourceVersion`;
//! - watch: `?watch=true&resourceVersion=N`, a chunked stream of newline-delimited
//!   `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}` events after N;
//! - `resourceVersion` older than the compacted history: an ERROR event carrying a `Status` with
//!   code 410 (reason `Expired`), as the real server sends it on a watch;
//! - faults: cut every open watch mid-event, expire the history (410 to every open watch), answer
//!   no request at all (outage), hold a kind's lists until released.
//!
//! One resourceVersion counter for all kinds, like etcd's revision. HTTP/1.1 with keep-alive,
//! written by hand on tokio so the faults are exact (a watch is cut in the middle of a chunk).
#![allow(dead_code)] // each test binary uses a different part

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{broadcast, watch},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn collection_path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    event_type: &'static str,
    object: Value,
}

/// A request the server saw, for tests that check which path the client took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Option<Kind>,
    pub watch: bool,
    pub resource_version: Option<String>,
    /// Answered with nothing because the server was in an outage.
    pub refused: bool,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Every change with rv > `compacted_rv`, oldest first.
    history: Vec<Change>,
    compacted_rv: u64,
    unavailable: bool,
    held: Vec<Kind>,
    requests: Vec<Request>,
    /// 410 ERROR events sent on watches.
    gone_sent: usize,
}

/// What open watches are told besides new changes, each in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Close mid-chunk.
    Cut,
    /// Send a 410 ERROR and end the stream.
    Expire,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change (the new rv) so watches and held lists wake up.
    changed: watch::Sender<u64>,
    faults: broadcast::Sender<Fault>,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApiServer {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the fake API server's runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("binding the fake API server to 127.0.0.1");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                compacted_rv: 100,
                ..State::default()
            }),
            changed: watch::channel(100).0,
            faults: broadcast::channel(64).0,
        });
        let accept_shared = Arc::clone(&shared);
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_connection(stream, Arc::clone(&accept_shared)));
            }
        });
        Self {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client configuration for this server: plain HTTP, no credentials.
    pub fn kube_config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url().parse().unwrap());
        // Keep failures quick: the default is 295 s, longer than any test waits.
        config.read_timeout = Some(Duration::from_secs(30));
        config
    }

    /// A kubeconfig file naming this server, as an operator would pass with --kubeconfig.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n",
            self.url()
        )
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    /// Creates or replaces an object (ADDED or MODIFIED), like a server-side apply.
    pub fn apply(&self, kind: Kind, mut object: Value) {
        let mut state = self.state();
        state.rv += 1;
        let rv = state.rv;
        let meta = object["metadata"]
            .as_object_mut()
            .expect("object without metadata");
        let name = meta["name"]
            .as_str()
            .expect("object without a name")
            .to_string();
        let namespace = if kind.namespaced() {
            meta.entry("namespace").or_insert(json!("default"));
            meta["namespace"].as_str().unwrap().to_string()
        } else {
            String::new()
        };
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.entry("uid")
            .or_insert(json!(format!("uid-{kind:?}-{namespace}-{name}")));
        meta.entry("creationTimestamp")
            .or_insert(json!("2024-01-01T00:00:00Z"));
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind());
        let key = (kind, namespace, name);
        let event_type = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert(key, object.clone());
        state.history.push(Change {
            rv,
            kind,
            event_type,
            object,
        });
        drop(state);
        self.shared.changed.send_replace(rv);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut state = self.state();
        let key = (kind, namespace.to_string(), name.to_string());
        let Some(mut object) = state.objects.remove(&key) else {
            panic!("fake API server: delete of {kind:?} {namespace}/{name}, which does not exist");
        };
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.history.push(Change {
            rv,
            kind,
            event_type: "DELETED",
            object,
        });
        drop(state);
        self.shared.changed.send_replace(rv);
    }

    /// Sends a BOOKMARK with the current resourceVersion on every open watch.
    pub fn bookmark(&self) {
        let mut state = self.state();
        let rv = state.rv;
        for kind in Kind::ALL {
            state.history.push(Change {
                rv,
                kind,
                event_type: "BOOKMARK",
                object: json!({
                    "apiVersion": kind.api_version(),
                    "kind": kind.kind(),
                    "metadata": {"resourceVersion": rv.to_string()}
                }),
            });
        }
        drop(state);
        self.shared.changed.send_replace(rv);
    }

    fn fault(&self, fault: Fault) {
        // No receiver: no watch open, nothing to tell.
        let _ = self.shared.faults.send(fault);
    }

    /// Every open watch connection is closed in the middle of a chunk.
    pub fn cut_watches(&self) {
        self.fault(Fault::Cut);
    }

    /// Forgets the history: every open watch gets a 410 ERROR event, and so does any watch that
    /// resumes from a resourceVersion older than now. Clients must relist.
    pub fn expire_history(&self) {
        {
            let mut state = self.state();
            state.compacted_rv = state.rv;
            state.history.clear();
        }
        self.fault(Fault::Expire);
    }

    /// Outage: while on, every request's connection is closed without an answer, and open
    /// watches are cut.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state().unavailable = unavailable;
        if unavailable {
            self.cut_watches();
        }
    }

    /// Lists of `kind` wait until [`release`](Self::release).
    pub fn hold_lists(&self, kind: Kind) {
        self.state().held.push(kind);
    }

    pub fn release(&self, kind: Kind) {
        self.state().held.retain(|k| *k != kind);
        let rv = self.state().rv;
        self.shared.changed.send_replace(rv);
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    pub fn gone_sent(&self) -> usize {
        self.state().gone_sent
    }

    /// Waits until the server has seen a request matching `predicate`, or panics with `what`.
    pub fn wait_for_requests(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&[Request]) -> bool,
    ) {
        self.wait_for(what, timeout, |state| predicate(&state.requests))
    }

    /// Waits until at least `count` 410 ERROR events have been sent.
    pub fn wait_for_gone_sent(&self, count: usize, timeout: Duration) {
        self.wait_for(&format!("{count} 410 Gone events sent"), timeout, |state| {
            state.gone_sent >= count
        })
    }

    fn wait_for(&self, what: &str, timeout: Duration, predicate: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut seen = self.shared.changed.subscribe();
        loop {
            if predicate(&self.state()) {
                return;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "fake API server: timed out after {timeout:?} waiting for {what}; requests: {:?}",
                self.requests()
            );
            // Requests bump `changed` too (see `record`), so this wakes on each.
            let _ = self
                .runtime
                .as_ref()
                .unwrap()
                .block_on(async { tokio::time::timeout(deadline - now, seen.changed()).await });
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn record(shared: &Shared, request: Request) {
    let mut state = shared.state.lock().unwrap();
    state.requests.push(request);
    let rv = state.rv;
    drop(state);
    // Wakes `wait_for_requests`; watches re-check history and find nothing new.
    shared.changed.send_replace(rv);
}

/// `GET path?query` → (path, decoded query pairs).
fn parse_target(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
                .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
                .flatten()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            match escaped {
                Some(b) => {
                    out.push(b);
                    i += 3;
                }
                None => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let params = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    (path.to_string(), params)
}

/// `metadata.name=X` (and `metadata.namespace=Y`), comma-separated, as kube-rs sends them.
fn matches_field_selector(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (field, want) = term.split_once('=').expect("field selector term without =");
        let have = match field {
            "metadata.name" => object["metadata"]["name"].as_str(),
            "metadata.namespace" => object["metadata"]["namespace"].as_str(),
            other => panic!("fake API server: field selector on {other} is not supported"),
        };
        have == Some(want)
    })
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header).await {
                Ok(0) | Err(_) => return,
                Ok(_) if header == "\r\n" || header == "\n" => break,
                Ok(_) => {}
            }
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let (path, params) = parse_target(&target);
        let kind = Kind::ALL.into_iter().find(|k| k.collection_path() == path);
        let watch = params.get("watch").is_some_and(|w| w == "true" || w == "1");
        // Subscribed before the request is visible to tests, so a fault a test sends after seeing
        // this request reaches this watch.
        let faults = shared.faults.subscribe();
        let unavailable = shared.state.lock().unwrap().unavailable;
        record(
            &shared,
            Request {
                kind,
                watch,
                resource_version: params.get("resourceVersion").cloned(),
                refused: unavailable,
            },
        );
        if unavailable {
            // Closing without an answer: the client sees the connection drop, as in an outage.
            return;
        }
        let Some(kind) = kind else {
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": format!("{path} not served")});
            if write_json(&mut write, "404 Not Found", &body)
                .await
                .is_err()
            {
                return;
            }
            continue;
        };
        let selector = params.get("fieldSelector");
        let ok = if watch {
            let from: u64 = params
                .get("resourceVersion")
                .and_then(|rv| rv.parse().ok())
                .unwrap_or(0);
            serve_watch(&mut write, &shared, faults, kind, selector, from).await
        } else {
            serve_list(&mut write, &shared, kind, selector).await
        };
        if !ok {
            return;
        }
    }
}

async fn write_json(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    status: &str,
    body: &Value,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).unwrap();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    write.write_all(head.as_bytes()).await?;
    write.write_all(&body).await?;
    write.flush().await
}

async fn serve_list(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
    kind: Kind,
    selector: Option<&String>,
) -> bool {
    let mut changed = shared.changed.subscribe();
    loop {
        if !shared.state.lock().unwrap().held.contains(&kind) {
            break;
        }
        if changed.changed().await.is_err() {
            return false;
        }
    }
    let body = {
        let state = shared.state.lock().unwrap();
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((k, _, _), o)| *k == kind && matches_field_selector(o, selector))
            .map(|(_, o)| {
                // A real server leaves apiVersion and kind out of list items.
                let mut item = o.clone();
                let map = item.as_object_mut().unwrap();
                map.remove("apiVersion");
                map.remove("kind");
                item
            })
            .collect();
        json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.kind()),
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        })
    };
    write_json(write, "200 OK", &body).await.is_ok()
}

/// Streams events after `from` until a fault ends it. Returns false when the connection is gone.
async fn serve_watch(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    shared: &Shared,
    mut faults: broadcast::Receiver<Fault>,
    kind: Kind,
    selector: Option<&String>,
    from: u64,
) -> bool {
    let mut changed = shared.changed.subscribe();
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if write.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    let gone = |rv: u64| {
        json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version: {from} ({rv})")}})
    };
    // Position in the history of the next change to send; history only grows until it is expired.
    let mut next_index: Option<usize> = None;
    loop {
        // Events to send now, or a 410 if `from` fell out of the history.
        let (events, expired_at) = {
            let state = shared.state.lock().unwrap();
            let start =
                next_index.unwrap_or_else(|| state.history.partition_point(|c| c.rv <= from));
            if from < state.compacted_rv || start > state.history.len() {
                drop(state);
                (Vec::new(), Some(count_gone(shared)))
            } else {
                let events: Vec<Value> = state.history[start..]
                    .iter()
                    .filter(|c| c.kind == kind)
                    .filter(|c| {
                        c.event_type == "BOOKMARK" || matches_field_selector(&c.object, selector)
                    })
                    .map(|c| json!({"type": c.event_type, "object": c.object}))
                    .collect();
                next_index = Some(state.history.len());
                (events, None)
            }
        };
        if let Some(rv) = expired_at {
            return write_chunk(write, &gone(rv)).await.is_ok() && end_stream(write).await;
        }
        for event in &events {
            if write_chunk(write, event).await.is_err() {
                return false;
            }
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return false },
            fault = faults.recv() => {
                match fault {
                    Ok(Fault::Cut) | Err(_) => {
                        // Half an event, then the connection goes: the client's JSON is cut.
                        let _ = write.write_all(b"100\r\n{\"type\":\"MODIFIED\",\"obj").await;
                        let _ = write.flush().await;
                        let _ = write.shutdown().await;
                        return false;
                    }
                    Ok(Fault::Expire) => {
                        let rv = count_gone(shared);
                        return write_chunk(write, &gone(rv)).await.is_ok() && end_stream(write).await;
                    }
                }
            }
        }
    }
}

/// Counts a 410 about to be sent (waking waiters) and returns the compacted resourceVersion.
fn count_gone(shared: &Shared) -> u64 {
    let mut state = shared.state.lock().unwrap();
    state.gone_sent += 1;
    let (compacted, rv) = (state.compacted_rv, state.rv);
    drop(state);
    shared.changed.send_replace(rv);
    compacted
}

async fn write_chunk(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    event: &Value,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).unwrap();
    line.push(b'\n');
    write
        .write_all(format!("{:x}\r\n", line.len()).as_bytes())
        .await?;
    write.write_all(&line).await?;
    write.write_all(b"\r\n").await?;
    write.flush().await
}

/// The terminating chunk: the watch ended normally and the connection can be reused.
async fn end_stream(write: &mut tokio::net::tcp::OwnedWriteHalf) -> bool {
    write.write_all(b"0\r\n\r\n").await.is_ok() && write.flush().await.is_ok()
}
