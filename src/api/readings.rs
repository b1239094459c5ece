//! A device's data: `GET /api/v1/devices/{id}/latest` (its state and the readings of its
//! last decoded uplink) and `GET /api/v1/devices/{id}/readings` (a time range, raw or
//! downsampled). Both need the `read` role; an unregistered device is 404.
//!
//! `readings` query parameters (any other is a 400, as is a repeated one):
//!
//! | Parameter | Meaning | Default |
//! |---|---|---|
//! | `from`, `to` | inclusive range: RFC 3339 (`2026-11-21T08:00:00Z`, fractions and `+08:00` offsets allowed; a `+` sent unencoded arrives as a space and is read as `+`) or Unix seconds | `to` = now, `from` = `to` − 24 h |
//! | `fields` | comma-separated field names; readings holding none of them are left out | all |
//! | `limit` | readings (or buckets) returned, 1..=100000 | 1000 |
//! | `step` | bucket width, a duration ("5m", "1h"), whole seconds ≥ 1 s | none: raw readings |
//! | `agg` | `mean` \| `min` \| `max` \| `last` \| `count` (needs `step`) | `mean` |
//!
//! Raw: `{"device":"…","readings":[{"time":"…","fields":{…}}],"truncated":false}`, oldest
//! first. Downsampled: `{"device":"…","step":"1h","agg":"mean","buckets":[{"time":"…",
//! "fields":{…}}],"truncated":false}`. `truncated` says more matched than `limit` (the
//! oldest `limit` are returned; ask again from the last time). Bucket and aggregate
//! semantics: see `store::query`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::auth::CanRead;
use super::{ApiError, ApiState, PathParam, QueryPairs};
use crate::registry::{rfc3339, Device, RegistryError};
use crate::store::query::{self, Agg, BucketsPage, Range, ReadingsPage};

pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 100_000;
/// The window when `from` is not given.
pub const DEFAULT_WINDOW_S: i64 = 86_400;

fn registered(state: &ApiState, id: &str) -> Result<Arc<Device>, ApiError> {
    state
        .registry
        .get(id)
        .ok_or_else(|| RegistryError::NotFound(id.to_owned()).into())
}

/// `2026-11-21T08:00:00.123Z`
fn rfc3339_ms(ms: i64) -> String {
    let s = rfc3339(ms.div_euclid(1000));
    let base = s.strip_suffix('Z').unwrap_or(&s);
    format!("{base}.{:03}Z", ms.rem_euclid(1000))
}

pub(super) async fn latest(
    _: CanRead,
    State(state): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<Json<Value>, ApiError> {
    let device = registered(&state, &id)?;
    let status = {
        let id = id.clone();
        state
            .reads
            .run(move |conn| query::device_status(conn, &id))
            .await?
            .unwrap_or_default()
    };
    let readings: Vec<Value> = status
        .readings
        .iter()
        .map(|r| {
            json!({
                "measurement": r.measurement,
                "time": rfc3339(r.time_s),
                "time_source": if r.device_time { "device" } else { "received" },
                // Written by the pipeline as a JSON object; null only if edited by hand.
                "fields": serde_json::from_str::<Value>(&r.fields).unwrap_or(Value::Null),
            })
        })
        .collect();
    Ok(Json(json!({
        "device": device.id(),
        "profile": device.profile(),
        "first_seen": status.first_seen_ms.map(rfc3339_ms),
        "last_seen": status.last_seen_ms.map(rfc3339_ms),
        "last_transport": status.last_transport,
        "last_peer": status.last_peer,
        "uplinks": status.uplinks,
        "duplicates": status.duplicates,
        "gaps": status.gaps,
        "counter_resets": status.resets,
        "last_sequence": status.last_sequence,
        "last_error": status.last_error.map(|e| json!({
            "code": e.code,
            "message": e.message,
            "time": rfc3339_ms(e.at_ms),
        })),
        "readings": readings,
    })))
}

/// A validated `readings` query.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingsQuery {
    pub from_s: i64,
    pub to_s: i64,
    pub fields: Option<Vec<String>>,
    pub limit: usize,
    /// Bucket width in seconds and how to aggregate.
    pub step: Option<(i64, Agg)>,
}

