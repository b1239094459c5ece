//! The InfluxDB v2 write API: one `POST /api/v2/write?org=…&bucket=…&precision=s` per call,
//! and what its answer means for the lines it carried.
//!
//! # Why reqwest and not the `influxdb2` crate
//!
//! The issue asked for the `influxdb2` crate (0.5.2, the latest release). It was checked
//! and deliberately not used, because it cannot do what the forwarder must:
//! - its error type keeps the status and body but drops the response headers, so a 429 /
//!   503 `Retry-After` cannot be honoured;
//! - `write_line_protocol_with_precision` sends the body as given with no way to set
//!   `Content-Encoding`; its gzip path exists only for its own `DataPoint` stream (and
//!   compresses at the slowest level, in the async task);
//! - it is built on reqwest 0.11: a second HTTP stack (hyper 0.14, http 0.2) beside the
//!   reqwest 0.12 the gateway uses, and with its `rustls` feature an old rustls-webpki with
//!   published advisories (aprimadi/influxdb2 PR #80 is still open to update it); its
//!   default feature pulls OpenSSL;
//! - `Client::new` panics on a bad URL, and the base URL's path is replaced, so a TSDB
//!   behind a path prefix (`https://host/influx`) cannot be reached.
//!
//! The write API is small, so [`WriteClient`] speaks it directly with reqwest 0.12
//! (rustls): the same request `influxdb2` would send (`Authorization: Token …`,
//! `precision=s`), plus gzip and the response headers, on the one HTTP stack.
//!
//! # Answers
//!
//! [`classify`] maps an answer to a [`Verdict`]; the forwarder acts on the verdict:
//!
//! | answer | verdict | what the forwarder does |
//! | --- | --- | --- |
//! | 204 | `Delivered` | advances the cursor |
//! | no answer (connect error, timeout), 408, 5xx, 429 | `Retry` | same lines again after a backoff; `Retry-After` honoured |
//! | 413 | `TooLarge` | splits the request in halves; one line alone → dead letter |
//! | 400, 422 with a JSON body | `Rejected` | lines the server names → dead letters, the rest sent again; else bisect |
//! | 401, 403, 404, any other | `Refused` | keeps everything, retries slowly, unhealthy, ERROR |
//!
//! Only 204 counts as delivered: a 200 with a body is what a login page or a wrong proxy
//! answers, and taking it for success would lose data silently.

use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, RETRY_AFTER};

use super::retry::parse_retry_after;

/// The most of an error body kept (a proxy's HTML page can be large; the message is what
/// an operator needs, and it goes into the dead-letter table).
const MAX_BODY: usize = 16 * 1024;

/// What the server answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    /// `Retry-After`, if the answer had a valid one.
    pub retry_after: Option<Duration>,
    /// The body, cut at [`MAX_BODY`] bytes.
    pub body: String,
}

/// Why no answer came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("no answer within the timeout")]
    Timeout,
    #[error("request failed: {0}")]
    Other(String),
}

/// Why the forwarder retries (a closed set: the `reason` label of the retries metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    Connect,
    Timeout,
    Transport,
    ServerError,
    Throttled,
}

impl RetryReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect",
            RetryReason::Timeout => "timeout",
            RetryReason::Transport => "transport",
            RetryReason::ServerError => "server_error",
            RetryReason::Throttled => "throttled",
        }
    }
}

/// What an answer means for the lines the request carried.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// 204: every line is stored.
    Delivered,
    /// Nothing is known to be stored; send the same lines again later.
    Retry {
        reason: RetryReason,
        after: Option<Duration>,
        detail: String,
    },
    /// 413: the request was too large.
    TooLarge { message: String },
    /// 400 / 422: some lines were refused. `lines` are those the server named (1-based
    /// line numbers in the request, with the server's message for each); empty when the
    /// answer does not say which.
    Rejected {
        status: u16,
        message: String,
        lines: Vec<(usize, String)>,
    },
    /// 401 / 403 / 404 and anything unexpected: the request cannot succeed until an
    /// operator acts (token, org, bucket, URL).
    Refused { status: u16, message: String },
}

impl Verdict {
    /// The `result` label of the requests metric.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Delivered => "ok",
            Verdict::Retry { .. } => "retry",
            Verdict::TooLarge { .. } => "too_large",
            Verdict::Rejected { status: 400, .. } => "bad_request",
            Verdict::Rejected { .. } => "partial",
            Verdict::Refused { .. } => "refused",
        }
    }
}

