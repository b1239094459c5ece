//! The CoAP source: uplinks over UDP (RFC 7252), block-wise uploads (RFC 7959), resource
//! discovery (RFC 6690). coap-lite encodes and decodes messages; the server semantics —
//! routing, deduplication, reassembly, replies, admission — are ours and live here.
//!
//! It owns everything between the UDP socket and [`PipelineHandle::submit`]; what happens
//! to an uplink after that (registry, decode, commit) is the pipeline's.
//!
//! ```text
//! datagram ─▶ request::classify ─▶ dedup (peer, MID) ─▶ route ─▶ block1 reassembly
//!                                                                   │ complete payload
//!     ACK ◀── task awaits Outcome ◀── submit ◀── permit ◀── dedup (device, token, payload)
//! ```
//!
//! # Wire behaviour
//!
//! - `POST`/`PUT` to the configured template (`/up/{device}`), optional `?t=TOKEN`; the body
//!   is the raw payload (Content-Format absent or 42 application/octet-stream, else 4.15).
//!   Other paths get 4.04, other methods 4.05, unknown critical options 4.02, proxy
//!   requests 5.05.
//! - CON: the piggybacked ACK is sent after the pipeline's [`Outcome`]: `Committed` 2.04
//!   (payload: the pending downlink, if any), `Undecodable` 4.00 with the error code as a
//!   diagnostic, `UnknownDevice` 4.04, `BadToken` 4.01, `NoProfile` and `Unavailable` 5.03
//!   with Max-Age. `NoProfile` is 5.03 rather than 4.04 because the device is registered
//!   and did nothing wrong: a 4.xx would tell it not to retry, losing its data for an
//!   operator's mistake (the `response` module has the whole table).
//! - NON: at-most-once. The uplink is submitted without a reply channel; nothing is ever
//!   sent back to a NON request (no error replies either: a NON sender cannot act on them,
//!   and silence gives a spoofer nothing to reflect).
//! - Not CoAP (coap-lite refuses it, version ≠ 1, reserved code classes, a malformed empty
//!   message, ACK/RST/responses sent to us): counted in `nbiot_datagrams_dropped_total`
//!   and never answered. An empty CON (a "CoAP ping", §4.3) gets its RST.
//! - Duplicates (§4.5): a `(peer, MID)` seen within EXCHANGE_LIFETIME gets the cached
//!   response (or, while still in flight, silence — the coming ACK answers it); the same
//!   `(device, token, payload)` from a new address (NAT rebinding) gets the cached
//!   response re-addressed. Both caches are bounded per peer/device and in bytes; see the
//!   `dedup` module for the bounds, the memory per entry, and the trade-off.
//! - Block1 (RFC 7959): 2.31 Continue per block, 4.08 out of order, 4.13 + Size1 as soon
//!   as the size is known to be too large, 5.03 when reassembly memory is exhausted; see
//!   the `block1` module. `GET /.well-known/core` lists the uplink resource (RFC 6690).
//! - Amplification (§11.3): no response is larger than the request it answers, enforced
//!   where responses are built (the `response` module): diagnostics are cut, a downlink
//!   that does not fit is withheld (and logged), discovery is served in Block2 slices.
//!
//! # Counting
//!
//! `nbiot_uplinks_received_total{protocol="coap"}` counts every request that is not
//! discovery and not a retransmission (a multi-block upload counts once, when it completes
//! or fails); each is then exactly one of: submitted to the pipeline, or refused here
//! (`nbiot_uplinks_rejected_total{reason}`); pipeline rejections (unknown device, bad
//! token, no profile, unavailable) are counted here too, when their outcome arrives — so
//! the pipeline must not count them again for CoAP. Retransmissions count only in
//! `nbiot_uplinks_duplicate_total`.

mod block1;
mod dedup;
mod events;
mod request;
mod response;
mod server;
mod socket;

use std::time::Duration;

use crate::config::CoapConfig;

pub use events::CoapMetrics;
pub use server::{serve, serve_with_metrics};

#[cfg(doc)]
use crate::pipeline::{Outcome, PipelineHandle};

/// RFC 7252 §4.8.2: how long a message ID (and so its response) must be remembered.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// Bytes allowed for header, token and options on top of `max_payload` when sizing the
/// receive buffer (Uri-Path, a 128-character `?t=`, Block1, Size1, Request-Tag, ...).
pub const OPTIONS_ALLOWANCE: usize = 512;

/// Max-Age of a 5.03 for a device whose profile is not loaded: long enough that a fleet
/// whose profile vanished does not hammer the gateway, short enough that uplinks resume
/// soon after the operator fixes the profile.
pub const NO_PROFILE_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Confirmable uplinks awaiting their outcome at once. Sized by time, not by a guess at
/// a count: at 20 000 uplinks/s this is 200 ms of commits, enough to ride out an fsync or
/// checkpoint stall of the store without answering 5.03, while a store that stays behind
/// still meets the limit within a fraction of a second. Each in-flight request holds a
/// small task and its cache entries, about 1 KiB: 4 MiB at the limit.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;

