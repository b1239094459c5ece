//! The forwarder against `ScriptedTsdb`: a small HTTP server, written for these tests, that
//! serves `POST /api/v2/write` and answers what each test scripts — the answers a real
//! TSDB cannot be made to give on demand (429 with Retry-After, 413, 400 with one bad
//! line, 422 partial writes, 401). The forwarder is the library's (`Forwarder::start`)
//! over a real store file whose rows the tests insert with SQL, so each test knows exactly
//! which lines must arrive.
//!
//! What is asserted is what the TSDB ends up holding (`stored`: every line of each request
//! it answered 204, or the lines a partial answer says it kept), the cursor and the
//! `dead_letters` table in the store, `/readyz`'s check, and the forwarder's stats.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use nbiot_gateway::forward::deliver::RetryPolicy;
use nbiot_gateway::forward::retry::Backoff;
use nbiot_gateway::forward::{Forwarder, ForwarderSettings};
use nbiot_gateway::health::Health;
use nbiot_gateway::store::Store;
use rusqlite::{params, Connection};

const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// ScriptedTsdb
// ---------------------------------------------------------------------------------------

/// One request as the scripted server saw it.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    query: String,
    auth: Option<String>,
    encoding: Option<String>,
    lines: Vec<String>,
}

/// What the script answers, and which of the request's lines the server keeps.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: String,
    keep: Vec<String>,
}

impl Answer {
    /// 204: every line kept.
    fn ok(seen: &Seen) -> Answer {
        Answer {
            status: 204,
            retry_after: None,
            body: String::new(),
            keep: seen.lines.clone(),
        }
    }

    fn status(status: u16, body: &str) -> Answer {
        Answer {
            status,
            retry_after: None,
            body: body.to_owned(),
            keep: Vec::new(),
        }
    }
}

type Script = Box<dyn FnMut(usize, &Seen) -> Answer + Send>;

struct TsdbState {
    script: Mutex<Script>,
    requests: Mutex<Vec<(Seen, u16)>>,
    stored: Mutex<Vec<String>>,
}

