//! Milesight sensors (EM300/EM310/EM400, WS101/WS303, AT101): the TLV channel stream, bare
//! (LoRaWAN-style, fPort 85) or inside the NB-IoT "cellular" frame.
//!
//! ```text
//! TLV stream   [channel u8][type u8][data: size fixed by (channel, type, model)] ...  (LE)
//! cellular     02 | ID u16 | LENGTH u16 | FLAG | FRAME_CNT u16 | PROTO | FW 4 | HW 4 | SN 16
//!              | IMEI 15 | IMSI 15 | ICCID 20 | CSQ | DATA_LEN u16 | DATA (TLV stream)
//!              (header integers big-endian, text fields ASCII; 86 header bytes)
//! ```
//!
//! References: the channel tables of the Milesight-IoT/SensorDecoders READMEs (em-series,
//! ws-series, at-series) and the vendor pages quoted in `tests/data/devices.json`; the
//! cellular frame from the `*-cellular.js` decoders of the same repository.
//!
//! This module owns the codec type, its options and the choice between the two framings;
//! `tlv.rs` owns the channel table and the stream walk, `cellular.rs` the NB-IoT frame.
//!
//! # Options (`[codec_options]`)
//!
//! - `model` (default `"generic"`): `em300-th`, `em300-mcs`, `em300-sld` (alias `em300-zld`),
//!   `em300-mld`, `ws303`, `em300-di` (alias `em300-di-hall`), `em310-tilt`, `em400` (aliases
//!   `em400-mud`, `em400-tld`, `em400-udl`), `ws101`, `at101`, `generic`. The model decides
//!   what the channels whose meaning differs between models carry: the one-byte state
//!   channels `x/0x00` (0x05/0x00 is the tilt position on EM400/AT101, the leak state on
//!   EM300-SLD/MLD, the GPIO level on EM300-DI; 0x03/0x00 is the WS303 leak state, 0x06/0x00
//!   the EM300-MCS magnet, 0x07/0x00 the AT101 tamper switch) and the history records
//!   0x20/0xCE, 0x21/0xCE (8, 13 or 18 bytes with different contents). `generic` decodes the
//!   state channels 0x03, 0x05, 0x06, 0x07 as neutral `channel_<id>_state` integers, and
//!   reports history records as unknown channels: their size is not known without the model,
//!   and guessing would produce plausible wrong values. Every other channel means the same
//!   on every model and is decoded whatever the model.
//! - `frame` (default `"auto"`): `tlv`, `cellular`, or `auto` = cellular when byte 0 is 0x02,
//!   the 86-byte header is complete and DATA_LEN fits in what follows, else TLV. Ambiguity:
//!   no supported model sends a TLV channel 0x02, so a real TLV payload is never taken for a
//!   cellular frame; but a *truncated* cellular frame is decoded as TLV in `auto` and fails
//!   as unknown channel 0x02xx. Profiles of NB-IoT models set `frame = "cellular"` to get
//!   the precise truncation error.
//! - `accept_legacy_water_channel` (default `false`): accept 0x06/0xE1 as the EM300-DI water
//!   block. The EM300-DI(-Hall) README examples use 0x06/0xE1 while the same README's table,
//!   the vendor decoder and the uplink document use 0x05/0xE1; no firmware is known to send
//!   0x06/0xE1, so by default it is an unknown channel (reported, see below).
//!
//! # Decisions
//!
//! - Unknown channel: its size is unknown, so parsing stops there; what was decoded is kept
//!   and the reading gets `unknown_channel` (Int, channel << 8 | type) and `unparsed_hex`
//!   (Text, the bytes from the unknown channel on). When nothing at all decoded, the payload
//!   is an error ([`DecodeError::UnknownType`], what = "channel") so it is counted.
//! - Truncated channel data fails the whole payload with [`DecodeError::Truncated`] naming
//!   the channel and the offset of its data.
//! - A channel repeated in one reading overwrites the earlier value in place (as the vendor
//!   decoders do), so a reading never carries a field twice.
//! - History records become their own readings, time [`crate::DeviceTime::Utc`], in
//!   payload order, after the live reading (time `None`); a payload of history records only
//!   has no live reading. The EM300-TH record is 8 bytes (timestamp, temperature, humidity,
//!   reserved) as its README table and example say, also inside cellular frames, where the
//!   vendor's cellular decoder reads 7 (no sample with a history record exists to settle it).
//! - GNSS 0xFFFFFFFF latitude or longitude = no fix: no `latitude_deg`/`longitude_deg`,
//!   `gnss_fix = false` (with a fix, `gnss_fix = true`).
//! - Temperatures are signed (int16 / 10) also inside cellular frames, where some vendor
//!   cellular decoders read them unsigned: real sensors go below 0 °C, and 0xFF9C must read
//!   -10.0 °C, not 6543.6 °C.
//! - EM300-DI `water` keeps the unit the device's `water_conv` is configured for (litres or
//!   m³ are both common), so it has no unit suffix; it is the float32 read back as its
//!   shortest decimal (0x44BB9333 = 1500.6). A non-finite float32 gives `water_error = true`.
//! - Wi-Fi scans (AT101 0x06/0xD9): at most 8 access points per reading as
//!   `wifi_<i>_group`, `wifi_<i>_mac`, `wifi_<i>_rssi_dbm`; `wifi_count` counts all of them,
//!   `wifi_dropped` those beyond the limit, `wifi_scan_timeout` says whether the scan ended
//!   with the ff:ff:ff:ff:ff:ff timeout marker.
//! - Cellular frame: DATA is cut into records where a channel id's low nibble does not
//!   increase (the vendor's rule; 0xFF counts as 0x0F), one reading per record, so the
//!   vendor's `data[i]` is reading `i`. The first (status) record's reading also carries the
//!   frame fields and the identity (IMEI as `device_id`, FRAME_CNT as `sequence`), time
//!   `None`; the `n` sample records after it get `DeviceTime::Ago((n - 1 - k) * interval)`
//!   when a collecting interval (0xFF/0x02) is present, else time `None` (details in
//!   `cellular.rs`).
//!
//! # Fields by model (units in the suffix)
//!
//! Any model: `battery_pct` Int; `temperature_c` Float; `humidity_pct` Float;
//! `angle_{x,y,z}_deg` Float + `tilt_{x,y,z}_alarm` Bool (EM310-TILT 0x03/0xCF);
//! `distance_m` Float (EM400 0x04/0x82, mm / 1000); `temperature_alarm`, `distance_alarm`
//! Bool (0x83/0x67, 0x84/0x82); `gnss_fix` Bool, `latitude_deg`, `longitude_deg` Float,
//! `geofence` Text (inside/outside/unset/unknown), `motion` Text (unknown/start/moving/stop)
//! or `tilted` Bool (AT101 status 4/5), `geofence_alarm` Bool (0x84/0x88 only) for 0x04/0x88,
//! 0x06/0x88, 0x84/0x88; the Wi-Fi fields above; `button_event` Text
//! (short_press/long_press/double_press, WS101 0xFF/0x2E); `water_conv`, `pulse_conv`,
//! `water` Float, `water_alarm` Text (0x05/0xE1, 0x85/0xE1); `pulse` Int (0x05/0xC8);
//! `initial_angle_{x,y,z}_deg`, `inclination_{x,y,z}_deg` Int (AT101 0x08/0x9B); device
//! information `ipso_version`, `hardware_version`, `firmware_version`, `tsl_version`, `sn`,
//! `lorawan_class` Text, `reset` Bool, `power_on` Bool, `collecting_interval_s`,
//! `report_interval_s` Int, `threshold_condition` Text, `threshold_{below,above,current}_c`
//! Float (0xFF/0x0D, cellular EM300).
//!
//! Per model, the state channels and history records:
//! - `em300-th`: history 0x20/0xCE: `temperature_c`, `humidity_pct`.
//! - `em300-mcs`: 0x06/0x00 `magnet_open`; history adds `magnet_open`.
//! - `em300-sld`: 0x05/0x00 `leak`; history `temperature_c`, `humidity_pct`, `leak`.
//! - `em300-mld`: 0x05/0x00 `leak`; history `leak`.
//! - `ws303`: 0x03/0x00 `leak`.
//! - `em300-di`: 0x05/0x00 `gpio_high`; 0x85/0x00 `gpio_high`, `gpio_alarm`; history v1
//!   0x20/0xCE (13 B) `temperature_c`, `humidity_pct`, `gpio_mode` (digital/counter) then
//!   `gpio_high` or `pulse`; history v2 0x21/0xCE (18 B) `temperature_c`, `humidity_pct`,
//!   `water_alarm`, `gpio_mode` then `gpio_high` or `water_conv`, `pulse_conv`, `water`.
//! - `em400`: 0x05/0x00 `tilted`.
//! - `at101`: 0x05/0x00 `tilted`, 0x07/0x00 `tamper` (true = uninstalled); history 0x20/0xCE
//!   (18 B, longitude before latitude as the AT101 table documents) `gnss_fix`,
//!   `longitude_deg`, `latitude_deg`, the six orientation angles.
//! - `em310-tilt`, `ws101`: no state channel, no history.
//! - `generic`: `channel_3_state`, `channel_5_state`, `channel_6_state`, `channel_7_state`
//!   Int; no history.
//! - On a cellular frame, the first reading also carries `frame_id`, `frame_length`
//!   (LENGTH, unreliable, kept for diagnosis), `frame_flag`, `frame_counter`,
//!   `protocol_version` Int, `firmware_version`, `hardware_version`, `sn`, `imsi`, `iccid`
//!   Text, `csq` Int, `rssi_dbm` Int (from CSQ 0..31; absent for 99 = unknown),
//!   `data_length` Int.
//! - After an unknown channel: `unknown_channel` Int, `unparsed_hex` Text.
//!
//! [`Codec::field_names`] lists all of these for the configured model (the cellular frame
//! fields unless `frame = "tlv"`); `tests/field_names.rs` checks the vectors against it.

