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

/// The text of a [`Value::Text`] or a device id, built without a heap allocation in the
/// common cases: a static label (`"moving"`, `"water"`), or up to [`Text::INLINE_CAP`]
/// bytes stored inline (an IMEI or IMSI, a serial number, a meter id or address). Longer
/// text (an ICCID, a MAC address, a hex dump) is on the heap, owned, or shared with the
/// profile that names it. Compares, hashes, prints and serialises as the string it holds.
#[derive(Clone)]
pub struct Text(Repr);

/// Words of inline text: two keep a `Text` and a [`Value`] at 24 bytes, like `String`. A
/// third (ICCIDs and MAC addresses inline) made every field 8 bytes longer, and the
/// cellular and wM-Bus decodes 10-20 % slower (measured with the `codecs` bench).
const WORDS: usize = 2;

/// Why this shape: the variants pack around the niche of `String`'s capacity, so that every
/// variant is written as whole 8-byte words (the discriminant is a niche value in the first
/// word), and inline text is words built in registers. A value written byte by byte and
/// read back by a wider move stalls the CPU's store-to-load forwarding: a tag byte with 22
/// inline bytes (ICCIDs and MAC addresses inline) measured slower on every codec than this
/// shape with its few allocations (`codecs` bench).
#[derive(Clone)]
enum Repr {
    Owned(String),
    Static(&'static str),
    Shared(Arc<str>),
    /// Up to `8 * WORDS` bytes of text without NUL, padded with NUL (little-endian words).
    Inline([[u8; 8]; WORDS]),
}

impl Text {
    /// The longest text kept inline (text with a NUL byte is never inline).
    pub const INLINE_CAP: usize = 8 * WORDS;

    /// A static label: no allocation, no copy.
    pub const fn from_static(s: &'static str) -> Text {
        Text(Repr::Static(s))
    }

    /// A copy of `s`: inline when it fits, else on the heap.
    pub fn new(s: &str) -> Text {
        Self::inline(s.as_bytes()).unwrap_or_else(|| Text(Repr::Owned(s.to_owned())))
    }

    /// A copy of `bytes` when they are ASCII (no UTF-8 check needed then); `None` otherwise.
    pub fn from_ascii(bytes: &[u8]) -> Option<Text> {
        if let Some(words) = load_words(bytes) {
            if words.iter().fold(0, |acc, w| acc | w) & HIGH_BITS != 0 {
                return None;
            }
            if let Some(t) = Self::inline_words(words, bytes.len()) {
                return Some(t);
            }
        }
        // ASCII is UTF-8.
        let s = std::str::from_utf8(bytes).ok().filter(|s| s.is_ascii())?;
        Some(Text(Repr::Owned(s.to_owned())))
    }

    /// `bytes` (UTF-8) inline, if they fit and hold no NUL.
    fn inline(bytes: &[u8]) -> Option<Text> {
        Self::inline_words(load_words(bytes)?, bytes.len())
    }

    /// `len` bytes of UTF-8 packed by [`load_words`] as inline text, unless one is a NUL
    /// (it would read as padding).
    fn inline_words(words: [u64; WORDS], len: usize) -> Option<Text> {
        // The padding bytes are zero: mark them before looking for a NUL in the text.
        let nul = words
            .iter()
            .enumerate()
            .any(|(i, w)| has_zero_byte(w | padding(len.saturating_sub(8 * i))));
        (!nul).then_some(Text(Repr::Inline(words.map(u64::to_le_bytes))))
    }

    /// Inline text from little-endian words of ASCII padded with NUL, which the caller
    /// builds in registers (hex digits). `None` unless ASCII.
    pub(crate) fn from_ascii_words(words: [u64; WORDS]) -> Option<Text> {
        (words.iter().fold(0, |acc, w| acc | w) & HIGH_BITS == 0)
            .then_some(Text(Repr::Inline(words.map(u64::to_le_bytes))))
    }

