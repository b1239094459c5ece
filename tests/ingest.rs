//! The ingest pipeline end to end: the real `Pipeline` (shards, writer thread, retention)
//! over a real SQLite file in a temp dir, a real `Registry`, and real profiles copied from
//! `device-profiles/` (CJ/T 188 water meter: raw binary frames with a device clock and a
//! frame counter; Dragino N95S31B: hex text, no clock, no counter). The query API is served
//! by axum on a loopback port chosen at run time and read with reqwest.
//!
//! Timings are printed (`--nocapture`); only generous bounds are asserted:
//! - `dashboard_queries_over_30_days`: latency of the full-range and the `step=1h&agg=mean`
//!   query over 8640 readings (`cargo test --release --test ingest -- --nocapture dashboard`);
//! - `throughput` (ignored by default): sustained uplinks/s through pipeline + commit
//!   (`cargo test --release --test ingest -- --ignored --nocapture throughput`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbiot_gateway::api::{self, ApiState};
use nbiot_gateway::pipeline::{
    Outcome, Pipeline, PipelineConfig, PipelineHandle, Reject, SubmitError, Transport, Uplink,
};
use nbiot_gateway::profiles::{self, SharedProfiles};
use nbiot_gateway::registry::{DeviceSpec, PutMode, Registry, TokenUpdate};
use nbiot_gateway::store::Store;
use rusqlite::Connection;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbiot-ingest-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const METER: &str = "cjt188-water-meter";
const SENSOR: &str = "dragino-n95s31b";

/// The Dragino wiki frame, as the device sends it (ASCII hex; the profile says `encoding = "hex"`).
const N95S31B_HEX: &str = "724031607457006e0ccd1b0100dc000ccc00e10186";

struct Env {
    // Removed on drop, after the registry (fields drop in order).
    registry: Registry,
    _dir: TempDir,
}

impl Env {
    async fn new(tag: &str) -> Env {
        let dir = TempDir::new(tag);
        let profiles_dir = dir.0.join("profiles");
        std::fs::create_dir_all(&profiles_dir).unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
        for name in [METER, SENSOR] {
            std::fs::copy(
                shipped.join(format!("{name}.toml")),
                profiles_dir.join(format!("{name}.toml")),
            )
            .unwrap();
        }
        let report = profiles::load_dir(&profiles_dir);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let store = Arc::new(Store::open(&dir.0.join("data/gateway.db")).unwrap());
        let registry = Registry::open(store, SharedProfiles::new(report.set))
            .await
            .unwrap();
        Env {
            registry,
            _dir: dir,
        }
    }

    fn db(&self) -> Connection {
        Connection::open(self.registry.store().path()).unwrap()
    }

    async fn register(&self, id: &str, profile: &str, token: Option<&str>) {
        let spec = DeviceSpec {
            profile: profile.into(),
            labels: BTreeMap::new(),
            params: BTreeMap::new(),
            token: token.map_or(TokenUpdate::Keep, |t| TokenUpdate::Set(t.into())),
        };
        self.registry.put(id, spec, PutMode::Upsert).await.unwrap();
    }

    /// Small and quick: two shards, 1 ms group commit, no retention.
    fn config(&self) -> PipelineConfig {
        PipelineConfig {
            shards: 2,
            commit_interval: Duration::from_millis(1),
            retention: Duration::ZERO,
            ..PipelineConfig::default()
        }
    }

    async fn start(&self, config: PipelineConfig) -> Pipeline {
        Pipeline::start(config, self.registry.clone())
            .await
            .unwrap()
    }
}

fn uplink(
    device: &str,
    payload: impl Into<Bytes>,
    received_at_ms: i64,
) -> (Uplink, oneshot::Receiver<Outcome>) {
    let (tx, rx) = oneshot::channel();
    let u = Uplink {
        device: device.into(),
        payload: payload.into(),
        transport: Transport::Coap,
        peer: Some("192.0.2.7:40001".parse().unwrap()),
        received_at_ms,
        token: None,
        reply: Some(tx),
    };
    (u, rx)
}

/// Submits and waits for the outcome.
async fn send(h: &PipelineHandle, device: &str, payload: impl Into<Bytes>, at_ms: i64) -> Outcome {
    let (u, rx) = uplink(device, payload, at_ms);
    h.submit_wait(u).await.unwrap();
    rx.await.unwrap()
}

fn bcd(v: u64) -> u8 {
    (((v / 10 % 10) << 4) | (v % 10)) as u8
}

/// A CJ/T 188 read-data reply (DI 0x901F, meter address 78330011223344): serial `ser`, both
/// volumes `volume_centi` hundredths of m³, the meter's wall clock `local` (y, mo, d, h, mi,
/// s), status word `st`; checksum computed.
fn cjt188(ser: u8, volume_centi: u64, local: [u64; 6], st: u16) -> Vec<u8> {
    let mut f = vec![
        0x68, 0x10, 0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78, 0x81, 0x16, 0x1f, 0x90, ser,
    ];
    for _ in 0..2 {
        let mut v = volume_centi;
        for _ in 0..4 {
            f.push(bcd(v % 100));
            v /= 100;
        }
        f.push(0x2c);
    }
    let [y, mo, d, h, mi, s] = local;
    f.extend([
        bcd(s),
        bcd(mi),
        bcd(h),
        bcd(d),
        bcd(mo),
        bcd(y % 100),
        bcd(y / 100),
    ]);
    f.extend(st.to_le_bytes());
    let cs = f.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    f.extend([cs, 0x16]);
    f
}

