//! Forwarding to a real TSDB: VictoriaMetrics (Debian `victoria-metrics`, which serves the
//! InfluxDB v2 write API) on a loopback port with its own data directory, started by the
//! tests, checked through its export API.
//!
//! VictoriaMetrics maps line protocol `measurement field=…` to the metric
//! `measurement_field`, with the tags as labels. It runs with `-dedup.minScrapeInterval=1ms`
//! so that a point written twice (same series, same timestamp) is one point, as in InfluxDB:
//! the forwarder's at-least-once delivery must end in exactly-once data. It keeps only
//! numbers: string fields are not compared here.
//!
//! - `every_reading_arrives_with_measurement_tags_fields_and_time`: the real gateway binary,
//!   devices with labels, uplinks over CoAP; every numeric and boolean field of every
//!   stored reading is in VictoriaMetrics with the right name, labels, time and value.
//! - `escaping_round_trips_through_victoria_metrics`: the library's forwarder over a store
//!   holding awkward names and values (spaces, commas, `=`, quotes, backslashes, newlines).
//! - Faults at a steady uplink rate (`nbiot-load` against the gateway binary), each ending
//!   with every (device, sequence) the store holds present exactly once in VictoriaMetrics
//!   at its reading's time: the TSDB stopped and restarted, the TSDB frozen (SIGSTOP: its
//!   requests hang until the forwarder's timeout) and resumed, and the gateway killed -9
//!   while a write hangs and a backlog waits, then restarted.
//!
//! The tests take a lock so that only one runs at a time: each runs a TSDB, a gateway and
//! a load generator, and the timings they assert need the machine's cores.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use nbiot_gateway::forward::{Forwarder, ForwarderSettings};
use nbiot_gateway::health::Health;
use nbiot_gateway::store::Store;
use rusqlite::{params, Connection, OpenFlags};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);
const EM300_TH_NB: &str = "020001006200001401303132303031303036313338423232303535393131303033383639393531303430323933333631343630313133313132303632393331383938363131323032323030313332323838393309002a01755bff023c000367fe000468780367ff000468780367fe000468780367ff000468780367fe00046879";
const EM300_IMEI: &str = "869951040293361";
const CJT188_REPLY: &str = "68104433221100337881161f9000007766552c007766552c3101221105152021841316";
const METER: &str = "78330011223344";

/// One VictoriaMetrics-backed test at a time (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbiot-fwd-vm-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("profiles")).expect("temp dir");
        for p in ["cjt188-water-meter.toml", "milesight-em300-th-nb.toml"] {
            std::fs::copy(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("device-profiles")
                    .join(p),
                dir.join("profiles").join(p),
            )
            .expect("copy profile");
        }
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("data/gateway.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port()
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A blocking HTTP/1.0 GET (no chunked answers), for the tests' own queries.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// VictoriaMetrics on a loopback port with its own data directory; killed on drop.
struct Vm {
    child: Option<Child>,
    port: u16,
    data: PathBuf,
}

/// One sample: (labels without `__name__`, timestamp ms, value), by metric name.
type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, i64, f64)>>;

impl Vm {
    fn start(data: PathBuf) -> Vm {
        let mut vm = Vm {
            child: None,
            port: free_tcp_port(),
            data,
        };
        vm.spawn();
        vm
    }

