//! The MQTT source against a real Mosquitto (and the embedded rumqttd broker), with the test
//! playing the pipeline: it drains the shard channel of a `PipelineHandle::from_shards` and
//! answers each uplink's reply when it chooses.
//!
//! Mosquitto acknowledges a publisher's QoS 1 PUBLISH itself, on receipt; what the source
//! controls is the PUBACK from the gateway's consumer session to the broker. So the tests
//! that check acks put a small MQTT-aware TCP proxy between the consumer and the broker and
//! record every packet's type and packet identifier in both directions.
//!
//! Every wait has a deadline. A test that asserts something does *not* happen (no PUBACK
//! before the outcome) watches for a fixed window after the consumer provably processed the
//! message; everything else waits for the event itself.

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nbiot_gateway::config::{MqttConfig, MqttMode};
use nbiot_gateway::pipeline::{Outcome, PipelineHandle, Reject, Transport, Uplink};
use nbiot_gateway::sources::broker::{start_embedded_broker, BrokerLimits};
use nbiot_gateway::sources::mqtt::{run_with_status, Backoff, MqttError, MqttSettings, MqttStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(15);
/// How long "no PUBACK yet" is watched for, after the message provably reached the pipeline.
const QUIET: Duration = Duration::from_millis(500);
const MOSQUITTO: &str = "/usr/sbin/mosquitto";

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("nbiot-mqtt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port free right now (bound, read, released).
fn free_port() -> u16 {
    let l = StdListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// A Mosquitto process on a loopback port; killed on drop.
struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    persistence: bool,
}

impl Mosquitto {
    fn start(dir: &Path, port: u16, persistence: bool) -> Mosquitto {
        let mut m = Mosquitto {
            child: None,
            port,
            dir: dir.to_owned(),
            persistence,
        };
        m.restart();
        m
    }

    /// Starts (again) on the same port with the same config and persistence directory.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let user = String::from_utf8(
            StdCommand::new("id")
                .arg("-un")
                .output()
                .expect("id -un")
                .stdout,
        )
        .expect("utf-8 user name");
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 # Run as whoever runs the test (as root, Mosquitto would switch to `mosquitto`).\n\
                 user {user}\n\
                 persistence {persistence}\n\
                 persistence_location {dir}/\n\
                 max_inflight_messages 100\n\
                 max_queued_messages 10000\n\
                 log_dest file {dir}/mosquitto.log\n\
                 log_type all\n",
                port = self.port,
                user = user.trim(),
                persistence = self.persistence,
                dir = self.dir.display(),
            ),
        )
        .expect("write mosquitto.conf");
        let child = StdCommand::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (Debian package `mosquitto`)");
        self.child = Some(child);
        // Wait until it accepts connections.
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let started = Instant::now();
        while StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "mosquitto exited ({status}); log:\n{}",
                    std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < DEADLINE,
                "mosquitto did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it with SIGTERM (so it writes its persistence file) and waits for the exit.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let status = StdCommand::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let started = Instant::now();
        while child.try_wait().expect("wait mosquitto").is_none() {
            assert!(started.elapsed() < DEADLINE, "mosquitto did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Publishes with `mosquitto_pub` (another process, QoS as given); waits for it to exit
/// successfully (for QoS 1: after the broker's PUBACK).
async fn mosquitto_pub(port: u16, qos: u8, topic: &str, payload: &[u8]) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!("nbiot-mqtt-payload-{}-{n}", std::process::id()));
    std::fs::write(&file, payload).expect("write payload file");
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-q",
                &qos.to_string(),
            ])
            .args(["-t", topic, "-f"])
            .arg(&file)
            .output(),
    )
    .await
    .expect("mosquitto_pub in time")
    .expect("run mosquitto_pub (Debian package `mosquitto-clients`)");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "mosquitto_pub -t {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Publishes each line as one message over one connection, in order (`mosquitto_pub -l`).
async fn mosquitto_pub_lines(port: u16, topic: &str, lines: &[&str]) {
    let mut child = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mosquitto_pub");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{}\n", lines.join("\n")).as_bytes())
        .await
        .expect("write lines");
    drop(stdin);
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("mosquitto_pub -l in time")
        .expect("mosquitto_pub -l");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test plays the pipeline: uplinks arrive on `rx`.
fn fake_pipeline() -> (PipelineHandle, mpsc::Receiver<Uplink>) {
    let (tx, rx) = mpsc::channel(64);
    (
        PipelineHandle::from_shards(vec![tx], Duration::from_secs(1)),
        rx,
    )
}

