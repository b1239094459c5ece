//! Wireless M-Bus telegrams and EN 13757-3 data records, as NB-IoT water meters carry them
//! (Axioma Qalcosonic W1 / Q400 and the like). Decodes plain telegrams; never decrypts.
//!
//! ```text
//! telegram (EN 13757-4 link layer, delivered without DLL CRC blocks):
//!   0  L        u8      bytes after L: the payload is exactly L + 1 bytes
//!   1  C        u8      0x44 SND_NR, 0x46 SND_IR, ...
//!   2  M        u16 LE  manufacturer: three letters of 5 bits each, 1 = 'A'
//!   4  ID       4 B     meter id, BCD, least significant byte first
//!   8  version  u8
//!   9  type     u8      device type / medium (0x07 water, 0x06 warm water, ...)
//!  10  CI       u8      0x7A short TPL header | 0x72 long TPL header | 0x78 no TPL header
//!      0x7A: ACC u8 | STATUS u8 | CONFIG u16 LE                                      4 B
//!      0x72: ID 4 B | M u16 | version u8 | type u8 | ACC u8 | STATUS u8 | CONFIG u16  12 B
//!  ..  data records to the end; 0x2F is an idle filler anywhere between records
//!
//! data record (EN 13757-3):
//!   DIF [DIFE x 0..10] VIF [VIFE x 0..10] data
//!   DIF   b7 DIFE follows | b6 storage bit 0 | b5-4 function | b3-0 data coding
//!   DIFE  b7 DIFE follows | b6 subunit bit   | b5-4 tariff bits | b3-0 storage bits
//!   VIF   b7 VIFE follows | b6-0 code; 0xFD / 0xFB: the first VIFE is the code (tables
//!         "main VIFE-code extension" / "alternate extended VIF-code"); later VIFEs are
//!         combinable (orthogonal) extensions such as 0x3B forward / 0x3C backward flow
//!   coding 0 none | 1,2,3,4,6,7 int8/16/24/32/48/64 LE signed | 5 real32 | 8 readout
//!          selection (no data) | 9,A,B,C,E BCD 2/4/6/8/12 digits LE | D variable length
//!          (LVAR byte: 0x00-0xBF text, 0xC0-0xCF BCD, 0xD0-0xDF negative BCD, 0xE0-0xEF
//!          binary, 0xF0-0xF6 long binary) | F special: 0x0F / 0x1F manufacturer data to the
//!          end (0x1F: more records follow in the next telegram), 0x2F idle filler
//! ```
//!
//! References: EN 13757-3 (application layer, data records, date types F/G/I), EN 13757-4
//! (wireless link layer), EN 13757-7 (TPL CONFIG security mode); the wmbusmeters `q400`
//! driver and its test telegrams (github.com/wmbusmeters/wmbusmeters, drivers/src/q400.xmq).
//!
//! # What is decoded, and what is decided
//!
//! - Length: the payload must be exactly `L + 1` bytes. Fewer is `Truncated`, more is
//!   `TrailingBytes`; a length that matches a format-A frame still carrying its CRC blocks
//!   is `InvalidValue` ("strip the link-layer CRCs"). CRCs are not checked: receivers and
//!   NB-IoT modules deliver the telegram with them removed, as the reference telegrams are.
//! - Encryption: a TPL CONFIG security mode (bits 12-8) other than 0 whose data does not
//!   start with the 0x2F 0x2F decryption check is refused with
//!   `InvalidValue { what: "CONFIG field", reason: "encrypted telegram, no key" }`. Data that
//!   does start with 2F 2F is plain (already decrypted upstream) and is decoded.
//! - BCD: a most significant nibble 0xF marks a negative value (EN 13757-3 type A); any other
//!   nibble above 9 is refused as `InvalidValue { what: "BCD value" }` at that byte, because
//!   a corrupted meter register is not a value to store.
//! - Unknown VIFs, unknown or extra combinable VIFEs, tariff or subunit other than 0,
//!   functions the tables below do not name, duplicates of a field already decoded, and
//!   historic values whose storage number has no date are all counted, not fatal: the count is
//!   the current reading's `unmapped_records` (Int, present only when non-zero). The raw
//!   payload is kept by the gateway, so nothing is lost.
//!
//! # Readings (measurement `water_meter`)
//!
//! One reading per storage number, in time order; the current values (storage 0) are the
//! LAST reading. Its time is the meter's type F date-time of storage 0
//! ([`DeviceTime::Local`]); it alone carries the telegram header fields and the identity
//! (meter id; access number as the sequence, once per telegram, so a gap check sees each
//! access number once). Each storage number > 0 that comes with its own date
//! (type G or F, e.g. the monthly set/billing date as storage 1) becomes an earlier reading
//! whose time is that date and whose fields are `storage` (Int) plus the same field names as
//! the current reading (`volume_m3` at the set date, ...). So the TSDB gets the meter's
//! register at the set date as a point at the set date, and the same set-date point sent again
//! next time overwrites itself. At most 15 such readings per telegram.
//!
//! Current reading fields, in order: `manufacturer` Text (3 letters), `version` Int,
//! `device_type` Int, `medium` Text (`water`, `warm_water`, `heat`, ...), `status` Int (TPL
//! status byte), `status_text` Text (`ok`, or comma-separated `application_busy`,
//! `application_error`, `abnormal_condition`, `power_low`, `permanent_error`,
//! `temporary_error`, `manufacturer_specific`), `power_low`, `permanent_error`,
//! `temporary_error` Bool (status bits 2, 3, 4); then the records in telegram order:
//!
//! | VIF                    | field (function 0)       | max / min (function 1 / 2)       |
//! |------------------------|--------------------------|----------------------------------|
//! | 0x10-0x17              | `volume_m3` Float        |                                  |
//! | 0x90-0x97 + VIFE 0x3B  | `forward_m3` Float       |                                  |
//! | 0x90-0x97 + VIFE 0x3C  | `backward_m3` Float      |                                  |
//! | 0x38-0x3F              | `flow_m3h` Float         | `flow_max_m3h`, `flow_min_m3h`   |
//! | 0x58-0x5B              | `flow_temperature_c`     | `flow_temperature_max_c`, `_min_c` |
//! | 0x5C-0x5F              | `return_temperature_c`   | `return_temperature_max_c`, `_min_c` |
//! | 0x64-0x67              | `external_temperature_c` | `external_temperature_max_c`, `_min_c` |
//! | 0x00-0x07              | `energy_kwh` Float       |                                  |
//! | 0x28-0x2F              | `power_w` Float          | `power_max_w`, `power_min_w`     |
//! | 0x20-0x23 (s/min/h/d)  | `on_time_h` Float        |                                  |
//! | 0x24-0x27 (s/min/h/d)  | `operating_time_h` Float |                                  |
//! | 0xFD 0x74              | `battery_pct` Int (option `battery = "days"`: `battery_remaining_days`) | |
//! | 0xFD 0x11              | `customer` Text          |                                  |
//! | 0xFD 0x17              | `error_flags` Int        |                                  |
//! | 0x6D int32 F / int48 I | the reading's time       |                                  |
//! | 0x6C int16 (type G)    | the reading's time, unless a 0x6D gave it |                 |
//!
//! EN 13757-3 defines 0xFD 0x74 as "remaining battery lifetime (days)"; Axioma meters (and the
//! wmbusmeters q400 driver) report a percentage there, hence the default and the option.
//! Sentinels: an instantaneous temperature of exactly -100 degC (0xD8F0 at 0.01 degC) is the
//! sensor-error value: no temperature field, `flow_temperature_error` /
//! `return_temperature_error` / `external_temperature_error` = true instead (a -100 maximum or
//! minimum is dropped and counted unmapped). A date-time with its invalid bit set, or a
//! date that does not exist, gives the current reading no time and `datetime_invalid = true`.
//! After the records: `unmapped_records` Int (when non-zero), `manufacturer_data` Text (hex of
//! the bytes after a 0x0F / 0x1F DIF, when any), `more_records_follow` Bool (true after 0x1F).
//!
//! # Options (`[codec_options]`)
//!
//! - `frame = "auto" | "telegram" | "records"` (default `auto`): `records` is a bare record
//!   stream (no link or TPL header: no header fields, no identity). `auto` takes the payload
//!   as a telegram when it is at least 11 bytes, its byte 10 is a known CI (0x72, 0x78, 0x7A)
//!   and either its L field matches the length or its C field is 0x44 / 0x46; otherwise as
//!   records. Profiles for one meter type should name the frame.
//! - `battery = "pct" | "days"` (default `pct`): how to read 0xFD 0x74.

use crate::parse::{finish, take_n, PError, PErrorKind, PResult};
use crate::reading::push;
use crate::registry::{CodecConfigError, CodecOptions};
use crate::time::from_civil;
use crate::{hex, Codec, DecodeError, DeviceTime, Identity, Reading, Text, Value};

pub const ID: &str = "wmbus";

/// The measurement name readings get unless a profile names its own.
const MEASUREMENT: &str = "water_meter";

/// EN 13757-3: at most 10 DIFEs and 10 VIFEs per record.
const MAX_DIFE: usize = 10;
const MAX_VIFE: usize = 10;
/// Historic (storage > 0) readings per telegram; more storage numbers are counted unmapped.
const MAX_HISTORY: usize = 15;

