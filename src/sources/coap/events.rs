//! What the CoAP source counts: metric handles created once (not per datagram), and the
//! closed sets their labels come from. Names are those of [`crate::telemetry::metrics`].

use metrics::Counter;

use crate::telemetry::metrics::{
    drop_reason, reason, DATAGRAMS_DROPPED, UPLINKS_DUPLICATE, UPLINKS_RECEIVED, UPLINKS_REJECTED,
};

const PROTOCOL: &str = "coap";

/// Why a request was refused (the `reason` label of `nbiot_uplinks_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    UnknownDevice,
    BadToken,
    NoProfile,
    Overloaded,
    Unavailable,
    TooLarge,
    BadRequest,
    NotFound,
    Method,
    ShuttingDown,
    UnsupportedFormat,
    Incomplete,
}

impl Refused {
    const ALL: [Refused; 12] = [
        Refused::UnknownDevice,
        Refused::BadToken,
        Refused::NoProfile,
        Refused::Overloaded,
        Refused::Unavailable,
        Refused::TooLarge,
        Refused::BadRequest,
        Refused::NotFound,
        Refused::Method,
        Refused::ShuttingDown,
        Refused::UnsupportedFormat,
        Refused::Incomplete,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::UnknownDevice => reason::UNKNOWN_DEVICE,
            Refused::BadToken => reason::BAD_TOKEN,
            Refused::NoProfile => reason::NO_PROFILE,
            Refused::Overloaded => reason::OVERLOADED,
            Refused::Unavailable => reason::UNAVAILABLE,
            Refused::TooLarge => reason::TOO_LARGE,
            Refused::BadRequest => reason::BAD_REQUEST,
            Refused::NotFound => reason::NOT_FOUND,
            Refused::Method => reason::METHOD,
            Refused::ShuttingDown => reason::SHUTTING_DOWN,
            Refused::UnsupportedFormat => reason::UNSUPPORTED_FORMAT,
            Refused::Incomplete => reason::INCOMPLETE,
        }
    }
}

/// Why a datagram was dropped unanswered (the `reason` label of
/// `nbiot_datagrams_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    NotCoap,
    Unexpected,
    Truncated,
}

impl Dropped {
    const ALL: [Dropped; 3] = [Dropped::NotCoap, Dropped::Unexpected, Dropped::Truncated];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Dropped::NotCoap => drop_reason::NOT_COAP,
            Dropped::Unexpected => drop_reason::UNEXPECTED,
            Dropped::Truncated => drop_reason::TRUNCATED,
        }
    }
}

/// The CoAP source's metric handles. Create once per server; cheap to clone.
///
/// `CoapMetrics::new()` registers with the recorder in effect where it is called (the
/// global one in production; tests wrap it in `metrics::with_local_recorder` to read
/// their own server's counts).
#[derive(Debug, Clone)]
pub struct CoapMetrics {
    received: Counter,
    duplicate: Counter,
    rejected: [Counter; Refused::ALL.len()],
    dropped: [Counter; Dropped::ALL.len()],
}

impl Default for CoapMetrics {
    fn default() -> Self {
        CoapMetrics::new()
    }
}

impl CoapMetrics {
    pub fn new() -> CoapMetrics {
        CoapMetrics {
            received: metrics::counter!(UPLINKS_RECEIVED, "protocol" => PROTOCOL),
            duplicate: metrics::counter!(UPLINKS_DUPLICATE, "protocol" => PROTOCOL),
            rejected: Refused::ALL.map(|r| {
                metrics::counter!(UPLINKS_REJECTED, "protocol" => PROTOCOL, "reason" => r.label())
            }),
            dropped: Dropped::ALL
                .map(|d| metrics::counter!(DATAGRAMS_DROPPED, "reason" => d.label())),
        }
    }

    pub(crate) fn received(&self) {
        self.received.increment(1);
    }

    pub(crate) fn duplicate(&self) {
        self.duplicate.increment(1);
    }

    pub(crate) fn rejected(&self, why: Refused) {
        // ALL lists every variant in declaration order, so the discriminant indexes it.
        if let Some(c) = self.rejected.get(why as usize) {
            c.increment(1);
        }
    }

    pub(crate) fn dropped(&self, why: Dropped) {
        if let Some(c) = self.dropped.get(why as usize) {
            c.increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_label_tables_are_in_declaration_order() {
        for (i, r) in Refused::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, d) in Dropped::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
    }
}
