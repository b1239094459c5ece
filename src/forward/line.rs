//! InfluxDB line protocol: how a committed reading or alert transition becomes one line.
//!
//! ```text
//! environment,device=869951040293361,district=north,profile=milesight-em300-th-nb temperature_c=25.4,battery_pct=91i,valve_open=true,firmware_version="0120" 1795260925
//! alerts,device=869951040293361,profile=milesight-em300-th-nb,rule=too_hot,severity=warning state="firing",firing=true,value=35.5 1795260925
//! └ measurement ┘└──────────────── tags (sorted by key) ───────────────┘└──────────── fields ────────────┘ └ seconds ┘
//! ```
//!
//! Schema (DESIGN.md "Time-series schema"): the measurement is the profile's; the tags are
//! `device`, `profile` and the device labels named in `[influxdb] tags` (a label the device
//! does not have is left out: line protocol has no empty tag values); the fields are the
//! decoded fields with their types — Int `91i`, Float `25.4` (shortest form that reads back
//! to the same f64), Bool `true`/`false`, Text as a quoted string; the timestamp is the
//! reading's `time_s` (the device's own clock when plausible, else the receive time), sent
//! with `precision=s`. Tags are written sorted by key, as InfluxDB recommends.
//!
//! Alert transitions go to the measurement `alerts` with tags `device, profile, rule,
//! severity` and fields `state` (string), `firing` (bool: `state == "firing"`) and `value`
//! (when the transition has one). `firing` is not in the design's schema: it is there
//! because stores that keep only numbers (VictoriaMetrics) would otherwise keep nothing of a
//! transition without a value.
//!
//! # Escaping
//!
//! As the InfluxDB line protocol reference ("Special characters") says:
//! - measurement: `,` and space;
//! - tag keys, tag values, field keys: `,`, `=` and space;
//! - string field values, inside double quotes: `"` and `\`.
//!
//! Everywhere a backslash is written as two (two contiguous backslashes read as one), so a
//! value ending in `\` cannot escape the separator after it. Line protocol cannot carry a
//! newline or carriage return in any element: they are written as the two characters `\n`
//! and `\r`, which a reader gets back as those two characters, so one point is always one
//! line and a device's text can never inject a second point.
//!
//! What cannot be a line at all (an empty measurement, one starting with `#` — a comment
//! line, silently skipped by servers — a reading with no field that line protocol can
//! carry, a fields column that is not a JSON object) is an [`Unencodable`] error: the
//! forwarder dead-letters it, it is never dropped silently.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};

/// Why a row cannot be written as a line (the forwarder dead-letters it with this message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unencodable {
    #[error("the measurement is empty")]
    EmptyMeasurement,
    #[error("the measurement starts with `#`, which makes the line a comment")]
    CommentMeasurement,
    #[error("no field line protocol can carry (every field is null)")]
    NoFields,
    #[error("the stored fields are not a flat JSON object: {0}")]
    BadFields(String),
}

/// A reading as the forwarder reads it from the store.
#[derive(Debug, Clone, Copy)]
pub struct ReadingRow<'a> {
    pub measurement: &'a str,
    pub device: &'a str,
    pub profile: &'a str,
    /// The device's values of the configured label tags, in `[influxdb] tags` order.
    pub labels: &'a [Option<String>],
    pub time_s: i64,
    /// `readings.fields`: a JSON object (migrations/0002_ingest.sql).
    pub fields: &'a str,
}

/// An alert transition as the forwarder reads it from the store.
#[derive(Debug, Clone, Copy)]
pub struct AlertRow<'a> {
    pub device: &'a str,
    pub profile: &'a str,
    pub rule: &'a str,
    pub severity: &'a str,
    pub state: &'a str,
    pub time_ms: i64,
    pub value: Option<f64>,
}

/// Where a tag's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Device,
    Profile,
    Label(usize),
}

/// Encodes rows as lines; built once from `[influxdb] tags`.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// The tags in key order, each with its key already escaped and followed by `=`.
    tags: Vec<(String, Slot)>,
}