/// Link header up to and including CI: L C M(2) ID(4) version type CI.
const LINK_HEADER_LEN: usize = 11;
const CI_SHORT: u8 = 0x7A;
const CI_LONG: u8 = 0x72;
const CI_NONE: u8 = 0x78;
/// The two bytes that start decrypted data (EN 13757-7 "decryption verification").
const DECRYPTION_CHECK: [u8; 2] = [0x2F, 0x2F];
const IDLE_FILLER: u8 = 0x2F;

/// How to find the records in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Frame {
    #[default]
    Auto,
    Telegram,
    Records,
}

/// What 0xFD 0x74 means for this meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Battery {
    /// Percent remaining (Axioma; the wmbusmeters q400 driver).
    #[default]
    Percent,
    /// Remaining lifetime in days (EN 13757-3).
    Days,
}

#[derive(Debug, Clone, Default)]
pub struct WmbusCodec {
    frame: Frame,
    battery: Battery,
}

impl WmbusCodec {
    pub fn new(frame: Frame, battery: Battery) -> Self {
        WmbusCodec { frame, battery }
    }

    /// Builds the codec from a profile's `[codec_options]` (`frame`, `battery`).
    pub fn from_options(options: &CodecOptions) -> Result<Self, CodecConfigError> {
        super::deny_unknown_options(ID, options, &["frame", "battery"])?;
        let frame = match option_str(options, "frame")? {
            None | Some("auto") => Frame::Auto,
            Some("telegram") => Frame::Telegram,
            Some("records") => Frame::Records,
            Some(_) => {
                return Err(bad_option(
                    "frame",
                    "expected \"auto\", \"telegram\" or \"records\"",
                ))
            }
        };
        let battery = match option_str(options, "battery")? {
            None | Some("pct") => Battery::Percent,
            Some("days") => Battery::Days,
            Some(_) => return Err(bad_option("battery", "expected \"pct\" or \"days\"")),
        };
        Ok(WmbusCodec { frame, battery })
    }

    fn battery_field(&self) -> &'static str {
        match self.battery {
            Battery::Percent => "battery_pct",
            Battery::Days => "battery_remaining_days",
        }
    }
}

fn option_str<'a>(
    options: &'a CodecOptions,
    key: &str,
) -> Result<Option<&'a str>, CodecConfigError> {
    match options.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(bad_option(key, "expected a string")),
    }
}

fn bad_option(key: &str, reason: &str) -> CodecConfigError {
    CodecConfigError::BadOption {
        codec: ID,
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Every field the codec can produce apart from the battery (named by the `battery` option),
/// for profile validation.
const FIELDS: &[&str] = &[
    // header (current reading)
    "manufacturer",
    "version",
    "device_type",
    "medium",
    "status",
    "status_text",
    "power_low",
    "permanent_error",
    "temporary_error",
    // historic readings
    "storage",
    // records
    "volume_m3",
    "forward_m3",
    "backward_m3",
    "flow_m3h",
    "flow_max_m3h",
    "flow_min_m3h",
    "flow_temperature_c",
    "flow_temperature_max_c",
    "flow_temperature_min_c",
    "flow_temperature_error",
    "return_temperature_c",
    "return_temperature_max_c",
    "return_temperature_min_c",
    "return_temperature_error",
    "external_temperature_c",
    "external_temperature_max_c",
    "external_temperature_min_c",
    "external_temperature_error",
    "energy_kwh",
    "power_w",
    "power_max_w",
    "power_min_w",
    "on_time_h",
    "operating_time_h",
    "customer",
    "error_flags",
    "datetime_invalid",
    // after the records
    "unmapped_records",
    "manufacturer_data",
    "more_records_follow",
];

impl Codec for WmbusCodec {
    fn id(&self) -> &str {
        ID
    }

    fn field_names(&self) -> Vec<&str> {
        let mut names = Vec::with_capacity(FIELDS.len() + 1);
        names.extend_from_slice(FIELDS);
        names.push(self.battery_field());
        names
    }

    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        let telegram = match self.frame {
            Frame::Telegram => true,
            Frame::Records => false,
            Frame::Auto => looks_like_telegram(payload),
        };
        let mut asm = Assembler::new(self.battery_field());
        if telegram {
            check_length(payload)?;
            let (records, header) = finish(payload, parse_header(payload))?;
            asm.header(&header);
            finish(payload, parse_records(records, &mut asm))?;
        } else {
            finish(payload, parse_records(payload, &mut asm))?;
        }
        Ok(asm.finish())
    }
}

/// The `frame = "auto"` rule (see the module docs).
fn looks_like_telegram(p: &[u8]) -> bool {
    match (p.first(), p.get(1), p.get(LINK_HEADER_LEN - 1)) {
        (Some(&l), Some(&c), Some(&ci)) => {
            matches!(ci, CI_SHORT | CI_LONG | CI_NONE)
                && (usize::from(l) + 1 == p.len() || c == 0x44 || c == 0x46)
        }
        _ => false,
    }
}

/// Bytes a format-A frame of this L field adds in CRCs: 2 after the 10-byte first block and
/// 2 after every (last possibly partial) 16-byte block of the rest.
fn format_a_crc_bytes(l: usize) -> usize {
    2 * (1 + l.saturating_sub(9).div_ceil(16))
}

/// The L field must match the payload: no DLL CRCs, nothing after the telegram.
fn check_length(p: &[u8]) -> Result<(), DecodeError> {
    let l = usize::from(p.first().copied().unwrap_or(0));
    let expected = l + 1;
    if p.len() < expected {
        return Err(DecodeError::Truncated {
            what: "telegram (L field)",
            offset: p.len(),
            needed: expected - p.len(),
        });
    }
    if p.len() > expected {
        if p.len() == expected + format_a_crc_bytes(l) {
            return Err(DecodeError::InvalidValue {
                what: "telegram length",
                offset: 0,
                reason: "matches a frame with link-layer CRC blocks; strip the CRCs",
            });
        }
        return Err(DecodeError::TrailingBytes {
            offset: expected,
            count: p.len() - expected,
        });
    }
    Ok(())
}

/// Takes `N` bytes as an array, or fails with `Truncated { what }`.
fn take_array<'a, const N: usize>(input: &'a [u8], what: &'static str) -> PResult<'a, [u8; N]> {
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

fn fail_at<T>(input: &[u8], err: DecodeError) -> PResult<'_, T> {
    Err(nom::Err::Failure(PError {
        input,
        kind: PErrorKind::Decode(err),
    }))
}

/// Who sent the telegram and the TPL state it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    manufacturer: u16,
    id: [u8; 4],
    version: u8,
    device_type: u8,
    tpl: Option<Tpl>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tpl {
    access_number: u8,
    status: u8,
    config: u16,
}

/// Link header and TPL header; leaves the input at the first data record.
fn parse_header(input: &[u8]) -> PResult<'_, Header> {
    let (input, _l) = take_array::<1>(input, "L field")?;
    let (input, _c) = take_array::<1>(input, "C field")?;
    let (input, m) = take_array::<2>(input, "manufacturer")?;
    let (input, id) = take_array::<4>(input, "meter id")?;
    let (input, [version]) = take_array::<1>(input, "version")?;
    let (input, [device_type]) = take_array::<1>(input, "device type")?;
    let link = Header {
        manufacturer: u16::from_le_bytes(m),
        id,
        version,
        device_type,
        tpl: None,
    };
    let at_ci = input;
    let (input, [ci]) = take_array::<1>(input, "CI field")?;
    let (input, header) = match ci {
        CI_NONE => return Ok((input, link)),
        CI_SHORT => {
            let (input, [acc, status]) = take_array::<2>(input, "short header")?;
            (
                input,
                Header {
                    tpl: Some(Tpl {
                        access_number: acc,
                        status,
                        config: 0,
                    }),
                    ..link
                },
            )
        }
        CI_LONG => {
            let (input, id) = take_array::<4>(input, "long header meter id")?;
            let (input, m) = take_array::<2>(input, "long header manufacturer")?;
            let (input, [version, device_type, acc, status]) =
                take_array::<4>(input, "long header")?;
            let tpl = Tpl {
                access_number: acc,
                status,
                config: 0,
            };
            let header = Header {
                manufacturer: u16::from_le_bytes(m),
                id,
                version,
                device_type,
                tpl: Some(tpl),
            };
            (input, header)
        }
        other => {
            return fail_at(
                at_ci,
                DecodeError::UnknownType {
                    what: "CI field",
                    code: u32::from(other),
                    offset: 0,
                },
            )
        }
    };
    let at_config = input;
    let (input, config) = take_array::<2>(input, "CONFIG field")?;
    let config = u16::from_le_bytes(config);
    // EN 13757-7: CONFIG bits 12-8 are the security mode; 0 = no encryption.
    let mode = (config >> 8) & 0x1F;
    if mode != 0 && !input.starts_with(&DECRYPTION_CHECK) {
        return fail_at(
            at_config,
            DecodeError::InvalidValue {
                what: "CONFIG field",
                offset: 0,
                reason: "encrypted telegram, no key",
            },
        );
    }
    let tpl = header.tpl.map(|t| Tpl { config, ..t });
    Ok((input, Header { tpl, ..header }))
}

