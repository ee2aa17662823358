//! The hand-off between a source and the agent's apply loop, whatever the source is.
//!
//! A source runs on its own thread (the manifests poller, or the Kubernetes reflectors on a small
//! tokio runtime) and publishes full [`Snapshot`]s into a one-place slot; the agent takes the newest
//! one when it is ready for it. A snapshot published while the agent is still applying the previous
//! one replaces any snapshot not yet taken, so a slow apply coalesces changes instead of queueing
//! them, and the agent never applies a state that is already stale.
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

use super::{
    manifests::{self, DirWatcher},
    Objects,
};

/// A complete view of the cluster as a source sees it. Sources publish only complete views: the
/// Kubernetes source publishes nothing until every watched kind finished its first list.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub objects: Objects,
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
    /// Replaces any snapshot the agent has not taken yet.
    pub fn publish(&self, mut snapshot: Snapshot) {
        let mut state = self.slot.state.lock().unwrap_or_else(|e| e.into_inner());
        // The replaced snapshot's change is not programmed yet either: measure from the earlier.
        if let Some(untaken) = state.latest.take() {
            snapshot.changed_at = match (untaken.changed_at, snapshot.changed_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
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

/// The agent's end: the newest snapshot of a running source. Dropping it stops the source and
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

    /// Waits up to `timeout` for a snapshot newer than the last one taken and returns the newest.
    /// `Ok(None)`: nothing new in that time.
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

    /// The manifests directory source: re-reads `dir` whenever its fingerprint changes, checked
    /// every `poll`. A directory that cannot be read keeps the last published state.
    pub fn manifests(dir: PathBuf, poll: Duration) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        Self::spawn(
            "manifests",
            Box::new(move || stop_flag.store(true, Ordering::Relaxed)),
            move |publisher| {
                let mut watcher = DirWatcher::new(&dir);
                while !stop.load(Ordering::Relaxed) {
                    let polled_at = Instant::now();
                    match watcher.changed() {
                        Ok(true) => match manifests::load_dir(&dir) {
                            Ok((objects, doc_warnings)) => publisher.publish(Snapshot {
                                objects,
                                node_addresses: None,
                                changed_at: Some(polled_at),
                                warnings: doc_warnings
                                    .iter()
                                    .map(|w| format!("manifest {w}"))
                                    .collect(),
                            }),
                            Err(e) => tracing::warn!("{e}; keeping the current state"),
                        },
                        Ok(false) => {}
                        // A vanished directory keeps the last programmed state: never flush on a
                        // read error.
                        Err(e) => tracing::warn!("{e}; keeping the current state"),
                    }
                    std::thread::sleep(poll);
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
    fn newest_snapshot_replaces_untaken_ones() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let feed = Feed::spawn("test", Box::new(|| {}), move |publisher| {
            for n in 1..=3 {
                publisher.publish(Snapshot {
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
        assert_eq!(got.warnings, vec!["3".to_string()]);
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
