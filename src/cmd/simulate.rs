//! `prfaas simulate`.

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`prfaas simulate` is not available yet (tracked in issue #6)")
}
