//! PLACEHOLDER — being written; replace this whole file.

use crate::registry::{CodecConfigError, CodecOptions};
use crate::{Codec, DecodeError, Reading};

pub const ID: &str = "cjt188";

#[derive(Debug, Clone, Default)]
pub struct Cjt188Codec;

impl Cjt188Codec {
    pub fn from_options(options: &CodecOptions) -> Result<Self, CodecConfigError> {
        super::deny_unknown_options(ID, options, &[])?;
        Ok(Cjt188Codec)
    }
}

impl Codec for Cjt188Codec {
    fn id(&self) -> &str {
        ID
    }

    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        let _ = ("water_meter", payload);
        Err(DecodeError::Empty)
    }
}
