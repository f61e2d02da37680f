//! Durable ingest: validated readings are committed in groups and only then acknowledged.
//!
//! Requests queue their readings on a bounded channel; one writer task takes everything that has
//! queued (up to [`MAX_ROWS_PER_COMMIT`]), stores it in one transaction, answers every request
//! with its rows' ids, and hands the newly stored readings downstream (live delivery, batches,
//! alerts). A full queue or too many readings waiting for delivery is refused up front with 503,
//! so memory stays bounded and nothing of a refused request is stored.

mod validate;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use crate::store::NewReading;
pub use validate::{Invalid, MAX_FUTURE_MS, validate};

/// What one commit stored for announcement, handed over by the ingest writer to
/// `deliver::monitor`.
pub struct Handover {
    /// Its alert and status events: announced now.
    pub events: Vec<crate::store::OutboxEvent>,
    /// Its `pending_batches` row: announced by this node's fanout at its next flush; tracked
    /// here (lease renewed) until the emitter reports it out.
    pub pending: Option<i64>,
}

use crate::store::{Outcomes, Store, StoreError, now_ms};
use crate::tasks::Health;
use crate::wire::SensorReading;

/// The most rows one transaction carries.
pub const MAX_ROWS_PER_COMMIT: usize = 10_000;

/// A stored reading on its way to clients.
#[derive(Debug, Clone)]
pub struct Stored {
    pub committed_at: Instant,
    pub site_id: String,
    pub recorded_at: i64,
    pub reading: SensorReading,
}

/// The new readings of one request, after their commit.
#[derive(Debug)]
pub struct Committed {
    /// When the commit finished, for the flush-latency metric.
    pub committed_at: Instant,
    pub org_id: String,
    pub readings: Vec<Stored>,
    /// On the last requests of a commit: its `pending_batches` row, done once the batches
    /// holding these readings (and the requests' before it) are out.
    pub release: Option<i64>,
}

/// Why a submission was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the ingest queue is full")]
    QueueFull,
    #[error("too many readings are waiting for delivery")]
    BuffersFull,
    #[error("storage failed: {0}")]
    Storage(String),
    /// Units deleted after the request was validated: the readings (index, unit) naming them.
    #[error("unknown units: {0:?}")]
    UnknownUnits(Vec<(usize, String)>),
    #[error("the gateway is shutting down")]
    Closed,
}

struct Job {
    org_id: String,
    readings: Vec<NewReading>,
    /// The site of each reading's unit, resolved at validation.
    sites: Vec<String>,
    reply: oneshot::Sender<Result<Outcomes, SubmitError>>,
}

/// The handle requests submit through; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    queue: mpsc::Sender<Job>,
    health: Health,
    buffered: Arc<AtomicUsize>,
    max_buffered: usize,
}

impl Ingest {
    /// Prepares the writer, for the caller to run as a task. Committed readings go to every
    /// `downstream` channel, in commit order; the alert and status events each commit stored go
    /// to `announce`.
    pub fn start(
        store: Store,
        queue_len: usize,
        max_buffered: usize,
        downstream: Downstream,
        health: Health,
    ) -> (Ingest, Writer) {
        let (tx, rx) = mpsc::channel(queue_len);
        let buffered = Arc::new(AtomicUsize::new(0));
        let task = Writer {
            store,
            rx,
            downstream,
            buffered: buffered.clone(),
            health: health.clone(),
        };
        let ingest = Ingest {
            queue: tx,
            health,
            buffered,
            max_buffered,
        };
        (ingest, task)
    }

    /// Readings stored but not yet flushed to clients (shared with the batcher, which releases
    /// them when it flushes).
    pub fn buffered(&self) -> Arc<AtomicUsize> {
        self.buffered.clone()
    }