/// Which VIF table a record's code belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VifTable {
    Primary,
    /// 0xFD: main VIFE-code extension table.
    Fd,
    /// 0xFB, plain text, "any VIF", manufacturer-specific, reserved: never mapped.
    Other,
}

/// The combinable VIFEs after the code: none, exactly one (its 7-bit code), or more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Combinable {
    None,
    One(u8),
    Many,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vib {
    table: VifTable,
    code: u8,
    combinable: Combinable,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Data<'a> {
    None,
    Int(i64),
    Real(f64),
    /// ASCII as on the wire (least significant character first).
    Text(&'a [u8]),
    /// Too long for a number.
    Bytes(&'a [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Record<'a> {
    /// The DIF data coding nibble.
    coding: u8,
    function: u8,
    storage: u64,
    tariff: u32,
    subunit: u32,
    vib: Vib,
    /// The data bytes as sent (dates are decoded from these).
    raw: &'a [u8],
    data: Data<'a>,
}

/// Records until the end of the input, handing each to `asm`.
fn parse_records<'a>(mut input: &'a [u8], asm: &mut Assembler) -> PResult<'a, ()> {
    while let Some((&dif, after_dif)) = input.split_first() {
        match dif {
            IDLE_FILLER => {
                input = after_dif;
                continue;
            }
            0x0F | 0x1F => {
                asm.manufacturer_data(after_dif, dif == 0x1F);
                return Ok((&[], ()));
            }
            // 0x3F-0x6F reserved, 0x7F global readout request, and any other DIF whose
            // coding nibble is 0xF: not a data record.
            d if d & 0x0F == 0x0F => {
                return fail_at(
                    input,
                    DecodeError::UnknownType {
                        what: "DIF",
                        code: u32::from(d),
                        offset: 0,
                    },
                )
            }
            _ => {}
        }
        let (rest, record) = parse_record(input)?;
        asm.record(&record);
        input = rest;
    }
    Ok((input, ()))
}

fn parse_record(input: &[u8]) -> PResult<'_, Record<'_>> {
    let (mut input, [dif]) = take_array::<1>(input, "DIF")?;
    let mut storage = u64::from((dif >> 6) & 1);
    let (mut tariff, mut subunit) = (0u32, 0u32);
    let mut more = dif & 0x80 != 0;
    let mut n = 0;
    while more {
        if n == MAX_DIFE {
            return fail_at(
                input,
                DecodeError::InvalidValue {
                    what: "DIFE",
                    offset: 0,
                    reason: "more than 10 DIF extensions",
                },
            );
        }
        let (rest, [dife]) = take_array::<1>(input, "DIFE")?;
        storage |= u64::from(dife & 0x0F) << (1 + 4 * n);
        tariff |= u32::from((dife >> 4) & 0x03) << (2 * n);
        subunit |= u32::from((dife >> 6) & 0x01) << n;
        more = dife & 0x80 != 0;
        n += 1;
        input = rest;
    }
    let (input, vib) = parse_vib(input)?;
    let (input, (raw, data)) = parse_data(input, dif & 0x0F)?;
    Ok((
        input,
        Record {
            coding: dif & 0x0F,
            function: (dif >> 4) & 0x03,
            storage,
            tariff,
            subunit,
            vib,
            raw,
            data,
        },
    ))
}

fn parse_vib(input: &[u8]) -> PResult<'_, Vib> {
    let (mut input, [vif]) = take_array::<1>(input, "VIF")?;
    let mut table = match vif {
        0xFD => VifTable::Fd,
        0xFB | 0xEF | 0x7B | 0x7D => VifTable::Other,
        v if v & 0x7F >= 0x7C => VifTable::Other,
        _ => VifTable::Primary,
    };
    let mut code = vif & 0x7F;
    let mut more = vif & 0x80 != 0;
    if code == 0x7C {
        // Plain-text VIF: the unit follows as a length byte and ASCII (libmbus order: before
        // the VIFEs). Bounded by the length byte; not mapped.
        let (rest, [len]) = take_array::<1>(input, "plain-text unit length")?;
        let (rest, _unit) = take_n(rest, usize::from(len), "plain-text unit")?;
        input = rest;
    }
    let mut n = 0;
    if vif == 0xFD || vif == 0xFB {
        // The first VIFE is the code in the extension table.
        let (rest, [vife]) = take_array::<1>(input, "VIFE")?;
        code = vife & 0x7F;
        more = vife & 0x80 != 0;
        n = 1;
        input = rest;
        if vif == 0xFB {
            table = VifTable::Other;
        }
    }
    let mut combinable = Combinable::None;
    while more {
        if n == MAX_VIFE {
            return fail_at(
                input,
                DecodeError::InvalidValue {
                    what: "VIFE",
                    offset: 0,
                    reason: "more than 10 VIF extensions",
                },
            );
        }
        let (rest, [vife]) = take_array::<1>(input, "VIFE")?;
        combinable = match combinable {
            Combinable::None => Combinable::One(vife & 0x7F),
            _ => Combinable::Many,
        };
        more = vife & 0x80 != 0;
        n += 1;
        input = rest;
    }
    Ok((
        input,
        Vib {
            table,
            code,
            combinable,
        },
    ))
}

/// The data of one record by its DIF coding nibble: the raw bytes and their value.
fn parse_data(input: &[u8], coding: u8) -> PResult<'_, (&[u8], Data<'_>)> {
    let int_len = match coding {
        0x1 => 1,
        0x2 => 2,
        0x3 => 3,
        0x4 => 4,
        0x6 => 6,
        0x7 => 8,
        _ => 0,
    };
    let bcd_len = match coding {
        0x9 => 1,
        0xA => 2,
        0xB => 3,
        0xC => 4,
        0xE => 6,
        _ => 0,
    };
    match coding {
        0x0 | 0x8 => Ok((input, (&[], Data::None))),
        0x5 => {
            let (rest, bytes) = take_array::<4>(input, "data")?;
            let raw = input.get(..4).unwrap_or_default();
            Ok((
                rest,
                (raw, Data::Real(f64::from(f32::from_le_bytes(bytes)))),
            ))
        }
        0xD => parse_variable(input),
        _ if int_len > 0 => {
            let (rest, raw) = take_n(input, int_len, "data")?;
            Ok((rest, (raw, Data::Int(le_signed(raw)))))
        }
        _ if bcd_len > 0 => {
            let (rest, raw) = take_n(input, bcd_len, "data")?;
            match bcd_le(raw) {
                Ok(Some(v)) => Ok((rest, (raw, Data::Int(v)))),
                Ok(None) => Ok((rest, (raw, Data::Bytes(raw)))),
                Err(i) => bad_bcd(input, i),
            }
        }
        // 0xF never gets here: parse_records handles special DIFs first.
        other => fail_at(
            input,
            DecodeError::UnknownType {
                what: "data coding",
                code: u32::from(other),
                offset: 0,
            },
        ),
    }
}

/// Variable-length data (coding 0xD): an LVAR byte, then LVAR-determined bytes.
fn parse_variable(input: &[u8]) -> PResult<'_, (&[u8], Data<'_>)> {
    let at_lvar = input;
    let (input, [lvar]) = take_array::<1>(input, "LVAR")?;
    let len = match lvar {
        0x00..=0xBF => usize::from(lvar),
        0xC0..=0xCF => usize::from(lvar - 0xC0),
        0xD0..=0xDF => usize::from(lvar - 0xD0),
        0xE0..=0xEF => usize::from(lvar - 0xE0),
        0xF0..=0xF4 => 4 * usize::from(lvar - 0xEC),
        0xF5 => 48,
        0xF6 => 64,
        _ => {
            return fail_at(
                at_lvar,
                DecodeError::InvalidValue {
                    what: "LVAR",
                    offset: 0,
                    reason: "reserved variable-length code",
                },
            )
        }
    };
    let (rest, raw) = take_n(input, len, "variable-length data")?;
    let data = match lvar {
        0x00..=0xBF => Data::Text(raw),
        0xC0..=0xDF => match bcd_le(raw) {
            Ok(Some(v)) if lvar >= 0xD0 => Data::Int(-v),
            Ok(Some(v)) => Data::Int(v),
            Ok(None) => Data::Bytes(raw),
            Err(i) => return bad_bcd(input, i),
        },
        0xE0..=0xE8 if len > 0 => Data::Int(le_signed(raw)),
        _ => Data::Bytes(raw),
    };
    Ok((rest, (raw, data)))
}

fn bad_bcd<T>(data: &[u8], index: usize) -> PResult<'_, T> {
    fail_at(
        data.get(index..).unwrap_or(data),
        DecodeError::InvalidValue {
            what: "BCD value",
            offset: 0,
            reason: "nibble is not a decimal digit",
        },
    )
}

/// A little-endian two's-complement integer of 1..=8 bytes (more are cut to 8).
fn le_signed(bytes: &[u8]) -> i64 {
    let bytes = bytes.get(..8).unwrap_or(bytes);
    // A byte loop, not a copy into a buffer: a copy of a run-time length is a memcpy call.
    let v = bytes.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b));
    let shift = 64 - 8 * bytes.len().clamp(1, 8) as u32;
    ((v << shift) as i64) >> shift
}

