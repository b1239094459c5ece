//! `nbiot-load`: plays a fleet of NB-IoT devices against a running gateway and measures what
//! a device sees — acknowledgements, retransmissions, ACK latency — and what the gateway
//! spends — CPU, memory, file descriptors, dropped datagrams — then checks the store (and a
//! TSDB) for exactly-once delivery.
//!
//! # What it sends
//!
//! Each uplink is a real Milesight NB-IoT cellular frame (EM300-TH: six readings; EM400: one)
//! carrying the device's IMEI and a frame counter, so every uplink is a distinct
//! `(device, sequence)` pair the store and the TSDB can be checked against. Uplink `k` of the
//! run belongs to device `k mod devices` and carries sequence `first_sequence + k / devices`.
//!
//! - `coap-con`: CoAP CON POSTs to `/up/{imei}` from many UDP source ports (one port can use
//!   only 65 536 message ids per EXCHANGE_LIFETIME, 247 s, before the gateway rightly takes a
//!   reused id for a retransmission). Unanswered CONs are retransmitted per RFC 7252 §4.2
//!   (2–3 s initial timeout, doubling); a 5.03 is counted, and with `--retry-503` retried
//!   after its Max-Age as a device would.
//! - `coap-non`: the same as NON (at-most-once; nothing is answered).
//! - `mqtt`: QoS 1 publishes to `nbiot/{imei}/up` through a broker (Mosquitto, or the
//!   gateway's embedded one) over a few connections; the PUBACK is the broker's, so the
//!   gateway's side is measured from its `/metrics` (`--metrics`) and the store check.
//!   `--mqtt-baseline-sub` runs `mosquitto_sub -q 1` on the same topics instead, to measure
//!   what the broker hands a trivial consumer under the same load.
//!
//! # The load shape
//!
//! `--rate R --duration D` (constant), `--ramp FROM:TO:DURATION` (linear), or `--schedule`
//! with comma-separated `RATE:DURATION` and `FROM:TO:DURATION` segments (e.g. a surge:
//! `7000:30s,21000:60s,7000:60s`). Each segment gets its own counts and latencies, and a
//! `recovery_s`: how long into the segment until the per-window p99 stays within
//! `--recovery-p99-ms`.
//!
//! # What it reads from the gateway (`--gateway-pid`, `--metrics`)
//!
//! CPU time, VmRSS and open file descriptors from `/proc/PID`, the drops counter of the
//! gateway's UDP socket from `/proc/net/udp`, and with `--metrics` the stored-uplinks
//! counter from `/metrics`, once per `--window`. CPU becomes uplinks per gateway CPU-second.
//!
//! # Afterwards
//!
//! `--verify-db FILE`: every uplink acknowledged (2.04, or a broker PUBACK) is in the store
//! exactly once (rows received since the run started). `--verify-tsdb URL`: every such uplink
//! is in VictoriaMetrics (`/api/v1/export`) exactly once as the series
//! `{measurement}_frame_counter{device=IMEI}` (VictoriaMetrics names a field `measurement_field`);
//! a point written twice with the same timestamp is one point (writes are idempotent).
//!
//! Requests are bounded in count and time and go only to the addresses given (loopback in
//! every documented use); the tool stops by itself. `--json` prints one JSON object.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value as Json};
use tokio::net::UdpSocket;
use tokio::task::LocalSet;

/// RFC 7252 §4.8 transmission parameters.
const ACK_TIMEOUT_MS: u64 = 2000;
const MAX_RETRANSMIT: u32 = 4;
/// Message ids one source port may use per EXCHANGE_LIFETIME (247 s) with a 2× margin: the
/// tool opens enough ports that no id is reused within the gateway's duplicate window.
const MIDS_PER_PORT_PER_LIFETIME: f64 = 30_000.0;
const EXCHANGE_LIFETIME_S: f64 = 247.0;
/// Max-Age when a 5.03 carries none (RFC 7252 §5.10.5 default).
const DEFAULT_MAX_AGE_S: u64 = 60;
/// CoAP option number of Max-Age.
const OPTION_MAX_AGE: u16 = 14;
/// Token bytes of every request (the message id, so answers are easy to check).
const TOKEN_LEN: usize = 2;

/// Answer codes as the tool counts them: a CoAP code byte (class << 5 | detail), or these.
const CODE_CHANGED: u16 = (2 << 5) | 4;
const CODE_UNAVAILABLE: u16 = (5 << 5) | 3;
const CODE_PUBACK: u16 = 0x100;
const CODE_RESET: u16 = 0x101;

/// The EM400-TLD NB-IoT sample frame (vendor README), 100 bytes: one reading per uplink.
const FRAME_EM400: &str = "020001005f00000001303130313031313036373439443139303534363930303331383638353038303634383037333530343630303433323234323133313130383938363034313231303232373030363238353709000e01756403670b0104823b01050001";
/// The EM300-TH NB-IoT sample frame (vendor cellular decoder comment), 128 bytes: a status
/// record and five samples, six readings per uplink.
const FRAME_EM300_TH: &str = "020001006200001401303132303031303036313338423232303535393131303033383639393531303430323933333631343630313133313132303632393331383938363131323032323030313332323838393309002a01755bff023c000367fe000468780367ff000468780367fe000468780367ff000468780367fe00046879";
/// Byte offsets in both frames: FRAME_CNT (u16 BE) and the IMEI (15 ASCII digits).
const FRAME_CNT_AT: usize = 6;
const IMEI_AT: usize = 33;

const EXAMPLES: &str = "\
Examples (gateway pinned with `taskset -c 0`, this tool with `taskset -c 1`):
  CoAP CON steady state, store check:
    nbiot-load --coap 127.0.0.1:5683 --api http://127.0.0.1:8080 --register --devices 1000 \\
               --rate 8000 --duration 30s --gateway-pid $(pidof nbiot-gateway) --verify-db data/gateway.db
  Find the knee: --ramp 2000:30000:60s --timeline
  Overload: --schedule 7000:20s,24000:60s,7000:60s --retry-503 --timeline
  MQTT through Mosquitto: --mode mqtt --mqtt mqtt://127.0.0.1:1883 --rate 20000 --duration 30s --metrics
  ... and what mosquitto_sub drains under the same load: add --mqtt-baseline-sub
See BENCHMARKS.md for every scenario.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// CoAP confirmable POSTs: the 2.04 comes after the commit.
    CoapCon,
    /// CoAP non-confirmable POSTs: at-most-once, never answered.
    CoapNon,
    /// MQTT QoS 1 publishes through a broker.
    Mqtt,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::CoapCon => "coap-con",
            Mode::CoapNon => "coap-non",
            Mode::Mqtt => "mqtt",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PayloadKind {
    /// Milesight EM300-TH cellular frame, 128 bytes, six readings (profile milesight-em300-th-nb).
    #[value(name = "em300-th")]
    Em300Th,
    /// Milesight EM400 cellular frame, 100 bytes, one reading (profile milesight-em400-nb).
    #[value(name = "em400")]
    Em400,
}

