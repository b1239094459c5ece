//! The CJ/T 188-2004 vectors of `tests/data/devices.json`, decoded by the built-in `cjt188`
//! codec. Every value a source states is asserted through [`MAPPING`] (vendor name → what
//! the codec produces); a vector whose verification is `MISMATCH` must fail the way its
//! verification says, and decode once the stated defect is corrected.

use nbiot_codecs::time::from_civil;
use nbiot_codecs::{builtin, hex, DecodeError, DeviceTime, Reading, Value};
use serde_json::Value as Json;

/// How one stated value is checked.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// The decoded field of that name, equal to the stated value (numbers times `factor`).
    Field(&'static str, f64),
    /// Digits `from..to` of the 14-digit `address` (A6..A0). The blogs split it into the
    /// manufacturer code (A6 A5 → digits 0..4) and the meter number (A4..A0 → digits 4..14).
    AddressDigits(usize, usize),
    /// The 7 address bytes as transmitted (A0 first): broadcast AA…AA, else `address` reversed.
    AddressBytes,
    /// DI bytes as transmitted, in whichever order the vendor used: `di` is the known DI.
    DiBytes,
    /// `YYYY-MM-DD hh:mm:ss` meter clock: the reading's `DeviceTime::Local`.
    RealTime,
    /// ST bytes as transmitted (ST0 ST1): `status` is ST0 | ST1 << 8.
    StatusHex,
    /// The L byte: the frame decoded with exactly that much DATA (no truncation, no trailing).
    DataLength,
    /// The CS byte: the frame's checksum, verified by the decode (or named by its error).
    ChecksumStated,
}

/// Vendor name → project check, once for all vectors.
const MAPPING: &[(&str, Check)] = &[
    ("meter_type", Check::Field("meter_type", 1.0)),
    ("meter_number", Check::AddressDigits(4, 14)),
    ("manufacturer_code", Check::AddressDigits(0, 4)),
    ("address_A6_to_A0", Check::Field("address", 1.0)),
    ("address_bytes_A0_A6", Check::AddressBytes),
    ("ctrl", Check::Field("ctrl", 1.0)),
    ("len", Check::DataLength),
    ("DI_bytes", Check::DiBytes),
    ("SER", Check::Field("ser", 1.0)),
    // Unit code 0x2C in every vector: the flows are already m³.
    ("current_cumulative_flow", Check::Field("volume_m3", 1.0)),
    ("current_unit_code", Check::Field("volume_unit_code", 1.0)),
    (
        "settlement_cumulative_flow",
        Check::Field("settlement_volume_m3", 1.0),
    ),
    (
        "settlement_unit_code",
        Check::Field("settlement_volume_unit_code", 1.0),
    ),
    ("realtime", Check::RealTime),
    ("ST_hex", Check::StatusHex),
    ("valve_cmd", Check::Field("valve_command_code", 1.0)),
    ("cs_stated", Check::ChecksumStated),
];

const KNOWN_DIS: [u16; 3] = [0x901F, 0xA017, 0x810A];

struct Vector {
    hex: String,
    expected: serde_json::Map<String, Json>,
    verification: String,
}

fn cjt188_vectors() -> Vec<Vector> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/devices.json"
    ))
    .expect("devices.json is readable");
    let devices: Vec<Json> = serde_json::from_str(&text).expect("devices.json parses");
    let mut out = Vec::new();
    for device in devices
        .iter()
        .filter(|d| d["vendor"].as_str().is_some_and(|v| v.contains("CJ/T 188")))
    {
        for v in device["vectors"].as_array().expect("vectors array") {
            out.push(Vector {
                hex: v["hex"].as_str().expect("hex").to_owned(),
                expected: v["expected"].as_object().expect("expected").clone(),
                verification: v["verification"].as_str().expect("verification").to_owned(),
            });
        }
    }
    out
}

fn bytes(hex_text: &str) -> Vec<u8> {
    hex::decode(hex_text.as_bytes()).expect("vector hex")
}

fn preamble_len(frame: &[u8]) -> usize {
    frame.iter().take_while(|b| **b == 0xFE).count()
}

