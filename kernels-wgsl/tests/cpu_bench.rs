//! The CPU rows of `prfaas bench kernels` without building the whole CLI (heavy: `#[ignore]`).
//!
//! Run: `cargo test -p prfaas-kernels --release --test cpu_bench -- --ignored --nocapture`

use prfaas_kernels::bench::{self, BenchOptions};
use prfaas_kernels::cpu::CpuBackend;

#[test]
#[ignore = "benchmark: run explicitly in release mode"]
fn cpu_kernels_vs_peak_and_gemm() {
    let opt = BenchOptions::default();
    let peak = bench::cpu_peak();
    println!("fp32 peak: {}", peak.formula);
    let gemm: Vec<f64> = bench::MATMUL_SHAPES
        .iter()
        .map(|&(m, k, n)| bench::gemm_baseline(&opt, m, k, n).expect("gemm baseline"))
        .collect();
    let rows = bench::bench_backend(&CpuBackend::new(), &peak, &gemm, &opt, &mut |s| {
        eprintln!("{s}")
    })
    .expect("bench");
    for r in &rows {
        println!(
            "{:<18} {:<5} {:<14} {:>9.3} ms {:>7.1} GFLOP/s  {:.2} of peak  {}",
            r.kernel,
            r.dtype,
            r.shape,
            r.median_ms,
            r.gflops,
            r.ratio_to_peak,
            r.ratio_to_gemm
                .map(|g| format!("{g:.2}× gemm"))
                .unwrap_or_default()
        );
        assert!(r.gflops.is_finite() && r.gflops > 0.0, "{r:?}");
    }
}
