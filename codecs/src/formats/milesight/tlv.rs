//! The Milesight TLV channel stream: the channel table (what each (channel, type) pair carries
//! on each model, and its size) and the walk over the stream that turns channels into fields.
//!
//! ```text
//! [channel u8][type u8][data]  [channel u8][type u8][data]  ...     integers little-endian
//! ```
//!
//! There is no length byte: the size of `data` is known only from the table, so the walk stops
//! at the first pair it does not know and reports it (see the module docs of `milesight`).
//! Inside a cellular frame the stream is also cut into records (see [`parse`]).

use super::{MilesightCodec, Model};
use crate::reading::{push, DeviceTime, Name, Reading, Text, Value};
use crate::DecodeError;

/// At most this many Wi-Fi access points are kept per reading; the rest are counted in
/// `wifi_dropped`. Field names with an index come from [`WIFI_FIELDS`], so they stay static.
pub const MAX_WIFI: usize = 8;

const WIFI_FIELDS: [[&str; 3]; MAX_WIFI] = [
    ["wifi_0_group", "wifi_0_mac", "wifi_0_rssi_dbm"],
    ["wifi_1_group", "wifi_1_mac", "wifi_1_rssi_dbm"],
    ["wifi_2_group", "wifi_2_mac", "wifi_2_rssi_dbm"],
    ["wifi_3_group", "wifi_3_mac", "wifi_3_rssi_dbm"],
    ["wifi_4_group", "wifi_4_mac", "wifi_4_rssi_dbm"],
    ["wifi_5_group", "wifi_5_mac", "wifi_5_rssi_dbm"],
    ["wifi_6_group", "wifi_6_mac", "wifi_6_rssi_dbm"],
    ["wifi_7_group", "wifi_7_mac", "wifi_7_rssi_dbm"],
];

/// Fields any model's stream can carry: the channels that mean the same on every model
/// (decoded whatever the model), the Wi-Fi scan bookkeeping, and the unknown-channel report.
/// The indexed Wi-Fi names are in [`WIFI_FIELDS`].
const COMMON_FIELDS: &[&str] = &[
    "battery_pct",
    "temperature_c",
    "humidity_pct",
    "angle_x_deg",
    "angle_y_deg",
    "angle_z_deg",
    "tilt_x_alarm",
    "tilt_y_alarm",
    "tilt_z_alarm",
    "distance_m",
    "temperature_alarm",
    "distance_alarm",
    "gnss_fix",
    "latitude_deg",
    "longitude_deg",
    "geofence",
    "motion",
    // Status low nibble 4/5 of a position or Wi-Fi entry (AT101), on any model.
    "tilted",
    "geofence_alarm",
    "wifi_count",
    "wifi_dropped",
    "wifi_scan_timeout",
    "button_event",
    "water_conv",
    "pulse_conv",
    "water",
    "water_error",
    "water_alarm",
    "pulse",
    "initial_angle_x_deg",
    "initial_angle_y_deg",
    "initial_angle_z_deg",
    "inclination_x_deg",
    "inclination_y_deg",
    "inclination_z_deg",
    "ipso_version",
    "hardware_version",
    "firmware_version",
    "tsl_version",
    "sn",
    "lorawan_class",
    "reset",
    "power_on",
    "collecting_interval_s",
    "report_interval_s",
    "threshold_condition",
    "threshold_below_c",
    "threshold_above_c",
    "threshold_current_c",
    "unknown_channel",
    "unparsed_hex",
];

/// Every field a TLV stream can produce on `model`: [`COMMON_FIELDS`], the Wi-Fi entries,
/// and what the model's state channels and history records add (history records otherwise
/// reuse common names).
pub(super) fn field_names(model: Model) -> Vec<&'static str> {
    let by_model: &[&str] = match model {
        Model::Generic => &[
            "channel_3_state",
            "channel_5_state",
            "channel_6_state",
            "channel_7_state",
        ],
        Model::Em300Mcs => &["magnet_open"],
        Model::Em300Sld | Model::Em300Mld | Model::Ws303 => &["leak"],
        Model::Em300Di => &["gpio_high", "gpio_alarm", "gpio_mode"],
        Model::At101 => &["tamper"],
        // `tilted` (EM400 0x05/0x00) is common: see above.
        Model::Em300Th | Model::Em310Tilt | Model::Em400 | Model::Ws101 => &[],
    };
    let mut names = Vec::with_capacity(COMMON_FIELDS.len() + 3 * MAX_WIFI + by_model.len());
    names.extend_from_slice(COMMON_FIELDS);
    names.extend(WIFI_FIELDS.iter().flatten());
    names.extend_from_slice(by_model);
    names
}

/// A one-byte state channel `x/0x00`, whose meaning depends on the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Leak,
    MagnetOpen,
    Tilted,
    Tamper,
    GpioHigh,
    /// `generic` model: the raw byte under a neutral name.
    Raw(&'static str),
}

/// A history record layout (0x20/0xCE, 0x21/0xCE), which depends on the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum History {
    /// EM300-TH: ts, temperature, humidity, reserved (8 B).
    Th,
    /// EM300-MCS: ts, temperature, humidity, magnet (8 B).
    Mcs,
    /// EM300-SLD/ZLD: ts, temperature, humidity, leak (8 B).
    Sld,
    /// EM300-MLD: ts, 3 unused bytes, leak (8 B).
    Mld,
    /// EM300-DI v1 (0x20/0xCE): ts, temperature, humidity, mode, gpio, pulse u32 (13 B).
    DiV1,
    /// EM300-DI v2 (0x21/0xCE): ts, temperature, humidity, alarm, mode, gpio, water_conv,
    /// pulse_conv, water f32 (18 B).
    DiV2,
    /// AT101: ts, longitude, latitude, six int8 angles (18 B).
    At101,
}

impl History {
    /// The most fields a record of this layout gives.
    fn max_fields(self) -> usize {
        match self {
            History::Mld => 1,
            History::Th => 2,
            History::Mcs | History::Sld => 3,
            History::DiV1 => 4,
            History::DiV2 => 7,
            History::At101 => 9,
        }
    }
}

/// What a (channel, type) pair carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Battery,
    Temperature,
    Humidity,
    Tilt,
    Distance,
    TemperatureAlarm,
    DistanceAlarm,
    Location { alarm: bool },
    WifiScan,
    Button,
    Water { alarm: bool },
    Orientation,
    Pulse,
    IpsoVersion,
    HardwareVersion,
    FirmwareVersion,
    TslVersion,
    SerialNumber { len: u8 },
    LorawanClass,
    ResetEvent,
    DeviceStatus,
    CollectingInterval,
    ReportInterval,
    Threshold,
    State(State),
    GpioAlarm,
    History(History),
}

