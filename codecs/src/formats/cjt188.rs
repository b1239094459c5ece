//! Water meter frame, CJ/T 188-2004 (read data DI 0x901F, valve control DI 0xA017, read
//! address DI 0x810A), as sent over M-Bus/RS-485 and tunnelled unchanged by NB-IoT meters.
//!
//! ```text
//! [FE × 0..=16] | 68 | T | A0..A6 (BCD, LSB first) | C | L | DATA[L] | CS | 16
//!                                                            |
//!      DATA = DI0 DI1 | SER | payload …   (DI in either byte order, see below)
//!
//! C:  bit 7 direction (1 = meter → master) | bit 6 abnormal | bit 5 (kept in `ctrl`) |
//!     bits 4..0 function (0x01 read data, 0x03 read address, 0x04 write data, ...)
//! CS: sum of the bytes from 0x68 through the end of DATA, mod 256
//!
//! read data, response, DI 0x901F (water/gas layout, L = 0x16):
//!   DI(2) SER | current flow: 4 B BCD LE, 2 decimals | unit | settlement-day flow: idem | unit
//!           | real time: ss mm hh DD MM YY(lo) YY(hi), BCD | ST0 ST1
//! valve control, request, DI 0xA017:  DI(2) SER | command (0x55 open, 0x99 close)
//! valve control, response, DI 0xA017: DI(2) SER | ST0 ST1
//! read address, DI 0x810A (request and response): DI(2) SER; the answer is the header address
//! ```
//!
//! References: CJ/T 188-2004 《户用计量仪表数据传输技术条件》 (frame, control code, unit codes of
//! Table 13, ST bits); the worked examples of the blog series "CJ/T-188 水表协议解析" 1 and 2
//! (cnblogs.com/yangykaifa/p/7010777.html, biecuoliao.com/pa/3ON9QK0.html); FoxEdge
//! `CJT188ProtocolGetData` for the corrected read-data reply. The vectors and their sources are
//! in `codecs/tests/data/devices.json`.
//!
//! # What the sources disagree on, and what this codec does
//!
//! - **Checksum.** The widely copied read-data reply ends `… 21 84 08 16`, but its bytes sum to
//!   0x13: it is rejected with [`DecodeError::Checksum`] `{ stated: 0x08, computed: 0x13 }`.
//! - **DI byte order.** The standard sends a DI low byte first (`1F 90`), some vendors high byte
//!   first (`A0 17`), sometimes both within one product. Both orders are accepted for the known
//!   DIs and `di` is reported normalised (0x901F, 0xA017, 0x810A). An unknown DI is reported as
//!   read low byte first (the standard's order) and never fails the decode.
//! - **Status (ST).** Two bytes, ST0 first. ST0 carries the standard bits (D0–D1 valve: 00 open,
//!   01 closed, 11 abnormal; D2 battery undervoltage), ST1 and the rest of ST0 are
//!   vendor-defined. Like every multi-byte value in CJ/T 188 the word is low byte first, so
//!   `status` = ST0 | ST1 << 8 (`21 84` is 0x8421) and bit N of the options below is DN of that
//!   word. The raw word is always kept; which bits mean what is configurable per vendor.
//! - **Valve state 10** is undefined in the standard; by default it reads as `valve_fault`.
//!
//! # Fields (in this order; measurement `water_meter`)
//!
//! Every frame: `meter_type` (Int, T), `address` (Text, 14 digits A6..A0; a non-decimal nibble
//! is printed as upper-case hex) — or `broadcast = true` (Bool) instead of `address` when the
//! address is the broadcast AA…AA —, `ctrl` (Int, C), `response` (Bool, C bit 7), `abnormal`
//! (Bool, C bit 6), `function` (Int, C bits 4..0). Then, unless `abnormal` is set: `di` (Int)
//! when DATA has at least two bytes, `ser` (Int) when it has at least three, and per DI and
//! direction (the function code is reported, not enforced):
//!
//! - 0x901F response from a meter type other than heat (T 0x20–0x29): `volume_m3` (Float, m³;
//!   from unit code 0x2C m³ or 0x29 L) or, for any other unit code (0x35 m³/h, 0x32 L/h, the
//!   ×10/×100 codes, energy units, …) `volume_raw` (Float: the value with its two implied
//!   decimals, in the unit the code names — never converted); always `volume_unit_code` (Int);
//!   then `settlement_volume_m3` / `settlement_volume_raw` and `settlement_volume_unit_code`
//!   likewise; `clock_invalid = true` (Bool) only when the real time is not a valid BCD date
//!   (the reading then has no time); `status` (Int); the status-bit fields (below).
//!   The real time becomes [`Reading::time`] as [`DeviceTime::Local`].
//! - 0xA017 request: `valve_command_code` (Int), and `valve_command` (Text `open` / `close`) for
//!   0x55 / 0x99. 0xA017 response: `status` (Int) and the status-bit fields.
//! - 0x810A and 0x901F requests, 0x810A responses: nothing more.
//!
//! Any DATA bytes left after these (an unknown DI's payload, a heat meter's 0x901F reply, bytes
//! a vendor appends, or the whole DATA of an abnormal reply, whose layout varies by vendor) are
//! kept as `data_hex` (Text, lower-case hex) rather than guessed at.
//!
//! Identity: `device_id` = the address when all 14 digits are decimal, `sequence` = SER.
//!
//! # Options (`[codec_options]` of a profile)
//!
//! `status_bits`: a table `field name = meaning` merged over the defaults
//! `valve_open = { mask = 3, value = 0 }`, `valve_fault = { mask = 2, value = 2 }`,
//! `battery_low = 2`. A meaning is a bit number 0..=15 (true when that bit is set),
//! `{ bit = N, invert = true }` (true when it is clear), `{ mask = M, value = V }` (true when
//! `status & M == V`), or `false` to drop a default field. Fields a profile adds follow the
//! defaults in name order. Unknown option keys, bad names (not snake_case, or a field this
//! codec already emits) and bad meanings are refused with `CodecConfigError::BadOption`
//! naming the key (`status_bits.<name>`) and the reason. Example for a vendor whose ST0 D0 is
//! "valve closed" and D5 "magnetic attack", with no battery bit:
//!
//! ```toml
//! [codec_options.status_bits]
//! valve_open = { bit = 0, invert = true }
//! valve_fault = false
//! battery_low = false
//! magnet_attack = 5
//! ```
//!
//! # Errors
//!
//! Empty input → `Empty`; more than 16 wake-up bytes or a start byte other than 0x68 →
//! `BadConstant`; L larger than what follows, or a frame cut before CS/0x16 → `Truncated`;
//! a byte other than 0x16 after CS → `BadConstant`; bytes after 0x16 → `TrailingBytes`; a bad
//! sum → `Checksum`; a flow that is not BCD → `InvalidValue`; a known DI whose DATA is too
//! short for its layout → `Truncated`.

