//! The NB-IoT gateway: takes in what NB-IoT devices send, decodes it, keeps it durably,
//! and serves it.
//!
//! # Layout
//!
//! - [`config`]: the TOML config (`Config`, serde, documented defaults) and its validation.
//! - [`profiles`]: device profiles (`device-profiles/*.toml`): loading, validation,
//!   examples, and decoding a payload with a profile.
//! - [`pipeline`]: uplinks from the sources to a durable commit and back to an ack.
//! - [`store`]: the embedded SQLite database (WAL, versioned migrations).
//! - [`rules`]: alert rules — the expression language, per-device state, silence timers.
//! - [`registry`]: registered devices (id → profile, labels, params, token).
//! - [`forward`]: committed readings and alert transitions to a TSDB (InfluxDB v2 write API).
//! - [`api`]: the HTTP API (axum): health, profiles, devices.
//! - [`cli`]: the subcommands of the `nbiot-gateway` binary.
//! - [`run`]: `nbiot-gateway run`: components built from the config, run, shut down.
//! - [`telemetry`]: logging setup.
//!
//! Pure payload decoding lives in the `nbiot-codecs` crate; nothing here re-implements it.

pub mod alerts;
pub mod api;
pub mod cli;
pub mod config;
pub mod forward;
pub mod health;
pub mod pipeline;
pub mod profiles;
pub mod registry;
pub mod rules;
pub mod run;
pub mod sources;
pub mod store;
pub mod telemetry;
