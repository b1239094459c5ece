//! The built-in wire formats, one file each. Each file opens with its byte layout and the
//! document it follows, and exposes `ID` and a codec type with `from_options`.

pub mod cjt188;
pub mod dragino;
pub mod milesight;
pub mod wmbus;

use crate::registry::{CodecConfigError, CodecOptions};

/// Refuses option keys a codec does not know, naming the first one.
pub(crate) fn deny_unknown_options(
    codec: &'static str,
    options: &CodecOptions,
    known: &[&str],
) -> Result<(), CodecConfigError> {
    match options.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(CodecConfigError::BadOption {
            codec,
            key: key.clone(),
            reason: format!(
                "unknown option (known: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        }),
        None => Ok(()),
    }
}
