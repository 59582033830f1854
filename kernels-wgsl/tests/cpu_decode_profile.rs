//! Where a SmolLM2-135M decode step spends its time on the CPU backend, op by op, at the model's
//! real shapes (heavy: `#[ignore]`).
//!
//! Run: `cargo test -p prfaas-kernels --release --test cpu_decode_profile -- --ignored --nocapture`
//!
//! Prints the median time of each op of one layer for batch 1 and batch 16, the per-token total
//! (30 layers + the 49152×576 Q8_0 output projection), and the tok/s bound that total implies.
//! Times are the fastest of many runs (least disturbed by other load); the split between ops is
//! what this is for.

use std::time::Instant;

use prfaas_kernels::bench::pseudo_random;
use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::{quant, AttnParams, AttnSeq, Backend, DType, HostTensor, RopeStyle, Tensor};

const HIDDEN: usize = 576;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const FFN: usize = 1536;
const VOCAB: usize = 49152;
const LAYERS: usize = 30;
const CONTEXT: usize = 192;
const BLOCK: usize = 16;

fn weight(b: &CpuBackend, dtype: DType, n: usize, k: usize, seed: u64) -> Tensor {
    let bytes = quant::quantize(dtype, &pseudo_random(n * k, seed)).expect("quantize");
    b.upload(&HostTensor {
        dtype,
        shape: vec![n, k],
        bytes,
    })
    .expect("upload")
}

fn act(b: &CpuBackend, shape: &[usize], seed: u64) -> Tensor {
    b.upload(&HostTensor::from_f32(
        shape.to_vec(),
        &pseudo_random(shape.iter().product(), seed),
    ))
    .expect("upload")
}

/// Fastest run of `f` over enough repetitions to last ~0.2 s: on a shared machine the minimum is
/// the run least disturbed by other processes, which is what an op costs by itself.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.2 / once) as usize).clamp(5, 2000);
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[0]
}

#[test]
#[ignore = "profile: run explicitly in release mode"]
fn decode_step_profile_smollm2_shapes() {
    let b = CpuBackend::new();
    println!("backend: {}", b.info().description);
    let wq = weight(&b, DType::Q4_1, HEADS * HEAD_DIM, HIDDEN, 1);
    let wk = weight(&b, DType::Q4_1, KV_HEADS * HEAD_DIM, HIDDEN, 2);
    let wo = weight(&b, DType::Q4_1, HIDDEN, HEADS * HEAD_DIM, 3);
    let wg = weight(&b, DType::Q4_1, FFN, HIDDEN, 4);
    let wd = weight(&b, DType::Q4_1, HIDDEN, FFN, 5);
    let out = weight(&b, DType::Q8_0, VOCAB, HIDDEN, 6);
    let norm = act(&b, &[HIDDEN], 7);
    let blocks_per_seq = CONTEXT.div_ceil(BLOCK) + 1;
    for batch in [1usize, 16] {
        let n_blocks = blocks_per_seq * batch;
        let pool_k = act(&b, &[n_blocks, BLOCK, KV_HEADS, HEAD_DIM], 8);
        let pool_v = act(&b, &[n_blocks, BLOCK, KV_HEADS, HEAD_DIM], 9);
        let tables: Vec<Vec<u32>> = (0..batch)
            .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
            .collect();
        let seqs: Vec<AttnSeq<'_>> = tables
            .iter()
            .map(|t| AttnSeq {
                block_table: t,
                n_past: CONTEXT,
                n_new: 1,
            })
            .collect();
        let x = act(&b, &[batch, HIDDEN], 10);
        let h = act(&b, &[batch, FFN], 11);
        let q = act(&b, &[batch, HEADS, HEAD_DIM], 12);
        let kv = act(&b, &[batch, KV_HEADS, HEAD_DIM], 13);
        let positions: Vec<u32> = vec![CONTEXT as u32; batch];
        let slots: Vec<u32> = (0..batch)
            .map(|s| (s * blocks_per_seq * BLOCK + CONTEXT) as u32)
            .collect();
        let params = AttnParams {
            n_heads: HEADS,
            n_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            scale: 0.125,
            window: None,
        };
        // (op, seconds, times per layer)
        let ops: Vec<(&str, f64, usize)> = vec![
            ("rms_norm", time(|| drop(b.rms_norm(&x, &norm, 1e-5))), 2),
            ("matmul q/o 576x576", time(|| drop(b.matmul(&x, &wq))), 2),
            ("matmul k/v 576->192", time(|| drop(b.matmul(&x, &wk))), 2),
            (
                "rope q+k",
                time(|| {
                    drop(b.rope(&q, &positions, 1e5, RopeStyle::Normal));
                    drop(b.rope(&kv, &positions, 1e5, RopeStyle::Normal));
                }),
                1,
            ),
            (
                "kv_write",
                time(|| drop(b.kv_write(&pool_k, &pool_v, &kv, &kv, &slots))),
                1,
            ),
            (
                "attention",
                time(|| drop(b.attention(&q, &pool_k, &pool_v, &seqs, &params))),
                1,
            ),
            ("add", time(|| drop(b.add(&x, &x))), 2),
            (
                "matmul gate/up 576->1536",
                time(|| drop(b.matmul(&x, &wg))),
                2,
            ),
            ("swiglu", time(|| drop(b.swiglu(&h, &h))), 1),
            ("matmul down 1536->576", time(|| drop(b.matmul(&h, &wd))), 1),
        ];
        let _ = &wo;
        let out_t = time(|| drop(b.matmul(&x, &out)));
        let layer: f64 = ops.iter().map(|(_, t, c)| t * *c as f64).sum();
        let total = layer * LAYERS as f64 + out_t;
        println!("batch {batch}: per layer {:.1} µs", layer * 1e6);
        for (name, t, c) in &ops {
            println!(
                "  {name:<26} {:>8.1} µs × {c}  ({:>4.1}% of the step)",
                t * 1e6,
                100.0 * t * *c as f64 * LAYERS as f64 / total
            );
        }
        println!(
            "  {:<26} {:>8.1} µs × 1  ({:>4.1}% of the step)",
            "output 576->49152 Q8_0",
            out_t * 1e6,
            100.0 * out_t / total
        );
        println!(
            "  step {:.2} ms → {:.1} tok/s aggregate (ops only, no engine overhead)",
            total * 1e3,
            batch as f64 / total
        );
        assert!(total.is_finite() && total > 0.0);
    }
}
