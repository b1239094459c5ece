//! Retention: deletes uplinks, readings and alert transitions older than `[store] retention`,
//! periodically (the current alert state is kept).
//!
//! Deleting goes through the writer thread as `Prune` jobs, one bounded batch each (at most
//! `retention_batch` uplinks and their readings, in its own short transaction between two
//! group commits). Why not a connection of its own: SQLite has one write lock; a second
//! writer would make the group-commit writer wait in SQLite's busy handler, which sleeps in
//! growing steps (up to 100 ms) rather than waking when the lock is free, and a long delete
//! would stall every acknowledgement behind it. Through the writer queue, a batch simply
//! takes its turn: ingest waits at most one batch, and never for a lock.
//!
//! With forwarding configured, only readings every forwarder has delivered
//! (`readings.id <= min(forward_cursor.reading_id)`) are deleted, and the uplinks after the
//! first undelivered reading's uplink are kept too (see `store::ingest::prune_batch`).

use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::writer::{Job, PruneJob, WriterQueue};
use super::{Clock, PipelineError};
use crate::store::ingest::Pruned;

/// What retention needs.
#[derive(Clone)]
pub(super) struct Retention {
    pub keep: Duration,
    pub interval: Duration,
    pub batch: usize,
    pub forwarding: bool,
    pub clock: Clock,
}

/// Deletes everything received before `cutoff_ms`, batch by batch, until nothing is left or
/// `stop` is cancelled. Returns the totals.
pub(super) async fn prune_until_done(
    queue: &WriterQueue,
    cutoff_ms: i64,
    batch: usize,
    forwarding: bool,
    stop: Option<&CancellationToken>,
) -> Result<Pruned, PipelineError> {
    let mut total = Pruned::default();
    loop {
        let (tx, rx) = oneshot::channel();
        let job = Job::Prune(PruneJob {
            cutoff_ms,
            max_uplinks: batch,
            forwarding,
            reply: tx,
        });
        if queue.send(job).await.is_err() {
            return Err(PipelineError::WriterStopped);
        }
        // The writer answers every job it takes; a dropped sender means it stopped.
        let pruned = rx.await.map_err(|_| PipelineError::WriterStopped)??;
        total.uplinks += pruned.uplinks;
        total.readings += pruned.readings;
        total.alert_transitions += pruned.alert_transitions;
        if !pruned.more || stop.is_some_and(CancellationToken::is_cancelled) {
            return Ok(total);
        }
    }
}

/// Prunes once at start and then every `interval`, until `stop`.
pub(super) async fn run(queue: WriterQueue, r: Retention, stop: CancellationToken) {
    let keep_ms = i64::try_from(r.keep.as_millis()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(r.interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            // Cancel-safe: nothing is in flight between runs.
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff_ms = (r.clock)().saturating_sub(keep_ms);
        match prune_until_done(&queue, cutoff_ms, r.batch, r.forwarding, Some(&stop)).await {
            Ok(p) => debug!(
                uplinks = p.uplinks,
                readings = p.readings,
                alert_transitions = p.alert_transitions,
                cutoff_ms,
                "Retention deleted expired uplinks, readings and alert transitions."
            ),
            Err(PipelineError::WriterStopped) => return,
            // The disk fills up if this keeps failing: worth an operator's attention.
            Err(e) => error!(error = %e, "Retention could not delete expired rows; will retry."),
        }
    }
}
