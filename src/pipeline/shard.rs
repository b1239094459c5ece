//! A shard: one tokio task that owns a fixed subset of devices (`PipelineHandle::shard_of`)
//! and takes their uplinks through lookup → token → profile → decode → frame-counter state,
//! then hands the result to the writer.
//!
//! One device's uplinks go through one shard, one at a time, so they reach the writer — and
//! are committed and answered — in arrival order, and the per-device state ([`Sequences`])
//! is owned by the task, without a lock. Different devices proceed in parallel on
//! different shards (decoding is CPU work; a shard per core by default).
//!
//! What a shard answers itself is what is not committed: unknown device, bad token, no
//! profile (counted in `nbiot_uplinks_rejected_total`), and `Unavailable` if the writer
//! has stopped. Everything else is answered by the writer after the commit.
//!
//! # Alert rules
//!
//! The shard also owns its devices' alert-rule state ([`ShardRules`]): each uplink that
//! will be committed ends its device's silence and restarts its silence timer, and each
//! decoded reading is evaluated by the profile's condition rules; the transitions ride in
//! the uplink's [`CommitJob`]. Silence deadlines are one timer per shard (the earliest
//! deadline); when it fires, the due devices' inactive rules fire in a job of their own. A
//! device whose rules use `delta`/`rate` gets its recent history read back from the store
//! on its first reading after a start (one indexed query, off the async workers).
//!
//! # Reading time
//!
//! A reading carries the device's own time when its payload has one and it is plausible,
//! else the receive time, both in whole seconds (floor). `DeviceTime::Local` becomes UTC
//! with the profile's `utc_offset`, `DeviceTime::Ago` counts back from the receive time.
//! Plausible means:
//!
//! - not before 2000-01-01T00:00:00Z: clocks that were never set report 2000-01-01 or
//!   earlier (or garbage);
//! - not more than one day after the receive time: a day of slack covers a wrong time zone
//!   setting without believing a clock that runs ahead;
//! - not more than 366 days before the receive time: a device may buffer readings through a
//!   long coverage gap, but a clock years behind (a meter still on its factory date) is
//!   wrong, and a reading stamped then would be invisible on every dashboard and fall
//!   outside any TSDB retention.
//!
//! Whether the time is the device's is stored with each reading (`device_time`), and the
//! raw payload is kept, so a different rule can be applied to old rows later.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram};
use nbiot_codecs::DeviceTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::state::{counter_bits, SeqStep, Sequences};
use super::writer::{CommitJob, Decoded, Job, QueueDepth, WriterQueue};
use super::{Clock, Outcome, Reject, Transport, Uplink};
use crate::profiles::{Profile, ProfileSet};
use crate::registry::{Device, Registry};
use crate::rules::engine::Issue;
use crate::rules::state::Lookup;
use crate::rules::{RuleSet, ShardRules, Transition};
use crate::store::ingest::{encode_fields, NewReading};
use crate::store::query::ReadPool;
use crate::store::{alerts as alert_store, StoreError};
use crate::telemetry::metrics as m;

/// Devices whose silence deadline passed, handled per timer tick; after a tick the shard
/// takes up to [`UPLINKS_PER_TICK`] uplinks before the next, so a mass expiry (after a
/// network outage) does not stall ingest.
const EXPIRIES_PER_TICK: usize = 256;
const UPLINKS_PER_TICK: u32 = 64;

/// 2000-01-01T00:00:00Z: the earliest device time believed.
pub const EARLIEST_DEVICE_TIME_S: i64 = 946_684_800;

/// How far after the receive time a device time is still believed.
pub const MAX_DEVICE_TIME_AHEAD_S: i64 = 86_400;

/// How far before the receive time a device time is still believed.
pub const MAX_DEVICE_TIME_BEHIND_S: i64 = 366 * 86_400;

/// A reading's time in Unix seconds, and whether it is the device's own (see the module docs).
pub fn reading_time(
    time: Option<DeviceTime>,
    utc_offset_s: i64,
    received_at_ms: i64,
) -> (i64, bool) {
    let received_s = received_at_ms.div_euclid(1000);
    match time.map(|t| t.to_utc(utc_offset_s, received_s)) {
        Some(t)
            if t >= EARLIEST_DEVICE_TIME_S
                && t >= received_s.saturating_sub(MAX_DEVICE_TIME_BEHIND_S)
                && t <= received_s.saturating_add(MAX_DEVICE_TIME_AHEAD_S) =>
        {
            (t, true)
        }
        _ => (received_s, false),
    }
}