/// The meter's wall clock (UTC+8, its profile's `utc_offset`) at Unix time `t`.
fn china_clock(t: i64) -> [u64; 6] {
    let local = t + 8 * 3600;
    let (y, m, d) = nbiot_codecs::time::civil_from_days(local.div_euclid(86_400));
    let s = local.rem_euclid(86_400);
    [
        y as u64,
        m.into(),
        d.into(),
        (s / 3600) as u64,
        (s / 60 % 60) as u64,
        (s % 60) as u64,
    ]
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const EXAMPLE_HEX: &str = "68104433221100337881161f9000007766552c007766552c3101221105152021841316";
/// 2015-05-11T22:01:31 on the meter's clock (UTC+8).
const EXAMPLE_TIME_S: i64 = 1_431_352_891;
/// Some receive time: 2026-01-01T00:00:00.250Z.
const NOW_MS: i64 = 1_767_225_600_250;

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

// ---------------------------------------------------------------------------------------
// Commit, outcome, rows
// ---------------------------------------------------------------------------------------

#[test]
fn frame_builder_matches_the_vendor_example() {
    assert_eq!(
        cjt188(0, 55_667_700, [2015, 5, 11, 22, 1, 31], 0x8421),
        unhex(EXAMPLE_HEX)
    );
    assert_eq!(china_clock(EXAMPLE_TIME_S), [2015, 5, 11, 22, 1, 31]);
}

#[tokio::test]
async fn a_committed_uplink_is_in_the_store_before_its_outcome() {
    let env = Env::new("commit").await;
    env.register("meter-1", METER, None).await;
    env.register("th-1", SENSOR, None).await;
    let pipeline = env.start(env.config()).await;
    let h = pipeline.handle();

    let outcome = send(&h, "meter-1", unhex(EXAMPLE_HEX), NOW_MS).await;
    assert_eq!(
        outcome,
        Outcome::Committed {
            readings: 1,
            downlink: None
        }
    );
    // Visible to another connection the moment the outcome arrives: it was committed first.
    let db = env.db();
    type UplinkRow = (
        String,
        String,
        String,
        String,
        Option<String>,
        i64,
        Vec<u8>,
        Option<String>,
        Option<i64>,
        i64,
    );
    let row: UplinkRow = db
        .query_row(
            "SELECT device, profile, codec, transport, peer, received_at_ms, payload, error_code, \
             sequence, readings FROM uplinks",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(
        row,
        (
            "meter-1".into(),
            METER.into(),
            "cjt188".into(),
            "coap".into(),
            Some("192.0.2.7:40001".into()),
            NOW_MS,
            unhex(EXAMPLE_HEX),
            None,
            Some(0),
            1
        )
    );
    let (uplink_id, measurement, time_s, device_time, fields): (i64, String, i64, bool, String) =
        db.query_row(
            "SELECT uplink_id, measurement, time_s, device_time, fields FROM readings",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!(uplink_id, 1);
    assert_eq!(measurement, "water_meter");
    // The meter's clock says 2015-05-11T22:01:31 (UTC+8): years before receipt, so not
    // believed; the receive time, floored to the second.
    assert_eq!((time_s, device_time), (NOW_MS / 1000, false));
    assert_eq!(
        serde_json::from_str::<Value>(&fields).unwrap(),
        json!({
            "meter_type": 16, "address": "78330011223344", "ctrl": 129, "response": true,
            "abnormal": false, "function": 1, "di": 36895, "ser": 0,
            "volume_m3": 556677.0, "volume_unit_code": 44,
            "settlement_volume_m3": 556677.0, "settlement_volume_unit_code": 44,
            "status": 33825, "valve_open": false, "valve_fault": false, "battery_low": false
        })
    );
    // Key order is the payload's.
    assert!(
        fields.starts_with(r#"{"meter_type":16,"address":"78330011223344""#),
        "{fields}"
    );

    // Hex-encoded payloads are stored as sent, decoded through the profile's encoding.
    let outcome = send(&h, "th-1", N95S31B_HEX, NOW_MS + 1).await;
    assert_eq!(
        outcome,
        Outcome::Committed {
            readings: 1,
            downlink: None
        }
    );
    let (payload, fields, time_s, device_time): (Vec<u8>, String, i64, bool) = db
        .query_row(
            "SELECT u.payload, r.fields, r.time_s, r.device_time FROM uplinks u \
             JOIN readings r ON r.uplink_id = u.id WHERE u.device = 'th-1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(payload, N95S31B_HEX.as_bytes());
    // No device clock: the receive time, floored to the second.
    assert_eq!((time_s, device_time), (NOW_MS / 1000, false));
    let fields: Value = serde_json::from_str(&fields).unwrap();
    assert_eq!(fields["temperature_c"], json!(22.5));
    assert_eq!(fields["humidity_pct"], json!(39.0));
    assert_eq!(fields["battery_v"], json!(3.277));

    let state: (i64, i64, String, Option<String>, i64, Option<i64>) = db
        .query_row(
            "SELECT first_seen_ms, last_seen_ms, last_transport, last_peer, uplinks, last_sequence \
             FROM device_state WHERE device = 'meter-1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .unwrap();
    assert_eq!(
        state,
        (
            NOW_MS,
            NOW_MS,
            "coap".into(),
            Some("192.0.2.7:40001".into()),
            1,
            Some(0)
        )
    );
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_finds_its_rows_committed() {
    let env = Env::new("ack-after-commit").await;
    for d in 0..20 {
        env.register(&format!("m{d}"), METER, None).await;
    }
    let pipeline = env.start(env.config()).await;
    let h = pipeline.handle();
    let path = env.registry.store().path().to_owned();
    let mut waiters = Vec::new();
    for i in 0..400i64 {
        let (u, rx) = uplink(&format!("m{}", i % 20), unhex(EXAMPLE_HEX), NOW_MS + i);
        h.submit_wait(u).await.unwrap();
        let path = path.clone();
        waiters.push(tokio::spawn(async move {
            let outcome = rx.await.unwrap();
            // Checked from a fresh connection as soon as the outcome arrives.
            let n: i64 = tokio::task::spawn_blocking(move || {
                let db = Connection::open(path).unwrap();
                db.query_row(
                    "SELECT count(*) FROM uplinks u JOIN readings r ON r.uplink_id = u.id \
                     WHERE u.received_at_ms = ?1",
                    [NOW_MS + i],
                    |r| r.get(0),
                )
                .unwrap()
            })
            .await
            .unwrap();
            (outcome, n)
        }));
    }
    for w in waiters {
        let (outcome, rows) = w.await.unwrap();
        assert_eq!(
            outcome,
            Outcome::Committed {
                readings: 1,
                downlink: None
            }
        );
        assert_eq!(rows, 1, "acknowledged before its rows were committed");
    }
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_undecodable_uplink_is_kept_raw_with_its_error() {
    let env = Env::new("undecodable").await;
    env.register("meter-1", METER, None).await;
    let pipeline = env.start(env.config()).await;
    let h = pipeline.handle();
    // The widely copied reply with a wrong checksum (0x08; the bytes sum to 0x13).
    let bad =
        unhex("fefefefe68104433221100337881161f9000007766552c007766552c3101221105152021840816");
    let outcome = send(&h, "meter-1", bad.clone(), NOW_MS).await;
    let message = "checksum mismatch: frame says 0x08, bytes sum to 0x13".to_owned();
    assert_eq!(
        outcome,
        Outcome::Undecodable {
            code: "checksum",
            message: message.clone()
        }
    );
    let db = env.db();
    let row: (Vec<u8>, String, String, String, String, i64) = db
        .query_row(
            "SELECT payload, profile, codec, error_code, error_message, readings FROM uplinks",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(
        row,
        (
            bad,
            METER.into(),
            "cjt188".into(),
            "checksum".into(),
            message.clone(),
            0
        )
    );
    assert_eq!(count(&db, "SELECT count(*) FROM readings"), 0);
    let state: (i64, String, String, i64) = db
        .query_row(
            "SELECT uplinks, last_error_code, last_error_message, last_error_ms FROM device_state",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(state, (1, "checksum".into(), message, NOW_MS));
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn unknown_device_bad_token_and_missing_profile_are_rejected_unstored() {
    let env = Env::new("reject").await;
    env.register("locked", METER, Some("s3cret-token-1")).await;
    env.register("orphan", SENSOR, None).await;
    let pipeline = env.start(env.config()).await;
    let h = pipeline.handle();

    let outcome = send(&h, "nobody", unhex(EXAMPLE_HEX), NOW_MS).await;
    assert_eq!(outcome, Outcome::Rejected(Reject::UnknownDevice));

    for token in [None, Some("wrong")] {
        let (mut u, rx) = uplink("locked", unhex(EXAMPLE_HEX), NOW_MS);
        u.token = token.map(Into::into);
        h.submit(u).unwrap();
        assert_eq!(
            rx.await.unwrap(),
            Outcome::Rejected(Reject::BadToken),
            "{token:?}"
        );
    }
    let (mut u, rx) = uplink("locked", unhex(EXAMPLE_HEX), NOW_MS);
    u.token = Some("s3cret-token-1".into());
    h.submit(u).unwrap();
    assert_eq!(
        rx.await.unwrap(),
        Outcome::Committed {
            readings: 1,
            downlink: None
        }
    );

    // The sensor profile is unloaded (a reload without its file): its devices are refused.
    let mut without = (*env.registry.profiles().current()).clone();
    let meter_only = {
        let mut s = nbiot_gateway::profiles::ProfileSet::default();
        for p in without.iter() {
            if p.name == METER {
                s.insert(profiles::load_file(&p.source).unwrap());
            }
        }
        s
    };
    without = meter_only;
    env.registry.profiles().replace(without);
    let outcome = send(&h, "orphan", N95S31B_HEX, NOW_MS).await;
    assert_eq!(outcome, Outcome::Rejected(Reject::NoProfile));

    pipeline.shutdown().await.unwrap();
    let db = env.db();
    assert_eq!(count(&db, "SELECT count(*) FROM uplinks"), 1);
    assert_eq!(count(&db, "SELECT count(*) FROM device_state"), 1);
}

// ---------------------------------------------------------------------------------------
// Order, frame counters, time
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_device_is_committed_in_order_under_concurrency() {
    const DEVICES: usize = 40;
    const EACH: u8 = 50;
    let env = Env::new("order").await;
    for d in 0..DEVICES {
        env.register(&format!("m{d:02}"), METER, None).await;
    }
    let pipeline = env
        .start(PipelineConfig {
            shards: 4,
            shard_queue: 8,
            writer_queue: 16,
            max_batch: 32,
            ..env.config()
        })
        .await;
    let mut senders = Vec::new();
    for d in 0..DEVICES {
        let h = pipeline.handle();
        senders.push(tokio::spawn(async move {
            let device = format!("m{d:02}");
            let mut replies = Vec::new();
            for ser in 0..EACH {
                let (u, rx) = uplink(
                    &device,
                    cjt188(ser, u64::from(ser), [2025, 1, 1, 0, 0, 0], 0),
                    NOW_MS,
                );
                // Waits for room: the queues here are tiny on purpose.
                h.submit_wait(u).await.unwrap();
                replies.push(rx);
            }
            for rx in replies {
                assert!(matches!(rx.await.unwrap(), Outcome::Committed { .. }));
            }
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    pipeline.shutdown().await.unwrap();
    let db = env.db();
    for d in 0..DEVICES {
        let device = format!("m{d:02}");
        let mut stmt = db
            .prepare("SELECT sequence FROM uplinks WHERE device = ?1 ORDER BY id")
            .unwrap();
        let seqs: Vec<i64> = stmt
            .query_map([&device], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(seqs, (0..i64::from(EACH)).collect::<Vec<_>>(), "{device}");
        // Readings in commit order too (the forwarder relies on it).
        let mut stmt = db
            .prepare(
                "SELECT json_extract(fields, '$.ser') FROM readings WHERE device = ?1 ORDER BY id",
            )
            .unwrap();
        let sers: Vec<i64> = stmt
            .query_map([&device], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(sers, (0..i64::from(EACH)).collect::<Vec<_>>(), "{device}");
        let (uplinks, gaps, resets): (i64, i64, i64) = db
            .query_row(
                "SELECT uplinks, gaps, resets FROM device_state WHERE device = ?1",
                [&device],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((uplinks, gaps, resets), (i64::from(EACH), 0, 0), "{device}");
    }
}

#[tokio::test]
async fn frame_counter_gaps_resets_and_wraps_survive_a_restart() {
    let env = Env::new("gaps").await;
    env.register("meter-1", METER, None).await;
    let state = |db: &Connection| -> (i64, i64, i64, i64) {
        db.query_row(
            "SELECT uplinks, gaps, resets, last_sequence FROM device_state",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap()
    };
    let pipeline = env.start(env.config()).await;
    let h = pipeline.handle();
    // 250 251 | 252 253 missing | 254 254(repeat) | 255 0 missing (8-bit wrap) | 1 |
    // 0 (restart) | 1 2 missing | 3
    for ser in [250u8, 251, 254, 254, 1, 0, 3] {
        let outcome = send(
            &h,
            "meter-1",
            cjt188(ser, 100, [2025, 1, 1, 0, 0, 0], 0),
            NOW_MS,
        )
        .await;
        assert!(matches!(outcome, Outcome::Committed { .. }));
    }
    pipeline.shutdown().await.unwrap();
    assert_eq!(state(&env.db()), (7, 2 + 2 + 2, 1, 3));

    // A new pipeline loads the last counter: 3 → 6 misses 4 and 5.
    let pipeline = env.start(env.config()).await;
    let outcome = send(
        &pipeline.handle(),
        "meter-1",
        cjt188(6, 100, [2025, 1, 1, 0, 0, 0], 0),
        NOW_MS,
    )
    .await;
    assert!(matches!(outcome, Outcome::Committed { .. }));
    pipeline.shutdown().await.unwrap();
    assert_eq!(state(&env.db()), (8, 8, 1, 6));
}

#[tokio::test]
async fn readings_carry_a_plausible_device_time_else_the_receive_time() {
    let env = Env::new("time").await;
    env.register("meter-1", METER, None).await;
    let pipeline = env.start(env.config()).await;
    let h = pipeline.handle();
    let rx_s = NOW_MS / 1000; // 2026-01-01T00:00:00Z
    let cases: [([u64; 6], i64, bool); 7] = [
        // An hour before receipt on the meter's clock (UTC+8).
        (china_clock(rx_s - 3600), rx_s - 3600, true),
        // 300 days before: buffered through an outage, believed.
        (china_clock(rx_s - 300 * 86_400), rx_s - 300 * 86_400, true),
        // The vendor example's 2015: a clock years behind.
        (china_clock(EXAMPLE_TIME_S), rx_s, false),
        // Up to a day ahead is believed (a clock in the wrong zone).
        (china_clock(rx_s + 86_400), rx_s + 86_400, true),
        (china_clock(rx_s + 86_401), rx_s, false),
        // 1999: an unset clock.
        ([1999, 12, 31, 23, 0, 0], rx_s, false),
        ([2099, 1, 1, 0, 0, 0], rx_s, false),
    ];
    for (clock, _, _) in &cases {
        send(&h, "meter-1", cjt188(1, 100, *clock, 0), NOW_MS).await;
    }
    pipeline.shutdown().await.unwrap();
    let db = env.db();
    let mut stmt = db
        .prepare("SELECT time_s, device_time FROM readings ORDER BY id")
        .unwrap();
    let got: Vec<(i64, bool)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let want: Vec<(i64, bool)> = cases.iter().map(|(_, t, d)| (*t, *d)).collect();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------------------
// Backpressure, store failure, shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_full_shard_queue_is_overloaded_at_once() {
    let env = Env::new("overload").await;
    env.register("meter-1", METER, None).await;
    let retry = Duration::from_secs(7);
    let pipeline = env
        .start(PipelineConfig {
            shards: 1,
            shard_queue: 1,
            writer_queue: 1,
            max_batch: 1,
            overload_retry_after: retry,
            ..env.config()
        })
        .await;
    let h = pipeline.handle();
    // On this single-threaded runtime the shard cannot run between these submits: the
    // first fills its one-slot queue, the others are refused without waiting.
    let (first, rx) = uplink("meter-1", unhex(EXAMPLE_HEX), NOW_MS);
    h.submit(first).unwrap();
    for _ in 0..20 {
        let (u, _) = uplink("meter-1", unhex(EXAMPLE_HEX), NOW_MS);
        assert_eq!(
            h.submit(u),
            Err(SubmitError::Overloaded { retry_after: retry })
        );
    }
    assert!(matches!(rx.await.unwrap(), Outcome::Committed { .. }));
    pipeline.shutdown().await.unwrap();
    assert_eq!(count(&env.db(), "SELECT count(*) FROM uplinks"), 1);
}

/// Holds SQLite's write lock from another connection, as an operator's shell could.
fn lock_store(env: &Env) -> Connection {
    let c = env.db();
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_backpressures_shards_and_then_submit() {
    let env = Env::new("backpressure").await;
    env.register("meter-1", METER, None).await;
    let pipeline = env
        .start(PipelineConfig {
            shards: 1,
            shard_queue: 2,
            writer_queue: 2,
            max_batch: 1,
            busy_timeout: Duration::from_secs(30),
            ..env.config()
        })
        .await;
    let h = pipeline.handle();
    let lock = lock_store(&env);
    // The writer waits for the lock with one job; its queue, the shard and the shard's queue
    // fill behind it; then submit refuses. Submit until 20 refusals in a row (100 ms
    // without room anywhere): at most 1 + 2 + 1 + 2 uplinks can have been taken in.
    let mut accepted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused_in_a_row = 0;
    while refused_in_a_row < 20 {
        assert!(Instant::now() < deadline, "submit never settled");
        let (u, rx) = uplink(
            "meter-1",
            unhex(EXAMPLE_HEX),
            NOW_MS + accepted.len() as i64,
        );
        match h.submit(u) {
            Ok(()) => {
                accepted.push(rx);
                refused_in_a_row = 0;
            }
            Err(SubmitError::Overloaded { .. }) => {
                refused_in_a_row += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        (3..=6).contains(&accepted.len()),
        "accepted {}",
        accepted.len()
    );
    // Nothing was answered while the store could not commit.
    for rx in &mut accepted {
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
    }
    drop(lock);
    for rx in accepted.iter_mut() {
        assert!(matches!(rx.await.unwrap(), Outcome::Committed { .. }));
    }
    pipeline.shutdown().await.unwrap();
    assert_eq!(
        count(&env.db(), "SELECT count(*) FROM uplinks"),
        accepted.len() as i64
    );
}

#[tokio::test]
async fn a_failing_store_answers_unavailable_and_recovers() {
    let env = Env::new("unavailable").await;
    env.register("meter-1", METER, None).await;
    let retry = Duration::from_secs(42);
    let pipeline = env
        .start(PipelineConfig {
            busy_timeout: Duration::from_millis(50),
            unavailable_retry_after: retry,
            ..env.config()
        })
        .await;
    let h = pipeline.handle();
    let lock = lock_store(&env);
    for i in 0..3 {
        let outcome = send(&h, "meter-1", unhex(EXAMPLE_HEX), NOW_MS + i).await;
        assert_eq!(
            outcome,
            Outcome::Rejected(Reject::Unavailable { retry_after: retry })
        );
    }
    drop(lock);
    let outcome = send(&h, "meter-1", unhex(EXAMPLE_HEX), NOW_MS + 3).await;
    assert!(matches!(outcome, Outcome::Committed { .. }));
    pipeline.shutdown().await.unwrap();
    let db = env.db();
    assert_eq!(count(&db, "SELECT count(*) FROM uplinks"), 1);
    assert_eq!(count(&db, "SELECT uplinks FROM device_state"), 1);
}

#[tokio::test]
async fn shutdown_commits_and_answers_everything_accepted() {
    let env = Env::new("drain").await;
    for d in 0..10 {
        env.register(&format!("m{d}"), METER, None).await;
    }
    let pipeline = env
        .start(PipelineConfig {
            // A long group-commit window: everything is still queued when shutdown starts.
            commit_interval: Duration::from_millis(200),
            ..env.config()
        })
        .await;
    let h = pipeline.handle();
    let mut replies = Vec::new();
    for i in 0..500i64 {
        let (u, rx) = uplink(&format!("m{}", i % 10), unhex(EXAMPLE_HEX), NOW_MS + i);
        h.submit(u).unwrap();
        replies.push(rx);
    }
    h.note_duplicate("m3");
    h.note_duplicate("m3");
    h.note_duplicate("nobody");
    pipeline.shutdown().await.unwrap();
    for rx in replies {
        assert!(matches!(rx.await.unwrap(), Outcome::Committed { .. }));
    }
    let (u, _) = uplink("m1", unhex(EXAMPLE_HEX), NOW_MS);
    assert_eq!(h.submit(u), Err(SubmitError::Closed));
    let db = env.db();
    assert_eq!(count(&db, "SELECT count(*) FROM uplinks"), 500);
    assert_eq!(count(&db, "SELECT count(*) FROM readings"), 500);
    assert_eq!(count(&db, "SELECT sum(uplinks) FROM device_state"), 500);
    assert_eq!(
        count(
            &db,
            "SELECT duplicates FROM device_state WHERE device = 'm3'"
        ),
        2
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM device_state WHERE device = 'nobody'"
        ),
        0
    );
}

// ---------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------

const DAY_MS: i64 = 86_400_000;

#[tokio::test]
async fn retention_deletes_old_rows_in_batches_and_spares_unforwarded_ones() {
    let env = Env::new("retention").await;
    env.register("meter-1", METER, None).await;
    let config = |forwarding| PipelineConfig {
        retention: Duration::from_secs(86_400),
        // The run at start sees a clock long before these uplinks: it deletes nothing.
        clock: Arc::new(|| NOW_MS - 100 * DAY_MS),
        // Only explicit runs here.
        retention_interval: Duration::from_secs(86_400 * 365),
        retention_batch: 7,
        forwarding,
        ..env.config()
    };
    let pipeline = env.start(config(false)).await;
    let h = pipeline.handle();
    // 30 uplinks 3 days old, then 20 from today.
    for i in 0..50i64 {
        let at = if i < 30 {
            NOW_MS - 3 * DAY_MS + i
        } else {
            NOW_MS + i
        };
        send(&h, "meter-1", unhex(EXAMPLE_HEX), at).await;
    }
    let db = env.db();
    assert_eq!(count(&db, "SELECT count(*) FROM readings"), 50);
    // By a clock two days back, nothing is a day old yet.
    let pruned = pipeline
        .prune_expired(NOW_MS - 2 * DAY_MS - 1)
        .await
        .unwrap();
    assert_eq!((pruned.uplinks, pruned.readings), (0, 0));
    let pruned = pipeline.prune_expired(NOW_MS).await.unwrap();
    assert_eq!((pruned.uplinks, pruned.readings), (30, 30));
    assert_eq!(count(&db, "SELECT count(*) FROM uplinks"), 20);
    assert_eq!(
        count(&db, "SELECT min(received_at_ms) FROM uplinks"),
        NOW_MS + 30
    );
    assert_eq!(count(&db, "SELECT count(*) FROM readings"), 20);
    // Device state stays.
    assert_eq!(count(&db, "SELECT uplinks FROM device_state"), 50);
    pipeline.shutdown().await.unwrap();

    // With forwarding configured, only what every forwarder has delivered goes.
    let pipeline = env.start(config(true)).await;
    let later = NOW_MS + 10 * DAY_MS;
    let pruned = pipeline.prune_expired(later).await.unwrap();
    assert_eq!(
        (pruned.uplinks, pruned.readings),
        (0, 0),
        "no cursor yet: nothing delivered"
    );
    let first = count(&db, "SELECT min(id) FROM readings");
    db.execute(
        "INSERT INTO forward_cursor (name, reading_id, updated_ms) VALUES ('influxdb', ?1, 0)",
        [first + 11],
    )
    .unwrap();
    let pruned = pipeline.prune_expired(later).await.unwrap();
    assert_eq!((pruned.uplinks, pruned.readings), (12, 12));
    assert_eq!(count(&db, "SELECT min(id) FROM readings"), first + 12);
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn retention_runs_periodically_on_its_clock() {
    let env = Env::new("retention-periodic").await;
    env.register("meter-1", METER, None).await;
    let clock = Arc::new(AtomicI64::new(NOW_MS));
    let pipeline = env
        .start(PipelineConfig {
            retention: Duration::from_secs(86_400),
            retention_interval: Duration::from_millis(20),
            clock: {
                let clock = Arc::clone(&clock);
                Arc::new(move || clock.load(Ordering::Relaxed))
            },
            ..env.config()
        })
        .await;
    let h = pipeline.handle();
    for i in 0..5 {
        send(&h, "meter-1", unhex(EXAMPLE_HEX), NOW_MS + i).await;
    }
    let db = env.db();
    // Nothing is a day old by this clock.
    assert_eq!(count(&db, "SELECT count(*) FROM uplinks"), 5);
    // Two days later by the clock: the next run deletes everything.
    clock.store(NOW_MS + 2 * DAY_MS, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&db, "SELECT count(*) FROM uplinks") > 0 {
        assert!(Instant::now() < deadline, "retention did not run");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count(&db, "SELECT count(*) FROM readings"), 0);
    // Ids are never reused after everything was deleted (the forwarder's cursor relies on it).
    send(&h, "meter-1", unhex(EXAMPLE_HEX), NOW_MS + 2 * DAY_MS).await;
    assert_eq!(count(&db, "SELECT id FROM readings"), 6);
    pipeline.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Query API over HTTP
// ---------------------------------------------------------------------------------------

struct Api {
    url: String,
    client: reqwest::Client,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Api {
    async fn start(env: &Env) -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let state = ApiState::new(env.registry.clone(), &[]);
        let shutdown = stop.clone().cancelled_owned();
        let task =
            tokio::spawn(async move { api::serve(listener, state, shutdown).await.unwrap() });
        Api {
            url,
            client: reqwest::Client::new(),
            stop,
            task,
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600;

#[tokio::test]
async fn latest_and_readings_with_hand_computed_downsampling() {
    let env = Env::new("api").await;
    env.register("meter-1", METER, None).await;
    env.register("meter-2", METER, None).await;
    env.register("quiet", METER, None).await;
    let pipeline = env.start(env.config()).await;
    let h = pipeline.handle();
    // (minutes after T0, volume in hundredths of m³, status word)
    let points = [
        (0, 100, 0x0000),
        (20, 200, 0x0001),
        (40, 450, 0x0000),
        (60, 1000, 0x0004),
        (90, 1100, 0x0000),
        (190, 2025, 0x0001),
    ];
    for (i, (min, vol, st)) in points.iter().enumerate() {
        let t = T0 + min * 60;
        let outcome = send(
            &h,
            "meter-1",
            cjt188(i as u8, *vol, china_clock(t), *st),
            (t + 5) * 1000,
        )
        .await;
        assert!(matches!(outcome, Outcome::Committed { readings: 1, .. }));
        // Another device in the same hours must not leak into meter-1's answers.
        send(
            &h,
            "meter-2",
            cjt188(i as u8, 99_999, china_clock(t), 0),
            (t + 5) * 1000,
        )
        .await;
    }
    // Then an undecodable uplink: it is the last error, but the last readings stay.
    let bad = unhex("68104433221100337881161f9000007766552c");
    let last_ms = (T0 + 200 * 60) * 1000 + 123;
    send(&h, "meter-1", bad, last_ms).await;
    h.note_duplicate("meter-1");
    pipeline.shutdown().await.unwrap();

    let api = Api::start(&env).await;
    let (status, latest) = api.get("/api/v1/devices/meter-1/latest").await;
    assert_eq!(status, 200, "{latest}");
    assert_eq!(
        latest,
        json!({
            "device": "meter-1",
            "profile": METER,
            "first_seen": "2026-01-01T00:00:05.000Z",
            "last_seen": "2026-01-01T03:20:00.123Z",
            "last_transport": "coap",
            "last_peer": "192.0.2.7:40001",
            "uplinks": 7,
            "duplicates": 1,
            "gaps": 0,
            "counter_resets": 0,
            "last_sequence": 5,
            "last_error": {
                "code": "truncated",
                "message": "payload truncated: data at byte 11 needs 14 more byte(s)",
                "time": "2026-01-01T03:20:00.123Z"
            },
            "readings": [{
                "measurement": "water_meter",
                "time": "2026-01-01T03:10:00Z",
                "time_source": "device",
                "fields": {
                    "meter_type": 16, "address": "78330011223344", "ctrl": 129, "response": true,
                    "abnormal": false, "function": 1, "di": 36895, "ser": 5,
                    "volume_m3": 20.25, "volume_unit_code": 44,
                    "settlement_volume_m3": 20.25, "settlement_volume_unit_code": 44,
                    "status": 1, "valve_open": false, "valve_fault": false, "battery_low": false
                }
            }]
        })
    );
    let (status, quiet) = api.get("/api/v1/devices/quiet/latest").await;
    assert_eq!(status, 200);
    assert_eq!(quiet["uplinks"], json!(0));
    assert_eq!(quiet["last_seen"], Value::Null);
    assert_eq!(quiet["readings"], json!([]));

    let range = "from=2026-01-01T00:00:00Z&to=2026-01-01T16:00:00%2B08:00";
    let (status, raw) = api
        .get(&format!(
            "/api/v1/devices/meter-1/readings?{range}&fields=volume_m3,status"
        ))
        .await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(
        raw,
        json!({
            "device": "meter-1",
            "readings": [
                {"time": "2026-01-01T00:00:00Z", "fields": {"volume_m3": 1.0, "status": 0}},
                {"time": "2026-01-01T00:20:00Z", "fields": {"volume_m3": 2.0, "status": 1}},
                {"time": "2026-01-01T00:40:00Z", "fields": {"volume_m3": 4.5, "status": 0}},
                {"time": "2026-01-01T01:00:00Z", "fields": {"volume_m3": 10.0, "status": 4}},
                {"time": "2026-01-01T01:30:00Z", "fields": {"volume_m3": 11.0, "status": 0}},
                {"time": "2026-01-01T03:10:00Z", "fields": {"volume_m3": 20.25, "status": 1}}
            ],
            "truncated": false
        })
    );
    // Inclusive bounds, limit and truncation.
    let (_, page) = api
        .get("/api/v1/devices/meter-1/readings?from=2026-01-01T00:20:00Z&to=2026-01-01T01:00:00Z&limit=2&fields=volume_m3")
        .await;
    assert_eq!(
        page["readings"],
        json!([
            {"time": "2026-01-01T00:20:00Z", "fields": {"volume_m3": 2.0}},
            {"time": "2026-01-01T00:40:00Z", "fields": {"volume_m3": 4.5}}
        ])
    );
    assert_eq!(page["truncated"], json!(true));
    // Without `fields`: every field, as stored.
    let (_, all) = api
        .get(&format!("/api/v1/devices/meter-1/readings?{range}&limit=1"))
        .await;
    assert_eq!(all["readings"][0]["fields"]["battery_low"], json!(false));
    assert_eq!(all["readings"][0]["fields"].as_object().unwrap().len(), 16);

    // Buckets of 1 h, by hand:
    //   00:00 → 1.00, 2.00, 4.50 | status 0, 1, 0 | valve_open true, false, true
    //   01:00 → 10.00, 11.00     | status 4, 0    | valve_open true, true
    //   02:00 → nothing (left out)
    //   03:00 → 20.25            | status 1       | valve_open false
    let agg = |a: &str| {
        format!("/api/v1/devices/meter-1/readings?{range}&step=1h&agg={a}&fields=volume_m3,status,valve_open,address")
    };
    let expect = |a: &str, b0: Value, b1: Value, b3: Value| {
        json!({
            "device": "meter-1", "step": "1h", "agg": a, "truncated": false,
            "buckets": [
                {"time": "2026-01-01T00:00:00Z", "fields": b0},
                {"time": "2026-01-01T01:00:00Z", "fields": b1},
                {"time": "2026-01-01T03:00:00Z", "fields": b3}
            ]
        })
    };
    let cases = [
        (
            "mean",
            json!({"volume_m3": 2.5, "status": 1.0 / 3.0, "valve_open": 2.0 / 3.0}),
            json!({"volume_m3": 10.5, "status": 2.0, "valve_open": 1.0}),
            json!({"volume_m3": 20.25, "status": 1.0, "valve_open": 0.0}),
        ),
        (
            "min",
            json!({"volume_m3": 1.0, "status": 0, "valve_open": 0}),
            json!({"volume_m3": 10.0, "status": 0, "valve_open": 1}),
            json!({"volume_m3": 20.25, "status": 1, "valve_open": 0}),
        ),
        (
            "max",
            json!({"volume_m3": 4.5, "status": 1, "valve_open": 1}),
            json!({"volume_m3": 11.0, "status": 4, "valve_open": 1}),
            json!({"volume_m3": 20.25, "status": 1, "valve_open": 0}),
        ),
        (
            "last",
            json!({"address": "78330011223344", "volume_m3": 4.5, "status": 0, "valve_open": true}),
            json!({"address": "78330011223344", "volume_m3": 11.0, "status": 0, "valve_open": true}),
            json!({"address": "78330011223344", "volume_m3": 20.25, "status": 1, "valve_open": false}),
        ),
        (
            "count",
            json!({"address": 3, "volume_m3": 3, "status": 3, "valve_open": 3}),
            json!({"address": 2, "volume_m3": 2, "status": 2, "valve_open": 2}),
            json!({"address": 1, "volume_m3": 1, "status": 1, "valve_open": 1}),
        ),
    ];
    // Text (`address`) has no mean, min or max: it is left out of those buckets.
    for (a, b0, b1, b3) in cases {
        let (status, got) = api.get(&agg(a)).await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(got, expect(a, b0, b1, b3), "agg={a}");
    }
    // `step` alone means mean; bucket limit truncates.
    let (_, got) = api
        .get(&format!(
            "/api/v1/devices/meter-1/readings?{range}&step=1h&fields=volume_m3&limit=2"
        ))
        .await;
    assert_eq!(got["agg"], json!("mean"));
    assert_eq!(got["buckets"].as_array().unwrap().len(), 2);
    assert_eq!(got["truncated"], json!(true));

    // Errors.
    let (status, err) = api.get("/api/v1/devices/ghost/readings").await;
    assert_eq!(
        (status, err["detail"]["device"].clone()),
        (404, json!("ghost"))
    );
    let (status, _) = api.get("/api/v1/devices/ghost/latest").await;
    assert_eq!(status, 404);
    for (query, want) in [
        ("from=yesterday", "`from=yesterday` is not a time"),
        ("limit=100001", "from 1 to 100000"),
        ("agg=mean", "`agg` needs `step`"),
        ("step=1h&agg=median", "`agg=median` is not one of"),
        ("step=0s", "at least 1s"),
        (
            "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
            "is after `to`",
        ),
        ("colour=blue", "unknown query parameter `colour`"),
    ] {
        let (status, err) = api
            .get(&format!("/api/v1/devices/meter-1/readings?{query}"))
            .await;
        assert_eq!(status, 400, "{query}: {err}");
        let msg = err["error"].as_str().unwrap();
        assert!(msg.contains(want), "{query}: {msg}");
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_over_30_days() {
    const EVERY_S: i64 = 300;
    const N: i64 = 30 * 86_400 / EVERY_S; // 8640
    let env = Env::new("dashboard").await;
    for d in ["meter-a", "meter-b", "meter-c"] {
        env.register(d, METER, None).await;
    }
    let pipeline = env
        .start(PipelineConfig {
            commit_interval: Duration::from_millis(5),
            ..env.config()
        })
        .await;
    let h = pipeline.handle();
    let started = Instant::now();
    for i in 0..N {
        let t = T0 + i * EVERY_S;
        for (k, d) in ["meter-a", "meter-b", "meter-c"].iter().enumerate() {
            let frame = cjt188(
                (i % 256) as u8,
                (i as u64) * 10 + k as u64,
                china_clock(t),
                0,
            );
            let (mut u, _) = uplink(d, frame, (t + 2) * 1000);
            u.reply = None;
            h.submit_wait(u).await.unwrap();
        }
    }
    pipeline.shutdown().await.unwrap();
    eprintln!(
        "ingested {} uplinks (3 devices x 30 days x 5 min) in {:?}",
        3 * N,
        started.elapsed()
    );
    assert_eq!(
        count(
            &env.db(),
            "SELECT count(*) FROM readings WHERE device = 'meter-a'"
        ),
        N
    );

    let api = Api::start(&env).await;
    let full = "/api/v1/devices/meter-a/readings?from=2026-01-01T00:00:00Z&to=2026-01-31T00:00:00Z&limit=100000";
    let step = "/api/v1/devices/meter-a/readings?from=2026-01-01T00:00:00Z&to=2026-01-31T00:00:00Z&step=1h&agg=mean";
    let time = |path: &'static str| {
        let api = &api;
        async move {
            let mut best = Duration::MAX;
            let mut body = Value::Null;
            for _ in 0..5 {
                let t = Instant::now();
                let (status, b) = api.get(path).await;
                best = best.min(t.elapsed());
                assert_eq!(status, 200);
                body = b;
            }
            (best, body)
        }
    };
    let (full_t, body) = time(full).await;
    let readings = body["readings"].as_array().unwrap();
    assert_eq!(readings.len() as i64, N);
    assert_eq!(readings[1]["time"], json!("2026-01-01T00:05:00Z"));
    assert_eq!(readings[1]["fields"]["volume_m3"], json!(0.1));
    let (step_t, body) = time(step).await;
    let buckets = body["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 720);
    // Hour h holds i = 12h .. 12h+11, volume i/10 m³: mean (12h + 5.5) / 10.
    for (h, b) in buckets.iter().enumerate() {
        let mean = b["fields"]["volume_m3"].as_f64().unwrap();
        let want = (12.0 * h as f64 + 5.5) / 10.0;
        assert!((mean - want).abs() < 1e-9, "hour {h}: {mean} != {want}");
    }
    eprintln!(
        "query latency (best of 5, HTTP included): full range {} readings {:?}; step=1h agg=mean {} buckets {:?}",
        readings.len(),
        full_t,
        buckets.len(),
        step_t
    );
    // Generous: a debug build on a loaded CI machine.
    assert!(full_t < Duration::from_secs(5), "{full_t:?}");
    assert!(step_t < Duration::from_secs(5), "{step_t:?}");
    api.stop().await;
}

/// A sustained stream for 1000 devices through the pipeline and the durable group commit:
/// every outcome is a commit. (It prints the rate; the measured figure comes from
/// `cargo bench --bench pipeline` and `nbiot-load`, not from this test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput() {
    const TOTAL: usize = 20_000;
    let env = Env::new("throughput").await;
    for d in 0..1000 {
        env.register(&format!("m{d:04}"), METER, None).await;
    }
    let pipeline = env
        .start(PipelineConfig {
            commit_interval: Duration::from_millis(5),
            ..PipelineConfig::default()
        })
        .await;
    let h = pipeline.handle();
    let frame = Bytes::from(unhex(EXAMPLE_HEX));
    let started = Instant::now();
    let mut replies = Vec::with_capacity(TOTAL);
    for i in 0..TOTAL {
        let (u, rx) = uplink(&format!("m{:04}", i % 1000), frame.clone(), NOW_MS);
        h.submit_wait(u).await.unwrap();
        replies.push(rx);
    }
    for rx in replies {
        assert!(matches!(rx.await.unwrap(), Outcome::Committed { .. }));
    }
    let elapsed = started.elapsed();
    pipeline.shutdown().await.unwrap();
    eprintln!(
        "throughput: {TOTAL} uplinks committed in {elapsed:?} = {:.0} uplinks/s",
        TOTAL as f64 / elapsed.as_secs_f64()
    );
}
