//! Bearer-token authentication and the two roles: `read` for GETs (and decoding a test
//! payload), `admin` for anything that changes state.
//!
//! Configured tokens are kept only as SHA-256 digests; a presented token is hashed and
//! compared with every configured digest in constant time, without stopping at the first
//! match, so timing reveals neither which token matched nor how much of one did. With no
//! tokens configured the API is open (every caller is admin) — `serve` then refuses any
//! listen address that is not loopback.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use super::{ApiError, ApiState};
use crate::config::{Role, TokenConfig};
use crate::registry::token::{constant_time_eq, sha256};

/// The configured API tokens.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Vec<([u8; 32], Role)>,
}

impl Auth {
    /// Empty token strings are ignored (they could never be presented).
    pub fn new(tokens: &[TokenConfig]) -> Auth {
        Auth {
            tokens: tokens
                .iter()
                .filter(|t| !t.token.is_empty())
                .map(|t| (sha256(t.token.as_bytes()), t.role))
                .collect(),
        }
    }

    /// True when no token is configured: everyone is admin.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The caller's role if it has at least `needed`.
    pub fn check(&self, headers: &HeaderMap, needed: Role) -> Result<Role, ApiError> {
        if self.is_open() {
            return Ok(Role::Admin);
        }
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(ApiError::MissingToken)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or(ApiError::BadToken)?;
        let presented = sha256(token.as_bytes());
        let mut role = None;
        for (digest, r) in &self.tokens {
            if constant_time_eq(&presented, digest) {
                role = match (role, *r) {
                    (Some(Role::Admin), _) | (_, Role::Admin) => Some(Role::Admin),
                    _ => Some(Role::Read),
                };
            }
        }
        let role = role.ok_or(ApiError::BadToken)?;
        if role == Role::Admin || needed == Role::Read {
            Ok(role)
        } else {
            Err(ApiError::Forbidden { needed })
        }
    }
}

/// Extractor: the caller has the `read` role (or `admin`). Put it first in a handler's
/// arguments so authentication happens before the body is read.
#[derive(Debug, Clone, Copy)]
pub struct CanRead;

/// Extractor: the caller has the `admin` role.
#[derive(Debug, Clone, Copy)]
pub struct CanAdmin;

impl FromRequestParts<ApiState> for CanRead {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        state
            .auth
            .check(&parts.headers, Role::Read)
            .map(|_| CanRead)
    }
}

impl FromRequestParts<ApiState> for CanAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        state
            .auth
            .check(&parts.headers, Role::Admin)
            .map(|_| CanAdmin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn roles() {
        let auth = Auth::new(&[
            TokenConfig {
                token: "reader-token".into(),
                role: Role::Read,
            },
            TokenConfig {
                token: "admin-token".into(),
                role: Role::Admin,
            },
        ]);
        let check = |h: Option<&str>, needed| auth.check(&headers(h), needed);
        assert!(matches!(
            check(None, Role::Read),
            Err(ApiError::MissingToken)
        ));
        assert!(matches!(
            check(Some("Bearer nope"), Role::Read),
            Err(ApiError::BadToken)
        ));
        assert!(matches!(
            check(Some("Basic reader-token"), Role::Read),
            Err(ApiError::BadToken)
        ));
        assert!(matches!(
            check(Some("Bearer reader-token"), Role::Read),
            Ok(Role::Read)
        ));
        assert!(matches!(
            check(Some("bearer reader-token"), Role::Read),
            Ok(Role::Read)
        ));
        assert!(matches!(
            check(Some("Bearer reader-token"), Role::Admin),
            Err(ApiError::Forbidden {
                needed: Role::Admin
            })
        ));
        assert!(matches!(
            check(Some("Bearer admin-token"), Role::Admin),
            Ok(Role::Admin)
        ));
        assert!(matches!(
            check(Some("Bearer admin-token"), Role::Read),
            Ok(Role::Admin)
        ));
    }

    #[test]
    fn open_without_tokens() {
        let auth = Auth::new(&[]);
        assert!(auth.is_open());
        assert!(matches!(
            auth.check(&headers(None), Role::Admin),
            Ok(Role::Admin)
        ));
    }
}