use nom::bytes::complete::take_while_m_n;
use nom::number::complete::{le_u16, u8 as nom_u8};

use crate::parse::{bcd_to_u64, fail, finish, take_n, with_offset, PError, PErrorKind, PResult};
use crate::registry::{CodecConfigError, CodecOptions};
use crate::time::from_civil;
use crate::{Codec, DecodeError, DeviceTime, Identity, Name, Reading, Text, Value};

pub const ID: &str = "cjt188";

const MEASUREMENT: &str = "water_meter";

/// Wake-up bytes accepted before the start byte. Meters send 2 or 4; converters sometimes
/// more. Past this many the input is not a CJ/T 188 frame.
const MAX_PREAMBLE: usize = 16;

const START: u8 = 0x68;
const END: u8 = 0x16;
const PREAMBLE: u8 = 0xFE;

const DI_READ_DATA: u16 = 0x901F;
const DI_VALVE_CONTROL: u16 = 0xA017;
const DI_READ_ADDRESS: u16 = 0x810A;

const VALVE_OPEN: u8 = 0x55;
const VALVE_CLOSE: u8 = 0x99;

/// Unit codes (CJ/T 188-2004 Table 13) that convert to cubic metres.
const UNIT_M3: u8 = 0x2C;
const UNIT_L: u8 = 0x29;

const OPTION_KEYS: &[&str] = &["status_bits"];

/// Field names this codec emits itself; a status bit may not reuse one.
const RESERVED_FIELDS: &[&str] = &[
    "meter_type",
    "address",
    "broadcast",
    "ctrl",
    "response",
    "abnormal",
    "function",
    "di",
    "ser",
    "volume_m3",
    "volume_raw",
    "volume_unit_code",
    "settlement_volume_m3",
    "settlement_volume_raw",
    "settlement_volume_unit_code",
    "clock_invalid",
    "status",
    "valve_command",
    "valve_command_code",
    "data_hex",
];

/// One Bool field derived from the status word: true when `status & mask == value`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StatusBit {
    name: Name,
    mask: u16,
    value: u16,
}

fn default_status_bits() -> Vec<StatusBit> {
    vec![
        // ST0 D1 D0 = 00: valve open.
        StatusBit {
            name: Name::Static("valve_open"),
            mask: 0b11,
            value: 0b00,
        },
        // D1 D0 = 11 is "abnormal"; 10 is undefined, so it is not a trustworthy state either.
        StatusBit {
            name: Name::Static("valve_fault"),
            mask: 0b10,
            value: 0b10,
        },
        // ST0 D2 = 1: battery undervoltage.
        StatusBit {
            name: Name::Static("battery_low"),
            mask: 0b100,
            value: 0b100,
        },
    ]
}

/// The CJ/T 188-2004 codec. Cheap to clone; holds only the status-bit meanings.
#[derive(Debug, Clone)]
pub struct Cjt188Codec {
    status_bits: Vec<StatusBit>,
}

impl Default for Cjt188Codec {
    fn default() -> Self {
        Cjt188Codec {
            status_bits: default_status_bits(),
        }
    }
}

impl Cjt188Codec {
    /// Builds the codec from a profile's `[codec_options]` (see the module docs).
    pub fn from_options(options: &CodecOptions) -> Result<Self, CodecConfigError> {
        super::deny_unknown_options(ID, options, OPTION_KEYS)?;
        let mut status_bits = default_status_bits();
        if let Some(value) = options.get("status_bits") {
            let table = value.as_table().ok_or_else(|| {
                bad_option(
                    "status_bits",
                    "expected a table of `field_name = bit`".to_owned(),
                )
            })?;
            for (name, spec) in table {
                let key = format!("status_bits.{name}");
                check_field_name(name).map_err(|reason| bad_option(&key, reason.to_owned()))?;
                let meaning = parse_bit_spec(spec).map_err(|reason| bad_option(&key, reason))?;
                let existing = status_bits.iter().position(|b| b.name.as_str() == name);
                match (meaning, existing) {
                    (Some((mask, value)), Some(at)) => {
                        if let Some(bit) = status_bits.get_mut(at) {
                            bit.mask = mask;
                            bit.value = value;
                        }
                    }
                    (Some((mask, value)), None) => status_bits.push(StatusBit {
                        name: Name::from(name.clone()),
                        mask,
                        value,
                    }),
                    (None, Some(at)) => {
                        status_bits.remove(at);
                    }
                    (None, None) => {
                        return Err(bad_option(
                            &key,
                            "`false` removes a default status field, and there is none by \
                             this name (defaults: valve_open, valve_fault, battery_low)"
                                .to_owned(),
                        ))
                    }
                }
            }
        }
        Ok(Cjt188Codec { status_bits })
    }
}

fn bad_option(key: &str, reason: String) -> CodecConfigError {
    CodecConfigError::BadOption {
        codec: ID,
        key: key.to_owned(),
        reason,
    }
}

fn check_field_name(name: &str) -> Result<(), &'static str> {
    let mut chars = name.chars();
    let starts_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !starts_ok
        || name.len() > 64
        || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err("a field name must be snake_case: a-z first, then a-z, 0-9 or _ (at most 64)");
    }
    if RESERVED_FIELDS.contains(&name) {
        return Err("this name is a field the codec already emits");
    }
    Ok(())
}