/// Little-endian packed BCD. A most significant nibble 0xF makes the value negative
/// (EN 13757-3 type A). `Err(i)`: byte `i` has a nibble above 9; `Ok(None)`: too many digits
/// for an i64.
fn bcd_le(bytes: &[u8]) -> Result<Option<i64>, usize> {
    let mut v: u64 = 0;
    let mut overflow = false;
    let mut negative = false;
    for (i, &b) in bytes.iter().enumerate().rev() {
        let (mut hi, lo) = (b >> 4, b & 0x0F);
        if i + 1 == bytes.len() && hi == 0xF {
            negative = true;
            hi = 0;
        }
        if hi > 9 || lo > 9 {
            return Err(i);
        }
        match v
            .checked_mul(100)
            .and_then(|v| v.checked_add(u64::from(hi * 10 + lo)))
        {
            Some(n) => v = n,
            None => overflow = true,
        }
    }
    if overflow {
        return Ok(None);
    }
    Ok(i64::try_from(v).ok().map(|v| if negative { -v } else { v }))
}

/// What a record measures; the `i32` is its decimal exponent in the field's unit, or for
/// times the EN 13757-3 unit code (0 s, 1 min, 2 h, 3 d).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quantity {
    Volume,
    Forward,
    Backward,
    Flow,
    FlowTemperature,
    ReturnTemperature,
    ExternalTemperature,
    Energy,
    Power,
    OnTime,
    OperatingTime,
    Date,
    DateTime,
    Battery,
    Customer,
    ErrorFlags,
}

fn quantity(vib: &Vib) -> Option<(Quantity, i32)> {
    use Quantity::*;
    let n = i32::from(vib.code & 0x07);
    let m = i32::from(vib.code & 0x03);
    match (vib.table, vib.code, vib.combinable) {
        (VifTable::Primary, 0x10..=0x17, Combinable::None) => Some((Volume, n - 6)),
        (VifTable::Primary, 0x10..=0x17, Combinable::One(0x3B)) => Some((Forward, n - 6)),
        (VifTable::Primary, 0x10..=0x17, Combinable::One(0x3C)) => Some((Backward, n - 6)),
        (_, _, Combinable::One(_) | Combinable::Many) => None,
        (VifTable::Primary, 0x00..=0x07, _) => Some((Energy, n - 6)),
        (VifTable::Primary, 0x20..=0x23, _) => Some((OnTime, m)),
        (VifTable::Primary, 0x24..=0x27, _) => Some((OperatingTime, m)),
        (VifTable::Primary, 0x28..=0x2F, _) => Some((Power, n - 3)),
        (VifTable::Primary, 0x38..=0x3F, _) => Some((Flow, n - 6)),
        (VifTable::Primary, 0x58..=0x5B, _) => Some((FlowTemperature, m - 3)),
        (VifTable::Primary, 0x5C..=0x5F, _) => Some((ReturnTemperature, m - 3)),
        (VifTable::Primary, 0x64..=0x67, _) => Some((ExternalTemperature, m - 3)),
        (VifTable::Primary, 0x6C, _) => Some((Date, 0)),
        (VifTable::Primary, 0x6D, _) => Some((DateTime, 0)),
        (VifTable::Fd, 0x74, _) => Some((Battery, 0)),
        (VifTable::Fd, 0x11, _) => Some((Customer, 0)),
        (VifTable::Fd, 0x17, _) => Some((ErrorFlags, 0)),
        _ => None,
    }
}

/// Field names by function (0 instantaneous, 1 maximum, 2 minimum); `None` = not mapped.
fn field_name(q: Quantity, function: u8) -> Option<&'static str> {
    use Quantity::*;
    let names: [&'static str; 3] = match q {
        Volume => ["volume_m3", "", ""],
        Forward => ["forward_m3", "", ""],
        Backward => ["backward_m3", "", ""],
        Flow => ["flow_m3h", "flow_max_m3h", "flow_min_m3h"],
        FlowTemperature => [
            "flow_temperature_c",
            "flow_temperature_max_c",
            "flow_temperature_min_c",
        ],
        ReturnTemperature => [
            "return_temperature_c",
            "return_temperature_max_c",
            "return_temperature_min_c",
        ],
        ExternalTemperature => [
            "external_temperature_c",
            "external_temperature_max_c",
            "external_temperature_min_c",
        ],
        Energy => ["energy_kwh", "", ""],
        Power => ["power_w", "power_max_w", "power_min_w"],
        OnTime => ["on_time_h", "", ""],
        OperatingTime => ["operating_time_h", "", ""],
        ErrorFlags => ["error_flags", "", ""],
        Date | DateTime | Battery | Customer => return None,
    };
    names
        .get(usize::from(function))
        .copied()
        .filter(|n| !n.is_empty())
}

/// The sensor-error flag that replaces a -100.00 degC temperature.
fn error_flag(q: Quantity) -> Option<&'static str> {
    match q {
        Quantity::FlowTemperature => Some("flow_temperature_error"),
        Quantity::ReturnTemperature => Some("return_temperature_error"),
        Quantity::ExternalTemperature => Some("external_temperature_error"),
        _ => None,
    }
}

/// `v * 10^exp`, dividing for negative exponents so that 119 litres print as 0.119.
fn scaled(v: f64, exp: i32) -> f64 {
    // The VIF tables need 10^0..10^6; a table lookup instead of a powi libcall per value.
    const POW10: [f64; 10] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];
    let p = POW10
        .get(exp.unsigned_abs() as usize)
        .copied()
        .unwrap_or_else(|| 10f64.powi(exp.unsigned_abs().min(308) as i32));
    if exp < 0 {
        v / p
    } else {
        v * p
    }
}

fn hours(v: f64, unit: i32) -> f64 {
    match unit {
        0 => v / 3600.0,
        1 => v / 60.0,
        2 => v,
        _ => v * 24.0,
    }
}

/// A point in time from a date record, by its EN 13757-3 type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stamp {
    /// Seconds since 1970 of the wall clock; the rank says how precise (G 1, F/I 2).
    Valid(i64, u8),
    /// The invalid bit is set, or the date does not exist.
    Invalid,
    /// Not a date of that type (wrong size or coding).
    NotDate,
}

/// EN 13757-3 years: 0..=80 without a hundred-year count are 2000..=2080 (compatibility
/// rule), 81..=99 are 1981..=1999; with one, 1900 + 100 * hundred_years + year.
fn full_year(hundred_years: u8, year: u8) -> Option<i64> {
    if year > 99 {
        return None;
    }
    let year = i64::from(year);
    Some(match hundred_years {
        0 if year <= 80 => 2000 + year,
        hy => 1900 + 100 * i64::from(hy) + year,
    })
}

fn stamp(q: Quantity, coding: u8, raw: &[u8]) -> Stamp {
    let rank = if q == Quantity::Date { 1 } else { 2 };
    let civil = |hy: u8, day: u8, month_year: u8, h: u8, mi: u8, s: u8| -> Stamp {
        let year = (day >> 5) | ((month_year >> 4) << 3);
        full_year(hy, year)
            .and_then(|y| {
                from_civil(
                    y,
                    u32::from(month_year & 0x0F),
                    u32::from(day & 0x1F),
                    u32::from(h),
                    u32::from(mi),
                    u32::from(s),
                )
            })
            .map_or(Stamp::Invalid, |t| Stamp::Valid(t, rank))
    };
    match (q, coding, raw) {
        // Type G, int16: | YYY DDDDD | YYYY MMMM |
        (Quantity::Date, 0x2, &[d, my]) => civil(0, d, my, 0, 0, 0),
        // Type F, int32: | IV . mmmmmm | SU HY hhhhh | YYY DDDDD | YYYY MMMM |
        (Quantity::DateTime, 0x4, &[mi, h, d, my]) => {
            if mi & 0x80 != 0 {
                return Stamp::Invalid;
            }
            civil((h >> 5) & 0x03, d, my, h & 0x1F, mi & 0x3F, 0)
        }
        // Type I, int48: | .. ssssss | IV . mmmmmm | wday hhhhh | YYY DDDDD | YYYY MMMM | week |
        (Quantity::DateTime, 0x6, &[s, mi, h, d, my, _]) => {
            if mi & 0x80 != 0 {
                return Stamp::Invalid;
            }
            civil(0, d, my, h & 0x1F, mi & 0x3F, s & 0x3F)
        }
        _ => Stamp::NotDate,
    }
}

/// What is known about a reading under construction: the current one (storage 0) or a
/// historic one.
#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    storage: u64,
    /// 0 no time yet, 1 from a type G date, 2 from a type F/I date-time.
    time_rank: u8,
    /// Record fields already present, by [`field_key`]: a bit test instead of comparing
    /// names for every record.
    used: u64,
}

/// A reading under construction with its [`Mark`].
struct Slot<'a> {
    mark: &'a mut Mark,
    reading: &'a mut Reading,
}

