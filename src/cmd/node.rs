//! `prfaas node`: run one mesh node until Ctrl-C, then stop gracefully.
//!
//! The node's settings come from an optional TOML file (`--config`, every field documented in
//! configs/README.md); the flags below override it, and each flag can also be set through its
//! `PRFAAS_*` environment variable (a flag on the command line wins over the variable).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use prfaas_kernels::BackendKind;
use prfaas_node::actors::Node;
use prfaas_node::config::{NodeConfig, NodeRole};

/// A node role on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    /// Prefill for others: bid in auctions, stream KV to the winner's home.
    Prefill,
    /// Home client requests and decode them; long prompts go to auction.
    Decode,
    /// Both.
    Pd,
}

impl From<RoleArg> for NodeRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Prefill => NodeRole::Prefill,
            RoleArg::Decode => NodeRole::Decode,
            RoleArg::Pd => NodeRole::Pd,
        }
    }
}

/// A compute backend on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// wgpu on a real GPU, cpu when the only adapter is a software one.
    Auto,
    Cpu,
    Wgpu,
}

impl From<BackendArg> for BackendKind {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => BackendKind::Auto,
            BackendArg::Cpu => BackendKind::Cpu,
            BackendArg::Wgpu => BackendKind::Wgpu,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Node config (TOML); every field is documented in configs/README.md. Optional: the
    /// defaults and the flags below are enough for most nodes.
    #[arg(long, env = "PRFAAS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Name in logs, `/mesh` and the dashboard.
    #[arg(long, env = "PRFAAS_NAME")]
    pub name: Option<String>,
    /// GGUF file, HF model directory (`config.json` + `*.safetensors`), or `tiny-hybrid` /
    /// `tiny-dense`.
    #[arg(long, env = "PRFAAS_MODEL")]
    pub model: Option<String>,
    /// Roles, comma-separated or repeated.
    #[arg(long = "role", env = "PRFAAS_ROLES", value_enum, value_delimiter = ',')]
    pub roles: Vec<RoleArg>,
    /// Compute backend.
    #[arg(long, env = "PRFAAS_BACKEND", value_enum)]
    pub backend: Option<BackendArg>,
    /// HTTP API listen address (port 0 picks a free port).
    #[arg(long = "api", env = "PRFAAS_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Mesh listen multiaddrs, comma-separated or repeated (e.g. `/ip4/0.0.0.0/tcp/4001`).
    #[arg(long = "listen", env = "PRFAAS_MESH_LISTEN", value_delimiter = ',')]
    pub mesh_listen: Vec<String>,
    /// Bootstrap peers (multiaddrs ending in `/p2p/<peer id>`), comma-separated or repeated.
    #[arg(long = "bootstrap", env = "PRFAAS_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// File holding the mesh's pre-shared key (64 hex digits); only holders can connect.
    #[arg(long, env = "PRFAAS_PSK_FILE")]
    pub psk_file: Option<PathBuf>,
    /// Identity file from `prfaas keygen` (a stable peer id).
    #[arg(long, env = "PRFAAS_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// The API's URL as other nodes and operators reach it (gossiped for their dashboards).
    #[arg(long = "api-url", env = "PRFAAS_API_URL")]
    pub api_url: Option<String>,
    /// Serve as a circuit relay for nodes behind NAT (a publicly reachable node).
    #[arg(long = "relay-server", env = "PRFAAS_RELAY_SERVER")]
    pub relay_server: bool,
    /// Relays to reserve a slot on and listen through (multiaddrs ending in `/p2p/<id>`),
    /// comma-separated or repeated: for a node behind NAT.
    #[arg(long = "relay", env = "PRFAAS_RELAYS", value_delimiter = ',')]
    pub relays: Vec<String>,
}

