//! `prfaas`: command-line entry point wiring the kernels, node and mesh crates.

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Debug, Parser)]
#[command(
    name = "prfaas",
    version,
    about = "Prefill-as-a-Service over a peer-to-peer mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local 3-node mesh on the default model and serve real chat requests through it.
    Demo(cmd::demo::Args),
    /// Run one mesh node (OpenAI API + mesh) from a config file.
    Node(cmd::node::Args),
    /// Make a node identity file.
    Keygen(cmd::keygen::Args),
    /// Generate text with a model on this machine (no mesh).
    Generate(cmd::generate::Args),
    /// Run the discrete-event simulator on a scenario.
    Simulate(cmd::simulate::Args),
    /// Benchmarks that print ratios measured in one run.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Kernel GFLOP/s vs this machine's fp32 peak and the `gemm` crate.
    Kernels(cmd::bench_kernels::Args),
    /// Prefill/decode tokens/s and KV throughput of the model engine.
    Engine(cmd::bench_engine::Args),
    /// KV stream goodput vs raw TCP, auction latency, advert convergence.
    Mesh(cmd::bench_mesh::Args),
    /// Serving end to end: remote-prefill overlap, mesh vs all-local under the same load.
    Node(cmd::bench_node::Args),
    /// Node processes in network namespaces on tbf-shaped links (root): homogeneous vs naive
    /// vs auction on one trace, and remote-prefill overlap on the real link.
    E2e(cmd::bench_e2e::Args),
}

fn main() -> std::process::ExitCode {
    init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Node(a) => cmd::node::run(a),
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Simulate(a) => cmd::simulate::run(a),
        Command::Bench(Bench::Kernels(a)) => cmd::bench_kernels::run(a),
        Command::Bench(Bench::Engine(a)) => cmd::bench_engine::run(a),
        Command::Bench(Bench::Mesh(a)) => cmd::bench_mesh::run(a),
        Command::Bench(Bench::Node(a)) => cmd::bench_node::run_cmd(a),
        Command::Bench(Bench::E2e(a)) => cmd::bench_e2e::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line (with its causes) for the user, not a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (stdout is reserved for results and `--json`); `RUST_LOG` overrides.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
