//! [`DecodeError`]: why a payload could not be decoded, with the byte offset where it failed.

use thiserror::Error;

/// Why a payload did not decode. Variants carry data, not formatted strings; the message is
/// one sentence a field engineer can act on, and [`DecodeError::code`] is a closed-set label
/// for the `nbiot_decode_errors_total{code}` metric.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("payload is empty")]
    Empty,

    #[error("payload truncated: {what} at byte {offset} needs {needed} more byte(s)")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
    },

    #[error("checksum mismatch: frame says {stated:#04x}, bytes sum to {computed:#04x}")]
    Checksum { stated: u32, computed: u32 },

    #[error("bad {what} at byte {offset}: expected {expected:#04x}, found {found:#04x}")]
    BadConstant {
        what: &'static str,
        offset: usize,
        expected: u32,
        found: u32,
    },

    #[error("unknown {what} {code:#06x} at byte {offset}")]
    UnknownType {
        what: &'static str,
        code: u32,
        offset: usize,
    },

    #[error("invalid {what} at byte {offset}: {reason}")]
    InvalidValue {
        what: &'static str,
        offset: usize,
        reason: &'static str,
    },

    #[error("{count} trailing byte(s) after the frame at byte {offset}")]
    TrailingBytes { offset: usize, count: usize },

    #[error("invalid transport encoding at byte {offset}: {reason}")]
    Encoding { offset: usize, reason: &'static str },
}

impl DecodeError {
    /// Short, closed-set label for metrics (`nbiot_decode_errors_total{code}`).
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::Checksum { .. } => "checksum",
            DecodeError::BadConstant { .. } => "bad_frame",
            DecodeError::UnknownType { .. } => "unknown_type",
            DecodeError::InvalidValue { .. } => "invalid_value",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
            DecodeError::Encoding { .. } => "encoding",
        }
    }

    /// Every value [`DecodeError::code`] can return, for pre-registering metric series.
    pub const CODES: &'static [&'static str] = &[
        "empty",
        "truncated",
        "checksum",
        "bad_frame",
        "unknown_type",
        "invalid_value",
        "trailing_bytes",
        "encoding",
    ];
}
