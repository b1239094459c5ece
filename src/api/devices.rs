//! `/api/v1/devices`: register (PUT), show, remove, list with filters, import CSV.
//!
//! `PUT /api/v1/devices/{id}` takes `{"profile": "…", "labels": {…}, "params": {…},
//! "token": "…"}` and replaces the device whole (201 when created, 200 when replaced),
//! except for the token, which is write-only: leave it out to keep the current one, send
//! `null` to remove it. The read-only members a `GET` returns (`id` when it matches the URL,
//! `has_token`, `created_at`, `updated_at`) are accepted and ignored, so a client can GET,
//! edit and PUT back. `If-None-Match: *` makes the PUT create-only (409 if the id exists).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::auth::{CanAdmin, CanRead};
use super::error::body;
use super::{ApiError, ApiState, PathParam, QueryPairs, DEVICE_BODY_LIMIT, IMPORT_BODY_LIMIT};
use crate::registry::validate::{is_valid_key, MAX_LABELS};
use crate::registry::{
    DeviceSpec, Field, FieldError, ImportMode, ImportReport, ListFilter, ParamValue, Problem,
    PutMode, RegistryError, TokenUpdate,
};

pub(super) async fn get(
    _: CanRead,
    State(state): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<Response, ApiError> {
    show(&state, &id)
}

fn show(state: &ApiState, id: &str) -> Result<Response, ApiError> {
    let device = state
        .registry
        .get(id)
        .ok_or_else(|| RegistryError::NotFound(id.to_owned()))?;
    Ok(Json(&*device).into_response())
}

pub(super) async fn put(
    _: CanAdmin,
    State(state): State<ApiState>,
    PathParam(id): PathParam,
    headers: HeaderMap,
    read: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    store(&state, id, &headers, body(read, DEVICE_BODY_LIMIT)?).await
}

async fn store(
    state: &ApiState,
    id: String,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let spec = spec_from_json(&id, value).map_err(ApiError::Invalid)?;
    let mode = match headers.get(header::IF_NONE_MATCH) {
        Some(v) if v.as_bytes() == b"*" => PutMode::CreateOnly,
        _ => PutMode::Upsert,
    };
    let outcome = state.registry.put(&id, spec, mode).await?;
    tracing::info!(
        device = %id,
        profile = outcome.device.profile(),
        created = outcome.created,
        "Registered device."
    );
    let mut response = Json(&*outcome.device).into_response();
    if outcome.created {
        *response.status_mut() = StatusCode::CREATED;
        // Ids are restricted to URL-safe characters, so the path needs no escaping.
        if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/devices/{id}")) {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
    Ok(response)
}

pub(super) async fn delete(
    _: CanAdmin,
    State(state): State<ApiState>,
    PathParam(id): PathParam,
) -> Result<StatusCode, ApiError> {
    remove(&state, &id).await
}

async fn remove(state: &ApiState, id: &str) -> Result<StatusCode, ApiError> {
    state.registry.delete(id).await?;
    tracing::info!(device = %id, "Removed device.");
    Ok(StatusCode::NO_CONTENT)
}

// The device called "import": its routes are shadowed by `POST /api/v1/devices/import`.

pub(super) async fn get_named_import(
    _: CanRead,
    State(state): State<ApiState>,
) -> Result<Response, ApiError> {
    show(&state, "import")
}

pub(super) async fn put_named_import(
    _: CanAdmin,
    State(state): State<ApiState>,
    headers: HeaderMap,
    read: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    store(
        &state,
        "import".to_owned(),
        &headers,
        body(read, DEVICE_BODY_LIMIT)?,
    )
    .await
}

pub(super) async fn delete_named_import(
    _: CanAdmin,
    State(state): State<ApiState>,
) -> Result<StatusCode, ApiError> {
    remove(&state, "import").await
}

/// `GET /api/v1/devices?profile=&label.<key>=&limit=&offset=` →
/// `{"devices": [...], "total": n, "limit": l, "offset": o}`, ordered by id.
pub(super) async fn list(
    _: CanRead,
    State(state): State<ApiState>,
    QueryPairs(query): QueryPairs,
) -> Result<Response, ApiError> {
    let filter = list_filter(query)?;
    let page = state.registry.list(filter).await?;
    Ok(Json(page).into_response())
}

fn list_filter(query: Vec<(String, String)>) -> Result<ListFilter, ApiError> {
    let mut filter = ListFilter::default();
    for (name, value) in query {
        match name.as_str() {
            "profile" => filter.profile = Some(value),
            "limit" => {
                filter.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=ListFilter::MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "limit must be a whole number from 1 to {}, not `{value}`",
                            ListFilter::MAX_LIMIT
                        ))
                    })?;
            }
            "offset" => {
                filter.offset = value.parse().map_err(|_| {
                    ApiError::bad_request(format!("offset must be a whole number, not `{value}`"))
                })?;
            }
            _ => match name.strip_prefix("label.") {
                Some(key) if is_valid_key(key) => filter.labels.push((key.to_owned(), value)),
                Some(key) => {
                    return Err(ApiError::bad_request(format!(
                        "`{key}` in `{name}` is not a label name (a-z 0-9 _)"
                    )))
                }
                None => {
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter `{name}` (expected profile, label.<key>, \
                         limit, offset)"
                    )))
                }
            },
        }
    }
    if filter.labels.len() > MAX_LABELS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_LABELS} label filters"
        )));
    }
    Ok(filter)
}

