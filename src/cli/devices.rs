//! `nbiot-gateway devices add|list|remove|import`: a client of a running gateway's HTTP API
//! (`--url`, default `http://127.0.0.1:8080`; bearer token from `NBIOT_TOKEN`).
//!
//! Output is for people: `list` prints an aligned table, `import` prints counts and every
//! bad row with its line number. Any failure is returned as one error sentence for `main`
//! to print on stderr (and exit non-zero).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::{json, Map, Value};

use crate::registry::validate::parse_param_text;
use crate::registry::ListFilter;

/// The default `--url`.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// The env var holding the API bearer token.
pub const TOKEN_ENV: &str = "NBIOT_TOKEN";

/// Generous: a 100k-device import is one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, clap::Subcommand)]
pub enum DevicesCommand {
    /// Registers a device. Refuses an id that is already registered unless --replace.
    Add {
        /// The id the device sends (IMEI or another id).
        id: String,
        /// The device's profile (see `GET /api/v1/profiles`).
        #[arg(long)]
        profile: String,
        /// A label, e.g. --label district=north (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// An alert-rule parameter, e.g. --param depth_m=2.5 (repeatable). Numbers and
        /// true/false are typed; other text is a string.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// A token the device must present (CoAP `?t=`).
        #[arg(long)]
        token: Option<String>,
        /// Replace the device if it exists (labels and params are replaced whole; without
        /// --token its current token is kept).
        #[arg(long)]
        replace: bool,
    },
    /// Lists devices as a table.
    List {
        /// Only devices of this profile.
        #[arg(long)]
        profile: Option<String>,
        /// Only devices with this label value (repeatable; all must match).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// At most this many devices (default: all).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Removes a device.
    Remove { id: String },
    /// Imports devices from a CSV file (header: device,profile,label:<key>,param:<key>,token).
    Import {
        file: PathBuf,
        /// Import the good rows even if some are bad (default: all or nothing).
        #[arg(long)]
        partial: bool,
    },
}

/// Runs one `devices` subcommand against the API at `url`, on a small runtime of its own
/// (for `main`, which has none).
pub fn run(cmd: DevicesCommand, url: &str, token: Option<String>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run_async(cmd, url, token))
}

/// [`run`] inside an existing runtime.
pub async fn run_async(
    cmd: DevicesCommand,
    url: &str,
    token: Option<String>,
) -> anyhow::Result<()> {
    let api = Api::new(url, token.filter(|t| !t.is_empty()))?;
    match cmd {
        DevicesCommand::Add {
            id,
            profile,
            labels,
            params,
            token,
            replace,
        } => add(&api, &id, profile, &labels, &params, token, replace).await,
        DevicesCommand::List {
            profile,
            labels,
            limit,
        } => list(&api, profile, &labels, limit).await,
        DevicesCommand::Remove { id } => {
            api.send(api.request(Method::DELETE, &device_path(&id)))
                .await?;
            println!("removed device {id}");
            Ok(())
        }
        DevicesCommand::Import { file, partial } => import(&api, &file, partial).await,
    }
}

async fn add(
    api: &Api,
    id: &str,
    profile: String,
    labels: &[String],
    params: &[String],
    token: Option<String>,
    replace: bool,
) -> anyhow::Result<()> {
    let mut label_map = Map::new();
    for l in labels {
        let (k, v) = key_value("--label", l)?;
        label_map.insert(k.to_owned(), json!(v));
    }
    let mut param_map = Map::new();
    for p in params {
        let (k, v) = key_value("--param", p)?;
        let value = parse_param_text(v).map_err(|problem| anyhow!("--param {k}: {problem}"))?;
        param_map.insert(k.to_owned(), serde_json::to_value(value)?);
    }
    let mut body = json!({ "profile": profile, "labels": label_map, "params": param_map });
    if let Some(t) = token {
        body["token"] = json!(t);
    }
    let mut request = api.request(Method::PUT, &device_path(id)).json(&body);
    if !replace {
        request = request.header(reqwest::header::IF_NONE_MATCH, "*");
    }
    let (status, device) = match api.send(request).await {
        Err(e) if e.status == Some(StatusCode::CONFLICT) => {
            bail!("device {id} is already registered (use --replace to overwrite it)")
        }
        other => other?,
    };
    let verb = if status == StatusCode::CREATED {
        "registered"
    } else {
        "replaced"
    };
    println!(
        "{verb} device {id} (profile {})",
        device["profile"].as_str().unwrap_or("?")
    );
    Ok(())
}

async fn list(
    api: &Api,
    profile: Option<String>,
    labels: &[String],
    limit: Option<u64>,
) -> anyhow::Result<()> {
    let mut query: Vec<(String, String)> = Vec::new();
    if let Some(p) = profile {
        query.push(("profile".into(), p));
    }
    for l in labels {
        let (k, v) = key_value("--label", l)?;
        query.push((format!("label.{k}"), v.to_owned()));
    }
    let mut rows = Vec::new();
    let mut offset = 0u64;
    let mut total = 0u64;
    loop {
        let want = limit.map_or(u64::from(ListFilter::MAX_LIMIT), |l| {
            l.saturating_sub(offset)
                .min(u64::from(ListFilter::MAX_LIMIT))
        });
        if want == 0 {
            break;
        }
        let mut page_query = query.clone();
        page_query.push(("limit".into(), want.to_string()));
        page_query.push(("offset".into(), offset.to_string()));
        let (_, page) = api
            .send(
                api.request(Method::GET, "/api/v1/devices")
                    .query(&page_query),
            )
            .await?;
        total = page["total"].as_u64().unwrap_or(0);
        let devices = page["devices"].as_array().cloned().unwrap_or_default();
        let n = devices.len() as u64;
        rows.extend(devices.iter().map(table_row));
        offset += n;
        if n == 0 || offset >= total {
            break;
        }
    }
    if rows.is_empty() {
        println!("no devices");
        return Ok(());
    }
    print!(
        "{}",
        table(
            &["ID", "PROFILE", "LABELS", "PARAMS", "TOKEN", "UPDATED"],
            &rows
        )
    );
    if (rows.len() as u64) < total {
        println!("({} of {total} devices shown)", rows.len());
    }
    Ok(())
}

