//! `nbiot-load`: plays a fleet of NB-IoT devices against a running gateway and measures what
//! a device sees — acknowledgements, retransmissions, ACK latency — then checks the store
//! for exactly-once delivery.
//!
//! Each uplink is a real Milesight EM300-TH NB-IoT frame (the `milesight` codec's cellular
//! frame) carrying the device's IMEI and a frame counter, so every uplink is a distinct
//! (device, sequence) pair the store can be checked against. Uplinks are CoAP CON (or NON)
//! POSTs to `/up/{imei}` sent from many UDP source ports: one port can use only 65 536
//! message ids per EXCHANGE_LIFETIME (247 s), after which the gateway's duplicate detection
//! would (rightly) treat a reused id as a retransmission.
//!
//! ```text
//! nbiot-load --coap 127.0.0.1:5683 --api http://127.0.0.1:8080 --devices 1000 \
//!            --rate 20000 --duration 30 --register --gateway-pid $(pidof nbiot-gateway) \
//!            --verify-db ./data/gateway.db
//! ```
//!
//! Requests are bounded in count and time and go only to the addresses given (loopback in
//! every documented use); the tool stops by itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use coap_lite::{MessageClass, MessageType, Packet, RequestType, ResponseType};
use hdrhistogram::Histogram;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;

/// RFC 7252 §4.8 transmission parameters.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;
/// Message ids a socket may use before its first one may be reused (65 536 per 247 s); the
/// tool spreads load so that no socket comes near it.
const EXCHANGE_LIFETIME_S: f64 = 247.0;

/// The EM400-TLD NB-IoT sample frame (vendor README), 100 bytes: one reading per uplink.
const FRAME_EM400: &str = "020001005f00000001303130313031313036373439443139303534363930303331383638353038303634383037333530343630303433323234323133313130383938363034313231303232373030363238353709000e01756403670b0104823b01050001";
/// The EM300-TH NB-IoT sample frame (vendor cellular decoder comment), 128 bytes: a status
/// record and five samples, six readings per uplink.
const FRAME: &str = "020001006200001401303132303031303036313338423232303535393131303033383639393531303430323933333631343630313133313132303632393331383938363131323032323030313332323838393309002a01755bff023c000367fe000468780367ff000468780367fe000468780367ff000468780367fe00046879";
/// Byte offsets in that frame: FRAME_CNT (u16 BE) and the IMEI (15 ASCII digits).
const FRAME_CNT_AT: usize = 6;
const IMEI_AT: usize = 33;

#[derive(Debug, Parser)]
#[command(
    name = "nbiot-load",
    about = "Load generator for nbiot-gateway (CoAP uplinks)"
)]
struct Args {
    /// The gateway's CoAP address.
    #[arg(long, default_value = "127.0.0.1:5683")]
    coap: SocketAddr,
    /// The gateway's HTTP API (for --register).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api: String,
    /// Number of devices.
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    /// First IMEI serial (devices get consecutive serials; check digits are computed).
    #[arg(long, default_value_t = 0)]
    first_serial: u64,
    /// Uplinks per second, all devices together.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// UDP source ports (0: enough for the rate's message ids, at least 16).
    #[arg(long, default_value_t = 0)]
    sockets: usize,
    /// Send NON (no ack, no retransmission) instead of CON.
    #[arg(long)]
    non: bool,
    /// Register the devices first (CSV import through the API) with this profile.
    #[arg(long)]
    register: bool,
    #[arg(long, default_value = "milesight-em300-th-nb")]
    profile: String,
    /// The frame sent: `em300-th` (6 readings per uplink) or `em400` (1 reading). Both are
    /// Milesight NB-IoT cellular frames; register devices with a matching profile.
    #[arg(long, default_value = "em300-th")]
    payload: String,
    /// The gateway's pid, to report its CPU time per uplink (from /proc).
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// After the run, check the gateway's store: every acked (device, sequence) exactly once.
    #[arg(long)]
    verify_db: Option<PathBuf>,
    /// First frame counter value (continue a previous run's sequences).
    #[arg(long, default_value_t = 1)]
    first_sequence: u16,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Retransmissions of an unanswered CON before giving up (RFC 7252 MAX_RETRANSMIT).
    #[arg(long, default_value_t = MAX_RETRANSMIT)]
    max_retransmit: u32,
}

