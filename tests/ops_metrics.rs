//! `GET /metrics` of the real gateway binary under load, checked the way Prometheus' own
//! tooling checks it: the real `promtool check metrics` must find no problem, every series
//! has the label set the README's metrics table promises, label values come from closed
//! sets (no device id, IMEI, topic or address), histograms have the buckets chosen for them,
//! and the values moved with what the test sent.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const CJT188_REPLY: &str = "68104433221100337881161f9000007766552c007766552c3101221105152021841316";
const METER: &str = "78330011223344";
/// Milesight EM300-TH NB-IoT frame of this IMEI (see tests/ingest_e2e.rs).
const EM300_TH_NB: &str = "020001006200001401303132303031303036313338423232303535393131303033383639393531303430323933333631343630313133313132303632393331383938363131323032323030313332323838393309002a01755bff023c000367fe000468780367ff000468780367fe000468780367ff000468780367fe00046879";
const EM300_IMEI: &str = "869951040293361";

fn hex(s: &str) -> Vec<u8> {
    nbiot_codecs::hex::decode(s.as_bytes()).expect("hex")
}

/// `promtool check metrics` on `text` (stdin): (exit success, everything it printed).
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian prometheus; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool exits");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Label names (besides `le`) of families the README documents, as it documents them.
/// Every other family is still held to the closed-set rule below.
const LABELS: &[(&str, &[&str])] = &[
    ("nbiot_uplinks_received_total", &["protocol"]),
    ("nbiot_uplinks_rejected_total", &["protocol", "reason"]),
    ("nbiot_uplinks_duplicate_total", &["protocol"]),
    ("nbiot_uplinks_stored_total", &["protocol"]),
    ("nbiot_datagrams_dropped_total", &["reason"]),
    ("nbiot_decode_errors_total", &["code", "profile"]),
    ("nbiot_readings_stored_total", &["profile"]),
    ("nbiot_uplinks_decoded_total", &["profile"]),
    ("nbiot_sequence_gaps_total", &["profile"]),
    ("nbiot_store_commit_duration_seconds", &[]),
    ("nbiot_store_commit_batch_uplinks", &[]),
    ("nbiot_store_checkpoint_duration_seconds", &[]),
    ("nbiot_store_wal_uncheckpointed_pages", &[]),
    ("nbiot_decode_duration_seconds", &["codec"]),
    ("nbiot_ingest_duration_seconds", &["protocol"]),
    ("nbiot_pipeline_queue_uplinks", &[]),
    ("nbiot_store_pruned_rows_total", &["table"]),
    ("nbiot_devices_registered", &["profile"]),
    ("nbiot_mqtt_connected", &[]),
    ("nbiot_mqtt_reconnects_total", &[]),
    ("nbiot_mqtt_inflight_messages", &[]),
    ("nbiot_build_info", &["version"]),
    ("nbiot_forward_points_total", &["result"]),
    ("nbiot_forward_backlog_points", &[]),
    ("nbiot_forward_backlog_age_seconds", &[]),
    ("nbiot_forward_healthy", &[]),
    ("nbiot_forward_write_duration_seconds", &[]),
    ("nbiot_alertmanager_up", &[]),
    ("process_cpu_seconds_total", &[]),
    ("process_resident_memory_bytes", &[]),
    ("process_open_fds", &[]),
    ("process_max_fds", &[]),
    ("process_start_time_seconds", &[]),
];

/// Every label name any gateway metric may carry: each has a closed set of values.
const CLOSED_LABELS: &[&str] = &[
    "protocol", "reason", "profile", "code", "codec", "rule", "severity", "state", "stage",
    "result", "table", "version", "le",
];

/// The family a sample belongs to: a histogram's `_bucket`, `_sum` and `_count` series
/// belong to the histogram (`histograms`: the families typed `histogram`).
fn family<'a>(name: &'a str, histograms: &BTreeSet<&str>) -> &'a str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|base| histograms.contains(base))
        .unwrap_or(name)
}

