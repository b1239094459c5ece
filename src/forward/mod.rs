//! Forwarding: every committed reading and every alert transition, to a TSDB that serves
//! the InfluxDB v2 write API (InfluxDB 2.x/3.x, VictoriaMetrics, …), with nothing lost.
//!
//! ```text
//!  store (readings, alert_transitions; id = commit order)
//!    │  reader thread: rows after the cursor → line protocol → batch (lines / bytes / age), gzip
//!    ▼  (one batch ahead)
//!  sender task: POST /api/v2/write ── classify ── retry / split / bisect / dead-letter
//!    │  after 204 (or dead letter) for every line of the batch:
//!    ▼
//!  ledger: forward_cursor (+ dead_letters), one small transaction
//! ```
//!
//! # Delivery
//!
//! The cursor (`forward_cursor`: a reading id and an alert transition id) moves only once
//! every line of a batch is settled: stored by the TSDB (a 204) or moved to
//! `dead_letters` with the server's reason. Nothing is held in memory that is not also in
//! the store, so a TSDB outage, a crash or a restart loses nothing: the forwarder starts
//! again from the persisted cursor, and retention (`src/pipeline/retention.rs`) never
//! deletes a reading above it. A batch may therefore be written twice (a crash between the
//! 204 and the cursor update, a timeout after the server stored it); that is harmless
//! because a point is identified by measurement, tags and timestamp, and the second write
//! overwrites the first with the same values: at-least-once delivery, exactly-once data.
//! (The same rule means two readings of one device's series in the same second are one
//! point in the TSDB, the later winning: the schema has second precision.)
//!
//! The backlog is bounded only by disk. The forwarder holds at most two batches in memory
//! (the one being sent and the next one), so its memory does not grow with an outage.
//!
//! # Parts
//!
//! - [`line`]: line protocol encoding and escaping (the schema of DESIGN.md);
//! - [`store`]: the SQL — a read-only connection for rows, the ledger for the cursor;
//! - `reader`: the thread that fills batches;
//! - [`influxdb`]: the HTTP write (reqwest; why not the `influxdb2` crate is explained
//!   there) and the classification of answers;
//! - [`deliver`]: acting on answers — retries, splitting, bisection, dead letters, health;
//! - [`retry`]: backoff with full jitter, `Retry-After`.
//!
//! This module does not own the tables' schema (migrations 0002–0004) nor retention.

pub mod batch;
pub mod deliver;
pub mod influxdb;
pub mod line;
mod reader;
pub mod retry;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::InfluxConfig;
use crate::health::{Check, Health};
use crate::store::StoreError;
use crate::telemetry::metrics as m;
use batch::{Batch, DeadLetter};
use deliver::{Deliverer, Mode, RetryPolicy, Stop, HEALTH_CHECK};
use influxdb::{ClientError, WriteClient};
use reader::{Control, Limits, Phase, ReaderThread};
use store::{Cursor, Ledger, Reader};

/// The `forward_cursor.name` of the `[influxdb]` forwarder.
pub const CURSOR_NAME: &str = "influxdb";

