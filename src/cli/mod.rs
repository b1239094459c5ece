//! The subcommands of the `nbiot-gateway` binary: argument parsing (clap) and the commands
//! that need no running gateway (`decode`, `profiles check`, `print-config`). `devices`
//! talks to a running gateway's HTTP API (see [`devices`]).

pub mod decode;
pub mod devices;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nbiot-gateway",
    version,
    about = "NB-IoT sensor ingestion gateway"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (CoAP, MQTT, store, HTTP API).
    Run {
        /// Config file; without it the embedded defaults apply (see `print-config`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log line format on stderr (filter with RUST_LOG, e.g. `info,nbiot_gateway=debug`).
        #[arg(long, value_enum, env = "NBIOT_LOG_FORMAT", default_value_t = crate::telemetry::LogFormat::Text)]
        log_format: crate::telemetry::LogFormat,
    },
    /// Decode one payload and print the readings as JSON.
    Decode(decode::DecodeArgs),
    /// Work with device profiles.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCommand,
    },
    /// Manage the devices of a running gateway through its HTTP API.
    Devices {
        /// The gateway's HTTP API.
        #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[command(subcommand)]
        command: devices::DevicesCommand,
    },
    /// Print the full default configuration, every key commented.
    PrintConfig,
}

#[derive(Debug, Subcommand)]
pub enum ProfilesCommand {
    /// Validate every profile in DIR (schema, codec, rules, examples); exit 1 on any error.
    Check {
        /// Profiles directory.
        #[arg(default_value = "./device-profiles")]
        dir: PathBuf,
    },
}

/// `profiles check DIR`: prints one line per error (`file:line:col: message`) on stderr and
/// a summary on stdout; returns whether everything passed.
pub fn profiles_check(dir: &std::path::Path) -> bool {
    let report = crate::profiles::load_dir(dir);
    for e in &report.errors {
        eprintln!("{e}");
    }
    let examples: usize = report.set.iter().map(|p| p.examples).sum();
    let failed_files: std::collections::BTreeSet<&str> =
        report.errors.iter().map(|e| e.file.as_str()).collect();
    println!(
        "{} profile(s) valid ({} example(s) checked), {} file(s) with errors",
        report.set.len(),
        examples,
        failed_files.len()
    );
    report.errors.is_empty()
}
