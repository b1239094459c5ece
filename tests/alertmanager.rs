//! Alert delivery against a real Alertmanager (Debian `prometheus-alertmanager`, started by
//! each test on a loopback port chosen at run time, with its own config and storage in a
//! temp dir), and `GET /api/v1/alerts` over a real store.
//!
//! The notifier runs as the gateway runs it (`alerts::start_notifier`: the reqwest client,
//! the store source reading `alert_state` / `alert_transitions` through its own read
//! connection, labels from the registry). Every outcome is asserted through Alertmanager's
//! own API (`GET /api/v2/alerts`, which lists the alerts that are active: an alert whose
//! `endsAt` has passed — resolved — is no longer listed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbiot_gateway::alerts::{self, AlertEvent, AlertState, NotifierHandle, NotifierSettings};
use nbiot_gateway::api::{self, ApiState};
use nbiot_gateway::config::{Role, TokenConfig};
use nbiot_gateway::health::Health;
use nbiot_gateway::profiles::{self, Severity, SharedProfiles};
use nbiot_gateway::registry::{DeviceSpec, PutMode, Registry, TokenUpdate};
use nbiot_gateway::store::Store;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);
const PROFILE: &str = "manhole-test";
const READER: &str = "alerts-reader-token";

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbiot-alertmanager-{tag}-{}-{}",
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Parses Alertmanager's RFC 3339 times (`2026-11-21T11:41:27.080Z`, fraction optional).
fn parse_ms(s: &str) -> i64 {
    let s = s.trim_end_matches('Z');
    let (secs, frac) = s.split_once('.').unwrap_or((s, "0"));
    let t = api::readings::parse_time(&format!("{secs}Z")).unwrap();
    let frac = format!("{frac:0<3}");
    t * 1000 + frac[..3].parse::<i64>().unwrap()
}

/// A real Alertmanager, killed on drop.
struct Alertmanager {
    child: Child,
    url: String,
    client: reqwest::Client,
}