impl PayloadKind {
    fn hex(self) -> &'static str {
        match self {
            PayloadKind::Em300Th => FRAME_EM300_TH,
            PayloadKind::Em400 => FRAME_EM400,
        }
    }
    fn profile(self) -> &'static str {
        match self {
            PayloadKind::Em300Th => "milesight-em300-th-nb",
            PayloadKind::Em400 => "milesight-em400-nb",
        }
    }
    /// The `measurement` of that profile (the TSDB series prefix).
    fn measurement(self) -> &'static str {
        match self {
            PayloadKind::Em300Th => "environment",
            PayloadKind::Em400 => "manhole_level",
        }
    }
    fn label(self) -> &'static str {
        match self {
            PayloadKind::Em300Th => "em300-th",
            PayloadKind::Em400 => "em400",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "nbiot-load",
    about = "Load generator for nbiot-gateway: a fleet of NB-IoT devices over CoAP or MQTT, \
             with ACK latency, gateway CPU/memory, and an exactly-once check of the store",
    after_help = EXAMPLES
)]
struct Args {
    /// What the fleet sends.
    #[arg(long, value_enum, default_value_t = Mode::CoapCon)]
    mode: Mode,
    /// Same as `--mode coap-non`.
    #[arg(long)]
    non: bool,
    /// The gateway's CoAP address.
    #[arg(long, default_value = "127.0.0.1:5683")]
    coap: SocketAddr,
    /// The MQTT broker (`mqtt://host:port`).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    mqtt: String,
    /// MQTT topic template.
    #[arg(long, default_value = "nbiot/{device}/up")]
    topic: String,
    /// MQTT connections the fleet's publishes are spread over.
    #[arg(long, default_value_t = 8)]
    mqtt_clients: usize,
    /// Unacknowledged QoS 1 publishes per connection.
    #[arg(long, default_value_t = 1000)]
    mqtt_inflight: u16,
    /// Run `mosquitto_sub -q 1` on the topics and count what it receives (the baseline a
    /// gateway consuming the same broker is compared with). Do not run a gateway on the
    /// broker at the same time.
    #[arg(long)]
    mqtt_baseline_sub: bool,
    /// Pin the baseline `mosquitto_sub` to this CPU (`taskset -c`), where the gateway ran.
    #[arg(long)]
    baseline_cpu: Option<u32>,
    /// The gateway's HTTP API (`--register`, `--metrics`); token from NBIOT_TOKEN.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Number of devices.
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    /// First IMEI serial (devices get consecutive 6-digit serials; check digits are computed).
    #[arg(long, default_value_t = 0)]
    first_serial: u64,
    /// Register the devices first (CSV import through the API, 200 000 per request).
    #[arg(long)]
    register: bool,
    /// Profile for `--register` (default: the payload's).
    #[arg(long)]
    profile: Option<String>,
    /// The frame sent.
    #[arg(long, value_enum, default_value_t = PayloadKind::Em300Th)]
    payload: PayloadKind,
    /// Uplinks per second, all devices together (with --duration).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// How long to send at --rate (`30s`, `5m`, or seconds).
    #[arg(long, default_value = "10", value_parser = parse_seconds)]
    duration: f64,
    /// A linear ramp instead of --rate/--duration: FROM:TO:DURATION (e.g. 5000:40000:60s).
    #[arg(long, value_parser = parse_segment, conflicts_with = "schedule")]
    ramp: Option<Segment>,
    /// Segments instead of --rate/--duration: RATE:DURATION or FROM:TO:DURATION, comma
    /// separated (e.g. 7000:20s,21000:60s,7000:60s).
    #[arg(long, value_parser = parse_schedule)]
    schedule: Option<Segments>,
    /// UDP source ports (0: enough for the peak rate's message ids, at least 16).
    #[arg(long, default_value_t = 0)]
    sockets: usize,
    /// First frame counter value (continue a previous run's sequences).
    #[arg(long, default_value_t = 1)]
    first_sequence: u16,
    /// Retransmissions of an unanswered CON before giving up (RFC 7252 MAX_RETRANSMIT).
    #[arg(long, default_value_t = MAX_RETRANSMIT)]
    max_retransmit: u32,
    /// Send an uplink answered 5.03 again after its Max-Age (new message id), as a device
    /// would, up to --max-503-retries times; its latency then counts from the first attempt.
    #[arg(long)]
    retry_503: bool,
    /// With --retry-503: attempts after a 5.03 before the uplink counts as shed.
    #[arg(long, default_value_t = 3)]
    max_503_retries: u32,
    /// After the last send, how long to wait for outstanding answers (MQTT PUBACKs, the
    /// baseline subscriber). CoAP CONs end by their own retransmission timeouts.
    #[arg(long, default_value = "60s", value_parser = parse_seconds)]
    drain: f64,
    /// The gateway's pid: CPU, RSS, fds from /proc.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Sampling and timeline window.
    #[arg(long, default_value = "1s", value_parser = parse_seconds)]
    window: f64,
    /// Scrape `{api}/metrics` every window (stored uplinks, for MQTT and the timeline).
    #[arg(long)]
    metrics: bool,
    /// Include the per-window timeline in the summary.
    #[arg(long)]
    timeline: bool,
    /// The p99 (ms) a segment's windows must stay within for its `recovery_s`.
    #[arg(long, default_value_t = 10.0)]
    recovery_p99_ms: f64,
    /// After the run, check the gateway's store: every acked (device, sequence) exactly once.
    #[arg(long)]
    verify_db: Option<PathBuf>,
    /// After the run, check VictoriaMetrics at this URL the same way (needs forwarding on).
    #[arg(long)]
    verify_tsdb: Option<String>,
    /// Measurement of the TSDB series (default: the payload's profile's).
    #[arg(long)]
    tsdb_measurement: Option<String>,
    /// How long the checks wait for stragglers (MQTT consumer, forwarder) before reporting.
    #[arg(long, default_value = "30s", value_parser = parse_seconds)]
    verify_wait: f64,
    /// Print the summary as one JSON object (else pretty-printed).
    #[arg(long)]
    json: bool,
}

// ---------------------------------------------------------------------------------------
// The load shape
// ---------------------------------------------------------------------------------------

/// Seconds from `30s`, `1m30s`, `500ms` or a plain number of seconds.
fn parse_seconds(s: &str) -> Result<f64, String> {
    if let Ok(v) = s.parse::<f64>() {
        return if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(format!("`{s}` is not a duration"))
        };
    }
    humantime::parse_duration(s)
        .map(|d| d.as_secs_f64())
        .map_err(|e| format!("`{s}`: {e}"))
}

/// One piece of the schedule: the rate goes linearly from `from` to `to` over `seconds`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Segment {
    from: f64,
    to: f64,
    seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct Segments(Vec<Segment>);

