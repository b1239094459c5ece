//! The ingest pipeline: from an [`Uplink`] a source received to a durable commit and the
//! acknowledgement the source sends back.
//!
//! ```text
//! source ──submit──▶ shard(device) ──▶ registry lookup → token → decode → per-device state
//!                                           │
//!                                           ▼
//!                       store writer: group commit (raw uplink + readings, one transaction)
//!                                           │
//!                          Outcome ◀────────┘ (oneshot to the source: CoAP 2.04 / PUBACK)
//! ```
//!
//! Every queue is bounded. `submit` never waits: a full shard queue is an immediate
//! [`SubmitError::Overloaded`], which the source turns into a reply the device can act on
//! (CoAP 5.03 + Max-Age; MQTT: no PUBACK, so the broker redelivers).
//!
//! # Layout
//!
//! - this file: the contract with the sources ([`Uplink`], [`Outcome`], [`Reject`],
//!   [`PipelineHandle`]) and the running [`Pipeline`] (start, retention on demand, shutdown
//!   in flow order);
//! - `shard`: one task per shard — lookup, token, profile, decode, reading times, frame
//!   counters, alert rules and silence timers; answers what is not committed;
//! - [`state`]: per-device frame-counter state and the gap/reset/wrap rules;
//! - `writer`: the group-commit writer thread, its bounded queue, the acknowledgements,
//!   alert transitions and events;
//! - `retention`: the periodic deletion of expired rows, through the writer.
//!
//! Alert rules run inside this flow: each shard owns its devices' rule state
//! ([`crate::rules::ShardRules`], loaded from `alert_state` at start), evaluates each reading
//! and runs the silence timers; the transitions ride in the uplink's job and the writer
//! commits them in the same transaction, then sends [`crate::alerts::AlertEvent`]s to
//! [`PipelineConfig::alert_events`] (see `writer`).
//!
//! The SQL is in [`crate::store::ingest`] and [`crate::store::alerts`]; the schema in
//! `migrations/0002_ingest.sql` and `migrations/0004_alerts.sql`.
//!
//! # The guarantee
//!
//! An outcome other than `Rejected` is sent only after the transaction holding the uplink
//! has committed with `synchronous = FULL`: when a device sees its ACK, the uplink survives
//! a crash, a `kill -9` or a power cut. Per device, uplinks are committed and answered in
//! the order they were submitted.

mod retention;
mod shard;
pub mod state;
mod writer;

pub use shard::{
    reading_time, EARLIEST_DEVICE_TIME_S, MAX_DEVICE_TIME_AHEAD_S, MAX_DEVICE_TIME_BEHIND_S,
};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertState;
use crate::config::StoreConfig;
use crate::profiles::Severity;
use crate::registry::Registry;
use crate::rules::{ShardRules, Transition};
use crate::store::alerts::{self as alert_store, StoredAlert};
use crate::store::checkpoint::{self, Checkpointer};
use crate::store::ingest::{self, Pruned};
use crate::store::query::ReadPool;
use crate::store::StoreError;
use crate::telemetry::metrics as m;

/// How an uplink arrived (a closed set: it is a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Coap,
    Mqtt,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Coap => "coap",
            Transport::Mqtt => "mqtt",
        }
    }
}

/// One message from a device, as a source received it.
#[derive(Debug)]
pub struct Uplink {
    /// The device id from the CoAP path or the MQTT topic.
    pub device: String,
    /// The payload exactly as sent (transport encoding still applied).
    pub payload: Bytes,
    pub transport: Transport,
    /// The CoAP peer (None for MQTT, where the broker is the peer).
    pub peer: Option<SocketAddr>,
    /// Receive time, milliseconds since the Unix epoch (UTC).
    pub received_at_ms: i64,
    /// The device token presented (CoAP `?t=`), if any.
    pub token: Option<String>,
    /// Where the outcome goes once it is decided; `None` for at-most-once (CoAP NON,
    /// MQTT QoS 0): the pipeline then commits without telling anyone.
    pub reply: Option<oneshot::Sender<Outcome>>,
}

