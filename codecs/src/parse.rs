//! Shared nom plumbing for the codecs: an error type that implements nom's [`ParseError`]
//! and remembers where in the payload it happened, and the conversion to [`DecodeError`].
//!
//! Codecs parse `&[u8]` with nom's `complete` combinators and the [`PResult`] alias. A
//! failure inside nom (input too short) becomes [`DecodeError::Truncated`]; codec-specific
//! failures are raised with [`fail`] carrying a [`DecodeError`] whose `offset` is filled in
//! from the remaining input by [`finish`].

use nom::error::{ErrorKind, ParseError};
use nom::IResult;

use crate::DecodeError;

/// A parse error: the input that remained when it happened, plus what went wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct PError<'a> {
    pub input: &'a [u8],
    pub kind: PErrorKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PErrorKind {
    /// nom ran out of input (or a nom combinator failed) while reading `what`.
    Nom { what: &'static str, needed: usize },
    /// A codec-level error. Its `offset` is relative to `input` and fixed up by [`finish`].
    Decode(DecodeError),
}

pub type PResult<'a, T> = IResult<&'a [u8], T, PError<'a>>;

impl<'a> ParseError<&'a [u8]> for PError<'a> {
    fn from_error_kind(input: &'a [u8], _kind: ErrorKind) -> Self {
        PError {
            input,
            kind: PErrorKind::Nom {
                what: "field",
                needed: 1,
            },
        }
    }

    fn append(_input: &'a [u8], _kind: ErrorKind, other: Self) -> Self {
        other
    }
}

/// Raises a codec error at `input`. Use offset 0 in `err`: [`finish`] makes it absolute.
pub fn fail<T>(input: &[u8], err: DecodeError) -> PResult<'_, T> {
    Err(nom::Err::Failure(PError {
        input,
        kind: PErrorKind::Decode(err),
    }))
}

/// Reads exactly `n` bytes or fails with `Truncated { what }`.
pub fn take_n<'a>(input: &'a [u8], n: usize, what: &'static str) -> PResult<'a, &'a [u8]> {
    if input.len() < n {
        return Err(nom::Err::Error(PError {
            input,
            kind: PErrorKind::Nom {
                what,
                needed: n - input.len(),
            },
        }));
    }
    let (head, tail) = input.split_at(n);
    Ok((tail, head))
}

/// Maps a nom result over `payload` to a [`DecodeError`] with absolute byte offsets.
pub fn finish<T>(payload: &[u8], res: Result<T, nom::Err<PError<'_>>>) -> Result<T, DecodeError> {
    match res {
        Ok(v) => Ok(v),
        Err(nom::Err::Incomplete(needed)) => Err(DecodeError::Truncated {
            what: "frame",
            offset: payload.len(),
            needed: match needed {
                nom::Needed::Size(n) => n.get(),
                nom::Needed::Unknown => 1,
            },
        }),
        Err(nom::Err::Error(e)) | Err(nom::Err::Failure(e)) => {
            let at = payload.len().saturating_sub(e.input.len());
            Err(match e.kind {
                PErrorKind::Nom { what, needed } => DecodeError::Truncated {
                    what,
                    offset: at,
                    needed,
                },
                PErrorKind::Decode(d) => with_offset(d, at),
            })
        }
    }
}

/// Adds `at` to the offset of an error raised relative to a sub-slice.
pub fn with_offset(err: DecodeError, at: usize) -> DecodeError {
    use DecodeError::*;
    match err {
        Truncated {
            what,
            offset,
            needed,
        } => Truncated {
            what,
            offset: offset + at,
            needed,
        },
        BadConstant {
            what,
            offset,
            expected,
            found,
        } => BadConstant {
            what,
            offset: offset + at,
            expected,
            found,
        },
        UnknownType { what, code, offset } => UnknownType {
            what,
            code,
            offset: offset + at,
        },
        InvalidValue {
            what,
            offset,
            reason,
        } => InvalidValue {
            what,
            offset: offset + at,
            reason,
        },
        TrailingBytes { offset, count } => TrailingBytes {
            offset: offset + at,
            count,
        },
        Encoding { offset, reason } => Encoding {
            offset: offset + at,
            reason,
        },
        e @ (Empty | Checksum { .. }) => e,
    }
}

/// Decodes packed BCD digits (high nibble first within a byte) into a number.
/// Returns `None` when a nibble is not a decimal digit.
pub fn bcd_to_u64(bytes: impl IntoIterator<Item = u8>) -> Option<u64> {
    let mut v: u64 = 0;
    for b in bytes {
        let (hi, lo) = (b >> 4, b & 0x0f);
        if hi > 9 || lo > 9 {
            return None;
        }
        v = v
            .checked_mul(100)?
            .checked_add(u64::from(hi) * 10 + u64::from(lo))?;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcd_digits() {
        assert_eq!(bcd_to_u64([0x12, 0x34]), Some(1234));
        assert_eq!(bcd_to_u64([0x1a]), None);
        assert_eq!(bcd_to_u64([]), Some(0));
    }

    #[test]
    fn truncation_names_offset() {
        let payload = [1u8, 2, 3];
        let res = take_n(&payload[1..], 5, "distance").map(|(_, v)| v);
        assert_eq!(
            finish(&payload, res),
            Err(DecodeError::Truncated {
                what: "distance",
                offset: 1,
                needed: 3
            })
        );
    }
}
