//! Dragino NB-IoT sensor frames of the BC35-G firmware generation: NDDS75 (ultrasonic
//! distance, used for sewer and manhole water level) and N95S31B (SHT31 temperature and
//! humidity).
//!
//! ```text
//! common header, big-endian:
//!   0  device id   6 B   hex digits of the last 12 IMEI digits (0x724031556159)
//!   6  version     u16   0x0064 = 100 = firmware 1.0.0
//!   8  battery     u16   mV
//!  10  signal      u8    CSQ 0..31, 99 = not known (3GPP TS 27.007 +CSQ)
//! NDDS75, 14 bytes:
//!  11  distance    u16   mm (flat target range 280..7500 mm)
//!  13  interrupt   u8    0 = periodic uplink, else triggered by the interrupt pin
//! N95S31B, 21 bytes:
//!  11  model       u8
//!  12  reserved    5 B   "ignore in N95S31B"
//!  17  temperature i16   /10 degC (SHT31)
//!  19  humidity    u16   /10 %RH (SHT31)
//! ```
//!
//! References: Dragino wiki, "N95S31B NB-IoT Temperature & Humidity Sensor User Manual" and
//! "NDDS75 NB-IoT Distance Detect Sensor User Manual" (section "Payload Explanation and Sensor
//! Interface"); iotcreators "Dragino Distance Detection Sensor NDDS75" (field sizes 6,2,2,1,2,1
//! and a real uplink). Newer Dragino NB firmware (8-byte device id, timestamps, datalog) is a
//! different frame and is not decoded here.
//!
//! # Transport
//!
//! The device sends the frame as an ASCII hex string ("The payload is ASCII string,
//! representative same HEX"). Both that and the raw binary frame are accepted: a payload whose
//! bytes are all printable ASCII or whitespace is hex text (the usual case is caught by
//! [`crate::hex::is_hex_text`]); a whole binary frame never looks like that because the
//! version's high byte (byte 6) is 0x00, so only fragments of up to 6 bytes are ambiguous,
//! and those fail either way. Errors in a text payload name offsets and lengths in the text.
//!
//! # Options (`[codec_options]`)
//!
//! - `model = "auto" | "ndds75" | "n95s31b"` (default `"auto"`). `auto` picks the model by
//!   frame length: 14 bytes NDDS75, 21 bytes N95S31B; a frame shorter than 14 bytes is
//!   reported as a truncated NDDS75 (the shorter model), any other length is an error.
//!   A named model reports a short frame as truncated and a long one as trailing bytes.
//!
//! # Fields (measurement `dragino`; identity: device id = the 12 hex digits)
//!
//! Both models: `version` Int, `battery_v` Float (V), `signal_csq` Int.
//! NDDS75: `distance_m` Float (m), `interrupt` Bool.
//! N95S31B: `model` Int, `temperature_c` Float (degC), `humidity_pct` Float (%RH).
//!
//! Sentinels produce no value field but a flag:
//! - signal 99 ("not known or not detectable") and the reserved CSQ codes 32..=98:
//!   no `signal_csq`, `signal_unknown = true`.
//! - distance 0x0000, Dragino: "the system doesn't detect the ultrasonic sensor":
//!   no `distance_m`, `sensor_missing = true`.
//! - distance 1..=279 mm, below the 280 mm range start, which Dragino calls an invalid
//!   reading: no `distance_m`, `distance_invalid = true`. Values above the 7500 mm range end
//!   are passed through: Dragino documents no upper sentinel for this frame.
//! - temperature 0x7FFF / 0x8000 (+3276.7 / -3276.8 degC, far outside the SHT31's -40..125
//!   degC; 0x7FFF is what Dragino's LHT65 sends for an absent probe): no `temperature_c`,
//!   `temperature_error = true`.
//! - humidity 0xFFFF (6553.5 %RH): no `humidity_pct`, `humidity_error = true`.
//!
//! The five reserved N95S31B bytes are skipped, as the manual says.

use crate::parse::{finish, PError, PErrorKind, PResult};
use crate::registry::{CodecConfigError, CodecOptions};
use crate::{hex, Codec, DecodeError, Identity, Reading, Value};

pub const ID: &str = "dragino";

/// The measurement name readings get unless a profile names its own.
const MEASUREMENT: &str = "dragino";

const NDDS75_LEN: usize = 14;
const N95S31B_LEN: usize = 21;

