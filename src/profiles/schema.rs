//! The on-disk form of a device profile, exactly as a field engineer writes it.
//!
//! Every struct refuses unknown keys, and the values a validation error can point at are
//! [`Spanned`], so errors name the file and line.

use std::collections::BTreeMap;

use nbiot_codecs::layout::LayoutSpec;
use serde::{Deserialize, Serialize};
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub description: String,
    pub measurement: Spanned<String>,
    /// A built-in codec id; omitted (or `"layout"`) when `[layout]` is given.
    pub codec: Option<Spanned<String>>,
    /// Options for a built-in codec (each codec documents its keys).
    pub codec_options: Option<Spanned<toml::Table>>,
    /// An inline declarative layout (see device-profiles/README.md).
    pub layout: Option<LayoutSpec>,
    /// How the payload arrives: raw bytes (default), hex text or base64 text.
    pub encoding: Option<Spanned<Encoding>>,
    /// How often a device of this model reports ("15m"); drives offline detection.
    pub report_interval: Option<Spanned<String>>,
    /// The zone of the device's wall clock when the codec reads one ("+08:00").
    pub utc_offset: Option<Spanned<String>>,
    #[serde(default)]
    pub fields: BTreeMap<String, Spanned<FieldMeta>>,
    #[serde(default)]
    pub alerts: Vec<Spanned<AlertSpec>>,
    #[serde(default)]
    pub examples: Vec<Spanned<ExampleSpec>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Raw,
    Hex,
    Base64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default)]
    pub kind: FieldKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    #[default]
    Gauge,
    Counter,
    State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    /// A condition over each reading (`expr`).
    #[default]
    Expr,
    /// The device has been silent for `after`.
    Inactive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

impl Severity {
    /// The `severity` label / column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// One `[[alerts]]` rule. Stored and checked here (names, durations, the fields it
/// references); compiled and evaluated by the rules engine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSpec {
    pub name: Spanned<String>,
    #[serde(default)]
    pub kind: AlertKind,
    pub expr: Option<Spanned<String>>,
    #[serde(rename = "for")]
    pub for_: Option<Spanned<String>>,
    pub clear: Option<Spanned<String>>,
    pub after: Option<Spanned<String>>,
    pub severity: Severity,
    #[serde(default)]
    pub summary: String,
}

/// One `[[examples]]` entry: a payload and what it must decode to, or the error it must
/// fail with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleSpec {
    #[serde(default)]
    pub description: String,
    /// The payload as hex (even for `encoding = "hex"` profiles: the bytes on the wire).
    pub hex: Spanned<String>,
    /// Shorthand: fields the first reading must have (others may be present).
    pub fields: Option<toml::Table>,
    /// Shorthand: fields the first reading must not have.
    #[serde(default)]
    pub absent: Vec<String>,
    /// Shorthand: the identity of the first reading.
    pub identity: Option<ExpectedIdentity>,
    /// The readings in order: their count must match, and each lists fields it must have.
    pub readings: Option<Vec<ExpectedReading>>,
    /// A negative example: the `DecodeError::code()` it must fail with.
    pub error: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedReading {
    /// RFC 3339 (`...Z` for UTC, no zone for a device wall clock, `-60s` for "before receipt").
    pub time: Option<String>,
    #[serde(default)]
    pub fields: toml::Table,
    /// Fields this reading must not have (a sentinel's "absent" value, a no-fix position).
    #[serde(default)]
    pub absent: Vec<String>,
    /// The identity the payload carries (`{ device_id = "…", sequence = 42 }`).
    pub identity: Option<ExpectedIdentity>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedIdentity {
    pub device_id: Option<String>,
    pub sequence: Option<u32>,
}
