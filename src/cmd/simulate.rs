//! `prfaas simulate`: run a scenario of the discrete-event simulator (all policies side by side),
//! print a table shaped like the paper's Table 6 and write SVG charts next to it.

use std::path::PathBuf;

use anyhow::Context as _;
use prfaas_mesh::sim::{self, Overrides, Scenario};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenario file (e.g. configs/sim-paper-case.toml).
    #[arg(long, default_value = "configs/sim-paper-case.toml")]
    pub scenario: PathBuf,
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Override the number of simulated requests per policy.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Override the RNG seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory for table.txt, report.json and the SVG charts.
    #[arg(long, default_value = "target/sim")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let scenario = Scenario::load(&args.scenario)?;
    let report = sim::run(
        &scenario,
        Overrides {
            requests: args.requests,
            seed: args.seed,
        },
    )
    .with_context(|| format!("simulating {}", args.scenario.display()))?;
    sim::report::write_all(&report, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let json = serde_json::to_string(&report)?;
    std::fs::write(args.out.join("report.json"), &json)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let text = if args.json {
        format!("{json}\n")
    } else {
        format!(
            "{}charts: {1}/lambda_vs_t.svg {1}/ttft_cdf.svg\n",
            sim::report::table(&report),
            args.out.display()
        )
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok(())
}
