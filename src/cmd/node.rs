//! `prfaas node --config FILE`: run one mesh node until Ctrl-C, then stop gracefully.

use std::path::PathBuf;

use anyhow::Context;
use prfaas_node::actors::Node;
use prfaas_node::config::NodeConfig;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Node config (TOML); every field is documented in configs/README.md.
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = NodeConfig::from_file(&args.config)?;
    let system = actix_rt::System::new();
    system.block_on(async move {
        let node = Node::start(cfg, Some(super::api_starter()))
            .await
            .context("starting the node")?;
        let addrs = node.mesh_addrs().await;
        eprintln!("node {} up", node.core.cfg.node.name);
        eprintln!("  peer id : {}", node.peer_id());
        for a in &addrs {
            eprintln!("  mesh    : {a}");
        }
        if let Some(api) = node.api_addr {
            eprintln!("  api     : http://{api}/v1  (dashboard http://{api}/)");
        }
        actix_rt::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        eprintln!("stopping: finishing requests in flight…");
        node.shutdown().await;
        anyhow::Ok(())
    })
}