/// `POST /api/v1/devices/import[?partial=true]`, body CSV. 200 with the report when rows
/// were imported (or there was nothing bad); 422 with the report as `detail` when nothing
/// was imported because of bad rows.
pub(super) async fn import(
    _: CanAdmin,
    State(state): State<ApiState>,
    QueryPairs(query): QueryPairs,
    read: Result<Bytes, BytesRejection>,
) -> Result<Json<ImportReport>, ApiError> {
    let mut mode = ImportMode::AllOrNothing;
    for (name, value) in query {
        match (name.as_str(), value.as_str()) {
            ("partial", "true" | "1" | "") => mode = ImportMode::Partial,
            ("partial", "false" | "0") => mode = ImportMode::AllOrNothing,
            ("partial", _) => {
                return Err(ApiError::bad_request(format!(
                    "partial must be true or false, not `{value}`"
                )))
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter `{name}` (expected partial)"
                )))
            }
        }
    }
    let payload = body(read, IMPORT_BODY_LIMIT)?;
    let text = String::from_utf8(payload.into()).map_err(|e| {
        ApiError::bad_request(format!(
            "the CSV is not UTF-8 text (bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    Ok(Json(state.registry.import_csv(text, mode).await?))
}

/// The members a `PUT` accepts besides the ones it ignores.
const DEVICE_MEMBERS: &str = "profile, labels, params, token";

/// A device from a `PUT` body, with every problem named by its JSON path.
fn spec_from_json(id: &str, value: Value) -> Result<DeviceSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Value::Object(members) = value else {
        return Err(vec![FieldError::new(
            Field::Other("body".into()),
            Problem::WrongType {
                expected: "a JSON object",
            },
        )]);
    };
    let mut spec = DeviceSpec::default();
    let mut has_profile = false;
    for (name, v) in members {
        match name.as_str() {
            "profile" => match v {
                Value::String(s) => {
                    has_profile = true;
                    spec.profile = s;
                }
                _ => errors.push(FieldError::new(
                    Field::Profile,
                    Problem::WrongType {
                        expected: "a string",
                    },
                )),
            },
            "labels" => match v {
                Value::Null => {}
                Value::Object(map) => {
                    for (k, v) in map {
                        match v {
                            Value::String(s) => {
                                spec.labels.insert(k, s);
                            }
                            _ => errors.push(FieldError::new(
                                Field::Label(k),
                                Problem::WrongType {
                                    expected: "a string",
                                },
                            )),
                        }
                    }
                }
                _ => errors.push(FieldError::new(
                    Field::Labels,
                    Problem::WrongType {
                        expected: "an object of strings",
                    },
                )),
            },
            "params" => match v {
                Value::Null => {}
                Value::Object(map) => {
                    let mut params = BTreeMap::new();
                    for (k, v) in map {
                        let value = match v {
                            Value::Bool(b) => Some(ParamValue::Bool(b)),
                            Value::Number(n) => n.as_f64().map(ParamValue::Number),
                            Value::String(s) => Some(ParamValue::Text(s)),
                            _ => None,
                        };
                        match value {
                            Some(p) => {
                                params.insert(k, p);
                            }
                            None => errors.push(FieldError::new(
                                Field::Param(k),
                                Problem::WrongType {
                                    expected: "a number, boolean or string",
                                },
                            )),
                        }
                    }
                    spec.params = params;
                }
                _ => errors.push(FieldError::new(
                    Field::Params,
                    Problem::WrongType {
                        expected: "an object",
                    },
                )),
            },
            "token" => match v {
                Value::Null => spec.token = TokenUpdate::Clear,
                Value::String(s) => spec.token = TokenUpdate::Set(s),
                _ => errors.push(FieldError::new(
                    Field::Token,
                    Problem::WrongType {
                        expected: "a string, or null to remove the token",
                    },
                )),
            },
            "id" => {
                if v.as_str() != Some(id) {
                    errors.push(FieldError::new(
                        Field::Id,
                        Problem::WrongType {
                            expected: "the id in the URL (or left out)",
                        },
                    ));
                }
            }
            "has_token" | "created_at" | "updated_at" => {}
            _ => errors.push(FieldError::new(
                Field::Other(name),
                Problem::UnknownField {
                    expected: DEVICE_MEMBERS,
                },
            )),
        }
    }
    if !has_profile && !errors.iter().any(|e| e.field == Field::Profile) {
        errors.push(FieldError::new(Field::Profile, Problem::Missing));
    }
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spec_from_a_full_body() {
        let spec = spec_from_json(
            "x",
            json!({"id": "x", "profile": "p", "labels": {"district": "north"},
                   "params": {"depth_m": 2.5, "alarm": true, "kind": "deep"},
                   "token": null, "has_token": true, "created_at": "…"}),
        )
        .unwrap();
        assert_eq!(spec.profile, "p");
        assert_eq!(
            spec.labels.get("district").map(String::as_str),
            Some("north")
        );
        assert_eq!(spec.params.get("depth_m"), Some(&ParamValue::Number(2.5)));
        assert_eq!(spec.params.get("alarm"), Some(&ParamValue::Bool(true)));
        assert_eq!(
            spec.params.get("kind"),
            Some(&ParamValue::Text("deep".into()))
        );
        assert_eq!(spec.token, TokenUpdate::Clear);
        assert_eq!(
            spec_from_json("x", json!({"profile": "p"})).unwrap().token,
            TokenUpdate::Keep
        );
    }

    #[test]
    fn every_bad_member_is_named() {
        let errors = spec_from_json(
            "x",
            json!({"id": "y", "labels": {"a": 1}, "params": {"b": [1]}, "token": 5, "colour": "red"}),
        )
        .unwrap_err();
        let mut paths: Vec<String> = errors.iter().map(|e| e.field.json_path()).collect();
        paths.sort();
        assert_eq!(
            paths,
            ["colour", "id", "labels.a", "params.b", "profile", "token"]
        );
    }
}
