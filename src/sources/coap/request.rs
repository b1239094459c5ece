//! One datagram in, one decision out: what kind of message it is and, for a request,
//! which resource it targets or why it is refused. Pure: no socket, no clock, no state —
//! deduplication and reassembly come after, in the server.
//!
//! coap-lite does the byte-level decoding; this module adds what coap-lite leaves to a
//! server: the version check, code classes, empty-message rules (RFC 7252 §4.1),
//! critical-option handling (§5.4.1), routing, and the limits that protect us.

use coap_lite::{CoapOption, Packet, ResponseType};

use super::events::{Dropped, Refused};
use super::PathTemplate;

/// A CoAP token (0–8 bytes, RFC 7252 §5.3.1), stored inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Token {
    len: u8,
    bytes: [u8; 8],
}

impl Token {
    pub(crate) fn new(token: &[u8]) -> Option<Token> {
        let mut bytes = [0u8; 8];
        bytes.get_mut(..token.len())?.copy_from_slice(token);
        Some(Token {
            len: token.len() as u8,
            bytes,
        })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(8)]
    }
}

/// A Block1/Block2 option value (RFC 7959 §2.2): block number, more flag, size exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub num: u32,
    pub more: bool,
    /// Block size is `16 << szx`; 7 is reserved (BERT, not for UDP) and refused on parse.
    pub szx: u8,
}

impl Block {
    /// Parses an option value of 0–3 bytes; `None` if longer or SZX = 7.
    pub(crate) fn parse(value: &[u8]) -> Option<Block> {
        if value.len() > 3 {
            return None;
        }
        let v = value.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b));
        let szx = (v & 0x7) as u8;
        if szx == 7 {
            return None;
        }
        Some(Block {
            num: v >> 4,
            more: v & 0x8 != 0,
            szx,
        })
    }

    pub(crate) fn size(self) -> usize {
        16 << self.szx
    }

    /// The option value, in as few bytes as it takes.
    pub(crate) fn encode(self) -> Vec<u8> {
        uint_bytes(self.num << 4 | u32::from(self.more) << 3 | u32::from(self.szx))
    }
}

/// A CoAP uint option value in as few bytes as it takes (RFC 7252 §3.2).
pub(crate) fn uint_bytes(v: u32) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

fn parse_uint(value: &[u8]) -> Option<u32> {
    if value.len() > 4 {
        return None;
    }
    Some(value.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b)))
}

/// What a datagram is.
#[derive(Debug, PartialEq)]
pub(crate) enum Inbound {
    /// Not for us to answer (counted by reason).
    Drop(Dropped),
    /// An empty CON: a "CoAP ping" (§4.3), answered with RST.
    Ping {
        mid: u16,
    },
    Request(Request),
}

/// A request and where its answer goes.
#[derive(Debug, PartialEq)]
pub(crate) struct Request {
    pub mid: u16,
    pub token: Token,
    pub confirmable: bool,
    /// The datagram's size: no response to it may be larger (§11.3).
    pub len: usize,
    pub target: Target,
}

#[derive(Debug, PartialEq)]
pub(crate) enum Target {
    /// `GET /.well-known/core`, with the Block2 option the client asked for.
    Discovery {
        block2: Option<Block>,
    },
    Uplink(UplinkRequest),
    Refuse(Refusal),
}

/// A well-formed uplink request (one block of it, with Block1).
#[derive(Debug, PartialEq)]
pub(crate) struct UplinkRequest {
    pub device: String,
    /// `?t=` (Uri-Query), if present.
    pub token: Option<String>,
    pub payload: Vec<u8>,
    pub block1: Option<Block>,
    /// Size1 (RFC 7959 §4): the total size the client announces.
    pub size1: Option<u32>,
    /// Request-Tag (RFC 9175 §3): tells concurrent uploads to one resource apart.
    pub request_tag: Option<Vec<u8>>,
}

/// An immediate error response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Refusal {
    pub code: ResponseType,
    pub why: Refused,
    /// Size1 on a 4.13: the largest payload accepted.
    pub size1: Option<u32>,
}