mod cellular;
mod tlv;

use crate::registry::{CodecConfigError, CodecOptions};
use crate::{Codec, DecodeError, Reading};

pub const ID: &str = "milesight";

/// The measurement every reading gets until a profile renames it.
const MEASUREMENT: &str = "milesight";

/// The device model: what the model-dependent channels mean (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Model {
    #[default]
    Generic,
    Em300Th,
    Em300Mcs,
    Em300Sld,
    Em300Mld,
    Ws303,
    Em300Di,
    Em310Tilt,
    Em400,
    Ws101,
    At101,
}

impl Model {
    /// Option values, canonical names first, then aliases.
    const NAMES: &'static [(&'static str, Model)] = &[
        ("generic", Model::Generic),
        ("em300-th", Model::Em300Th),
        ("em300-mcs", Model::Em300Mcs),
        ("em300-sld", Model::Em300Sld),
        ("em300-mld", Model::Em300Mld),
        ("ws303", Model::Ws303),
        ("em300-di", Model::Em300Di),
        ("em310-tilt", Model::Em310Tilt),
        ("em400", Model::Em400),
        ("ws101", Model::Ws101),
        ("at101", Model::At101),
        ("em300-zld", Model::Em300Sld),
        ("em300-di-hall", Model::Em300Di),
        ("em400-mud", Model::Em400),
        ("em400-tld", Model::Em400),
        ("em400-udl", Model::Em400),
    ];

    /// The model named `name` in a profile (case-sensitive, as documented).
    pub fn from_name(name: &str) -> Option<Model> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, m)| m)
    }
}

