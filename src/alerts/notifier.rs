//! The Alertmanager notifier: one task that turns committed alert transitions into
//! Alertmanager alerts, keeps Alertmanager's view of what is firing current, and never makes
//! ingest wait for it.
//!
//! ```text
//! writer ──try_send(AlertEvent)──▶ bounded queue ──▶ Book: firing alerts + undelivered
//!   (full: dropped, counted)          │ overflow?        resolutions, each with a version
//!                                     ▼                      │
//!                    reload from alert_state (own read       ├─ fresh lane: changes (critical at
//!                    connection, one snapshot)               │   once, others within `coalesce`)
//!                                                            └─ bulk lane: every firing alert,
//!                                                                every `resend_interval`
//! ```
//!
//! # What Alertmanager is told, and when
//!
//! - **Firing**: `startsAt` = when the rule fired, `endsAt` = now + 4 × `resend_interval`
//!   (as Prometheus does): Alertmanager resolves an alert by itself when its `endsAt` passes,
//!   so an alert stays alive only while the gateway keeps re-sending it, and a gateway that
//!   dies leaves nothing firing forever.
//! - **Resolved**: the same labels with `endsAt` = the resolution time. Kept until delivered,
//!   or until Alertmanager has certainly timed the alert out (4 × `resend_interval` after the
//!   resolution); then there is nothing left to say.
//! - **Pending** transitions are not pushed (Prometheus does not send them either).
//! - **Critical** alerts are POSTed as soon as their event arrives. Warning and info changes
//!   are coalesced for at most `coalesce` (500 ms by default) so a burst becomes one POST.
//! - **Resend**: every `resend_interval`, every firing alert (and every undelivered
//!   resolution) is POSTed again, in batches of at most `max_batch` alerts. With nothing
//!   firing the resend is an empty POST, which still tells us whether Alertmanager is up.
//!
//! The two lanes run concurrently (at most one POST each), so a long resend never delays a
//! critical alert by more than the POST in flight on the fresh lane.
//!
//! # Failures
//!
//! A transport error, 408, 429 or 5xx is retried: the lanes stop, and after a capped,
//! jittered exponential backoff (250 ms doubling to 10 s, each delay drawn from its upper
//! half) everything is sent again in full, because an Alertmanager that was down may have
//! lost its state. Another 4xx means Alertmanager refuses those alerts: they are counted and
//! dropped (firing ones are offered again at the next resend). Neither blocks ingest: the
//! writer only ever `try_send`s into the bounded queue.
//!
//! # The store is the record
//!
//! Events are a fast path. At start, and whenever the queue was seen full (the writer may
//! have dropped events: it counts them in `nbiot_alert_events_dropped_total`), the notifier
//! reloads from the store on a read connection of its own: the firing set from
//! `alert_state`, the resolutions it may have missed from `alert_transitions`, and the
//! highest transition id, all in one snapshot. Alerts it believed firing that the store no
//! longer has firing are resolved; events still queued with an id at or below the snapshot's
//! are older than it and skipped. At start the snapshot also holds the resolutions of the
//! last 4 × `resend_interval`, so an alert that resolved while the gateway was down (or
//! after it crashed before pushing) is resolved in Alertmanager too, not left to time out.
//!
//! Detecting overflow needs no help from the writer: the writer only drops when the queue is
//! full, and only this task empties it, so a drop since the last receive means the queue was
//! full when we next receive: `received + still queued >= capacity`. A false alarm costs one
//! extra reload (at most one per second).
//!
//! # Shutdown
//!
//! The notifier stops when its stop token is cancelled or its queue closes (the pipeline's
//! writer has ended). It takes what is still queued, waits for the POSTs in flight, and
//! makes one last attempt to deliver what changed, bounded by `final_push_timeout`; what it
//! could not deliver is logged. Firing alerts are not resolved at shutdown: they are still
//! firing, and the next gateway (or Alertmanager's `endsAt`) takes it from there.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::alertmanager::{self, Client, ClientError, PostableAlert, Push, PushError};
use super::{AlertEvent, AlertState};
use crate::config::AlertmanagerConfig;
use crate::health::{Check, Health};
use crate::pipeline::{system_clock, Clock};
use crate::profiles::Severity;
use crate::registry::{rfc3339, Registry};
use crate::store::alerts_query::{self, StateRow, TransitionRow};
use crate::store::query::ReadPool;
use crate::store::StoreError;
use crate::telemetry::metrics as m;

/// The `/readyz` check this module sets (non-critical: ingest works without it).
pub const HEALTH_CHECK: &str = "alertmanager";

/// Events taken from the queue per wake-up.
const RECV_BATCH: usize = 256;
/// At most this many firing alerts are reloaded from the store (a fleet-wide outage of a
/// million devices must not take the gateway's memory with it).
const MAX_RELOAD_FIRING: usize = 1_000_000;
/// At most this many missed resolutions are replayed by one reload.
const MAX_RELOAD_RESOLVED: usize = 100_000;
/// A failed reload is tried again after this long.
const RELOAD_RETRY: Duration = Duration::from_secs(5);
/// Overflow reloads are at most this frequent (a sustained flood would otherwise reload
/// on every receive).
const RELOAD_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// What the notifier is configured with.
#[derive(Clone)]
pub struct NotifierSettings {
    /// `[alertmanager] url`.
    pub url: String,
    /// `[alertmanager] resend_interval`: how often firing alerts are sent again.
    pub resend_interval: Duration,
    /// How long a warning/info change may wait to be batched with others. Critical: never.
    pub coalesce: Duration,
    /// Capacity of the event queue.
    pub queue: usize,
    /// Alerts per POST.
    pub max_batch: usize,
    /// First retry delay after a failed POST; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long the last delivery attempt at shutdown may take.
    pub final_push_timeout: Duration,
    /// Wall-clock ms since the Unix epoch (`startsAt`, `endsAt`, latency).
    pub clock: Clock,
}