/// How long shutdown gives the final flush (after the pipeline has drained).
pub const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Everything the forwarder needs, validated (built from `[influxdb]` by
/// [`ForwarderSettings::from_config`]; tests adjust the timings).
#[derive(Clone)]
pub struct ForwarderSettings {
    /// Its row in `forward_cursor` (and `dead_letters.forwarder`).
    pub name: String,
    pub url: String,
    pub org: String,
    pub bucket: String,
    /// A secret: never logged (Debug shows `<redacted>`).
    pub token: String,
    /// Device labels written as tags.
    pub tags: Vec<String>,
    pub batch_lines: usize,
    pub batch_bytes: usize,
    pub flush_interval: Duration,
    /// How often the store is asked for new rows when the forwarder has caught up.
    pub poll_interval: Duration,
    pub gzip: bool,
    /// One request's timeout.
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl std::fmt::Debug for ForwarderSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwarderSettings")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("org", &self.org)
            .field("bucket", &self.bucket)
            .field("token", &"<redacted>")
            .field("tags", &self.tags)
            .field("batch_lines", &self.batch_lines)
            .field("batch_bytes", &self.batch_bytes)
            .field("flush_interval", &self.flush_interval)
            .field("poll_interval", &self.poll_interval)
            .field("gzip", &self.gzip)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

impl ForwarderSettings {
    /// From `[influxdb]` (already validated by `Config::validate`).
    pub fn from_config(c: &InfluxConfig) -> ForwarderSettings {
        ForwarderSettings {
            name: CURSOR_NAME.to_owned(),
            url: c.url.clone(),
            org: c.org.clone(),
            bucket: c.bucket.clone(),
            token: c.token.clone(),
            tags: c.tags.clone(),
            batch_lines: c.batch_size.max(1),
            batch_bytes: c.batch_bytes.max(1),
            flush_interval: c.flush_interval,
            poll_interval: c.flush_interval.min(Duration::from_millis(100)),
            gzip: c.gzip,
            timeout: c.timeout,
            retry: RetryPolicy::default(),
        }
    }
}

/// Why the forwarder could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the forwarder's reader thread: {0}")]
    Spawn(std::io::Error),
}

/// Counters shared by the forwarder's parts (what [`ForwardStats`] reports).
#[derive(Debug)]
pub struct Shared {
    /// The persisted cursor.
    pub reading_cursor: AtomicI64,
    pub alert_cursor: AtomicI64,
    pub delivered: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub backlog: AtomicI64,
    pub healthy: AtomicBool,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            reading_cursor: AtomicI64::new(0),
            alert_cursor: AtomicI64::new(0),
            delivered: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            backlog: AtomicI64::new(0),
            healthy: AtomicBool::new(true),
        }
    }
}

/// A snapshot of what the forwarder has done since it started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForwardStats {
    /// The persisted cursor: everything up to it is delivered or dead-lettered.
    pub cursor: Cursor,
    /// Points the TSDB answered 204 for.
    pub delivered: u64,
    /// Rows moved to `dead_letters`.
    pub dead_lettered: u64,
    /// Write requests sent, and how many of them were retries.
    pub requests: u64,
    pub retries: u64,
    /// Committed rows after the cursor (refreshed about once a second).
    pub backlog: i64,
    pub healthy: bool,
}

/// The forwarder's metric handles, made once (src/telemetry/metrics.rs has the names).
pub struct Metrics {
    points_ok: metrics::Counter,
    points_dead: metrics::Counter,
    requests: Vec<(&'static str, metrics::Counter)>,
    retries: Vec<(&'static str, metrics::Counter)>,
    write_duration: metrics::Histogram,
    backlog: metrics::Gauge,
    backlog_age: metrics::Gauge,
    healthy: metrics::Gauge,
    dead_letters: metrics::Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            points_ok: metrics::counter!(m::FORWARD_POINTS, "result" => "ok"),
            points_dead: metrics::counter!(m::FORWARD_POINTS, "result" => "dead_letter"),
            requests: m::forward_result::ALL
                .iter()
                .map(|r| (*r, metrics::counter!(m::FORWARD_REQUESTS, "result" => *r)))
                .collect(),
            retries: m::forward_retry::ALL
                .iter()
                .map(|r| (*r, metrics::counter!(m::FORWARD_RETRIES, "reason" => *r)))
                .collect(),
            write_duration: metrics::histogram!(m::FORWARD_WRITE_DURATION),
            backlog: metrics::gauge!(m::FORWARD_BACKLOG),
            backlog_age: metrics::gauge!(m::FORWARD_BACKLOG_AGE),
            healthy: metrics::gauge!(m::FORWARD_HEALTHY),
            dead_letters: metrics::gauge!(m::FORWARD_DEAD_LETTERS),
        }
    }

    fn request(&self, result: &str) {
        if let Some((_, c)) = self.requests.iter().find(|(r, _)| *r == result) {
            c.increment(1);
        }
    }