    /// Stores the readings and answers once they are durable.
    pub async fn submit(
        &self,
        org_id: String,
        readings: Vec<NewReading>,
        sites: Vec<String>,
    ) -> Result<Outcomes, SubmitError> {
        if self.health.failed() {
            return Err(SubmitError::Closed);
        }
        if self.buffered.load(Ordering::Relaxed) >= self.max_buffered {
            return Err(SubmitError::BuffersFull);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            org_id,
            readings,
            sites,
            reply,
        };
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })?;
        answer.await.unwrap_or(Err(SubmitError::Closed))
    }
}

/// The group-commit loop, not started yet (see [`Writer::run`]).
pub struct Writer {
    store: Store,
    rx: mpsc::Receiver<Job>,
    downstream: Downstream,
    buffered: Arc<AtomicUsize>,
    health: Health,
}

impl Writer {
    /// Runs until `stop` is cancelled; then commits what has already queued and ends.
    pub fn run(self, stop: CancellationToken) -> impl std::future::Future<Output = ()> + Send {
        writer(
            self.store,
            self.rx,
            self.downstream,
            self.buffered,
            self.health,
            stop,
        )
    }
}

/// Where committed work goes.
pub struct Downstream {
    /// The stored readings, to live delivery and batching.
    pub readings: Vec<mpsc::Sender<Arc<Committed>>>,
    /// What each commit stored for announcement (its alert and status events, its pending
    /// readings), to be tracked until it is out.
    pub announce: mpsc::Sender<Handover>,
}

/// Group commits in flight at once. While one commits (its fsync, the verdicts, the round trips
/// of a transaction), the next one's rows are already being inserted on another connection, so
/// the database is not left idle between groups. Two commits touching the same unit are still
/// serialised by that unit's row lock (taken in one order, as between nodes), so every verdict
/// is decided from what the previous commit stored; downstream still gets the groups in the
/// order they were taken, each once its commit is done.
///
/// SQLite has one writer: a second transaction only waits in SQLite's busy handler, whose
/// sleeps cost more than they save (load harness, 10 × 1,000-reading posters: 42,400 → 32,900
/// readings/s, p99 332 → 553 ms), so it keeps one commit at a time.
fn commits_in_flight(store: &Store) -> usize {
    match store.engine_name() {
        "sqlite" => 1,
        _ => 2,
    }
}

/// The group-commit loop. On stop it commits what has already queued, then ends, which closes
/// the downstream channels so the later stages flush and end in turn.
async fn writer(
    store: Store,
    mut rx: mpsc::Receiver<Job>,
    downstream: Downstream,
    buffered: Arc<AtomicUsize>,
    health: Health,
    stop: CancellationToken,
) {
    let max_in_flight = commits_in_flight(&store);
    let mut inflight = FuturesOrdered::new();
    let mut open = true;
    let mut stopping = false;
    while open || !inflight.is_empty() {
        tokio::select! {
            biased;
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                if let Some(done) = done {
                    hand_off(done, &downstream).await;
                }
            }
            job = rx.recv(), if open && inflight.len() < max_in_flight => {
                let Some(first) = job else {
                    open = false;
                    continue;
                };
                let mut jobs = vec![first];
                let mut rows = jobs[0].readings.len();
                while rows < MAX_ROWS_PER_COMMIT {
                    match rx.try_recv() {
                        Ok(job) => {
                            rows += job.readings.len();
                            jobs.push(job);
                        }
                        Err(_) => break,
                    }
                }
                // A failed pipeline stage would leave what is stored now unannounced:
                // acknowledge nothing more (the node is on its way out; see `tasks`).
                if health.failed() {
                    for job in jobs {
                        job.reply.send(Err(SubmitError::Closed)).ok();
                    }
                    continue;
                }
                inflight.push_back(commit(&store, jobs, &buffered));
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                rx.close();
            }
        }
    }
    tracing::debug!("ingest writer stopped");
}

/// What a group commit hands downstream once it (and every group taken before it) is done.
struct Done {
    handed: Vec<Committed>,
    events: Vec<crate::store::OutboxEvent>,
    pending: Option<i64>,
}