/// `RATE:DURATION` or `FROM:TO:DURATION`.
fn parse_segment(s: &str) -> Result<Segment, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let rate = |r: &str| match r.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{r}` is not a rate (uplinks per second)")),
    };
    let seg = match parts.as_slice() {
        [r, d] => Segment {
            from: rate(r)?,
            to: rate(r)?,
            seconds: parse_seconds(d.trim())?,
        },
        [a, b, d] => Segment {
            from: rate(a)?,
            to: rate(b)?,
            seconds: parse_seconds(d.trim())?,
        },
        _ => return Err(format!("`{s}`: expected RATE:DURATION or FROM:TO:DURATION")),
    };
    if seg.seconds <= 0.0 {
        return Err(format!("`{s}`: the duration must be positive"));
    }
    Ok(seg)
}

fn parse_schedule(s: &str) -> Result<Segments, String> {
    let segs = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_segment)
        .collect::<Result<Vec<_>, _>>()?;
    if segs.is_empty() {
        return Err("an empty schedule".to_owned());
    }
    Ok(Segments(segs))
}

impl Segment {
    fn count(&self) -> f64 {
        (self.from + self.to) / 2.0 * self.seconds
    }

    /// Seconds into the segment when `n` uplinks are due (`n` ≤ `count`).
    fn time_of(&self, n: f64) -> f64 {
        let a = (self.to - self.from) / (2.0 * self.seconds);
        let t = if a.abs() < 1e-12 {
            if self.from > 0.0 {
                n / self.from
            } else {
                self.seconds
            }
        } else {
            let disc = (self.from * self.from + 4.0 * a * n).max(0.0);
            (-self.from + disc.sqrt()) / (2.0 * a)
        };
        t.clamp(0.0, self.seconds)
    }
}

/// The whole run's send times: uplink `k` (0-based) leaves when `k` uplinks are due.
#[derive(Debug)]
struct Schedule {
    segments: Vec<Segment>,
    /// Start time and uplinks due before each segment.
    starts: Vec<f64>,
    bases: Vec<f64>,
    total: u64,
}

impl Schedule {
    fn new(segments: Vec<Segment>) -> Schedule {
        let (mut t, mut n) = (0.0, 0.0);
        let (mut starts, mut bases) = (Vec::new(), Vec::new());
        for s in &segments {
            starts.push(t);
            bases.push(n);
            t += s.seconds;
            n += s.count();
        }
        Schedule {
            segments,
            starts,
            bases,
            total: (n + 1e-6).floor() as u64,
        }
    }

    /// Seconds from the start at which uplink `k` is sent, and its segment.
    fn time_of(&self, k: u64) -> (f64, usize) {
        let k = k as f64;
        let i = self.bases.partition_point(|&b| b <= k).saturating_sub(1);
        match (self.segments.get(i), self.starts.get(i), self.bases.get(i)) {
            (Some(seg), Some(&start), Some(&base)) => (start + seg.time_of(k - base), i),
            _ => (self.seconds(), 0),
        }
    }

    fn seconds(&self) -> f64 {
        self.segments.iter().map(|s| s.seconds).sum()
    }

    fn peak_rate(&self) -> f64 {
        self.segments
            .iter()
            .map(|s| s.from.max(s.to))
            .fold(0.0, f64::max)
    }
}

// ---------------------------------------------------------------------------------------
// Devices and datagrams
// ---------------------------------------------------------------------------------------

/// A 15-digit IMEI: TAC 86000000, a 6-digit serial, and its Luhn check digit.
fn imei(serial: u64) -> [u8; 15] {
    let mut d = *b"860000000000000";
    let mut s = serial % 1_000_000;
    for digit in d.iter_mut().take(14).skip(8).rev() {
        *digit = b'0' + (s % 10) as u8;
        s /= 10;
    }
    let sum: u32 = d
        .iter()
        .take(14)
        .rev()
        .enumerate()
        .map(|(i, &b)| {
            let x = u32::from(b - b'0');
            if i % 2 == 0 {
                let y = 2 * x;
                y / 10 + y % 10
            } else {
                x
            }
        })
        .sum();
    if let Some(check) = d.last_mut() {
        *check = b'0' + ((10 - sum % 10) % 10) as u8;
    }
    d
}

fn imei_string(serial: u64) -> String {
    String::from_utf8_lossy(&imei(serial)).into_owned()
}

/// The device index of an IMEI this fleet uses, if it is one.
fn device_index(id: &str, first_serial: u64, devices: u32) -> Option<u32> {
    let serial: u64 = id.get(8..14)?.parse().ok()?;
    let idx = (serial + 1_000_000 - first_serial % 1_000_000) % 1_000_000;
    let idx = u32::try_from(idx).ok().filter(|&i| i < devices)?;
    (imei(first_serial + u64::from(idx)) == id.as_bytes()).then_some(idx)
}

/// What uplink `k` is: (device index, sequence).
fn uplink_of(k: u64, devices: u32, first_sequence: u16) -> (u32, u16) {
    let d = u64::from(devices.max(1));
    ((k % d) as u32, first_sequence.wrapping_add((k / d) as u16))
}

/// A request datagram with placeholders, patched per uplink (no CoAP encoding per send).
#[derive(Debug, Clone)]
struct Frame {
    /// The payload template.
    payload: Vec<u8>,
    /// A CoAP POST to `up/000000000000000` carrying `payload`, token `TOKEN_LEN` bytes.
    coap: Vec<u8>,
    /// Where the IMEI Uri-Path value and the payload start in `coap`.
    path_imei_at: usize,
    payload_at: usize,
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

impl Frame {
    fn new(kind: PayloadKind) -> anyhow::Result<Frame> {
        use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
        let payload = nbiot_codecs::hex::decode(kind.hex().as_bytes()).context("frame template")?;
        if payload.len() < IMEI_AT + 15 {
            bail!("frame template too short");
        }
        let placeholder = [b'0'; 15];
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.set_token(vec![0; TOKEN_LEN]);
        p.add_option(CoapOption::UriPath, b"up".to_vec());
        p.add_option(CoapOption::UriPath, placeholder.to_vec());
        p.payload = payload.clone();
        let coap = p.to_bytes().context("encode the CoAP template")?;
        let payload_at = coap.len() - payload.len();
        let path_imei_at = coap
            .get(..payload_at)
            .and_then(|head| head.windows(15).position(|w| w == placeholder))
            .context("IMEI option in the template")?;
        Ok(Frame {
            payload,
            coap,
            path_imei_at,
            payload_at,
        })
    }

    /// The payload of (device IMEI, sequence).
    fn payload_for(&self, imei: &[u8; 15], seq: u16) -> Vec<u8> {
        let mut p = self.payload.clone();
        put(&mut p, FRAME_CNT_AT, &seq.to_be_bytes());
        put(&mut p, IMEI_AT, imei);
        p
    }

    /// The CoAP request of (device IMEI, sequence) with message id and token `mid`.
    fn coap_into(&self, out: &mut Vec<u8>, con: bool, mid: u16, imei: &[u8; 15], seq: u16) {
        out.clear();
        out.extend_from_slice(&self.coap);
        let ty: u8 = if con { 0 } else { 1 };
        if let Some(b0) = out.first_mut() {
            *b0 = 0x40 | (ty << 4) | TOKEN_LEN as u8;
        }
        put(out, 2, &mid.to_be_bytes());
        put(out, 4, &mid.to_be_bytes());
        put(out, self.path_imei_at, imei);
        put(out, self.payload_at + FRAME_CNT_AT, &seq.to_be_bytes());
        put(out, self.payload_at + IMEI_AT, imei);
    }
}

/// An answer to one of our requests: its message id, code, and Max-Age (for 5.03).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    mid: u16,
    code: u16,
    max_age: Option<u32>,
}

/// Parses a piggybacked response (ACK) or a RST; anything else is `None`.
fn parse_answer(b: &[u8]) -> Option<Answer> {
    let (&b0, &code) = (b.first()?, b.get(1)?);
    let mid = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    if b0 >> 6 != 1 {
        return None;
    }
    let tkl = usize::from(b0 & 0x0f);
    if b.len() < 4 + tkl {
        return None;
    }
    match (b0 >> 4) & 0x3 {
        3 => {
            return Some(Answer {
                mid,
                code: CODE_RESET,
                max_age: None,
            })
        }
        2 => {}
        _ => return None,
    }
    let mut i = 4 + tkl;
    let mut number: u16 = 0;
    let mut max_age = None;
    while let Some(&h) = b.get(i) {
        if h == 0xff {
            break;
        }
        i += 1;
        let mut ext = |nibble: u8| -> Option<u16> {
            match nibble {
                13 => {
                    let v = u16::from(*b.get(i)?) + 13;
                    i += 1;
                    Some(v)
                }
                14 => {
                    let v = u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]).checked_add(269)?;
                    i += 2;
                    Some(v)
                }
                15 => None,
                n => Some(u16::from(n)),
            }
        };
        let delta = ext(h >> 4)?;
        let len = usize::from(ext(h & 0x0f)?);
        number = number.checked_add(delta)?;
        let value = b.get(i..i + len)?;
        if number == OPTION_MAX_AGE {
            max_age = Some(value.iter().fold(0u32, |a, &x| (a << 8) | u32::from(x)));
        }
        i += len;
    }
    Some(Answer {
        mid,
        code: u16::from(code),
        max_age,
    })
}

fn code_label(code: u16) -> String {
    match code {
        CODE_PUBACK => "puback".to_owned(),
        CODE_RESET => "rst".to_owned(),
        c => format!("{}.{:02}", c >> 5, c & 0x1f),
    }
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

/// Latencies in µs, 1 µs to 10 min, 3 significant digits.
fn histogram() -> Histogram<u64> {
    // Invariant: constant bounds that hdrhistogram accepts (low ≥ 1, high ≥ 2 × low, sigfig ≤ 5).
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Per-window latencies: 2 significant digits keep an hour of windows small.
fn window_histogram() -> Histogram<u32> {
    // Invariant: as in `histogram`.
    Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds")
}

#[derive(Default)]
struct SegmentStats {
    sent: u64,
    codes: BTreeMap<u16, u64>,
    timeouts: u64,
    committed: Option<Histogram<u64>>,
}

/// What the gateway looked like at the end of a window.
#[derive(Debug, Clone, Copy, Default)]
struct GatewaySample {
    cpu_s: Option<f64>,
    rss_kib: Option<u64>,
    fds: Option<u64>,
    udp_drops: Option<u64>,
    udp_rx_queue: Option<u64>,
    stored_total: Option<f64>,
}

#[derive(Default)]
struct Window {
    sent: u64,
    committed: u64,
    busy: u64,
    other: u64,
    timeouts: u64,
    retransmissions: u64,
    consumed: u64,
    latency: Option<Histogram<u32>>,
    gateway: Option<GatewaySample>,
}

struct Stats {
    start: Instant,
    window: f64,
    schedule: Rc<Schedule>,
    sent: u64,
    retransmissions: u64,
    timeouts: u64,
    send_errors: u64,
    retried_503: u64,
    /// Every answer received, by code (a 5.03 later retried counts here too).
    codes: BTreeMap<u16, u64>,
    /// Uplinks with a final answer, and the latency of those (first send → answer).
    finished: u64,
    latency: Histogram<u64>,
    committed_latency: Histogram<u64>,
    segments: Vec<SegmentStats>,
    windows: Vec<Window>,
    /// (device, sequence) of every uplink acknowledged as stored (2.04 / PUBACK).
    delivered: Vec<(u32, u16)>,
    max_lag_us: u64,
    last_send: Option<Instant>,
    last_answer: Option<Instant>,
    consumed: u64,
    first_consumed: Option<Instant>,
    last_consumed: Option<Instant>,
}

impl Stats {
    fn new(start: Instant, window: f64, schedule: Rc<Schedule>) -> Stats {
        let segments = schedule
            .segments
            .iter()
            .map(|_| SegmentStats::default())
            .collect();
        Stats {
            start,
            window: window.max(0.01),
            schedule,
            sent: 0,
            retransmissions: 0,
            timeouts: 0,
            send_errors: 0,
            retried_503: 0,
            codes: BTreeMap::new(),
            finished: 0,
            latency: histogram(),
            committed_latency: histogram(),
            segments,
            windows: Vec::new(),
            delivered: Vec::new(),
            max_lag_us: 0,
            last_send: None,
            last_answer: None,
            consumed: 0,
            first_consumed: None,
            last_consumed: None,
        }
    }

    fn window_mut(&mut self, at: Instant) -> &mut Window {
        let i = (at.saturating_duration_since(self.start).as_secs_f64() / self.window) as usize;
        if self.windows.len() <= i {
            self.windows.resize_with(i + 1, Window::default);
        }
        // Just resized to hold `i`.
        let last = self.windows.len() - 1;
        &mut self.windows[i.min(last)]
    }

    fn segment_mut(&mut self, k: u64) -> Option<&mut SegmentStats> {
        let (_, i) = self.schedule.time_of(k);
        self.segments.get_mut(i)
    }

    fn sent(&mut self, k: u64, due: Instant, now: Instant) {
        self.sent += 1;
        self.max_lag_us = self
            .max_lag_us
            .max(now.saturating_duration_since(due).as_micros() as u64);
        self.last_send = Some(now);
        self.window_mut(now).sent += 1;
        if let Some(s) = self.segment_mut(k) {
            s.sent += 1;
        }
    }

    fn retransmitted(&mut self, now: Instant) {
        self.retransmissions += 1;
        self.window_mut(now).retransmissions += 1;
    }

    fn timed_out(&mut self, k: u64, now: Instant) {
        self.timeouts += 1;
        self.finished += 1;
        self.window_mut(now).timeouts += 1;
        if let Some(s) = self.segment_mut(k) {
            s.timeouts += 1;
        }
    }

    /// An answer to uplink `k`; `last` is false for a 5.03 that will be retried.
    fn answered(
        &mut self,
        k: u64,
        uplink: (u32, u16),
        first_sent: Instant,
        code: u16,
        last: bool,
        now: Instant,
    ) {
        *self.codes.entry(code).or_default() += 1;
        self.last_answer = Some(now);
        let us = now.saturating_duration_since(first_sent).as_micros().max(1) as u64;
        let stored = code == CODE_CHANGED || code == CODE_PUBACK;
        if let Some(s) = self.segment_mut(k) {
            *s.codes.entry(code).or_default() += 1;
            if stored {
                let h = s.committed.get_or_insert_with(histogram);
                let _ = h.record(us);
            }
        }
        let w = self.window_mut(now);
        match code {
            CODE_CHANGED | CODE_PUBACK => w.committed += 1,
            CODE_UNAVAILABLE => w.busy += 1,
            _ => w.other += 1,
        }
        if stored {
            w.latency
                .get_or_insert_with(window_histogram)
                .saturating_record(us);
        }
        if !last {
            self.retried_503 += 1;
            return;
        }
        self.finished += 1;
        let _ = self.latency.record(us);
        if stored {
            let _ = self.committed_latency.record(us);
            self.delivered.push(uplink);
        }
    }

    fn consumed(&mut self, now: Instant) {
        self.consumed += 1;
        self.first_consumed.get_or_insert(now);
        self.last_consumed = Some(now);
        self.window_mut(now).consumed += 1;
    }

    fn sample(&mut self, now: Instant, s: GatewaySample) {
        self.window_mut(now).gateway = Some(s);
    }
}

fn quantiles_ms<T: hdrhistogram::Counter>(h: &Histogram<T>) -> Json {
    if h.is_empty() {
        return Json::Null;
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999),
        "max": h.max() as f64 / 1000.0, "count": h.len(),
    })
}

fn codes_json(codes: &BTreeMap<u16, u64>) -> Json {
    Json::Object(
        codes
            .iter()
            .map(|(c, n)| (code_label(*c), json!(n)))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// The gateway from /proc
// ---------------------------------------------------------------------------------------

/// utime + stime of a process, in seconds (all its threads).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn fd_count(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// (drops, receive queue bytes) of the UDP sockets bound to local `port` (/proc/net/udp
/// and udp6, summed: one gateway socket, or several with SO_REUSEPORT).
fn udp_socket_stats(port: u16) -> Option<(u64, u64)> {
    let want = format!(":{port:04X}");
    let mut found = None;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(queues), Some(drops)) = (f.get(1), f.get(4), f.last()) else {
                continue;
            };
            if !local.ends_with(&want) {
                continue;
            }
            let rx = queues
                .split(':')
                .nth(1)
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .unwrap_or(0);
            let d: u64 = drops.parse().unwrap_or(0);
            let (a, b) = found.unwrap_or((0, 0));
            found = Some((a + d, b + rx));
        }
    }
    found
}

/// Sum of every sample of `name` in a Prometheus text page.
fn metric_sum(page: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

struct Observer {
    pid: Option<u32>,
    coap_port: Option<u16>,
    metrics_url: Option<String>,
    http: reqwest::Client,
}

impl Observer {
    async fn sample(&self) -> GatewaySample {
        let pid = self.pid;
        let (drops, rxq) = match self.coap_port.and_then(udp_socket_stats) {
            Some((d, q)) => (Some(d), Some(q)),
            None => (None, None),
        };
        let stored_total = match &self.metrics_url {
            Some(url) => match self.http.get(url).send().await {
                Ok(r) => r
                    .text()
                    .await
                    .ok()
                    .and_then(|page| metric_sum(&page, "nbiot_uplinks_stored_total")),
                Err(_) => None,
            },
            None => None,
        };
        GatewaySample {
            cpu_s: pid.and_then(|p| cpu_seconds(&p.to_string())),
            rss_kib: pid.and_then(rss_kib),
            fds: pid.and_then(fd_count),
            udp_drops: drops,
            udp_rx_queue: rxq,
            stored_total,
        }
    }
}

// ---------------------------------------------------------------------------------------
// CoAP fleet
// ---------------------------------------------------------------------------------------

struct Fleet {
    schedule: Rc<Schedule>,
    frame: Frame,
    devices: u32,
    first_serial: u64,
    first_sequence: u16,
    start: Instant,
    stats: Rc<RefCell<Stats>>,
}

impl Fleet {
    fn due(&self, k: u64) -> Instant {
        self.start + Duration::from_secs_f64(self.schedule.time_of(k).0)
    }

    fn uplink(&self, k: u64) -> (u32, u16, [u8; 15]) {
        let (d, seq) = uplink_of(k, self.devices, self.first_sequence);
        (d, seq, imei(self.first_serial + u64::from(d)))
    }
}

struct CoapSocket {
    fleet: Rc<Fleet>,
    socket: UdpSocket,
    /// This socket sends uplinks index, index + stride, ...
    index: u64,
    stride: u64,
    con: bool,
    max_retransmit: u32,
    /// 5.03 retries per uplink (0: a 5.03 is final).
    retries_503: u32,
}

struct Pending {
    k: u64,
    /// 5.03 answers this uplink has had.
    shed: u32,
    first_sent: Instant,
    last_sent: Instant,
    timeout: Duration,
    attempts: u32,
}

/// RFC 7252 §4.2: the first timeout is random in [ACK_TIMEOUT, 1.5 × ACK_TIMEOUT].
fn initial_timeout(k: u64) -> Duration {
    let jitter = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54; // 0..1023
    Duration::from_millis(ACK_TIMEOUT_MS + jitter * ACK_TIMEOUT_MS / 2 / 1024)
}

/// A per-socket starting message id, spread so sockets do not move in lockstep.
fn rand_start(index: u64) -> u16 {
    (index.wrapping_mul(0x9E37_79B9) >> 7) as u16
}

impl CoapSocket {
    async fn run(self) {
        let f = Rc::clone(&self.fleet);
        let total = f.schedule.total;
        let mut pending: HashMap<u16, Pending> = HashMap::new();
        // 5.03-answered uplinks to send again: (when, k, first sent, 5.03s so far).
        let mut retries: BinaryHeap<Reverse<(Instant, u64, Instant, u32)>> = BinaryHeap::new();
        let mut next_k = self.index;
        let mut mid = rand_start(self.index);
        let mut out = Vec::with_capacity(f.frame.coap.len());
        let mut buf = vec![0u8; 2048];
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut send_timer = pin!(tokio::time::sleep_until(f.due(next_k).into()));
        let mut retry_timer = pin!(tokio::time::sleep_until(far.into()));
        let mut scan = tokio::time::interval(Duration::from_millis(50));
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sending = next_k < total;
            if !sending && retries.is_empty() && (pending.is_empty() || !self.con) {
                break;
            }
            tokio::select! {
                biased;
                // An answer: a piggybacked response or a RST.
                got = self.socket.recv(&mut buf) => {
                    let Ok(n) = got else { continue };
                    let Some(a) = buf.get(..n).and_then(parse_answer) else { continue };
                    let Some(p) = pending.remove(&a.mid) else { continue };
                    let now = Instant::now();
                    let (d, seq, _) = f.uplink(p.k);
                    let retry = a.code == CODE_UNAVAILABLE && p.shed < self.retries_503;
                    f.stats.borrow_mut().answered(p.k, (d, seq), p.first_sent, a.code, !retry, now);
                    if retry {
                        let after = Duration::from_secs(u64::from(a.max_age.unwrap_or(DEFAULT_MAX_AGE_S as u32)));
                        let when = now + after;
                        if retries.peek().is_none_or(|Reverse((t, ..))| when < *t) {
                            retry_timer.as_mut().reset(when.into());
                        }
                        retries.push(Reverse((when, p.k, p.first_sent, p.shed + 1)));
                    }
                }
                // The next new uplinks, on schedule (a burst if we are late).
                () = send_timer.as_mut(), if sending => {
                    let now = Instant::now();
                    let mut burst = 0;
                    while next_k < total && burst < 64 {
                        let due = f.due(next_k);
                        if due > now {
                            break;
                        }
                        mid = self.send_new(&mut pending, &mut out, mid, (next_k, 0), now, now).await;
                        f.stats.borrow_mut().sent(next_k, due, now);
                        next_k += self.stride;
                        burst += 1;
                    }
                    let next = if next_k < total { f.due(next_k) } else { far };
                    send_timer.as_mut().reset(next.max(now).into());
                }
                // 5.03-answered uplinks whose Max-Age has passed.
                () = retry_timer.as_mut(), if !retries.is_empty() => {
                    let now = Instant::now();
                    while let Some(Reverse((when, k, first, shed))) = retries.peek().copied() {
                        if when > now {
                            break;
                        }
                        retries.pop();
                        mid = self.send_new(&mut pending, &mut out, mid, (k, shed), first, now).await;
                    }
                    let next = retries.peek().map_or(far, |Reverse((t, ..))| *t);
                    retry_timer.as_mut().reset(next.into());
                }
                // Retransmit CONs whose ACK is overdue (RFC 7252 §4.2: doubling timeout).
                _ = scan.tick(), if self.con && !pending.is_empty() => {
                    let now = Instant::now();
                    let mut give_up = Vec::new();
                    let mut resend = Vec::new();
                    for (&m, p) in pending.iter_mut() {
                        if now.saturating_duration_since(p.last_sent) < p.timeout {
                            continue;
                        }
                        if p.attempts >= self.max_retransmit {
                            give_up.push(m);
                        } else {
                            p.attempts += 1;
                            p.last_sent = now;
                            p.timeout *= 2;
                            resend.push((m, p.k));
                        }
                    }
                    for m in give_up {
                        if let Some(p) = pending.remove(&m) {
                            f.stats.borrow_mut().timed_out(p.k, now);
                        }
                    }
                    for (m, k) in resend {
                        let (_, seq, id) = f.uplink(k);
                        f.frame.coap_into(&mut out, true, m, &id, seq);
                        if self.socket.send(&out).await.is_err() {
                            f.stats.borrow_mut().send_errors += 1;
                        }
                        f.stats.borrow_mut().retransmitted(now);
                    }
                }
            }
        }
    }

    /// Sends uplink `k` with a fresh message id; returns the next id to use.
    async fn send_new(
        &self,
        pending: &mut HashMap<u16, Pending>,
        out: &mut Vec<u8>,
        mut mid: u16,
        (k, shed): (u64, u32),
        first_sent: Instant,
        now: Instant,
    ) -> u16 {
        // An id still awaiting its answer is skipped (only under a long backlog).
        while pending.contains_key(&mid) {
            mid = mid.wrapping_add(1);
        }
        let (_, seq, id) = self.fleet.uplink(k);
        self.fleet.frame.coap_into(out, self.con, mid, &id, seq);
        // A refused send (ICMP port unreachable: the gateway is down) is like a lost
        // datagram: the CON stays pending and is retransmitted or given up.
        if self.socket.send(out).await.is_err() {
            self.fleet.stats.borrow_mut().send_errors += 1;
        }
        if self.con {
            pending.insert(
                mid,
                Pending {
                    k,
                    shed,
                    first_sent,
                    last_sent: now,
                    timeout: initial_timeout(k),
                    attempts: 0,
                },
            );
        }
        mid.wrapping_add(1)
    }
}

async fn run_coap(fleet: Rc<Fleet>, args: &Args, con: bool, sockets: usize) -> anyhow::Result<()> {
    let local: SocketAddr = match args.coap.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut tasks = Vec::with_capacity(sockets);
    for s in 0..sockets {
        let socket = UdpSocket::bind(local)
            .await
            .context("bind a UDP source port")?;
        socket.connect(args.coap).await.context("connect")?;
        let task = CoapSocket {
            fleet: Rc::clone(&fleet),
            socket,
            index: s as u64,
            stride: sockets as u64,
            con,
            max_retransmit: args.max_retransmit,
            retries_503: if args.retry_503 && con {
                args.max_503_retries
            } else {
                0
            },
        };
        tasks.push(tokio::task::spawn_local(task.run()));
    }
    for t in tasks {
        t.await.context("socket task")?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// MQTT fleet
// ---------------------------------------------------------------------------------------

/// `mqtt://host:port` or `host:port` → (host, port).
fn broker_addr(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.strip_prefix("mqtt://").unwrap_or(url);
    let (host, port) = rest
        .rsplit_once(':')
        .map_or((rest, "1883"), |(h, p)| (h, p.trim_end_matches('/')));
    let port: u16 = port
        .parse()
        .with_context(|| format!("bad port in `{url}`"))?;
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

fn topic_for(template: &str, id: &[u8; 15]) -> String {
    template.replace("{device}", &String::from_utf8_lossy(id))
}

async fn run_mqtt_client(
    fleet: Rc<Fleet>,
    args: Rc<Args>,
    index: usize,
    stride: usize,
) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let (host, port) = broker_addr(&args.mqtt)?;
    let mut opts = MqttOptions::new(
        format!("nbiot-load-{}-{index}", std::process::id()),
        host,
        port,
    );
    opts.set_inflight(args.mqtt_inflight.max(1))
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, usize::from(args.mqtt_inflight.max(10)));
    // Published, not yet given a packet id by the event loop (it takes requests in order).
    let queued: Rc<RefCell<VecDeque<(u64, Instant)>>> = Rc::default();
    let inflight: Rc<RefCell<HashMap<u16, (u64, Instant)>>> = Rc::default();
    let done_sending = Rc::new(Cell::new(false));
    let poller = {
        let (fleet, queued, inflight, done) = (
            Rc::clone(&fleet),
            Rc::clone(&queued),
            Rc::clone(&inflight),
            Rc::clone(&done_sending),
        );
        // Not wrapped in a timeout: rumqttc's `poll` is not cancellation-safe mid-write.
        // The task ends when everything is acknowledged, or is aborted after the drain.
        tokio::task::spawn_local(async move {
            loop {
                if done.get() && queued.borrow().is_empty() && inflight.borrow().is_empty() {
                    return;
                }
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        // A retransmission reuses a packet id we already track.
                        if !inflight.borrow().contains_key(&pkid) {
                            if let Some(q) = queued.borrow_mut().pop_front() {
                                inflight.borrow_mut().insert(pkid, q);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let got = inflight.borrow_mut().remove(&ack.pkid);
                        if let Some((k, first)) = got {
                            let (d, seq, _) = fleet.uplink(k);
                            fleet.stats.borrow_mut().answered(
                                k,
                                (d, seq),
                                first,
                                CODE_PUBACK,
                                true,
                                Instant::now(),
                            );
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        fleet.stats.borrow_mut().send_errors += 1;
                        eprintln!("nbiot-load: MQTT connection {index}: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        })
    };
    let total = fleet.schedule.total;
    let mut k = index as u64;
    while k < total {
        let due = fleet.due(k);
        tokio::time::sleep_until(due.into()).await;
        let (_, seq, id) = fleet.uplink(k);
        let now = Instant::now();
        queued.borrow_mut().push_back((k, now));
        let sent = client
            .publish(
                topic_for(&args.topic, &id),
                QoS::AtLeastOnce,
                false,
                fleet.frame.payload_for(&id, seq),
            )
            .await;
        if sent.is_err() {
            queued.borrow_mut().pop_back();
            fleet.stats.borrow_mut().send_errors += 1;
        }
        fleet.stats.borrow_mut().sent(k, due, Instant::now());
        k += stride as u64;
    }
    done_sending.set(true);
    let mut poller = poller;
    if !(queued.borrow().is_empty() && inflight.borrow().is_empty()) {
        let drain = Duration::from_secs_f64(args.drain);
        if let Ok(done) = tokio::time::timeout(drain, &mut poller).await {
            done.context("MQTT event loop task")?;
        }
    }
    poller.abort();
    // Whatever the broker has not acknowledged by now counts as lost.
    let now = Instant::now();
    let lost: Vec<u64> = inflight
        .borrow_mut()
        .drain()
        .map(|(_, (k, _))| k)
        .chain(queued.borrow_mut().drain(..).map(|(k, _)| k))
        .collect();
    let mut stats = fleet.stats.borrow_mut();
    for k in lost {
        stats.timed_out(k, now);
    }
    drop(stats);
    let _ = client.try_disconnect();
    Ok(())
}

/// `mosquitto_sub -q 1` on the fleet's topics, counting what it receives. Returns once it
/// is subscribed (a probe message went through), with the task counting its output.
async fn start_baseline_sub(
    args: &Args,
    stats: Rc<RefCell<Stats>>,
) -> anyhow::Result<(tokio::process::Child, tokio::task::JoinHandle<()>)> {
    use tokio::io::AsyncBufReadExt;
    let (host, port) = broker_addr(&args.mqtt)?;
    let filter = args.topic.replace("{device}", "+");
    let mut command = match args.baseline_cpu {
        Some(cpu) => {
            let mut c = tokio::process::Command::new("taskset");
            c.args(["-c", &cpu.to_string(), "mosquitto_sub"]);
            c
        }
        None => tokio::process::Command::new("mosquitto_sub"),
    };
    let mut child = command
        .args([
            "-h",
            &host,
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            &filter,
            "-F",
            "%l",
        ])
        .args(["-i", &format!("nbiot-load-baseline-{}", std::process::id())])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run mosquitto_sub (Debian: mosquitto-clients)")?;
    let stdout = child.stdout.take().context("mosquitto_sub stdout")?;
    let seen = Rc::new(Cell::new(0u64));
    let counting = Rc::new(Cell::new(false));
    let reader = {
        let (seen, counting) = (Rc::clone(&seen), Rc::clone(&counting));
        tokio::task::spawn_local(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(_)) = lines.next_line().await {
                if counting.get() {
                    stats.borrow_mut().consumed(Instant::now());
                } else {
                    seen.set(seen.get() + 1);
                }
            }
        })
    };
    // Probe until the subscriber prints something: then it is subscribed.
    let (client, mut eventloop) = {
        let mut o = rumqttc::MqttOptions::new(
            format!("nbiot-load-probe-{}", std::process::id()),
            host,
            port,
        );
        o.set_keep_alive(Duration::from_secs(10));
        rumqttc::AsyncClient::new(o, 10)
    };
    let probe_topic = args.topic.replace("{device}", "probe");
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.get() == 0 {
        if Instant::now() > deadline {
            bail!("mosquitto_sub received nothing within 10 s");
        }
        let _ = client.try_publish(
            probe_topic.as_str(),
            rumqttc::QoS::AtMostOnce,
            false,
            b"probe".to_vec(),
        );
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            let _ = tokio::time::timeout_at(until.into(), eventloop.poll()).await;
        }
    }
    let _ = client.try_disconnect();
    counting.set(true);
    Ok((child, reader))
}

// ---------------------------------------------------------------------------------------
// Registration and checks
// ---------------------------------------------------------------------------------------

async fn register(args: &Args, profile: &str) -> anyhow::Result<()> {
    const CHUNK: u32 = 200_000;
    let http = reqwest::Client::new();
    let token = std::env::var("NBIOT_TOKEN").unwrap_or_default();
    let mut from = 0;
    while from < args.devices {
        let to = (from + CHUNK).min(args.devices);
        let mut csv = String::with_capacity(40 * (to - from) as usize + 16);
        csv.push_str("device,profile\n");
        for d in from..to {
            csv.push_str(&imei_string(args.first_serial + u64::from(d)));
            csv.push(',');
            csv.push_str(profile);
            csv.push('\n');
        }
        let resp = http
            .post(format!("{}/api/v1/devices/import?partial=true", args.api))
            .header("content-type", "text/csv")
            .bearer_auth(&token)
            .body(csv)
            .send()
            .await
            .context("cannot reach the gateway API to register devices")?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            bail!("device import failed ({status}): {body}");
        }
        from = to;
    }
    Ok(())
}

/// Counts, for every delivered (device, sequence) — sorted and deduplicated — how often it
/// was seen; `see` returns false for pairs that are not ours.
struct Tally {
    keys: Vec<(u32, u16)>,
    seen: Vec<u8>,
}

impl Tally {
    fn new(delivered: &[(u32, u16)]) -> Tally {
        let mut keys = delivered.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let seen = vec![0; keys.len()];
        Tally { keys, seen }
    }

    fn see(&mut self, key: (u32, u16)) {
        if let Ok(i) = self.keys.binary_search(&key) {
            if let Some(n) = self.seen.get_mut(i) {
                *n = n.saturating_add(1);
            }
        }
    }

    fn report(&self) -> Json {
        let missing = self.seen.iter().filter(|&&n| n == 0).count();
        let duplicated = self.seen.iter().filter(|&&n| n > 1).count();
        json!({ "checked": self.keys.len(), "missing": missing, "duplicated": duplicated })
    }

    fn missing(&self) -> usize {
        self.seen.iter().filter(|&&n| n == 0).count()
    }
}

/// Every delivered (device, sequence) must be in `uplinks` exactly once (rows received
/// since `since_ms`, so earlier runs against the same store do not count).
fn verify_db(
    db: &Path,
    args: &Args,
    delivered: &[(u32, u16)],
    since_ms: i64,
) -> anyhow::Result<Tally> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open {}", db.display()))?;
    let mut stmt = conn.prepare(
        "SELECT device, sequence FROM uplinks WHERE received_at_ms >= ?1 AND sequence IS NOT NULL",
    )?;
    let mut tally = Tally::new(delivered);
    let mut rows = stmt.query([since_ms])?;
    while let Some(row) = rows.next()? {
        let device: String = row.get(0)?;
        let seq: i64 = row.get(1)?;
        if let (Some(d), Ok(s)) = (
            device_index(&device, args.first_serial, args.devices),
            u16::try_from(seq),
        ) {
            tally.see((d, s));
        }
    }
    Ok(tally)
}

/// The same check against VictoriaMetrics: the `{measurement}_frame_counter` series of each
/// device must hold every delivered sequence once (same value at the same timestamp twice
/// is one idempotent write, not a duplicate).
async fn verify_tsdb(
    url: &str,
    measurement: &str,
    args: &Args,
    delivered: &[(u32, u16)],
    since_s: i64,
) -> anyhow::Result<Tally> {
    let series = format!("{measurement}_frame_counter");
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/export", url.trim_end_matches('/')))
        .query(&[
            ("match[]", format!("{{__name__=\"{series}\"}}")),
            ("start", since_s.to_string()),
        ])
        .send()
        .await
        .context("cannot reach the TSDB")?;
    let status = resp.status();
    let body = resp.text().await.context("TSDB export body")?;
    if !status.is_success() {
        bail!("TSDB export failed ({status}): {body}");
    }
    let mut tally = Tally::new(delivered);
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let v: Json = serde_json::from_str(line).context("TSDB export line")?;
        let Some(d) = v["metric"]["device"]
            .as_str()
            .and_then(|id| device_index(id, args.first_serial, args.devices))
        else {
            continue;
        };
        let (Some(values), Some(times)) = (v["values"].as_array(), v["timestamps"].as_array())
        else {
            continue;
        };
        let mut points: Vec<(u16, i64)> = values
            .iter()
            .zip(times)
            .filter_map(|(v, t)| Some((u16::try_from(v.as_f64()? as i64).ok()?, t.as_i64()?)))
            .collect();
        points.sort_unstable();
        points.dedup();
        for (seq, _) in points {
            tally.see((d, seq));
        }
    }
    Ok(tally)
}