/// Metric handles, created once per shard.
struct Metrics {
    /// `[transport][reason]` for the reasons a shard decides.
    rejected: [[Counter; 4]; 2],
    /// By codec id (a closed set: built-in ids and "layout").
    decode: HashMap<String, Histogram>,
}

/// The refusals a shard decides (`Unavailable`: the writer has stopped, at shutdown).
const SHARD_REASONS: [Reject; 4] = [
    Reject::UnknownDevice,
    Reject::BadToken,
    Reject::NoProfile,
    Reject::Unavailable {
        retry_after: Duration::ZERO,
    },
];

impl Metrics {
    fn new() -> Metrics {
        let row = |t: Transport| {
            SHARD_REASONS.map(|r| {
                metrics::counter!(m::UPLINKS_REJECTED, "protocol" => t.as_str(), "reason" => r.reason())
            })
        };
        Metrics {
            rejected: [row(Transport::Coap), row(Transport::Mqtt)],
            decode: HashMap::new(),
        }
    }

    fn rejected(&self, t: Transport, why: Reject) {
        let ti = match t {
            Transport::Coap => 0,
            Transport::Mqtt => 1,
        };
        if let Some(c) = SHARD_REASONS
            .iter()
            .position(|r| r.reason() == why.reason())
            .and_then(|ri| self.rejected.get(ti).and_then(|row| row.get(ri)))
        {
            c.increment(1);
        }
    }

    fn decode(&mut self, codec: &str) -> Histogram {
        if let Some(h) = self.decode.get(codec) {
            return h.clone();
        }
        let h = metrics::histogram!(m::DECODE_DURATION, "codec" => codec.to_owned());
        self.decode.insert(codec.to_owned(), h.clone());
        h
    }
}

pub(super) struct Shard {
    pub index: usize,
    pub registry: Registry,
    pub writer: WriterQueue,
    pub sequences: Sequences,
    pub depth: Arc<QueueDepth>,
    pub unavailable_retry_after: Duration,
    /// Alert-rule state of this shard's devices (loaded from the store at start).
    pub rules: ShardRules,
    /// Wall-clock now, for silence deadlines.
    pub clock: Clock,
    /// Read-only connections, for rebuilding `delta`/`rate` history.
    pub reads: Arc<ReadPool>,
}

/// The registry and the profiles, as the silence timers see them.
struct RegistryLookup<'a>(&'a Registry);

impl Lookup for RegistryLookup<'_> {
    fn device(&self, id: &str) -> Option<Arc<Device>> {
        self.0.lookup(id)
    }

    fn profiles(&self) -> Arc<ProfileSet> {
        self.0.profiles().current()
    }
}