/// What happened to an uplink; sent after the commit when it was committed.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Raw payload and readings are durable. Reply 2.04 / PUBACK.
    Committed {
        readings: usize,
        /// A pending downlink for the device (CoAP piggybacks it on the ACK).
        downlink: Option<Bytes>,
    },
    /// Committed as a raw row with its error (a fixed codec can re-decode it later), but the
    /// device should know: CoAP 4.00 with a short diagnostic; MQTT PUBACK (it is stored).
    Undecodable { code: &'static str, message: String },
    /// Not committed: nothing to keep.
    Rejected(Reject),
}

/// Why an uplink was not committed (a closed set: it is the `reason` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    UnknownDevice,
    BadToken,
    /// The device's profile is not loaded (e.g. removed by a reload).
    NoProfile,
    /// The store is failing or backlogged; retry after this long.
    Unavailable {
        retry_after: Duration,
    },
}

impl Reject {
    pub fn reason(self) -> &'static str {
        match self {
            Reject::UnknownDevice => "unknown_device",
            Reject::BadToken => "bad_token",
            Reject::NoProfile => "no_profile",
            Reject::Unavailable { .. } => "unavailable",
        }
    }
}

/// Why `submit` refused an uplink without queueing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("pipeline overloaded; retry after {retry_after:?}")]
    Overloaded { retry_after: Duration },
    #[error("pipeline is shutting down")]
    Closed,
}

/// What sources hold to hand uplinks to the pipeline. Cheap to clone.
///
/// A device always maps to the same shard, so its uplinks are processed in arrival order
/// and its state needs no lock.
#[derive(Debug, Clone)]
pub struct PipelineHandle {
    shards: std::sync::Arc<[tokio::sync::mpsc::Sender<Uplink>]>,
    retry_after: Duration,
    /// Per shard: devices whose retransmission a source recognised ([`Self::note_duplicate`]).
    /// None for a handle built by [`Self::from_shards`].
    notes: Option<std::sync::Arc<[tokio::sync::mpsc::Sender<String>]>>,
}

impl PipelineHandle {
    /// A handle over the shards' queues (the pipeline builds them; tests may pass their
    /// own channel and play the pipeline).
    pub fn from_shards(
        shards: Vec<tokio::sync::mpsc::Sender<Uplink>>,
        retry_after: Duration,
    ) -> Self {
        assert!(!shards.is_empty(), "a pipeline has at least one shard");
        PipelineHandle {
            shards: shards.into(),
            retry_after,
            notes: None,
        }
    }

