//! Alert rules on the ingest path: the real `Pipeline` over a real SQLite file, the shipped
//! `milesight-em300-mcs` profile (manhole cover: `cover_open` is critical), real payloads.
//!
//! - a reading that triggers a rule commits its transition with the uplink, and the
//!   AlertEvent (carrying the transition's id) is out when the device gets its ack;
//! - a failed commit keeps neither the uplink nor the transition, and the device's retry
//!   commits both (the transition exactly once);
//! - a full notifier queue never holds up ingest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nbiot_gateway::alerts::{AlertEvent, AlertState};
use nbiot_gateway::pipeline::{Outcome, Pipeline, PipelineConfig, Reject, Transport, Uplink};
use nbiot_gateway::profiles::{self, Severity, SharedProfiles};
use nbiot_gateway::registry::{DeviceSpec, PutMode, Registry, TokenUpdate};
use nbiot_gateway::store::Store;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbiot-rules-ingest-{tag}-{}-{}",
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

const COVER: &str = "milesight-em300-mcs";
/// Vendor README frame: battery 92 %, 30.8 °C, 50.5 %, magnet open.
const OPEN: &str = "01755c03673401046865060001";
/// The same with the magnet closed.
const CLOSED: &str = "01755c03673401046865060000";
/// 2026-01-01T00:00:00.250Z.
const NOW_MS: i64 = 1_767_225_600_250;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

struct Env {
    registry: Registry,
    _dir: TempDir,
}