async fn next_uplink(rx: &mut mpsc::Receiver<Uplink>) -> Uplink {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("an uplink in time")
        .expect("pipeline channel open")
}

fn committed() -> Outcome {
    Outcome::Committed {
        readings: 1,
        downlink: None,
    }
}

fn answer(u: Uplink, outcome: Outcome) {
    u.reply
        .expect("QoS 1 uplinks carry a reply")
        .send(outcome)
        .expect("the source still waits for the outcome");
}

fn settings(url: &str, client_id: &str, topics: &[&str]) -> MqttSettings {
    let mut s = MqttSettings::from_config(&MqttConfig {
        mode: MqttMode::External,
        url: url.to_owned(),
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        client_id: client_id.to_owned(),
        ..MqttConfig::default()
    })
    .expect("valid settings");
    // Reconnect quickly in tests.
    s.backoff = Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    s
}

/// A running consumer (`run_with_status`).
struct Consumer {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), MqttError>>,
    status: watch::Receiver<MqttStatus>,
}

impl Consumer {
    fn start(settings: MqttSettings, pipeline: PipelineHandle) -> Consumer {
        let shutdown = CancellationToken::new();
        let (tx, status) = watch::channel(MqttStatus::Connecting);
        let task = tokio::spawn(run_with_status(settings, pipeline, shutdown.clone(), tx));
        Consumer {
            shutdown,
            task,
            status,
        }
    }

    async fn wait_for(&mut self, want: MqttStatus) {
        let reached = tokio::time::timeout(DEADLINE, self.status.wait_for(|s| *s == want))
            .await
            .map(|r| r.is_ok());
        assert!(
            reached.is_ok(),
            "consumer status {want:?} in time (now {:?})",
            *self.status.borrow()
        );
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("consumer stops in time")
            .expect("consumer task did not panic");
        assert!(result.is_ok(), "{result:?}");
    }
}

/// The Prometheus recorder, installed once for this test binary; tests assert deltas of
/// series that only they move.
fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("install the recorder")
    })
}

fn metric(name: &str, labels: &[&str]) -> f64 {
    metrics()
        .render()
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------
// A recording MQTT proxy (consumer <-> broker)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Consumer → broker.
    Up,
    /// Broker → consumer.
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// Which proxied TCP connection (0, 1, … in accept order).
    conn: usize,
    dir: Dir,
    /// MQTT control packet type (3 PUBLISH, 4 PUBACK, 8 SUBSCRIBE, 14 DISCONNECT, …).
    kind: u8,
    /// The packet identifier of a QoS 1 PUBLISH or a PUBACK.
    pkid: Option<u16>,
}

const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;

struct Proxy {
    port: u16,
    log: watch::Receiver<Vec<Seen>>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (log_tx, log) = watch::channel(Vec::new());
        tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue; // broker down: the consumer sees the close and retries
                };
                let (cr, cw) = client.into_split();
                let (br, bw) = broker.into_split();
                tokio::spawn(pump(cr, bw, conn, Dir::Up, log_tx.clone()));
                tokio::spawn(pump(br, cw, conn, Dir::Down, log_tx.clone()));
                conn += 1;
            }
        });
        Proxy { port, log }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.borrow().clone()
    }

    /// Waits until `done` holds for the log.
    async fn wait(&mut self, what: &str, done: impl FnMut(&Vec<Seen>) -> bool) -> Vec<Seen> {
        let log = tokio::time::timeout(DEADLINE, self.log.wait_for(done))
            .await
            .map(|r| r.map(|l| l.clone()));
        match log {
            Ok(Ok(log)) => log,
            _ => panic!("proxy: {what} in time; saw {:?}", self.seen()),
        }
    }

    /// Packet identifiers of `kind` in `dir`, in wire order.
    fn pkids(&self, dir: Dir, kind: u8) -> Vec<u16> {
        pkids(&self.seen(), dir, kind)
    }
}

fn pkids(log: &[Seen], dir: Dir, kind: u8) -> Vec<u16> {
    log.iter()
        .filter(|s| s.dir == dir && s.kind == kind)
        .filter_map(|s| s.pkid)
        .collect()
}

