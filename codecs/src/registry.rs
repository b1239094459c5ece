//! Built-in codecs by id, built with the per-profile options a profile's `[codec_options]`
//! table carries (e.g. CJ/T 188 status-bit meanings for one meter vendor).

use std::sync::Arc;

use thiserror::Error;

use crate::formats::{cjt188, dragino, milesight, wmbus};
use crate::Codec;

/// Options from a profile's `[codec_options]` table. Each codec documents its keys and
/// refuses unknown ones.
pub type CodecOptions = toml::Table;

#[derive(Debug, Clone, PartialEq, Error)]
pub enum CodecConfigError {
    #[error("unknown codec `{id}` (built-in codecs: {})", BUILTIN_IDS.join(", "))]
    UnknownCodec { id: String },
    #[error("codec `{codec}`: bad option `{key}`: {reason}")]
    BadOption {
        codec: &'static str,
        key: String,
        reason: String,
    },
}

const BUILTIN_IDS: &[&str] = &[cjt188::ID, milesight::ID, dragino::ID, wmbus::ID];

/// Ids of the built-in codecs, in a stable order.
pub fn builtin_ids() -> &'static [&'static str] {
    BUILTIN_IDS
}

/// The built-in codec `id` with its default options, or `None` if there is no such codec.
pub fn builtin(id: &str) -> Option<Arc<dyn Codec>> {
    build(id, &CodecOptions::new()).ok()
}

/// The built-in codec `id` configured with `options`.
pub fn build(id: &str, options: &CodecOptions) -> Result<Arc<dyn Codec>, CodecConfigError> {
    Ok(match id {
        cjt188::ID => Arc::new(cjt188::Cjt188Codec::from_options(options)?),
        milesight::ID => Arc::new(milesight::MilesightCodec::from_options(options)?),
        dragino::ID => Arc::new(dragino::DraginoCodec::from_options(options)?),
        wmbus::ID => Arc::new(wmbus::WmbusCodec::from_options(options)?),
        _ => return Err(CodecConfigError::UnknownCodec { id: id.to_owned() }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_id_builds() {
        for id in builtin_ids() {
            let codec = builtin(id).expect("listed codec builds with defaults");
            assert_eq!(codec.id(), *id);
        }
        assert!(matches!(
            build("nope", &CodecOptions::new()),
            Err(CodecConfigError::UnknownCodec { .. })
        ));
    }
}