impl Encoder {
    /// `labels` are the label names written as tags besides `device` and `profile` (the
    /// config validated them: distinct, neither `device` nor `profile`).
    pub fn new(labels: &[String]) -> Encoder {
        let mut keyed: Vec<(&str, Slot)> =
            vec![("device", Slot::Device), ("profile", Slot::Profile)];
        keyed.extend(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.as_str(), Slot::Label(i))),
        );
        // Byte order, as Go's bytes.Compare (what InfluxDB sorts tags by).
        keyed.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let tags = keyed
            .into_iter()
            .map(|(k, slot)| {
                let mut key = String::with_capacity(k.len() + 2);
                key.push(',');
                escape_key(k, &mut key);
                key.push('=');
                (key, slot)
            })
            .collect();
        Encoder { tags }
    }

    /// Appends the reading's line (with its `\n`) to `out`. On error `out` is unchanged.
    pub fn reading(&self, r: &ReadingRow<'_>, out: &mut String) -> Result<(), Unencodable> {
        let start = out.len();
        let result = self.write_reading(r, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn write_reading(&self, r: &ReadingRow<'_>, out: &mut String) -> Result<(), Unencodable> {
        measurement(r.measurement, out)?;
        for (key, slot) in &self.tags {
            let value = match *slot {
                Slot::Device => Some(r.device),
                Slot::Profile => Some(r.profile),
                Slot::Label(i) => r.labels.get(i).and_then(|v| v.as_deref()),
            };
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                out.push_str(key);
                escape_key(v, out);
            }
        }
        out.push(' ');
        if fields(r.fields, out)? == 0 {
            return Err(Unencodable::NoFields);
        }
        let _ = writeln!(out, " {}", r.time_s);
        Ok(())
    }

    /// Appends the transition's line (measurement `alerts`) to `out`.
    pub fn alert(&self, a: &AlertRow<'_>, out: &mut String) -> Result<(), Unencodable> {
        out.push_str("alerts");
        for (key, value) in [
            (",device=", a.device),
            (",profile=", a.profile),
            (",rule=", a.rule),
            (",severity=", a.severity),
        ] {
            if !value.is_empty() {
                out.push_str(key);
                escape_key(value, out);
            }
        }
        out.push_str(" state=\"");
        escape_string(a.state, out);
        out.push_str("\",firing=");
        out.push_str(if a.state == "firing" { "true" } else { "false" });
        if let Some(v) = a.value.filter(|v| v.is_finite()) {
            out.push_str(",value=");
            float(v, out);
        }
        let _ = writeln!(out, " {}", a.time_ms.div_euclid(1000));
        Ok(())
    }
}

fn measurement(m: &str, out: &mut String) -> Result<(), Unencodable> {
    if m.is_empty() {
        return Err(Unencodable::EmptyMeasurement);
    }
    if m.starts_with('#') {
        return Err(Unencodable::CommentMeasurement);
    }
    escape(m, b", ", out);
    Ok(())
}

/// Escapes a measurement name.
pub fn escape_measurement(s: &str, out: &mut String) {
    escape(s, b", ", out);
}

/// Escapes a tag key, tag value or field key.
pub fn escape_key(s: &str, out: &mut String) {
    escape(s, b",= ", out);
}

/// Escapes a string field value (the caller writes the surrounding quotes).
pub fn escape_string(s: &str, out: &mut String) {
    escape(s, b"\"", out);
}

/// Writes `s`, putting a backslash before each byte in `specials` and before every
/// backslash, and turning newline / carriage return into `\n` / `\r`.
fn escape(s: &str, specials: &[u8], out: &mut String) {
    let needs = |b: u8| b == b'\\' || b == b'\n' || b == b'\r' || specials.contains(&b);
    if !s.bytes().any(needs) {
        out.push_str(s);
        return;
    }
    // Every byte that needs escaping is ASCII, so splitting at it keeps UTF-8 intact.
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        if !needs(b) {
            continue;
        }
        out.push_str(&s[from..i]);
        match b {
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            _ => {
                out.push('\\');
                out.push(char::from(b));
            }
        }
        from = i + 1;
    }
    out.push_str(&s[from..]);
}

/// The shortest decimal that reads back to the same f64 (Rust's `Display`: no exponent,
/// which every line protocol parser reads).
fn float(v: f64, out: &mut String) {
    let _ = write!(out, "{v}");
}

/// Transcodes the stored fields (a JSON object) straight into the line's field set;
/// returns how many fields it wrote. Nulls (non-finite floats) are left out.
fn fields(json: &str, out: &mut String) -> Result<usize, Unencodable> {
    let mut de = serde_json::Deserializer::from_str(json);
    let n = FieldSet { out }
        .deserialize(&mut de)
        .and_then(|n| de.end().map(|()| n))
        .map_err(|e| Unencodable::BadFields(e.to_string()))?;
    Ok(n)
}

