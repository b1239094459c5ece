//! The declarative layout codec, end to end: every construct of the language, every
//! compile-error path with its line, checksums against catalogue vectors, real devices
//! expressed as layouts (Dragino N95S31B, Milesight EM300-TH / EM400 / AT101 TLV, CJ/T 188
//! meter frames, a wM-Bus record) asserted against the vendors' stated values, the
//! elderly-care watch example, and the no-panic properties (random layouts through the
//! compiler, random payloads through compiled layouts).

use nbiot_codecs::layout::{compile_str, LayoutCodec};
use nbiot_codecs::{Codec, DecodeError, DeviceTime, Identity, Reading, Text, Value};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// helpers

fn codec(src: &str) -> LayoutCodec {
    compile_str(src).unwrap_or_else(|e| panic!("layout does not compile: {}", e.located(src)))
}

fn hex(s: &str) -> Vec<u8> {
    nbiot_codecs::hex::decode(s.as_bytes()).expect("test hex")
}

fn decode(src: &str, payload: &str) -> Result<Vec<Reading>, DecodeError> {
    codec(src).decode(&hex(payload))
}

/// The fields of a single-reading decode, as (name, value) pairs in order.
fn one(src: &str, payload: &str) -> Vec<(String, Value)> {
    let readings = decode(src, payload).unwrap_or_else(|e| panic!("decode failed: {e}"));
    assert_eq!(readings.len(), 1, "{readings:?}");
    fields(&readings[0])
}

fn fields(r: &Reading) -> Vec<(String, Value)> {
    r.fields
        .iter()
        .map(|(n, v)| (n.to_string(), v.clone()))
        .collect()
}

fn f(name: &str, v: impl Into<V>) -> (String, Value) {
    (name.to_owned(), v.into().0)
}

struct V(Value);
impl From<i64> for V {
    fn from(v: i64) -> V {
        V(Value::Int(v))
    }
}
impl From<f64> for V {
    fn from(v: f64) -> V {
        V(Value::Float(v))
    }
}
impl From<bool> for V {
    fn from(v: bool) -> V {
        V(Value::Bool(v))
    }
}
impl From<&str> for V {
    fn from(v: &str) -> V {
        V(Value::Text(Text::new(v)))
    }
}

/// The located compile error of `src` ("line N: message").
fn compile_err(src: &str) -> String {
    match compile_str(src) {
        Ok(_) => panic!("expected a compile error for:\n{src}"),
        Err(e) => e.located(src),
    }
}

fn devices() -> serde_json::Value {
    serde_json::from_str(include_str!("data/devices.json")).expect("devices.json parses")
}