impl Shard {
    /// Processes uplinks and duplicate notes until `stop` is cancelled, then drains what is
    /// queued and returns (dropping its writer sender).
    pub async fn run(
        self,
        mut uplinks: mpsc::Receiver<Uplink>,
        mut notes: mpsc::Receiver<String>,
        stop: CancellationToken,
    ) {
        let mut worker = Worker {
            shard: self,
            metrics: Metrics::new(),
            issues: Vec::new(),
            warned: HashSet::new(),
        };
        let mut closing = false;
        let mut notes_open = true;
        // The silence timer: one sleep, reset only when the earliest deadline changes.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<i64> = None;
        // Uplinks still owed a turn before the next timer tick (fairness, see above).
        let mut owed: u32 = 0;
        loop {
            let next = worker.shard.rules.next_deadline_ms();
            if next != armed {
                if let Some(deadline) = next {
                    let wait = deadline.saturating_sub((worker.shard.clock)()).max(0);
                    let wait = Duration::from_millis(u64::try_from(wait).unwrap_or(0));
                    timer.as_mut().reset(tokio::time::Instant::now() + wait);
                }
                armed = next;
            }
            tokio::select! {
                biased;
                // Shutdown: refuse new uplinks (`submit` now answers Closed) but keep what
                // is queued. Cancel-safe: `cancelled` holds nothing.
                () = stop.cancelled(), if !closing => {
                    uplinks.close();
                    notes.close();
                    closing = true;
                }
                // `recv` is cancel-safe: a message is either returned or stays queued.
                note = notes.recv(), if notes_open => match note {
                    Some(device) => worker.duplicate(device).await,
                    None => notes_open = false,
                },
                // Silence deadlines (not while draining: a stopping gateway raises no new
                // alerts). Cancel-safe: a `Sleep` that is not polled to completion stays armed.
                () = &mut timer, if armed.is_some() && owed == 0 && !closing => {
                    // Forces a fresh reset: the deadline may have moved or stayed.
                    armed = None;
                    if worker.expire().await {
                        owed = UPLINKS_PER_TICK;
                    }
                }
                uplink = uplinks.recv() => match uplink {
                    Some(u) => {
                        owed = owed.saturating_sub(1);
                        worker.shard.depth.set(worker.shard.index, uplinks.len());
                        worker.process(u).await;
                    }
                    // Closed and drained.
                    None => break,
                },
                // Nothing queued while uplinks were owed a turn: the timer may go again.
                () = tokio::task::yield_now(), if owed > 0 => owed = 0,
            }
        }
        while let Ok(device) = notes.try_recv() {
            worker.duplicate(device).await;
        }
        worker.shard.depth.set(worker.shard.index, 0);
        debug!(shard = worker.shard.index, "Pipeline shard drained.");
    }
}

struct Worker {
    shard: Shard,
    metrics: Metrics,
    /// Scratch: rule evaluation problems of the uplink being processed.
    issues: Vec<Issue>,
    /// (profile, rule) pairs already reported at WARN: a fleet imported without a
    /// parameter would otherwise log one WARN per device (a million lines for a million
    /// devices). Later devices are logged at DEBUG; all are counted.
    warned: HashSet<(String, String)>,
}

impl Worker {
    async fn process(&mut self, u: Uplink) {
        let Some(device) = self.shard.registry.lookup(&u.device) else {
            return self.reject(u, Reject::UnknownDevice);
        };
        if !device.accepts_token(u.token.as_deref()) {
            return self.reject(u, Reject::BadToken);
        }
        let profiles = self.shard.registry.profiles().current();
        let Some(profile) = profiles.get(device.profile()).cloned() else {
            return self.reject(u, Reject::NoProfile);
        };
        drop(profiles);

        let started = Instant::now();
        let result = profile.decode(&u.payload);
        self.metrics
            .decode(&profile.codec)
            .record(started.elapsed().as_secs_f64());

        let set = self.shard.rules.rule_set(&profile);
        let mut alerts = Vec::new();
        self.shard
            .rules
            .uplink(&device, set.as_ref(), u.received_at_ms, &mut alerts);

        let mut sequence = None;
        let decoded = match result {
            Ok(readings) => {
                let set = set.as_ref().filter(|s| !s.rules.is_empty());
                if let (Some(set), Some(first)) = (set, readings.first()) {
                    if self.shard.rules.wants_history(device.id(), set) {
                        let (time_s, _) =
                            reading_time(first.time, profile.utc_offset_s, u.received_at_ms);
                        let before_s = time_s.min(u.received_at_ms.div_euclid(1000));
                        self.load_history(&device, set, before_s, &mut alerts).await;
                    }
                }
                let mut rows = Vec::with_capacity(readings.len());
                for r in readings {
                    if sequence.is_none() {
                        sequence = r.identity.as_ref().and_then(|i| i.sequence);
                    }
                    let (time_s, device_time) =
                        reading_time(r.time, profile.utc_offset_s, u.received_at_ms);
                    if let Some(set) = set {
                        self.shard.rules.reading(
                            &device,
                            set,
                            &r.fields,
                            time_s.saturating_mul(1000),
                            u.received_at_ms,
                            &mut alerts,
                            &mut self.issues,
                        );
                    }
                    let mut fields = String::with_capacity(24 * r.fields.len() + 2);
                    encode_fields(&r.fields, &mut fields);
                    rows.push(NewReading {
                        measurement: r.measurement,
                        time_s,
                        device_time,
                        fields,
                    });
                }
                if !self.issues.is_empty() {
                    self.report_issues(&device, &profile);
                }
                Decoded::Readings(rows)
            }
            Err(e) => {
                debug!(device = %u.device, profile = %profile.name, error = %e, "Uplink did not decode; storing it raw.");
                Decoded::Error {
                    code: e.code(),
                    message: e.to_string(),
                }
            }
        };
        let step = match sequence {
            Some(s) => self
                .shard
                .sequences
                .advance(device.id(), s, counter_bits(&profile.codec)),
            None => SeqStep::default(),
        };
        let job = CommitJob {
            device,
            profile,
            transport: u.transport,
            peer: u.peer.map(|p| p.to_string()),
            received_at_ms: u.received_at_ms,
            payload: u.payload,
            decoded,
            sequence,
            step,
            alerts,
            reply: u.reply,
        };
        // Waits while the writer queue is full: this shard's own queue then fills and
        // `submit` answers Overloaded — the backpressure path.
        if let Err(Job::Commit(job)) = self.shard.writer.send(Job::Commit(Box::new(job))).await {
            debug!(device = %job.device.id(), "The store writer has stopped; answering unavailable.");
            let why = Reject::Unavailable {
                retry_after: self.shard.unavailable_retry_after,
            };
            self.metrics.rejected(job.transport, why);
            if let Some(reply) = job.reply {
                let _ = reply.send(Outcome::Rejected(why));
            }
        }
    }

