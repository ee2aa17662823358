//! The hand-off between a source and the agent's apply loop, whatever the source is.
//!
//! A source runs on its own thread (the manifests poller, or the Kubernetes reflectors on a small
//! tokio runtime) and publishes [`Snapshot`]s of what changed into a one-place slot; the agent
//! takes what is there when it is ready for it. A snapshot published while the agent is still
//! applying the previous one is merged into any snapshot not yet taken (for an object changed in
//! both, the later state wins), so a slow apply coalesces changes instead of queueing them, and
//! the agent never applies a state that is already stale.
use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{inotify::DirEvents, manifests::DirSource, Changes};

/// What changed in the cluster as a source sees it, since its previous snapshot; the first
/// snapshot names every object. Sources publish only complete views: the Kubernetes source
/// publishes nothing until every watched kind finished its first list.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub changes: Changes,
    /// This node's addresses as the source knows them (the Node object's InternalIP and ExternalIP
    /// for the Kubernetes source). `None`: the source does not know; the agent uses the addresses
    /// of its interfaces.
    pub node_addresses: Option<Vec<IpAddr>>,
    /// Problems with single objects or files, already skipped; for the log.
    pub warnings: Vec<String>,
    /// When the source first saw a change this snapshot carries (the start of the manifests
    /// poll that found it, the first watch event of a debounce window, the end of the first full
    /// list). The agent measures sync latency, change to maps programmed, from here. When a
    /// snapshot replaces one the agent had not taken yet, it keeps the earlier time.
    pub changed_at: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
#[error("the {source_name} source stopped")]
pub struct SourceStopped {
    pub source_name: &'static str,
}

#[derive(Default)]
struct SlotState {
    latest: Option<Snapshot>,
    /// Set when the publishing thread ends, so the agent does not wait forever on a dead source.
    closed: bool,
}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    published: Condvar,
}

/// The source's end of a [`Feed`].
#[derive(Clone)]
pub struct Publisher {
    slot: Arc<Slot>,
}

impl Publisher {
    /// Merges into any snapshot the agent has not taken yet.
    pub fn publish(&self, mut snapshot: Snapshot) {
        let mut state = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut untaken) = state.latest.take() {
            // The untaken snapshot's change is not programmed yet either: measure from the earlier.
            snapshot.changed_at = match (untaken.changed_at, snapshot.changed_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            untaken.changes.merge(std::mem::take(&mut snapshot.changes));
            snapshot.changes = untaken.changes;
            untaken.warnings.append(&mut snapshot.warnings);
            snapshot.warnings = untaken.warnings;
        }
        state.latest = Some(snapshot);
        self.slot.published.notify_all();
    }

    fn close(&self) {
        let mut state = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        state.closed = true;
        self.slot.published.notify_all();
    }
}

/// Closes the slot when the source thread ends, however it ends (return or panic).
struct CloseOnDrop(Publisher);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The agent's end: what a running source published since the last take. Dropping it stops the source and
/// waits for its thread, so a stopped source never publishes again.
pub struct Feed {
    source_name: &'static str,
    slot: Arc<Slot>,
    stop: Option<Box<dyn FnOnce() + Send>>,
    worker: Option<JoinHandle<()>>,
}

impl Feed {
    /// Runs `body` on a new thread with the publishing end. `stop` must make `body` return soon.
    pub fn spawn(
        source_name: &'static str,
        stop: Box<dyn FnOnce() + Send>,
        body: impl FnOnce(Publisher) + Send + 'static,
    ) -> std::io::Result<Self> {
        let slot = Arc::new(Slot::default());
        let publisher = Publisher {
            slot: Arc::clone(&slot),
        };
        let worker = std::thread::Builder::new()
            .name(format!("source-{source_name}"))
            .spawn(move || {
                let guard = CloseOnDrop(publisher.clone());
                body(publisher);
                drop(guard);
            })?;
        Ok(Self {
            source_name,
            slot,
            stop: Some(stop),
            worker: Some(worker),
        })
    }