// ---------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One thread: the tool is pinned to one core (`taskset -c 1`) and its tasks share
    // statistics without locks.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let (summary, ok) = LocalSet::new().block_on(&rt, run(args))?;
    println!("{summary}");
    if !ok {
        bail!("delivery check failed");
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<(String, bool)> {
    let mode = if args.non { Mode::CoapNon } else { args.mode };
    let segments = match (&args.schedule, &args.ramp) {
        (Some(s), _) => s.0.clone(),
        (None, Some(r)) => vec![*r],
        (None, None) => vec![Segment {
            from: args.rate,
            to: args.rate,
            seconds: args.duration,
        }],
    };
    if args.devices == 0 || segments.iter().all(|s| s.count() <= 0.0) {
        bail!("--devices, and the rate and duration, must be positive");
    }
    if args.devices > 1_000_000 {
        bail!("at most 1 000 000 devices (6-digit IMEI serials)");
    }
    let schedule = Rc::new(Schedule::new(segments));
    let per_device = schedule.total / u64::from(args.devices);
    if per_device + u64::from(args.first_sequence) > 65_535 {
        bail!(
            "{} uplinks per device would wrap the 16-bit frame counter: use more --devices or a lower --first-sequence",
            per_device
        );
    }
    let profile = args
        .profile
        .clone()
        .unwrap_or_else(|| args.payload.profile().to_owned());
    let frame = Frame::new(args.payload)?;
    let observer = Observer {
        pid: args.gateway_pid,
        coap_port: (mode != Mode::Mqtt).then_some(args.coap.port()),
        metrics_url: args
            .metrics
            .then(|| format!("{}/metrics", args.api.trim_end_matches('/'))),
        http: reqwest::Client::new(),
    };

    let rss_before_register = args.gateway_pid.and_then(rss_kib);
    let mut register_seconds = None;
    if args.register {
        let t = Instant::now();
        register(&args, &profile).await?;
        register_seconds = Some(t.elapsed().as_secs_f64());
    }
    let rss_after_register = args.gateway_pid.and_then(rss_kib);

    let args = Rc::new(args);
    let since_ms = unix_ms() - 2000;
    let first = observer.sample().await;
    let tool_cpu_before = cpu_seconds("self");
    let start = Instant::now() + Duration::from_millis(20);
    let stats = Rc::new(RefCell::new(Stats::new(
        start,
        args.window,
        Rc::clone(&schedule),
    )));

    let mut baseline = None;
    if mode == Mode::Mqtt && args.mqtt_baseline_sub {
        baseline = Some(start_baseline_sub(&args, Rc::clone(&stats)).await?);
    }
    let start = Instant::now() + Duration::from_millis(20);
    stats.borrow_mut().start = start;

    // Sample the gateway every window until the load is over.
    let running = Rc::new(Cell::new(true));
    let sampler = {
        let (stats, running) = (Rc::clone(&stats), Rc::clone(&running));
        let window = Duration::from_secs_f64(stats.borrow().window);
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval_at((start + window).into(), window);
            while running.get() {
                tick.tick().await;
                let s = observer.sample().await;
                // Credited to the window that just ended.
                let at = Instant::now().checked_sub(window / 2).unwrap_or(start);
                stats.borrow_mut().sample(at, s);
            }
            observer
        })
    };

    let fleet = Rc::new(Fleet {
        schedule: Rc::clone(&schedule),
        frame,
        devices: args.devices,
        first_serial: args.first_serial,
        first_sequence: args.first_sequence,
        start,
        stats: Rc::clone(&stats),
    });
    let sockets = match mode {
        Mode::Mqtt => args.mqtt_clients.max(1),
        _ if args.sockets > 0 => args.sockets,
        _ => ((schedule.peak_rate() * EXCHANGE_LIFETIME_S / MIDS_PER_PORT_PER_LIFETIME).ceil()
            as usize)
            .max(16),
    };
    match mode {
        Mode::CoapCon | Mode::CoapNon => {
            run_coap(Rc::clone(&fleet), &args, mode == Mode::CoapCon, sockets).await?
        }
        Mode::Mqtt => {
            let tasks: Vec<_> = (0..sockets)
                .map(|c| {
                    tokio::task::spawn_local(run_mqtt_client(
                        Rc::clone(&fleet),
                        Rc::clone(&args),
                        c,
                        sockets,
                    ))
                })
                .collect();
            for t in tasks {
                t.await.context("MQTT client task")??;
            }
        }
    }
    // The baseline subscriber: wait until it has everything acknowledged, or stops getting more.
    if let Some((mut child, reader)) = baseline.take() {
        let want = stats.borrow().delivered.len() as u64;
        let deadline = Instant::now() + Duration::from_secs_f64(args.drain);
        let mut last = (stats.borrow().consumed, Instant::now());
        while stats.borrow().consumed < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let c = stats.borrow().consumed;
            if c != last.0 {
                last = (c, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        let _ = child.kill().await;
        reader.abort();
    }
    running.set(false);
    let observer = sampler.await.context("sampler task")?;
    let end = Instant::now();
    let last = observer.sample().await;
    let tool_cpu = match (tool_cpu_before, cpu_seconds("self")) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };

    // Checks (the list is taken out of `stats` so that no borrow is held across an await).
    let mut ok = true;
    let delivered = std::mem::take(&mut stats.borrow_mut().delivered);
    let mut store_check = Json::Null;
    if let Some(db) = &args.verify_db {
        let wait = if mode == Mode::Mqtt {
            args.verify_wait
        } else {
            0.0
        };
        let deadline = Instant::now() + Duration::from_secs_f64(wait);
        let tally = loop {
            let t = verify_db(db, &args, &delivered, since_ms)?;
            if t.missing() == 0 || Instant::now() >= deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        store_check = tally.report();
        ok &= store_check["missing"] == 0 && store_check["duplicated"] == 0;
    }
    let mut tsdb_check = Json::Null;
    if let Some(url) = &args.verify_tsdb {
        let measurement = args
            .tsdb_measurement
            .clone()
            .unwrap_or_else(|| args.payload.measurement().to_owned());
        let deadline = Instant::now() + Duration::from_secs_f64(args.verify_wait);
        let tally = loop {
            let t = verify_tsdb(url, &measurement, &args, &delivered, since_ms / 1000 - 60).await?;
            if t.missing() == 0 || Instant::now() >= deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        };
        tsdb_check = tally.report();
        ok &= tsdb_check["missing"] == 0 && tsdb_check["duplicated"] == 0;
    }

    let mut stats_ref = stats.borrow_mut();
    stats_ref.delivered = delivered;
    let summary = summarize(
        &args,
        mode,
        &stats_ref,
        sockets,
        SummaryExtra {
            end,
            first,
            last,
            rss_before_register,
            rss_after_register,
            register_seconds,
            tool_cpu,
            store_check,
            tsdb_check,
        },
    );
    let text = if args.json {
        summary.to_string()
    } else {
        serde_json::to_string_pretty(&summary)?
    };
    Ok((text, ok))
}

struct SummaryExtra {
    end: Instant,
    first: GatewaySample,
    last: GatewaySample,
    rss_before_register: Option<u64>,
    rss_after_register: Option<u64>,
    register_seconds: Option<f64>,
    tool_cpu: Option<f64>,
    store_check: Json,
    tsdb_check: Json,
}

fn summarize(args: &Args, mode: Mode, s: &Stats, sockets: usize, x: SummaryExtra) -> Json {
    let elapsed = s
        .last_answer
        .max(s.last_send)
        .unwrap_or(x.end)
        .saturating_duration_since(s.start)
        .as_secs_f64()
        .max(1e-9);
    let send_seconds = s
        .last_send
        .map_or(0.0, |t| t.saturating_duration_since(s.start).as_secs_f64());
    let committed = s.delivered.len() as u64;
    let cpu = match (x.first.cpu_s, x.last.cpu_s) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let samples: Vec<GatewaySample> = s.windows.iter().filter_map(|w| w.gateway).collect();
    let max_of = |f: fn(&GatewaySample) -> Option<u64>| samples.iter().filter_map(f).max();
    let drops = match (x.first.udp_drops, x.last.udp_drops) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };

    // Per segment: counts, latency, and how long until the p99 settles.
    let mut seg_start = 0.0;
    let segments: Vec<Json> = s
        .schedule
        .segments
        .iter()
        .zip(&s.segments)
        .enumerate()
        .map(|(i, (seg, st))| {
            let from_w = (seg_start / s.window).floor() as usize;
            let to_w = ((seg_start + seg.seconds) / s.window).ceil() as usize;
            let settled = recovery(&s.windows, from_w, to_w, args.recovery_p99_ms);
            let j = json!({
                "segment": i,
                "from": seg.from, "to": seg.to, "seconds": seg.seconds,
                "sent": st.sent, "codes": codes_json(&st.codes), "timeouts": st.timeouts,
                "commit_latency_ms": st.committed.as_ref().map_or(Json::Null, quantiles_ms),
                "recovery_s": settled.map(|w| (w.saturating_sub(from_w)) as f64 * s.window),
            });
            seg_start += seg.seconds;
            j
        })
        .collect();

    let stored_rate = stored_rate(&s.windows, s.window);
    let baseline = (s.consumed > 0 || args.mqtt_baseline_sub).then(|| {
        let span = match (s.first_consumed, s.last_consumed) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        json!({
            "consumed": s.consumed,
            "seconds": span,
            "per_second": if span > 0.0 { s.consumed as f64 / span } else { 0.0 },
        })
    });

    let mut summary = json!({
        "mode": mode.label(),
        "payload": args.payload.label(),
        "devices": args.devices,
        "sockets": sockets,
        "schedule": s.schedule.segments.iter().map(|g| json!({"from": g.from, "to": g.to, "seconds": g.seconds})).collect::<Vec<_>>(),
        "planned": s.schedule.total,
        "sent": s.sent,
        "acked": s.codes.values().sum::<u64>() - s.retried_503,
        "committed": committed,
        "codes": codes_json(&s.codes),
        "retransmissions": s.retransmissions,
        "timeouts": s.timeouts,
        "send_errors": s.send_errors,
        "retried_after_503": s.retried_503,
        "seconds": elapsed,
        "send_seconds": send_seconds,
        "acked_per_second": s.finished.saturating_sub(s.timeouts) as f64 / elapsed,
        "committed_per_second": committed as f64 / elapsed,
        "max_send_lag_ms": s.max_lag_us as f64 / 1000.0,
        "ack_latency_ms": quantiles_ms(&s.latency),
        "commit_latency_ms": quantiles_ms(&s.committed_latency),
        "gateway_cpu_seconds": cpu,
        "uplinks_per_gateway_cpu_second": cpu.map(|c| committed as f64 / c.max(1e-9)),
        "gateway_cpu_seconds_per_10k": cpu.map(|c| c / (committed.max(1) as f64) * 10_000.0),
        "gateway": {
            "rss_kib": {
                "before_register": x.rss_before_register,
                "after_register": x.rss_after_register,
                "start": x.first.rss_kib,
                "max": max_of(|g| g.rss_kib),
                "end": x.last.rss_kib,
            },
            "fds": { "start": x.first.fds, "max": max_of(|g| g.fds), "end": x.last.fds },
            "udp_receive_drops": drops,
            "stored_per_second": stored_rate,
        },
        "register_seconds": x.register_seconds,
        "tool_cpu_seconds": x.tool_cpu,
        "segments": segments,
        "store_check": x.store_check,
        "tsdb_check": x.tsdb_check,
    });
    if let Some(b) = baseline {
        summary["baseline_sub"] = b;
    }
    if args.timeline {
        summary["timeline"] = timeline(&s.windows, s.window, &x.first);
    }
    summary
}