/// What happened to a request that got no answer.
pub fn classify_error(e: &SendError) -> Verdict {
    let reason = match e {
        SendError::Connect(_) => RetryReason::Connect,
        SendError::Timeout => RetryReason::Timeout,
        SendError::Other(_) => RetryReason::Transport,
    };
    Verdict::Retry {
        reason,
        after: None,
        detail: e.to_string(),
    }
}

/// What an answer means (see the module's table).
pub fn classify(reply: &Reply) -> Verdict {
    let message = || server_message(&reply.body);
    match reply.status {
        204 => Verdict::Delivered,
        429 | 503 => Verdict::Retry {
            reason: RetryReason::Throttled,
            after: reply.retry_after,
            detail: format!("HTTP {}: {}", reply.status, message()),
        },
        408 => Verdict::Retry {
            reason: RetryReason::Timeout,
            after: reply.retry_after,
            detail: format!("HTTP 408: {}", message()),
        },
        500..=599 => Verdict::Retry {
            reason: RetryReason::ServerError,
            after: reply.retry_after,
            detail: format!("HTTP {}: {}", reply.status, message()),
        },
        413 => Verdict::TooLarge { message: message() },
        // InfluxDB (1.x, 2.x, 3.x) explains a refused line in a JSON object. A 400 without
        // one is about the request, not its lines — a proxy's HTML page, plain HTTP sent to
        // an HTTPS port, a body the server could not read — and bisecting it would move
        // every line to the dead-letter table: refused instead, nothing is dropped.
        400 | 422 if is_json_object(&reply.body) => Verdict::Rejected {
            status: reply.status,
            message: message(),
            lines: named_lines(&reply.body),
        },
        status => Verdict::Refused {
            status,
            message: message(),
        },
    }
}

fn is_json_object(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| v.is_object())
}

/// The server's message: InfluxDB 2 answers `{"code": …, "message": …}`, InfluxDB 3 and
/// VictoriaMetrics `{"error": …}`; anything else is shown as sent (trimmed, one line).
pub fn server_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        for key in ["message", "error"] {
            if let Some(m) = v.get(key).and_then(|m| m.as_str()) {
                return one_line(m);
            }
        }
    }
    let text = one_line(body.trim());
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        text
    }
}

fn one_line(s: &str) -> String {
    let mut out: String = s.chars().take(1024).collect();
    out = out.replace(['\n', '\r'], " ");
    out
}

/// The lines an InfluxDB 3 partial-write answer names:
/// `{"error": "partial write of line protocol occurred", "data": [{"original_line": …,
/// "line_number": 2, "error_message": …}]}`.
fn named_lines(body: &str) -> Vec<(usize, String)> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let Some(items) = v.get("data").and_then(|d| d.as_array()) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let n = usize::try_from(item.get("line_number")?.as_u64()?).ok()?;
            let msg = item
                .get("error_message")
                .and_then(|m| m.as_str())
                .map_or_else(|| server_message(body), one_line);
            (n > 0).then_some((n, msg))
        })
        .collect()
}

/// Sends one request body (what the delivery logic needs of an HTTP client; tests give it
/// a scripted one).
pub trait Transport: Send + Sync {
    /// `body` is the line protocol; `gz` the same already gzipped, if the caller has it.
    fn send(
        &self,
        body: Bytes,
        gz: Option<Bytes>,
    ) -> impl Future<Output = Result<Reply, SendError>> + Send;
}

/// Writes line protocol to one org/bucket of an InfluxDB v2 write API.
#[derive(Clone)]
pub struct WriteClient {
    http: reqwest::Client,
    url: reqwest::Url,
    /// `Token …`, marked sensitive so reqwest never shows it in a Debug output.
    auth: Option<HeaderValue>,
    gzip: bool,
}

/// Why a [`WriteClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("[influxdb] url = \"{url}\" is not a URL: {reason}")]
    Url { url: String, reason: String },
    #[error("[influxdb] token contains characters an HTTP header cannot carry")]
    Token,
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

impl WriteClient {
    pub fn new(
        url: &str,
        org: &str,
        bucket: &str,
        token: &str,
        timeout: Duration,
        gzip: bool,
    ) -> Result<WriteClient, ClientError> {
        let url = write_url(url, org, bucket)?;
        let auth = if token.is_empty() {
            None
        } else {
            let mut v =
                HeaderValue::from_str(&format!("Token {token}")).map_err(|_| ClientError::Token)?;
            v.set_sensitive(true);
            Some(v)
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            // A redirect would turn the POST into a GET or resend the token elsewhere:
            // answer it as a misconfiguration instead.
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(30))
            .user_agent(concat!("nbiot-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(WriteClient {
            http,
            url,
            auth,
            gzip,
        })
    }

