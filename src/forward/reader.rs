//! The reader thread: fills batches from the store behind the cursor and hands them to the
//! sender, one ahead, so reading and encoding the next batch overlaps the current write.
//!
//! A batch is handed over when it is full (`batch_size` rows or `batch_bytes` of text),
//! when its first row has waited `flush_interval`, or at once when the forwarder drains.
//! Between reads that found nothing new it sleeps `poll_interval` (woken early by a state
//! change). A dedicated thread rather than tokio's blocking pool: it lives as long as the
//! forwarder, and its SQLite statements never occupy an async worker.
//!
//! It also keeps the backlog gauges: committed rows after the *delivered* cursor, and the
//! age of the oldest of them, at most once a second.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::batch::{Batch, BatchBuilder};
use super::line::Encoder;
use super::store::{now_ms, Cursor, Reader};
use super::{Metrics, Shared};

/// How often the backlog gauges are refreshed.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);
/// How often a full hand-over channel is polled (a batch takes far longer to send).
const HANDOVER_POLL: Duration = Duration::from_millis(5);
/// Store read errors are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The reader's batching limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub batch_lines: usize,
    pub batch_bytes: usize,
    pub flush_interval: Duration,
    pub poll_interval: Duration,
    pub gzip: bool,
}

/// What the reader thread is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Hand over what is there now, keep going until caught up, then end.
    Draining,
    Stopped,
}

/// The phase, and a condition variable that wakes the thread when it changes.
#[derive(Debug)]
pub struct Control {
    phase: Mutex<Phase>,
    changed: Condvar,
}

impl Control {
    pub fn new() -> Control {
        Control {
            phase: Mutex::new(Phase::Running),
            changed: Condvar::new(),
        }
    }

    pub fn set(&self, phase: Phase) {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        // Never back to Running; Stopped is final.
        if *p != Phase::Stopped {
            *p = phase;
        }
        self.changed.notify_all();
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `d`, or until the phase changes.
    fn wait(&self, d: Duration) {
        let p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let before = *p;
        let _ = self
            .changed
            .wait_timeout_while(p, d, |p| *p == before)
            .map(|(guard, _)| drop(guard));
    }
}

impl Default for Control {
    fn default() -> Self {
        Control::new()
    }
}

pub struct ReaderThread {
    pub reader: Reader,
    pub encoder: Encoder,
    pub limits: Limits,
    pub start: Cursor,
    pub tx: mpsc::Sender<Batch>,
    pub control: Arc<Control>,
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
}

impl ReaderThread {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("nbiot-forward-reader".into())
            .spawn(move || self.run())
    }

    fn run(self) {
        let l = self.limits;
        let mut builder = BatchBuilder::new(self.start.reading_id, self.start.alert_id);
        // When the batch's first row was read.
        let mut first_at: Option<Instant> = None;
        let mut backlog_at: Option<Instant> = None;
        let mut warned_at: Option<Instant> = None;
        loop {
            let phase = self.control.phase();
            if phase == Phase::Stopped {
                return;
            }
            let room = l.batch_lines.saturating_sub(builder.rows());
            match self.read(&mut builder, room) {
                Ok(n) if n > 0 && first_at.is_none() => first_at = Some(Instant::now()),
                Ok(_) => {}
                Err(e) => {
                    if warned_at.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                        warned_at = Some(Instant::now());
                        warn!(error = %e, "Forwarder cannot read the store; retrying.");
                    }
                    self.control
                        .wait(l.poll_interval.max(Duration::from_millis(100)));
                    continue;
                }
            }
            if backlog_at.is_none_or(|t| t.elapsed() >= BACKLOG_EVERY) {
                backlog_at = Some(Instant::now());
                self.update_backlog();
            }
            let full = builder.rows() >= l.batch_lines || builder.text.len() >= l.batch_bytes;
            let due = first_at.is_some_and(|t| t.elapsed() >= l.flush_interval);
            if builder.rows() > 0 && (full || due || phase == Phase::Draining) {
                let next = BatchBuilder::new(builder.reading_to, builder.alert_to);
                let batch = std::mem::replace(&mut builder, next).finish(l.gzip);
                first_at = None;
                debug!(
                    lines = batch.len(),
                    bytes = batch.text.len(),
                    "Forward batch ready."
                );
                if !self.hand_over(batch) {
                    return;
                }
                continue;
            }
            if phase == Phase::Draining {
                // Caught up: ending closes the channel, which tells the sender.
                self.update_backlog();
                return;
            }
            let wait = match first_at {
                Some(t) => l
                    .poll_interval
                    .min(l.flush_interval.saturating_sub(t.elapsed())),
                None => l.poll_interval,
            };
            self.control.wait(wait);
        }
    }

    /// Waits while the sender is busy with the previous batch (backpressure: nothing is
    /// read ahead beyond one batch), refreshing the backlog gauges meanwhile — during a
    /// TSDB outage this is where the thread spends its time. Polls the channel every
    /// [`HANDOVER_POLL`] rather than blocking on it, so this thread needs no runtime and
    /// notices `Stopped`. False once the sender is gone.
    fn hand_over(&self, batch: Batch) -> bool {
        use tokio::sync::mpsc::error::TrySendError;
        let mut backlog_at = Instant::now();
        let mut batch = batch;
        loop {
            match self.tx.try_send(batch) {
                Ok(()) => return true,
                Err(TrySendError::Closed(_)) => return false,
                Err(TrySendError::Full(b)) => batch = b,
            }
            if self.control.phase() == Phase::Stopped {
                return false;
            }
            if backlog_at.elapsed() >= BACKLOG_EVERY {
                backlog_at = Instant::now();
                self.update_backlog();
            }
            self.control.wait(HANDOVER_POLL);
        }
    }

    /// Alerts first (few, and an operator wants them soon), then readings.
    fn read(&self, b: &mut BatchBuilder, room: usize) -> rusqlite::Result<usize> {
        if room == 0 {
            return Ok(0);
        }
        let max = self.limits.batch_bytes;
        let alerts = self.reader.read_alerts(&self.encoder, b, room, max)?;
        let readings = match room - alerts {
            0 => 0,
            left => self.reader.read_readings(&self.encoder, b, left, max)?,
        };
        Ok(alerts + readings)
    }

    fn update_backlog(&self) {
        let cursor = Cursor {
            reading_id: self.shared.reading_cursor.load(Ordering::Relaxed),
            alert_id: self.shared.alert_cursor.load(Ordering::Relaxed),
        };
        match self.reader.backlog(cursor, now_ms()) {
            Ok(b) => {
                self.shared.backlog.store(b.points, Ordering::Relaxed);
                self.metrics.backlog.set(b.points as f64);
                self.metrics.backlog_age.set(b.age_s);
            }
            Err(e) => debug!(error = %e, "Cannot measure the forward backlog."),
        }
    }
}
