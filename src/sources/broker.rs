//! The embedded MQTT broker: rumqttd 0.20 run in-process, so `nbiot-gateway run` takes MQTT
//! from devices with no broker to install (`[mqtt] mode = "embedded"`, the default).
//!
//! This module owns starting the broker, its limits, and telling the caller where it
//! listens. It does not consume anything: the gateway reads the broker through the same
//! `rumqttc` client path it uses for an external broker ([`super::mqtt::run`], connected
//! to [`EmbeddedBroker::connect_addr`] on loopback), so there is one consumer
//! implementation and one set of delivery rules.
//!
//! # What embedded mode promises (read this before relying on it)
//!
//! rumqttd keeps everything in memory: its message logs, sessions and in-flight state are
//! gone when the process exits, and it acknowledges a device's QoS 1 PUBLISH as soon as it
//! has appended the message to its in-memory log, before the gateway has stored it.
//! So in embedded mode the durability promise runs **from broker receipt to gateway commit
//! within one process lifetime**:
//!
//! - while the process runs, a message the broker acknowledged reaches the store: the
//!   gateway's consumer session is persistent (`clean_session = false`), acknowledges only
//!   after the commit, and the broker re-sends anything unacknowledged when the consumer
//!   reconnects;
//! - a crash or restart loses what the broker acknowledged but the gateway had not yet
//!   committed (normally the few milliseconds of one group commit), and the device will not
//!   re-send it;
//! - if the consumer falls more than [`BrokerLimits::segment_size`] ×
//!   [`BrokerLimits::segment_count`] bytes behind, rumqttd discards the oldest messages of
//!   that topic filter.
//!
//! Sites that need device-to-store durability across crashes run an external broker with
//! persistence (Mosquitto, EMQX) and `mode = "external"`.
//!
//! # Other behaviour worth knowing
//!
//! - MQTT 3.1.1 over plain TCP only (rumqttd without TLS and websocket features).
//! - The consumer's persistent session exists before the broker is handed back:
//!   [`start_embedded_broker`] connects once with the consumer's client id
//!   (`clean_session = false`), subscribes to its filters and disconnects. rumqttd then
//!   keeps every matching message for that session from the first moment, so nothing a
//!   device sends between the broker starting and the consumer connecting is lost.
//! - A message on a topic no subscription matches is acknowledged and dropped (plain MQTT
//!   semantics; `dynamic_filters` is off, so rumqttd does not keep a log nobody reads).
//! - QoS 1 deliveries to the consumer must be acknowledged in order (rumqttd disconnects a
//!   client that acknowledges out of order); the consumer's FIFO of acks guarantees it.
//! - rumqttd 0.20 cannot be stopped: [`EmbeddedBroker`] runs until the process exits.
//!   Dropping the handle does not close the listener.
//! - rumqttd logs through the process's `tracing` subscriber under the `rumqttd` target:
//!   in 0.20 that is several INFO lines per device connection and an ERROR on every normal
//!   disconnect. Add [`QUIET_RUMQTTD`] to the default log filter; this module logs the
//!   broker's lifecycle itself.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info};

use super::mqtt::MqttSettings;

/// A `tracing` filter directive that silences rumqttd's own log lines (see the module docs).
pub const QUIET_RUMQTTD: &str = "rumqttd=off";

