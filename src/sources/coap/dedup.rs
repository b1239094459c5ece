//! Duplicate detection (RFC 7252 §4.5), with memory bounded independently of the message
//! rate. Pure: time comes in as a parameter ([`tokio::time::Instant`], so paused-clock
//! tests drive it), and nothing here sends.
//!
//! Exchanges are remembered in three places:
//!
//! - **In flight** — submitted CON uplinks awaiting their outcome, by `(peer, MID)` and by
//!   payload. A retransmission of one (same `(peer, MID)`) is dropped silently: the
//!   piggybacked ACK to come carries the same MID and token, so it answers the copy too.
//!   (An empty ACK instead would commit us to a separate CON response with retransmissions
//!   of our own, §5.2.2, for no gain: the client keeps retrying until the ACK arrives, and
//!   a commit takes milliseconds.) A retry of the same payload from another address waits
//!   (at most [`MAX_WAITERS`] per payload; more are dropped and retry) and is answered,
//!   re-addressed, when the outcome arrives. This state is never evicted — a retry during
//!   a slow commit is never processed twice, however busy the server — and is bounded by
//!   `max_in_flight` (each exchange holds a permit).
//! - **Message IDs** — answered `(peer, MID)` → the bytes sent (or "NON, no response"),
//!   for [`DedupLimits::window`] (EXCHANGE_LIFETIME, 247 s). A retransmission gets the
//!   identical bytes again and is not processed.
//! - **Payloads** — `(device, token, payload)`, hashed with a per-process random 128-bit
//!   key → the reply, for uplinks that were stored, for the same window. NB-IoT NAT
//!   rebinding changes the peer's port between retries, so a retry can arrive as a new
//!   `(peer, MID)`; it gets the cached reply re-addressed to its own MID and token.
//!   Refused uplinks (unknown device, 5.03, ...) are not remembered: a retry of those must
//!   be processed. The token is part of the key, so a sender who does not know a device's
//!   token cannot obtain a reply cached for it. A NON uplink leaves an "unconfirmed" entry:
//!   it suppresses NON repeats, but a CON with the same payload is processed
//!   (at-most-once must not turn into a false acknowledgement).
//!
//!   The price: a device that sends the *same* payload twice within 247 s on purpose (a
//!   payload with neither counter nor timestamp) has the second one treated as a retry.
//!   NB-IoT report intervals are minutes to hours and almost every format carries a frame
//!   counter or time; `DedupLimits::per_device = 0` turns this cache off (retries of
//!   payloads in flight are still caught).
//!
//! # Bounds
//!
//! Each cache: at most `per_peer` message IDs per peer address (`per_device` payloads per
//! device), and at most `max_bytes` in total, entries and cached responses counted with
//! [`BoundedCache::entry_cost`]; past either bound the oldest entry goes first (so under a
//! flood entries live less than 247 s, and a retry of an evicted exchange is processed
//! again: at-least-once holds, exactly-once is best effort). The order is kept in a
//! `BTreeMap` keyed by insertion sequence (time order, since insertion times only grow),
//! so expiry and eviction are O(log n) and never scan. On 64-bit targets an entry is
//! charged ≈ 330 bytes (message IDs) / ≈ 245 bytes (payloads) — the structures' sizes with
//! hash-map and B-tree slack — plus the cached response (a few bytes; never more than the
//! request, see `response`). The default 16 MiB per cache holds ≈ 50 000 message IDs and
//! ≈ 68 000 payloads: the full 247 s window at about 200 uplinks/s. In-flight state costs
//! ≈ 100 bytes per exchange and per waiter.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::response::{Reply, ReplyTo};
use super::DedupLimits;

/// Retransmissions from new addresses that may wait on one in-flight payload.
pub(crate) const MAX_WAITERS: usize = 4;

/// What a value keeps on the heap (for the byte budget).
pub(crate) trait HeapSize {
    fn heap_size(&self) -> usize;
}

