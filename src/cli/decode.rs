//! `nbiot-gateway decode`: decode one payload with a profile or a built-in codec and print
//! the readings as JSON (DESIGN.md "Decoded JSON"). A failure is one line on stderr, exit 1.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use nbiot_codecs::{hex, Reading};

use crate::profiles::{self, Encoding};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("decoder").required(true).args(["profile", "codec"])))]
pub struct DecodeArgs {
    /// Decode with this device profile.
    #[arg(long)]
    pub profile: Option<String>,
    /// Directory the profile is loaded from.
    #[arg(long, default_value = "./device-profiles")]
    pub profiles: PathBuf,
    /// Decode with this built-in codec (no profile).
    #[arg(long)]
    pub codec: Option<String>,
    /// Print compact JSON even on a terminal.
    #[arg(long)]
    pub compact: bool,
    /// The payload as hex, or `-` to read it from stdin (raw bytes as the device sends
    /// them, or hex text).
    pub payload: String,
}

/// Where the payload bytes came from decides what they are.
enum Input {
    /// Hex given on the command line, or hex text on stdin: the codec's wire bytes.
    Bytes(Vec<u8>),
    /// Raw stdin: exactly what the device sent, transport encoding included.
    AsSent(Vec<u8>),
}

fn read_input(arg: &str) -> anyhow::Result<Input> {
    if arg != "-" {
        return Ok(Input::Bytes(
            hex::decode(arg.as_bytes()).context("the payload argument is not hex")?,
        ));
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .context("cannot read the payload from stdin")?;
    let trimmed = buf.trim_ascii();
    if hex::is_hex_text(
        &trimmed
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect::<Vec<_>>(),
    ) {
        if let Ok(bytes) = hex::decode(trimmed) {
            return Ok(Input::Bytes(bytes));
        }
    }
    Ok(Input::AsSent(buf))
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    let input = read_input(&args.payload)?;
    let readings: Vec<Reading> = if let Some(id) = &args.codec {
        let Some(codec) = nbiot_codecs::builtin(id) else {
            bail!(
                "unknown codec `{id}` (built-in codecs: {})",
                nbiot_codecs::builtin_ids().join(", ")
            );
        };
        let bytes = match input {
            Input::Bytes(b) | Input::AsSent(b) => b,
        };
        codec.decode(&bytes)?
    } else {
        let name = args.profile.as_deref().unwrap_or_default();
        let report = profiles::load_dir(&args.profiles);
        let Some(profile) = report.set.get(name) else {
            if let Some(e) = report.errors.iter().find(|e| {
                std::path::Path::new(&e.file)
                    .file_stem()
                    .is_some_and(|s| s == name)
            }) {
                bail!("profile `{name}` is invalid: {e}");
            }
            let known: Vec<&str> = report.set.iter().map(|p| p.name.as_str()).collect();
            bail!(
                "no profile `{name}` in {} (profiles: {})",
                args.profiles.display(),
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            );
        };
        match input {
            Input::Bytes(b) => profile.decode_bytes(&b)?,
            Input::AsSent(b) if profile.encoding != Encoding::Raw => profile.decode(&b)?,
            Input::AsSent(b) => profile.decode_bytes(&b)?,
        }
    };
    let stdout = std::io::stdout();
    let json = if stdout.is_terminal() && !args.compact {
        serde_json::to_string_pretty(&readings)?
    } else {
        serde_json::to_string(&readings)?
    };
    let mut out = stdout.lock();
    writeln!(out, "{json}")?;
    Ok(())
}