impl Args {
    /// The config file (or the defaults) with the flags applied.
    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        let mut cfg = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        if let Some(v) = &self.name {
            cfg.node.name = v.clone();
        }
        if let Some(v) = &self.model {
            cfg.node.model = v.clone();
        }
        if !self.roles.is_empty() {
            cfg.node.roles = self.roles.iter().map(|&r| r.into()).collect();
        }
        if let Some(v) = self.backend {
            cfg.node.backend = v.into();
        }
        if let Some(v) = self.api_listen {
            cfg.api.listen = v;
        }
        if !self.mesh_listen.is_empty() {
            cfg.mesh.listen = self.mesh_listen.clone();
        }
        if !self.bootstrap.is_empty() {
            cfg.mesh.bootstrap = self.bootstrap.clone();
        }
        if let Some(path) = &self.psk_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the PSK file {}", path.display()))?;
            cfg.mesh.psk = Some(text.trim().to_owned());
        }
        if let Some(v) = &self.identity {
            cfg.node.identity = Some(v.clone());
        }
        if let Some(v) = &self.api_url {
            cfg.api.public_url = Some(v.clone());
        }
        if self.relay_server {
            cfg.mesh.nat.relay_server = true;
        }
        if !self.relays.is_empty() {
            cfg.mesh.nat.relays = self.relays.clone();
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = args.node_config()?;
    let system = actix_rt::System::new();
    system.block_on(async move {
        let node = Node::start(cfg, Some(super::api_starter()))
            .await
            .context("starting the node")?;
        let addrs = node.mesh_addrs().await;
        eprintln!("node {} up", node.core.cfg.node.name);
        eprintln!("  peer id : {}", node.peer_id());
        eprintln!("  model   : {}", node.core.info.model_id);
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("node").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags_override_the_defaults() {
        let dir = std::env::temp_dir().join(format!("prfaas-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let psk = dir.join("mesh.psk");
        std::fs::write(&psk, format!("{}\n", "ab".repeat(32))).expect("write psk");
        let psk = psk.display().to_string();
        let args = parse(&[
            "--name",
            "edge-1",
            "--model",
            "tiny-hybrid",
            "--role",
            "prefill,decode",
            "--backend",
            "cpu",
            "--api",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            "/ip4/10.0.0.1/tcp/4001/p2p/x",
            "--bootstrap",
            "/ip4/10.0.0.2/tcp/4001/p2p/y",
            "--psk-file",
            &psk,
            "--identity",
            "id.key",
            "--api-url",
            "http://10.0.0.9:8080",
            "--relay-server",
            "--relay",
            "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA",
        ])
        .expect("parses");
        let cfg = args.node_config().expect("valid");
        assert_eq!(cfg.node.name, "edge-1");
        assert_eq!(cfg.node.model, "tiny-hybrid");
        assert_eq!(cfg.node.roles, vec![NodeRole::Prefill, NodeRole::Decode]);
        assert_eq!(cfg.node.backend, BackendKind::Cpu);
        assert_eq!(cfg.api.listen.port(), 0);
        assert_eq!(cfg.mesh.listen, vec!["/ip4/127.0.0.1/tcp/0".to_owned()]);
        assert_eq!(cfg.mesh.bootstrap.len(), 2);
        assert_eq!(cfg.mesh.psk, Some("ab".repeat(32)));
        assert_eq!(cfg.node.identity, Some(PathBuf::from("id.key")));
        assert_eq!(cfg.api.public_url.as_deref(), Some("http://10.0.0.9:8080"));
        assert!(cfg.mesh.nat.relay_server);
        assert_eq!(cfg.mesh.nat.relays.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
        // No flags: the defaults.
        let cfg = parse(&[]).expect("parses").node_config().expect("valid");
        assert_eq!(cfg.node.roles, NodeConfig::default().node.roles);
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let err = parse(&["--role", "bidder"]).expect_err("unknown role");
        assert!(err.to_string().contains("prefill, decode, pd"), "{err}");
        assert!(parse(&["--backend", "tpu"]).is_err());
        assert!(parse(&["--api", "not-an-address"]).is_err());
        let missing = parse(&["--psk-file", "/nonexistent/psk"]).expect("parses");
        let err = missing.node_config().expect_err("missing file");
        assert!(format!("{err:#}").contains("PSK file"), "{err:#}");
    }
}
