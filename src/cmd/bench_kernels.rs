//! `prfaas bench kernels`: kernel GFLOP/s as ratios to this machine's fp32 peak and to the `gemm`
//! crate, measured in one run (see `prfaas_kernels::bench`).

use std::sync::Arc;

use anyhow::Context;
use prfaas_kernels::bench::{self, BenchOptions, CaseResult, CpuPeak};
use prfaas_kernels::{Backend, KernelError};

/// Which backends to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Cpu,
    Wgpu,
    All,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backends to measure (`all`: cpu, plus wgpu when an adapter exists).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: Which,
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Minimum timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    peak: CpuPeak,
    /// `gemm` crate f32 GFLOP/s per matmul shape (`m×k×n`).
    gemm: Vec<(String, f64)>,
    results: Vec<CaseResult>,
    /// Backends that were asked for but could not be measured, with the reason.
    skipped: Vec<(String, String)>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opt = BenchOptions {
        min_reps: args.reps.max(1),
        ..BenchOptions::default()
    };
    let peak = bench::cpu_peak();
    let mut progress = |s: &str| eprintln!("[bench kernels] {s}");
    progress(&format!("fp32 peak: {}", peak.formula));

    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    let mut skipped = Vec::new();
    if matches!(args.backend, Which::Cpu | Which::All) {
        backends.push(Arc::new(prfaas_kernels::cpu::CpuBackend::new()));
    }
    if matches!(args.backend, Which::Wgpu | Which::All) {
        match prfaas_kernels::gpu::WgpuBackend::new() {
            Ok(b) => backends.push(Arc::new(b)),
            Err(e @ KernelError::NoAdapter(_)) if args.backend == Which::All => {
                progress(&format!("wgpu skipped: {e}"));
                skipped.push(("wgpu".to_string(), e.to_string()));
            }
            Err(e) => return Err(e).context("opening the wgpu backend"),
        }
    }

    let mut gemm = Vec::new();
    for &(m, k, n) in &bench::MATMUL_SHAPES {
        progress(&format!("gemm crate baseline f32 {m}×{k}×{n}"));
        gemm.push((format!("{m}×{k}×{n}"), bench::gemm_baseline(&opt, m, k, n)?));
    }
    let gemm_g: Vec<f64> = gemm.iter().map(|g| g.1).collect();
    let mut results = Vec::new();
    for b in &backends {
        progress(&format!("backend: {}", b.info().description));
        results.extend(bench::bench_backend(
            b.as_ref(),
            &peak,
            &gemm_g,
            &opt,
            &mut progress,
        )?);
    }

    let report = Report {
        peak,
        gemm,
        results,
        skipped,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!("fp32 peak: {}", r.peak.formula);
    println!(
        "  (clock from {}; AVX2-only peak, the ISA of the gemm crate on stable: {:.1} GFLOP/s)",
        r.peak.clock_source, r.peak.gflops_avx2
    );
    for (shape, g) in &r.gemm {
        println!(
            "gemm crate f32 {shape}: {g:.1} GFLOP/s ({:.2} of peak)",
            g / r.peak.gflops
        );
    }
    println!();
    println!(
        "{:<6} {:<18} {:<5} {:<14} {:>10} {:>9} {:>7} {:>8}",
        "backend", "kernel", "dtype", "shape", "median ms", "GFLOP/s", "/peak", "/gemm"
    );
    for c in &r.results {
        let vs_gemm = c
            .ratio_to_gemm
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<6} {:<18} {:<5} {:<14} {:>10.3} {:>9.1} {:>7.2} {:>8}",
            c.backend, c.kernel, c.dtype, c.shape, c.median_ms, c.gflops, c.ratio_to_peak, vs_gemm
        );
    }
    for (b, why) in &r.skipped {
        println!("skipped {b}: {why}");
    }
}