impl Alertmanager {
    /// Starts it on `port` with storage under `dir` and waits until `/-/ready` answers.
    async fn start(dir: &Path, port: u16) -> Alertmanager {
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: blackhole\n  group_wait: 1s\nreceivers:\n  - name: blackhole\n",
        )
        .unwrap();
        let log = std::fs::File::create(dir.join(format!("alertmanager-{port}.log"))).unwrap();
        let child = Command::new("/usr/bin/prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("am-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // No cluster: no gossip port, no peers.
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start /usr/bin/prometheus-alertmanager (Debian prometheus-alertmanager)");
        let am = Alertmanager {
            child,
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            let ready = am
                .client
                .get(format!("{}/-/ready", am.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return am;
            }
            assert!(Instant::now() < deadline, "Alertmanager never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The active alerts.
    async fn alerts(&self) -> Vec<Value> {
        let r = self
            .client
            .get(format!("{}/api/v2/alerts", self.url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.json::<Vec<Value>>().await.unwrap()
    }

    /// The active alert of `device`'s `rule`, if any.
    async fn alert(&self, device: &str, rule: &str) -> Option<Value> {
        self.alerts()
            .await
            .into_iter()
            .find(|a| a["labels"]["device"] == device && a["labels"]["alertname"] == rule)
    }

    /// Polls the active alerts until `pred` holds.
    async fn wait(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let alerts = self.alerts().await;
            if pred(&alerts) {
                return alerts;
            }
            assert!(
                Instant::now() < deadline,
                "Alertmanager never showed {what}; active: {alerts:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post(&self, body: Value) {
        let r = self
            .client
            .post(format!("{}/api/v2/alerts", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store with the test profile loaded and devices registered.
struct Env {
    registry: Registry,
    db: PathBuf,
    dir: TempDir,
}

impl Env {
    async fn new(tag: &str) -> Env {
        let dir = TempDir::new(tag);
        let profiles_dir = dir.0.join("profiles");
        std::fs::create_dir_all(&profiles_dir).unwrap();
        std::fs::write(
            profiles_dir.join(format!("{PROFILE}.toml")),
            format!(
                "name = \"{PROFILE}\"\ndescription = \"test\"\nmeasurement = \"manhole\"\ncodec = \"dragino\"\n"
            ),
        )
        .unwrap();
        let report = profiles::load_dir(&profiles_dir);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let db = dir.0.join("data/gateway.db");
        let store = Arc::new(Store::open(&db).unwrap());
        let registry = Registry::open(store, SharedProfiles::new(report.set))
            .await
            .unwrap();
        Env { registry, db, dir }
    }

    async fn register(&self, id: &str, labels: &[(&str, &str)]) {
        let spec = DeviceSpec {
            profile: PROFILE.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            params: BTreeMap::new(),
            token: TokenUpdate::Keep,
        };
        self.registry.put(id, spec, PutMode::Upsert).await.unwrap();
    }

    fn conn(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    /// Commits a transition as the pipeline's writer would (the transition row and the
    /// `alert_state` row in one transaction) and returns the event it would send.
    fn commit(
        &self,
        device: &str,
        rule: &str,
        severity: Severity,
        state: AlertState,
        starts_ms: i64,
        at_ms: i64,
    ) -> AlertEvent {
        let mut conn = self.conn();
        let tx = conn.transaction().unwrap();
        tx.execute(
            "INSERT INTO alert_transitions (device, profile, rule, severity, state, time_ms,
               starts_ms, value, summary) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1.0, ?8)",
            rusqlite::params![
                device,
                PROFILE,
                rule,
                severity.as_str(),
                state.as_str(),
                at_ms,
                (state != AlertState::Pending).then_some(starts_ms),
                format!("{rule} on {device}")
            ],
        )
        .unwrap();
        let id = tx.last_insert_rowid();
        match state {
            AlertState::Resolved => {
                tx.execute(
                    "DELETE FROM alert_state WHERE device = ?1 AND rule = ?2",
                    [device, rule],
                )
                .unwrap();
            }
            AlertState::Pending | AlertState::Firing => {
                tx.execute(
                    "INSERT INTO alert_state (device, rule, profile, state, severity,
                       active_since_ms, firing_since_ms, value, summary, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1.0, ?8, ?9)
                     ON CONFLICT (device, rule) DO UPDATE SET state = excluded.state,
                       firing_since_ms = excluded.firing_since_ms, updated_ms = excluded.updated_ms",
                    rusqlite::params![
                        device,
                        rule,
                        PROFILE,
                        state.as_str(),
                        severity.as_str(),
                        starts_ms,
                        (state == AlertState::Firing).then_some(starts_ms),
                        format!("{rule} on {device}"),
                        at_ms
                    ],
                )
                .unwrap();
            }
        }
        tx.commit().unwrap();
        let labels = self
            .registry
            .get(device)
            .map(|d| {
                d.labels()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        AlertEvent {
            id,
            device: device.into(),
            profile: PROFILE.into(),
            rule: rule.into(),
            severity,
            state,
            at_ms,
            starts_ms: (state != AlertState::Pending).then_some(starts_ms),
            received_at_ms: Some(at_ms),
            value: Some(1.0),
            summary: format!("{rule} on {device}"),
            labels,
        }
    }
}

fn settings(am_url: &str, resend: Duration) -> NotifierSettings {
    NotifierSettings {
        coalesce: Duration::from_millis(100),
        ..NotifierSettings::new(am_url, resend)
    }
}

fn start(
    env: &Env,
    settings: NotifierSettings,
) -> (mpsc::Sender<AlertEvent>, NotifierHandle, Health) {
    let health = Health::default();
    let (tx, handle) = alerts::start_notifier(settings, &env.registry, health.clone()).unwrap();
    (tx, handle, health)
}

// ---------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn alerts_fire_with_their_labels_and_resolve() {
    let env = Env::new("fire").await;
    env.register("mh-1", &[("district", "north"), ("severity", "high")])
        .await;
    let am = Alertmanager::start(&env.dir.0, free_port()).await;
    let resend = Duration::from_secs(60);
    let (tx, notifier, health) = start(&env, settings(&am.url, resend));

    let t = now_ms();
    tx.send(env.commit(
        "mh-1",
        "cover_open",
        Severity::Critical,
        AlertState::Firing,
        t,
        t,
    ))
    .await
    .unwrap();
    // Pending transitions are not pushed.
    tx.send(env.commit(
        "mh-1",
        "tilted",
        Severity::Warning,
        AlertState::Pending,
        t,
        t,
    ))
    .await
    .unwrap();
    am.wait("cover_open firing", |a| a.len() == 1).await;
    let alert = am.alert("mh-1", "cover_open").await.unwrap();
    assert_eq!(
        alert["labels"],
        json!({
            "alertname": "cover_open",
            "device": "mh-1",
            "profile": PROFILE,
            "severity": "critical",
            "district": "north",
            // The device's own `severity` label cannot override ours.
            "exported_severity": "high",
        })
    );
    assert_eq!(alert["annotations"]["summary"], "cover_open on mh-1");
    assert_eq!(alert["annotations"]["value"], "1");
    assert!(alert["annotations"]["description"]
        .as_str()
        .unwrap()
        .starts_with("Rule cover_open of profile manhole-test on device mh-1: firing since "));
    assert_eq!(parse_ms(alert["startsAt"].as_str().unwrap()), t);
    // endsAt: 4 × resend_interval ahead, so Alertmanager keeps it only while we resend.
    let ends = parse_ms(alert["endsAt"].as_str().unwrap());
    let ahead = ends - now_ms();
    assert!(
        (230_000..=240_000).contains(&ahead),
        "endsAt {ahead} ms ahead"
    );
    assert_eq!(alert["status"]["state"], "active");
    assert!(health.snapshot()["alertmanager"].ok);

    // Resolved: gone from the active alerts long before its endsAt (4 minutes) would.
    let resolved_at = now_ms();
    tx.send(env.commit(
        "mh-1",
        "cover_open",
        Severity::Critical,
        AlertState::Resolved,
        t,
        resolved_at,
    ))
    .await
    .unwrap();
    am.wait("cover_open resolved", |a| a.is_empty()).await;
    assert!(now_ms() - resolved_at < 10_000);
    notifier.shutdown().await;
}

#[tokio::test]
async fn alertmanager_down_at_first_gets_the_alert_when_it_starts() {
    let env = Env::new("down").await;
    env.register("mh-2", &[]).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (tx, notifier, health) = start(&env, settings(&url, Duration::from_secs(60)));
    let t = now_ms();
    tx.send(env.commit("mh-2", "sos", Severity::Critical, AlertState::Firing, t, t))
        .await
        .unwrap();
    // The notifier sees Alertmanager down (connection refused) and says so in /readyz.
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(check) = health.snapshot().get("alertmanager") {
            if !check.ok {
                assert!(!check.critical, "ingest does not depend on Alertmanager");
                assert!(
                    check.detail["error"]
                        .as_str()
                        .unwrap()
                        .starts_with("cannot reach Alertmanager"),
                    "{check:?}"
                );
                assert_eq!(check.detail["undelivered"], 1, "{check:?}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never reported Alertmanager down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let am = Alertmanager::start(&env.dir.0, port).await;
    let alerts = am.wait("sos after the retry", |a| a.len() == 1).await;
    assert_eq!(alerts[0]["labels"]["alertname"], "sos");
    assert_eq!(parse_ms(alerts[0]["startsAt"].as_str().unwrap()), t);
    let deadline = Instant::now() + DEADLINE;
    while !health.snapshot()["alertmanager"].ok {
        assert!(Instant::now() < deadline, "health never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    notifier.shutdown().await;
}

#[tokio::test]
async fn resends_keep_a_firing_alert_alive_across_an_alertmanager_restart() {
    let env = Env::new("resend").await;
    env.register("mh-3", &[]).await;
    let port = free_port();
    let am = Alertmanager::start(&env.dir.0, port).await;
    // endsAt = now + 4 s: without resends Alertmanager resolves it by itself after 4 s.
    let (tx, notifier, _health) = start(&env, settings(&am.url, Duration::from_secs(1)));
    let t = now_ms();
    tx.send(env.commit("mh-3", "leak", Severity::Warning, AlertState::Firing, t, t))
        .await
        .unwrap();
    am.wait("leak firing", |a| a.len() == 1).await;
    let first_ends = parse_ms(
        am.alert("mh-3", "leak").await.unwrap()["endsAt"]
            .as_str()
            .unwrap(),
    );
    // Still active well past the first endsAt, at every look, with endsAt moving on.
    let mut last_ends = first_ends;
    while now_ms() < first_ends + 3_000 {
        let alert = am
            .alert("mh-3", "leak")
            .await
            .expect("the alert stays active while it is re-sent");
        last_ends = parse_ms(alert["endsAt"].as_str().unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        last_ends >= first_ends + 3_000,
        "{first_ends} → {last_ends}"
    );

    // Alertmanager keeps alerts in memory only: a restart forgets them, the next resend
    // (or the retry after the failed one) brings it back.
    am.kill();
    let am = Alertmanager::start(&env.dir.0, port).await;
    let alerts = am
        .wait("leak again after the restart", |a| a.len() == 1)
        .await;
    assert_eq!(
        parse_ms(alerts[0]["startsAt"].as_str().unwrap()),
        t,
        "same alert"
    );
    notifier.shutdown().await;
}

#[tokio::test]
async fn a_restarted_notifier_reloads_firing_alerts_and_recent_resolutions() {
    let env = Env::new("restart").await;
    env.register("mh-4", &[("district", "south")]).await;
    env.register("mh-5", &[]).await;
    let am = Alertmanager::start(&env.dir.0, free_port()).await;
    let t = now_ms() - 60_000;
    // Committed while no notifier ran (the previous process crashed after the commits).
    env.commit(
        "mh-4",
        "offline",
        Severity::Warning,
        AlertState::Firing,
        t,
        t,
    );
    env.commit("mh-5", "leak", Severity::Warning, AlertState::Firing, t, t);
    let resolved = env.commit(
        "mh-5",
        "leak",
        Severity::Warning,
        AlertState::Resolved,
        t,
        now_ms() - 10_000,
    );
    // The previous process had pushed mh-5's leak as firing.
    let labels = alerts::alertmanager::labels("leak", "mh-5", PROFILE, "warning", []);
    am.post(json!([{
        "labels": labels,
        "startsAt": "2026-01-01T00:00:00.000Z",
        "endsAt": "2099-01-01T00:00:00.000Z",
    }]))
    .await;
    assert!(am.alert("mh-5", "leak").await.is_some());

    let (_tx, notifier, _health) = start(&env, settings(&am.url, Duration::from_secs(60)));
    let alerts = am
        .wait("mh-4 firing and mh-5 resolved", |a| {
            a.len() == 1 && a[0]["labels"]["device"] == "mh-4"
        })
        .await;
    assert_eq!(
        alerts[0]["labels"],
        json!({"alertname": "offline", "device": "mh-4", "profile": PROFILE,
               "severity": "warning", "district": "south"})
    );
    assert_eq!(parse_ms(alerts[0]["startsAt"].as_str().unwrap()), t);
    assert!(resolved.id > 0);
    notifier.shutdown().await;
}

#[tokio::test]
async fn a_queue_overflow_is_repaired_from_the_store() {
    let env = Env::new("overflow").await;
    for i in 0..20 {
        env.register(&format!("d{i}"), &[("district", "east")])
            .await;
    }
    env.register("old", &[]).await;
    let am = Alertmanager::start(&env.dir.0, free_port()).await;
    let (tx, notifier, _health) = start(
        &env,
        NotifierSettings {
            queue: 4,
            ..settings(&am.url, Duration::from_secs(60))
        },
    );
    let t = now_ms();
    tx.send(env.commit("old", "leak", Severity::Critical, AlertState::Firing, t, t))
        .await
        .unwrap();
    am.wait("old firing", |a| a.len() == 1).await;

    // A burst the queue cannot hold (this runtime has one thread: the notifier does not
    // run between these sends). Among the dropped: old's resolution.
    let mut burst: Vec<AlertEvent> = (0..20)
        .map(|i| {
            env.commit(
                &format!("d{i}"),
                "offline",
                Severity::Warning,
                AlertState::Firing,
                t,
                t,
            )
        })
        .collect();
    burst.push(env.commit(
        "old",
        "leak",
        Severity::Critical,
        AlertState::Resolved,
        t,
        now_ms(),
    ));
    let dropped = burst
        .into_iter()
        .filter(|ev| tx.try_send(ev.clone()).is_err())
        .count();
    assert_eq!(dropped, 17);

    let alerts = am
        .wait("the 20 firing alerts and old resolved", |a| {
            a.len() == 20 && a.iter().all(|x| x["labels"]["alertname"] == "offline")
        })
        .await;
    assert!(alerts.iter().all(|a| a["labels"]["district"] == "east"));
    notifier.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// GET /api/v1/alerts
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_alerts_api_lists_current_and_resolved_alerts() {
    let env = Env::new("api").await;
    env.register("mh-1", &[("district", "north")]).await;
    env.register("mh-2", &[]).await;
    let t = 1_790_000_000_000; // 2026-09-21T14:13:20Z
    env.commit(
        "mh-1",
        "cover_open",
        Severity::Critical,
        AlertState::Firing,
        t,
        t,
    );
    env.commit(
        "mh-2",
        "tilted",
        Severity::Warning,
        AlertState::Pending,
        t + 1_000,
        t + 1_000,
    );
    env.commit(
        "mh-2",
        "leak",
        Severity::Info,
        AlertState::Firing,
        t + 2_000,
        t + 2_000,
    );
    let r1 = env.commit(
        "mh-2",
        "leak",
        Severity::Info,
        AlertState::Resolved,
        t + 2_000,
        t + 3_000,
    );
    env.commit(
        "mh-1",
        "offline",
        Severity::Warning,
        AlertState::Firing,
        t - 9_000,
        t - 9_000,
    );
    let r2 = env.commit(
        "mh-1",
        "offline",
        Severity::Warning,
        AlertState::Resolved,
        t - 9_000,
        t + 4_000,
    );

    let tokens = [TokenConfig {
        token: READER.into(),
        role: Role::Read,
    }];
    let state = ApiState::new(env.registry.clone(), &tokens);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(api::serve(listener, state, stop.clone().cancelled_owned()));
    let client = reqwest::Client::new();
    let get = |q: &str| {
        let req = client
            .get(format!("{url}/api/v1/alerts{q}"))
            .bearer_auth(READER);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };

    let r = client
        .get(format!("{url}/api/v1/alerts"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "read role needed");

    // Current: firing and pending, newest first.
    let (status, v) = get("").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({
            "alerts": [
                {"device": "mh-2", "profile": PROFILE, "rule": "tilted", "severity": "warning",
                 "state": "pending", "since": "2026-09-21T14:13:21.000Z", "starts": null,
                 "active_since": "2026-09-21T14:13:21.000Z", "updated": "2026-09-21T14:13:21.000Z",
                 "value": 1.0, "summary": "tilted on mh-2", "labels": {}},
                {"device": "mh-1", "profile": PROFILE, "rule": "cover_open", "severity": "critical",
                 "state": "firing", "since": "2026-09-21T14:13:20.000Z",
                 "starts": "2026-09-21T14:13:20.000Z", "active_since": "2026-09-21T14:13:20.000Z",
                 "updated": "2026-09-21T14:13:20.000Z", "value": 1.0,
                 "summary": "cover_open on mh-1", "labels": {"district": "north"}},
            ],
            "truncated": false,
        })
    );
    let (_, v) = get("?state=firing").await;
    assert_eq!(v["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(v["alerts"][0]["rule"], "cover_open");
    let (_, v) = get("?state=pending&device=mh-2").await;
    assert_eq!(v["alerts"][0]["rule"], "tilted");
    let (_, v) = get("?device=mh-2&severity=critical").await;
    assert_eq!(v["alerts"], json!([]));

    // Resolved: newest first, limited.
    let (status, v) = get("?state=resolved").await;
    assert_eq!(status, 200, "{v}");
    let ids: Vec<i64> = v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![r2.id, r1.id]);
    assert_eq!(
        v["alerts"][1],
        json!({"id": r1.id, "device": "mh-2", "profile": PROFILE, "rule": "leak",
               "severity": "info", "state": "resolved", "since": "2026-09-21T14:13:23.000Z",
               "starts": "2026-09-21T14:13:22.000Z", "value": 1.0, "summary": "leak on mh-2",
               "labels": {}})
    );
    let (_, v) = get("?state=resolved&limit=1").await;
    assert_eq!(v["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(v["truncated"], true);
    let (_, v) = get("?state=resolved&profile=other").await;
    assert_eq!(v["alerts"], json!([]));

    // Bad requests name what is wrong.
    let (status, v) = get("?state=closed").await;
    assert_eq!(status, 400);
    assert_eq!(
        v["error"],
        "`state=closed` is not one of firing, pending, resolved (leave it out for firing and pending)"
    );
    let (status, v) = get("?limit=100001").await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = get("?device=a&device=b").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("query parameter `device` is given twice"))
    );

    stop.cancel();
    server.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------------------
// End to end: the gateway binary, CoAP uplinks, a rule, the real Alertmanager
// ---------------------------------------------------------------------------------------

/// A one-device-model profile: a 16-bit counter (so payloads differ) and a level byte, with
/// a critical rule that fires at once (no `for`).
const LEVEL_PROFILE: &str = r#"
name = "e2e-level"
description = "end-to-end alert test"
measurement = "level"

[layout]
items = [
  { field = "seq", type = "u16" },
  { field = "level_pct", type = "u8" },
]

[[alerts]]
name = "level_high"
expr = "level_pct > 100"
severity = "critical"
summary = "Level at {device} is {level_pct} %"
"#;

/// POSTs as the proxy saw them: (wall-clock arrival in ms, the alerts).
type PostLog = Arc<std::sync::Mutex<Vec<(i64, Vec<Value>)>>>;

/// Records every POST (wall-clock arrival, body) and passes it on to the real
/// Alertmanager, answering with its answer: the gateway talks to Alertmanager through it.
#[derive(Clone)]
struct Proxy {
    am: String,
    client: reqwest::Client,
    posts: PostLog,
}

async fn proxy_post(
    axum::extract::State(p): axum::extract::State<Proxy>,
    body: axum::body::Bytes,
) -> (axum::http::StatusCode, String) {
    let at = now_ms();
    if let Ok(alerts) = serde_json::from_slice::<Vec<Value>>(&body) {
        p.posts.lock().unwrap().push((at, alerts));
    }
    let answer = p
        .client
        .post(format!("{}/api/v2/alerts", p.am))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match answer {
        Ok(r) => {
            let status = axum::http::StatusCode::from_u16(r.status().as_u16()).unwrap();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (axum::http::StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

impl Proxy {
    async fn start(am: &str) -> (Proxy, String) {
        let proxy = Proxy {
            am: am.to_owned(),
            client: reqwest::Client::new(),
            posts: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/api/v2/alerts", axum::routing::post(proxy_post))
            .with_state(proxy.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (proxy, url)
    }

    fn posts(&self) -> Vec<(i64, Vec<Value>)> {
        self.posts.lock().unwrap().clone()
    }
}

/// The gateway binary, killed on drop.
struct Gateway {
    child: Child,
    http: String,
    coap: String,
    _log: std::sync::mpsc::Receiver<String>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(dir: &Path, alertmanager: &str) -> Gateway {
        use std::io::{BufRead, BufReader};
        let profiles = dir.join("profiles");
        std::fs::create_dir_all(&profiles).unwrap();
        std::fs::write(profiles.join("e2e-level.toml"), LEVEL_PROFILE).unwrap();
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[coap]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
                 [mqtt]\nmode = \"off\"\n[store]\npath = \"{}\"\n[profiles]\ndir = \"{}\"\n\
                 [alertmanager]\nurl = \"{alertmanager}\"\nresend_interval = \"1m\"\n",
                dir.join("data/gateway.db").display(),
                profiles.display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_nbiot-gateway"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the gateway");
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
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
            child,
            _log: rx,
        }
    }

    /// POSTs `payload` to `/up/{device}` with libcoap's client (CON: returns after the ack,
    /// which the gateway sends after the commit).
    fn uplink(&self, device: &str, payload: &[u8], dir: &Path) {
        let file = dir.join("payload.bin");
        std::fs::write(&file, payload).unwrap();
        let out = Command::new("coap-client-notls")
            .args(["-m", "post", "-B", "10", "-f", file.to_str().unwrap()])
            .arg(format!("coap://{}/up/{device}", self.coap))
            .output()
            .expect("coap-client-notls runs (Debian libcoap3-bin)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(mut self) {
        assert!(Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "exit after SIGTERM: {status:?}");
                return;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `q` quantile (nearest rank) of sorted `v`.
fn quantile(v: &[i64], q: f64) -> i64 {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// A critical rule fires on a CoAP uplink and resolves on the next, through the gateway
/// binary into the real Alertmanager; and the latency from uplink receipt to the
/// Alertmanager POST, for 100 firings and 100 resolutions.
///
/// Latency, per transition: the POST's arrival at the recording proxy (wall clock) minus
/// the uplink's receipt time in the gateway, which the alert carries (`startsAt` of a
/// firing alert, `endsAt` of a resolved one: the rule has no `for`, so both are the receive
/// time of the uplink that made the transition). Same host, same clock. Printed with
/// `cargo test --test alertmanager -- --nocapture end_to_end`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_a_coap_uplink_fires_an_alert_in_alertmanager() {
    const DEVICES: usize = 100;
    let dir = TempDir::new("e2e");
    let am = Alertmanager::start(&dir.0, free_port()).await;
    let (proxy, proxy_url) = Proxy::start(&am.url).await;
    let gw = Gateway::start(&dir.0, &proxy_url);
    let client = reqwest::Client::new();
    let devices: Vec<String> = (0..DEVICES).map(|i| format!("lvl-{i:03}")).collect();
    for d in &devices {
        let r = client
            .put(format!("{}/api/v1/devices/{d}", gw.http))
            .json(&json!({"profile": "e2e-level", "labels": {"district": "north"}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }

    // Every device goes high (fires), then every device goes low (resolves).
    let sent_at = now_ms();
    let dir_path = dir.0.clone();
    let (gw, dir_path) = tokio::task::spawn_blocking(move || {
        for (i, d) in devices.iter().enumerate() {
            gw.uplink(d, &[0, i as u8, 150], &dir_path);
        }
        (gw, dir_path)
    })
    .await
    .unwrap();
    let alerts = am
        .wait("100 level_high alerts", |a| a.len() == DEVICES)
        .await;
    let first = alerts
        .iter()
        .find(|a| a["labels"]["device"] == "lvl-000")
        .unwrap();
    assert_eq!(
        first["labels"],
        json!({"alertname": "level_high", "device": "lvl-000", "profile": "e2e-level",
               "severity": "critical", "district": "north"})
    );
    assert_eq!(first["annotations"]["summary"], "Level at lvl-000 is 150 %");
    assert_eq!(first["annotations"]["value"], "150");
    // startsAt is the reading's time (second precision: the rule clock).
    let starts = parse_ms(first["startsAt"].as_str().unwrap());
    assert!(
        starts >= sent_at - 1000 && starts <= now_ms(),
        "startsAt {starts} vs sent from {sent_at}: {first}"
    );

    let devices: Vec<String> = (0..DEVICES).map(|i| format!("lvl-{i:03}")).collect();
    let gw = tokio::task::spawn_blocking(move || {
        for (i, d) in devices.iter().enumerate() {
            gw.uplink(d, &[1, i as u8, 20], &dir_path);
        }
        gw
    })
    .await
    .unwrap();
    am.wait("every alert resolved", |a| a.is_empty()).await;

    // Latency: from the receipt of each uplink (the store's received_at_ms: a device's
    // first uplink fired its alert, its second resolved it) to the first POST carrying
    // the transition.
    let receipts: BTreeMap<(String, &'static str), i64> = {
        let conn = rusqlite::Connection::open_with_flags(
            dir.0.join("data/gateway.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut stmt = conn
            .prepare("SELECT device, received_at_ms FROM uplinks ORDER BY id")
            .unwrap();
        let rows: Vec<(String, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut m = BTreeMap::new();
        for (device, at) in rows {
            let kind = if m.contains_key(&(device.clone(), "firing")) {
                "resolved"
            } else {
                "firing"
            };
            m.insert((device, kind), at);
        }
        m
    };
    assert_eq!(receipts.len(), 2 * DEVICES);
    let mut first_seen: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
    for (at, alerts) in proxy.posts() {
        for a in alerts {
            let device = a["labels"]["device"].as_str().unwrap().to_owned();
            let ends = parse_ms(a["endsAt"].as_str().unwrap());
            let kind = if ends <= at { "resolved" } else { "firing" };
            let key = (device, kind);
            let receipt = receipts[&key];
            first_seen.entry(key).or_insert(at - receipt);
        }
    }
    assert_eq!(first_seen.len(), 2 * DEVICES, "every transition was pushed");
    let mut latencies: Vec<i64> = first_seen.into_values().collect();
    latencies.sort_unstable();
    let (p50, p99, max) = (
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.99),
        quantile(&latencies, 1.0),
    );
    println!(
        "uplink receipt → Alertmanager POST, {} critical transitions: p50 {p50} ms, p99 {p99} ms, max {max} ms",
        latencies.len()
    );
    assert!(latencies[0] >= 0, "{latencies:?}");
    assert!(
        p99 < 1000,
        "critical alerts reach Alertmanager within a second: p99 {p99} ms"
    );

    // The gateway measured the same thing (receipt → POST answered) in its histogram.
    let metrics = client
        .get(format!("{}/metrics", gw.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = metrics
        .lines()
        .find(|l| l.starts_with("nbiot_alert_push_latency_seconds_count{severity=\"critical\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(count, Some((2 * DEVICES) as f64), "{metrics}");
    for line in metrics.lines().filter(|l| {
        l.starts_with("nbiot_alert_push_latency_seconds_bucket{severity=\"critical\"")
            || l.starts_with("nbiot_alertmanager_")
    }) {
        println!("{line}");
    }
    assert!(metrics.contains("nbiot_alertmanager_up 1"), "{metrics}");
    gw.stop();
}