impl Slot<'_> {
    /// Adds a record field unless its key is taken already (then `false`).
    fn push(&mut self, key: u8, name: &'static str, value: Value) -> bool {
        let bit = 1u64 << (key & 63);
        if self.mark.used & bit != 0 {
            return false;
        }
        self.mark.used |= bit;
        self.reading.push(name, value);
        true
    }
}

/// A record field's slot in [`Mark::used`]: four per quantity, by function (0, 1, 2; a
/// temperature's sensor-error flag shares 0 with its value), and 3 for `datetime_invalid`.
fn field_key(q: Quantity, function: u8) -> u8 {
    (q as u8) * 4 + (function & 3)
}
const _: () = assert!(
    (Quantity::ErrorFlags as u8) < 16,
    "field keys must fit a u64"
);

/// Turns records into readings as they are parsed, without collecting them first.
#[derive(Debug)]
struct Assembler {
    battery_field: &'static str,
    current: Reading,
    current_mark: Mark,
    /// Historic readings in the order their storage numbers appear (each starts with its
    /// `storage` field); at the end, sorted and followed by the current reading, they are
    /// the output, so no second vector is allocated.
    history: Vec<Reading>,
    /// `history_marks[i]` goes with `history[i]`.
    history_marks: [Mark; MAX_HISTORY],
    unmapped: i64,
    manufacturer_data: Option<Text>,
    more_records_follow: bool,
}

impl Assembler {
    fn new(battery_field: &'static str) -> Self {
        Assembler {
            battery_field,
            // Nine header fields and the usual records (volume, flows, temperature,
            // battery): 20 fields are 960 bytes, within the allocator's per-thread cache
            // (1 KiB); more grow the vector once.
            current: Reading::with_capacity(MEASUREMENT, 20),
            current_mark: Mark::default(),
            history: Vec::new(),
            history_marks: [Mark::default(); MAX_HISTORY],
            unmapped: 0,
            manufacturer_data: None,
            more_records_follow: false,
        }
    }

    fn header(&mut self, h: &Header) {
        let r = &mut self.current;
        r.identity = Some(Identity {
            device_id: Some(meter_id(h.id)),
            sequence: h.tpl.map(|t| u32::from(t.access_number)),
        });
        r.push("manufacturer", Value::Text(manufacturer(h.manufacturer)));
        r.push("version", Value::Int(i64::from(h.version)));
        r.push("device_type", Value::Int(i64::from(h.device_type)));
        r.push(
            "medium",
            Value::Text(Text::from_static(medium(h.device_type))),
        );
        if let Some(tpl) = h.tpl {
            let s = tpl.status;
            r.push("status", Value::Int(i64::from(s)));
            r.push("status_text", Value::Text(status_text(s)));
            r.push("power_low", Value::Bool(s & 0x04 != 0));
            r.push("permanent_error", Value::Bool(s & 0x08 != 0));
            r.push("temporary_error", Value::Bool(s & 0x10 != 0));
        }
    }

    fn manufacturer_data(&mut self, bytes: &[u8], more: bool) {
        if !bytes.is_empty() {
            self.manufacturer_data = Some(hex::encode_text(bytes));
        }
        self.more_records_follow = more;
    }

    /// The slot for a storage number, creating a historic one while there is room.
    fn slot(&mut self, storage: u64) -> Option<Slot<'_>> {
        if storage == 0 {
            return Some(Slot {
                mark: &mut self.current_mark,
                reading: &mut self.current,
            });
        }
        let n = self.history.len();
        let i = match self
            .history_marks
            .iter()
            .take(n)
            .position(|m| m.storage == storage)
        {
            Some(i) => i,
            None if n < MAX_HISTORY => {
                let mut reading = Reading::with_capacity(MEASUREMENT, 8);
                reading.push(
                    "storage",
                    Value::Int(i64::try_from(storage).unwrap_or(i64::MAX)),
                );
                if self.history.capacity() == 0 {
                    // The output: the historic readings and the current one.
                    self.history.reserve_exact(2);
                }
                push(&mut self.history, reading);
                let mark = self.history_marks.get_mut(n)?;
                *mark = Mark {
                    storage,
                    ..Mark::default()
                };
                n
            }
            None => return None,
        };
        Some(Slot {
            mark: self.history_marks.get_mut(i)?,
            reading: self.history.get_mut(i)?,
        })
    }

    fn record(&mut self, rec: &Record<'_>) {
        if !self.map(rec) {
            self.unmapped += 1;
        }
    }

    /// Puts one record into its reading; `false` when it maps to nothing.
    fn map(&mut self, rec: &Record<'_>) -> bool {
        if rec.tariff != 0 || rec.subunit != 0 {
            return false;
        }
        let Some((q, exp)) = quantity(&rec.vib) else {
            return false;
        };
        let battery_field = self.battery_field;
        let storage = rec.storage;
        let Some(mut slot) = self.slot(storage) else {
            return false;
        };
        match q {
            Quantity::Date | Quantity::DateTime => {
                if rec.function != 0 {
                    return false;
                }
                match stamp(q, rec.coding, rec.raw) {
                    Stamp::Valid(t, rank) if rank > slot.mark.time_rank => {
                        slot.reading.time = Some(DeviceTime::Local(t));
                        slot.mark.time_rank = rank;
                        true
                    }
                    Stamp::Invalid if storage == 0 && slot.reading.time.is_none() => {
                        slot.push(field_key(q, 3), "datetime_invalid", Value::Bool(true))
                    }
                    _ => false,
                }
            }
            Quantity::Battery if rec.function == 0 => match rec.data {
                Data::Int(v) => slot.push(field_key(q, 0), battery_field, Value::Int(v)),
                _ => false,
            },
            Quantity::Customer if rec.function == 0 => match customer(&rec.data) {
                Some(text) => slot.push(field_key(q, 0), "customer", Value::Text(text)),
                None => false,
            },
            Quantity::ErrorFlags if rec.function == 0 => match rec.data {
                Data::Int(v) => slot.push(field_key(q, 0), "error_flags", Value::Int(v)),
                _ => false,
            },
            _ => {
                let Some(name) = field_name(q, rec.function) else {
                    return false;
                };
                let v = match rec.data {
                    Data::Int(v) => v as f64,
                    Data::Real(v) if v.is_finite() => v,
                    _ => return false,
                };
                let value = match q {
                    Quantity::OnTime | Quantity::OperatingTime => hours(v, exp),
                    _ => scaled(v, exp),
                };
                match error_flag(q) {
                    // -100.00 degC is the sensor-error value, not a temperature.
                    Some(flag) if value == -100.0 => {
                        // Same key as the value: a reading has the temperature or its flag.
                        rec.function == 0 && slot.push(field_key(q, 0), flag, Value::Bool(true))
                    }
                    _ => slot.push(field_key(q, rec.function), name, Value::Float(value)),
                }
            }
        }
    }

    /// Historic readings in time order, then the current one.
    fn finish(self) -> Vec<Reading> {
        let Assembler {
            mut current,
            history: mut out,
            mut unmapped,
            ..
        } = self;
        // A historic reading's first field is its storage number (unique per reading).
        let storage = |r: &Reading| match r.fields.first() {
            Some((_, Value::Int(s))) => *s,
            _ => 0,
        };
        out.sort_unstable_by_key(|r| (r.time.map(|t| t.to_utc(0, 0)), storage(r)));
        out.retain(|r| {
            // `storage` is the first field; the rest came from records.
            let records = i64::try_from(r.fields.len().saturating_sub(1)).unwrap_or(0);
            if r.time.is_none() {
                // Without its own date a historic value cannot be placed in time.
                unmapped += records;
            }
            r.time.is_some() && records > 0
        });
        if unmapped > 0 {
            current.push("unmapped_records", Value::Int(unmapped));
        }
        if let Some(data) = self.manufacturer_data {
            current.push("manufacturer_data", Value::Text(data));
        }
        if self.more_records_follow {
            current.push("more_records_follow", Value::Bool(true));
        }
        push(&mut out, current);
        out
    }
}

/// The 8 BCD digits of the meter id, most significant first ("72727272"). Non-BCD ids are
/// printed as hex digits rather than refused: some meters number in hex.
fn meter_id(id: [u8; 4]) -> Text {
    hex::encode_text_ordered(&id, true)
}

/// EN 13757-3 manufacturer code: three letters of 5 bits, 1 = 'A'.
fn manufacturer(m: u16) -> Text {
    let letters = [10u16, 5, 0].map(|shift| 64 + ((m >> shift) & 0x1F) as u8);
    // 64 + 0..=31: ASCII.
    Text::from_ascii_iter(letters).unwrap_or_default()
}