impl std::fmt::Debug for NotifierSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotifierSettings")
            .field("url", &self.url)
            .field("resend_interval", &self.resend_interval)
            .field("coalesce", &self.coalesce)
            .field("queue", &self.queue)
            .field("max_batch", &self.max_batch)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("final_push_timeout", &self.final_push_timeout)
            .finish_non_exhaustive()
    }
}

/// Why `[alertmanager]` was refused.
#[derive(Debug, Error)]
pub enum SettingsError {
    #[error(transparent)]
    Url(#[from] ClientError),

    #[error("resend_interval = {0:?} must be at least 1s")]
    ResendInterval(Duration),
}

impl NotifierSettings {
    /// The defaults for `url` and `resend_interval`.
    pub fn new(url: &str, resend_interval: Duration) -> NotifierSettings {
        NotifierSettings {
            url: url.to_owned(),
            resend_interval,
            coalesce: Duration::from_millis(500),
            queue: 4096,
            max_batch: 500,
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(10),
            final_push_timeout: Duration::from_secs(5),
            clock: system_clock(),
        }
    }

    /// Validates `[alertmanager]` (pure: binds and sends nothing).
    pub fn from_config(config: &AlertmanagerConfig) -> Result<NotifierSettings, SettingsError> {
        if !(config.url.starts_with("http://") || config.url.starts_with("https://")) {
            return Err(ClientError::Scheme(config.url.clone()).into());
        }
        if config.resend_interval < Duration::from_secs(1) {
            return Err(SettingsError::ResendInterval(config.resend_interval));
        }
        Ok(NotifierSettings::new(&config.url, config.resend_interval))
    }

    /// How far ahead of now a firing alert's `endsAt` is: 4 × `resend_interval`.
    pub fn horizon(&self) -> Duration {
        self.resend_interval.saturating_mul(4)
    }
}

// ---------------------------------------------------------------------------------------
// Reload source
// ---------------------------------------------------------------------------------------

/// What a reload returns: the firing set and the resolutions since a point, as events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// Every firing alert (state `Firing`, `received_at_ms` None).
    pub firing: Vec<AlertEvent>,
    /// Resolutions after `after_id` and since `since_ms`, newest first.
    pub resolved: Vec<AlertEvent>,
    /// Every transition with an id up to this is reflected in `firing`.
    pub watermark: i64,
}

/// Where the notifier reloads from: the store in the gateway ([`StoreSource`]), a fake in
/// tests.
pub trait Source: Send + Sync + 'static {
    /// The firing set, plus resolutions with an id above `after_id` and a time at or after
    /// `since_ms`.
    fn load(
        &self,
        after_id: i64,
        since_ms: i64,
    ) -> impl Future<Output = Result<Loaded, StoreError>> + Send;
}

/// Device labels by device id (the registry in the gateway).
pub type DeviceLabels = Arc<dyn Fn(&str) -> Vec<(String, String)> + Send + Sync>;

/// Reloads from the store's alert tables on read-only connections of its own, with each
/// device's labels from the registry.
pub struct StoreSource {
    reads: Arc<ReadPool>,
    labels: DeviceLabels,
}

impl StoreSource {
    pub fn new(registry: &Registry) -> StoreSource {
        let reads = Arc::new(ReadPool::new(registry.store().path()));
        let registry = registry.clone();
        StoreSource {
            reads,
            labels: Arc::new(move |id| {
                registry.get(id).map_or_else(Vec::new, |d| {
                    d.labels()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect()
                })
            }),
        }
    }
}

/// A severity column value; an unknown one (written by a newer gateway) is taken as
/// `warning`, so the alert is still delivered.
fn parse_severity(s: &str) -> Severity {
    match s {
        "critical" => Severity::Critical,
        "info" => Severity::Info,
        _ => Severity::Warning,
    }
}

fn firing_event(row: StateRow, labels: &DeviceLabels) -> AlertEvent {
    let starts = row.firing_since_ms.unwrap_or(row.active_since_ms);
    AlertEvent {
        id: 0,
        labels: labels(&row.device),
        device: row.device,
        profile: row.profile,
        rule: row.rule,
        severity: parse_severity(&row.severity),
        state: AlertState::Firing,
        at_ms: starts,
        starts_ms: Some(starts),
        received_at_ms: None,
        value: row.value,
        summary: row.summary,
    }
}

fn resolved_event(row: TransitionRow, labels: &DeviceLabels) -> AlertEvent {
    AlertEvent {
        id: row.id,
        labels: labels(&row.device),
        device: row.device,
        profile: row.profile,
        rule: row.rule,
        severity: parse_severity(&row.severity),
        state: AlertState::Resolved,
        at_ms: row.time_ms,
        starts_ms: row.starts_ms,
        received_at_ms: None,
        value: row.value,
        summary: row.summary,
    }
}