/// A 15-digit IMEI: TAC 86000000, a 6-digit serial, and its Luhn check digit.
fn imei(serial: u64) -> String {
    let body = format!("86000000{:06}", serial % 1_000_000);
    let sum: u32 = body
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                x / 10 + x % 10
            } else {
                d
            }
        })
        .sum();
    format!("{body}{}", (10 - sum % 10) % 10)
}

fn payload(template: &[u8], imei: &str, seq: u16) -> Vec<u8> {
    let mut p = template.to_vec();
    p[FRAME_CNT_AT..FRAME_CNT_AT + 2].copy_from_slice(&seq.to_be_bytes());
    p[IMEI_AT..IMEI_AT + 15].copy_from_slice(imei.as_bytes());
    p
}

struct Pending {
    device: u32,
    seq: u16,
    first_sent: Instant,
    last_sent: Instant,
    attempts: u32,
    datagram: Vec<u8>,
}

#[derive(Default)]
struct Totals {
    sent: u64,
    acked: u64,
    retransmissions: u64,
    timeouts: u64,
    send_errors: u64,
    codes: HashMap<String, u64>,
    /// (device, sequence) of every uplink answered 2.04.
    committed: Vec<(u32, u16)>,
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

async fn register(args: &Args) -> anyhow::Result<()> {
    let mut csv = String::from("device,profile\n");
    for d in 0..args.devices {
        csv.push_str(&format!(
            "{},{}\n",
            imei(args.first_serial + u64::from(d)),
            args.profile
        ));
    }
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/devices/import?partial=true", args.api))
        .header("content-type", "text/csv")
        .bearer_auth(std::env::var("NBIOT_TOKEN").unwrap_or_default())
        .body(csv)
        .send()
        .await
        .context("cannot reach the gateway API to register devices")?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("device import failed ({status}): {body}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.devices == 0 || args.rate <= 0.0 || args.duration <= 0.0 {
        bail!("--devices, --rate and --duration must be positive");
    }
    if args.register {
        register(&args).await?;
    }
    let total = (args.rate * args.duration).round() as u64;
    let sockets = if args.sockets > 0 {
        args.sockets
    } else {
        ((args.rate * EXCHANGE_LIFETIME_S / 30_000.0).ceil() as usize).max(16)
    };
    let frame = match args.payload.as_str() {
        "em300-th" => FRAME,
        "em400" => FRAME_EM400,
        other => bail!("unknown --payload `{other}` (em300-th or em400)"),
    };
    let template = nbiot_codecs::hex::decode(frame.as_bytes()).context("frame template")?;
    let imeis: Arc<Vec<String>> = Arc::new(
        (0..args.devices)
            .map(|d| imei(args.first_serial + u64::from(d)))
            .collect(),
    );
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?,
    ));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let cpu_before = args.gateway_pid.and_then(cpu_seconds);
    let started = Instant::now();

    let mut tasks = Vec::with_capacity(sockets);
    for s in 0..sockets {
        // Socket s sends uplinks s, s + sockets, s + 2·sockets, ...
        let count = total / sockets as u64 + u64::from((s as u64) < total % sockets as u64);
        let socket = UdpSocket::bind("127.0.0.1:0").await.context("bind")?;
        socket.connect(args.coap).await.context("connect")?;
        let ctx = SocketCtx {
            socket,
            index: s as u64,
            sockets: sockets as u64,
            count,
            interval: Duration::from_secs_f64(sockets as f64 / args.rate),
            con: !args.non,
            template: template.clone(),
            imeis: Arc::clone(&imeis),
            devices: u64::from(args.devices),
            first_sequence: args.first_sequence,
            max_retransmit: args.max_retransmit,
            histogram: Arc::clone(&histogram),
            totals: Arc::clone(&totals),
        };
        tasks.push(tokio::spawn(ctx.run()));
    }
    for t in tasks {
        t.await.context("socket task")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, args.gateway_pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };

    let totals = totals.lock().await;
    let h = histogram.lock().await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let verified = match &args.verify_db {
        Some(db) => Some(verify(db, &imeis, &totals.committed)?),
        None => None,
    };
    let summary = serde_json::json!({
        "sent": totals.sent,
        "acked": totals.acked,
        "codes": totals.codes,
        "retransmissions": totals.retransmissions,
        "timeouts": totals.timeouts,
        "send_errors": totals.send_errors,
        "seconds": elapsed,
        "acked_per_second": totals.acked as f64 / elapsed,
        "sockets": sockets,
        "ack_latency_ms": { "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0 },
        "gateway_cpu_seconds": cpu,
        "uplinks_per_gateway_cpu_second": cpu.map(|c| totals.acked as f64 / c.max(1e-9)),
        "gateway_cpu_seconds_per_10k": cpu.map(|c| c / (totals.acked.max(1) as f64) * 10_000.0),
        "store_check": verified,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    if let Some(v) = verified {
        if v["missing"] != 0 || v["duplicated"] != 0 {
            bail!("store check failed: {v}");
        }
    }
    Ok(())
}

struct SocketCtx {
    socket: UdpSocket,
    index: u64,
    sockets: u64,
    count: u64,
    interval: Duration,
    con: bool,
    template: Vec<u8>,
    imeis: Arc<Vec<String>>,
    devices: u64,
    first_sequence: u16,
    max_retransmit: u32,
    histogram: Arc<Mutex<Histogram<u64>>>,
    totals: Arc<Mutex<Totals>>,
}

impl SocketCtx {
    fn datagram(&self, mid: u16, uplink: u64) -> (u32, u16, Vec<u8>) {
        let device = (uplink % self.devices) as u32;
        let seq = self
            .first_sequence
            .wrapping_add((uplink / self.devices) as u16);
        let imei = &self.imeis[device as usize];
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(if self.con {
            MessageType::Confirmable
        } else {
            MessageType::NonConfirmable
        });
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = mid;
        p.set_token(mid.to_be_bytes().to_vec());
        p.add_option(coap_lite::CoapOption::UriPath, b"up".to_vec());
        p.add_option(coap_lite::CoapOption::UriPath, imei.as_bytes().to_vec());
        p.payload = payload(&self.template, imei, seq);
        (device, seq, p.to_bytes().unwrap_or_default())
    }

    async fn run(self) -> anyhow::Result<()> {
        let mut pending: HashMap<u16, Pending> = HashMap::new();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut retransmit = tokio::time::interval(Duration::from_millis(100));
        let mut buf = vec![0u8; 2048];
        let mut next = 0u64;
        let mut mid: u16 = rand_start(self.index);
        let mut local = Totals::default();
        let mut latencies: Vec<u64> = Vec::new();
        loop {
            if next >= self.count && (pending.is_empty() || !self.con) {
                break;
            }
            tokio::select! {
                // Send the next uplink on schedule.
                _ = ticker.tick(), if next < self.count => {
                    let uplink = self.index + next * self.sockets;
                    let (device, seq, datagram) = self.datagram(mid, uplink);
                    // A refused send (ICMP port unreachable: the gateway is down) is like a
                    // lost datagram: the CON stays pending and is retransmitted or given up.
                    if self.socket.send(&datagram).await.is_err() {
                        local.send_errors += 1;
                    }
                    local.sent += 1;
                    if self.con {
                        let now = Instant::now();
                        pending.insert(mid, Pending { device, seq, first_sent: now, last_sent: now, attempts: 0, datagram });
                    }
                    mid = mid.wrapping_add(1);
                    next += 1;
                }
                // An answer: an ACK with a response code (piggybacked).
                got = self.socket.recv(&mut buf) => {
                    let n = match got { Ok(n) => n, Err(_) => continue };
                    let Ok(p) = Packet::from_bytes(&buf[..n]) else { continue };
                    if let Some(req) = pending.remove(&p.header.message_id) {
                        let code = match p.header.code {
                            MessageClass::Response(ResponseType::Changed) => "2.04".to_owned(),
                            other => other.to_string(),
                        };
                        if code == "2.04" {
                            local.committed.push((req.device, req.seq));
                        }
                        *local.codes.entry(code).or_default() += 1;
                        local.acked += 1;
                        latencies.push(req.first_sent.elapsed().as_micros().max(1) as u64);
                    }
                }
                // Retransmit CONs whose ACK is overdue (RFC 7252 §4.2: doubling timeout).
                _ = retransmit.tick(), if self.con => {
                    let now = Instant::now();
                    let mut give_up = Vec::new();
                    for (id, req) in pending.iter_mut() {
                        let timeout = ACK_TIMEOUT * 2u32.pow(req.attempts);
                        if now.duration_since(req.last_sent) >= timeout {
                            if req.attempts >= self.max_retransmit {
                                give_up.push(*id);
                            } else {
                                req.attempts += 1;
                                req.last_sent = now;
                                local.retransmissions += 1;
                                if self.socket.send(&req.datagram).await.is_err() {
                                    local.send_errors += 1;
                                }
                            }
                        }
                    }
                    for id in give_up {
                        pending.remove(&id);
                        local.timeouts += 1;
                    }
                }
            }
        }
        let mut h = self.histogram.lock().await;
        for l in latencies {
            let _ = h.record(l);
        }
        let mut t = self.totals.lock().await;
        t.sent += local.sent;
        t.acked += local.acked;
        t.retransmissions += local.retransmissions;
        t.timeouts += local.timeouts;
        t.send_errors += local.send_errors;
        for (k, v) in local.codes {
            *t.codes.entry(k).or_default() += v;
        }
        t.committed.extend(local.committed);
        Ok(())
    }
}

/// A per-socket starting message id, spread so sockets do not move in lockstep.
fn rand_start(index: u64) -> u16 {
    (index.wrapping_mul(0x9E37_79B9) >> 7) as u16
}

/// Every (device, sequence) acknowledged with 2.04 must be in the store exactly once.
fn verify(
    db: &std::path::Path,
    imeis: &[String],
    committed: &[(u32, u16)],
) -> anyhow::Result<serde_json::Value> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open {}", db.display()))?;
    let mut stmt = conn.prepare("SELECT device, sequence, count(*) FROM uplinks WHERE sequence IS NOT NULL GROUP BY device, sequence")?;
    let mut stored: HashMap<(String, i64), i64> = HashMap::new();
    let rows = stmt.query_map([], |r| {
        Ok((
            (r.get::<_, String>(0)?, r.get::<_, i64>(1)?),
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (k, n) = row?;
        stored.insert(k, n);
    }
    let (mut missing, mut duplicated) = (0u64, 0u64);
    for &(device, seq) in committed {
        match stored.get(&(imeis[device as usize].clone(), i64::from(seq))) {
            None => missing += 1,
            Some(1) => {}
            Some(_) => duplicated += 1,
        }
    }
    Ok(
        serde_json::json!({ "checked": committed.len(), "missing": missing, "duplicated": duplicated }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imeis_pass_luhn() {
        assert_eq!(imei(0), "860000000000009");
        assert_eq!(imei(0).len(), 15);
    }

    #[test]
    fn payload_is_a_valid_frame_with_identity_and_sequence() {
        let template = nbiot_codecs::hex::decode(FRAME.as_bytes()).expect("template");
        let p = payload(&template, &imei(7), 513);
        let codec = nbiot_codecs::builtin("milesight").expect("codec");
        let r = codec.decode(&p).expect("decodes");
        let id = r[0].identity.as_ref().expect("identity");
        assert_eq!(id.device_id.as_deref(), Some(imei(7).as_str()));
        assert_eq!(id.sequence, Some(513));
    }
}
