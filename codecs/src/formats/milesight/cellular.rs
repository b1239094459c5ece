//! The Milesight NB-IoT "cellular" frame: a fixed 86-byte header of link and identity data,
//! then the TLV stream, cut into records.
//!
//! ```text
//! off  size  field
//!   0     1  START      0x02
//!   1     2  ID         u16 BE                    -> frame_id
//!   3     2  LENGTH     u16 BE (unreliable)       -> frame_length
//!   5     1  FLAG                                 -> frame_flag
//!   6     2  FRAME_CNT  u16 BE                    -> frame_counter, identity.sequence
//!   8     1  PROTO                                -> protocol_version
//!   9     4  FW         ASCII                     -> firmware_version
//!  13     4  HW         ASCII                     -> hardware_version
//!  17    16  SN         ASCII                     -> sn
//!  33    15  IMEI       ASCII digits              -> identity.device_id
//!  48    15  IMSI       ASCII digits              -> imsi
//!  63    20  ICCID      ASCII hex digits          -> iccid
//!  83     1  CSQ        0..31, 99 = unknown       -> csq, rssi_dbm (3GPP TS 27.007 +CSQ)
//!  84     2  DATA_LEN   u16 BE                    -> data_length
//!  86     N  DATA       TLV stream, N = DATA_LEN
//! ```
//!
//! Reference: the `*-cellular.js` decoders of Milesight-IoT/SensorDecoders (em300-th,
//! em300-mcs, em300-sld, em400-tld/udl/mud) and the EM400 README "Example (NB-IoT)".
//!
//! - LENGTH is kept as a field but not trusted: it is total - 5 in the EM400 example and 98
//!   in both EM300 samples of 128 and 131 bytes. DATA_LEN delimits DATA; bytes after it are
//!   [`DecodeError::TrailingBytes`], a DATA_LEN beyond the frame [`DecodeError::Truncated`].
//! - IMEI and IMSI must be 15 ASCII digits, ICCID 20 ASCII hex digits (ICCIDs carry letters,
//!   e.g. `898604B8...`), FW/HW/SN printable ASCII (trailing NUL or space padding trimmed);
//!   anything else is [`DecodeError::InvalidValue`] at that field.
//! - Records: the device batches its samples, and DATA is cut into records where a channel
//!   id's low nibble does not increase (the vendor decoders' rule, 0xFF counting as 0x0F):
//!   `01 75 .. ff 02 .. | 03 67 .. 04 68 .. | 03 67 .. 04 68 ..`. One reading per record, in
//!   order, so the vendor's `data[i]` is reading `i`. The first record is the status record
//!   (battery, collecting interval); its reading also carries the frame fields and the
//!   identity (IMEI, frame counter), and has time `None` (= when received). The records
//!   after it are samples taken at the collecting interval (0xFF/0x02, seconds), the last
//!   one most recent: with `n` samples, sample `k` gets `DeviceTime::Ago((n - 1 - k) *
//!   interval)`; without an interval (or interval 0) they have time `None`. Records without
//!   live fields (history only) produce no reading; history records come after all records.

use super::{tlv, MilesightCodec, MEASUREMENT};
use crate::parse::{fail, finish, take_n, PError, PErrorKind, PResult};
use crate::reading::{DeviceTime, Identity, Name, Reading, Text, Value};
use crate::DecodeError;

/// Bytes before DATA.
pub(super) const HEADER_LEN: usize = 86;

/// The fields [`frame_reading`] adds to the first reading of a cellular frame.
pub(super) const FRAME_FIELDS: &[&str] = &[
    "frame_id",
    "frame_length",
    "frame_flag",
    "frame_counter",
    "protocol_version",
    "firmware_version",
    "hardware_version",
    "sn",
    "imsi",
    "iccid",
    "csq",
    "rssi_dbm",
    "data_length",
];

/// The start byte of a cellular frame.
const START: u8 = 0x02;

