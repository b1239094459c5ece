//! The gateway's logs as an operator's log pipeline sees them, through the real binary:
//! `--log-format json` writes one JSON object per line (fields at the top level), INFO
//! stays lifecycle-only under traffic (nothing per uplink above DEBUG, refusals, decode
//! errors and forwarded batches included), and `RUST_LOG` directives filter by target and
//! level.

mod support;

use support::*;

const METER: &str = "78330011223344";

/// Every line parsed as a JSON object; panics on a line that is not one.
fn json_lines(lines: &[String]) -> Vec<serde_json::Map<String, serde_json::Value>> {
    lines
        .iter()
        .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => panic!("not one JSON object: {l}"),
        })
        .collect()
}

#[test]
fn json_logs_are_one_object_per_line_and_info_does_not_grow_with_traffic() {
    let dir = TempDir::new("jsonlogs");
    // With the forwarder on, so its batches are part of the traffic.
    let (_vm, vm) = victoria_metrics(&dir);
    let config = config(
        &dir,
        &format!(
            "[influxdb]\nurl = \"http://{vm}\"\norg = \"city\"\nbucket = \"nbiot\"\n\
             flush_interval = \"100ms\"\n"
        ),
    );
    let mut gw = Gateway::start(&config, &["--log-format", "json"], &[]);
    gw.devices(&["add", METER, "--profile", "cjt188-water-meter"], None);
    load(&gw, 50, 500, 0.2, &["--register"]);
    let before = gw.lines().len();

    // Traffic of every kind: stored uplinks, retransmission-free load, a decode error, an
    // unknown device.
    let summary = load(&gw, 50, 1000, 1.0, &["--first-sequence", "1000"]);
    assert!(summary["codes"]["2.04"].as_u64() >= Some(900), "{summary}");
    assert!(coap_post(&dir, &gw.coap, METER, &[0x68, 0xaa]).contains("4.00"));
    assert!(coap_post(&dir, &gw.coap, "99999999", &[0x68]).contains("4.04"));
    wait_for("the load's readings to be forwarded", DEADLINE, || {
        let samples = parse_exposition(&gw.metrics());
        let backlog = value(&samples, "nbiot_forward_backlog_points", &[]);
        let errors = value(
            &samples,
            "nbiot_decode_errors_total",
            &[("profile", "cjt188-water-meter")],
        );
        (backlog == Some(0.0) && errors == Some(1.0)).then_some(())
    });
    let during: Vec<String> = gw.lines().split_off(before);
    assert!(
        during.is_empty(),
        "INFO logged per uplink ({} lines for ~1000 uplinks):\n{}",
        during.len(),
        during.join("\n")
    );

    gw.stop();
    let lines = gw.lines();
    let objects = json_lines(&lines);
    for (o, line) in objects.iter().zip(&lines) {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(o.contains_key(key), "{key} missing: {line}");
        }
        assert!(
            ["INFO", "WARN", "ERROR"].contains(&o["level"].as_str().unwrap_or_default()),
            "{line}"
        );
    }
    // Fields sit at the top level, next to the message.
    let running = objects
        .iter()
        .find(|o| o["message"] == "Gateway running.")
        .expect("the start line");
    assert!(
        running["http"].as_str().is_some_and(|h| h == gw.http),
        "{running:?}"
    );
    assert!(objects.iter().any(|o| o["message"] == "Gateway stopped."));
}

#[test]
fn rust_log_filters_by_target_and_level() {
    let dir = TempDir::new("filter");
    let config = config(&dir, "");
    // Everything at DEBUG for the CoAP source only, INFO for `run`, WARN elsewhere.
    let mut gw = Gateway::start(
        &config,
        &[],
        &[(
            "RUST_LOG",
            "warn,nbiot_gateway::run=info,nbiot_gateway::sources::coap=debug",
        )],
    );
    assert!(coap_post(&dir, &gw.coap, "99999999", &[0x68]).contains("4.04"));
    wait_for("the CoAP source's DEBUG line", DEADLINE, || {
        gw.lines()
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("nbiot_gateway::sources::coap"))
            .then_some(())
    });
    gw.stop();
    for line in gw.lines() {
        let allowed = line.contains(" WARN ")
            || line.contains(" ERROR ")
            || (line.contains(" INFO ") && line.contains("nbiot_gateway::run:"))
            || line.contains("nbiot_gateway::sources::coap");
        assert!(allowed, "the filter let through: {line}");
    }
}
