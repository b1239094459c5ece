//! [`ApiError`]: every way a request fails, and the JSON answer for each:
//! `{"error": "<one sentence>", "detail": <object or null>}` with the matching status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nbiot_codecs::DecodeError;
use serde_json::{json, Value};
use thiserror::Error;

use super::profiles::ReloadOutcome;
use crate::config::Role;
use crate::registry::{FieldError, RegistryError};
use crate::store::StoreError;

#[derive(Debug, Error)]
pub enum ApiError {
    /// Malformed request: bad JSON syntax, bad query parameter, non-UTF-8 CSV.
    #[error("{message}")]
    BadRequest { message: String },

    #[error("this endpoint needs an `Authorization: Bearer <token>` header")]
    MissingToken,

    #[error("the bearer token is not valid")]
    BadToken,

    #[error("this request needs the {} role", role_name(*.needed))]
    Forbidden { needed: Role },

    #[error("no such endpoint: {method} {path}")]
    NoRoute { method: String, path: String },

    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },

    #[error("profile `{0}` is not loaded")]
    ProfileNotFound(String),

    #[error("the request body is larger than the {limit}-byte limit of this endpoint")]
    TooLarge { limit: usize },

    /// Well-formed request whose content is wrong; every field at fault.
    #[error("invalid request: {}", join(.0))]
    Invalid(Vec<FieldError>),

    #[error("payload does not decode with profile `{profile}`: {error}")]
    Decode { profile: String, error: DecodeError },

    #[error(
        "{} profile file(s) failed to load; the previous version of each stays in force",
        .0.errors.len()
    )]
    Reload(Box<ReloadOutcome>),

    #[error("profile reload is not available in this process")]
    ReloadUnavailable,

    #[error(transparent)]
    Registry(#[from] RegistryError),

    #[error(transparent)]
    Store(#[from] StoreError),

    #[error("internal error: {0}")]
    Internal(String),
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Read => "read",
        Role::Admin => "admin",
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::MissingToken | ApiError::BadToken => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::NoRoute { .. } | ApiError::ProfileNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Invalid(_) | ApiError::Decode { .. } | ApiError::Reload(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::ReloadUnavailable => StatusCode::NOT_IMPLEMENTED,
            ApiError::Registry(e) => match e {
                RegistryError::Invalid(_) | RegistryError::Import(_) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
                RegistryError::Exists(_) => StatusCode::CONFLICT,
                RegistryError::Corrupt { .. } | RegistryError::Store(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            ApiError::Store(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn detail(&self) -> Value {
        match self {
            ApiError::Forbidden { needed } => json!({ "needed_role": role_name(*needed) }),
            ApiError::ProfileNotFound(name) => json!({ "profile": name }),
            ApiError::TooLarge { limit } => json!({ "limit_bytes": limit }),
            ApiError::Invalid(errors) | ApiError::Registry(RegistryError::Invalid(errors)) => {
                json!({ "errors": errors })
            }
            ApiError::Decode { profile, error } => {
                let mut d = json!({ "code": error.code(), "profile": profile });
                if let Some(offset) = decode_offset(error) {
                    d["offset"] = json!(offset);
                }
                d
            }
            ApiError::Reload(outcome) => json!(outcome),
            ApiError::Registry(RegistryError::Import(report)) => json!(report),
            ApiError::Registry(RegistryError::NotFound(id) | RegistryError::Exists(id)) => {
                json!({ "device": id })
            }
            _ => Value::Null,
        }
    }
}

/// The byte offset a decode error names, if any.
fn decode_offset(e: &DecodeError) -> Option<usize> {
    match e {
        DecodeError::Truncated { offset, .. }
        | DecodeError::BadConstant { offset, .. }
        | DecodeError::UnknownType { offset, .. }
        | DecodeError::InvalidValue { offset, .. }
        | DecodeError::TrailingBytes { offset, .. }
        | DecodeError::Encoding { offset, .. } => Some(*offset),
        DecodeError::Empty | DecodeError::Checksum { .. } => None,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED {
            // Logged here, where it is handled, and nowhere else.
            tracing::error!(error = %self, "HTTP API request failed.");
        }
        let body = json!({ "error": self.to_string(), "detail": self.detail() });
        let mut response = (status, Json(body)).into_response();
        let challenge = match self {
            ApiError::MissingToken => Some(r#"Bearer realm="nbiot-gateway""#),
            ApiError::BadToken => Some(r#"Bearer realm="nbiot-gateway", error="invalid_token""#),
            _ => None,
        };
        if let Some(c) = challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        response
    }
}

/// The body an extractor read, with a too-large body reported against `limit` (the
/// route's `DefaultBodyLimit`).
pub(super) fn body(
    read: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    read.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::bad_request(format!("cannot read the request body: {}", r.body_text()))
        }
    })
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        ApiError::bad_request(format!("bad path: {}", r.body_text()))
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request(format!("bad query string: {}", r.body_text()))
    }
}
