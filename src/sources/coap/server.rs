//! The UDP server: one receive loop that owns all protocol state (duplicate caches, block
//! reassembly) and never waits on a commit, and a bounded set of tasks, one per
//! confirmable uplink in flight, each awaiting its [`Outcome`] and sending the ACK through
//! the shared socket.
//!
//! ```text
//!            ┌──────────────── receive loop (owns Exchanges, Reassembly) ───────────────┐
//! datagram ─▶│ classify → (peer,MID) seen? → route → blocks → payload seen? → permit → submit
//!            └───────▲──────────────────────────────────────────────────────────────┬──┘
//!                    │ Completion (reply, stored?) — caches it, answers waiters       │ spawn
//!                    └───────────── task: await Outcome → encode → send ACK ◀────────┘
//! ```
//!
//! Admission: a semaphore of `max_in_flight` permits; a CON uplink that finds none gets
//! 5.03 + Max-Age at once, as does one the pipeline refuses (`SubmitError::Overloaded`).
//! Completions travel on an unbounded channel that is bounded in practice: each task sends
//! exactly one, and there are at most `max_in_flight` tasks.
//!
//! Shutdown: when `shutdown` is cancelled the loop stops receiving; tasks still awaiting an
//! outcome get up to `drain_timeout` to send their reply (the pipeline commits what it was
//! given), then are abandoned (their devices retry, and the retry is processed again).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use coap_lite::ResponseType;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::block1::{Reassembly, Step, UploadKey};
use super::dedup::{ContentKey, ContentState, Exchanges, MidEntry, MidState, Repeat, Waiter};
use super::events::{CoapMetrics, Dropped, Refused};
use super::request::{classify, truncated_head, Inbound, Refusal, Request, Target, UplinkRequest};
use super::response::{self, Decided, Reply, ReplyTo};
use super::socket;
use super::CoapSettings;
use crate::pipeline::{Outcome, PipelineHandle, SubmitError, Transport, Uplink};

/// Runs the CoAP source on `socket` until `shutdown` is cancelled, then lets in-flight
/// requests finish their replies (at most `settings.drain_timeout`) and returns. Counts
/// with the global metrics recorder. Errors: only a receive error that is not transient.
pub async fn serve(
    socket: UdpSocket,
    settings: CoapSettings,
    pipeline: PipelineHandle,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with_metrics(socket, settings, pipeline, shutdown, CoapMetrics::new()).await
}

/// [`serve`], counting with the given handles (tests read their own recorder).
pub async fn serve_with_metrics(
    socket: UdpSocket,
    settings: CoapSettings,
    pipeline: PipelineHandle,
    shutdown: CancellationToken,
    metrics: CoapMetrics,
) -> io::Result<()> {
    let local = socket.local_addr()?;
    let buffers = socket::set_buffers(&socket, settings.socket_buffer);
    socket::spawn_drop_counter(&socket, shutdown.child_token());
    info!(
        receive_buffer = buffers.receive,
        listen = %local,
        max_payload = settings.max_payload,
        path = %settings.path,
        "CoAP source listening."
    );
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let mut server = Server {
        socket: Arc::new(socket),
        exchanges: Exchanges::new(settings.dedup),
        reassembly: Reassembly::new(settings.reassembly, settings.max_payload),
        permits: Arc::new(Semaphore::new(settings.max_in_flight)),
        tasks: TaskTracker::new(),
        abort: CancellationToken::new(),
        done_tx,
        done_rx,
        discovery: Bytes::from(format!(
            "<{}>;rt=\"nbiot.uplink\";ct=42",
            settings.path.link_prefix()
        )),
        settings,
        pipeline,
        metrics,
    };
    let result = server.receive(&shutdown).await;
    server.drain().await;
    info!(listen = %local, "CoAP source stopped.");
    result
}

/// A CON uplink awaiting its outcome: where the answer goes and what to cache it under.
#[derive(Debug)]
struct Pending {
    peer: SocketAddr,
    to: ReplyTo,
    content: ContentKey,
    device_group: u64,
    device: String,
}

/// Sent by a task once its request is answered.
#[derive(Debug)]
struct Completion {
    pending: Pending,
    decided: Decided,
    sent: Bytes,
}

