//! `GET /healthz` (the process answers) and `GET /readyz` (it can do its job: the store
//! takes writes and profiles are loaded).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::ApiState;

/// How long the store write probe may take before the gateway counts as not ready: a
/// store that cannot commit a one-row write in this time cannot acknowledge uplinks either.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when every critical check passes, else 503; the body lists each check either way:
/// `{"status":"ready","checks":{"store":{"ok":true},"profiles":{"ok":true,"loaded":5}}}`.
/// A failing non-critical check (forwarder, Alertmanager; see [`crate::health`]) keeps 200
/// with `"status":"degraded"`.
pub(super) async fn readyz(State(state): State<ApiState>) -> (StatusCode, Json<Value>) {
    let store = std::sync::Arc::clone(state.registry.store());
    // On timeout the blocking probe keeps running and finishes on its own; it is one
    // small write.
    let probe = tokio::time::timeout(
        STORE_PROBE_TIMEOUT,
        tokio::task::spawn_blocking(move || store.probe_write()),
    )
    .await
    .map_err(|_| format!("the store write probe took longer than {STORE_PROBE_TIMEOUT:?}"))
    .and_then(|joined| joined.map_err(|e| format!("the store write probe failed: {e}")))
    .and_then(|r| r.map_err(|e| format!("the store does not take writes: {e}")));
    let store_check = match &probe {
        Ok(()) => json!({ "ok": true }),
        Err(e) => json!({ "ok": false, "error": e }),
    };
    let loaded = state.registry.profiles().current().len();
    let profiles_ok = loaded > 0;
    let profiles_check = if profiles_ok {
        json!({ "ok": true, "loaded": loaded })
    } else {
        json!({ "ok": false, "loaded": 0, "error": "no device profile is loaded" })
    };
    let mut checks = serde_json::Map::new();
    checks.insert("store".into(), store_check.clone());
    checks.insert("profiles".into(), profiles_check.clone());
    let mut critical_ok = true;
    let mut degraded = false;
    for (name, check) in state.health().snapshot() {
        if !check.ok {
            if check.critical {
                critical_ok = false;
            } else {
                degraded = true;
            }
        }
        let mut detail = match check.detail {
            Value::Object(m) => m,
            Value::Null => serde_json::Map::new(),
            other => {
                let mut m = serde_json::Map::new();
                m.insert("detail".into(), other);
                m
            }
        };
        detail.insert("ok".into(), Value::Bool(check.ok));
        checks.insert(name.into(), Value::Object(detail));
    }
    let ready = probe.is_ok() && profiles_ok && critical_ok;
    if !ready {
        tracing::debug!(store = %store_check, profiles = %profiles_check, "Not ready.");
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": match (ready, degraded) {
            (false, _) => "not_ready",
            (true, true) => "degraded",
            (true, false) => "ready",
        },
        "checks": checks,
    });
    (status, Json(body))
}
