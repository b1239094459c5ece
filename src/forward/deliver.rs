//! Delivering one batch: send, classify the answer, and act on it until every line of the
//! batch is either stored by the TSDB or in the dead-letter list.
//!
//! ```text
//! send(lines) ─▶ 204 ───────────────────────────────▶ delivered
//!      │ no answer / 408 / 5xx / 429 / 503 ─────────▶ wait (backoff, Retry-After) ─▶ send(same lines)
//!      │ 401 / 403 / 404 / unexpected ──────────────▶ unhealthy, ERROR, wait long ─▶ send(same lines)
//!      │ 413 ── one line? dead letter : ───────────▶ send(first half), send(second half)
//!      │ 400 / 422 ── lines named? dead-letter them, send(the rest)
//!      │             one line? dead letter : ─────▶ send(first half), send(second half)
//! ```
//!
//! Splitting always shrinks what is sent, so a batch is settled after finitely many
//! answers that are not retries. Sending lines again that the server may already have kept
//! (a timeout after it stored them, a partial write) is safe: a point is identified by its
//! series and timestamp, and writing it again overwrites it with itself.
//!
//! Retries never give up: a TSDB that is down or refuses us keeps the points in the store
//! (the backlog is bounded only by disk). What bounds the work is shutdown ([`Stop`]): a
//! wait or a request in flight ends when the gateway stops, the batch stays unsettled, and
//! the next start sends it again from the persisted cursor.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::batch::{Batch, DeadLetter};
use super::influxdb::{classify, classify_error, Transport, Verdict};
use super::retry::{Backoff, Rng};
use super::{Metrics, Shared};
use crate::health::{Check, Health};

/// The `/readyz` component name.
pub const HEALTH_CHECK: &str = "forwarder";

/// How the forwarder retries and when it calls for an operator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub backoff: Backoff,
    /// The wait after a refusal (401/403/404/unexpected) is uniform in `[refused/2, refused]`:
    /// nothing changes until an operator acts, so there is no point asking often.
    pub refused_retry: Duration,
    /// Retryable failures for this long make the forwarder unhealthy (`/readyz`, metric).
    pub unhealthy_after: Duration,
    /// While failing, a WARN (retryable) at most this often.
    pub warn_every: Duration,
    /// While refused, an ERROR at most this often.
    pub error_every: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            backoff: Backoff::default(),
            refused_retry: Duration::from_secs(60),
            unhealthy_after: Duration::from_secs(30),
            warn_every: Duration::from_secs(60),
            error_every: Duration::from_secs(300),
        }
    }
}

/// The forwarder is stopping and this work was abandoned (it is redone after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// Running, or draining until a deadline (the final flush at shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Running,
    Draining(Instant),
}

/// What bounds the forwarder's waits: while running a request may take its timeout and a
/// retry its backoff; once draining there are no retry waits, and nothing runs past the
/// deadline. A dropped sender means abort.
#[derive(Debug, Clone)]
pub struct Stop {
    rx: watch::Receiver<Mode>,
}

impl Stop {
    pub fn new(rx: watch::Receiver<Mode>) -> Stop {
        Stop { rx }
    }

    fn mode(&mut self) -> Mode {
        *self.rx.borrow_and_update()
    }

    /// Sleeps `d`, unless the forwarder starts stopping (or already is).
    pub async fn sleep(&mut self, d: Duration) -> Result<(), Stopped> {
        if self.mode() != Mode::Running {
            return Err(Stopped);
        }
        tokio::select! {
            () = tokio::time::sleep(d) => Ok(()),
            // Any change is from Running to Draining (or the sender went away): stop waiting.
            _ = self.rx.changed() => Err(Stopped),
        }
    }

