//! The device registry: which devices exist, which profile decodes each one, their labels,
//! their alert-rule parameters and their (hashed) tokens.
//!
//! The database (table `devices`, `device_labels`; see `migrations/0001_registry.sql`) is
//! the source of truth. An in-memory index of every device, loaded at start, serves the
//! ingest hot path ([`Registry::lookup`], [`Registry::verify_token`]) without touching the
//! database. Every write updates the database and then the index while holding the store's
//! connection lock, so concurrent writers cannot leave the index disagreeing with the
//! database.
//!
//! The index also counts devices per profile, under the same lock, and mirrors the counts
//! into the `nbiot_devices_registered{profile}` gauge on every change (add, replace, remove,
//! import) and on [`Registry::publish_metrics`] (start, profile reload): a scrape never walks
//! the devices, and a profile whose last device went away reads 0 rather than a stale count.
//!
//! This module owns validation ([`validate`]), CSV import ([`csv`]) and the registry SQL
//! ([`db`]). It does not own HTTP (see `api`) or what a profile is (see `profiles`): a
//! device's profile must exist when it is registered, but a device whose profile later
//! disappears stays registered (the pipeline counts its uplinks as undecodable).

pub mod csv;
mod db;
pub mod token;
pub mod validate;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::{Serialize, Serializer};
use thiserror::Error;

use crate::profiles::{ProfileSet, SharedProfiles};
use crate::store::{Store, StoreError};
use crate::telemetry::metrics::DEVICES_REGISTERED;
pub use csv::{ImportMode, ImportReport, RowError};
pub use token::TokenHash;
pub use validate::{Field, FieldError, Problem};

/// A per-device parameter for alert rules (`$depth_m`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Number(f64),
    Text(String),
}

impl ParamValue {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            ParamValue::Number(n) => Some(*n),
            _ => None,
        }
    }
}

impl Serialize for ParamValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ParamValue::Bool(b) => s.serialize_bool(*b),
            ParamValue::Number(n) => s.serialize_f64(*n),
            ParamValue::Text(t) => s.serialize_str(t),
        }
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Number(n) => write!(f, "{n}"),
            ParamValue::Text(t) => write!(f, "{t}"),
        }
    }
}

/// What to do with a device's token on a write. The token is write-only (never returned),
/// so a client replacing a device cannot send the old one back: leaving it out keeps it.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum TokenUpdate {
    /// Keep the current token (none for a new device).
    #[default]
    Keep,
    /// Remove the token: the device may send without one.
    Clear,
    Set(String),
}

/// A device as a client submits it (`PUT /api/v1/devices/{id}`, one CSV row).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceSpec {
    pub profile: String,
    pub labels: BTreeMap<String, String>,
    pub params: BTreeMap<String, ParamValue>,
    pub token: TokenUpdate,
}

/// A registered device. Cheap to share (`Arc<Device>`); strings that repeat across devices
/// (profile names, label keys and values, param names) are interned.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    id: Arc<str>,
    profile: Arc<str>,
    /// Sorted by key.
    labels: Box<[(Arc<str>, Arc<str>)]>,
    /// Sorted by key.
    params: Box<[(Arc<str>, ParamValue)]>,
    token: Option<Box<TokenHash>>,
    created_at: i64,
    updated_at: i64,
}

impl Device {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn profile(&self) -> &str {
        &self.profile
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .and_then(|i| self.labels.get(i))
            .map(|(_, v)| &**v)
    }

