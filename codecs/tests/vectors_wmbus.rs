//! The wireless M-Bus vectors of `tests/data/devices.json` (Axioma Qalcosonic W1 / Q400, the
//! wmbusmeters q400 driver's test telegrams), decoded by the built-in `wmbus` codec. Every
//! value the source states is asserted through [`MAPPING`] (vendor name → where the codec
//! puts it).
//!
//! The codec's answer to "storage 1" (the set date): a separate, earlier reading whose time is
//! the set date and whose fields carry the usual names plus `storage = 1`; the current values
//! are the last reading. So the vectors' `key_map_to_layout_names` translate as:
//!
//! | layout name          | codec output                                     |
//! |----------------------|--------------------------------------------------|
//! | `datetime_storage0`  | current reading's `time` (`DeviceTime::Local`)   |
//! | `datetime_storage1`  | set-date reading's `time`                        |
//! | `volume_storage1_m3` | set-date reading's `volume_m3`                   |
//! | `forward_storage1_m3`/`backward_storage1_m3` | set-date `forward_m3`/`backward_m3` |
//! | `forward_m3`, `backward_m3`, `flow_m3h` | current reading, same names   |
//! | `tpl_status`         | current `status` / `status_text`                 |
//! | `fd74_raw`           | current `battery_pct` (0xFD 0x74 read as percent) |

use nbiot_codecs::registry::{build, CodecOptions};
use nbiot_codecs::time::from_civil;
use nbiot_codecs::{builtin, hex, DecodeError, DeviceTime, Reading, Value};
use serde_json::Value as Json;

/// Which reading of a decode a stated value lives in.
#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    /// The current values (storage 0): the last reading.
    Current,
    /// The set date (storage 1): the reading with `storage = 1`.
    SetDate,
}

/// How one stated value is checked.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// A numeric field equal to the stated number (exactly: litres are divided, not
    /// multiplied, so 0.119 prints as 0.119).
    Field(At, &'static str),
    /// A Float within `tolerance` of the stated number (the source rounded it).
    Approx(At, &'static str, f64),
    /// A Text field equal to the stated text.
    Text(At, &'static str),
    /// A temperature: the stated -100 is the sensor-error value, so instead of a value the
    /// named flag must be true; any other stated value is the field.
    Temperature(At, &'static str, &'static str),
    /// `YYYY-MM-DD hh:mm` wall-clock time: the reading's `DeviceTime::Local`.
    Time(At),
    /// The TPL status as wmbusmeters prints it (`OK`, `TEMPORARY_ERROR`): our `status_text`
    /// is the same label in snake_case, and the matching Bool agrees.
    Status,
    /// The meter id: the reading's identity.
    MeterId,
}

/// Vendor (wmbusmeters) name → project check, once for all vectors.
const MAPPING: &[(&str, Check)] = &[
    ("media", Check::Text(At::Current, "medium")),
    ("id", Check::MeterId),
    ("meter_datetime", Check::Time(At::Current)),
    ("total_m3", Check::Field(At::Current, "volume_m3")),
    ("total_forward_m3", Check::Field(At::Current, "forward_m3")),
    (
        "total_backward_m3",
        Check::Field(At::Current, "backward_m3"),
    ),
    ("volume_flow_m3h", Check::Field(At::Current, "flow_m3h")),
    (
        "flow_temperature_c",
        Check::Temperature(At::Current, "flow_temperature_c", "flow_temperature_error"),
    ),
    ("on_time_h", Check::Approx(At::Current, "on_time_h", 1e-6)),
    ("battery_pct", Check::Field(At::Current, "battery_pct")),
    ("status", Check::Status),
    ("set_datetime", Check::Time(At::SetDate)),
    (
        "consumption_at_set_date_m3",
        Check::Field(At::SetDate, "volume_m3"),
    ),
    (
        "forward_at_set_date_m3",
        Check::Field(At::SetDate, "forward_m3"),
    ),
    (
        "backward_at_set_date_m3",
        Check::Field(At::SetDate, "backward_m3"),
    ),
];

struct Vector {
    hex: String,
    as_written: Option<String>,
    expected: serde_json::Map<String, Json>,
    key_map: serde_json::Map<String, Json>,
    verification: String,
}

fn wmbus_vectors() -> Vec<Vector> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/devices.json"
    ))
    .expect("devices.json is readable");
    let devices: Vec<Json> = serde_json::from_str(&text).expect("devices.json parses");
    let mut out = Vec::new();
    for device in devices.iter().filter(|d| d["vendor"] == "Axioma Metering") {
        for v in device["vectors"].as_array().expect("vectors array") {
            out.push(Vector {
                hex: v["hex"].as_str().expect("hex").to_owned(),
                as_written: v["hex_as_written_in_source"].as_str().map(str::to_owned),
                expected: v["expected"].as_object().expect("expected").clone(),
                key_map: v["key_map_to_layout_names"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                verification: v["verification"].as_str().expect("verification").to_owned(),
            });
        }
    }
    out
}