    /// Waits up to `timeout` for a snapshot and returns everything published since the last take
    /// (merged). `Ok(None)`: nothing new in that time.
    pub fn next(&self, timeout: Duration) -> Result<Option<Snapshot>, SourceStopped> {
        let deadline = Instant::now() + timeout;
        let mut state = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(snapshot) = state.latest.take() {
                return Ok(Some(snapshot));
            }
            if state.closed {
                return Err(SourceStopped {
                    source_name: self.source_name,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            state = self
                .slot
                .published
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The manifests directory source: reads what changed in `dir` (see [`DirSource`]), woken by
    /// inotify as soon as something happens there and in any case every `poll`. A directory that
    /// cannot be read keeps the last published state.
    pub fn manifests(dir: PathBuf, poll: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let events = match DirEvents::watch(&dir) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(
                    dir = %dir.display(),
                    "inotify on the manifests directory failed ({e}); changes are found by polling every {poll:?} only"
                );
                None
            }
        };
        Self::spawn(
            "manifests",
            Box::new(move || stop_flag.store(true, Ordering::Relaxed)),
            move |publisher| {
                let mut source = DirSource::new(&dir);
                // The stop flag is checked at least this often.
                let wait = poll.min(Duration::from_millis(200));
                let mut last_scan = None::<Instant>;
                let mut woken = false;
                while !stop.load(Ordering::Relaxed) {
                    if woken || last_scan.is_none_or(|t| t.elapsed() >= poll) {
                        let scanned_at = Instant::now();
                        last_scan = Some(scanned_at);
                        match source.poll() {
                            Ok(Some((changes, doc_warnings))) => publisher.publish(Snapshot {
                                changes,
                                node_addresses: None,
                                changed_at: Some(scanned_at),
                                warnings: doc_warnings
                                    .iter()
                                    .map(|w| format!("manifest {w}"))
                                    .collect(),
                            }),
                            Ok(None) => {}
                            // A vanished directory keeps the last programmed state: never flush
                            // on a read error.
                            Err(e) => tracing::warn!("{e}; keeping the current state"),
                        }
                    }
                    let until_scan = last_scan
                        .map(|t| poll.saturating_sub(t.elapsed()))
                        .unwrap_or_default()
                        .min(wait);
                    woken = match &events {
                        Some(events) => events
                            .wait(until_scan, Duration::from_millis(2))
                            .unwrap_or_else(|e| {
                                tracing::warn!("waiting for inotify events: {e}");
                                std::thread::sleep(until_scan);
                                false
                            }),
                        None => {
                            std::thread::sleep(until_scan);
                            false
                        }
                    };
                }
            },
        )
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        if let Some(worker) = self.worker.take() {
            // A panic in the source thread was already printed; nothing more to do with it here.
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untaken_snapshots_merge_and_the_later_state_of_an_object_wins() {
        use k8s_openapi::api::core::v1::Service;
        let service = |name: &str, ip: &str| {
            let mut s = Service::default();
            s.metadata.name = Some(name.into());
            s.spec = Some(Default::default());
            s.spec.as_mut().unwrap().cluster_ip = Some(ip.into());
            Some(Arc::new(s))
        };
        let key = |name: &str| ("default".to_string(), name.to_string());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let feed = Feed::spawn("test", Box::new(|| {}), move |publisher| {
            let steps = [
                vec![
                    ("a", service("a", "198.19.0.1")),
                    ("b", service("b", "198.19.0.2")),
                ],
                vec![("a", service("a", "198.19.0.3"))],
                vec![("b", None)],
            ];
            for (n, step) in steps.into_iter().enumerate() {
                let mut changes = Changes::default();
                for (name, obj) in step {
                    changes.services.insert(key(name), obj);
                }
                publisher.publish(Snapshot {
                    changes,
                    warnings: vec![n.to_string()],
                    ..Default::default()
                });
            }
            tx.send(()).unwrap();
        })
        .unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("source thread did not publish within 10 s");
        let got = feed.next(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(
            got.warnings,
            ["0", "1", "2"],
            "every warning is still logged"
        );
        let a = got.changes.services[&key("a")].as_ref().unwrap();
        assert_eq!(
            a.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("198.19.0.3")
        );
        assert!(
            got.changes.services[&key("b")].is_none(),
            "the deletion came last"
        );
        // The thread has ended: the feed reports it instead of waiting.
        assert!(feed.next(Duration::from_secs(10)).is_err());
    }

    #[test]
    fn a_replacing_snapshot_keeps_the_earliest_change_time() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(500);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let feed = Feed::spawn("test", Box::new(|| {}), move |publisher| {
            for changed_at in [Some(t0), Some(later), None] {
                publisher.publish(Snapshot {
                    changed_at,
                    ..Default::default()
                });
            }
            tx.send(()).unwrap();
        })
        .unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("source thread did not publish within 10 s");
        let got = feed.next(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(got.changed_at, Some(t0), "the first untaken change counts");
    }
}