#[test]
fn metrics_under_load_pass_promtool_and_carry_closed_label_sets() {
    let dir = TempDir::new("metrics");
    // Every stage on: MQTT, forwarding to a real VictoriaMetrics, and an Alertmanager URL
    // (nothing listens there: the push metrics exist either way).
    let (_vm, vm) = victoria_metrics(&dir);
    let config = config(
        &dir,
        &format!(
            "[mqtt]\nmode = \"embedded\"\nlisten = \"127.0.0.1:0\"\n\
             [influxdb]\nurl = \"http://{vm}\"\norg = \"city\"\nbucket = \"nbiot\"\n\
             flush_interval = \"100ms\"\n\
             [alertmanager]\nurl = \"http://127.0.0.1:{}\"\n",
            free_port()
        ),
    );
    let gw = Gateway::start(&config, &[], &[]);

    // Registry changes the devices_registered gauge must follow.
    gw.devices(&["add", METER, "--profile", "cjt188-water-meter"], None);
    gw.devices(
        &["add", EM300_IMEI, "--profile", "milesight-em300-th-nb"],
        None,
    );
    gw.devices(
        &["add", "78330011229999", "--profile", "dragino-ndds75"],
        None,
    );
    gw.devices(&["remove", "78330011229999"], None);

    // Load: 100 devices (registered by CSV import) sending CON uplinks over CoAP.
    let summary = load(&gw, 100, 1000, 2.0, &["--register"]);
    let acked = summary["codes"]["2.04"].as_u64().unwrap_or(0);
    assert!(acked >= 1000, "{summary}");

    // Failures, each a labelled series: a payload that does not decode (stored raw, 4.00),
    // an unknown device (4.04), and one MQTT uplink through the embedded broker.
    let out = coap_post(&dir, &gw.coap, METER, &hex("68aa"));
    assert!(out.contains("4.00"), "{out}");
    let out = coap_post(&dir, &gw.coap, "99999999", &hex(CJT188_REPLY));
    assert!(out.contains("4.04"), "{out}");
    let frame = dir.path("th.bin");
    std::fs::write(&frame, hex(EM300_TH_NB)).expect("write frame");
    let port = gw.mqtt.rsplit(':').next().expect("mqtt port").to_owned();
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-q", "1"])
        .args(["-t", &format!("nbiot/{EM300_IMEI}/up"), "-f"])
        .arg(&frame)
        .status()
        .expect("mosquitto_pub runs");
    assert!(status.success());

    let (text, samples) = wait_for("the uplinks to show in /metrics", DEADLINE, || {
        let text = gw.metrics();
        let samples = parse_exposition(&text);
        let mqtt = value(
            &samples,
            "nbiot_uplinks_stored_total",
            &[("protocol", "mqtt")],
        );
        let errors = value(
            &samples,
            "nbiot_decode_errors_total",
            &[("profile", "cjt188-water-meter")],
        );
        let forwarded = value(&samples, "nbiot_forward_points_total", &[("result", "ok")]);
        (mqtt == Some(1.0) && errors == Some(1.0) && forwarded >= Some(6.0))
            .then_some((text, samples))
    });

    // 1. Prometheus' linter has nothing to say.
    let (ok, out) = promtool_check(&text);
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}"
    );

    // 2. Every family has HELP and TYPE; gateway metrics are nbiot_*, plus process_*.
    let histograms: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .collect();
    let family = |name| family(name, &histograms);
    let families: BTreeSet<&str> = samples.iter().map(|s| family(&s.name)).collect();
    for f in &families {
        assert!(
            f.starts_with("nbiot_") || f.starts_with("process_"),
            "unexpected family {f}"
        );
        assert!(text.contains(&format!("# HELP {f} ")), "no HELP for {f}");
        assert!(text.contains(&format!("# TYPE {f} ")), "no TYPE for {f}");
    }

    // 3. The label sets the README documents, exactly.
    for (name, labels) in LABELS {
        let series: Vec<&Sample> = samples
            .iter()
            .filter(|s| family(&s.name) == *name)
            .collect();
        assert!(!series.is_empty(), "{name} is missing");
        for s in series {
            let got: Vec<&str> = s.label_names().into_iter().filter(|l| *l != "le").collect();
            assert_eq!(got, *labels, "labels of {s:?}");
        }
    }

    // 4. No label is a device id, IMEI, topic or address: only closed-set label names, and
    //    no value that names a device or a peer.
    let device_ids = [METER, EM300_IMEI, "99999999", "78330011229999"];
    for s in &samples {
        for (k, v) in &s.labels {
            assert!(CLOSED_LABELS.contains(&k.as_str()), "label {k} on {s:?}");
            assert!(
                !v.contains("127.0.0.1") && !v.contains('/') && !device_ids.contains(&v.as_str()),
                "label value {v} on {s:?}"
            );
            assert!(
                !(v.len() >= 14 && v.bytes().all(|b| b.is_ascii_digit())),
                "an IMEI-like label value {v} on {s:?}"
            );
        }
    }

    // 5. Values moved with what was sent.
    let v = |name: &str, labels: &[(&str, &str)]| {
        value(&samples, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing"))
    };
    assert!(v("nbiot_uplinks_received_total", &[("protocol", "coap")]) >= acked as f64 + 2.0);
    assert!(v("nbiot_uplinks_stored_total", &[("protocol", "coap")]) >= acked as f64 + 1.0);
    assert_eq!(
        v("nbiot_uplinks_received_total", &[("protocol", "mqtt")]),
        1.0
    );
    // One request, counted once (by the pipeline's shard, not again by the CoAP source).
    let unknown = v(
        "nbiot_uplinks_rejected_total",
        &[("protocol", "coap"), ("reason", "unknown_device")],
    );
    assert_eq!(unknown, 1.0);
    // Alert series exist from the start at 0 (no "no data" on dashboards): the meter's
    // offline rule has not fired, and nothing is silent yet.
    assert_eq!(
        v(
            "nbiot_alerts_firing",
            &[
                ("profile", "cjt188-water-meter"),
                ("rule", "offline"),
                ("severity", "warning")
            ]
        ),
        0.0
    );
    assert_eq!(
        v("nbiot_devices_silent", &[("profile", "cjt188-water-meter")]),
        0.0
    );
    assert_eq!(
        v(
            "nbiot_decode_errors_total",
            &[("profile", "cjt188-water-meter"), ("code", "truncated")]
        ),
        1.0,
        "the decode error is labelled with its code:\n{text}"
    );
    // The load tool's EM300-TH frame carries six readings per uplink; plus the MQTT one.
    assert!(
        v(
            "nbiot_readings_stored_total",
            &[("profile", "milesight-em300-th-nb")]
        ) >= 6.0 * (acked as f64 + 1.0)
    );
    assert!(
        v(
            "nbiot_uplinks_decoded_total",
            &[("profile", "milesight-em300-th-nb")]
        ) >= acked as f64 + 1.0
    );
    assert!(v("nbiot_forward_write_duration_seconds_count", &[]) >= 1.0);
    assert!(
        v(
            "nbiot_ingest_duration_seconds_count",
            &[("protocol", "coap")]
        ) >= acked as f64
    );
    assert!(
        v(
            "nbiot_decode_duration_seconds_count",
            &[("codec", "milesight")]
        ) >= acked as f64
    );
    assert!(v("nbiot_store_commit_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(v("nbiot_mqtt_connected", &[]), 1.0);
    assert_eq!(
        v(
            "nbiot_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(v("process_resident_memory_bytes", &[]) > 1e6);
    assert!(v("process_open_fds", &[]) >= 3.0);
    assert!(v("process_cpu_seconds_total", &[]) > 0.0);

    // 6. Devices per profile: current after add, remove and CSV import; every loaded
    //    profile present (0 without devices), a profile whose last device left reads 0.
    let registered: BTreeMap<&str, f64> = samples
        .iter()
        .filter(|s| s.name == "nbiot_devices_registered")
        .map(|s| (s.label("profile").unwrap_or_default(), s.value))
        .collect();
    assert_eq!(registered.get("milesight-em300-th-nb"), Some(&101.0));
    assert_eq!(registered.get("cjt188-water-meter"), Some(&1.0));
    assert_eq!(registered.get("dragino-ndds75"), Some(&0.0));
    let (status, body) = gw.get("/api/v1/profiles");
    assert_eq!(status, 200, "{body}");
    let loaded: serde_json::Value = serde_json::from_str(&body).expect("profiles JSON");
    let loaded: BTreeSet<&str> = loaded
        .as_array()
        .or_else(|| loaded["profiles"].as_array())
        .expect("a list of profiles")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(loaded.len() > 10, "{loaded:?}");
    assert_eq!(
        registered.keys().copied().collect::<BTreeSet<_>>(),
        loaded,
        "one series per loaded profile"
    );

    // 7. Histograms have exactly the buckets chosen for them.
    for (name, bounds) in nbiot_gateway::telemetry::metrics::BUCKETS {
        let les: BTreeSet<String> = samples
            .iter()
            .filter(|s| s.name == format!("{name}_bucket"))
            .filter_map(|s| s.label("le").map(str::to_owned))
            .collect();
        if les.is_empty() {
            continue; // a stage this configuration does not run (forwarder, Alertmanager)
        }
        let mut want: BTreeSet<String> = bounds
            .iter()
            .map(|b| {
                les.iter()
                    .find(|le| le.parse::<f64>().ok() == Some(*b))
                    .cloned()
                    .unwrap_or_else(|| format!("missing {b}"))
            })
            .collect();
        want.insert("+Inf".to_owned());
        assert_eq!(les, want, "buckets of {name}");
    }

    // The registry gauge follows a removal without any scrape-time walk.
    gw.devices(&["remove", METER], None);
    wait_for("cjt188 devices to read 0", Duration::from_secs(10), || {
        let s = parse_exposition(&gw.metrics());
        (value(
            &s,
            "nbiot_devices_registered",
            &[("profile", "cjt188-water-meter")],
        ) == Some(0.0))
        .then_some(())
    });
}