/// Parses and validates the query string; `now_s` is the default `to`.
pub fn parse_query(pairs: &[(String, String)], now_s: i64) -> Result<ReadingsQuery, ApiError> {
    let mut from = None;
    let mut to = None;
    let mut fields = None;
    let mut limit = None;
    let mut step = None;
    let mut agg = None;
    for (name, value) in pairs {
        let slot = match name.as_str() {
            "from" => &mut from,
            "to" => &mut to,
            "fields" => &mut fields,
            "limit" => &mut limit,
            "step" => &mut step,
            "agg" => &mut agg,
            other => return Err(unknown_param(other)),
        };
        if slot.replace(value.as_str()).is_some() {
            return Err(ApiError::bad_request(format!(
                "query parameter `{name}` is given twice"
            )));
        }
    }
    let time = |name: &str, v: &str| {
        parse_time(v).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`{name}={v}` is not a time: use RFC 3339 (2026-11-21T08:00:00Z) or Unix seconds"
            ))
        })
    };
    let to_s = match to {
        Some(v) => time("to", v)?,
        None => now_s,
    };
    let from_s = match from {
        Some(v) => time("from", v)?,
        None => to_s.saturating_sub(DEFAULT_WINDOW_S),
    };
    if from_s > to_s {
        return Err(ApiError::bad_request(format!(
            "`from` ({}) is after `to` ({})",
            rfc3339(from_s),
            rfc3339(to_s)
        )));
    }
    let fields = match fields {
        None => None,
        Some(list) => {
            let names: Vec<String> = list.split(',').map(|f| f.trim().to_owned()).collect();
            if names.iter().any(String::is_empty) {
                return Err(ApiError::bad_request(format!(
                    "`fields={list}` has an empty name: give comma-separated field names"
                )));
            }
            Some(names)
        }
    };
    let limit = match limit {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`limit={v}` must be a whole number from 1 to {MAX_LIMIT}"
                )))
            }
        },
    };
    let agg = match agg {
        None => None,
        Some(v) => Some(Agg::parse(v).ok_or_else(|| {
            ApiError::bad_request(format!("`agg={v}` is not one of {}", Agg::NAMES))
        })?),
    };
    let step = match (step, agg) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "`agg` needs `step`, the bucket width (e.g. step=1h)",
            ))
        }
        (Some(v), agg) => {
            let d = humantime::parse_duration(v).map_err(|e| {
                ApiError::bad_request(format!(
                    "`step={v}` is not a duration ({e}); write e.g. 5m, 1h, 1d"
                ))
            })?;
            if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
                return Err(ApiError::bad_request(format!(
                    "`step={v}` must be whole seconds, at least 1s"
                )));
            }
            let secs = i64::try_from(d.as_secs())
                .map_err(|_| ApiError::bad_request(format!("`step={v}` is too large")))?;
            Some((secs, agg.unwrap_or(Agg::Mean)))
        }
    };
    Ok(ReadingsQuery {
        from_s,
        to_s,
        fields,
        limit,
        step,
    })
}

fn unknown_param(name: &str) -> ApiError {
    ApiError::bad_request(format!(
        "unknown query parameter `{name}` (expected from, to, fields, limit, step, agg)"
    ))
}

/// RFC 3339 (with `Z`, no zone, or a `±HH:MM` offset; a space where the `+` was, as an
/// unencoded `+` arrives in a query string) or Unix seconds, floored to the second.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim_end();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    let bytes = s.as_bytes();
    let n = bytes.len();
    let (base, offset_s) = match bytes.get(n.wrapping_sub(6)..) {
        Some([sign @ (b'+' | b'-' | b' '), h1, h2, b':', m1, m2])
            if n > 6 && [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit()) =>
        {
            let digit = |b: &u8| i64::from(b - b'0');
            let off = (digit(h1) * 10 + digit(h2)) * 3600 + (digit(m1) * 10 + digit(m2)) * 60;
            let off = if *sign == b'-' { -off } else { off };
            (s.get(..n - 6)?, off)
        }
        _ => (s, 0),
    };
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    let secs = i64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_secs()).ok()?;
    Some(secs - offset_s)
}

pub(super) async fn readings(
    _: CanRead,
    State(state): State<ApiState>,
    PathParam(id): PathParam,
    QueryPairs(pairs): QueryPairs,
) -> Result<Response, ApiError> {
    let device = registered(&state, &id)?;
    let now_s = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let q = parse_query(&pairs, now_s)?;
    let dev = device.id().to_owned();
    match q.step {
        None => {
            let page = {
                let q = q.clone();
                state
                    .reads
                    .run(move |conn| {
                        let range = Range {
                            device: &dev,
                            from_s: q.from_s,
                            to_s: q.to_s,
                            fields: q.fields.as_deref(),
                        };
                        query::readings(conn, &range, q.limit)
                    })
                    .await?
            };
            Ok(raw_json(device.id(), &page))
        }
        Some((step_s, agg)) => {
            let page = {
                let q = q.clone();
                state
                    .reads
                    .run(move |conn| {
                        let range = Range {
                            device: &dev,
                            from_s: q.from_s,
                            to_s: q.to_s,
                            fields: q.fields.as_deref(),
                        };
                        query::downsample(conn, &range, step_s, agg, q.limit)
                    })
                    .await?
            };
            Ok(buckets_json(device.id(), step_s, agg, page))
        }
    }
}

