//! The rule state of one pipeline shard: compiled rule sets, per-device condition state,
//! and the silence timers of `kind = "inactive"` rules.
//!
//! One shard owns a fixed subset of devices, so nothing here is locked. Memory is spent
//! only on devices that need it: a device gets an entry when its profile has an inactive
//! rule (it is watched) or while one of its condition rules is pending or firing, its
//! profile's rules need a history (`delta`/`rate`), or it has an evaluation error to
//! remember.
//!
//! # Silence timers
//!
//! A watched device has one deadline, `last uplink + after` of its shortest unfired
//! inactive rule, in an ordered set keyed by (deadline, device). A tick looks only at
//! the set's first entries, so a million silent devices cost nothing until their
//! deadline; an uplink moves its device's entry (O(log n)). Times are whole seconds since
//! the Unix epoch in a `u32` (until 2106), which keeps an entry at 16 bytes.
//!
//! A device is watched from its first uplink. One that has never sent anything is not
//! (fleets are registered before they are installed; a not-yet-installed device is not
//! offline). At start, a device's silence is counted from its last uplink or the
//! pipeline's start, whichever is later: the gateway's own downtime is not the devices'
//! fault, and every device would otherwise look offline after an outage of the gateway.
//! Alerts that were firing stay firing (they are loaded from the store).

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use nbiot_codecs::{Name, Value};

use super::engine::{Active, DeviceRules, Issue, Phase, RuleSet};
use super::Transition;
use crate::alerts::AlertState;
use crate::profiles::{Profile, ProfileSet, Severity};
use crate::registry::Device;
use crate::store::alerts::StoredAlert;

/// A device as a map key: its id, without copying it (the `Arc` is the registry's).
#[derive(Debug, Clone)]
struct DevKey(Arc<Device>);

impl PartialEq for DevKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl Eq for DevKey {}

impl Hash for DevKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Must hash exactly like the `str` it borrows as.
        self.0.id().hash(state);
    }
}

impl Borrow<str> for DevKey {
    fn borrow(&self) -> &str {
        self.0.id()
    }
}

impl PartialOrd for DevKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DevKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id().cmp(other.0.id())
    }
}

/// A device's entry.
#[derive(Debug)]
struct Slot {
    /// Last uplink, seconds since the Unix epoch (0: none seen).
    last_seen_s: u32,
    /// The deadline in the timer set (0: none).
    armed_s: u32,
    extra: Option<Box<Extra>>,
}

/// What only some devices have.
#[derive(Debug, Default)]
struct Extra {
    rules: Option<DeviceRules>,
    /// Inactive rules firing for the device.
    silent: Vec<Silent>,
}

#[derive(Debug, Clone)]
struct Silent {
    profile: Arc<str>,
    rule: Arc<str>,
    severity: Severity,
    since_ms: i64,
    starts_ms: i64,
    summary: String,
}

/// A compiled profile version (None: the profile has no rules, or they failed to compile).
struct Compiled {
    profile: Arc<Profile>,
    set: Option<Arc<RuleSet>>,
}

fn secs(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(1000).max(1)).unwrap_or(u32::MAX)
}

fn after_s(after_ms: i64) -> u32 {
    // Rounded up: never earlier than `after`.
    u32::try_from((after_ms.max(0) + 999) / 1000).unwrap_or(u32::MAX)
}

/// The rule state of one shard.
pub struct ShardRules {
    sets: HashMap<Box<str>, Compiled>,
    devices: HashMap<DevKey, Slot>,
    timers: BTreeSet<(u32, DevKey)>,
    start_s: u32,
}

impl std::fmt::Debug for ShardRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardRules")
            .field("devices", &self.devices.len())
            .field("timers", &self.timers.len())
            .finish_non_exhaustive()
    }
}

/// What [`ShardRules::lookup`] needs from the registry and the profiles.
pub trait Lookup {
    /// The device as registered now (None: removed).
    fn device(&self, id: &str) -> Option<Arc<Device>>;
    /// The profiles in force.
    fn profiles(&self) -> Arc<ProfileSet>;
}