/// A status-bit meaning as `(mask, value)`, or `None` for `false` (drop the field).
fn parse_bit_spec(spec: &toml::Value) -> Result<Option<(u16, u16)>, String> {
    fn bit_number(v: &toml::Value, what: &str) -> Result<u16, String> {
        match v.as_integer() {
            Some(n @ 0..=15) => Ok(1 << n),
            Some(n) => Err(format!(
                "{what} {n} is out of range: the status word has bits 0..=15"
            )),
            None => Err(format!(
                "{what} must be an integer 0..=15, found {}",
                v.type_str()
            )),
        }
    }
    fn word(v: &toml::Value, what: &str) -> Result<u16, String> {
        v.as_integer()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| format!("`{what}` must be an integer 0..=65535 (0xFFFF), found {v}"))
    }
    match spec {
        toml::Value::Boolean(false) => Ok(None),
        toml::Value::Integer(_) => bit_number(spec, "bit").map(|m| Some((m, m))),
        toml::Value::Table(t) => {
            if let Some(k) = t
                .keys()
                .find(|k| !["bit", "invert", "mask", "value"].contains(&k.as_str()))
            {
                return Err(format!(
                    "unknown key `{k}` (known: bit, invert, mask, value)"
                ));
            }
            match (t.get("bit"), t.get("mask")) {
                (Some(bit), None) => {
                    if t.contains_key("value") {
                        return Err("`value` goes with `mask`, not with `bit`".to_owned());
                    }
                    let mask = bit_number(bit, "`bit`")?;
                    let invert = match t.get("invert") {
                        None => false,
                        Some(v) => v.as_bool().ok_or("`invert` must be true or false")?,
                    };
                    Ok(Some((mask, if invert { 0 } else { mask })))
                }
                (None, Some(mask)) => {
                    if t.contains_key("invert") {
                        return Err("`invert` goes with `bit`; with `mask` set `value`".to_owned());
                    }
                    let mask = word(mask, "mask")?;
                    let value = t.get("value").map_or(Ok(mask), |v| word(v, "value"))?;
                    if mask == 0 || value & !mask != 0 {
                        return Err(format!(
                            "`value` {value:#06x} must lie within a non-zero `mask` {mask:#06x}"
                        ));
                    }
                    Ok(Some((mask, value)))
                }
                _ => Err(
                    "give either `bit` (with optional `invert`) or `mask` (with optional \
                          `value`)"
                        .to_owned(),
                ),
            }
        }
        other => Err(format!(
            "expected a bit number 0..=15, a table {{ bit, invert }} or {{ mask, value }}, or \
             false; found {}",
            other.type_str()
        )),
    }
}

/// One frame, borrowing the payload. `data_at` is the absolute offset of DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame<'a> {
    meter_type: u8,
    /// A0..A6, as on the wire (low byte first).
    address: &'a [u8],
    ctrl: u8,
    len: u8,
    data: &'a [u8],
    data_at: usize,
    cs: u8,
}

impl Frame<'_> {
    fn computed_cs(&self) -> u8 {
        [START, self.meter_type, self.ctrl, self.len]
            .iter()
            .chain(self.address)
            .chain(self.data)
            .fold(0u8, |sum, b| sum.wrapping_add(*b))
    }
}

/// One byte; running out of input names `what`.
fn byte<'a>(i: &'a [u8], what: &'static str) -> PResult<'a, u8> {
    nom_u8::<_, PError<'a>>(i).map_err(|e| {
        e.map(|pe| PError {
            kind: PErrorKind::Nom { what, needed: 1 },
            ..pe
        })
    })
}

/// One byte that must equal `expected`.
fn constant<'a>(i: &'a [u8], expected: u8, what: &'static str) -> PResult<'a, u8> {
    let (rest, found) = byte(i, what)?;
    if found != expected {
        return fail(
            i,
            DecodeError::BadConstant {
                what,
                offset: 0,
                expected: expected.into(),
                found: found.into(),
            },
        );
    }
    Ok((rest, found))
}

/// `[FE…] 68 T A0..A6 C L DATA CS 16`; returns what follows the end byte.
fn parse_frame(payload: &[u8]) -> PResult<'_, Frame<'_>> {
    let (i, _) = take_while_m_n(0, MAX_PREAMBLE, |b| b == PREAMBLE)(payload)?;
    let (i, _) = constant(i, START, "start byte")?;
    let (i, meter_type) = byte(i, "meter type")?;
    let (i, address) = take_n(i, 7, "address")?;
    let (i, ctrl) = byte(i, "control code")?;
    let (i, len) = byte(i, "data length")?;
    let data_at = payload.len() - i.len();
    // L is bounded by what is left before it is taken: a short frame is `Truncated`.
    let (i, data) = take_n(i, usize::from(len), "data")?;
    let (i, cs) = byte(i, "checksum")?;
    let (i, _) = constant(i, END, "end byte")?;
    Ok((
        i,
        Frame {
            meter_type,
            address,
            ctrl,
            len,
            data,
            data_at,
            cs,
        },
    ))
}

/// A flow value: 4 BCD bytes low first, two implied decimals, then a unit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    hundredths: u64,
    unit: u8,
}

fn parse_flow<'a>(i: &'a [u8], what: &'static str, unit_what: &'static str) -> PResult<'a, Flow> {
    let (rest, digits) = take_n(i, 4, what)?;
    let Some(hundredths) = bcd_to_u64(digits.iter().rev().copied()) else {
        return fail(
            i,
            DecodeError::InvalidValue {
                what,
                offset: 0,
                reason: "not a BCD number",
            },
        );
    };
    let (rest, unit) = byte(rest, unit_what)?;
    Ok((rest, Flow { hundredths, unit }))
}

/// `ss mm hh DD MM YY(lo) YY(hi)`, BCD. `None` when a digit or the date is invalid (an unset
/// clock sends zeros or 0xFF): the frame is still good, only its clock is not.
fn parse_real_time(i: &[u8]) -> PResult<'_, Option<i64>> {
    let (rest, t) = take_n(i, 7, "real time")?;
    Ok((rest, real_time(t)))
}

fn real_time(t: &[u8]) -> Option<i64> {
    // Each byte is two BCD digits, 0..=99.
    let d = |n: usize| t.get(n).and_then(|b| bcd_to_u64([*b])).map(|v| v as u32);
    let year = d(6)? * 100 + d(5)?;
    from_civil(year.into(), d(4)?, d(3)?, d(2)?, d(1)?, d(0)?)
}

/// ST0 ST1, low byte first.
fn parse_status(i: &[u8]) -> PResult<'_, u16> {
    le_u16::<_, PError<'_>>(i).map_err(|e| {
        e.map(|pe| PError {
            kind: PErrorKind::Nom {
                what: "status",
                needed: 2usize.saturating_sub(i.len()),
            },
            ..pe
        })
    })
}