    /// Runs `f` to completion while running; once draining, at most until the deadline.
    pub async fn bounded<F: Future>(&mut self, f: F) -> Result<F::Output, Stopped> {
        tokio::pin!(f);
        loop {
            match self.mode() {
                Mode::Draining(deadline) => {
                    return tokio::time::timeout_at(deadline, &mut f)
                        .await
                        .map_err(|_| Stopped)
                }
                Mode::Running => tokio::select! {
                    out = &mut f => return Ok(out),
                    changed = self.rx.changed() => if changed.is_err() { return Err(Stopped) },
                },
            }
        }
    }
}

/// An answer that settles lines (retries and refusals are handled before it).
enum Settling {
    Delivered,
    TooLarge(String),
    Rejected {
        status: u16,
        message: String,
        lines: Vec<(usize, String)>,
    },
}

/// Tracks the TSDB's condition for logs, `/readyz` and the healthy gauge: changes are
/// reported when they happen, failures at most every `warn_every` / `error_every`.
struct Condition {
    health: Health,
    url: String,
    failing_since: Option<Instant>,
    last_log: Option<Instant>,
    refused: bool,
    unhealthy: bool,
    failures: u64,
}

impl Condition {
    fn answered(&mut self, shared: &Shared, metrics: &Metrics) {
        if let Some(since) = self.failing_since.take() {
            info!(
                url = %self.url,
                failures = self.failures,
                failing_for_s = since.elapsed().as_secs(),
                "TSDB takes writes again; forwarding the backlog."
            );
        }
        self.failures = 0;
        self.last_log = None;
        self.refused = false;
        if self.unhealthy {
            self.unhealthy = false;
            shared.healthy.store(true, Ordering::Relaxed);
            metrics.healthy.set(1.0);
            self.health
                .set(HEALTH_CHECK, Check::ok(false, json!({ "url": self.url })));
        }
    }

    fn unhealthy(&mut self, shared: &Shared, metrics: &Metrics, detail: serde_json::Value) {
        if !self.unhealthy {
            self.unhealthy = true;
            shared.healthy.store(false, Ordering::Relaxed);
            metrics.healthy.set(0.0);
        }
        self.health.set(HEALTH_CHECK, Check::failing(false, detail));
    }

    fn retry(&mut self, policy: &RetryPolicy, shared: &Shared, metrics: &Metrics, detail: &str) {
        let now = Instant::now();
        self.failures += 1;
        let since = *self.failing_since.get_or_insert(now);
        if self.last_log.is_none_or(|t| now - t >= policy.warn_every) {
            self.last_log = Some(now);
            warn!(
                url = %self.url,
                error = detail,
                failures = self.failures,
                failing_for_s = (now - since).as_secs(),
                "TSDB write failed; retrying with backoff (points wait in the store)."
            );
        }
        if now - since >= policy.unhealthy_after && (!self.unhealthy || self.refused) {
            self.refused = false;
            self.unhealthy(
                shared,
                metrics,
                json!({ "url": self.url, "error": detail, "failures": self.failures }),
            );
        }
    }

    fn refused(
        &mut self,
        policy: &RetryPolicy,
        shared: &Shared,
        metrics: &Metrics,
        status: u16,
        message: &str,
    ) {
        let now = Instant::now();
        self.failures += 1;
        let since = *self.failing_since.get_or_insert(now);
        // A refusal after retryable failures is news: report it at once.
        if !self.refused || self.last_log.is_none_or(|t| now - t >= policy.error_every) {
            self.last_log = Some(now);
            error!(
                url = %self.url,
                status,
                error = message,
                failures = self.failures,
                failing_for_s = (now - since).as_secs(),
                "TSDB refuses the gateway's writes; check [influxdb] url, org, bucket and token. \
                 Every point is kept in the store and retried."
            );
        }
        if !self.refused {
            self.refused = true;
            self.unhealthy(
                shared,
                metrics,
                json!({ "url": self.url, "status": status, "error": message }),
            );
        }
    }
}