struct Server {
    socket: Arc<UdpSocket>,
    settings: CoapSettings,
    pipeline: PipelineHandle,
    metrics: CoapMetrics,
    exchanges: Exchanges,
    reassembly: Reassembly,
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    /// Cancelled when the drain deadline passes: tasks stop waiting.
    abort: CancellationToken,
    done_tx: mpsc::UnboundedSender<Completion>,
    done_rx: mpsc::UnboundedReceiver<Completion>,
    /// The `/.well-known/core` document.
    discovery: Bytes,
}

impl Server {
    async fn receive(&mut self, shutdown: &CancellationToken) -> io::Result<()> {
        let mut buf = vec![0u8; self.settings.recv_buffer_len()];
        loop {
            tokio::select! {
                // Cancellation-safe: nothing is half-done between iterations.
                _ = shutdown.cancelled() => return Ok(()),
                // `recv_from` is cancellation-safe: a datagram is either returned or left
                // in the socket for the next iteration.
                got = self.socket.recv_from(&mut buf) => match got {
                    Ok((n, peer)) => {
                        let maybe_truncated = n == buf.len();
                        self.on_datagram(&buf[..n], maybe_truncated, peer).await;
                    }
                    Err(e) if is_transient(&e) => {
                        debug!(error = %e, "CoAP receive failed; continuing.");
                    }
                    Err(e) => return Err(e),
                },
                // `recv` is cancellation-safe. Never `None`: we hold a sender ourselves.
                Some(done) = self.done_rx.recv() => self.on_completion(done).await,
            }
        }
    }

    async fn drain(&mut self) {
        self.tasks.close();
        let deadline = Instant::now() + self.settings.drain_timeout;
        loop {
            tokio::select! {
                // Every task has answered (or given up).
                _ = self.tasks.wait() => break,
                // Answers waiting retransmissions and fills the caches, as while running.
                Some(done) = self.done_rx.recv() => self.on_completion(done).await,
                _ = tokio::time::sleep_until(deadline) => {
                    let left = self.tasks.len();
                    warn!(
                        requests = left,
                        "CoAP shutdown: abandoning requests still awaiting their outcome."
                    );
                    self.abort.cancel();
                    self.tasks.wait().await;
                    break;
                }
            }
        }
        while let Ok(done) = self.done_rx.try_recv() {
            self.on_completion(done).await;
        }
    }

    async fn on_datagram(&mut self, datagram: &[u8], maybe_truncated: bool, peer: SocketAddr) {
        let now = Instant::now();
        self.exchanges.expire(now);
        if maybe_truncated {
            // The OS may have cut it short: only the fixed header can be trusted.
            match truncated_head(datagram) {
                Some((mid, token)) => {
                    let request = Request {
                        mid,
                        token,
                        confirmable: true,
                        len: datagram.len(),
                        target: Target::Refuse(Refusal::too_large(self.settings.max_payload)),
                    };
                    self.on_request(request, peer, now).await;
                }
                None => self.drop_datagram(Dropped::Truncated, peer),
            }
            return;
        }
        match classify(datagram, &self.settings.path, self.settings.max_payload) {
            Inbound::Drop(why) => self.drop_datagram(why, peer),
            Inbound::Ping { mid } => self.send(&response::reset(mid), peer).await,
            Inbound::Request(request) => self.on_request(request, peer, now).await,
        }
    }

    fn drop_datagram(&self, why: Dropped, peer: SocketAddr) {
        self.metrics.dropped(why);
        debug!(peer = %peer, reason = why.label(), "Dropped a datagram that is not a request for us.");
    }