/// Socket buffer asked of the kernel: 8 MiB is ~50 000 datagrams of a 128-byte uplink,
/// over a second of a burst at full rate (see the `socket` module).
pub const DEFAULT_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// Validated settings of the CoAP source (built from [`CoapConfig`] by
/// [`CoapSettings::from_config`]; the fields without a config key have documented
/// defaults there).
#[derive(Debug, Clone, PartialEq)]
pub struct CoapSettings {
    pub path: PathTemplate,
    /// Largest uplink payload, single datagram or reassembled (4.13 + Size1 above).
    pub max_payload: usize,
    /// Requests awaiting their outcome at once; beyond this, 5.03 + Max-Age.
    pub max_in_flight: usize,
    /// Receive and send buffer asked of the kernel for the socket (see the `socket`
    /// module: it absorbs bursts while the receive loop is busy; the kernel caps it at
    /// `net.core.rmem_max`). 0 keeps the system default.
    pub socket_buffer: usize,
    /// Max-Age of a 5.03 sent because this source is saturated (in-flight tasks, block
    /// buffers) or the pipeline gave no outcome.
    pub busy_retry_after: Duration,
    /// Max-Age of a 5.03 for `Reject::NoProfile`.
    pub no_profile_retry_after: Duration,
    pub dedup: DedupLimits,
    pub reassembly: ReassemblyLimits,
    /// On shutdown, how long in-flight requests may take to get their outcome and reply.
    pub drain_timeout: Duration,
}

/// Bounds of the two duplicate caches (see the `dedup` module for the memory per entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupLimits {
    /// How long a message ID and a (device, token, payload) are remembered.
    pub window: Duration,
    /// Message IDs remembered per peer address (oldest forgotten first).
    pub per_peer: usize,
    /// Payloads remembered per device (oldest forgotten first).
    pub per_device: usize,
    /// Bytes each cache may use, entries and cached responses together (oldest forgotten
    /// first).
    pub max_bytes: usize,
}

/// Bounds of Block1 reassembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Uploads in progress per peer address.
    pub per_peer: usize,
    /// Payload bytes buffered across all uploads; beyond it, 5.03 + Max-Age.
    pub max_bytes: usize,
    /// An upload with no block for this long is forgotten.
    pub timeout: Duration,
}

impl Default for DedupLimits {
    fn default() -> Self {
        DedupLimits {
            window: EXCHANGE_LIFETIME,
            per_peer: 256,
            per_device: 64,
            max_bytes: 16 * 1024 * 1024,
        }
    }
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            per_peer: 4,
            max_bytes: 4 * 1024 * 1024,
            timeout: EXCHANGE_LIFETIME,
        }
    }
}

/// Why a `[coap]` section cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("[coap] path = \"{path}\": {problem}")]
    Path {
        path: String,
        problem: TemplateProblem,
    },
    #[error("[coap] max_payload = {0} must be between 1 and 65536 bytes")]
    MaxPayload(usize),
}

impl CoapSettings {
    /// Validates `[coap]` (pure: binds nothing). Defaults for the keys the config does not
    /// have: [`DEFAULT_MAX_IN_FLIGHT`] requests in flight, an 8 MiB socket buffer, 5.03
    /// Max-Age 2 s when busy, 60 s for a missing profile, [`DedupLimits::default`],
    /// [`ReassemblyLimits::default`], 5 s drain.
    pub fn from_config(config: &CoapConfig) -> Result<CoapSettings, SettingsError> {
        if config.max_payload == 0 || config.max_payload > 64 * 1024 {
            return Err(SettingsError::MaxPayload(config.max_payload));
        }
        let path = PathTemplate::parse(&config.path).map_err(|problem| SettingsError::Path {
            path: config.path.clone(),
            problem,
        })?;
        Ok(CoapSettings {
            path,
            max_payload: config.max_payload,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            busy_retry_after: Duration::from_secs(2),
            no_profile_retry_after: NO_PROFILE_RETRY_AFTER,
            dedup: DedupLimits::default(),
            reassembly: ReassemblyLimits::default(),
            drain_timeout: Duration::from_secs(5),
        })
    }

    /// The receive buffer: larger than any datagram we accept, so a datagram that fills
    /// it may have been truncated by the OS and is refused (4.13) rather than misread.
    pub fn recv_buffer_len(&self) -> usize {
        self.max_payload + OPTIONS_ALLOWANCE + 1
    }
}

/// The uplink resource: Uri-Path segments, one of which is the device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Device,
}

/// What is wrong with a path template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateProblem {
    #[error("must contain `{{device}}` exactly once, as a whole segment (e.g. \"up/{{device}}\")")]
    DeviceSegment,
    #[error("has an empty segment (`//` or a trailing `/`)")]
    EmptySegment,
    #[error("segment `{0}` may not contain `{{`, `}}`, `?` or `#`")]
    BadSegment(String),
    #[error("must not start with `.well-known` (that is where discovery lives)")]
    WellKnown,
}