/// Writes a JSON object's members as `key=value,…`.
struct FieldSet<'o> {
    out: &'o mut String,
}

impl<'de> DeserializeSeed<'de> for FieldSet<'_> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldSet<'_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of fields")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
            let value: FieldValue<'de> = map.next_value()?;
            if matches!(value, FieldValue::Null) {
                continue;
            }
            if key.is_empty() {
                return Err(de::Error::custom("a field has an empty name"));
            }
            if n > 0 {
                self.out.push(',');
            }
            escape_key(&key, self.out);
            self.out.push('=');
            match value {
                FieldValue::Int(i) => {
                    let _ = write!(self.out, "{i}i");
                }
                // Not written by the store (Value::Int is an i64); a hand-edited row above
                // i64::MAX goes as a float rather than as InfluxDB's unsigned type, which
                // not every store reads.
                FieldValue::UInt(u) => match i64::try_from(u) {
                    Ok(i) => {
                        let _ = write!(self.out, "{i}i");
                    }
                    Err(_) => float(u as f64, self.out),
                },
                FieldValue::Float(f) => float(f, self.out),
                FieldValue::Bool(b) => self.out.push_str(if b { "true" } else { "false" }),
                FieldValue::Text(s) => {
                    self.out.push('"');
                    escape_string(&s, self.out);
                    self.out.push('"');
                }
                FieldValue::Null => {}
            }
            n += 1;
        }
        Ok(n)
    }
}

/// A JSON string, borrowed from the input when it has no escapes.
struct Text<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// One field's value as the store wrote it.
enum FieldValue<'de> {
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Text(Cow<'de, str>),
}

