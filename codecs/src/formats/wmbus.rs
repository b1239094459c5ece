//! PLACEHOLDER — being written; replace this whole file.

use crate::registry::{CodecConfigError, CodecOptions};
use crate::{Codec, DecodeError, Reading};

pub const ID: &str = "wmbus";

#[derive(Debug, Clone, Default)]
pub struct WmbusCodec;

impl WmbusCodec {
    pub fn from_options(options: &CodecOptions) -> Result<Self, CodecConfigError> {
        super::deny_unknown_options(ID, options, &[])?;
        Ok(WmbusCodec)
    }
}

impl Codec for WmbusCodec {
    fn id(&self) -> &str {
        ID
    }

    fn decode(&self, payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        let _ = ("water_meter", payload);
        Err(DecodeError::Empty)
    }
}