/// Delivers batches through one transport, one request at a time.
pub struct Deliverer<T> {
    transport: T,
    policy: RetryPolicy,
    rng: Rng,
    /// Consecutive failed attempts (the backoff exponent); reset by any settling answer.
    attempt: u32,
    condition: Condition,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

impl<T: Transport> Deliverer<T> {
    pub fn new(
        transport: T,
        policy: RetryPolicy,
        rng: Rng,
        health: Health,
        url: String,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> Deliverer<T> {
        Deliverer {
            transport,
            policy,
            rng,
            attempt: 0,
            condition: Condition {
                health,
                url,
                failing_since: None,
                last_log: None,
                refused: false,
                unhealthy: false,
                failures: 0,
            },
            shared,
            metrics,
        }
    }

    /// Settles every line of `batch`: returns the lines the server refused for good, each
    /// with its reason; every other line is stored.
    pub async fn deliver(
        &mut self,
        batch: &Batch,
        stop: &mut Stop,
    ) -> Result<Vec<DeadLetter>, Stopped> {
        let mut dead = Vec::new();
        // A stack of line ranges still to send, the next one last.
        let mut todo: Vec<Range<usize>> = Vec::with_capacity(16);
        todo.push(0..batch.len());
        while let Some(range) = todo.pop() {
            if range.is_empty() {
                continue;
            }
            let whole = range == (0..batch.len());
            let gz = if whole { batch.gz.clone() } else { None };
            match self.send(batch.body(range.clone()), gz, stop).await? {
                Settling::Delivered => {}
                Settling::TooLarge(message) => {
                    if range.len() == 1 {
                        dead.push(dead_letter(
                            batch,
                            range.start,
                            413,
                            format!("the line alone is too large for the server: {message}"),
                        ));
                    } else {
                        push_halves(&mut todo, range);
                    }
                }
                Settling::Rejected {
                    status,
                    message,
                    lines,
                } => {
                    let mut named: Vec<(usize, String)> = lines
                        .into_iter()
                        .filter_map(|(n, m)| {
                            let i = range.start + n.checked_sub(1)?;
                            (i < range.end).then_some((i, m))
                        })
                        .collect();
                    named.sort_by_key(|(i, _)| *i);
                    named.dedup_by_key(|(i, _)| *i);
                    if !named.is_empty() {
                        // The server said which: keep those, send the rest again (whether
                        // or not it kept them, writing them again is harmless).
                        let mut rest = Vec::with_capacity(named.len() + 1);
                        let mut from = range.start;
                        for (i, m) in named {
                            rest.push(from..i);
                            dead.push(dead_letter(batch, i, status, m));
                            from = i + 1;
                        }
                        rest.push(from..range.end);
                        todo.extend(rest.into_iter().rev());
                    } else if range.len() == 1 {
                        dead.push(dead_letter(batch, range.start, status, message));
                    } else {
                        push_halves(&mut todo, range);
                    }
                }
            }
        }
        Ok(dead)
    }

    /// Sends one body until an answer settles it (retrying through failures and refusals).
    async fn send(
        &mut self,
        body: Bytes,
        gz: Option<Bytes>,
        stop: &mut Stop,
    ) -> Result<Settling, Stopped> {
        loop {
            let started = Instant::now();
            let result = stop
                .bounded(self.transport.send(body.clone(), gz.clone()))
                .await?;
            self.metrics
                .write_duration
                .record(started.elapsed().as_secs_f64());
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
            let verdict = match &result {
                Ok(reply) => classify(reply),
                Err(e) => classify_error(e),
            };
            self.metrics.request(verdict.label());
            let settled = match verdict {
                Verdict::Delivered => Settling::Delivered,
                Verdict::TooLarge { message } => Settling::TooLarge(message),
                Verdict::Rejected {
                    status,
                    message,
                    lines,
                } => Settling::Rejected {
                    status,
                    message,
                    lines,
                },
                Verdict::Retry {
                    reason,
                    after,
                    detail,
                } => {
                    self.attempt = self.attempt.saturating_add(1);
                    self.shared.retries.fetch_add(1, Ordering::Relaxed);
                    self.metrics.retry(reason.as_str());
                    self.condition
                        .retry(&self.policy, &self.shared, &self.metrics, &detail);
                    let wait = self
                        .policy
                        .backoff
                        .delay(self.attempt, after, &mut self.rng);
                    stop.sleep(wait).await?;
                    continue;
                }
                Verdict::Refused { status, message } => {
                    self.attempt = self.attempt.saturating_add(1);
                    self.shared.retries.fetch_add(1, Ordering::Relaxed);
                    self.metrics.retry("refused");
                    self.condition.refused(
                        &self.policy,
                        &self.shared,
                        &self.metrics,
                        status,
                        &message,
                    );
                    let half = self.policy.refused_retry / 2;
                    let wait = half + self.rng.below(half);
                    stop.sleep(wait).await?;
                    continue;
                }
            };
            self.attempt = 0;
            self.condition.answered(&self.shared, &self.metrics);
            return Ok(settled);
        }
    }
}

/// Pushes the halves of `range` so that the first half is sent first.
fn push_halves(todo: &mut Vec<Range<usize>>, range: Range<usize>) {
    let mid = range.start + range.len() / 2;
    todo.push(mid..range.end);
    todo.push(range.start..mid);
}

fn dead_letter(batch: &Batch, i: usize, status: u16, error: String) -> DeadLetter {
    let meta = batch.lines.get(i);
    DeadLetter {
        source: meta.map_or(super::batch::Source::Reading, |m| m.source),
        row_id: meta.map_or(0, |m| m.row_id),
        line: batch.line(i),
        status,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::batch::{BatchBuilder, Source};
    use crate::forward::influxdb::{Reply, SendError};
    use std::sync::Mutex;

    type Answer = Box<dyn Fn(usize, &str) -> Result<Reply, SendError> + Send + Sync>;

    /// A transport that answers from a script and logs what it was sent, when.
    struct Scripted {
        answer: Answer,
        log: Mutex<Vec<(Instant, String)>>,
    }

    impl Scripted {
        fn new(
            answer: impl Fn(usize, &str) -> Result<Reply, SendError> + Send + Sync + 'static,
        ) -> Arc<Scripted> {
            Arc::new(Scripted {
                answer: Box::new(answer),
                log: Mutex::new(Vec::new()),
            })
        }
        fn sent(&self) -> Vec<String> {
            self.log
                .lock()
                .unwrap()
                .iter()
                .map(|(_, b)| b.clone())
                .collect()
        }
        fn times(&self) -> Vec<Instant> {
            self.log.lock().unwrap().iter().map(|(t, _)| *t).collect()
        }
    }

    impl Transport for Arc<Scripted> {
        fn send(
            &self,
            body: Bytes,
            _gz: Option<Bytes>,
        ) -> impl Future<Output = Result<Reply, SendError>> + Send {
            let text = String::from_utf8(body.to_vec()).unwrap();
            let n = {
                let mut log = self.log.lock().unwrap();
                log.push((Instant::now(), text.clone()));
                log.len()
            };
            let answer = (self.answer)(n, &text);
            async move { answer }
        }
    }

    fn reply(status: u16, body: &str) -> Result<Reply, SendError> {
        Ok(Reply {
            status,
            retry_after: None,
            body: body.to_owned(),
        })
    }

    fn batch(lines: &[&str]) -> Batch {
        let mut b = BatchBuilder::new(0, 0);
        for (i, l) in lines.iter().enumerate() {
            b.text.push_str(l);
            b.text.push('\n');
            b.push_line(Source::Reading, i as i64 + 1);
            b.reading_to = i as i64 + 1;
        }
        b.finish(false)
    }

    fn lines(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("m,device=d{i} v={i}i {i}"))
            .collect()
    }

    struct Rig {
        deliverer: Deliverer<Arc<Scripted>>,
        health: Health,
        shared: Arc<Shared>,
        stop_tx: watch::Sender<Mode>,
        stop: Stop,
    }

    fn rig(t: &Arc<Scripted>, policy: RetryPolicy) -> Rig {
        let health = Health::default();
        let shared = Arc::new(Shared::default());
        let (stop_tx, rx) = watch::channel(Mode::Running);
        Rig {
            deliverer: Deliverer::new(
                Arc::clone(t),
                policy,
                Rng::new(9),
                health.clone(),
                "http://tsdb/api/v2/write".into(),
                Arc::clone(&shared),
                Arc::new(Metrics::new()),
            ),
            health,
            shared,
            stop_tx,
            stop: Stop::new(rx),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(2),
                max_retry_after: Duration::from_secs(60),
            },
            refused_retry: Duration::from_secs(60),
            unhealthy_after: Duration::from_secs(5),
            warn_every: Duration::from_secs(60),
            error_every: Duration::from_secs(300),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_then_delivered() {
        let t = Scripted::new(|n, _| match n {
            1 => Ok(Reply {
                status: 429,
                retry_after: Some(Duration::from_secs(7)),
                body: "{\"message\":\"slow down\"}".into(),
            }),
            _ => reply(204, ""),
        });
        let mut r = rig(&t, policy());
        let l = lines(3);
        let b = batch(&l.iter().map(String::as_str).collect::<Vec<_>>());
        let dead = r.deliverer.deliver(&b, &mut r.stop).await.unwrap();
        assert!(dead.is_empty());
        let times = t.times();
        assert_eq!(times.len(), 2);
        let waited = times[1] - times[0];
        assert!(
            waited >= Duration::from_secs(7) && waited <= Duration::from_millis(7100),
            "{waited:?}"
        );
        assert_eq!(t.sent()[0], t.sent()[1], "the same lines again");
        assert_eq!(r.shared.retries.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn outage_backs_off_exponentially_with_a_cap_and_turns_unhealthy() {
        let t = Scripted::new(|n, _| {
            if n <= 12 {
                Err(SendError::Connect("connection refused".into()))
            } else {
                reply(204, "")
            }
        });
        let mut r = rig(&t, policy());
        let l = lines(1);
        let b = batch(&[l[0].as_str()]);
        let d = r.deliverer.deliver(&b, &mut r.stop).await.unwrap();
        assert!(d.is_empty());
        let times = t.times();
        assert_eq!(times.len(), 13);
        for (i, w) in times.windows(2).enumerate() {
            let bound =
                Duration::from_millis(100 * (1u64 << i.min(30))).min(Duration::from_secs(2));
            assert!(
                w[1] - w[0] <= bound,
                "retry {}: {:?} > {bound:?}",
                i + 1,
                w[1] - w[0]
            );
        }
        // Healthy again after the delivery; it was unhealthy in between (more than 5 s of failures).
        assert!(r.shared.healthy.load(Ordering::Relaxed));
        assert!(r.health.snapshot().get(HEALTH_CHECK).is_none_or(|c| c.ok));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_outage_marks_the_forwarder_unhealthy() {
        let t = Scripted::new(|_, _| reply(503, "maintenance"));
        let mut r = rig(&t, policy());
        let l = lines(1);
        let b = batch(&[l[0].as_str()]);
        let stop_tx = r.stop_tx.clone();
        let health = r.health.clone();
        let shared = Arc::clone(&r.shared);
        let task = tokio::spawn(async move { r.deliverer.deliver(&b, &mut r.stop).await });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !health.snapshot().contains_key(HEALTH_CHECK),
            "a short outage is not reported"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        let check = health.snapshot()[HEALTH_CHECK].clone();
        assert!(!check.ok && !check.critical, "{check:?}");
        assert!(
            check.detail["error"].as_str().unwrap().contains("503"),
            "{check:?}"
        );
        assert!(!shared.healthy.load(Ordering::Relaxed));
        // Shutdown ends the retrying; nothing is settled.
        stop_tx
            .send(Mode::Draining(Instant::now() + Duration::from_secs(1)))
            .unwrap();
        assert_eq!(task.await.unwrap(), Err(Stopped));
    }

    #[tokio::test(start_paused = true)]
    async fn too_large_splits_until_it_fits() {
        // The server takes at most two lines per request.
        let t = Scripted::new(|_, body| {
            if body.lines().count() > 2 {
                reply(413, "{\"message\":\"request too large\"}")
            } else {
                reply(204, "")
            }
        });
        let mut r = rig(&t, policy());
        let l = lines(5);
        let b = batch(&l.iter().map(String::as_str).collect::<Vec<_>>());
        let dead = r.deliverer.deliver(&b, &mut r.stop).await.unwrap();
        assert!(dead.is_empty());
        let counts: Vec<usize> = t.sent().iter().map(|s| s.lines().count()).collect();
        assert_eq!(counts, vec![5, 2, 3, 1, 2]);
        let delivered: String = t
            .sent()
            .iter()
            .filter(|s| s.lines().count() <= 2)
            .cloned()
            .collect();
        assert_eq!(
            delivered,
            l.iter().map(|l| format!("{l}\n")).collect::<String>(),
            "in order, each once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_line_too_large_on_its_own_is_a_dead_letter() {
        let t = Scripted::new(|_, body| {
            if body.contains("huge") {
                reply(413, "")
            } else {
                reply(204, "")
            }
        });
        let mut r = rig(&t, policy());
        let b = batch(&["a f=1 1", "huge f=2 2", "c f=3 3"]);
        let dead = r.deliverer.deliver(&b, &mut r.stop).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].row_id, 2);
        assert_eq!(dead[0].status, 413);
        assert_eq!(dead[0].line, "huge f=2 2");
    }

    #[tokio::test(start_paused = true)]
    async fn bad_request_bisects_to_the_bad_line() {
        let t = Scripted::new(|_, body| {
            if body.contains("BAD") {
                reply(
                    400,
                    "{\"code\":\"invalid\",\"message\":\"unable to parse 'BAD': missing fields\"}",
                )
            } else {
                reply(204, "")
            }
        });
        let mut r = rig(&t, policy());
        let mut l = lines(16);
        l[11] = "BAD".into();
        let b = batch(&l.iter().map(String::as_str).collect::<Vec<_>>());
        let dead = r.deliverer.deliver(&b, &mut r.stop).await.unwrap();
        assert_eq!(
            dead,
            vec![DeadLetter {
                source: Source::Reading,
                row_id: 12,
                line: "BAD".into(),
                status: 400,
                error: "unable to parse 'BAD': missing fields".into(),
            }]
        );
        // Every good line was accepted exactly once, in order.
        let accepted: String = t
            .sent()
            .into_iter()
            .filter(|s| !s.contains("BAD"))
            .collect();
        let expected: String = l
            .iter()
            .filter(|l| *l != "BAD")
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(accepted, expected);
        // 1 + 2·log2(16) requests: the bisection is logarithmic.
        assert_eq!(t.sent().len(), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn partial_write_naming_lines_dead_letters_them_and_resends_the_rest() {
        let t = Scripted::new(|n, body| {
            if n == 1 {
                assert_eq!(body.lines().count(), 5);
                reply(
                    400,
                    r#"{"error":"partial write of line protocol occurred","data":[
                        {"original_line":"x","line_number":4,"error_message":"invalid column type"},
                        {"original_line":"y","line_number":2,"error_message":"no fields"}]}"#,
                )
            } else {
                reply(204, "")
            }
        });
        let mut r = rig(&t, policy());
        let l = lines(5);
        let b = batch(&l.iter().map(String::as_str).collect::<Vec<_>>());
        let dead = r.deliverer.deliver(&b, &mut r.stop).await.unwrap();
        let summary: Vec<(i64, u16, &str)> = dead
            .iter()
            .map(|d| (d.row_id, d.status, d.error.as_str()))
            .collect();
        assert_eq!(
            summary,
            vec![(2, 400, "no fields"), (4, 400, "invalid column type")]
        );
        assert_eq!(
            t.sent()[1..].to_vec(),
            vec![
                format!("{}\n", l[0]),
                format!("{}\n", l[2]),
                format!("{}\n", l[4])
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unprocessable_without_line_numbers_bisects() {
        let t = Scripted::new(|_, body| {
            if body.contains("d3 ") {
                reply(
                    422,
                    r#"{"code":"unprocessable entity","message":"partial write: points beyond retention policy dropped=1"}"#,
                )
            } else {
                reply(204, "")
            }
        });
        let mut r = rig(&t, policy());
        let l = lines(4);
        let b = batch(&l.iter().map(String::as_str).collect::<Vec<_>>());
        let dead = r.deliverer.deliver(&b, &mut r.stop).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].row_id, dead[0].status), (4, 422));
        assert!(dead[0].error.contains("beyond retention"), "{:?}", dead[0]);
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_keeps_everything_retries_slowly_and_reports_once() {
        let t = Scripted::new(|n, _| {
            if n <= 3 {
                reply(
                    401,
                    r#"{"code":"unauthorized","message":"unauthorized access"}"#,
                )
            } else {
                reply(204, "")
            }
        });
        let mut r = rig(&t, policy());
        let health = r.health.clone();
        let shared = Arc::clone(&r.shared);
        let l = lines(2);
        let b = batch(&[l[0].as_str(), l[1].as_str()]);
        let task = tokio::spawn(async move {
            let d = r.deliverer.deliver(&b, &mut r.stop).await;
            (d, r)
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let check = health.snapshot()[HEALTH_CHECK].clone();
        assert!(!check.ok, "unhealthy at the first refusal");
        assert_eq!(check.detail["status"], 401);
        assert!(!shared.healthy.load(Ordering::Relaxed));
        let (dead, _r) = task.await.unwrap();
        assert!(
            dead.unwrap().is_empty(),
            "nothing is dead-lettered for a refusal"
        );
        let times = t.times();
        assert_eq!(times.len(), 4);
        for w in times.windows(2) {
            let waited = w[1] - w[0];
            assert!(
                waited >= Duration::from_secs(30) && waited <= Duration::from_secs(60),
                "{waited:?}"
            );
        }
        assert!(
            t.sent().iter().all(|s| s.lines().count() == 2),
            "the whole batch every time"
        );
        assert!(health.snapshot()[HEALTH_CHECK].ok);
        assert!(shared.healthy.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn draining_allows_no_retry_wait_and_ends_at_the_deadline() {
        let t = Scripted::new(|_, _| Err(SendError::Timeout));
        let mut r = rig(&t, policy());
        r.stop_tx
            .send(Mode::Draining(Instant::now() + Duration::from_secs(5)))
            .unwrap();
        let l = lines(1);
        let b = batch(&[l[0].as_str()]);
        let started = Instant::now();
        assert_eq!(r.deliverer.deliver(&b, &mut r.stop).await, Err(Stopped));
        assert_eq!(
            t.sent().len(),
            1,
            "one attempt, no retry during the final flush"
        );
        assert!(started.elapsed() < Duration::from_millis(1));

        // A request that hangs is cut at the deadline.
        let mut stop = r.stop.clone();
        let started = Instant::now();
        let out = stop.bounded(std::future::pending::<()>()).await;
        assert_eq!(out, Err(Stopped));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_stop_sender_aborts_waits() {
        let (tx, rx) = watch::channel(Mode::Running);
        let mut stop = Stop::new(rx);
        drop(tx);
        assert_eq!(stop.sleep(Duration::from_secs(3600)).await, Err(Stopped));
        assert_eq!(
            stop.bounded(std::future::pending::<()>()).await,
            Err(Stopped)
        );
    }
}
