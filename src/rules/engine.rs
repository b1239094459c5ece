//! A profile's compiled rule set ([`RuleSet`]) and one device's state under it
//! ([`DeviceRules`]): the condition rules' lifecycle, evaluated reading by reading.
//!
//! ```text
//!            expr true, for = 0
//!   ┌────────────────────────────────────────────┐
//!   │                                            ▼
//! inactive ──expr true──▶ pending ──held ≥ for──▶ firing ──clear true──▶ resolved (= inactive)
//!   ▲                        │                              (default clear: expr false)
//!   └──────expr false────────┘ (recorded as `resolved`, never fired)
//! ```
//!
//! Pure: the rule clock is the reading's time, handed in; nothing here logs, counts or
//! stores. The shard's [`super::state::ShardRules`] owns one `DeviceRules` per device that
//! has something to remember.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use nbiot_codecs::{Name, Value};

use super::expr::{
    Compiler, Env, EvalError, Expr, ExprError, FieldHistory, Symbols, MAX_FIELDS, MAX_PARAMS, NONE,
};
use super::template::{Context, Template};
use super::Transition;
use crate::alerts::AlertState;
use crate::profiles::{After, AlertKind, Profile, Severity};
use crate::registry::{Device, ParamValue};

/// Which part of a rule an error is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulePart {
    Expr,
    Clear,
    Summary,
}

impl std::fmt::Display for RulePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RulePart::Expr => "expr",
            RulePart::Clear => "clear",
            RulePart::Summary => "summary",
        })
    }
}

/// A rule that does not compile.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("alert `{rule}`, {part}: {error}")]
pub struct CompileError {
    pub rule: String,
    pub part: RulePart,
    pub error: ExprError,
}

/// One rule as written, with its durations resolved.
#[derive(Debug, Clone)]
pub struct RuleSource<'a> {
    pub name: &'a str,
    pub kind: AlertKind,
    pub expr: Option<&'a str>,
    pub clear: Option<&'a str>,
    pub for_: Option<Duration>,
    /// `after` of an inactive rule, as a duration.
    pub after: Option<Duration>,
    pub severity: Severity,
    pub summary: &'a str,
}

/// A condition rule, compiled.
#[derive(Debug)]
pub struct ExprRule {
    pub name: Arc<str>,
    pub severity: Severity,
    expr: Expr,
    clear: Option<Expr>,
    pub for_ms: i64,
    summary: Template,
}

/// A silence rule (`kind = "inactive"`), compiled.
#[derive(Debug)]
pub struct InactiveRule {
    pub name: Arc<str>,
    pub severity: Severity,
    pub after_ms: i64,
    summary: Template,
}

/// The rules of one profile, compiled once per profile version.
#[derive(Debug)]
pub struct RuleSet {
    pub profile: Arc<str>,
    pub utc_offset_s: i64,
    pub rules: Box<[ExprRule]>,
    /// Sorted by `after_ms`, shortest first.
    pub inactive: Box<[InactiveRule]>,
    symbols: Symbols,
    /// (field name, slot), sorted by name: a reading's fields are matched against it once.
    field_index: Box<[(Box<str>, u16)]>,
}