/// Copies MQTT packets from `from` to `to` one whole packet at a time, recording each.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    conn: usize,
    dir: Dir,
    log: watch::Sender<Vec<Seen>>,
) {
    loop {
        let mut packet = vec![0u8; 1];
        if from.read_exact(&mut packet).await.is_err() {
            break;
        }
        // Remaining length: up to four 7-bit groups (MQTT 3.1.1 §2.2.3).
        let mut len = 0usize;
        for shift in [0, 7, 14, 21] {
            let mut b = [0u8; 1];
            if from.read_exact(&mut b).await.is_err() {
                let _ = to.shutdown().await;
                return;
            }
            packet.push(b[0]);
            len |= usize::from(b[0] & 0x7F) << shift;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let header_len = packet.len();
        packet.resize(header_len + len, 0);
        if from.read_exact(&mut packet[header_len..]).await.is_err() {
            break;
        }
        let kind = packet[0] >> 4;
        let body = &packet[header_len..];
        let pkid = match kind {
            PUBLISH if (packet[0] >> 1) & 0x03 > 0 => {
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                Some(u16::from_be_bytes([
                    body[2 + topic_len],
                    body[3 + topic_len],
                ]))
            }
            PUBACK => Some(u16::from_be_bytes([body[0], body[1]])),
            _ => None,
        };
        // Record before forwarding: a PUBACK is in the log by the time the broker has it.
        log.send_modify(|l| {
            l.push(Seen {
                conn,
                dir,
                kind,
                pkid,
            })
        });
        if to.write_all(&packet).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// (1) QoS 1 and QoS 0 messages from `mosquitto_pub` reach the pipeline with the device id
/// from the topic and the payload bytes exactly as published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplinks_reach_the_pipeline_with_device_and_raw_bytes() {
    let dir = TempDir::new("uplinks");
    let broker = Mosquitto::start(&dir.0, free_port(), false);
    let (pipeline, mut rx) = fake_pipeline();
    let mut consumer = Consumer::start(
        settings(&broker.url(), "gw-uplinks", &["nbiot/{device}/up"]),
        pipeline,
    );
    consumer.wait_for(MqttStatus::Subscribed).await;

    // Binary, with bytes that are not text: the source does no transport decoding.
    let payload: &[u8] = &[0x68, 0x10, 0x00, 0xFF, 0x0A, 0x0D, 0x80, 0x16];
    mosquitto_pub(broker.port, 1, "nbiot/861234567890127/up", payload).await;
    let u = next_uplink(&mut rx).await;
    assert_eq!(u.device, "861234567890127");
    assert_eq!(u.payload, Bytes::from_static(payload));
    assert_eq!(u.transport, Transport::Mqtt);
    assert_eq!((u.peer, u.token.as_deref()), (None, None));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        (now_ms - u.received_at_ms).abs() < 60_000,
        "receive time is now"
    );
    assert!(u.reply.is_some(), "QoS 1 waits for the outcome");
    answer(u, committed());

    // QoS 0: at most once, nobody waits for the outcome.
    mosquitto_pub(broker.port, 0, "nbiot/dev-qos0/up", b"hex:0102").await;
    let u = next_uplink(&mut rx).await;
    assert_eq!(
        (u.device.as_str(), &u.payload[..]),
        ("dev-qos0", &b"hex:0102"[..])
    );
    assert!(u.reply.is_none());

    consumer.stop().await;
}

/// (2) + (6) The PUBACK to the broker is withheld until the pipeline's outcome, and acks
/// leave in the order the PUBLISHes arrived whatever order the outcomes come in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_wait_for_outcomes_and_keep_arrival_order() {
    let dir = TempDir::new("order");
    let broker = Mosquitto::start(&dir.0, free_port(), false);
    let mut proxy = Proxy::start(broker.port).await;
    let (pipeline, mut rx) = fake_pipeline();
    let mut consumer = Consumer::start(
        settings(&proxy.url(), "gw-order", &["nbiot/{device}/up"]),
        pipeline,
    );
    consumer.wait_for(MqttStatus::Subscribed).await;

    // Five messages over one publisher connection, so the broker delivers them in order.
    mosquitto_pub_lines(broker.port, "nbiot/m1/up", &["a", "b", "c", "d", "e"]).await;
    let mut held = Vec::new();
    for want in ["a", "b", "c", "d", "e"] {
        let u = next_uplink(&mut rx).await;
        assert_eq!(&u.payload[..], want.as_bytes(), "arrival order");
        held.push(u);
    }
    let published = proxy.pkids(Dir::Down, PUBLISH);
    assert_eq!(published.len(), 5, "{:?}", proxy.seen());

    // Outcomes for the last four arrive first, in reverse (and one is a rejection that is
    // acknowledged anyway): nothing may be acknowledged before the first.
    let first = held.remove(0);
    for (i, u) in held.into_iter().enumerate().rev() {
        let outcome = if i == 1 {
            Outcome::Rejected(Reject::UnknownDevice)
        } else {
            committed()
        };
        answer(u, outcome);
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        proxy.pkids(Dir::Up, PUBACK),
        Vec::<u16>::new(),
        "no PUBACK before the first message's outcome"
    );

    // The first outcome releases all five, in arrival order.
    answer(first, committed());
    let log = proxy
        .wait("five PUBACKs", |l| pkids(l, Dir::Up, PUBACK).len() == 5)
        .await;
    assert_eq!(pkids(&log, Dir::Up, PUBACK), published);
    assert!(log.iter().all(|s| s.conn == 0), "one connection throughout");

    consumer.stop().await;
}

