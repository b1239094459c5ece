//! The group-commit writer: one dedicated thread with its own SQLite connection that turns
//! the shards' jobs into durable transactions and only then answers the sources.
//!
//! ```text
//! shards ──(permit, job)──▶ queue ──▶ writer thread: gather ≤ max_batch jobs for ≤ commit_interval
//!                                      BEGIN IMMEDIATE; insert each; COMMIT (fsync, synchronous=FULL)
//!                                      then reply to each job, in order
//! ```
//!
//! # The queue
//!
//! A std channel (the writer blocks on it with a timeout, which a tokio channel cannot do
//! from a plain thread) bounded by a tokio [`Semaphore`]: a producer awaits a permit before
//! it sends, and the writer returns the permit when it takes the job off the queue. So at
//! most `writer_queue` jobs wait, plus at most `max_batch` in the batch being written; a
//! full queue makes the shards wait, whose own full queues make `submit` answer
//! `Overloaded`. Nothing is unbounded.
//!
//! # Group commit
//!
//! The batch opens when a job arrives and closes after `commit_interval` or at `max_batch`
//! jobs, whichever comes first; when the interval has passed, jobs already queued still
//! join without waiting (so `commit_interval = 0` means "commit whatever is queued").
//! One transaction per batch: its fsync is shared by every uplink in it.
//!
//! # Failure
//!
//! If the transaction fails (disk full, I/O error, the file locked past `busy_timeout`),
//! it is rolled back and every uplink of the batch is answered
//! `Rejected(Unavailable { retry_after })`: nothing was kept, the device retries. One ERROR
//! is logged when commits start failing (repeated at most once a minute while they keep
//! failing, with the count), and one INFO when they succeed again — never one per uplink.
//!
//! # Alert transitions
//!
//! A job carries the alert transitions the shard decided on its readings
//! ([`CommitJob::alerts`]); silence timers send theirs as a [`Job::Alerts`]. They are
//! written in the same transaction as the uplink (`alert_transitions`, `alert_state`), and
//! only after the COMMIT are they counted and sent to the notifier as [`AlertEvent`]s —
//! with `try_send`, right after each commit (no batching beyond the group commit itself,
//! so a critical alert leaves as soon as its uplink is durable); a full queue drops the
//! event and counts it (`nbiot_alert_events_dropped_total`): the store is the record and
//! the notifier reloads from it.
//!
//! The shards' rule state moves on when they decide a transition, before the commit. If
//! the commit fails, the uplink is answered `unavailable` and the device retries, but the
//! retried reading no longer makes a transition: so the writer keeps the transitions of a
//! failed batch and writes them first in the next transaction (at most
//! [`MAX_CARRIED_TRANSITIONS`]; beyond, the oldest are dropped with an ERROR, and memory
//! and store agree again after the next restart).
//!
//! # Shutdown
//!
//! The writer stops when every sender is gone (the shards, the retention task and the
//! pipeline itself): the channel hands out everything queued before it reports the
//! disconnect, so every accepted job is committed and answered before the thread ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, info};

use super::state::SeqStep;
use super::{Outcome, Reject, Transport};
use crate::alerts::{AlertEvent, AlertState};
use crate::profiles::Profile;
use crate::registry::Device;
use crate::rules::Transition;
use crate::store::alerts::{self as alert_store, NewTransition};
use crate::store::checkpoint::{self, WalFrames};
use crate::store::ingest::{self, NewReading, NewUplink, Pruned};
use crate::store::StoreError;
use crate::telemetry::metrics as m;

/// How long, while commits keep failing, between two ERROR lines about it.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Transitions of failed batches kept for the next transaction (see the module docs).
pub(super) const MAX_CARRIED_TRANSITIONS: usize = 100_000;

/// An uplink ready to commit: everything the shard decided.
#[derive(Debug)]
pub(super) struct CommitJob {
    pub device: Arc<Device>,
    pub profile: Arc<Profile>,
    pub transport: Transport,
    /// `ip:port`
    pub peer: Option<String>,
    pub received_at_ms: i64,
    pub payload: Bytes,
    pub decoded: Decoded,
    pub sequence: Option<u32>,
    pub step: SeqStep,
    /// Alert transitions its readings (or its mere arrival) caused.
    pub alerts: Vec<Transition>,
    pub reply: Option<oneshot::Sender<Outcome>>,
}

