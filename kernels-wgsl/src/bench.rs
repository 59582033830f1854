//! Kernel benchmarks behind `prfaas bench kernels`.
//!
//! Absolute times on a shared machine are noise, so every figure is also printed as a ratio
//! measured in the same run: to this machine's fp32 peak (cores × FMA lanes × 2 × FMA ports ×
//! clock, with the formula printed) and, for matmuls, to a plain call of the `gemm` crate on the
//! same f32 shape. Each case runs warm-up repetitions and reports the median of several timed ones.

use std::time::Instant;

use crate::backend::{AttnParams, AttnSeq, Backend, DType, HostTensor, Result};
use crate::cpu::matmul::gemm_f32;
use crate::quant;

/// This machine's nominal fp32 peak.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuPeak {
    pub cores: usize,
    pub clock_ghz: f64,
    /// Where the clock came from (`cpuinfo_max_freq` or `/proc/cpuinfo cpu MHz`).
    pub clock_source: String,
    /// Widest FMA instruction set detected ("avx512", "avx2+fma", "none").
    pub isa: String,
    /// f32 FMA lanes × 2 flops × FMA ports.
    pub flops_per_cycle_per_core: f64,
    pub gflops: f64,
    /// The same peak restricted to AVX2 (256-bit) FMAs, the widest ISA the `gemm` crate uses on
    /// stable Rust; a ratio to it says how well a kernel uses what `gemm` can reach.
    pub gflops_avx2: f64,
    /// Human-readable formula.
    pub formula: String,
}

fn read_clock_ghz() -> (f64, String) {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    {
        if let Ok(khz) = s.trim().parse::<f64>() {
            return (khz / 1e6, "sysfs cpuinfo_max_freq".into());
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/cpuinfo") {
        let mhz = s
            .lines()
            .filter(|l| l.starts_with("cpu MHz"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
            .fold(0.0f64, f64::max);
        if mhz > 0.0 {
            return (mhz / 1e3, "/proc/cpuinfo cpu MHz".into());
        }
    }
    (0.0, "unknown".into())
}

/// Compute this machine's fp32 peak from core count, ISA and clock.
///
/// Two FMA ports per core is assumed (every Intel core since Haswell and AMD since Zen 2 has two
/// 256-bit FMA pipes; Xeon server cores also have two 512-bit ones).
pub fn cpu_peak() -> CpuPeak {
    let cores = rayon::current_num_threads();
    let (clock_ghz, clock_source) = read_clock_ghz();
    let isa = match crate::cpu::simd::Isa::get() {
        crate::cpu::simd::Isa::Avx512 => "avx512",
        crate::cpu::simd::Isa::Avx2 => "avx2+fma",
        crate::cpu::simd::Isa::Generic => "none",
    };
    let lanes = match isa {
        "avx512" => 16.0,
        "avx2+fma" => 8.0,
        _ => 4.0, // SSE mul + add, no FMA: counted as one 4-lane "FMA" per cycle-equivalent
    };
    let fpc = lanes * 2.0 * 2.0;
    let gflops = cores as f64 * clock_ghz * fpc;
    let gflops_avx2 = if isa == "none" {
        gflops
    } else {
        cores as f64 * clock_ghz * 32.0
    };
    let formula = format!(
        "{cores} cores × {clock_ghz:.3} GHz × {fpc} flops/cycle ({lanes} f32 lanes × 2 (FMA) × 2 ports, {isa}) = {gflops:.1} GFLOP/s"
    );
    CpuPeak {
        cores,
        clock_ghz,
        clock_source,
        isa: isa.into(),
        flops_per_cycle_per_core: fpc,
        gflops,
        gflops_avx2,
        formula,
    }
}

/// Repetition policy.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub warmup: usize,
    pub min_reps: usize,
    pub max_reps: usize,
    /// Stop adding repetitions after this many seconds per case (once `min_reps` are done).
    pub target_secs: f64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            warmup: 2,
            min_reps: 5,
            max_reps: 200,
            target_secs: 0.6,
        }
    }
}