/// The fixed header, borrowing its text fields from the payload: checked ASCII (trimmed
/// where padded), kept as bytes so that they become [`Text`] without a UTF-8 pass.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header<'a> {
    id: u16,
    length: u16,
    flag: u8,
    frame_cnt: u16,
    protocol: u8,
    firmware: &'a [u8],
    hardware: &'a [u8],
    sn: &'a [u8],
    imei: &'a [u8],
    imsi: &'a [u8],
    iccid: &'a [u8],
    csq: u8,
    data_len: u16,
}

/// `frame = "auto"`: byte 0 is START, the header is complete and DATA_LEN fits in the rest.
pub(super) fn looks_cellular(payload: &[u8]) -> bool {
    match (payload.first(), payload.get(84..HEADER_LEN)) {
        (Some(&START), Some(&[hi, lo])) => {
            usize::from(u16::from_be_bytes([hi, lo])) <= payload.len() - HEADER_LEN
        }
        _ => false,
    }
}

/// Reads `N` bytes as an array, or fails with `Truncated { what }`.
fn array<'a, const N: usize>(input: &'a [u8], what: &'static str) -> PResult<'a, [u8; N]> {
    match input.split_first_chunk::<N>() {
        Some((head, rest)) => Ok((rest, *head)),
        None => Err(nom::Err::Error(PError {
            input,
            kind: PErrorKind::Nom {
                what,
                needed: N - input.len(),
            },
        })),
    }
}

fn be_u16<'a>(input: &'a [u8], what: &'static str) -> PResult<'a, u16> {
    array(input, what).map(|(rest, b)| (rest, u16::from_be_bytes(b)))
}

fn byte<'a>(input: &'a [u8], what: &'static str) -> PResult<'a, u8> {
    array(input, what).map(|(rest, [b])| (rest, b))
}

/// `n` ASCII bytes that all satisfy `valid`, else `InvalidValue { what, reason }`.
fn ascii<'a>(
    input: &'a [u8],
    n: usize,
    what: &'static str,
    valid: fn(&u8) -> bool,
    reason: &'static str,
) -> PResult<'a, &'a [u8]> {
    let (rest, raw) = take_n(input, n, what)?;
    if raw.iter().all(valid) {
        return Ok((rest, raw));
    }
    fail(
        input,
        DecodeError::InvalidValue {
            what,
            offset: 0,
            reason,
        },
    )
}

/// `n` bytes of printable ASCII, trailing NUL/space padding trimmed.
fn padded_text<'a>(input: &'a [u8], n: usize, what: &'static str) -> PResult<'a, &'a [u8]> {
    let (rest, raw) = take_n(input, n, what)?;
    let end = raw
        .iter()
        .rposition(|&b| b != 0 && b != b' ')
        .map_or(0, |p| p + 1);
    let text = raw.get(..end).unwrap_or_default();
    if text.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Ok((rest, text));
    }
    fail(
        input,
        DecodeError::InvalidValue {
            what,
            offset: 0,
            reason: "not printable ASCII",
        },
    )
}

fn parse_header(input: &[u8]) -> PResult<'_, Header<'_>> {
    let (i, start) = byte(input, "start flag")?;
    if start != START {
        return fail(
            input,
            DecodeError::BadConstant {
                what: "start flag",
                offset: 0,
                expected: START.into(),
                found: start.into(),
            },
        );
    }
    let (i, id) = be_u16(i, "frame id")?;
    let (i, length) = be_u16(i, "frame length")?;
    let (i, flag) = byte(i, "frame flag")?;
    let (i, frame_cnt) = be_u16(i, "frame counter")?;
    let (i, protocol) = byte(i, "protocol version")?;
    let (i, firmware) = padded_text(i, 4, "firmware version")?;
    let (i, hardware) = padded_text(i, 4, "hardware version")?;
    let (i, sn) = padded_text(i, 16, "serial number")?;
    let (i, imei) = ascii(i, 15, "imei", u8::is_ascii_digit, "not 15 ASCII digits")?;
    let (i, imsi) = ascii(i, 15, "imsi", u8::is_ascii_digit, "not 15 ASCII digits")?;
    let (i, iccid) = ascii(
        i,
        20,
        "iccid",
        u8::is_ascii_hexdigit,
        "not 20 ASCII hex digits",
    )?;
    let (i, csq) = byte(i, "csq")?;
    let (i, data_len) = be_u16(i, "data length")?;
    Ok((
        i,
        Header {
            id,
            length,
            flag,
            frame_cnt,
            protocol,
            firmware,
            hardware,
            sn,
            imei,
            imsi,
            iccid,
            csq,
            data_len,
        },
    ))
}