/// Dragino: distances below 0x0118 (280 mm) are invalid readings.
const DISTANCE_MIN_MM: u16 = 280;
/// 3GPP TS 27.007 +CSQ: 0..=31 are levels, 99 is "not known or not detectable".
const CSQ_MAX: u8 = 31;

/// Which Dragino frame a profile expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Model {
    /// By frame length: 14 bytes NDDS75, 21 bytes N95S31B.
    #[default]
    Auto,
    Ndds75,
    N95s31b,
}

#[derive(Debug, Clone, Default)]
pub struct DraginoCodec {
    model: Model,
}

impl DraginoCodec {
    pub fn new(model: Model) -> Self {
        DraginoCodec { model }
    }

    /// Builds the codec from a profile's `[codec_options]` (`model`).
    pub fn from_options(options: &CodecOptions) -> Result<Self, CodecConfigError> {
        super::deny_unknown_options(ID, options, &["model"])?;
        let model = match options.get("model") {
            None => Model::Auto,
            Some(toml::Value::String(s)) => match s.as_str() {
                "auto" => Model::Auto,
                "ndds75" => Model::Ndds75,
                "n95s31b" => Model::N95s31b,
                _ => return Err(bad_model()),
            },
            Some(_) => return Err(bad_model()),
        };
        Ok(DraginoCodec { model })
    }

    fn decode_frame(&self, frame: &[u8]) -> Result<Reading, DecodeError> {
        let model = match (self.model, frame.len()) {
            (Model::Auto, NDDS75_LEN) => Model::Ndds75,
            (Model::Auto, N95S31B_LEN) => Model::N95s31b,
            // Shorter than either model: name the field that is missing, on the shorter one.
            (Model::Auto, n) if n < NDDS75_LEN => Model::Ndds75,
            (Model::Auto, _) => {
                return Err(DecodeError::InvalidValue {
                    what: "frame length",
                    offset: 0,
                    reason:
                        "neither 14 bytes (NDDS75) nor 21 bytes (N95S31B); set codec option `model`",
                })
            }
            (m, _) => m,
        };
        let (rest, reading) = finish(frame, parse_frame(frame, model))?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes {
                offset: frame.len() - rest.len(),
                count: rest.len(),
            });
        }
        Ok(reading)
    }
}

fn bad_model() -> CodecConfigError {
    CodecConfigError::BadOption {
        codec: ID,
        key: "model".to_owned(),
        reason: "expected \"auto\", \"ndds75\" or \"n95s31b\"".to_owned(),
    }
}

/// Every field each model can produce (values and sentinel flags), for profile validation.
const COMMON_FIELDS: &[&str] = &["version", "battery_v", "signal_csq", "signal_unknown"];
const NDDS75_FIELDS: &[&str] = &[
    "distance_m",
    "sensor_missing",
    "distance_invalid",
    "interrupt",
];
const N95S31B_FIELDS: &[&str] = &[
    "model",
    "temperature_c",
    "temperature_error",
    "humidity_pct",
    "humidity_error",
];

impl Codec for DraginoCodec {
    fn id(&self) -> &str {
        ID
    }

    fn field_names(&self) -> Vec<&str> {
        let models: &[&[&str]] = match self.model {
            Model::Auto => &[NDDS75_FIELDS, N95S31B_FIELDS],
            Model::Ndds75 => &[NDDS75_FIELDS],
            Model::N95s31b => &[N95S31B_FIELDS],
        };
        let mut names = COMMON_FIELDS.to_vec();
        for m in models {
            names.extend_from_slice(m);
        }
        names
    }

    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        let reading = if hex::is_hex_text(payload) || looks_like_text(payload) {
            // Encoding errors from hex::decode already name offsets in the text. A frame of
            // either model fits the stack buffer; longer text (an error) is decoded on the
            // heap so its error names the right length.
            let mut buf = [0u8; N95S31B_LEN];
            let heap;
            let frame = match hex::decode_into(payload, &mut buf)? {
                Some(n) => buf.get(..n).unwrap_or_default(),
                None => {
                    heap = hex::decode(payload)?;
                    heap.as_slice()
                }
            };
            if frame.is_empty() {
                return Err(DecodeError::Empty);
            }
            self.decode_frame(frame)
                .map_err(|e| to_text_offsets(e, payload))?
        } else {
            self.decode_frame(payload)?
        };
        Ok(vec![reading])
    }
}

/// Printable ASCII and whitespace only: hex text, possibly broken (odd length, a stray
/// character), which must fail as an encoding error rather than as a binary frame.
fn looks_like_text(payload: &[u8]) -> bool {
    payload
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
}

