//! The Dragino NB-IoT vectors of `tests/data/devices.json` (NDDS75, N95S31B), decoded by the
//! built-in `dragino` codec. Every value a source states is asserted through [`MAPPING`]
//! (vendor name → what the codec produces). Each payload is decoded as it travels (ASCII hex
//! text) and as the binary frame it stands for; both must give the same reading. The
//! "structure-only" vector states no values: it must decode, and its device id must be the
//! IMEI tail its note names.

use nbiot_codecs::registry::{build, CodecOptions};
use nbiot_codecs::{builtin, hex, Reading, Value};
use serde_json::Value as Json;

/// How one stated value is checked.
#[derive(Debug, Clone, Copy)]
enum Check {
    /// The decoded field of that name equals the stated number divided by `divisor`
    /// (exactly: the codec divides too, so 3180 mV must print as 3.18 V).
    Field(&'static str, f64),
    /// The decoded Bool field of that name is `stated != 0`.
    Flag(&'static str),
    /// The reading's identity: the device id as 12 hex digits.
    DeviceId,
    /// Stated, but deliberately not decoded; the reason says why.
    Ignored(&'static str),
}

/// Vendor name → project check, once for all Dragino vectors.
const MAPPING: &[(&str, Check)] = &[
    ("device_id", Check::DeviceId),
    ("version", Check::Field("version", 1.0)),
    ("bat_mv", Check::Field("battery_v", 1000.0)),
    ("signal", Check::Field("signal_csq", 1.0)),
    ("distance_mm", Check::Field("distance_m", 1000.0)),
    ("interrupt", Check::Flag("interrupt")),
    ("model", Check::Field("model", 1.0)),
    (
        "reserve",
        Check::Ignored("5 reserved bytes; the manual says \"ignore in N95S31B\""),
    ),
    ("temperature", Check::Field("temperature_c", 1.0)),
    ("humidity", Check::Field("humidity_pct", 1.0)),
];

struct Vector {
    model: String,
    hex: String,
    expected: serde_json::Map<String, Json>,
    note: String,
    verification: String,
}

fn dragino_vectors() -> Vec<Vector> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/devices.json"
    ))
    .expect("devices.json is readable");
    let devices: Vec<Json> = serde_json::from_str(&text).expect("devices.json parses");
    let mut out = Vec::new();
    for device in devices.iter().filter(|d| d["vendor"] == "Dragino") {
        for v in device["vectors"].as_array().expect("vectors array") {
            out.push(Vector {
                model: device["model"].as_str().expect("model").to_owned(),
                hex: v["hex"].as_str().expect("hex").to_owned(),
                expected: v["expected"].as_object().expect("expected").clone(),
                note: v["note"].as_str().unwrap_or_default().to_owned(),
                verification: v["verification"].as_str().expect("verification").to_owned(),
            });
        }
    }
    out
}

/// The `model` option that names this vector's device.
fn model_option(model: &str) -> &'static str {
    if model.starts_with("NDDS75") {
        "ndds75"
    } else if model.starts_with("N95S31B") {
        "n95s31b"
    } else {
        panic!("no Dragino model option for {model}")
    }
}

/// Decodes the payload as sent (hex text) and as binary, with `model = "auto"` and with the
/// model named, and checks all four agree. Returns the one reading.
fn decode_all_ways(v: &Vector) -> Reading {
    let binary = hex::decode(v.hex.as_bytes()).expect("vector hex");
    let auto = builtin("dragino").expect("dragino is built in");
    let mut options = CodecOptions::new();
    options.insert("model".into(), model_option(&v.model).into());
    let named = build("dragino", &options).expect("model option accepted");

    let from_text = auto.decode(v.hex.as_bytes());
    let reading = match &from_text {
        Ok(readings) if readings.len() == 1 => readings[0].clone(),
        other => panic!("{}: expected one reading, got {other:?}", v.hex),
    };
    assert_eq!(auto.decode(&binary), from_text, "{}: binary vs text", v.hex);
    assert_eq!(
        named.decode(v.hex.as_bytes()),
        from_text,
        "{}: named model",
        v.hex
    );
    assert_eq!(
        named.decode(&binary),
        from_text,
        "{}: named model, binary",
        v.hex
    );
    assert_eq!(reading.measurement, "dragino");
    for (name, _) in &reading.fields {
        assert!(
            named.field_names().contains(&name.as_str()),
            "{name} is not declared by the codec"
        );
    }
    assert_eq!(reading.time, None, "the frame carries no clock");
    reading
}