/// The DI0 DI1 pair normalised. A known DI sent high byte first (`A0 17`) is recognised as
/// such; anything else is read low byte first, the standard's order, which is also how the
/// known DIs arrive from meters that follow it (`1F 90`).
fn normalise_di(d0: u8, d1: u8) -> u16 {
    let high_first = u16::from_be_bytes([d0, d1]);
    if [DI_READ_DATA, DI_VALVE_CONTROL, DI_READ_ADDRESS].contains(&high_first) {
        high_first
    } else {
        u16::from_le_bytes([d0, d1])
    }
}

fn is_heat_meter(meter_type: u8) -> bool {
    (0x20..=0x29).contains(&meter_type)
}

/// Upper-case hex of A6..A0 (14 decimal digits for a BCD address), and whether every
/// nibble was decimal. Fourteen characters: inline in the [`Text`], no allocation.
fn address_text(address: &[u8]) -> (Text, bool) {
    let decimal = address.iter().all(|b| b >> 4 <= 9 && b & 0x0F <= 9);
    (
        crate::hex::text_with(address, true, b"0123456789ABCDEF"),
        decimal,
    )
}

/// The fields are appended in batches (`extend` with an array) rather than one `push` each:
/// a `Value` built on the stack and copied right away into the vector stalls store
/// forwarding, and that, not parsing, dominated the decode time.
type Field = (Name, Value);

fn field(name: &'static str, value: Value) -> Field {
    (Name::Static(name), value)
}

impl Cjt188Codec {
    fn push_status(&self, r: &mut Reading, status: u16) {
        r.fields.push(field("status", Value::Int(status.into())));
        r.fields.extend(self.status_bits.iter().map(|bit| {
            (
                bit.name.clone(),
                Value::Bool(status & bit.mask == bit.value),
            )
        }));
    }

    /// Decodes what follows DI and SER. `rest` is a sub-slice of DATA; errors are relative
    /// to it and made absolute by the caller.
    fn decode_payload<'a>(
        &self,
        r: &mut Reading,
        frame: &Frame<'_>,
        di: u16,
        rest: &'a [u8],
    ) -> PResult<'a, ()> {
        let response = frame.ctrl & 0x80 != 0;
        let rest = match (di, response) {
            (DI_READ_DATA, true) if !is_heat_meter(frame.meter_type) => {
                let (i, current) =
                    parse_flow(rest, "current cumulative flow", "current flow unit")?;
                let (i, settlement) =
                    parse_flow(i, "settlement cumulative flow", "settlement flow unit")?;
                let (i, time) = parse_real_time(i)?;
                let (i, status) = parse_status(i)?;
                let [a, b] = flow_fields(current, "volume_m3", "volume_raw", "volume_unit_code");
                let [c, d] = flow_fields(
                    settlement,
                    "settlement_volume_m3",
                    "settlement_volume_raw",
                    "settlement_volume_unit_code",
                );
                r.fields.extend([a, b, c, d]);
                match time {
                    Some(t) => r.time = Some(DeviceTime::Local(t)),
                    None => r.fields.push(field("clock_invalid", Value::Bool(true))),
                }
                self.push_status(r, status);
                i
            }
            (DI_VALVE_CONTROL, false) => {
                let (i, command) = byte(rest, "valve command")?;
                r.fields
                    .push(field("valve_command_code", Value::Int(command.into())));
                let label = match command {
                    VALVE_OPEN => Some("open"),
                    VALVE_CLOSE => Some("close"),
                    _ => None,
                };
                if let Some(label) = label {
                    r.fields.push(field(
                        "valve_command",
                        Value::Text(Text::from_static(label)),
                    ));
                }
                i
            }
            (DI_VALVE_CONTROL, true) => {
                let (i, status) = parse_status(rest)?;
                self.push_status(r, status);
                i
            }
            // Requests for data/address carry nothing after SER; the read-address reply's
            // answer is the header address. Unknown DIs and heat-meter replies: raw below.
            _ => rest,
        };
        push_data_hex(r, rest);
        Ok((&[], ()))
    }
}

/// A flow as `volume_m3` (m³ or L converted) or `volume_raw` (any other unit), then its code.
fn flow_fields(flow: Flow, m3: &'static str, raw: &'static str, unit: &'static str) -> [Field; 2] {
    // Divide (not multiply by 0.01) so 55667700 prints as 556677 and 12345 L as 0.12345 m³.
    let h = flow.hundredths as f64;
    let value = match flow.unit {
        UNIT_M3 => field(m3, Value::Float(h / 100.0)),
        UNIT_L => field(m3, Value::Float(h / 100_000.0)),
        _ => field(raw, Value::Float(h / 100.0)),
    };
    [value, field(unit, Value::Int(flow.unit.into()))]
}

fn push_data_hex(r: &mut Reading, rest: &[u8]) {
    if !rest.is_empty() {
        r.fields.push(field(
            "data_hex",
            Value::Text(crate::hex::encode_text(rest)),
        ));
    }
}

impl Codec for Cjt188Codec {
    fn id(&self) -> &str {
        ID
    }

    fn field_names(&self) -> Vec<&str> {
        let mut names = RESERVED_FIELDS.to_vec();
        names.extend(self.status_bits.iter().map(|b| b.name.as_str()));
        names
    }

    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        let (after, frame) = finish(payload, parse_frame(payload))?;
        if !after.is_empty() {
            return Err(DecodeError::TrailingBytes {
                offset: payload.len() - after.len(),
                count: after.len(),
            });
        }
        let computed = frame.computed_cs();
        if computed != frame.cs {
            return Err(DecodeError::Checksum {
                stated: frame.cs.into(),
                computed: computed.into(),
            });
        }

        let mut r = Reading {
            measurement: Name::Static(MEASUREMENT),
            time: None,
            // The most a frame yields: 8 header fields, then for a read-data reply 4 flow
            // fields, `clock_invalid`, `status`, the status bits and `data_hex`. With the
            // default bits this stays under 1 KiB, the allocator's fast (tcache) size.
            fields: Vec::with_capacity(15 + self.status_bits.len()),
            identity: None,
        };
        let (place, device_id) = if frame.address.iter().all(|b| *b == 0xAA) {
            (field("broadcast", Value::Bool(true)), None)
        } else {
            let (text, decimal) = address_text(frame.address);
            let id = decimal.then(|| text.clone());
            (field("address", Value::Text(text)), id)
        };
        let abnormal = frame.ctrl & 0x40 != 0;
        r.fields.extend([
            field("meter_type", Value::Int(frame.meter_type.into())),
            place,
            field("ctrl", Value::Int(frame.ctrl.into())),
            field("response", Value::Bool(frame.ctrl & 0x80 != 0)),
            field("abnormal", Value::Bool(abnormal)),
            field("function", Value::Int((frame.ctrl & 0x1F).into())),
        ]);

