//! Every response the CoAP source sends is built here, and here only, so the
//! amplification rule (RFC 7252 §11.3: no response larger than the request it answers)
//! holds by construction: [`encode`] never returns more bytes than the request had.
//!
//! How an [`Outcome`] becomes a response code is decided here as well ([`for_outcome`]):
//!
//! | outcome                         | response                                  |
//! |---------------------------------|-------------------------------------------|
//! | `Committed { downlink }`        | 2.04 Changed, payload = downlink or empty |
//! | `Undecodable { code, .. }`      | 4.00, diagnostic payload = `code`         |
//! | `Rejected(UnknownDevice)`       | 4.04                                      |
//! | `Rejected(BadToken)`            | 4.01                                      |
//! | `Rejected(NoProfile)`           | 5.03 + Max-Age 60 s                       |
//! | `Rejected(Unavailable { r })`   | 5.03 + Max-Age r                          |
//! | no outcome (pipeline dropped it)| 5.03 + Max-Age (busy)                     |
//!
//! `NoProfile` is 5.03, not 4.04: the device *is* registered and nothing about its request
//! is wrong — the gateway is missing the profile (removed or broken by a reload). A 4.xx
//! tells a device not to repeat the request, so its data would be lost for an operator's
//! mistake; 5.03 + Max-Age makes it retry, slowly, until the profile is back.
//!
//! When a response does not fit: a diagnostic payload is cut (at a character boundary);
//! a downlink is never cut (a partial command is worse than none) but withheld, and the
//! caller logs it; as a last resort the response loses its options too and is the bare
//! code, which always fits (the request carried at least the same header and token).

use std::time::Duration;

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};

use super::events::Refused;
use super::request::{uint_bytes, Block, Token, LINK_FORMAT};
use crate::pipeline::{Outcome, Reject};

/// Where a response goes: the request's exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplyTo {
    pub mid: u16,
    pub token: Token,
    /// Size of the request datagram: the response may not be larger.
    pub request_len: usize,
    /// The request's Block1 option, echoed in every response to it (RFC 7959 §2.3).
    pub block1: Option<Block>,
}

/// A response's content, independent of the exchange it answers (so a cached one can be
/// sent again for a retransmission from a new address, with that request's MID and token).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reply {
    pub code: ResponseType,
    pub max_age: Option<u32>,
    pub size1: Option<u32>,
    pub content_format: Option<u32>,
    pub block2: Option<Block>,
    pub payload: Payload,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Payload {
    Empty,
    /// Human-readable diagnostic (§5.5.2): may be cut to fit.
    Diagnostic(Bytes),
    /// Data the device acts on (a downlink, a block of a resource): whole or not at all.
    Data(Bytes),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Empty => 0,
            Payload::Diagnostic(b) | Payload::Data(b) => b.len(),
        }
    }
}

impl Reply {
    pub(crate) fn code(code: ResponseType) -> Reply {
        Reply {
            code,
            max_age: None,
            size1: None,
            content_format: None,
            block2: None,
            payload: Payload::Empty,
        }
    }

    /// 5.03 Service Unavailable with Max-Age = `retry_after`, rounded up to whole seconds.
    pub(crate) fn unavailable(retry_after: Duration) -> Reply {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        Reply {
            max_age: Some(u32::try_from(secs.max(1)).unwrap_or(u32::MAX)),
            ..Reply::code(ResponseType::ServiceUnavailable)
        }
    }

    /// Bytes this reply keeps on the heap when cached.
    pub(crate) fn heap_size(&self) -> usize {
        self.payload.len()
    }
}

/// A response ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    pub bytes: Vec<u8>,
    /// A downlink was left out because it would have made the response larger than the
    /// request; the caller logs it.
    pub withheld_downlink: bool,
}

