//! The decoded form of a payload: [`Reading`]s with typed [`Value`]s.
//!
//! Field names are snake_case with the unit as a suffix (`volume_m3`, `temperature_c`,
//! `battery_pct`); see DESIGN.md "Decoded JSON". A reading's measurement is the codec's
//! default; a device profile replaces it with its own.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// A field or measurement name: static for built-in codecs (no allocation per decode),
/// shared for names that come from a profile (one allocation when the profile loads).
#[derive(Clone, Eq)]
pub enum Name {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Name {
    pub fn as_str(&self) -> &str {
        match self {
            Name::Static(s) => s,
            Name::Shared(s) => s,
        }
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl From<&'static str> for Name {
    fn from(s: &'static str) -> Self {
        Name::Static(s)
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name::Shared(Arc::from(s))
    }
}

impl From<Arc<str>> for Name {
    fn from(s: Arc<str>) -> Self {
        Name::Shared(s)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A typed field value. The type decides the InfluxDB line-protocol field type
/// (`Int` → `i`, `Float` → float, `Bool` → boolean, `Text` → string).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

impl Value {
    /// The value as a number, for rules and aggregation (`true` is 1).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            Value::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
            Value::Text(_) => None,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Int(i) => s.serialize_i64(*i),
            // JSON has no NaN/inf; a decoder never emits them (sentinels become absent
            // fields), but a layout with a float type could: print null rather than fail.
            Value::Float(f) if !f.is_finite() => s.serialize_none(),
            Value::Float(f) => s.serialize_f64(*f),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Text(t) => s.serialize_str(t),
        }
    }
}

/// A timestamp read from the device's own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTime {
    /// Seconds since the Unix epoch, UTC (e.g. Milesight history records).
    Utc(i64),
    /// A wall-clock time without a zone (e.g. CJ/T 188 real time, wM-Bus type F dates),
    /// as seconds since 1970-01-01T00:00:00 of that wall clock. The profile's `utc_offset`
    /// turns it into UTC.
    Local(i64),
    /// This many seconds before the uplink was received: successive samples batched in one
    /// uplink without their own clock (Milesight cellular records at the collecting interval).
    Ago(u32),
}

impl DeviceTime {
    /// UTC seconds, applying `utc_offset_s` to a local wall-clock time and counting
    /// [`DeviceTime::Ago`] back from `received_at` (UTC seconds).
    pub fn to_utc(self, utc_offset_s: i64, received_at: i64) -> i64 {
        match self {
            DeviceTime::Utc(t) => t,
            DeviceTime::Local(t) => t - utc_offset_s,
            DeviceTime::Ago(s) => received_at - i64::from(s),
        }
    }
}

impl Serialize for DeviceTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            DeviceTime::Utc(t) => s.serialize_str(&crate::time::format_rfc3339(t, true)),
            DeviceTime::Local(t) => s.serialize_str(&crate::time::format_rfc3339(t, false)),
            // No clock to anchor it to here: say what it is ("-60s", sixty seconds before receipt).
            DeviceTime::Ago(secs) => s.serialize_str(&format!("-{secs}s")),
        }
    }
}

/// Identity and link data a payload carries about its sender (the Milesight cellular
/// wrapper's IMEI, a Dragino device id, a meter address). The gateway compares it with the
/// registered device and uses `sequence` to detect gaps.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Identity {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u32>,
}

/// One decoded measurement: what `decode` prints and what the store and TSDB keep.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub measurement: Name,
    pub time: Option<DeviceTime>,
    pub fields: Vec<(Name, Value)>,
    pub identity: Option<Box<Identity>>,
}

impl Reading {
    pub fn new(measurement: impl Into<Name>) -> Self {
        Reading {
            measurement: measurement.into(),
            time: None,
            fields: Vec::new(),
            identity: None,
        }
    }

    /// Appends a field. Order is kept: it is the order of the payload.
    pub fn push(&mut self, name: impl Into<Name>, value: Value) {
        self.fields.push((name.into(), value));
    }

    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v)
    }
}

struct Fields<'a>(&'a [(Name, Value)]);

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k.as_str(), v)?;
        }
        map.end()
    }
}

impl Serialize for Reading {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = 3 + usize::from(self.identity.is_some());
        let mut map = s.serialize_map(Some(n))?;
        map.serialize_entry("measurement", &self.measurement)?;
        map.serialize_entry("time", &self.time)?;
        map.serialize_entry("fields", &Fields(&self.fields))?;
        if let Some(id) = &self.identity {
            map.serialize_entry("identity", id)?;
        }
        map.end()
    }
}
