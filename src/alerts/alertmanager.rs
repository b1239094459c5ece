//! Alertmanager's v2 API as the notifier speaks it: the postable alert, the labels an alert
//! carries, and one `POST {url}/api/v2/alerts` with its answer classified.
//!
//! This module owns the wire format and nothing else: which alerts to send, when, and what
//! to do about a failure is the notifier's business ([`super::notifier`]).
//!
//! # Labels
//!
//! An alert is identified in Alertmanager by its label set, so the labels must be the same
//! on every resend: `alertname` (the rule), `device`, `profile`, `severity`, then the
//! device's registry labels. Registry label keys are already `[a-z_][a-z0-9_]*`, but the
//! names are sanitized anyway to Prometheus' `[a-zA-Z_][a-zA-Z0-9_]*` (any other character
//! becomes `_`, a leading digit gets a `_` in front). A device label that would collide with
//! one of ours (`severity`, say) or use the reserved `__` prefix is renamed `exported_<name>`
//! — Prometheus' convention for the same conflict — so it can never override them. Empty
//! values are left out (Alertmanager treats an empty label as absent).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

/// Appended to `[alertmanager] url`.
pub const API_PATH: &str = "/api/v2/alerts";

/// How long one POST may take (Prometheus' default Alertmanager timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The labels every alert carries; device labels never override them.
pub const RESERVED_LABELS: [&str; 4] = ["alertname", "device", "profile", "severity"];

/// Alertmanager's `postableAlert` (API v2).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableAlert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339 with milliseconds.
    pub starts_at: String,
    /// In the future while firing (Alertmanager resolves the alert by itself when it
    /// passes without a resend); the resolution time once resolved.
    pub ends_at: String,
    #[serde(rename = "generatorURL", skip_serializing_if = "Option::is_none")]
    pub generator_url: Option<String>,
}

/// A label name made valid for Prometheus/Alertmanager: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn sanitize_label_name(name: &str) -> Cow<'_, str> {
    let valid_char =
        |(i, b): (usize, u8)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit());
    if !name.is_empty() && name.bytes().enumerate().all(valid_char) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 1);
    if name.bytes().next().is_none_or(|b| b.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(name.chars().map(|c| {
        if c == '_' || c.is_ascii_alphanumeric() {
            c
        } else {
            '_'
        }
    }));
    Cow::Owned(out)
}

/// The label set of one alert (see the module documentation).
pub fn labels<'a>(
    rule: &str,
    device: &str,
    profile: &str,
    severity: &str,
    device_labels: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, value) in [
        ("alertname", rule),
        ("device", device),
        ("profile", profile),
        ("severity", severity),
    ] {
        if !value.is_empty() {
            out.insert(name.to_owned(), value.to_owned());
        }
    }
    for (name, value) in device_labels {
        if value.is_empty() {
            continue;
        }
        let name = sanitize_label_name(name);
        let name = if RESERVED_LABELS.contains(&name.as_ref()) || name.starts_with("__") {
            format!("exported_{name}")
        } else {
            name.into_owned()
        };
        // Two names that sanitize alike: the first (in the registry's key order) wins.
        out.entry(name).or_insert_with(|| value.to_owned());
    }
    out
}

/// Why a POST did not deliver.
#[derive(Debug, Error)]
pub enum PushError {
    /// No answer: connection refused or reset, DNS, TLS, timeout.
    #[error("cannot reach Alertmanager: {0}")]
    Transport(#[source] reqwest::Error),

    /// An answer other than 2xx. `body` is its start, for the log.
    #[error("Alertmanager answered {status}: {body}")]
    Status { status: u16, body: String },
}

impl PushError {
    /// Whether sending the same alerts again later can succeed: transport errors, 408,
    /// 429 and 5xx. A 4xx means Alertmanager refuses these alerts; resending them is futile.
    pub fn retryable(&self) -> bool {
        match self {
            PushError::Transport(_) => true,
            PushError::Status { status, .. } => {
                matches!(status, 408 | 429) || (500..600).contains(status)
            }
        }
    }
}

/// What the notifier sends alerts through: [`Client`] in the gateway, a fake in tests.
pub trait Push: Send + Sync + 'static {
    fn push(
        &self,
        alerts: Vec<PostableAlert>,
    ) -> impl Future<Output = Result<(), PushError>> + Send;
}