/// A map whose entries expire `window` after insertion, at most `per_group` per group and
/// `max_bytes` in all, oldest evicted first.
#[derive(Debug)]
pub(crate) struct BoundedCache<K, G, V> {
    map: HashMap<K, Slot<G, V>>,
    /// Insertion sequence → key: oldest first.
    order: BTreeMap<u64, K>,
    /// Each group's insertion sequences, oldest first.
    groups: HashMap<G, VecDeque<u64>>,
    next_seq: u64,
    bytes: usize,
    window: Duration,
    per_group: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct Slot<G, V> {
    seq: u64,
    at: Instant,
    group: G,
    value: V,
}

impl<K, G, V> BoundedCache<K, G, V>
where
    K: Hash + Eq + Clone,
    G: Hash + Eq + Clone,
    V: HeapSize,
{
    /// Fixed bytes per entry: the slot in the hash map (with its control byte and 1/8
    /// spare capacity), the order entry (B-tree nodes run about two-thirds full), the
    /// group's sequence number (deques at most double their length), and a group's own
    /// entry counted as if every entry had its own group.
    pub(crate) const ENTRY_COST: usize = (size_of::<(K, Slot<G, V>)>() + 1) * 8 / 7
        + (size_of::<(u64, K)>() * 3) / 2
        + 2 * size_of::<u64>()
        + (size_of::<(G, VecDeque<u64>)>() + 1) * 8 / 7;

    pub(crate) fn new(window: Duration, per_group: usize, max_bytes: usize) -> Self {
        BoundedCache {
            map: HashMap::new(),
            order: BTreeMap::new(),
            groups: HashMap::new(),
            next_seq: 0,
            bytes: 0,
            window,
            per_group,
            max_bytes,
        }
    }

    pub(crate) fn entry_cost(value: &V) -> usize {
        Self::ENTRY_COST + value.heap_size()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The live value for `key`.
    pub(crate) fn get_mut(&mut self, key: &K, now: Instant) -> Option<&mut V> {
        let window = self.window;
        self.map
            .get_mut(key)
            .filter(|s| now < s.at + window)
            .map(|s| &mut s.value)
    }

    /// Inserts (replacing any entry for `key`), then evicts down to the bounds. With
    /// `per_group == 0` nothing is kept.
    pub(crate) fn insert(&mut self, key: K, group: G, value: V, now: Instant) {
        self.expire(now);
        self.remove(&key);
        if self.per_group == 0 {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += Self::entry_cost(&value);
        self.order.insert(seq, key.clone());
        let seqs = self.groups.entry(group.clone()).or_default();
        seqs.push_back(seq);
        let group_over: Vec<u64> = if seqs.len() > self.per_group {
            seqs.iter()
                .take(seqs.len() - self.per_group)
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        self.map.insert(
            key,
            Slot {
                seq,
                at: now,
                group,
                value,
            },
        );
        for old in group_over {
            if let Some(k) = self.order.get(&old).cloned() {
                self.remove(&k);
            }
        }
        self.shrink_to_budget();
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let slot = self.map.remove(key)?;
        self.order.remove(&slot.seq);
        if let Entry::Occupied(mut seqs) = self.groups.entry(slot.group) {
            // Usually the front: entries mostly leave oldest first.
            if let Some(i) = seqs.get().iter().position(|s| *s == slot.seq) {
                seqs.get_mut().remove(i);
            }
            if seqs.get().is_empty() {
                seqs.remove();
            }
        }
        self.bytes -= Self::entry_cost(&slot.value);
        Some(slot.value)
    }

    /// Forgets every entry older than the window.
    pub(crate) fn expire(&mut self, now: Instant) {
        while let Some((_, key)) = self.order.first_key_value() {
            let expired = self.map.get(key).is_none_or(|s| now >= s.at + self.window);
            if !expired {
                break;
            }
            let key = key.clone();
            self.remove(&key);
        }
    }

    fn shrink_to_budget(&mut self) {
        while self.bytes > self.max_bytes {
            let Some((_, key)) = self.order.first_key_value() else {
                break;
            };
            let key = key.clone();
            self.remove(&key);
        }
    }
}

/// What is remembered about an answered `(peer, MID)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MidState {
    /// The bytes sent in response.
    Answered(Bytes),
    /// A NON request: processed, never answered.
    Silent,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MidEntry {
    pub state: MidState,
    /// Whether the request was an uplink (a repeat counts as an uplink duplicate).
    pub uplink: bool,
}

impl HeapSize for MidEntry {
    fn heap_size(&self) -> usize {
        match &self.state {
            MidState::Answered(b) => b.len(),
            MidState::Silent => 0,
        }
    }
}

/// A retransmission from a new address waiting for an in-flight original.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Waiter {
    pub peer: SocketAddr,
    pub to: ReplyTo,
}

/// What is remembered about a payload that is no longer in flight.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ContentState {
    /// Submitted as NON: the outcome is unknown.
    Unconfirmed,
    /// Stored; the reply to send again.
    Done(Reply),
}

impl HeapSize for ContentState {
    fn heap_size(&self) -> usize {
        match self {
            ContentState::Unconfirmed => 0,
            ContentState::Done(reply) => reply.heap_size(),
        }
    }
}

/// 128-bit keyed hash of `(device, token, payload)`.
pub(crate) type ContentKey = (u64, u64);

/// What a request turns out to repeat.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Repeat {
    /// Nothing known: process it.
    New,
    /// Its original is in flight: wait for (CON, if there is room) or drop.
    InFlight,
    /// Answered before: send this again.
    Answered(Reply),
    /// A NON payload seen before.
    Unconfirmed,
}

/// The two caches, the exchanges in flight, and the keyed hash for payloads.
///
/// Exchanges in flight are kept apart from the caches and are never evicted: a
/// retransmission that arrives while its original awaits the commit is never processed
/// twice, however busy the server. They are bounded by `max_in_flight` (each holds a
/// permit) times `1 + MAX_WAITERS` message IDs.
#[derive(Debug)]
pub(crate) struct Exchanges {
    pub mids: BoundedCache<(SocketAddr, u16), SocketAddr, MidEntry>,
    pub contents: BoundedCache<ContentKey, u64, ContentState>,
    /// Payloads awaiting their outcome, with the retries from other addresses waiting.
    in_flight: HashMap<ContentKey, Vec<Waiter>>,
    /// Message IDs awaiting an outcome: the originals' and the waiters'.
    in_flight_mids: HashSet<(SocketAddr, u16)>,
    hash_a: RandomState,
    hash_b: RandomState,
}

impl Exchanges {
    pub(crate) fn new(limits: DedupLimits) -> Exchanges {
        Exchanges {
            mids: BoundedCache::new(limits.window, limits.per_peer, limits.max_bytes),
            contents: BoundedCache::new(limits.window, limits.per_device, limits.max_bytes),
            in_flight: HashMap::new(),
            in_flight_mids: HashSet::new(),
            hash_a: RandomState::new(),
            hash_b: RandomState::new(),
        }
    }

