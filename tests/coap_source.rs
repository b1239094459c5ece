//! The CoAP source against real clients: libcoap's `coap-client-notls` (Debian
//! `libcoap3-bin`; `scripts/test.sh` installs it) and hand-built datagrams on real UDP
//! sockets. Each test plays the pipeline itself: it holds the receiving end of the shard
//! queue, so it sees exactly which uplinks got through (retransmissions must not) and
//! chooses each one's outcome.
//!
//! Every server binds 127.0.0.1:0. Waiting is bounded by deadlines; "nothing was sent
//! back" is proven with a barrier — a CoAP ping sent after the request, whose RST must be
//! the very next datagram (the server handles one socket's datagrams in order). Every
//! response is checked against the amplification rule: never larger than its request.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use nbiot_gateway::config::CoapConfig;
use nbiot_gateway::pipeline::{Outcome, PipelineHandle, Reject, Transport, Uplink};
use nbiot_gateway::sources::coap::{serve_with_metrics, CoapMetrics, CoapSettings};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Upper bound for anything to happen (libcoap retransmits after 2–3 s).
const DEADLINE: Duration = Duration::from_secs(30);
/// What the fake pipeline tells `submit` callers to wait when its queue is full.
const QUEUE_RETRY_AFTER: Duration = Duration::from_secs(7);

// ---------------------------------------------------------------------------------------
// The gateway under test, with the test as its pipeline.

struct Gateway {
    addr: SocketAddr,
    /// The shard queue: what reached the pipeline.
    uplinks: Option<mpsc::Receiver<Uplink>>,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
    server: JoinHandle<io::Result<()>>,
}

fn settings(max_payload: usize) -> CoapSettings {
    CoapSettings::from_config(&CoapConfig {
        max_payload,
        ..CoapConfig::default()
    })
    .unwrap()
}

impl Gateway {
    async fn start(settings: CoapSettings) -> Gateway {
        Gateway::with_queue(settings, 64).await
    }

    async fn with_queue(settings: CoapSettings, queue: usize) -> Gateway {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(queue);
        let pipeline = PipelineHandle::from_shards(vec![tx], QUEUE_RETRY_AFTER);
        let recorder = PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let handles = metrics::with_local_recorder(&recorder, CoapMetrics::new);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_with_metrics(
            socket,
            settings,
            pipeline,
            shutdown.clone(),
            handles,
        ));
        Gateway {
            addr,
            uplinks: Some(rx),
            metrics,
            shutdown,
            server,
        }
    }

    /// The next uplink the pipeline received.
    async fn next_uplink(&mut self) -> Uplink {
        let rx = self.uplinks.as_mut().expect("pipeline handed to a task");
        timeout(DEADLINE, rx.recv())
            .await
            .expect("no uplink reached the pipeline")
            .expect("queue closed")
    }

    /// Asserts no further uplink has reached the pipeline (call after a barrier: the
    /// source submits synchronously, before it handles the next datagram).
    fn assert_no_more_uplinks(&mut self) {
        let rx = self.uplinks.as_mut().expect("pipeline handed to a task");
        if let Ok(u) = rx.try_recv() {
            panic!("unexpected uplink reached the pipeline: {u:?}");
        }
    }

    /// Hands the pipeline to a task answering every uplink with `decide`; returns what it saw.
    fn answer_all(
        &mut self,
        decide: impl Fn(&Seen) -> Outcome + Send + 'static,
    ) -> Arc<Mutex<Vec<Seen>>> {
        let mut rx = self.uplinks.take().expect("pipeline already handed out");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Some(u) = rx.recv().await {
                let s = Seen::of(&u);
                let outcome = decide(&s);
                record.lock().unwrap().push(s);
                if let Some(reply) = u.reply {
                    let _ = reply.send(outcome);
                }
            }
        });
        seen
    }

    /// A counter's value; `series` as rendered, e.g. `nbiot_uplinks_received_total{protocol="coap"}`.
    fn metric(&self, series: &str) -> u64 {
        self.metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }

    fn rejected(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "nbiot_uplinks_rejected_total{{protocol=\"coap\",reason=\"{reason}\"}}"
        ))
    }

    fn received(&self) -> u64 {
        self.metric("nbiot_uplinks_received_total{protocol=\"coap\"}")
    }

    fn duplicates(&self) -> u64 {
        self.metric("nbiot_uplinks_duplicate_total{protocol=\"coap\"}")
    }

    fn dropped(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "nbiot_datagrams_dropped_total{{reason=\"{reason}\"}}"
        ))
    }

    fn url(&self, path: &str) -> String {
        format!("coap://127.0.0.1:{}/{path}", self.addr.port())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(DEADLINE, self.server)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

/// What the pipeline saw of an uplink.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    device: String,
    payload: Vec<u8>,
    token: Option<String>,
    confirmable: bool,
}

impl Seen {
    fn of(u: &Uplink) -> Seen {
        assert_eq!(u.transport, Transport::Coap);
        assert!(u.peer.is_some_and(|p| p.ip().is_loopback()), "{:?}", u.peer);
        assert!(u.received_at_ms > 1_600_000_000_000);
        Seen {
            device: u.device.clone(),
            payload: u.payload.to_vec(),
            token: u.token.clone(),
            confirmable: u.reply.is_some(),
        }
    }
}

fn committed(downlink: Option<&'static [u8]>) -> Outcome {
    Outcome::Committed {
        readings: 1,
        downlink: downlink.map(Bytes::from_static),
    }
}

