//! Hex text ⇄ bytes, for ASCII-hex transports (Dragino NB-IoT, MQTT `encoding = "hex"`)
//! and for the command line.

use crate::DecodeError;

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
    let body = text.strip_prefix(b"0x").unwrap_or(text);
    let base = text.len() - body.len();
    let mut out = Vec::with_capacity(body.len() / 2);
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
        out.push(hi << 4 | lo);
        i += 2;
    }
    Ok(out)
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