    /// The shard a device belongs to (FNV-1a of its id: stable, cheap, well spread).
    pub fn shard_of(&self, device: &str) -> usize {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in device.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % self.shards.len() as u64) as usize
    }

    /// Queues an uplink without waiting. A full queue is an immediate `Overloaded`: the
    /// caller answers the device (5.03 + Max-Age, or withholds the PUBACK) and counts it.
    pub fn submit(&self, uplink: Uplink) -> Result<(), SubmitError> {
        use tokio::sync::mpsc::error::TrySendError;
        let shard = &self.shards[self.shard_of(&uplink.device)];
        match shard.try_send(uplink) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::Overloaded {
                retry_after: self.retry_after,
            }),
            Err(TrySendError::Closed(_)) => Err(SubmitError::Closed),
        }
    }

    /// Queues an uplink, waiting for room (MQTT: the broker holds unacked messages anyway,
    /// so waiting is the right backpressure there). Cancel-safe: on cancellation the
    /// uplink is dropped unqueued, and its reply sender with it.
    pub async fn submit_wait(&self, uplink: Uplink) -> Result<(), SubmitError> {
        let shard = &self.shards[self.shard_of(&uplink.device)];
        shard.send(uplink).await.map_err(|_| SubmitError::Closed)
    }

    /// Tells the pipeline that a source recognised a retransmission from `device` and did
    /// not submit it again; it is counted in the device's state (`duplicates` in
    /// `GET /api/v1/devices/{id}/latest`). The source still counts
    /// `nbiot_uplinks_duplicate_total` itself. Never waits: under overload (the shard's note
    /// queue full) or after shutdown the note is dropped — it is a statistic, not data.
    /// Unregistered devices are ignored.
    pub fn note_duplicate(&self, device: &str) {
        let Some(notes) = &self.notes else { return };
        if let Some(tx) = notes.get(self.shard_of(device)) {
            let _ = tx.try_send(device.to_owned());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The pipeline itself
// ---------------------------------------------------------------------------------------

/// Wall-clock "now" in milliseconds since the Unix epoch, injectable for tests.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(writer::now_ms)
}

/// How the pipeline is sized and timed. [`PipelineConfig::new`] takes the `[store]` keys;
/// the rest are defaults an operator has had no reason to change yet (no config keys).
#[derive(Clone)]
pub struct PipelineConfig {
    /// Shard tasks. Default: one per core (`available_parallelism`).
    pub shards: usize,
    /// Uplinks queued per shard before `submit` answers `Overloaded`. Default 1024.
    pub shard_queue: usize,
    /// Jobs queued for the writer before the shards wait. Default 4096.
    pub writer_queue: usize,
    /// Uplinks per group commit at most. Default 1000.
    pub max_batch: usize,
    /// How long a group commit waits for more uplinks after the first (`[store]
    /// commit_interval`, default 5 ms).
    pub commit_interval: Duration,
    /// How long the writer waits for SQLite's write lock (held e.g. by an operator's
    /// `sqlite3` shell) before the batch fails as unavailable. Default 5 s.
    pub busy_timeout: Duration,
    /// Uplinks and readings older than this are deleted (`[store] retention`, default 30
    /// days). Zero keeps everything.
    pub retention: Duration,
    /// How often retention runs (also once at start). Default 10 minutes.
    pub retention_interval: Duration,
    /// Uplinks deleted per retention transaction. Default 1000.
    pub retention_batch: usize,
    /// A forwarder reads readings behind `forward_cursor`: retention keeps what it has not
    /// delivered. Default false.
    pub forwarding: bool,
    /// The Max-Age / retry hint of `SubmitError::Overloaded`. Default 5 s.
    pub overload_retry_after: Duration,
    /// The retry hint of `Reject::Unavailable` when a commit fails. Default 30 s.
    pub unavailable_retry_after: Duration,
    /// "Now" for retention and for alert-rule silence deadlines (`kind = "inactive"`).
    /// Default: the system clock. Tests that pause tokio time pass a clock that follows it.
    pub clock: Clock,
    /// Where the writer sends each committed alert transition (`try_send`: a full queue
    /// drops the event, counts it, and the notifier reloads from the store). None: alerts
    /// are still evaluated, stored and counted, but nobody is told.
    pub alert_events: Option<tokio::sync::mpsc::Sender<crate::alerts::AlertEvent>>,
}

impl std::fmt::Debug for PipelineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineConfig")
            .field("shards", &self.shards)
            .field("shard_queue", &self.shard_queue)
            .field("writer_queue", &self.writer_queue)
            .field("max_batch", &self.max_batch)
            .field("commit_interval", &self.commit_interval)
            .field("busy_timeout", &self.busy_timeout)
            .field("retention", &self.retention)
            .field("retention_interval", &self.retention_interval)
            .field("retention_batch", &self.retention_batch)
            .field("forwarding", &self.forwarding)
            .field("overload_retry_after", &self.overload_retry_after)
            .field("unavailable_retry_after", &self.unavailable_retry_after)
            .finish_non_exhaustive()
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig::new(&StoreConfig::default())
    }
}

impl PipelineConfig {
    /// The defaults, with `commit_interval` and `retention` from `[store]`.
    pub fn new(store: &StoreConfig) -> PipelineConfig {
        PipelineConfig {
            shards: std::thread::available_parallelism().map_or(1, usize::from),
            shard_queue: 1024,
            writer_queue: 4096,
            max_batch: 1000,
            commit_interval: store.commit_interval,
            busy_timeout: Duration::from_secs(5),
            retention: store.retention,
            retention_interval: Duration::from_secs(600),
            retention_batch: 1000,
            forwarding: false,
            overload_retry_after: Duration::from_secs(5),
            unavailable_retry_after: Duration::from_secs(30),
            clock: system_clock(),
            alert_events: None,
        }
    }
}