    /// Reads the device's recent values for `delta`/`rate` back from the store (once per
    /// device after a start). A failed read is logged and the history starts empty.
    async fn load_history(
        &mut self,
        device: &Arc<Device>,
        set: &Arc<RuleSet>,
        before_s: i64,
        alerts: &mut Vec<Transition>,
    ) {
        let fields: Vec<(String, i64)> = set
            .history_fields()
            .map(|(f, w)| (f.to_owned(), w))
            .collect();
        let id = device.id().to_owned();
        let result = self
            .shard
            .reads
            .run(move |conn| {
                alert_store::load_history(conn, &id, &fields, before_s).map_err(StoreError::from)
            })
            .await;
        let data = result.unwrap_or_else(|e| {
            debug!(device = %device.id(), error = %e, "Cannot read the device's history for delta/rate; starting it empty.");
            Vec::new()
        });
        self.shard
            .rules
            .load_history(device, set, data, before_s.saturating_mul(1000), alerts);
    }

    /// Counts every rule that could not be evaluated; logs the first per device and rule
    /// (at WARN for the first device of each profile and rule, then at DEBUG).
    fn report_issues(&mut self, device: &Device, profile: &Profile) {
        for issue in self.issues.drain(..) {
            metrics::counter!(
                m::ALERT_RULE_ERRORS,
                "profile" => profile.name.clone(),
                "rule" => issue.rule.to_string(),
                "reason" => issue.error.reason()
            )
            .increment(1);
            if !issue.first {
                continue;
            }
            let key = (profile.name.clone(), issue.rule.to_string());
            let loud = !self.warned.contains(&key);
            if loud {
                self.warned.insert(key);
            }
            match (&issue.param, loud) {
                (Some(param), true) => warn!(
                    device = %device.id(),
                    profile = %profile.name,
                    rule = %issue.rule,
                    param = %param,
                    "Alert rule needs a device parameter the device does not have; the rule is not evaluated for it until the parameter is set. Further devices of this profile missing it are logged at DEBUG and counted in nbiot_alert_rule_errors_total."
                ),
                (Some(param), false) => debug!(
                    device = %device.id(),
                    profile = %profile.name,
                    rule = %issue.rule,
                    param = %param,
                    "Alert rule needs a device parameter the device does not have."
                ),
                (None, true) => warn!(
                    device = %device.id(),
                    profile = %profile.name,
                    rule = %issue.rule,
                    error = %issue.error,
                    "Alert rule cannot be evaluated on this device's readings (a field has an unexpected type). Further devices are logged at DEBUG and counted in nbiot_alert_rule_errors_total."
                ),
                (None, false) => debug!(
                    device = %device.id(),
                    profile = %profile.name,
                    rule = %issue.rule,
                    error = %issue.error,
                    "Alert rule cannot be evaluated on this device's readings."
                ),
            }
        }
    }

