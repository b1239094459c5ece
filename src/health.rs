//! Component health that `/readyz` reports: each long-running part of the gateway (listeners,
//! forwarder, Alertmanager push) sets its own named check; the API renders them all.
//!
//! A check is `critical` when its failure means the gateway cannot take uplinks (a listener
//! that is not bound): `/readyz` then answers 503. A non-critical failure (the TSDB refuses
//! our token, Alertmanager is down) is reported in the body with `"status": "degraded"` and
//! 200, because ingest still works and commits durably: taking the gateway out of a load
//! balancer's rotation would turn a forwarding problem into lost uplinks. Those failures are
//! what the shipped Prometheus rules alert on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// One component's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub ok: bool,
    /// Whether a failure makes the gateway not ready (503).
    pub critical: bool,
    /// Shown as is in the `/readyz` body: `{"ok": false, "error": "…", …}`.
    pub detail: Value,
}

impl Check {
    pub fn ok(critical: bool, detail: Value) -> Check {
        Check {
            ok: true,
            critical,
            detail,
        }
    }

    pub fn failing(critical: bool, detail: Value) -> Check {
        Check {
            ok: false,
            critical,
            detail,
        }
    }
}

/// Shared, cheap to clone; components keep a clone and call [`Health::set`] when their state
/// changes (not per event).
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<&'static str, Check>>>);

impl Health {
    pub fn set(&self, component: &'static str, check: Check) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(component, check);
    }

    pub fn remove(&self, component: &'static str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(component);
    }

    /// Every check, by component name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, Check> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_replaces_and_remove_forgets() {
        let h = Health::default();
        h.set("forwarder", Check::ok(false, json!({})));
        h.set("forwarder", Check::failing(false, json!({"error": "401"})));
        h.set("coap", Check::ok(true, json!({"listen": "0.0.0.0:5683"})));
        let s = h.snapshot();
        assert_eq!(s.len(), 2);
        assert!(!s["forwarder"].ok);
        h.remove("coap");
        assert_eq!(h.snapshot().len(), 1);
    }
}
