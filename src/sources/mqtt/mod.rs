//! MQTT source: consumes device uplinks from an MQTT broker (external, or the embedded one
//! in [`super::broker`]) and hands each to the pipeline, acknowledging a QoS 1 message only
//! once the pipeline has decided its fate.
//!
//! This module owns the consumer session (connect, subscribe, reconnect), topic templates
//! (`nbiot/{device}/up` → device id), and the PUBACK discipline. It does not decode, look
//! devices up or store anything: that is the pipeline, behind [`PipelineHandle`].
//!
//! # Delivery
//!
//! The session is persistent (`clean_session = false`, a stable `client_id`) and acks are
//! manual (`rumqttc` `set_manual_acks`), so the broker keeps every QoS 1 message until the
//! gateway acknowledges it, across reconnects and gateway restarts:
//!
//! | what happened                                    | PUBACK | `nbiot_uplinks_rejected_total` reason |
//! |--------------------------------------------------|--------|----------------------------------|
//! | `Committed`, `Undecodable` (both are stored)     | yes    | —                                |
//! | `Rejected(UnknownDevice / BadToken / NoProfile)` | yes    | its reason (counted by the pipeline) |
//! | topic matches no template                        | yes    | `unmatched_topic`                |
//! | device id that can never be registered           | yes    | `unknown_device`                 |
//! | `Rejected(Unavailable { retry_after })`          | no     | `unavailable` (counted by the pipeline) |
//! | reply dropped undecided (pipeline shutting down) | no     | `shutting_down`                  |
//!
//! Every message taken from the broker counts in `nbiot_uplinks_received_total{protocol="mqtt"}`.
//!
//! Messages that can never succeed are acknowledged, so one poison message cannot block the
//! session. A message that is *withheld* can only come back by a reconnect: MQTT 3.1.1
//! brokers re-send unacknowledged messages only when the session resumes (§4.4). So a
//! withheld message pauses consumption: the connection is dropped, the source waits
//! `retry_after` (clamped to the backoff range) and reconnects, and the broker re-sends
//! everything from the first unacknowledged message. Messages after it that were already
//! committed are then delivered again: delivery is at least once.
//!
//! Backpressure: uplinks go to the pipeline with [`PipelineHandle::submit_wait`] (MQTT can
//! wait: the broker holds unacknowledged messages), one at a time in arrival order, and at
//! most [`MqttSettings::window`] messages are in flight (received and not yet acknowledged
//! or, for QoS 0, not yet handed over). With the window full the source stops taking
//! messages from the connection, which stops reading the socket, and TCP pushes back on the
//! broker. Overload is therefore never a reason to withhold an ack here.
//!
//! QoS 0 messages are accepted at most once: submitted with no reply, never acknowledged.
//!
//! An uplink's `received_at_ms` is when the gateway took it from the broker (MQTT 3.1.1
//! carries no timestamp): for messages the broker held through an outage, later than the
//! device sent them. Readings with the device's own timestamp are unaffected.
//!
//! # Ordering of acks
//!
//! PUBACKs go out in the order the PUBLISHes arrived (MQTT 3.1.1 §4.6, and rumqttd
//! disconnects a client that acknowledges out of order), whatever order the pipeline's
//! shards finish in: every QoS 1 message takes a slot in a FIFO (`acks::AckQueue`) when it
//! arrives, and acks are released from its head as outcomes arrive. Slots belong to one
//! connection: when it ends they are dropped unacknowledged (the broker re-sends them), so
//! an ack is never written to a later connection, where its packet identifier could name a
//! different message.
//!
//! # Connection
//!
//! A connection task owns rumqttc's `EventLoop` and polls it without interruption; this
//! keeps rumqttc's cancellation-sensitive writes out of the consumer's `select!`. After
//! every CONNACK it subscribes to every template, whatever `session_present` says:
//! rumqttc does not re-subscribe, a broker restarted without persistence has lost the
//! session, and subscribing again to a kept session is harmless. On a connection error it
//! drops the event loop, waits a capped exponential backoff with full jitter, and polls a
//! fresh one (rumqtt's way to reconnect). A connection that lasted 10 s resets
//! the backoff.
//!
//! On shutdown the source stops taking messages, waits up to
//! [`MqttSettings::drain_timeout`] for the outcomes of those in flight so their acks still
//! go out, then sends DISCONNECT: the session, and whatever is unacknowledged, stays with
//! the broker for the next start.
//!
//! # Limits worth knowing
//!
//! - Throughput is bounded by the broker's own in-flight limit for the session (Mosquitto
//!   `max_inflight_messages`, default 20; EMQX `max_inflight`, default 32) divided by the
//!   commit latency: raise it on busy sites.
//! - A message larger than [`MqttSettings::max_packet_size`] breaks the connection every
//!   time the broker re-sends it: keep the broker's limit (Mosquitto
//!   `message_size_limit`) at or below it. The embedded broker's limit is below it.
//! - MQTT 3.1.1 over plain TCP (`mqtt://`); TLS (`mqtts://`) is refused at configuration.
//!
//! # Beyond one machine
//!
//! With `shared_group` set (external mode) the source subscribes to
//! `$share/<group>/<filter>`, so several gateways split one topic between them. Each
//! gateway needs its own `client_id`: two sessions with one id take each other over.