    /// The payload key and its group (the device).
    pub(crate) fn content_key(
        &self,
        device: &str,
        token: Option<&str>,
        payload: &[u8],
    ) -> (ContentKey, u64) {
        let item = (device, token, payload);
        (
            (self.hash_a.hash_one(item), self.hash_b.hash_one(item)),
            self.hash_a.hash_one(device),
        )
    }

    pub(crate) fn expire(&mut self, now: Instant) {
        self.mids.expire(now);
        self.contents.expire(now);
    }

    /// Whether a `(peer, MID)` awaits its outcome.
    pub(crate) fn mid_in_flight(&self, peer: SocketAddr, mid: u16) -> bool {
        self.in_flight_mids.contains(&(peer, mid))
    }

    /// What a payload repeats, if anything.
    pub(crate) fn payload_seen(&mut self, key: &ContentKey, now: Instant) -> Repeat {
        if self.in_flight.contains_key(key) {
            return Repeat::InFlight;
        }
        match self.contents.get_mut(key, now) {
            None => Repeat::New,
            Some(ContentState::Unconfirmed) => Repeat::Unconfirmed,
            Some(ContentState::Done(reply)) => Repeat::Answered(reply.clone()),
        }
    }

    /// An uplink was submitted and awaits its outcome.
    pub(crate) fn start(&mut self, peer: SocketAddr, mid: u16, key: ContentKey) {
        self.in_flight_mids.insert((peer, mid));
        self.in_flight.insert(key, Vec::new());
    }