/// A message the pipeline cannot take now (`Unavailable`) is not acknowledged: the source
/// pauses the session, reconnects, and the broker delivers the message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_is_not_acked_and_the_broker_redelivers() {
    let dir = TempDir::new("unavailable");
    let broker = Mosquitto::start(&dir.0, free_port(), false);
    let mut proxy = Proxy::start(broker.port).await;
    let (pipeline, mut rx) = fake_pipeline();
    let mut consumer = Consumer::start(
        settings(&proxy.url(), "gw-unavailable", &["nbiot/{device}/up"]),
        pipeline,
    );
    consumer.wait_for(MqttStatus::Subscribed).await;

    mosquitto_pub(broker.port, 1, "nbiot/m2/up", b"keep me").await;
    let u = next_uplink(&mut rx).await;
    answer(
        u,
        Outcome::Rejected(Reject::Unavailable {
            retry_after: Duration::from_millis(100),
        }),
    );
    // Delivered again on a new connection (persistent session), then committed and acked.
    let again = next_uplink(&mut rx).await;
    assert_eq!(
        (again.device.as_str(), &again.payload[..]),
        ("m2", &b"keep me"[..])
    );
    answer(again, committed());
    let log = proxy
        .wait("a PUBACK on the second connection", |l| {
            l.iter()
                .any(|s| s.conn == 1 && s.dir == Dir::Up && s.kind == PUBACK)
        })
        .await;
    assert!(
        !log.iter()
            .any(|s| s.conn == 0 && s.dir == Dir::Up && s.kind == PUBACK),
        "the withheld message was never acknowledged on the first connection: {log:?}"
    );
    consumer.stop().await;
}

/// (3) Across a broker restart the consumer reconnects, subscribes again, and receives what
/// is published afterwards. Run twice: with persistence (Mosquitto restores the session)
/// and without (the session is gone, so only the re-subscription brings messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_broker_restart_with_persistence() {
    broker_restart("restart-persist", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_after_a_broker_restart_that_lost_the_session() {
    broker_restart("restart-fresh", false).await;
}

async fn broker_restart(tag: &str, persistence: bool) {
    let dir = TempDir::new(tag);
    let mut broker = Mosquitto::start(&dir.0, free_port(), persistence);
    let (pipeline, mut rx) = fake_pipeline();
    let reconnects_before = metric("nbiot_mqtt_reconnects_total", &[]);
    let mut consumer = Consumer::start(
        settings(&broker.url(), &format!("gw-{tag}"), &["nbiot/{device}/up"]),
        pipeline,
    );
    consumer.wait_for(MqttStatus::Subscribed).await;
    mosquitto_pub(broker.port, 1, "nbiot/before/up", b"1").await;
    answer(next_uplink(&mut rx).await, committed());

    broker.stop();
    consumer.wait_for(MqttStatus::Connecting).await;
    broker.restart();
    consumer.wait_for(MqttStatus::Subscribed).await;

    mosquitto_pub(broker.port, 1, "nbiot/after/up", b"2").await;
    let u = next_uplink(&mut rx).await;
    assert_eq!((u.device.as_str(), &u.payload[..]), ("after", &b"2"[..]));
    answer(u, committed());
    assert!(metric("nbiot_mqtt_reconnects_total", &[]) >= reconnects_before + 1.0);
    consumer.stop().await;
}

/// (4) Messages published while the consumer is stopped arrive when it comes back with the
/// same client id (persistent session; a clean stop sends DISCONNECT and keeps it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_while_stopped_arrive_after_return() {
    let dir = TempDir::new("offline");
    let broker = Mosquitto::start(&dir.0, free_port(), true);
    let s = settings(&broker.url(), "gw-offline", &["nbiot/{device}/up"]);
    let (pipeline, mut rx) = fake_pipeline();
    let mut first = Consumer::start(s.clone(), pipeline.clone());
    first.wait_for(MqttStatus::Subscribed).await;
    first.stop().await;

    for (device, payload) in [("o1", "x"), ("o2", "y"), ("o3", "z")] {
        mosquitto_pub(
            broker.port,
            1,
            &format!("nbiot/{device}/up"),
            payload.as_bytes(),
        )
        .await;
    }

    let mut second = Consumer::start(s, pipeline);
    for want in ["o1", "o2", "o3"] {
        let u = next_uplink(&mut rx).await;
        assert_eq!(u.device, want);
        answer(u, committed());
    }
    second.wait_for(MqttStatus::Subscribed).await;
    second.stop().await;
}