/// The vectors of the device whose model contains `model`.
fn vectors(model: &str) -> Vec<serde_json::Value> {
    devices()
        .as_array()
        .expect("a list")
        .iter()
        .filter(|d| d["model"].as_str().is_some_and(|m| m.contains(model)))
        .flat_map(|d| d["vectors"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Asserts every vendor-stated value through one mapping table: vendor name → (project
/// name, factor). A `None` project name marks a vendor value the layout deliberately does
/// not emit (says why in the table's comment).
fn assert_stated(
    reading: &Reading,
    expected: &serde_json::Map<String, serde_json::Value>,
    map: &[(&str, Option<&str>, f64)],
) {
    for (vendor, want) in expected {
        let (_, project, factor) = map
            .iter()
            .find(|(v, _, _)| v == vendor)
            .unwrap_or_else(|| panic!("no mapping for vendor field `{vendor}`"));
        let Some(project) = project else { continue };
        let got = reading
            .field(project)
            .unwrap_or_else(|| panic!("`{project}` (vendor `{vendor}`) missing in {reading:?}"));
        match (want, got) {
            (serde_json::Value::String(s), Value::Text(t)) => assert_eq!(s, t, "{vendor}"),
            (serde_json::Value::Number(n), v) => {
                let want = n.as_f64().expect("number") * factor;
                let got = v.as_f64().expect("numeric field");
                assert!(
                    (want - got).abs() < 1e-9,
                    "{vendor}: want {want}, got {got}"
                );
            }
            (w, g) => panic!("{vendor}: cannot compare {w:?} with {g:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// values

#[test]
fn integers_of_every_width_in_both_byte_orders() {
    let src = r#"
items = [
  { field = "a", type = "u8" },
  { field = "b", type = "i8" },
  { field = "c", type = "u16" },
  { field = "d", type = "i16", endian = "little" },
  { field = "e", type = "u24" },
  { field = "g", type = "i24", endian = "little" },
  { field = "h", type = "u32", endian = "little" },
  { field = "i", type = "i32" },
  { field = "j", type = "u48" },
  { field = "k", type = "i64", endian = "little" },
]"#;
    let payload = "ff ff 0102 feff 010203 0000ff 78563412 fffffffe 010203040506 feffffffffffffff";
    assert_eq!(
        one(src, payload),
        [
            f("a", 255),
            f("b", -1),
            f("c", 0x0102),
            f("d", -2),
            f("e", 0x010203),
            f("g", -65536),
            f("h", 0x12345678),
            f("i", -2),
            f("j", 0x010203040506),
            f("k", -2),
        ]
    );
}

#[test]
fn layout_default_byte_order_and_u64_limits() {
    let src = r#"
endian = "little"
items = [{ field = "a", type = "u16" }, { field = "b", type = "u16", endian = "big" }, { field = "c", type = "u64" }]"#;
    assert_eq!(
        one(src, "0102 0102 ffffffffffffff7f"),
        [f("a", 0x0201), f("b", 0x0102), f("c", i64::MAX)]
    );
    // A u64 above i64::MAX has no Int representation: an error, not a wrapped value.
    assert_eq!(
        decode(src, "0102 0102 ffffffffffffffff"),
        Err(DecodeError::InvalidValue {
            what: "c",
            offset: 4,
            reason: "value exceeds the signed 64-bit range"
        })
    );
    // ... unless it is scaled to a Float.
    let scaled = r#"items = [{ field = "c", type = "u64", scale = 0.5 }]"#;
    assert_eq!(
        one(scaled, "ffffffffffffffff"),
        [f("c", 9_223_372_036_854_775_808.0)]
    );
}

#[test]
fn floats_are_widened_without_noise() {
    let src = r#"
items = [
  { field = "a_c", type = "f32" },
  { field = "b", type = "f64", endian = "little" },
  { field = "c", type = "f32", scale = 10.0, decimals = 1 },
]"#;
    // 22.4f32 = 0x41B33333; 1.5 f64 LE; 0.1f32 = 0x3DCCCCCD
    assert_eq!(
        one(src, "41b33333 000000000000f83f 3dcccccd"),
        [f("a_c", 22.4), f("b", 1.5), f("c", 1.0)]
    );
}

#[test]
fn bcd_ascii_and_bytes() {
    let src = r#"
items = [
  { field = "count", type = "bcd", len = 3 },
  { field = "volume_m3", type = "bcd", len = 4, endian = "little", scale = 0.01 },
  { field = "name", type = "ascii", len = 8 },
  { field = "mac", type = "bytes", len = 3 },
  { field = "address", type = "bytes", len = 3, endian = "little" },
]"#;
    assert_eq!(
        one(src, "001234 00776655 4e42494f54000000 24e124 443322"),
        [
            f("count", 1234),
            f("volume_m3", 556677.0),
            f("name", "NBIOT"),
            f("mac", "24e124"),
            f("address", "223344"),
        ]
    );
    assert_eq!(
        decode(src, "00123a 00776655 4e42494f54000000 24e124 443322"),
        Err(DecodeError::InvalidValue {
            what: "count",
            offset: 0,
            reason: "not a BCD digit"
        })
    );
    assert_eq!(
        decode(src, "001234 00776655 4e42014f54000000 24e124 443322"),
        Err(DecodeError::InvalidValue {
            what: "name",
            offset: 7,
            reason: "not printable ASCII"
        })
    );
}

#[test]
fn lengths_from_prefixes_names_and_rest() {
    let src = r#"
items = [
  { field = "name", type = "ascii", len = "u8" },
  { var = "n", type = "u8" },
  { field = "code", type = "bytes", len = "n-1" },
  { field = "tail", type = "bytes", len = "rest-1" },
  { skip = "rest" },
]"#;
    assert_eq!(
        one(src, "03 414243 03 aabb ccdd ee"),
        [f("name", "ABC"), f("code", "aabb"), f("tail", "ccdd")]
    );
    assert_eq!(
        decode(src, "09 4142"),
        Err(DecodeError::Truncated {
            what: "name",
            offset: 1,
            needed: 7
        })
    );
    assert_eq!(
        decode(src, "01 41 00"),
        Err(DecodeError::InvalidValue {
            what: "code",
            offset: 3,
            reason: "negative length"
        })
    );
}

#[test]
fn fixed_offsets_with_at() {
    let src = r#"
items = [
  { field = "last", type = "u8", at = 3 },
  { field = "first", type = "u16", at = 0 },
  { field = "third", type = "u8" },
  { skip = 1 },
]"#;
    assert_eq!(
        one(src, "01020304"),
        [f("last", 4), f("first", 0x0102), f("third", 3)]
    );
    assert_eq!(
        decode(src, "0102"),
        Err(DecodeError::Truncated {
            what: "at",
            offset: 2,
            needed: 1
        })
    );
}

#[test]
fn scale_offset_and_decimals_print_exactly() {
    let src = r#"
items = [
  { field = "temperature_c", type = "i16", scale = 0.1 },
  { field = "humidity_pct", type = "u8", scale = 0.5 },
  { field = "battery_v", type = "u16", scale = 0.001 },
  { field = "air_c", type = "u8", offset = -40 },
  { field = "lat_deg", type = "i32", scale = 0.000001 },
  { field = "f_c", type = "u16", scale = 0.18, offset = -459.67, decimals = 1 },
]"#;
    assert_eq!(
        one(src, "010b 65 0ccd 41 0177bcde 0a00"),
        [
            f("temperature_c", 26.7),
            f("humidity_pct", 50.5),
            f("battery_v", 3.277),
            f("air_c", 25.0),
            f("lat_deg", 24.62435),
            f("f_c", 1.1),
        ]
    );
}

#[test]
fn enumerations_with_default_and_unknown_codes() {
    let src = r#"
items = [
  { field = "valve", type = "u8", enum = { 0 = "closed", 1 = "open", "2-4" = "moving" } },
  { field = "mode", type = "u8", enum = { 0x10 = "eco", default = "other" } },
  { field = "state", type = "u8", enum = { 0 = "ok" } },
]"#;
    assert_eq!(
        one(src, "01 10 00"),
        [f("valve", "open"), f("mode", "eco"), f("state", "ok")]
    );
    // An unlisted code without `default` keeps its number, as text (the field stays Text).
    assert_eq!(
        one(src, "03 11 07"),
        [f("valve", "moving"), f("mode", "other"), f("state", "7")]
    );
}

#[test]
fn flags_bool_and_invert() {
    let src = r#"
items = [
  { field = "leak", type = "u8", bool = true },
  { field = "valve_open", type = "u8", bool = true, invert = true },
]"#;
    assert_eq!(one(src, "02 00"), [f("leak", true), f("valve_open", true)]);
    assert_eq!(
        one(src, "00 01"),
        [f("leak", false), f("valve_open", false)]
    );
}

#[test]
fn sentinels_absent_error_flag_and_presence() {
    let src = r#"
items = [
  { field = "flow_temperature_c", type = "i16", scale = 0.01, sentinel = { -10000 = "error", 0x7FFF = "absent" } },
  { field = "latitude_deg", type = "i32", scale = 0.000001, sentinel = { 0xFFFFFFFF = "absent" }, present = "gnss_fix" },
  { field = "level_m", type = "u16", scale = 0.001, sentinel = { "0xFFF0-0xFFFF" = "level_sensor_fault" } },
  { field = "volume_m3", type = "bcd", len = 2, sentinel = { 0xFFFF = "absent" } },
  { field = "ratio", type = "f32", sentinel = { nan = "absent", "-100" = "error" } },
]"#;
    assert_eq!(
        one(src, "0a2a 0177bcde 0bb8 1234 3f000000"),
        [
            f("flow_temperature_c", 26.02),
            f("latitude_deg", 24.62435),
            f("gnss_fix", true),
            f("level_m", 3.0),
            f("volume_m3", 1234),
            f("ratio", 0.5),
        ]
    );
    // d8f0 = -10000 (-100.00 °C, a sensor error), no fix, level fault, BCD FFFF, NaN.
    assert_eq!(
        one(src, "d8f0 ffffffff fff3 ffff 7fc00000"),
        [
            f("flow_temperature_error", true),
            f("gnss_fix", false),
            f("level_sensor_fault", true),
        ]
    );
    assert_eq!(
        one(src, "7fff ffffffff fff3 ffff c2c80000"),
        [
            f("gnss_fix", false),
            f("level_sensor_fault", true),
            f("ratio_error", true)
        ]
    );
    assert_eq!(
        codec(src).field_names(),
        [
            "flow_temperature_c",
            "flow_temperature_error",
            "latitude_deg",
            "gnss_fix",
            "level_m",
            "level_sensor_fault",
            "volume_m3",
            "ratio",
            "ratio_error"
        ]
    );
}

#[test]
fn vars_steer_but_are_not_emitted() {
    let src = r#"
items = [
  { var = "kind", type = "u8" },
  { field = "value", type = "u8" },
]"#;
    assert_eq!(one(src, "07 08"), [f("value", 8)]);
    assert_eq!(codec(src).field_names(), ["value"]);
}

#[test]
fn identity_from_the_payload() {
    let src = r#"
items = [
  { var = "imei", type = "ascii", len = 15, identity = "device_id" },
  { field = "seq", type = "u16", identity = "sequence" },
]"#;
    let r = decode(src, "383639393531303430323933333631 0102").unwrap();
    assert_eq!(
        r[0].identity.as_ref(),
        Some(&Identity {
            device_id: Some("869951040293361".into()),
            sequence: Some(258)
        })
    );
    assert_eq!(fields(&r[0]), [f("seq", 258)]);
}

// ---------------------------------------------------------------------------------------
// frame structure

#[test]
fn constants_skips_and_trailing_bytes() {
    let src = r#"
items = [
  { skip_while = "FE" },
  { const = "68", name = "start" },
  { skip = 2 },
  { field = "x", type = "u8" },
  { const = "16" },
]"#;
    assert_eq!(one(src, "fefe 68 aabb 05 16"), [f("x", 5)]);
    assert_eq!(one(src, "68 aabb 05 16"), [f("x", 5)]);
    assert_eq!(
        decode(src, "fe 69 aabb 05 16"),
        Err(DecodeError::BadConstant {
            what: "start",
            offset: 1,
            expected: 0x68,
            found: 0x69
        })
    );
    assert_eq!(
        decode(src, "68 aabb 05 17"),
        Err(DecodeError::BadConstant {
            what: "constant",
            offset: 4,
            expected: 0x16,
            found: 0x17
        })
    );
    assert_eq!(
        decode(src, "68 aabb 05 16 00 00"),
        Err(DecodeError::TrailingBytes {
            offset: 5,
            count: 2
        })
    );
    let lenient = format!("trailing = \"ignore\"\n{src}");
    assert_eq!(one(&lenient, "68 aabb 05 16 00 00"), [f("x", 5)]);
    assert_eq!(codec(src).decode(&[]), Err(DecodeError::Empty));
}

#[test]
fn length_fields_bound_a_sub_slice() {
    let src = r#"
items = [
  { length = "u8", items = [
      { field = "a", type = "u8" },
      { field = "b", type = "u8" },
  ] },
  { field = "after", type = "u8" },
]"#;
    assert_eq!(
        one(src, "02 0102 09"),
        [f("a", 1), f("b", 2), f("after", 9)]
    );
    // The sub-slice ends where the length says: its items cannot read past it.
    assert_eq!(
        decode(src, "01 0102 09"),
        Err(DecodeError::Truncated {
            what: "b",
            offset: 2,
            needed: 1
        })
    );
    assert_eq!(
        decode(src, "03 010203 09"),
        Err(DecodeError::TrailingBytes {
            offset: 3,
            count: 1
        })
    );
    assert_eq!(
        decode(src, "09 0102"),
        Err(DecodeError::Truncated {
            what: "length",
            offset: 1,
            needed: 7
        })
    );
    let lenient = r#"
items = [
  { var = "l", type = "u8" },
  { length = "l-1", trailing = "ignore", items = [{ field = "a", type = "u8" }] },
  { length = "rest-1", items = [{ field = "b", type = "u16" }] },
  { field = "c", type = "u8" },
]"#;
    assert_eq!(
        one(lenient, "04 01ffff 0203 04"),
        [f("a", 1), f("b", 0x0203), f("c", 4)]
    );
}

#[test]
fn checksums_over_spans() {
    // CRC-16/MODBUS over everything before it, low byte first (Modbus RTU convention):
    // 01 03 00 00 00 0A → CRC 0xCDC5, sent C5 CD.
    let modbus = r#"
items = [
  { field = "addr", type = "u8" },
  { field = "func", type = "u8" },
  { skip = 4 },
  { checksum = "crc16_modbus" },
]"#;
    assert_eq!(
        one(modbus, "01030000000a c5cd"),
        [f("addr", 1), f("func", 3)]
    );
    assert_eq!(
        decode(modbus, "01030000000ac5ce"),
        Err(DecodeError::Checksum {
            stated: 0xCEC5,
            computed: 0xCDC5
        })
    );
    // The catalogue check string "123456789" under each named variant.
    for (alg, crc, endian) in [
        ("crc16_modbus", "374b", "little"),
        ("crc16_ccitt_false", "29b1", "big"),
        ("crc16_xmodem", "31c3", "big"),
        ("crc16_kermit", "2189", "big"),
        ("crc16_x25", "906e", "big"),
        ("crc16_arc", "bb3d", "big"),
        ("crc32", "cbf43926", "big"),
        ("sum8", "dd", "big"),
        ("xor8", "31", "big"),
    ] {
        let src = format!(
            "items = [{{ mark = \"s\" }}, {{ skip = 9 }}, {{ checksum = \"{alg}\", from = \"s\", endian = \"{endian}\" }}]"
        );
        let payload = format!("{}{crc}", nbiot_codecs::hex::encode(b"123456789"));
        assert!(decode(&src, &payload).is_ok(), "{alg}");
    }
    // `from`/`to` bound the span explicitly: xor8 over bytes 1..3 only.
    let span = r#"
items = [
  { skip = 1 }, { mark = "a" }, { skip = 2 }, { mark = "b" }, { skip = 1 },
  { checksum = "xor8", from = "a", to = "b" },
]"#;
    assert!(decode(span, "ff 0f f0 ee ff").is_ok());
    assert_eq!(
        decode(span, "ff 0f f0 ee 00"),
        Err(DecodeError::Checksum {
            stated: 0,
            computed: 0xFF
        })
    );
}

// ---------------------------------------------------------------------------------------
// variants, optional and repeated groups, TLV

#[test]
fn switch_on_a_type_byte() {
    let src = r#"
items = [
  { switch = "u8", cases = {
      0x01 = [{ field = "temperature_c", type = "i16", scale = 0.1 }],
      "0x02,0x03" = { field = "level_m", type = "u16", scale = 0.001 },
  } },
]"#;
    assert_eq!(one(src, "01 00e1"), [f("temperature_c", 22.5)]);
    assert_eq!(one(src, "03 0292"), [f("level_m", 0.658)]);
    assert_eq!(
        decode(src, "09 0000"),
        Err(DecodeError::UnknownType {
            what: "message type",
            code: 9,
            offset: 0
        })
    );
}

#[test]
fn switch_on_a_field_with_default_and_peek() {
    let src = r#"
items = [
  { field = "kind", type = "u8" },
  { switch = "kind", cases = { 1 = [{ field = "a", type = "u8" }] }, default = [{ skip = "rest" }] },
]"#;
    assert_eq!(one(src, "01 05"), [f("kind", 1), f("a", 5)]);
    assert_eq!(one(src, "02 0506"), [f("kind", 2)]);
    let peek = r#"
items = [
  { switch = "u8", peek = true, cases = { 0x68 = [{ const = "68" }, { field = "a", type = "u8" }] } },
]"#;
    assert_eq!(one(peek, "68 07"), [f("a", 7)]);
}

#[test]
fn switch_on_payload_length() {
    // Variants told apart by size alone (Dragino: 14 bytes NDDS75, 21 bytes N95S31B).
    let src = r#"
items = [
  { switch = "rest", cases = {
      2 = [{ field = "short", type = "u16" }],
      "3-4" = [{ field = "long", type = "u24" }, { skip = "rest" }],
  } },
]"#;
    assert_eq!(one(src, "0102"), [f("short", 0x0102)]);
    assert_eq!(one(src, "01020304"), [f("long", 0x010203)]);
    assert_eq!(
        decode(src, "01"),
        Err(DecodeError::UnknownType {
            what: "length",
            code: 1,
            offset: 0
        })
    );
}

#[test]
fn optional_groups_from_a_flag_bitmap() {
    let src = r#"
items = [
  { bitfield = "u8", var = "flags", items = [
      { var = "has_temp", bit = 0 },
      { field = "low_battery", bit = 6 },
  ] },
  { if = "has_temp", items = [{ field = "temperature_c", type = "i16", scale = 0.1 }] },
  { if = "flags & 0x02", items = [{ field = "humidity_pct", type = "u8" }], else = [{ skip = 1 }] },
  { if = "!flags", items = [{ field = "idle", type = "u8" }] },
  { if = "flags >= 0x80", items = [{ field = "extra", type = "u8" }] },
]"#;
    assert_eq!(
        one(src, "03 00fa 37"),
        [
            f("low_battery", false),
            f("temperature_c", 25.0),
            f("humidity_pct", 55)
        ]
    );
    assert_eq!(one(src, "40 ff"), [f("low_battery", true)]);
    assert_eq!(
        one(src, "00 ff 09"),
        [f("low_battery", false), f("idle", 9)]
    );
    assert_eq!(
        one(src, "80 ff 01"),
        [f("low_battery", false), f("extra", 1)]
    );
}

#[test]
fn bitfields_flags_ranges_and_enums() {
    let src = r#"
items = [
  { bitfield = "u16", field = "status", items = [
      { field = "valve_open", bit = 0 },
      { field = "closed", bit = 1, invert = true },
      { field = "mode", bits = "4-6", enum = { 0 = "off", 5 = "auto" } },
      { field = "level", bits = "8-11", scale = 10 },
      { field = "code", bits = "15-12" },
  ] },
]"#;
    // 0xA351 = 1010 0011 0101 0001
    assert_eq!(
        one(src, "a351"),
        [
            f("status", 0xA351),
            f("valve_open", true),
            f("closed", true),
            f("mode", "auto"),
            f("level", 30.0),
            f("code", 0xA),
        ]
    );
}

#[test]
fn repeats_with_a_count_field_or_until_the_end() {
    let counted = r#"
items = [
  { var = "n", type = "u8" },
  { repeat = "n", reading = true, items = [{ field = "v", type = "u8" }] },
]"#;
    let r = decode(counted, "03 0a0b0c").unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(
        r.iter().map(fields).collect::<Vec<_>>(),
        [[f("v", 10)], [f("v", 11)], [f("v", 12)]]
    );
    // A count that cannot fit in the bytes left is refused before any work.
    assert_eq!(
        decode(counted, "ff 0a0b"),
        Err(DecodeError::Truncated {
            what: "repeat",
            offset: 1,
            needed: 253
        })
    );
    let until_end = r#"
items = [
  { field = "id", type = "u8" },
  { repeat = "until_end", reading = true, items = [{ field = "v", type = "u16" }] },
]"#;
    let r = decode(until_end, "07 0001 0002").unwrap();
    assert_eq!(
        r.iter().map(fields).collect::<Vec<_>>(),
        [vec![f("id", 7)], vec![f("v", 1)], vec![f("v", 2)]]
    );
    assert_eq!(
        decode(until_end, "07 0001 00"),
        Err(DecodeError::Truncated {
            what: "v",
            offset: 3,
            needed: 1
        })
    );
    // Without `reading`, a repeat steps over records (vars only).
    let skipping = r#"items = [{ repeat = "u8", items = [{ var = "x", type = "u8" }, { skip = 1 }] }, { field = "z", type = "u8" }]"#;
    assert_eq!(one(skipping, "02 0102 0304 09"), [f("z", 9)]);
}

#[test]
fn readings_cap_and_step_cap() {
    let src = r#"items = [{ repeat = "until_end", reading = true, items = [{ field = "v", type = "u8" }] }]"#;
    // The first reading counts too (it is dropped at the end when it stays empty).
    assert_eq!(decode(src, &"01".repeat(1023)).map(|r| r.len()), Ok(1023));
    assert_eq!(
        decode(src, &"01".repeat(1024)),
        Err(DecodeError::InvalidValue {
            what: "reading",
            offset: 1023,
            reason: "more than 1024 readings in one payload"
        })
    );
    // Nested fixed counts over an empty body: bounded by the step budget, not by time.
    let nested = r#"items = [{ field = "a", type = "u8" }, { repeat = 60000, items = [{ repeat = 60000, items = [{ mark = "m" }] }] }]"#;
    assert_eq!(
        decode(nested, "01"),
        Err(DecodeError::InvalidValue {
            what: "repeat",
            offset: 1,
            reason: "too many repetitions for one payload"
        })
    );
}

#[test]
fn history_records_with_their_own_timestamps() {
    // One payload → several readings, each with the time it carries.
    let src = r#"
endian = "little"
items = [
  { repeat = "u8", reading = true, items = [
      { time = "unix", type = "u32" },
      { field = "volume_m3", type = "u32", scale = 0.001 },
  ] },
]"#;
    let r = decode(src, "02 9e744663 e8030000 2e834663 d0070000").unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].time, Some(DeviceTime::Utc(1_665_561_758)));
    assert_eq!(fields(&r[0]), [f("volume_m3", 1.0)]);
    assert_eq!(r[1].time, Some(DeviceTime::Utc(1_665_565_486)));
    assert_eq!(fields(&r[1]), [f("volume_m3", 2.0)]);
}

#[test]
fn hourly_history_spaced_by_an_interval() {
    // A meter's hourly history: base time (of the first record), then N values.
    let src = r#"
items = [
  { time = "unix", type = "u32" },
  { field = "volume_m3", type = "u32", scale = 0.001 },
  { repeat = "u8", reading = true, interval = 3600, items = [{ field = "hourly_m3", type = "u16", scale = 0.001 }] },
]"#;
    let r = decode(src, "6b014f80 000003e8 03 0001 0002 0003").unwrap();
    let times: Vec<_> = r.iter().map(|r| r.time).collect();
    let t = 1_795_248_000;
    assert_eq!(
        times,
        [
            Some(DeviceTime::Utc(t)),
            Some(DeviceTime::Utc(t)),
            Some(DeviceTime::Utc(t + 3600)),
            Some(DeviceTime::Utc(t + 7200))
        ]
    );
    assert_eq!(fields(&r[0]), [f("volume_m3", 1.0)]);
    assert_eq!(fields(&r[3]), [f("hourly_m3", 0.003)]);
    // No clock in the payload, interval read from it: the newest sample is "now".
    let ago = r#"
endian = "little"
items = [
  { var = "interval_s", type = "u16" },
  { repeat = "until_end", reading = true, interval = "interval_s", items = [{ field = "t_c", type = "i16", scale = 0.1 }] },
]"#;
    let r = decode(ago, "3c00 fe00 ff00 fe00").unwrap();
    let times: Vec<_> = r.iter().map(|r| r.time).collect();
    assert_eq!(
        times,
        [
            Some(DeviceTime::Ago(120)),
            Some(DeviceTime::Ago(60)),
            Some(DeviceTime::Ago(0))
        ]
    );
}

#[test]
fn device_times() {
    let src = r#"
items = [
  { switch = "u8", cases = {
      1 = [{ time = "unix", type = "u32" }],
      2 = [{ time = "unix_ms", type = "u64" }],
      3 = [{ time = "ago", type = "u16", scale = 60 }],
      4 = [{ time = "bcd:ssmmhhDDMMYYCC" }],
      5 = [{ time = "bin:YYMMDDhhmmss", zone = "utc" }],
      6 = [{ time = "unix", type = "u32", offset = 946684800, sentinel = { 0 = "absent" } }],
  } },
  { field = "x", type = "u8" },
]"#;
    let time = |hex: &str| decode(src, hex).map(|r| r[0].time);
    assert_eq!(
        time("01 6b014f80 00"),
        Ok(Some(DeviceTime::Utc(1_795_248_000)))
    );
    assert_eq!(
        time("02 0000019a8a3ab7e8 00"),
        Ok(Some(DeviceTime::Utc(1_763_255_695)))
    );
    assert_eq!(time("03 000f 00"), Ok(Some(DeviceTime::Ago(900))));
    assert_eq!(
        time("04 31012211051520 00"),
        Ok(Some(DeviceTime::Local(1_431_381_691)))
    );
    assert_eq!(
        time("05 0f050b16011f 00"),
        Ok(Some(DeviceTime::Utc(1_431_381_691)))
    );
    assert_eq!(
        time("06 00000001 00"),
        Ok(Some(DeviceTime::Utc(946_684_801)))
    );
    assert_eq!(time("06 00000000 00"), Ok(None));
    assert_eq!(
        time("04 31012211131520 00"),
        Err(DecodeError::InvalidValue {
            what: "time",
            offset: 1,
            reason: "not a valid date and time"
        })
    );
}

#[test]
fn tlv_streams_with_one_and_two_byte_types() {
    let two_byte = r#"
endian = "little"
items = [
  { tlv = "u16", unknown = "stop", types = {
      0x0175 = { field = "battery_pct", type = "u8" },
      0x0367 = { field = "temperature_c", type = "i16", scale = 0.1 },
  } },
]"#;
    assert_eq!(
        one(two_byte, "0175 5c 0367 1001"),
        [f("battery_pct", 92), f("temperature_c", 27.2)]
    );
    // Unknown type: stop (the rest is ignored).
    assert_eq!(
        one(two_byte, "0175 5c 0999 0102 0367 1001"),
        [f("battery_pct", 92)]
    );
    // A type that repeats replaces its earlier value in the reading.
    assert_eq!(
        one(two_byte, "0367 1001 0367 1101"),
        [f("temperature_c", 27.3)]
    );

    let with_len = r#"
items = [
  { tlv = "u8", len = "u8", unknown = "skip", types = {
      0x01 = [{ field = "a", type = "u8" }],
      0x02 = [{ field = "name", type = "ascii", len = "rest" }],
  } },
]"#;
    assert_eq!(
        one(with_len, "01 01 07  09 02 aabb  02 03 414243"),
        [f("a", 7), f("name", "ABC")]
    );
    assert_eq!(
        decode(with_len, "01 02 07 08"),
        Err(DecodeError::TrailingBytes {
            offset: 3,
            count: 1
        })
    );
    assert_eq!(
        decode(with_len, "01 05 07"),
        Err(DecodeError::Truncated {
            what: "tlv element",
            offset: 2,
            needed: 4
        })
    );
    let strict = r#"items = [{ tlv = "u8", types = { 0x01 = [{ field = "a", type = "u8" }] } }]"#;
    assert_eq!(
        decode(strict, "01 07 05 00"),
        Err(DecodeError::UnknownType {
            what: "tlv type",
            code: 5,
            offset: 2
        })
    );
}

// ---------------------------------------------------------------------------------------
// real devices

const DRAGINO_N95S31B: &str = include_str!("data/layout-dragino-n95s31b.toml");

#[test]
fn dragino_n95s31b_as_a_layout() {
    let codec = codec(DRAGINO_N95S31B);
    let map: &[(&str, Option<&str>, f64)] = &[
        // The device id is the readings' identity (asserted below), not a field.
        ("device_id", None, 1.0),
        ("version", Some("version"), 1.0),
        ("bat_mv", Some("battery_v"), 0.001),
        ("signal", Some("signal_csq"), 1.0),
        ("model", Some("model"), 1.0),
        // Reserved bytes the vendor says to ignore: skipped, not emitted.
        ("reserve", None, 1.0),
        ("temperature", Some("temperature_c"), 1.0),
        ("humidity", Some("humidity_pct"), 1.0),
    ];
    let vs = vectors("N95S31B");
    assert!(!vs.is_empty());
    for v in vs {
        let payload = hex(v["hex"].as_str().unwrap());
        let r = codec.decode(&payload).unwrap();
        assert_eq!(r.len(), 1);
        assert_stated(&r[0], v["expected"].as_object().unwrap(), map);
        assert_eq!(
            r[0].identity.as_ref().and_then(|i| i.device_id.as_deref()),
            Some("724031607457")
        );
        // The layout and the hand-written codec agree on every field.
        let builtin = nbiot_codecs::builtin("dragino")
            .unwrap()
            .decode(&payload)
            .unwrap();
        assert_eq!(r[0].fields, builtin[0].fields);
        assert_eq!(r[0].identity, builtin[0].identity);
    }
}

const MILESIGHT_EM300_TH: &str = include_str!("data/layout-milesight-em300-th.toml");

#[test]
fn milesight_em300_th_tlv_as_a_layout() {
    let codec = codec(MILESIGHT_EM300_TH);
    let map: &[(&str, Option<&str>, f64)] = &[
        ("battery", Some("battery_pct"), 1.0),
        ("temperature", Some("temperature_c"), 1.0),
        ("humidity", Some("humidity_pct"), 1.0),
        ("history[0].temperature", Some("temperature_c"), 1.0),
        ("history[0].humidity", Some("humidity_pct"), 1.0),
        // The record's timestamp is the reading's time, asserted below.
        ("history[0].timestamp", None, 1.0),
    ];
    let vs = vectors("EM300-TH");
    let plain = vs
        .iter()
        .find(|v| v["hex"] == "01755c03673401046865")
        .unwrap();
    let r = codec.decode(&hex("01755c03673401046865")).unwrap();
    assert_eq!(
        fields(&r[0]),
        [
            f("battery_pct", 92),
            f("temperature_c", 30.8),
            f("humidity_pct", 50.5)
        ]
    );
    assert_stated(&r[0], plain["expected"].as_object().unwrap(), map);

    let history = vs
        .iter()
        .find(|v| v["hex"] == "20ce9e74466310015d00")
        .unwrap();
    let r = codec.decode(&hex("20ce9e74466310015d00")).unwrap();
    assert_eq!(r.len(), 1, "the empty outer reading is dropped: {r:?}");
    assert_eq!(r[0].time, Some(DeviceTime::Utc(1_665_561_758)));
    assert_eq!(
        fields(&r[0]),
        [f("temperature_c", 27.2), f("humidity_pct", 46.5)]
    );
    assert_stated(&r[0], history["expected"].as_object().unwrap(), map);
}

const MILESIGHT_LOCATION: &str = r#"
# Milesight AT101 / EM400 (NB-IoT) channels with a GNSS position; 0xFFFFFFFF = no fix.
endian = "little"
items = [
  { tlv = "u16", unknown = "stop", types = {
      0x0175 = { field = "battery_pct", type = "u8" },
      0x0367 = { field = "temperature_c", type = "i16", scale = 0.1 },
      0x0500 = { field = "position", type = "u8", enum = { 0 = "normal", 1 = "tilt" } },
      "0x0488,0x0688" = [
        { field = "latitude_deg", type = "i32", scale = 0.000001, sentinel = { 0xFFFFFFFF = "absent" }, present = "gnss_fix" },
        { field = "longitude_deg", type = "i32", scale = 0.000001, sentinel = { 0xFFFFFFFF = "absent" } },
        { bitfield = "u8", items = [
            { field = "geofence", bits = "4-7", enum = { 0 = "inside", 1 = "outside", 2 = "unset", 3 = "unknown" } },
            { field = "motion", bits = "0-3", enum = { 0 = "unknown", 1 = "start", 2 = "moving", 3 = "stop" } },
        ] },
      ],
  } },
]
"#;

#[test]
fn milesight_location_with_no_fix_sentinel() {
    let codec = codec(MILESIGHT_LOCATION);
    // AT101 ThingsBoard pair.
    let r = codec
        .decode(&hex("01756403670a010500010488debc770108ff080720"))
        .unwrap();
    assert_eq!(
        fields(&r[0]),
        [
            f("battery_pct", 100),
            f("temperature_c", 26.6),
            f("position", "tilt"),
            f("latitude_deg", 24.62435),
            f("gnss_fix", true),
            f("longitude_deg", 118.030088),
            f("geofence", "unset"),
            f("motion", "unknown"),
        ]
    );
    // EM400 user guide: FFFFFFFF = no fix → no position, gnss_fix = false.
    let r = codec.decode(&hex("0688ffffffffffffffff20")).unwrap();
    assert_eq!(
        fields(&r[0]),
        [
            f("gnss_fix", false),
            f("geofence", "unset"),
            f("motion", "unknown")
        ]
    );
    // The MISMATCH vector (an old README that labels the first int32 longitude): we follow
    // the current decoders, latitude first, and so deliberately disagree with its text.
    let mismatch = vectors("EM400")
        .into_iter()
        .find(|v| v["hex"] == "068836bf7701f000090722")
        .unwrap();
    assert!(mismatch["verification"]
        .as_str()
        .unwrap()
        .starts_with("MISMATCH"));
    let r = codec.decode(&hex("068836bf7701f000090722")).unwrap();
    assert_eq!(r[0].field("latitude_deg"), Some(&Value::Float(24.62495)));
    assert_eq!(r[0].field("longitude_deg"), Some(&Value::Float(118.030576)));
    assert_eq!(r[0].field("motion"), Some(&Value::Text("moving".into())));
    assert_ne!(mismatch["expected"]["latitude"].as_f64(), Some(24.62495));
}

const CJT188: &str = r#"
# CJ/T 188-2004 meter frame: [FE..] 68 T A0..A6 C L [DI SER data] CS 16; CS = byte sum from 68.
endian = "little"
items = [
  { skip_while = "FE" },
  { const = "68", name = "start" },
  { field = "meter_type", type = "u8" },
  { field = "address", type = "bytes", len = 7, endian = "little" },
  { field = "control", type = "u8" },
  { length = "u8", items = [
      { var = "di", type = "u16" },
      { field = "ser", type = "u8" },
      { switch = "di", default = [{ skip = "rest" }], cases = {
          0x901F = [{ if = "control & 0x80", else = [{ skip = "rest" }], items = [
              { field = "volume_m3", type = "bcd", len = 4, endian = "little", scale = 0.01 },
              { field = "volume_unit", type = "u8", enum = { 0x2C = "m3", 0x29 = "l" } },
              { field = "settlement_volume_m3", type = "bcd", len = 4, endian = "little", scale = 0.01 },
              { skip = 1 },
              { time = "bcd:ssmmhhDDMMYYCC" },
              { field = "status", type = "u16", endian = "big" },
          ] }],
      } },
  ] },
  { checksum = "sum8", from = "start" },
  { const = "16", name = "end" },
]
"#;

#[test]
fn cjt188_frames_as_a_layout() {
    let codec = codec(CJT188);
    let response = codec
        .decode(&hex(
            "68104433221100337881161f9000007766552c007766552c3101221105152021841316",
        ))
        .unwrap();
    assert_eq!(response[0].time, Some(DeviceTime::Local(1_431_381_691)));
    assert_eq!(
        fields(&response[0]),
        [
            f("meter_type", 0x10),
            f("address", "78330011223344"),
            f("control", 0x81),
            f("ser", 0),
            f("volume_m3", 556677.0),
            f("volume_unit", "m3"),
            f("settlement_volume_m3", 556677.0),
            f("status", 0x2184),
        ]
    );
    for v in vectors("CJ/T 188") {
        let hex_s = v["hex"].as_str().unwrap();
        let res = codec.decode(&hex(hex_s));
        let stated = v["expected"]["cs_stated"].as_u64().unwrap() as u32;
        if v["verification"].as_str().unwrap().starts_with("MISMATCH") {
            // The widely copied response with CS 0x08: the bytes sum to 0x13.
            assert_eq!(
                res,
                Err(DecodeError::Checksum {
                    stated,
                    computed: 0x13
                }),
                "{hex_s}"
            );
            continue;
        }
        let r = res.unwrap_or_else(|e| panic!("{hex_s}: {e}"));
        if let Some(ctrl) = v["expected"]["ctrl"].as_i64() {
            assert_eq!(r[0].field("control"), Some(&Value::Int(ctrl)), "{hex_s}");
        }
        if let Some(a) = v["expected"]["address_A6_to_A0"].as_str() {
            assert_eq!(r[0].field("address"), Some(&Value::Text(Text::new(a))));
        }
        if let Some(flow) = v["expected"]["current_cumulative_flow"].as_f64() {
            assert_eq!(r[0].field("volume_m3"), Some(&Value::Float(flow)));
        }
    }
}

#[test]
fn wmbus_record_with_the_minus_100_degree_sentinel() {
    // One EN 13757-3 record: DIF 02 (int16) VIF 59 (flow temperature, 0.01 °C).
    let src = r#"
endian = "little"
items = [
  { const = "0259" },
  { field = "flow_temperature_c", type = "i16", scale = 0.01, sentinel = { -10000 = "error" } },
]"#;
    assert_eq!(one(src, "0259 2a0a"), [f("flow_temperature_c", 26.02)]);
    assert_eq!(one(src, "0259 f0d8"), [f("flow_temperature_error", true)]);
}

// ---------------------------------------------------------------------------------------
// the elderly-care watch

/// An elderly-care watch frame, written to prove the language on the wearable family (no
/// public NB-IoT watch protocol is binary; see shared/vectors/README.md):
///
/// ```text
/// A5 5A | 01 ver | IMEI 8 B (hex digits) | seq u16 | type u8 | time u32 unix | body | CRC-16/MODBUS (LE)
/// type 0x01 status:  flags u8 (b0 sos, b1 fall, b2 charging, b4-5 activity, b7 position follows)
///                    battery u8 % (FF none) | heart rate u8 bpm (0 not worn, FF error)
///                    SpO2 u8 % (0 none, FF error) | steps u32 | [lat i32 1e-6 deg | lon i32] (7FFFFFFF = no fix)
/// type 0x02 history: interval u16 s | n u8 | n × (heart rate u8, SpO2 u8), oldest first,
///                    the last sample taken at the frame time
/// ```
pub const WEARABLE: &str = r#"
endian = "big"
items = [
  { const = "A55A", name = "start" },
  { const = "01", name = "version" },
  { var = "imei", type = "bytes", len = 8, identity = "device_id" },
  { var = "seq", type = "u16", identity = "sequence" },
  { var = "msg_type", type = "u8" },
  { time = "unix", type = "u32" },
  { switch = "msg_type", cases = {
      0x01 = [
        { bitfield = "u8", items = [
            { field = "sos", bit = 0 },
            { field = "fall", bit = 1 },
            { field = "charging", bit = 2 },
            { field = "activity", bits = "4-5", enum = { 0 = "still", 1 = "walking", 2 = "running", 3 = "sleeping" } },
            { var = "has_position", bit = 7 },
        ] },
        { field = "battery_pct", type = "u8", sentinel = { 0xFF = "absent" } },
        { field = "heart_rate_bpm", type = "u8", sentinel = { 0 = "absent", 0xFF = "error" } },
        { field = "spo2_pct", type = "u8", sentinel = { 0 = "absent", 0xFF = "error" } },
        { field = "steps", type = "u32" },
        { if = "has_position", items = [
            { field = "latitude_deg", type = "i32", scale = 0.000001, sentinel = { 0x7FFFFFFF = "absent" }, present = "gnss_fix" },
            { field = "longitude_deg", type = "i32", scale = 0.000001, sentinel = { 0x7FFFFFFF = "absent" } },
        ] },
      ],
      0x02 = [
        { var = "interval_s", type = "u16" },
        { repeat = "u8", reading = true, interval = "interval_s", anchor = "last", items = [
            { field = "heart_rate_bpm", type = "u8", sentinel = { 0 = "absent", 0xFF = "error" } },
            { field = "spo2_pct", type = "u8", sentinel = { 0 = "absent", 0xFF = "error" } },
        ] },
      ],
  } },
  { checksum = "crc16_modbus", from = "start" },
]
"#;

const WATCH_TIME: i64 = 1_795_248_000; // 2026-11-21T08:00:00Z

#[test]
fn wearable_status_with_a_fix() {
    let r = decode(
        WEARABLE,
        "a55a010868508064807350002a016b014f809355486100001a0a0177bcde0708ff08d062",
    )
    .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].time, Some(DeviceTime::Utc(WATCH_TIME)));
    assert_eq!(
        r[0].identity.as_ref(),
        Some(&Identity {
            device_id: Some("0868508064807350".into()),
            sequence: Some(42)
        })
    );
    assert_eq!(
        fields(&r[0]),
        [
            f("sos", true),
            f("fall", true),
            f("charging", false),
            f("activity", "walking"),
            f("battery_pct", 85),
            f("heart_rate_bpm", 72),
            f("spo2_pct", 97),
            f("steps", 6666),
            f("latitude_deg", 24.62435),
            f("gnss_fix", true),
            f("longitude_deg", 118.030088),
        ]
    );
}

#[test]
fn wearable_status_without_fix_and_with_sensor_errors() {
    let r = decode(
        WEARABLE,
        "a55a010868508064807350002b016b014f80b2ffff000000000c7fffffff7fffffff189a",
    )
    .unwrap();
    assert_eq!(
        fields(&r[0]),
        [
            f("sos", false),
            f("fall", true),
            f("charging", false),
            f("activity", "sleeping"),
            f("heart_rate_error", true),
            f("steps", 12),
            f("gnss_fix", false),
        ]
    );
    let r = decode(
        WEARABLE,
        "a55a010868508064807350002c016b014f800132505f0000006492fb",
    )
    .unwrap();
    assert_eq!(
        fields(&r[0]),
        [
            f("sos", true),
            f("fall", false),
            f("charging", false),
            f("activity", "still"),
            f("battery_pct", 50),
            f("heart_rate_bpm", 80),
            f("spo2_pct", 95),
            f("steps", 100),
        ]
    );
}

#[test]
fn wearable_vitals_history() {
    let r = decode(
        WEARABLE,
        "a55a010868508064807350002d026b014f80038403466200004b60ae4c",
    )
    .unwrap();
    // Three samples 15 minutes apart, the last at the frame time; the middle one was all
    // "absent" (watch not worn) and has no reading.
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].time, Some(DeviceTime::Utc(WATCH_TIME - 1800)));
    assert_eq!(fields(&r[0]), [f("heart_rate_bpm", 70), f("spo2_pct", 98)]);
    assert_eq!(r[1].time, Some(DeviceTime::Utc(WATCH_TIME)));
    assert_eq!(fields(&r[1]), [f("heart_rate_bpm", 75), f("spo2_pct", 96)]);
    assert!(r
        .iter()
        .all(|r| r.identity.as_ref().and_then(|i| i.sequence) == Some(45)));
}

#[test]
fn wearable_rejects_corruption() {
    assert_eq!(
        decode(
            WEARABLE,
            "a55a010868508064807350002a016b014f809355486100001a0a0177bcde0708ff08d063"
        ),
        Err(DecodeError::Checksum {
            stated: 0x63d0,
            computed: 0x62d0
        })
    );
    assert_eq!(
        decode(WEARABLE, "a55a010868508064807350002a096b014f80"),
        Err(DecodeError::UnknownType {
            what: "msg_type",
            code: 9,
            offset: 18
        })
    );
    assert_eq!(
        decode(WEARABLE, "a55a02"),
        Err(DecodeError::BadConstant {
            what: "version",
            offset: 2,
            expected: 1,
            found: 2
        })
    );
}

#[test]
fn wearable_field_names() {
    assert_eq!(
        codec(WEARABLE).field_names(),
        [
            "sos",
            "fall",
            "charging",
            "activity",
            "battery_pct",
            "heart_rate_bpm",
            "heart_rate_error",
            "spo2_pct",
            "spo2_error",
            "steps",
            "latitude_deg",
            "gnss_fix",
            "longitude_deg",
        ]
    );
    let c = codec(WEARABLE).with_measurement("wearable".to_owned());
    assert_eq!(c.id(), "layout");
    let r = c
        .decode(&hex(
            "a55a010868508064807350002c016b014f800132505f0000006492fb",
        ))
        .unwrap();
    assert_eq!(r[0].measurement, "wearable");
}

// ---------------------------------------------------------------------------------------
// compile errors, each with its line

#[test]
fn compile_errors_name_the_line() {
    let cases: &[(&str, &str)] = &[
        (
            "items = [\n  { field = \"a\", type = \"u8\" },\n  { field = \"b\", type = \"u17\" },\n]",
            "line 3: unknown type `u17` (expected one of u8, u16, u24, u32, u40, u48, u56, u64, i8",
        ),
        (
            "endian = \"middle\"\nitems = [{ field = \"a\", type = \"u8\" }]",
            "line 1: unknown byte order `middle` (expected \"big\" or \"little\")",
        ),
        (
            "items = [\n  { field = \"a\", typ = \"u8\" },\n]",
            "line 2: unknown field `typ`, expected one of",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\"\n",
            "line 2: ",
        ),
        ("items = []", "line 1: a layout needs at least one item"),
        (
            "items = [\n  { type = \"u8\" },\n]",
            "line 2: this item needs one of: field, var, time, const",
        ),
        (
            "items = [\n  { field = \"a\", const = \"68\" },\n]",
            "line 2: `field` cannot be combined with `const`",
        ),
        (
            "items = [\n  { const = \"68\", skip = 1 },\n]",
            "line 2: an item is one thing: `const` and `skip` cannot be combined",
        ),
        (
            "items = [\n  { const = \"68\", scale = 0.1 },\n]",
            "line 2: `scale` does not apply to a `const` item (it takes: const, name, at)",
        ),
        (
            "items = [\n  { field = \"Temp\", type = \"u8\" },\n]",
            "line 2: field name `Temp` must be snake_case",
        ),
        (
            "items = [\n  { field = \"u8\", type = \"u8\" },\n]",
            "line 2: `u8` is a reserved word",
        ),
        (
            "items = [\n  { field = \"a\" },\n]",
            "line 2: `a` needs a `type`",
        ),
        (
            "items = [\n  { field = \"a\", type = \"ascii\" },\n]",
            "line 2: type `ascii` needs `len`",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\", len = 2 },\n]",
            "line 2: `len` applies to bcd, ascii and bytes",
        ),
        (
            "items = [\n  { field = \"a\", type = \"bcd\", len = 12 },\n]",
            "line 2: a bcd number is 1 to 9 bytes",
        ),
        (
            "items = [\n  { field = \"a\", type = \"bytes\",\n    len = \"n\" },\n]",
            "line 3: unknown name `n`: define it earlier",
        ),
        (
            "items = [\n  { var = \"s\", type = \"ascii\", len = 2 },\n  { skip = \"s\" },\n]",
            "line 3: `s` is not an integer",
        ),
        (
            "items = [\n  { var = \"n\", type = \"u8\", scale = 2 },\n]",
            "line 2: `scale` has no effect on a `var`",
        ),
        (
            "items = [\n  { field = \"a\", type = \"ascii\", len = 2, scale = 2 },\n]",
            "line 2: `scale` needs a number; this value is text",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\", enum = { 0 = \"x\" }, scale = 2 },\n]",
            "line 2: `scale` cannot be combined with `enum`",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\",\n    enum = { 0 = \"Closed\" } },\n]",
            "line 3: label `Closed` must be snake_case",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\", enum = { 0 = \"x\",\n    \"0-1\" = \"y\" } },\n]",
            "line 3: code 0 is already covered by the key",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\",\n    sentinel = { 0x100 = \"absent\" } },\n]",
            "line 3: bad code `0x100`: 0x100 is out of range for an unsigned 8-bit value",
        ),
        (
            "items = [\n  { field = \"a\", type = \"bcd\", len = 2, sentinel = { 9999 = \"absent\" } },\n]",
            "line 2: BCD sentinels are byte patterns",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\", present = \"ok\" },\n]",
            "line 2: `present` needs a `sentinel`",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\", invert = true },\n]",
            "line 2: `invert` applies to flags",
        ),
        (
            "items = [\n  { const = \"6G\" },\n]",
            "line 2: `6G` is not hex bytes",
        ),
        (
            "items = [\n  { skip = 1 },\n  { checksum = \"crc16_ccitt\" },\n]",
            "line 3: `crc16_ccitt` is ambiguous",
        ),
        (
            "items = [\n  { skip = 1 },\n  { checksum = \"crc17\" },\n]",
            "line 3: unknown checksum `crc17` (expected one of sum8, xor8, crc16_modbus",
        ),
        (
            "items = [\n  { skip = 1 },\n  { checksum = \"sum8\", from = \"start\" },\n]",
            "line 3: `start` is not a mark",
        ),
        (
            "items = [\n  { bitfield = \"u8\", items = [\n    { field = \"a\", bit = 8 },\n  ] },\n]",
            "line 3: bit 8 is outside this 8-bit field (0 to 7)",
        ),
        (
            "items = [\n  { bitfield = \"u8\", items = [\n    { field = \"a\", bits = \"4..6\" },\n  ] },\n]",
            "line 3: bad bit range `4..6`",
        ),
        (
            "items = [\n  { bitfield = \"i8\", items = [] },\n]",
            "line 2: a bitfield is an unsigned type",
        ),
        (
            "items = [\n  { bitfield = \"u8\", items = [\n    { skip = 1 },\n  ] },\n]",
            "line 3: a bitfield holds only `field`/`var` items",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\", bit = 1 },\n]",
            "line 2: `bit` does not apply to a `field` item",
        ),
        (
            "items = [\n  { switch = \"u8\", cases = {\n    0x100 = [] } },\n]",
            "line 3: bad code `0x100`",
        ),
        (
            "items = [\n  { switch = \"u8\" },\n]",
            "line 2: a switch needs `cases",
        ),
        (
            "items = [\n  { switch = \"kind\", cases = { 1 = [] } },\n]",
            "line 2: unknown name `kind`",
        ),
        (
            "items = [\n  { var = \"n\", type = \"u8\" },\n  { switch = \"n\", peek = true, cases = { 1 = [] } },\n]",
            "line 3: `peek` applies to a switch on a type",
        ),
        (
            "items = [\n  { var = \"f\", type = \"u8\" },\n  { if = \"f ~ 3\", items = [] },\n]",
            "line 3: bad condition `f ~ 3`",
        ),
        (
            "items = [\n  { repeat = \"until_end\", reading = true, items = [\n    { var = \"n\", type = \"u8\", at = 0 },\n    { mark = \"m\" } ] },\n]",
            "",
        ),
        (
            "items = [\n  { repeat = \"until_end\", items = [\n    { mark = \"m\" },\n  ] },\n]",
            "line 2: `until_end` needs items that consume at least one byte",
        ),
        (
            "items = [\n  { repeat = 3, items = [\n    { field = \"v\", type = \"u8\" },\n  ] },\n]",
            "line 3: fields inside a `repeat` need `reading = true`",
        ),
        (
            "items = [\n  { repeat = 3, interval = 60, items = [{ var = \"v\", type = \"u8\" }] },\n]",
            "line 2: `interval` spaces the times of readings: it needs `reading = true`",
        ),
        (
            "items = [\n  { tlv = \"u32\", types = { 1 = [] } },\n]",
            "line 2: a TLV type code is \"u8\" or \"u16\"",
        ),
        (
            "items = [\n  { tlv = \"u8\", unknown = \"skip\", types = { 1 = [] } },\n]",
            "line 2: `unknown = \"skip\"` needs `len`",
        ),
        (
            "items = [\n  { time = \"unix\", field = \"ts\", type = \"u32\" },\n]",
            "line 2: a `time` item sets the reading's time and is not a field",
        ),
        (
            "items = [\n  { time = \"bcd:YYMMDDhhmmsx\" },\n]",
            "line 2: bad pattern part `sx`",
        ),
        (
            "items = [\n  { time = \"unix\", type = \"f32\" },\n]",
            "line 2: a time's `type` must be an integer type",
        ),
        (
            "items = [\n  { time = \"unix\", scale = 0.3 },\n]",
            "line 2: a time `scale` must be a whole number of seconds",
        ),
        (
            "items = [\n  { field = \"a\", type = \"u8\", at = -1 },\n]",
            "line 2: `at` must be 0 to 65535",
        ),
        (
            "items = [\n  { length = \"u8\", items = [], trailing = \"maybe\" },\n]",
            "line 2: unknown `trailing` policy `maybe`",
        ),
    ];
    for (src, want) in cases {
        if want.is_empty() {
            // Compiles: `at` inside an until_end body is legal; the decoder guards progress.
            assert!(compile_str(src).is_ok(), "{src}");
            continue;
        }
        let got = compile_err(src);
        assert!(
            got.starts_with(want),
            "for\n{src}\nwant prefix: {want}\ngot:         {got}"
        );
    }
}

#[test]
fn errors_point_into_a_whole_profile() {
    // The lead's loader deserializes the whole profile; spans are offsets into that file.
    #[derive(serde::Deserialize)]
    struct Profile {
        #[allow(dead_code)]
        name: String,
        layout: nbiot_codecs::layout::LayoutSpec,
    }
    let src = "name = \"x\"\n\n[layout]\nendian = \"big\"\nitems = [\n  { field = \"a\", type = \"u8\" },\n  { field = \"b\", type = \"u17\" },\n]\n";
    let p: Profile = toml::from_str(src).unwrap();
    let e = nbiot_codecs::layout::compile(&p.layout).unwrap_err();
    assert_eq!(e.line_col(src), Some((7, 25)));
    assert!(e.located(src).starts_with("line 7: unknown type `u17`"));
}

#[test]
fn items_as_an_array_of_tables() {
    // `[[layout.items]]` in a profile; here the top level is the layout.
    let src = r#"
endian = "little"

[[items]]
field = "temperature_c"
type = "i16"
scale = 0.1

[[items]]
switch = "u8"
cases = { 1 = { field = "open", type = "u8", bool = true } }
"#;
    assert_eq!(
        one(src, "1001 01 05"),
        [f("temperature_c", 27.2), f("open", true)]
    );
    let bad = "[[items]]\nfield = \"a\"\ntype = \"u17\"\n";
    assert!(compile_err(bad).starts_with("line 3: unknown type `u17`"));
}

#[test]
fn deep_nesting_is_refused() {
    let mut src = String::from("items = [{ field = \"x\", type = \"u8\" }]");
    for _ in 0..20 {
        src = format!("items = [{{ {src} }}]");
    }
    assert!(compile_err(&src).contains("nested too deeply"));
}

#[test]
fn runtime_use_of_an_unread_var() {
    let src = r#"
items = [
  { switch = "u8", cases = { 1 = [{ var = "n", type = "u8" }], 2 = [] } },
  { skip = "n" },
]"#;
    assert!(decode(src, "01 02 aabb").is_ok());
    assert_eq!(
        decode(src, "02 aabb"),
        Err(DecodeError::InvalidValue {
            what: "n",
            offset: 1,
            reason: "used before it was read (its item was not decoded)"
        })
    );
}

// ---------------------------------------------------------------------------------------
// no panics, on any layout source and any payload

fn item_source() -> impl Strategy<Value = String> {
    // Mostly valid choices, with a few wrong ones mixed in, so that most generated layouts
    // compile and reach the executor while the error paths still get exercised.
    let names = prop_oneof![
        8 => prop::sample::select(vec!["a", "n", "flags", "t", "x_c"]),
        1 => prop::sample::select(vec!["Bad", "u8", "start"]),
    ];
    let fixed_types = prop_oneof![
        8 => prop::sample::select(vec!["u8", "u16", "i24", "u64", "i64", "f32", "f64", "i8"]),
        1 => prop::sample::select(vec!["u17", "", "bcd"]),
    ];
    let sized_types = prop_oneof![
        8 => prop::sample::select(vec!["bcd", "ascii", "bytes"]),
        1 => prop::sample::select(vec!["u8", "f32"]),
    ];
    let lens = prop_oneof![
        8 => prop::sample::select(vec!["1", "0", "4", "\"n\"", "\"n-1\"", "\"rest\"", "\"rest-2\"", "\"u8\"", "\"u16\""]),
        1 => prop::sample::select(vec!["-3", "70000", "\"x+\"", "12"]),
    ];
    let extras = prop::sample::select(vec![
        "",
        "",
        ", scale = 0.1",
        ", offset = -40",
        ", decimals = 2",
        ", scale = 1e300",
        ", enum = { 0 = \"off\", \"1-3\" = \"on\", default = \"other\" }",
        ", bool = true, invert = true",
        ", sentinel = { 0x7F = \"absent\", \"-1\" = \"error\" }, present = \"ok\"",
        ", sentinel = { nan = \"absent\" }",
        ", endian = \"little\"",
        ", at = 3",
        ", identity = \"device_id\"",
        ", identity = \"sequence\"",
    ]);
    let leaf = prop_oneof![
        (names.clone(), sized_types, lens.clone())
            .prop_map(|(n, t, l)| { format!("{{ field = \"{n}\", type = \"{t}\", len = {l} }}") }),
        (names.clone(), fixed_types.clone(), extras)
            .prop_map(|(n, t, e)| format!("{{ field = \"{n}\", type = \"{t}\"{e} }}")),
        (names.clone(), fixed_types)
            .prop_map(|(n, t)| format!("{{ var = \"{n}\", type = \"{t}\" }}")),
        lens.prop_map(|l| format!("{{ skip = {l} }}")),
        names.clone().prop_map(|n| format!("{{ mark = \"{n}\" }}")),
        Just("{ const = \"68\", name = \"start\" }".to_owned()),
        Just("{ skip_while = \"FE\" }".to_owned()),
        (
            prop::sample::select(vec![
                "sum8",
                "xor8",
                "crc16_modbus",
                "crc32",
                "crc16_x25",
                "crc16_ccitt"
            ]),
            prop_oneof![4 => Just("start"), 1 => names],
        )
            .prop_map(|(c, n)| format!("{{ checksum = \"{c}\", from = \"{n}\" }}")),
        prop::sample::select(vec![
            "{ time = \"unix\" }",
            "{ time = \"unix_ms\", type = \"u64\" }",
            "{ time = \"ago\", type = \"u16\", scale = 60 }",
            "{ time = \"bcd:ssmmhhDDMMYYCC\" }",
            "{ time = \"bin:YYMMDDhhmmss\", sentinel = { 0 = \"absent\" } }",
            "{ time = \"unix\", offset = 946684800, scale = 0.001 }",
        ])
        .prop_map(str::to_owned),
    ];
    leaf.prop_recursive(4, 48, 5, move |inner| {
        let list = prop::collection::vec(inner.clone(), 0..4)
            .prop_map(|v| format!("[{}]", v.join(", ")));
        let selector = prop_oneof![
            3 => prop::sample::select(vec!["u8", "u16"]).prop_map(|t| (t, ", peek = true")),
            3 => prop::sample::select(vec!["u8", "u16", "n", "rest", "t"]).prop_map(|t| (t, "")),
            1 => prop::sample::select(vec!["u9", "n"]).prop_map(|t| (t, ", peek = true")),
        ];
        let conds = prop_oneof![
            8 => prop::sample::select(vec!["n", "!flags", "flags & 0x08", "n >= 3", "t == 0x01"]),
            1 => Just("?"),
        ];
        let counts = prop_oneof![
            8 => prop::sample::select(vec!["2", "\"n\"", "\"u8\"", "\"until_end\"", "\"n+1\""]),
            1 => Just("100000"),
        ];
        let repeat_tail = prop_oneof![
            8 => prop::sample::select(vec![
                ", reading = true",
                ", reading = true, interval = 60",
                ", reading = true, interval = \"n\", anchor = \"last\"",
            ]),
            1 => prop::sample::select(vec!["", ", interval = 60"]),
        ];
        let tlv_shape = prop_oneof![
            4 => prop::sample::select(vec![", len = \"u8\"", ", len = \"u16\""])
                .prop_flat_map(|l| prop::sample::select(vec!["stop", "error", "skip"]).prop_map(move |u| (l, u))),
            2 => prop::sample::select(vec!["stop", "error"]).prop_map(|u| ("", u)),
            1 => Just(("", "skip")),
        ];
        let bit_range = prop_oneof![
            6 => prop::sample::select(vec!["\"0-3\"", "\"4-7\""]),
            1 => Just("\"2-9\""),
        ];
        prop_oneof![
            (selector, list.clone(), list.clone()).prop_map(|((s, peek), a, b)| format!(
                "{{ switch = \"{s}\"{peek}, cases = {{ 0x01 = {a}, \"2-4\" = {b} }}, default = [] }}"
            )),
            (conds, list.clone(), list.clone())
                .prop_map(|(c, a, b)| format!("{{ if = \"{c}\", items = {a}, else = {b} }}")),
            (counts, list.clone(), repeat_tail)
                .prop_map(|(c, a, t)| format!("{{ repeat = {c}{t}, items = {a} }}")),
            (prop::sample::select(vec!["u8", "u16"]), tlv_shape, list.clone(), list.clone()).prop_map(
                |(t, (l, u), a, b)| format!(
                    "{{ tlv = \"{t}\"{l}, unknown = \"{u}\", types = {{ 0x01 = {a}, \"0x02,0x05\" = {b} }} }}"
                )
            ),
            (prop::sample::select(vec!["\"u8\"", "\"n\"", "\"rest-1\"", "3"]), list.clone(), any::<bool>())
                .prop_map(|(l, a, r)| format!(
                    "{{ length = {l}, reading = {r}, trailing = \"ignore\", items = {a} }}"
                )),
            list.clone().prop_map(|a| format!("{{ reading = true, items = {a} }}")),
            (
                prop::sample::select(vec!["u8", "u16", "u64"]),
                prop::sample::select(vec!["0", "3", "7", "63"]),
                bit_range,
            )
                .prop_map(|(t, b, r)| format!(
                    "{{ bitfield = \"{t}\", var = \"flags\", items = [{{ field = \"f\", bit = {b} }}, \
                     {{ var = \"n\", bits = {r} }}, {{ field = \"m\", bits = {r}, enum = {{ 1 = \"one\" }} }}] }}"
                )),
        ]
    })
}

fn layout_source() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(item_source(), 1..6),
        prop::sample::select(vec!["", "endian = \"little\"\n", "trailing = \"ignore\"\n"]),
        // Names later items may use, defined up front most of the time.
        prop_oneof![
            6 => Just(
                "{ mark = \"start\" }, { var = \"n\", type = \"u8\" }, \
                 { var = \"flags\", type = \"u8\" }, { var = \"t\", type = \"u8\" },\n  "
            ),
            1 => Just("{ var = \"n\", type = \"u8\" },\n  "),
            1 => Just(""),
        ],
        // Byte-level damage: TOML syntax errors must map to errors, not panics.
        prop::option::weighted(0.15, (any::<prop::sample::Index>(), any::<u8>())),
    )
        .prop_map(|(items, head, defs, damage)| {
            let mut s = format!("{head}items = [\n  {defs}{},\n]\n", items.join(",\n  "));
            if let Some((at, byte)) = damage {
                let i = at.index(s.len());
                if s.is_char_boundary(i) {
                    s.insert(i, char::from(byte & 0x7F));
                }
            }
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_layouts_compile_or_fail_cleanly(src in layout_source(), payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 1..6)) {
        match compile_str(&src) {
            Ok(codec) => {
                for p in &payloads {
                    let _ = codec.decode(p);
                }
                let _ = codec.field_names();
            }
            Err(e) => {
                // Every error locates itself inside the source, when it has a span.
                if let Some(span) = &e.span {
                    prop_assert!(span.end <= src.len(), "{e:?}");
                    prop_assert!(e.line_col(&src).is_some());
                }
            }
        }
    }

    #[test]
    fn arbitrary_text_never_panics_the_compiler(src in "\\PC{0,200}") {
        let _ = compile_str(&src);
    }

    #[test]
    fn random_payloads_through_real_layouts(payload in prop::collection::vec(any::<u8>(), 0..96)) {
        for src in [WEARABLE, DRAGINO_N95S31B, MILESIGHT_EM300_TH, MILESIGHT_LOCATION, CJT188] {
            let codec = codec(src);
            if let Ok(readings) = codec.decode(&payload) {
                prop_assert!(!readings.is_empty());
                prop_assert!(readings.len() <= nbiot_codecs::layout::MAX_READINGS);
            }
        }
    }

    #[test]
    fn mutated_frames_through_the_wearable(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), cut in any::<prop::sample::Index>()) {
        let codec = codec(WEARABLE);
        for frame in [
            "a55a010868508064807350002a016b014f809355486100001a0a0177bcde0708ff08d062",
            "a55a010868508064807350002d026b014f80038403466200004b60ae4c",
        ] {
            let mut p = hex(frame);
            for (i, b) in &flips {
                let i = i.index(p.len());
                p[i] ^= b;
            }
            let _ = codec.decode(&p);
            let n = cut.index(p.len());
            let _ = codec.decode(&p[..n]);
        }
    }
}