/// Device type (medium) names, EN 13757-7 table of device types.
fn medium(device_type: u8) -> &'static str {
    match device_type {
        0x00 => "other",
        0x01 => "oil",
        0x02 => "electricity",
        0x03 => "gas",
        0x04 => "heat",
        0x05 => "steam",
        0x06 => "warm_water",
        0x07 => "water",
        0x08 => "heat_cost_allocator",
        0x09 => "compressed_air",
        0x0A => "cooling_outlet",
        0x0B => "cooling_inlet",
        0x0C => "heat_inlet",
        0x0D => "heat_cooling",
        0x0E => "bus_system",
        0x0F => "unknown",
        0x15 => "hot_water",
        0x16 => "cold_water",
        0x17 => "dual_water",
        0x18 => "pressure",
        0x19 => "ad_converter",
        0x1A => "smoke_detector",
        0x1B => "room_sensor",
        0x1C => "gas_detector",
        0x20 => "breaker",
        0x21 => "valve",
        0x25 => "customer_unit",
        0x28 => "waste_water",
        0x29 => "garbage",
        0x31 => "communication_controller",
        0x32 => "unidirectional_repeater",
        0x33 => "bidirectional_repeater",
        0x36 => "radio_converter_system",
        0x37 => "radio_converter_meter",
        _ => "reserved",
    }
}

/// EN 13757-3 TPL status byte as labels: bits 1-0 application state, 2 power low,
/// 3 permanent error, 4 temporary error, 7-5 manufacturer specific. No allocation for `ok`
/// or a single label (the usual cases).
fn status_text(s: u8) -> Text {
    if s == 0 {
        return Text::from_static("ok");
    }
    let labels = [
        (s & 0x03 == 0x01, "application_busy"),
        (s & 0x03 == 0x02, "application_error"),
        (s & 0x03 == 0x03, "abnormal_condition"),
        (s & 0x04 != 0, "power_low"),
        (s & 0x08 != 0, "permanent_error"),
        (s & 0x10 != 0, "temporary_error"),
        (s & 0xE0 != 0, "manufacturer_specific"),
    ];
    let mut set = labels
        .iter()
        .filter(|(set, _)| *set)
        .map(|&(_, label)| label);
    // s != 0: at least one label is set.
    let first = set.next().unwrap_or_default();
    let Some(second) = set.next() else {
        return Text::from_static(first);
    };
    let mut out = format!("{first},{second}");
    for label in set {
        out.push(',');
        out.push_str(label);
    }
    Text::from(out)
}