fn device_id(r: &Reading) -> &str {
    r.identity
        .as_ref()
        .and_then(|i| i.device_id.as_deref())
        .expect("the frame names its device")
}

fn field<'a>(r: &'a Reading, name: &str) -> &'a Value {
    r.field(name)
        .unwrap_or_else(|| panic!("no field `{name}` in {:?}", r.fields))
}

fn assert_stated(v: &Vector, reading: &Reading) {
    for (name, stated) in &v.expected {
        let check = MAPPING
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{}: stated `{name}` has no mapping", v.hex))
            .1;
        let what = format!("{} `{name}`", v.hex);
        match check {
            Check::Field(project, divisor) => {
                let want = stated.as_f64().expect("stated number") / divisor;
                match field(reading, project) {
                    Value::Int(i) => assert_eq!(*i as f64, want, "{what}"),
                    Value::Float(f) => assert_eq!(*f, want, "{what}"),
                    other => panic!("{what}: decoded {other:?}"),
                }
            }
            Check::Flag(project) => {
                let want = stated.as_i64().expect("stated integer") != 0;
                assert_eq!(field(reading, project), &Value::Bool(want), "{what}");
            }
            Check::DeviceId => {
                assert_eq!(
                    device_id(reading),
                    stated.as_str().expect("string"),
                    "{what}"
                )
            }
            Check::Ignored(_why) => {}
        }
    }
}

#[test]
fn mapping_names_no_field_twice() {
    for (i, (vendor, _)) in MAPPING.iter().enumerate() {
        assert!(
            MAPPING[i + 1..].iter().all(|(n, _)| n != vendor),
            "{vendor} mapped twice"
        );
    }
}

#[test]
fn verified_vectors_decode_to_every_stated_value() {
    let vectors = dragino_vectors();
    let verified: Vec<_> = vectors
        .iter()
        .filter(|v| v.verification == "verified")
        .collect();
    assert_eq!(
        verified.len(),
        2,
        "one NDDS75 and one N95S31B vector are verified"
    );
    for v in verified {
        assert!(
            !v.expected.is_empty(),
            "{}: a verified vector states values",
            v.hex
        );
        let reading = decode_all_ways(v);
        assert_stated(v, &reading);
    }
}

#[test]
fn verified_vectors_produce_exactly_the_documented_fields() {
    // The whole field list per model, so an extra or missing field is noticed.
    for v in dragino_vectors()
        .iter()
        .filter(|v| v.verification == "verified")
    {
        let reading = decode_all_ways(v);
        let names: Vec<&str> = reading.fields.iter().map(|(n, _)| n.as_str()).collect();
        let want: &[&str] = match model_option(&v.model) {
            "ndds75" => &[
                "version",
                "battery_v",
                "signal_csq",
                "distance_m",
                "interrupt",
            ],
            _ => &[
                "version",
                "battery_v",
                "signal_csq",
                "model",
                "temperature_c",
                "humidity_pct",
            ],
        };
        assert_eq!(names, want, "{}", v.hex);
    }
}

/// The iotcreators NDDS75 uplink: the source states only field sizes and the sender's IMEI.
/// `derived_by_us_not_source_stated` holds our own reading of it; those values are NOT
/// vendor-stated and are deliberately not asserted as truth here. What the source does
/// state — a 14-byte NDDS75 frame from IMEI 868411056756471 — is asserted.
#[test]
fn structure_only_vector_decodes_and_names_its_imei() {
    let vectors = dragino_vectors();
    let structure_only: Vec<_> = vectors
        .iter()
        .filter(|v| v.verification.starts_with("structure-only"))
        .collect();
    assert_eq!(structure_only.len(), 1);
    for v in structure_only {
        assert!(v.expected.is_empty(), "{}: no source-stated values", v.hex);
        assert_eq!(v.hex.len(), 28, "a 14-byte NDDS75 frame as hex text");
        let reading = decode_all_ways(v);
        let imei: String = v
            .note
            .split("IMEI ")
            .nth(1)
            .expect("the note names the IMEI")
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        assert_eq!(imei.len(), 15, "an IMEI has 15 digits: {imei}");
        // "By default, the Device ID equal to the last 6 bytes of IMEI": its last 12 digits.
        assert_eq!(device_id(&reading), &imei[3..]);
        assert!(reading.field("distance_m").is_some(), "an NDDS75 reading");
    }
}

#[test]
fn no_dragino_vector_is_unhandled() {
    for v in dragino_vectors() {
        assert!(
            v.verification == "verified" || v.verification.starts_with("structure-only"),
            "{}: verification `{}` needs a deliberate test",
            v.hex,
            v.verification
        );
    }
}