    /// Labels in key order.
    pub fn labels(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.labels.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn param(&self, key: &str) -> Option<&ParamValue> {
        self.params
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .and_then(|i| self.params.get(i))
            .map(|(_, v)| v)
    }

    /// Params in key order.
    pub fn params(&self) -> impl ExactSizeIterator<Item = (&str, &ParamValue)> {
        self.params.iter().map(|(k, v)| (&**k, v))
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Unix seconds (UTC) of the first registration.
    pub fn created_at(&self) -> i64 {
        self.created_at
    }

    /// Unix seconds (UTC) of the last change.
    pub fn updated_at(&self) -> i64 {
        self.updated_at
    }

    /// Whether an uplink presenting `token` may speak for this device: a device without a
    /// token accepts any (or none); a device with one requires it.
    pub fn accepts_token(&self, token: Option<&str>) -> bool {
        match (&self.token, token) {
            (None, _) => true,
            (Some(hash), Some(t)) => hash.verify(t),
            (Some(_), None) => false,
        }
    }
}

/// The API form: `{"id","profile","labels","params","has_token","created_at","updated_at"}`
/// with RFC 3339 UTC times. The token is never serialized.
impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        struct Labels<'a>(&'a Device);
        impl Serialize for Labels<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.labels())
            }
        }
        struct Params<'a>(&'a Device);
        impl Serialize for Params<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.params())
            }
        }
        let mut m = s.serialize_map(Some(7))?;
        m.serialize_entry("id", &*self.id)?;
        m.serialize_entry("profile", &*self.profile)?;
        m.serialize_entry("labels", &Labels(self))?;
        m.serialize_entry("params", &Params(self))?;
        m.serialize_entry("has_token", &self.has_token())?;
        m.serialize_entry("created_at", &rfc3339(self.created_at))?;
        m.serialize_entry("updated_at", &rfc3339(self.updated_at))?;
        m.end()
    }
}

/// `2026-11-21T08:00:00Z`
pub fn rfc3339(unix_s: i64) -> String {
    nbiot_codecs::time::format_rfc3339(unix_s, true)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Why a registry operation failed.
#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("invalid device: {}", join(.0))]
    Invalid(Vec<FieldError>),

    #[error("device `{0}` is not registered")]
    NotFound(String),

    #[error("device `{0}` is already registered")]
    Exists(String),

    #[error("{} of {} row(s) are invalid; nothing was imported", .0.rejected, .0.rows)]
    Import(Box<ImportReport>),

    #[error("device `{id}` in the database is unreadable: {reason}")]
    Corrupt { id: String, reason: String },

    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        RegistryError::Store(StoreError::Sqlite(e))
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether a `put` may replace an existing device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Create or replace (HTTP `PUT`).
    Upsert,
    /// Create only; an existing id is [`RegistryError::Exists`] (`If-None-Match: *`).
    CreateOnly,
}

/// What a `put` did.
#[derive(Debug, Clone)]
pub struct PutOutcome {
    pub created: bool,
    pub device: Arc<Device>,
}

/// Filters and paging for [`Registry::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct ListFilter {
    pub profile: Option<String>,
    /// Every (key, value) must match.
    pub labels: Vec<(String, String)>,
    pub limit: u32,
    pub offset: u64,
}

impl ListFilter {
    pub const DEFAULT_LIMIT: u32 = 100;
    pub const MAX_LIMIT: u32 = 1000;
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            profile: None,
            labels: Vec::new(),
            limit: Self::DEFAULT_LIMIT,
            offset: 0,
        }
    }
}

/// One page of devices, ordered by id.
#[derive(Debug, Clone, Serialize)]
pub struct DevicePage {
    #[serde(serialize_with = "serialize_devices")]
    pub devices: Vec<Arc<Device>>,
    /// How many devices match the filter in all.
    pub total: u64,
    pub limit: u32,
    pub offset: u64,
}

