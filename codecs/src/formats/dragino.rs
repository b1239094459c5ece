//! PLACEHOLDER — being written; replace this whole file.

use crate::registry::{CodecConfigError, CodecOptions};
use crate::{Codec, DecodeError, Reading};

pub const ID: &str = "dragino";

#[derive(Debug, Clone, Default)]
pub struct DraginoCodec;

impl DraginoCodec {
    pub fn from_options(options: &CodecOptions) -> Result<Self, CodecConfigError> {
        super::deny_unknown_options(ID, options, &[])?;
        Ok(DraginoCodec)
    }
}

impl Codec for DraginoCodec {
    fn id(&self) -> &str {
        ID
    }

    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        let _ = ("dragino", payload);
        Err(DecodeError::Empty)
    }
}
