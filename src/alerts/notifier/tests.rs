//! The notifier's timing and bookkeeping with paused time: a fake Alertmanager that records
//! every POST with its (virtual) time, and a fake store to reload from. The real
//! Alertmanager is in `tests/alertmanager.rs`.

use std::sync::Mutex;

use super::*;

/// 2026-09-21T14:13:20Z, the wall clock at virtual time zero.
const BASE_MS: i64 = 1_790_000_000_000;
const RESEND: Duration = Duration::from_secs(60);
const HORIZON_MS: i64 = 240_000;

#[derive(Debug, Clone)]
struct Post {
    /// Since the test started.
    at: Duration,
    alerts: Vec<PostableAlert>,
    ok: bool,
}

#[derive(Default)]
struct AmState {
    posts: Vec<Post>,
    /// The next this many POSTs fail with this status.
    fail: usize,
    status: u16,
    /// How long each POST takes.
    delay: Duration,
}

#[derive(Clone)]
struct FakeAm {
    t0: Instant,
    state: Arc<Mutex<AmState>>,
}

impl FakeAm {
    fn new(t0: Instant) -> FakeAm {
        FakeAm {
            t0,
            state: Arc::default(),
        }
    }

    fn fail(&self, n: usize, status: u16) {
        let mut s = self.state.lock().unwrap();
        s.fail = n;
        s.status = status;
    }

    fn delay(&self, d: Duration) {
        self.state.lock().unwrap().delay = d;
    }

    fn posts(&self) -> Vec<Post> {
        self.state.lock().unwrap().posts.clone()
    }

    fn take_posts(&self) -> Vec<Post> {
        std::mem::take(&mut self.state.lock().unwrap().posts)
    }
}

impl Push for FakeAm {
    async fn push(&self, alerts: Vec<PostableAlert>) -> Result<(), PushError> {
        let (delay, result) = {
            let mut s = self.state.lock().unwrap();
            let result = if s.fail > 0 {
                s.fail -= 1;
                Err(PushError::Status {
                    status: s.status,
                    body: "fake".into(),
                })
            } else {
                Ok(())
            };
            s.posts.push(Post {
                at: Instant::now() - self.t0,
                alerts,
                ok: result.is_ok(),
            });
            (s.delay, result)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        result
    }
}

#[derive(Clone, Default)]
struct FakeStore {
    loaded: Arc<Mutex<Loaded>>,
    /// (after_id, since_ms) of every load.
    calls: Arc<Mutex<Vec<(i64, i64)>>>,
}

impl FakeStore {
    fn set(&self, loaded: Loaded) {
        *self.loaded.lock().unwrap() = loaded;
    }

    fn calls(&self) -> Vec<(i64, i64)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Source for FakeStore {
    async fn load(&self, after_id: i64, since_ms: i64) -> Result<Loaded, StoreError> {
        self.calls.lock().unwrap().push((after_id, since_ms));
        // What a store would answer: resolutions after the id and since the time.
        let mut loaded = self.loaded.lock().unwrap().clone();
        loaded
            .resolved
            .retain(|e| e.id > after_id && e.at_ms >= since_ms);
        Ok(loaded)
    }
}

fn settings(t0: Instant) -> NotifierSettings {
    NotifierSettings {
        queue: 8,
        max_batch: 3,
        clock: Arc::new(move || BASE_MS + (Instant::now() - t0).as_millis() as i64),
        ..NotifierSettings::new("http://fake:9093", RESEND)
    }
}

fn event(id: i64, device: &str, rule: &str, severity: Severity, state: AlertState) -> AlertEvent {
    AlertEvent {
        id,
        device: device.into(),
        profile: "manhole".into(),
        rule: rule.into(),
        severity,
        state,
        at_ms: BASE_MS + id,
        starts_ms: (state != AlertState::Pending).then_some(BASE_MS),
        received_at_ms: Some(BASE_MS),
        value: Some(1.0),
        summary: format!("{rule} on {device}"),
        labels: vec![("district".into(), "north".into())],
    }
}

struct Harness {
    t0: Instant,
    tx: mpsc::Sender<AlertEvent>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    am: FakeAm,
    store: FakeStore,
    health: Health,
}

impl Harness {
    fn start_with(settings: NotifierSettings, t0: Instant, store: FakeStore) -> Harness {
        let am = FakeAm::new(t0);
        let (tx, rx) = mpsc::channel(settings.queue);
        let stop = CancellationToken::new();
        let health = Health::default();
        let notifier = Notifier::new(settings, am.clone(), store.clone(), health.clone());
        let task = tokio::spawn(notifier.run(rx, stop.clone()));
        Harness {
            t0,
            tx,
            stop,
            task,
            am,
            store,
            health,
        }
    }

