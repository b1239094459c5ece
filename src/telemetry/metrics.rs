//! Every metric the gateway exports: names, help text and label sets, in one place.
//!
//! Names follow Prometheus conventions (`nbiot_` prefix, base units, `_total` for counters).
//! Label values come from closed sets (protocol, profile, codec, rule, severity, reason,
//! stage, code) — never a device id, IMEI, topic or peer address. Hot paths create their
//! handles once (`metrics::counter!(NAME, labels)` returns a handle to keep), not per event.
//!
//! [`install`] sets the recorder up (histogram buckets per metric, chosen for each one's
//! range) and starts its upkeep; [`render`] is what `GET /metrics` serves: the recorder's
//! text plus the standard `process_*` metrics (see [`super::process`]). The README's
//! "Operations" section has the table of every metric, and `ops/prometheus/` the alerting
//! rules written against these names: a rename here is a breaking change for operators.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const UPLINKS_RECEIVED: &str = "nbiot_uplinks_received_total";
pub const UPLINKS_REJECTED: &str = "nbiot_uplinks_rejected_total";
pub const UPLINKS_DUPLICATE: &str = "nbiot_uplinks_duplicate_total";
pub const DATAGRAMS_DROPPED: &str = "nbiot_datagrams_dropped_total";
pub const DECODE_ERRORS: &str = "nbiot_decode_errors_total";
pub const READINGS_STORED: &str = "nbiot_readings_stored_total";
pub const UPLINKS_STORED: &str = "nbiot_uplinks_stored_total";
/// Uplinks whose payload decoded, by profile: with [`DECODE_ERRORS`] the denominator of the
/// decode-error ratio per profile (readings are no denominator: one uplink may carry many).
pub const UPLINKS_DECODED: &str = "nbiot_uplinks_decoded_total";
pub const STORE_COMMIT_DURATION: &str = "nbiot_store_commit_duration_seconds";
pub const STORE_COMMIT_BATCH: &str = "nbiot_store_commit_batch_uplinks";
pub const STORE_WAL_FRAMES: &str = "nbiot_store_wal_uncheckpointed_pages";
pub const STORE_CHECKPOINT_DURATION: &str = "nbiot_store_checkpoint_duration_seconds";
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
/// Always 1, with the gateway's `version` as a label (joins and "which version runs where").
pub const BUILD_INFO: &str = "nbiot_build_info";

// --- coap (src/sources/coap/) ---
/// Datagrams the kernel dropped because the UDP receive buffer was full (from
/// /proc/net/udp; Linux only), by `protocol` (coap).
pub const UDP_RECEIVE_DROPS: &str = "nbiot_udp_receive_drops_total";

// --- forwarder (src/forward/) ---
// FORWARD_POINTS{result = ok | dead_letter}; FORWARD_BACKLOG = committed rows after the
// cursor (max(id) - cursor of readings and alert_transitions).
/// Write requests to the TSDB, by `result` ([`forward_result`]).
pub const FORWARD_REQUESTS: &str = "nbiot_forward_requests_total";
/// Write requests that will be sent again, by `reason` ([`forward_retry`]).
pub const FORWARD_RETRIES: &str = "nbiot_forward_retries_total";
/// Duration of one write request (sent to answered).
pub const FORWARD_WRITE_DURATION: &str = "nbiot_forward_write_duration_seconds";
/// Age of the oldest committed point not yet forwarded (0 when none).
pub const FORWARD_BACKLOG_AGE: &str = "nbiot_forward_backlog_age_seconds";
/// 1 while the forwarder delivers (or has nothing to deliver), 0 while it is failing.
pub const FORWARD_HEALTHY: &str = "nbiot_forward_healthy";
/// Rows in the dead-letter table (a gauge: they stay until an operator deals with them);
/// each row moved there is also counted in FORWARD_POINTS{result="dead_letter"}.
pub const FORWARD_DEAD_LETTERS: &str = "nbiot_forward_dead_letters";