#[derive(Debug)]
pub(super) enum Decoded {
    Readings(Vec<NewReading>),
    Error { code: &'static str, message: String },
}

/// One retention batch (see [`ingest::prune_batch`]).
#[derive(Debug)]
pub(super) struct PruneJob {
    pub cutoff_ms: i64,
    pub max_uplinks: usize,
    pub forwarding: bool,
    pub reply: oneshot::Sender<Result<Pruned, StoreError>>,
}

#[derive(Debug)]
pub(super) enum Job {
    Commit(Box<CommitJob>),
    /// A retransmission a source recognised for this (registered) device.
    Duplicate(String),
    /// Alert transitions no uplink carries: silence deadlines, rules resolved at start.
    Alerts(Vec<Transition>),
    /// Runs in its own short transaction between two group commits, so retention never
    /// competes with the writer for SQLite's write lock (no busy waits on either side).
    Prune(PruneJob),
}

type Queued = (Job, OwnedSemaphorePermit);

/// The producers' side of the writer queue. Cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct WriterQueue {
    tx: Sender<Queued>,
    permits: Arc<Semaphore>,
    capacity: usize,
}

/// A bounded queue to the writer: `capacity` jobs at most.
pub(super) fn queue(capacity: usize) -> (WriterQueue, Receiver<Queued>) {
    let capacity = capacity.max(1);
    let (tx, rx) = std::sync::mpsc::channel();
    let q = WriterQueue {
        tx,
        permits: Arc::new(Semaphore::new(capacity)),
        capacity,
    };
    (q, rx)
}

impl WriterQueue {
    /// Queues `job`, waiting for room. Gives the job back if the writer has stopped.
    /// Cancel-safe: cancelled while waiting, the job is dropped unqueued.
    pub async fn send(&self, job: Job) -> Result<(), Job> {
        let permit = match Arc::clone(&self.permits).acquire_owned().await {
            Ok(p) => p,
            Err(_) => return Err(job),
        };
        self.tx.send((job, permit)).map_err(|e| e.0 .0)
    }
}

/// Queue lengths the shards report, summed into `nbiot_pipeline_queue_uplinks`.
#[derive(Debug)]
pub(super) struct QueueDepth {
    shards: Box<[AtomicUsize]>,
}