    /// The write URL without any user info (safe to log).
    pub fn display_url(&self) -> String {
        redacted(&self.url)
    }

    async fn post(&self, body: Bytes, gz: Option<Bytes>) -> Result<Reply, SendError> {
        let mut req = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, "text/plain; charset=utf-8");
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        if self.gzip {
            let gz = match gz {
                Some(gz) => gz,
                // Compressing a few MB takes milliseconds: off the async workers.
                None => tokio::task::spawn_blocking(move || gzip(&body))
                    .await
                    .map_err(|e| SendError::Other(e.to_string()))?,
            };
            req = req.header(CONTENT_ENCODING, "gzip").body(gz);
        } else {
            req = req.body(body);
        }
        let mut resp = req.send().await.map_err(send_error)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let mut body = Vec::new();
        if status != 204 {
            while body.len() < MAX_BODY {
                match resp.chunk().await {
                    Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                    Ok(None) => break,
                    // The status is what matters; a body cut short still classifies.
                    Err(_) => break,
                }
            }
            body.truncate(MAX_BODY);
        }
        Ok(Reply {
            status,
            retry_after,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

impl Transport for WriteClient {
    fn send(
        &self,
        body: Bytes,
        gz: Option<Bytes>,
    ) -> impl Future<Output = Result<Reply, SendError>> + Send {
        self.post(body, gz)
    }
}

impl std::fmt::Debug for WriteClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteClient")
            .field("url", &self.display_url())
            .field("token", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("gzip", &self.gzip)
            .finish()
    }
}

fn send_error(e: reqwest::Error) -> SendError {
    // The URL is logged on its own, without user info; reqwest's message would repeat it
    // with any password in it.
    let e = e.without_url();
    if e.is_timeout() {
        SendError::Timeout
    } else if e.is_connect() {
        SendError::Connect(error_chain(&e))
    } else {
        SendError::Other(error_chain(&e))
    }
}

/// reqwest's own message is generic ("error sending request"); the cause says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// `url` + `/api/v2/write?org=…&bucket=…&precision=s`, keeping any path prefix.
fn write_url(url: &str, org: &str, bucket: &str) -> Result<reqwest::Url, ClientError> {
    let bad = |reason: String| ClientError::Url {
        url: url.to_owned(),
        reason,
    };
    let mut u = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    if u.cannot_be_a_base() || !matches!(u.scheme(), "http" | "https") {
        return Err(bad("it must be an http:// or https:// URL".to_owned()));
    }
    {
        let mut path = u
            .path_segments_mut()
            .map_err(|()| bad("it cannot have a path".to_owned()))?;
        path.pop_if_empty().extend(["api", "v2", "write"]);
    }
    u.query_pairs_mut()
        .clear()
        .append_pair("org", org)
        .append_pair("bucket", bucket)
        .append_pair("precision", "s");
    Ok(u)
}

fn redacted(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// Gzips `data` at the fastest level: line protocol is so repetitive that level 1 already
/// shrinks it about tenfold, at a fraction of the CPU of the default level.
pub fn gzip(data: &[u8]) -> Bytes {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 8 + 64),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(data);
    Bytes::from(enc.finish().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status,
            retry_after: None,
            body: body.to_owned(),
        }
    }

    #[test]
    fn every_status_class_has_its_verdict() {
        assert_eq!(classify(&reply(204, "")), Verdict::Delivered);
        for (status, reason) in [
            (429, RetryReason::Throttled),
            (503, RetryReason::Throttled),
            (500, RetryReason::ServerError),
            (502, RetryReason::ServerError),
            (504, RetryReason::ServerError),
            (408, RetryReason::Timeout),
        ] {
            match classify(&reply(status, "busy")) {
                Verdict::Retry { reason: r, .. } => assert_eq!(r, reason, "{status}"),
                other => panic!("{status}: {other:?}"),
            }
        }
        assert!(matches!(
            classify(&reply(413, "")),
            Verdict::TooLarge { .. }
        ));
        for status in [400, 422] {
            assert!(matches!(
                classify(&reply(status, r#"{"message":"x"}"#)),
                Verdict::Rejected { status: s, .. } if s == status
            ));
            // Not an InfluxDB explanation: the request, not a line, is at fault.
            for body in [
                "",
                "<html>400 The plain HTTP request was sent to HTTPS port</html>",
                "[1]",
            ] {
                assert!(
                    matches!(
                        classify(&reply(status, body)),
                        Verdict::Refused { status: s, .. } if s == status
                    ),
                    "{status} {body}"
                );
            }
        }
        // Only 204 is delivery; anything unexpected keeps the data and asks an operator.
        for status in [401, 403, 404, 405, 200, 201, 301, 302, 409] {
            assert!(
                matches!(classify(&reply(status, "")), Verdict::Refused { status: s, .. } if s == status),
                "{status}"
            );
        }
    }

    #[test]
    fn retry_after_travels_with_the_verdict() {
        let r = Reply {
            status: 429,
            retry_after: Some(Duration::from_secs(3)),
            body: String::new(),
        };
        assert!(matches!(
            classify(&r),
            Verdict::Retry { after: Some(d), .. } if d == Duration::from_secs(3)
        ));
    }

    #[test]
    fn server_messages_from_each_dialect() {
        assert_eq!(
            server_message(r#"{"code":"invalid","message":"unable to parse 'x': missing fields"}"#),
            "unable to parse 'x': missing fields"
        );
        assert_eq!(
            server_message(r#"{"error":"partial write: dropped=1"}"#),
            "partial write: dropped=1"
        );
        assert_eq!(
            server_message("<html>\nbad gateway\n</html>"),
            "<html> bad gateway </html>"
        );
        assert_eq!(server_message(""), "(empty body)");
        assert_eq!(server_message(&"x".repeat(5000)).len(), 1024);
    }

    #[test]
    fn influxdb3_partial_writes_name_their_lines() {
        let body = r#"{"error":"partial write of line protocol occurred","data":[
            {"original_line":"m f=\"x\" 1","line_number":2,"error_message":"invalid column type for column 'f'"},
            {"original_line":"bad","line_number":5,"error_message":"No fields were provided"}]}"#;
        match classify(&reply(400, body)) {
            Verdict::Rejected {
                status,
                message,
                lines,
            } => {
                assert_eq!(status, 400);
                assert_eq!(message, "partial write of line protocol occurred");
                assert_eq!(
                    lines,
                    vec![
                        (2, "invalid column type for column 'f'".to_owned()),
                        (5, "No fields were provided".to_owned())
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(&reply(422, r#"{"code":"unprocessable entity","message":"failure writing points to database: partial write: points beyond retention policy dropped=1"}"#)),
            Verdict::Rejected { status: 422, lines, .. } if lines.is_empty()
        ));
    }

    #[test]
    fn errors_without_an_answer_are_retried() {
        for (e, reason) in [
            (SendError::Connect("refused".into()), RetryReason::Connect),
            (SendError::Timeout, RetryReason::Timeout),
            (SendError::Other("reset".into()), RetryReason::Transport),
        ] {
            assert!(
                matches!(classify_error(&e), Verdict::Retry { reason: r, after: None, .. } if r == reason)
            );
        }
    }

    #[test]
    fn write_url_keeps_a_path_prefix_and_encodes_names() {
        assert_eq!(
            write_url("http://127.0.0.1:8086", "city ops", "nb/iot")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8086/api/v2/write?org=city+ops&bucket=nb%2Fiot&precision=s"
        );
        assert_eq!(
            write_url("https://tsdb.example/influx/", "o", "b")
                .unwrap()
                .as_str(),
            "https://tsdb.example/influx/api/v2/write?org=o&bucket=b&precision=s"
        );
        assert!(write_url("not a url", "o", "b").is_err());
        assert!(write_url("ftp://host/", "o", "b").is_err());
    }

    #[test]
    fn the_token_is_never_shown() {
        let c = WriteClient::new(
            "http://user:pw@127.0.0.1:8086",
            "o",
            "b",
            "s3cret-token",
            Duration::from_secs(1),
            true,
        )
        .unwrap();
        let shown = format!("{c:?} {}", c.display_url());
        assert!(!shown.contains("s3cret-token"), "{shown}");
        assert!(!c.display_url().contains("pw"), "{}", c.display_url());
        assert!(matches!(
            WriteClient::new(
                "http://h",
                "o",
                "b",
                "bad\ntoken",
                Duration::from_secs(1),
                true
            ),
            Err(ClientError::Token)
        ));
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let text = "m,device=a f=1i 1\n".repeat(1000);
        let gz = gzip(text.as_bytes());
        assert!(gz.len() < text.len() / 10, "{} bytes", gz.len());
        let mut back = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut back)
            .unwrap();
        assert_eq!(back, text);
    }
}