/// Why the pipeline could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),

    #[error("cannot start the store writer thread: {0}")]
    Spawn(std::io::Error),

    #[error("the store writer thread has stopped")]
    WriterStopped,

    #[error("a pipeline task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The running pipeline: shards, the group-commit writer thread, the retention task.
///
/// ```text
/// let pipeline = Pipeline::start(PipelineConfig::new(&config.store), registry.clone()).await?;
/// let handle = pipeline.handle();       // to the sources
/// // … sources run; on shutdown they stop first, then:
/// pipeline.shutdown().await?;           // drain shards, commit and answer everything, stop
/// ```
///
/// Dropping it without `shutdown` also stops the shards (they drain their queues and the
/// writer commits what they hand it), but nothing waits for that.
pub struct Pipeline {
    handle: PipelineHandle,
    stop: CancellationToken,
    shards: Vec<tokio::task::JoinHandle<()>>,
    retention_task: Option<tokio::task::JoinHandle<()>>,
    /// The pipeline's own sender (for `prune_expired`); dropped at shutdown.
    writer_queue: Option<writer::WriterQueue>,
    writer: Option<std::thread::JoinHandle<writer::WriterStats>>,
    /// Stopped after the writer (`store::checkpoint`).
    checkpointer: Option<Checkpointer>,
    retention: Duration,
    retention_batch: usize,
    forwarding: bool,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Opens the writer's connection to the registry's store file, loads every device's
    /// last frame counter, and starts the writer thread, the shards and (unless retention
    /// is zero) the retention task. Call it inside a tokio runtime, after the registry.
    pub async fn start(
        config: PipelineConfig,
        registry: Registry,
    ) -> Result<Pipeline, PipelineError> {
        let n = config.shards.max(1);
        let mut shard_tx = Vec::with_capacity(n);
        let mut shard_rx = Vec::with_capacity(n);
        let mut note_tx = Vec::with_capacity(n);
        let mut note_rx = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = tokio::sync::mpsc::channel(config.shard_queue.max(1));
            shard_tx.push(tx);
            shard_rx.push(rx);
            let (tx, rx) = tokio::sync::mpsc::channel(config.shard_queue.max(1));
            note_tx.push(tx);
            note_rx.push(rx);
        }
        let mut handle = PipelineHandle::from_shards(shard_tx, config.overload_retry_after);
        handle.notes = Some(note_tx.into());

        let path = registry.store().path().to_owned();
        let busy_timeout = config.busy_timeout;
        let start_ms = (config.clock)();
        let (conn, wal, checkpointer, last_sequences, stored_alerts, last_seen) =
            tokio::task::spawn_blocking(move || {
                let mut conn = ingest::open_writer(&path, busy_timeout)?;
                let wal = checkpoint::configure_writer(&mut conn)?;
                let seqs = ingest::load_sequences(&conn)?;
                let orphans = alert_store::resolve_unregistered(&mut conn, start_ms)?;
                if orphans > 0 {
                    tracing::info!(
                        alerts = orphans,
                        "Resolved the alerts of devices that are no longer registered."
                    );
                }
                let stored = alert_store::load_state(&conn)?;
                let last_seen = alert_store::load_last_seen(&conn)?;
                let checkpointer = Checkpointer::start(&path)?;
                Ok::<_, StoreError>((conn, wal, checkpointer, seqs, stored, last_seen))
            })
            .await
            .map_err(StoreError::from)??;
        let mut sequences: Vec<state::Sequences> = (0..n).map(|_| Default::default()).collect();
        let devices_with_counter = last_sequences.len();
        for (device, seq) in last_sequences {
            if let Some(s) = sequences.get_mut(handle.shard_of(&device)) {
                s.insert(device, seq);
            }
        }

        let (rules, stale) = load_rules(&handle, &registry, n, start_ms, stored_alerts, last_seen);

        let (queue, rx) = writer::queue(config.writer_queue);
        let depth = Arc::new(writer::QueueDepth::new(n));
        let writer = writer::spawn(
            conn,
            wal,
            rx,
            &queue,
            writer::WriterConfig {
                commit_interval: config.commit_interval,
                max_batch: config.max_batch,
                unavailable_retry_after: config.unavailable_retry_after,
                alert_events: config.alert_events.clone(),
            },
            Arc::clone(&depth),
        )
        .map_err(PipelineError::Spawn)?;