    /// A retry from another address waits for the in-flight `key`; false when it cannot
    /// (no such exchange, or [`MAX_WAITERS`] already wait).
    pub(crate) fn wait(&mut self, key: &ContentKey, waiter: Waiter) -> bool {
        match self.in_flight.get_mut(key) {
            Some(waiters) if waiters.len() < MAX_WAITERS => {
                waiters.push(waiter);
                self.in_flight_mids.insert((waiter.peer, waiter.to.mid));
                true
            }
            _ => false,
        }
    }

    /// The outcome arrived: forgets the exchange in flight and returns its waiters.
    pub(crate) fn finish(&mut self, peer: SocketAddr, mid: u16, key: &ContentKey) -> Vec<Waiter> {
        self.in_flight_mids.remove(&(peer, mid));
        let waiters = self.in_flight.remove(key).unwrap_or_default();
        for w in &waiters {
            self.in_flight_mids.remove(&(w.peer, w.to.mid));
        }
        waiters
    }

    #[cfg(test)]
    pub(crate) fn in_flight_len(&self) -> (usize, usize) {
        (self.in_flight.len(), self.in_flight_mids.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct V(usize);
    impl HeapSize for V {
        fn heap_size(&self) -> usize {
            self.0
        }
    }

    type Cache = BoundedCache<u32, u8, V>;

    fn cache(per_group: usize, entries: usize) -> Cache {
        BoundedCache::new(
            Duration::from_secs(247),
            per_group,
            entries * Cache::ENTRY_COST,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn entries_live_for_the_window() {
        let mut c = cache(10, 10);
        let t0 = Instant::now();
        c.insert(1, 0, V(0), t0);
        tokio::time::advance(Duration::from_secs(200)).await;
        c.insert(2, 0, V(0), Instant::now());
        tokio::time::advance(Duration::from_secs(46)).await;
        assert_eq!(c.get_mut(&1, Instant::now()), Some(&mut V(0)));
        tokio::time::advance(Duration::from_secs(1)).await; // 247 s after the first
        assert_eq!(c.get_mut(&1, Instant::now()), None);
        c.expire(Instant::now());
        assert_eq!(c.len(), 1);
        assert_eq!(c.get_mut(&2, Instant::now()), Some(&mut V(0)));
        tokio::time::advance(Duration::from_secs(200)).await;
        c.expire(Instant::now());
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn a_group_keeps_its_newest_entries() {
        let now = Instant::now();
        let mut c = cache(3, 100);
        for k in 0..5 {
            c.insert(k, 7, V(0), now);
        }
        c.insert(100, 8, V(0), now);
        assert_eq!(c.len(), 4);
        assert_eq!(c.get_mut(&1, now), None);
        for k in [2, 3, 4, 100] {
            assert!(c.get_mut(&k, now).is_some(), "{k}");
        }
    }

    #[test]
    fn the_byte_budget_evicts_oldest_first_whatever_the_rate() {
        let now = Instant::now();
        let mut c = cache(1000, 50);
        for k in 0..100_000 {
            c.insert(k, (k % 7) as u8, V(0), now);
            assert!(c.bytes() <= 50 * Cache::ENTRY_COST);
        }
        assert_eq!(c.len(), 50);
        assert!(c.get_mut(&99_949, now).is_none());
        assert!(c.get_mut(&99_950, now).is_some());
        // Heavier values take more of the budget.
        c.insert(1_000_000, 0, V(10 * Cache::ENTRY_COST), now);
        assert_eq!(c.len(), 40);
        assert_eq!(c.order.len(), c.len());
        assert_eq!(c.groups.values().map(VecDeque::len).sum::<usize>(), c.len());
    }

    #[test]
    fn remove_and_replace_keep_the_accounting() {
        let now = Instant::now();
        let mut c = cache(10, 10);
        c.insert(1, 0, V(5), now);
        c.insert(2, 0, V(0), now);
        assert_eq!(c.bytes(), 2 * Cache::ENTRY_COST + 5);
        assert_eq!(c.remove(&1), Some(V(5)));
        assert_eq!(c.remove(&1), None);
        assert_eq!(c.bytes(), Cache::ENTRY_COST);
        // Re-inserting a key replaces it.
        c.insert(2, 1, V(1), now);
        assert_eq!((c.len(), c.bytes()), (1, Cache::ENTRY_COST + 1));
        assert_eq!(c.groups.len(), 1);
    }

    #[test]
    fn per_group_zero_keeps_nothing() {
        let now = Instant::now();
        let mut c = cache(0, 10);
        c.insert(1, 0, V(0), now);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn payload_keys_separate_device_token_and_payload() {
        let x = Exchanges::new(DedupLimits::default());
        let k = |d, t, p| x.content_key(d, t, p).0;
        assert_eq!(k("a", None, b"1"), k("a", None, b"1"));
        assert_ne!(k("a", None, b"1"), k("b", None, b"1"));
        assert_ne!(k("a", None, b"1"), k("a", Some("t"), b"1"));
        assert_ne!(k("a", None, b"1"), k("a", None, b"2"));
        assert_ne!(k("ab", None, b""), k("a", None, b"b"));
        assert_eq!(
            x.content_key("a", None, b"1").1,
            x.content_key("a", Some("t"), b"2").1
        );
    }

    #[test]
    fn exchanges_in_flight_are_tracked_apart_and_never_evicted() {
        use crate::sources::coap::request::Token;
        use crate::sources::coap::response::{Reply, ReplyTo};
        use coap_lite::ResponseType;

        let now = Instant::now();
        let mut x = Exchanges::new(DedupLimits {
            per_peer: 1,
            per_device: 1,
            ..DedupLimits::default()
        });
        let peer = |port| SocketAddr::from(([10, 0, 0, 1], port));
        let waiter = |port, mid| Waiter {
            peer: peer(port),
            to: ReplyTo {
                mid,
                token: Token::default(),
                request_len: 20,
                block1: None,
            },
        };
        let (key, group) = x.content_key("dev", None, b"p");
        assert_eq!(x.payload_seen(&key, now), Repeat::New);
        x.start(peer(1), 7, key);
        // Unrelated traffic from the same peer and device fills the caches...
        for mid in 100..200 {
            let entry = MidEntry {
                state: MidState::Silent,
                uplink: true,
            };
            x.mids.insert((peer(1), mid), peer(1), entry, now);
            let (k, _) = x.content_key("dev", None, &mid.to_be_bytes());
            x.contents.insert(k, group, ContentState::Unconfirmed, now);
        }
        // ...but the exchange in flight is still known.
        assert!(x.mid_in_flight(peer(1), 7));
        assert_eq!(x.payload_seen(&key, now), Repeat::InFlight);
        for port in 2..2 + MAX_WAITERS as u16 {
            assert!(x.wait(&key, waiter(port, port)));
        }
        assert!(!x.wait(&key, waiter(99, 99)), "more than MAX_WAITERS");
        assert!(x.mid_in_flight(peer(2), 2));
        let waiters = x.finish(peer(1), 7, &key);
        assert_eq!(waiters.len(), MAX_WAITERS);
        assert_eq!(x.in_flight_len(), (0, 0));
        assert_eq!(x.payload_seen(&key, now), Repeat::New);
        let reply = Reply::code(ResponseType::Changed);
        x.contents
            .insert(key, group, ContentState::Done(reply.clone()), now);
        assert_eq!(x.payload_seen(&key, now), Repeat::Answered(reply));
        assert!(!x.wait(&key, waiter(5, 5)), "not in flight any more");
    }

    /// The documented per-entry cost (module docs) is what the accounting uses.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn entry_costs_are_as_documented() {
        type Mids = BoundedCache<(SocketAddr, u16), SocketAddr, MidEntry>;
        type Contents = BoundedCache<ContentKey, u64, ContentState>;
        let (m, c) = (Mids::ENTRY_COST, Contents::ENTRY_COST);
        // 327 and 245 with Rust 1.9x; a layout change within these bounds keeps the docs true.
        assert!((300..=360).contains(&m), "message-ID entry: {m} bytes");
        assert!((220..=280).contains(&c), "payload entry: {c} bytes");
    }
}