impl Env {
    async fn new(tag: &str) -> Env {
        let dir = TempDir::new(tag);
        let profiles_dir = dir.0.join("profiles");
        std::fs::create_dir_all(&profiles_dir).unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
        std::fs::copy(
            shipped.join(format!("{COVER}.toml")),
            profiles_dir.join(format!("{COVER}.toml")),
        )
        .unwrap();
        let report = profiles::load_dir(&profiles_dir);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let store = Arc::new(Store::open(&dir.0.join("gateway.db")).unwrap());
        let registry = Registry::open(store, SharedProfiles::new(report.set))
            .await
            .unwrap();
        let spec = DeviceSpec {
            profile: COVER.into(),
            labels: BTreeMap::from([
                ("district".to_owned(), "north".to_owned()),
                ("site".to_owned(), "mh-17".to_owned()),
            ]),
            params: BTreeMap::new(),
            token: TokenUpdate::Keep,
        };
        registry
            .put("cover-1", spec, PutMode::Upsert)
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

    async fn start(&self, events: mpsc::Sender<AlertEvent>, busy_timeout: Duration) -> Pipeline {
        let config = PipelineConfig {
            shards: 2,
            commit_interval: Duration::from_millis(1),
            retention: Duration::ZERO,
            busy_timeout,
            alert_events: Some(events),
            ..PipelineConfig::default()
        };
        Pipeline::start(config, self.registry.clone())
            .await
            .unwrap()
    }
}

async fn send(pipeline: &Pipeline, hex: &str, at_ms: i64) -> Outcome {
    let (tx, rx) = oneshot::channel();
    let u = Uplink {
        device: "cover-1".into(),
        payload: Bytes::from(unhex(hex)),
        transport: Transport::Coap,
        peer: Some("192.0.2.7:40001".parse().unwrap()),
        received_at_ms: at_ms,
        token: None,
        reply: Some(tx),
    };
    pipeline.handle().submit_wait(u).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("an outcome within 30 s")
        .unwrap()
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

type TransitionRow = (
    i64,
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<f64>,
    String,
);

fn transitions(conn: &Connection) -> Vec<TransitionRow> {
    let mut stmt = conn
        .prepare(
            "SELECT id, device, profile, rule, severity, state, time_ms, starts_ms, value, summary \
             FROM alert_transitions ORDER BY id",
        )
        .unwrap();
    stmt.query_map([], |r| {
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
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[tokio::test]
async fn a_reading_that_triggers_a_rule_commits_its_transition_with_the_uplink() {
    let env = Env::new("commit").await;
    let (tx, mut rx) = mpsc::channel(16);
    let pipeline = env.start(tx, Duration::from_secs(5)).await;

    let out = send(&pipeline, OPEN, NOW_MS).await;
    assert_eq!(
        out,
        Outcome::Committed {
            readings: 1,
            downlink: None
        }
    );
    // When the device has its ack, the event is already out: it is sent right after COMMIT.
    let event = rx.try_recv().expect("the event, sent before the ack");
    let db = env.db();
    let at_ms = NOW_MS / 1000 * 1000; // the reading's time: the receive time, in seconds
    assert_eq!(
        transitions(&db),
        vec![(
            event.id,
            "cover-1".to_owned(),
            COVER.to_owned(),
            "cover_open".to_owned(),
            "critical".to_owned(),
            "firing".to_owned(),
            at_ms,
            Some(at_ms),
            Some(1.0),
            "Manhole cover cover-1 is open".to_owned(),
        )]
    );
    assert_eq!(
        event,
        AlertEvent {
            id: event.id,
            device: "cover-1".into(),
            profile: COVER.into(),
            rule: "cover_open".into(),
            severity: Severity::Critical,
            state: AlertState::Firing,
            at_ms,
            starts_ms: Some(at_ms),
            received_at_ms: Some(NOW_MS),
            value: Some(1.0),
            summary: "Manhole cover cover-1 is open".into(),
            labels: vec![
                ("district".into(), "north".into()),
                ("site".into(), "mh-17".into()),
            ],
        }
    );
    assert_eq!(count(&db, "SELECT count(*) FROM uplinks"), 1);
    assert_eq!(
        db.query_row(
            "SELECT state, severity, active_since_ms, firing_since_ms FROM alert_state WHERE device = 'cover-1' AND rule = 'cover_open'",
            [],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<i64>>(3)?)),
        )
        .unwrap(),
        ("firing".to_owned(), "critical".to_owned(), at_ms, Some(at_ms))
    );

    // Still open: no new transition. Closed: resolved, the state row is gone.
    send(&pipeline, OPEN, NOW_MS + 60_000).await;
    send(&pipeline, CLOSED, NOW_MS + 120_000).await;
    let resolved = rx.try_recv().expect("the resolved event");
    assert_eq!(
        (resolved.rule.as_str(), resolved.state),
        ("cover_open", AlertState::Resolved)
    );
    assert_eq!(resolved.starts_ms, Some(at_ms));
    assert!(rx.try_recv().is_err());
    let rows = transitions(&db);
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[1].0, rows[1].5.as_str()), (resolved.id, "resolved"));
    assert_eq!(count(&db, "SELECT count(*) FROM alert_state"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM uplinks"), 3);
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failed_commit_keeps_neither_and_the_retry_commits_both_once() {
    let env = Env::new("fail").await;
    let (tx, mut rx) = mpsc::channel(16);
    // The writer waits at most 50 ms for the write lock.
    let pipeline = env.start(tx, Duration::from_millis(50)).await;

    // Someone holds the write lock (an operator's sqlite3 shell in a transaction).
    let blocker = env.db();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let out = send(&pipeline, OPEN, NOW_MS).await;
    assert!(
        matches!(out, Outcome::Rejected(Reject::Unavailable { .. })),
        "{out:?}"
    );
    assert!(
        rx.try_recv().is_err(),
        "no event for an uncommitted transition"
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    let db = env.db();
    assert_eq!(count(&db, "SELECT count(*) FROM uplinks"), 0);
    assert_eq!(count(&db, "SELECT count(*) FROM alert_transitions"), 0);

    // The device retries the same reading: its uplink and the transition commit together.
    let out = send(&pipeline, OPEN, NOW_MS + 5_000).await;
    assert_eq!(
        out,
        Outcome::Committed {
            readings: 1,
            downlink: None
        }
    );
    let event = rx.try_recv().expect("the event of the carried transition");
    assert_eq!(
        (event.rule.as_str(), event.state),
        ("cover_open", AlertState::Firing)
    );
    assert!(rx.try_recv().is_err(), "exactly one firing");
    let rows = transitions(&db);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, event.id);
    assert_eq!(count(&db, "SELECT count(*) FROM uplinks"), 1);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM alert_state WHERE state = 'firing'"
        ),
        1
    );
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_full_notifier_queue_never_holds_up_ingest() {
    let env = Env::new("full").await;
    let (tx, mut rx) = mpsc::channel(1);
    let pipeline = env.start(tx, Duration::from_secs(5)).await;
    // open, closed, open, closed: four transitions, room for one event.
    for (i, hex) in [OPEN, CLOSED, OPEN, CLOSED].into_iter().enumerate() {
        let out = send(&pipeline, hex, NOW_MS + i as i64 * 60_000).await;
        assert_eq!(
            out,
            Outcome::Committed {
                readings: 1,
                downlink: None
            }
        );
    }
    let first = rx.try_recv().unwrap();
    assert_eq!(first.state, AlertState::Firing);
    assert!(rx.try_recv().is_err());
    // The store has every transition: it is the record the notifier reloads from.
    assert_eq!(transitions(&env.db()).len(), 4);
    pipeline.shutdown().await.unwrap();
}