/// Customer (0xFD 0x11): ASCII sent least significant character first, or a number.
fn customer(data: &Data<'_>) -> Option<Text> {
    match *data {
        Data::Text(bytes) if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') => {
            Text::from_ascii_iter(bytes.iter().rev().copied())
        }
        Data::Int(v) => Some(Text::from(v.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes, and checks that every field produced is one the codec declares.
    fn checked(codec: WmbusCodec, hex_text: &str) -> Result<Vec<Reading>, DecodeError> {
        let got = codec.decode(&hex::decode(hex_text.as_bytes()).unwrap());
        let declared = codec.field_names();
        for r in got.iter().flatten() {
            for (name, _) in &r.fields {
                assert!(declared.contains(&name.as_str()), "undeclared field {name}");
            }
        }
        got
    }

    fn decode(hex_text: &str) -> Result<Vec<Reading>, DecodeError> {
        checked(WmbusCodec::default(), hex_text)
    }

    fn records(hex_text: &str) -> Result<Vec<Reading>, DecodeError> {
        checked(WmbusCodec::new(Frame::Records, Battery::Percent), hex_text)
    }

    fn local(y: i64, mo: u32, d: u32, h: u32, mi: u32) -> Option<DeviceTime> {
        Some(DeviceTime::Local(from_civil(y, mo, d, h, mi, 0).unwrap()))
    }

    fn fields(list: Vec<(&'static str, Value)>) -> Vec<(crate::Name, Value)> {
        list.into_iter().map(|(n, v)| (n.into(), v)).collect()
    }

    fn identity(id: &str, seq: u32) -> Option<Identity> {
        Some(Identity {
            device_id: Some(Text::new(id)),
            sequence: Some(seq),
        })
    }

    /// wmbusmeters "Mm q400 05829163 NOKEY": unencrypted, -100 degC sensor error.
    const Q400_05829163: &str = concat!(
        "54 44 0907 63918205 10 07", // L=84, SND_NR, AXI, id 05829163, v0x10, water
        "7a bf 10 0000",             // short header: ACC 0xBF, STATUS 0x10, CONFIG 0
        "04 6d 2a0dc62c",            // datetime F: 2022-12-06 13:42
        "04 20 e80f4301",            // on time 21172200 s
        "04 13 00000000",            // volume 0 l
        "04 933b 00000000",          // forward 0 l
        "04 933c 00000000",          // backward 0 l
        "02 3b 0000",                // flow 0 l/h
        "02 59 f0d8",                // flow temperature -10000 x 0.01 degC
        "44 6d 0000c12c",            // storage 1 datetime: 2022-12-01 00:00
        "44 13 00000000",            // storage 1 volume
        "44 933b 00000000",          // storage 1 forward
        "44 933c 00000000",          // storage 1 backward
        "01 fd74 61",                // battery 97
    );

    #[test]
    fn q400_with_sensor_error_and_set_date() {
        let got = decode(Q400_05829163).unwrap();
        let set_date = Reading {
            measurement: MEASUREMENT.into(),
            time: local(2022, 12, 1, 0, 0),
            fields: fields(vec![
                ("storage", Value::Int(1)),
                ("volume_m3", Value::Float(0.0)),
                ("forward_m3", Value::Float(0.0)),
                ("backward_m3", Value::Float(0.0)),
            ]),
            identity: None,
        };
        let current = Reading {
            measurement: MEASUREMENT.into(),
            time: local(2022, 12, 6, 13, 42),
            fields: fields(vec![
                ("manufacturer", Value::Text("AXI".into())),
                ("version", Value::Int(0x10)),
                ("device_type", Value::Int(7)),
                ("medium", Value::Text("water".into())),
                ("status", Value::Int(0x10)),
                ("status_text", Value::Text("temporary_error".into())),
                ("power_low", Value::Bool(false)),
                ("permanent_error", Value::Bool(false)),
                ("temporary_error", Value::Bool(true)),
                ("on_time_h", Value::Float(21_172_200.0 / 3600.0)),
                ("volume_m3", Value::Float(0.0)),
                ("forward_m3", Value::Float(0.0)),
                ("backward_m3", Value::Float(0.0)),
                ("flow_m3h", Value::Float(0.0)),
                ("flow_temperature_error", Value::Bool(true)),
                ("battery_pct", Value::Int(97)),
            ]),
            identity: identity("05829163", 0xBF),
        };
        assert_eq!(got, vec![set_date, current]);
    }

    #[test]
    fn encrypted_telegram_without_check_is_refused() {
        // q400 72727272 header with CONFIG 0x0520 (mode 5) and data that is not 2F 2F.
        let t = "2e4409077272727210077ad71020051234046d040d742c041377000000446d0000612c4413000000002f2f2f2f2f2f";
        assert_eq!(
            decode(t),
            Err(DecodeError::InvalidValue {
                what: "CONFIG field",
                offset: 13,
                reason: "encrypted telegram, no key"
            })
        );
        // The same telegram as published, decrypted (2F 2F check present): decodes.
        let plain = "2e4409077272727210077ad71020052f2f046d040d742c041377000000446d0000612c4413000000002f2f2f2f2f2f";
        let got = decode(plain).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].field("volume_m3"), Some(&Value::Float(0.119)));
        assert_eq!(got[1].time, local(2019, 12, 20, 13, 4));
        assert_eq!(got[0].time, local(2019, 12, 1, 0, 0));
    }

    #[test]
    fn length_must_match_the_l_field() {
        let full = hex::decode(Q400_05829163.as_bytes()).unwrap();
        let codec = WmbusCodec::new(Frame::Telegram, Battery::Percent);
        assert_eq!(
            codec.decode(&full[..40]),
            Err(DecodeError::Truncated {
                what: "telegram (L field)",
                offset: 40,
                needed: 45
            })
        );
        let mut long = full.clone();
        long.extend_from_slice(&[0xAA, 0xBB]);
        assert_eq!(
            codec.decode(&long),
            Err(DecodeError::TrailingBytes {
                offset: 85,
                count: 2
            })
        );
        // L = 84: a format-A frame adds 2 + 2 * ceil(75 / 16) = 12 CRC bytes.
        let mut with_crcs = full.clone();
        with_crcs.extend_from_slice(&[0; 12]);
        assert_eq!(
            codec.decode(&with_crcs),
            Err(DecodeError::InvalidValue {
                what: "telegram length",
                offset: 0,
                reason: "matches a frame with link-layer CRC blocks; strip the CRCs"
            })
        );
        // L consistent, last record cut: the battery's data byte is missing at 84.
        let mut cut = full[..84].to_vec();
        cut[0] = 83;
        assert_eq!(
            codec.decode(&cut),
            Err(DecodeError::Truncated {
                what: "data",
                offset: 84,
                needed: 1
            })
        );
        // Header cut short.
        assert_eq!(
            codec.decode(&[0x05, 0x44, 0x09, 0x07, 0x63, 0x91]),
            Err(DecodeError::Truncated {
                what: "meter id",
                offset: 4,
                needed: 2
            })
        );
        assert_eq!(codec.decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn unknown_ci_is_refused() {
        let t = "0b44090763918205100790aa";
        assert_eq!(
            WmbusCodec::new(Frame::Telegram, Battery::Percent)
                .decode(&hex::decode(t.as_bytes()).unwrap()),
            Err(DecodeError::UnknownType {
                what: "CI field",
                code: 0x90,
                offset: 10
            })
        );
    }

    #[test]
    fn long_header_identifies_the_meter() {
        // Link address of a radio adapter (id 11111111), TPL long header of meter 12345678.
        let t = "1c44090711111111010772785634120907100700000000041340e20100";
        let got = decode(t).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].identity, identity("12345678", 0));
        assert_eq!(got[0].field("version"), Some(&Value::Int(0x10)));
        assert_eq!(got[0].field("status_text"), Some(&Value::Text("ok".into())));
        assert_eq!(got[0].field("volume_m3"), Some(&Value::Float(123.456)));
    }

    #[test]
    fn bare_records_and_codings() {
        let got = records(concat!(
            "01 5a f6",               // int8 flow temperature -10 x 0.1 degC
            "03 13 ffffff",           // int24 volume -1 l
            "06 3b 010000000000",     // int48 flow 1 l/h
            "07 5e ffffffffffffff7f", // int64 return temperature i64::MAX x 0.1 degC
            "0c 94 3b 78563412",      // BCD8 forward volume 12345678 x 10 l
            "0e 65 563412907856",     // BCD12 external temperature 567890123456 x 0.01
            "05 2b 0000c03f",         // real32 power 1.5 W
            "0a 06 34f1",             // BCD4, F nibble: energy -134 kWh
        ))
        .unwrap();
        assert_eq!(
            got,
            vec![Reading {
                measurement: MEASUREMENT.into(),
                time: None,
                fields: fields(vec![
                    ("flow_temperature_c", Value::Float(-1.0)),
                    ("volume_m3", Value::Float(-0.001)),
                    ("flow_m3h", Value::Float(0.001)),
                    ("return_temperature_c", Value::Float(i64::MAX as f64 / 10.0)),
                    ("forward_m3", Value::Float(123_456.78)),
                    ("external_temperature_c", Value::Float(5_678_901_234.56)),
                    ("power_w", Value::Float(1.5)),
                    ("energy_kwh", Value::Float(-134.0)),
                ]),
                identity: None,
            }]
        );
    }

    fn unmapped(r: &Reading) -> Option<&Value> {
        r.field("unmapped_records")
    }

    #[test]
    fn variable_length_records_are_bounded() {
        // Customer "ABC", sent least significant character first.
        let got = records("0d fd11 03 434241").unwrap();
        assert_eq!(
            got[0].fields,
            fields(vec![("customer", Value::Text("ABC".into()))])
        );
        // LVAR says 5 bytes, 3 remain.
        assert_eq!(
            records("0d fd11 05 434241"),
            Err(DecodeError::Truncated {
                what: "variable-length data",
                offset: 4,
                needed: 2
            })
        );
        // LVAR missing altogether.
        assert_eq!(
            records("0d fd11"),
            Err(DecodeError::Truncated {
                what: "LVAR",
                offset: 3,
                needed: 1
            })
        );
        // Reserved LVAR code.
        assert_eq!(
            records("0d 13 f8 00"),
            Err(DecodeError::InvalidValue {
                what: "LVAR",
                offset: 2,
                reason: "reserved variable-length code"
            })
        );
        // Variable-length BCD (0xC2: 2 bytes) and negative BCD (0xD2); binary (0xE3: 3 bytes).
        let got = records("0d 13 c2 3412  0d 93 3b d2 0100  0d 3b e3 feffff").unwrap();
        assert_eq!(
            got[0].fields,
            fields(vec![
                ("volume_m3", Value::Float(1.234)),
                ("forward_m3", Value::Float(-0.001)),
                ("flow_m3h", Value::Float(-0.002)),
            ])
        );
        // A plain-text unit VIF is skipped by its own length and counted.
        let got = records("04 7c 03 414243 01000000  04 13 02000000").unwrap();
        assert_eq!(
            got[0].fields,
            fields(vec![
                ("volume_m3", Value::Float(0.002)),
                ("unmapped_records", Value::Int(1)),
            ])
        );
    }

    #[test]
    fn bcd_nibbles() {
        // 12 digits with the sign nibble: -67890123456 l.
        let got = records("0e 13 5634129078f6").unwrap();
        assert_eq!(
            got[0].field("volume_m3"),
            Some(&Value::Float(-67_890_123.456))
        );
        // The largest 12-digit value.
        let got = records("0e 13 999999999999").unwrap();
        assert_eq!(
            got[0].field("volume_m3"),
            Some(&Value::Float(999_999_999.999))
        );
        // A nibble A-F anywhere else is refused at its byte.
        assert_eq!(
            records("0e 13 563412a07856"),
            Err(DecodeError::InvalidValue {
                what: "BCD value",
                offset: 5,
                reason: "nibble is not a decimal digit"
            })
        );
        assert_eq!(
            records("0e 13 f63412907856"),
            Err(DecodeError::InvalidValue {
                what: "BCD value",
                offset: 2,
                reason: "nibble is not a decimal digit"
            })
        );
        // All-F ("no value" on some meters) is not a number either.
        assert_eq!(
            records("0c 13 ffffffff"),
            Err(DecodeError::InvalidValue {
                what: "BCD value",
                offset: 5,
                reason: "nibble is not a decimal digit"
            })
        );
        assert_eq!(bcd_le(&[0x21, 0x43]), Ok(Some(4321)));
        assert_eq!(le_signed(&[0xFF]), -1);
        assert_eq!(le_signed(&[0x00, 0x80]), -32768);
        assert_eq!(le_signed(&[0xFF, 0xFF, 0x7F]), 8_388_607);
        assert_eq!(le_signed(&[0xFF; 8]), -1);
        assert_eq!(scaled(119.0, -3), 0.119);
        assert_eq!(scaled(2602.0, -2), 26.02);
        assert_eq!(scaled(7.0, 4), 70_000.0);
        assert_eq!(scaled(1.0, -12), 1e-12);
        assert_eq!(bcd_le(&[0x99; 10]), Ok(None));
    }

    #[test]
    fn fill_and_manufacturer_data() {
        let got = records("2f 2f 04 13 01000000 2f 0f 0102ab").unwrap();
        assert_eq!(
            got[0].fields,
            fields(vec![
                ("volume_m3", Value::Float(0.001)),
                ("manufacturer_data", Value::Text("0102ab".into())),
            ])
        );
        let got = records("04 13 01000000 1f").unwrap();
        assert_eq!(
            got[0].fields,
            fields(vec![
                ("volume_m3", Value::Float(0.001)),
                ("more_records_follow", Value::Bool(true)),
            ])
        );
        // Only fill: a reading with no fields.
        let got = records("2f2f2f").unwrap();
        assert_eq!(got[0].fields, vec![]);
    }

    #[test]
    fn unknown_records_are_counted_not_fatal() {
        let got = records(concat!(
            "04 13 01000000",       // volume: mapped
            "04 13 02000000",       // the same field again
            "84 10 13 03000000",    // tariff 1
            "84 40 13 04000000",    // subunit 1
            "04 78 05000000",       // fabrication number: not mapped
            "04 93 3a 06000000",    // VIFE 0x3A (uncorrected unit): changes the meaning
            "04 93 bb 3a 00000000", // forward plus a further VIFE
            "04 fb 1a 07000000",    // 0xFB table
            "00 13",                // no data
            "34 3b 08000000",       // value during error state
            "14 13 09000000",       // maximum volume: no name for it
            "84 01 13 0a000000",    // storage 2 without a date
        ))
        .unwrap();
        assert_eq!(
            got,
            vec![Reading {
                measurement: MEASUREMENT.into(),
                time: None,
                fields: fields(vec![
                    ("volume_m3", Value::Float(0.001)),
                    ("unmapped_records", Value::Int(11)),
                ]),
                identity: None,
            }]
        );
    }

    #[test]
    fn record_structure_limits() {
        // 10 DIFEs are allowed, an 11th is not.
        let ten = format!("84 {} 00 13 01000000", "80 ".repeat(9));
        assert_eq!(
            records(&ten).unwrap()[0].fields,
            fields(vec![("volume_m3", Value::Float(0.001))])
        );
        let eleven = format!("84 {} 13 01000000", "80 ".repeat(11));
        assert_eq!(
            records(&eleven),
            Err(DecodeError::InvalidValue {
                what: "DIFE",
                offset: 11,
                reason: "more than 10 DIF extensions"
            })
        );
        let eleven = format!("04 93 {} 00 01000000", "ff ".repeat(10));
        assert_eq!(
            records(&eleven),
            Err(DecodeError::InvalidValue {
                what: "VIFE",
                offset: 12,
                reason: "more than 10 VIF extensions"
            })
        );
        for dif in ["3f", "7f", "8f"] {
            let code = u32::from_str_radix(dif, 16).unwrap();
            assert_eq!(
                records(&format!("04 13 01000000 {dif} 13 00")),
                Err(DecodeError::UnknownType {
                    what: "DIF",
                    code,
                    offset: 6
                })
            );
        }
        assert_eq!(
            records("04 13 010000"),
            Err(DecodeError::Truncated {
                what: "data",
                offset: 2,
                needed: 1
            })
        );
        assert_eq!(
            records("84"),
            Err(DecodeError::Truncated {
                what: "DIFE",
                offset: 1,
                needed: 1
            })
        );
        assert_eq!(
            records("04 93"),
            Err(DecodeError::Truncated {
                what: "VIFE",
                offset: 2,
                needed: 1
            })
        );
        assert_eq!(
            records("04"),
            Err(DecodeError::Truncated {
                what: "VIF",
                offset: 1,
                needed: 1
            })
        );
    }

    #[test]
    fn storage_numbers_and_dates() {
        let got = records(concat!(
            "04 13 01000000",    // current volume, no date
            "42 6c 612c",        // storage 1 date, type G: 2019-12-01
            "44 13 05000000",    // storage 1 volume
            "c4 01 13 06000000", // storage 3 (bit 0 + DIFE bits << 1) volume
            "c2 01 6c 612b",     // storage 3 date, after its value: 2019-11-01
        ))
        .unwrap();
        let history = |time, storage, litres: f64| Reading {
            measurement: MEASUREMENT.into(),
            time,
            fields: fields(vec![
                ("storage", Value::Int(storage)),
                ("volume_m3", Value::Float(litres / 1000.0)),
            ]),
            identity: None,
        };
        assert_eq!(
            got,
            vec![
                history(local(2019, 11, 1, 0, 0), 3, 6.0),
                history(local(2019, 12, 1, 0, 0), 1, 5.0),
                Reading {
                    measurement: MEASUREMENT.into(),
                    time: None,
                    fields: fields(vec![("volume_m3", Value::Float(0.001))]),
                    identity: None,
                },
            ]
        );
        // A type F date-time wins over a type G date for the same storage, in either order.
        let got = records("02 6c 612c 04 6d 040d742c").unwrap();
        assert_eq!(got[0].time, local(2019, 12, 20, 13, 4));
        let got = records("04 6d 040d742c 02 6c 612c").unwrap();
        assert_eq!(got[0].time, local(2019, 12, 20, 13, 4));
        assert_eq!(unmapped(&got[0]), Some(&Value::Int(1)));
        // Type I: seconds too.
        let got = records("06 6d 1e 2a 0d c6 2c 00").unwrap();
        assert_eq!(
            got[0].time,
            Some(DeviceTime::Local(
                from_civil(2022, 12, 6, 13, 42, 30).unwrap()
            ))
        );
        // The invalid bit, and 31 February.
        for bad in ["04 6d 840d742c", "04 6d 040d5f22"] {
            let got = records(bad).unwrap();
            assert_eq!(got[0].time, None, "{bad}");
            assert_eq!(
                got[0].fields,
                fields(vec![("datetime_invalid", Value::Bool(true))]),
                "{bad}"
            );
        }
        // A date coded as BCD is not a type G date.
        let got = records("0a 6c 0112").unwrap();
        assert_eq!(got[0].time, None);
        assert_eq!(unmapped(&got[0]), Some(&Value::Int(1)));
        assert_eq!(full_year(0, 80), Some(2080));
        assert_eq!(full_year(0, 81), Some(1981));
        assert_eq!(full_year(1, 24), Some(2024));
        assert_eq!(full_year(0, 100), None);
    }

    #[test]
    fn times_functions_and_battery_days() {
        let got = checked(
            WmbusCodec::new(Frame::Records, Battery::Days),
            concat!(
                "04 22 0a000000",   // on time 10 h
                "04 27 02000000",   // operating time 2 d
                "14 3b 10000000",   // maximum flow 16 l/h
                "24 5b 9cffffff",   // minimum flow temperature -100 degC: dropped
                "02 5d f0d8",       // return temperature -100.00: sensor error
                "02 66 0a00",       // external temperature 10 x 0.1 degC
                "04 03 e8030000",   // energy 1000 Wh
                "04 fd17 04000000", // error flags
                "01 fd74 61",       // battery 97 days
            ),
        )
        .unwrap();
        assert_eq!(
            got[0].fields,
            fields(vec![
                ("on_time_h", Value::Float(10.0)),
                ("operating_time_h", Value::Float(48.0)),
                ("flow_max_m3h", Value::Float(0.016)),
                ("return_temperature_error", Value::Bool(true)),
                ("external_temperature_c", Value::Float(1.0)),
                ("energy_kwh", Value::Float(1.0)),
                ("error_flags", Value::Int(4)),
                ("battery_remaining_days", Value::Int(97)),
                ("unmapped_records", Value::Int(1)),
            ])
        );
    }

    #[test]
    fn declared_fields_match_the_tables() {
        use Quantity::*;
        let codec = WmbusCodec::default();
        let declared = codec.field_names();
        let quantities = [
            Volume,
            Forward,
            Backward,
            Flow,
            FlowTemperature,
            ReturnTemperature,
            ExternalTemperature,
            Energy,
            Power,
            OnTime,
            OperatingTime,
            Date,
            DateTime,
            Battery,
            Customer,
            ErrorFlags,
        ];
        for q in quantities {
            for f in 0..4 {
                if let Some(name) = field_name(q, f) {
                    assert!(declared.contains(&name), "{name}");
                }
            }
            if let Some(flag) = error_flag(q) {
                assert!(declared.contains(&flag), "{flag}");
            }
        }
        for (i, a) in declared.iter().enumerate() {
            assert!(!declared[i + 1..].contains(a), "{a} declared twice");
        }
        assert!(declared.contains(&"battery_pct"));
        let days_codec = WmbusCodec::new(Frame::Auto, super::Battery::Days);
        let days = days_codec.field_names();
        assert!(days.contains(&"battery_remaining_days") && !days.contains(&"battery_pct"));
    }

    #[test]
    fn header_texts() {
        assert_eq!(manufacturer(0x0709), "AXI");
        assert_eq!(manufacturer(0x2C2D), "KAM");
        assert_eq!(status_text(0x00), "ok");
        assert_eq!(
            status_text(0x15),
            "application_busy,power_low,temporary_error"
        );
        assert_eq!(status_text(0x0B), "abnormal_condition,permanent_error");
        assert_eq!(status_text(0x22), "application_error,manufacturer_specific");
        assert_eq!(medium(0x06), "warm_water");
        assert_eq!(medium(0xFE), "reserved");
        assert_eq!(meter_id([0x63, 0x91, 0x82, 0x05]), "05829163");
    }

    #[test]
    fn header_only_telegrams() {
        // CI 0x78: no TPL header, so no status and no sequence.
        let got = decode("0b 44 0907 63918205 10 07 78 2f").unwrap();
        assert_eq!(
            got,
            vec![Reading {
                measurement: MEASUREMENT.into(),
                time: None,
                fields: fields(vec![
                    ("manufacturer", Value::Text("AXI".into())),
                    ("version", Value::Int(0x10)),
                    ("device_type", Value::Int(7)),
                    ("medium", Value::Text("water".into())),
                ]),
                identity: Some(Identity {
                    device_id: Some("05829163".into()),
                    sequence: None,
                }),
            }]
        );
        // Short header cut inside CONFIG.
        assert_eq!(
            decode("0d 44 0907 63918205 10 07 7a bf 10 00"),
            Err(DecodeError::Truncated {
                what: "CONFIG field",
                offset: 13,
                needed: 1
            })
        );
    }

    #[test]
    fn auto_frame_detection() {
        // The data part of the published q400 72727272 telegram: records.
        let got =
            decode("2f2f046d040d742c041377000000446d0000612c4413000000002f2f2f2f2f2f").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].identity, None);
        assert_eq!(got[1].field("volume_m3"), Some(&Value::Float(0.119)));
        // A truncated telegram is still recognised by its C and CI fields.
        let full = hex::decode(Q400_05829163.as_bytes()).unwrap();
        assert!(matches!(
            WmbusCodec::default().decode(&full[..30]),
            Err(DecodeError::Truncated {
                what: "telegram (L field)",
                ..
            })
        ));
    }

    #[test]
    fn options() {
        let opts = |s: &str| -> CodecOptions { toml::from_str(s).unwrap() };
        let c = WmbusCodec::from_options(&opts("frame = \"records\"\nbattery = \"days\"")).unwrap();
        assert_eq!((c.frame, c.battery), (Frame::Records, Battery::Days));
        let c = WmbusCodec::from_options(&CodecOptions::new()).unwrap();
        assert_eq!((c.frame, c.battery), (Frame::Auto, Battery::Percent));
        for bad in ["frame = \"t1\"", "battery = 1", "key = \"x\""] {
            assert!(
                matches!(
                    WmbusCodec::from_options(&opts(bad)),
                    Err(CodecConfigError::BadOption { .. })
                ),
                "{bad}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            for frame in [Frame::Auto, Frame::Telegram, Frame::Records] {
                let _ = WmbusCodec::new(frame, Battery::Percent).decode(&bytes);
            }
        }

        #[test]
        fn never_panics_on_mutated_q400(at in 0usize..85, byte in proptest::prelude::any::<u8>()) {
            let mut t = hex::decode(Q400_05829163.as_bytes()).unwrap();
            t[at] = byte;
            for frame in [Frame::Auto, Frame::Telegram, Frame::Records] {
                let _ = WmbusCodec::new(frame, Battery::Percent).decode(&t);
            }
        }
    }
}
