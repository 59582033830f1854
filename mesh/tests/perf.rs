//! Hand-run probes of the mesh benchmark parts, for profiling one part at a time (ignored; the
//! full report is `prfaas bench mesh`). Example:
//! `KV_STREAMS=4 cargo test -p prfaas-mesh --release --test perf -- --ignored --nocapture kv`.

use prfaas_mesh::bench::{kv_goodput, scale, MeshBenchOptions};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run by hand with --release"]
async fn kv_goodput_probe() {
    let opts = MeshBenchOptions {
        kv_mib: env("KV_MIB", 256),
        ..MeshBenchOptions::default()
    };
    let g = kv_goodput(&opts, env("KV_QUIC", 0) != 0, env("KV_STREAMS", 1))
        .await
        .expect("kv bench");
    println!("{g:?}");
    assert!(g.ratio > 0.0 && g.bytes == opts.kv_mib << 20);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run by hand with --release"]
async fn scale_probe() {
    let n = env("MESH_NODES", 50);
    let s = scale(n, env("MESH_ROUNDS", 100))
        .await
        .expect("scale bench");
    println!("{s:?}");
    assert_eq!(s.nodes, n);
}
