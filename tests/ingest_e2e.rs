//! The ingest path end to end, as an operator runs it: the real `nbiot-gateway` binary with
//! a config file, real clients (libcoap's `coap-client`, `mosquitto_pub`, the `nbiot-load`
//! fleet), a real Mosquitto for external mode, and the store and query API checked after.
//! Includes kill -9 in the middle of a load: nothing acknowledged may be lost.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);
const CJT188_REPLY: &str = "68104433221100337881161f9000007766552c007766552c3101221105152021841316";
/// Milesight EM300-TH NB-IoT frame (IMEI 869951040293361, frame counter at bytes 6..8).
const EM300_TH_NB: &str = "020001006200001401303132303031303036313338423232303535393131303033383639393531303430323933333631343630313133313132303632393331383938363131323032323030313332323838393309002a01755bff023c000367fe000468780367ff000468780367fe000468780367ff000468780367fe00046879";
const EM300_IMEI: &str = "869951040293361";

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("nbiot-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("profiles")).expect("create temp dir");
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

fn hex(s: &str) -> Vec<u8> {
    nbiot_codecs::hex::decode(s.as_bytes()).expect("hex")
}

/// The EM300-TH frame with its frame counter set: a distinct (device, sequence) per message.
fn em300_frame(seq: u16) -> Vec<u8> {
    let mut p = hex(EM300_TH_NB);
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p
}

struct Gateway {
    child: Child,
    http: String,
    coap: String,
    mqtt: String,
    _log: mpsc::Receiver<String>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(dir: &TempDir, mqtt: &str) -> Gateway {
        let config = dir.0.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[coap]\nlisten = \"127.0.0.1:0\"\n\
                 [http]\nlisten = \"127.0.0.1:0\"\n\
                 [store]\npath = \"{}\"\n\
                 [profiles]\ndir = \"{}\"\n{mqtt}",
                dir.db().display(),
                dir.0.join("profiles").display()
            ),
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
            .args(["run", "--config", config.to_str().expect("path")])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the gateway");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + DEADLINE;
        let line = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
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
        Gateway {
            http: format!("http://{}", field("http")),
            coap: field("coap"),
            mqtt: field("mqtt"),
            child,
            _log: rx,
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn kill9(mut self) {
        assert!(Command::new("kill")
            .args(["-9", &self.pid()])
            .status()
            .expect("kill")
            .success());
        let _ = self.child.wait();
    }

    fn stop(mut self) {
        assert!(Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .expect("kill")
            .success());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "exit after SIGTERM: {status:?}");
                return;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn add_device(&self, id: &str, profile: &str) {
        let out = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
            .args([
                "devices",
                "add",
                id,
                "--profile",
                profile,
                "--url",
                &self.http,
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

    fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let r = reqwest::get(format!("{}{path}", self.http))
                .await
                .expect("GET");
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(serde_json::Value::Null))
        })
    }

    /// Polls `/latest` until `pred` holds (deadline).
    fn wait_latest(
        &self,
        device: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let (status, v) = self.get_json(&format!("/api/v1/devices/{device}/latest"));
            if status == 200 && pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "latest for {device} never matched; last: {status} {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every (device, sequence) stored, with how many times.
fn stored_sequences(db: &Path) -> std::collections::HashMap<(String, i64), i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db");
    let mut stmt = conn
        .prepare("SELECT device, sequence, count(*) FROM uplinks WHERE sequence IS NOT NULL GROUP BY device, sequence")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, i64>(1)?),
                r.get::<_, i64>(2)?,
            ))
        })
        .expect("query");
    rows.map(|r| r.expect("row")).collect()
}

fn uplink_count(db: &Path) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open db");
    conn.query_row("SELECT count(*) FROM uplinks", [], |r| r.get(0))
        .expect("count")
}

fn coap_post(coap: &str, device: &str, payload: &[u8], dir: &Path) -> std::process::Output {
    let file = dir.join(format!("payload-{device}.bin"));
    std::fs::write(&file, payload).expect("write payload");
    Command::new("coap-client-notls")
        .args(["-m", "post", "-B", "10", "-f", file.to_str().expect("path")])
        .arg(format!("coap://{coap}/up/{device}"))
        .output()
        .expect("coap-client-notls runs (Debian libcoap3-bin)")
}

#[test]
fn coap_and_embedded_mqtt_uplinks_are_stored_and_served() {
    let dir = TempDir::new("both");
    let gw = Gateway::start(
        &dir,
        "[mqtt]\nmode = \"embedded\"\nlisten = \"127.0.0.1:0\"\n",
    );
    assert!(
        !gw.coap.is_empty() && !gw.mqtt.is_empty(),
        "bound addresses are logged"
    );
    gw.add_device("78330011223344", "cjt188-water-meter");
    gw.add_device(EM300_IMEI, "milesight-em300-th-nb");

    // CoAP, from libcoap's client.
    let out = coap_post(&gw.coap, "78330011223344", &hex(CJT188_REPLY), &dir.0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latest = gw.wait_latest("78330011223344", |v| v["uplinks"] == 1);
    assert_eq!(
        latest["readings"][0]["fields"]["volume_m3"], 556677.0,
        "{latest}"
    );
    // The meter's wall clock (2015-05-11 22:01:31 at +08:00) is implausibly old: receive time.
    assert!(
        latest["last_peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{latest}"
    );

    // MQTT through the embedded broker, from another process.
    let file = dir.0.join("th.bin");
    std::fs::write(&file, em300_frame(7)).expect("write");
    let port = gw.mqtt.rsplit(':').next().expect("port").to_owned();
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-t",
            &format!("nbiot/{EM300_IMEI}/up"),
            "-f",
        ])
        .arg(&file)
        .output()
        .expect("mosquitto_pub runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let latest = gw.wait_latest(EM300_IMEI, |v| v["uplinks"] == 1);
    let readings = latest["readings"].as_array().expect("readings");
    assert_eq!(readings.len(), 6, "status record + 5 samples: {latest}");
    assert_eq!(readings[5]["fields"]["temperature_c"], 25.4, "{latest}");

    // Unknown devices are refused and nothing is stored for them.
    let before = uplink_count(&dir.db());
    let out = coap_post(&gw.coap, "99999999", &hex(CJT188_REPLY), &dir.0);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4.04")
            || String::from_utf8_lossy(&out.stderr).contains("4.04"),
        "coap-client reports 4.04: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(uplink_count(&dir.db()), before);

    // Readings over a time range, and downsampled.
    let (status, v) = gw.get_json(&format!(
        "/api/v1/devices/{EM300_IMEI}/readings?fields=temperature_c"
    ));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["readings"].as_array().map(Vec::len), Some(5), "{v}");

    gw.stop();
}

