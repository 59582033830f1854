//! An edge prefill node joining a remote, private mesh with its pre-shared key.
//!
//! ```sh
//! # on a machine of the mesh (its PSK in mesh.psk: 64 hex digits, e.g. `openssl rand -hex 32`)
//! prfaas node --role decode --psk-file mesh.psk --listen /ip4/0.0.0.0/tcp/4001
//! # on the edge machine, with the address and peer id the first one printed
//! cargo run --release --example edge_join -- --psk-file mesh.psk \
//!     --bootstrap /ip4/203.0.113.7/tcp/4001/p2p/12D3KooW...
//! ```
//!
//! The edge node loads the model, dials the bootstrap peer over TCP with the PSK (a node without
//! the key cannot even complete the handshake), gossips its signed advert as a `prefill` node and
//! then bids in the mesh's auctions until Ctrl-C. It must load the same model file as the mesh:
//! the weights hash and KV layout are checked on every call, bid and transfer.
//!
//! **Reachability:** the edge node dials out, so it can join from behind NAT, and the home streams
//! nothing to it (KV flows from the prefill winner to the home over the connection the edge
//! opened). Relayed connections (libp2p relay v2, hole punching) for nodes that no peer can dial
//! are not built yet; until then the bootstrap peer must be reachable from the edge.
//!
//! Without `--bootstrap` the example is self-contained: it starts a private two-node mesh on
//! loopback (a decode "remote" node and the edge node, both with a fresh random PSK), waits for
//! the edge node's advert to reach the decode node, and exits: the check CI can run.

use std::path::PathBuf;
use std::time::Duration;

use prfaas_kernels::BackendKind;
use prfaas_mesh::MeshConfig;
use prfaas_node::actors::{node::http_api, Node};
use prfaas_node::config::{NodeConfig, NodeRole};
use prfaas_node::engine::loader::DEFAULT_MODEL;

struct Options {
    psk_file: Option<PathBuf>,
    bootstrap: Vec<String>,
    model: String,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        psk_file: None,
        bootstrap: Vec::new(),
        model: if std::path::Path::new(DEFAULT_MODEL).exists() {
            DEFAULT_MODEL.into()
        } else {
            "tiny-hybrid".into()
        },
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--psk-file" => o.psk_file = Some(value()?.into()),
            "--bootstrap" => o.bootstrap.push(value()?),
            "--model" => o.model = value()?,
            other => anyhow::bail!("unknown argument {other} (see the example's docs)"),
        }
    }
    Ok(o)
}

fn edge_config(model: &str, psk: String, bootstrap: Vec<String>, local: bool) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.node.name = "edge".into();
    c.node.roles = vec![NodeRole::Prefill];
    c.node.model = model.into();
    c.node.backend = BackendKind::Auto;
    c.api.listen = "127.0.0.1:0".parse().expect("a literal address");
    c.engine.kv_capacity_tokens = 4096;
    c.mesh = if local {
        MeshConfig::local()
    } else {
        MeshConfig::default()
    };
    c.mesh.psk = Some(psk);
    c.mesh.bootstrap = bootstrap;
    c
}

/// A fresh 32-byte key as hex, from the process's random hash keys (std only).
fn random_psk() -> String {
    use std::hash::{BuildHasher, Hasher};
    (0..4)
        .map(|_| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u8(0);
            format!("{:016x}", h.finish())
        })
        .collect()
}

async fn run() -> anyhow::Result<()> {
    let o = options()?;
    if !o.bootstrap.is_empty() {
        let path = o
            .psk_file
            .ok_or_else(|| anyhow::anyhow!("--psk-file is required"))?;
        let psk = std::fs::read_to_string(&path)?.trim().to_owned();
        let edge = Node::start(
            edge_config(&o.model, psk, o.bootstrap, false),
            Some(http_api),
        )
        .await?;
        println!(
            "edge node {} joined; serving prefills until Ctrl-C",
            edge.peer_id()
        );
        actix_rt::signal::ctrl_c().await?;
        edge.shutdown().await;
        return Ok(());
    }

    // Self-contained: a private "remote" mesh of one decode node on loopback, then the edge.
    if o.model == "tiny-hybrid" {
        eprintln!("{DEFAULT_MODEL} is missing: using the synthetic `tiny-hybrid` model");
    }
    let psk = random_psk();
    let mut remote = edge_config(&o.model, psk.clone(), vec![], true);
    remote.node.name = "remote-decode".into();
    remote.node.roles = vec![NodeRole::Decode];
    remote.node.backend = BackendKind::Cpu;
    let remote = Node::start(remote, Some(http_api)).await?;
    let boot: Vec<String> = remote
        .mesh_addrs()
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut edge_cfg = edge_config(&o.model, psk, boot, true);
    edge_cfg.node.backend = BackendKind::Cpu;
    let edge = Node::start(edge_cfg, Some(http_api)).await?;
    remote
        .wait_for_prefillers(1, Duration::from_secs(30))
        .await
        .map_err(|_| anyhow::anyhow!("the remote mesh never saw the edge node's advert"))?;
    println!(
        "edge node {} joined the private mesh of {}: it now bids for its prefills",
        edge.peer_id(),
        remote.peer_id()
    );
    edge.shutdown().await;
    remote.shutdown().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    actix_rt::System::new().block_on(run())
}
