//! PLACEHOLDER — being written (devices subcommand); replace this whole file.
#[derive(Debug, clap::Subcommand)]
pub enum DevicesCommand {
    List,
}
pub fn run(_cmd: DevicesCommand, _url: &str, _token: Option<String>) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
