//! `nbiot-gateway`: the command line. Errors are reported here, once, as one line.

use std::process::ExitCode;

use clap::Parser;
use nbiot_gateway::cli::{self, Cli, Command, ProfilesCommand};
use nbiot_gateway::config::DEFAULT_CONFIG;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config: _ } => {
            eprintln!(
                "nbiot-gateway: `run` is not implemented yet: the ingest path (CoAP, MQTT, store) \
                 is the next milestone. `decode`, `profiles check` and `print-config` work today."
            );
            return ExitCode::from(2);
        }
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