    fn start() -> Harness {
        let t0 = Instant::now();
        Harness::start_with(settings(t0), t0, FakeStore::default())
    }

    async fn send(&self, ev: AlertEvent) {
        self.tx.send(ev).await.unwrap();
    }

    /// Lets virtual time run to `t0 + at`.
    async fn until(&self, at: Duration) {
        tokio::time::sleep_until(self.t0 + at).await;
    }

    async fn stop(self) -> Duration {
        self.stop.cancel();
        self.task.await.unwrap();
        Instant::now() - self.t0
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `device/alertname@endsAt-relative-to-now` summaries of a POST's alerts, for compact
/// assertions: `+240000` is ms after the POST, `-5` ms before it.
fn summary(post: &Post) -> Vec<String> {
    let now_ms = BASE_MS + post.at.as_millis() as i64;
    let mut v: Vec<String> = post
        .alerts
        .iter()
        .map(|a| {
            let ends = parse_ms(&a.ends_at) - now_ms;
            format!("{}/{}@{ends:+}", a.labels["device"], a.labels["alertname"])
        })
        .collect();
    v.sort();
    v
}

/// Parses what `rfc3339_ms` writes.
fn parse_ms(s: &str) -> i64 {
    let (secs, frac) = s.trim_end_matches('Z').split_once('.').unwrap();
    let t = crate::api::readings::parse_time(&format!("{secs}Z")).unwrap();
    t * 1000 + frac.parse::<i64>().unwrap()
}

#[tokio::test(start_paused = true)]
async fn critical_at_once_others_coalesced_pending_never() {
    let h = Harness::start();
    h.until(ms(10)).await;
    // At start: the reload, then a full push of nothing (is Alertmanager up?).
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 1);
    assert_eq!((posts[0].at, posts[0].alerts.len()), (ms(0), 0));
    assert_eq!(h.store.calls(), vec![(0, BASE_MS - HORIZON_MS)]);

    h.until(ms(1000)).await;
    h.send(event(
        1,
        "a",
        "water_high",
        Severity::Warning,
        AlertState::Firing,
    ))
    .await;
    h.send(event(
        2,
        "z",
        "tilted",
        Severity::Critical,
        AlertState::Pending,
    ))
    .await;
    h.until(ms(1200)).await;
    h.send(event(
        3,
        "b",
        "water_high",
        Severity::Info,
        AlertState::Firing,
    ))
    .await;
    h.until(ms(1499)).await;
    assert!(h.am.posts().is_empty(), "coalesced for 500 ms");
    h.until(ms(1600)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].at, ms(1500), "500 ms after the first change");
    assert_eq!(
        summary(&posts[0]),
        vec!["a/water_high@+240000", "b/water_high@+240000"]
    );