impl Source for StoreSource {
    async fn load(&self, after_id: i64, since_ms: i64) -> Result<Loaded, StoreError> {
        let snap = self
            .reads
            .run(move |conn| {
                alerts_query::snapshot(
                    conn,
                    after_id,
                    since_ms,
                    MAX_RELOAD_FIRING,
                    MAX_RELOAD_RESOLVED,
                )
            })
            .await?;
        if snap.firing_truncated {
            warn!(
                limit = MAX_RELOAD_FIRING,
                "More alerts are firing than the notifier reloads; the rest reach Alertmanager only with their next transition."
            );
        }
        Ok(Loaded {
            firing: snap
                .firing
                .into_iter()
                .map(|r| firing_event(r, &self.labels))
                .collect(),
            resolved: snap
                .resolved
                .into_iter()
                .map(|r| resolved_event(r, &self.labels))
                .collect(),
            watermark: snap.watermark,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The book: what Alertmanager should know (pure, no I/O, no clock of its own)
// ---------------------------------------------------------------------------------------

/// (device, rule): one alert.
type Key = (String, String);

fn key_of(ev: &AlertEvent) -> Key {
    (ev.device.clone(), ev.rule.clone())
}

#[derive(Debug)]
struct Entry {
    /// The latest transition: `Firing`, or `Resolved` not yet delivered.
    event: AlertEvent,
    /// Bumped on every change: a POST delivers the version it carried, not a newer one.
    version: u64,
    /// Receipt of the uplink behind an undelivered change (for the latency histogram).
    latency_from_ms: Option<i64>,
}

/// What one POST carried of an alert.
#[derive(Debug, Clone)]
struct Sent {
    key: Key,
    version: u64,
}

#[derive(Debug, Default)]
struct Book {
    alerts: HashMap<Key, Entry>,
    /// Changed since last delivered, by urgency.
    dirty_critical: HashSet<Key>,
    dirty: HashSet<Key>,
    version: u64,
    firing: usize,
    /// Events with an id at or below this are older than the last reload: skipped.
    watermark: i64,
    /// The highest transition id reflected (events applied, or the watermark).
    seen_id: i64,
}

impl Book {
    fn has_dirty(&self) -> bool {
        !self.dirty.is_empty() || !self.dirty_critical.is_empty()
    }

    fn undelivered(&self) -> usize {
        self.dirty.len() + self.dirty_critical.len()
    }

    /// Applies one event; true when Alertmanager must be told something new.
    fn apply(&mut self, ev: AlertEvent) -> bool {
        if ev.id <= self.watermark {
            return false;
        }
        self.seen_id = self.seen_id.max(ev.id);
        let key = key_of(&ev);
        match ev.state {
            AlertState::Pending => false,
            AlertState::Firing => {
                let from = ev.received_at_ms;
                self.set(key, ev, from);
                true
            }
            AlertState::Resolved => {
                // An alert we never saw firing is resolved in Alertmanager anyway when it
                // did fire (its firing event may have been dropped, or pushed by the
                // previous process); one that never fired was never pushed.
                if self.alerts.contains_key(&key) || ev.starts_ms.is_some() {
                    let from = ev.received_at_ms;
                    self.set(key, ev, from);
                    true
                } else {
                    false
                }
            }
        }
    }

    fn set(&mut self, key: Key, event: AlertEvent, latency_from_ms: Option<i64>) {
        self.version += 1;
        let critical = event.severity == Severity::Critical;
        let firing = event.state == AlertState::Firing;
        let old = self.alerts.insert(
            key.clone(),
            Entry {
                event,
                version: self.version,
                latency_from_ms,
            },
        );
        if old.is_some_and(|e| e.event.state == AlertState::Firing) {
            self.firing -= 1;
        }
        if firing {
            self.firing += 1;
        }
        if critical {
            self.dirty.remove(&key);
            self.dirty_critical.insert(key);
        } else {
            self.dirty_critical.remove(&key);
            self.dirty.insert(key);
        }
    }

    fn remove(&mut self, key: &Key) {
        if let Some(e) = self.alerts.remove(key) {
            if e.event.state == AlertState::Firing {
                self.firing -= 1;
            }
        }
        self.dirty.remove(key);
        self.dirty_critical.remove(key);
    }

    /// Merges a reload (see the module documentation). With `mark_dirty` false the changes
    /// are not queued for the fresh lane (a full push follows anyway). Returns how many
    /// alerts changed.
    fn apply_loaded(
        &mut self,
        loaded: Loaded,
        now_ms: i64,
        horizon_ms: i64,
        mark_dirty: bool,
    ) -> usize {
        let mut firing: HashMap<Key, AlertEvent> = HashMap::with_capacity(loaded.firing.len());
        for ev in loaded.firing {
            firing.insert(key_of(&ev), ev);
        }
        let mut resolved: HashMap<Key, AlertEvent> = HashMap::new();
        for ev in loaded.resolved {
            // Newest first: keep the first of each alert.
            resolved.entry(key_of(&ev)).or_insert(ev);
        }
        let mut changed = Vec::new();
        // 1. Firing here, no longer firing in the store: resolved.
        let gone: Vec<Key> = self
            .alerts
            .iter()
            .filter(|(k, e)| e.event.state == AlertState::Firing && !firing.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            let ev = match resolved.remove(&key) {
                Some(ev) => ev,
                None => {
                    let Some(e) = self.alerts.get(&key) else {
                        continue;
                    };
                    AlertEvent {
                        state: AlertState::Resolved,
                        at_ms: now_ms,
                        received_at_ms: None,
                        ..e.event.clone()
                    }
                }
            };
            changed.push(key.clone());
            self.set(key, ev, None);
        }
        // 2. Firing in the store: new unless we already have it firing since the same time
        //    (then ours, with the labels it was first sent with, stays).
        for (key, ev) in firing {
            resolved.remove(&key);
            let same = self.alerts.get(&key).is_some_and(|e| {
                e.event.state == AlertState::Firing && e.event.starts_ms == ev.starts_ms
            });
            if !same {
                changed.push(key.clone());
                self.set(key, ev, None);
            }
        }
        // 3. Resolutions we have not told (missed, or from before a restart) that
        //    Alertmanager may still hold.
        for (key, ev) in resolved {
            let known = self.alerts.get(&key).is_some_and(|e| {
                e.event.state == AlertState::Resolved && e.event.at_ms >= ev.at_ms
            });
            if !known && ev.starts_ms.is_some() && ev.at_ms.saturating_add(horizon_ms) >= now_ms {
                changed.push(key.clone());
                self.set(key, ev, None);
            }
        }
        if !mark_dirty {
            for key in &changed {
                self.dirty.remove(key);
                self.dirty_critical.remove(key);
            }
        }
        self.watermark = self.watermark.max(loaded.watermark);
        self.seen_id = self.seen_id.max(self.watermark);
        changed.len()
    }

    /// Up to `max` changed alerts, critical first.
    fn take_dirty(&mut self, max: usize) -> Vec<Key> {
        let mut out: Vec<Key> = Vec::with_capacity(max.min(self.undelivered()));
        for set in [&mut self.dirty_critical, &mut self.dirty] {
            let take: Vec<Key> = set.iter().take(max - out.len()).cloned().collect();
            for k in &take {
                set.remove(k);
            }
            out.extend(take);
        }
        out
    }

    /// Every alert Alertmanager should hear about in a full push.
    fn all_keys(&self) -> VecDeque<Key> {
        // Critical first, as for changes.
        let mut keys: Vec<(&Key, bool)> = self
            .alerts
            .iter()
            .map(|(k, e)| (k, e.event.severity != Severity::Critical))
            .collect();
        keys.sort_by_key(|(_, not_critical)| *not_critical);
        keys.into_iter().map(|(k, _)| k.clone()).collect()
    }

    /// The POST body for `keys` (those still known), and what it carries.
    fn render(
        &self,
        keys: &[Key],
        now_ms: i64,
        horizon_ms: i64,
    ) -> (Vec<PostableAlert>, Vec<Sent>) {
        let mut alerts = Vec::with_capacity(keys.len());
        let mut sent = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(e) = self.alerts.get(key) {
                alerts.push(postable(&e.event, now_ms, horizon_ms));
                sent.push(Sent {
                    key: key.clone(),
                    version: e.version,
                });
            }
        }
        (alerts, sent)
    }

    /// Alertmanager has what `sent` carried: changes delivered at their current version are
    /// no longer dirty, resolutions are forgotten. Returns the latencies to record.
    fn delivered(&mut self, sent: &[Sent], now_ms: i64) -> Vec<(Severity, f64)> {
        let mut latencies = Vec::new();
        for s in sent {
            let Some(e) = self.alerts.get_mut(&s.key) else {
                continue;
            };
            if e.version != s.version {
                continue;
            }
            if let Some(from) = e.latency_from_ms.take() {
                latencies.push((e.event.severity, (now_ms - from).max(0) as f64 / 1000.0));
            }
            let resolved = e.event.state == AlertState::Resolved;
            self.dirty.remove(&s.key);
            self.dirty_critical.remove(&s.key);
            if resolved {
                self.remove(&s.key);
            }
        }
        latencies
    }

    /// A retryable failure: what `sent` carried is dirty again (unless it changed since).
    fn failed(&mut self, sent: &[Sent]) {
        for s in sent {
            if let Some(e) = self.alerts.get(&s.key) {
                if e.version == s.version {
                    if e.event.severity == Severity::Critical {
                        self.dirty_critical.insert(s.key.clone());
                    } else {
                        self.dirty.insert(s.key.clone());
                    }
                }
            }
        }
    }

    /// Alertmanager refused what `sent` carried: forget the changes (a firing alert is
    /// offered again by the next resend).
    fn discard(&mut self, sent: &[Sent]) {
        for s in sent {
            let Some(e) = self.alerts.get_mut(&s.key) else {
                continue;
            };
            if e.version == s.version {
                e.latency_from_ms = None;
                let resolved = e.event.state == AlertState::Resolved;
                self.dirty.remove(&s.key);
                self.dirty_critical.remove(&s.key);
                if resolved {
                    self.remove(&s.key);
                }
            }
        }
    }

    /// Forgets resolutions Alertmanager has timed out by itself; returns how many.
    fn expire(&mut self, now_ms: i64, horizon_ms: i64) -> usize {
        let old: Vec<Key> = self
            .alerts
            .iter()
            .filter(|(_, e)| {
                e.event.state == AlertState::Resolved
                    && e.event.at_ms.saturating_add(horizon_ms) < now_ms
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            self.remove(k);
        }
        old.len()
    }
}

/// `2026-11-21T08:00:00.123Z`
fn rfc3339_ms(ms: i64) -> String {
    let s = rfc3339(ms.div_euclid(1000));
    let base = s.strip_suffix('Z').unwrap_or(&s);
    format!("{base}.{:03}Z", ms.rem_euclid(1000))
}

/// The Alertmanager alert for a transition, as of `now_ms`.
fn postable(ev: &AlertEvent, now_ms: i64, horizon_ms: i64) -> PostableAlert {
    let starts = ev.starts_ms.unwrap_or(ev.at_ms);
    let ends = match ev.state {
        AlertState::Resolved => ev.at_ms,
        AlertState::Firing | AlertState::Pending => now_ms.saturating_add(horizon_ms),
    }
    // Alertmanager refuses an alert that ends before it starts.
    .max(starts);
    let labels = alertmanager::labels(
        &ev.rule,
        &ev.device,
        &ev.profile,
        ev.severity.as_str(),
        ev.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let mut annotations = std::collections::BTreeMap::new();
    if !ev.summary.is_empty() {
        annotations.insert("summary".to_owned(), ev.summary.clone());
    }
    let value = ev.value.map(|v| v.to_string());
    let mut description = format!(
        "Rule {} of profile {} on device {}: firing since {}",
        ev.rule,
        ev.profile,
        ev.device,
        rfc3339_ms(starts)
    );
    if ev.state == AlertState::Resolved {
        description.push_str(&format!(", resolved at {}", rfc3339_ms(ev.at_ms)));
    }
    if let Some(v) = &value {
        description.push_str(&format!(" (value {v})"));
        annotations.insert("value".to_owned(), v.clone());
    }
    description.push('.');
    annotations.insert("description".to_owned(), description);
    PostableAlert {
        labels,
        annotations,
        starts_at: rfc3339_ms(starts),
        ends_at: rfc3339_ms(ends),
        generator_url: None,
    }
}

// ---------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------

/// Capped exponential backoff with "equal jitter": each delay is drawn from the upper half
/// of the current step, so retries from many gateways spread out but never come sooner
/// than half the step.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    step: Option<Duration>,
    rng: u64,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Backoff {
        // std's RandomState is randomly keyed per process: a seed without a rand crate.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Backoff {
            initial,
            max,
            step: None,
            rng: seed | 1,
        }
    }

    fn next(&mut self) -> Duration {
        let step = match self.step {
            None => self.initial,
            Some(s) => s.saturating_mul(2).min(self.max),
        };
        self.step = Some(step);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = step / 2;
        let span = u64::try_from(half.as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        half + Duration::from_nanos(self.rng % span)
    }

    fn reset(&mut self) {
        self.step = None;
    }
}

// ---------------------------------------------------------------------------------------
// Telemetry
// ---------------------------------------------------------------------------------------

/// Alertmanager's state as last seen, for logging changes once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Unknown,
    Up,
    Down,
    Refusing,
}

/// Metric handles, the health check and the log lines, kept together so they never drift.
struct Telemetry {
    ok: metrics::Counter,
    error: metrics::Counter,
    rejected: metrics::Counter,
    up: metrics::Gauge,
    latency: [metrics::Histogram; 3],
    reload_start: metrics::Counter,
    reload_overflow: metrics::Counter,
    health: Health,
    url: String,
    seen: Seen,
    last_error: Option<String>,
}

impl Telemetry {
    fn new(url: String, health: Health) -> Telemetry {
        let latency =
            |s: Severity| metrics::histogram!(m::ALERT_PUSH_LATENCY, "severity" => s.as_str());
        let t = Telemetry {
            ok: metrics::counter!(m::ALERT_PUSHES, "result" => "ok"),
            error: metrics::counter!(m::ALERT_PUSHES, "result" => "error"),
            rejected: metrics::counter!(m::ALERT_PUSHES, "result" => "rejected"),
            up: metrics::gauge!(m::ALERT_PUSH_HEALTHY),
            latency: [
                latency(Severity::Critical),
                latency(Severity::Warning),
                latency(Severity::Info),
            ],
            reload_start: metrics::counter!(m::ALERT_RELOADS, "reason" => "start"),
            reload_overflow: metrics::counter!(m::ALERT_RELOADS, "reason" => "overflow"),
            health,
            url,
            seen: Seen::Unknown,
            last_error: None,
        };
        // Up until shown otherwise, like "no Alertmanager configured": the first push
        // (at start) settles it within a second.
        t.up.set(1.0);
        t
    }

    fn latency(&self, severity: Severity, seconds: f64) {
        let i = match severity {
            Severity::Critical => 0,
            Severity::Warning => 1,
            Severity::Info => 2,
        };
        if let Some(h) = self.latency.get(i) {
            h.record(seconds);
        }
    }

    fn set_health(&self, book: &Book) {
        let mut detail = json!({
            "url": self.url,
            "firing": book.firing,
            "undelivered": book.undelivered(),
        });
        if let Some(e) = &self.last_error {
            detail["error"] = json!(e);
        }
        let check = if self.seen == Seen::Up || self.seen == Seen::Unknown {
            Check::ok(false, detail)
        } else {
            Check::failing(false, detail)
        };
        self.health.set(HEALTH_CHECK, check);
    }

    fn pushed(&mut self, alerts: usize, book: &Book) {
        self.ok.increment(1);
        self.up.set(1.0);
        if self.seen != Seen::Up {
            if self.seen != Seen::Unknown {
                info!(url = %self.url, "Alertmanager accepts alerts again.");
            }
            self.seen = Seen::Up;
            self.last_error = None;
        }
        debug!(
            alerts,
            firing = book.firing,
            "Alerts pushed to Alertmanager."
        );
        self.set_health(book);
    }

    fn failed(&mut self, e: &PushError, alerts: usize, retry_in: Option<Duration>, book: &Book) {
        self.error.increment(1);
        self.up.set(0.0);
        if self.seen != Seen::Down {
            warn!(
                url = %self.url,
                error = %e,
                alerts,
                "Cannot push alerts to Alertmanager; retrying with backoff (ingest is not affected)."
            );
        } else {
            debug!(error = %e, alerts, retry_in = ?retry_in, "Alertmanager push failed again.");
        }
        self.seen = Seen::Down;
        self.last_error = Some(e.to_string());
        self.set_health(book);
    }

    fn rejected(&mut self, e: &PushError, alerts: usize, book: &Book) {
        self.rejected.increment(1);
        self.up.set(0.0);
        if self.seen != Seen::Refusing {
            error!(
                url = %self.url,
                error = %e,
                alerts,
                "Alertmanager refused alerts; they are dropped (firing ones are offered again at the next resend)."
            );
        } else {
            debug!(error = %e, alerts, "Alertmanager refused alerts again.");
        }
        self.seen = Seen::Refusing;
        self.last_error = Some(e.to_string());
        self.set_health(book);
    }
}

// ---------------------------------------------------------------------------------------
// The task
// ---------------------------------------------------------------------------------------

type PushFuture = Pin<Box<dyn Future<Output = Result<(), PushError>> + Send>>;

/// One POST at a time.
#[derive(Default)]
struct Lane {
    fut: Option<PushFuture>,
    sent: Vec<Sent>,
}

impl Lane {
    fn idle(&self) -> bool {
        self.fut.is_none()
    }
}

/// Polls a lane's POST, or never completes when the lane is idle. Cancellation-safe: the
/// POST lives in the lane, not in this future.
async fn lane_done(fut: &mut Option<PushFuture>) -> Result<(), PushError> {
    match fut {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReloadReason {
    Start,
    Overflow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneId {
    Fresh,
    Bulk,
}

/// The notifier (see the module documentation). Build with [`Notifier::new`], run with
/// [`Notifier::run`]; [`start`] does both for the gateway.
pub struct Notifier<P, S> {
    settings: NotifierSettings,
    pusher: Arc<P>,
    source: S,
    book: Book,
    telemetry: Telemetry,
    fresh: Lane,
    bulk: Lane,
    /// The full push in progress: keys not yet sent. Its last chunk may be empty (a push
    /// of nothing, when nothing is firing, still tells us whether Alertmanager is up).
    full: Option<VecDeque<Key>>,
    /// When the next full push starts.
    resend_at: Instant,
    /// When coalesced changes are due.
    flush_at: Option<Instant>,
    /// Backing off after a failure: nothing is sent before this.
    retry_at: Option<Instant>,
    /// After a failure, send everything once Alertmanager answers again.
    full_after_retry: bool,
    backoff: Backoff,
    reload: Option<ReloadReason>,
    reload_not_before: Instant,
}

impl<P: Push, S: Source> Notifier<P, S> {
    /// `health` gets the [`HEALTH_CHECK`] check.
    pub fn new(settings: NotifierSettings, pusher: P, source: S, health: Health) -> Self {
        let now = Instant::now();
        let backoff = Backoff::new(settings.backoff_initial, settings.backoff_max);
        let telemetry = Telemetry::new(settings.url.clone(), health);
        Notifier {
            settings,
            pusher: Arc::new(pusher),
            source,
            book: Book::default(),
            telemetry,
            fresh: Lane::default(),
            bulk: Lane::default(),
            full: None,
            resend_at: now,
            flush_at: None,
            retry_at: None,
            full_after_retry: false,
            backoff,
            reload: Some(ReloadReason::Start),
            reload_not_before: now,
        }
    }

    fn now_ms(&self) -> i64 {
        (self.settings.clock)()
    }

    fn max_batch(&self) -> usize {
        self.settings.max_batch.max(1)
    }

    fn horizon_ms(&self) -> i64 {
        i64::try_from(self.settings.horizon().as_millis()).unwrap_or(i64::MAX)
    }

    /// Runs until `stop` is cancelled or every sender of `events` is dropped; then makes
    /// one bounded last delivery attempt.
    pub async fn run(mut self, mut events: mpsc::Receiver<AlertEvent>, stop: CancellationToken) {
        info!(
            url = %self.telemetry.url,
            resend_interval = ?self.settings.resend_interval,
            "Alertmanager notifier started."
        );
        self.telemetry.set_health(&self.book);
        let capacity = events.max_capacity();
        let mut buf = Vec::with_capacity(RECV_BATCH);
        loop {
            self.reload_if_due().await;
            let now = Instant::now();
            self.start_due(now);
            let wake = self.next_wake();
            enum Wake {
                Stop,
                Done(LaneId, Result<(), PushError>),
                Events(usize),
                Timer,
            }
            let woke = tokio::select! {
                biased;
                // Cancellation-safe: nothing is lost by not polling the others this time.
                () = stop.cancelled() => Wake::Stop,
                // Cancellation-safe: the POSTs live in their lanes (see `lane_done`).
                r = lane_done(&mut self.fresh.fut) => Wake::Done(LaneId::Fresh, r),
                r = lane_done(&mut self.bulk.fut) => Wake::Done(LaneId::Bulk, r),
                // `recv_many` is cancellation-safe: it takes nothing unless it returns.
                n = events.recv_many(&mut buf, RECV_BATCH) => Wake::Events(n),
                () = sleep_until_opt(wake) => Wake::Timer,
            };
            match woke {
                Wake::Stop => break,
                // 0 only when closed: the pipeline's writer is gone.
                Wake::Events(0) => break,
                Wake::Events(n) => {
                    // The writer drops only into a full queue, and only we empty it: a drop
                    // since our last receive means it was full now (module docs).
                    if n + events.len() >= capacity && self.reload.is_none() {
                        self.reload = Some(ReloadReason::Overflow);
                    }
                    self.apply(buf.drain(..));
                }
                Wake::Done(lane, result) => self.finished(lane, result),
                Wake::Timer => {}
            }
        }
        self.finish(&mut events).await;
    }

    fn apply(&mut self, events: impl Iterator<Item = AlertEvent>) {
        for ev in events {
            self.book.apply(ev);
        }
        self.schedule_flush(Instant::now());
    }

    fn schedule_flush(&mut self, now: Instant) {
        if !self.book.has_dirty() {
            self.flush_at = None;
        } else if self.flush_at.is_none() {
            self.flush_at = Some(now + self.settings.coalesce);
        }
    }

    async fn reload_if_due(&mut self) {
        let Some(reason) = self.reload else {
            return;
        };
        if Instant::now() < self.reload_not_before {
            return;
        }
        let now_ms = self.now_ms();
        let horizon = self.horizon_ms();
        let (after_id, since_ms) = match reason {
            ReloadReason::Start => (0, now_ms.saturating_sub(horizon)),
            ReloadReason::Overflow => (self.book.seen_id, now_ms.saturating_sub(horizon)),
        };
        match self.source.load(after_id, since_ms).await {
            Ok(loaded) => {
                let (firing, resolved) = (loaded.firing.len(), loaded.resolved.len());
                // At start a full push follows at once and carries everything.
                let start = reason == ReloadReason::Start;
                let changed = self.book.apply_loaded(loaded, now_ms, horizon, !start);
                match reason {
                    ReloadReason::Start => {
                        self.telemetry.reload_start.increment(1);
                        self.resend_at = Instant::now();
                        info!(firing, resolved, "Alerts reloaded from the store.");
                    }
                    ReloadReason::Overflow => {
                        self.telemetry.reload_overflow.increment(1);
                        warn!(
                            firing,
                            changed,
                            "Alert event queue overflowed; alerts reloaded from the store."
                        );
                    }
                }
                self.reload = None;
                if reason == ReloadReason::Overflow {
                    self.reload_not_before = Instant::now() + RELOAD_MIN_INTERVAL;
                }
                self.schedule_flush(Instant::now());
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?RELOAD_RETRY, "Cannot reload alerts from the store.");
                self.reload_not_before = Instant::now() + RELOAD_RETRY;
            }
        }
    }

    /// Starts every POST that is due at `now`.
    fn start_due(&mut self, now: Instant) {
        if let Some(t) = self.retry_at {
            if now < t {
                return;
            }
            self.retry_at = None;
        }
        if self.full.is_none()
            && self.bulk.idle()
            && (self.full_after_retry || now >= self.resend_at)
        {
            self.full_after_retry = false;
            let expired = self.book.expire(self.now_ms(), self.horizon_ms());
            if expired > 0 {
                debug!(
                    expired,
                    "Undelivered resolutions expired (Alertmanager has timed them out)."
                );
            }
            self.full = Some(self.book.all_keys());
            self.next_chunk();
        } else if self.full.is_some() && self.bulk.idle() {
            self.next_chunk();
        }
        let due = !self.book.dirty_critical.is_empty()
            || (self.book.has_dirty() && self.flush_at.is_some_and(|t| now >= t));
        if due && self.fresh.idle() {
            let keys = self.book.take_dirty(self.max_batch());
            self.send(LaneId::Fresh, &keys);
            if !self.book.has_dirty() {
                self.flush_at = None;
            }
        }
    }

    /// Sends the next chunk of the full push in progress.
    fn next_chunk(&mut self) {
        let Some(queue) = self.full.as_mut() else {
            return;
        };
        let n = queue.len().min(self.settings.max_batch.max(1));
        let keys: Vec<Key> = queue.drain(..n).collect();
        self.send(LaneId::Bulk, &keys);
    }

    fn send(&mut self, lane: LaneId, keys: &[Key]) {
        let (alerts, sent) = self.book.render(keys, self.now_ms(), self.horizon_ms());
        if alerts.is_empty() && lane == LaneId::Fresh {
            return;
        }
        let pusher = Arc::clone(&self.pusher);
        let fut: PushFuture = Box::pin(async move { pusher.push(alerts).await });
        let lane = match lane {
            LaneId::Fresh => &mut self.fresh,
            LaneId::Bulk => &mut self.bulk,
        };
        lane.fut = Some(fut);
        lane.sent = sent;
    }

    /// A POST finished.
    fn finished(&mut self, lane_id: LaneId, result: Result<(), PushError>) {
        let lane = match lane_id {
            LaneId::Fresh => &mut self.fresh,
            LaneId::Bulk => &mut self.bulk,
        };
        lane.fut = None;
        let sent = std::mem::take(&mut lane.sent);
        let now = Instant::now();
        match result {
            Ok(()) => {
                let now_ms = self.now_ms();
                for (severity, seconds) in self.book.delivered(&sent, now_ms) {
                    self.telemetry.latency(severity, seconds);
                }
                self.backoff.reset();
                self.retry_at = None;
                self.telemetry.pushed(sent.len(), &self.book);
                if lane_id == LaneId::Bulk {
                    self.end_full_push_if_done(now);
                }
            }
            Err(e) if e.retryable() => {
                self.book.failed(&sent);
                // Both lanes may fail on the same outage: one step of backoff for both.
                let delay = match self.retry_at {
                    Some(t) if t > now => t - now,
                    _ => {
                        let d = self.backoff.next();
                        self.retry_at = Some(now + d);
                        d
                    }
                };
                // Alertmanager may have lost its state: resend everything once it answers.
                self.full = None;
                self.full_after_retry = true;
                self.telemetry
                    .failed(&e, sent.len(), Some(delay), &self.book);
            }
            Err(e) => {
                self.book.discard(&sent);
                self.telemetry.rejected(&e, sent.len(), &self.book);
                if lane_id == LaneId::Bulk {
                    self.end_full_push_if_done(now);
                }
            }
        }
        self.schedule_flush(now);
    }

    fn end_full_push_if_done(&mut self, now: Instant) {
        if self.full.as_ref().is_some_and(VecDeque::is_empty) {
            self.full = None;
            self.resend_at = now + self.settings.resend_interval;
        }
    }

    /// When something next becomes due, if anything can.
    fn next_wake(&self) -> Option<Instant> {
        let reload = self.reload.map(|_| self.reload_not_before);
        let send = if let Some(t) = self.retry_at {
            Some(t)
        } else {
            let resend = (self.full.is_none() && self.bulk.idle()).then_some(self.resend_at);
            let flush = if self.fresh.idle() {
                self.flush_at
            } else {
                None
            };
            min_opt(resend, flush)
        };
        min_opt(reload, send)
    }

    /// Takes what is still queued, waits for the POSTs in flight, and makes one attempt to
    /// deliver what changed, all within `final_push_timeout`.
    async fn finish(&mut self, events: &mut mpsc::Receiver<AlertEvent>) {
        events.close();
        let mut rest = Vec::new();
        while let Ok(ev) = events.try_recv() {
            rest.push(ev);
        }
        self.apply(rest.into_iter());
        let limit = self.settings.final_push_timeout;
        if tokio::time::timeout(limit, self.final_push())
            .await
            .is_err()
        {
            debug!(timeout = ?limit, "Last Alertmanager push timed out.");
        }
        let undelivered = self.book.undelivered();
        if undelivered > 0 {
            warn!(
                undelivered,
                "Alertmanager notifier stopped with changes undelivered; firing alerts are sent again by the next start."
            );
        }
        info!(firing = self.book.firing, "Alertmanager notifier stopped.");
    }

    async fn final_push(&mut self) {
        for lane in [LaneId::Fresh, LaneId::Bulk] {
            let fut = match lane {
                LaneId::Fresh => self.fresh.fut.take(),
                LaneId::Bulk => self.bulk.fut.take(),
            };
            if let Some(f) = fut {
                let r = f.await;
                // `finished` expects the lane's future gone and reads its `sent`.
                self.finished(lane, r);
            }
        }
        // One attempt, whatever the backoff says.
        while self.book.has_dirty() {
            let keys = self.book.take_dirty(self.max_batch());
            let (alerts, sent) = self.book.render(&keys, self.now_ms(), self.horizon_ms());
            if alerts.is_empty() {
                continue;
            }
            match self.pusher.push(alerts).await {
                Ok(()) => {
                    let now_ms = self.now_ms();
                    for (severity, seconds) in self.book.delivered(&sent, now_ms) {
                        self.telemetry.latency(severity, seconds);
                    }
                    self.telemetry.pushed(sent.len(), &self.book);
                }
                Err(e) => {
                    self.book.failed(&sent);
                    self.telemetry.failed(&e, sent.len(), None, &self.book);
                    return;
                }
            }
        }
    }
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------
// Starting it in the gateway
// ---------------------------------------------------------------------------------------

/// A running notifier.
pub struct NotifierHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl NotifierHandle {
    /// Stops the notifier and waits for its last push (bounded by `final_push_timeout`).
    /// Call it after the pipeline has drained, so the transitions of the last commits are
    /// in its queue.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            error!(error = %e, "Alertmanager notifier task failed.");
        }
    }
}

/// Starts the notifier for the gateway: POSTs to `settings.url`, reloads from the
/// registry's store, reports in `health`. The sender goes to `PipelineConfig.alert_events`.
pub fn start(
    settings: NotifierSettings,
    registry: &Registry,
    health: Health,
) -> Result<(mpsc::Sender<AlertEvent>, NotifierHandle), ClientError> {
    let client = Client::new(&settings.url)?;
    let (tx, rx) = mpsc::channel(settings.queue.max(1));
    let stop = CancellationToken::new();
    let notifier = Notifier::new(settings, client, StoreSource::new(registry), health);
    let task = tokio::spawn(notifier.run(rx, stop.clone()));
    Ok((tx, NotifierHandle { stop, task }))
}

#[cfg(test)]
mod tests;