impl Kind {
    /// Bytes of data after the two header bytes.
    pub(super) fn size(self) -> usize {
        match self {
            Kind::Battery | Kind::Humidity | Kind::Button | Kind::State(_) => 1,
            Kind::IpsoVersion | Kind::LorawanClass | Kind::ResetEvent | Kind::DeviceStatus => 1,
            Kind::Temperature | Kind::Distance | Kind::GpioAlarm => 2,
            Kind::HardwareVersion | Kind::FirmwareVersion | Kind::TslVersion => 2,
            Kind::CollectingInterval | Kind::ReportInterval => 2,
            Kind::TemperatureAlarm | Kind::DistanceAlarm => 3,
            Kind::Pulse => 4,
            Kind::Orientation => 6,
            Kind::SerialNumber { len } => usize::from(len),
            Kind::Tilt | Kind::Threshold => 7,
            Kind::Water { alarm } => 8 + usize::from(alarm),
            Kind::Location { .. } | Kind::WifiScan => 9,
            Kind::History(History::Th | History::Mcs | History::Sld | History::Mld) => 8,
            Kind::History(History::DiV1) => 13,
            Kind::History(History::DiV2 | History::At101) => 18,
        }
    }

    /// The field groups this kind writes into a record. Two kinds that can write the same
    /// field share a bit, so [`decode_channel`] looks for an earlier value only when a
    /// channel written before in the record overlaps (see [`Out`]): most payloads never pay
    /// for the search.
    fn groups(self) -> u32 {
        const TEMPERATURE: u32 = 1 << 0;
        const HUMIDITY: u32 = 1 << 1;
        const BATTERY: u32 = 1 << 2;
        const TILT: u32 = 1 << 3;
        const DISTANCE: u32 = 1 << 4;
        const POSITION: u32 = 1 << 5;
        const MOTION: u32 = 1 << 6; // motion, tilted
        const BUTTON: u32 = 1 << 7;
        const WATER: u32 = 1 << 8;
        const ORIENTATION: u32 = 1 << 9;
        const PULSE: u32 = 1 << 10;
        const INFO: u32 = 1 << 11;
        const INTERVAL: u32 = 1 << 12;
        const THRESHOLD: u32 = 1 << 13;
        const STATE: u32 = 1 << 14;
        const GPIO: u32 = 1 << 15;
        match self {
            Kind::Battery => BATTERY,
            Kind::Temperature | Kind::TemperatureAlarm => TEMPERATURE,
            Kind::Humidity => HUMIDITY,
            Kind::Tilt => TILT,
            Kind::Distance | Kind::DistanceAlarm => DISTANCE,
            Kind::Location { .. } => POSITION | MOTION,
            // Wi-Fi entry fields are indexed (unique); only the status byte is shared.
            Kind::WifiScan => MOTION,
            Kind::Button => BUTTON,
            Kind::Water { .. } => WATER,
            Kind::Orientation => ORIENTATION,
            Kind::Pulse => PULSE,
            Kind::IpsoVersion
            | Kind::HardwareVersion
            | Kind::FirmwareVersion
            | Kind::TslVersion
            | Kind::SerialNumber { .. }
            | Kind::LorawanClass
            | Kind::ResetEvent
            | Kind::DeviceStatus => INFO,
            Kind::CollectingInterval | Kind::ReportInterval => INTERVAL,
            Kind::Threshold => THRESHOLD,
            Kind::State(State::Tilted) => MOTION,
            Kind::State(State::GpioHigh) | Kind::GpioAlarm => GPIO,
            Kind::State(_) => STATE,
            Kind::History(_) => 0,
        }
    }

    /// The name a truncation error gives.
    fn what(self) -> &'static str {
        match self {
            Kind::Battery => "battery",
            Kind::Temperature => "temperature",
            Kind::Humidity => "humidity",
            Kind::Tilt => "tilt angles",
            Kind::Distance => "distance",
            Kind::TemperatureAlarm => "temperature alarm",
            Kind::DistanceAlarm => "distance alarm",
            Kind::Location { .. } => "gnss position",
            Kind::WifiScan => "wifi scan entry",
            Kind::Button => "button event",
            Kind::Water { alarm: false } => "water meter",
            Kind::Water { alarm: true } => "water alarm",
            Kind::Orientation => "orientation angles",
            Kind::Pulse => "pulse counter",
            Kind::IpsoVersion => "ipso version",
            Kind::HardwareVersion => "hardware version",
            Kind::FirmwareVersion => "firmware version",
            Kind::TslVersion => "tsl version",
            Kind::SerialNumber { .. } => "serial number",
            Kind::LorawanClass => "lorawan class",
            Kind::ResetEvent => "reset event",
            Kind::DeviceStatus => "device status",
            Kind::CollectingInterval => "collecting interval",
            Kind::ReportInterval => "report interval",
            Kind::Threshold => "temperature threshold",
            Kind::State(_) => "state",
            Kind::GpioAlarm => "gpio alarm",
            Kind::History(_) => "history record",
        }
    }
}

impl Model {
    /// The one-byte state channel `ch/0x00` on this model.
    fn state(self, ch: u8) -> Option<State> {
        use Model::*;
        Some(match (self, ch) {
            (Ws303, 0x03) | (Em300Sld | Em300Mld, 0x05) => State::Leak,
            (Em300Mcs, 0x06) => State::MagnetOpen,
            (Em400 | At101, 0x05) => State::Tilted,
            (At101, 0x07) => State::Tamper,
            (Em300Di, 0x05) => State::GpioHigh,
            (Generic, 0x03) => State::Raw("channel_3_state"),
            (Generic, 0x05) => State::Raw("channel_5_state"),
            (Generic, 0x06) => State::Raw("channel_6_state"),
            (Generic, 0x07) => State::Raw("channel_7_state"),
            _ => return None,
        })
    }

    /// The history record `ch/0xCE` on this model.
    fn history(self, ch: u8) -> Option<History> {
        use Model::*;
        Some(match (self, ch) {
            (Em300Th, 0x20) => History::Th,
            (Em300Mcs, 0x20) => History::Mcs,
            (Em300Sld, 0x20) => History::Sld,
            (Em300Mld, 0x20) => History::Mld,
            (Em300Di, 0x20) => History::DiV1,
            (Em300Di, 0x21) => History::DiV2,
            (At101, 0x20) => History::At101,
            _ => return None,
        })
    }
}

