//! Matmul and attention throughput of the wgpu backend at LLM shapes (heavy: `#[ignore]`).
//!
//! Run: `cargo test -p prfaas-kernels --release --test gpu_bench -- --ignored --nocapture`
//! Prints GFLOP/s per (kernel family, weight dtype, shape) and, for attention, the texture and
//! the storage kernel side by side with their ratio. `prfaas bench kernels` is the user-facing
//! benchmark; this one isolates the wgpu kernel families from each other.

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

/// One attention shape: `seqs` sequences of `rows` new tokens after `past` cached ones.
struct AttnCase {
    label: &'static str,
    model: &'static str,
    params: prfaas_kernels::AttnParams,
    seqs: usize,
    past: usize,
    rows: usize,
}

/// Time `case` on `b`: (GFLOP/s wall, GFLOP per CPU-second, runs). One warm-up run (pipelines,
/// scratch textures), then runs until `budget_s` has passed (at least one).
fn measure_attention(b: &WgpuBackend, case: &AttnCase, budget_s: f64) -> (f64, f64, usize) {
    use prfaas_kernels::AttnSeq;
    let p = case.params;
    let bs = 16;
    let len = case.past + case.rows;
    let per_seq = len.div_ceil(bs);
    let blocks = per_seq * case.seqs;
    let pool_len = blocks * bs * p.n_kv_heads * p.head_dim;
    let shape = vec![blocks, bs, p.n_kv_heads, p.head_dim];
    let kp = b
        .upload(&HostTensor::from_f32(
            shape.clone(),
            &prfaas_kernels::bench::pseudo_random(pool_len, 5),
        ))
        .expect("k pool");
    let vp = b
        .upload(&HostTensor::from_f32(
            shape,
            &prfaas_kernels::bench::pseudo_random(pool_len, 6),
        ))
        .expect("v pool");
    // Each sequence its own blocks, in reverse order (a non-trivial block table).
    let tables: Vec<Vec<u32>> = (0..case.seqs)
        .map(|i| {
            ((i * per_seq) as u32..((i + 1) * per_seq) as u32)
                .rev()
                .collect()
        })
        .collect();
    let seqs: Vec<AttnSeq<'_>> = tables
        .iter()
        .map(|t| AttnSeq {
            block_table: t,
            n_past: case.past,
            n_new: case.rows,
        })
        .collect();
    let n_q = case.seqs * case.rows;
    let q = b
        .upload(&HostTensor::from_f32(
            vec![n_q, p.n_heads, p.head_dim],
            &prfaas_kernels::bench::pseudo_random(n_q * p.n_heads * p.head_dim, 7),
        ))
        .expect("q");
    let run = || {
        drop(b.attention(&q, &kp, &vp, &seqs, &p).expect("attention"));
        b.sync().expect("sync");
    };
    run();
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    let mut iters = 0;
    while iters < 1 || (start.elapsed().as_secs_f64() < budget_s && iters < 100) {
        run();
        iters += 1;
    }
    let secs = start.elapsed().as_secs_f64() / iters as f64;
    let cpu = (cpu_seconds() - cpu0) / iters as f64;
    // QKᵀ and PV: 4 · head_dim FLOPs per visible (query, head, key).
    let visible: usize = (0..case.rows).map(|i| case.past + i + 1).sum::<usize>() * case.seqs;
    let gflop = (4 * visible * p.n_heads * p.head_dim) as f64 / 1e9;
    (
        gflop / secs,
        if cpu > 0.0 { gflop / cpu } else { f64::NAN },
        iters,
    )
}

/// The texture/subgroup attention against the storage-buffer one, same process and shapes:
/// prefill of 512 tokens and a 512-token chunk at the end of a 2K context, decode of 1 and 16
/// sequences over 1K, at SmolLM2-135M's (9 heads, 3 KV heads, 64) and Gemma 3's (4, 1, 256)
/// shapes. `PRFAAS_BENCH_FILTER` selects cases by substring of "model label" (e.g. `smollm2`,
/// `prefill`, `gemma3 decode`); `PRFAAS_BENCH_TEXTURE_ONLY=1` skips the slow storage kernel.
#[test]
#[ignore = "benchmark: run with --ignored --nocapture (release)"]
fn wgpu_attention_texture_vs_storage() {
    use prfaas_kernels::gpu::{GpuOptions, KernelPath};
    use prfaas_kernels::AttnParams;
    let open_attention = |attention| match WgpuBackend::with_options(GpuOptions {
        attention,
        ..GpuOptions::default()
    }) {
        Ok(b) => Some(b),
        Err(e @ KernelError::NoAdapter(_)) if !gpu_required() => {
            eprintln!("SKIPPED: no GPU adapter: {e}");
            None
        }
        Err(e) => panic!("wgpu backend: {e}"),
    };
    let (Some(tex), Some(storage)) = (
        open_attention(KernelPath::Texture),
        open_attention(KernelPath::Storage),
    ) else {
        return;
    };
    if !tex.uses_texture_attention() {
        eprintln!(
            "texture attention unavailable on {}",
            tex.info().description
        );
        return;
    }
    let smol = AttnParams {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        scale: 0.125,
        window: None,
    };
    let gemma = AttnParams {
        n_heads: 4,
        n_kv_heads: 1,
        head_dim: 256,
        scale: 0.0625,
        window: None,
    };
    let filter = std::env::var("PRFAAS_BENCH_FILTER").unwrap_or_default();
    let mut cases = Vec::new();
    for (model, params) in [("smollm2", smol), ("gemma3", gemma)] {
        for (label, seqs, past, rows) in [
            ("prefill 512", 1, 0, 512),
            ("chunk 512 @2K", 1, 1536, 512),
            ("decode 1 @1K", 1, 1023, 1),
            ("decode 16 @1K", 16, 1023, 1),
        ] {
            cases.push(AttnCase {
                label,
                model,
                params,
                seqs,
                past,
                rows,
            });
        }
    }
    println!("adapter: {}", tex.info().description);
    let texture_only = std::env::var_os("PRFAAS_BENCH_TEXTURE_ONLY").is_some();
    for case in cases
        .iter()
        .filter(|c| format!("{} {}", c.model, c.label).contains(&filter))
    {
        let (new, new_cpu, new_runs) = measure_attention(&tex, case, 2.0);
        // The storage kernel is slow on lavapipe: one timed run is enough there.
        let (old, old_cpu, old_runs) = if texture_only {
            (f64::NAN, f64::NAN, 0)
        } else {
            measure_attention(&storage, case, 0.0)
        };
        println!(
            "wgpu attention {:8} {:16}: texture {new:7.2} GFLOP/s wall, {new_cpu:6.2} per CPU-s ({new_runs} runs); storage {old:6.3} wall, {old_cpu:6.3} per CPU-s ({old_runs}); ratio {:5.1}x wall, {:5.1}x per CPU-s",
            case.model,
            case.label,
            new / old,
            new_cpu / old_cpu,
        );
    }
}