/// Values of the `result` label of [`FORWARD_REQUESTS`].
pub mod forward_result {
    /// 204: stored.
    pub const OK: &str = "ok";
    /// No answer, 408, 5xx, 429: sent again after a backoff.
    pub const RETRY: &str = "retry";
    /// 413: split.
    pub const TOO_LARGE: &str = "too_large";
    /// 400: bisected / dead-lettered.
    pub const BAD_REQUEST: &str = "bad_request";
    /// 422: partial write.
    pub const PARTIAL: &str = "partial";
    /// 401/403/404 or anything unexpected: kept, retried slowly, operator alerted.
    pub const REFUSED: &str = "refused";
    pub const ALL: &[&str] = &[OK, RETRY, TOO_LARGE, BAD_REQUEST, PARTIAL, REFUSED];
}

/// Values of the `reason` label of [`FORWARD_RETRIES`].
pub mod forward_retry {
    pub const ALL: &[&str] = &[
        "connect",
        "timeout",
        "transport",
        "server_error",
        "throttled",
        "refused",
    ];
}

// --- alert rules (src/rules/) and delivery (src/alerts/) ---
/// POSTs to Alertmanager, by `result` (ok | error: retried | rejected: a 4xx, dropped).
pub const ALERT_PUSHES: &str = "nbiot_alertmanager_pushes_total";
/// 1 while Alertmanager accepts our pushes (or none is configured), else 0.
pub const ALERT_PUSH_HEALTHY: &str = "nbiot_alertmanager_up";
/// Receipt of the uplink that caused a transition → the Alertmanager POST carrying it, by severity.
pub const ALERT_PUSH_LATENCY: &str = "nbiot_alert_push_latency_seconds";
/// Alert events the notifier's queue had no room for (it then reloads from the store).
pub const ALERT_EVENTS_DROPPED: &str = "nbiot_alert_events_dropped_total";
/// Reloads of the notifier's firing set from the store, by `reason` (start | overflow).
pub const ALERT_RELOADS: &str = "nbiot_alert_notifier_reloads_total";
/// Alert rules not evaluated on a reading, by `profile`, `rule` and `reason` (missing_param:
/// the device lacks a `$param` the rule needs | type: a field of an unexpected type).
pub const ALERT_RULE_ERRORS: &str = "nbiot_alert_rule_errors_total";

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
    describe_counter!(
        UPLINKS_DECODED,
        "Uplinks committed with their payload decoded, by profile."
    );
    describe_histogram!(
        STORE_COMMIT_DURATION,
        Unit::Seconds,
        "Duration of one group commit to the store."
    );
    describe_histogram!(STORE_COMMIT_BATCH, Unit::Count, "Uplinks per group commit.");
    describe_gauge!(
        STORE_WAL_FRAMES,
        Unit::Count,
        "Pages in the store's write-ahead log not yet copied into the database file."
    );
    describe_histogram!(
        STORE_CHECKPOINT_DURATION,
        Unit::Seconds,
        "Duration of one background WAL checkpoint (copy into the database file + fsync)."
    );
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
    describe_counter!(
        FORWARD_POINTS,
        "Points settled with the TSDB, by result (ok: stored; dead_letter: kept in the dead-letter table)."
    );
    describe_gauge!(
        FORWARD_BACKLOG,
        Unit::Count,
        "Committed points not yet forwarded to the TSDB."
    );
    describe_counter!(
        FORWARD_REQUESTS,
        "Write requests to the TSDB, by result (ok, retry, too_large, bad_request, partial, refused)."
    );
    describe_counter!(
        FORWARD_RETRIES,
        "Write requests to be sent again, by reason (connect, timeout, transport, server_error, throttled, refused)."
    );
    describe_histogram!(
        FORWARD_WRITE_DURATION,
        Unit::Seconds,
        "Duration of one write request to the TSDB, sent to answered."
    );
    describe_gauge!(
        FORWARD_BACKLOG_AGE,
        Unit::Seconds,
        "Age of the oldest committed point not yet forwarded (0 when none)."
    );
    describe_gauge!(
        FORWARD_HEALTHY,
        "1 while the TSDB takes the forwarder's writes (or there is nothing to write), else 0."
    );
    describe_gauge!(
        FORWARD_DEAD_LETTERS,
        Unit::Count,
        "Rows in the dead-letter table: refused by the TSDB for good, awaiting an operator."
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
        UDP_RECEIVE_DROPS,
        "UDP datagrams the kernel dropped because the receive buffer was full, by protocol."
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
    // --- alert delivery (src/alerts/) ---
    describe_counter!(
        ALERT_PUSHES,
        "POSTs to Alertmanager, by result (ok | error: retried | rejected: a 4xx, dropped)."
    );
    describe_gauge!(
        ALERT_PUSH_HEALTHY,
        "1 while Alertmanager accepts our pushes (or none is configured), else 0."
    );
    describe_histogram!(
        ALERT_PUSH_LATENCY,
        Unit::Seconds,
        "Receipt of the uplink behind an alert transition to the Alertmanager POST that delivered it, by severity."
    );
    describe_counter!(
        ALERT_EVENTS_DROPPED,
        "Alert events the notifier's queue had no room for (the notifier then reloads from the store)."
    );
    describe_counter!(
        ALERT_RELOADS,
        "Reloads of the Alertmanager notifier's alerts from the store, by reason (start | overflow)."
    );
    // --- alert rules (src/rules/) ---
    describe_counter!(
        ALERT_RULE_ERRORS,
        "Alert rules not evaluated on a reading, by profile, rule and reason (missing_param | type)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label names the running gateway build."
    );
}