/// The embedded broker's limits. Every value is explicit here because rumqttd's own sample
/// configuration is sized for a cloud broker (100 MiB log segments, ten of them per topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Concurrent client connections (devices plus the gateway's own consumer). Beyond it,
    /// a new connection gets no CONNACK.
    pub max_connections: usize,
    /// Largest MQTT packet a client may send (fixed header, topic and payload), in bytes.
    /// A larger one disconnects the client. rumqttd calls it `max_payload_size`.
    pub max_packet_size: usize,
    /// Packets read from one connection in one batch before the router gets them
    /// (rumqttd's `max_inflight_count`). Outgoing QoS 1 in-flight per subscriber is fixed
    /// at 100 inside rumqttd 0.20.
    pub read_batch: usize,
    /// How long a new TCP connection has to send CONNECT before it is closed (guards the
    /// connection table against idle sockets). At most 65 535 ms.
    pub connect_timeout: Duration,
    /// Pause after accepting each connection: smooths the reconnect storm after an outage
    /// (1 ms caps new connections at about a thousand per second).
    pub accept_interval: Duration,
    /// Bytes per in-memory log segment of a subscribed topic filter (at least 1 KiB).
    pub segment_size: usize,
    /// Segments kept per topic filter (at least 1). `segment_size × segment_count` is both
    /// the memory a busy filter settles at and how far behind the consumer may fall before
    /// the oldest messages are discarded.
    pub segment_count: usize,
    /// Messages the router hands one connection per scheduling pass (QoS 0 reads; QoS 1
    /// reads are bounded by the 100-message in-flight window).
    pub max_outgoing_packet_count: u64,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        BrokerLimits {
            max_connections: 10_000,
            // NB-IoT payloads are tens to hundreds of bytes; 64 KiB leaves room for
            // firmware that batches a day of readings, and matches the consumer's limit.
            max_packet_size: 64 * 1024,
            read_batch: 100,
            connect_timeout: Duration::from_secs(10),
            accept_interval: Duration::from_millis(1),
            // 4 MiB × 16 = 64 MiB per subscribed filter: minutes of a large fleet's traffic.
            segment_size: 4 * 1024 * 1024,
            segment_count: 16,
            max_outgoing_packet_count: 200,
        }
    }
}

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded MQTT broker: limit `{field}` {problem}")]
    InvalidLimits {
        field: &'static str,
        problem: &'static str,
    },
    #[error("embedded MQTT broker cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the embedded MQTT broker thread: {0}")]
    Spawn(std::io::Error),
    #[error("embedded MQTT broker did not accept connections on {addr} within {waited:?} (last attempt: {last})")]
    NotListening {
        addr: SocketAddr,
        waited: Duration,
        /// What the last connection attempt ran into.
        last: String,
    },
    #[error("embedded MQTT broker refused the subscription {filters:?} of client {client_id}")]
    SubscriptionRefused {
        client_id: String,
        filters: Vec<String>,
    },
}

/// A running embedded broker. It runs until the process exits (rumqttd 0.20 has no stop).
#[derive(Debug)]
pub struct EmbeddedBroker {
    local_addr: SocketAddr,
    limits: BrokerLimits,
    thread: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// The address the broker listens on (the requested one, with port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the gateway's own consumer connects: the listen address, or loopback of the
    /// same family when it listens on every interface.
    pub fn connect_addr(&self) -> SocketAddr {
        connect_addr(self.local_addr)
    }

    pub fn limits(&self) -> &BrokerLimits {
        &self.limits
    }

    /// False once the broker's thread has ended (its listener failed).
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }
}