/// The channel table: what `ch/ty` carries for this codec's model, `None` if unknown.
pub(super) fn lookup(codec: &MilesightCodec, ch: u8, ty: u8) -> Option<Kind> {
    Some(match (ch, ty) {
        (0x01, 0x75) => Kind::Battery,
        (0x03, 0x67) => Kind::Temperature,
        (0x04, 0x68) => Kind::Humidity,
        (0x03, 0xcf) => Kind::Tilt,
        (0x04, 0x82) => Kind::Distance,
        (0x83, 0x67) => Kind::TemperatureAlarm,
        (0x84, 0x82) => Kind::DistanceAlarm,
        (0x04 | 0x06, 0x88) => Kind::Location { alarm: false },
        // Bit 7 of the channel id marks the alarm report of a channel (0x83, 0x84, 0x85).
        (0x84, 0x88) => Kind::Location { alarm: true },
        (0x06, 0xd9) => Kind::WifiScan,
        (0x08, 0x9b) => Kind::Orientation,
        (0x05, 0xc8) => Kind::Pulse,
        (0x05, 0xe1) => Kind::Water { alarm: false },
        (0x06, 0xe1) if codec.accept_legacy_water_channel => Kind::Water { alarm: false },
        (0x85, 0xe1) => Kind::Water { alarm: true },
        (0xff, 0x2e) => Kind::Button,
        (0xff, 0x01) => Kind::IpsoVersion,
        (0xff, 0x09) => Kind::HardwareVersion,
        (0xff, 0x0a) => Kind::FirmwareVersion,
        (0xff, 0xff) => Kind::TslVersion,
        (0xff, 0x16) => Kind::SerialNumber { len: 8 },
        // WS101 sends a 6-byte serial number under its own type.
        (0xff, 0x08) => Kind::SerialNumber { len: 6 },
        (0xff, 0x0f) => Kind::LorawanClass,
        (0xff, 0xfe) => Kind::ResetEvent,
        (0xff, 0x0b) => Kind::DeviceStatus,
        (0xff, 0x02) => Kind::CollectingInterval,
        (0xff, 0x03) => Kind::ReportInterval,
        (0xff, 0x0d) => Kind::Threshold,
        (0x85, 0x00) if codec.model == Model::Em300Di => Kind::GpioAlarm,
        (_, 0x00) => Kind::State(codec.model.state(ch)?),
        (_, 0xce) => Kind::History(codec.model.history(ch)?),
        _ => return None,
    })
}

/// An unknown channel where the walk stopped: `code` = channel << 8 | type, `offset` of its
/// channel byte in the whole payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unknown {
    pub code: u16,
    pub offset: usize,
}

/// The result of walking one stream.
#[derive(Debug)]
pub(super) struct Stream {
    /// Live records in payload order; never empty (the first is the one passed to [`parse`],
    /// kept even without fields), later ones only when they have fields.
    pub records: Vec<Reading>,
    /// History records in payload order, each with its own device time.
    pub history: Vec<Reading>,
    /// The last collecting interval (0xFF/0x02) seen, in seconds.
    pub collecting_interval_s: Option<u16>,
    /// Whether any channel decoded.
    pub decoded_any: bool,
    pub unknown: Option<Unknown>,
}

/// What is known about the record being filled (its reading is the last of the records):
/// the Wi-Fi scan bookkeeping that ends with it, and which fields it may hold already.
struct Record {
    channels: usize,
    /// Field groups ([`Kind::groups`]) written so far.
    written: u32,
    wifi_kept: usize,
    wifi_dropped: u32,
    wifi_scan: Option<bool>,
}

impl Record {
    /// A record whose reading starts with `fields` fields.
    fn new(fields: usize) -> Self {
        Record {
            // The only reading that comes with fields is the cellular frame reading, and of
            // its fields only `firmware_version`, `hardware_version` and `sn` are also written
            // by channels (device information): its other fields are never searched.
            written: if fields == 0 {
                0
            } else {
                Kind::FirmwareVersion.groups()
            },
            channels: 0,
            wifi_kept: 0,
            wifi_dropped: 0,
            wifi_scan: None,
        }
    }

    /// Ends the record: the Wi-Fi summary fields, written once, here.
    fn finish(&self, r: &mut Reading) {
        if let Some(timeout) = self.wifi_scan {
            let count = self.wifi_kept as i64 + i64::from(self.wifi_dropped);
            r.push("wifi_count", Value::Int(count));
            if self.wifi_dropped > 0 {
                r.push("wifi_dropped", Value::Int(self.wifi_dropped.into()));
            }
            r.push("wifi_scan_timeout", Value::Bool(timeout));
        }
    }
}

/// Walks the TLV stream `data`, whose first byte is at `base` in the payload (for error
/// offsets). Live fields go into `first` and, with `split`, into further records: a new
/// record starts when a channel id's low nibble does not increase over the previous one in
/// the record (0xFF counts as 0x0F), the rule the vendor's cellular decoders use to separate
/// the samples batched in one frame. History records become readings of their own.
pub(super) fn parse(
    codec: &MilesightCodec,
    data: &[u8],
    base: usize,
    first: Reading,
    split: bool,
) -> Result<Stream, DecodeError> {
    let measurement = first.measurement.clone();
    // A record is at least 3 bytes; the bound keeps a long stream from reserving much.
    let mut records = Vec::with_capacity(if split {
        (data.len() / 6).clamp(1, 32)
    } else {
        1
    });
    let mut rec = Record::new(first.fields.len());
    // The record being filled is always the last reading, written in place (no reading is
    // moved once built): see `Reading::push` for why moves of fresh data cost.
    push(&mut records, first);
    let mut history = Vec::new();
    let mut collecting_interval_s = None;
    let mut decoded_any = false;
    let mut unknown = None;
    let mut last_nibble = 0u8;
    let mut pos = 0;

    while let Some(&ch) = data.get(pos) {
        let Some(&ty) = data.get(pos + 1) else {
            return Err(DecodeError::Truncated {
                what: "channel type",
                offset: base + pos + 1,
                needed: 1,
            });
        };
        let Some(kind) = lookup(codec, ch, ty) else {
            let code = u16::from_be_bytes([ch, ty]);
            let rest = data.get(pos..).unwrap_or_default();
            // Written once: the walk stops here.
            if let Some(r) = records.last_mut() {
                r.push("unknown_channel", Value::Int(code.into()));
                r.push("unparsed_hex", Value::Text(crate::hex::encode_text(rest)));
            }
            unknown = Some(Unknown {
                code,
                offset: base + pos,
            });
            break;
        };
        let start = pos + 2;
        let end = start + kind.size();
        let Some(body) = data.get(start..end) else {
            return Err(DecodeError::Truncated {
                what: kind.what(),
                offset: base + start,
                needed: end - data.len(),
            });
        };
        if split {
            let nibble = ch & 0x0f;
            if rec.channels > 0 && nibble <= last_nibble {
                // The first record stays even without fields; a later one without fields
                // is reused for the next.
                let last = records.len().saturating_sub(1);
                if let Some(done) = records.last_mut() {
                    rec.finish(done);
                    if last == 0 || !done.fields.is_empty() {
                        // Samples of one frame are alike: reserve what the last one
                        // needed, and at least the 4 fields a first push would.
                        let fields = if last == 0 {
                            4
                        } else {
                            done.fields.len().max(4)
                        };
                        let next = Reading::with_capacity(measurement.clone(), fields);
                        push(&mut records, next);
                    }
                }
                rec = Record::new(0);
            }
            last_nibble = nibble;
        }
        rec.channels += 1;
        decoded_any = true;
        if kind == Kind::CollectingInterval {
            collecting_interval_s = Some(Body(body).u16());
        }
        if let Some(r) = records.last_mut() {
            decode_channel(kind, body, &mut rec, r, &mut history);
        }
        pos = end;
    }

    if let Some(done) = records.last_mut() {
        rec.finish(done);
    }
    if records.len() > 1 && records.last().is_some_and(|r| r.fields.is_empty()) {
        records.pop();
    }
    Ok(Stream {
        records,
        history,
        collecting_interval_s,
        decoded_any,
        unknown,
    })
}