/// The first reading: the frame's own fields and the sender's identity.
fn frame_reading(h: &Header<'_>) -> Reading {
    // Checked ASCII by the parser; all but the 20-digit ICCID are stored inline.
    let text = |b: &[u8]| Text::from_ascii(b).unwrap_or_default();
    let mut r = Reading::with_capacity(MEASUREMENT, 20);
    let mut push = |name: &'static str, value: Value| r.push(Name::Static(name), value);
    push("frame_id", Value::Int(h.id.into()));
    push("frame_length", Value::Int(h.length.into()));
    push("frame_flag", Value::Int(h.flag.into()));
    push("frame_counter", Value::Int(h.frame_cnt.into()));
    push("protocol_version", Value::Int(h.protocol.into()));
    push("firmware_version", Value::Text(text(h.firmware)));
    push("hardware_version", Value::Text(text(h.hardware)));
    push("sn", Value::Text(text(h.sn)));
    push("imsi", Value::Text(text(h.imsi)));
    push("iccid", Value::Text(text(h.iccid)));
    push("csq", Value::Int(h.csq.into()));
    // 3GPP TS 27.007 +CSQ: 0 = -113 dBm or less, 31 = -51 dBm or more, 99 = not known.
    if h.csq <= 31 {
        push("rssi_dbm", Value::Int(-113 + 2 * i64::from(h.csq)));
    }
    push("data_length", Value::Int(h.data_len.into()));
    r.identity = Some(Identity {
        device_id: Some(text(h.imei)),
        sequence: Some(h.frame_cnt.into()),
    });
    r
}