mod acks;
mod settings;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::pipeline::{PipelineHandle, SubmitError, Transport, Uplink};
use crate::telemetry::metrics as names;

use acks::{ack_packet, verdict, AckQueue, Verdict};
use settings::jitter;
pub use settings::{Backoff, BrokerAddr, MqttConfigError, MqttSettings, TopicTemplate};

/// A connection that lasted this long resets the backoff: a broker that accepts and then
/// drops us at once (e.g. another gateway using our client id) keeps backing off.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// How long a graceful DISCONNECT may take once the drain is over.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Events the connection task may have handed over before the consumer takes them; with
/// the window full, this is how far the connection task reads ahead.
const EVENT_CHANNEL: usize = 16;

/// rumqttc's request channel: one slot per possible packet identifier plus room for a
/// SUBSCRIBE and a DISCONNECT. Every ack queued in it is for a distinct message the broker
/// still holds in flight (it cannot reuse an identifier before our ack), so `try_ack` never
/// finds it full. flume allocates as it fills, not up front.
const REQUEST_CHANNEL: usize = u16::MAX as usize + 16;

/// rumqttc's window for the gateway's own outgoing QoS 1 publishes (none today; future
/// downlinks). Incoming messages are bounded by [`MqttSettings::window`] instead.
const OUTGOING_INFLIGHT: u16 = 16;

// ---------------------------------------------------------------------------------------
// Status, errors, metrics
// ---------------------------------------------------------------------------------------

/// Where the consumer is, for readiness checks and tests ([`run_with_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttStatus {
    /// No connection: connecting, or waiting to retry.
    Connecting,
    /// Connected; the subscription is not confirmed yet (or the broker refused it, which
    /// is logged as an error).
    Connected,
    /// Connected and every topic subscribed: messages flow.
    Subscribed,
    /// `run` has returned.
    Stopped,
}

/// Why the consumer stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT settings are invalid: {0}")]
    InvalidSettings(&'static str),
    #[error("the pipeline closed while the MQTT source was running")]
    PipelineClosed,
    #[error("the MQTT connection task ended unexpectedly")]
    ConnectionTaskEnded,
}