impl Refusal {
    pub(crate) fn new(code: ResponseType, why: Refused) -> Refusal {
        Refusal {
            code,
            why,
            size1: None,
        }
    }

    pub(crate) fn too_large(max_payload: usize) -> Refusal {
        Refusal {
            code: ResponseType::RequestEntityTooLarge,
            why: Refused::TooLarge,
            size1: Some(u32::try_from(max_payload).unwrap_or(u32::MAX)),
        }
    }
}

const OPT_REQUEST_TAG: u16 = 292;
/// Content-Format 42: application/octet-stream.
const OCTET_STREAM: u32 = 42;
/// Content-Format 40: application/link-format.
pub(crate) const LINK_FORMAT: u32 = 40;
/// Critical options (odd numbers, §5.4.1) we understand; any other critical option in a
/// request gets 4.02 Bad Option. Uri-Host and Uri-Port are accepted and ignored (we are
/// the only host here); Accept is honoured for discovery.
const KNOWN_CRITICAL: [u16; 7] = [3, 7, 11, 15, 17, 23, 27];
const PROXY_URI: u16 = 35;
const PROXY_SCHEME: u16 = 39;
/// Options that may appear once (§5.4.5): a repeat is treated as unrecognised.
const NOT_REPEATABLE: [u16; 7] = [7, 12, 17, 23, 27, 28, 60];

/// Classifies one datagram.
pub(crate) fn classify(datagram: &[u8], template: &PathTemplate, max_payload: usize) -> Inbound {
    let Ok(packet) = Packet::from_bytes(datagram) else {
        return Inbound::Drop(Dropped::NotCoap);
    };
    if packet.header.get_version() != 1 {
        return Inbound::Drop(Dropped::NotCoap);
    }
    let code = u8::from(packet.header.code);
    let mid = packet.header.message_id;
    let kind = packet.header.get_type();
    use coap_lite::MessageType::*;
    match code >> 5 {
        0 if code == 0 => {
            // Empty message: header only (§4.1); anything more is a format error.
            if !packet.get_token().is_empty()
                || packet.options().next().is_some()
                || datagram.len() > 4
            {
                return Inbound::Drop(Dropped::NotCoap);
            }
            match kind {
                Confirmable => Inbound::Ping { mid },
                // An empty NON is meaningless; ACK/RST answer messages we never send.
                NonConfirmable | Acknowledgement | Reset => Inbound::Drop(Dropped::Unexpected),
            }
        }
        0 => {
            if matches!(kind, Acknowledgement | Reset) {
                // A request can only travel as CON or NON.
                return Inbound::Drop(Dropped::NotCoap);
            }
            let Some(token) = Token::new(packet.get_token()) else {
                return Inbound::Drop(Dropped::NotCoap);
            };
            Inbound::Request(Request {
                mid,
                token,
                confirmable: kind == Confirmable,
                len: datagram.len(),
                target: route(packet, template, max_payload),
            })
        }
        // Responses: we never send a request, so none is ours.
        2 | 4 | 5 => Inbound::Drop(Dropped::Unexpected),
        // Classes 1, 6, 7 are reserved (§12.1).
        _ => Inbound::Drop(Dropped::NotCoap),
    }
}

/// For a datagram that filled the receive buffer: the MID and token of a CON POST/PUT,
/// read from the fixed header alone (the rest may be cut off), so it can get its 4.13.
pub(crate) fn truncated_head(datagram: &[u8]) -> Option<(u16, Token)> {
    let [b0, code, m0, m1, rest @ ..] = datagram else {
        return None;
    };
    let (version, kind, tkl) = (b0 >> 6, (b0 >> 4) & 0x3, usize::from(b0 & 0xF));
    // Version 1, CON, POST (0.02) or PUT (0.03).
    if version != 1 || kind != 0 || !matches!(code, 2 | 3) {
        return None;
    }
    let token = Token::new(rest.get(..tkl)?)?;
    Some((u16::from_be_bytes([*m0, *m1]), token))
}

