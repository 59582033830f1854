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
    /// Log line format on stderr: `text` for people, `json` (one object per line, with the
    /// request's span fields) for log collectors.
    #[arg(long, global = true, env = "PRFAAS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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

/// Mesa's Vulkan drivers (lavapipe included) print "error: XDG_RUNTIME_DIR is invalid or not set"
/// on every adapter probe when the variable is missing, as on servers and in containers. Give
/// them a private directory instead, before any thread exists.
fn ensure_runtime_dir() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("prfaas-runtime-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    // Only a directory of ours that nobody else can enter (another user may have made it).
    let ours = std::fs::symlink_metadata(&dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.permissions().mode() & 0o077 == 0);
    if ours {
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

fn main() -> std::process::ExitCode {
    ensure_runtime_dir();
    let cli = Cli::parse();
    // The demo sends its logs to a file of its own and prints only its report.
    match &cli.command {
        Command::Demo(a) => match std::fs::File::create(&a.log_file) {
            Ok(f) => init_tracing(cli.log_format, std::sync::Mutex::new(f)),
            Err(e) => {
                eprintln!(
                    "error: cannot write the log file {}: {e}",
                    a.log_file.display()
                );
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => init_tracing(cli.log_format, std::io::stderr),
    }
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

/// Logs go to `writer` (stderr: stdout is reserved for results and `--json`); `RUST_LOG`
/// overrides the level (default `info`).
fn init_tracing<W>(format: LogFormat, writer: W)
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}