/// Stores a group and answers its requests; `None` when nothing of it was stored.
async fn commit(store: &Store, mut jobs: Vec<Job>, buffered: &AtomicUsize) -> Option<Done> {
    let started = Instant::now();
    let (committed, rows) = loop {
        let flat: Vec<(&str, &NewReading)> = jobs
            .iter()
            .flat_map(|j| j.readings.iter().map(move |r| (j.org_id.as_str(), r)))
            .collect();
        let rows = flat.len();
        let result = store.commit_readings(&flat, now_ms()).await;
        drop(flat);
        match result {
            Ok(committed) => break (committed, rows),
            // Units deleted since validation: their requests are refused (422), the others
            // are committed without them.
            Err(StoreError::UnitsGone(gone)) => {
                let (refused, kept): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| {
                    j.readings
                        .iter()
                        .any(|r| gone.iter().any(|(o, u)| *o == j.org_id && *u == r.unit_id))
                });
                for job in refused {
                    let mine = job
                        .readings
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| {
                            gone.iter()
                                .any(|(o, u)| *o == job.org_id && *u == r.unit_id)
                        })
                        .map(|(i, r)| (i, r.unit_id.clone()))
                        .collect();
                    job.reply.send(Err(SubmitError::UnknownUnits(mine))).ok();
                }
                if kept.is_empty() {
                    return None;
                }
                jobs = kept;
            }
            Err(e) => {
                crate::observe::storage_error();
                tracing::warn!(requests = jobs.len(), rows, error = %e, "commit failed; nothing stored");
                for job in jobs {
                    job.reply
                        .send(Err(SubmitError::Storage(e.to_string())))
                        .ok();
                }
                return None;
            }
        }
    };
    let outcomes = committed.outcomes;
    crate::observe::committed(rows, started.elapsed());
    tracing::debug!(
        requests = jobs.len(),
        rows,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "group committed"
    );
    let mut offset = 0;
    // One clock read for the whole group: every row of it became durable at the same commit.
    let committed_at = Instant::now();
    // Every request of the group is acknowledged before anything is handed downstream: the rows
    // are durable now, and a full downstream queue (which the hand-over below waits on) must not
    // hold back the answers of the group's later requests.
    let mut handed = Vec::with_capacity(jobs.len());
    for job in jobs {
        let n = job.readings.len();
        let mine = outcomes[offset..offset + n].to_vec();
        offset += n;
        let stored: Vec<Stored> = job
            .readings
            .into_iter()
            .zip(job.sites)
            .zip(&mine)
            .filter(|(_, (_, new))| *new)
            .map(|((r, site_id), (id, _))| Stored {
                committed_at,
                site_id,
                recorded_at: r.recorded_at,
                reading: r.into_wire(*id),
            })
            .collect();
        job.reply.send(Ok(mine)).ok();
        if stored.is_empty() {
            continue;
        }
        let now = buffered.fetch_add(stored.len(), Ordering::Relaxed) + stored.len();
        crate::observe::buffered(now);
        handed.push(Committed {
            committed_at,
            org_id: job.org_id,
            readings: stored,
            release: None,
        });
    }
    if let Some(last) = handed.last_mut() {
        last.release = committed.pending;
    }
    Some(Done {
        handed,
        events: committed.events,
        pending: committed.pending,
    })
}

/// Hands a commit's work downstream, in the order the groups were taken.
async fn hand_off(done: Done, downstream: &Downstream) {
    // Waiting here is the backpressure: a slow stage stops the next commit, the queue fills,
    // and ingest answers 503.
    // The `stall-announce` fault drops the events, as a node dying here would; its readings
    // still go out with its batches.
    let events = if crate::fault::active("stall-announce") {
        Vec::new()
    } else {
        done.events
    };
    let handover = Handover {
        events,
        pending: done.pending,
    };
    downstream.announce.send(handover).await.ok();
    for committed in done.handed {
        let committed = Arc::new(committed);
        for tx in &downstream.readings {
            tx.send(committed.clone()).await.ok();
        }
    }
}