/// A message the consumer received but could not get an outcome for before it stopped is
/// not acknowledged, and comes back to the next consumer with the same client id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_message_comes_back_after_a_restart() {
    let dir = TempDir::new("unacked");
    let broker = Mosquitto::start(&dir.0, free_port(), true);
    let mut s = settings(&broker.url(), "gw-unacked", &["nbiot/{device}/up"]);
    s.drain_timeout = Duration::from_millis(200);
    let (pipeline, mut rx) = fake_pipeline();
    let mut first = Consumer::start(s.clone(), pipeline.clone());
    first.wait_for(MqttStatus::Subscribed).await;
    mosquitto_pub(broker.port, 1, "nbiot/u1/up", b"once").await;
    let held = next_uplink(&mut rx).await; // never answered while `first` runs
    first.stop().await;
    drop(held);

    let second = Consumer::start(s, pipeline);
    let u = next_uplink(&mut rx).await;
    assert_eq!((u.device.as_str(), &u.payload[..]), ("u1", &b"once"[..]));
    answer(u, committed());
    second.stop().await;
}

/// (5) Topics that match no template (or carry an id no device can have) are counted,
/// acknowledged in order, and not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_topics_are_counted_acked_and_not_delivered() {
    let dir = TempDir::new("unmatched");
    let broker = Mosquitto::start(&dir.0, free_port(), false);
    let mut proxy = Proxy::start(broker.port).await;
    let (pipeline, mut rx) = fake_pipeline();
    let unmatched = |r| {
        metric(
            "nbiot_uplinks_rejected_total",
            &["protocol=\"mqtt\"", &format!("reason=\"{r}\"")],
        )
    };
    let (unmatched_before, bad_id_before) =
        (unmatched("unmatched_topic"), unmatched("unknown_device"));
    let received_before = metric("nbiot_uplinks_received_total", &["protocol=\"mqtt\""]);
    // `t/dev-{device}` subscribes to `t/+`, which also brings topics without the `dev-`.
    let mut consumer = Consumer::start(
        settings(
            &proxy.url(),
            "gw-unmatched",
            &["nbiot/{device}/up", "t/dev-{device}"],
        ),
        pipeline,
    );
    consumer.wait_for(MqttStatus::Subscribed).await;

    mosquitto_pub(broker.port, 1, "nbiot//up", b"empty device level").await;
    mosquitto_pub(broker.port, 1, "t/other", b"no dev- prefix").await;
    mosquitto_pub(broker.port, 1, "t/dev-bad*id", b"not a device id").await;
    mosquitto_pub(broker.port, 1, "t/dev-ok", b"fine").await;

    // Only the last one is delivered; the ones before it were handled before it.
    let u = next_uplink(&mut rx).await;
    assert_eq!((u.device.as_str(), &u.payload[..]), ("ok", &b"fine"[..]));
    assert_eq!(unmatched("unmatched_topic") - unmatched_before, 2.0);
    assert_eq!(unmatched("unknown_device") - bad_id_before, 1.0);
    assert!(
        metric("nbiot_uplinks_received_total", &["protocol=\"mqtt\""]) >= received_before + 4.0
    );
    // The three refused ones are acknowledged already; the fourth waits for its outcome.
    let log = proxy
        .wait("three PUBACKs", |l| pkids(l, Dir::Up, PUBACK).len() == 3)
        .await;
    assert_eq!(
        pkids(&log, Dir::Up, PUBACK),
        pkids(&log, Dir::Down, PUBLISH)[..3]
    );
    answer(u, committed());
    proxy
        .wait("four PUBACKs", |l| pkids(l, Dir::Up, PUBACK).len() == 4)
        .await;
    assert!(rx.try_recv().is_err(), "nothing else was delivered");
    consumer.stop().await;
}