fn serialize_devices<S: Serializer>(devices: &[Arc<Device>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(devices.iter().map(|d| &**d))
}

/// A validated registration, ready to write (token already hashed).
#[derive(Debug, Clone)]
struct Prepared {
    id: String,
    profile: String,
    labels: Vec<(String, String)>,
    params: Vec<(String, ParamValue)>,
    token: PreparedToken,
}

#[derive(Debug, Clone)]
enum PreparedToken {
    Keep,
    Clear,
    Set(TokenHash),
}

/// Validates `id` + `spec` against the profiles in force; every problem, not just the first.
fn prepare(id: &str, spec: DeviceSpec, profiles: &ProfileSet) -> Result<Prepared, Vec<FieldError>> {
    use validate::*;
    let mut errors = Vec::new();
    if let Err(p) = check_id(id) {
        errors.push(FieldError::new(Field::Id, p));
    }
    if spec.profile.is_empty() {
        errors.push(FieldError::new(Field::Profile, Problem::Missing));
    } else if profiles.get(&spec.profile).is_none() {
        errors.push(FieldError::new(
            Field::Profile,
            Problem::UnknownProfile {
                name: spec.profile.clone(),
            },
        ));
    }
    if spec.labels.len() > MAX_LABELS {
        errors.push(FieldError::new(
            Field::Labels,
            Problem::TooMany { max: MAX_LABELS },
        ));
    }
    for (k, v) in &spec.labels {
        if !is_valid_key(k) {
            errors.push(FieldError::new(Field::Label(k.clone()), Problem::BadKey));
        } else if let Err(p) = check_text(v) {
            errors.push(FieldError::new(Field::Label(k.clone()), p));
        }
    }
    if spec.params.len() > MAX_PARAMS {
        errors.push(FieldError::new(
            Field::Params,
            Problem::TooMany { max: MAX_PARAMS },
        ));
    }
    for (k, v) in &spec.params {
        if !is_valid_key(k) {
            errors.push(FieldError::new(Field::Param(k.clone()), Problem::BadKey));
        } else if let Err(p) = check_param(v) {
            errors.push(FieldError::new(Field::Param(k.clone()), p));
        }
    }
    let token = match spec.token {
        TokenUpdate::Keep => PreparedToken::Keep,
        TokenUpdate::Clear => PreparedToken::Clear,
        TokenUpdate::Set(t) => match check_token(&t) {
            Ok(()) => PreparedToken::Set(TokenHash::new(&t)),
            Err(p) => {
                errors.push(FieldError::new(Field::Token, p));
                PreparedToken::Keep
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Prepared {
        id: id.to_owned(),
        profile: spec.profile,
        labels: spec.labels.into_iter().collect(),
        params: spec.params.into_iter().collect(),
        token,
    })
}

/// Shares repeated strings between devices.
#[derive(Debug, Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return Arc::clone(a);
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(Arc::clone(&a));
        a
    }
}

/// Every registered device, and how many there are per profile (kept together, under one
/// lock, so the counts cannot drift from the map).
#[derive(Debug, Default)]
struct Index {
    devices: HashMap<Arc<str>, Arc<Device>>,
    /// Devices per (interned) profile name; profiles with none are absent.
    per_profile: HashMap<Arc<str>, usize>,
}

impl Index {
    fn get(&self, id: &str) -> Option<&Arc<Device>> {
        self.devices.get(id)
    }

    fn len(&self) -> usize {
        self.devices.len()
    }

    fn reserve(&mut self, additional: usize) {
        self.devices.reserve(additional);
    }

    /// Adds or replaces a device; returns the one it replaced.
    fn insert(&mut self, device: Arc<Device>) -> Option<Arc<Device>> {
        *self
            .per_profile
            .entry(Arc::clone(&device.profile))
            .or_default() += 1;
        let old = self.devices.insert(Arc::clone(&device.id), device);
        if let Some(old) = &old {
            self.uncount(&old.profile);
        }
        old
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Device>> {
        let old = self.devices.remove(id);
        if let Some(old) = &old {
            self.uncount(&old.profile);
        }
        old
    }

    fn uncount(&mut self, profile: &str) {
        if let Some(n) = self.per_profile.get_mut(profile) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_profile.remove(profile);
            }
        }
    }

    fn count(&self, profile: &str) -> usize {
        self.per_profile.get(profile).copied().unwrap_or(0)
    }

    /// Sets `nbiot_devices_registered{profile}` for each of `profiles` (0 when it has none).
    fn publish<'a>(&self, profiles: impl IntoIterator<Item = &'a str>) {
        for profile in profiles {
            metrics::gauge!(DEVICES_REGISTERED, "profile" => profile.to_owned())
                .set(self.count(profile) as f64);
        }
    }
}