    /// Fires the inactive rules whose deadline passed; true when it handled any device.
    async fn expire(&mut self) -> bool {
        let now_ms = (self.shard.clock)();
        let mut alerts = Vec::new();
        let lookup = RegistryLookup(&self.shard.registry);
        let handled = self
            .shard
            .rules
            .expire(now_ms, EXPIRIES_PER_TICK, &lookup, &mut alerts);
        if !alerts.is_empty() {
            debug!(
                shard = self.shard.index,
                transitions = alerts.len(),
                "Silence deadlines passed."
            );
            // If the writer has stopped, the transitions are lost with it; they are
            // decided again after the next start (from the stored last uplink).
            let _ = self.shard.writer.send(Job::Alerts(alerts)).await;
        }
        handled > 0
    }

    fn reject(&self, u: Uplink, why: Reject) {
        self.metrics.rejected(u.transport, why);
        debug!(device = %u.device, protocol = u.transport.as_str(), reason = why.reason(), "Uplink rejected.");
        if let Some(reply) = u.reply {
            let _ = reply.send(Outcome::Rejected(why));
        }
    }

    async fn duplicate(&mut self, device: String) {
        // Only registered devices get a state row; a note is a statistic, so if the writer
        // has stopped it is dropped.
        if self.shard.registry.lookup(&device).is_some() {
            let _ = self.shard.writer.send(Job::Duplicate(device)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RX_MS: i64 = 1_700_000_000_123; // 2023-11-14T22:13:20.123Z

    #[test]
    fn reading_times() {
        let rx_s = 1_700_000_000;
        // No device time: the receive time, floored to the second.
        assert_eq!(reading_time(None, 0, RX_MS), (rx_s, false));
        assert_eq!(reading_time(None, 0, -1), (-1, false));
        // UTC as is; Local shifted by the profile's offset; Ago from the receive time.
        assert_eq!(
            reading_time(Some(DeviceTime::Utc(rx_s - 60)), 28_800, RX_MS),
            (rx_s - 60, true)
        );
        assert_eq!(
            reading_time(Some(DeviceTime::Local(rx_s + 28_800)), 28_800, RX_MS),
            (rx_s, true)
        );
        assert_eq!(
            reading_time(Some(DeviceTime::Ago(600)), 0, RX_MS),
            (rx_s - 600, true)
        );
        // Up to a day ahead is believed; beyond, or before 2000, is not.
        assert_eq!(
            reading_time(Some(DeviceTime::Utc(rx_s + 86_400)), 0, RX_MS),
            (rx_s + 86_400, true)
        );
        assert_eq!(
            reading_time(Some(DeviceTime::Utc(rx_s + 86_401)), 0, RX_MS),
            (rx_s, false)
        );
        // Up to 366 days behind is believed (readings buffered through an outage).
        assert_eq!(
            reading_time(Some(DeviceTime::Utc(rx_s - 366 * 86_400)), 0, RX_MS),
            (rx_s - 366 * 86_400, true)
        );
        assert_eq!(
            reading_time(Some(DeviceTime::Utc(rx_s - 366 * 86_400 - 1)), 0, RX_MS),
            (rx_s, false)
        );
        // Never before 2000, even for an uplink received then.
        let y2000_ms = EARLIEST_DEVICE_TIME_S * 1000;
        assert_eq!(
            reading_time(Some(DeviceTime::Utc(EARLIEST_DEVICE_TIME_S)), 0, y2000_ms),
            (EARLIEST_DEVICE_TIME_S, true)
        );
        assert_eq!(
            reading_time(
                Some(DeviceTime::Local(EARLIEST_DEVICE_TIME_S)),
                3600,
                y2000_ms
            ),
            (EARLIEST_DEVICE_TIME_S, false)
        );
        assert_eq!(
            reading_time(Some(DeviceTime::Ago(u32::MAX)), 0, RX_MS),
            (rx_s, false)
        );
    }
}
