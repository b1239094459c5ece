//! The declarative layout codec: a device's byte layout written in TOML (a profile's
//! `[layout]` table), compiled once at load time into a parser.
//!
//! ```toml
//! [layout]
//! endian = "big"
//! items = [
//!   { const = "AB", name = "start" },
//!   { field = "temperature_c", type = "i16", scale = 0.1, sentinel = { 0x8000 = "error" } },
//!   { bitfield = "u8", items = [ { field = "sos", bit = 0 }, { field = "mode", bits = "4-6", enum = { 0 = "idle", 1 = "walking" } } ] },
//!   { checksum = "crc16_modbus", from = "start" },
//! ]
//! ```
//!
//! The language (every construct, with examples) is documented in
//! `device-profiles/README-layout.md`. This module owns:
//! - [`spec`]: the serde form of the TOML ([`LayoutSpec`]), with spans;
//! - `compile`: checks a spec and resolves it into a program of ops (types, byte orders,
//!   variable slots, case tables, interned names), with errors that point at the TOML value;
//! - `exec`: runs the program over a payload — no string is looked up or formatted per
//!   decode except for text fields;
//! - [`checksum`]: sum8, xor8 and named CRC variants.
//!
//! It does not own transport decoding (hex/base64 is the profile's `encoding`), the
//! measurement name (the profile's, or [`LayoutCodec::with_measurement`]), nor what a
//! device time means in UTC (the gateway applies the profile's `utc_offset` to
//! [`crate::DeviceTime::Local`]).

pub mod checksum;
mod compile;
mod exec;
pub mod spec;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

pub use compile::{MAX_DEPTH, MAX_ITEMS};
pub use exec::{MAX_FIELDS, MAX_READINGS, MAX_STEPS, MAX_VARS};
pub use spec::{ItemSpec, Items, LayoutSpec, Scalar};

use crate::{Codec, DecodeError, Name, Reading};

/// The codec id of compiled layouts.
pub const ID: &str = "layout";

/// Why a layout did not compile: a message and, when known, the byte range of the TOML
/// value at fault (offsets into the source the spec was deserialized from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError {
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl LayoutError {
    pub fn new(span: Option<Range<usize>>, message: impl Into<String>) -> Self {
        LayoutError {
            span,
            message: message.into(),
        }
    }

    /// The 1-based line and column where the error's span starts in `source`.
    pub fn line_col(&self, source: &str) -> Option<(usize, usize)> {
        let start = self.span.as_ref()?.start;
        let before = source.get(..start)?;
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before.get(line_start..)?.chars().count() + 1;
        Some((line, col))
    }

    /// `"line 7: unknown type `u17` (...)"`, or the bare message when there is no span.
    pub fn located(&self, source: &str) -> String {
        match self.line_col(source) {
            Some((line, _)) => format!("line {line}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LayoutError {}

/// Compiles a layout deserialized from a profile.
pub fn compile(spec: &LayoutSpec) -> Result<LayoutCodec, LayoutError> {
    let program = compile::compile(spec)?;
    Ok(LayoutCodec {
        program: Arc::new(program),
        measurement: Name::Static(ID),
    })
}

/// Parses and compiles a TOML document whose top level is the layout table (`endian`,
/// `items`, ...): for tests, docs and fuzzing. TOML syntax and schema errors keep their span.
pub fn compile_str(source: &str) -> Result<LayoutCodec, LayoutError> {
    let spec: LayoutSpec = toml::from_str(source)
        .map_err(|e| LayoutError::new(e.span(), e.message().trim_end().to_owned()))?;
    compile(&spec)
}

/// A compiled layout. Cheap to clone (the program is shared).
#[derive(Clone)]
pub struct LayoutCodec {
    program: Arc<exec::Program>,
    measurement: Name,
}

impl LayoutCodec {
    /// Readings go to `measurement` instead of `"layout"`.
    pub fn with_measurement(mut self, measurement: impl Into<Name>) -> Self {
        self.measurement = measurement.into();
        self
    }

    /// Every field the layout can produce (values, error flags, presence flags), in layout
    /// order, each once.
    pub fn field_names(&self) -> Vec<&str> {
        self.program.field_names.iter().map(Name::as_str).collect()
    }
}

impl fmt::Debug for LayoutCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayoutCodec")
            .field("measurement", &self.measurement)
            .field("fields", &self.field_names())
            .finish_non_exhaustive()
    }
}

impl Codec for LayoutCodec {
    fn id(&self) -> &str {
        ID
    }

    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        exec::run(&self.program, &self.measurement, payload)
    }

    fn field_names(&self) -> Vec<&str> {
        LayoutCodec::field_names(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Value;

    fn assert_shareable<T: Send + Sync + fmt::Debug + Clone>() {}

    #[test]
    fn codec_is_shareable_and_named() {
        assert_shareable::<LayoutCodec>();
        let codec = compile_str("items = [{ field = \"a_c\", type = \"u8\" }]").unwrap();
        assert_eq!(codec.id(), "layout");
        assert_eq!(Codec::field_names(&codec), ["a_c"]);
        assert_eq!(
            format!("{codec:?}"),
            "LayoutCodec { measurement: \"layout\", fields: [\"a_c\"], .. }"
        );
        let r = codec.with_measurement("env").decode(&[7]).unwrap();
        assert_eq!(r[0].measurement, "env");
        assert_eq!(r[0].fields, [(Name::from("a_c"), Value::Int(7))]);
    }

    #[test]
    fn errors_locate_themselves() {
        let src = "items = [\n  { field = \"a\", type = \"u17\" },\n]\n";
        let e = compile_str(src).unwrap_err();
        assert_eq!(e.line_col(src), Some((2, 25)));
        assert!(
            e.located(src).starts_with("line 2: unknown type `u17`"),
            "{e}"
        );
        assert_eq!(e.to_string(), e.message);
        let bare = LayoutError::new(None, "no span");
        assert_eq!(bare.line_col(src), None);
        assert_eq!(bare.located(src), "no span");
        // A span past the end of the source (a caller mixing up sources) is no position.
        assert_eq!(LayoutError::new(Some(500..501), "x").line_col(src), None);
    }

    #[test]
    fn toml_syntax_errors_keep_their_span() {
        let src = "endian = \"big\"\nitems = [{ field = \"a\" type = \"u8\" }]\n";
        let e = compile_str(src).unwrap_err();
        assert_eq!(e.line_col(src).map(|(line, _)| line), Some(2), "{e:?}");
        let e = compile_str("endian = \"big\"\n").unwrap_err();
        assert!(e.message.contains("missing field `items`"), "{e:?}");
    }
}
