//! Alert rules: the `[[alerts]]` of device profiles, compiled when a profile loads and
//! evaluated in the pipeline's shards as each reading goes by.
//!
//! ```text
//! shard: decode → ShardRules::uplink (silence ends, timer restarts)
//!               → ShardRules::reading per reading (condition rules) ─┐
//!        timer: ShardRules::expire (silence deadlines) ──────────────┤ Transitions
//!                                                                    ▼
//!        writer: alert_transitions + alert_state in the uplink's transaction, COMMIT,
//!                then metrics and AlertEvents (src/alerts)
//! ```
//!
//! # Layout
//!
//! - [`expr`]: the expression language — nom parser, compiled form, evaluation;
//! - [`template`]: summaries with `{device}`, `{field}`, `{$param}`, `{value}`;
//! - [`engine`]: a profile's [`engine::RuleSet`] and one device's condition-rule state;
//! - [`state`]: a shard's [`state::ShardRules`]: devices, compiled sets, silence timers.
//!
//! # Semantics
//!
//! **Condition rules** (`expr`) are evaluated on every reading of a device, in the order
//! the device sent them, against the reading's fields and the device's `$params`:
//! inactive → pending (the condition holds) → firing (it has held for `for`) → resolved
//! (`clear` holds; without `clear`, the condition no longer holds). Without `for`, a rule
//! fires on the first reading where the condition holds. A pending rule whose condition
//! stops holding is resolved without ever having fired (`starts_ms` is None). A pending
//! rule is promoted on a reading: the first one, at least `for` after the condition
//! started to hold, on which it still holds (no timer promotes it between readings).
//!
//! **The rule clock** is the reading's time as stored: the device's own clock when the
//! payload carries a plausible one, else the receive time. So buffered readings (several
//! samples in one uplink, a backlog after a coverage gap) are judged at the times they were
//! taken, and `for` and the `delta`/`rate` windows measure the device's time. It never runs
//! ahead of the receive time. A reading older than the device's last one (a register the
//! device stored earlier, such as a wM-Bus meter's set-date value, or a backlog sent out of
//! order) only joins the `delta`/`rate` history: the states have moved past it.
//!
//! **Missing fields** make a condition unknown unless the rest decides it (three-valued
//! logic: `false and unknown` is false, `true or unknown` is true). An unknown condition
//! changes nothing: the rule keeps its state, and a pending rule's `for` keeps counting.
//! **A missing `$param`** (or a field of the wrong type) is an error: the rule is not
//! evaluated on that reading, `nbiot_alert_rule_errors_total{profile,rule,reason}` counts
//! it, and it is logged once per device and rule.
//!
//! **`delta(field, window)`** is the field's value now minus its value at the newest
//! reading at least `window` older (the baseline); **`rate`** divides that by the seconds
//! between the two. Unknown until the device's history reaches back that far. The history
//! is kept per device only for profiles that use these functions, bounded by the longest
//! window and 64 samples per field; after a restart it is rebuilt from the stored readings
//! on the device's first reading.
//!
//! **Inactive rules** (`kind = "inactive"`, `after = "3x"` report intervals or a
//! duration) fire when a device has sent nothing for `after`, at the deadline (receive
//! time: last uplink + `after`), and resolve on its next uplink, decodable or not. See
//! [`state`] for the timers and what happens at start.
//!
//! **Persistence.** Transitions are committed with the uplink that caused them
//! (`alert_transitions`, and `alert_state` holds what is pending or firing); inactive-rule
//! transitions in a commit of their own. At start the pipeline loads `alert_state` into the
//! shards, so `for` keeps counting from when the condition started and firing alerts stay
//! firing; rules or devices that disappeared meanwhile are resolved then.

pub mod engine;
pub mod expr;
pub mod state;
pub mod template;

use std::sync::Arc;

pub use engine::{CompileError, RulePart, RuleSet};
pub use state::ShardRules;

use crate::alerts::AlertState;
use crate::profiles::Severity;
use crate::registry::Device;

/// A change of an alert's state, decided by a shard and written by the store writer.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub device: Arc<Device>,
    pub profile: Arc<str>,
    pub rule: Arc<str>,
    pub severity: Severity,
    pub state: AlertState,
    /// When it happened (rule clock for condition rules, the deadline or the uplink's
    /// receive time for inactive rules), ms since the Unix epoch.
    pub at_ms: i64,
    /// Since when the condition has held (or the device has been silent).
    pub since_ms: i64,
    /// When the alert started firing; None while pending, and for a pending rule that
    /// resolved without firing.
    pub starts_ms: Option<i64>,
    /// The value that decided it (see [`template`]).
    pub value: Option<f64>,
    pub summary: String,
    /// Receive time of the uplink that caused it (None: a timer did).
    pub received_at_ms: Option<i64>,
    /// +1 when the device became silent with this transition, -1 when it stopped being
    /// silent, else 0 (for `nbiot_devices_silent`).
    pub silent: i8,
}
