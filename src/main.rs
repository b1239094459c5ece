//! `nbiot-gateway`: the command line. Errors are reported here, once, as one line.

use std::process::ExitCode;

use clap::Parser;
use nbiot_gateway::cli::{self, Cli, Command, ProfilesCommand};
use nbiot_gateway::config::{Config, DEFAULT_CONFIG};
use nbiot_gateway::telemetry::LogFormat;
use tokio_util::sync::CancellationToken;

/// Loads the config, starts logging and a runtime, and runs until SIGINT or SIGTERM.
fn run(config: Option<std::path::PathBuf>, log_format: LogFormat) -> anyhow::Result<()> {
    let config = match config {
        Some(path) => Config::load(&path)?,
        None => Config::default(),
    };
    nbiot_gateway::telemetry::init_logging(log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        nbiot_gateway::run::run(config, shutdown, |_| {}).await
    })
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, log_format } => run(config, log_format),
        Command::Decode(args) => cli::decode::run(args),
        Command::Profiles {
            command: ProfilesCommand::Check { dir },
        } => {
            return if cli::profiles_check(&dir) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Command::Devices { url, command } => {
            let token = std::env::var("NBIOT_TOKEN").ok();
            cli::devices::run(command, &url, token)
        }
        Command::PrintConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbiot-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}
