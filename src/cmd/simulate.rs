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
    /// Instead of a scenario: predict runs that `prfaas bench e2e` recorded (its
    /// `replay-*.json` files) and print predicted / measured.
    #[arg(long, num_args = 1.., conflicts_with = "scenario")]
    pub replay: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.replay.is_empty() {
        return replay(&args);
    }
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

fn replay(args: &Args) -> anyhow::Result<()> {
    let mut rows = Vec::with_capacity(args.replay.len());
    for path in &args.replay {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let record: sim::replay::ReplayRecord =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        rows.push(
            sim::replay::compare(&record)
                .with_context(|| format!("replaying {}", path.display()))?,
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        print!("{}", sim::replay::comparison_table(&rows));
    }
    Ok(())
}