/// Encodes `reply` as the piggybacked ACK for `to`, never larger than the request.
pub(crate) fn encode(reply: &Reply, to: &ReplyTo) -> Encoded {
    let full = build(reply, to);
    if full.len() <= to.request_len {
        return Encoded {
            bytes: full,
            withheld_downlink: false,
        };
    }
    let over = full.len() - to.request_len;
    let mut smaller = reply.clone();
    let mut withheld_downlink = false;
    match &reply.payload {
        Payload::Diagnostic(text) if text.len() > over => {
            // Cut at a UTF-8 boundary: a diagnostic is text (§5.5.2).
            let mut keep = text.len() - over;
            while keep > 0 && std::str::from_utf8(&text[..keep]).is_err() {
                keep -= 1;
            }
            smaller.payload = Payload::Diagnostic(text.slice(..keep));
        }
        Payload::Data(_) => {
            withheld_downlink = reply.code == ResponseType::Changed;
            smaller.payload = Payload::Empty;
        }
        Payload::Diagnostic(_) | Payload::Empty => smaller.payload = Payload::Empty,
    }
    let cut = build(&smaller, to);
    let bytes = if cut.len() <= to.request_len {
        cut
    } else {
        bare(reply.code, to)
    };
    Encoded {
        bytes,
        withheld_downlink,
    }
}

/// The RST for a CoAP ping (§4.3): 4 bytes, like the ping.
pub(crate) fn reset(mid: u16) -> [u8; 4] {
    let [hi, lo] = mid.to_be_bytes();
    [0x70, 0x00, hi, lo]
}

fn build(reply: &Reply, to: &ReplyTo) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Acknowledgement);
    p.header.code = MessageClass::Response(reply.code);
    p.header.message_id = to.mid;
    p.set_token(to.token.as_slice().to_vec());
    if let Some(cf) = reply.content_format {
        p.add_option(CoapOption::ContentFormat, uint_bytes(cf));
    }
    if let Some(age) = reply.max_age {
        p.add_option(CoapOption::MaxAge, uint_bytes(age));
    }
    if let Some(b) = reply.block2 {
        p.add_option(CoapOption::Block2, b.encode());
    }
    if let Some(b) = to.block1 {
        p.add_option(CoapOption::Block1, b.encode());
    }
    if let Some(s) = reply.size1 {
        p.add_option(CoapOption::Size1, uint_bytes(s));
    }
    match &reply.payload {
        Payload::Empty => {}
        Payload::Diagnostic(b) | Payload::Data(b) => p.payload = b.to_vec(),
    }
    // Cannot fail without a size limit; the bare code is the safe answer if it ever did.
    p.to_bytes_unlimited()
        .unwrap_or_else(|_| bare(reply.code, to))
}

/// Header and token only.
fn bare(code: ResponseType, to: &ReplyTo) -> Vec<u8> {
    let token = to.token.as_slice();
    let [hi, lo] = to.mid.to_be_bytes();
    // Version 1, type ACK (2), TKL.
    let mut out = vec![
        0x60 | token.len() as u8,
        u8::from(MessageClass::Response(code)),
        hi,
        lo,
    ];
    out.extend_from_slice(token);
    out
}

/// How the source reacts to an outcome: the reply, whether the uplink is stored (so a
/// retransmission must not be submitted again), and the reason it was refused, if it was.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decided {
    pub reply: Reply,
    pub stored: bool,
    pub refused: Option<Refused>,
}

