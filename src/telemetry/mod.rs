//! What the gateway tells its operators: logs ([`init_logging`]), metrics ([`metrics`]: every
//! name, help text and histogram bucket; `GET /metrics` renders them) and the standard
//! process metrics ([`process`]).
//!
//! Logging is `tracing` on stderr with `RUST_LOG`-style filtering (default `info`), fields
//! first then a sentence. INFO is lifecycle only (started, listening, reloaded, stopped);
//! nothing per uplink is logged above DEBUG, so INFO volume does not grow with traffic.
//! `--log-format json` (or `NBIOT_LOG_FORMAT=json`) writes one JSON object per line, with
//! the event's fields at the top level next to `timestamp`, `level`, `target` and `message`.

pub mod metrics;
pub mod process;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-11-21T08:00:00.000000Z  INFO nbiot_gateway::run: Gateway running. http=…`
    #[default]
    Text,
    /// `{"timestamp":"…","level":"INFO","message":"Gateway running.","http":"…","target":"…"}`
    Json,
}

/// The filter used when `RUST_LOG` is not set: INFO, with rumqttd's per-connection chatter
/// silenced (it logs every device connection at INFO and every normal disconnect at ERROR).
pub fn default_filter() -> String {
    format!("info,{}", crate::sources::broker::QUIET_RUMQTTD)
}

/// Installs the global log subscriber. Safe to call twice (the second call does nothing).
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .try_init(),
    };
}