fn bytes(hex_text: &str) -> Vec<u8> {
    hex::decode(hex_text.as_bytes()).expect("vector hex")
}

fn decode(v: &Vector) -> Vec<Reading> {
    let codec = builtin("wmbus").expect("wmbus is built in");
    let readings = codec
        .decode(&bytes(&v.hex))
        .unwrap_or_else(|e| panic!("{}: {e}", v.hex));
    // Telegram named explicitly: the same answer as the auto-detected frame.
    let mut options = CodecOptions::new();
    options.insert("frame".into(), "telegram".into());
    let telegram = build("wmbus", &options).expect("frame option accepted");
    assert_eq!(telegram.decode(&bytes(&v.hex)).as_ref(), Ok(&readings));
    readings
}

fn reading(readings: &[Reading], at: At) -> &Reading {
    match at {
        At::Current => readings.last().expect("a current reading"),
        At::SetDate => readings
            .iter()
            .find(|r| r.field("storage") == Some(&Value::Int(1)))
            .expect("a set-date (storage 1) reading"),
    }
}

fn field<'a>(r: &'a Reading, name: &str) -> &'a Value {
    r.field(name)
        .unwrap_or_else(|| panic!("no field `{name}` in {:?}", r.fields))
}

/// `2019-12-20 13:04` as the wall-clock seconds the codec reports.
fn wall_clock(stated: &str) -> DeviceTime {
    let num = |range: std::ops::Range<usize>| -> u32 {
        stated
            .get(range)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad stated time {stated}"))
    };
    let t = from_civil(
        i64::from(num(0..4)),
        num(5..7),
        num(8..10),
        num(11..13),
        num(14..16),
        0,
    )
    .expect("a real date");
    DeviceTime::Local(t)
}

fn assert_number(value: &Value, want: f64, what: &str) {
    match value {
        Value::Int(i) => assert_eq!(*i as f64, want, "{what}"),
        Value::Float(f) => assert_eq!(*f, want, "{what}"),
        other => panic!("{what}: decoded {other:?}, stated {want}"),
    }
}

fn assert_stated(v: &Vector, readings: &[Reading]) {
    for (name, stated) in &v.expected {
        let check = MAPPING
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{}: stated `{name}` has no mapping", v.hex))
            .1;
        let what = format!("{} `{name}`", v.hex);
        let number = || stated.as_f64().expect("stated number");
        match check {
            Check::Field(at, project) => {
                assert_number(field(reading(readings, at), project), number(), &what)
            }
            Check::Approx(at, project, tolerance) => match field(reading(readings, at), project) {
                Value::Float(f) => assert!((f - number()).abs() < tolerance, "{what}: {f}"),
                other => panic!("{what}: decoded {other:?}"),
            },
            Check::Text(at, project) => assert_eq!(
                field(reading(readings, at), project),
                &Value::Text(stated.as_str().expect("stated text").to_owned().into()),
                "{what}"
            ),
            Check::Temperature(at, project, flag) => {
                let r = reading(readings, at);
                if number() == -100.0 {
                    assert_eq!(r.field(project), None, "{what}: sensor error is no value");
                    assert_eq!(field(r, flag), &Value::Bool(true), "{what}");
                } else {
                    assert_number(field(r, project), number(), &what);
                    assert_eq!(r.field(flag), None, "{what}");
                }
            }
            Check::Time(at) => assert_eq!(
                reading(readings, at).time,
                Some(wall_clock(stated.as_str().expect("stated time"))),
                "{what}"
            ),
            Check::Status => {
                let label = stated.as_str().expect("stated status").to_ascii_lowercase();
                let r = reading(readings, At::Current);
                assert_eq!(
                    field(r, "status_text"),
                    &Value::Text(label.clone().into()),
                    "{what}"
                );
                assert_eq!(
                    field(r, "temporary_error"),
                    &Value::Bool(label == "temporary_error"),
                    "{what}"
                );
            }
            Check::MeterId => {
                let r = reading(readings, At::Current);
                let id = r.identity.as_ref().and_then(|i| i.device_id.as_deref());
                assert_eq!(id, stated.as_str(), "{what}");
            }
        }
    }
}

