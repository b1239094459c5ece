//! PLACEHOLDER — being written; replace this whole file.

use crate::registry::{CodecConfigError, CodecOptions};
use crate::{Codec, DecodeError, Reading};

pub const ID: &str = "milesight";

#[derive(Debug, Clone, Default)]
pub struct MilesightCodec;

impl MilesightCodec {
    pub fn from_options(options: &CodecOptions) -> Result<Self, CodecConfigError> {
        super::deny_unknown_options(ID, options, &[])?;
        Ok(MilesightCodec)
    }
}

impl Codec for MilesightCodec {
    fn id(&self) -> &str {
        ID
    }

    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        let _ = ("milesight", payload);
        Err(DecodeError::Empty)
    }
}
