//! Matmul throughput of the wgpu backend at the LLM shapes of issue 3 (heavy: `#[ignore]`).
//!
//! Run: `cargo test -p prfaas-kernels --release --test gpu_bench -- --ignored --nocapture`
//! Prints GFLOP/s per (kernel family, weight dtype, shape). `prfaas bench kernels` is the
//! user-facing benchmark; this one isolates the two wgpu matmul kernels from each other.

use std::time::Instant;

use prfaas_kernels::gpu::{MatmulPath, WgpuBackend};
use prfaas_kernels::{gpu_required, Backend, DType, HostTensor, KernelError};

fn open(path: MatmulPath) -> Option<WgpuBackend> {
    match WgpuBackend::with_matmul(path) {
        Ok(b) => Some(b),
        Err(e @ KernelError::NoAdapter(_)) if !gpu_required() => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: no GPU adapter (set PRFAAS_REQUIRE_GPU=1 to fail instead): {e}"
            );
            None
        }
        Err(e) => panic!("wgpu backend: {e}"),
    }
}

/// A Q4_1 weight with arbitrary but valid blocks (scale 1/64, min -1/8).
fn q4_1_bytes(n: usize, k: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * k / 32 * 20);
    for b in 0..n * k / 32 {
        out.extend(half::f16::from_f32(1.0 / 64.0).to_le_bytes());
        out.extend(half::f16::from_f32(-0.125).to_le_bytes());
        out.extend((0..16).map(|j| ((b * 7 + j * 13) % 256) as u8));
    }
    out
}

/// CPU seconds (user + system) used by this process so far, all threads (lavapipe runs the
/// kernels on its own threads in this process). On a shared machine GFLOP per CPU-second is a
/// steadier figure than wall-clock GFLOP/s. Linux only; 0 elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit(')').next() else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn measure(
    b: &WgpuBackend,
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    budget_s: f64,
) -> (f64, f64, usize) {
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
        .collect();
    let w = match dtype {
        DType::Q4_1 => HostTensor {
            dtype,
            shape: vec![n, k],
            bytes: q4_1_bytes(n, k),
        },
        _ => {
            let v: Vec<f32> = (0..n * k)
                .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
                .collect();
            HostTensor::from_f32(vec![n, k], &v)
        }
    };
    let xt = b
        .upload(&HostTensor::from_f32(vec![m, k], &x))
        .expect("upload x");
    let wt = b.upload(&w).expect("upload w");
    // Warm-up: pipeline compilation and the one-off weight repack.
    drop(b.matmul(&xt, &wt).expect("matmul"));
    b.sync().expect("sync");
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    let mut iters = 0;
    while iters < 2 || (start.elapsed().as_secs_f64() < budget_s && iters < 200) {
        drop(b.matmul(&xt, &wt).expect("matmul"));
        b.sync().expect("sync");
        iters += 1;
    }
    let secs = start.elapsed().as_secs_f64() / iters as f64;
    let cpu = (cpu_seconds() - cpu0) / iters as f64;
    let gflop = 2.0 * (m * n * k) as f64 / 1e9;
    (
        gflop / secs,
        if cpu > 0.0 { gflop / cpu } else { f64::NAN },
        iters,
    )
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release)"]
fn wgpu_matmul_gflops() {
    let shapes = [(2048, 576, 1536), (512, 1536, 576), (1, 576, 1536)];
    let filter = std::env::var("PRFAAS_BENCH_FILTER").unwrap_or_default();
    for (label, path) in [
        ("texture", MatmulPath::Texture),
        ("storage", MatmulPath::Storage),
    ] {
        if !label.contains(&filter) {
            continue;
        }
        let Some(b) = open(path) else { return };
        if path == MatmulPath::Texture && !b.uses_texture_matmul() {
            eprintln!("texture matmul unavailable on {}", b.info().description);
            continue;
        }
        for dtype in [DType::F32, DType::Q4_1] {
            for &(m, n, k) in &shapes {
                // The storage kernel is slow on lavapipe: one timed run is enough there.
                let budget = if path == MatmulPath::Storage {
                    0.0
                } else {
                    2.0
                };
                let (gflops, per_cpu, iters) = measure(&b, dtype, m, n, k, budget);
                println!(
                    "wgpu matmul {label:8} {:5} {m:5}x{n:5}x{k:5}: {gflops:7.2} GFLOP/s wall, {per_cpu:6.2} GFLOP per CPU-s ({iters} runs) on {}",
                    format!("{dtype:?}"),
                    b.info().description
                );
            }
        }
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release)"]
fn wgpu_attention_throughput() {
    use prfaas_kernels::{AttnParams, AttnSeq};
    let Some(b) = open(MatmulPath::Auto) else {
        return;
    };
    // SmolLM2-135M attention: 9 query heads, 3 KV heads, head_dim 64; blocks of 16 tokens.
    let (nh, nkv, hd, bs) = (9, 3, 64, 16);
    let params = AttnParams {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: 0.125,
        window: None,
    };
    for keys in [512usize, 2048, 8192] {
        let blocks = keys.div_ceil(bs);
        let pool: Vec<f32> = (0..blocks * bs * nkv * hd)
            .map(|i| ((i % 31) as f32 - 15.0) / 31.0)
            .collect();
        let kp = b
            .upload(&HostTensor::from_f32(vec![blocks, bs, nkv, hd], &pool))
            .expect("k pool");
        let vp = b
            .upload(&HostTensor::from_f32(vec![blocks, bs, nkv, hd], &pool))
            .expect("v pool");
        let table: Vec<u32> = (0..blocks as u32).collect();
        for n_new in [1usize, 16] {
            let q: Vec<f32> = (0..n_new * nh * hd)
                .map(|i| ((i % 17) as f32 - 8.0) / 17.0)
                .collect();
            let qt = b
                .upload(&HostTensor::from_f32(vec![n_new, nh, hd], &q))
                .expect("q");
            let seqs = [AttnSeq {
                block_table: &table,
                n_past: keys - n_new,
                n_new,
            }];
            drop(
                b.attention(&qt, &kp, &vp, &seqs, &params)
                    .expect("attention"),
            );
            b.sync().expect("sync");
            let start = Instant::now();
            let mut iters = 0;
            while iters < 2 || (start.elapsed().as_secs_f64() < 1.0 && iters < 100) {
                drop(
                    b.attention(&qt, &kp, &vp, &seqs, &params)
                        .expect("attention"),
                );
                b.sync().expect("sync");
                iters += 1;
            }
            let secs = start.elapsed().as_secs_f64() / iters as f64;
            // QKᵀ and PV: 2 · 2 · head_dim FLOPs per (query, head, key).
            let gflop = 4.0 * (n_new * nh * hd * keys) as f64 / 1e9;
            println!(
                "wgpu attention {keys:5} keys, {n_new:2} queries: {:8.3} ms, {:6.2} GFLOP/s on {}",
                secs * 1e3,
                gflop / secs,
                b.info().description
            );
        }
    }
}