        if !stale.is_empty() {
            tracing::info!(
                alerts = stale.len(),
                "Resolving alerts whose rule or profile no longer exists."
            );
            queue
                .send(writer::Job::Alerts(stale))
                .await
                .map_err(|_| PipelineError::WriterStopped)?;
        }

        let reads = Arc::new(ReadPool::new(registry.store().path()));
        let stop = CancellationToken::new();
        let shards = shard_rx
            .into_iter()
            .zip(note_rx)
            .zip(sequences)
            .zip(rules)
            .enumerate()
            .map(|(index, (((uplinks, notes), sequences), rules))| {
                let shard = shard::Shard {
                    index,
                    registry: registry.clone(),
                    writer: queue.clone(),
                    sequences,
                    depth: Arc::clone(&depth),
                    unavailable_retry_after: config.unavailable_retry_after,
                    rules,
                    clock: Arc::clone(&config.clock),
                    reads: Arc::clone(&reads),
                };
                tokio::spawn(shard.run(uplinks, notes, stop.clone()))
            })
            .collect();

        let retention_task = (!config.retention.is_zero()).then(|| {
            tokio::spawn(retention::run(
                queue.clone(),
                retention::Retention {
                    keep: config.retention,
                    interval: config.retention_interval,
                    batch: config.retention_batch,
                    forwarding: config.forwarding,
                    clock: Arc::clone(&config.clock),
                },
                stop.clone(),
            ))
        });

        tracing::info!(
            shards = n,
            commit_interval = ?config.commit_interval,
            max_batch = config.max_batch,
            retention = %humantime::format_duration(config.retention),
            devices_with_counter,
            "Pipeline started."
        );
        Ok(Pipeline {
            handle,
            stop,
            shards,
            checkpointer: Some(checkpointer),
            retention_task,
            writer_queue: Some(queue),
            writer: Some(writer),
            retention: config.retention,
            retention_batch: config.retention_batch,
            forwarding: config.forwarding,
        })
    }

    /// The handle sources submit uplinks through.
    pub fn handle(&self) -> PipelineHandle {
        self.handle.clone()
    }

    /// Runs retention now as if the clock said `now_ms`: deletes the uplinks received
    /// before `now_ms - retention` and their readings, batch by batch through the writer.
    /// The periodic task does the same with the configured clock; this is for tests and
    /// tools. With zero retention it deletes nothing.
    pub async fn prune_expired(&self, now_ms: i64) -> Result<Pruned, PipelineError> {
        if self.retention.is_zero() {
            return Ok(Pruned::default());
        }
        let queue = self
            .writer_queue
            .as_ref()
            .ok_or(PipelineError::WriterStopped)?;
        let keep_ms = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff_ms = now_ms.saturating_sub(keep_ms);
        retention::prune_until_done(
            queue,
            cutoff_ms,
            self.retention_batch,
            self.forwarding,
            None,
        )
        .await
    }

    /// Stops in flow order (call it after the sources have stopped): shards refuse new
    /// uplinks and drain their queues, the retention task stops, the writer commits and
    /// answers everything it was handed, and its thread ends. Nothing accepted is dropped.
    pub async fn shutdown(mut self) -> Result<(), PipelineError> {
        self.stop.cancel();
        if let Some(r) = self.retention_task.take() {
            r.await?;
        }
        for s in std::mem::take(&mut self.shards) {
            s.await?;
        }
        // The last sender: the writer now drains its queue and ends.
        self.writer_queue = None;
        if let Some(w) = self.writer.take() {
            let stats = tokio::task::spawn_blocking(move || w.join())
                .await?
                .map_err(|_| PipelineError::WriterStopped)?;
            tracing::info!(
                commits = stats.commits,
                uplinks = stats.uplinks,
                failed_batches = stats.failed_batches,
                "Pipeline stopped."
            );
        }
        // Its last checkpoint empties the WAL now that nothing writes.
        if let Some(c) = self.checkpointer.take() {
            tokio::task::spawn_blocking(move || c.stop()).await?;
        }
        Ok(())
    }
}