// ---------------------------------------------------------------------------------------
// Hand-built datagrams.

#[derive(Clone)]
struct Req {
    kind: MessageType,
    method: RequestType,
    mid: u16,
    token: Vec<u8>,
    path: String,
    options: Vec<(CoapOption, Vec<u8>)>,
    payload: Vec<u8>,
}

fn post(path: &str, payload: &[u8]) -> Req {
    Req {
        kind: MessageType::Confirmable,
        method: RequestType::Post,
        mid: 0x1000,
        token: vec![0xA1, 0xA2],
        path: path.to_owned(),
        options: Vec::new(),
        payload: payload.to_vec(),
    }
}

impl Req {
    fn mid(mut self, mid: u16) -> Req {
        self.mid = mid;
        self
    }
    fn token(mut self, token: &[u8]) -> Req {
        self.token = token.to_vec();
        self
    }
    fn non(mut self) -> Req {
        self.kind = MessageType::NonConfirmable;
        self
    }
    fn method(mut self, method: RequestType) -> Req {
        self.method = method;
        self
    }
    fn option(mut self, option: CoapOption, value: &[u8]) -> Req {
        self.options.push((option, value.to_vec()));
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut p = Packet::new();
        p.header.set_type(self.kind);
        p.header.code = MessageClass::Request(self.method);
        p.header.message_id = self.mid;
        p.set_token(self.token.clone());
        let (path, query) = self.path.split_once('?').unwrap_or((&self.path, ""));
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        for q in query.split('&').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        for (o, v) in &self.options {
            p.add_option(*o, v.clone());
        }
        p.payload = self.payload.clone();
        p.to_bytes_unlimited().unwrap()
    }
}

/// A device: one UDP socket (so one peer address).
struct Client {
    sock: UdpSocket,
    server: SocketAddr,
}

static PING_MID: AtomicU16 = AtomicU16::new(0xF000);

impl Client {
    async fn new(server: SocketAddr) -> Client {
        Client {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
        }
    }

    async fn send(&self, datagram: &[u8]) {
        self.sock.send_to(datagram, self.server).await.unwrap();
    }

    /// The next datagram from the server, checked against the request it answers.
    async fn recv_for(&self, request_len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; 70_000];
        let (n, from) = timeout(DEADLINE, self.sock.recv_from(&mut buf))
            .await
            .expect("no response")
            .unwrap();
        assert_eq!(from, self.server);
        assert!(
            n <= request_len,
            "amplification: a {n}-byte response to a {request_len}-byte request"
        );
        buf.truncate(n);
        buf
    }

    async fn request(&self, req: &Req) -> Packet {
        let bytes = req.bytes();
        self.send(&bytes).await;
        let resp = Packet::from_bytes(&self.recv_for(bytes.len()).await).unwrap();
        assert_eq!(resp.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(resp.header.message_id, req.mid);
        assert_eq!(resp.get_token(), &req.token[..]);
        resp
    }

    /// Proves nothing was sent back for what this client sent before: a ping's RST must
    /// be the next datagram.
    async fn barrier(&self) {
        let mid = PING_MID.fetch_add(1, Ordering::Relaxed);
        let [hi, lo] = mid.to_be_bytes();
        self.send(&[0x40, 0x00, hi, lo]).await;
        assert_eq!(
            self.recv_for(4).await,
            vec![0x70, 0x00, hi, lo],
            "expected only the RST"
        );
    }
}

fn code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(r) => r,
        other => panic!("not a response: {other}"),
    }
}

fn uint(p: &Packet, o: CoapOption) -> Option<u32> {
    p.get_first_option(o)
        .map(|v| v.iter().fold(0u32, |a, b| a << 8 | u32::from(*b)))
}

// ---------------------------------------------------------------------------------------
// libcoap's coap-client.

async fn coap_client(args: &[&str]) -> Output {
    let child = tokio::process::Command::new("coap-client-notls")
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = timeout(DEADLINE, child)
        .await
        .expect("coap-client did not finish")
        .expect("coap-client-notls is not installed (Debian libcoap3-bin; see scripts/test.sh)");
    eprintln!(
        "coap-client {args:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A UDP relay between a client and the server that loses the first `lose` responses and,
/// with `rebind`, sends everything after the client's first datagram from a new port —
/// what an NB-IoT carrier's NAT does to a device that retries after a while.
async fn lossy_relay(server: SocketAddr, lose: usize, rebind: bool) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = front.local_addr().unwrap();
    let first = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let second = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(async move {
        let (mut client, mut forwarded, mut lost) = (None, 0usize, 0usize);
        let (mut a, mut b, mut c) = ([0u8; 2048], [0u8; 2048], [0u8; 2048]);
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut a) => {
                    client = Some(from);
                    let out = if rebind && forwarded > 0 { &second } else { &first };
                    let _ = out.send_to(&a[..n], server).await;
                    forwarded += 1;
                }
                Ok((n, _)) = first.recv_from(&mut b) => {
                    if lost < lose { lost += 1; continue; }
                    if let Some(to) = client { let _ = front.send_to(&b[..n], to).await; }
                }
                Ok((n, _)) = second.recv_from(&mut c) => {
                    if lost < lose { lost += 1; continue; }
                    if let Some(to) = client { let _ = front.send_to(&c[..n], to).await; }
                }
            }
        }
    });
    addr
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// =======================================================================================
// libcoap