impl PathTemplate {
    /// Parses `up/{device}` (a leading `/` is allowed). The device is a whole segment so a
    /// device id never has to be cut out of a literal.
    pub fn parse(template: &str) -> Result<PathTemplate, TemplateProblem> {
        let trimmed = template.strip_prefix('/').unwrap_or(template);
        let mut segments = Vec::new();
        let mut devices = 0;
        for part in trimmed.split('/') {
            if part.is_empty() {
                return Err(TemplateProblem::EmptySegment);
            }
            if part == "{device}" {
                devices += 1;
                segments.push(Segment::Device);
            } else if part.contains(['{', '}', '?', '#']) {
                if part.contains("{device}") {
                    return Err(TemplateProblem::DeviceSegment);
                }
                return Err(TemplateProblem::BadSegment(part.to_owned()));
            } else {
                segments.push(Segment::Literal(part.to_owned()));
            }
        }
        if devices != 1 {
            return Err(TemplateProblem::DeviceSegment);
        }
        if matches!(segments.first(), Some(Segment::Literal(s)) if s == ".well-known") {
            return Err(TemplateProblem::WellKnown);
        }
        Ok(PathTemplate { segments })
    }

    /// The device segment if `path` (Uri-Path options, in order) matches the template.
    pub fn match_device<'a>(&self, path: &[&'a str]) -> Option<&'a str> {
        if path.len() != self.segments.len() {
            return None;
        }
        let mut device = None;
        for (seg, part) in self.segments.iter().zip(path) {
            match seg {
                Segment::Literal(lit) if lit == part => {}
                Segment::Literal(_) => return None,
                Segment::Device => device = Some(*part),
            }
        }
        device
    }

    /// The link advertised by `/.well-known/core`: the literal segments before the device
    /// (`/up` for `up/{device}`).
    pub fn link_prefix(&self) -> String {
        let mut out = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(lit) => {
                    out.push('/');
                    out.push_str(lit);
                }
                Segment::Device => break,
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        out
    }
}

/// `up/{device}`
impl std::fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, seg) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            match seg {
                Segment::Literal(lit) => f.write_str(lit)?,
                Segment::Device => f.write_str("{device}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_match() {
        let t = PathTemplate::parse("up/{device}").unwrap();
        assert_eq!(t.match_device(&["up", "dev-1"]), Some("dev-1"));
        assert_eq!(t.match_device(&["up"]), None);
        assert_eq!(t.match_device(&["down", "dev-1"]), None);
        assert_eq!(t.match_device(&["up", "dev-1", "x"]), None);
        assert_eq!(t.link_prefix(), "/up");

        let t = PathTemplate::parse("/nbiot/{device}/data").unwrap();
        assert_eq!(t.match_device(&["nbiot", "a", "data"]), Some("a"));
        assert_eq!(t.match_device(&["nbiot", "a", "date"]), None);
        assert_eq!(t.link_prefix(), "/nbiot");
        assert_eq!(t.to_string(), "nbiot/{device}/data");

        assert_eq!(PathTemplate::parse("{device}").unwrap().link_prefix(), "/");
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        use TemplateProblem::*;
        assert_eq!(PathTemplate::parse("up"), Err(DeviceSegment));
        assert_eq!(
            PathTemplate::parse("up/{device}/{device}"),
            Err(DeviceSegment)
        );
        assert_eq!(PathTemplate::parse("up/dev-{device}"), Err(DeviceSegment));
        assert_eq!(PathTemplate::parse("up//{device}"), Err(EmptySegment));
        assert_eq!(PathTemplate::parse("up/{device}/"), Err(EmptySegment));
        assert_eq!(
            PathTemplate::parse("up/{id}/{device}"),
            Err(BadSegment("{id}".into()))
        );
        assert_eq!(
            PathTemplate::parse("up?x/{device}"),
            Err(BadSegment("up?x".into()))
        );
        assert_eq!(PathTemplate::parse(".well-known/{device}"), Err(WellKnown));
    }

    #[test]
    fn settings_from_default_config() {
        let s = CoapSettings::from_config(&CoapConfig::default()).unwrap();
        assert_eq!(s.max_payload, 1024);
        assert_eq!(s.recv_buffer_len(), 1024 + 512 + 1);
        assert_eq!(s.dedup.window, EXCHANGE_LIFETIME);
        assert_eq!(s.path, PathTemplate::parse("up/{device}").unwrap());

        let bad = CoapConfig {
            path: "up/{dev}".into(),
            ..CoapConfig::default()
        };
        assert_eq!(
            CoapSettings::from_config(&bad).unwrap_err().to_string(),
            "[coap] path = \"up/{dev}\": segment `{dev}` may not contain `{`, `}`, `?` or `#`"
        );
        let bad = CoapConfig {
            max_payload: 0,
            ..CoapConfig::default()
        };
        assert_eq!(
            CoapSettings::from_config(&bad),
            Err(SettingsError::MaxPayload(0))
        );
    }
}