/// Maps an outcome (`None`: the pipeline dropped the reply channel without one) to a
/// reply; see the module docs for the table and the `NoProfile` decision.
pub(crate) fn for_outcome(
    outcome: Option<Outcome>,
    busy_retry_after: Duration,
    no_profile_retry_after: Duration,
) -> Decided {
    use ResponseType::*;
    let refused = |reply, why| Decided {
        reply,
        stored: false,
        refused: Some(why),
    };
    match outcome {
        Some(Outcome::Committed { downlink, .. }) => Decided {
            reply: Reply {
                payload: downlink.map_or(Payload::Empty, Payload::Data),
                ..Reply::code(Changed)
            },
            stored: true,
            refused: None,
        },
        Some(Outcome::Undecodable { code, .. }) => Decided {
            reply: Reply {
                payload: Payload::Diagnostic(Bytes::from_static(code.as_bytes())),
                ..Reply::code(BadRequest)
            },
            stored: true,
            refused: None,
        },
        Some(Outcome::Rejected(Reject::UnknownDevice)) => {
            refused(Reply::code(NotFound), Refused::UnknownDevice)
        }
        Some(Outcome::Rejected(Reject::BadToken)) => {
            refused(Reply::code(Unauthorized), Refused::BadToken)
        }
        Some(Outcome::Rejected(Reject::NoProfile)) => refused(
            Reply::unavailable(no_profile_retry_after),
            Refused::NoProfile,
        ),
        Some(Outcome::Rejected(Reject::Unavailable { retry_after })) => {
            refused(Reply::unavailable(retry_after), Refused::Unavailable)
        }
        None => refused(Reply::unavailable(busy_retry_after), Refused::Unavailable),
    }
}