#[tokio::test]
async fn libcoap_post_is_acknowledged_after_the_commit_with_its_downlink() {
    let mut gw = Gateway::start(settings(1024)).await;
    let url = gw.url("up/dev-1?t=secret-token1");
    let client =
        tokio::spawn(async move { coap_client(&["-m", "post", "-e", "hello", &url]).await });
    let uplink = gw.next_uplink().await;
    assert_eq!(
        Seen::of(&uplink),
        Seen {
            device: "dev-1".into(),
            payload: b"hello".to_vec(),
            token: Some("secret-token1".into()),
            confirmable: true,
        }
    );
    // Nothing is acknowledged before the pipeline says the uplink is committed.
    uplink.reply.unwrap().send(committed(Some(b"ON"))).unwrap();
    let out = client.await.unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ON");
    assert_eq!(gw.received(), 1);
    assert_eq!(gw.duplicates(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn libcoap_block1_upload_is_one_uplink() {
    let mut gw = Gateway::start(settings(1024)).await;
    let seen = gw.answer_all(|_| committed(None));
    let dir = std::env::temp_dir().join(format!("coap-block1-{}", gw.addr.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("payload.bin");
    let payload: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &payload).unwrap();
    let out = coap_client(&[
        "-m",
        "post",
        "-b",
        "64",
        "-f",
        path(&file),
        &gw.url("up/meter-7"),
    ])
    .await;
    assert!(out.status.success());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].device.as_str(), &seen[0].payload),
        ("meter-7", &payload)
    );
    assert_eq!(gw.received(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
    gw.stop().await;
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// libcoap's loss injection (`-l 1,3`: the first transmission of block 0 and of block 1 are
/// never sent): the retransmissions complete the upload, which reaches the pipeline once.
#[tokio::test]
async fn libcoap_lost_blocks_are_retransmitted_and_taken_once() {
    let mut gw = Gateway::start(settings(1024)).await;
    let seen = gw.answer_all(|_| committed(None));
    let dir = std::env::temp_dir().join(format!("coap-loss-{}", gw.addr.port()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("payload.bin");
    let payload: Vec<u8> = (0..100u8).collect();
    std::fs::write(&file, &payload).unwrap();
    let out = coap_client(&[
        "-m",
        "post",
        "-b",
        "64",
        "-l",
        "1,3",
        "-f",
        path(&file),
        &gw.url("up/dev-2"),
    ])
    .await;
    assert!(out.status.success());
    assert_eq!(
        seen.lock()
            .unwrap()
            .iter()
            .map(|s| &s.payload)
            .collect::<Vec<_>>(),
        vec![&payload]
    );
    std::fs::remove_dir_all(&dir).unwrap();
    gw.stop().await;
}

/// The ACK is lost on the way back: libcoap retransmits the same message, which gets the
/// cached response and is not processed again.
#[tokio::test]
async fn libcoap_retransmission_after_a_lost_ack_gets_the_cached_response() {
    let mut gw = Gateway::start(settings(1024)).await;
    let seen = gw.answer_all(|_| committed(Some(b"D1")));
    let relay = lossy_relay(gw.addr, 1, false).await;
    let url = format!("coap://127.0.0.1:{}/up/dev-3", relay.port());
    let out = coap_client(&["-m", "post", "-e", "reading-42", &url]).await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "D1");
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!((gw.received(), gw.duplicates()), (1, 1));
    gw.stop().await;
}

/// As above, but the retry comes from a new port (NAT rebinding): the (peer, MID) is new,
/// the (device, payload) is not, so the cached response is re-addressed to it.
#[tokio::test]
async fn libcoap_retry_from_a_new_port_gets_the_cached_response() {
    let mut gw = Gateway::start(settings(1024)).await;
    let seen = gw.answer_all(|_| committed(Some(b"D2")));
    let relay = lossy_relay(gw.addr, 1, true).await;
    let url = format!("coap://127.0.0.1:{}/up/dev-4", relay.port());
    let out = coap_client(&["-m", "post", "-e", "reading-43", &url]).await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "D2");
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!((gw.received(), gw.duplicates()), (1, 1));
    gw.stop().await;
}

/// A commit slower than libcoap's ACK timeout: the retransmission arrives while the
/// original is in flight, is dropped silently, and the late ACK answers both.
#[tokio::test]
async fn libcoap_retransmission_during_a_slow_commit_is_answered_by_the_ack() {
    let mut gw = Gateway::start(settings(1024)).await;
    let url = gw.url("up/dev-5");
    let client =
        tokio::spawn(async move { coap_client(&["-m", "post", "-e", "slow", &url]).await });
    let uplink = gw.next_uplink().await;
    eventually("the retransmission", || gw.duplicates() == 1).await;
    uplink
        .reply
        .unwrap()
        .send(committed(Some(b"late")))
        .unwrap();
    let out = client.await.unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "late");
    gw.assert_no_more_uplinks();
    assert_eq!(gw.received(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn libcoap_discovery_lists_the_uplink_resource() {
    let gw = Gateway::start(settings(1024)).await;
    let out = coap_client(&[&gw.url(".well-known/core")]).await;
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"</up>;rt="nbiot.uplink";ct=42"#
    );
    assert_eq!(gw.received(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn libcoap_non_is_submitted_without_a_reply() {
    let mut gw = Gateway::start(settings(1024)).await;
    let out = coap_client(&[
        "-N",
        "-B",
        "1",
        "-m",
        "put",
        "-e",
        "fire-and-forget",
        &gw.url("up/dev-6"),
    ])
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let uplink = gw.next_uplink().await;
    assert_eq!(
        Seen::of(&uplink),
        Seen {
            device: "dev-6".into(),
            payload: b"fire-and-forget".to_vec(),
            token: None,
            confirmable: false,
        }
    );
    gw.stop().await;
}

// =======================================================================================
// Duplicates, hand-built

#[tokio::test]
async fn the_same_message_id_twice_is_answered_from_the_cache_and_processed_once() {
    let mut gw = Gateway::start(settings(1024)).await;
    let device = Client::new(gw.addr).await;
    let req = post("up/dev-1", b"\x01\x02\x03").mid(0x2222);
    device.send(&req.bytes()).await;
    let uplink = gw.next_uplink().await;
    uplink
        .reply
        .unwrap()
        .send(committed(Some(b"\x09")))
        .unwrap();
    let first = device.recv_for(req.bytes().len()).await;
    device.send(&req.bytes()).await;
    assert_eq!(device.recv_for(req.bytes().len()).await, first);
    device.barrier().await;
    gw.assert_no_more_uplinks();
    let p = Packet::from_bytes(&first).unwrap();
    assert_eq!((code(&p), p.payload), (ResponseType::Changed, vec![9]));
    assert_eq!((gw.received(), gw.duplicates()), (1, 1));

    // A NON repeated with its MID is not submitted again either (and never answered).
    let non = post("up/dev-1", b"non").non().mid(0x3333);
    device.send(&non.bytes()).await;
    device.send(&non.bytes()).await;
    device.barrier().await;
    assert_eq!(Seen::of(&gw.next_uplink().await).payload, b"non".to_vec());
    gw.assert_no_more_uplinks();
    assert_eq!((gw.received(), gw.duplicates()), (2, 2));
    // The same NON payload under a new MID is a repeat too...
    device.send(&non.clone().mid(0x3334).bytes()).await;
    device.barrier().await;
    gw.assert_no_more_uplinks();
    // ...but a CON with it is processed: the NON's fate is unknown, an ACK is a promise.
    let con = post("up/dev-1", b"non").mid(0x3335);
    device.send(&con.bytes()).await;
    let u = gw.next_uplink().await;
    assert!(u.reply.is_some());
    u.reply.unwrap().send(committed(None)).unwrap();
    let p = Packet::from_bytes(&device.recv_for(con.bytes().len()).await).unwrap();
    assert_eq!(code(&p), ResponseType::Changed);
    assert_eq!((gw.received(), gw.duplicates()), (3, 3));
    gw.stop().await;
}

#[tokio::test]
async fn the_same_payload_from_a_new_port_gets_the_cached_response_readdressed() {
    let mut gw = Gateway::start(settings(1024)).await;
    let before = Client::new(gw.addr).await;
    let after = Client::new(gw.addr).await; // the same device after NAT rebinding
    let req = post("up/dev-1?t=token-0001", b"reading-1")
        .mid(1)
        .token(&[1]);
    before.send(&req.bytes()).await;
    gw.next_uplink()
        .await
        .reply
        .unwrap()
        .send(committed(Some(b"cfg")))
        .unwrap();
    let p = Packet::from_bytes(&before.recv_for(req.bytes().len()).await).unwrap();
    assert_eq!(
        (code(&p), p.payload.as_slice()),
        (ResponseType::Changed, &b"cfg"[..])
    );

    // New port, new MID and token: same response, this exchange's MID and token.
    let retry = req.clone().mid(900).token(&[9, 9, 9]);
    let p = after.request(&retry).await;
    assert_eq!(
        (code(&p), p.payload.as_slice()),
        (ResponseType::Changed, &b"cfg"[..])
    );
    after.barrier().await;
    gw.assert_no_more_uplinks();
    assert_eq!(gw.duplicates(), 1);

    // Another token is another sender: processed (and judged by the pipeline).
    let other = post("up/dev-1?t=token-0002", b"reading-1").mid(901);
    after.send(&other.bytes()).await;
    let u = gw.next_uplink().await;
    assert_eq!(u.token.as_deref(), Some("token-0002"));
    u.reply
        .unwrap()
        .send(Outcome::Rejected(Reject::BadToken))
        .unwrap();
    assert_eq!(
        code(&Packet::from_bytes(&after.recv_for(other.bytes().len()).await).unwrap()),
        ResponseType::Unauthorized
    );

    // What was refused is not remembered: a retry of it is processed again.
    let refused = post("up/dev-9", b"early").mid(2);
    before.send(&refused.bytes()).await;
    gw.next_uplink()
        .await
        .reply
        .unwrap()
        .send(Outcome::Rejected(Reject::UnknownDevice))
        .unwrap();
    before.recv_for(refused.bytes().len()).await;
    after.send(&refused.clone().mid(902).bytes()).await;
    gw.next_uplink()
        .await
        .reply
        .unwrap()
        .send(committed(None))
        .unwrap();
    let p = Packet::from_bytes(&after.recv_for(refused.bytes().len()).await).unwrap();
    assert_eq!(code(&p), ResponseType::Changed);
    assert_eq!((gw.received(), gw.duplicates()), (4, 1));
    gw.stop().await;
}

#[tokio::test]
async fn retransmissions_while_in_flight_wait_for_the_outcome() {
    let mut gw = Gateway::start(settings(1024)).await;
    let before = Client::new(gw.addr).await;
    let after = Client::new(gw.addr).await;
    let req = post("up/dev-1", b"slow-commit").mid(10).token(&[1]);
    before.send(&req.bytes()).await;
    let uplink = gw.next_uplink().await;
    // Same MID, same peer: dropped silently (the ACK to come answers it).
    before.send(&req.bytes()).await;
    before.barrier().await;
    // Same payload from a new port: waits for the original's outcome.
    let retry = req.clone().mid(11).token(&[2, 2]);
    after.send(&retry.bytes()).await;
    after.barrier().await;
    gw.assert_no_more_uplinks();

    uplink.reply.unwrap().send(committed(Some(b"ok"))).unwrap();
    let a = Packet::from_bytes(&before.recv_for(req.bytes().len()).await).unwrap();
    let b = Packet::from_bytes(&after.recv_for(retry.bytes().len()).await).unwrap();
    assert_eq!((a.header.message_id, a.get_token()), (10, &[1u8][..]));
    assert_eq!((b.header.message_id, b.get_token()), (11, &[2u8, 2][..]));
    assert_eq!(
        (code(&a), code(&b)),
        (ResponseType::Changed, ResponseType::Changed)
    );
    assert_eq!((a.payload, b.payload), (b"ok".to_vec(), b"ok".to_vec()));
    // The waiter's own MID now has its response cached too.
    assert_eq!(code(&after.request(&retry).await), ResponseType::Changed);
    gw.assert_no_more_uplinks();
    assert_eq!((gw.received(), gw.duplicates()), (1, 3));
    gw.stop().await;
}

// =======================================================================================
// What is not answered

#[tokio::test]
async fn datagrams_that_are_not_coap_requests_are_dropped_unanswered() {
    let mut gw = Gateway::start(settings(1024)).await;
    let c = Client::new(gw.addr).await;
    let not_coap: [&[u8]; 6] = [
        b"",
        b"GET / HTTP/1.1\r\n\r\n",
        &[0x80, 0x02, 0x00, 0x01],          // version 2
        &[0x49, 0x02, 0x00, 0x01, 1, 2, 3], // token length 9
        &[0x40, 0xE1, 0x00, 0x01],          // reserved class 7
        &[0x41, 0x00, 0x00, 0x01, 0x05],    // empty message with a token
    ];
    let unexpected: [&[u8]; 4] = [
        &[0x60, 0x00, 0x00, 0x01],             // empty ACK
        &[0x70, 0x00, 0x00, 0x01],             // RST
        &[0x50, 0x00, 0x00, 0x01],             // empty NON
        &[0x60, 0x45, 0x00, 0x01, 0xFF, 0x01], // a 2.05 response
    ];
    for d in not_coap.iter().chain(&unexpected) {
        c.send(d).await;
        c.barrier().await;
    }
    gw.assert_no_more_uplinks();
    assert_eq!(gw.dropped("not_coap"), 6);
    assert_eq!(gw.dropped("unexpected"), 4);
    assert_eq!(gw.received(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn non_requests_are_never_answered() {
    let mut gw = Gateway::start(settings(64)).await;
    let c = Client::new(gw.addr).await;
    for (i, req) in [
        post("nowhere", b"x").non(),
        post("up/dev-1", &[0; 65]).non(),
        post("up/dev-1", b"x").non().method(RequestType::Get),
        Req {
            path: ".well-known/core".into(),
            ..post("", b"")
        }
        .non()
        .method(RequestType::Get),
    ]
    .into_iter()
    .enumerate()
    {
        c.send(&req.mid(i as u16).bytes()).await;
        c.barrier().await;
    }
    gw.assert_no_more_uplinks();
    assert_eq!(gw.rejected("not_found"), 1);
    assert_eq!(gw.rejected("too_large"), 1);
    assert_eq!(gw.rejected("method_not_allowed"), 1);
    gw.stop().await;
}

// =======================================================================================
// Errors, each counted

#[tokio::test]
async fn routing_errors() {
    let mut gw = Gateway::start(settings(1024)).await;
    let c = Client::new(gw.addr).await;
    let cases = [
        (
            post("down/dev-1", b"x"),
            ResponseType::NotFound,
            "not_found",
        ),
        (
            post("up/dev-1/extra", b"x"),
            ResponseType::NotFound,
            "not_found",
        ),
        (
            post("up/dev 1", b"x"),
            ResponseType::NotFound,
            "unknown_device",
        ),
        (
            post("up/dev-1", b"x").method(RequestType::Get),
            ResponseType::MethodNotAllowed,
            "method_not_allowed",
        ),
        (
            post("up/dev-1", b"x").method(RequestType::Delete),
            ResponseType::MethodNotAllowed,
            "method_not_allowed",
        ),
        (
            post("up/dev-1", b"x").option(CoapOption::ContentFormat, &[50]),
            ResponseType::UnsupportedContentFormat,
            "unsupported_content_format",
        ),
        (
            post("up/dev-1", b"x").option(CoapOption::IfMatch, &[1]),
            ResponseType::BadOption,
            "bad_request",
        ),
    ];
    for (i, (req, expected, reason)) in cases.into_iter().enumerate() {
        let before = gw.rejected(reason);
        let p = c.request(&req.mid(100 + i as u16)).await;
        assert_eq!(code(&p), expected, "case {i}");
        assert_eq!(gw.rejected(reason), before + 1, "case {i}: {reason}");
    }
    // PUT works as POST; octet-stream is accepted.
    let req = post("up/dev-1", b"x")
        .method(RequestType::Put)
        .option(CoapOption::ContentFormat, &[42])
        .mid(200);
    c.send(&req.bytes()).await;
    gw.next_uplink()
        .await
        .reply
        .unwrap()
        .send(committed(None))
        .unwrap();
    assert_eq!(
        code(&Packet::from_bytes(&c.recv_for(req.bytes().len()).await).unwrap()),
        ResponseType::Changed
    );
    gw.assert_no_more_uplinks();
    assert_eq!(gw.received(), 8);
    gw.stop().await;
}

#[tokio::test]
async fn outcomes_become_response_codes() {
    let mut gw = Gateway::start(settings(1024)).await;
    let c = Client::new(gw.addr).await;
    let undecodable = Outcome::Undecodable {
        code: "checksum",
        message: "checksum 0x12 != 0x34 at offset 9".into(),
    };
    /// (outcome, or None for a dropped reply; code; Max-Age; payload; rejection reason the
    /// source counts — the pipeline counts the refusals it decides itself, so here, where
    /// the test plays the pipeline, only the dropped reply is counted)
    type Case = (
        Option<Outcome>,
        ResponseType,
        Option<u32>,
        &'static [u8],
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            Some(committed(None)),
            ResponseType::Changed,
            None,
            b"",
            None,
        ),
        (
            Some(undecodable),
            ResponseType::BadRequest,
            None,
            b"checksum",
            None,
        ),
        (
            Some(Outcome::Rejected(Reject::UnknownDevice)),
            ResponseType::NotFound,
            None,
            b"",
            None,
        ),
        (
            Some(Outcome::Rejected(Reject::BadToken)),
            ResponseType::Unauthorized,
            None,
            b"",
            None,
        ),
        (
            Some(Outcome::Rejected(Reject::NoProfile)),
            ResponseType::ServiceUnavailable,
            Some(60),
            b"",
            None,
        ),
        (
            Some(Outcome::Rejected(Reject::Unavailable {
                retry_after: Duration::from_millis(4500),
            })),
            ResponseType::ServiceUnavailable,
            Some(5),
            b"",
            None,
        ),
        // The pipeline dropped the uplink without an outcome.
        (
            None,
            ResponseType::ServiceUnavailable,
            Some(2),
            b"",
            Some("unavailable"),
        ),
    ];
    let mut counted = std::collections::HashMap::new();
    for (i, (outcome, expected, max_age, payload, reason)) in cases.into_iter().enumerate() {
        let req = post("up/dev-1", format!("payload number {i}").as_bytes()).mid(i as u16);
        c.send(&req.bytes()).await;
        let reply = gw.next_uplink().await.reply.unwrap();
        match outcome {
            Some(o) => reply.send(o).unwrap(),
            None => drop(reply),
        }
        let p = Packet::from_bytes(&c.recv_for(req.bytes().len()).await).unwrap();
        assert_eq!(
            (code(&p), uint(&p, CoapOption::MaxAge), p.payload.as_slice()),
            (expected, max_age, payload),
            "case {i}"
        );
        // Counted before the response is sent.
        if let Some(r) = reason {
            *counted.entry(r).or_insert(0) += 1;
        }
        for (r, n) in &counted {
            assert_eq!(gw.rejected(r), *n, "case {i}: {r}");
        }
    }
    assert_eq!(gw.received(), 7);
    gw.stop().await;
}

#[tokio::test]
async fn too_large_is_4_13_with_size1() {
    let max = 64;
    let gw = Gateway::start(settings(max)).await;
    let c = Client::new(gw.addr).await;
    let p = c.request(&post("up/dev-1", &[7; 65]).mid(1)).await;
    assert_eq!(
        (code(&p), uint(&p, CoapOption::Size1)),
        (ResponseType::RequestEntityTooLarge, Some(64))
    );
    // Announced too large (Size1) without Block1.
    let p = c
        .request(
            &post("up/dev-1", &[7; 10])
                .option(CoapOption::Size1, &[0x01, 0x00])
                .mid(2),
        )
        .await;
    assert_eq!(
        (code(&p), uint(&p, CoapOption::Size1)),
        (ResponseType::RequestEntityTooLarge, Some(64))
    );

    // A datagram that fills the receive buffer (max_payload + 512 + 1) may have been cut by
    // the OS: 4.13 for a CON, dropped for a NON.
    let fill = max + 512 + 1;
    let mut con = post("up/dev-1", &[]).mid(3).bytes();
    con.push(0xFF);
    con.resize(fill, 0xAB);
    c.send(&con).await;
    let p = Packet::from_bytes(&c.recv_for(con.len()).await).unwrap();
    assert_eq!(
        (p.header.message_id, code(&p), uint(&p, CoapOption::Size1)),
        (3, ResponseType::RequestEntityTooLarge, Some(64))
    );
    let mut non = post("up/dev-1", &[]).non().mid(4).bytes();
    non.push(0xFF);
    non.resize(fill + 1000, 0xAB);
    c.send(&non).await;
    c.barrier().await;
    assert_eq!(gw.rejected("too_large"), 3);
    assert_eq!(gw.dropped("truncated"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_full_pipeline_queue_is_5_03_with_its_max_age() {
    // One slot, never drained: the first uplink fills it, the second finds it full.
    let mut gw = Gateway::with_queue(settings(1024), 1).await;
    let c = Client::new(gw.addr).await;
    c.send(&post("up/dev-1", b"first").mid(1).bytes()).await;
    c.barrier().await;
    let p = c.request(&post("up/dev-2", b"second").mid(2)).await;
    assert_eq!(
        (code(&p), uint(&p, CoapOption::MaxAge)),
        (ResponseType::ServiceUnavailable, Some(7))
    );
    assert_eq!(gw.rejected("overloaded"), 1);
    // The refused uplink was not remembered as taken: once there is room, its retry is
    // processed.
    let first = gw.next_uplink().await;
    first.reply.unwrap().send(committed(None)).unwrap();
    assert_eq!(
        code(&Packet::from_bytes(&c.recv_for(100).await).unwrap()),
        ResponseType::Changed
    );
    let retry = post("up/dev-2", b"second").mid(3);
    c.send(&retry.bytes()).await;
    let second = gw.next_uplink().await;
    assert_eq!(second.payload, Bytes::from_static(b"second"));
    second.reply.unwrap().send(committed(None)).unwrap();
    let p = Packet::from_bytes(&c.recv_for(retry.bytes().len()).await).unwrap();
    assert_eq!(code(&p), ResponseType::Changed);
    assert_eq!((gw.received(), gw.duplicates()), (3, 0));
    gw.stop().await;
}

#[tokio::test]
async fn too_many_requests_in_flight_is_5_03_with_max_age() {
    let mut s = settings(1024);
    s.max_in_flight = 1;
    s.busy_retry_after = Duration::from_secs(3);
    let mut gw = Gateway::start(s).await;
    let c = Client::new(gw.addr).await;
    c.send(&post("up/dev-1", b"first").mid(1).bytes()).await;
    let first = gw.next_uplink().await;
    let p = c.request(&post("up/dev-1", b"second").mid(2)).await;
    assert_eq!(
        (code(&p), uint(&p, CoapOption::MaxAge)),
        (ResponseType::ServiceUnavailable, Some(3))
    );
    assert_eq!(gw.rejected("overloaded"), 1);
    first.reply.unwrap().send(committed(None)).unwrap();
    assert_eq!(
        code(&Packet::from_bytes(&c.recv_for(100).await).unwrap()),
        ResponseType::Changed
    );
    // The permit is back.
    c.send(&post("up/dev-1", b"third").mid(3).bytes()).await;
    assert_eq!(gw.next_uplink().await.payload, Bytes::from_static(b"third"));
    gw.stop().await;
}

// =======================================================================================
// Block1

fn block(num: u32, more: bool, szx: u8) -> Vec<u8> {
    let v = num << 4 | u32::from(more) << 3 | u32::from(szx);
    let b = v.to_be_bytes();
    b[b.iter().position(|x| *x != 0).unwrap_or(4)..].to_vec()
}

#[tokio::test]
async fn block1_uploads() {
    let mut gw = Gateway::start(settings(100)).await;
    let c = Client::new(gw.addr).await;
    let part = |mid: u16, num: u32, more: bool, data: &[u8]| {
        post("up/dev-1", data)
            .mid(mid)
            .token(&[mid as u8])
            .option(CoapOption::Block1, &block(num, more, 0))
    };
    // 16 + 16 + 4 bytes; libcoap-style new token per block.
    let p = c.request(&part(1, 0, true, &[1; 16])).await;
    assert_eq!(
        (code(&p), p.get_first_option(CoapOption::Block1).cloned()),
        (ResponseType::Continue, Some(block(0, true, 0)))
    );
    // A retransmitted block gets its 2.31 again and is not appended twice.
    assert_eq!(c.request(&part(1, 0, true, &[1; 16])).await, p);
    let p = c.request(&part(2, 1, true, &[2; 16])).await;
    assert_eq!(
        p.get_first_option(CoapOption::Block1),
        Some(&block(1, true, 0))
    );
    let last = part(3, 2, false, &[3; 4]);
    c.send(&last.bytes()).await;
    let u = gw.next_uplink().await;
    assert_eq!(
        u.payload.to_vec(),
        [vec![1; 16], vec![2; 16], vec![3; 4]].concat()
    );
    u.reply.unwrap().send(committed(None)).unwrap();
    let p = Packet::from_bytes(&c.recv_for(last.bytes().len()).await).unwrap();
    assert_eq!(
        (code(&p), p.get_first_option(CoapOption::Block1).cloned()),
        (ResponseType::Changed, Some(block(2, false, 0)))
    );

    // Out of order: 4.08, and the upload is gone.
    assert_eq!(
        code(&c.request(&part(10, 0, true, &[5; 16])).await),
        ResponseType::Continue
    );
    assert_eq!(
        code(&c.request(&part(11, 2, true, &[5; 16])).await),
        ResponseType::RequestEntityIncomplete
    );
    assert_eq!(
        code(&c.request(&part(12, 1, false, &[5; 1])).await),
        ResponseType::RequestEntityIncomplete
    );
    // Announced too large: 4.13 + Size1 on the first block.
    let p = c
        .request(&part(20, 0, true, &[6; 16]).option(CoapOption::Size1, &[200]))
        .await;
    assert_eq!(
        (code(&p), uint(&p, CoapOption::Size1)),
        (ResponseType::RequestEntityTooLarge, Some(100))
    );
    // Growing too large: 4.13 when the block would pass max_payload.
    for (i, mid) in (30..36).enumerate() {
        let p = c.request(&part(mid, i as u32, true, &[7; 16])).await;
        assert_eq!(code(&p), ResponseType::Continue, "block {i}");
    }
    let p = c.request(&part(36, 6, true, &[7; 16])).await;
    assert_eq!(
        (code(&p), uint(&p, CoapOption::Size1)),
        (ResponseType::RequestEntityTooLarge, Some(100))
    );
    gw.assert_no_more_uplinks();
    assert_eq!(gw.rejected("incomplete"), 2);
    assert_eq!(gw.rejected("too_large"), 2);
    assert_eq!(gw.received(), 5);
    gw.stop().await;
}

#[tokio::test]
async fn block1_memory_is_bounded() {
    let mut s = settings(1024);
    s.reassembly.max_bytes = 40;
    s.reassembly.per_peer = 1;
    let gw = Gateway::start(s).await;
    let a = Client::new(gw.addr).await;
    let b = Client::new(gw.addr).await;
    let first = |mid: u16, tag: &[u8]| {
        post("up/dev-1", &[0; 32])
            .mid(mid)
            .option(CoapOption::Block1, &block(0, true, 1))
            .option(CoapOption::Unknown(292), tag)
    };
    assert_eq!(
        code(&a.request(&first(1, b"x")).await),
        ResponseType::Continue
    );
    // A second upload from the same address: no slot.
    let p = a.request(&first(2, b"y")).await;
    assert_eq!(
        (code(&p), uint(&p, CoapOption::MaxAge)),
        (ResponseType::ServiceUnavailable, Some(2))
    );
    // Another address: 32 more bytes would pass the 40-byte budget.
    let p = b.request(&first(3, b"z")).await;
    assert_eq!(code(&p), ResponseType::ServiceUnavailable);
    assert_eq!(gw.rejected("overloaded"), 2);
    gw.stop().await;
}

// =======================================================================================
// Discovery and amplification

#[tokio::test]
async fn no_response_is_larger_than_its_request() {
    let mut gw = Gateway::start(settings(1024)).await;
    let c = Client::new(gw.addr).await;
    // The shortest possible discovery request (no token): 21 bytes; nothing fits.
    let get = Req {
        path: ".well-known/core".into(),
        token: vec![],
        ..post("", b"")
    }
    .method(RequestType::Get)
    .mid(1);
    assert_eq!(get.bytes().len(), 21);
    assert_eq!(code(&c.request(&get).await), ResponseType::Unauthorized);
    // A longer request (here with Uri-Host) makes room for 16-byte blocks; the client
    // walks them.
    let mut doc: Vec<u8> = Vec::new();
    let mut num = 0;
    loop {
        let req = Req {
            path: ".well-known/core".into(),
            ..post("", b"")
        }
        .method(RequestType::Get)
        .mid(10 + num as u16)
        .option(CoapOption::UriHost, b"gw.example.org")
        .option(CoapOption::Block2, &block(num, false, 0));
        let p = c.request(&req).await;
        assert_eq!(code(&p), ResponseType::Content);
        doc.extend(&p.payload);
        if p.get_first_option(CoapOption::Block2)
            .is_some_and(|b| b.last().is_some_and(|l| l & 0x08 == 0))
        {
            break;
        }
        num += 1;
    }
    assert_eq!(doc, br#"</up>;rt="nbiot.uplink";ct=42"#.to_vec());

    // A long diagnostic is cut to the request's size; a downlink that does not fit is withheld.
    let tiny = post("up/d", b"z").token(&[]).mid(50);
    c.send(&tiny.bytes()).await;
    gw.next_uplink()
        .await
        .reply
        .unwrap()
        .send(Outcome::Undecodable {
            code: "a_very_long_diagnostic_code",
            message: String::new(),
        })
        .unwrap();
    let bytes = c.recv_for(tiny.bytes().len()).await;
    let p = Packet::from_bytes(&bytes).unwrap();
    assert_eq!(code(&p), ResponseType::BadRequest);
    assert_eq!(bytes.len(), tiny.bytes().len());
    assert!(b"a_very_long_diagnostic_code".starts_with(&p.payload) && !p.payload.is_empty());
    let tiny = post("up/d", b"y").token(&[]).mid(51);
    c.send(&tiny.bytes()).await;
    gw.next_uplink()
        .await
        .reply
        .unwrap()
        .send(committed(Some(&[0xEE; 64])))
        .unwrap();
    let p = Packet::from_bytes(&c.recv_for(tiny.bytes().len()).await).unwrap();
    assert_eq!((code(&p), p.payload.len()), (ResponseType::Changed, 0));
    gw.stop().await;
}

// =======================================================================================
// Shutdown

#[tokio::test]
async fn shutdown_lets_in_flight_requests_answer_then_returns() {
    let mut gw = Gateway::start(settings(1024)).await;
    let c = Client::new(gw.addr).await;
    let req = post("up/dev-1", b"last words").mid(1);
    c.send(&req.bytes()).await;
    let uplink = gw.next_uplink().await;
    gw.shutdown.cancel();
    uplink.reply.unwrap().send(committed(None)).unwrap();
    let p = Packet::from_bytes(&c.recv_for(req.bytes().len()).await).unwrap();
    assert_eq!(code(&p), ResponseType::Changed);
    timeout(DEADLINE, gw.server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_gives_up_on_outcomes_after_the_drain_timeout() {
    let mut s = settings(1024);
    s.drain_timeout = Duration::from_millis(200);
    let mut gw = Gateway::start(s).await;
    let c = Client::new(gw.addr).await;
    c.send(&post("up/dev-1", b"never committed").mid(1).bytes())
        .await;
    let _held = gw.next_uplink().await; // its reply is never sent
    gw.shutdown.cancel();
    timeout(DEADLINE, gw.server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