impl QueueDepth {
    pub fn new(shards: usize) -> QueueDepth {
        QueueDepth {
            shards: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    pub fn set(&self, shard: usize, len: usize) {
        if let Some(slot) = self.shards.get(shard) {
            slot.store(len, Ordering::Relaxed);
        }
    }

    fn total(&self) -> usize {
        self.shards.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

/// How the writer batches and answers.
#[derive(Debug, Clone)]
pub(super) struct WriterConfig {
    pub commit_interval: Duration,
    pub max_batch: usize,
    pub unavailable_retry_after: Duration,
    /// Where committed transitions go (see the module docs).
    pub alert_events: Option<tokio::sync::mpsc::Sender<AlertEvent>>,
}

/// What the writer did, logged when it stops.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct WriterStats {
    pub commits: u64,
    pub uplinks: u64,
    pub failed_batches: u64,
}

/// Starts the writer thread on `conn`.
pub(super) fn spawn(
    conn: Connection,
    wal: WalFrames,
    rx: Receiver<Queued>,
    queue: &WriterQueue,
    config: WriterConfig,
    depth: Arc<QueueDepth>,
) -> std::io::Result<std::thread::JoinHandle<WriterStats>> {
    let permits = Arc::clone(&queue.permits);
    let capacity = queue.capacity;
    std::thread::Builder::new()
        .name("nbiot-store-writer".to_owned())
        .spawn(move || {
            // Closing the semaphore wakes shards waiting for room when the writer ends for
            // any reason (also a panic): they answer `Unavailable` instead of hanging.
            struct CloseOnExit(Arc<Semaphore>);
            impl Drop for CloseOnExit {
                fn drop(&mut self) {
                    self.0.close();
                }
            }
            let _close = CloseOnExit(Arc::clone(&permits));
            let mut writer = Writer::new(conn, wal, config, depth, permits, capacity);
            writer.run(&rx);
            writer.stats
        })
}

/// Metric handles, created once.
struct Metrics {
    commit_duration: Histogram,
    commit_batch: Histogram,
    queue: Gauge,
    /// By [`transport_index`].
    stored: [Counter; 2],
    ingest: [Histogram; 2],
    unavailable: [Counter; 2],
    /// By profile name: (readings stored, sequence gaps, uplinks decoded).
    per_profile: HashMap<String, (Counter, Counter, Counter)>,
    pruned_uplinks: Counter,
    pruned_readings: Counter,
    pruned_transitions: Counter,
    /// By (profile, rule).
    alerts: HashMap<(Arc<str>, Arc<str>), AlertMetrics>,
    /// `nbiot_devices_silent` by profile.
    silent: HashMap<Arc<str>, Gauge>,
    events_dropped: Counter,
}

/// The handles of one rule.
#[derive(Clone)]
struct AlertMetrics {
    /// By [`AlertState`]: pending, firing, resolved.
    transitions: [Counter; 3],
    firing: Gauge,
}

fn state_index(s: AlertState) -> usize {
    match s {
        AlertState::Pending => 0,
        AlertState::Firing => 1,
        AlertState::Resolved => 2,
    }
}

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Coap => 0,
        Transport::Mqtt => 1,
    }
}

impl Metrics {
    fn new() -> Metrics {
        let by_transport = |f: &dyn Fn(&'static str) -> Counter| {
            [f(Transport::Coap.as_str()), f(Transport::Mqtt.as_str())]
        };
        Metrics {
            commit_duration: metrics::histogram!(m::STORE_COMMIT_DURATION),
            commit_batch: metrics::histogram!(m::STORE_COMMIT_BATCH),
            queue: metrics::gauge!(m::PIPELINE_QUEUE),
            stored: by_transport(&|p| metrics::counter!(m::UPLINKS_STORED, "protocol" => p)),
            ingest: [
                metrics::histogram!(m::INGEST_DURATION, "protocol" => Transport::Coap.as_str()),
                metrics::histogram!(m::INGEST_DURATION, "protocol" => Transport::Mqtt.as_str()),
            ],
            unavailable: by_transport(
                &|p| metrics::counter!(m::UPLINKS_REJECTED, "protocol" => p, "reason" => m::reason::UNAVAILABLE),
            ),
            per_profile: HashMap::new(),
            pruned_uplinks: metrics::counter!(m::STORE_PRUNED, "table" => "uplinks"),
            pruned_readings: metrics::counter!(m::STORE_PRUNED, "table" => "readings"),
            pruned_transitions: metrics::counter!(m::STORE_PRUNED, "table" => "alert_transitions"),
            alerts: HashMap::new(),
            silent: HashMap::new(),
            events_dropped: metrics::counter!(m::ALERT_EVENTS_DROPPED),
        }
    }

    fn alert(&mut self, t: &Transition) -> AlertMetrics {
        let key = (Arc::clone(&t.profile), Arc::clone(&t.rule));
        if let Some(h) = self.alerts.get(&key) {
            return h.clone();
        }
        let (profile, rule) = (t.profile.to_string(), t.rule.to_string());
        let counter = |state: AlertState| metrics::counter!(m::ALERT_TRANSITIONS, "profile" => profile.clone(), "rule" => rule.clone(), "state" => state.as_str());
        let h = AlertMetrics {
            transitions: [
                counter(AlertState::Pending),
                counter(AlertState::Firing),
                counter(AlertState::Resolved),
            ],
            firing: metrics::gauge!(m::ALERTS_FIRING, "profile" => profile.clone(), "rule" => rule.clone(), "severity" => t.severity.as_str()),
        };
        self.alerts.insert(key, h.clone());
        h
    }

    fn silent(&mut self, profile: &Arc<str>) -> Gauge {
        self.silent
            .entry(Arc::clone(profile))
            .or_insert_with(|| metrics::gauge!(m::DEVICES_SILENT, "profile" => profile.to_string()))
            .clone()
    }

