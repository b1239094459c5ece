//! `nbiot-gateway run`: builds every component from the validated config, runs them until
//! shutdown is requested, then stops them in order.
//!
//! Today that is the store, the device registry, the profiles (reloaded on SIGHUP), the
//! ingest pipeline (shards, group-commit writer, retention), the Alertmanager notifier
//! (with `[alertmanager]`) and the HTTP API. The ingest listeners (CoAP, MQTT) are started
//! in `start_sources` with the pipeline's handle.
//!
//! Shutdown is a [`CancellationToken`] passed in (mini-redis style): `main` cancels it on
//! SIGINT/SIGTERM, tests cancel it directly. Every task is tracked, and `run` returns only
//! after all of them have finished. The ingest path stops in flow order, so nothing a
//! device was (or will be) acknowledged for is lost: the sources stop taking uplinks and
//! finish the ones in flight, then the pipeline drains its shards, commits and answers
//! everything it accepted, and its writer thread ends. The forwarder (when `[influxdb]` is
//! configured) stops after that, with one bounded final flush of what was committed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::alerts::{self, NotifierSettings};
use crate::api::{self, ApiState};
use crate::config::Config;
use crate::forward::{Forwarder, ForwarderSettings};
use crate::health::Health;
use crate::pipeline::{Pipeline, PipelineConfig, PipelineHandle};
use crate::profiles::{self, LoadReport, SharedProfiles};
use crate::registry::Registry;
use crate::store::Store;

/// Addresses the gateway actually bound (the config may ask for port 0).
#[derive(Debug, Clone)]
pub struct Bound {
    pub http: SocketAddr,
    pub coap: SocketAddr,
    /// The embedded MQTT broker (None with an external broker or MQTT off).
    pub mqtt: Option<SocketAddr>,
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
    // First: every component creates its metric handles when it starts, and handles made
    // before the recorder exists would count into the void.
    let metrics = match crate::telemetry::metrics::install() {
        Ok(handle) => Some(handle),
        Err(e) => {
            warn!(error = %e, "Metrics recorder not installed; /metrics is off.");
            None
        }
    };

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

    // Component checks `/readyz` reports (forwarder, Alertmanager notifier): one, shared.
    let health = Health::default();

    // Alertmanager notifier: takes the writer's committed alert transitions; stopped after
    // the pipeline has drained, so the last commits' transitions are pushed too.
    let (alert_events, notifier) = match &config.alertmanager {
        Some(am) => {
            let settings = NotifierSettings::from_config(am).context("[alertmanager]")?;
            let (tx, handle) = alerts::start_notifier(settings, &registry, health.clone())
                .context("[alertmanager]")?;
            (Some(tx), Some(handle))
        }
        None => {
            // "Up" when none is configured (see the metric's help).
            ::metrics::gauge!(crate::telemetry::metrics::ALERT_PUSH_HEALTHY).set(1.0);
            (None, None)
        }
    };

    let pipeline = Pipeline::start(
        PipelineConfig {
            // Retention keeps what a forwarder has not delivered yet.
            forwarding: config.influxdb.is_some(),
            alert_events,
            ..PipelineConfig::new(&config.store)
        },
        registry.clone(),
    )
    .await
    .context("cannot start the ingest pipeline")?;

    // Forwarder to the TSDB (src/forward/): reads what the pipeline commits, behind its own
    // persisted cursor; stopped after the pipeline has drained (one bounded final flush).
    let forwarder = match &config.influxdb {
        Some(influx) => Some(
            Forwarder::start(
                ForwarderSettings::from_config(influx),
                &config.store.path,
                health.clone(),
            )
            .await
            .context("cannot start the forwarder ([influxdb])")?,
        ),
        None => None,
    };

    let listener = TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the HTTP API", config.http.listen))?;
    let http_addr = listener.local_addr()?;
    let state = {
        let dir = dir.clone();
        let state = ApiState::new(registry.clone(), &config.http.tokens)
            .with_reload(move || load_profiles(&dir))
            .with_health(health.clone());
        match metrics {
            Some(handle) => state.with_metrics(handle),
            None => state,
        }
    };
    let reload_state = state.clone();

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
    tasks.spawn(reload_on_sighup(reload_state, shutdown.clone()));
    tasks.close();

    // The sources get their own tracker: they must have stopped before the pipeline drains.
    let sources = TaskTracker::new();
    let started = start_sources(&config, pipeline.handle(), &sources, shutdown.clone()).await;
    sources.close();
    let bound = match started {
        Ok(bound) => bound,
        Err(e) => {
            // Stop what did start, in order, before reporting.
            shutdown.cancel();
            sources.wait().await;
            pipeline.shutdown().await?;
            if let Some(n) = notifier {
                n.shutdown().await;
            }
            tasks.wait().await;
            return Err(e);
        }
    };