/// Parses one frame of `model` into a reading; the caller checks for trailing bytes.
fn parse_frame(input: &[u8], model: Model) -> PResult<'_, Reading> {
    let (input, device_id) = be_bytes::<6>(input, "device id")?;
    let (input, version) = be_bytes::<2>(input, "version")?;
    let (input, battery_mv) = be_bytes::<2>(input, "battery")?;
    let (input, [csq]) = be_bytes::<1>(input, "signal")?;

    let mut reading = Reading::with_capacity(MEASUREMENT, 6);
    reading.identity = Some(Identity {
        device_id: Some(hex::encode_text(&device_id)),
        sequence: None,
    });
    reading.push(
        "version",
        Value::Int(i64::from(u16::from_be_bytes(version))),
    );
    reading.push(
        "battery_v",
        Value::Float(f64::from(u16::from_be_bytes(battery_mv)) / 1000.0),
    );
    if csq <= CSQ_MAX {
        reading.push("signal_csq", Value::Int(i64::from(csq)));
    } else {
        reading.push("signal_unknown", Value::Bool(true));
    }

    match model {
        Model::Ndds75 | Model::Auto => {
            let (input, distance) = be_bytes::<2>(input, "distance")?;
            let (input, [interrupt]) = be_bytes::<1>(input, "interrupt")?;
            match u16::from_be_bytes(distance) {
                0 => reading.push("sensor_missing", Value::Bool(true)),
                mm if mm < DISTANCE_MIN_MM => reading.push("distance_invalid", Value::Bool(true)),
                mm => reading.push("distance_m", Value::Float(f64::from(mm) / 1000.0)),
            }
            reading.push("interrupt", Value::Bool(interrupt != 0));
            Ok((input, reading))
        }
        Model::N95s31b => {
            let (input, [model]) = be_bytes::<1>(input, "model")?;
            let (input, _reserved) = be_bytes::<5>(input, "reserved")?;
            let (input, temperature) = be_bytes::<2>(input, "temperature")?;
            let (input, humidity) = be_bytes::<2>(input, "humidity")?;
            reading.push("model", Value::Int(i64::from(model)));
            match i16::from_be_bytes(temperature) {
                i16::MAX | i16::MIN => reading.push("temperature_error", Value::Bool(true)),
                t => reading.push("temperature_c", Value::Float(f64::from(t) / 10.0)),
            }
            match u16::from_be_bytes(humidity) {
                u16::MAX => reading.push("humidity_error", Value::Bool(true)),
                h => reading.push("humidity_pct", Value::Float(f64::from(h) / 10.0)),
            }
            Ok((input, reading))
        }
    }
}

/// Takes `N` bytes as an array, or fails with `Truncated { what }`.
fn be_bytes<'a, const N: usize>(input: &'a [u8], what: &'static str) -> PResult<'a, [u8; N]> {
    match input.split_first_chunk::<N>() {
        Some((head, tail)) => Ok((tail, *head)),
        None => Err(nom::Err::Error(PError {
            input,
            kind: PErrorKind::Nom {
                what,
                needed: N - input.len(),
            },
        })),
    }
}

/// Where in hex `text` the digits of decoded byte `index` start (after an optional `0x`
/// and skipping whitespace, as [`hex::decode`] reads it); the text length past the end.
fn text_offset(text: &[u8], index: usize) -> usize {
    let start = if text.starts_with(b"0x") { 2 } else { 0 };
    let mut byte = 0;
    let mut i = start;
    while let Some(c) = text.get(i) {
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if byte == index {
            return i;
        }
        byte += 1;
        i += 2;
    }
    text.len()
}