#[test]
fn every_vector_is_verified_and_fully_mapped() {
    let vectors = wmbus_vectors();
    assert_eq!(vectors.len(), 3);
    for v in &vectors {
        // None of these is a must-fail vector; a new one would need its own test.
        assert_eq!(v.verification, "verified", "{}", v.hex);
        // Every vendor key the source maps to a layout name is one the codec answers for.
        for key in v.key_map.keys() {
            assert!(
                MAPPING.iter().any(|(n, _)| n == key),
                "{}: `{key}` is in key_map_to_layout_names but not in MAPPING",
                v.hex
            );
        }
    }
}

#[test]
fn vectors_decode_to_every_stated_value() {
    for v in wmbus_vectors() {
        let readings = decode(&v);
        // The set date and the current values; nothing left unexplained.
        assert_eq!(readings.len(), 2, "{}", v.hex);
        let declared = builtin("wmbus").expect("built in").field_names().join(",");
        for r in &readings {
            assert_eq!(r.measurement, "water_meter");
            assert_eq!(r.field("unmapped_records"), None, "{}", v.hex);
            for (name, _) in &r.fields {
                assert!(
                    declared.split(',').any(|d| d == name.as_str()),
                    "{name} undeclared"
                );
            }
        }
        assert_stated(&v, &readings);
        // The set-date reading comes first: readings are in time order.
        let utc = |r: &Reading| r.time.map(|t| t.to_utc(0, 0));
        assert!(utc(reading(&readings, At::SetDate)) < utc(reading(&readings, At::Current)));
        assert!(std::ptr::eq(reading(&readings, At::SetDate), &readings[0]));
    }
}

#[test]
fn header_identity_and_sequence() {
    // From the telegram bytes themselves: manufacturer 0x0709 = AXI, access number byte 11.
    for v in wmbus_vectors() {
        let raw = bytes(&v.hex);
        let readings = decode(&v);
        let current = reading(&readings, At::Current);
        assert_eq!(field(current, "manufacturer"), &Value::Text("AXI".into()));
        let identity = current.identity.as_ref().expect("identity");
        assert_eq!(identity.sequence, raw.get(11).map(|&acc| u32::from(acc)));
        // The identity (and its sequence) comes once per telegram, on the current reading.
        assert_eq!(reading(&readings, At::SetDate).identity, None);
    }
}

/// wmbusmeters writes its test telegrams as `header_records`: the part after `_` is the bare
/// record stream, which the codec also takes (`frame = "records"`) and must read the same.
#[test]
fn record_stream_alone_decodes_to_the_same_values() {
    let mut options = CodecOptions::new();
    options.insert("frame".into(), "records".into());
    let codec = build("wmbus", &options).expect("frame option accepted");
    let mut seen = 0;
    for v in wmbus_vectors() {
        let Some(written) = &v.as_written else {
            continue;
        };
        seen += 1;
        let (header, records) = written.split_once('_').expect("an `_` marks the records");
        assert_eq!(
            format!("{header}{records}"),
            v.hex,
            "the `_` is only a marker"
        );
        let from_records = codec.decode(&bytes(records)).expect("records decode");
        let from_telegram = decode(&v);
        assert_eq!(from_records.len(), from_telegram.len());
        for (a, b) in from_records.iter().zip(&from_telegram) {
            assert_eq!(a.time, b.time);
            // The telegram adds the header fields in front; the record fields are identical.
            assert!(b.fields.ends_with(&a.fields), "{}", v.hex);
            assert_eq!(a.identity, None, "a bare record stream names no meter");
        }
    }
    assert_eq!(seen, 2);
}

/// Two of the telegrams declare security mode 5 in CONFIG and are published already decrypted
/// (data starting 2F 2F). Without the 2F 2F check the same telegram must be refused, not
/// decoded as garbage.
#[test]
fn encrypted_form_of_the_vectors_is_refused() {
    let codec = builtin("wmbus").expect("wmbus is built in");
    let mut seen = 0;
    for v in wmbus_vectors() {
        let mut raw = bytes(&v.hex);
        let config = u16::from_le_bytes([raw[13], raw[14]]);
        if (config >> 8) & 0x1F == 0 {
            continue;
        }
        seen += 1;
        assert_eq!(&raw[15..17], &[0x2F, 0x2F], "{}", v.hex);
        raw[15] = 0x3A;
        raw[16] = 0x91;
        assert_eq!(
            codec.decode(&raw),
            Err(DecodeError::InvalidValue {
                what: "CONFIG field",
                offset: 13,
                reason: "encrypted telegram, no key"
            }),
            "{}",
            v.hex
        );
    }
    assert_eq!(seen, 2);
}