/// The raw page, written directly: each reading's stored fields text is already the JSON
/// object to serve, so a 10k-reading page costs no parse and no re-encode.
fn raw_json(device: &str, page: &ReadingsPage) -> Response {
    let mut out = String::with_capacity(64 + page.readings.len() * 128);
    out.push_str("{\"device\":");
    out.push_str(&Value::from(device).to_string());
    out.push_str(",\"readings\":[");
    for (i, (time_s, fields)) in page.readings.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"time\":\"");
        out.push_str(&rfc3339(*time_s));
        out.push_str("\",\"fields\":");
        out.push_str(fields);
        out.push('}');
    }
    out.push_str("],\"truncated\":");
    out.push_str(if page.truncated { "true" } else { "false" });
    out.push('}');
    ([(header::CONTENT_TYPE, "application/json")], out).into_response()
}

fn buckets_json(device: &str, step_s: i64, agg: Agg, page: BucketsPage) -> Response {
    let step = humantime::format_duration(Duration::from_secs(step_s.unsigned_abs())).to_string();
    let buckets: Vec<Value> = page
        .buckets
        .into_iter()
        .map(|(t, fields)| json!({ "time": rfc3339(t), "fields": fields }))
        .collect();
    Json(json!({
        "device": device,
        "step": step,
        "agg": agg.as_str(),
        "buckets": buckets,
        "truncated": page.truncated,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &[(&str, &str)]) -> Result<ReadingsQuery, String> {
        let pairs: Vec<(String, String)> = s
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        parse_query(&pairs, 1_800_000_000).map_err(|e| e.to_string())
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("2026-11-21T08:00:00Z"), Some(1_795_248_000));
        assert_eq!(parse_time("2026-11-21T08:00:00.999Z"), Some(1_795_248_000));
        assert_eq!(parse_time("2026-11-21T08:00:00"), Some(1_795_248_000));
        assert_eq!(parse_time("2026-11-21T16:00:00+08:00"), Some(1_795_248_000));
        assert_eq!(parse_time("2026-11-21T16:00:00 08:00"), Some(1_795_248_000));
        assert_eq!(parse_time("2026-11-21T03:00:00-05:00"), Some(1_795_248_000));
        assert_eq!(parse_time("1795248000"), Some(1_795_248_000));
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_time(""), None);
    }

    #[test]
    fn defaults() {
        assert_eq!(
            q(&[]).unwrap(),
            ReadingsQuery {
                from_s: 1_800_000_000 - 86_400,
                to_s: 1_800_000_000,
                fields: None,
                limit: 1000,
                step: None,
            }
        );
        let r = q(&[("step", "5m"), ("fields", "a, b")]).unwrap();
        assert_eq!(r.step, Some((300, Agg::Mean)));
        assert_eq!(r.fields, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(
            q(&[("step", "1h"), ("agg", "max")]).unwrap().step,
            Some((3600, Agg::Max))
        );
    }

    #[test]
    fn bad_params_say_why() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("from", "soon")], "`from=soon` is not a time"),
            (
                &[
                    ("from", "2026-01-02T00:00:00Z"),
                    ("to", "2026-01-01T00:00:00Z"),
                ],
                "is after `to`",
            ),
            (
                &[("limit", "0")],
                "`limit=0` must be a whole number from 1 to 100000",
            ),
            (&[("limit", "100001")], "must be a whole number"),
            (&[("agg", "mean")], "`agg` needs `step`"),
            (
                &[("step", "1h"), ("agg", "avg")],
                "`agg=avg` is not one of mean, min, max, last, count",
            ),
            (&[("step", "500ms")], "must be whole seconds"),
            (&[("step", "often")], "`step=often` is not a duration"),
            (&[("fields", "a,,b")], "empty name"),
            (&[("limit", "5"), ("limit", "6")], "given twice"),
            (&[("form", "x")], "unknown query parameter `form`"),
        ];
        for (pairs, want) in cases {
            let err = q(pairs).unwrap_err();
            assert!(err.contains(want), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn millisecond_times() {
        assert_eq!(rfc3339_ms(1_795_248_000_042), "2026-11-21T08:00:00.042Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }
}