/// Metric handles, created once.
#[derive(Clone)]
struct Metrics {
    received: metrics::Counter,
    unmatched_topic: metrics::Counter,
    /// A device id that can never be registered (refused before the pipeline).
    unknown_device: metrics::Counter,
    shutting_down: metrics::Counter,
    connected: metrics::Gauge,
    reconnects: metrics::Counter,
    inflight: metrics::Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let protocol = Transport::Mqtt.as_str();
        let rejected = |reason: &'static str| {
            metrics::counter!(
                names::UPLINKS_REJECTED,
                "protocol" => protocol,
                "reason" => reason
            )
        };
        Metrics {
            received: metrics::counter!(names::UPLINKS_RECEIVED, "protocol" => protocol),
            unmatched_topic: rejected(names::reason::UNMATCHED_TOPIC),
            unknown_device: rejected(names::reason::UNKNOWN_DEVICE),
            shutting_down: rejected(names::reason::SHUTTING_DOWN),
            connected: metrics::gauge!(names::MQTT_CONNECTED),
            reconnects: metrics::counter!(names::MQTT_RECONNECTS),
            inflight: metrics::gauge!(names::MQTT_INFLIGHT),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The consumer
// ---------------------------------------------------------------------------------------

/// Runs the MQTT consumer until `shutdown` is cancelled: connects, subscribes, hands
/// uplinks to `pipeline`, acknowledges as the module docs say, reconnects with backoff.
/// On shutdown it stops taking messages, waits up to `drain_timeout` for the outcomes of
/// those in flight so their acks go out, then disconnects cleanly (the session stays with
/// the broker). Returns an error only if it cannot go on (the pipeline closed).
pub async fn run(
    settings: MqttSettings,
    pipeline: PipelineHandle,
    shutdown: CancellationToken,
) -> Result<(), MqttError> {
    let (status, _) = watch::channel(MqttStatus::Connecting);
    run_with_status(settings, pipeline, shutdown, status).await
}

/// [`run`], publishing the connection state on `status` (for `/readyz` and tests).
pub async fn run_with_status(
    settings: MqttSettings,
    pipeline: PipelineHandle,
    shutdown: CancellationToken,
    status: watch::Sender<MqttStatus>,
) -> Result<(), MqttError> {
    if let Err(e) = settings.check() {
        status.send_replace(MqttStatus::Stopped);
        return Err(e);
    }
    let metrics = Metrics::new();
    metrics.connected.set(0.0);
    status.send_replace(MqttStatus::Connecting);

    let (events_tx, mut events) = mpsc::channel(EVENT_CHANNEL);
    let (restart_tx, restart_rx) = mpsc::channel(1);
    let stop = CancellationToken::new();
    let mut connection = tokio::spawn(connection_task(
        settings.clone(),
        events_tx,
        restart_rx,
        stop.clone(),
        status.clone(),
        metrics.clone(),
    ));

    let mut consumer = Consumer {
        topics: settings.topics,
        window: settings.window,
        backoff: settings.backoff,
        pipeline,
        metrics,
        restart: restart_tx,
        client: None,
        restarting: false,
        inbox: VecDeque::new(),
        submitting: None,
        acks: AckQueue::default(),
        ready: Vec::new(),
    };
    let result = consumer.consume(&mut events, &shutdown).await;
    if result.is_ok() {
        consumer.drain(&mut events, settings.drain_timeout).await;
    }

    // Stop: from here the connection task must not block handing us events (it has to
    // keep polling to write the last acks and the DISCONNECT).
    events.close();
    let disconnecting = consumer
        .client
        .take()
        .is_some_and(|c| c.try_disconnect().is_ok());
    if disconnecting {
        // The task ends by itself once rumqttc has written the DISCONNECT.
        if tokio::time::timeout(DISCONNECT_TIMEOUT, &mut connection)
            .await
            .is_err()
        {
            warn!("The MQTT DISCONNECT did not go out in time; closing the connection.");
        }
    }
    stop.cancel();
    if !connection.is_finished() {
        let _ = connection.await;
    }
    consumer.metrics.connected.set(0.0);
    consumer.metrics.inflight.set(0.0);
    status.send_replace(MqttStatus::Stopped);
    info!("MQTT source stopped.");
    result
}

/// A submission waiting for room in its shard: kept across loop iterations so losing a
/// `select!` race does not cancel it.
struct Submission {
    qos1: bool,
    future: Pin<Box<dyn Future<Output = Result<(), SubmitError>> + Send>>,
}

/// Awaits the current submission; pending forever when there is none.
async fn submitted(current: &mut Option<Submission>) -> Result<(), SubmitError> {
    match current {
        Some(s) => s.future.as_mut().await,
        None => std::future::pending().await,
    }
}

struct Consumer {
    topics: Vec<TopicTemplate>,
    window: usize,
    backoff: Backoff,
    pipeline: PipelineHandle,
    metrics: Metrics,
    restart: mpsc::Sender<Duration>,
    /// The current connection's client (None while there is none): acks go through it.
    client: Option<AsyncClient>,
    /// We asked the connection task to drop the connection; until its `Lost` arrives,
    /// events still in the channel belong to the dropped connection.
    restarting: bool,
    /// Received, not yet handed to the pipeline, in arrival order.
    inbox: VecDeque<Uplink>,
    submitting: Option<Submission>,
    acks: AckQueue,
    /// Scratch for released acks (no allocation per release).
    ready: Vec<(u16, QoS)>,
}

/// What the connection task tells the consumer, in connection order.
enum ConnEvent {
    /// A new connection is up (and subscribing); acks for it go through `client`.
    Connected {
        client: AsyncClient,
    },
    Publish(Publish),
    /// The connection is gone; everything unacknowledged on it will be re-sent.
    Lost,
}

impl Consumer {
    /// Messages in flight: received and not yet handed over, plus QoS 1 ones not yet
    /// acknowledged (a QoS 1 message still in the inbox counts twice: a conservative bound).
    fn load(&self) -> usize {
        self.inbox.len() + self.acks.len() + usize::from(self.submitting.is_some())
    }

    /// The main loop, until shutdown (Ok) or a fatal error.
    async fn consume(
        &mut self,
        events: &mut mpsc::Receiver<ConnEvent>,
        shutdown: &CancellationToken,
    ) -> Result<(), MqttError> {
        loop {
            self.metrics.inflight.set(self.load() as f64);
            let room = self.load() < self.window;
            tokio::select! {
                // Shutdown. Cancellation-safe: a token; what is in flight stays in `self`
                // for the drain.
                () = shutdown.cancelled() => return Ok(()),
                // Connection events, in connection order; `recv` is cancellation-safe.
                // Disabled while the window is full: the connection task then blocks
                // handing over its next event and stops reading the socket, so TCP pushes
                // back on the broker, which keeps the messages.
                ev = events.recv(), if room => match ev {
                    Some(ev) => self.on_event(ev),
                    None => return Err(MqttError::ConnectionTaskEnded),
                },
                // The head-of-line submission waiting for room in its shard. Its future
                // lives in `self.submitting`, so losing this race does not cancel it.
                res = submitted(&mut self.submitting), if self.submitting.is_some() => {
                    self.submitting = None;
                    if res.is_err() {
                        error!("The pipeline closed; the MQTT source stops (unacknowledged messages stay with the broker).");
                        return Err(MqttError::PipelineClosed);
                    }
                    self.pump();
                }
                // The outcome for the oldest unacknowledged message. Cancellation-safe:
                // awaiting `&mut oneshot::Receiver` leaves a late outcome in the channel.
                outcome = self.acks.next_outcome(), if self.acks.front_waiting() => {
                    let v = verdict(outcome, &self.metrics.shutting_down);
                    self.acks.decide_front(v);
                    self.release();
                }
            }
        }
    }

    fn on_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Connected { client } => {
                self.restarting = false;
                self.forget_connection();
                self.client = Some(client);
            }
            ConnEvent::Lost => {
                self.restarting = false;
                self.client = None;
                self.forget_connection();
            }
            ConnEvent::Publish(p) => self.on_publish(p),
        }
    }

    fn on_publish(&mut self, p: Publish) {
        if self.client.is_none() || self.restarting {
            // From a connection we dropped: the broker re-sends it if it is QoS 1.
            debug!(topic = %p.topic, "MQTT message from a dropped connection ignored.");
            return;
        }
        self.metrics.received.increment(1);
        let qos1 = p.qos != QoS::AtMostOnce;
        let device = match self.topics.iter().find_map(|t| t.device(&p.topic)) {
            Some(d) if crate::registry::validate::check_id(d).is_ok() => d.to_owned(),
            found => {
                // Refused before the pipeline; acknowledged (in order) so a stray topic
                // cannot block the session.
                if found.is_some() {
                    self.metrics.unknown_device.increment(1);
                    debug!(topic = %p.topic, "MQTT topic carries an invalid device id; acknowledged and dropped.");
                } else {
                    self.metrics.unmatched_topic.increment(1);
                    debug!(topic = %p.topic, "MQTT topic matches no template; acknowledged and dropped.");
                }
                if qos1 {
                    self.acks.push_decided(p.pkid, p.qos, Verdict::Ack);
                    self.release();
                }
                return;
            }
        };
        if p.dup {
            debug!(device = %device, "MQTT message re-sent by the broker (DUP).");
        }
        let reply = qos1.then(|| self.acks.push_waiting(p.pkid, p.qos));
        self.inbox.push_back(Uplink {
            device,
            payload: p.payload,
            transport: Transport::Mqtt,
            peer: None,
            received_at_ms: now_ms(),
            token: None,
            reply,
        });
        self.pump();
    }

    /// Starts submitting the next uplink when none is being submitted.
    fn pump(&mut self) {
        if self.submitting.is_some() {
            return;
        }
        if let Some(uplink) = self.inbox.pop_front() {
            let pipeline = self.pipeline.clone();
            self.submitting = Some(Submission {
                qos1: uplink.reply.is_some(),
                future: Box::pin(async move { pipeline.submit_wait(uplink).await }),
            });
        }
    }

    /// Sends the acks that may go out now; a withheld head restarts the session.
    fn release(&mut self) {
        let metrics = &self.metrics;
        let withheld = self
            .acks
            .release(&mut self.ready, |o| verdict(o, &metrics.shutting_down));
        let mut failed = None;
        if let Some(client) = &self.client {
            for (pkid, qos) in self.ready.drain(..) {
                // Expected to fail only if the connection task has already dropped this
                // connection, whose `Lost` is on its way. KNOWN BUG (BENCHMARKS.md, MQTT):
                // at saturation it also fails while the connection is up (rumqttc's
                // request channel refuses the ack), and the restart below makes the broker
                // re-send what was committed but not acknowledged; the error is logged.
                if let Err(e) = client.try_ack(&ack_packet(pkid, qos)) {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.ready.clear();
        if let Some(error) = failed {
            debug!(error = ?error, "Could not queue an MQTT ack; resuming the session.");
            self.restart(Duration::ZERO);
        } else if let Some(Verdict::Withhold { retry_after }) = withheld {
            let delay = self.backoff.clamp(retry_after.unwrap_or(self.backoff.max));
            warn!(
                retry_after = ?delay,
                "The pipeline could not take an MQTT message; pausing the session (the broker re-sends it after reconnecting)."
            );
            self.restart(delay);
        }
    }

    /// Asks the connection task to drop the connection and reconnect after `delay`.
    fn restart(&mut self, delay: Duration) {
        if self.restarting || self.client.is_none() {
            return;
        }
        // Capacity 1: if a restart is already queued, that one will do.
        let _ = self.restart.try_send(delay);
        self.restarting = true;
        self.client = None;
        self.forget_connection();
    }

    /// Drops everything tied to the connection that ended: its QoS 1 messages will be
    /// re-sent by the broker, so acking or submitting them now would only duplicate.
    fn forget_connection(&mut self) {
        self.acks.clear();
        self.inbox.retain(|u| u.reply.is_none());
        if self.submitting.as_ref().is_some_and(|s| s.qos1) {
            // Cancel-safe: the uplink is dropped unqueued (PipelineHandle::submit_wait).
            self.submitting = None;
            self.pump();
        }
    }

    /// After shutdown: stop taking messages, and acknowledge what the pipeline still
    /// decides within `timeout`.
    async fn drain(&mut self, events: &mut mpsc::Receiver<ConnEvent>, timeout: Duration) {
        // Not handed over yet: QoS 1 ones come back next session; QoS 0 ones are lost.
        let qos0_dropped = self.inbox.iter().filter(|u| u.reply.is_none()).count()
            + usize::from(self.submitting.as_ref().is_some_and(|s| !s.qos1));
        self.metrics.shutting_down.increment(qos0_dropped as u64);
        self.inbox.clear();
        // Their reply senders drop: the first of them stops the release at its slot.
        self.submitting = None;

        // QoS 1 messages left unacknowledged here are not rejections: the broker re-sends
        // them next session. So the drain's verdicts count nothing.
        let uncounted = metrics::Counter::noop();
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let withheld = self
                .acks
                .release(&mut self.ready, |o| verdict(o, &uncounted));
            if let Some(client) = &self.client {
                for (pkid, qos) in self.ready.drain(..) {
                    if client.try_ack(&ack_packet(pkid, qos)).is_err() {
                        break;
                    }
                }
            }
            self.ready.clear();
            if withheld.is_some() || !self.acks.front_waiting() || self.client.is_none() {
                break;
            }
            tokio::select! {
                // The drain's end: what is still unacknowledged is re-sent next session.
                () = &mut deadline => break,
                // As in the main loop.
                outcome = self.acks.next_outcome() => {
                    self.acks.decide_front(verdict(outcome, &uncounted));
                }
                // Keep taking events so the connection task never blocks handing one over
                // (it must go on polling to write our acks). New messages are not taken.
                ev = events.recv() => match ev {
                    Some(ConnEvent::Publish(_)) => {}
                    Some(ConnEvent::Lost | ConnEvent::Connected { .. }) | None => {
                        self.client = None;
                        self.acks.clear();
                        break;
                    }
                },
            }
        }
        if self.acks.len() != 0 {
            info!(
                unacknowledged = self.acks.len(),
                "MQTT messages left unacknowledged at shutdown; the broker re-sends them next session."
            );
        }
        self.acks.clear();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The connection task
// ---------------------------------------------------------------------------------------

fn mqtt_options(s: &MqttSettings) -> MqttOptions {
    // rumqttc resolves `format!("{host}:{port}")`: an IPv6 address needs its brackets.
    let host = if s.broker.host.contains(':') {
        format!("[{}]", s.broker.host)
    } else {
        s.broker.host.clone()
    };
    let mut o = MqttOptions::new(s.client_id.clone(), host, s.broker.port);
    o.set_keep_alive(s.keep_alive)
        // Checked non-empty in MqttSettings::check (rumqttc panics on an empty id here).
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(s.max_packet_size, s.max_packet_size)
        .set_inflight(OUTGOING_INFLIGHT)
        .set_request_channel_capacity(REQUEST_CHANNEL);
    if let Some(user) = &s.username {
        o.set_credentials(user.clone(), s.password.clone().unwrap_or_default());
    }
    o
}

/// Hands `ev` to the consumer. False only when stopped meanwhile; a consumer that no
/// longer listens (draining is over) is not an error: the task goes on polling.
async fn forward(
    events: &mpsc::Sender<ConnEvent>,
    stop: &CancellationToken,
    ev: ConnEvent,
) -> bool {
    tokio::select! {
        // Stop wins over a blocked hand-over.
        () = stop.cancelled() => false,
        // `send` is cancellation-safe in the sense needed: if cancelled, `ev` is dropped
        // unsent, which only happens when stopping.
        _ = events.send(ev) => true,
    }
}

/// Owns rumqttc's event loop for the consumer's whole life: one connection at a time.
async fn connection_task(
    settings: MqttSettings,
    events: mpsc::Sender<ConnEvent>,
    mut restart: mpsc::Receiver<Duration>,
    stop: CancellationToken,
    status: watch::Sender<MqttStatus>,
    metrics: Metrics,
) {
    let options = mqtt_options(&settings);
    let filters: Vec<SubscribeFilter> = settings
        .subscriptions()
        .into_iter()
        .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce))
        .collect();
    let mut attempt: u32 = 0;
    let mut ever_connected = false;
    let mut last_warned: Option<Instant> = None;
    loop {
        // A fresh client and event loop per connection: rumqttc carries nothing over
        // that a subscriber needs, and acks queued for the old connection die with its
        // request channel instead of going out on the new one.
        let (client, mut eventloop): (AsyncClient, EventLoop) =
            AsyncClient::new(options.clone(), REQUEST_CHANNEL);
        let mut up_since: Option<Instant> = None;
        let delay = loop {
            let polled = tokio::select! {
                // Stop. Dropping the event loop closes the socket; a request half-written
                // by the cancelled `poll` belonged to this connection, which ends anyway.
                () = stop.cancelled() => {
                    metrics.connected.set(0.0);
                    return;
                }
                // A restart the consumer asked for (pipeline unavailable): drop this
                // connection; the broker re-sends what is unacknowledged when we return.
                // Cancelling `poll` is as harmless as on stop. `recv` is cancellation-safe.
                Some(d) = restart.recv() => break d,
                // rumqttc's event loop: reads the socket, writes queued requests (our
                // acks), pings, and connects when there is no connection.
                ev = eventloop.poll() => ev,
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    up_since = Some(Instant::now());
                    metrics.connected.set(1.0);
                    if ever_connected {
                        metrics.reconnects.increment(1);
                    }
                    ever_connected = true;
                    info!(
                        broker = %settings.broker,
                        client_id = %settings.client_id,
                        session_present = ack.session_present,
                        "Connected to the MQTT broker."
                    );
                    // rumqttc does not re-subscribe: do it after every CONNACK, whether
                    // or not the broker kept the session (harmless if it did; covers a
                    // broker restart that lost it). The channel is fresh, so not full.
                    if let Err(e) = client.try_subscribe_many(filters.clone()) {
                        warn!(error = %e, "Cannot queue the MQTT subscription; reconnecting.");
                        break settings.backoff.delay(attempt, jitter());
                    }
                    status.send_replace(MqttStatus::Connected);
                    let ev = ConnEvent::Connected {
                        client: client.clone(),
                    };
                    if !forward(&events, &stop, ev).await {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, SubscribeReasonCode::Failure))
                        .count();
                    let qos0 = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Success(QoS::AtMostOnce)));
                    if refused > 0 {
                        error!(
                            subscriptions = ?settings.subscriptions(),
                            refused,
                            "The MQTT broker refused a subscription; those topics are not consumed. Check the broker's ACL."
                        );
                    } else {
                        if qos0 {
                            warn!("The MQTT broker granted QoS 0 only: delivery is at most once.");
                        }
                        info!(subscriptions = ?settings.subscriptions(), "Subscribed to MQTT topics.");
                        status.send_replace(MqttStatus::Subscribed);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if !forward(&events, &stop, ConnEvent::Publish(p)).await {
                        return;
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    // The consumer's graceful stop: rumqttc has written the DISCONNECT.
                    metrics.connected.set(0.0);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    if up_since.is_some_and(|t| t.elapsed() >= STABLE_AFTER) {
                        attempt = 0;
                    }
                    let delay = settings.backoff.delay(attempt, jitter());
                    attempt = attempt.saturating_add(1);
                    // A lost connection is always worth a line; failed retries while the
                    // broker stays away, at most one a minute (the rest at DEBUG).
                    let loud = up_since.is_some()
                        || last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                    if loud {
                        last_warned = Some(Instant::now());
                    }
                    let failure = Failure {
                        broker: &settings.broker,
                        was_connected: up_since.is_some(),
                        attempt,
                        delay,
                    };
                    failure.log(&e, loud);
                    break delay;
                }
            }
        };
        metrics.connected.set(0.0);
        status.send_replace(MqttStatus::Connecting);
        drop(eventloop);
        drop(client);
        if !forward(&events, &stop, ConnEvent::Lost).await {
            return;
        }
        let mut wake = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                // Stop while waiting.
                () = stop.cancelled() => return,
                // The backoff (or pause) is over: poll a fresh event loop, which connects.
                () = tokio::time::sleep_until(wake) => break,
                // A pause asked for while already waiting extends the wait; it is not
                // kept for the next connection.
                Some(d) = restart.recv() => wake = wake.max(tokio::time::Instant::now() + d),
            }
        }
    }
}

