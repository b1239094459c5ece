//! Pure decoding of NB-IoT device payloads.
//!
//! # Layout
//!
//! - [`reading`]: the [`Reading`] model every codec produces (measurement, typed fields,
//!   optional device time, optional identity found inside the payload).
//! - [`error`]: [`DecodeError`], one variant per cause, with a short [`DecodeError::code`]
//!   for metrics.
//! - [`formats`]: the built-in wire formats, one file each (`cjt188`, `milesight`,
//!   `dragino`, `wmbus`), each opening with its byte layout and its reference.
//! - [`layout`]: the declarative layout codec: a TOML description compiled once into a parser.
//! - [`registry`]: built-in codecs by id.
//! - [`time`]: calendar arithmetic for device clocks (no system clock is ever read here).
//! - [`hex`]: hex/ASCII-hex transport decoding.
//!
//! This crate does no I/O, reads no clock and spawns nothing: the gateway owns all of that.
//! Every decoder is total: any input yields readings or a [`DecodeError`], never a panic, and
//! nothing is allocated in proportion to a length field that has not been bounded first.

#![forbid(unsafe_code)]

pub mod error;
pub mod formats;
pub mod hex;
pub mod layout;
pub mod parse;
pub mod reading;
pub mod registry;
pub mod time;

pub use error::DecodeError;
pub use reading::{DeviceTime, Identity, Name, Reading, Text, Value};
pub use registry::{builtin, builtin_ids};

/// A payload decoder. Implementations are pure and cheap to share between threads.
pub trait Codec: Send + Sync + std::fmt::Debug {
    /// The codec id used in profiles and on the command line (`cjt188`, `milesight`, ...).
    fn id(&self) -> &str;

    /// Decodes one uplink payload into one or more readings.
    ///
    /// Never panics; returns an error that names the byte offset and the cause.
    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError>;

    /// Every field name this codec can produce, when it can say (profile validation checks
    /// alert rules against it). Empty means "not declared": profiles then check rules
    /// against the fields their examples produce and their `[fields]` table.
    fn field_names(&self) -> Vec<&str> {
        Vec::new()
    }
}