    async fn on_request(&mut self, request: Request, peer: SocketAddr, now: Instant) {
        let to = ReplyTo {
            mid: request.mid,
            token: request.token,
            request_len: request.len,
            block1: None,
        };
        // RFC 7252 §4.5: a message ID seen within EXCHANGE_LIFETIME is not processed again.
        if self.exchanges.mid_in_flight(peer, request.mid) {
            // The ACK to come answers this copy too (same MID and token).
            self.metrics.duplicate();
            debug!(peer = %peer, mid = request.mid, "Retransmitted CoAP message; original in flight.");
            return;
        }
        if let Some(seen) = self.exchanges.mids.get_mut(&(peer, request.mid), now) {
            let seen = seen.clone();
            if seen.uplink {
                self.metrics.duplicate();
            }
            debug!(peer = %peer, mid = request.mid, "Retransmitted CoAP message.");
            match seen.state {
                MidState::Answered(bytes) if request.confirmable => self.send(&bytes, peer).await,
                MidState::Answered(_) | MidState::Silent => {}
            }
            return;
        }
        match request.target {
            Target::Discovery { block2 } => {
                if request.confirmable {
                    let bytes = response::discovery(&self.discovery, block2, &to);
                    self.answer(peer, to, bytes, false, now).await;
                }
            }
            Target::Refuse(refusal) => {
                self.metrics.received();
                self.refuse(peer, to, request.confirmable, refusal, now)
                    .await;
            }
            Target::Uplink(uplink) => {
                self.on_uplink(peer, to, request.confirmable, uplink, now)
                    .await;
            }
        }
    }

    /// Counts a refusal and answers it (CON) or remembers the MID (NON).
    async fn refuse(
        &mut self,
        peer: SocketAddr,
        to: ReplyTo,
        confirmable: bool,
        refusal: Refusal,
        now: Instant,
    ) {
        self.metrics.rejected(refusal.why);
        debug!(peer = %peer, reason = refusal.why.label(), code = %coap_code(refusal.code), "Refused a CoAP request.");
        let reply = Reply {
            size1: refusal.size1,
            ..Reply::code(refusal.code)
        };
        self.reply(peer, to, confirmable, &reply, now).await;
    }

    /// 5.03 + Max-Age, counted.
    async fn busy(
        &mut self,
        peer: SocketAddr,
        to: ReplyTo,
        confirmable: bool,
        why: Refused,
        retry_after: std::time::Duration,
        now: Instant,
    ) {
        self.metrics.rejected(why);
        debug!(peer = %peer, reason = why.label(), "Refused a CoAP uplink: busy.");
        // Not remembered under (peer, MID): nothing was processed, so a retransmission may
        // be processed (RFC 7252 §4.5 asks only that a request be processed once). Under a
        // surge this keeps shedding cheap — no cache insert and eviction per refused
        // datagram, no cache memory — and a retry that finds room is taken in at once
        // rather than answered 5.03 again from the cache for EXCHANGE_LIFETIME.
        let _ = now;
        if confirmable {
            let encoded = response::encode(&Reply::unavailable(retry_after), &to);
            self.send(&encoded.bytes, peer).await;
        }
    }

    async fn reply(
        &mut self,
        peer: SocketAddr,
        to: ReplyTo,
        confirmable: bool,
        reply: &Reply,
        now: Instant,
    ) {
        if confirmable {
            let encoded = response::encode(reply, &to);
            self.answer(peer, to, encoded.bytes, true, now).await;
        } else {
            self.remember(peer, to.mid, MidState::Silent, true, now);
        }
    }

    /// Sends a response and remembers it for retransmissions.
    async fn answer(
        &mut self,
        peer: SocketAddr,
        to: ReplyTo,
        bytes: Vec<u8>,
        uplink: bool,
        now: Instant,
    ) {
        self.send(&bytes, peer).await;
        self.remember(
            peer,
            to.mid,
            MidState::Answered(Bytes::from(bytes)),
            uplink,
            now,
        );
    }

    fn remember(
        &mut self,
        peer: SocketAddr,
        mid: u16,
        state: MidState,
        uplink: bool,
        now: Instant,
    ) {
        self.exchanges
            .mids
            .insert((peer, mid), peer, MidEntry { state, uplink }, now);
    }