    fn spawn(&mut self) {
        let child = Command::new("/usr/bin/victoria-metrics")
            .arg(format!("-storageDataPath={}", self.data.display()))
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            // Same series + same timestamp = one point, as in InfluxDB.
            .arg("-dedup.minScrapeInterval=1ms")
            .arg("-retentionPeriod=100y")
            .arg("-search.disableCache")
            .arg("-loggerLevel=ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start victoria-metrics (Debian victoria-metrics)");
        self.child = Some(child);
        let port = self.port;
        wait_until("VictoriaMetrics answers /health", DEADLINE, || {
            http_get(port, "/health").is_some_and(|(s, _)| s == 200)
        });
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success());
    }

    /// Stops it the way an operator does (SIGTERM: it flushes what it acknowledged; a
    /// kill -9 would lose its last second of acknowledged writes, which no client can
    /// detect) and waits for the exit.
    fn stop(&mut self) {
        self.signal("-TERM");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    fn freeze(&self) {
        self.signal("-STOP");
    }

    fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Every sample of the metrics matching `selector`, after making recent writes searchable.
    fn export(&self, selector: &str) -> Samples {
        let _ = http_get(self.port, "/internal/force_flush");
        let (status, body) = http_get(
            self.port,
            &format!("/api/v1/export?match[]={}", encode(selector)),
        )
        .expect("export");
        assert_eq!(status, 200, "{body}");
        let mut out: Samples = BTreeMap::new();
        for line in body.lines().filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_str(line).expect("export line");
            let mut labels: BTreeMap<String, String> = v["metric"]
                .as_object()
                .expect("metric")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let name = labels.remove("__name__").expect("name");
            let values = v["values"].as_array().expect("values");
            let times = v["timestamps"].as_array().expect("timestamps");
            for (val, t) in values.iter().zip(times) {
                out.entry(name.clone()).or_default().push((
                    labels.clone(),
                    t.as_i64().expect("ts"),
                    val.as_f64().expect("value"),
                ));
            }
        }
        out
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `nbiot-gateway` binary with a config file forwarding to `influx_url`.
struct Gateway {
    child: Child,
    http_port: u16,
    coap: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(dir: &TempDir, coap_port: u16, influx_url: &str) -> Gateway {
        let config = dir.0.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[coap]\nlisten = \"127.0.0.1:{coap_port}\"\n\
                 [http]\nlisten = \"127.0.0.1:0\"\n\
                 [mqtt]\nmode = \"off\"\n\
                 [store]\npath = \"{}\"\n\
                 [profiles]\ndir = \"{}\"\n\
                 [influxdb]\nurl = \"{influx_url}\"\norg = \"city\"\nbucket = \"nbiot\"\n\
                 token = \"${{NBIOT_TEST_INFLUX_TOKEN}}\"\nflush_interval = \"200ms\"\n\
                 timeout = \"2s\"\ntags = [\"district\"]\n",
                dir.db().display(),
                dir.0.join("profiles").display()
            ),
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
            .args(["run", "--config", config.to_str().expect("path")])
            .env("RUST_LOG", "info")
            .env("NBIOT_TEST_INFLUX_TOKEN", "vm-ignores-tokens")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the gateway");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Keep draining after the first line so the gateway never blocks on stderr.
                let _ = tx.send(line);
            }
        });
        let until = Instant::now() + DEADLINE;
        let line = loop {
            let line = rx
                .recv_timeout(until.saturating_duration_since(Instant::now()))
                .expect("the gateway logs `Gateway running.` in time");
            if line.contains("Gateway running.") {
                break line;
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .unwrap_or_default()
                .to_owned()
        };
        let http_port = field("http")
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("http port");
        Gateway {
            http_port,
            coap: field("coap"),
            child,
        }
    }

    fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn add_device(&self, id: &str, profile: &str, label: &str) {
        let out = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
            .args([
                "devices",
                "add",
                id,
                "--profile",
                profile,
                "--label",
                label,
                "--url",
                &self.api(),
            ])
            .env_remove("NBIOT_TOKEN")
            .output()
            .expect("devices add");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The value of one sample line of `/metrics` (first match of the prefix).
    fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, body) = http_get(self.http_port, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn kill9(mut self) {
        assert!(Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success());
        let _ = self.child.wait();
    }

    fn stop(mut self) {
        assert!(Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success());
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "exit after SIGTERM: {status:?}");
                return;
            }
            assert!(Instant::now() < until, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn db(path: &Path) -> Connection {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open db")
}

fn scalar(path: &Path, sql: &str) -> i64 {
    db(path).query_row(sql, [], |r| r.get(0)).expect("query")
}

/// Readings committed after the forwarder's cursor.
fn backlog(path: &Path) -> i64 {
    scalar(
        path,
        "SELECT coalesce((SELECT max(id) FROM readings), 0) - \
                coalesce((SELECT reading_id FROM forward_cursor WHERE name = 'influxdb'), 0)",
    )
}

fn wait_forwarded(path: &Path) {
    wait_until(
        "the forwarder has delivered every reading",
        DEADLINE,
        || backlog(path) == 0,
    );
}

/// Starts `nbiot-load` against the gateway (CON uplinks of EM300-TH frames, 6 readings each).
fn load(gw: &Gateway, db: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nbiot-load"))
        .args([
            "--coap",
            &gw.coap,
            "--api",
            &gw.api(),
            "--max-retransmit",
            "1",
            "--json",
            "--verify-db",
        ])
        .arg(db)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nbiot-load")
}

/// Waits for the load to end; asserts the gateway stored every acknowledged uplink once.
fn finish_load(load: Child) -> u64 {
    let out = load.wait_with_output().expect("nbiot-load ends");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "nbiot-load summary: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{summary}");
    assert_eq!(summary["store_check"]["missing"], 0, "{summary}");
    summary["codes"]["2.04"].as_u64().unwrap_or(0)
}