    /// (readings stored, sequence gaps, uplinks decoded) of a profile; handles are cheap
    /// clones.
    fn profile(&mut self, name: &str) -> (Counter, Counter, Counter) {
        if let Some(c) = self.per_profile.get(name) {
            return c.clone();
        }
        let c = (
            metrics::counter!(m::READINGS_STORED, "profile" => name.to_owned()),
            metrics::counter!(m::SEQUENCE_GAPS, "profile" => name.to_owned()),
            metrics::counter!(m::UPLINKS_DECODED, "profile" => name.to_owned()),
        );
        self.per_profile.insert(name.to_owned(), c.clone());
        c
    }
}

struct Writer {
    conn: Connection,
    /// The WAL's length after the last commit (`store::checkpoint`).
    wal: WalFrames,
    config: WriterConfig,
    depth: Arc<QueueDepth>,
    permits: Arc<Semaphore>,
    capacity: usize,
    metrics: Metrics,
    stats: WriterStats,
    /// Since when commits fail, and when the last ERROR about it was logged.
    failing: Option<(Instant, Instant, u64)>,
    /// Transitions of failed batches, written first by the next transaction.
    carried: Vec<Transition>,
    /// Scratch: the ids the last transaction gave its transitions, in write order.
    ids: Vec<i64>,
}

impl Writer {
    fn new(
        conn: Connection,
        wal: WalFrames,
        config: WriterConfig,
        depth: Arc<QueueDepth>,
        permits: Arc<Semaphore>,
        capacity: usize,
    ) -> Writer {
        Writer {
            conn,
            wal,
            config,
            depth,
            permits,
            capacity,
            metrics: Metrics::new(),
            stats: WriterStats::default(),
            failing: None,
            carried: Vec::new(),
            ids: Vec::new(),
        }
    }