/// Why a [`Client`] could not be built.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("url = \"{0}\" must start with http:// or https://")]
    Scheme(String),

    #[error("cannot build the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// An Alertmanager endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoint: String,
}

impl Client {
    /// `base` is `[alertmanager] url` (e.g. `http://127.0.0.1:9093`, or with a path prefix
    /// when Alertmanager runs with `--web.route-prefix`).
    pub fn new(base: &str) -> Result<Client, ClientError> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Scheme(base.to_owned()));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("nbiot-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Build)?;
        Ok(Client {
            http,
            endpoint: format!("{}{API_PATH}", base.trim_end_matches('/')),
        })
    }

    /// `{url}/api/v2/alerts`
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

/// How much of an error answer is kept for the log.
const ERROR_BODY_MAX: usize = 256;

impl Push for Client {
    async fn push(&self, alerts: Vec<PostableAlert>) -> Result<(), PushError> {
        let response = self
            .http
            .post(&self.endpoint)
            .json(&alerts)
            .send()
            .await
            .map_err(PushError::Transport)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let mut body = response.text().await.unwrap_or_default();
        if body.len() > ERROR_BODY_MAX {
            let mut end = ERROR_BODY_MAX;
            while !body.is_char_boundary(end) {
                end -= 1;
            }
            body.truncate(end);
        }
        Err(PushError::Status {
            status: status.as_u16(),
            body: body.trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_are_sanitized() {
        assert_eq!(sanitize_label_name("district"), "district");
        assert!(matches!(sanitize_label_name("Site_2"), Cow::Borrowed(_)));
        assert_eq!(sanitize_label_name("site-name"), "site_name");
        assert_eq!(sanitize_label_name("2nd"), "_2nd");
        assert_eq!(sanitize_label_name(""), "_");
        assert_eq!(sanitize_label_name("zoné"), "zon_");
    }

    #[test]
    fn device_labels_never_override_ours() {
        let l = labels(
            "cover_open",
            "869951040293361",
            "manhole",
            "critical",
            [
                ("alertname", "fake"),
                ("district", "north"),
                ("empty", ""),
                ("severity", "info"),
                ("site-id", "7"),
                ("site_id", "8"),
                ("__name__", "x"),
            ],
        );
        let expected: BTreeMap<String, String> = [
            ("alertname", "cover_open"),
            ("device", "869951040293361"),
            ("profile", "manhole"),
            ("severity", "critical"),
            ("exported_alertname", "fake"),
            ("district", "north"),
            ("exported_severity", "info"),
            ("site_id", "7"),
            ("exported___name__", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(l, expected);
    }

    #[test]
    fn wire_format_is_alertmanagers() {
        let a = PostableAlert {
            labels: BTreeMap::from([("alertname".to_owned(), "sos".to_owned())]),
            annotations: BTreeMap::from([("summary".to_owned(), "SOS".to_owned())]),
            starts_at: "2026-01-01T00:00:00.000Z".into(),
            ends_at: "2026-01-01T00:04:00.000Z".into(),
            generator_url: None,
        };
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            serde_json::json!({
                "labels": {"alertname": "sos"},
                "annotations": {"summary": "SOS"},
                "startsAt": "2026-01-01T00:00:00.000Z",
                "endsAt": "2026-01-01T00:04:00.000Z",
            })
        );
    }

    #[test]
    fn retryable_answers() {
        let s = |status| PushError::Status {
            status,
            body: String::new(),
        };
        assert!(s(503).retryable() && s(500).retryable() && s(429).retryable());
        assert!(!s(400).retryable() && !s(401).retryable() && !s(404).retryable());
        assert!(Client::new("127.0.0.1:9093").is_err());
        assert_eq!(
            Client::new("http://am:9093/").unwrap().endpoint(),
            "http://am:9093/api/v2/alerts"
        );
    }
}