/// Decodes a whole cellular frame (see the module docs for what each reading holds).
pub(super) fn decode(codec: &MilesightCodec, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
    let (rest, header) = finish(payload, parse_header(payload))?;
    let data_len = usize::from(header.data_len);
    let Some(data) = rest.get(..data_len) else {
        return Err(DecodeError::Truncated {
            what: "cellular data",
            offset: HEADER_LEN,
            needed: data_len - rest.len(),
        });
    };
    if rest.len() > data_len {
        return Err(DecodeError::TrailingBytes {
            offset: HEADER_LEN + data_len,
            count: rest.len() - data_len,
        });
    }
    let stream = tlv::parse(codec, data, HEADER_LEN, frame_reading(&header), true)?;
    let mut out = stream.records;
    let samples = out.len().saturating_sub(1);
    if let Some(interval) = stream.collecting_interval_s.filter(|&s| s > 0) {
        for (k, r) in out.iter_mut().skip(1).enumerate() {
            let steps = u32::try_from(samples - 1 - k).unwrap_or(u32::MAX);
            r.time = Some(DeviceTime::Ago(steps.saturating_mul(interval.into())));
        }
    }
    out.extend(stream.history);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{Frame, Model};
    use super::*;
    use crate::hex;
    use crate::Codec;

    /// A frame with the EM300-TH sample header and `data`; DATA_LEN = data length.
    fn frame(data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0x00, 0x01, 0x00, 0x62, 0x00, 0x00, 0x14, 0x01];
        f.extend_from_slice(b"0120");
        f.extend_from_slice(b"0100");
        f.extend_from_slice(b"6138B22055911003");
        f.extend_from_slice(b"869951040293361");
        f.extend_from_slice(b"460113112062931");
        f.extend_from_slice(b"89861120220013228893");
        f.push(9);
        f.extend_from_slice(&(data.len() as u16).to_be_bytes());
        f.extend_from_slice(data);
        f
    }

    fn names(r: &Reading) -> Vec<&str> {
        r.fields.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn fields(r: &Reading) -> Vec<(&str, Value)> {
        r.fields
            .iter()
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect()
    }

    fn text(s: &str) -> Value {
        Value::Text(Text::new(s))
    }

    fn th() -> MilesightCodec {
        MilesightCodec::for_model(Model::Em300Th)
    }

    #[test]
    fn em300_th_sample_frame_whole_result() {
        let payload = hex::decode(
            b"020001006200001401303132303031303036313338423232303535393131303033383639393531\
              303430323933333631343630313133313132303632393331383938363131323032323030313332\
              323838393309002a01755bff023c000367fe000468780367ff000468780367fe000468780367ff\
              000468780367fe00046879",
        )
        .unwrap();
        assert_eq!(payload.len(), 128);
        assert!(looks_cellular(&payload));
        let out = th().decode(&payload).unwrap();
        assert_eq!(out.len(), 6);
        assert_eq!(
            out[0].identity.as_ref(),
            Some(&Identity {
                device_id: Some("869951040293361".into()),
                sequence: Some(20)
            })
        );
        assert_eq!(out[0].time, None);
        assert_eq!(
            fields(&out[0]),
            vec![
                ("frame_id", Value::Int(1)),
                ("frame_length", Value::Int(98)),
                ("frame_flag", Value::Int(0)),
                ("frame_counter", Value::Int(20)),
                ("protocol_version", Value::Int(1)),
                ("firmware_version", text("0120")),
                ("hardware_version", text("0100")),
                ("sn", text("6138B22055911003")),
                ("imsi", text("460113112062931")),
                ("iccid", text("89861120220013228893")),
                ("csq", Value::Int(9)),
                ("rssi_dbm", Value::Int(-95)),
                ("data_length", Value::Int(42)),
                ("battery_pct", Value::Int(91)),
                ("collecting_interval_s", Value::Int(60)),
            ]
        );
        let samples = [
            (25.4, 60.0),
            (25.5, 60.0),
            (25.4, 60.0),
            (25.5, 60.0),
            (25.4, 60.5),
        ];
        for (k, (t, h)) in samples.iter().enumerate() {
            let r = &out[k + 1];
            assert_eq!(r.identity, None);
            assert_eq!(
                r.time,
                Some(DeviceTime::Ago((4 - k as u32) * 60)),
                "sample {k}"
            );
            assert_eq!(
                fields(r),
                vec![
                    ("temperature_c", Value::Float(*t)),
                    ("humidity_pct", Value::Float(*h))
                ]
            );
        }
    }

    #[test]
    fn negative_temperature_in_a_cellular_frame() {
        // The vendor cellular decoders that read unsigned would print 6543.6 here.
        let out = th().decode(&frame(&[0x03, 0x67, 0x9c, 0xff])).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].field("temperature_c"), Some(&Value::Float(-10.0)));
    }

    #[test]
    fn samples_without_interval_have_no_time() {
        let out = th()
            .decode(&frame(&[
                0x01, 0x75, 0x50, 0x03, 0x67, 0x01, 0x00, 0x03, 0x67, 0x02, 0x00,
            ]))
            .unwrap();
        // Record 0: battery + the first temperature (nibbles 1 < 3); record 1: temperature.
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].field("temperature_c"), Some(&Value::Float(0.1)));
        assert_eq!(
            (out[1].time, fields(&out[1])),
            (None, vec![("temperature_c", Value::Float(0.2))])
        );
    }

    #[test]
    fn a_device_information_channel_replaces_the_frame_field() {
        let data = [
            0x01, 0x75, 0x64, // battery
            0xff, 0x16, 0x61, 0x38, 0xb2, 0x20, 0x55, 0x91, 0x10, 0x04, // SN, 8 bytes
        ];
        let out = th().decode(&frame(&data)).unwrap();
        assert_eq!(out.len(), 1);
        let names = names(&out[0]);
        assert_eq!(names.iter().filter(|n| **n == "sn").count(), 1);
        assert_eq!(names.iter().filter(|n| **n == "battery_pct").count(), 1);
        assert_eq!(out[0].field("sn"), Some(&text("6138b22055911004")));
    }

    #[test]
    fn empty_data_is_the_frame_reading_only() {
        let out = th().decode(&frame(&[])).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(names(&out[0]).last(), Some(&"data_length"));
    }

    #[test]
    fn history_and_unknown_channel_inside_data() {
        let data = [
            0x01, 0x75, 0x64, // battery
            0x20, 0xce, 0x9e, 0x74, 0x46, 0x63, 0x10, 0x01, 0x5d, 0x00, // history record
            0x0c, 0x0c, 0x01, // unknown channel 0x0c/0x0c
        ];
        let out = th().decode(&frame(&data)).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].field("battery_pct"), Some(&Value::Int(100)));
        // The history record opened record 1 (nibble 0 <= 1); the unknown channel lands there.
        assert_eq!(
            fields(&out[1]),
            vec![
                ("unknown_channel", Value::Int(0x0c0c)),
                ("unparsed_hex", text("0c0c01"))
            ]
        );
        assert_eq!(out[2].time, Some(DeviceTime::Utc(1_665_561_758)));
    }

    #[test]
    fn data_length_beyond_frame_is_truncated() {
        let mut f = frame(&[0x01, 0x75, 0x64]);
        f[85] = 5; // DATA_LEN 5, 3 bytes present
        assert!(!looks_cellular(&f));
        let cellular = MilesightCodec {
            frame: Frame::Cellular,
            ..th()
        };
        assert_eq!(
            cellular.decode(&f),
            Err(DecodeError::Truncated {
                what: "cellular data",
                offset: 86,
                needed: 2
            })
        );
        // In auto mode it is not a cellular frame; as TLV, channel 0x02 is unknown.
        assert_eq!(
            th().decode(&f),
            Err(DecodeError::UnknownType {
                what: "channel",
                code: 0x0200,
                offset: 0
            })
        );
    }

    #[test]
    fn bytes_after_data_are_trailing() {
        let mut f = frame(&[0x01, 0x75, 0x64]);
        f.push(0xaa);
        assert_eq!(
            th().decode(&f),
            Err(DecodeError::TrailingBytes {
                offset: 89,
                count: 1
            })
        );
    }

    #[test]
    fn header_errors_name_the_field() {
        let cellular = MilesightCodec {
            frame: Frame::Cellular,
            ..th()
        };
        let f = frame(&[]);
        assert_eq!(
            cellular.decode(&f[..50]),
            Err(DecodeError::Truncated {
                what: "imsi",
                offset: 48,
                needed: 13
            })
        );
        let mut bad = f.clone();
        bad[0] = 0x03;
        assert_eq!(
            cellular.decode(&bad),
            Err(DecodeError::BadConstant {
                what: "start flag",
                offset: 0,
                expected: 2,
                found: 3
            })
        );
        let mut bad = f.clone();
        bad[40] = b'x';
        assert_eq!(
            cellular.decode(&bad),
            Err(DecodeError::InvalidValue {
                what: "imei",
                offset: 33,
                reason: "not 15 ASCII digits"
            })
        );
        let mut bad = f.clone();
        bad[70] = b'Z';
        assert_eq!(
            cellular.decode(&bad),
            Err(DecodeError::InvalidValue {
                what: "iccid",
                offset: 63,
                reason: "not 20 ASCII hex digits"
            })
        );
        let mut bad = f.clone();
        bad[10] = 0xc3;
        assert_eq!(
            cellular.decode(&bad),
            Err(DecodeError::InvalidValue {
                what: "firmware version",
                offset: 9,
                reason: "not printable ASCII"
            })
        );
    }

    #[test]
    fn padded_text_fields_are_trimmed_and_csq_99_has_no_rssi() {
        let mut f = frame(&[]);
        f[21..33].fill(0); // SN "6138" + NUL padding
        f[83] = 99;
        let out = th().decode(&f).unwrap();
        assert_eq!(out[0].field("sn"), Some(&text("6138")));
        assert_eq!(out[0].field("csq"), Some(&Value::Int(99)));
        assert_eq!(out[0].field("rssi_dbm"), None);
    }
}
