//! PLACEHOLDER — the declarative layout codec is being written; replace this whole module.
//! (The lead put the agreed API shape here so the gateway compiles meanwhile.)

use std::ops::Range;

use serde::Deserialize;

use crate::{Codec, DecodeError, Reading};

#[derive(Debug, Deserialize)]
pub struct LayoutSpec {}

#[derive(Debug)]
pub struct LayoutCodec;

#[derive(Debug)]
pub struct LayoutError {
    pub span: Option<Range<usize>>,
    pub message: String,
}

pub fn compile(_spec: &LayoutSpec) -> Result<LayoutCodec, LayoutError> {
    Err(LayoutError { span: None, message: "not yet".into() })
}

impl Codec for LayoutCodec {
    fn id(&self) -> &str {
        "layout"
    }
    fn decode(&self, _payload: &[u8]) -> Result<Vec<Reading>, DecodeError> {
        Err(DecodeError::Empty)
    }
}