    /// ASCII text from the bytes `bytes` yields (reversed text, ...): inline when it fits;
    /// `None` unless every byte is ASCII.
    pub fn from_ascii_iter(bytes: impl IntoIterator<Item = u8>) -> Option<Text> {
        // Packed into words as they come (see `Repr`), until they overflow.
        let mut words = [0u64; WORDS];
        let mut n = 0;
        let mut bytes = bytes.into_iter();
        while let Some(b) = bytes.next() {
            match words.get_mut(n / 8) {
                Some(w) => *w |= u64::from(b) << (8 * (n % 8)),
                None => {
                    let head = words.map(u64::to_le_bytes);
                    let head = head.as_flattened().iter().copied();
                    return Self::owned_ascii(head.chain(std::iter::once(b)).chain(bytes));
                }
            }
            n += 1;
        }
        if words.iter().fold(0, |acc, w| acc | w) & HIGH_BITS != 0 {
            return None;
        }
        Self::inline_words(words, n).or_else(|| {
            let text = words.map(u64::to_le_bytes);
            Self::owned_ascii(text.as_flattened().iter().copied().take(n))
        })
    }

    /// Heap text of the bytes `bytes` yields; `None` unless ASCII.
    fn owned_ascii(bytes: impl Iterator<Item = u8>) -> Option<Text> {
        let mut s = String::new();
        for b in bytes {
            if !b.is_ascii() {
                return None;
            }
            s.push(char::from(b));
        }
        Some(Text(Repr::Owned(s)))
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Owned(s) => s,
            Repr::Static(s) => s,
            Repr::Shared(s) => s,
            // Never fails: inline bytes are UTF-8 by construction (see `inline_words`).
            Repr::Inline(_) => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
        }
    }

    /// The bytes, without the UTF-8 check `as_str` makes on inline text.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Owned(s) => s.as_bytes(),
            Repr::Static(s) => s.as_bytes(),
            Repr::Shared(s) => s.as_bytes(),
            Repr::Inline(words) => {
                // The NUL padding is the high bytes of the last word in use.
                let len = words
                    .iter()
                    .map(|w| u64::from_le_bytes(*w))
                    .enumerate()
                    .rfind(|&(_, w)| w != 0)
                    .map_or(0, |(i, w)| 8 * i + 8 - w.leading_zeros() as usize / 8);
                words.as_flattened().get(..len).unwrap_or_default()
            }
        }
    }
}

const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
const LOW_BITS: u64 = 0x0101_0101_0101_0101;

/// Whether a byte of `v` is zero (the classic bit trick: no borrow reaches a byte's high
/// bit unless that byte was zero).
fn has_zero_byte(v: u64) -> bool {
    v.wrapping_sub(LOW_BITS) & !v & HIGH_BITS != 0
}

/// 0x01 in each padding byte of a word that holds `n` bytes of text (8 or more: none).
fn padding(n: usize) -> u64 {
    match n {
        0 => LOW_BITS,
        1..=7 => LOW_BITS << (8 * n),
        _ => 0,
    }
}

/// Up to `8 * WORDS` bytes as little-endian words padded with zero bytes; `None` for more.
/// Loaded as whole (overlapping) words rather than byte by byte.
fn load_words(bytes: &[u8]) -> Option<[u64; WORDS]> {
    let n = bytes.len();
    if n > Text::INLINE_CAP {
        return None;
    }
    let u64_at = |at: usize| {
        bytes
            .get(at..)
            .and_then(|b| b.first_chunk::<8>())
            .map_or(0, |w| u64::from_le_bytes(*w))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..)
            .and_then(|b| b.first_chunk::<4>())
            .map_or(0, |w| u64::from(u32::from_le_bytes(*w)))
    };
    let mut words = [0u64; WORDS];
    match n {
        0..=3 => words[0] = bytes.iter().rev().fold(0, |w, &b| w << 8 | u64::from(b)),
        // Two overlapping 4-byte loads; the overlap holds the same bytes in both.
        4..=7 => words[0] = u32_at(0) | u32_at(n - 4) << (8 * (n - 4)),
        _ => {
            for (i, w) in words.iter_mut().enumerate().take(n / 8) {
                *w = u64_at(8 * i);
            }
            // The last 8 bytes, shifted down past the ones the full words hold.
            if let Some(w) = words.get_mut(n / 8).filter(|_| n % 8 != 0) {
                *w = u64_at(n - 8) >> (8 * (8 - n % 8));
            }
        }
    }
    Some(words)
}