impl<'de> de::Deserialize<'de> for FieldValue<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, boolean, string or null")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::UInt(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<FieldValue<'de>, E> {
                Ok(if v.is_finite() {
                    FieldValue::Float(v)
                } else {
                    FieldValue::Null
                })
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Bool(v))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Text(Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<FieldValue<'de>, E> {
                Ok(FieldValue::Null)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(enc: &Encoder, r: ReadingRow<'_>) -> Result<String, Unencodable> {
        let mut out = String::from("previous\n");
        let res = enc.reading(&r, &mut out);
        let line = out.strip_prefix("previous\n").unwrap().to_owned();
        if res.is_err() {
            assert_eq!(line, "", "nothing is left behind on error");
        }
        res.map(|()| line)
    }

    fn row<'a>(fields: &'a str, labels: &'a [Option<String>]) -> ReadingRow<'a> {
        ReadingRow {
            measurement: "water_meter",
            device: "869951040293361",
            profile: "cjt188-water-meter",
            labels,
            time_s: 1_795_260_925,
            fields,
        }
    }

    #[test]
    fn typed_fields_sorted_tags_second_timestamp() {
        let enc = Encoder::new(&["site".into(), "district".into()]);
        let labels = [Some("pump 3".to_owned()), Some("north".to_owned())];
        let line = reading(
            &enc,
            row(
                r#"{"volume_m3":556677.0,"status":33825,"valve_open":false,"motion":"moving","flow_m3h":0.25,"neg":-4,"bad":null}"#,
                &labels,
            ),
        )
        .unwrap();
        assert_eq!(
            line,
            "water_meter,device=869951040293361,district=north,profile=cjt188-water-meter,site=pump\\ 3 \
             volume_m3=556677,status=33825i,valve_open=false,motion=\"moving\",flow_m3h=0.25,neg=-4i \
             1795260925\n"
        );
    }

    #[test]
    fn missing_and_empty_labels_are_left_out() {
        let enc = Encoder::new(&["district".into(), "site".into()]);
        let labels = [None, Some(String::new())];
        let line = reading(&enc, row(r#"{"x":1}"#, &labels)).unwrap();
        assert_eq!(
            line,
            "water_meter,device=869951040293361,profile=cjt188-water-meter x=1i 1795260925\n"
        );
        // Fewer label values than tags (cannot happen from the store) is the same.
        let line = reading(&enc, row(r#"{"x":1}"#, &[])).unwrap();
        assert!(
            line.starts_with("water_meter,device=869951040293361,profile="),
            "{line}"
        );
    }

    #[test]
    fn escaping_per_element() {
        let enc = Encoder::new(&["site".into()]);
        let labels = [Some("a,b=c d\\".to_owned())];
        let r = ReadingRow {
            measurement: "m,x y=z\\",
            device: "d=1",
            profile: "p q",
            labels: &labels,
            time_s: -5,
            fields: r#"{"f k,=":1.5,"s":"say \"hi\"\\ \n next\r","line\nkey":true}"#,
        };
        let line = reading(&enc, r).unwrap();
        assert_eq!(
            line,
            "m\\,x\\ y=z\\\\,device=d\\=1,profile=p\\ q,site=a\\,b\\=c\\ d\\\\ \
             f\\ k\\,\\==1.5,s=\"say \\\"hi\\\"\\\\ \\n next\\r\",line\\nkey=true -5\n"
        );
        assert_eq!(line.matches('\n').count(), 1, "one point, one line");
    }

    #[test]
    fn unicode_passes_through() {
        let enc = Encoder::new(&[]);
        let line = reading(
            &enc,
            row(r#"{"name":"Straße \u00e9 水","t_\u00b0c":1}"#, &[]),
        )
        .unwrap();
        assert!(line.contains("name=\"Straße é 水\",t_°c=1i"), "{line}");
    }

    #[test]
    fn floats_read_back_exactly_and_ints_stay_ints() {
        let enc = Encoder::new(&[]);
        let line = reading(
            &enc,
            row(
                r#"{"a":0.1,"b":1e-7,"c":1.5e21,"d":-0.0,"e":26.7,"big":9223372036854775807,"huge":18446744073709551615}"#,
                &[],
            ),
        )
        .unwrap();
        assert!(
            line.contains(
                "a=0.1,b=0.0000001,c=1500000000000000000000,d=-0,e=26.7,big=9223372036854775807i,huge=18446744073709552000 "
            ),
            "{line}"
        );
        for (text, v) in [
            ("0.0000001", 1e-7),
            ("1500000000000000000000", 1.5e21),
            ("26.7", 26.7),
        ] {
            assert_eq!(text.parse::<f64>().unwrap(), v);
        }
    }

    #[test]
    fn what_cannot_be_a_line() {
        let enc = Encoder::new(&[]);
        assert_eq!(
            reading(&enc, row(r#"{"a":null}"#, &[])),
            Err(Unencodable::NoFields)
        );
        assert_eq!(reading(&enc, row("{}", &[])), Err(Unencodable::NoFields));
        assert!(matches!(
            reading(&enc, row(r#"{"a":[1]}"#, &[])),
            Err(Unencodable::BadFields(_))
        ));
        assert!(matches!(
            reading(&enc, row(r#"{"a":1} x"#, &[])),
            Err(Unencodable::BadFields(_))
        ));
        assert!(matches!(
            reading(&enc, row(r#"{"":1}"#, &[])),
            Err(Unencodable::BadFields(_))
        ));
        assert!(matches!(
            reading(&enc, row("[1,2]", &[])),
            Err(Unencodable::BadFields(_))
        ));
        let mut r = row(r#"{"a":1}"#, &[]);
        r.measurement = "";
        assert_eq!(reading(&enc, r), Err(Unencodable::EmptyMeasurement));
        r.measurement = "#hidden";
        assert_eq!(reading(&enc, r), Err(Unencodable::CommentMeasurement));
    }

    #[test]
    fn alert_lines() {
        let enc = Encoder::new(&["district".into()]);
        let mut out = String::new();
        enc.alert(
            &AlertRow {
                device: "869951040293361",
                profile: "manhole",
                rule: "cover open",
                severity: "critical",
                state: "firing",
                time_ms: 1_795_260_925_999,
                value: Some(1.0),
            },
            &mut out,
        )
        .unwrap();
        enc.alert(
            &AlertRow {
                device: "869951040293361",
                profile: "manhole",
                rule: "offline",
                severity: "warning",
                state: "resolved",
                time_ms: 1_795_260_926_000,
                value: None,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            "alerts,device=869951040293361,profile=manhole,rule=cover\\ open,severity=critical \
             state=\"firing\",firing=true,value=1 1795260925\n\
             alerts,device=869951040293361,profile=manhole,rule=offline,severity=warning \
             state=\"resolved\",firing=false 1795260926\n"
        );
    }
}