    h.until(ms(2000)).await;
    h.send(event(
        4,
        "c",
        "cover_open",
        Severity::Critical,
        AlertState::Firing,
    ))
    .await;
    h.until(ms(2001)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].at, ms(2000), "critical: no waiting");
    let a = &posts[0].alerts[0];
    let labels: Vec<(&str, &str)> = a
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        labels,
        vec![
            ("alertname", "cover_open"),
            ("device", "c"),
            ("district", "north"),
            ("profile", "manhole"),
            ("severity", "critical"),
        ]
    );
    assert_eq!(a.annotations["summary"], "cover_open on c");
    assert_eq!(a.annotations["value"], "1");
    assert_eq!(
        a.annotations["description"],
        "Rule cover_open of profile manhole on device c: firing since 2026-09-21T14:13:20.000Z (value 1)."
    );
    assert_eq!(a.starts_at, "2026-09-21T14:13:20.000Z");
    assert_eq!(
        a.ends_at, "2026-09-21T14:17:22.000Z",
        "now (+2 s) + 4 × 60 s"
    );
    assert!(h.am.posts().is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn resend_keeps_firing_alive_and_resolve_ends_it() {
    let h = Harness::start();
    h.send(event(1, "a", "leak", Severity::Warning, AlertState::Firing))
        .await;
    h.until(ms(600)).await;
    assert_eq!(h.am.take_posts().len(), 2, "start probe, then the change");

    // Every resend_interval after the full push at start: everything firing, again.
    h.until(Duration::from_secs(60) + ms(1)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].at, Duration::from_secs(60));
    assert_eq!(summary(&posts[0]), vec!["a/leak@+240000"]);
    h.until(Duration::from_secs(120) + ms(1)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts[0].at, Duration::from_secs(120));
    assert_eq!(summary(&posts[0]), vec!["a/leak@+240000"]);

    // Resolved: endsAt is the resolution time (event at_ms = BASE + id).
    h.send(event(
        2,
        "a",
        "leak",
        Severity::Warning,
        AlertState::Resolved,
    ))
    .await;
    h.until(Duration::from_secs(121)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].alerts[0].ends_at, "2026-09-21T14:13:20.002Z");
    assert_eq!(posts[0].alerts[0].starts_at, "2026-09-21T14:13:20.000Z");
    // Delivered, so forgotten: the next resend carries nothing.
    h.until(Duration::from_secs(181)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 1);
    assert!(posts[0].alerts.is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn resends_are_batched() {
    let h = Harness::start();
    for i in 0..7 {
        h.send(event(
            i + 1,
            &format!("d{i}"),
            "leak",
            Severity::Info,
            AlertState::Firing,
        ))
        .await;
    }
    h.until(ms(600)).await;
    let posts = h.am.take_posts();
    // The probe, then the changes in POSTs of at most max_batch = 3.
    let sizes: Vec<usize> = posts.iter().map(|p| p.alerts.len()).collect();
    assert_eq!(sizes, vec![0, 3, 3, 1]);
    h.until(Duration::from_secs(61)).await;
    let sizes: Vec<usize> = h.am.take_posts().iter().map(|p| p.alerts.len()).collect();
    assert_eq!(sizes, vec![3, 3, 1]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_capped_with_jitter_then_resend_everything() {
    let h = Harness::start();
    h.am.fail(40, 503);
    h.send(event(1, "a", "sos", Severity::Critical, AlertState::Firing))
        .await;
    h.until(Duration::from_secs(300)).await;
    let posts = h.am.take_posts();
    let first_ok = posts.iter().position(|p| p.ok).unwrap();
    // Attempts: the probe at 0, then retries of both lanes (the change, and a full push
    // because Alertmanager may have lost its state) at the same instants.
    let mut times: Vec<Duration> = posts[..=first_ok].iter().map(|p| p.at).collect();
    times.dedup();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let mut steps = vec![250u64, 500, 1000, 2000, 4000, 8000];
    steps.resize(20, 10_000);
    assert_eq!(gaps.len(), 20, "{times:?}");
    for (gap, step) in gaps.iter().zip(steps) {
        assert!(
            *gap >= ms(step / 2) && *gap <= ms(step),
            "gap {gap:?} not in [{}, {step}] ms: {times:?}",
            step / 2
        );
    }
    // The alert got through once Alertmanager answered, and the resends go on.
    let delivered: Vec<&Post> = posts[first_ok..].iter().filter(|p| p.ok).collect();
    assert!(delivered
        .iter()
        .any(|p| summary(p) == vec!["a/sos@+240000"]));
    assert!(
        posts.last().unwrap().at > Duration::from_secs(200),
        "resends continue"
    );
    let check = &h.health.snapshot()[HEALTH_CHECK];
    assert!(check.ok && !check.critical, "{check:?}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn backoff_starts_over_after_a_success() {
    let h = Harness::start();
    h.until(ms(1)).await;
    h.am.fail(1, 500);
    h.send(event(1, "b", "sos", Severity::Critical, AlertState::Firing))
        .await;
    h.until(ms(2)).await;
    let check = &h.health.snapshot()[HEALTH_CHECK];
    assert!(!check.ok, "{check:?}");
    assert_eq!(check.detail["error"], "Alertmanager answered 500: fake");
    assert_eq!(check.detail["firing"], 1);
    h.until(ms(500)).await;
    let mut posts = h.am.take_posts();
    assert_eq!(
        posts.len(),
        4,
        "probe, failed, then the change and a full push: {posts:?}"
    );
    let gap = posts[2].at - posts[1].at;
    assert!(gap >= ms(125) && gap <= ms(250), "{gap:?}");
    assert_eq!(posts[2].at, posts[3].at);
    posts.sort_by_key(|p| p.alerts.len());
    assert!(posts[1..]
        .iter()
        .all(|p| summary(p) == vec!["b/sos@+240000"]));
    assert!(h.health.snapshot()[HEALTH_CHECK].ok);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refused_alerts_are_dropped_not_retried() {
    let h = Harness::start();
    h.until(ms(1)).await;
    h.am.fail(1, 400);
    h.send(event(1, "a", "sos", Severity::Critical, AlertState::Firing))
        .await;
    h.until(Duration::from_secs(59)).await;
    assert_eq!(
        h.am.take_posts().len(),
        2,
        "the probe and the refused POST only"
    );
    assert!(!h.health.snapshot()[HEALTH_CHECK].ok);
    // Firing alerts are offered again at the next resend.
    h.until(Duration::from_secs(61)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 1);
    assert_eq!(summary(&posts[0]), vec!["a/sos@+240000"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_change_during_a_post_is_sent_after_it() {
    let h = Harness::start();
    h.until(ms(1)).await;
    h.am.delay(ms(100));
    h.send(event(1, "a", "sos", Severity::Critical, AlertState::Firing))
        .await;
    h.until(ms(50)).await;
    h.send(event(
        2,
        "a",
        "sos",
        Severity::Critical,
        AlertState::Resolved,
    ))
    .await;
    h.until(ms(300)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 3, "{posts:?}");
    assert_eq!(summary(&posts[1]), vec!["a/sos@+240000"]);
    assert_eq!(posts[2].at, ms(101), "right after the first POST");
    assert_eq!(posts[2].alerts[0].ends_at, "2026-09-21T14:13:20.002Z");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn start_reload_pushes_firing_and_recent_resolutions() {
    let t0 = Instant::now();
    let store = FakeStore::default();
    let mut recent = event(7, "b", "leak", Severity::Warning, AlertState::Resolved);
    recent.at_ms = BASE_MS - 10_000;
    recent.starts_ms = Some(BASE_MS - 20_000);
    let mut old = event(6, "c", "leak", Severity::Warning, AlertState::Resolved);
    old.at_ms = BASE_MS - HORIZON_MS - 1;
    let mut firing = event(0, "a", "offline", Severity::Warning, AlertState::Firing);
    firing.received_at_ms = None;
    // Resolved and then firing again: firing wins.
    let mut refired = event(5, "d", "leak", Severity::Warning, AlertState::Resolved);
    refired.at_ms = BASE_MS - 5_000;
    let mut d_firing = event(0, "d", "leak", Severity::Warning, AlertState::Firing);
    d_firing.starts_ms = Some(BASE_MS - 1_000);
    store.set(Loaded {
        firing: vec![firing, d_firing],
        resolved: vec![recent, old, refired],
        watermark: 9,
    });
    let h = Harness::start_with(settings(t0), t0, store);
    h.until(ms(10)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 1, "one full push, no separate change POST");
    assert_eq!(
        summary(&posts[0]),
        vec!["a/offline@+240000", "b/leak@-10000", "d/leak@+240000"]
    );
    // Events the snapshot already holds are skipped; later ones apply.
    h.send(event(
        9,
        "a",
        "offline",
        Severity::Warning,
        AlertState::Resolved,
    ))
    .await;
    h.send(event(
        10,
        "e",
        "sos",
        Severity::Critical,
        AlertState::Firing,
    ))
    .await;
    h.until(ms(20)).await;
    let posts = h.am.take_posts();
    assert_eq!(posts.len(), 1);
    assert_eq!(summary(&posts[0]), vec!["e/sos@+240000"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn overflow_reloads_and_converges_on_the_store() {
    let h = Harness::start();
    h.send(event(
        1,
        "x",
        "leak",
        Severity::Critical,
        AlertState::Firing,
    ))
    .await;
    h.until(ms(10)).await;
    assert_eq!(h.am.take_posts().len(), 2);

    // A burst the queue (8) cannot hold: the notifier does not run between these sends.
    let mut dropped = 0;
    for id in 2..=20 {
        let ev = event(
            id,
            &format!("d{id}"),
            "leak",
            Severity::Warning,
            AlertState::Firing,
        );
        if h.tx.try_send(ev).is_err() {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 11);
    // What the store holds after the burst: x resolved (its event was among the dropped
    // ones), d2..d20 firing, and a blip (y fired and resolved) nobody was told about.
    let mut x_resolved = event(21, "x", "leak", Severity::Critical, AlertState::Resolved);
    x_resolved.at_ms = BASE_MS + 5;
    let mut y = event(22, "y", "leak", Severity::Warning, AlertState::Resolved);
    y.at_ms = BASE_MS + 6;
    let mut firing: Vec<AlertEvent> = (2..=20)
        .map(|id| {
            let mut e = event(
                0,
                &format!("d{id}"),
                "leak",
                Severity::Warning,
                AlertState::Firing,
            );
            e.received_at_ms = None;
            e
        })
        .collect();
    // d2 changed since its (queued) event: the store's version is newer.
    firing[0].starts_ms = Some(BASE_MS + 3);
    h.store.set(Loaded {
        firing,
        resolved: vec![y, x_resolved],
        watermark: 22,
    });
    h.until(ms(700)).await;
    let calls = h.store.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].0, 9, "resolutions after the last event applied");
    let posts = h.am.take_posts();
    let mut all: Vec<String> = posts.iter().flat_map(summary).collect();
    all.sort();
    let mut expected: Vec<String> = (2..=20).map(|i| format!("d{i}/leak@+240000")).collect();
    expected.push("x/leak@-5".into());
    expected.push("y/leak@-4".into());
    expected.sort();
    // Relative endsAt: x resolved 5 ms after BASE, posted at 10 ms → -5; y → -4.
    let fix = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .map(|s| {
                if s.starts_with("x/") || s.starts_with("y/") {
                    s.split('@').next().unwrap().to_owned()
                } else {
                    s
                }
            })
            .collect()
    };
    assert_eq!(fix(all), fix(expected), "{posts:?}");
    let x = posts
        .iter()
        .flat_map(|p| p.alerts.iter())
        .find(|a| a.labels["device"] == "x")
        .unwrap();
    assert_eq!(x.ends_at, "2026-09-21T14:13:20.005Z");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_delivers_coalesced_changes_at_once() {
    let h = Harness::start();
    h.until(ms(1)).await;
    h.send(event(1, "a", "leak", Severity::Info, AlertState::Firing))
        .await;
    h.until(ms(100)).await;
    let am = h.am.clone();
    let stopped = h.stop().await;
    assert_eq!(stopped, ms(100), "no waiting for the coalescing window");
    let posts = am.posts();
    assert_eq!(posts.len(), 2);
    assert_eq!(summary(&posts[1]), vec!["a/leak@+240000"]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_bounded_when_alertmanager_hangs() {
    let h = Harness::start();
    h.until(ms(1)).await;
    h.am.delay(Duration::from_secs(3600));
    h.send(event(1, "a", "sos", Severity::Critical, AlertState::Firing))
        .await;
    h.until(ms(10)).await;
    let am = h.am.clone();
    let stopped = h.stop().await;
    assert_eq!(
        stopped,
        ms(10) + Duration::from_secs(5),
        "final_push_timeout"
    );
    assert_eq!(am.posts().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn closing_the_queue_stops_the_notifier() {
    let h = Harness::start();
    h.send(event(1, "a", "leak", Severity::Warning, AlertState::Firing))
        .await;
    let Harness {
        tx, task, am, t0, ..
    } = h;
    drop(tx);
    task.await.unwrap();
    assert_eq!(Instant::now() - t0, ms(0));
    let posts = am.posts();
    assert_eq!(summary(posts.last().unwrap()), vec!["a/leak@+240000"]);
}

#[test]
fn resolved_before_it_started_is_clamped() {
    // Alertmanager refuses endsAt < startsAt.
    let mut ev = event(1, "a", "leak", Severity::Info, AlertState::Resolved);
    ev.starts_ms = Some(BASE_MS + 50);
    ev.at_ms = BASE_MS + 10;
    let a = postable(&ev, BASE_MS, HORIZON_MS);
    assert_eq!(a.starts_at, a.ends_at);
    assert!(
        a.annotations["description"].ends_with("resolved at 2026-09-21T14:13:20.010Z (value 1).")
    );
}

#[test]
fn book_ignores_unknown_resolutions_and_expires_undelivered_ones() {
    let mut book = Book::default();
    let mut never_fired = event(1, "a", "leak", Severity::Info, AlertState::Resolved);
    never_fired.starts_ms = None;
    assert!(!book.apply(never_fired));
    assert!(book.apply(event(2, "b", "leak", Severity::Info, AlertState::Resolved)));
    assert_eq!((book.alerts.len(), book.firing), (1, 0));
    assert!(book.apply(event(3, "c", "leak", Severity::Info, AlertState::Firing)));
    assert_eq!(book.firing, 1);
    assert_eq!(book.expire(BASE_MS + 2 + HORIZON_MS, HORIZON_MS), 0);
    assert_eq!(book.expire(BASE_MS + 3 + HORIZON_MS, HORIZON_MS), 1);
    assert_eq!((book.alerts.len(), book.undelivered()), (1, 1));
}

#[test]
fn backoff_steps_double_to_the_cap_and_reset() {
    let mut b = Backoff::new(ms(250), Duration::from_secs(10));
    for step in [250u64, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000] {
        let d = b.next();
        assert!(d >= ms(step / 2) && d <= ms(step), "{d:?} vs {step}");
    }
    b.reset();
    assert!(b.next() <= ms(250));
}