#[test]
fn kill_9_under_load_loses_nothing_acknowledged() {
    let dir = TempDir::new("kill9");
    let gw = Gateway::start(&dir, "[mqtt]\nmode = \"off\"\n");
    let mut load = Command::new(env!("CARGO_BIN_EXE_nbiot-load"))
        .args([
            "--coap",
            &gw.coap,
            "--api",
            &gw.http,
            "--register",
            "--devices",
            "200",
            "--rate",
            "2000",
            "--duration",
            "6",
            "--max-retransmit",
            "1",
            "--json",
            "--verify-db",
        ])
        .arg(dir.db())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start nbiot-load");
    // Kill the gateway while uplinks are flowing.
    let deadline = Instant::now() + DEADLINE;
    while !dir.db().exists() || uplink_count(&dir.db()) < 2000 {
        assert!(Instant::now() < deadline, "the load never got going");
        assert!(
            load.try_wait().expect("wait").is_none(),
            "nbiot-load ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.kill9();
    // nbiot-load checks the store itself: every uplink acked with 2.04 present exactly once.
    let out = load.wait_with_output().expect("nbiot-load ends by itself");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("summary JSON");
    let acked = summary["codes"]["2.04"].as_u64().unwrap_or(0);
    assert!(acked >= 2000, "{summary}");
    assert_eq!(
        summary["store_check"]["checked"].as_u64(),
        Some(acked),
        "{summary}"
    );
    assert_eq!(summary["store_check"]["missing"], 0, "{summary}");
    assert_eq!(summary["store_check"]["duplicated"], 0, "{summary}");
    assert!(out.status.success(), "{summary}");
    let stored = stored_sequences(&dir.db());
    assert!(stored.values().all(|n| *n == 1), "no uplink stored twice");

    // The store reopens after the crash and the gateway carries on.
    let gw = Gateway::start(&dir, "[mqtt]\nmode = \"off\"\n");
    let out = Command::new(env!("CARGO_BIN_EXE_nbiot-load"))
        .args([
            "--coap",
            &gw.coap,
            "--api",
            &gw.http,
            "--devices",
            "200",
            "--rate",
            "500",
            "--duration",
            "1",
            "--first-sequence",
            "5000",
            "--json",
            "--verify-db",
        ])
        .arg(dir.db())
        .output()
        .expect("nbiot-load");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    gw.stop();
}

/// A Mosquitto broker on a free loopback port, with persistence, killed on drop.
struct Mosquitto {
    child: Child,
    port: u16,
}

impl Mosquitto {
    fn start(dir: &Path, port: u16) -> Mosquitto {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 max_inflight_messages 1000\nmax_queued_messages 100000\n",
                dir.display()
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new("/usr/sbin/mosquitto")
            .args(["-c", conf.to_str().expect("path")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (Debian mosquitto)");
        let deadline = Instant::now() + DEADLINE;
        while std::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Mosquitto { child, port }
    }

    fn publish(&self, topic: &str, payload: &[u8], dir: &Path) {
        let file = dir.join("pub.bin");
        std::fs::write(&file, payload).expect("write");
        let out = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                "1",
                "-t",
                topic,
                "-f",
            ])
            .arg(&file)
            .output()
            .expect("mosquitto_pub");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn external_mqtt_survives_gateway_kill_9() {
    let dir = TempDir::new("mqtt");
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let broker = Mosquitto::start(&dir.0, port);
    let mqtt = format!(
        "[mqtt]\nmode = \"external\"\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"gw-e2e\"\n"
    );
    let topic = format!("nbiot/{EM300_IMEI}/up");

    let gw = Gateway::start(&dir, &mqtt);
    gw.add_device(EM300_IMEI, "milesight-em300-th-nb");
    for seq in 1..=10 {
        broker.publish(&topic, &em300_frame(seq), &dir.0);
    }
    gw.wait_latest(EM300_IMEI, |v| v["uplinks"] == 10);
    gw.kill9();

    // Published while the gateway is down: the broker keeps them for its persistent session.
    for seq in 11..=20 {
        broker.publish(&topic, &em300_frame(seq), &dir.0);
    }
    let gw = Gateway::start(&dir, &mqtt);
    gw.wait_latest(EM300_IMEI, |v| v["uplinks"].as_u64() >= Some(20));
    let stored = stored_sequences(&dir.db());
    for seq in 1..=20 {
        assert_eq!(
            stored.get(&(EM300_IMEI.to_owned(), seq)),
            Some(&1),
            "sequence {seq}: {stored:?}"
        );
    }
    gw.stop();
}