impl ShardRules {
    /// `start_ms`: the pipeline's start, from which silence is counted at the earliest.
    pub fn new(start_ms: i64) -> ShardRules {
        ShardRules {
            sets: HashMap::new(),
            devices: HashMap::new(),
            timers: BTreeSet::new(),
            start_s: secs(start_ms),
        }
    }

    /// Devices with an entry, and armed silence timers.
    pub fn len(&self) -> (usize, usize) {
        (self.devices.len(), self.timers.len())
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// The compiled rules of `profile` (compiled once per profile version); None when it
    /// has no rules.
    pub fn rule_set(&mut self, profile: &Arc<Profile>) -> Option<Arc<RuleSet>> {
        compiled(&mut self.sets, profile)
    }

    /// An uplink of `device` (decoded or not) is about to be committed: inactive rules
    /// that fired for it resolve, its silence timer restarts, and condition states follow
    /// a change of its rules (`set`).
    pub fn uplink(
        &mut self,
        device: &Arc<Device>,
        set: Option<&Arc<RuleSet>>,
        received_at_ms: i64,
        out: &mut Vec<Transition>,
    ) {
        let watched = set.is_some_and(|s| !s.inactive.is_empty());
        match self.devices.get_key_value(device.id()) {
            None if !watched => return,
            // The registry replaced the device (new labels, params): key the entry by the
            // current version so the old one can be freed.
            Some((old, _)) if !Arc::ptr_eq(&old.0, device) => {
                let old = old.clone();
                if let Some(mut slot) = self.devices.remove(device.id()) {
                    disarm(&mut self.timers, &mut slot, &old);
                    self.devices.insert(DevKey(Arc::clone(device)), slot);
                }
            }
            _ => {}
        }
        let slot = self
            .devices
            .entry(DevKey(Arc::clone(device)))
            .or_insert(Slot {
                last_seen_s: 0,
                armed_s: 0,
                extra: None,
            });
        if let Some(extra) = slot.extra.as_deref_mut() {
            resolve_silence(extra, device, set, received_at_ms, out);
            match (extra.rules.as_mut(), set) {
                (Some(rules), Some(set)) => rules.rebind(set, device, received_at_ms, out),
                (Some(rules), None) => {
                    rules.resolve_all(device, received_at_ms, out);
                    extra.rules = None;
                }
                (None, _) => {}
            }
        }
        slot.last_seen_s = slot.last_seen_s.max(secs(received_at_ms));
        let key = DevKey(Arc::clone(device));
        match set.filter(|_| watched) {
            Some(set) => rearm(&mut self.timers, slot, &key, set, self.start_s),
            None => disarm(&mut self.timers, slot, &key),
        }
        if !watched && slot.extra.as_deref().is_none_or(is_idle) {
            self.devices.remove(device.id());
        }
    }

    /// Whether the device's `delta`/`rate` history should be loaded from the store
    /// before its next reading is evaluated.
    pub fn wants_history(&self, device: &str, set: &Arc<RuleSet>) -> bool {
        if !set.needs_history() {
            return false;
        }
        match self
            .devices
            .get(device)
            .and_then(|s| s.extra.as_deref())
            .and_then(|e| e.rules.as_ref())
        {
            Some(rules) => !Arc::ptr_eq(rules.set(), set) || rules.wants_history(),
            None => true,
        }
    }

    /// Fills the device's history (from [`crate::store::alerts::load_history`]).
    pub fn load_history(
        &mut self,
        device: &Arc<Device>,
        set: &Arc<RuleSet>,
        data: Vec<Vec<(i64, f64)>>,
        at_ms: i64,
        out: &mut Vec<Transition>,
    ) {
        let rules = self.rules_mut(device, set, at_ms, out);
        rules.load_history(data);
    }

    /// The device's condition state under `set`, created (or rebound) as needed.
    fn rules_mut(
        &mut self,
        device: &Arc<Device>,
        set: &Arc<RuleSet>,
        at_ms: i64,
        out: &mut Vec<Transition>,
    ) -> &mut DeviceRules {
        let slot = self
            .devices
            .entry(DevKey(Arc::clone(device)))
            .or_insert(Slot {
                last_seen_s: 0,
                armed_s: 0,
                extra: None,
            });
        let extra = slot.extra.get_or_insert_with(Box::default);
        let rules = extra
            .rules
            .get_or_insert_with(|| DeviceRules::new(Arc::clone(set)));
        rules.rebind(set, device, at_ms, out);
        rules
    }

    /// Evaluates the condition rules of `set` on one reading of `device`.
    #[allow(clippy::too_many_arguments)]
    pub fn reading(
        &mut self,
        device: &Arc<Device>,
        set: &Arc<RuleSet>,
        fields: &[(Name, Value)],
        time_ms: i64,
        received_at_ms: i64,
        out: &mut Vec<Transition>,
        issues: &mut Vec<Issue>,
    ) {
        if set.rules.is_empty() {
            return;
        }
        match self
            .devices
            .get_mut(device.id())
            .and_then(|s| s.extra.as_deref_mut())
            .and_then(|e| e.rules.as_mut())
        {
            Some(rules) => {
                rules.rebind(set, device, received_at_ms, out);
                rules.evaluate(device, fields, time_ms, received_at_ms, out, issues);
                if rules.is_idle() {
                    self.forget_rules(device.id());
                }
            }
            None => {
                // The common case: nothing active. Evaluate on a fresh state and keep it
                // only if something started.
                let mut rules = DeviceRules::new(Arc::clone(set));
                rules.evaluate(device, fields, time_ms, received_at_ms, out, issues);
                if !rules.is_idle() {
                    let slot = self
                        .devices
                        .entry(DevKey(Arc::clone(device)))
                        .or_insert(Slot {
                            last_seen_s: 0,
                            armed_s: 0,
                            extra: None,
                        });
                    slot.extra.get_or_insert_with(Box::default).rules = Some(rules);
                }
            }
        }
    }

    fn forget_rules(&mut self, device: &str) {
        let Some(slot) = self.devices.get_mut(device) else {
            return;
        };
        if let Some(extra) = slot.extra.as_deref_mut() {
            extra.rules = None;
            if extra.silent.is_empty() {
                slot.extra = None;
            }
        }
        if slot.armed_s == 0 && slot.extra.is_none() {
            self.devices.remove(device);
        }
    }

    /// The earliest silence deadline, ms since the Unix epoch.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        self.timers.first().map(|(d, _)| i64::from(*d) * 1000)
    }