/// Median seconds of `f` under `opt`.
pub fn time_median(opt: &BenchOptions, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..opt.warmup {
        f()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < opt.min_reps.max(1)
        || (times.len() < opt.max_reps && start.elapsed().as_secs_f64() < opt.target_secs)
    {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// One measured case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    pub backend: String,
    /// "matmul", "attention-prefill" or "attention-decode".
    pub kernel: String,
    /// Weight dtype for matmuls, "F32" for attention.
    pub dtype: String,
    /// `m×k×n` for matmuls; `q×keys` for attention.
    pub shape: String,
    pub flops: f64,
    pub median_ms: f64,
    pub gflops: f64,
    pub ratio_to_peak: f64,
    /// The `gemm` crate's f32 GFLOP/s on the same shape (matmuls only).
    pub gemm_gflops: Option<f64>,
    pub ratio_to_gemm: Option<f64>,
}

/// Matmul shapes `(m, k, n)` of issue 3: two prefill products and the decode mat-vec.
pub const MATMUL_SHAPES: [(usize, usize, usize); 3] =
    [(2048, 576, 1536), (512, 1536, 576), (1, 576, 1536)];
/// Attention key counts.
pub const ATTN_KEYS: [usize; 3] = [512, 2048, 8192];
/// Attention geometry (SmolLM2-135M: 9 query heads, 3 KV heads, head dim 64).
pub const ATTN_PARAMS: AttnParams = AttnParams {
    n_heads: 9,
    n_kv_heads: 3,
    head_dim: 64,
    scale: 0.125,
    window: None,
};
/// Query rows of the prefill attention case (one chunk of new tokens after a cached prefix).
pub const ATTN_PREFILL_ROWS: usize = 128;
const ATTN_BLOCK: usize = 32;

/// `n` deterministic values in [-0.5, 0.5) from an xorshift64 stream (benchmark and test data).
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// GFLOP/s of a plain `gemm` crate call for `x[m,k] · w[n,k]ᵀ` in f32.
pub fn gemm_baseline(opt: &BenchOptions, m: usize, k: usize, n: usize) -> Result<f64> {
    let x = pseudo_random(m * k, 1);
    let w = pseudo_random(n * k, 2);
    let mut out = vec![0.0f32; m * n];
    let secs = time_median(opt, || {
        gemm_f32(&x, &w, &mut out, m, k, n, n);
        Ok(())
    })?;
    Ok(2.0 * (m * n * k) as f64 / secs / 1e9)
}

/// Run every case on `backend`. `gemm` holds the baseline GFLOP/s per matmul shape (same order as
/// [`MATMUL_SHAPES`]); `progress` receives one line per case (for stderr).
pub fn bench_backend(
    backend: &dyn Backend,
    peak: &CpuPeak,
    gemm: &[f64],
    opt: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<CaseResult>> {
    let name = backend.info().kind.to_string();
    let mut out = Vec::new();
    for (si, &(m, k, n)) in MATMUL_SHAPES.iter().enumerate() {
        let x = backend.upload(&HostTensor::from_f32(vec![m, k], &pseudo_random(m * k, 3)))?;
        let wf = pseudo_random(n * k, 4);
        for dtype in [DType::F32, DType::Q4_1] {
            progress(&format!("{name}: matmul {dtype:?} {m}×{k}×{n}"));
            let w = backend.upload(&HostTensor {
                dtype,
                shape: vec![n, k],
                bytes: quant::quantize(dtype, &wf)?,
            })?;
            let secs = time_median(opt, || {
                backend.matmul(&x, &w)?;
                backend.sync()
            })?;
            let flops = 2.0 * (m * n * k) as f64;
            let gflops = flops / secs / 1e9;
            let g = gemm.get(si).copied();
            out.push(CaseResult {
                backend: name.clone(),
                kernel: "matmul".into(),
                dtype: format!("{dtype:?}"),
                shape: format!("{m}×{k}×{n}"),
                flops,
                median_ms: secs * 1e3,
                gflops,
                ratio_to_peak: gflops / peak.gflops,
                gemm_gflops: g,
                ratio_to_gemm: g.map(|g| gflops / g),
            });
        }
    }
    for &keys in &ATTN_KEYS {
        for (kernel, rows) in [
            ("attention-prefill", ATTN_PREFILL_ROWS),
            ("attention-decode", 1),
        ] {
            progress(&format!("{name}: {kernel} {rows} queries × {keys} keys"));
            let (secs, flops) = bench_attention(backend, opt, keys, rows)?;
            let gflops = flops / secs / 1e9;
            out.push(CaseResult {
                backend: name.clone(),
                kernel: kernel.into(),
                dtype: "F32".into(),
                shape: format!("{rows}×{keys}"),
                flops,
                median_ms: secs * 1e3,
                gflops,
                ratio_to_peak: gflops / peak.gflops,
                gemm_gflops: None,
                ratio_to_gemm: None,
            });
        }
    }
    Ok(out)
}

/// `rows` new queries at the end of a `keys`-token sequence in a paged pool; returns (median
/// seconds, flops). Flops count `4 · head_dim` per visible (query, key, head) triple.
fn bench_attention(
    backend: &dyn Backend,
    opt: &BenchOptions,
    keys: usize,
    rows: usize,
) -> Result<(f64, f64)> {
    let p = ATTN_PARAMS;
    let blocks = keys.div_ceil(ATTN_BLOCK);
    let shape = [blocks, ATTN_BLOCK, p.n_kv_heads, p.head_dim];
    let pool_len = blocks * ATTN_BLOCK * p.n_kv_heads * p.head_dim;
    let kp = backend.upload(&HostTensor::from_f32(
        shape.to_vec(),
        &pseudo_random(pool_len, 5),
    ))?;
    let vp = backend.upload(&HostTensor::from_f32(
        shape.to_vec(),
        &pseudo_random(pool_len, 6),
    ))?;
    // Blocks in reverse order: a non-trivial block table, as after real allocation churn.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let seqs = [AttnSeq {
        block_table: &table,
        n_past: keys - rows,
        n_new: rows,
    }];
    let q = backend.upload(&HostTensor::from_f32(
        vec![rows, p.n_heads, p.head_dim],
        &pseudo_random(rows * p.n_heads * p.head_dim, 7),
    ))?;
    let secs = time_median(opt, || {
        backend.attention(&q, &kp, &vp, &seqs, &p)?;
        backend.sync()
    })?;
    let visible: usize = (0..rows).map(|i| keys - rows + i + 1).sum();
    Ok((secs, (visible * p.n_heads * 4 * p.head_dim) as f64))
}