/// How long [`start_embedded_broker`] waits for the listener to accept connections.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts rumqttd on `listen` (port 0 picks a free port) with `limits`, creates the
/// persistent session of `consumer` (its client id, subscribed to its topic filters), and
/// returns once that is done, with the address it bound. `consumer` is the gateway's own
/// consumer, which then connects to [`EmbeddedBroker::connect_addr`].
///
/// Blocks the calling thread until then (normally a few milliseconds, at most
/// [`READY_TIMEOUT`]); async callers use `spawn_blocking`. rumqttd's `Broker::start` blocks
/// forever, so it runs on a dedicated thread named `mqtt-broker`.
pub fn start_embedded_broker(
    listen: SocketAddr,
    limits: BrokerLimits,
    consumer: &MqttSettings,
) -> Result<EmbeddedBroker, BrokerError> {
    let session = Session {
        client_id: consumer.client_id.clone(),
        // The embedded broker has one consumer: never a shared subscription.
        filters: consumer
            .topics
            .iter()
            .map(|t| t.filter().to_owned())
            .collect(),
    };
    check_limits(&limits)?;
    // rumqttd binds inside its own thread and reports a failure only in its log, so bind
    // here first: an address in use is refused with a clear error, and port 0 is resolved
    // to a concrete port that rumqttd then binds (the gap between the two binds is a few
    // microseconds; a port taken in it shows up as NotListening below).
    let local_addr = TcpListener::bind(listen)
        .and_then(|l| l.local_addr())
        .map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
    let config = rumqttd_config(local_addr, &limits);
    let thread = std::thread::Builder::new()
        .name("mqtt-broker".to_owned())
        .spawn(move || {
            // `Broker::new` starts the router thread; `start` spawns the listener thread
            // and joins it, so it returns only if the listener ended.
            let mut broker = rumqttd::Broker::new(config);
            match broker.start() {
                Ok(()) => error!(listen = %local_addr, "Embedded MQTT broker stopped."),
                Err(e) => error!(listen = %local_addr, error = %e, "Embedded MQTT broker failed."),
            }
        })
        .map_err(BrokerError::Spawn)?;

    let broker = EmbeddedBroker {
        local_addr,
        limits,
        thread,
    };
    wait_until_ready(&broker, &session)?;
    info!(
        listen = %broker.local_addr,
        max_connections = broker.limits.max_connections,
        max_packet_size = broker.limits.max_packet_size,
        segment_size = broker.limits.segment_size,
        segment_count = broker.limits.segment_count,
        consumer_session = %session.client_id,
        "Embedded MQTT broker listening (MQTT 3.1.1, plain TCP, in-memory)."
    );
    Ok(broker)
}

fn check_limits(l: &BrokerLimits) -> Result<(), BrokerError> {
    let invalid = |field, problem| Err(BrokerError::InvalidLimits { field, problem });
    if l.max_connections == 0 {
        return invalid("max_connections", "must be at least 1");
    }
    // A packet must at least hold a CONNECT with a short client id.
    if l.max_packet_size < 128 {
        return invalid("max_packet_size", "must be at least 128 bytes");
    }
    if l.read_batch == 0 {
        return invalid("read_batch", "must be at least 1");
    }
    if l.connect_timeout.is_zero() || l.connect_timeout.as_millis() > u128::from(u16::MAX) {
        return invalid("connect_timeout", "must be between 1 ms and 65.535 s");
    }
    // rumqttd panics (in its router thread) below these.
    if l.segment_size < 1024 {
        return invalid("segment_size", "must be at least 1024 bytes");
    }
    if l.segment_count == 0 {
        return invalid("segment_count", "must be at least 1");
    }
    if l.max_outgoing_packet_count == 0 {
        return invalid("max_outgoing_packet_count", "must be at least 1");
    }
    Ok(())
}