fn table_row(d: &Value) -> Vec<String> {
    let pairs = |v: &Value| {
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    vec![
        text(&d["id"]),
        text(&d["profile"]),
        pairs(&d["labels"]),
        pairs(&d["params"]),
        if d["has_token"].as_bool() == Some(true) {
            "yes".into()
        } else {
            "no".into()
        },
        text(&d["updated_at"]),
    ]
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ");
            }
        }
        out.push('\n');
    }
    out
}

async fn import(api: &Api, file: &std::path::Path, partial: bool) -> anyhow::Result<()> {
    let csv = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let request = api
        .request(Method::POST, "/api/v1/devices/import")
        .query(&[("partial", if partial { "true" } else { "false" })])
        .header(reqwest::header::CONTENT_TYPE, "text/csv")
        .body(csv);
    match api.send(request).await {
        Ok((_, report)) => {
            println!(
                "imported {} device(s) from {} ({} created, {} updated)",
                report["imported"],
                file.display(),
                report["created"],
                report["updated"]
            );
            let rejected = report["rejected"].as_u64().unwrap_or(0);
            if rejected > 0 {
                print_row_errors(&report);
                bail!(
                    "{rejected} of {} row(s) in {} were rejected",
                    report["rows"],
                    file.display()
                );
            }
            Ok(())
        }
        Err(e) if e.status == Some(StatusCode::UNPROCESSABLE_ENTITY) => {
            print_row_errors(&e.detail);
            let hint = if partial || e.detail["rows"].as_u64().unwrap_or(0) == 0 {
                ""
            } else {
                " (--partial imports the good rows)"
            };
            bail!("{}: {}{hint}", file.display(), e.message)
        }
        Err(e) => Err(e.into()),
    }
}

fn print_row_errors(report: &Value) {
    for e in report["errors"].as_array().into_iter().flatten() {
        let mut line = format!("line {}", e["line"]);
        if let Some(d) = e["device"].as_str() {
            let _ = write!(line, ": device {d}");
        }
        match e["column"].as_str() {
            Some(c) => {
                let _ = write!(line, ": column {c} {}", e["message"].as_str().unwrap_or(""));
            }
            None => {
                let _ = write!(line, ": {}", e["message"].as_str().unwrap_or(""));
            }
        }
        println!("{line}");
    }
}

fn key_value<'a>(flag: &str, arg: &'a str) -> anyhow::Result<(&'a str, &'a str)> {
    arg.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| anyhow!("{flag} expects KEY=VALUE, got `{arg}`"))
}

/// `/api/v1/devices/<id>` with the id percent-encoded, so an id with `/` or spaces reaches
/// the server's validation instead of another route.
fn device_path(id: &str) -> String {
    let mut path = String::from("/api/v1/devices/");
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~' | b':') {
            path.push(char::from(b));
        } else {
            let _ = write!(path, "%{b:02X}");
        }
    }
    path
}

/// An API answer that was not a success.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct ApiFailure {
    status: Option<StatusCode>,
    message: String,
    detail: Value,
}

struct Api {
    client: Client,
    base: String,
    token: Option<String>,
}

impl Api {
    fn new(url: &str, token: Option<String>) -> anyhow::Result<Api> {
        let base = url.trim_end_matches('/').to_owned();
        reqwest::Url::parse(&base).with_context(|| format!("--url `{url}` is not a URL"))?;
        let client = Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Api {
            client,
            base,
            token,
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends, and turns anything but a 2xx into one sentence: the API's `error` member.
    async fn send(&self, request: RequestBuilder) -> Result<(StatusCode, Value), ApiFailure> {
        let response = request.send().await.map_err(|e| ApiFailure {
            status: None,
            message: format!(
                "cannot reach the gateway at {}: {}",
                self.base,
                root_cause(&e)
            ),
            detail: Value::Null,
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| ApiFailure {
            status: Some(status),
            message: format!("the gateway's answer was cut off: {}", root_cause(&e)),
            detail: Value::Null,
        })?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if status.is_success() {
            return Ok((status, body));
        }
        let message = match body["error"].as_str() {
            Some(e) => format!("{e} (HTTP {})", status.as_u16()),
            None => format!("the gateway answered HTTP {status}"),
        };
        let message = if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
            format!("{message}; set {TOKEN_ENV}")
        } else {
            message
        };
        Err(ApiFailure {
            status: Some(status),
            message,
            detail: body["detail"].clone(),
        })
    }
}

/// The innermost error: "Connection refused (os error 111)" rather than reqwest's wrapper.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let rows = vec![
            vec!["490154203237518".into(), "cover".into(), "x".into()],
            vec!["a".into(), "water_meter".into(), "y".into()],
        ];
        assert_eq!(
            table(&["ID", "PROFILE", "LABELS"], &rows),
            "ID               PROFILE      LABELS\n\
             490154203237518  cover        x\n\
             a                water_meter  y\n"
        );
    }

    #[test]
    fn device_paths_are_escaped() {
        assert_eq!(
            device_path("imsi:4600-1.x"),
            "/api/v1/devices/imsi:4600-1.x"
        );
        assert_eq!(device_path("a/b c"), "/api/v1/devices/a%2Fb%20c");
    }
}
