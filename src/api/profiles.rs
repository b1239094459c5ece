//! `/api/v1/profiles`: list, show, test-decode a payload, reload from disk.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::Serialize;
use serde_json::{json, Value};

use super::auth::{CanAdmin, CanRead};
use super::error::body;
use super::{ApiError, ApiState, PathParam, DECODE_BODY_LIMIT};
use crate::profiles::{LoadReport, Profile, ProfileError};
use crate::registry::{Field, FieldError, Problem};

/// Loads the profiles directory again (see [`ApiState::with_reload`]).
pub type ReloadFn = Arc<dyn Fn() -> LoadReport + Send + Sync>;

/// What a reload did. The new set is `ProfileSet::merged_reload`: every profile that
/// loaded now replaces its old version; a file that failed keeps its previous version in
/// force; a profile whose file is gone is removed.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    /// Profiles (re)loaded from disk.
    pub loaded: Vec<String>,
    /// Profiles whose file failed: their previous version stays in force.
    pub kept: Vec<String>,
    /// Profiles no longer in force.
    pub removed: Vec<String>,
    /// Registered devices whose profile is no longer in force, per profile: their uplinks
    /// will fail to decode until the profile is back or they are re-registered.
    pub devices_without_profile: BTreeMap<String, usize>,
    pub errors: Vec<ProfileError>,
}

fn find(state: &ApiState, name: &str) -> Result<Arc<Profile>, ApiError> {
    state
        .registry
        .profiles()
        .current()
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::ProfileNotFound(name.to_owned()))
}

/// `[{"name","description","measurement","codec","devices"}]`, by name.
pub(super) async fn list(_: CanRead, State(state): State<ApiState>) -> Json<Value> {
    let counts = state.registry.count_by_profile();
    let set = state.registry.profiles().current();
    let items: Vec<Value> = set
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "description": p.description,
                "measurement": p.measurement,
                "codec": p.codec,
                "devices": counts.get(&p.name).copied().unwrap_or(0),
            })
        })
        .collect();
    Json(Value::Array(items))
}

/// The whole profile, as the profiles module serializes it.
pub(super) async fn get(
    _: CanRead,
    State(state): State<ApiState>,
    PathParam(name): PathParam,
) -> Result<Json<Value>, ApiError> {
    show(&state, &name)
}

/// `GET /api/v1/profiles/reload`: the profile called "reload" (the static route for
/// `POST .../reload` would otherwise hide it).
pub(super) async fn get_named_reload(
    _: CanRead,
    State(state): State<ApiState>,
) -> Result<Json<Value>, ApiError> {
    show(&state, "reload")
}

fn show(state: &ApiState, name: &str) -> Result<Json<Value>, ApiError> {
    let profile = find(state, name)?;
    let value = serde_json::to_value(&*profile)
        .map_err(|e| ApiError::Internal(format!("profile `{name}` cannot be shown: {e}")))?;
    Ok(Json(value))
}

/// Decodes a test payload: the raw body as a device would send it (the profile's transport
/// encoding applies), or with `Content-Type: application/json` a `{"hex": "…"}` object whose
/// hex is the payload's wire bytes.
pub(super) async fn decode(
    _: CanRead,
    State(state): State<ApiState>,
    PathParam(name): PathParam,
    headers: HeaderMap,
    read: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let profile = find(&state, &name)?;
    let payload = body(read, DECODE_BODY_LIMIT)?;
    let decoded = if is_json(&headers) {
        let hex = hex_member(&payload)?;
        nbiot_codecs::hex::decode(hex.as_bytes()).and_then(|bytes| profile.decode_bytes(&bytes))
    } else {
        profile.decode(&payload)
    };
    let readings = decoded.map_err(|error| ApiError::Decode {
        profile: name.clone(),
        error,
    })?;
    let value = serde_json::to_value(&readings)
        .map_err(|e| ApiError::Internal(format!("readings cannot be shown: {e}")))?;
    Ok(Json(value))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// The `hex` member of a `{"hex": "…"}` body.
fn hex_member(payload: &[u8]) -> Result<String, ApiError> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let invalid = |field: &str, problem| {
        ApiError::Invalid(vec![FieldError::new(
            Field::Other(field.to_owned()),
            problem,
        )])
    };
    let Value::Object(mut members) = value else {
        return Err(invalid(
            "body",
            Problem::WrongType {
                expected: r#"a JSON object such as {"hex": "68 10 ..."}"#,
            },
        ));
    };
    if let Some(other) = members.keys().find(|k| *k != "hex") {
        return Err(invalid(other, Problem::UnknownField { expected: "hex" }));
    }
    match members.remove("hex") {
        Some(Value::String(hex)) => Ok(hex),
        Some(_) => Err(invalid(
            "hex",
            Problem::WrongType {
                expected: "a string of hex digits",
            },
        )),
        None => Err(invalid("hex", Problem::Missing)),
    }
}

/// Reloads the profiles directory with the state's reload callback and merges the result
/// into the profiles in force. One reload at a time: SIGHUP and the API share this path, so
/// two reloads never merge against the same old set.
pub async fn reload_profiles(state: &ApiState) -> Result<ReloadOutcome, ApiError> {
    let reload = state.reload.clone().ok_or(ApiError::ReloadUnavailable)?;
    let _one_at_a_time = state.reload_lock.lock().await;
    let report = tokio::task::spawn_blocking(move || reload())
        .await
        .map_err(|e| ApiError::Internal(format!("the profile reload task failed: {e}")))?;
    let shared = state.registry.profiles();
    let old = shared.current();
    let next = old.merged_reload(&report);
    let loaded: BTreeSet<String> = report.set.iter().map(|p| p.name.clone()).collect();
    let kept = next
        .iter()
        .map(|p| p.name.clone())
        .filter(|n| !loaded.contains(n))
        .collect();
    let removed: Vec<String> = old
        .iter()
        .map(|p| p.name.clone())
        .filter(|n| next.get(n).is_none())
        .collect();
    shared.replace(next);
    state.registry.publish_metrics();
    let counts = state.registry.count_by_profile();
    let devices_without_profile = removed
        .iter()
        .filter_map(|n| counts.get(n).map(|c| (n.clone(), *c)))
        .collect();
    let outcome = ReloadOutcome {
        loaded: loaded.into_iter().collect(),
        kept,
        removed,
        devices_without_profile,
        errors: report.errors,
    };
    tracing::info!(
        loaded = outcome.loaded.len(),
        kept = outcome.kept.len(),
        removed = outcome.removed.len(),
        errors = outcome.errors.len(),
        "Reloaded device profiles."
    );
    Ok(outcome)
}

/// `POST /api/v1/profiles/reload`: [`reload_profiles`];
/// 200 with the outcome when every file loaded; 422 with the same outcome as `detail`
/// when some failed (the rest is applied either way).
pub(super) async fn reload(
    _: CanAdmin,
    State(state): State<ApiState>,
) -> Result<Json<ReloadOutcome>, ApiError> {
    let outcome = reload_profiles(&state).await?;
    if outcome.errors.is_empty() {
        Ok(Json(outcome))
    } else {
        Err(ApiError::Reload(Box::new(outcome)))
    }
}