    fn run(&mut self, rx: &Receiver<Queued>) {
        let max_batch = self.config.max_batch.max(1);
        let mut batch: Vec<Job> = Vec::with_capacity(max_batch.min(4096));
        loop {
            // Idle: block until the first job (or until every sender is gone).
            let first = match rx.recv() {
                Ok((job, _permit)) => job,
                Err(_) => break,
            };
            let mut control = match first {
                Job::Prune(p) => Some(p),
                job => {
                    batch.push(job);
                    None
                }
            };
            let deadline = Instant::now() + self.config.commit_interval;
            let mut disconnected = false;
            while control.is_none() && batch.len() < max_batch {
                let now = Instant::now();
                let next = if now >= deadline {
                    match rx.try_recv() {
                        Ok(q) => q,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                } else {
                    match rx.recv_timeout(deadline - now) {
                        Ok(q) => q,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => {
                            disconnected = true;
                            break;
                        }
                    }
                };
                // The permit drops here: the job has left the queue.
                match next.0 {
                    Job::Prune(p) => control = Some(p),
                    job => batch.push(job),
                }
            }
            self.commit(&mut batch);
            // After the answers: a long WAL is checkpointed here, off every uplink's path.
            checkpoint::catch_up(&self.conn, &self.wal);
            if let Some(p) = control {
                self.prune(p);
            }
            if disconnected {
                break;
            }
        }
    }

    /// Commits `batch` in one transaction, then answers each job in order.
    fn commit(&mut self, batch: &mut Vec<Job>) {
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        self.ids.clear();
        let result = write_batch(&mut self.conn, &self.carried, batch, &mut self.ids);
        let elapsed = started.elapsed();
        let uplinks = batch.iter().filter(|j| matches!(j, Job::Commit(_))).count();
        self.metrics.commit_duration.record(elapsed.as_secs_f64());
        self.metrics.commit_batch.record(uplinks as f64);
        match result {
            Ok(()) => {
                self.stats.commits += 1;
                self.stats.uplinks += uplinks as u64;
                if let Some((since, _, failed)) = self.failing.take() {
                    info!(
                        failed_batches = failed,
                        failing_for = ?since.elapsed(),
                        "Store commits succeed again."
                    );
                }
                // Alerts first: a critical one leaves the moment its uplink is durable.
                let mut ids = std::mem::take(&mut self.ids).into_iter();
                for t in std::mem::take(&mut self.carried) {
                    self.alert_committed(&t, ids.next());
                }
                for job in batch.iter() {
                    let alerts = match job {
                        Job::Commit(c) => &c.alerts,
                        Job::Alerts(a) => a,
                        _ => continue,
                    };
                    for t in alerts {
                        self.alert_committed(t, ids.next());
                    }
                }
                let now_ms = now_ms();
                for job in batch.drain(..) {
                    if let Job::Commit(job) = job {
                        self.answer_committed(*job, now_ms);
                    }
                }
            }
            Err(e) => {
                self.stats.failed_batches += 1;
                self.log_failure(&e, uplinks);
                let outcome = Outcome::Rejected(Reject::Unavailable {
                    retry_after: self.config.unavailable_retry_after,
                });
                for job in batch.drain(..) {
                    match job {
                        Job::Commit(mut job) => {
                            self.carried.append(&mut job.alerts);
                            self.metrics.unavailable[transport_index(job.transport)].increment(1);
                            if let Some(reply) = job.reply {
                                let _ = reply.send(outcome.clone());
                            }
                        }
                        Job::Alerts(mut a) => self.carried.append(&mut a),
                        Job::Duplicate(_) | Job::Prune(_) => {}
                    }
                }
                if self.carried.len() > MAX_CARRIED_TRANSITIONS {
                    let drop = self.carried.len() - MAX_CARRIED_TRANSITIONS;
                    self.carried.drain(..drop);
                    error!(
                        dropped = drop,
                        kept = MAX_CARRIED_TRANSITIONS,
                        "Alert transitions waiting for the store were dropped; alert state is consistent again after a restart."
                    );
                }
            }
        }
        let writer_queued = self
            .capacity
            .saturating_sub(self.permits.available_permits());
        self.metrics
            .queue
            .set((self.depth.total() + writer_queued) as f64);
    }

    /// A transition is durable: count it, move the gauges, tell the notifier.
    fn alert_committed(&mut self, t: &Transition, id: Option<i64>) {
        let h = self.metrics.alert(t);
        if let Some(c) = h.transitions.get(state_index(t.state)) {
            c.increment(1);
        }
        match t.state {
            AlertState::Firing => h.firing.increment(1.0),
            AlertState::Resolved if t.starts_ms.is_some() => h.firing.decrement(1.0),
            _ => {}
        }
        if t.silent != 0 {
            self.metrics
                .silent(&t.profile)
                .increment(f64::from(t.silent));
        }
        let (Some(events), Some(id)) = (&self.config.alert_events, id) else {
            return;
        };
        let event = AlertEvent {
            id,
            device: t.device.id().to_owned(),
            profile: t.profile.to_string(),
            rule: t.rule.to_string(),
            severity: t.severity,
            state: t.state,
            at_ms: t.at_ms,
            starts_ms: t.starts_ms,
            received_at_ms: t.received_at_ms,
            value: t.value,
            summary: t.summary.clone(),
            labels: t
                .device
                .labels()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        };
        if events.try_send(event).is_err() {
            // Full (or the notifier stopped): the store has it; the notifier reloads.
            self.metrics.events_dropped.increment(1);
            debug!(device = %t.device.id(), rule = %t.rule, "Alert event dropped: the notifier's queue is full.");
        }
    }

    fn answer_committed(&mut self, job: CommitJob, now_ms: i64) {
        let t = transport_index(job.transport);
        self.metrics.stored[t].increment(1);
        let waited_ms = now_ms.saturating_sub(job.received_at_ms).max(0);
        self.metrics.ingest[t].record(waited_ms as f64 / 1000.0);
        let outcome = match job.decoded {
            Decoded::Readings(readings) => {
                let (stored, gaps, decoded) = self.metrics.profile(&job.profile.name);
                stored.increment(readings.len() as u64);
                decoded.increment(1);
                if job.step.gaps > 0 {
                    gaps.increment(u64::from(job.step.gaps));
                }
                Outcome::Committed {
                    readings: readings.len(),
                    downlink: None,
                }
            }
            Decoded::Error { code, message } => {
                metrics::counter!(
                    m::DECODE_ERRORS,
                    "profile" => job.profile.name.clone(),
                    "code" => code
                )
                .increment(1);
                Outcome::Undecodable { code, message }
            }
        };
        if let Some(reply) = job.reply {
            // The source may have given up (its device went away): nothing to do then.
            let _ = reply.send(outcome);
        }
    }

    fn log_failure(&mut self, e: &rusqlite::Error, uplinks: usize) {
        let now = Instant::now();
        match &mut self.failing {
            None => {
                error!(
                    error = %e,
                    uplinks,
                    retry_after = ?self.config.unavailable_retry_after,
                    "Store commit failed; the batch was answered `unavailable` and devices will retry."
                );
                self.failing = Some((now, now, 1));
            }
            Some((since, last_log, failed)) => {
                *failed += 1;
                if now.duration_since(*last_log) >= FAILURE_LOG_INTERVAL {
                    error!(
                        error = %e,
                        failed_batches = *failed,
                        failing_for = ?since.elapsed(),
                        "Store commits keep failing; uplinks are answered `unavailable`."
                    );
                    *last_log = now;
                } else {
                    debug!(error = %e, uplinks, "Store commit failed again.");
                }
            }
        }
    }

    fn prune(&mut self, p: PruneJob) {
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut pruned = ingest::prune_batch(&tx, p.cutoff_ms, p.max_uplinks, p.forwarding)?;
            pruned.alert_transitions =
                alert_store::prune_transitions(&tx, p.cutoff_ms, p.max_uplinks, p.forwarding)?;
            // A full batch of transitions may leave more, like a full batch of uplinks.
            pruned.more |= pruned.alert_transitions >= p.max_uplinks.max(1);
            tx.commit()?;
            Ok::<_, rusqlite::Error>(pruned)
        })();
        if let Ok(pruned) = &result {
            self.metrics.pruned_uplinks.increment(pruned.uplinks as u64);
            self.metrics
                .pruned_readings
                .increment(pruned.readings as u64);
            self.metrics
                .pruned_transitions
                .increment(pruned.alert_transitions as u64);
        }
        let _ = p.reply.send(result.map_err(StoreError::from));
    }
}