/// Compiles rules one by one (so `profiles check` can point at each).
pub struct Builder<'k> {
    profile: Arc<str>,
    utc_offset_s: i64,
    symbols: Symbols,
    known: Option<&'k BTreeSet<String>>,
    rules: Vec<ExprRule>,
    inactive: Vec<InactiveRule>,
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl<'k> Builder<'k> {
    /// `known`: the fields the profile's codec produces, to refuse rules naming others
    /// (None: trust the names, e.g. for a profile that was checked when it loaded).
    pub fn new(profile: &str, utc_offset_s: i64, known: Option<&'k BTreeSet<String>>) -> Self {
        Builder {
            profile: profile.into(),
            utc_offset_s,
            symbols: Symbols::default(),
            known,
            rules: Vec::new(),
            inactive: Vec::new(),
        }
    }

    pub fn add(&mut self, src: &RuleSource<'_>) -> Result<(), CompileError> {
        let err = |part, error| CompileError {
            rule: src.name.to_owned(),
            part,
            error,
        };
        let mut c = Compiler {
            symbols: &mut self.symbols,
            known: self.known,
        };
        match src.kind {
            AlertKind::Expr => {
                let text = src.expr.unwrap_or_default();
                let expr = c.condition(text).map_err(|e| err(RulePart::Expr, e))?;
                let clear = src
                    .clear
                    .map(|t| c.condition(t))
                    .transpose()
                    .map_err(|e| err(RulePart::Clear, e))?;
                let summary = Template::compile(src.summary, &mut c, true)
                    .map_err(|e| err(RulePart::Summary, e))?;
                self.rules.push(ExprRule {
                    name: src.name.into(),
                    severity: src.severity,
                    expr,
                    clear,
                    for_ms: src.for_.map_or(0, duration_ms),
                    summary,
                });
            }
            AlertKind::Inactive => {
                let summary = Template::compile(src.summary, &mut c, false)
                    .map_err(|e| err(RulePart::Summary, e))?;
                if let Some(after) = src.after {
                    self.inactive.push(InactiveRule {
                        name: src.name.into(),
                        severity: src.severity,
                        after_ms: duration_ms(after).max(1000),
                        summary,
                    });
                }
            }
        }
        Ok(())
    }

    pub fn finish(self) -> RuleSet {
        let mut field_index: Vec<(Box<str>, u16)> = self
            .symbols
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| (f.clone(), u16::try_from(i).unwrap_or(NONE)))
            .collect();
        field_index.sort();
        let mut inactive = self.inactive;
        inactive.sort_by_key(|r| r.after_ms);
        RuleSet {
            profile: self.profile,
            utc_offset_s: self.utc_offset_s,
            rules: self.rules.into(),
            inactive: inactive.into(),
            symbols: self.symbols,
            field_index: field_index.into(),
        }
    }
}

impl RuleSet {
    /// Compiles the rules of a loaded (already checked) profile.
    pub fn compile(profile: &Profile) -> Result<RuleSet, CompileError> {
        let mut b = Builder::new(&profile.name, profile.utc_offset_s, None);
        for a in &profile.alerts {
            let after = match a.after {
                Some(After::Duration(d)) => Some(d),
                Some(After::Intervals(n)) => profile
                    .report_interval
                    .and_then(|r| Duration::try_from_secs_f64(r.as_secs_f64() * n).ok()),
                None => None,
            };
            b.add(&RuleSource {
                name: &a.name,
                kind: a.kind,
                expr: a.expr.as_deref(),
                clear: a.clear.as_deref(),
                for_: a.for_,
                after,
                severity: a.severity,
                summary: &a.summary,
            })?;
        }
        Ok(b.finish())
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.inactive.is_empty()
    }

    /// Fields whose history `delta`/`rate` need, with the longest window in seconds.
    pub fn history_fields(&self) -> impl ExactSizeIterator<Item = (&str, i64)> {
        self.symbols.history.iter().map(|(slot, w)| {
            (
                self.symbols
                    .fields
                    .get(usize::from(*slot))
                    .map_or("", |f| &**f),
                *w,
            )
        })
    }

    pub fn needs_history(&self) -> bool {
        !self.symbols.history.is_empty()
    }

    /// Fills `slots` (field slot → index in `fields`) for one reading.
    fn resolve(&self, fields: &[(Name, Value)], slots: &mut [u16; MAX_FIELDS]) {
        for (i, (name, _)) in fields.iter().enumerate() {
            if let Ok(k) = self
                .field_index
                .binary_search_by(|(n, _)| (**n).cmp(name.as_str()))
            {
                if let Some((_, slot)) = self.field_index.get(k) {
                    if let (Some(s), Ok(i)) = (slots.get_mut(usize::from(*slot)), u16::try_from(i))
                    {
                        if *s == NONE {
                            *s = i;
                        }
                    }
                }
            }
        }
    }

    /// The device's values of this set's `$params`.
    fn params<'d>(&self, device: &'d Device, out: &mut [Option<&'d ParamValue>; MAX_PARAMS]) {
        for (slot, name) in out.iter_mut().zip(self.symbols.params.iter()) {
            *slot = device.param(name);
        }
    }

