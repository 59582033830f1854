//! `prfaas bench engine`.

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`prfaas bench engine` is not available yet (tracked in issue #4)")
}
