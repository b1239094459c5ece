//! The NB-IoT gateway: takes in what NB-IoT devices send, decodes it, keeps it durably,
//! and serves it.
//!
//! # Layout
//!
//! - [`config`]: the TOML config (`Config`, serde, documented defaults) and its validation.
//! - [`profiles`]: device profiles (`device-profiles/*.toml`): loading, validation,
//!   examples, and decoding a payload with a profile.
//! - [`store`]: the embedded SQLite database (WAL, versioned migrations).
//! - [`registry`]: registered devices (id → profile, labels, params, token).
//! - [`api`]: the HTTP API (axum): health, profiles, devices.
//! - [`cli`]: the subcommands of the `nbiot-gateway` binary.
//!
//! Pure payload decoding lives in the `nbiot-codecs` crate; nothing here re-implements it.

pub mod api;
pub mod cli;
pub mod config;
pub mod profiles;
pub mod registry;
pub mod store;
