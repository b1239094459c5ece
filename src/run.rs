//! `nbiot-gateway run`: builds every component from the validated config, runs them until
//! shutdown is requested, then stops them in order.
//!
//! Today that is the store, the device registry, the profiles (reloaded on SIGHUP) and the
//! HTTP API. The ingest listeners (CoAP, MQTT) are the next milestone.
//!
//! Shutdown is a [`CancellationToken`] passed in (mini-redis style): `main` cancels it on
//! SIGINT/SIGTERM, tests cancel it directly. Every task is tracked, and `run` returns only
//! after all of them have finished.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::profiles::{self, LoadReport, SharedProfiles};
use crate::registry::Registry;
use crate::store::Store;

/// Addresses the gateway actually bound (the config may ask for port 0).
#[derive(Debug, Clone)]
pub struct Bound {
    pub http: std::net::SocketAddr,
}

/// Loads profiles from `dir`, logging every error once, here where it is handled.
fn load_profiles(dir: &std::path::Path) -> LoadReport {
    let report = profiles::load_dir(dir);
    for e in &report.errors {
        warn!(file = %e.file, line = e.line, error = %e.message, "Device profile refused.");
    }
    report
}

/// Runs the gateway until `shutdown` is cancelled. `on_bound` is told the bound addresses
/// once everything listens (tests use it to learn ports chosen at run time).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    on_bound: impl FnOnce(Bound) + Send,
) -> anyhow::Result<()> {
    api::check_listen(config.http.listen, &config.http.tokens)?;

    let dir: PathBuf = config.profiles.dir.clone();
    let report = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || load_profiles(&dir)).await?
    };
    info!(
        dir = %dir.display(),
        loaded = report.set.len(),
        refused = report.errors.len(),
        "Device profiles loaded."
    );
    let shared = SharedProfiles::new(report.set);

    let store = {
        let path = config.store.path.clone();
        tokio::task::spawn_blocking(move || Store::open(&path))
            .await?
            .with_context(|| format!("cannot open the store at {}", config.store.path.display()))?
    };
    let store = Arc::new(store);
    let registry = Registry::open(Arc::clone(&store), shared.clone())
        .await
        .context("cannot load the device registry")?;
    info!(path = %config.store.path.display(), devices = registry.len(), "Store opened.");

    let listener = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the HTTP API", config.http.listen))?;
    let http_addr = listener.local_addr()?;
    let state = {
        let dir = dir.clone();
        ApiState::new(registry.clone(), &config.http.tokens)
            .with_reload(move || load_profiles(&dir))
    };

    let tasks = TaskTracker::new();
    {
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = api::serve(listener, state, shutdown.clone().cancelled_owned()).await {
                error!(error = %e, "HTTP API stopped.");
                shutdown.cancel();
            }
        });
    }
    tasks.spawn(reload_on_sighup(dir, shared, shutdown.clone()));
    tasks.close();

    info!(http = %http_addr, "Gateway running.");
    on_bound(Bound { http: http_addr });

    shutdown.cancelled().await;
    info!("Shutting down.");
    tasks.wait().await;
    info!("Gateway stopped.");
    Ok(())
}

/// Reloads the profiles on every SIGHUP; a file that fails keeps its previous version.
async fn reload_on_sighup(dir: PathBuf, shared: SharedProfiles, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "Cannot listen for SIGHUP; reload profiles through the API.");
                return;
            }
        };
        loop {
            tokio::select! {
                // Cancellation-safe: nothing is in flight between iterations.
                _ = shutdown.cancelled() => return,
                // `recv` is cancellation-safe; None means the signal stream closed.
                got = hup.recv() => if got.is_none() { return },
            }
            let report = {
                let dir = dir.clone();
                match tokio::task::spawn_blocking(move || load_profiles(&dir)).await {
                    Ok(r) => r,
                    Err(e) => {
                        error!(error = %e, "Profile reload task failed.");
                        continue;
                    }
                }
            };
            let next = shared.current().merged_reload(&report);
            info!(
                loaded = report.set.len(),
                refused = report.errors.len(),
                in_force = next.len(),
                "Device profiles reloaded (SIGHUP)."
            );
            shared.replace(next);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (dir, shared);
        shutdown.cancelled().await;
    }
}