    /// Fires the inactive rules whose deadline is at or before `now_ms`, at most `max`
    /// devices per call (the caller comes back for the rest, so uplinks are not held up
    /// behind a large batch). Returns how many devices were looked at.
    pub fn expire(
        &mut self,
        now_ms: i64,
        max: usize,
        lookup: &dyn Lookup,
        out: &mut Vec<Transition>,
    ) -> usize {
        let now_s = secs(now_ms);
        let mut profiles: Option<Arc<ProfileSet>> = None;
        let mut n = 0;
        while n < max {
            let Some((deadline, _)) = self.timers.first() else {
                break;
            };
            if *deadline > now_s {
                break;
            }
            let Some((_, key)) = self.timers.pop_first() else {
                break;
            };
            n += 1;
            let Some(slot) = self.devices.get_mut(key.0.id()) else {
                continue;
            };
            slot.armed_s = 0;
            let profiles = profiles.get_or_insert_with(|| lookup.profiles());
            let current = lookup.device(key.0.id()).and_then(|d| {
                let p = profiles.get(d.profile()).cloned();
                p.map(|p| (d, p))
            });
            let Some((device, profile)) = current else {
                // Removed from the registry, or its profile is gone: nothing to watch.
                let at_ms = now_ms;
                if let Some(mut extra) = slot.extra.take() {
                    resolve_silence(&mut extra, &key.0, None, at_ms, out);
                    if let Some(mut rules) = extra.rules.take() {
                        rules.resolve_all(&key.0, at_ms, out);
                    }
                }
                self.devices.remove(key.0.id());
                continue;
            };
            let set = compiled(&mut self.sets, &profile).filter(|s| !s.inactive.is_empty());
            let Some(set) = set else {
                if let Some(extra) = slot.extra.as_deref_mut() {
                    resolve_silence(extra, &device, None, now_ms, out);
                }
                if slot.extra.as_deref().is_none_or(is_idle) {
                    self.devices.remove(key.0.id());
                }
                continue;
            };
            let base_s = slot.last_seen_s.max(self.start_s);
            let extra = slot.extra.get_or_insert_with(Box::default);
            for rule in set.inactive.iter() {
                let due_s = base_s.saturating_add(after_s(rule.after_ms));
                if due_s > now_s || extra.silent.iter().any(|s| s.rule == rule.name) {
                    continue;
                }
                let since_ms = i64::from(slot.last_seen_s) * 1000;
                let due_ms = i64::from(due_s) * 1000;
                let silent_s = f64::from(due_s.saturating_sub(slot.last_seen_s));
                let summary = set.silence_summary(rule, &device, silent_s);
                out.push(Transition {
                    device: Arc::clone(&device),
                    profile: Arc::clone(&set.profile),
                    rule: Arc::clone(&rule.name),
                    severity: rule.severity,
                    state: AlertState::Firing,
                    at_ms: due_ms,
                    since_ms,
                    starts_ms: Some(due_ms),
                    value: Some(silent_s),
                    summary: summary.clone(),
                    received_at_ms: None,
                    silent: if extra.silent.is_empty() { 1 } else { 0 },
                });
                extra.silent.push(Silent {
                    profile: Arc::clone(&set.profile),
                    rule: Arc::clone(&rule.name),
                    severity: rule.severity,
                    since_ms,
                    starts_ms: due_ms,
                    summary,
                });
            }
            if is_idle(extra) {
                slot.extra = None;
            }
            rearm(&mut self.timers, slot, &DevKey(device), &set, self.start_s);
        }
        n
    }