/// How often the recorder is upkept without a scrape. Histogram samples wait in a lock-free
/// buffer until a render or an upkeep folds them into the buckets: without this a gateway
/// nobody scrapes would keep every sample (at 20k uplinks/s, several MB a minute).
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Bucket upper bounds (seconds or counts) per histogram, each chosen for its range.
/// Every threshold a shipped rule compares a quantile with is a bucket bound here.
pub const BUCKETS: &[(&str, &[f64])] = &[
    // Group commits: tens of microseconds (no fsync) to a slow disk's seconds. 0.1 and 1 are
    // the shipped rules' thresholds; 2 is CoAP's ACK_TIMEOUT, past which devices retransmit.
    (
        STORE_COMMIT_DURATION,
        &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
        ],
    ),
    // Uplinks per commit: 1 when idle, up to the writer's batch cap (1000) under load.
    (
        STORE_COMMIT_BATCH,
        &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
    ),
    // Background checkpoints: nothing to copy (microseconds) to a burst's seconds.
    (
        STORE_CHECKPOINT_DURATION,
        &[
            0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
        ],
    ),
    // Decodes: hundreds of nanoseconds (release build) to a pathological millisecond.
    (
        DECODE_DURATION,
        &[1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 1e-5, 5e-5, 1e-4, 1e-3],
    ),
    // Receipt to commit: the group-commit interval (5 ms) plus the commit; 2 s is CoAP's
    // ACK_TIMEOUT (RFC 7252 §4.8): an ack later than that crosses a retransmission.
    (
        INGEST_DURATION,
        &[
            0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
        ],
    ),
    // One write request to the TSDB: milliseconds on a LAN to a 30 s client timeout.
    (
        FORWARD_WRITE_DURATION,
        &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ],
    ),
    // Receipt to Alertmanager POST: milliseconds for critical alerts (pushed at once), up to
    // a batch interval or a retry after an Alertmanager outage for the rest.
    (
        ALERT_PUSH_LATENCY,
        &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ],
    ),
];

/// Installs the Prometheus recorder and returns the handle `/metrics` renders from; starts
/// a thread that upkeeps it (see [`UPKEEP_INTERVAL`]). Fails when a recorder is already
/// installed in this process.
pub fn install(
) -> Result<metrics_exporter_prometheus::PrometheusHandle, metrics_exporter_prometheus::BuildError>
{
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in BUCKETS {
        builder = builder.set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)?;
    }
    let handle = builder.install_recorder()?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    super::process::started();
    let upkeep = handle.clone();
    // Detached on purpose: it lives as long as the recorder, which is the process.
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "Cannot start the metrics upkeep thread; histograms are folded at scrape time only.");
    }
    Ok(handle)
}

/// The text `GET /metrics` serves: every recorded metric, then the `process_*` metrics.
pub fn render(handle: &metrics_exporter_prometheus::PrometheusHandle) -> String {
    let mut text = handle.render();
    super::process::render(&mut text);
    text
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