    fn retry(&self, reason: &str) {
        if let Some((_, c)) = self.retries.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The running forwarder. Stop it with [`Forwarder::shutdown`] after the pipeline has
/// drained; dropping it stops it too, without the final flush.
pub struct Forwarder {
    mode: watch::Sender<Mode>,
    control: Arc<Control>,
    sender: Option<tokio::task::JoinHandle<()>>,
    reader: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
    url: String,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("url", &self.url)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Forwarder {
    /// Opens its connections to the store at `store_path` (created and migrated by
    /// `Store::open`), and starts the reader thread and the sender task. Its state is
    /// reported as the non-critical `/readyz` check `forwarder` in `health`. Call it inside
    /// a tokio runtime.
    pub async fn start(
        settings: ForwarderSettings,
        store_path: &Path,
        health: Health,
    ) -> Result<Forwarder, ForwardError> {
        let client = WriteClient::new(
            &settings.url,
            &settings.org,
            &settings.bucket,
            &settings.token,
            settings.timeout,
            settings.gzip,
        )?;
        let url = client.display_url();
        let path: PathBuf = store_path.to_owned();
        let (name, tags) = (settings.name.clone(), settings.tags.clone());
        let (ledger, cursor, reader, dead_letters) = tokio::task::spawn_blocking(move || {
            let (ledger, cursor) = Ledger::open(&path, &name)?;
            let reader = Reader::open(&path, &tags)?;
            let dead = ledger.dead_letters()?;
            Ok::<_, StoreError>((ledger, cursor, reader, dead))
        })
        .await
        .map_err(StoreError::from)??;

        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared::default());
        shared
            .reading_cursor
            .store(cursor.reading_id, Ordering::Relaxed);
        shared
            .alert_cursor
            .store(cursor.alert_id, Ordering::Relaxed);
        metrics.healthy.set(1.0);
        metrics.dead_letters.set(dead_letters as f64);
        health.set(HEALTH_CHECK, Check::ok(false, json!({ "url": url })));

        let (tx, rx) = mpsc::channel::<Batch>(1);
        let control = Arc::new(Control::new());
        let reader = ReaderThread {
            reader,
            encoder: line::Encoder::new(&settings.tags),
            limits: Limits {
                batch_lines: settings.batch_lines.max(1),
                batch_bytes: settings.batch_bytes.max(1),
                flush_interval: settings.flush_interval,
                poll_interval: settings.poll_interval,
                gzip: settings.gzip,
            },
            start: cursor,
            tx,
            control: Arc::clone(&control),
            shared: Arc::clone(&shared),
            metrics: Arc::clone(&metrics),
        }
        .spawn()
        .map_err(ForwardError::Spawn)?;

        let (mode, mode_rx) = watch::channel(Mode::Running);
        let deliverer = Deliverer::new(
            client,
            settings.retry,
            retry::Rng::from_entropy(),
            health,
            url.clone(),
            Arc::clone(&shared),
            Arc::clone(&metrics),
        );
        let sender = tokio::spawn(send_batches(
            rx,
            deliverer,
            Arc::new(Mutex::new(ledger)),
            Stop::new(mode_rx),
            Arc::clone(&shared),
            metrics,
        ));
        info!(
            url = %url,
            reading_cursor = cursor.reading_id,
            alert_cursor = cursor.alert_id,
            dead_letters,
            "Forwarder started."
        );
        Ok(Forwarder {
            mode,
            control,
            sender: Some(sender),
            reader: Some(reader),
            shared,
            url,
        })
    }

    pub fn stats(&self) -> ForwardStats {
        let s = &self.shared;
        ForwardStats {
            cursor: Cursor {
                reading_id: s.reading_cursor.load(Ordering::Relaxed),
                alert_id: s.alert_cursor.load(Ordering::Relaxed),
            },
            delivered: s.delivered.load(Ordering::Relaxed),
            dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
            backlog: s.backlog.load(Ordering::Relaxed),
            healthy: s.healthy.load(Ordering::Relaxed),
        }
    }

    /// Stops: a final flush of what is committed, for at most `grace` and with no retry
    /// waits, then the end. What is not delivered by then stays in the store behind the
    /// cursor and goes out at the next start.
    pub async fn shutdown(mut self, grace: Duration) -> ForwardStats {
        let _ = self
            .mode
            .send(Mode::Draining(tokio::time::Instant::now() + grace));
        self.control.set(Phase::Draining);
        if let Some(task) = self.sender.take() {
            if let Err(e) = task.await {
                error!(error = %e, "Forwarder sender task failed.");
            }
        }
        self.control.set(Phase::Stopped);
        if let Some(thread) = self.reader.take() {
            if tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_or(true, |joined| joined.is_err())
            {
                error!("Forwarder reader thread failed.");
            }
        }
        let stats = self.stats();
        if stats.backlog > 0 {
            warn!(
                url = %self.url,
                backlog = stats.backlog,
                reading_cursor = stats.cursor.reading_id,
                "Forwarder stopped with points not yet delivered; they are kept in the store and sent at the next start."
            );
        } else {
            info!(url = %self.url, reading_cursor = stats.cursor.reading_id, "Forwarder stopped.");
        }
        stats
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // Without `shutdown`: no final flush. The sender task sees its mode sender gone and
        // ends; the reader thread sees Stopped (or its channel closed) and ends.
        self.control.set(Phase::Stopped);
    }
}

/// The sender task: delivers batches in order and settles each in the ledger.
async fn send_batches(
    mut rx: mpsc::Receiver<Batch>,
    mut deliverer: Deliverer<WriteClient>,
    ledger: Arc<Mutex<Ledger>>,
    mut stop: Stop,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
) {
    // Dead letters not yet recorded (a failed ledger write keeps them for the next one).
    let mut pending: Vec<DeadLetter> = Vec::new();
    loop {
        // Cancel-safe: `recv` loses nothing when the deadline cuts it.
        let batch = match stop.bounded(rx.recv()).await {
            Ok(Some(batch)) => batch,
            // The reader ended (drained, or stopped) or the deadline passed.
            Ok(None) | Err(_) => return,
        };
        let refused = if batch.is_empty() {
            Vec::new()
        } else {
            match deliverer.deliver(&batch, &mut stop).await {
                Ok(refused) => refused,
                // Unsettled: sent again after the next start.
                Err(_) => return,
            }
        };
        let delivered = (batch.len() - refused.len()) as u64;
        shared.delivered.fetch_add(delivered, Ordering::Relaxed);
        metrics.points_ok.increment(delivered);
        report_dead_letters(&refused, &batch.unencodable);
        let dead = (refused.len() + batch.unencodable.len()) as u64;
        shared.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        metrics.points_dead.increment(dead);
        pending.extend(batch.unencodable);
        pending.extend(refused);
        let to = Cursor {
            reading_id: batch.reading_to,
            alert_id: batch.alert_to,
        };
        settle(&ledger, to, &mut pending, &shared, &metrics).await;
    }
}

/// Records a settled batch: dead letters and the cursor, in one transaction.
async fn settle(
    ledger: &Arc<Mutex<Ledger>>,
    to: Cursor,
    pending: &mut Vec<DeadLetter>,
    shared: &Shared,
    metrics: &Metrics,
) {
    let ledger = Arc::clone(ledger);
    let dead = std::mem::take(pending);
    let result = tokio::task::spawn_blocking(move || {
        let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
        let settled = l.settle(to, &dead);
        // Counted only when rows were added (an operator may also delete them).
        let count = match (&settled, dead.is_empty()) {
            (Ok(()), false) => l.dead_letters().ok(),
            _ => None,
        };
        (settled, dead, count)
    })
    .await;
    match result {
        Ok((Ok(()), _, count)) => {
            shared
                .reading_cursor
                .fetch_max(to.reading_id, Ordering::Relaxed);
            shared
                .alert_cursor
                .fetch_max(to.alert_id, Ordering::Relaxed);
            if let Some(n) = count {
                metrics.dead_letters.set(n as f64);
            }
        }
        Ok((Err(e), dead, _)) => {
            error!(
                error = %e,
                "Forwarder cannot record its progress in the store; delivered points will be \
                 sent again (harmlessly) if the gateway restarts before it can."
            );
            *pending = dead;
        }
        Err(e) => error!(error = %e, "Forwarder ledger task failed."),
    }
}

/// One ERROR per batch that moved rows to the dead-letter table (operator action: the
/// rows wait there with the reason).
fn report_dead_letters(refused: &[DeadLetter], unencodable: &[DeadLetter]) {
    if let Some(first) = refused.first() {
        error!(
            count = refused.len(),
            status = first.status,
            error = %first.error,
            line = %first.line,
            "TSDB refused lines for good; they are kept in the dead_letters table."
        );
    }
    if let Some(first) = unencodable.first() {
        error!(
            count = unencodable.len(),
            error = %first.error,
            source = first.source.as_str(),
            row_id = first.row_id,
            "Rows cannot be written as line protocol; they are kept in the dead_letters table."
        );
    }
}