    /// Renders an inactive rule's summary (no reading: only the device and its params).
    pub(crate) fn silence_summary(
        &self,
        rule: &InactiveRule,
        device: &Device,
        silent_s: f64,
    ) -> String {
        let mut params = [None; MAX_PARAMS];
        self.params(device, &mut params);
        let slots = [NONE; MAX_FIELDS];
        let env = Env {
            fields: &[],
            slots: slots.get(..self.symbols.fields.len()).unwrap_or_default(),
            params: params.get(..self.symbols.params.len()).unwrap_or_default(),
            history: &[],
            time_s: 0,
            utc_offset_s: self.utc_offset_s,
        };
        rule.summary.render(&Context {
            device: device.id(),
            profile: &self.profile,
            rule: &rule.name,
            value: Some(silent_s),
            env: &env,
        })
    }

    fn rule_index(&self, name: &str) -> Option<u16> {
        self.rules
            .iter()
            .position(|r| &*r.name == name)
            .and_then(|i| u16::try_from(i).ok())
    }
}

/// Where a condition rule is (inactive rules have no entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Firing,
}

/// A rule that is pending or firing for a device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Active {
    pub phase: Phase,
    /// When the condition started to hold (rule clock, ms).
    pub since_ms: i64,
    /// When it started firing.
    pub firing_ms: Option<i64>,
}

/// A rule that could not be evaluated on a reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub rule: Arc<str>,
    pub error: EvalError,
    /// The `$param` name for [`EvalError::MissingParam`].
    pub param: Option<Box<str>>,
    /// The first time for this device and rule (log it; count every one).
    pub first: bool,
}

/// One device's condition-rule state under one [`RuleSet`].
#[derive(Debug)]
pub struct DeviceRules {
    set: Arc<RuleSet>,
    /// The rule clock (ms): readings never move it backwards.
    clock_ms: i64,
    /// Rules that are pending or firing, by index in `set.rules`.
    states: Vec<(u16, Active)>,
    /// By history slot of `set`.
    history: Box<[FieldHistory]>,
    history_loaded: bool,
    /// Rules (by index, the first 64) whose evaluation error has been logged.
    logged: u64,
}

impl DeviceRules {
    pub fn new(set: Arc<RuleSet>) -> DeviceRules {
        let history = (0..set.symbols.history.len())
            .map(|_| FieldHistory::default())
            .collect();
        DeviceRules {
            set,
            clock_ms: i64::MIN,
            states: Vec::new(),
            history,
            history_loaded: false,
            logged: 0,
        }
    }

    pub fn set(&self) -> &Arc<RuleSet> {
        &self.set
    }

    /// Nothing to remember: no active rule, no history, no logged error.
    pub fn is_idle(&self) -> bool {
        self.states.is_empty() && self.history.is_empty() && self.logged == 0
    }

