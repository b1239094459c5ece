//! Alert delivery: what the rules engine hands over after a transition has committed, the
//! notifier that pushes alerts to Alertmanager, and the state `GET /api/v1/alerts` reads.
//!
//! ```text
//! shard: rules evaluate ──▶ CommitJob.alerts ──▶ writer: COMMIT (alert_state, alert_transitions)
//!                                                   │ then try_send(AlertEvent) — never blocks
//!                                                   ▼
//!                                notifier: firing set, resend timer, Alertmanager POST, backoff
//! ```
//!
//! The events are a fast path, not the record: the record is the store. If the notifier's
//! queue is full the event is counted and dropped, and the notifier reloads the firing set
//! from `alert_state` (it does the same at start), so Alertmanager still converges.

pub mod alertmanager;
pub mod notifier;

pub use notifier::{start as start_notifier, NotifierHandle, NotifierSettings};

use crate::profiles::Severity;

/// The lifecycle states a transition enters (`inactive` is the absence of state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlertState {
    Pending,
    Firing,
    Resolved,
}

impl AlertState {
    /// The `state` label / column value.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// A committed transition, sent by the store writer after its transaction committed.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEvent {
    /// `alert_transitions.id`.
    pub id: i64,
    pub device: String,
    pub profile: String,
    pub rule: String,
    pub severity: Severity,
    pub state: AlertState,
    /// When the transition happened, ms since the Unix epoch.
    pub at_ms: i64,
    /// When the alert started firing (`startsAt`); None while pending.
    pub starts_ms: Option<i64>,
    /// The receive time of the uplink that caused it (None for inactive rules): the start
    /// of the receipt → Alertmanager POST latency.
    pub received_at_ms: Option<i64>,
    pub value: Option<f64>,
    pub summary: String,
    /// The device's registry labels (become Alertmanager labels).
    pub labels: Vec<(String, String)>,
}
