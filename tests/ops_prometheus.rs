//! The shipped alerting rules in a real Prometheus (Debian `prometheus`, started here with
//! its own config, TSDB directory and loopback port) that scrapes a real gateway, which
//! forwards to a real VictoriaMetrics: stopping the TSDB makes `NbiotForwarderUnhealthy`
//! fire, and stopping the gateway makes `NbiotGatewayDown` fire, as Prometheus'
//! `GET /api/v1/alerts` reports them.
//!
//! Prometheus scrapes and evaluates every second. It loads a copy of
//! ops/prometheus/nbiot-gateway.rules.yml in which every `for:` is shortened to 1s (the
//! shipped durations are minutes); the expressions, labels and annotations are the shipped
//! ones, unchanged. The forwarder itself turns unhealthy after 30 s of failed writes.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Milesight EM300-TH NB-IoT frame of this IMEI; its frame counter is bytes 6..8.
const EM300_TH_NB: &str = "020001006200001401303132303031303036313338423232303535393131303033383639393531303430323933333631343630313133313132303632393331383938363131323032323030313332323838393309002a01755bff023c000367fe000468780367ff000468780367fe000468780367ff000468780367fe00046879";
const EM300_IMEI: &str = "869951040293361";

/// The EM300-TH frame with frame counter `seq`: a distinct uplink of six readings.
fn frame(seq: u16) -> Vec<u8> {
    let mut p = nbiot_codecs::hex::decode(EM300_TH_NB.as_bytes()).expect("hex");
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p
}

/// The shipped rules with every `for:` shortened to 1s (see the module docs).
fn rules_for_test(dir: &TempDir) -> std::path::PathBuf {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/prometheus/nbiot-gateway.rules.yml"),
    )
    .expect("read the shipped rules");
    let mut shortened = 0;
    let text: String = shipped
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => {
                shortened += 1;
                format!("{}for: 1s\n", &l[..l.len() - l.trim_start().len()])
            }
            None => format!("{l}\n"),
        })
        .collect();
    assert!(shortened >= 10, "{shortened} `for:` lines");
    let path = dir.path("rules.yml");
    std::fs::write(&path, text).expect("write rules");
    path
}

fn prometheus(dir: &TempDir, gateway_http: &str) -> (Server, String) {
    let port = free_port();
    let config = dir.path("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: nbiot-gateway\n    static_configs:\n      - targets: [\"{gateway_http}\"]\n",
            rules_for_test(dir).display()
        ),
    )
    .expect("write prometheus.yml");
    let child = Command::new("/usr/bin/prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path("prom").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus (Debian prometheus)");
    let addr = format!("127.0.0.1:{port}");
    wait_for("Prometheus to be ready", DEADLINE, || {
        http_get(&addr, "/-/ready").ok().filter(|(s, _)| *s == 200)
    });
    (Server(child), addr)
}

fn get_json(addr: &str, path: &str) -> Value {
    let (status, body) = http_get(addr, path).expect("GET");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// The value of an instant query that returns one sample, if it does.
fn query(prometheus: &str, expr: &str) -> Option<f64> {
    let v = get_json(prometheus, &format!("/api/v1/query?query={}", encode(expr)));
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}

/// Prometheus' alerts named `name`.
fn alerts(prometheus: &str, name: &str) -> Vec<Value> {
    let v = get_json(prometheus, "/api/v1/alerts");
    v["data"]["alerts"]
        .as_array()
        .expect("alerts")
        .iter()
        .filter(|a| a["labels"]["alertname"] == name)
        .cloned()
        .collect()
}

fn wait_firing(prometheus: &str, name: &str, deadline: Duration) -> Value {
    wait_for(&format!("{name} to fire"), deadline, || {
        alerts(prometheus, name)
            .into_iter()
            .find(|a| a["state"] == "firing")
    })
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn shipped_rules_fire_in_prometheus_when_the_tsdb_and_then_the_gateway_stop() {
    let dir = TempDir::new("prometheus");
    let (mut vm, vm_addr) = victoria_metrics(&dir);
    let config = config(
        &dir,
        &format!(
            "[influxdb]\nurl = \"http://{vm_addr}\"\norg = \"city\"\nbucket = \"nbiot\"\n\
             flush_interval = \"100ms\"\n"
        ),
    );
    let mut gw = Gateway::start(&config, &[], &[]);
    let (_prom, prom) = prometheus(&dir, &gw.http);

    // Forwarding works, as Prometheus sees it through the gateway's metrics.
    gw.devices(
        &["add", EM300_IMEI, "--profile", "milesight-em300-th-nb"],
        None,
    );
    let reply = coap_post(&dir, &gw.coap, EM300_IMEI, &frame(1));
    assert!(!reply.contains("4.") && !reply.contains("5."), "{reply}");
    wait_for("Prometheus to see points forwarded", DEADLINE, || {
        query(
            &prom,
            "sum(nbiot_forward_points_total{job=\"nbiot-gateway\",result=\"ok\"})",
        )
        .filter(|v| *v >= 1.0)
    });
    assert_eq!(
        query(&prom, "nbiot_forward_healthy{job=\"nbiot-gateway\"}"),
        Some(1.0)
    );
    assert!(
        alerts(&prom, "NbiotForwarderUnhealthy").is_empty(),
        "no alert while the TSDB takes writes"
    );

    // The TSDB goes away while there is something to forward.
    let _ = vm.0.kill();
    let _ = vm.0.wait();
    let reply = coap_post(&dir, &gw.coap, EM300_IMEI, &frame(2));
    assert!(!reply.contains("4.") && !reply.contains("5."), "{reply}");

    // The forwarder turns unhealthy after 30 s of failed writes; the rule fires.
    let alert = wait_firing(&prom, "NbiotForwarderUnhealthy", Duration::from_secs(120));
    assert_eq!(alert["labels"]["instance"], gw.http.as_str(), "{alert}");
    assert_eq!(alert["labels"]["job"], "nbiot-gateway", "{alert}");
    assert_eq!(alert["labels"]["severity"], "warning", "{alert}");
    assert_eq!(
        alert["annotations"]["summary"],
        format!("Gateway {} cannot forward to its TSDB", gw.http).as_str(),
        "{alert}"
    );
    assert!(
        alert["annotations"]["runbook"]
            .as_str()
            .is_some_and(|r| r.contains("/readyz")),
        "{alert}"
    );
    // /readyz says why, without taking the gateway out of rotation.
    let (status, ready) = gw.get("/readyz");
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("degraded"), "{ready}");

    // Then the gateway itself stops: its own scrape fails.
    gw.stop();
    let alert = wait_firing(&prom, "NbiotGatewayDown", DEADLINE);
    assert_eq!(alert["labels"]["instance"], gw.http.as_str(), "{alert}");
    assert_eq!(alert["labels"]["severity"], "critical", "{alert}");
}