/// rumqttd's configuration, built as structs (no config file): one MQTT 3.1.1 listener.
fn rumqttd_config(listen: SocketAddr, l: &BrokerLimits) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        // Checked to fit in check_limits.
        connection_timeout_ms: u16::try_from(l.connect_timeout.as_millis()).unwrap_or(u16::MAX),
        max_payload_size: l.max_packet_size,
        max_inflight_count: l.read_batch,
        auth: None,
        external_auth: None,
        // Off: publishes to a topic no subscription matches are refused (see module docs).
        dynamic_filters: false,
    };
    let server = rumqttd::ServerSettings {
        name: "mqtt-v4".to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: u64::try_from(l.accept_interval.as_millis()).unwrap_or(u64::MAX),
        connections,
    };
    let router = rumqttd::RouterConfig {
        max_connections: l.max_connections,
        max_outgoing_packet_count: l.max_outgoing_packet_count,
        max_segment_size: l.segment_size,
        max_segment_count: l.segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: rumqttd::Strategy::default(),
    };
    rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("mqtt-v4".to_owned(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

/// Where a local client reaches a broker listening on `listen`.
pub(crate) fn connect_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The consumer's persistent session, created before anyone else can connect to it.
struct Session {
    client_id: String,
    filters: Vec<String>,
}

/// Waits until the broker has created `session` over its listener (which proves it is
/// rumqttd that answers, and that it listens), its thread ends, or [`READY_TIMEOUT`]
/// passes.
fn wait_until_ready(broker: &EmbeddedBroker, session: &Session) -> Result<(), BrokerError> {
    let addr = broker.connect_addr();
    let started = Instant::now();
    let last = loop {
        if !broker.is_running() {
            break "the broker thread ended (see its log)".to_owned();
        }
        let failure = match create_session(addr, session) {
            // The listener may belong to another process that grabbed the port between
            // our bind and rumqttd's: then rumqttd's listener thread has failed and ended.
            Ok(()) if broker.is_running() => return Ok(()),
            Ok(()) => break "another process answered; the broker thread ended".to_owned(),
            Err(SessionError::Refused) => {
                return Err(BrokerError::SubscriptionRefused {
                    client_id: session.client_id.clone(),
                    filters: session.filters.clone(),
                })
            }
            Err(SessionError::Io(e)) => e.to_string(),
        };
        if started.elapsed() >= READY_TIMEOUT {
            break failure;
        }
        // The listener thread is starting its runtime: a handful of milliseconds.
        std::thread::sleep(Duration::from_millis(5));
    };
    Err(BrokerError::NotListening {
        addr: broker.local_addr,
        waited: started.elapsed(),
        last,
    })
}

enum SessionError {
    Io(std::io::Error),
    /// The broker answered but refused the connection or the subscription.
    Refused,
}

impl From<std::io::Error> for SessionError {
    fn from(e: std::io::Error) -> Self {
        SessionError::Io(e)
    }
}

/// One MQTT 3.1.1 exchange: CONNECT (clean session off) → CONNACK, SUBSCRIBE (QoS 1) →
/// SUBACK, DISCONNECT. The broker keeps the session and its subscriptions afterwards.
fn create_session(addr: SocketAddr, session: &Session) -> Result<(), SessionError> {
    let timeout = Duration::from_millis(500);
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;

    // CONNECT: protocol "MQTT" level 4, flags 0 (clean session off), keep-alive 10 s.
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x00, 0x00, 0x0A];
    put_string(&mut body, &session.client_id)?;
    s.write_all(&packet(0x10, &body)?)?;
    // CONNACK: 0x20, length 2, flags, return code (0 = accepted).
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack[..2] != [0x20, 0x02] {
        return Err(invalid("not an MQTT CONNACK").into());
    }
    if connack[3] != 0x00 {
        return Err(SessionError::Refused);
    }

    // SUBSCRIBE (fixed header flags 0b0010): packet id 1, then each filter with QoS 1.
    let mut body = vec![0x00, 0x01];
    for f in &session.filters {
        put_string(&mut body, f)?;
        body.push(0x01);
    }
    s.write_all(&packet(0x82, &body)?)?;
    // SUBACK: 0x90, length, packet id, one return code per filter (0x80 = failure).
    let expected = 2 + session.filters.len();
    let mut head = [0u8; 2];
    s.read_exact(&mut head)?;
    if head[0] != 0x90 || usize::from(head[1]) != expected {
        return Err(invalid("not the SUBACK expected").into());
    }
    let mut suback = vec![0u8; expected];
    s.read_exact(&mut suback)?;
    if suback.iter().skip(2).any(|&code| code == 0x80) {
        return Err(SessionError::Refused);
    }

    // DISCONNECT: the session stays (clean session was off).
    s.write_all(&[0xE0, 0x00])?;
    Ok(())
}

fn invalid(what: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// An MQTT UTF-8 string: u16 length, bytes.
fn put_string(out: &mut Vec<u8>, s: &str) -> std::io::Result<()> {
    let len = u16::try_from(s.len()).map_err(|_| invalid("string longer than 65535 bytes"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// A packet: fixed header byte, remaining length (variable-length integer, §2.2.3), body.
fn packet(header: u8, body: &[u8]) -> std::io::Result<Vec<u8>> {
    if body.len() > 268_435_455 {
        return Err(invalid("packet too large"));
    }
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(header);
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_valid_and_bounded() {
        let l = BrokerLimits::default();
        check_limits(&l).unwrap();
        // The memory a subscribed filter may hold: stated in the docs as 64 MiB.
        assert_eq!(l.segment_size * l.segment_count, 64 * 1024 * 1024);
    }

    #[test]
    fn limits_rumqttd_would_panic_on_are_refused() {
        type Change = fn(&mut BrokerLimits);
        let cases: [(Change, &str); 5] = [
            (|l| l.segment_size = 1023, "segment_size"),
            (|l| l.segment_count = 0, "segment_count"),
            (|l| l.max_connections = 0, "max_connections"),
            (
                |l| l.connect_timeout = Duration::from_secs(70),
                "connect_timeout",
            ),
            (|l| l.max_packet_size = 16, "max_packet_size"),
        ];
        for (change, name) in cases {
            let mut l = BrokerLimits::default();
            change(&mut l);
            match check_limits(&l) {
                Err(BrokerError::InvalidLimits { field, .. }) => assert_eq!(field, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn config_carries_every_limit() {
        let l = BrokerLimits::default();
        let addr: SocketAddr = "127.0.0.1:18830".parse().unwrap();
        let c = rumqttd_config(addr, &l);
        assert_eq!(c.router.max_connections, l.max_connections);
        assert_eq!(c.router.max_segment_size, l.segment_size);
        assert_eq!(c.router.max_segment_count, l.segment_count);
        assert!(c.v5.is_none() && c.ws.is_none() && c.prometheus.is_none());
        let v4 = c.v4.unwrap();
        let s = v4.values().next().unwrap();
        assert_eq!(s.listen, addr);
        assert!(s.tls.is_none());
        assert_eq!(s.connections.max_payload_size, l.max_packet_size);
        assert_eq!(s.connections.connection_timeout_ms, 10_000);
        assert!(!s.connections.dynamic_filters);
    }

    #[test]
    fn consumer_connects_over_loopback_when_listening_everywhere() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(connect_addr(a("0.0.0.0:1883")), a("127.0.0.1:1883"));
        assert_eq!(connect_addr(a("[::]:1883")), a("[::1]:1883"));
        assert_eq!(connect_addr(a("10.0.0.5:1883")), a("10.0.0.5:1883"));
    }

    fn consumer() -> MqttSettings {
        MqttSettings::from_config(&crate::config::MqttConfig::default()).unwrap()
    }

    #[test]
    fn remaining_length_is_a_variable_length_integer() {
        // MQTT 3.1.1 §2.2.3: 0, 127, 128, 16 383, 16 384.
        for (len, encoded) in [
            (0usize, &[0x00u8][..]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
        ] {
            let p = packet(0x82, &vec![0; len]).unwrap();
            assert_eq!(p[0], 0x82);
            assert_eq!(&p[1..1 + encoded.len()], encoded, "{len}");
            assert_eq!(p.len(), 1 + encoded.len() + len);
        }
    }

    #[test]
    fn starts_on_port_zero_and_reports_the_port() {
        let broker = start_embedded_broker(
            "127.0.0.1:0".parse().unwrap(),
            BrokerLimits::default(),
            &consumer(),
        )
        .unwrap();
        assert_ne!(broker.local_addr().port(), 0);
        assert!(broker.is_running());
        // It speaks MQTT on that port (and the session can be taken over again).
        let session = Session {
            client_id: "nbiot-gateway".to_owned(),
            filters: vec!["nbiot/+/up".to_owned()],
        };
        assert!(create_session(broker.connect_addr(), &session).is_ok());
    }

    #[test]
    fn an_address_in_use_is_refused_with_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        match start_embedded_broker(addr, BrokerLimits::default(), &consumer()) {
            Err(BrokerError::Bind { addr: a, .. }) => assert_eq!(a, addr),
            other => panic!("{other:?}"),
        }
    }
}
