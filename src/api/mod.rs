//! The HTTP API (axum): health and readiness, profiles (list, show, test-decode, reload),
//! the device registry (CRUD, filtered list, CSV import) and each device's data (latest
//! state, readings over time).
//!
//! This module owns routing, authentication ([`auth`]), request parsing, body limits and
//! the JSON error format ([`ApiError`]). It owns no state of its own: everything lives in
//! the [`Registry`], the [`Store`](crate::store::Store) and the
//! [`SharedProfiles`](crate::profiles::SharedProfiles) that [`ApiState`] points at, plus the
//! read-only connections device data is queried through.
//!
//! | Route | Role |
//! |---|---|
//! | `GET /healthz`, `GET /readyz` | none |
//! | `GET /api/v1/profiles`, `GET /api/v1/profiles/{name}` | read |
//! | `POST /api/v1/profiles/{name}/decode` | read (it changes nothing) |
//! | `POST /api/v1/profiles/reload` | admin |
//! | `GET /api/v1/devices`, `GET /api/v1/devices/{id}` | read |
//! | `PUT`/`DELETE /api/v1/devices/{id}`, `POST /api/v1/devices/import` | admin |
//! | `GET /api/v1/devices/{id}/latest`, `GET /api/v1/devices/{id}/readings` | read |
//! | `GET /api/v1/alerts` | read |

pub mod alerts;
pub mod auth;
mod devices;
mod error;
mod health;
mod profiles;
pub mod readings;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::Router;
use thiserror::Error;

use crate::health::Health;

pub use auth::Auth;
pub use error::ApiError;
pub use profiles::{reload_profiles, ReloadFn, ReloadOutcome};

use crate::config::TokenConfig;
use crate::profiles::LoadReport;
use crate::registry::Registry;
use crate::store::query::ReadPool;

/// Body limits per route. CSV import carries whole fleets (100k devices is ~5 MiB);
/// a test payload is at most a few hundred bytes; a device is a small JSON object.
pub const IMPORT_BODY_LIMIT: usize = 16 * 1024 * 1024;
pub const DECODE_BODY_LIMIT: usize = 64 * 1024;
pub const DEVICE_BODY_LIMIT: usize = 64 * 1024;

/// What the API handlers share. Cheap to clone.
///
/// ```text
/// let store = Arc::new(Store::open(&cfg.store.path)?);
/// let profiles = SharedProfiles::new(profiles::load_dir(&dir).set);
/// let registry = Registry::open(store, profiles).await?;
/// let state = ApiState::new(registry, &cfg.http.tokens)
///     .with_reload(move || profiles::load_dir(&dir));
/// api::serve(listener, state, shutdown).await?;
/// ```
#[derive(Clone)]
pub struct ApiState {
    registry: Registry,
    auth: Arc<Auth>,
    reload: Option<ReloadFn>,
    /// Serializes reloads: two at once would merge against the same old set.
    reload_lock: Arc<tokio::sync::Mutex<()>>,
    /// Read-only connections for device data (`readings`), apart from the registry's.
    reads: Arc<ReadPool>,
    /// Renders `GET /metrics`; None when no recorder is installed (tests, or a second
    /// gateway in one process).
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Component checks `/readyz` reports besides the store and profiles.
    health: Health,
}

impl ApiState {
    /// The store and profiles are the registry's.
    pub fn new(registry: Registry, tokens: &[TokenConfig]) -> ApiState {
        let reads = Arc::new(ReadPool::new(registry.store().path()));
        ApiState {
            registry,
            auth: Arc::new(Auth::new(tokens)),
            reload: None,
            reload_lock: Arc::default(),
            reads,
            metrics: None,
            health: Health::default(),
        }
    }

    /// Serve `GET /metrics` from this Prometheus recorder.
    pub fn with_metrics(
        mut self,
        handle: metrics_exporter_prometheus::PrometheusHandle,
    ) -> ApiState {
        self.metrics = Some(handle);
        self
    }