/// A failed connection or connection attempt, logged once where it is handled.
struct Failure<'a> {
    broker: &'a BrokerAddr,
    was_connected: bool,
    /// 1 for the first failure in a row.
    attempt: u32,
    delay: Duration,
}

impl Failure<'_> {
    /// A refusal (credentials, client id) needs an operator: ERROR whenever `loud`. A lost
    /// connection is a WARN; repeated failed attempts are a WARN when `loud`, else DEBUG.
    fn log(&self, e: &ConnectionError, loud: bool) {
        let (broker, attempt, retry_in) = (self.broker, self.attempt, self.delay);
        match e {
            ConnectionError::ConnectionRefused(code) if loud => error!(
                broker = %broker,
                code = ?code,
                attempt,
                retry_in = ?retry_in,
                "The MQTT broker refused the connection; check [mqtt] client_id, username and password."
            ),
            _ if self.was_connected => warn!(
                broker = %broker,
                error = %e,
                retry_in = ?retry_in,
                "Lost the MQTT broker connection; reconnecting."
            ),
            _ if loud => warn!(
                broker = %broker,
                error = %e,
                attempt,
                retry_in = ?retry_in,
                "Cannot connect to the MQTT broker; retrying (repeats are logged at most once a minute)."
            ),
            _ => debug!(
                broker = %broker,
                error = %e,
                attempt,
                retry_in = ?retry_in,
                "Cannot connect to the MQTT broker; retrying."
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MqttConfig, MqttMode};
    use std::net::SocketAddr;

    #[test]
    fn options_make_a_persistent_session_with_manual_acks() {
        let c = MqttConfig {
            mode: MqttMode::External,
            url: "mqtt://[::1]:1884".into(),
            client_id: "gw-7".into(),
            username: Some("gw".into()),
            password: Some("s3cret".into()),
            ..MqttConfig::default()
        };
        let s = MqttSettings::from_config(&c).unwrap();
        let o = mqtt_options(&s);
        assert!(!o.clean_session() && o.manual_acks());
        assert_eq!(o.client_id(), "gw-7");
        assert_eq!(o.broker_address(), ("[::1]".to_owned(), 1884));
        assert_eq!(o.keep_alive(), s.keep_alive);
        assert_eq!(o.max_packet_size(), s.max_packet_size);
        assert_eq!(o.inflight(), OUTGOING_INFLIGHT);
        assert_eq!(o.request_channel_capacity(), REQUEST_CHANNEL);
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("gw", "s3cret")
        );
    }

    #[tokio::test]
    async fn shutdown_while_the_broker_is_unreachable_returns_promptly() {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = MqttSettings::from_config(&MqttConfig::default())
            .unwrap()
            .with_broker(SocketAddr::from(([127, 0, 0, 1], port)));
        s.backoff = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        let (tx, _rx) = mpsc::channel(4);
        let pipeline = PipelineHandle::from_shards(vec![tx], Duration::from_secs(1));
        let shutdown = CancellationToken::new();
        let (status, mut seen) = watch::channel(MqttStatus::Connecting);
        let task = tokio::spawn(run_with_status(s, pipeline, shutdown.clone(), status));
        // Let it fail a few connection attempts, then stop it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*seen.borrow_and_update(), MqttStatus::Connecting);
        shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("run returns promptly")
            .unwrap();
        assert!(result.is_ok());
        assert_eq!(*seen.borrow(), MqttStatus::Stopped);
    }

    #[tokio::test]
    async fn settings_set_by_hand_are_checked() {
        let mut s = MqttSettings::from_config(&MqttConfig::default()).unwrap();
        s.client_id.clear();
        let (tx, _rx) = mpsc::channel(1);
        let pipeline = PipelineHandle::from_shards(vec![tx], Duration::from_secs(1));
        let e = run(s, pipeline, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(e, MqttError::InvalidSettings(_)), "{e}");
    }
}