/// One transaction holding every job of the batch (after the transitions carried over from
/// failed batches); the ids of the transitions written are appended to `ids` in order. On
/// error the transaction rolls back when dropped (rusqlite's `Transaction`, also when
/// COMMIT itself failed).
fn write_batch(
    conn: &mut Connection,
    carried: &[Transition],
    batch: &[Job],
    ids: &mut Vec<i64>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for t in carried {
        ids.push(write_transition(&tx, t)?);
    }
    for job in batch {
        match job {
            Job::Commit(c) => {
                let peer = c.peer.as_deref();
                let (readings, error): (&[NewReading], _) = match &c.decoded {
                    Decoded::Readings(r) => (r, None),
                    Decoded::Error { code, message } => (&[], Some((*code, message.as_str()))),
                };
                ingest::insert_uplink(
                    &tx,
                    &NewUplink {
                        device: c.device.id(),
                        profile: &c.profile.name,
                        codec: &c.profile.codec,
                        transport: c.transport.as_str(),
                        peer,
                        received_at_ms: c.received_at_ms,
                        payload: &c.payload,
                        error,
                        sequence: c.sequence,
                        gaps: c.step.gaps,
                        reset: c.step.reset,
                        readings,
                    },
                )?;
                for t in &c.alerts {
                    ids.push(write_transition(&tx, t)?);
                }
            }
            Job::Duplicate(device) => ingest::add_duplicate(&tx, device)?,
            Job::Alerts(alerts) => {
                for t in alerts {
                    ids.push(write_transition(&tx, t)?);
                }
            }
            Job::Prune(_) => {}
        }
    }
    tx.commit()
}

fn write_transition(conn: &Connection, t: &Transition) -> rusqlite::Result<i64> {
    alert_store::insert_transition(
        conn,
        &NewTransition {
            device: t.device.id(),
            profile: &t.profile,
            rule: &t.rule,
            severity: t.severity.as_str(),
            state: t.state.as_str(),
            at_ms: t.at_ms,
            since_ms: t.since_ms,
            starts_ms: t.starts_ms,
            value: t.value,
            summary: &t.summary,
        },
    )
}

/// Wall-clock milliseconds since the Unix epoch (for the receipt-to-commit histogram).
pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
