//! Every metric the gateway exports: names, help text and label sets, in one place.
//!
//! Names follow Prometheus conventions (`nbiot_` prefix, base units, `_total` for counters).
//! Label values come from closed sets (protocol, profile, codec, rule, severity, reason,
//! stage, code) — never a device id, IMEI, topic or peer address. Hot paths create their
//! handles once (`metrics::counter!(NAME, labels)` returns a handle to keep), not per event.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const UPLINKS_RECEIVED: &str = "nbiot_uplinks_received_total";
pub const UPLINKS_REJECTED: &str = "nbiot_uplinks_rejected_total";
pub const UPLINKS_DUPLICATE: &str = "nbiot_uplinks_duplicate_total";
pub const DATAGRAMS_DROPPED: &str = "nbiot_datagrams_dropped_total";
pub const DECODE_ERRORS: &str = "nbiot_decode_errors_total";
pub const READINGS_STORED: &str = "nbiot_readings_stored_total";
pub const UPLINKS_STORED: &str = "nbiot_uplinks_stored_total";
pub const STORE_COMMIT_DURATION: &str = "nbiot_store_commit_duration_seconds";
pub const STORE_COMMIT_BATCH: &str = "nbiot_store_commit_batch_uplinks";
pub const DECODE_DURATION: &str = "nbiot_decode_duration_seconds";
pub const INGEST_DURATION: &str = "nbiot_ingest_duration_seconds";
pub const PIPELINE_QUEUE: &str = "nbiot_pipeline_queue_uplinks";
pub const SEQUENCE_GAPS: &str = "nbiot_sequence_gaps_total";
pub const FORWARD_POINTS: &str = "nbiot_forward_points_total";
pub const FORWARD_BACKLOG: &str = "nbiot_forward_backlog_points";
pub const ALERTS_FIRING: &str = "nbiot_alerts_firing";
pub const ALERT_TRANSITIONS: &str = "nbiot_alert_transitions_total";
pub const DEVICES_REGISTERED: &str = "nbiot_devices_registered";
pub const DEVICES_SILENT: &str = "nbiot_devices_silent";
/// Rows deleted by retention, by `table` (`uplinks` | `readings`).
pub const STORE_PRUNED: &str = "nbiot_store_pruned_rows_total";
pub const MQTT_CONNECTED: &str = "nbiot_mqtt_connected";
pub const MQTT_RECONNECTS: &str = "nbiot_mqtt_reconnects_total";
pub const MQTT_INFLIGHT: &str = "nbiot_mqtt_inflight_messages";

// --- forwarder (src/forward/) ---
/// Write requests to the TSDB, by `result` (ok | retry | too_large | bad_request | partial | auth).
pub const FORWARD_REQUESTS: &str = "nbiot_forward_requests_total";
/// Duration of one write request (sent to answered).
pub const FORWARD_WRITE_DURATION: &str = "nbiot_forward_write_duration_seconds";
/// Age of the oldest committed point not yet forwarded (0 when none).
pub const FORWARD_BACKLOG_AGE: &str = "nbiot_forward_backlog_age_seconds";
/// 1 while the forwarder delivers (or has nothing to deliver), 0 while it is failing.
pub const FORWARD_HEALTHY: &str = "nbiot_forward_healthy";
/// Points moved to the dead-letter table (also counted in FORWARD_POINTS{result="dead_letter"}).
pub const FORWARD_DEAD_LETTERS: &str = "nbiot_forward_dead_letters";

// --- alert rules (src/rules/) and delivery (src/alerts/) ---
/// POSTs to Alertmanager, by `result` (ok | error).
pub const ALERT_PUSHES: &str = "nbiot_alertmanager_pushes_total";
/// 1 while Alertmanager accepts our pushes (or none is configured), else 0.
pub const ALERT_PUSH_HEALTHY: &str = "nbiot_alertmanager_up";
/// Receipt of the uplink that caused a transition → the Alertmanager POST carrying it, by severity.
pub const ALERT_PUSH_LATENCY: &str = "nbiot_alert_push_latency_seconds";
/// Alert events the notifier's queue had no room for (it then reloads from the store).
pub const ALERT_EVENTS_DROPPED: &str = "nbiot_alert_events_dropped_total";

/// Values of the `reason` label of [`UPLINKS_REJECTED`].
pub mod reason {
    pub const UNKNOWN_DEVICE: &str = "unknown_device";
    pub const BAD_TOKEN: &str = "bad_token";
    pub const NO_PROFILE: &str = "no_profile";
    pub const OVERLOADED: &str = "overloaded";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const TOO_LARGE: &str = "too_large";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const NOT_FOUND: &str = "not_found";
    pub const METHOD: &str = "method_not_allowed";
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// An MQTT message whose topic matches no configured topic template.
    pub const UNMATCHED_TOPIC: &str = "unmatched_topic";
    /// CoAP 4.15: a Content-Format other than application/octet-stream.
    pub const UNSUPPORTED_FORMAT: &str = "unsupported_content_format";
    /// CoAP 4.08: a Block1 upload with a block missing or out of order.
    pub const INCOMPLETE: &str = "incomplete";
}