fn field<'a>(r: &'a Reading, name: &str) -> &'a Value {
    r.field(name)
        .unwrap_or_else(|| panic!("no field `{name}` in {:?}", r.fields))
}

fn address(r: &Reading) -> &str {
    match field(r, "address") {
        Value::Text(t) => t,
        other => panic!("address is not text: {other:?}"),
    }
}

fn assert_matches(value: &Value, stated: &Json, factor: f64, what: &str) {
    match (value, stated) {
        (Value::Int(i), Json::Number(n)) => {
            assert_eq!(
                Some(*i),
                n.as_i64().map(|n| (n as f64 * factor) as i64),
                "{what}"
            )
        }
        (Value::Float(f), Json::Number(n)) => {
            let want = n.as_f64().expect("number") * factor;
            assert!(
                (f - want).abs() < 1e-9,
                "{what}: decoded {f}, stated {want}"
            );
        }
        (Value::Text(t), Json::String(s)) => assert_eq!(t, s, "{what}"),
        (Value::Bool(b), Json::Bool(s)) => assert_eq!(b, s, "{what}"),
        _ => panic!("{what}: decoded {value:?} cannot match stated {stated}"),
    }
}

/// Asserts every stated value of `v` on `reading`, decoded from `frame`.
fn assert_stated(v: &Vector, frame: &[u8], reading: &Reading, skip: &[&str]) {
    for (name, stated) in &v.expected {
        if skip.contains(&name.as_str()) {
            continue;
        }
        let check = MAPPING
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{}: stated `{name}` has no mapping", v.hex))
            .1;
        let what = format!("{} `{name}`", v.hex);
        let stated_str = || stated.as_str().expect("stated string");
        match check {
            Check::Field(project, factor) => {
                assert_matches(field(reading, project), stated, factor, &what)
            }
            Check::AddressDigits(from, to) => {
                assert_eq!(address(reading).get(from..to), Some(stated_str()), "{what}")
            }
            Check::AddressBytes => {
                let wire = bytes(stated_str());
                if wire.iter().all(|b| *b == 0xAA) {
                    assert_eq!(
                        reading.field("broadcast"),
                        Some(&Value::Bool(true)),
                        "{what}"
                    );
                    assert_eq!(reading.field("address"), None, "{what}");
                } else {
                    let a6_first: Vec<u8> = wire.iter().rev().copied().collect();
                    assert_eq!(address(reading), hex::encode(&a6_first), "{what}");
                }
            }
            Check::DiBytes => {
                let wire = bytes(stated_str());
                let [d0, d1] = wire[..] else {
                    panic!("{what}: two DI bytes")
                };
                let di = [u16::from_le_bytes([d0, d1]), u16::from_be_bytes([d0, d1])]
                    .into_iter()
                    .find(|di| KNOWN_DIS.contains(di))
                    .unwrap_or_else(|| panic!("{what}: not a known DI"));
                assert_eq!(field(reading, "di"), &Value::Int(di.into()), "{what}");
            }
            Check::RealTime => {
                let s = stated_str();
                let n = |r: std::ops::Range<usize>| -> u32 {
                    s.get(r)
                        .and_then(|d| d.parse().ok())
                        .expect("realtime digits")
                };
                let t = from_civil(
                    n(0..4).into(),
                    n(5..7),
                    n(8..10),
                    n(11..13),
                    n(14..16),
                    n(17..19),
                );
                assert_eq!(reading.time, t.map(DeviceTime::Local), "{what}");
            }
            Check::StatusHex => {
                let st = bytes(stated_str());
                let [st0, st1] = st[..] else {
                    panic!("{what}: two ST bytes")
                };
                let status = i64::from(st0) | i64::from(st1) << 8;
                assert_eq!(field(reading, "status"), &Value::Int(status), "{what}");
            }
            Check::DataLength => {
                let l = frame[preamble_len(frame) + 10];
                assert_eq!(Some(i64::from(l)), stated.as_i64(), "{what}");
                // Accepted means DATA[L] then CS then 0x16 ended the input exactly.
                assert_eq!(
                    frame.len(),
                    preamble_len(frame) + 13 + usize::from(l),
                    "{what}"
                );
            }
            Check::ChecksumStated => {
                assert_eq!(
                    Some(i64::from(frame[frame.len() - 2])),
                    stated.as_i64(),
                    "{what}"
                )
            }
        }
    }
    // Identity always mirrors the address and SER.
    let identity = reading.identity.as_ref().expect("identity");
    match reading.field("address") {
        Some(Value::Text(a)) => assert_eq!(identity.device_id.as_deref(), Some(a.as_str())),
        _ => assert_eq!(identity.device_id, None),
    }
    let ser = match reading.field("ser") {
        Some(Value::Int(s)) => Some(*s as u32),
        _ => None,
    };
    assert_eq!(identity.sequence, ser);
}

