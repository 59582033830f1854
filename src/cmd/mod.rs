//! One module per subcommand; each exposes `Args` (clap) and `run`.

pub mod bench_engine;
pub mod bench_kernels;
pub mod bench_mesh;
pub mod bench_node;
pub mod demo;
pub mod generate;
pub mod keygen;
pub mod node;
pub mod simulate;

/// Starts the OpenAI-compatible HTTP API of a node.
pub fn api_starter() -> prfaas_node::actors::node::ApiStarter {
    prfaas_node::actors::node::http_api
}