/// Re-expresses an error found in the decoded frame in terms of the hex text it came from:
/// offsets point at the text, byte counts become character counts (two per byte).
fn to_text_offsets(err: DecodeError, text: &[u8]) -> DecodeError {
    use DecodeError::*;
    match err {
        Truncated {
            what,
            offset,
            needed,
        } => Truncated {
            what,
            offset: text_offset(text, offset),
            needed: needed * 2,
        },
        TrailingBytes { offset, count } => TrailingBytes {
            offset: text_offset(text, offset),
            count: count * 2,
        },
        InvalidValue {
            what,
            offset,
            reason,
        } => InvalidValue {
            what,
            offset: text_offset(text, offset),
            reason,
        },
        BadConstant {
            what,
            offset,
            expected,
            found,
        } => BadConstant {
            what,
            offset: text_offset(text, offset),
            expected,
            found,
        },
        UnknownType { what, code, offset } => UnknownType {
            what,
            code,
            offset: text_offset(text, offset),
        },
        e @ (Empty | Checksum { .. } | Encoding { .. }) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Text;

    fn codec(model: Model) -> DraginoCodec {
        DraginoCodec::new(model)
    }

    fn identity(id: &str) -> Option<Identity> {
        Some(Identity {
            device_id: Some(Text::new(id)),
            sequence: None,
        })
    }

    fn reading(id: &str, fields: Vec<(&'static str, Value)>) -> Vec<Reading> {
        vec![Reading {
            measurement: MEASUREMENT.into(),
            time: None,
            fields: fields.into_iter().map(|(n, v)| (n.into(), v)).collect(),
            identity: identity(id),
        }]
    }

    /// The NDDS75 example from the Dragino wiki, as bytes.
    const NDDS75: [u8; 14] = [
        0x72, 0x40, 0x31, 0x55, 0x61, 0x59, // device id 724031556159
        0x00, 0x64, // version 100
        0x0c, 0x6c, // battery 3180 mV
        0x19, // CSQ 25
        0x02, 0x92, // distance 658 mm
        0x00, // interrupt 0
    ];

    /// The N95S31B example from the Dragino wiki, as bytes.
    const N95S31B: [u8; 21] = [
        0x72, 0x40, 0x31, 0x60, 0x74, 0x57, // device id 724031607457
        0x00, 0x6e, // version 110
        0x0c, 0xcd, // battery 3277 mV
        0x1b, // CSQ 27
        0x01, // model 1
        0x00, 0xdc, 0x00, 0x0c, 0xcc, // reserved
        0x00, 0xe1, // 22.5 degC
        0x01, 0x86, // 39.0 %RH
    ];

    fn with(base: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut v = base.to_vec();
        v[at..at + bytes.len()].copy_from_slice(bytes);
        v
    }

    #[test]
    fn ndds75_binary_and_hex_decode_alike() {
        let want = reading(
            "724031556159",
            vec![
                ("version", Value::Int(100)),
                ("battery_v", Value::Float(3.18)),
                ("signal_csq", Value::Int(25)),
                ("distance_m", Value::Float(0.658)),
                ("interrupt", Value::Bool(false)),
            ],
        );
        assert_eq!(codec(Model::Auto).decode(&NDDS75), Ok(want.clone()));
        assert_eq!(codec(Model::Ndds75).decode(&NDDS75), Ok(want.clone()));
        let text = b"72403155615900640c6c19029200";
        assert_eq!(codec(Model::Auto).decode(text), Ok(want.clone()));
        // Upper case, a 0x prefix, spaces and a trailing newline are still hex text.
        let text = b"0x72 40 31 55 61 59 00 64 0C 6C 19 02 92 00\n";
        assert_eq!(codec(Model::Auto).decode(text), Ok(want));
    }

    #[test]
    fn n95s31b_binary_and_hex_decode_alike() {
        let want = reading(
            "724031607457",
            vec![
                ("version", Value::Int(110)),
                ("battery_v", Value::Float(3.277)),
                ("signal_csq", Value::Int(27)),
                ("model", Value::Int(1)),
                ("temperature_c", Value::Float(22.5)),
                ("humidity_pct", Value::Float(39.0)),
            ],
        );
        assert_eq!(codec(Model::Auto).decode(&N95S31B), Ok(want.clone()));
        assert_eq!(codec(Model::N95s31b).decode(&N95S31B), Ok(want.clone()));
        let text = b"724031607457006e0ccd1b0100dc000ccc00e10186";
        assert_eq!(codec(Model::Auto).decode(text), Ok(want));
    }

    #[test]
    fn negative_temperature_and_extremes() {
        // -0.1 degC (0xFFFF), humidity 100.0 %, battery 65.535 V, CSQ 31, interrupt 1.
        let frame = with(&N95S31B, 8, &[0xff, 0xff, 0x1f]);
        let frame = with(&frame, 17, &[0xff, 0xff, 0x03, 0xe8]);
        let got = codec(Model::Auto).decode(&frame);
        assert_eq!(
            got,
            Ok(reading(
                "724031607457",
                vec![
                    ("version", Value::Int(110)),
                    ("battery_v", Value::Float(65.535)),
                    ("signal_csq", Value::Int(31)),
                    ("model", Value::Int(1)),
                    ("temperature_c", Value::Float(-0.1)),
                    ("humidity_pct", Value::Float(100.0)),
                ],
            ))
        );
        // -40.0 degC = 0xFE70; the highest real value below the sentinel, 3276.6 degC.
        let cold = with(&N95S31B, 17, &[0xfe, 0x70]);
        let got = codec(Model::Auto).decode(&cold).unwrap();
        assert_eq!(got[0].field("temperature_c"), Some(&Value::Float(-40.0)));
        let hot = with(&N95S31B, 17, &[0x7f, 0xfe]);
        let got = codec(Model::Auto).decode(&hot).unwrap();
        assert_eq!(got[0].field("temperature_c"), Some(&Value::Float(3276.6)));
        // Largest distance and an interrupt uplink.
        let far = with(&NDDS75, 11, &[0xff, 0xff, 0x01]);
        let got = codec(Model::Auto).decode(&far).unwrap();
        assert_eq!(got[0].field("distance_m"), Some(&Value::Float(65.535)));
        assert_eq!(got[0].field("interrupt"), Some(&Value::Bool(true)));
    }

    #[test]
    fn sentinels_become_flags() {
        // Temperature 0x7FFF, humidity 0xFFFF, CSQ 99.
        let frame = with(&N95S31B, 10, &[99]);
        let frame = with(&frame, 17, &[0x7f, 0xff, 0xff, 0xff]);
        assert_eq!(
            codec(Model::Auto).decode(&frame),
            Ok(reading(
                "724031607457",
                vec![
                    ("version", Value::Int(110)),
                    ("battery_v", Value::Float(3.277)),
                    ("signal_unknown", Value::Bool(true)),
                    ("model", Value::Int(1)),
                    ("temperature_error", Value::Bool(true)),
                    ("humidity_error", Value::Bool(true)),
                ],
            ))
        );
        let frame = with(&N95S31B, 17, &[0x80, 0x00]);
        let got = codec(Model::Auto).decode(&frame).unwrap();
        assert_eq!(got[0].field("temperature_error"), Some(&Value::Bool(true)));
        assert_eq!(got[0].field("temperature_c"), None);

        // Distance 0: no sensor; 279 mm: below range; 280 mm: the first valid value.
        let none = with(&NDDS75, 11, &[0x00, 0x00]);
        assert_eq!(
            codec(Model::Auto).decode(&none),
            Ok(reading(
                "724031556159",
                vec![
                    ("version", Value::Int(100)),
                    ("battery_v", Value::Float(3.18)),
                    ("signal_csq", Value::Int(25)),
                    ("sensor_missing", Value::Bool(true)),
                    ("interrupt", Value::Bool(false)),
                ],
            ))
        );
        let short = with(&NDDS75, 11, &[0x01, 0x17]);
        let got = codec(Model::Auto).decode(&short).unwrap();
        assert_eq!(got[0].field("distance_invalid"), Some(&Value::Bool(true)));
        assert_eq!(got[0].field("distance_m"), None);
        let min = with(&NDDS75, 11, &[0x01, 0x18]);
        let got = codec(Model::Auto).decode(&min).unwrap();
        assert_eq!(got[0].field("distance_m"), Some(&Value::Float(0.28)));
        // A reserved CSQ code (32) is not a level either.
        let odd = with(&NDDS75, 10, &[32]);
        let got = codec(Model::Auto).decode(&odd).unwrap();
        assert_eq!(got[0].field("signal_unknown"), Some(&Value::Bool(true)));
        assert_eq!(got[0].field("signal_csq"), None);
    }

    #[test]
    fn truncation_names_the_field_and_offset() {
        assert_eq!(
            codec(Model::Auto).decode(&NDDS75[..12]),
            Err(DecodeError::Truncated {
                what: "distance",
                offset: 11,
                needed: 1
            })
        );
        assert_eq!(
            codec(Model::Auto).decode(&[0x86, 0x84, 0x11]),
            Err(DecodeError::Truncated {
                what: "device id",
                offset: 0,
                needed: 3
            })
        );
        // A fragment of printable bytes ("r@1") is indistinguishable from broken hex text;
        // it fails either way, as text.
        assert_eq!(
            codec(Model::Auto).decode(&NDDS75[..3]),
            Err(DecodeError::Encoding {
                offset: 0,
                reason: "not a hex digit"
            })
        );
        assert_eq!(
            codec(Model::N95s31b).decode(&N95S31B[..20]),
            Err(DecodeError::Truncated {
                what: "humidity",
                offset: 19,
                needed: 1
            })
        );
        // In hex text the offset and the shortfall count characters.
        assert_eq!(
            codec(Model::Auto).decode(b"72403155615900640c6c1902"),
            Err(DecodeError::Truncated {
                what: "distance",
                offset: 22,
                needed: 2
            })
        );
    }

    #[test]
    fn lengths_that_fit_no_model() {
        let mut long = NDDS75.to_vec();
        long.push(0xaa);
        assert_eq!(
            codec(Model::Auto).decode(&long),
            Err(DecodeError::InvalidValue {
                what: "frame length",
                offset: 0,
                reason:
                    "neither 14 bytes (NDDS75) nor 21 bytes (N95S31B); set codec option `model`",
            })
        );
        assert_eq!(
            codec(Model::Ndds75).decode(&long),
            Err(DecodeError::TrailingBytes {
                offset: 14,
                count: 1
            })
        );
        // An N95S31B frame read as an NDDS75 has 7 bytes too many.
        assert_eq!(
            codec(Model::Ndds75).decode(&N95S31B),
            Err(DecodeError::TrailingBytes {
                offset: 14,
                count: 7
            })
        );
        assert_eq!(
            codec(Model::Ndds75).decode(b"72403155615900640c6c19029200ff"),
            Err(DecodeError::TrailingBytes {
                offset: 28,
                count: 2
            })
        );
    }

    #[test]
    fn broken_hex_text_is_an_encoding_error() {
        assert_eq!(
            codec(Model::Auto).decode(b"72403155615900640c6c1902920"),
            Err(DecodeError::Encoding {
                offset: 26,
                reason: "odd number of hex digits"
            })
        );
        assert_eq!(
            codec(Model::Auto).decode(b"72403155615900640c6c190292zz"),
            Err(DecodeError::Encoding {
                offset: 26,
                reason: "not a hex digit"
            })
        );
    }

    #[test]
    fn declared_fields_cover_every_output() {
        let frames = [
            NDDS75.to_vec(),
            with(&NDDS75, 10, &[99, 0, 0]),
            with(&NDDS75, 11, &[0, 1]),
            N95S31B.to_vec(),
            with(&N95S31B, 17, &[0x7f, 0xff, 0xff, 0xff]),
        ];
        for frame in frames {
            for model in [Model::Auto, Model::Ndds75, Model::N95s31b] {
                let c = codec(model);
                let declared = c.field_names();
                for r in c.decode(&frame).unwrap_or_default() {
                    for (name, _) in &r.fields {
                        assert!(declared.contains(&name.as_str()), "{model:?}: {name}");
                    }
                }
            }
        }
        assert_eq!(codec(Model::Ndds75).field_names().len(), 8);
        assert_eq!(codec(Model::N95s31b).field_names().len(), 9);
    }

    #[test]
    fn empty_input() {
        assert_eq!(codec(Model::Auto).decode(b""), Err(DecodeError::Empty));
        assert_eq!(codec(Model::Auto).decode(b" \n"), Err(DecodeError::Empty));
    }

    #[test]
    fn options() {
        let opts = |s: &str| -> CodecOptions { toml::from_str(s).unwrap() };
        assert_eq!(
            DraginoCodec::from_options(&opts("model = \"n95s31b\""))
                .unwrap()
                .model,
            Model::N95s31b
        );
        assert_eq!(
            DraginoCodec::from_options(&CodecOptions::new())
                .unwrap()
                .model,
            Model::Auto
        );
        assert!(matches!(
            DraginoCodec::from_options(&opts("model = \"lht65\"")),
            Err(CodecConfigError::BadOption { .. })
        ));
        assert!(matches!(
            DraginoCodec::from_options(&opts("model = 1")),
            Err(CodecConfigError::BadOption { .. })
        ));
        assert!(matches!(
            DraginoCodec::from_options(&opts("modle = \"auto\"")),
            Err(CodecConfigError::BadOption { .. })
        ));
    }

    #[test]
    fn text_offsets_follow_whitespace_and_prefix() {
        assert_eq!(text_offset(b"0x00 11 22", 0), 2);
        assert_eq!(text_offset(b"0x00 11 22", 2), 8);
        assert_eq!(text_offset(b"001122", 3), 6);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            for model in [Model::Auto, Model::Ndds75, Model::N95s31b] {
                let _ = codec(model).decode(&bytes);
            }
        }

        #[test]
        fn never_panics_on_text(text in "[0-9a-fA-Fx \n]{0,60}") {
            for model in [Model::Auto, Model::Ndds75, Model::N95s31b] {
                let _ = codec(model).decode(text.as_bytes());
            }
        }
    }
}