        let mut ser = None;
        match frame.data {
            // An abnormal reply's DATA layout varies by vendor: keep it whole.
            data if abnormal => push_data_hex(&mut r, data),
            [d0, d1, s, rest @ ..] => {
                let di = normalise_di(*d0, *d1);
                r.fields.extend([
                    field("di", Value::Int(di.into())),
                    field("ser", Value::Int((*s).into())),
                ]);
                ser = Some(u32::from(*s));
                let res = self.decode_payload(&mut r, &frame, di, rest);
                let rest_at = frame.data_at + 3;
                finish(rest, res).map_err(|e| with_offset(e, rest_at))?;
            }
            [d0, d1] => r
                .fields
                .push(field("di", Value::Int(normalise_di(*d0, *d1).into()))),
            data => push_data_hex(&mut r, data),
        }

        if device_id.is_some() || ser.is_some() {
            r.identity = Some(Identity {
                device_id,
                sequence: ser,
            });
        }
        Ok(vec![r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::build;

    fn decode(bytes: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        Cjt188Codec::default().decode(bytes)
    }

    fn hex(s: &str) -> Vec<u8> {
        crate::hex::decode(s.as_bytes()).expect("test hex")
    }

    fn one(bytes: &[u8]) -> Reading {
        let mut v = decode(bytes).expect("decodes");
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    /// Appends CS and 0x16 to `68 … DATA` (after `pre` wake-up bytes).
    fn framed(pre: usize, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0xFE; pre];
        f.extend_from_slice(body);
        f.push(body.iter().fold(0u8, |s, b| s.wrapping_add(*b)));
        f.push(0x16);
        f
    }

    fn int(v: i64) -> Value {
        Value::Int(v)
    }
    fn b(v: bool) -> Value {
        Value::Bool(v)
    }
    fn text(v: &str) -> Value {
        Value::Text(Text::new(v))
    }

    fn reading(
        fields: &[(&'static str, Value)],
        time: Option<DeviceTime>,
        device_id: Option<&str>,
        sequence: Option<u32>,
    ) -> Reading {
        Reading {
            measurement: Name::Static("water_meter"),
            time,
            fields: fields
                .iter()
                .map(|(n, v)| (Name::Static(n), v.clone()))
                .collect(),
            identity: (device_id.is_some() || sequence.is_some()).then(|| Identity {
                device_id: device_id.map(Text::new),
                sequence,
            }),
        }
    }

    const HEADER_REPLY: [u8; 9] = [
        0x68, // start
        0x10, // T: cold water meter
        0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78, // A0..A6 → 78330011223344
    ];

    /// The FoxEdge read-data reply (corrected CS 0x13), DI sent `1F 90`.
    const READ_DATA_REPLY: &[u8] = &[
        0x68, // start
        0x10, // T: cold water
        0x44, 0x33, 0x22, 0x11, 0x00, 0x33, 0x78, // A0..A6
        0x81, // C: response, read data
        0x16, // L = 22
        0x1F, 0x90, // DI 0x901F, low byte first
        0x00, // SER
        0x00, 0x77, 0x66, 0x55, 0x2C, // current flow 556677.00 m³
        0x00, 0x77, 0x66, 0x55, 0x2C, // settlement flow 556677.00 m³
        0x31, 0x01, 0x22, 0x11, 0x05, 0x15, 0x20, // 2015-05-11 22:01:31
        0x21, 0x84, // ST0 ST1 → 0x8421
        0x13, // CS
        0x16, // end
    ];

    fn read_data_expected() -> Reading {
        reading(
            &[
                ("meter_type", int(0x10)),
                ("address", text("78330011223344")),
                ("ctrl", int(0x81)),
                ("response", b(true)),
                ("abnormal", b(false)),
                ("function", int(1)),
                ("di", int(0x901F)),
                ("ser", int(0)),
                ("volume_m3", Value::Float(556677.0)),
                ("volume_unit_code", int(0x2C)),
                ("settlement_volume_m3", Value::Float(556677.0)),
                ("settlement_volume_unit_code", int(0x2C)),
                ("status", int(0x8421)),
                ("valve_open", b(false)), // D1 D0 = 01: closed
                ("valve_fault", b(false)),
                ("battery_low", b(false)),
            ],
            from_civil(2015, 5, 11, 22, 1, 31).map(DeviceTime::Local),
            Some("78330011223344"),
            Some(0),
        )
    }

    #[test]
    fn read_data_reply_whole() {
        assert_eq!(one(READ_DATA_REPLY), read_data_expected());
    }

    #[test]
    fn di_high_byte_first_is_the_same_reading() {
        let mut body = READ_DATA_REPLY[..READ_DATA_REPLY.len() - 2].to_vec();
        body[11] = 0x90;
        body[12] = 0x1F;
        assert_eq!(one(&framed(0, &body)), read_data_expected());
    }

    #[test]
    fn zero_and_four_byte_preambles() {
        let body = &READ_DATA_REPLY[..READ_DATA_REPLY.len() - 2];
        assert_eq!(one(&framed(0, body)), read_data_expected());
        assert_eq!(one(&framed(4, body)), read_data_expected());
        assert_eq!(one(&framed(MAX_PREAMBLE, body)), read_data_expected());
        assert_eq!(
            decode(&framed(MAX_PREAMBLE + 1, body)),
            Err(DecodeError::BadConstant {
                what: "start byte",
                offset: MAX_PREAMBLE,
                expected: 0x68,
                found: 0xFE
            })
        );
    }

    #[test]
    fn widely_copied_checksum_fails_and_corrected_decodes() {
        let mut bad = vec![0xFE; 4];
        bad.extend_from_slice(READ_DATA_REPLY);
        let cs_at = bad.len() - 2;
        bad[cs_at] = 0x08;
        assert_eq!(
            decode(&bad),
            Err(DecodeError::Checksum {
                stated: 0x08,
                computed: 0x13
            })
        );
        bad[cs_at] = 0x13;
        assert_eq!(one(&bad), read_data_expected());
    }

    #[test]
    fn status_bits_valve_states_and_battery() {
        for (st0, open, fault, battery) in [
            (0b000, true, false, false),
            (0b001, false, false, false),
            (0b011, false, true, false),
            (0b010, false, true, false), // undefined 10: not trusted
            (0b100, true, false, true),
        ] {
            let mut body = READ_DATA_REPLY[..READ_DATA_REPLY.len() - 2].to_vec();
            body[31] = st0;
            body[32] = 0x00;
            let r = one(&framed(2, &body));
            assert_eq!(r.field("status"), Some(&int(st0.into())));
            assert_eq!(r.field("valve_open"), Some(&b(open)), "st0 {st0:#05b}");
            assert_eq!(r.field("valve_fault"), Some(&b(fault)), "st0 {st0:#05b}");
            assert_eq!(r.field("battery_low"), Some(&b(battery)), "st0 {st0:#05b}");
        }
    }

    #[test]
    fn litres_convert_and_other_units_stay_raw() {
        let mut body = READ_DATA_REPLY[..READ_DATA_REPLY.len() - 2].to_vec();
        body[14..19].copy_from_slice(&[0x45, 0x23, 0x01, 0x00, 0x29]); // 123.45 L
        body[19..24].copy_from_slice(&[0x99, 0x99, 0x99, 0x99, 0x35]); // 999999.99 m³/h
        let r = one(&framed(0, &body));
        let got: Vec<_> = r.fields[8..12]
            .iter()
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("volume_m3", Value::Float(0.12345)),
                ("volume_unit_code", int(0x29)),
                ("settlement_volume_raw", Value::Float(999999.99)),
                ("settlement_volume_unit_code", int(0x35)),
            ]
        );
    }

    #[test]
    fn biggest_volume() {
        let mut body = READ_DATA_REPLY[..READ_DATA_REPLY.len() - 2].to_vec();
        body[14..18].copy_from_slice(&[0x99; 4]);
        let r = one(&framed(0, &body));
        assert_eq!(r.field("volume_m3"), Some(&Value::Float(999999.99)));
    }

    #[test]
    fn non_decimal_flow_digit_is_invalid_value() {
        let mut body = READ_DATA_REPLY[..READ_DATA_REPLY.len() - 2].to_vec();
        body[20] = 0x7A; // settlement flow, second byte
        assert_eq!(
            decode(&framed(2, &body)),
            Err(DecodeError::InvalidValue {
                what: "settlement cumulative flow",
                offset: 2 + 19,
                reason: "not a BCD number"
            })
        );
    }

    #[test]
    fn invalid_clock_gives_no_time_and_a_flag() {
        let mut body = READ_DATA_REPLY[..READ_DATA_REPLY.len() - 2].to_vec();
        body[24..31].copy_from_slice(&[0x00; 7]); // unset clock: month 0
        let r = one(&framed(0, &body));
        assert_eq!(r.time, None);
        assert_eq!(r.fields[12], (Name::Static("clock_invalid"), b(true)));
        assert_eq!(r.fields[13].0, "status");
        body[24..31].copy_from_slice(&[0x00, 0x00, 0x00, 0x31, 0x04, 0x24, 0x20]); // 31 April
        assert_eq!(
            one(&framed(0, &body)).field("clock_invalid"),
            Some(&b(true))
        );
        body[24..31].copy_from_slice(&[0xFF; 7]);
        assert_eq!(
            one(&framed(0, &body)).field("clock_invalid"),
            Some(&b(true))
        );
    }

    #[test]
    fn read_data_request() {
        let frame = hex("fefefefe68104433221100337801031f90008016");
        assert_eq!(
            one(&frame),
            reading(
                &[
                    ("meter_type", int(0x10)),
                    ("address", text("78330011223344")),
                    ("ctrl", int(0x01)),
                    ("response", b(false)),
                    ("abnormal", b(false)),
                    ("function", int(1)),
                    ("di", int(0x901F)),
                    ("ser", int(0)),
                ],
                None,
                Some("78330011223344"),
                Some(0),
            )
        );
    }

    #[test]
    fn valve_open_request_and_reply() {
        let request = [
            0xFE, 0xFE, 0xFE, 0xFE, // wake-up
            0x68, 0x10, // start, cold water
            0x69, 0x05, 0x90, 0x05, 0x15, 0x33, 0x78, // A0..A6 → 78331505900569
            0x04, 0x04, // C write data, L 4
            0xA0, 0x17, // DI 0xA017, high byte first
            0x01, // SER
            0x55, // open
            0x50, 0x16,
        ];
        assert_eq!(
            one(&request),
            reading(
                &[
                    ("meter_type", int(0x10)),
                    ("address", text("78331505900569")),
                    ("ctrl", int(0x04)),
                    ("response", b(false)),
                    ("abnormal", b(false)),
                    ("function", int(4)),
                    ("di", int(0xA017)),
                    ("ser", int(1)),
                    ("valve_command_code", int(0x55)),
                    ("valve_command", text("open")),
                ],
                None,
                Some("78331505900569"),
                Some(1),
            )
        );
        let reply = hex("fefefefe6810690590051533788405a0170100007c16");
        assert_eq!(
            one(&reply),
            reading(
                &[
                    ("meter_type", int(0x10)),
                    ("address", text("78331505900569")),
                    ("ctrl", int(0x84)),
                    ("response", b(true)),
                    ("abnormal", b(false)),
                    ("function", int(4)),
                    ("di", int(0xA017)),
                    ("ser", int(1)),
                    ("status", int(0)),
                    ("valve_open", b(true)),
                    ("valve_fault", b(false)),
                    ("battery_low", b(false)),
                ],
                None,
                Some("78331505900569"),
                Some(1),
            )
        );
    }

    #[test]
    fn valve_close_and_unknown_command() {
        let close = one(&hex("fefefefe6810690590051533780404a01701999416"));
        assert_eq!(
            close.fields[8..],
            [
                (Name::Static("valve_command_code"), int(0x99)),
                (Name::Static("valve_command"), text("close")),
            ]
        );
        let body = hex("6810690590051533780404a0170112"); // command 0x12
        let odd = one(&framed(0, &body));
        assert_eq!(
            odd.fields[8..],
            [(Name::Static("valve_command_code"), int(0x12))]
        );
    }

    #[test]
    fn broadcast_read_address_request() {
        let frame = [
            0x68, 0x10, // start, cold water
            0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, // broadcast
            0x03, 0x03, // C read address, L 3
            0x0A, 0x81, // DI 0x810A, low byte first
            0xA7, // SER
            0x56, 0x16,
        ];
        assert_eq!(
            one(&frame),
            reading(
                &[
                    ("meter_type", int(0x10)),
                    ("broadcast", b(true)),
                    ("ctrl", int(0x03)),
                    ("response", b(false)),
                    ("abnormal", b(false)),
                    ("function", int(3)),
                    ("di", int(0x810A)),
                    ("ser", int(0xA7)),
                ],
                None,
                None,
                Some(0xA7),
            )
        );
    }

    #[test]
    fn read_address_reply_carries_the_address() {
        let r = one(&hex("fefe68108967452301337883030a81a73416"));
        assert_eq!(
            r.fields[1],
            (Name::Static("address"), text("78330123456789"))
        );
        assert_eq!(r.field("di"), Some(&int(0x810A)));
        assert_eq!(
            r.identity.as_ref(),
            Some(&Identity {
                device_id: Some("78330123456789".into()),
                sequence: Some(0xA7)
            })
        );
    }

    #[test]
    fn partial_wildcard_address_is_no_identity() {
        let body = [
            0x68, 0x10, 0x89, 0x67, 0x45, 0x23, 0x01, 0xAA, 0xAA, 0x03, 0x00,
        ];
        let r = one(&framed(0, &body));
        assert_eq!(
            r.fields[1],
            (Name::Static("address"), text("AAAA0123456789"))
        );
        assert_eq!(r.identity, None);
    }

    #[test]
    fn unknown_di_keeps_raw_data() {
        // Read DI 0x907F (real time) reply: not decoded here, kept whole.
        let mut body = HEADER_REPLY.to_vec();
        body.extend_from_slice(&[
            0x81, 0x0A, 0x7F, 0x90, 0x05, 0x31, 0x01, 0x22, 0x11, 0x05, 0x15, 0x20,
        ]);
        let r = one(&framed(0, &body));
        assert_eq!(
            r.fields[6..],
            [
                (Name::Static("di"), int(0x907F)),
                (Name::Static("ser"), int(5)),
                (Name::Static("data_hex"), text("31012211051520")),
            ]
        );
    }

    #[test]
    fn heat_meter_read_data_is_kept_raw() {
        // A heat meter's 0x901F reply has another layout (heat, power, temperatures ...).
        let mut body = READ_DATA_REPLY[..READ_DATA_REPLY.len() - 2].to_vec();
        body[1] = 0x20;
        let r = one(&framed(0, &body));
        assert_eq!(r.time, None);
        assert_eq!(
            r.fields[6..],
            [
                (Name::Static("di"), int(0x901F)),
                (Name::Static("ser"), int(0)),
                (
                    Name::Static("data_hex"),
                    text("007766552c007766552c310122110515202184")
                ),
            ]
        );
    }

    #[test]
    fn abnormal_reply_keeps_data_whole() {
        let mut body = HEADER_REPLY.to_vec();
        body.extend_from_slice(&[0xC1, 0x03, 0x01, 0x02, 0x00]);
        let r = one(&framed(0, &body));
        assert_eq!(
            r.fields[4..],
            [
                (Name::Static("abnormal"), b(true)),
                (Name::Static("function"), int(1)),
                (Name::Static("data_hex"), text("010200")),
            ]
        );
        assert_eq!(r.identity.and_then(|i| i.sequence), None);
    }

    #[test]
    fn short_data_fields() {
        let mut body = HEADER_REPLY.to_vec();
        body.extend_from_slice(&[0x81, 0x00]);
        assert_eq!(one(&framed(0, &body)).fields.len(), 6);
        body[10] = 0x01;
        body.push(0x5A);
        assert_eq!(
            one(&framed(0, &body)).fields[6],
            (Name::Static("data_hex"), text("5a"))
        );
        body[10] = 0x02;
        body.push(0x90);
        body[11] = 0x1F;
        assert_eq!(
            one(&framed(0, &body)).fields[6],
            (Name::Static("di"), int(0x901F))
        );
    }

    #[test]
    fn known_di_too_short_is_truncated() {
        // A read-data reply cut after the current flow (L = 8).
        let mut body = HEADER_REPLY.to_vec();
        body.extend_from_slice(&[0x81, 0x08, 0x1F, 0x90, 0x00, 0x00, 0x77, 0x66, 0x55, 0x2C]);
        assert_eq!(
            decode(&framed(0, &body)),
            Err(DecodeError::Truncated {
                what: "settlement cumulative flow",
                offset: 19,
                needed: 4
            })
        );
    }

    #[test]
    fn valve_reply_without_status_is_truncated() {
        let mut body = HEADER_REPLY.to_vec();
        body.extend_from_slice(&[0x84, 0x03, 0x17, 0xA0, 0x01]); // DI low byte first
        assert_eq!(
            decode(&framed(0, &body)),
            Err(DecodeError::Truncated {
                what: "status",
                offset: 14,
                needed: 2
            })
        );
        body[10] = 0x04;
        body.push(0x00);
        assert_eq!(
            decode(&framed(0, &body)),
            Err(DecodeError::Truncated {
                what: "status",
                offset: 14,
                needed: 1
            })
        );
    }

    #[test]
    fn di_orders() {
        assert_eq!(normalise_di(0x1F, 0x90), 0x901F);
        assert_eq!(normalise_di(0x90, 0x1F), 0x901F);
        assert_eq!(normalise_di(0xA0, 0x17), 0xA017);
        assert_eq!(normalise_di(0x17, 0xA0), 0xA017);
        assert_eq!(normalise_di(0x0A, 0x81), 0x810A);
        assert_eq!(normalise_di(0x81, 0x0A), 0x810A);
        assert_eq!(normalise_di(0x34, 0x12), 0x1234); // unknown: low byte first
    }

    #[test]
    fn length_beyond_input_is_truncated() {
        let mut frame = READ_DATA_REPLY.to_vec();
        frame[10] = 0xFF;
        assert_eq!(
            decode(&frame),
            Err(DecodeError::Truncated {
                what: "data",
                offset: 11,
                needed: 255 - 24
            })
        );
    }

    #[test]
    fn framing_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            decode(&[0xFE, 0xFE]),
            Err(DecodeError::Truncated {
                what: "start byte",
                offset: 2,
                needed: 1
            })
        );
        assert_eq!(
            decode(&[0xFE, 0x69]),
            Err(DecodeError::BadConstant {
                what: "start byte",
                offset: 1,
                expected: 0x68,
                found: 0x69
            })
        );
        let body = &READ_DATA_REPLY[..READ_DATA_REPLY.len() - 1];
        assert_eq!(
            decode(body),
            Err(DecodeError::Truncated {
                what: "end byte",
                offset: 34,
                needed: 1
            })
        );
        let mut wrong_end = READ_DATA_REPLY.to_vec();
        wrong_end[34] = 0x17;
        assert_eq!(
            decode(&wrong_end),
            Err(DecodeError::BadConstant {
                what: "end byte",
                offset: 34,
                expected: 0x16,
                found: 0x17
            })
        );
        let mut trailing = READ_DATA_REPLY.to_vec();
        trailing.extend_from_slice(&[0x00, 0x16]);
        assert_eq!(
            decode(&trailing),
            Err(DecodeError::TrailingBytes {
                offset: 35,
                count: 2
            })
        );
        assert_eq!(
            decode(&READ_DATA_REPLY[..5]),
            Err(DecodeError::Truncated {
                what: "address",
                offset: 2,
                needed: 4
            })
        );
    }

