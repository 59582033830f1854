//! Node processes in network namespaces, shared by the multi-process tests (`netns_e2e`,
//! `chaos_netns`, `nat_traversal`): the namespace plumbing of `src/cmd/netns.rs`, one base node
//! config, starting `prfaas node` from a config file, and bounded waits on a node's HTTP API.

#![allow(dead_code)]

#[path = "../../src/cmd/netns.rs"]
pub mod netns;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{ChildGuard, Topology};
use prfaas_kernels::BackendKind;
use prfaas_mesh::MeshConfig;
use prfaas_node::api::client;
use prfaas_node::config::{NodeConfig, NodeRole};

/// The model every multi-process test runs (synthetic weights: no download).
pub const MODEL: &str = "tiny-dense";
/// An offload threshold no prompt reaches (TOML integers are i64).
pub const NEVER_OFFLOAD: usize = 1 << 40;
/// The API port of every node (each node has its own address).
pub const API_PORT: u16 = 8080;

/// A tiny-dense node on the cpu backend whose API listens on `ip:8080` and whose mesh listens on
/// `ip:mesh_port`: one API worker, a fixed offload threshold, no prefix cache, a 2 s auction
/// deadline and a 60 s transfer timeout. The mesh has no PSK: callers either mark it open (every
/// address is in namespaces the test made) or set one.
pub fn node_config(name: &str, roles: &[NodeRole], ip: IpAddr, mesh_port: u16) -> NodeConfig {
    let mut c = NodeConfig::default();
    c.node.name = name.into();
    c.node.roles = roles.to_vec();
    c.node.model = MODEL.into();
    c.node.backend = BackendKind::Cpu;
    c.node.shutdown_grace = Duration::from_secs(2);
    c.api.listen = (ip, API_PORT).into();
    c.api.workers = 1;
    c.engine.kv_capacity_tokens = 4096;
    c.engine.calibration_tokens = 16;
    c.engine.prefix_cache = false;
    c.policy.adaptive_threshold = false;
    c.policy.auction_deadline = Duration::from_secs(2);
    c.policy.transfer_timeout = Duration::from_secs(60);
    c.mesh = MeshConfig::local();
    c.mesh.listen = vec![format!("/ip4/{ip}/tcp/{mesh_port}")];
    c
}

/// The API base URL of a node listening on `ip`.
pub fn api_url(ip: impl std::fmt::Display) -> String {
    format!("http://{ip}:{API_PORT}")
}

/// Writes `cfg` to `dir/<name>.toml` and starts `prfaas node --config` on it through `launcher`
/// (`taskset … ip netns exec NS` with the program as its last argument), one compute thread,
/// stdout and stderr to `dir/<log>`.
pub fn spawn_node(mut launcher: Command, cfg: &NodeConfig, dir: &Path, log: &str) -> ChildGuard {
    let path = dir.join(format!("{}.toml", cfg.node.name));
    std::fs::write(&path, toml::to_string(cfg).expect("config serializes")).expect("write");
    let log = std::fs::File::create(dir.join(log)).expect("log file");
    let child = launcher
        .arg("node")
        .arg("--config")
        .arg(&path)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("node process starts");
    ChildGuard(child)
}

/// [`spawn_node`] for node `i` of `topo`: in its namespace, pinned to core `i % cores`.
pub fn spawn_in(topo: &Topology, i: usize, cfg: &NodeConfig, dir: &Path, log: &str) -> ChildGuard {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let launcher = topo.command(i, &(i % cores).to_string(), prfaas_bin());
    spawn_node(launcher, cfg, dir, log)
}

/// The built `prfaas` binary.
pub fn prfaas_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_prfaas"))
}

/// Polls (bounded: 120 s) until `url` answers `/healthz`, failing at once (with its log) if the
/// process exits.
pub async fn wait_healthy(url: &str, proc: &mut ChildGuard, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while client::get_json(&format!("{url}/healthz")).await.is_err() {
        if let Some(s) = proc.exited() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("node at {url} exited ({s}) while starting: {log}");
        }
        assert!(Instant::now() < deadline, "{url} not healthy within 120 s");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls (bounded: 60 s) until the home at `home` sees a connected peer that prefills its model.
pub async fn wait_prefiller(home: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = client::get_json(&format!("{home}/mesh"))
            .await
            .ok()
            .and_then(|v| v["peers"].as_array().cloned())
            .is_some_and(|p| {
                p.iter()
                    .any(|p| p["prefills_our_model"] == true && p["connected"] != false)
            });
        if seen {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the home saw no prefill peer within 60 s"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
}