    /// Watches `device` from its last uplink (`device_state.last_seen_ms`), at start.
    pub fn watch(&mut self, device: &Arc<Device>, set: &Arc<RuleSet>, last_seen_ms: i64) {
        if set.inactive.is_empty() {
            return;
        }
        let key = DevKey(Arc::clone(device));
        let slot = self.devices.entry(key.clone()).or_insert(Slot {
            last_seen_s: 0,
            armed_s: 0,
            extra: None,
        });
        slot.last_seen_s = slot.last_seen_s.max(secs(last_seen_ms));
        rearm(&mut self.timers, slot, &key, set, self.start_s);
    }

    /// Puts back a state loaded from the store (at start, before [`Self::watch`]); false
    /// when `set` no longer has the rule (the caller resolves it).
    pub fn restore(
        &mut self,
        device: &Arc<Device>,
        set: &Arc<RuleSet>,
        stored: &StoredAlert,
    ) -> bool {
        let firing = stored.state == "firing";
        if let Some(rule) = set.inactive.iter().find(|r| *r.name == *stored.rule) {
            if !firing {
                return false;
            }
            let slot = self
                .devices
                .entry(DevKey(Arc::clone(device)))
                .or_insert(Slot {
                    last_seen_s: 0,
                    armed_s: 0,
                    extra: None,
                });
            let extra = slot.extra.get_or_insert_with(Box::default);
            if !extra.silent.iter().any(|s| s.rule == rule.name) {
                extra.silent.push(Silent {
                    profile: Arc::clone(&set.profile),
                    rule: Arc::clone(&rule.name),
                    severity: rule.severity,
                    since_ms: stored.active_since_ms,
                    starts_ms: stored.firing_since_ms.unwrap_or(stored.active_since_ms),
                    summary: stored.summary.clone(),
                });
            }
            return true;
        }
        let active = Active {
            phase: if firing {
                Phase::Firing
            } else {
                Phase::Pending
            },
            since_ms: stored.active_since_ms,
            firing_ms: if firing {
                Some(stored.firing_since_ms.unwrap_or(stored.active_since_ms))
            } else {
                None
            },
        };
        let mut ignored = Vec::new();
        let rules = self.rules_mut(device, set, stored.active_since_ms, &mut ignored);
        let restored = rules.restore(&stored.rule, active);
        if rules.is_idle() {
            self.forget_rules(device.id());
        }
        restored
    }

    /// Devices with at least one inactive rule firing, by profile (the
    /// `nbiot_devices_silent` gauge at start).
    pub fn silent_by_profile(&self) -> HashMap<Arc<str>, usize> {
        let mut counts = HashMap::new();
        for slot in self.devices.values() {
            if let Some(s) = slot.extra.as_deref().and_then(|e| e.silent.first()) {
                *counts.entry(Arc::clone(&s.profile)).or_default() += 1;
            }
        }
        counts
    }