/// Every uplink the store holds as (device, reading time ms, frame counter): what the TSDB
/// must hold as `environment_frame_counter`, exactly.
fn stored_frame_counters(path: &Path) -> Vec<(String, i64, f64)> {
    let conn = db(path);
    let mut stmt = conn
        .prepare(
            "SELECT r.device, r.time_s, u.sequence FROM readings r JOIN uplinks u ON u.id = r.uplink_id \
             WHERE json_extract(r.fields, '$.frame_counter') IS NOT NULL",
        )
        .expect("prepare");
    let mut v: Vec<(String, i64, f64)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, i64>(1)? * 1000,
                r.get::<_, i64>(2)? as f64,
            ))
        })
        .expect("query")
        .map(Result::unwrap)
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v
}

/// Asserts VictoriaMetrics holds exactly the store's uplinks: each (device, sequence) once,
/// at its reading's time.
fn assert_exactly_once_in_tsdb(vm: &Vm, path: &Path) {
    let expected = stored_frame_counters(path);
    // Precondition for an exact comparison: no two uplinks of a device in the same second
    // (they would be one point; the load's per-device interval keeps them seconds apart).
    let seconds: BTreeSet<(&str, i64)> =
        expected.iter().map(|(d, t, _)| (d.as_str(), *t)).collect();
    assert_eq!(
        seconds.len(),
        expected.len(),
        "test setup: two uplinks of a device in one second"
    );
    let sequences: BTreeSet<(&str, u64)> = expected
        .iter()
        .map(|(d, _, s)| (d.as_str(), *s as u64))
        .collect();
    assert_eq!(
        sequences.len(),
        expected.len(),
        "the store holds each (device, sequence) once"
    );

    let deadline = Instant::now() + DEADLINE;
    loop {
        let samples = vm.export("{__name__=\"environment_frame_counter\"}");
        let mut actual: Vec<(String, i64, f64)> = samples
            .get("environment_frame_counter")
            .map(|v| {
                v.iter()
                    .map(|(l, t, val)| (l.get("device").cloned().unwrap_or_default(), *t, *val))
                    .collect()
            })
            .unwrap_or_default();
        actual.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        if actual == expected {
            return;
        }
        if Instant::now() >= deadline {
            let exp: BTreeSet<String> = expected.iter().map(|x| format!("{x:?}")).collect();
            let act: Vec<String> = actual.iter().map(|x| format!("{x:?}")).collect();
            let act_set: BTreeSet<String> = act.iter().cloned().collect();
            let missing: Vec<&String> = exp.difference(&act_set).take(10).collect();
            let extra: Vec<&String> = act_set.difference(&exp).take(10).collect();
            panic!(
                "TSDB != store: {} expected, {} in the TSDB ({} distinct); missing {missing:?}; extra {extra:?}",
                expected.len(),
                act.len(),
                act_set.len()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------

fn coap_post(coap: &str, device: &str, payload: &[u8], dir: &Path) {
    let file = dir.join(format!("payload-{device}.bin"));
    std::fs::write(&file, payload).expect("write payload");
    let out = Command::new("coap-client-notls")
        .args(["-m", "post", "-B", "10", "-f", file.to_str().expect("path")])
        .arg(format!("coap://{coap}/up/{device}"))
        .output()
        .expect("coap-client-notls runs (Debian libcoap3-bin)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_reading_arrives_with_measurement_tags_fields_and_time() {
    let _serial = serial();
    let dir = TempDir::new("schema");
    let vm = Vm::start(dir.0.join("vm"));
    let gw = Gateway::start(&dir, free_udp_port(), &vm.url());
    gw.add_device(EM300_IMEI, "milesight-em300-th-nb", "district=north");
    gw.add_device(METER, "cjt188-water-meter", "district=south side");
    let em300 = nbiot_codecs::hex::decode(EM300_TH_NB.as_bytes()).expect("hex");
    let meter = nbiot_codecs::hex::decode(CJT188_REPLY.as_bytes()).expect("hex");
    coap_post(&gw.coap, EM300_IMEI, &em300, &dir.0);
    coap_post(&gw.coap, METER, &meter, &dir.0);
    wait_until("7 readings stored", DEADLINE, || {
        dir.db().exists() && scalar(&dir.db(), "SELECT count(*) FROM readings") == 7
    });
    wait_forwarded(&dir.db());

    // Every numeric and boolean field of every stored reading, as VictoriaMetrics names it.
    let conn = db(&dir.db());
    let mut stmt = conn
        .prepare("SELECT device, profile, measurement, time_s, fields FROM readings ORDER BY id")
        .expect("prepare");
    let rows: Vec<(String, String, String, i64, String)> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .expect("query")
        .map(Result::unwrap)
        .collect();
    let mut expected: Vec<(String, BTreeMap<String, String>, i64, f64)> = Vec::new();
    let mut kinds = BTreeSet::new();
    for (device, profile, measurement, time_s, fields) in &rows {
        let district = if device == EM300_IMEI {
            "north"
        } else {
            "south side"
        };
        let labels: BTreeMap<String, String> = [
            ("device", device.as_str()),
            ("district", district),
            ("profile", profile.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let fields: serde_json::Map<String, Value> = serde_json::from_str(fields).expect("fields");
        for (name, value) in fields {
            let v = match value {
                Value::Bool(b) => {
                    kinds.insert("bool");
                    f64::from(u8::from(b))
                }
                Value::Number(n) => {
                    kinds.insert(if n.is_f64() { "float" } else { "int" });
                    n.as_f64().expect("number")
                }
                // VictoriaMetrics keeps numbers only.
                _ => continue,
            };
            expected.push((
                format!("{measurement}_{name}"),
                labels.clone(),
                time_s * 1000,
                v,
            ));
        }
    }
    assert_eq!(
        kinds.len(),
        3,
        "ints, floats and booleans are all covered: {kinds:?}"
    );
    assert!(expected.len() > 30, "{}", expected.len());

    let deadline = Instant::now() + DEADLINE;
    loop {
        let samples = vm.export("{device=~\".+\"}");
        let missing: Vec<_> = expected
            .iter()
            .filter(|(name, labels, t, v)| {
                !samples.get(name).is_some_and(|s| {
                    s.iter().any(|(l, ts, val)| {
                        l == labels && ts == t && (val - v).abs() <= 1e-9 * v.abs().max(1.0)
                    })
                })
            })
            .collect();
        if missing.is_empty() {
            // The EM300 samples carry their own times (5 readings, a minute apart), so
            // temperature has 5 distinct points.
            let temps = &samples["environment_temperature_c"];
            assert_eq!(temps.len(), 5, "{temps:?}");
            break;
        }
        assert!(Instant::now() < deadline, "not in the TSDB: {missing:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(gw.metric("nbiot_forward_backlog_points"), Some(0.0));
    assert!(
        gw.metric("nbiot_forward_points_total{result=\"ok\"}")
            .unwrap_or(0.0)
            >= 7.0
    );
    assert_eq!(gw.metric("nbiot_forward_healthy"), Some(1.0));
    let (_, ready) = http_get(gw.http_port, "/readyz").expect("readyz");
    assert!(ready.contains("forwarder"), "{ready}");
    gw.stop();
}

// The guard only keeps the other VictoriaMetrics tests out; nothing in this runtime waits
// for it.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_round_trips_through_victoria_metrics() {
    let _serial = serial();
    let dir = TempDir::new("escaping");
    let vm = Vm::start(dir.0.join("vm"));
    let path = dir.db();
    drop(Store::open(&path).expect("store"));
    let t = 1_795_000_000_i64;
    {
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(
            "INSERT INTO devices (id, profile, created_at, updated_at) VALUES ('dev 1,a=b', 'p', 0, 0);
             INSERT INTO device_labels VALUES ('dev 1,a=b', 'site', 'Hall 3, \"east\" = main\\');",
        )
        .expect("device");
        conn.execute(
            "INSERT INTO readings (uplink_id, device, profile, measurement, time_s, device_time, fields) \
             VALUES (1, 'dev 1,a=b', 'prof x', 'odd meas,ure ment', ?1, 1, ?2)",
            params![
                t,
                r#"{"level m,=x":1.25,"note":"say \"hi\" \\ back\nslash","n":-7,"ok":true,"back\\slash":3}"#
            ],
        )
        .expect("reading");
        conn.execute(
            "INSERT INTO alert_transitions (device, profile, rule, severity, state, time_ms, value, summary) \
             VALUES ('dev 1,a=b', 'prof x', 'level high', 'critical', 'firing', ?1, 2.5, 's')",
            [t * 1000 + 999],
        )
        .expect("alert");
    }
    let mut settings = ForwarderSettings::from_config(&nbiot_gateway::config::InfluxConfig {
        url: vm.url(),
        org: "o".into(),
        bucket: "b".into(),
        token: String::new(),
        batch_size: 5000,
        flush_interval: Duration::from_millis(100),
        gzip: true,
        tags: vec!["site".into()],
        batch_bytes: 1 << 20,
        timeout: Duration::from_secs(5),
    });
    settings.poll_interval = Duration::from_millis(20);
    let fwd = Forwarder::start(settings, &path, Health::default())
        .await
        .expect("start");
    wait_until("delivered", DEADLINE, || {
        fwd.stats().cursor.reading_id == 1 && fwd.stats().cursor.alert_id == 1
    });

    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let reading_labels = labels(&[
        ("device", "dev 1,a=b"),
        ("profile", "prof x"),
        ("site", "Hall 3, \"east\" = main\\"),
    ]);
    let alert_labels = labels(&[
        ("device", "dev 1,a=b"),
        ("profile", "prof x"),
        ("rule", "level high"),
        ("severity", "critical"),
    ]);
    let expected: Samples = [
        ("odd meas,ure ment_level m,=x", reading_labels.clone(), 1.25),
        ("odd meas,ure ment_n", reading_labels.clone(), -7.0),
        ("odd meas,ure ment_ok", reading_labels.clone(), 1.0),
        ("odd meas,ure ment_back\\slash", reading_labels.clone(), 3.0),
        ("alerts_value", alert_labels.clone(), 2.5),
        ("alerts_firing", alert_labels.clone(), 1.0),
    ]
    .into_iter()
    .map(|(name, l, v)| (name.to_owned(), vec![(l, t * 1000, v)]))
    .collect();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut samples = vm.export("{device=~\".+\"}");
        // String fields (`note`, `state`): VictoriaMetrics does not keep text.
        samples.remove("odd meas,ure ment_note");
        samples.remove("alerts_state");
        if samples == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TSDB holds {samples:#?}\nexpected {expected:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let stats = fwd.shutdown(Duration::from_secs(2)).await;
    assert_eq!((stats.delivered, stats.dead_lettered), (2, 0));
}

// ---------------------------------------------------------------------------------------
// Faults at a steady uplink rate
// ---------------------------------------------------------------------------------------

/// 600 devices at 150 uplinks/s: each device every 4 s, so no two uplinks of a device share
/// a second (which would make them one point) even after a retransmission.
const DEVICES: &str = "600";
const RATE: &str = "150";

fn uplinks(path: &Path) -> i64 {
    if !path.exists() {
        return 0;
    }
    scalar(path, "SELECT count(*) FROM uplinks")
}

#[test]
fn tsdb_stopped_and_restarted_loses_nothing() {
    let _serial = serial();
    let dir = TempDir::new("vm-restart");
    let mut vm = Vm::start(dir.0.join("vm"));
    let gw = Gateway::start(&dir, free_udp_port(), &vm.url());
    let run = load(
        &gw,
        &dir.db(),
        &[
            "--register",
            "--devices",
            DEVICES,
            "--rate",
            RATE,
            "--duration",
            "20",
        ],
    );
    wait_until("uplinks flow", DEADLINE, || uplinks(&dir.db()) >= 400);

    vm.stop();
    let down_at = uplinks(&dir.db());
    wait_until("a backlog builds while the TSDB is down", DEADLINE, || {
        uplinks(&dir.db()) >= down_at + 900
    });
    let lag = backlog(&dir.db());
    assert!(lag >= 3000, "the readings wait in the store: backlog {lag}");
    assert!(
        gw.metric("nbiot_forward_retries_total{reason=\"connect\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(gw.metric("nbiot_forward_backlog_points").unwrap_or(0.0) > 0.0);
    vm.spawn();

    let acked = finish_load(run);
    assert!(acked >= 2500, "{acked}");
    wait_forwarded(&dir.db());
    assert_exactly_once_in_tsdb(&vm, &dir.db());
    gw.stop();
}

#[test]
fn tsdb_frozen_requests_time_out_and_resume_without_duplicates() {
    let _serial = serial();
    let dir = TempDir::new("vm-sigstop");
    let vm = Vm::start(dir.0.join("vm"));
    let gw = Gateway::start(&dir, free_udp_port(), &vm.url());
    let run = load(
        &gw,
        &dir.db(),
        &[
            "--register",
            "--devices",
            DEVICES,
            "--rate",
            RATE,
            "--duration",
            "20",
        ],
    );
    wait_until("uplinks flow", DEADLINE, || uplinks(&dir.db()) >= 400);

    vm.freeze();
    let frozen_at = uplinks(&dir.db());
    wait_until("a backlog builds while the TSDB hangs", DEADLINE, || {
        uplinks(&dir.db()) >= frozen_at + 900
    });
    let lag = backlog(&dir.db());
    assert!(lag >= 3000, "backlog {lag}");
    // The hanging requests ended by the forwarder's timeout (2 s), and were retried.
    assert!(
        gw.metric("nbiot_forward_retries_total{reason=\"timeout\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    // Resumed, it also processes the requests the forwarder gave up on: those points are
    // written twice, and must still be there once.
    vm.thaw();

    finish_load(run);
    wait_forwarded(&dir.db());
    assert_exactly_once_in_tsdb(&vm, &dir.db());
    gw.stop();
}

#[test]
fn gateway_killed_9_mid_backlog_resumes_from_its_cursor() {
    let _serial = serial();
    let dir = TempDir::new("gw-kill9");
    let vm = Vm::start(dir.0.join("vm"));
    let coap_port = free_udp_port();
    let gw = Gateway::start(&dir, coap_port, &vm.url());
    let run = load(
        &gw,
        &dir.db(),
        &[
            "--register",
            "--devices",
            DEVICES,
            "--rate",
            RATE,
            "--duration",
            "12",
        ],
    );
    wait_until("uplinks flow", DEADLINE, || uplinks(&dir.db()) >= 400);
    // Freeze the TSDB: a write hangs in flight and the backlog grows.
    vm.freeze();
    finish_load(run);
    let lag = backlog(&dir.db());
    assert!(lag >= 3000, "backlog {lag}");

    // kill -9 with a write in flight and the backlog waiting; then the TSDB wakes up and
    // processes that orphaned write (its 204 goes nowhere).
    gw.kill9();
    vm.thaw();
    let cursor_before = scalar(
        &dir.db(),
        "SELECT reading_id FROM forward_cursor WHERE name = 'influxdb'",
    );

    // Restarted on the same store and port; uplinks keep coming.
    let gw = Gateway::start(&dir, coap_port, &vm.url());
    let run = load(
        &gw,
        &dir.db(),
        &[
            "--devices",
            DEVICES,
            "--rate",
            RATE,
            "--duration",
            "5",
            "--first-sequence",
            "1000",
        ],
    );
    finish_load(run);
    wait_forwarded(&dir.db());
    let cursor_after = scalar(
        &dir.db(),
        "SELECT reading_id FROM forward_cursor WHERE name = 'influxdb'",
    );
    assert!(
        cursor_after > cursor_before,
        "{cursor_before} -> {cursor_after}"
    );
    assert_exactly_once_in_tsdb(&vm, &dir.db());
    gw.stop();
}

#[test]
fn query_values_are_percent_encoded() {
    assert_eq!(encode("{a=\"b c\"}"), "%7Ba%3D%22b%20c%22%7D");
}