    async fn on_uplink(
        &mut self,
        peer: SocketAddr,
        mut to: ReplyTo,
        confirmable: bool,
        uplink: UplinkRequest,
        now: Instant,
    ) {
        let UplinkRequest {
            device,
            token,
            payload,
            block1,
            size1,
            request_tag,
        } = uplink;
        let payload = match block1 {
            None => payload,
            Some(block) => {
                to.block1 = Some(block);
                if !confirmable && (block.more || block.num > 0) {
                    // Block-wise transfer needs 2.31 answers, which a NON never gets.
                    self.metrics.received();
                    let refusal = Refusal::new(ResponseType::BadRequest, Refused::BadRequest);
                    self.refuse(peer, to, confirmable, refusal, now).await;
                    return;
                }
                let key = UploadKey {
                    peer,
                    device: device.clone(),
                    request_tag,
                };
                match self.reassembly.offer(key, block, size1, &payload, now) {
                    Step::Continue => {
                        let reply = Reply::code(ResponseType::Continue);
                        let encoded = response::encode(&reply, &to);
                        self.answer(peer, to, encoded.bytes, true, now).await;
                        return;
                    }
                    Step::Refuse(refusal) => {
                        self.metrics.received();
                        self.refuse(peer, to, confirmable, refusal, now).await;
                        return;
                    }
                    Step::Busy => {
                        self.metrics.received();
                        let after = self.settings.busy_retry_after;
                        self.busy(peer, to, confirmable, Refused::Overloaded, after, now)
                            .await;
                        return;
                    }
                    Step::Complete(whole) => whole,
                }
            }
        };

        // A retry from a new address (NAT rebinding) of a payload already taken in.
        let (content, device_group) =
            self.exchanges
                .content_key(&device, token.as_deref(), &payload);
        match self.exchanges.payload_seen(&content, now) {
            Repeat::New => {}
            // A CON repeating a NON payload: the NON's fate is unknown, so process it.
            Repeat::Unconfirmed if confirmable => {}
            Repeat::Answered(reply) => {
                self.metrics.duplicate();
                debug!(device = %device, peer = %peer, "Retransmitted CoAP uplink from a new address; answered from cache.");
                self.reply(peer, to, confirmable, &reply, now).await;
                return;
            }
            Repeat::InFlight if confirmable => {
                self.metrics.duplicate();
                // If too many already wait, silence: it retries and finds the answer cached.
                let waiting = self.exchanges.wait(&content, Waiter { peer, to });
                debug!(device = %device, peer = %peer, waiting, "Retransmitted CoAP uplink from a new address; original in flight.");
                return;
            }
            Repeat::InFlight | Repeat::Unconfirmed => {
                self.metrics.duplicate();
                debug!(device = %device, peer = %peer, "Repeated NON uplink dropped.");
                self.remember(peer, to.mid, MidState::Silent, true, now);
                return;
            }
        }

        self.metrics.received();
        let permit = if confirmable {
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let after = self.settings.busy_retry_after;
                    self.busy(peer, to, confirmable, Refused::Overloaded, after, now)
                        .await;
                    return;
                }
            }
        } else {
            None
        };
        let (reply_tx, reply_rx) = match permit {
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let submitted = self.pipeline.submit(Uplink {
            device: device.clone(),
            payload: Bytes::from(payload),
            transport: Transport::Coap,
            peer: Some(peer),
            received_at_ms: unix_ms(),
            token,
            reply: reply_tx,
        });
        match submitted {
            Err(SubmitError::Overloaded { retry_after }) => {
                self.busy(peer, to, confirmable, Refused::Overloaded, retry_after, now)
                    .await;
            }
            Err(SubmitError::Closed) => {
                let after = self.settings.busy_retry_after;
                self.busy(peer, to, confirmable, Refused::ShuttingDown, after, now)
                    .await;
            }
            Ok(()) => {
                debug!(device = %device, peer = %peer, confirmable, "CoAP uplink submitted.");
                match (permit, reply_rx) {
                    (Some(permit), Some(rx)) => {
                        self.exchanges.start(peer, to.mid, content);
                        let pending = Pending {
                            peer,
                            to,
                            content,
                            device_group,
                            device,
                        };
                        self.spawn_reply(permit, rx, pending);
                    }
                    _ => {
                        self.remember(peer, to.mid, MidState::Silent, true, now);
                        self.exchanges.contents.insert(
                            content,
                            device_group,
                            ContentState::Unconfirmed,
                            now,
                        );
                    }
                }
            }
        }
    }

    /// The task that awaits one uplink's outcome and sends its ACK.
    fn spawn_reply(
        &self,
        permit: OwnedSemaphorePermit,
        outcome: oneshot::Receiver<Outcome>,
        pending: Pending,
    ) {
        let socket = Arc::clone(&self.socket);
        let done = self.done_tx.clone();
        let abort = self.abort.clone();
        let metrics = self.metrics.clone();
        let busy = self.settings.busy_retry_after;
        let no_profile = self.settings.no_profile_retry_after;
        self.tasks.spawn(async move {
            let _permit = permit;
            let outcome = tokio::select! {
                // Shutdown's drain deadline passed: no reply (the device retries).
                _ = abort.cancelled() => return,
                // `Err`: the pipeline dropped the uplink without an outcome.
                got = outcome => got.ok(),
            };
            let Pending { peer, to, device, .. } = &pending;
            // The pipeline counts the refusals it decides (shard, writer) with their
            // protocol; only an uplink it dropped without an outcome is ours to count.
            let dropped = outcome.is_none();
            let decided = response::for_outcome(outcome, busy, no_profile);
            if let (Some(why), true) = (decided.refused, dropped) {
                metrics.rejected(why);
            }
            let encoded = response::encode(&decided.reply, to);
            if encoded.withheld_downlink {
                warn!(
                    device = %device,
                    request_bytes = to.request_len,
                    "Downlink withheld: it would make the ACK larger than the uplink (RFC 7252 §11.3)."
                );
            }
            if let Err(e) = socket.send_to(&encoded.bytes, *peer).await {
                debug!(device = %device, peer = %peer, error = %e, "Could not send a CoAP response.");
            }
            debug!(device = %device, peer = %peer, code = %coap_code(decided.reply.code), "CoAP uplink answered.");
            // The loop may be gone (shutdown finished): nothing left to update then.
            let _ = done.send(Completion {
                pending,
                decided,
                sent: Bytes::from(encoded.bytes),
            });
        });
    }

    /// Caches an answered uplink's response and answers the retries waiting on it.
    async fn on_completion(&mut self, done: Completion) {
        let now = Instant::now();
        let Completion {
            pending,
            decided,
            sent,
        } = done;
        let waiters = self
            .exchanges
            .finish(pending.peer, pending.to.mid, &pending.content);
        let answered = MidState::Answered(sent);
        self.remember(pending.peer, pending.to.mid, answered, true, now);
        if decided.stored {
            let state = ContentState::Done(decided.reply.clone());
            self.exchanges
                .contents
                .insert(pending.content, pending.device_group, state, now);
        } else {
            // Not stored: a retry must be processed again.
            self.exchanges.contents.remove(&pending.content);
        }
        for waiter in waiters {
            let encoded = response::encode(&decided.reply, &waiter.to);
            self.send(&encoded.bytes, waiter.peer).await;
            let answered = MidState::Answered(Bytes::from(encoded.bytes));
            self.remember(waiter.peer, waiter.to.mid, answered, true, now);
        }
    }

    async fn send(&self, bytes: &[u8], peer: SocketAddr) {
        if let Err(e) = self.socket.send_to(bytes, peer).await {
            debug!(peer = %peer, error = %e, "Could not send a CoAP response.");
        }
    }
}