/// A scripted InfluxDB v2 write endpoint on a loopback port (see the module docs).
struct ScriptedTsdb {
    addr: SocketAddr,
    state: Arc<TsdbState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedTsdb {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedTsdb {
    async fn start(script: impl FnMut(usize, &Seen) -> Answer + Send + 'static) -> ScriptedTsdb {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), script).await
    }

    async fn start_on(
        addr: SocketAddr,
        script: impl FnMut(usize, &Seen) -> Answer + Send + 'static,
    ) -> ScriptedTsdb {
        let state = Arc::new(TsdbState {
            script: Mutex::new(Box::new(script)),
            requests: Mutex::new(Vec::new()),
            stored: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .route("/api/v2/write", axum::routing::post(write))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ScriptedTsdb { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<(Seen, u16)> {
        self.state.requests.lock().unwrap().clone()
    }

    fn stored(&self) -> Vec<String> {
        self.state.stored.lock().unwrap().clone()
    }

    /// Each distinct stored line with how often it was stored.
    fn stored_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for l in self.stored() {
            *m.entry(l).or_default() += 1;
        }
        m
    }
}

async fn write(
    State(st): State<Arc<TsdbState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let encoding = header("content-encoding");
    let text = if encoding.as_deref() == Some("gzip") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_string(&mut s)
            .expect("gzip body");
        s
    } else {
        String::from_utf8(body.to_vec()).expect("utf-8 body")
    };
    let seen = Seen {
        at: Instant::now(),
        query: uri.query().unwrap_or_default().to_owned(),
        auth: header("authorization"),
        encoding,
        lines: text.lines().map(str::to_owned).collect(),
    };
    let n = st.requests.lock().unwrap().len() + 1;
    let answer = (st.script.lock().unwrap())(n, &seen);
    st.stored
        .lock()
        .unwrap()
        .extend(answer.keep.iter().cloned());
    st.requests.lock().unwrap().push((seen, answer.status));
    let mut resp = (
        StatusCode::from_u16(answer.status).expect("status"),
        answer.body,
    )
        .into_response();
    if let Some(ra) = answer.retry_after {
        resp.headers_mut()
            .insert("retry-after", ra.parse().expect("header"));
    }
    resp
}

// ---------------------------------------------------------------------------------------
// The store and the forwarder
// ---------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbiot-fwd-scripted-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("gateway.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A migrated store with `n` readings of device `d{i}` (`v = i`, time 1_700_000_000 + i).
fn store_with_readings(dir: &TempDir, n: usize) -> Connection {
    drop(Store::open(&dir.db()).expect("store"));
    let conn = Connection::open(dir.db()).expect("open");
    add_readings(&conn, 0..n);
    conn
}

fn add_readings(conn: &Connection, range: std::ops::Range<usize>) {
    conn.execute(
        "INSERT INTO uplinks (device, profile, codec, transport, received_at_ms, payload) \
         VALUES ('d', 'p', 'c', 'coap', 0, x'00')",
        [],
    )
    .expect("uplink");
    for i in range {
        conn.execute(
            "INSERT INTO readings (uplink_id, device, profile, measurement, time_s, device_time, fields) \
             VALUES (1, ?1, 'prof', 'env', ?2, 0, ?3)",
            params![
                format!("d{i}"),
                1_700_000_000 + i as i64,
                format!("{{\"v\":{i},\"t_c\":{}.5}}", i)
            ],
        )
        .expect("reading");
    }
}

/// The line reading `i` becomes.
fn line(i: usize) -> String {
    format!(
        "env,device=d{i},profile=prof v={i}i,t_c={i}.5 {}",
        1_700_000_000 + i
    )
}

fn settings(url: &str) -> ForwarderSettings {
    ForwarderSettings {
        name: "influxdb".into(),
        url: url.to_owned(),
        org: "city".into(),
        bucket: "nbiot".into(),
        token: "s3cret-token".into(),
        tags: Vec::new(),
        batch_lines: 5000,
        batch_bytes: 4 << 20,
        flush_interval: Duration::from_millis(50),
        poll_interval: Duration::from_millis(20),
        gzip: true,
        timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            backoff: Backoff {
                base: Duration::from_millis(50),
                cap: Duration::from_millis(500),
                max_retry_after: Duration::from_secs(60),
            },
            refused_retry: Duration::from_millis(400),
            unhealthy_after: Duration::from_secs(1),
            warn_every: Duration::from_secs(60),
            error_every: Duration::from_secs(300),
        },
    }
}

fn cursor(conn: &Connection) -> (i64, i64) {
    conn.query_row(
        "SELECT reading_id, alert_id FROM forward_cursor WHERE name = 'influxdb'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap_or((-1, -1))
}

fn dead_letters(conn: &Connection) -> Vec<(String, i64, String, u16, String)> {
    let mut stmt = conn
        .prepare("SELECT source, row_id, line, status, error FROM dead_letters ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn writes_gzipped_line_protocol_with_the_token_and_then_moves_the_cursor() {
    let dir = TempDir::new("basic");
    let conn = store_with_readings(&dir, 3);
    conn.execute(
        "INSERT INTO alert_transitions (device, profile, rule, severity, state, time_ms, value, summary) \
         VALUES ('d1', 'prof', 'too hot', 'warning', 'firing', 1700000001500, 41.5, 's')",
        [],
    )
    .unwrap();
    let tsdb = ScriptedTsdb::start(|_, seen| Answer::ok(seen)).await;
    let health = Health::default();
    let fwd = Forwarder::start(settings(&tsdb.url()), &dir.db(), health.clone())
        .await
        .expect("start");
    wait_until("the cursor covers every row", || cursor(&conn) == (3, 1)).await;

    let mut expected: Vec<String> = vec![
        "alerts,device=d1,profile=prof,rule=too\\ hot,severity=warning state=\"firing\",firing=true,value=41.5 1700000001".into(),
    ];
    expected.extend((0..3).map(line));
    assert_eq!(tsdb.stored(), expected);
    let (seen, _) = &tsdb.requests()[0];
    assert_eq!(seen.query, "org=city&bucket=nbiot&precision=s");
    assert_eq!(seen.auth.as_deref(), Some("Token s3cret-token"));
    assert_eq!(seen.encoding.as_deref(), Some("gzip"));
    let stats = fwd.stats();
    assert_eq!(
        (stats.delivered, stats.dead_lettered, stats.requests),
        (4, 0, 1)
    );
    assert!(stats.healthy);
    assert!(health.snapshot()["forwarder"].ok);
    assert!(dead_letters(&conn).is_empty());

    // New rows go out as they commit; nothing already delivered is sent again.
    add_readings(&conn, 3..5);
    wait_until("the new rows are delivered", || cursor(&conn) == (5, 1)).await;
    assert_eq!(tsdb.stored()[4..], [line(3), line(4)]);
    fwd.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_restart_resumes_at_the_cursor_and_shutdown_flushes_a_partial_batch() {
    let dir = TempDir::new("resume");
    let conn = store_with_readings(&dir, 4);
    let tsdb = ScriptedTsdb::start(|_, seen| Answer::ok(seen)).await;
    let fwd = Forwarder::start(settings(&tsdb.url()), &dir.db(), Health::default())
        .await
        .expect("start");
    wait_until("delivered", || cursor(&conn).0 == 4).await;
    fwd.shutdown(Duration::from_secs(1)).await;

    // A long flush interval: only the shutdown's final flush can send these rows.
    add_readings(&conn, 4..6);
    let mut s = settings(&tsdb.url());
    s.flush_interval = Duration::from_secs(3600);
    let fwd = Forwarder::start(s, &dir.db(), Health::default())
        .await
        .expect("restart");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        tsdb.stored().len(),
        4,
        "the partial batch waits for its age"
    );
    let stats = fwd.shutdown(Duration::from_secs(2)).await;
    assert_eq!(stats.delivered, 2);
    assert_eq!(cursor(&conn).0, 6);
    let expected: Vec<String> = (0..6).map(line).collect();
    assert_eq!(tsdb.stored(), expected, "each line once, in order");
}

#[tokio::test]
async fn throttled_429_honours_retry_after() {
    let dir = TempDir::new("429");
    let conn = store_with_readings(&dir, 5);
    let tsdb = ScriptedTsdb::start(|n, seen| {
        if n == 1 {
            Answer {
                retry_after: Some("2".into()),
                ..Answer::status(429, r#"{"code":"too many requests","message":"slow down"}"#)
            }
        } else {
            Answer::ok(seen)
        }
    })
    .await;
    let fwd = Forwarder::start(settings(&tsdb.url()), &dir.db(), Health::default())
        .await
        .expect("start");
    wait_until("delivered", || cursor(&conn).0 == 5).await;
    let requests = tsdb.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].0.at - requests[0].0.at;
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
        "waited {waited:?} after Retry-After: 2"
    );
    assert_eq!(
        requests[0].0.lines, requests[1].0.lines,
        "the same batch again"
    );
    assert_eq!(tsdb.stored(), (0..5).map(line).collect::<Vec<_>>());
    let stats = fwd.stats();
    assert_eq!((stats.retries, stats.delivered), (1, 5));
    fwd.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn too_large_413_splits_the_batch() {
    let dir = TempDir::new("413");
    let conn = store_with_readings(&dir, 10);
    let tsdb = ScriptedTsdb::start(|_, seen| {
        if seen.lines.len() > 3 {
            Answer::status(
                413,
                r#"{"code":"request too large","message":"max 3 lines"}"#,
            )
        } else {
            Answer::ok(seen)
        }
    })
    .await;
    let fwd = Forwarder::start(settings(&tsdb.url()), &dir.db(), Health::default())
        .await
        .expect("start");
    wait_until("delivered", || cursor(&conn).0 == 10).await;
    assert_eq!(
        tsdb.stored(),
        (0..10).map(line).collect::<Vec<_>>(),
        "once each, in order"
    );
    let sizes: Vec<(usize, u16)> = tsdb
        .requests()
        .iter()
        .map(|(s, status)| (s.lines.len(), *status))
        .collect();
    assert_eq!(
        sizes,
        vec![
            (10, 413),
            (5, 413),
            (2, 204),
            (3, 204),
            (5, 413),
            (2, 204),
            (3, 204)
        ]
    );
    assert!(dead_letters(&conn).is_empty());
    fwd.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn bad_request_400_dead_letters_only_the_bad_line() {
    let dir = TempDir::new("400");
    let conn = store_with_readings(&dir, 20);
    let bad = line(13);
    let tsdb = {
        let bad = bad.clone();
        ScriptedTsdb::start(move |_, seen| {
            if seen.lines.contains(&bad) {
                Answer::status(
                    400,
                    &format!(r#"{{"code":"invalid","message":"unable to parse '{bad}': invalid field format"}}"#),
                )
            } else {
                Answer::ok(seen)
            }
        })
        .await
    };
    let fwd = Forwarder::start(settings(&tsdb.url()), &dir.db(), Health::default())
        .await
        .expect("start");
    wait_until("settled", || cursor(&conn).0 == 20).await;
    let expected: Vec<String> = (0..20).filter(|i| *i != 13).map(line).collect();
    assert_eq!(tsdb.stored(), expected, "every other line once, in order");
    assert_eq!(
        dead_letters(&conn),
        vec![(
            "reading".to_owned(),
            14,
            bad.clone(),
            400,
            format!("unable to parse '{bad}': invalid field format")
        )]
    );
    let stats = fwd.stats();
    assert_eq!((stats.delivered, stats.dead_lettered), (19, 1));
    assert!(stats.healthy, "a bad line is not an unhealthy TSDB");
    fwd.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn partial_422_keeps_what_was_accepted_and_dead_letters_the_rest() {
    let dir = TempDir::new("422");
    let conn = store_with_readings(&dir, 8);
    let rejected = [line(2), line(6)];
    let tsdb = {
        let rejected = rejected.clone();
        ScriptedTsdb::start(move |_, seen| {
            let keep: Vec<String> = seen
                .lines
                .iter()
                .filter(|l| !rejected.contains(l))
                .cloned()
                .collect();
            if keep.len() == seen.lines.len() {
                return Answer::ok(seen);
            }
            // InfluxDB 2: the valid points are written, the answer does not say which.
            Answer {
                keep,
                ..Answer::status(
                    422,
                    &format!(
                        r#"{{"code":"unprocessable entity","message":"failure writing points to database: partial write: points beyond retention policy dropped={}"}}"#,
                        seen.lines.len() - seen.lines.iter().filter(|l| !rejected.contains(l)).count()
                    ),
                )
            }
        })
        .await
    };
    let fwd = Forwarder::start(settings(&tsdb.url()), &dir.db(), Health::default())
        .await
        .expect("start");
    wait_until("settled", || cursor(&conn).0 == 8).await;
    // Every accepted line is stored (some twice: writing a point again is idempotent), the
    // rejected ones never.
    let counts = tsdb.stored_counts();
    for i in 0..8 {
        let n = counts.get(&line(i)).copied().unwrap_or(0);
        if i == 2 || i == 6 {
            assert_eq!(n, 0, "line {i}");
        } else {
            assert!(n >= 1, "line {i} stored");
        }
    }
    let dead = dead_letters(&conn);
    let rows: Vec<(i64, u16)> = dead.iter().map(|d| (d.1, d.3)).collect();
    assert_eq!(rows, vec![(3, 422), (7, 422)]);
    assert!(dead[0].4.contains("beyond retention policy"), "{dead:?}");
    assert_eq!(fwd.stats().dead_lettered, 2);
    fwd.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn partial_write_naming_its_lines_resends_the_others() {
    let dir = TempDir::new("partial3");
    let conn = store_with_readings(&dir, 4);
    let tsdb = ScriptedTsdb::start(|n, seen| {
        if n == 1 {
            // InfluxDB 3: kept the valid lines, names the one it refused.
            let keep = seen.lines.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, l)| l.clone()).collect();
            Answer {
                keep,
                ..Answer::status(
                    400,
                    &format!(
                        r#"{{"error":"partial write of line protocol occurred","data":[{{"original_line":"{}","line_number":2,"error_message":"invalid column type for column 'v', expected iox::column_type::field::float"}}]}}"#,
                        seen.lines[1]
                    ),
                )
            }
        } else {
            Answer::ok(seen)
        }
    })
    .await;
    let fwd = Forwarder::start(settings(&tsdb.url()), &dir.db(), Health::default())
        .await
        .expect("start");
    wait_until("settled", || cursor(&conn).0 == 4).await;
    let dead = dead_letters(&conn);
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].1, dead[0].2.as_str(), dead[0].3),
        (2, line(1).as_str(), 400)
    );
    assert!(dead[0].4.starts_with("invalid column type"), "{dead:?}");
    // One request for the batch, then the lines around the refused one, once each.
    let sent: Vec<Vec<String>> = tsdb.requests().into_iter().map(|(s, _)| s.lines).collect();
    assert_eq!(
        sent,
        vec![
            (0..4).map(line).collect(),
            vec![line(0)],
            vec![line(2), line(3)]
        ]
    );
    fwd.shutdown(Duration::from_secs(1)).await;
}

/// Collects what the forwarder logs (the tests run on a current-thread runtime, so the
/// thread's default subscriber sees the forwarder's tasks).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn unauthorized_401_keeps_everything_turns_unhealthy_and_says_so_once() {
    let logs = Logs::default();
    let subscriber = {
        let logs = logs.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish()
    };
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = TempDir::new("401");
    let conn = store_with_readings(&dir, 3);
    let accept = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tsdb = {
        let accept = Arc::clone(&accept);
        ScriptedTsdb::start(move |_, seen| {
            if accept.load(Ordering::SeqCst) {
                Answer::ok(seen)
            } else {
                Answer::status(
                    401,
                    r#"{"code":"unauthorized","message":"unauthorized access"}"#,
                )
            }
        })
        .await
    };
    let health = Health::default();
    let fwd = Forwarder::start(settings(&tsdb.url()), &dir.db(), health.clone())
        .await
        .expect("start");
    wait_until("four refusals", || tsdb.requests().len() >= 4).await;
    let check = health.snapshot()["forwarder"].clone();
    assert!(!check.ok && !check.critical, "{check:?}");
    assert_eq!(check.detail["status"], 401);
    assert_eq!(check.detail["error"], "unauthorized access");
    let stats = fwd.stats();
    assert!(!stats.healthy);
    assert_eq!((stats.delivered, stats.dead_lettered), (0, 0));
    assert_eq!(cursor(&conn).0, 0, "nothing settled");
    assert!(dead_letters(&conn).is_empty(), "nothing dead-lettered");
    assert!(
        tsdb.requests().iter().all(|(s, _)| s.lines.len() == 3),
        "the whole batch each time"
    );
    // Retried slowly: [refused_retry / 2, refused_retry] apart.
    let requests = tsdb.requests();
    for w in requests.windows(2) {
        let gap = w[1].0.at - w[0].0.at;
        assert!(gap >= Duration::from_millis(190), "{gap:?}");
    }
    let text = logs.text();
    assert_eq!(
        text.matches("ERROR").count(),
        1,
        "one operator-visible error, not one per retry:\n{text}"
    );
    assert!(text.contains("TSDB refuses the gateway's writes"), "{text}");
    assert!(
        !text.contains("s3cret-token"),
        "the token is never logged:\n{text}"
    );

    // The operator fixes the token: everything goes out, healthy again.
    accept.store(true, Ordering::SeqCst);
    wait_until("delivered", || cursor(&conn).0 == 3).await;
    assert_eq!(tsdb.stored(), (0..3).map(line).collect::<Vec<_>>());
    assert!(health.snapshot()["forwarder"].ok);
    assert!(fwd.stats().healthy);
    fwd.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_tsdb_that_is_not_there_yet_is_waited_for() {
    let dir = TempDir::new("absent");
    let conn = store_with_readings(&dir, 3);
    // A free port with nothing listening: connection refused until the server starts.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let fwd = Forwarder::start(
        settings(&format!("http://{addr}")),
        &dir.db(),
        Health::default(),
    )
    .await
    .expect("start");
    wait_until("a few retries", || fwd.stats().retries >= 3).await;
    assert_eq!(cursor(&conn).0, 0);
    let tsdb = ScriptedTsdb::start_on(addr, |_, seen| Answer::ok(seen)).await;
    wait_until("delivered", || cursor(&conn).0 == 3).await;
    assert_eq!(tsdb.stored(), (0..3).map(line).collect::<Vec<_>>());
    fwd.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn batches_respect_the_line_and_byte_limits() {
    let dir = TempDir::new("limits");
    let conn = store_with_readings(&dir, 25);
    let tsdb = ScriptedTsdb::start(|_, seen| Answer::ok(seen)).await;
    let mut s = settings(&tsdb.url());
    s.batch_lines = 10;
    let fwd = Forwarder::start(s, &dir.db(), Health::default())
        .await
        .expect("start");
    wait_until("delivered", || cursor(&conn).0 == 25).await;
    let sizes: Vec<usize> = tsdb.requests().iter().map(|(s, _)| s.lines.len()).collect();
    assert_eq!(sizes, vec![10, 10, 5]);
    fwd.shutdown(Duration::from_secs(1)).await;

    // Bytes: each line is about 50 bytes; a 120-byte cap closes a batch at its third line.
    add_readings(&conn, 25..31);
    let mut s = settings(&tsdb.url());
    s.batch_bytes = 120;
    s.gzip = false;
    let fwd = Forwarder::start(s, &dir.db(), Health::default())
        .await
        .expect("start");
    wait_until("delivered", || cursor(&conn).0 == 31).await;
    let sizes: Vec<usize> = tsdb.requests()[3..]
        .iter()
        .map(|(s, _)| s.lines.len())
        .collect();
    assert_eq!(sizes, vec![3, 3]);
    assert_eq!(tsdb.requests()[3].0.encoding, None, "gzip = false");
    assert_eq!(tsdb.stored(), (0..31).map(line).collect::<Vec<_>>());
    fwd.shutdown(Duration::from_secs(1)).await;
}