/// The first window (in `from..to`) after which every window answers no 5.03 and has its
/// commit p99 within `p99_ms`; `None` if it never settles.
fn recovery(windows: &[Window], from: usize, to: usize, p99_ms: f64) -> Option<usize> {
    let to = to.min(windows.len());
    // Shedding (5.03) is not recovered; timeouts are left out: they are detected seconds
    // after their uplink was sent, so they date the past, not the window.
    let within = |w: &Window| {
        w.busy == 0
            && w.latency
                .as_ref()
                .is_none_or(|h| h.is_empty() || h.value_at_quantile(0.99) as f64 / 1000.0 <= p99_ms)
    };
    let mut settled = None;
    for i in from..to {
        match windows.get(i) {
            Some(w) if within(w) => {
                settled.get_or_insert(i);
            }
            _ => settled = None,
        }
    }
    settled
}

/// Uplinks stored per second by the gateway (from `/metrics`), between the first and the
/// last window in which the counter moved.
fn stored_rate(windows: &[Window], window: f64) -> Option<f64> {
    let series: Vec<(usize, f64)> = windows
        .iter()
        .enumerate()
        .filter_map(|(i, w)| Some((i, w.gateway?.stored_total?)))
        .collect();
    let (&(_, base), rest) = series.split_first()?;
    let mut first_move = None;
    let mut last_move = None;
    let mut prev = base;
    for &(i, v) in rest {
        if v > prev {
            first_move.get_or_insert((i, prev));
            last_move = Some((i, v));
        }
        prev = v;
    }
    let ((i0, v0), (i1, v1)) = (first_move?, last_move?);
    let span = (i1 + 1 - i0) as f64 * window;
    Some((v1 - v0) / span)
}