#[derive(Debug)]
struct Inner {
    store: Arc<Store>,
    profiles: SharedProfiles,
    /// Every registered device. Lock order: store connection, then this, then `interner`.
    index: RwLock<Index>,
    interner: Mutex<Interner>,
}

/// The device registry. Cheap to clone: clones share one index and one store.
#[derive(Debug, Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl Registry {
    /// Loads every device from the store into the in-memory index.
    pub async fn open(
        store: Arc<Store>,
        profiles: SharedProfiles,
    ) -> Result<Registry, RegistryError> {
        tokio::task::spawn_blocking(move || Registry::open_blocking(store, profiles))
            .await
            .map_err(StoreError::from)?
    }

    /// [`Registry::open`] for code that is not in an async context.
    pub fn open_blocking(
        store: Arc<Store>,
        profiles: SharedProfiles,
    ) -> Result<Registry, RegistryError> {
        let mut interner = Interner::default();
        let devices = db::load_all(&store.lock(), &mut interner)?;
        let mut index = Index::default();
        index.reserve(devices.len());
        for d in devices {
            index.insert(Arc::new(d));
        }
        tracing::info!(devices = index.len(), "Loaded the device registry.");
        let registry = Registry {
            inner: Arc::new(Inner {
                store,
                profiles,
                index: RwLock::new(index),
                interner: Mutex::new(interner),
            }),
        };
        registry.publish_metrics();
        Ok(registry)
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    pub fn profiles(&self) -> &SharedProfiles {
        &self.inner.profiles
    }

    /// The device `id`, from memory (the ingest hot path: one hash lookup under a read lock).
    pub fn lookup(&self, id: &str) -> Option<Arc<Device>> {
        self.read_index().get(id).cloned()
    }

    /// Whether `token` may speak for device `id`: false for an unknown device; see
    /// [`Device::accepts_token`].
    pub fn verify_token(&self, id: &str, token: Option<&str>) -> bool {
        self.lookup(id).is_some_and(|d| d.accepts_token(token))
    }

    /// How many devices are registered.
    pub fn len(&self) -> usize {
        self.read_index().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registered devices per profile name (profiles with at least one device).
    pub fn count_by_profile(&self) -> BTreeMap<String, usize> {
        self.read_index()
            .per_profile
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect()
    }

    /// Sets `nbiot_devices_registered{profile}` for every profile that has devices or is
    /// loaded (0 for a loaded profile without devices, so the series exists from the start).
    /// Writes keep the gauge current themselves; call this after the profile set changed.
    pub fn publish_metrics(&self) {
        let loaded = self.inner.profiles.current();
        let index = self.read_index();
        index.publish(
            index
                .per_profile
                .keys()
                .map(|p| &**p)
                .chain(loaded.iter().map(|p| p.name.as_str())),
        );
    }

    /// Creates or replaces device `id`.
    pub async fn put(
        &self,
        id: &str,
        spec: DeviceSpec,
        mode: PutMode,
    ) -> Result<PutOutcome, RegistryError> {
        let prepared =
            prepare(id, spec, &self.inner.profiles.current()).map_err(RegistryError::Invalid)?;
        let inner = Arc::clone(&self.inner);
        self.inner
            .store
            .call(move |conn| {
                let existing = read(&inner.index).get(prepared.id.as_str()).cloned();
                if mode == PutMode::CreateOnly && existing.is_some() {
                    return Err(RegistryError::Exists(prepared.id));
                }
                let device = Arc::new(inner.build(prepared, existing.as_deref(), now_unix()));
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                db::write(&tx, &device, existing.is_some())?;
                tx.commit()?;
                let mut index = write(&inner.index);
                let replaced = index.insert(Arc::clone(&device));
                // Under the connection lock: gauge updates land in commit order.
                index.publish(
                    std::iter::once(device.profile())
                        .chain(replaced.as_deref().map(Device::profile)),
                );
                drop(index);
                Ok(PutOutcome {
                    created: existing.is_none(),
                    device,
                })
            })
            .await?
    }

    /// The device `id` (from the index, which every write keeps in step with the database).
    pub fn get(&self, id: &str) -> Option<Arc<Device>> {
        self.lookup(id)
    }

    /// Removes device `id`.
    pub async fn delete(&self, id: &str) -> Result<(), RegistryError> {
        let inner = Arc::clone(&self.inner);
        let id = id.to_owned();
        self.inner
            .store
            .call(move |conn| {
                let removed = db::delete(conn, &id)?;
                let mut index = write(&inner.index);
                if let Some(old) = index.remove(id.as_str()) {
                    index.publish([old.profile()]);
                }
                drop(index);
                if removed {
                    Ok(())
                } else {
                    Err(RegistryError::NotFound(id))
                }
            })
            .await?
    }

    /// Devices matching `filter`, ordered by id.
    pub async fn list(&self, filter: ListFilter) -> Result<DevicePage, RegistryError> {
        let inner = Arc::clone(&self.inner);
        self.inner
            .store
            .call(move |conn| {
                let (ids, total) = db::list_ids(conn, &filter)?;
                let index = read(&inner.index);
                // Under the connection lock the index equals the database, so every id is
                // there; `filter_map` only keeps this total if that ever stopped holding.
                let devices = ids
                    .iter()
                    .filter_map(|id| index.get(id.as_str()).cloned())
                    .collect();
                Ok(DevicePage {
                    devices,
                    total,
                    limit: filter.limit,
                    offset: filter.offset,
                })
            })
            .await?
    }

    /// Imports devices from CSV text (see [`csv`] for the format). All-or-nothing unless
    /// `mode` is [`ImportMode::Partial`]; either way every bad row is reported with its line.
    /// When nothing was imported because of bad rows the error is [`RegistryError::Import`].
    pub async fn import_csv(
        &self,
        text: String,
        mode: ImportMode,
    ) -> Result<ImportReport, RegistryError> {
        // Parsing and validating 100k rows (and hashing their tokens) is CPU work: off the
        // async workers, and outside the connection lock.
        let profiles = self.inner.profiles.current();
        let plan = tokio::task::spawn_blocking(move || csv::plan(&text, &profiles))
            .await
            .map_err(StoreError::from)?;
        let mut report = plan.report;
        if !report.errors.is_empty() && (mode == ImportMode::AllOrNothing || !plan.header_ok) {
            return Err(RegistryError::Import(Box::new(report)));
        }
        let inner = Arc::clone(&self.inner);
        let rows = plan.rows;
        let (created, updated) = self
            .inner
            .store
            .call(move |conn| -> Result<(usize, usize), RegistryError> {
                let now = now_unix();
                let devices: Vec<(Arc<Device>, bool)> = {
                    let index = read(&inner.index);
                    rows.into_iter()
                        .map(|p| {
                            let existing = index.get(p.id.as_str()).cloned();
                            let d = inner.build(p, existing.as_deref(), now);
                            (Arc::new(d), existing.is_some())
                        })
                        .collect()
                };
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                for (d, existed) in &devices {
                    db::write(&tx, d, *existed)?;
                }
                tx.commit()?;
                let updated = devices.iter().filter(|(_, existed)| *existed).count();
                let created = devices.len() - updated;
                let mut index = write(&inner.index);
                index.reserve(created);
                let mut touched: HashSet<Arc<str>> = HashSet::new();
                for (d, _) in devices {
                    touched.insert(Arc::clone(&d.profile));
                    if let Some(old) = index.insert(d) {
                        touched.insert(Arc::clone(&old.profile));
                    }
                }
                index.publish(touched.iter().map(|p| &**p));
                drop(index);
                Ok((created, updated))
            })
            .await??;
        report.created = created;
        report.updated = updated;
        report.imported = created + updated;
        tracing::info!(
            created,
            updated,
            rejected = report.rejected,
            "Imported devices from CSV."
        );
        Ok(report)
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        read(&self.inner.index)
    }
}

impl Inner {
    /// The device a prepared registration becomes, given the device it replaces.
    fn build(&self, p: Prepared, existing: Option<&Device>, now: i64) -> Device {
        let mut interner = self.interner.lock().unwrap_or_else(PoisonError::into_inner);
        let token = match p.token {
            PreparedToken::Keep => existing.and_then(|d| d.token.clone()),
            PreparedToken::Clear => None,
            PreparedToken::Set(hash) => Some(Box::new(hash)),
        };
        Device {
            id: existing.map_or_else(|| Arc::from(p.id.as_str()), |d| Arc::clone(&d.id)),
            profile: interner.get(&p.profile),
            labels: p
                .labels
                .iter()
                .map(|(k, v)| (interner.get(k), interner.get(v)))
                .collect(),
            params: p
                .params
                .into_iter()
                .map(|(k, v)| (interner.get(&k), v))
                .collect(),
            token,
            created_at: existing.map_or(now, |d| d.created_at),
            updated_at: now,
        }
    }
}

// A panic while holding the index lock cannot leave a half-written map entry (HashMap
// operations are not interrupted by our code), so poisoning is recovered from.
fn read(index: &RwLock<Index>) -> std::sync::RwLockReadGuard<'_, Index> {
    index.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(index: &RwLock<Index>) -> std::sync::RwLockWriteGuard<'_, Index> {
    index.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn device(id: &str, profile: &str) -> Arc<Device> {
        Arc::new(Device {
            id: Arc::from(id),
            profile: Arc::from(profile),
            labels: Box::new([]),
            params: Box::new([]),
            token: None,
            created_at: 0,
            updated_at: 0,
        })
    }

    /// Gauge values by their `profile` label, as a recorder sees them.
    #[derive(Default)]
    struct Gauges(Mutex<BTreeMap<String, Arc<AtomicU64>>>);

    struct GaugeCell(Arc<AtomicU64>);

    impl metrics::GaugeFn for GaugeCell {
        fn increment(&self, _: f64) {}
        fn decrement(&self, _: f64) {}
        fn set(&self, value: f64) {
            self.0.store(value.to_bits(), Ordering::Relaxed);
        }
    }

    impl metrics::Recorder for Gauges {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            metrics::Counter::noop()
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
        fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            assert_eq!(key.name(), DEVICES_REGISTERED);
            let labels: Vec<_> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            assert_eq!(labels.len(), 1, "{labels:?}");
            let (k, v) = labels.into_iter().next().unwrap();
            assert_eq!(k, "profile");
            let cell = Arc::clone(self.0.lock().unwrap().entry(v).or_default());
            metrics::Gauge::from_arc(Arc::new(GaugeCell(cell)))
        }
    }

    impl Gauges {
        fn values(&self) -> BTreeMap<String, f64> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), f64::from_bits(v.load(Ordering::Relaxed))))
                .collect()
        }
    }

    #[test]
    fn counts_per_profile_follow_adds_replacements_and_removals() {
        let gauges = Gauges::default();
        metrics::with_local_recorder(&gauges, || {
            let mut index = Index::default();
            assert!(index.insert(device("1", "meter")).is_none());
            assert!(index.insert(device("2", "meter")).is_none());
            assert!(index.insert(device("3", "watch")).is_none());
            index.publish(["meter", "watch", "cover"]);
            assert_eq!(
                gauges.values(),
                BTreeMap::from([
                    ("cover".to_owned(), 0.0),
                    ("meter".to_owned(), 2.0),
                    ("watch".to_owned(), 1.0),
                ])
            );
            // Moving a device to another profile counts it once, under the new one.
            let old = index.insert(device("3", "meter")).expect("replaced");
            index.publish(["meter", old.profile()]);
            assert_eq!(gauges.values()["meter"], 3.0);
            assert_eq!(gauges.values()["watch"], 0.0, "no stale count");
            assert_eq!(index.per_profile.get("watch"), None);
            // Removing; removing what is not there changes nothing.
            assert!(index.remove("1").is_some());
            assert!(index.remove("1").is_none());
            index.publish(["meter"]);
            assert_eq!(gauges.values()["meter"], 2.0);
            assert_eq!(index.len(), 2);
            assert_eq!(index.count("meter"), 2);
        });
    }
}
