//! Short CI versions of the soak and overload scenarios of BENCHMARKS.md: the real
//! `nbiot-gateway` binary on loopback ports chosen at run time, the real `nbiot-load` fleet,
//! and the store checked afterwards. The full-length runs (60-minute soak, 5-minute surge at
//! 3× the maximum rate) are `benches/scenarios.sh soak|overload`.
//!
//! - soak: a steady CoAP CON load for 20 s must be acknowledged entirely with 2.04, every
//!   acknowledged uplink must be in the store exactly once, the gateway's open file
//!   descriptors must not grow and its RSS must stay within a bound.
//! - overload: a burst far beyond what the gateway can commit must be shed with 5.03 +
//!   Max-Age (counted in the gateway's metrics), lose nothing acknowledged, and be followed
//!   by a load that is answered 2.04 again within seconds.
//!
//! The two run one after the other (a lock), so that one's load does not slow the other.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use support::{config, Gateway, TempDir};

/// One scenario at a time: both saturate the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

/// The real gateway on ports chosen at run time (MQTT off, the shipped profiles) and the
/// store `nbiot-load` checks.
struct Fleet {
    gw: Gateway,
    db: PathBuf,
}

impl Fleet {
    fn start(dir: &TempDir) -> Fleet {
        Fleet {
            gw: Gateway::start(&config(dir, ""), &[], &[]),
            db: dir.path("data/gateway.db"),
        }
    }

    /// Runs `nbiot-load` against this gateway with `args`; returns its JSON summary and
    /// whether it exited 0 (its store check passed).
    fn load(&self, args: &[&str]) -> (serde_json::Value, bool) {
        let api = format!("http://{}", self.gw.http);
        let out = Command::new(env!("CARGO_BIN_EXE_nbiot-load"))
            .args(["--coap", &self.gw.coap, "--api", &api, "--json"])
            .args(["--gateway-pid", &self.gw.child.id().to_string()])
            .args(["--verify-db", self.db.to_str().expect("path")])
            .args(args)
            .output()
            .expect("run nbiot-load");
        let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "nbiot-load printed no summary ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (summary, out.status.success())
    }

    /// The sum of a metric's samples whose labels contain `labels`, from `/metrics`.
    fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let page = self.gw.metrics();
        let mut sum = None;
        for line in page.lines().filter(|l| l.starts_with(name)) {
            let (series, value) = line.rsplit_once(' ')?;
            if series.contains(labels) {
                sum = Some(sum.unwrap_or(0.0) + value.parse::<f64>().ok()?);
            }
        }
        sum
    }
}

fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn short_soak_loses_nothing_and_keeps_fds_and_memory_flat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("soak");
    let gw = Fleet::start(&dir);
    let (s, ok) = gw.load(&[
        "--register",
        "--devices",
        "1000",
        "--rate",
        "300",
        "--duration",
        "20s",
        "--window",
        "2s",
        "--max-retransmit",
        "2",
    ]);
    assert!(ok, "store check failed: {s}");
    let sent = count(&s["sent"]);
    assert_eq!(sent, 6000, "{s}");
    // Every uplink acknowledged as committed, none shed, none lost.
    assert_eq!(count(&s["codes"]["2.04"]), sent, "{s}");
    assert_eq!(count(&s["timeouts"]), 0, "{s}");
    assert_eq!(count(&s["store_check"]["checked"]), sent, "{s}");
    assert_eq!(s["store_check"]["missing"], 0, "{s}");
    assert_eq!(s["store_check"]["duplicated"], 0, "{s}");
    // No descriptor leak: no more sockets and files at the end than at the start (the
    // start may count the registration's HTTP connection, closed since).
    let fds = &s["gateway"]["fds"];
    assert!(count(&fds["end"]) <= count(&fds["start"]), "{s}");
    assert!(count(&fds["max"]) <= count(&fds["start"]) + 4, "{s}");
    // Memory: the duplicate caches and SQLite's page cache fill, nothing else grows.
    let rss = &s["gateway"]["rss_kib"];
    let growth = count(&rss["end"]).saturating_sub(count(&rss["start"]));
    assert!(growth < 64 * 1024, "RSS grew {growth} KiB: {s}");
    // The receive-drop counter is exported (and nothing was dropped at this rate).
    assert_eq!(
        gw.metric("nbiot_udp_receive_drops_total", "protocol=\"coap\""),
        Some(0.0)
    );
}

#[test]
fn overload_is_shed_with_503_and_recovers() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("overload");
    let gw = Fleet::start(&dir);
    // 20 000 uplinks as fast as the tool can send them (far beyond what is committed per
    // second), then 15 s at 50/s.
    let (s, ok) = gw.load(&[
        "--register",
        "--devices",
        "2000",
        "--schedule",
        "200000:0.1s,50:15s",
        "--max-retransmit",
        "1",
        "--window",
        "1s",
        "--recovery-p99-ms",
        "1000",
    ]);
    assert!(ok, "store check failed: {s}");
    let surge = &s["segments"][0];
    let shed = count(&surge["codes"]["5.03"]);
    assert!(shed > 0, "the surge was not shed: {s}");
    // Every shed uplink is counted by the gateway (answers to lost datagrams' retries
    // included, so at least as many as the tool saw).
    let counted = gw
        .metric("nbiot_uplinks_rejected_total", "reason=\"overloaded\"")
        .unwrap_or(0.0);
    assert!(counted >= shed as f64, "{counted} < {shed}: {s}");
    // Nothing acknowledged is lost (the store check), and after the surge the gateway
    // commits again with latency back within target well inside the segment.
    assert_eq!(s["store_check"]["missing"], 0, "{s}");
    assert_eq!(s["store_check"]["duplicated"], 0, "{s}");
    let after = &s["segments"][1];
    assert_eq!(count(&after["sent"]), 750, "{s}");
    let recovered = after["recovery_s"].as_f64();
    assert!(
        recovered.is_some_and(|t| t <= 12.0),
        "latency did not come back within 12 s of the surge: {s}"
    );
    assert!(count(&after["codes"]["2.04"]) >= 600, "{s}");
    // Bounded memory: the surge's in-flight requests and caches, not the surge's size.
    let rss = &s["gateway"]["rss_kib"];
    let growth = count(&rss["max"]).saturating_sub(count(&rss["start"]));
    assert!(growth < 256 * 1024, "RSS grew {growth} KiB: {s}");
}
