//! Logs (and, with the ingest path, metrics): what the gateway tells its operators.
//!
//! Logging is `tracing` with `RUST_LOG`-style filtering (default `info`), fields first then
//! a sentence; `NBIOT_LOG_FORMAT=json` switches to one JSON object per line.

pub mod metrics;

/// Installs the global log subscriber. Safe to call twice (the second call does nothing).
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // rumqttd logs every device connection at INFO and every normal disconnect at ERROR:
    // silenced by default (RUST_LOG can turn it back on).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("info,{}", crate::sources::broker::QUIET_RUMQTTD))
    });
    let json = std::env::var("NBIOT_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
