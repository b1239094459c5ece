//! Hex text ⇄ bytes, for ASCII-hex transports (Dragino NB-IoT, MQTT `encoding = "hex"`)
//! and for the command line.

use crate::{DecodeError, Text};

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes hex text. ASCII whitespace between byte pairs (`"68 10 44"`) is allowed, as are
/// a leading `0x` and a trailing newline; anything else is an [`DecodeError::Encoding`] error.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(text.len() / 2);
    walk(text, |b| out.push(b))?;
    Ok(out)
}

/// [`decode`] into `buf`, without allocating: `Ok(Some(n))` when the `n` decoded bytes fit
/// (they are `buf[..n]`), `Ok(None)` when the text holds more than `buf.len()` bytes (then
/// call [`decode`]; the text may still be invalid further on), or the error `decode` gives.
pub fn decode_into(text: &[u8], buf: &mut [u8]) -> Result<Option<usize>, DecodeError> {
    let mut n = 0;
    let mut fits = true;
    walk(text, |b| match buf.get_mut(n) {
        Some(slot) if fits => {
            *slot = b;
            n += 1;
        }
        _ => fits = false,
    })?;
    Ok(fits.then_some(n))
}

/// Walks hex text as [`decode`] reads it, handing each decoded byte to `out`.
fn walk(text: &[u8], mut out: impl FnMut(u8)) -> Result<(), DecodeError> {
    let body = text.strip_prefix(b"0x").unwrap_or(text);
    let base = text.len() - body.len();
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let hi = nibble(c).ok_or(DecodeError::Encoding {
            offset: base + i,
            reason: "not a hex digit",
        })?;
        let lo = body
            .get(i + 1)
            .copied()
            .ok_or(DecodeError::Encoding {
                offset: base + i,
                reason: "odd number of hex digits",
            })
            .and_then(|c| {
                nibble(c).ok_or(DecodeError::Encoding {
                    offset: base + i + 1,
                    reason: "not a hex digit",
                })
            })?;
        out(hi << 4 | lo);
        i += 2;
    }
    Ok(())
}

/// Lower-case hex of `bytes`, no separators.
pub fn encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Lower-case hex of `bytes` as a [`Text`]: inline (no allocation) up to 8 bytes.
pub fn encode_text(bytes: &[u8]) -> Text {
    encode_text_ordered(bytes, false)
}

/// Lower-case hex of `bytes`, last byte first when `reversed` (little-endian numbers and
/// addresses printed most significant first), as a [`Text`].
pub fn encode_text_ordered(bytes: &[u8], reversed: bool) -> Text {
    text_with(bytes, reversed, b"0123456789abcdef")
}

/// Hex of `bytes` with the digits `digits` (lower or upper case), last byte first when
/// `reversed`. Up to 8 bytes, the digits are packed into two words in registers and the
/// text is inline (see [`Text`]).
pub(crate) fn text_with(bytes: &[u8], reversed: bool, digits: &[u8; 16]) -> Text {
    let pair = |b: &u8| [digits[usize::from(b >> 4)], digits[usize::from(b & 0xf)]];
    if bytes.len() <= Text::INLINE_CAP / 2 {
        let mut words = [0u64; Text::INLINE_CAP / 8];
        let mut put = |i: usize, b: &u8| {
            let [hi, lo] = pair(b);
            if let Some(w) = words.get_mut(i / 4) {
                *w |= (u64::from(hi) | u64::from(lo) << 8) << (16 * (i % 4));
            }
        };
        if reversed {
            bytes.iter().rev().enumerate().for_each(|(i, b)| put(i, b));
        } else {
            bytes.iter().enumerate().for_each(|(i, b)| put(i, b));
        }
        // Hex digits are ASCII.
        return Text::from_ascii_words(words).unwrap_or_default();
    }
    let mut s = String::with_capacity(2 * bytes.len());
    let mut push = |b: &u8| pair(b).iter().for_each(|&c| s.push(char::from(c)));
    if reversed {
        bytes.iter().rev().for_each(&mut push);
    } else {
        bytes.iter().for_each(&mut push);
    }
    Text::from(s)
}

/// True when every byte is a hex digit (and there is an even, non-zero number of them):
/// how ASCII-hex transports are recognised.
pub fn is_hex_text(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.len() % 2 == 0 && bytes.iter().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_with_spaces_and_prefix() {
        assert_eq!(decode(b"0x68 10\n"), Ok(vec![0x68, 0x10]));
        assert_eq!(encode(&[0xfe, 0x01]), "fe01");
    }

    #[test]
    fn decodes_into_a_buffer_when_it_fits() {
        let mut buf = [0u8; 2];
        assert_eq!(decode_into(b"0x68 10\n", &mut buf), Ok(Some(2)));
        assert_eq!(buf, [0x68, 0x10]);
        assert_eq!(decode_into(b"681016", &mut buf), Ok(None));
        assert_eq!(decode_into(b"", &mut buf), Ok(Some(0)));
        assert_eq!(
            decode_into(b"68 1g", &mut buf),
            Err(DecodeError::Encoding {
                offset: 4,
                reason: "not a hex digit"
            })
        );
    }

    #[test]
    fn encodes_text_inline_and_on_the_heap() {
        assert_eq!(encode_text(&[0xfe, 0x01]), "fe01");
        assert_eq!(encode_text_ordered(&[0xfe, 0x01], true), "01fe");
        let long: Vec<u8> = (0u8..12).collect();
        assert_eq!(encode_text(&long), encode(&long).as_str());
        let mut rev = long.clone();
        rev.reverse();
        assert_eq!(encode_text_ordered(&long, true), encode(&rev).as_str());
        assert_eq!(encode_text(&[]), "");
    }

    #[test]
    fn names_bad_digit() {
        assert_eq!(
            decode(b"6g"),
            Err(DecodeError::Encoding {
                offset: 1,
                reason: "not a hex digit"
            })
        );
        assert_eq!(
            decode(b"681"),
            Err(DecodeError::Encoding {
                offset: 2,
                reason: "odd number of hex digits"
            })
        );
    }
}