fn timeline(windows: &[Window], window: f64, first: &GatewaySample) -> Json {
    let mut prev = *first;
    let rows: Vec<Json> = windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let p = |q: f64| {
                w.latency
                    .as_ref()
                    .filter(|h| !h.is_empty())
                    .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            };
            let g = w.gateway.unwrap_or_default();
            let cpu_pct = match (prev.cpu_s, g.cpu_s) {
                (Some(a), Some(b)) => Some(((b - a) / window * 100.0).round()),
                _ => None,
            };
            let drops = match (prev.udp_drops, g.udp_drops) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            };
            let stored = match (prev.stored_total, g.stored_total) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            if w.gateway.is_some() {
                prev = g;
            }
            json!({
                "t": i as f64 * window,
                "sent": w.sent, "committed": w.committed, "busy_503": w.busy, "other": w.other,
                "retransmissions": w.retransmissions, "timeouts": w.timeouts, "consumed": w.consumed,
                "p50_ms": p(0.5), "p99_ms": p(0.99),
                "gateway_cpu_pct": cpu_pct, "rss_kib": g.rss_kib, "fds": g.fds,
                "udp_drops": drops, "udp_rx_queue": g.udp_rx_queue, "stored": stored,
            })
        })
        .collect();
    Json::Array(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imeis_pass_luhn_and_map_back() {
        assert_eq!(&imei(0), b"860000000000009");
        assert_eq!(imei_string(123_456).len(), 15);
        for serial in [0, 1, 7, 999_999, 1_000_123] {
            let id = imei_string(serial);
            let digits: Vec<u32> = id.bytes().map(|b| u32::from(b - b'0')).collect();
            let sum: u32 = digits
                .iter()
                .rev()
                .enumerate()
                .map(|(i, &d)| {
                    if i % 2 == 1 {
                        (2 * d) / 10 + (2 * d) % 10
                    } else {
                        d
                    }
                })
                .sum();
            assert_eq!(sum % 10, 0, "{id}");
        }
        assert_eq!(device_index(&imei_string(1005), 1000, 10), Some(5));
        assert_eq!(device_index(&imei_string(1010), 1000, 10), None);
        assert_eq!(device_index(&imei_string(999), 1000, 10), None);
        assert_eq!(
            device_index("860000000000008", 0, 10),
            None,
            "bad check digit"
        );
        assert_eq!(device_index("nonsense", 0, 10), None);
    }

    #[test]
    fn datagrams_are_valid_coap_with_identity_and_sequence() {
        use coap_lite::{MessageType, Packet};
        let codec = nbiot_codecs::builtin("milesight").expect("codec");
        for kind in [PayloadKind::Em300Th, PayloadKind::Em400] {
            let frame = Frame::new(kind).unwrap();
            let mut out = Vec::new();
            let id = imei(7);
            frame.coap_into(&mut out, true, 0xBEEF, &id, 513);
            let p = Packet::from_bytes(&out).unwrap();
            assert_eq!(p.header.get_type(), MessageType::Confirmable);
            assert_eq!(p.header.message_id, 0xBEEF);
            assert_eq!(p.get_token(), &[0xBE, 0xEF]);
            let path: Vec<Vec<u8>> = p
                .get_option(coap_lite::CoapOption::UriPath)
                .unwrap()
                .iter()
                .cloned()
                .collect();
            assert_eq!(path, vec![b"up".to_vec(), id.to_vec()]);
            let r = codec.decode(&p.payload).expect("decodes");
            let identity = r[0].identity.as_ref().expect("identity");
            assert_eq!(identity.device_id.as_deref(), Some("860000000000074"));
            assert_eq!(identity.sequence, Some(513));
            assert_eq!(frame.payload_for(&id, 513), p.payload);

            frame.coap_into(&mut out, false, 1, &id, 1);
            let p = Packet::from_bytes(&out).unwrap();
            assert_eq!(p.header.get_type(), MessageType::NonConfirmable);
        }
    }

    #[test]
    fn answers_parse_with_max_age() {
        use coap_lite::{MessageClass, MessageType, Packet, ResponseType};
        let mut p = Packet::new();
        p.header.set_type(MessageType::Acknowledgement);
        p.header.code = MessageClass::Response(ResponseType::ServiceUnavailable);
        p.header.message_id = 4242;
        p.set_token(vec![0x10, 0x92]);
        p.add_option(coap_lite::CoapOption::MaxAge, vec![0x01, 0x2c]);
        let a = parse_answer(&p.to_bytes().unwrap()).unwrap();
        assert_eq!(
            a,
            Answer {
                mid: 4242,
                code: CODE_UNAVAILABLE,
                max_age: Some(300)
            }
        );
        assert_eq!(code_label(a.code), "5.03");

        p.header.code = MessageClass::Response(ResponseType::Changed);
        p.clear_option(coap_lite::CoapOption::MaxAge);
        p.payload = b"downlink".to_vec();
        let a = parse_answer(&p.to_bytes().unwrap()).unwrap();
        assert_eq!((a.code, a.max_age), (CODE_CHANGED, None));
        assert_eq!(code_label(a.code), "2.04");

        p.header.set_type(MessageType::Reset);
        assert_eq!(
            parse_answer(&p.to_bytes().unwrap()).unwrap().code,
            CODE_RESET
        );
        p.header.set_type(MessageType::Confirmable);
        assert_eq!(
            parse_answer(&p.to_bytes().unwrap()),
            None,
            "a request is no answer"
        );
        assert_eq!(parse_answer(&[0x60, 0x44]), None, "short");
        assert_eq!(
            parse_answer(&[0x62, 0x44, 0, 1, 0]),
            None,
            "token cut short"
        );
    }

    #[test]
    fn schedules_place_every_uplink_in_time() {
        let s = Schedule::new(vec![Segment {
            from: 1000.0,
            to: 1000.0,
            seconds: 2.0,
        }]);
        assert_eq!(s.total, 2000);
        assert_eq!(s.time_of(0), (0.0, 0));
        assert!((s.time_of(1000).0 - 1.0).abs() < 1e-9);

        // A ramp 0 → 2000/s over 10 s sends 10 000, the first half of them in the last 29 %.
        let ramp = parse_segment("0:2000:10s").unwrap();
        let s = Schedule::new(vec![ramp]);
        assert_eq!(s.total, 10_000);
        assert!((s.time_of(2500).0 - 5.0).abs() < 1e-6);
        assert!((s.time_of(5000).0 - 50f64.sqrt()).abs() < 1e-6);

        let Segments(segs) = parse_schedule("100:1s, 300:2s,100:50:1m").unwrap();
        assert_eq!(
            segs[2],
            Segment {
                from: 100.0,
                to: 50.0,
                seconds: 60.0
            }
        );
        let s = Schedule::new(segs);
        assert_eq!(s.total, 100 + 600 + 4500);
        assert_eq!(s.time_of(99).1, 0);
        assert_eq!(s.time_of(100).1, 1);
        assert!((s.time_of(100).0 - 1.0).abs() < 1e-9);
        assert_eq!(s.time_of(700).1, 2);
        assert_eq!(s.peak_rate(), 300.0);
        // Send times never go backwards.
        let mut last = 0.0;
        for k in 0..s.total {
            let t = s.time_of(k).0;
            assert!(t >= last, "{k}");
            last = t;
        }
        assert!(parse_segment("fast:10s").is_err());
        assert!(parse_segment("100:0s").is_err());
        assert_eq!(parse_seconds("1m30s"), Ok(90.0));
        assert_eq!(parse_seconds("6"), Ok(6.0));
    }

    #[test]
    fn udp_table_lines_and_metrics_parse() {
        let page = "# HELP x\nnbiot_uplinks_stored_total{protocol=\"coap\"} 10\n\
                    nbiot_uplinks_stored_total{protocol=\"mqtt\"} 5\nnbiot_uplinks_stored_totalx 99\n";
        assert_eq!(metric_sum(page, "nbiot_uplinks_stored_total"), Some(15.0));
        assert_eq!(metric_sum(page, "nbiot_nothing"), None);
        assert_eq!(
            broker_addr("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(
            broker_addr("localhost").unwrap(),
            ("localhost".into(), 1883)
        );
    }

    #[test]
    fn tally_counts_missing_and_duplicates() {
        let mut t = Tally::new(&[(1, 1), (1, 2), (2, 1), (1, 2)]);
        t.see((1, 1));
        t.see((2, 1));
        t.see((2, 1));
        t.see((9, 9));
        assert_eq!(
            t.report(),
            json!({"checked": 3, "missing": 1, "duplicated": 1})
        );
    }

    #[test]
    fn recovery_finds_the_window_after_which_p99_stays_low() {
        let w = |ms: u64| {
            let mut h = window_histogram();
            h.record(ms * 1000).unwrap();
            Window {
                latency: Some(h),
                ..Window::default()
            }
        };
        let windows = vec![w(50), w(2), w(40), w(3), w(4), Window::default()];
        assert_eq!(recovery(&windows, 0, 6, 10.0), Some(3));
        assert_eq!(recovery(&windows, 0, 3, 10.0), None);
        assert_eq!(recovery(&windows, 3, 6, 10.0), Some(3));
    }
}
