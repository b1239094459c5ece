//! `GET /api/v1/alerts`: the alerts of the fleet as the store has them — what is firing or
//! pending now (`alert_state`), or what resolved recently (`alert_transitions`). Needs the
//! `read` role.
//!
//! | Parameter | Meaning | Default |
//! |---|---|---|
//! | `state` | `firing`, `pending`, or `resolved` (recent resolutions, newest first) | firing and pending |
//! | `device`, `profile`, `rule`, `severity` | exact match | all |
//! | `limit` | alerts returned, 1..=10000 | 1000 |
//!
//! Any other parameter, a repeated one, or a bad value is a 400 naming it.
//!
//! Answer: `{"alerts":[…],"truncated":false}`; `truncated` says more matched than `limit`.
//! Current alerts come newest first (by when they fired, or started pending):
//!
//! ```text
//! {"device":"…","profile":"…","rule":"cover_open","severity":"critical","state":"firing",
//!  "since":"…","starts":"…","active_since":"…","value":1.0,"summary":"…","updated":"…",
//!  "labels":{"district":"north"}}
//! ```
//!
//! `since` is when the alert entered its state (fired, started pending, resolved),
//! `starts` when it fired (null while pending), `active_since` when its condition started
//! to hold. Resolutions carry the transition `id`, `since` (the resolution time) and
//! `starts`. `labels` are the device's current registry labels (empty when it is no longer
//! registered). Times are RFC 3339 UTC with milliseconds.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Map, Value};

use super::auth::CanRead;
use super::{ApiError, ApiState, QueryPairs};
use crate::registry::rfc3339;
use crate::store::alerts_query::{self, AlertFilter, StateRow, TransitionRow};

pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 10_000;

/// Which alerts a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Firing and pending.
    Current,
    Firing,
    Pending,
    Resolved,
}

/// A validated `GET /api/v1/alerts` query.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertsQuery {
    pub wanted: Wanted,
    pub filter: AlertFilter,
    pub limit: usize,
}

/// Parses and validates the query string.
pub fn parse_query(pairs: &[(String, String)]) -> Result<AlertsQuery, ApiError> {
    let mut state = None;
    let mut limit = None;
    let mut filter = AlertFilter::default();
    for (name, value) in pairs {
        let slot = match name.as_str() {
            "state" => &mut state,
            "limit" => &mut limit,
            "device" => &mut filter.device,
            "profile" => &mut filter.profile,
            "rule" => &mut filter.rule,
            "severity" => &mut filter.severity,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{other}` (expected state, device, profile, rule, severity, limit)"
                )))
            }
        };
        if slot.replace(value.clone()).is_some() {
            return Err(ApiError::bad_request(format!(
                "query parameter `{name}` is given twice"
            )));
        }
    }
    let wanted = match state.as_deref() {
        None => Wanted::Current,
        Some("firing") => Wanted::Firing,
        Some("pending") => Wanted::Pending,
        Some("resolved") => Wanted::Resolved,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`state={other}` is not one of firing, pending, resolved (leave it out for firing and pending)"
            )))
        }
    };
    if let Some(s) = &filter.severity {
        if !matches!(s.as_str(), "critical" | "warning" | "info") {
            return Err(ApiError::bad_request(format!(
                "`severity={s}` is not one of critical, warning, info"
            )));
        }
    }
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
    Ok(AlertsQuery {
        wanted,
        filter,
        limit,
    })
}

/// `2026-11-21T08:00:00.123Z`
fn rfc3339_ms(ms: i64) -> String {
    let s = rfc3339(ms.div_euclid(1000));
    let base = s.strip_suffix('Z').unwrap_or(&s);
    format!("{base}.{:03}Z", ms.rem_euclid(1000))
}

fn labels(state: &ApiState, device: &str) -> Value {
    let map: Map<String, Value> = state
        .registry
        .get(device)
        .map(|d| {
            d.labels()
                .map(|(k, v)| (k.to_owned(), Value::from(v)))
                .collect()
        })
        .unwrap_or_default();
    Value::Object(map)
}

fn current_json(state: &ApiState, r: StateRow) -> Value {
    json!({
        "since": rfc3339_ms(r.firing_since_ms.unwrap_or(r.active_since_ms)),
        "starts": r.firing_since_ms.map(rfc3339_ms),
        "active_since": rfc3339_ms(r.active_since_ms),
        "updated": rfc3339_ms(r.updated_ms),
        "labels": labels(state, &r.device),
        "device": r.device,
        "profile": r.profile,
        "rule": r.rule,
        "severity": r.severity,
        "state": r.state,
        "value": r.value,
        "summary": r.summary,
    })
}

fn resolved_json(state: &ApiState, r: TransitionRow) -> Value {
    json!({
        "id": r.id,
        "since": rfc3339_ms(r.time_ms),
        "starts": r.starts_ms.map(rfc3339_ms),
        "labels": labels(state, &r.device),
        "device": r.device,
        "profile": r.profile,
        "rule": r.rule,
        "severity": r.severity,
        "state": r.state,
        "value": r.value,
        "summary": r.summary,
    })
}

pub(super) async fn list(
    _: CanRead,
    State(state): State<ApiState>,
    QueryPairs(pairs): QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let q = parse_query(&pairs)?;
    let AlertsQuery {
        wanted,
        filter,
        limit,
    } = q;
    let (alerts, truncated) = match wanted {
        Wanted::Resolved => {
            let (rows, more) = state
                .reads
                .run(move |conn| alerts_query::resolved(conn, &filter, limit))
                .await?;
            let alerts: Vec<Value> = rows.into_iter().map(|r| resolved_json(&state, r)).collect();
            (alerts, more)
        }
        Wanted::Current | Wanted::Firing | Wanted::Pending => {
            let only = match wanted {
                Wanted::Firing => Some("firing"),
                Wanted::Pending => Some("pending"),
                _ => None,
            };
            let (rows, more) = state
                .reads
                .run(move |conn| alerts_query::current(conn, only, &filter, limit))
                .await?;
            let alerts: Vec<Value> = rows.into_iter().map(|r| current_json(&state, r)).collect();
            (alerts, more)
        }
    };
    Ok(Json(json!({ "alerts": alerts, "truncated": truncated })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_and_refuses_with_the_parameter_named() {
        let q = parse_query(&pairs(&[
            ("state", "resolved"),
            ("device", "d1"),
            ("limit", "5"),
        ]))
        .unwrap();
        assert_eq!(q.wanted, Wanted::Resolved);
        assert_eq!(q.filter.device.as_deref(), Some("d1"));
        assert_eq!(q.limit, 5);
        let q = parse_query(&[]).unwrap();
        assert_eq!((q.wanted, q.limit), (Wanted::Current, DEFAULT_LIMIT));

        let err = |q: &[(&str, &str)]| parse_query(&pairs(q)).unwrap_err().to_string();
        assert_eq!(
            err(&[("state", "open")]),
            "`state=open` is not one of firing, pending, resolved (leave it out for firing and pending)"
        );
        assert!(err(&[("state", "firing"), ("state", "resolved")]).contains("given twice"));
        assert!(err(&[("sort", "x")]).contains("unknown query parameter `sort`"));
        assert!(err(&[("limit", "0")]).contains("`limit=0`"));
        assert!(err(&[("severity", "major")]).contains("`severity=major`"));
    }
}