/// (7) Embedded mode: rumqttd in-process on a port chosen at run time, consumed through the
/// same client path; `mosquitto_pub` from another process reaches the pipeline, including
/// what was sent before the consumer first connected (its session exists from the start)
/// and while it was away. Through the recording proxy, outcomes in reverse order still give
/// in-order PUBACKs, which rumqttd insists on (it disconnects a client that acknowledges
/// out of order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_takes_mosquitto_pub() {
    let s = MqttSettings::from_config(&MqttConfig::default()).expect("default settings");
    let broker = {
        let s = s.clone();
        tokio::task::spawn_blocking(move || {
            start_embedded_broker("127.0.0.1:0".parse().unwrap(), BrokerLimits::default(), &s)
        })
        .await
        .unwrap()
        .expect("embedded broker starts")
    };
    let port = broker.local_addr().port();
    assert_ne!(port, 0);
    let s = s.with_broker(broker.local_addr());
    let publish = |topic: &'static str, message: &'static str| {
        let port = port.to_string();
        async move {
            let out = tokio::time::timeout(
                DEADLINE,
                tokio::process::Command::new("mosquitto_pub")
                    .args(["-p", &port, "-q", "1", "-t", topic, "-m", message])
                    .output(),
            )
            .await
            .expect("mosquitto_pub in time")
            .expect("mosquitto_pub");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };

    // Acknowledged by the broker before the gateway's consumer ever connected.
    publish("nbiot/dev0/up", "early").await;
    let (pipeline, mut rx) = fake_pipeline();
    let mut consumer = Consumer::start(s.clone(), pipeline.clone());
    let u = next_uplink(&mut rx).await;
    assert_eq!((u.device.as_str(), &u.payload[..]), ("dev0", &b"early"[..]));
    answer(u, committed());
    consumer.wait_for(MqttStatus::Subscribed).await;

    publish("nbiot/dev1/up", "hello").await;
    let u = next_uplink(&mut rx).await;
    assert_eq!((u.device.as_str(), &u.payload[..]), ("dev1", &b"hello"[..]));
    assert_eq!(u.transport, Transport::Mqtt);
    answer(u, committed());
    // No subscription matches: acknowledged by rumqttd and dropped (plain MQTT).
    publish("elsewhere/dev1/up", "nobody reads this").await;

    // The session outlives the consumer within the process: what is published while it is
    // away arrives when it returns with the same client id, once.
    consumer.stop().await;
    publish("nbiot/dev1/up", "while away").await;
    let mut consumer = Consumer::start(s, pipeline);
    let u = next_uplink(&mut rx).await;
    assert_eq!(&u.payload[..], b"while away");
    answer(u, committed());
    consumer.wait_for(MqttStatus::Subscribed).await;
    publish("nbiot/dev1/up", "after").await;
    let u = next_uplink(&mut rx).await;
    assert_eq!(
        &u.payload[..],
        b"after",
        "no second copy, nothing from elsewhere/"
    );
    answer(u, committed());
    consumer.stop().await;

    // The same broker, through the proxy, with outcomes in reverse order.
    let mut proxy = Proxy::start(port).await;
    let (pipeline, mut rx) = fake_pipeline();
    let mut s = MqttSettings::from_config(&MqttConfig::default())
        .expect("default settings")
        .with_broker(SocketAddr::from(([127, 0, 0, 1], proxy.port)));
    s.client_id = "nbiot-gateway-proxied".to_owned();
    let mut consumer = Consumer::start(s, pipeline);
    consumer.wait_for(MqttStatus::Subscribed).await;
    mosquitto_pub_lines(port, "nbiot/dev2/up", &["1", "2", "3"]).await;
    let mut held = Vec::new();
    for want in ["1", "2", "3"] {
        let u = next_uplink(&mut rx).await;
        assert_eq!(&u.payload[..], want.as_bytes());
        held.push(u);
    }
    for u in held.into_iter().rev() {
        answer(u, committed());
    }
    let log = proxy
        .wait("three PUBACKs", |l| pkids(l, Dir::Up, PUBACK).len() == 3)
        .await;
    assert_eq!(
        pkids(&log, Dir::Up, PUBACK),
        pkids(&log, Dir::Down, PUBLISH)
    );
    assert!(
        log.iter().all(|s| s.conn == 0),
        "rumqttd kept the connection: {log:?}"
    );
    consumer.stop().await;
}