fn route(mut packet: Packet, template: &PathTemplate, max_payload: usize) -> Target {
    use ResponseType::*;
    let refuse = |code, why| Target::Refuse(Refusal::new(code, why));
    // §5.4.1: an unrecognised critical option fails the whole request.
    for (&number, values) in packet.options() {
        if number == PROXY_URI || number == PROXY_SCHEME {
            return refuse(ProxyingNotSupported, Refused::BadRequest);
        }
        let critical = number & 1 == 1;
        if critical && !KNOWN_CRITICAL.contains(&number) {
            return refuse(BadOption, Refused::BadRequest);
        }
        // §5.4.5: a repeated non-repeatable option is treated like an unrecognised one —
        // fatal if critical; if elective, the repeats are ignored (we read the first).
        if critical && values.len() > 1 && NOT_REPEATABLE.contains(&number) {
            return refuse(BadOption, Refused::BadRequest);
        }
    }
    let mut path = Vec::new();
    for seg in packet.get_option(CoapOption::UriPath).into_iter().flatten() {
        match std::str::from_utf8(seg) {
            Ok(s) => path.push(s),
            Err(_) => return refuse(NotFound, Refused::NotFound),
        }
    }
    let code = u8::from(packet.header.code);
    const GET: u8 = 1;
    const POST: u8 = 2;
    const PUT: u8 = 3;

    if path == [".well-known", "core"] {
        if code != GET {
            return refuse(MethodNotAllowed, Refused::Method);
        }
        let accept = packet
            .get_first_option(CoapOption::Accept)
            .map(|v| parse_uint(v));
        if matches!(accept, Some(a) if a != Some(LINK_FORMAT)) {
            return refuse(NotAcceptable, Refused::BadRequest);
        }
        return match packet
            .get_first_option(CoapOption::Block2)
            .map(|v| Block::parse(v))
        {
            None => Target::Discovery { block2: None },
            Some(Some(b)) => Target::Discovery { block2: Some(b) },
            Some(None) => refuse(BadOption, Refused::BadRequest),
        };
    }
    let Some(device) = template.match_device(&path) else {
        return refuse(NotFound, Refused::NotFound);
    };
    if code != POST && code != PUT {
        return refuse(MethodNotAllowed, Refused::Method);
    }
    // An id that could never be registered cannot be a known device.
    if crate::registry::validate::check_id(device).is_err() {
        return refuse(NotFound, Refused::UnknownDevice);
    }
    match packet.get_first_option(CoapOption::ContentFormat) {
        None => {}
        Some(v) if parse_uint(v) == Some(OCTET_STREAM) => {}
        Some(_) => return refuse(UnsupportedContentFormat, Refused::UnsupportedFormat),
    }
    let mut token = None;
    for q in packet
        .get_option(CoapOption::UriQuery)
        .into_iter()
        .flatten()
    {
        let Some(value) = q.strip_prefix(b"t=") else {
            continue; // other query parameters are not ours to judge
        };
        let Ok(value) = std::str::from_utf8(value) else {
            return refuse(BadRequest, Refused::BadRequest);
        };
        if token.is_some() || value.len() > 255 {
            return refuse(BadRequest, Refused::BadRequest);
        }
        token = Some(value.to_owned());
    }
    let block1 = match packet.get_first_option(CoapOption::Block1) {
        None => None,
        Some(v) => match Block::parse(v) {
            Some(b) => Some(b),
            None => return refuse(BadRequest, Refused::BadRequest),
        },
    };
    let size1 = match packet.get_first_option(CoapOption::Size1) {
        None => None,
        Some(v) => match parse_uint(v) {
            Some(s) => Some(s),
            None => return refuse(BadRequest, Refused::BadRequest),
        },
    };
    // With Block1, Size1 is checked by the reassembly, which also forgets the upload.
    if block1.is_none() && size1.is_some_and(|s| s as usize > max_payload) {
        return Target::Refuse(Refusal::too_large(max_payload));
    }
    let request_tag = packet
        .get_first_option(CoapOption::Unknown(OPT_REQUEST_TAG))
        .cloned();
    let device = device.to_owned();
    let payload = std::mem::take(&mut packet.payload);
    match block1 {
        None if payload.len() > max_payload => {
            return Target::Refuse(Refusal::too_large(max_payload));
        }
        None => {}
        // RFC 7959 §2.2: every block but the last has exactly the block size.
        Some(b) if payload.len() > b.size() || (b.more && payload.len() != b.size()) => {
            return refuse(BadRequest, Refused::BadRequest);
        }
        Some(_) => {}
    }
    Target::Uplink(UplinkRequest {
        device,
        token,
        payload,
        block1,
        size1,
        request_tag,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use coap_lite::{MessageClass, MessageType, RequestType};

    /// A request datagram built with coap-lite (tests of every module use it).
    pub(crate) fn datagram(
        kind: MessageType,
        method: RequestType,
        mid: u16,
        token: &[u8],
        path: &str,
        options: &[(CoapOption, Vec<u8>)],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut p = Packet::new();
        p.header.set_type(kind);
        p.header.code = MessageClass::Request(method);
        p.header.message_id = mid;
        p.set_token(token.to_vec());
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        for q in query.split('&').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        for (o, v) in options {
            p.add_option(*o, v.clone());
        }
        p.payload = payload.to_vec();
        p.to_bytes_unlimited().unwrap()
    }

    fn template() -> PathTemplate {
        PathTemplate::parse("up/{device}").unwrap()
    }

    fn target(bytes: &[u8]) -> Target {
        match classify(bytes, &template(), 64) {
            Inbound::Request(r) => r.target,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn con_post(path: &str, options: &[(CoapOption, Vec<u8>)], payload: &[u8]) -> Vec<u8> {
        datagram(
            MessageType::Confirmable,
            RequestType::Post,
            0x1234,
            &[0xAB, 0xCD],
            path,
            options,
            payload,
        )
    }

    fn refused(code: ResponseType, why: Refused) -> Target {
        Target::Refuse(Refusal::new(code, why))
    }

    #[test]
    fn a_con_post_is_an_uplink_with_its_exchange() {
        let bytes = con_post("up/dev-1?t=secret-token&x=1", &[], b"\x01\x02");
        assert_eq!(
            classify(&bytes, &template(), 64),
            Inbound::Request(Request {
                mid: 0x1234,
                token: Token::new(&[0xAB, 0xCD]).unwrap(),
                confirmable: true,
                len: bytes.len(),
                target: Target::Uplink(UplinkRequest {
                    device: "dev-1".into(),
                    token: Some("secret-token".into()),
                    payload: vec![1, 2],
                    block1: None,
                    size1: None,
                    request_tag: None,
                }),
            })
        );
    }

    #[test]
    fn routing_and_option_errors() {
        use ResponseType::*;
        assert_eq!(
            target(&con_post("down/dev-1", &[], b"x")),
            refused(NotFound, Refused::NotFound)
        );
        assert_eq!(
            target(&con_post("up", &[], b"x")),
            refused(NotFound, Refused::NotFound)
        );
        assert_eq!(
            target(&con_post("up/bad id", &[], b"x")),
            refused(NotFound, Refused::UnknownDevice)
        );
        let get = datagram(
            MessageType::Confirmable,
            RequestType::Get,
            1,
            &[],
            "up/dev-1",
            &[],
            b"",
        );
        assert_eq!(target(&get), refused(MethodNotAllowed, Refused::Method));
        let post_core = con_post(".well-known/core", &[], b"");
        assert_eq!(
            target(&post_core),
            refused(MethodNotAllowed, Refused::Method)
        );
        // Content-Format 0 (text/plain) is not a raw payload.
        let text = con_post("up/dev-1", &[(CoapOption::ContentFormat, vec![])], b"x");
        assert_eq!(
            target(&text),
            refused(UnsupportedContentFormat, Refused::UnsupportedFormat)
        );
        let octets = con_post("up/dev-1", &[(CoapOption::ContentFormat, vec![42])], b"x");
        assert!(matches!(target(&octets), Target::Uplink(_)));
        // If-Match (1) is critical and not implemented; option 2049 is critical and unknown.
        let if_match = con_post("up/dev-1", &[(CoapOption::IfMatch, vec![1])], b"x");
        assert_eq!(target(&if_match), refused(BadOption, Refused::BadRequest));
        let unknown = con_post("up/dev-1", &[(CoapOption::Unknown(2049), vec![])], b"x");
        assert_eq!(target(&unknown), refused(BadOption, Refused::BadRequest));
        // An unknown elective option (even number) is ignored.
        let elective = con_post("up/dev-1", &[(CoapOption::Unknown(2048), vec![])], b"x");
        assert!(matches!(target(&elective), Target::Uplink(_)));
        let proxy = con_post(
            "up/dev-1",
            &[(CoapOption::ProxyUri, b"coap://x".to_vec())],
            b"x",
        );
        assert_eq!(
            target(&proxy),
            refused(ProxyingNotSupported, Refused::BadRequest)
        );
        let two_tokens = con_post("up/dev-1?t=aaaaaaaa&t=bbbbbbbb", &[], b"x");
        assert_eq!(
            target(&two_tokens),
            refused(BadRequest, Refused::BadRequest)
        );
        let block7 = con_post("up/dev-1", &[(CoapOption::Block1, vec![0x0F])], b"x");
        assert_eq!(target(&block7), refused(BadRequest, Refused::BadRequest));
        let twice = con_post(
            "up/dev-1",
            &[
                (CoapOption::Block1, vec![0x00]),
                (CoapOption::Block1, vec![0x10]),
            ],
            b"x",
        );
        assert_eq!(target(&twice), refused(BadOption, Refused::BadRequest));
    }

    #[test]
    fn size_limits() {
        let big = con_post("up/dev-1", &[], &[0u8; 65]);
        assert_eq!(target(&big), Target::Refuse(Refusal::too_large(64)));
        assert!(matches!(
            target(&con_post("up/dev-1", &[], &[0u8; 64])),
            Target::Uplink(_)
        ));
        let announced = con_post("up/dev-1", &[(CoapOption::Size1, vec![0x01, 0x00])], b"x");
        assert_eq!(target(&announced), Target::Refuse(Refusal::too_large(64)));
        // Block1 NUM 0, M 1, SZX 0 (16 bytes): a short non-final block is malformed.
        let short = con_post("up/dev-1", &[(CoapOption::Block1, vec![0x08])], &[0u8; 15]);
        assert_eq!(
            target(&short),
            refused(ResponseType::BadRequest, Refused::BadRequest)
        );
        let ok = con_post("up/dev-1", &[(CoapOption::Block1, vec![0x08])], &[0u8; 16]);
        match target(&ok) {
            Target::Uplink(u) => assert_eq!(
                u.block1,
                Some(Block {
                    num: 0,
                    more: true,
                    szx: 0
                })
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn discovery() {
        let get = |opts: &[(CoapOption, Vec<u8>)]| {
            datagram(
                MessageType::Confirmable,
                RequestType::Get,
                1,
                &[],
                ".well-known/core",
                opts,
                b"",
            )
        };
        assert_eq!(target(&get(&[])), Target::Discovery { block2: None });
        assert_eq!(
            target(&get(&[(CoapOption::Block2, vec![0x12])])),
            Target::Discovery {
                block2: Some(Block {
                    num: 1,
                    more: false,
                    szx: 2
                })
            }
        );
        assert_eq!(
            target(&get(&[(CoapOption::Accept, vec![50])])),
            refused(ResponseType::NotAcceptable, Refused::BadRequest)
        );
    }

    #[test]
    fn what_is_not_a_request() {
        let t = template();
        let c = |b: &[u8]| classify(b, &t, 64);
        assert_eq!(c(b""), Inbound::Drop(Dropped::NotCoap));
        assert_eq!(c(b"hello world"), Inbound::Drop(Dropped::NotCoap)); // version 1? 'h'=0x68 → 1, TKL 8 > len
        assert_eq!(c(&[0x80, 0x02, 0, 1]), Inbound::Drop(Dropped::NotCoap)); // version 2
        assert_eq!(
            c(&[0x49, 0x02, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Inbound::Drop(Dropped::NotCoap)
        ); // TKL 9
        assert_eq!(c(&[0x40, 0x00, 0x12, 0x34]), Inbound::Ping { mid: 0x1234 });
        assert_eq!(
            c(&[0x41, 0x00, 0x12, 0x34, 0x01]),
            Inbound::Drop(Dropped::NotCoap)
        );
        assert_eq!(c(&[0x50, 0x00, 0, 1]), Inbound::Drop(Dropped::Unexpected)); // empty NON
        assert_eq!(c(&[0x60, 0x00, 0, 1]), Inbound::Drop(Dropped::Unexpected)); // empty ACK
        assert_eq!(c(&[0x70, 0x00, 0, 1]), Inbound::Drop(Dropped::Unexpected)); // RST
        assert_eq!(c(&[0x60, 0x44, 0, 1]), Inbound::Drop(Dropped::Unexpected)); // 2.04 ACK
        assert_eq!(c(&[0x40, 0x45, 0, 1]), Inbound::Drop(Dropped::Unexpected)); // 2.05 CON
        assert_eq!(c(&[0x40, 0x21, 0, 1]), Inbound::Drop(Dropped::NotCoap)); // class 1
        assert_eq!(c(&[0x40, 0xE0, 0, 1]), Inbound::Drop(Dropped::NotCoap)); // class 7
        assert_eq!(c(&[0x60, 0x02, 0, 1]), Inbound::Drop(Dropped::NotCoap)); // POST as ACK
                                                                             // 0.08 is an unassigned method: the resource exists, the method does not.
        let mut m = con_post("up/dev-1", &[], b"x");
        m[1] = 0x08;
        assert!(
            matches!(c(&m), Inbound::Request(Request { target: Target::Refuse(r), .. })
            if r.code == ResponseType::MethodNotAllowed)
        );
    }

    #[test]
    fn truncated_heads() {
        let bytes = con_post("up/dev-1", &[], &[7u8; 40]);
        assert_eq!(
            truncated_head(&bytes[..20]),
            Some((0x1234, Token::new(&[0xAB, 0xCD]).unwrap()))
        );
        let non = datagram(
            MessageType::NonConfirmable,
            RequestType::Post,
            1,
            &[],
            "up/d",
            &[],
            b"x",
        );
        assert_eq!(truncated_head(&non), None);
        assert_eq!(truncated_head(&[0x48, 0x02, 0, 1, 0]), None); // token cut off
        assert_eq!(truncated_head(&[0x40, 0x01, 0, 1]), None); // GET
    }

    #[test]
    fn block_values_round_trip() {
        for b in [
            Block {
                num: 0,
                more: false,
                szx: 0,
            },
            Block {
                num: 0,
                more: true,
                szx: 6,
            },
            Block {
                num: 15,
                more: true,
                szx: 2,
            },
            Block {
                num: 4095,
                more: false,
                szx: 1,
            },
            Block {
                num: 0xF_FFFF,
                more: true,
                szx: 6,
            },
        ] {
            assert_eq!(Block::parse(&b.encode()), Some(b));
        }
        assert_eq!(
            Block {
                num: 0,
                more: false,
                szx: 0
            }
            .encode(),
            Vec::<u8>::new()
        );
        assert_eq!(Block::parse(&[1, 2, 3, 4]), None);
        assert_eq!(uint_bytes(0), Vec::<u8>::new());
        assert_eq!(uint_bytes(300), vec![1, 44]);
    }

    /// Random and mutated datagrams never panic the classifier (a stable stand-in for the
    /// fuzz target).
    #[test]
    fn classify_is_total() {
        let t = template();
        let seed = con_post(
            "up/dev-1?t=abcdefgh",
            &[
                (CoapOption::Block1, vec![0x1E]),
                (CoapOption::Size1, vec![200]),
            ],
            &[9u8; 64],
        );
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut d = seed.clone();
            for _ in 0..(next() % 6) {
                let i = (next() as usize) % d.len();
                d[i] = next() as u8;
            }
            d.truncate((next() as usize) % (seed.len() + 1));
            let _ = classify(&d, &t, 64);
            let _ = truncated_head(&d);
            let len = (next() % 40) as usize;
            let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = classify(&random, &t, 64);
        }
    }
}