/// Builds each shard's rule state from the store at start: the pending and firing alerts
/// (`alert_state`) and every watched device's last uplink. Returns the shards' states and
/// the `resolved` transitions of stored alerts that no longer apply (the device's profile
/// is not loaded, or no longer has the rule). Also sets `nbiot_alerts_firing` and
/// `nbiot_devices_silent` to what was loaded.
fn load_rules(
    handle: &PipelineHandle,
    registry: &Registry,
    shards: usize,
    start_ms: i64,
    stored: Vec<StoredAlert>,
    last_seen: Vec<(String, i64)>,
) -> (Vec<ShardRules>, Vec<Transition>) {
    let mut rules: Vec<ShardRules> = (0..shards).map(|_| ShardRules::new(start_ms)).collect();
    let profiles = registry.profiles().current();
    // Every (profile, rule) series exists from the start, at 0: a dashboard or a rule
    // then sees "nothing firing" rather than "no data". The label sets are the profiles'
    // own (closed) rule names.
    for profile in profiles.iter() {
        let mut watches = false;
        for alert in &profile.alerts {
            watches |= alert.kind == crate::profiles::AlertKind::Inactive;
            metrics::gauge!(m::ALERTS_FIRING, "profile" => profile.name.clone(), "rule" => alert.name.clone(), "severity" => alert.severity.as_str()).increment(0.0);
            for state in [
                AlertState::Pending,
                AlertState::Firing,
                AlertState::Resolved,
            ] {
                metrics::counter!(m::ALERT_TRANSITIONS, "profile" => profile.name.clone(), "rule" => alert.name.clone(), "state" => state.as_str()).increment(0);
            }
        }
        if watches {
            metrics::gauge!(m::DEVICES_SILENT, "profile" => profile.name.clone()).increment(0.0);
        }
    }
    let mut stale = Vec::new();
    let (mut restored, mut watched) = (0usize, 0usize);
    for row in stored {
        let Some(device) = registry.lookup(&row.device) else {
            continue; // resolved in SQL before (resolve_unregistered)
        };
        let severity = match row.severity.as_str() {
            "critical" => Severity::Critical,
            "warning" => Severity::Warning,
            _ => Severity::Info,
        };
        let firing = row.state == "firing";
        if firing {
            metrics::gauge!(m::ALERTS_FIRING, "profile" => row.profile.clone(), "rule" => row.rule.clone(), "severity" => severity.as_str()).increment(1.0);
        }
        let Some(shard) = rules.get_mut(handle.shard_of(&row.device)) else {
            continue;
        };
        let set = profiles
            .get(device.profile())
            .filter(|p| p.name == row.profile)
            .and_then(|p| shard.rule_set(p));
        if set.is_some_and(|set| shard.restore(&device, &set, &row)) {
            restored += 1;
            continue;
        }
        stale.push(Transition {
            device,
            profile: row.profile.as_str().into(),
            rule: row.rule.as_str().into(),
            severity,
            state: AlertState::Resolved,
            at_ms: start_ms.max(row.active_since_ms),
            since_ms: row.active_since_ms,
            starts_ms: if firing { row.firing_since_ms } else { None },
            value: None,
            summary: format!(
                "{}: rule `{}` no longer applies to {}",
                row.profile, row.rule, row.device
            ),
            received_at_ms: None,
            silent: 0,
        });
    }
    for (id, seen_ms) in last_seen {
        let Some(device) = registry.lookup(&id) else {
            continue;
        };
        let Some(profile) = profiles.get(device.profile()) else {
            continue;
        };
        let Some(shard) = rules.get_mut(handle.shard_of(&id)) else {
            continue;
        };
        if let Some(set) = shard.rule_set(profile).filter(|s| !s.inactive.is_empty()) {
            shard.watch(&device, &set, seen_ms);
            watched += 1;
        }
    }
    for shard in &rules {
        for (profile, n) in shard.silent_by_profile() {
            metrics::gauge!(m::DEVICES_SILENT, "profile" => profile.to_string())
                .increment(n as f64);
        }
    }
    tracing::info!(restored, watched, "Loaded alert-rule state.");
    (rules, stale)
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