/// Registers help text and units for every metric (call once at start).
pub fn describe() {
    describe_counter!(UPLINKS_RECEIVED, "Uplinks received, by protocol.");
    describe_counter!(
        UPLINKS_REJECTED,
        "Uplinks refused without being stored, by protocol and reason."
    );
    describe_counter!(
        UPLINKS_DUPLICATE,
        "Retransmitted uplinks recognised and not processed again, by protocol."
    );
    describe_counter!(
        DATAGRAMS_DROPPED,
        "UDP datagrams dropped unanswered (not CoAP, truncated), by reason."
    );
    describe_counter!(
        DECODE_ERRORS,
        "Uplinks stored raw because their payload did not decode, by profile and error code."
    );
    describe_counter!(
        READINGS_STORED,
        "Decoded readings committed to the store, by profile."
    );
    describe_counter!(
        UPLINKS_STORED,
        "Uplinks committed to the store (decoded or raw), by protocol."
    );
    describe_histogram!(
        STORE_COMMIT_DURATION,
        Unit::Seconds,
        "Duration of one group commit to the store."
    );
    describe_histogram!(STORE_COMMIT_BATCH, Unit::Count, "Uplinks per group commit.");
    describe_histogram!(
        DECODE_DURATION,
        Unit::Seconds,
        "Payload decode duration, by codec."
    );
    describe_histogram!(
        INGEST_DURATION,
        Unit::Seconds,
        "Time from receipt to durable commit, by protocol."
    );
    describe_gauge!(
        PIPELINE_QUEUE,
        Unit::Count,
        "Uplinks queued in the pipeline awaiting processing."
    );
    describe_counter!(
        SEQUENCE_GAPS,
        "Frames missing according to device frame counters, by profile."
    );
    describe_counter!(FORWARD_POINTS, "Points forwarded to the TSDB, by result.");
    describe_gauge!(
        FORWARD_BACKLOG,
        Unit::Count,
        "Committed points not yet forwarded to the TSDB."
    );
    describe_gauge!(
        ALERTS_FIRING,
        Unit::Count,
        "Alerts currently firing, by profile, rule and severity."
    );
    describe_counter!(
        ALERT_TRANSITIONS,
        "Alert state transitions, by profile, rule and state."
    );
    describe_gauge!(
        DEVICES_REGISTERED,
        Unit::Count,
        "Registered devices, by profile."
    );
    describe_gauge!(
        DEVICES_SILENT,
        Unit::Count,
        "Registered devices past their offline threshold, by profile."
    );
    describe_counter!(
        STORE_PRUNED,
        "Rows deleted by retention (older than [store] retention), by table."
    );
    describe_gauge!(
        MQTT_CONNECTED,
        "1 while the MQTT source is connected to its broker, else 0."
    );
    describe_counter!(
        MQTT_RECONNECTS,
        "Connections to the MQTT broker after the first (after a lost connection or a pause)."
    );
    describe_gauge!(
        MQTT_INFLIGHT,
        Unit::Count,
        "MQTT messages received and not yet acknowledged or handed to the pipeline."
    );
}

/// Installs the Prometheus recorder and returns the handle `/metrics` renders from.
/// Histogram buckets are chosen per metric for its range.
pub fn install(
) -> Result<metrics_exporter_prometheus::PrometheusHandle, metrics_exporter_prometheus::BuildError>
{
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        // Group commits: tens of microseconds (no fsync) to a slow disk's hundreds of ms.
        .set_buckets_for_metric(
            Matcher::Full(STORE_COMMIT_DURATION.to_owned()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(STORE_COMMIT_BATCH.to_owned()),
            &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
        )?
        // Decodes: hundreds of nanoseconds to a pathological few hundred microseconds.
        .set_buckets_for_metric(
            Matcher::Full(DECODE_DURATION.to_owned()),
            &[1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 1e-5, 1e-4, 1e-3],
        )?
        // Receipt to commit: the group-commit interval dominates (5 ms default).
        .set_buckets_for_metric(
            Matcher::Full(INGEST_DURATION.to_owned()),
            &[
                0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ],
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// Values of the `reason` label of [`DATAGRAMS_DROPPED`].
pub mod drop_reason {
    /// Not a CoAP message: unparsable, version other than 1, a reserved code class, a
    /// malformed empty message.
    pub const NOT_COAP: &str = "not_coap";
    /// Valid CoAP that a server is never sent: ACK, RST, a response, an empty NON.
    pub const UNEXPECTED: &str = "unexpected";
    /// Filled the receive buffer, so possibly cut short by the OS (NON; a CON gets 4.13).
    pub const TRUNCATED: &str = "truncated";
}