    /// The pending and firing rules, by name.
    pub fn active(&self) -> impl Iterator<Item = (&str, Active)> + '_ {
        self.states
            .iter()
            .filter_map(|(i, a)| self.set.rules.get(usize::from(*i)).map(|r| (&*r.name, *a)))
    }

    /// Puts back a state loaded from the store; false when the set has no such rule.
    pub fn restore(&mut self, rule: &str, active: Active) -> bool {
        let Some(i) = self.set.rule_index(rule) else {
            return false;
        };
        self.states.retain(|(j, _)| *j != i);
        self.states.push((i, active));
        self.clock_ms = self
            .clock_ms
            .max(active.firing_ms.unwrap_or(active.since_ms));
        true
    }

    /// Whether the history `delta`/`rate` need should be loaded from the store first.
    pub fn wants_history(&self) -> bool {
        !self.history.is_empty() && !self.history_loaded
    }

    /// Fills the history from stored readings (`data[slot]`: oldest first), once.
    pub fn load_history(&mut self, data: Vec<Vec<(i64, f64)>>) {
        self.history_loaded = true;
        for ((h, samples), (_, window)) in self
            .history
            .iter_mut()
            .zip(data)
            .zip(self.set.symbols.history.iter())
        {
            let mut loaded = FieldHistory::default();
            for (t, v) in samples {
                loaded.push(t, v, *window);
            }
            // Samples taken in memory already are newer than anything stored.
            for (t, v) in h.samples() {
                loaded.push(t, v, *window);
            }
            *h = loaded;
        }
    }

    /// Moves to another version of the rules (a profile reload, a device moved to another
    /// profile): states of rules that still exist (same profile, same name) are kept;
    /// the others are resolved.
    pub fn rebind(
        &mut self,
        set: &Arc<RuleSet>,
        device: &Arc<Device>,
        at_ms: i64,
        out: &mut Vec<Transition>,
    ) {
        if Arc::ptr_eq(&self.set, set) {
            return;
        }
        let old = std::mem::replace(&mut self.set, Arc::clone(set));
        let same_profile = old.profile == set.profile;
        let mut kept = Vec::with_capacity(self.states.len());
        for (i, a) in self.states.drain(..) {
            let Some(rule) = old.rules.get(usize::from(i)) else {
                continue;
            };
            match set.rule_index(&rule.name).filter(|_| same_profile) {
                Some(j) => kept.push((j, a)),
                None => out.push(ended(device, &old.profile, rule, a, at_ms)),
            }
        }
        self.states = kept;
        if old.symbols.history != set.symbols.history || old.symbols.fields != set.symbols.fields {
            self.history = (0..set.symbols.history.len())
                .map(|_| FieldHistory::default())
                .collect();
            self.history_loaded = false;
        }
        self.logged = 0;
    }

    /// Resolves every active rule (the device was removed, or its profile lost its rules).
    pub fn resolve_all(&mut self, device: &Arc<Device>, at_ms: i64, out: &mut Vec<Transition>) {
        for (i, a) in self.states.drain(..) {
            if let Some(rule) = self.set.rules.get(usize::from(i)) {
                out.push(ended(device, &self.set.profile, rule, a, at_ms));
            }
        }
    }

    /// Evaluates every condition rule on one reading taken at `time_ms` (its time as
    /// stored: the device's clock or the receive time) and received at `received_at_ms`.
    ///
    /// The rule clock is `time_ms`, but never later than the receive time. A reading
    /// older than the last one evaluated (a register the device stored earlier, a backlog
    /// sent out of order) only joins the history: the states have moved past it. A pending
    /// rule is promoted to firing by the first reading, at least `for` after the condition
    /// started to hold, on which the condition still holds.
    pub fn evaluate(
        &mut self,
        device: &Arc<Device>,
        fields: &[(Name, Value)],
        time_ms: i64,
        received_at_ms: i64,
        out: &mut Vec<Transition>,
        issues: &mut Vec<Issue>,
    ) {
        let set = Arc::clone(&self.set);
        let now_ms = time_ms.min(received_at_ms);
        let in_order = now_ms >= self.clock_ms;
        self.clock_ms = self.clock_ms.max(now_ms);
        let mut slots = [NONE; MAX_FIELDS];
        set.resolve(fields, &mut slots);
        if !in_order {
            self.record(&slots, fields, now_ms);
            return;
        }
        let mut params = [None; MAX_PARAMS];
        set.params(device, &mut params);
        let env = Env {
            fields,
            slots: slots.get(..set.symbols.fields.len()).unwrap_or_default(),
            params: params.get(..set.symbols.params.len()).unwrap_or_default(),
            history: &self.history,
            time_s: now_ms.div_euclid(1000),
            utc_offset_s: set.utc_offset_s,
        };
        for (i, rule) in set.rules.iter().enumerate() {
            let Ok(index) = u16::try_from(i) else { break };
            let pos = self.states.iter().position(|(r, _)| *r == index);
            let current = pos.and_then(|p| self.states.get(p)).map(|(_, a)| *a);
            // Firing rules look at `clear` (or the negated condition); the others at `expr`.
            let (condition, clears) = match (current, &rule.clear) {
                (
                    Some(Active {
                        phase: Phase::Firing,
                        ..
                    }),
                    Some(clear),
                ) => (clear, true),
                (
                    Some(Active {
                        phase: Phase::Firing,
                        ..
                    }),
                    None,
                ) => (&rule.expr, false),
                _ => (&rule.expr, false),
            };
            let (truth, value) = match condition.eval(&env) {
                Ok(r) => r,
                Err(error) => {
                    let bit = 1u64.checked_shl(u32::from(index)).unwrap_or(0);
                    let first = self.logged & bit == 0;
                    self.logged |= bit;
                    let param = match error {
                        EvalError::MissingParam(s) => {
                            set.symbols.params.get(usize::from(s)).cloned()
                        }
                        EvalError::Type { .. } => None,
                    };
                    issues.push(Issue {
                        rule: Arc::clone(&rule.name),
                        error,
                        param,
                        first,
                    });
                    continue;
                }
            };
            let Some(truth) = truth else {
                // Unknown: a field it needs is missing. Keep the state as it is.
                continue;
            };
            let next = match current {
                None if truth && rule.for_ms == 0 => Some(Active {
                    phase: Phase::Firing,
                    since_ms: now_ms,
                    firing_ms: Some(now_ms),
                }),
                None if truth => Some(Active {
                    phase: Phase::Pending,
                    since_ms: now_ms,
                    firing_ms: None,
                }),
                None => continue,
                Some(
                    a @ Active {
                        phase: Phase::Pending,
                        ..
                    },
                ) => {
                    if !truth {
                        None
                    } else if now_ms - a.since_ms >= rule.for_ms {
                        Some(Active {
                            phase: Phase::Firing,
                            since_ms: a.since_ms,
                            firing_ms: Some(now_ms),
                        })
                    } else {
                        continue;
                    }
                }
                Some(Active {
                    phase: Phase::Firing,
                    ..
                }) => {
                    // `clear` resolves when it holds; the default (`not expr`) when expr fails.
                    if truth == clears {
                        None
                    } else {
                        continue;
                    }
                }
            };
            let summary = rule.summary.render(&Context {
                device: device.id(),
                profile: &set.profile,
                rule: &rule.name,
                value,
                env: &env,
            });
            let (state, since_ms, starts_ms) = match (next, current) {
                (Some(a), _) => (
                    match a.phase {
                        Phase::Pending => AlertState::Pending,
                        Phase::Firing => AlertState::Firing,
                    },
                    a.since_ms,
                    a.firing_ms,
                ),
                (None, Some(a)) => (AlertState::Resolved, a.since_ms, a.firing_ms),
                (None, None) => continue,
            };
            out.push(Transition {
                device: Arc::clone(device),
                profile: Arc::clone(&set.profile),
                rule: Arc::clone(&rule.name),
                severity: rule.severity,
                state,
                at_ms: now_ms,
                since_ms,
                starts_ms,
                value,
                summary,
                received_at_ms: Some(received_at_ms),
                silent: 0,
            });
            match (next, pos) {
                (Some(a), Some(p)) => {
                    if let Some(s) = self.states.get_mut(p) {
                        s.1 = a;
                    }
                }
                (Some(a), None) => self.states.push((index, a)),
                (None, Some(p)) => {
                    self.states.swap_remove(p);
                }
                (None, None) => {}
            }
        }
        // The reading becomes history for the next ones.
        self.record(&slots, fields, now_ms);
    }

    /// Adds a reading's values to the history `delta`/`rate` read.
    fn record(&mut self, slots: &[u16; MAX_FIELDS], fields: &[(Name, Value)], at_ms: i64) {
        let t_s = at_ms.div_euclid(1000);
        for (h, (slot, window)) in self.history.iter_mut().zip(self.set.symbols.history.iter()) {
            let value = slots
                .get(usize::from(*slot))
                .and_then(|i| fields.get(usize::from(*i)))
                .and_then(|(_, v)| match v {
                    Value::Int(i) => Some(*i as f64),
                    Value::Float(f) if f.is_finite() => Some(*f),
                    _ => None,
                });
            if let Some(v) = value {
                h.push(t_s, v, *window);
            }
        }
    }
}

/// The `resolved` transition of a rule that ended without its condition deciding (removed
/// rule, removed device).
fn ended(
    device: &Arc<Device>,
    profile: &Arc<str>,
    rule: &ExprRule,
    a: Active,
    at_ms: i64,
) -> Transition {
    Transition {
        device: Arc::clone(device),
        profile: Arc::clone(profile),
        rule: Arc::clone(&rule.name),
        severity: rule.severity,
        state: AlertState::Resolved,
        at_ms: at_ms.max(a.since_ms),
        since_ms: a.since_ms,
        starts_ms: a.firing_ms,
        value: None,
        summary: format!(
            "{}: rule `{}` no longer applies to {}",
            profile,
            rule.name,
            device.id()
        ),
        received_at_ms: None,
        silent: 0,
    }
}
