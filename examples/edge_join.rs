//! An edge prefill node behind NAT joining a remote, private mesh through a relay, with the
//! mesh's pre-shared key.
//!
//! ```sh
//! # on a publicly reachable machine of the mesh (its PSK in mesh.psk: 64 hex digits, e.g.
//! # `openssl rand -hex 32`), serving as a relay (`[mesh.nat] relay_server = true`):
//! prfaas node --role decode --psk-file mesh.psk --listen /ip4/0.0.0.0/tcp/4001 --relay-server
//! # on the edge machine, with the address and peer id the first one printed
//! cargo run --release --example edge_join -- --psk-file mesh.psk \
//!     --bootstrap /ip4/203.0.113.7/tcp/4001/p2p/12D3KooW... --listen /ip4/192.168.1.20/tcp/4001
//! ```
//!
//! The edge node loads the model, dials the bootstrap peer over TCP with the PSK (a node without
//! the key cannot even complete the handshake), reserves a slot on the relay (`--relay ADDR`,
//! by default the bootstrap peers) and listens through it, gossips its signed advert (with that
//! relayed address) as a `prefill` node and then bids in the mesh's auctions until Ctrl-C. It
//! must load the same model file as the mesh: the weights hash and KV layout are checked on
//! every call, bid and transfer.
//!
//! **Reachability:** a home that cannot dial the edge reaches it through the relay; DCUtR then
//! punches a hole through both NATs (TCP simultaneous open) and the relayed connection is
//! replaced by a direct one, so KV streams do not load the relay. Behind a NAT that randomises
//! ports no hole can be punched, and KV crosses the relay (`[mesh.nat.relay_limits]` bounds
//! it). AutoNAT tells the edge whether it is publicly reachable (`/mesh` → `nat`).
//!
//! Without `--bootstrap` the example is self-contained: it starts a private two-node mesh on
//! loopback (a decode "remote" node that serves as a relay, and the edge node, both with a
//! fresh random PSK), waits until the relay accepted the edge's reservation and the edge's
//! advert (carrying its relayed address) reached the decode node, and exits: the check CI can
//! run.

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
    relays: Vec<String>,
    listen: Vec<String>,
    model: String,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        psk_file: None,
        bootstrap: Vec::new(),
        relays: Vec::new(),
        listen: Vec::new(),
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
            "--relay" => o.relays.push(value()?),
            "--listen" => o.listen.push(value()?),
            "--model" => o.model = value()?,
            other => anyhow::bail!("unknown argument {other} (see the example's docs)"),
        }
    }
    Ok(o)
}

fn edge_config(
    model: &str,
    psk: String,
    bootstrap: Vec<String>,
    relays: Vec<String>,
    local: bool,
) -> NodeConfig {
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
        // A TCP port of our own: dials leave from it, so a port-keeping NAT maps it to what
        // peers observe, and hole punching can reach it. `--listen /ip4/<this host>/tcp/PORT`
        // is better: on `0.0.0.0` the first dial may leave before the interfaces are known.
        let mut m = MeshConfig {
            listen: vec!["/ip4/0.0.0.0/tcp/0".into()],
            ..MeshConfig::default()
        };
        m.nat.autonat = true;
        m
    };
    c.mesh.psk = Some(psk);
    c.mesh.bootstrap = bootstrap;
    c.mesh.nat.relays = relays;
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
        let relays = if o.relays.is_empty() {
            o.bootstrap.clone()
        } else {
            o.relays
        };
        let mut cfg = edge_config(&o.model, psk, o.bootstrap, relays, false);
        if !o.listen.is_empty() {
            cfg.mesh.listen = o.listen;
        }
        let edge = Node::start(cfg, Some(http_api)).await?;
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
    let mut remote = edge_config(&o.model, psk.clone(), vec![], vec![], true);
    remote.node.name = "remote-decode".into();
    remote.node.roles = vec![NodeRole::Decode];
    remote.node.backend = BackendKind::Cpu;
    remote.mesh.nat.relay_server = true;
    let remote = Node::start(remote, Some(http_api)).await?;
    let boot: Vec<String> = remote
        .mesh_addrs()
        .await
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut edge_cfg = edge_config(&o.model, psk, boot.clone(), boot, true);
    edge_cfg.node.backend = BackendKind::Cpu;
    let edge = Node::start(edge_cfg, Some(http_api)).await?;
    remote
        .wait_for_prefillers(1, Duration::from_secs(30))
        .await
        .map_err(|_| anyhow::anyhow!("the remote mesh never saw the edge node's advert"))?;
    // The relay accepted the edge's reservation, and the edge's advert names the relayed
    // address a home behind another NAT would dial.
    let t0 = std::time::Instant::now();
    let relayed = loop {
        let adverts = remote.core.mesh.adverts().await?;
        let relayed = adverts
            .iter()
            .find(|a| a.peer == edge.peer_id())
            .and_then(|a| {
                a.advert
                    .listen_addrs
                    .iter()
                    .find(|l| l.contains("/p2p-circuit"))
                    .cloned()
            });
        if let Some(r) = relayed {
            break r;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            anyhow::bail!(
                "the edge's advert carries no relayed address after 30 s (reservations: {:?})",
                edge.core.mesh.nat().reservations
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "edge node {} joined the private mesh of {} through it as a relay ({relayed}): it now \
         bids for its prefills",
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