    /// The device's pending and firing rules (condition and inactive), by name: for tests
    /// and diagnostics.
    pub fn active(&self, device: &str) -> Vec<(String, Phase)> {
        let Some(extra) = self.devices.get(device).and_then(|s| s.extra.as_deref()) else {
            return Vec::new();
        };
        let mut out: Vec<(String, Phase)> = extra
            .silent
            .iter()
            .map(|s| (s.rule.to_string(), Phase::Firing))
            .collect();
        if let Some(rules) = &extra.rules {
            out.extend(rules.active().map(|(n, a)| (n.to_owned(), a.phase)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

fn is_idle(extra: &Extra) -> bool {
    extra.silent.is_empty() && extra.rules.as_ref().is_none_or(DeviceRules::is_idle)
}

fn compiled(
    sets: &mut HashMap<Box<str>, Compiled>,
    profile: &Arc<Profile>,
) -> Option<Arc<RuleSet>> {
    if let Some(c) = sets.get(profile.name.as_str()) {
        if Arc::ptr_eq(&c.profile, profile) {
            return c.set.clone();
        }
    }
    let set = match RuleSet::compile(profile) {
        Ok(set) if set.is_empty() => None,
        Ok(set) => Some(Arc::new(set)),
        Err(e) => {
            // `profiles check` compiles the same rules when the profile loads, so this
            // means the two disagree: a bug, logged once per profile version.
            tracing::error!(profile = %profile.name, error = %e, "Alert rules of a loaded profile do not compile; the profile's rules are off.");
            None
        }
    };
    sets.insert(
        profile.name.as_str().into(),
        Compiled {
            profile: Arc::clone(profile),
            set: set.clone(),
        },
    );
    set
}

/// The device spoke: every inactive rule firing for it resolves.
fn resolve_silence(
    extra: &mut Extra,
    device: &Arc<Device>,
    set: Option<&Arc<RuleSet>>,
    at_ms: i64,
    out: &mut Vec<Transition>,
) {
    let n = extra.silent.len();
    for (i, s) in extra.silent.drain(..).enumerate() {
        let silent_s = (at_ms - s.since_ms).max(0) as f64 / 1000.0;
        let summary = set
            .and_then(|set| {
                set.inactive
                    .iter()
                    .find(|r| r.name == s.rule)
                    .map(|r| set.silence_summary(r, device, silent_s.round()))
            })
            .unwrap_or(s.summary);
        out.push(Transition {
            device: Arc::clone(device),
            profile: s.profile,
            rule: s.rule,
            severity: s.severity,
            state: AlertState::Resolved,
            at_ms: at_ms.max(s.starts_ms),
            since_ms: s.since_ms,
            starts_ms: Some(s.starts_ms),
            value: Some(silent_s.round()),
            summary,
            received_at_ms: None,
            silent: if i + 1 == n { -1 } else { 0 },
        });
    }
}

fn disarm(timers: &mut BTreeSet<(u32, DevKey)>, slot: &mut Slot, key: &DevKey) {
    if slot.armed_s != 0 {
        timers.remove(&(slot.armed_s, key.clone()));
        slot.armed_s = 0;
    }
}

/// Sets the device's deadline to its next unfired inactive rule's.
fn rearm(
    timers: &mut BTreeSet<(u32, DevKey)>,
    slot: &mut Slot,
    key: &DevKey,
    set: &RuleSet,
    start_s: u32,
) {
    let base_s = slot.last_seen_s.max(start_s);
    let silent = slot.extra.as_deref().map_or(&[][..], |e| &e.silent[..]);
    let next = set
        .inactive
        .iter()
        .filter(|r| !silent.iter().any(|s| s.rule == r.name))
        .map(|r| base_s.saturating_add(after_s(r.after_ms)))
        .min();
    if next == Some(slot.armed_s) {
        return;
    }
    disarm(timers, slot, key);
    if let Some(deadline) = next {
        timers.insert((deadline, key.clone()));
        slot.armed_s = deadline;
    }
}