/// Sets `name` in `r`: replaces an earlier value in place (a channel repeated in one reading,
/// as the vendor decoders overwrite), else appends, so a reading never has a field twice.
pub(super) fn set(r: &mut Reading, name: &'static str, value: Value) {
    match r.fields.iter_mut().find(|(n, _)| n.as_str() == name) {
        Some(slot) => slot.1 = value,
        None => r.push(Name::Static(name), value),
    }
}

/// Where one channel's fields go: appended, or, when an earlier channel of the record may
/// have written the same field (`scan`), replaced in place by [`set`].
struct Out<'r> {
    r: &'r mut Reading,
    scan: bool,
}

impl Out<'_> {
    fn put(&mut self, name: &'static str, value: Value) {
        if self.scan {
            set(self.r, name, value);
        } else {
            self.r.push(Name::Static(name), value);
        }
    }

    /// Drops an earlier value of `name` (a later report says it no longer holds).
    fn remove(&mut self, name: &'static str) {
        if self.scan {
            self.r.fields.retain(|(n, _)| n.as_str() != name);
        }
    }
}

/// A little-endian reader over a channel body that [`parse`] has already sliced to exactly
/// [`Kind::size`] bytes. Reading past the end cannot happen for a correct size table (a unit
/// test checks that each decoder consumes exactly its size); if it did, it yields zeros
/// rather than panicking.
struct Body<'a>(&'a [u8]);

impl Body<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        match self.0.split_first_chunk::<N>() {
            Some((head, rest)) => {
                self.0 = rest;
                *head
            }
            None => [0; N],
        }
    }
    fn u8(&mut self) -> u8 {
        let [b] = self.bytes();
        b
    }
    fn i8(&mut self) -> i8 {
        i8::from_le_bytes(self.bytes())
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn i16(&mut self) -> i16 {
        i16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.bytes())
    }
    fn f32(&mut self) -> f32 {
        f32::from_le_bytes(self.bytes())
    }
    fn skip(&mut self, n: usize) {
        self.0 = self.0.get(n..).unwrap_or_default();
    }
}

fn tenths(v: impl Into<f64>) -> Value {
    Value::Float(v.into() / 10.0)
}

fn halves(v: u8) -> Value {
    Value::Float(f64::from(v) / 2.0)
}