/// `GET /.well-known/core` (RFC 6690): `doc` whole, with Content-Format 40, if that fits
/// the request's size; else one Block2 slice (RFC 7959) of the largest size that fits.
///
/// Slices carry no Content-Format: libcoap's plain discovery GET (25 bytes) leaves room
/// for a 16-byte block only without it, and clients (libcoap among them) refuse a
/// representation whose blocks disagree on Content-Format. The resource is link-format
/// and nothing else (RFC 6690 §4), so nothing is lost. A request too small for even one
/// 16-byte block gets 4.01 Unauthorized: the amplification rule forbids the answer, and a
/// client sending a larger request (e.g. with Uri-Host) gets one.
pub(crate) fn discovery(doc: &Bytes, block2: Option<Block>, to: &ReplyTo) -> Vec<u8> {
    let whole = Reply {
        content_format: Some(LINK_FORMAT),
        payload: Payload::Data(doc.clone()),
        ..Reply::code(ResponseType::Content)
    };
    if block2.is_none() {
        let bytes = build(&whole, to);
        if bytes.len() <= to.request_len {
            return bytes;
        }
    }
    let asked = block2.unwrap_or(Block {
        num: 0,
        more: false,
        szx: 6,
    });
    let offset = (asked.num as usize).saturating_mul(asked.size());
    if offset >= doc.len() && offset > 0 {
        return bare(ResponseType::BadOption, to);
    }
    for szx in (0..=asked.szx).rev() {
        let size = 16usize << szx;
        let num = offset / size;
        let start = num * size;
        let end = (start + size).min(doc.len());
        let reply = Reply {
            block2: Some(Block {
                num: u32::try_from(num).unwrap_or(u32::MAX),
                more: end < doc.len(),
                szx,
            }),
            payload: Payload::Data(doc.slice(start..end)),
            ..Reply::code(ResponseType::Content)
        };
        let bytes = build(&reply, to);
        if bytes.len() <= to.request_len {
            return bytes;
        }
    }
    bare(ResponseType::Unauthorized, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(request_len: usize) -> ReplyTo {
        ReplyTo {
            mid: 0x0102,
            token: Token::new(&[0xAA]).unwrap(),
            request_len,
            block1: None,
        }
    }

    #[test]
    fn a_reply_that_fits_is_sent_whole() {
        let r = Reply {
            payload: Payload::Data(Bytes::from_static(b"\x01\x02")),
            ..Reply::code(ResponseType::Changed)
        };
        let e = encode(&r, &to(100));
        // ACK, TKL 1, 2.04, MID 0x0102, token AA, payload marker, payload.
        assert_eq!(
            e.bytes,
            vec![0x61, 0x44, 0x01, 0x02, 0xAA, 0xFF, 0x01, 0x02]
        );
        assert!(!e.withheld_downlink);
    }

    #[test]
    fn options_are_encoded_in_order() {
        let r = Reply {
            size1: Some(1024),
            max_age: Some(30),
            ..Reply::code(ResponseType::RequestEntityTooLarge)
        };
        let t = ReplyTo {
            block1: Some(Block {
                num: 2,
                more: true,
                szx: 2,
            }),
            ..to(100)
        };
        // Max-Age (14): delta 13+1, len 1, 30; Block1 (27): delta 13+0, len 1, 0x2A;
        // Size1 (60): delta 13+20, len 2, 0x0400.
        assert_eq!(
            encode(&r, &t).bytes,
            vec![0x61, 0x8D, 1, 2, 0xAA, 0xD1, 1, 30, 0xD1, 0, 0x2A, 0xD2, 20, 4, 0]
        );
    }

    #[test]
    fn a_diagnostic_is_cut_to_the_request_size() {
        let r = Reply {
            payload: Payload::Diagnostic(Bytes::from_static(b"checksum_mismatch")),
            ..Reply::code(ResponseType::BadRequest)
        };
        // Header 4 + token 1 + marker 1 = 6: a 10-byte request leaves 4 payload bytes.
        let e = encode(&r, &to(10));
        assert_eq!(
            e.bytes,
            vec![0x61, 0x80, 1, 2, 0xAA, 0xFF, b'c', b'h', b'e', b'c']
        );
        // 6 bytes: no room for any payload (the marker goes too).
        assert_eq!(encode(&r, &to(6)).bytes, vec![0x61, 0x80, 1, 2, 0xAA]);
        // Cut at a character boundary.
        let r = Reply {
            payload: Payload::Diagnostic(Bytes::from("aé".as_bytes().to_vec())),
            ..Reply::code(ResponseType::BadRequest)
        };
        assert_eq!(
            encode(&r, &to(8)).bytes,
            vec![0x61, 0x80, 1, 2, 0xAA, 0xFF, b'a']
        );
    }

    #[test]
    fn a_downlink_is_withheld_not_cut() {
        let r = Reply {
            payload: Payload::Data(Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8])),
            ..Reply::code(ResponseType::Changed)
        };
        let e = encode(&r, &to(10));
        assert_eq!(e.bytes, vec![0x61, 0x44, 1, 2, 0xAA]);
        assert!(e.withheld_downlink);
    }

    #[test]
    fn options_that_do_not_fit_leave_the_bare_code() {
        let r = Reply {
            max_age: Some(70_000),
            ..Reply::code(ResponseType::ServiceUnavailable)
        };
        assert_eq!(encode(&r, &to(5)).bytes, vec![0x61, 0xA3, 1, 2, 0xAA]);
    }

    #[test]
    fn max_age_rounds_up_to_a_second() {
        assert_eq!(
            Reply::unavailable(Duration::from_millis(1500)).max_age,
            Some(2)
        );
        assert_eq!(Reply::unavailable(Duration::ZERO).max_age, Some(1));
        assert_eq!(
            Reply::unavailable(Duration::from_secs(30)).max_age,
            Some(30)
        );
    }

    #[test]
    fn outcomes_map_to_codes() {
        let busy = Duration::from_secs(2);
        let np = Duration::from_secs(60);
        let d = |o| for_outcome(o, busy, np);
        let c = d(Some(Outcome::Committed {
            readings: 1,
            downlink: None,
        }));
        assert_eq!(
            (c.reply, c.stored, c.refused),
            (Reply::code(ResponseType::Changed), true, None)
        );
        let u = d(Some(Outcome::Undecodable {
            code: "too_short",
            message: "x".into(),
        }));
        assert_eq!(u.reply.code, ResponseType::BadRequest);
        assert_eq!(
            u.reply.payload,
            Payload::Diagnostic(Bytes::from_static(b"too_short"))
        );
        assert!(u.stored);
        let cases = [
            (
                Reject::UnknownDevice,
                ResponseType::NotFound,
                None,
                Refused::UnknownDevice,
            ),
            (
                Reject::BadToken,
                ResponseType::Unauthorized,
                None,
                Refused::BadToken,
            ),
            (
                Reject::NoProfile,
                ResponseType::ServiceUnavailable,
                Some(60),
                Refused::NoProfile,
            ),
            (
                Reject::Unavailable {
                    retry_after: Duration::from_secs(7),
                },
                ResponseType::ServiceUnavailable,
                Some(7),
                Refused::Unavailable,
            ),
        ];
        for (reject, code, age, why) in cases {
            let r = d(Some(Outcome::Rejected(reject)));
            assert_eq!(
                (r.reply.code, r.reply.max_age, r.stored, r.refused),
                (code, age, false, Some(why))
            );
        }
        let gone = d(None);
        assert_eq!(
            (gone.reply.max_age, gone.refused),
            (Some(2), Some(Refused::Unavailable))
        );
    }

    #[test]
    fn discovery_fits_the_request() {
        let doc = Bytes::from_static(br#"</up>;rt="nbiot.uplink";ct=42"#);
        assert_eq!(doc.len(), 29);
        // A request big enough for the whole document (4 + 1 + 2 CF + 1 + 29 = 37).
        let whole = discovery(&doc, None, &to(37));
        assert_eq!(whole.len(), 37);
        assert_eq!(&whole[5..8], &[0xC1, 40, 0xFF]);
        // libcoap's plain GET is 25 bytes with a 1-byte token: a 16-byte block fits only
        // without Content-Format (4 + 1 + 3 Block2 (delta 23 takes an extra byte) + 1 + 16).
        let first = discovery(&doc, None, &to(25));
        assert_eq!(first.len(), 25);
        let p = Packet::from_bytes(&first).unwrap();
        assert_eq!(p.get_first_option(CoapOption::Block2), Some(&vec![0x08])); // NUM 0, M, 16
        assert_eq!(p.get_first_option(CoapOption::ContentFormat), None);
        assert_eq!(p.payload, doc[..16].to_vec());
        // Its follow-up carries Block2 (27 bytes): the last 13 bytes, again without
        // Content-Format (blocks must agree).
        let next = discovery(
            &doc,
            Some(Block {
                num: 1,
                more: false,
                szx: 0,
            }),
            &to(27),
        );
        let p = Packet::from_bytes(&next).unwrap();
        assert!(next.len() <= 27);
        assert_eq!(p.get_first_option(CoapOption::Block2), Some(&vec![0x10])); // NUM 1, last
        assert_eq!(p.get_first_option(CoapOption::ContentFormat), None);
        assert_eq!(p.payload, doc[16..].to_vec());
        // A block size smaller than asked renumbers the block (RFC 7959 §2.4).
        let long = Bytes::from(vec![b'x'; 100]);
        let scaled = discovery(
            &long,
            Some(Block {
                num: 1,
                more: false,
                szx: 1,
            }),
            &to(40),
        );
        let p = Packet::from_bytes(&scaled).unwrap();
        // Bytes 32..48 as block 2 of 16 bytes.
        assert_eq!(p.get_first_option(CoapOption::Block2), Some(&vec![0x28]));
        assert_eq!(p.payload.len(), 16);
        // Past the end: 4.02.
        let past = discovery(
            &doc,
            Some(Block {
                num: 2,
                more: false,
                szx: 0,
            }),
            &to(40),
        );
        assert_eq!(past[1], 0x82);
        // Too small for any block: 4.01, header and token only.
        assert_eq!(discovery(&doc, None, &to(24)), vec![0x61, 0x81, 1, 2, 0xAA]);
    }

    #[test]
    fn reset_echoes_the_message_id() {
        assert_eq!(reset(0xBEEF), [0x70, 0x00, 0xBE, 0xEF]);
    }
}