impl Default for Text {
    fn default() -> Self {
        Text::from_static("")
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Text {}

impl std::hash::Hash for Text {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, without the UTF-8 check of inline text.
        state.write(self.as_bytes());
        state.write_u8(0xff);
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<Text> for str {
    fn eq(&self, other: &Text) -> bool {
        other == self
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        other == self
    }
}

impl PartialEq<Text> for String {
    fn eq(&self, other: &Text) -> bool {
        other == self
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text::from_static(s)
    }
}

impl From<String> for Text {
    /// The string's own buffer (already allocated: nothing to gain by copying it inline).
    fn from(s: String) -> Self {
        Text(Repr::Owned(s))
    }
}

impl From<Arc<str>> for Text {
    fn from(s: Arc<str>) -> Self {
        Text(Repr::Shared(s))
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Text {
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
    Text(Text),
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
    pub device_id: Option<Text>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u32>,
}

/// One decoded measurement: what `decode` prints and what the store and TSDB keep.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub measurement: Name,
    pub time: Option<DeviceTime>,
    pub fields: Vec<(Name, Value)>,
    pub identity: Option<Identity>,
}

impl Reading {
    pub fn new(measurement: impl Into<Name>) -> Self {
        Self::with_capacity(measurement, 0)
    }

    /// A reading with room for `fields` fields: decoders that know how many fields they
    /// write allocate once.
    pub fn with_capacity(measurement: impl Into<Name>, fields: usize) -> Self {
        Reading {
            measurement: measurement.into(),
            time: None,
            fields: Vec::with_capacity(fields),
            identity: None,
        }
    }

    /// Appends a field. Order is kept: it is the order of the payload.
    ///
    /// Decoders reserve the fields they expect ([`Reading::with_capacity`]), and then the
    /// field is written straight into the vector. A plain `Vec::push`, whose growing path
    /// is inline, builds the field on the stack and copies it over; reading back what was
    /// just written piece by piece stalls the CPU (store-to-load forwarding): 13 fields took
    /// 110 ns that way and 40 ns this way on the bench machine.
    #[inline]
    pub fn push(&mut self, name: impl Into<Name>, value: Value) {
        push(&mut self.fields, (name.into(), value));
    }

    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, v)| v)
    }
}

/// `Vec::push` that writes `x` straight into spare capacity when there is some (see
/// [`Reading::push`]); decoders use it for fields and readings alike.
#[inline(always)]
pub(crate) fn push<T>(v: &mut Vec<T>, x: T) {
    if v.len() < v.capacity() {
        v.push(x);
    } else {
        push_growing(v, x);
    }
}

/// The growing path of [`push`], kept out of line so that the common path knows the vector
/// has room.
#[cold]
#[inline(never)]
fn push_growing<T>(v: &mut Vec<T>, x: T) {
    v.push(x);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_small_and_keeps_value_small() {
        // The inline words and the discriminant word; `Value`'s variants use more niche values
        // of the same word, as they did with `String`.
        assert_eq!(std::mem::size_of::<Text>(), 8 + 8 * WORDS);
        assert_eq!(std::mem::size_of::<Value>(), 8 + 8 * WORDS);
        assert_eq!(std::mem::size_of::<Option<Text>>(), 8 + 8 * WORDS);
    }

    #[test]
    fn text_forms_compare_print_and_serialise_alike() {
        let long = "x".repeat(Text::INLINE_CAP + 1);
        let exact = "y".repeat(Text::INLINE_CAP);
        let forms = [
            (Text::from_static("moving"), "moving"),
            (Text::new("moving"), "moving"),
            (Text::from("moving".to_owned()), "moving"),
            (
                Text::from_ascii(b"89861120220013228893").unwrap(),
                "89861120220013228893",
            ),
            (
                Text::from_ascii(b"460113112062931").unwrap(),
                "460113112062931",
            ),
            (
                Text::from_ascii_iter(*b"0123456789abcdefg").unwrap(),
                "0123456789abcdefg",
            ),
            (
                Text::from_ascii_iter(*b"0123456789abcdef").unwrap(),
                "0123456789abcdef",
            ),
            (Text::new("nul\0inside"), "nul\0inside"),
            (Text::new(&exact), exact.as_str()),
            (Text::new(&long), long.as_str()),
            (Text::from(long.clone()), long.as_str()),
            (Text::from(Arc::<str>::from(long.as_str())), long.as_str()),
            (Text::from_ascii(long.as_bytes()).unwrap(), long.as_str()),
            (Text::new("grüße"), "grüße"),
            (Text::new(""), ""),
        ];
        for (t, s) in &forms {
            assert_eq!(t.as_str(), *s);
            assert_eq!(t.as_bytes(), s.as_bytes());
            assert_eq!(t, s);
            assert_eq!(*s, t.clone());
            assert_eq!(t, &s.to_string());
            assert_eq!(t.to_string(), *s);
            assert_eq!(format!("{t:?}"), format!("{s:?}"));
            assert_eq!(
                serde_json::to_string(t).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
        let inline = |t: &Text| matches!(t.0, Repr::Inline(_));
        assert!(inline(&Text::new(&exact)) && inline(&Text::new("")));
        assert!(inline(&Text::from_ascii(b"460113112062931").unwrap()));
        assert!(!inline(&Text::new(&long)) && !inline(&Text::new("nul\0inside")));
        assert_eq!(Text::from_ascii_iter([b'a', 0x80]), None);
        assert_eq!(
            Text::from_ascii_iter([b'a'; 17].into_iter().chain([0x80])),
            None
        );
        assert_eq!(Text::from_static("ok"), Text::new("ok"));
        assert_ne!(Text::new("ok"), Text::new("ok "));
        assert_eq!(Text::from_ascii(b"caf\xc3\xa9"), None);
        let state = std::hash::RandomState::new();
        assert_eq!(
            std::hash::BuildHasher::hash_one(&state, Text::new("abc")),
            std::hash::BuildHasher::hash_one(&state, Text::from_static("abc"))
        );
    }

    impl Repr {
        fn into_inline(self) -> Option<[u64; WORDS]> {
            match self {
                Repr::Inline(w) => Some(w.map(u64::from_le_bytes)),
                _ => None,
            }
        }
    }

    #[test]
    fn inline_text_of_every_length() {
        let all = "abcdefghijklmnopqrstuvwxyz";
        for n in 0..=all.len() {
            let s = &all[..n];
            assert_eq!(Text::from_ascii(s.as_bytes()).unwrap(), s, "{n}");
            assert_eq!(Text::new(s).as_str(), s, "{n}");
            let words = load_words(s.as_bytes());
            assert_eq!(words.is_some(), n <= Text::INLINE_CAP, "{n}");
            if let Some(w) = words {
                assert_eq!(Text::from_ascii_words(w).unwrap(), s, "{n}");
                assert_eq!(Text::new(s).0.clone().into_inline(), Some(w), "{n}");
            }
        }
        for n in 1..=Text::INLINE_CAP {
            for at in 0..n {
                let mut b = all.as_bytes()[..n].to_vec();
                b[at] = 0;
                let t = Text::from_ascii(&b).unwrap();
                assert!(!matches!(t.0, Repr::Inline(_)), "NUL at {at} of {n}");
                assert_eq!(t.as_bytes(), b, "NUL at {at} of {n}");
                b[at] = 0xC3;
                assert_eq!(Text::from_ascii(&b), None, "non-ASCII at {at} of {n}");
            }
        }
        assert_eq!(Text::from_ascii(b"12\x0034"), Some(Text::new("12\x0034")));
        assert_eq!(
            Text::from_ascii(b"12\x0034").unwrap().as_bytes(),
            b"12\x0034"
        );
        let mut high = [0; WORDS];
        high[0] = 0x80;
        assert_eq!(Text::from_ascii_words(high), None);
    }

    #[test]
    fn value_json_shape_is_unchanged() {
        let mut r = Reading::new("m");
        r.push("motion", Value::Text("moving".into()));
        r.push("imsi", Value::Text(Text::new("460113112062931")));
        r.push("n", Value::Int(3));
        r.identity = Some(Identity {
            device_id: Some(Text::new("869951040293361")),
            sequence: Some(20),
        });
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"measurement":"m","time":null,"fields":{"motion":"moving","imsi":"460113112062931","n":3},"identity":{"device_id":"869951040293361","sequence":20}}"#
        );
    }
}