    #[test]
    fn never_panics_on_prefixes_and_bit_flips() {
        let codec = Cjt188Codec::default();
        for n in 0..=READ_DATA_REPLY.len() {
            let _ = codec.decode(&READ_DATA_REPLY[..n]);
        }
        for at in 0..READ_DATA_REPLY.len() {
            for bit in 0..8 {
                let mut f = READ_DATA_REPLY.to_vec();
                f[at] ^= 1 << bit;
                let _ = codec.decode(&f);
            }
        }
    }

    fn options(toml_text: &str) -> CodecOptions {
        toml::from_str(toml_text).expect("test toml")
    }

    #[test]
    fn vendor_status_bits() {
        let opts = options(
            "status_bits = { valve_open = { bit = 0, invert = true }, valve_fault = false, \
             battery_low = 5, magnet_attack = { mask = 0x8000, value = 0x8000 }, \
             leak = { bit = 10 } }",
        );
        let codec = Cjt188Codec::from_options(&opts).expect("valid options");
        let r = codec.decode(READ_DATA_REPLY).expect("decodes");
        let got: Vec<_> = r[0].fields[12..]
            .iter()
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect();
        // 0x8421: D0 = 1 (closed), D5 = 1, D10 = 1, D15 = 1. Added names follow in key order.
        assert_eq!(
            got,
            [
                ("status", int(0x8421)),
                ("valve_open", b(false)),
                ("battery_low", b(true)),
                ("leak", b(true)),
                ("magnet_attack", b(true)),
            ]
        );
        // Through the registry too.
        let built = build(ID, &opts).expect("builds");
        assert_eq!(built.decode(READ_DATA_REPLY).expect("decodes"), r);
    }

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        let bad = |text: &str| match Cjt188Codec::from_options(&options(text)) {
            Err(CodecConfigError::BadOption { codec, key, reason }) => {
                assert_eq!(codec, ID);
                (key, reason)
            }
            other => panic!("{text}: expected BadOption, got {other:?}"),
        };
        assert_eq!(bad("status_bit = {}").0, "status_bit");
        assert_eq!(bad("status_bits = 3").0, "status_bits");
        let (key, reason) = bad("status_bits = { valve_open = 16 }");
        assert_eq!(key, "status_bits.valve_open");
        assert!(reason.contains("0..=15"), "{reason}");
        assert!(bad("status_bits = { valve_open = -1 }")
            .1
            .contains("out of range"));
        assert!(bad("status_bits = { valve_open = \"x\" }")
            .1
            .contains("found string"));
        assert!(bad("status_bits = { valve_open = true }")
            .1
            .contains("found boolean"));
        assert!(bad("status_bits = { Valve = 1 }").1.contains("snake_case"));
        assert!(bad("status_bits = { status = 1 }")
            .1
            .contains("already emits"));
        assert!(bad("status_bits = { leak = false }")
            .1
            .contains("none by this name"));
        assert!(bad("status_bits = { leak = { bit = 1, mask = 1 } }")
            .1
            .contains("either"));
        assert!(bad("status_bits = { leak = { } }").1.contains("either"));
        assert!(bad("status_bits = { leak = { bit = 1, value = 1 } }")
            .1
            .contains("with `mask`"));
        assert!(bad("status_bits = { leak = { mask = 1, invert = true } }")
            .1
            .contains("`invert`"));
        assert!(bad("status_bits = { leak = { mask = 1, value = 2 } }")
            .1
            .contains("within"));
        assert!(bad("status_bits = { leak = { mask = 70000 } }")
            .1
            .contains("0..=65535"));
        assert!(bad("status_bits = { leak = { bit = 1, invert = 1 } }")
            .1
            .contains("true or false"));
        assert!(bad("status_bits = { leak = { bits = 1 } }")
            .1
            .contains("unknown key `bits`"));
    }

    #[test]
    fn documented_vendor_example() {
        let profile: toml::Table = toml::from_str(
            "[codec_options.status_bits]\n\
             valve_open = { bit = 0, invert = true }\n\
             valve_fault = false\n\
             battery_low = false\n\
             magnet_attack = 5\n",
        )
        .expect("doc toml");
        let opts = profile["codec_options"].as_table().expect("table");
        let codec = Cjt188Codec::from_options(opts).expect("valid options");
        let r = codec.decode(READ_DATA_REPLY).expect("decodes");
        let got: Vec<_> = r[0].fields[12..]
            .iter()
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("status", int(0x8421)),
                ("valve_open", b(false)),
                ("magnet_attack", b(true)),
            ]
        );
    }

    #[test]
    fn default_equals_empty_options() {
        let codec = Cjt188Codec::from_options(&CodecOptions::new()).expect("no options");
        assert_eq!(codec.status_bits, Cjt188Codec::default().status_bits);
    }
}