    info!(
        http = %http_addr,
        coap = %bound.coap,
        mqtt = %bound.mqtt.map_or_else(|| "-".to_owned(), |a| a.to_string()),
        "Gateway running."
    );
    on_bound(Bound {
        http: http_addr,
        coap: bound.coap,
        mqtt: bound.mqtt,
    });

    shutdown.cancelled().await;
    info!("Shutting down.");
    // 1. Sources stop receiving and finish what they hold (they still get outcomes: the
    //    pipeline is running).
    sources.wait().await;
    // 2. Shards drain, the writer commits and answers everything accepted, then stops.
    let drained = pipeline.shutdown().await;
    // 3. The Alertmanager notifier pushes what those commits raised (bounded), then stops.
    if let Some(n) = notifier {
        n.shutdown().await;
    }
    // 3b. The forwarder sends what is committed, for at most FINAL_FLUSH; the rest waits in
    //     the store behind its cursor for the next start.
    if let Some(f) = forwarder {
        f.shutdown(crate::forward::FINAL_FLUSH).await;
    }
    // 4. Everything else (HTTP API, reload).
    tasks.wait().await;
    drained.context("the ingest pipeline did not stop cleanly")?;
    info!("Gateway stopped.");
    Ok(())
}

/// Addresses the sources bound, and the embedded broker (alive for the process: rumqttd
/// cannot be stopped).
struct Sources {
    coap: SocketAddr,
    mqtt: Option<SocketAddr>,
    _broker: Option<crate::sources::broker::EmbeddedBroker>,
}

/// Starts the ingest listeners (CoAP, MQTT).
///
/// Each source gets a clone of `pipeline`, spawns its tasks on `tasks`, and stops receiving
/// when `shutdown` is cancelled; its tasks end once the uplinks it submitted have their
/// outcomes (the pipeline keeps running until every task on `tasks` has ended). An error
/// here (a port in use, a bad template) stops the gateway; a source that fails later
/// cancels `shutdown`, so the gateway stops rather than running deaf.
async fn start_sources(
    config: &Config,
    pipeline: PipelineHandle,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<Sources> {
    use crate::config::MqttMode;
    use crate::sources::{broker, coap, mqtt};

    let coap_settings = coap::CoapSettings::from_config(&config.coap).context("[coap]")?;
    let socket = tokio::net::UdpSocket::bind(config.coap.listen)
        .await
        .with_context(|| format!("cannot listen on udp {} for CoAP", config.coap.listen))?;
    let coap_addr = socket.local_addr()?;
    {
        let (pipeline, shutdown) = (pipeline.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = coap::serve(socket, coap_settings, pipeline, shutdown.clone()).await {
                error!(error = %e, "CoAP source failed; stopping the gateway.");
                shutdown.cancel();
            }
        });
    }
    info!(addr = %coap_addr, "CoAP source listening.");

    let (mut mqtt_addr, mut embedded) = (None, None);
    if config.mqtt.mode != MqttMode::Off {
        let mut settings = mqtt::MqttSettings::from_config(&config.mqtt).context("[mqtt]")?;
        if config.mqtt.mode == MqttMode::Embedded {
            let (listen, consumer) = (config.mqtt.listen, settings.clone());
            let b = tokio::task::spawn_blocking(move || {
                broker::start_embedded_broker(listen, broker::BrokerLimits::default(), &consumer)
            })
            .await?
            .with_context(|| format!("cannot start the embedded MQTT broker on {listen}"))?;
            settings = settings.with_broker(b.local_addr());
            mqtt_addr = Some(b.local_addr());
            embedded = Some(b);
        }
        tasks.spawn(async move {
            if let Err(e) = mqtt::run(settings, pipeline, shutdown.clone()).await {
                error!(error = %e, "MQTT source failed; stopping the gateway.");
                shutdown.cancel();
            }
        });
    }
    Ok(Sources {
        coap: coap_addr,
        mqtt: mqtt_addr,
        _broker: embedded,
    })
}

/// Reloads the profiles on every SIGHUP through the same path as
/// `POST /api/v1/profiles/reload` (one reload at a time; a file that fails keeps its
/// previous version in force).
async fn reload_on_sighup(state: ApiState, shutdown: CancellationToken) {
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
            match api::reload_profiles(&state).await {
                Ok(outcome) => info!(
                    loaded = outcome.loaded.len(),
                    refused = outcome.errors.len(),
                    "Device profiles reloaded (SIGHUP)."
                ),
                Err(e) => error!(error = %e, "Profile reload failed."),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = state;
        shutdown.cancelled().await;
    }
}