/// Errors a UDP receive can report for one bad exchange (e.g. an ICMP unreachable for an
/// earlier send) without the socket being unusable.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `4.04` for logs.
fn coap_code(code: ResponseType) -> coap_lite::MessageClass {
    coap_lite::MessageClass::Response(code)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use coap_lite::{MessageType, Packet, RequestType};

    use super::*;
    use crate::config::CoapConfig;
    use crate::sources::coap::request::tests::datagram;
    use crate::sources::coap::{DedupLimits, EXCHANGE_LIFETIME};

    /// A server on 127.0.0.1:0 whose pipeline commits everything at once; returns its
    /// address and the uplinks that reached the pipeline.
    async fn start(
        settings: CoapSettings,
    ) -> (
        SocketAddr,
        mpsc::UnboundedReceiver<(String, Vec<u8>)>,
        CancellationToken,
    ) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<Uplink>(16);
        let (seen_tx, seen_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(u) = rx.recv().await {
                let _ = seen_tx.send((u.device.clone(), u.payload.to_vec()));
                if let Some(reply) = u.reply {
                    let _ = reply.send(Outcome::Committed {
                        readings: 1,
                        downlink: None,
                    });
                }
            }
        });
        let pipeline = PipelineHandle::from_shards(vec![tx], Duration::from_secs(3));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(socket, settings, pipeline, shutdown.clone()));
        (addr, seen_rx, shutdown)
    }

    /// Sends `request` and returns the response (the deadline is virtual time: with the
    /// clock paused it only passes when nothing at all can make progress).
    async fn exchange(sock: &UdpSocket, to: SocketAddr, request: &[u8]) -> Packet {
        sock.send_to(request, to).await.unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
            .await
            .expect("no response")
            .unwrap();
        assert!(n <= request.len(), "response larger than its request");
        Packet::from_bytes(&buf[..n]).unwrap()
    }

    fn post(mid: u16, payload: &[u8]) -> Vec<u8> {
        datagram(
            MessageType::Confirmable,
            RequestType::Post,
            mid,
            &[1, 2],
            "up/dev-1",
            &[],
            payload,
        )
    }

    fn settings() -> CoapSettings {
        CoapSettings::from_config(&CoapConfig::default()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_id_is_remembered_for_exchange_lifetime() {
        let (addr, mut seen, _stop) = start(settings()).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let request = post(7, b"reading-1");
        let first = exchange(&client, addr, &request).await;
        assert_eq!(
            first.header.code,
            coap_lite::MessageClass::Response(ResponseType::Changed)
        );
        assert_eq!(
            seen.recv().await.unwrap(),
            ("dev-1".into(), b"reading-1".to_vec())
        );

        tokio::time::advance(EXCHANGE_LIFETIME - Duration::from_secs(1)).await;
        assert_eq!(exchange(&client, addr, &request).await, first);
        assert!(
            seen.try_recv().is_err(),
            "a retransmission reached the pipeline"
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        // 247 s on, the message ID and the payload are forgotten: processed again.
        assert_eq!(exchange(&client, addr, &request).await, first);
        assert_eq!(seen.recv().await.unwrap().1, b"reading-1".to_vec());
    }

    #[tokio::test(start_paused = true)]
    async fn a_retransmission_of_a_shed_request_is_processed_once_there_is_room() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        // A pipeline that holds one uplink and is not read yet: the second is refused.
        let (tx, mut rx) = mpsc::channel::<Uplink>(1);
        let pipeline = PipelineHandle::from_shards(vec![tx], Duration::from_secs(3));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(socket, settings(), pipeline, shutdown.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&post(1, b"first"), addr).await.unwrap();
        let second = post(2, b"second");
        let p = exchange(&client, addr, &second).await;
        assert_eq!(
            p.header.code,
            coap_lite::MessageClass::Response(ResponseType::ServiceUnavailable)
        );
        assert_eq!(
            rx.recv().await.unwrap().payload,
            Bytes::from_static(b"first")
        );
        // Room again: the retransmission (same MID) is taken in, not answered 5.03 from a
        // cache.
        client.send_to(&second, addr).await.unwrap();
        assert_eq!(
            rx.recv().await.unwrap().payload,
            Bytes::from_static(b"second")
        );
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn the_caches_keep_a_bounded_number_per_peer() {
        let mut s = settings();
        s.dedup = DedupLimits {
            per_peer: 2,
            per_device: 2,
            ..DedupLimits::default()
        };
        let (addr, mut seen, _stop) = start(s).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for (mid, payload) in [(1, b"a"), (2, b"b"), (3, b"c")] {
            exchange(&client, addr, &post(mid, payload)).await;
            assert_eq!(seen.recv().await.unwrap().1, payload.to_vec());
        }
        // MIDs 2 and 3 are remembered: repeats are answered from the cache.
        exchange(&client, addr, &post(3, b"c")).await;
        exchange(&client, addr, &post(2, b"b")).await;
        assert!(seen.try_recv().is_err());
        // MID 1 and payload "a" were pushed out by newer ones: processed again.
        exchange(&client, addr, &post(1, b"a")).await;
        assert_eq!(seen.recv().await.unwrap().1, b"a".to_vec());
    }
}