fn label(labels: &[&'static str], v: u8) -> Value {
    Value::Text(Text::from_static(
        labels.get(usize::from(v)).copied().unwrap_or("unknown"),
    ))
}

const GEOFENCE: &[&str] = &["inside", "outside", "unset", "unknown"];
const MOTION: &[&str] = &["unknown", "start", "moving", "stop"];
const BUTTON: &[&str] = &["unknown", "short_press", "long_press", "double_press"];
const WATER_ALARM: &[&str] = &[
    "none",
    "water_outage_timeout_alarm",
    "water_outage_timeout_alarm_release",
    "water_flow_timeout_alarm",
    "water_flow_timeout_alarm_release",
    "gpio_alarm",
    "gpio_alarm_release",
];
const GPIO_MODE: &[&str] = &["unknown", "digital", "counter"];
const LORAWAN_CLASS: &[&str] = &["class_a", "class_b", "class_c", "class_c_to_b"];
const THRESHOLD: &[&str] = &["disable", "below", "above", "within", "outside"];

/// The motion/geofence status byte of a position or Wi-Fi entry: high nibble geofence, low
/// nibble motion (0..3) or, on AT101, tilt (4 normal, 5 tilted).
fn motion_status(r: &mut Out<'_>, status: u8, with_geofence: bool) {
    match status & 0x0f {
        4 => r.put("tilted", Value::Bool(false)),
        5 => r.put("tilted", Value::Bool(true)),
        m => r.put("motion", label(MOTION, m)),
    }
    if with_geofence {
        r.put("geofence", label(GEOFENCE, status >> 4));
    }
}

/// Latitude and longitude in 1e-6 degrees; 0xFFFFFFFF in either means no fix, and then no
/// coordinate is reported (an earlier one in the same reading is dropped, not left beside
/// `gnss_fix = false`).
fn position(r: &mut Out<'_>, first: (&'static str, i32), second: (&'static str, i32)) {
    let fix = first.1 != -1 && second.1 != -1;
    r.put("gnss_fix", Value::Bool(fix));
    for (name, raw) in [first, second] {
        if fix {
            r.put(name, Value::Float(f64::from(raw) / 1_000_000.0));
        } else {
            r.remove(name);
        }
    }
}

/// EM300-DI water block: conversion factors (u16 / 10) and the float32 total.
fn water(r: &mut Out<'_>, b: &mut Body<'_>) {
    r.put("water_conv", tenths(b.u16()));
    r.put("pulse_conv", tenths(b.u16()));
    let w = b.f32();
    if w.is_finite() {
        r.put("water", Value::Float(f32_decimal(w)));
    } else {
        r.put("water_error", Value::Bool(true));
    }
}

/// `aa:bb:cc:dd:ee:ff`: 17 characters, one more than a [`Text`] keeps inline.
fn mac(bytes: [u8; 6]) -> Text {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(17);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    Text::from(s)
}

/// Decodes one channel: live channels into the record, a history record into a reading of
/// its own appended to `history`. Returns the bytes of `body` left unread (zero for a correct
/// size table).
fn decode_channel(
    kind: Kind,
    body: &[u8],
    rec: &mut Record,
    reading: &mut Reading,
    history: &mut Vec<Reading>,
) -> usize {
    let mut b = Body(body);
    let groups = kind.groups();
    let r = &mut Out {
        scan: rec.written & groups != 0,
        r: reading,
    };
    rec.written |= groups;
    match kind {
        Kind::Battery => r.put("battery_pct", Value::Int(b.u8().into())),
        Kind::Temperature => r.put("temperature_c", tenths(b.i16())),
        Kind::Humidity => r.put("humidity_pct", halves(b.u8())),
        Kind::Tilt => {
            for name in ["angle_x_deg", "angle_y_deg", "angle_z_deg"] {
                r.put(name, Value::Float(f64::from(b.i16()) / 100.0));
            }
            let status = b.u8();
            r.put("tilt_x_alarm", Value::Bool(status & 0x01 != 0));
            r.put("tilt_y_alarm", Value::Bool(status & 0x02 != 0));
            r.put("tilt_z_alarm", Value::Bool(status & 0x04 != 0));
        }
        Kind::Distance => r.put("distance_m", Value::Float(f64::from(b.u16()) / 1000.0)),
        Kind::TemperatureAlarm => {
            r.put("temperature_c", tenths(b.i16()));
            r.put("temperature_alarm", Value::Bool(b.u8() != 0));
        }
        Kind::DistanceAlarm => {
            r.put("distance_m", Value::Float(f64::from(b.u16()) / 1000.0));
            r.put("distance_alarm", Value::Bool(b.u8() != 0));
        }
        Kind::Location { alarm } => {
            let lat = b.i32();
            let lon = b.i32();
            position(r, ("latitude_deg", lat), ("longitude_deg", lon));
            motion_status(r, b.u8(), true);
            if alarm {
                r.put("geofence_alarm", Value::Bool(true));
            }
        }
        Kind::WifiScan => {
            let group = b.u8();
            let addr: [u8; 6] = b.bytes();
            let rssi = b.i8();
            motion_status(r, b.u8(), false);
            let timeout = addr == [0xff; 6];
            rec.wifi_scan = Some(rec.wifi_scan.unwrap_or(false) | timeout);
            if !timeout {
                match WIFI_FIELDS.get(rec.wifi_kept) {
                    // Indexed names are unique in the record: appended, never searched.
                    Some([g, m, s]) => {
                        r.r.push(*g, Value::Int(group.into()));
                        r.r.push(*m, Value::Text(mac(addr)));
                        r.r.push(*s, Value::Int(rssi.into()));
                        rec.wifi_kept += 1;
                    }
                    None => rec.wifi_dropped = rec.wifi_dropped.saturating_add(1),
                }
            }
        }
        Kind::Button => r.put("button_event", label(BUTTON, b.u8())),
        Kind::Water { alarm } => {
            water(r, &mut b);
            if alarm {
                r.put("water_alarm", label(WATER_ALARM, b.u8()));
            }
        }
        Kind::Orientation => {
            for name in [
                "initial_angle_x_deg",
                "initial_angle_y_deg",
                "initial_angle_z_deg",
                "inclination_x_deg",
                "inclination_y_deg",
                "inclination_z_deg",
            ] {
                r.put(name, Value::Int(b.i8().into()));
            }
        }
        Kind::Pulse => r.put("pulse", Value::Int(b.u32().into())),
        Kind::IpsoVersion => {
            let v = b.u8();
            r.put(
                "ipso_version",
                Value::Text(format!("v{}.{}", v >> 4, v & 0x0f).into()),
            );
        }
        Kind::HardwareVersion => {
            let [major, minor] = b.bytes();
            r.put(
                "hardware_version",
                Value::Text(format!("v{major:x}.{}", minor >> 4).into()),
            );
        }
        Kind::FirmwareVersion => {
            let [major, minor] = b.bytes();
            r.put(
                "firmware_version",
                Value::Text(format!("v{major:x}.{minor:x}").into()),
            );
        }
        Kind::TslVersion => {
            let [major, minor] = b.bytes();
            r.put(
                "tsl_version",
                Value::Text(format!("v{major}.{minor}").into()),
            );
        }
        Kind::SerialNumber { len } => {
            let n = usize::from(len);
            r.put(
                "sn",
                Value::Text(crate::hex::encode_text(body.get(..n).unwrap_or_default())),
            );
            b.skip(n);
        }
        Kind::LorawanClass => r.put("lorawan_class", label(LORAWAN_CLASS, b.u8())),
        Kind::ResetEvent => {
            b.u8();
            r.put("reset", Value::Bool(true));
        }
        Kind::DeviceStatus => {
            b.u8();
            r.put("power_on", Value::Bool(true));
        }
        Kind::CollectingInterval => r.put("collecting_interval_s", Value::Int(b.u16().into())),
        Kind::ReportInterval => r.put("report_interval_s", Value::Int(b.u16().into())),
        Kind::Threshold => {
            r.put("threshold_condition", label(THRESHOLD, b.u8() & 0x07));
            r.put("threshold_below_c", tenths(b.i16()));
            r.put("threshold_above_c", tenths(b.i16()));
            r.put("threshold_current_c", tenths(b.i16()));
        }
        Kind::State(state) => {
            let v = b.u8();
            let (name, value) = match state {
                State::Leak => ("leak", Value::Bool(v != 0)),
                State::MagnetOpen => ("magnet_open", Value::Bool(v != 0)),
                State::Tilted => ("tilted", Value::Bool(v != 0)),
                State::Tamper => ("tamper", Value::Bool(v != 0)),
                State::GpioHigh => ("gpio_high", Value::Bool(v != 0)),
                State::Raw(name) => (name, Value::Int(v.into())),
            };
            r.put(name, value);
        }
        Kind::GpioAlarm => {
            r.put("gpio_high", Value::Bool(b.u8() != 0));
            r.put("gpio_alarm", Value::Bool(b.u8() != 0));
        }
        Kind::History(h) => {
            let mut past = Reading::with_capacity(r.r.measurement.clone(), h.max_fields());
            let left = decode_history(h, body, &mut past);
            push(history, past);
            return left;
        }
    }
    b.0.len()
}

/// Decodes one history record into its own reading, time = the record's UTC timestamp.
/// Returns the bytes of `body` left unread (zero for a correct size table).
fn decode_history(h: History, body: &[u8], reading: &mut Reading) -> usize {
    let mut b = Body(body);
    reading.time = Some(DeviceTime::Utc(b.u32().into()));
    // A fresh reading, each field written once.
    let r = &mut Out {
        r: reading,
        scan: false,
    };
    let temperature_humidity = |b: &mut Body<'_>, r: &mut Out<'_>| {
        r.put("temperature_c", tenths(b.i16()));
        r.put("humidity_pct", halves(b.u8()));
    };
    match h {
        History::Th => {
            temperature_humidity(&mut b, r);
            b.u8(); // reserved
        }
        History::Mcs => {
            temperature_humidity(&mut b, r);
            r.put("magnet_open", Value::Bool(b.u8() != 0));
        }
        History::Sld => {
            temperature_humidity(&mut b, r);
            r.put("leak", Value::Bool(b.u8() != 0));
        }
        History::Mld => {
            b.skip(3); // unused
            r.put("leak", Value::Bool(b.u8() != 0));
        }
        History::DiV1 => {
            temperature_humidity(&mut b, r);
            let mode = b.u8();
            let gpio = b.u8();
            let pulse = b.u32();
            r.put("gpio_mode", label(GPIO_MODE, mode));
            match mode {
                1 => r.put("gpio_high", Value::Bool(gpio != 0)),
                2 => r.put("pulse", Value::Int(pulse.into())),
                _ => {}
            }
        }
        History::DiV2 => {
            temperature_humidity(&mut b, r);
            r.put("water_alarm", label(WATER_ALARM, b.u8()));
            let mode = b.u8();
            let gpio = b.u8();
            r.put("gpio_mode", label(GPIO_MODE, mode));
            match mode {
                1 => {
                    r.put("gpio_high", Value::Bool(gpio != 0));
                    b.skip(8);
                }
                2 => water(r, &mut b),
                _ => b.skip(8),
            }
        }
        History::At101 => {
            let lon = b.i32();
            let lat = b.i32();
            position(r, ("longitude_deg", lon), ("latitude_deg", lat));
            for name in [
                "initial_angle_x_deg",
                "initial_angle_y_deg",
                "initial_angle_z_deg",
                "inclination_x_deg",
                "inclination_y_deg",
                "inclination_z_deg",
            ] {
                r.put(name, Value::Int(b.i8().into()));
            }
        }
    }
    b.0.len()
}

/// The shortest decimal that reads back as the same `f32`, as an `f64`: the EM300-DI float32
/// total 0x44BB9333 is 1500.5999755859375 exactly and must read 1500.6. Tries 1 to 9
/// significant digits (9 always round-trips a float32); no formatting, no allocation.
pub(super) fn f32_decimal(x: f32) -> f64 {
    let v = f64::from(x);
    // Integers below 2^24 are exact in float32 and already their shortest form.
    if !x.is_finite() || (v.fract() == 0.0 && v.abs() < 16_777_216.0) {
        return v;
    }
    let exponent = v.abs().log10().floor() as i32;
    for digits in 1..=9 {
        // Decimal places to keep; powers of ten up to 1e22 are exact in f64.
        let places = digits - 1 - exponent;
        let r = match places {
            0..=22 => {
                let scale = 10f64.powi(places);
                (v * scale).round() / scale
            }
            -22..=-1 => {
                let scale = 10f64.powi(-places);
                (v / scale).round() * scale
            }
            _ => return v,
        };
        if r as f32 == x {
            return r;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(model: Model) -> MilesightCodec {
        MilesightCodec::for_model(model)
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

    /// Every kind's decoder reads exactly `size()` bytes: the size table and the decoders
    /// cannot drift apart unnoticed.
    #[test]
    fn decoders_consume_exactly_their_size() {
        let mut kinds = vec![
            Kind::Battery,
            Kind::Temperature,
            Kind::Humidity,
            Kind::Tilt,
            Kind::Distance,
            Kind::TemperatureAlarm,
            Kind::DistanceAlarm,
            Kind::Location { alarm: false },
            Kind::Location { alarm: true },
            Kind::WifiScan,
            Kind::Button,
            Kind::Water { alarm: false },
            Kind::Water { alarm: true },
            Kind::Orientation,
            Kind::Pulse,
            Kind::IpsoVersion,
            Kind::HardwareVersion,
            Kind::FirmwareVersion,
            Kind::TslVersion,
            Kind::SerialNumber { len: 8 },
            Kind::SerialNumber { len: 6 },
            Kind::LorawanClass,
            Kind::ResetEvent,
            Kind::DeviceStatus,
            Kind::CollectingInterval,
            Kind::ReportInterval,
            Kind::Threshold,
            Kind::GpioAlarm,
        ];
        for s in [
            State::Leak,
            State::MagnetOpen,
            State::Tilted,
            State::Tamper,
            State::GpioHigh,
            State::Raw("x"),
        ] {
            kinds.push(Kind::State(s));
        }
        for h in [
            History::Th,
            History::Mcs,
            History::Sld,
            History::Mld,
            History::DiV1,
            History::DiV2,
            History::At101,
        ] {
            kinds.push(Kind::History(h));
        }
        for kind in kinds {
            for fill in [0x00u8, 0x01, 0x02, 0xff] {
                let body = vec![fill; kind.size()];
                let mut rec = Record::new(0);
                let mut history = Vec::new();
                let mut reading = Reading::new("t");
                let left = decode_channel(kind, &body, &mut rec, &mut reading, &mut history);
                assert_eq!(left, 0, "{kind:?} fill {fill:#x}");
            }
        }
    }

    #[test]
    fn em310_tilt_angles_and_alarm_bits() {
        let payload = [
            0x03, 0xcf, // tilt
            0x00, 0x00, // x 0
            0x9c, 0xff, // y -100 -> -1.0 deg
            0x28, 0x23, // z 9000 -> 90.0 deg
            0x05, // x and z thresholds triggered
        ];
        let s = parse(
            &codec(Model::Em310Tilt),
            &payload,
            0,
            Reading::new("m"),
            false,
        )
        .unwrap();
        assert_eq!(
            fields(&s.records[0]),
            vec![
                ("angle_x_deg", Value::Float(0.0)),
                ("angle_y_deg", Value::Float(-1.0)),
                ("angle_z_deg", Value::Float(90.0)),
                ("tilt_x_alarm", Value::Bool(true)),
                ("tilt_y_alarm", Value::Bool(false)),
                ("tilt_z_alarm", Value::Bool(true)),
            ]
        );
    }

    #[test]
    fn model_decides_the_state_channels() {
        let cases: &[(Model, [u8; 3], &str, Value)] = &[
            (
                Model::Em400,
                [0x05, 0x00, 0x01],
                "tilted",
                Value::Bool(true),
            ),
            (
                Model::At101,
                [0x05, 0x00, 0x00],
                "tilted",
                Value::Bool(false),
            ),
            (
                Model::Em300Sld,
                [0x05, 0x00, 0x01],
                "leak",
                Value::Bool(true),
            ),
            (
                Model::Em300Mld,
                [0x05, 0x00, 0x00],
                "leak",
                Value::Bool(false),
            ),
            (Model::Ws303, [0x03, 0x00, 0x01], "leak", Value::Bool(true)),
            (
                Model::Em300Mcs,
                [0x06, 0x00, 0x01],
                "magnet_open",
                Value::Bool(true),
            ),
            (
                Model::At101,
                [0x07, 0x00, 0x01],
                "tamper",
                Value::Bool(true),
            ),
            (
                Model::Em300Di,
                [0x05, 0x00, 0x01],
                "gpio_high",
                Value::Bool(true),
            ),
            (
                Model::Generic,
                [0x05, 0x00, 0x02],
                "channel_5_state",
                Value::Int(2),
            ),
            (
                Model::Generic,
                [0x03, 0x00, 0x01],
                "channel_3_state",
                Value::Int(1),
            ),
            (
                Model::Generic,
                [0x06, 0x00, 0x01],
                "channel_6_state",
                Value::Int(1),
            ),
            (
                Model::Generic,
                [0x07, 0x00, 0x00],
                "channel_7_state",
                Value::Int(0),
            ),
        ];
        for (model, payload, name, value) in cases {
            let s = parse(&codec(*model), payload, 0, Reading::new("m"), false).unwrap();
            assert_eq!(
                fields(&s.records[0]),
                vec![(*name, value.clone())],
                "{model:?}"
            );
        }
        // The same bytes are unknown on a model without that channel.
        let s = parse(
            &codec(Model::Ws303),
            &[0x05, 0x00, 0x01],
            0,
            Reading::new("m"),
            false,
        )
        .unwrap();
        assert_eq!(
            s.unknown,
            Some(Unknown {
                code: 0x0500,
                offset: 0
            })
        );
        assert!(!s.decoded_any);
    }

    #[test]
    fn location_fix_no_fix_and_alarm() {
        let payload = [
            0x04, 0x88, // AT101 location
            0x36, 0xbf, 0x77, 0x01, // latitude 24624950 -> 24.62495
            0xf0, 0x00, 0x09, 0x07, // longitude 118030576 -> 118.030576
            0x22, // geofence 2 unset, motion 2 moving
            0x84, 0x88, // location alarm report, no fix, AT101 tilt status 5
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x15,
        ];
        let s = parse(&codec(Model::At101), &payload, 0, Reading::new("m"), false).unwrap();
        // The second report overwrites gnss_fix and geofence in place, and, having no fix,
        // drops the earlier coordinates rather than leave them beside gnss_fix = false.
        assert_eq!(
            fields(&s.records[0]),
            vec![
                ("gnss_fix", Value::Bool(false)),
                ("motion", text("moving")),
                ("geofence", text("outside")),
                ("tilted", Value::Bool(true)),
                ("geofence_alarm", Value::Bool(true)),
            ]
        );
    }

    #[test]
    fn no_fix_has_no_coordinates() {
        let payload = [
            0x06, 0x88, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x20,
        ];
        let s = parse(&codec(Model::Em400), &payload, 0, Reading::new("m"), false).unwrap();
        assert_eq!(
            fields(&s.records[0]),
            vec![
                ("gnss_fix", Value::Bool(false)),
                ("motion", text("unknown")),
                ("geofence", text("unset")),
            ]
        );
    }

    #[test]
    fn wifi_scan_is_bounded_and_counts_drops() {
        let mut payload = Vec::new();
        for i in 0..10u8 {
            // group 8, MAC 24:e1:24:f6:a6:<i>, rssi -61, moving
            payload.extend_from_slice(&[
                0x06, 0xd9, 0x08, 0x24, 0xe1, 0x24, 0xf6, 0xa6, i, 0xc3, 0x02,
            ]);
        }
        // The timeout marker entry.
        payload.extend_from_slice(&[
            0x06, 0xd9, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x02,
        ]);
        let s = parse(&codec(Model::At101), &payload, 0, Reading::new("m"), false).unwrap();
        let r = &s.records[0];
        assert_eq!(r.field("motion"), Some(&text("moving")));
        assert_eq!(r.field("wifi_0_mac"), Some(&text("24:e1:24:f6:a6:00")));
        assert_eq!(r.field("wifi_0_rssi_dbm"), Some(&Value::Int(-61)));
        assert_eq!(r.field("wifi_7_mac"), Some(&text("24:e1:24:f6:a6:07")));
        assert_eq!(r.field("wifi_7_group"), Some(&Value::Int(8)));
        assert_eq!(r.field("wifi_count"), Some(&Value::Int(10)));
        assert_eq!(r.field("wifi_dropped"), Some(&Value::Int(2)));
        assert_eq!(r.field("wifi_scan_timeout"), Some(&Value::Bool(true)));
        // motion + 8 * 3 entry fields + count, dropped, timeout
        assert_eq!(r.fields.len(), 1 + 24 + 3);
    }

    #[test]
    fn button_events() {
        for (byte, event) in [
            (1u8, "short_press"),
            (2, "long_press"),
            (3, "double_press"),
            (9, "unknown"),
        ] {
            let s = parse(
                &codec(Model::Ws101),
                &[0xff, 0x2e, byte],
                0,
                Reading::new("m"),
                false,
            )
            .unwrap();
            assert_eq!(fields(&s.records[0]), vec![("button_event", text(event))]);
        }
    }

    #[test]
    fn em300_di_water_alarm_and_history_v2() {
        let payload = [
            0x85, 0xe1, // water alarm
            0x0a, 0x00, // water_conv 10 -> 1.0
            0x88, 0x02, // pulse_conv 648 -> 64.8
            0x33, 0x93, 0xbb, 0x44, // float32 0x44bb9333 -> 1500.6
            0x03, // water flow timeout alarm
            0x21, 0xce, // history v2
            0xdf, 0xf4, 0x0b, 0x65, // ts 1695282399
            0x00, 0x00, // temperature 0
            0x00, // humidity 0
            0x01, // alarm: water outage timeout
            0x02, // mode counter
            0x01, // gpio (ignored in counter mode)
            0x0a, 0x00, 0x0a, 0x00, // conversions 1.0, 1.0
            0x00, 0x80, 0xec, 0x44, // 1892.0
        ];
        let out = codec(Model::Em300Di).decode_tlv(&payload).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].time, None);
        assert_eq!(
            fields(&out[0]),
            vec![
                ("water_conv", Value::Float(1.0)),
                ("pulse_conv", Value::Float(64.8)),
                ("water", Value::Float(1500.6)),
                ("water_alarm", text("water_flow_timeout_alarm")),
            ]
        );
        assert_eq!(out[1].time, Some(DeviceTime::Utc(1_695_282_399)));
        assert_eq!(
            fields(&out[1]),
            vec![
                ("temperature_c", Value::Float(0.0)),
                ("humidity_pct", Value::Float(0.0)),
                ("water_alarm", text("water_outage_timeout_alarm")),
                ("gpio_mode", text("counter")),
                ("water_conv", Value::Float(1.0)),
                ("pulse_conv", Value::Float(1.0)),
                ("water", Value::Float(1892.0)),
            ]
        );
    }

    #[test]
    fn legacy_water_channel_only_when_enabled() {
        let payload = [0x06, 0xe1, 0x0a, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00];
        let strict = codec(Model::Em300Di);
        let s = parse(&strict, &payload, 0, Reading::new("m"), false).unwrap();
        assert_eq!(
            s.unknown,
            Some(Unknown {
                code: 0x06e1,
                offset: 0
            })
        );
        let lenient = MilesightCodec {
            accept_legacy_water_channel: true,
            ..strict
        };
        let s = parse(&lenient, &payload, 0, Reading::new("m"), false).unwrap();
        assert_eq!(
            fields(&s.records[0]),
            vec![
                ("water_conv", Value::Float(1.0)),
                ("pulse_conv", Value::Float(1.0)),
                ("water", Value::Float(0.0)),
            ]
        );
    }

    #[test]
    fn non_finite_water_is_flagged() {
        let payload = [0x05, 0xe1, 0x0a, 0x00, 0x0a, 0x00, 0x00, 0x00, 0xc0, 0x7f];
        let s = parse(
            &codec(Model::Em300Di),
            &payload,
            0,
            Reading::new("m"),
            false,
        )
        .unwrap();
        assert_eq!(
            fields(&s.records[0]),
            vec![
                ("water_conv", Value::Float(1.0)),
                ("pulse_conv", Value::Float(1.0)),
                ("water_error", Value::Bool(true)),
            ]
        );
    }

    #[test]
    fn repeated_channel_overwrites_in_place() {
        let payload = [0x01, 0x75, 0x10, 0x03, 0x67, 0x01, 0x00, 0x01, 0x75, 0x11];
        let s = parse(
            &codec(Model::Em300Th),
            &payload,
            0,
            Reading::new("m"),
            false,
        )
        .unwrap();
        assert_eq!(
            fields(&s.records[0]),
            vec![
                ("battery_pct", Value::Int(17)),
                ("temperature_c", Value::Float(0.1))
            ]
        );
    }

    #[test]
    fn device_information_packet() {
        let payload = [
            0xff, 0x01, 0x01, // ipso v0.1
            0xff, 0x09, 0x01, 0x10, // hardware v1.1
            0xff, 0x0a, 0x01, 0x14, // firmware v1.14
            0xff, 0xff, 0x01, 0x00, // tsl v1.0
            0xff, 0x16, 0x67, 0x49, 0xd1, 0x90, 0x54, 0x69, 0x00, 0x31, // sn
            0xff, 0x0f, 0x00, // class A
            0xff, 0xfe, 0x00, // reset
            0xff, 0x0b, 0xff, // power on
            0xff, 0x03, 0x58, 0x02, // report interval 600 s
        ];
        let s = parse(
            &codec(Model::Em300Th),
            &payload,
            0,
            Reading::new("m"),
            false,
        )
        .unwrap();
        assert_eq!(
            fields(&s.records[0]),
            vec![
                ("ipso_version", text("v0.1")),
                ("hardware_version", text("v1.1")),
                ("firmware_version", text("v1.14")),
                ("tsl_version", text("v1.0")),
                ("sn", text("6749d19054690031")),
                ("lorawan_class", text("class_a")),
                ("reset", Value::Bool(true)),
                ("power_on", Value::Bool(true)),
                ("report_interval_s", Value::Int(600)),
            ]
        );
    }

    #[test]
    fn at101_history_and_orientation() {
        let payload = [
            0x08, 0x9b, 0x01, 0xff, 0x5a, 0x00, 0xfe, 0x59, // orientation
            0x20, 0xce, // AT101 history
            0x9e, 0x74, 0x46, 0x63, // ts
            0xf0, 0x00, 0x09, 0x07, // longitude 118.030576
            0x36, 0xbf, 0x77, 0x01, // latitude 24.62495
            0x00, 0x00, 0x5a, 0x00, 0x00, 0x59,
        ];
        let out = codec(Model::At101).decode_tlv(&payload).unwrap();
        assert_eq!(
            fields(&out[0]),
            vec![
                ("initial_angle_x_deg", Value::Int(1)),
                ("initial_angle_y_deg", Value::Int(-1)),
                ("initial_angle_z_deg", Value::Int(90)),
                ("inclination_x_deg", Value::Int(0)),
                ("inclination_y_deg", Value::Int(-2)),
                ("inclination_z_deg", Value::Int(89)),
            ]
        );
        assert_eq!(out[1].time, Some(DeviceTime::Utc(1_665_561_758)));
        assert_eq!(
            fields(&out[1]),
            vec![
                ("gnss_fix", Value::Bool(true)),
                ("longitude_deg", Value::Float(118.030576)),
                ("latitude_deg", Value::Float(24.62495)),
                ("initial_angle_x_deg", Value::Int(0)),
                ("initial_angle_y_deg", Value::Int(0)),
                ("initial_angle_z_deg", Value::Int(90)),
                ("inclination_x_deg", Value::Int(0)),
                ("inclination_y_deg", Value::Int(0)),
                ("inclination_z_deg", Value::Int(89)),
            ]
        );
    }

    #[test]
    fn em300_di_history_v1_gpio_mode() {
        let payload = [
            0x20, 0xce, 0x9e, 0x74, 0x46, 0x63, 0x10, 0x01, 0x5d, // ts, 27.2 C, 46.5 %
            0x01, 0x01, // digital mode, high
            0x00, 0x00, 0x00, 0x00, // pulse (ignored in digital mode)
        ];
        let out = codec(Model::Em300Di).decode_tlv(&payload).unwrap();
        assert_eq!(
            fields(&out[0]),
            vec![
                ("temperature_c", Value::Float(27.2)),
                ("humidity_pct", Value::Float(46.5)),
                ("gpio_mode", text("digital")),
                ("gpio_high", Value::Bool(true)),
            ]
        );
    }

    #[test]
    fn threshold_and_gpio_alarm() {
        let payload = [
            0xff, 0x0d, 0x02, 0x00, 0x00, 0x2c, 0x01, 0x2d, 0x01, // above 30.0, current 30.1
            0x85, 0x00, 0x01, 0x01, // gpio high, alarm
        ];
        let s = parse(
            &codec(Model::Em300Di),
            &payload,
            0,
            Reading::new("m"),
            false,
        )
        .unwrap();
        assert_eq!(
            fields(&s.records[0]),
            vec![
                ("threshold_condition", text("above")),
                ("threshold_below_c", Value::Float(0.0)),
                ("threshold_above_c", Value::Float(30.0)),
                ("threshold_current_c", Value::Float(30.1)),
                ("gpio_high", Value::Bool(true)),
                ("gpio_alarm", Value::Bool(true)),
            ]
        );
    }

    #[test]
    fn f32_shortest_decimal() {
        assert_eq!(f32_decimal(f32::from_bits(0x44bb_9333)), 1500.6);
        assert_eq!(f32_decimal(741.0), 741.0);
        assert_eq!(f32_decimal(0.1), 0.1);
        assert_eq!(f32_decimal(-2.5e-7), -2.5e-7);
        assert_eq!(f32_decimal(16_777_215.0), 16_777_215.0);
        // Beyond exact powers of ten: the exact float32 value.
        assert_eq!(f32_decimal(1.0e30), f64::from(1.0e30f32));
        assert_eq!(f32_decimal(0.0), 0.0);
    }
}