/// `"MISMATCH: (frame checksum) stated 'valid', layout gives 'stated 0x08, computed 0x13'"`
/// → (0x08, 0x13).
fn stated_and_computed(verification: &str) -> (u32, u32) {
    let hex_after = |key: &str| {
        let at = verification.find(key).expect(key) + key.len();
        let digits: String = verification[at..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit())
            .collect();
        u32::from_str_radix(&digits, 16).expect("hex number")
    };
    (hex_after("stated 0x"), hex_after("computed 0x"))
}

#[test]
fn every_cjt188_vector() {
    let codec = builtin("cjt188").expect("built-in codec");
    let vectors = cjt188_vectors();
    assert_eq!(vectors.len(), 8, "the CJ/T 188 entry holds 8 vectors");
    let mut mismatches = 0;
    for v in &vectors {
        let frame = bytes(&v.hex);
        if v.verification == "verified" {
            let readings = codec
                .decode(&frame)
                .unwrap_or_else(|e| panic!("{}: {e}", v.hex));
            assert_eq!(readings.len(), 1, "{}", v.hex);
            assert_eq!(readings[0].measurement, "water_meter");
            assert_stated(v, &frame, &readings[0], &[]);
        } else {
            assert!(
                v.verification.starts_with("MISMATCH: (frame checksum)"),
                "{}",
                v.verification
            );
            mismatches += 1;
            let (stated, computed) = stated_and_computed(&v.verification);
            assert_eq!(v.expected["cs_stated"].as_u64(), Some(u64::from(stated)));
            assert_eq!(
                codec.decode(&frame),
                Err(DecodeError::Checksum { stated, computed }),
                "{}",
                v.hex
            );
            // With the checksum corrected, every other stated value holds.
            let mut fixed = frame.clone();
            let cs_at = fixed.len() - 2;
            fixed[cs_at] = u8::try_from(computed).expect("a byte");
            let readings = codec
                .decode(&fixed)
                .unwrap_or_else(|e| panic!("corrected {}: {e}", v.hex));
            assert_stated(v, &fixed, &readings[0], &["cs_stated"]);
        }
    }
    assert_eq!(
        mismatches, 1,
        "exactly the widely copied CS 0x08 reply is a must-fail"
    );
}

#[test]
fn corrected_reply_equals_the_foxedge_frame() {
    // The MISMATCH vector with CS 0x13 and without its wake-up bytes is the FoxEdge frame.
    let vectors = cjt188_vectors();
    let bad = vectors
        .iter()
        .find(|v| v.verification != "verified")
        .expect("mismatch vector");
    let mut fixed = bytes(&bad.hex);
    let cs_at = fixed.len() - 2;
    fixed[cs_at] = 0x13;
    let foxedge = vectors
        .iter()
        .find(|v| v.expected.get("cs_stated").and_then(Json::as_u64) == Some(0x13))
        .expect("corrected vector");
    assert_eq!(fixed[preamble_len(&fixed)..], bytes(&foxedge.hex)[..]);
    let codec = builtin("cjt188").expect("built-in codec");
    assert_eq!(codec.decode(&fixed), codec.decode(&bytes(&foxedge.hex)));
}
