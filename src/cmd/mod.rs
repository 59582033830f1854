//! One module per subcommand; each exposes `Args` (clap) and `run`.

pub mod bench_e2e;
pub mod bench_engine;
pub mod bench_kernels;
pub mod bench_mesh;
pub mod bench_node;
pub mod demo;
pub mod generate;
pub mod keygen;
pub mod netns;
pub mod node;
pub mod simulate;

/// Starts the OpenAI-compatible HTTP API of a node.
pub fn api_starter() -> prfaas_node::actors::node::ApiStarter {
    prfaas_node::actors::node::http_api
}

/// The configuration of one node of a mesh on this machine, as `demo` and `bench node` start
/// them: loopback, port 0, `MeshConfig::local()` timings, a 16K-token KV pool, a 500 ms auction.
pub fn local_node_config(
    name: &str,
    roles: &[prfaas_node::config::NodeRole],
    model: &str,
    backend: prfaas_kernels::BackendKind,
    bootstrap: Vec<String>,
) -> prfaas_node::config::NodeConfig {
    let mut c = prfaas_node::config::NodeConfig::default();
    c.node.name = name.into();
    c.node.roles = roles.to_vec();
    c.node.model = model.into();
    c.node.backend = backend;
    c.api.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    c.api.workers = 1;
    c.engine.kv_capacity_tokens = 16 * 1024;
    c.policy.auction_deadline = std::time::Duration::from_millis(500);
    c.mesh = prfaas_mesh::MeshConfig::local();
    c.mesh.bootstrap = bootstrap;
    c
}

/// A node's mesh listen addresses, as bootstrap strings for the next node.
pub async fn mesh_addrs(n: &prfaas_node::actors::NodeHandle) -> Vec<String> {
    n.mesh_addrs()
        .await
        .iter()
        .map(ToString::to_string)
        .collect()
}