    /// Report these component checks in `/readyz` (see [`crate::health`]).
    pub fn with_health(mut self, health: Health) -> ApiState {
        self.health = health;
        self
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// What `POST /api/v1/profiles/reload` runs (on the blocking pool): typically
    /// `move || profiles::load_dir(&dir)`. The API merges its result into the profiles in
    /// force (see [`ReloadOutcome`]).
    pub fn with_reload(
        mut self,
        reload: impl Fn() -> LoadReport + Send + Sync + 'static,
    ) -> ApiState {
        self.reload = Some(Arc::new(reload));
        self
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }
}

/// Why the API could not serve.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(
        "refusing to serve the HTTP API on {addr} without authentication: configure \
         [[http.tokens]] or listen on a loopback address such as 127.0.0.1"
    )]
    OpenOnPublicAddress { addr: SocketAddr },

    #[error("HTTP API server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Refuses an unauthenticated API on anything but loopback. `serve` checks this itself;
/// call it early to fail at startup before binding anything.
pub fn check_listen(addr: SocketAddr, tokens: &[TokenConfig]) -> Result<(), ServeError> {
    if Auth::new(tokens).is_open() && !addr.ip().is_loopback() {
        return Err(ServeError::OpenOnPublicAddress { addr });
    }
    Ok(())
}

/// Serves the API on `listener` until `shutdown` completes, then finishes the requests
/// in flight.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr()?;
    if state.auth.is_open() && !addr.ip().is_loopback() {
        return Err(ServeError::OpenOnPublicAddress { addr });
    }
    tracing::info!(%addr, open = state.auth.is_open(), "HTTP API listening.");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!(%addr, "HTTP API stopped.");
    Ok(())
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/profiles", get(profiles::list))
        // Static segments win over `{name}`: a profile called "reload" is still readable.
        .route(
            "/api/v1/profiles/reload",
            post(profiles::reload).get(profiles::get_named_reload),
        )
        .route("/api/v1/profiles/{name}", get(profiles::get))
        .route(
            "/api/v1/profiles/{name}/decode",
            post(profiles::decode).layer(DefaultBodyLimit::max(DECODE_BODY_LIMIT)),
        )
        .route("/api/v1/devices", get(devices::list))
        // Same for a device called "import".
        .route(
            "/api/v1/devices/import",
            post(devices::import)
                .layer(DefaultBodyLimit::max(IMPORT_BODY_LIMIT))
                .merge(
                    get(devices::get_named_import)
                        .put(devices::put_named_import)
                        .delete(devices::delete_named_import)
                        .layer(DefaultBodyLimit::max(DEVICE_BODY_LIMIT)),
                ),
        )
        .route(
            "/api/v1/devices/{id}",
            get(devices::get)
                .put(devices::put)
                .delete(devices::delete)
                .layer(DefaultBodyLimit::max(DEVICE_BODY_LIMIT)),
        )
        .route("/api/v1/devices/{id}/latest", get(readings::latest))
        .route("/api/v1/devices/{id}/readings", get(readings::readings))
        .route("/api/v1/alerts", get(alerts::list))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// `GET /metrics`: Prometheus text exposition (open, like the health endpoints: it names
/// no device). See [`crate::telemetry::metrics::render`].
async fn metrics(
    axum::extract::State(state): axum::extract::State<ApiState>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(handle) = &state.metrics else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            "metrics are not enabled in this process\n",
        )
            .into_response();
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::telemetry::metrics::render(handle),
    )
        .into_response()
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

/// The one path parameter of a route, with [`ApiError`] as the rejection.
struct PathParam(String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) = Path::<String>::from_request_parts(parts, state).await?;
        Ok(PathParam(value))
    }
}

/// The query string as (name, value) pairs, in order, with [`ApiError`] as the rejection.
struct QueryPairs(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(pairs) =
            axum::extract::Query::<Vec<(String, String)>>::from_request_parts(parts, state).await?;
        Ok(QueryPairs(pairs))
    }
}