/// How the payload is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Frame {
    /// Cellular when the bytes look like a complete cellular frame, else TLV.
    #[default]
    Auto,
    /// A bare TLV stream (LoRaWAN payloads, or DATA forwarded without its wrapper).
    Tlv,
    /// The NB-IoT cellular frame.
    Cellular,
}

impl Frame {
    const NAMES: &'static [(&'static str, Frame)] = &[
        ("auto", Frame::Auto),
        ("tlv", Frame::Tlv),
        ("cellular", Frame::Cellular),
    ];
}

/// The Milesight codec, configured for one device model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MilesightCodec {
    pub model: Model,
    pub frame: Frame,
    pub accept_legacy_water_channel: bool,
}

const OPTIONS: &[&str] = &["model", "frame", "accept_legacy_water_channel"];

fn one_of<T: Copy>(
    options: &CodecOptions,
    key: &'static str,
    names: &[(&'static str, T)],
    default: T,
) -> Result<T, CodecConfigError> {
    let bad = |reason: String| CodecConfigError::BadOption {
        codec: ID,
        key: key.to_owned(),
        reason,
    };
    match options.get(key) {
        None => Ok(default),
        Some(toml::Value::String(s)) => names
            .iter()
            .find(|(n, _)| n == s)
            .map(|&(_, v)| v)
            .ok_or_else(|| {
                let known: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
                bad(format!("unknown value `{s}` (known: {})", known.join(", ")))
            }),
        Some(other) => Err(bad(format!(
            "expected a string, found {}",
            other.type_str()
        ))),
    }
}

impl MilesightCodec {
    pub fn from_options(options: &CodecOptions) -> Result<Self, CodecConfigError> {
        super::deny_unknown_options(ID, options, OPTIONS)?;
        let model = one_of(options, "model", Model::NAMES, Model::Generic)?;
        let frame = one_of(options, "frame", Frame::NAMES, Frame::Auto)?;
        let accept_legacy_water_channel = match options.get("accept_legacy_water_channel") {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(other) => {
                return Err(CodecConfigError::BadOption {
                    codec: ID,
                    key: "accept_legacy_water_channel".to_owned(),
                    reason: format!("expected true or false, found {}", other.type_str()),
                })
            }
        };
        Ok(MilesightCodec {
            model,
            frame,
            accept_legacy_water_channel,
        })
    }

    /// The codec for `model` with the other options at their defaults.
    pub fn for_model(model: Model) -> Self {
        MilesightCodec {
            model,
            ..Self::default()
        }
    }

    /// Decodes a bare TLV stream: the live reading (if it has fields), then history readings.
    fn decode_tlv(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        // A channel takes at least 3 bytes and a Wi-Fi entry (11 bytes) gives 3 fields; 21
        // fields are 1008 bytes, the most the allocator's per-thread cache serves.
        let live = Reading::with_capacity(MEASUREMENT, (payload.len() / 3).clamp(8, 21));
        let stream = tlv::parse(self, payload, 0, live, false)?;
        if !stream.decoded_any {
            if let Some(u) = stream.unknown {
                return Err(DecodeError::UnknownType {
                    what: "channel",
                    code: u32::from(u.code),
                    offset: u.offset,
                });
            }
        }
        let mut out = stream.records;
        out.retain(|r| !r.fields.is_empty());
        if out.is_empty() {
            return Ok(stream.history);
        }
        out.extend(stream.history);
        Ok(out)
    }
}

impl Codec for MilesightCodec {
    fn id(&self) -> &str {
        ID
    }

    /// Every field the configured model can produce: the TLV stream's (see
    /// `tlv::field_names`), plus the cellular frame fields unless `frame = "tlv"`.
    fn field_names(&self) -> Vec<&str> {
        let mut names = tlv::field_names(self.model);
        if self.frame != Frame::Tlv {
            for name in cellular::FRAME_FIELDS {
                // firmware_version, hardware_version and sn are also TLV channels.
                if !names.contains(name) {
                    names.push(name);
                }
            }
        }
        names
    }

    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        match self.frame {
            Frame::Tlv => self.decode_tlv(payload),
            Frame::Cellular => cellular::decode(self, payload),
            Frame::Auto if cellular::looks_cellular(payload) => cellular::decode(self, payload),
            Frame::Auto => self.decode_tlv(payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{DeviceTime, Value};

    fn codec(model: Model) -> MilesightCodec {
        MilesightCodec::for_model(model)
    }

    fn fields(r: &Reading) -> Vec<(&str, Value)> {
        r.fields
            .iter()
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect()
    }

    #[test]
    fn options_parse_and_refuse() {
        let opts: CodecOptions = toml::from_str(
            "model = \"em300-di-hall\"\nframe = \"tlv\"\naccept_legacy_water_channel = true",
        )
        .unwrap();
        assert_eq!(
            MilesightCodec::from_options(&opts).unwrap(),
            MilesightCodec {
                model: Model::Em300Di,
                frame: Frame::Tlv,
                accept_legacy_water_channel: true
            }
        );
        assert_eq!(
            MilesightCodec::from_options(&CodecOptions::new()).unwrap(),
            MilesightCodec::default()
        );
        let bad: CodecOptions = toml::from_str("model = \"em999\"").unwrap();
        assert!(matches!(
            MilesightCodec::from_options(&bad),
            Err(CodecConfigError::BadOption { key, .. }) if key == "model"
        ));
        let bad: CodecOptions = toml::from_str("frame = 1").unwrap();
        assert!(matches!(
            MilesightCodec::from_options(&bad),
            Err(CodecConfigError::BadOption { key, .. }) if key == "frame"
        ));
        let bad: CodecOptions = toml::from_str("accept_legacy_water_channel = \"yes\"").unwrap();
        assert!(MilesightCodec::from_options(&bad).is_err());
        let bad: CodecOptions = toml::from_str("modle = \"ws101\"").unwrap();
        assert!(MilesightCodec::from_options(&bad).is_err());
    }

    #[test]
    fn field_names_follow_model_and_frame() {
        let names = |model, frame| -> Vec<String> {
            let codec = MilesightCodec {
                model,
                frame,
                accept_legacy_water_channel: false,
            };
            codec.field_names().into_iter().map(str::to_owned).collect()
        };
        let has = |list: &[String], name: &str| list.iter().any(|n| n == name);
        let mcs = names(Model::Em300Mcs, Frame::Tlv);
        assert!(has(&mcs, "magnet_open") && has(&mcs, "wifi_7_rssi_dbm"));
        assert!(!has(&mcs, "leak") && !has(&mcs, "imsi"));
        assert!(has(&names(Model::Em300Mcs, Frame::Cellular), "imsi"));
        assert!(has(&names(Model::Em300Th, Frame::Auto), "rssi_dbm"));
        assert!(has(&names(Model::Generic, Frame::Tlv), "channel_5_state"));
        for model in Model::NAMES.iter().map(|&(_, m)| m) {
            for frame in [Frame::Auto, Frame::Tlv, Frame::Cellular] {
                let list = names(model, frame);
                let unique: std::collections::BTreeSet<_> = list.iter().collect();
                assert_eq!(unique.len(), list.len(), "{model:?} {frame:?}: duplicates");
            }
        }
    }

    #[test]
    fn empty_payload() {
        assert_eq!(codec(Model::Generic).decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn em300_th_live_reading() {
        let payload = [
            0x01, 0x75, 0x5c, // battery 92 %
            0x03, 0x67, 0x34, 0x01, // temperature 0x0134 = 308 -> 30.8 C
            0x04, 0x68, 0x65, // humidity 0x65 = 101 -> 50.5 %
        ];
        let out = codec(Model::Em300Th).decode(&payload).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].measurement, "milesight");
        assert_eq!(out[0].time, None);
        assert_eq!(out[0].identity, None);
        assert_eq!(
            fields(&out[0]),
            vec![
                ("battery_pct", Value::Int(92)),
                ("temperature_c", Value::Float(30.8)),
                ("humidity_pct", Value::Float(50.5)),
            ]
        );
    }

    #[test]
    fn negative_temperature_is_signed() {
        // Cellular EM300-TH decoders read 0x03/0x67 unsigned (0xFF9C -> 6543.6); real
        // sensors go below zero, so the codec reads int16: 0xFF9C = -100 -> -10.0 C.
        let payload = [0x03, 0x67, 0x9c, 0xff];
        let out = codec(Model::Em300Th).decode(&payload).unwrap();
        assert_eq!(
            fields(&out[0]),
            vec![("temperature_c", Value::Float(-10.0))]
        );
    }

    #[test]
    fn history_only_payload_has_no_live_reading() {
        let payload = [
            0x20, 0xce, // EM300-TH history
            0x9e, 0x74, 0x46, 0x63, // ts 0x6346749e = 1665561758
            0x10, 0x01, // 27.2 C
            0x5d, // 46.5 %
            0x00, // reserved
        ];
        let out = codec(Model::Em300Th).decode(&payload).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].time, Some(DeviceTime::Utc(1_665_561_758)));
        assert_eq!(
            fields(&out[0]),
            vec![
                ("temperature_c", Value::Float(27.2)),
                ("humidity_pct", Value::Float(46.5)),
            ]
        );
    }

    #[test]
    fn generic_reports_history_as_unknown() {
        let payload = [0x20, 0xce, 0x9e, 0x74, 0x46, 0x63, 0x10, 0x01, 0x5d, 0x00];
        assert_eq!(
            codec(Model::Generic).decode(&payload),
            Err(DecodeError::UnknownType {
                what: "channel",
                code: 0x20ce,
                offset: 0
            })
        );
    }

    #[test]
    fn unknown_channel_after_data_is_reported() {
        let payload = [
            0x01, 0x75, 0x64, // battery 100
            0x09, 0x99, 0xab, 0xcd, // unknown channel 0x09/0x99 and what follows
        ];
        let out = codec(Model::Generic).decode(&payload).unwrap();
        assert_eq!(
            fields(&out[0]),
            vec![
                ("battery_pct", Value::Int(100)),
                ("unknown_channel", Value::Int(0x0999)),
                ("unparsed_hex", Value::Text("0999abcd".into())),
            ]
        );
    }

    #[test]
    fn nothing_decoded_is_an_error() {
        assert_eq!(
            codec(Model::Em300Th).decode(&[0x05, 0x00, 0x01]),
            Err(DecodeError::UnknownType {
                what: "channel",
                code: 0x0500,
                offset: 0
            })
        );
    }

    #[test]
    fn truncated_channel_names_offset() {
        // battery, then temperature with one of its two bytes.
        assert_eq!(
            codec(Model::Em300Th).decode(&[0x01, 0x75, 0x5c, 0x03, 0x67, 0x34]),
            Err(DecodeError::Truncated {
                what: "temperature",
                offset: 5,
                needed: 1
            })
        );
        // A channel id without its type byte.
        assert_eq!(
            codec(Model::Em300Th).decode(&[0x01, 0x75, 0x5c, 0x03]),
            Err(DecodeError::Truncated {
                what: "channel type",
                offset: 4,
                needed: 1
            })
        );
    }

    #[test]
    fn auto_frame_takes_short_0x02_payload_as_tlv() {
        // Too short for a cellular header: TLV, where channel 0x02 is unknown.
        assert_eq!(
            codec(Model::Generic).decode(&[0x02, 0x00, 0x01]),
            Err(DecodeError::UnknownType {
                what: "channel",
                code: 0x0200,
                offset: 0
            })
        );
    }
}
