//! Native CPU backend vs the plain reference implementations (`prfaas_kernels::reference`), on odd
//! shapes, every weight dtype, GQA ratios, windows and paged layouts, with relative tolerances.

mod common {
    mod f16_pools;
    pub use f16_pools::f16_pools_round_trip;
}

use half::f16;
use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::{
    quant, reference, AttnParams, AttnSeq, Backend, DType, HostTensor, KernelError, KvElem,
    LinearAttnParams, RopeStyle, Tensor,
};

/// Deterministic pseudo-random values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) * 0.5 * n as f32) as usize % n.max(1)
    }
}

/// `|got - want| <= tol · (|want| + mean|want|)` everywhere.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len().max(1) as f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * (w.abs() + scale),
            "{what}: element {i}: got {g}, want {w} (err {err}, tol {tol})"
        );
    }
}

fn up(b: &CpuBackend, shape: &[usize], data: &[f32]) -> Tensor {
    b.upload(&HostTensor::from_f32(shape.to_vec(), data))
        .expect("upload")
}

fn up_bytes(b: &CpuBackend, dtype: DType, shape: &[usize], bytes: Vec<u8>) -> Tensor {
    b.upload(&HostTensor {
        dtype,
        shape: shape.to_vec(),
        bytes,
    })
    .expect("upload")
}

const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::Q4_1, DType::Q8_0];

#[test]
fn matmul_all_dtypes_odd_shapes() {
    let b = CpuBackend::new();
    let mut rng = Rng(0x5eed);
    // m covers the mat-vec path (< 8) and the dequantize + gemm path (≥ 8).
    for &m in &[1, 3, 7, 8, 17, 33] {
        for &n in &[1, 3, 17, 257] {
            for dtype in DTYPES {
                let ks: &[usize] = if dtype.block_len() == 1 {
                    &[1, 7, 33, 96]
                } else {
                    &[32, 96, 320]
                };
                for &k in ks {
                    let x = rng.vec(m * k);
                    let w = rng.vec(n * k);
                    let bytes = quant::quantize(dtype, &w).unwrap();
                    let want = reference::matmul(&x, m, k, dtype, &bytes, n).unwrap();
                    let got = b
                        .matmul(&up(&b, &[m, k], &x), &up_bytes(&b, dtype, &[n, k], bytes))
                        .unwrap();
                    assert_eq!(got.shape(), &[m, n]);
                    assert_close(
                        &format!("matmul {dtype:?} {m}x{k}x{n}"),
                        &b.download(&got).unwrap(),
                        &want,
                        1e-4,
                    );
                }
            }
        }
    }
}

/// A weight larger than one dequantization panel (4 MiB of f32) and a batched `x`.
#[test]
fn matmul_quantized_multi_panel_and_batched_x() {
    let b = CpuBackend::new();
    let mut rng = Rng(42);
    let (m, k, n) = (9, 256, 4200);
    let x = rng.vec(m * k);
    let w = rng.vec(n * k);
    for dtype in [DType::Q4_1, DType::Q8_0] {
        let bytes = quant::quantize(dtype, &w).unwrap();
        let want = reference::matmul(&x, m, k, dtype, &bytes, n).unwrap();
        // x as [3, 3, k]: leading dims are kept.
        let got = b
            .matmul(
                &up(&b, &[3, 3, k], &x),
                &up_bytes(&b, dtype, &[n, k], bytes),
            )
            .unwrap();
        assert_eq!(got.shape(), &[3, 3, n]);
        assert_close(
            &format!("matmul {dtype:?} multi-panel"),
            &b.download(&got).unwrap(),
            &want,
            1e-4,
        );
    }
}

/// `matmul_many` (one activation quantization, one parallel region) gives bitwise the same
/// products as one `matmul` per weight, for mixed weight dtypes and sizes (a layer's q/k/v with a
/// ragged last panel, big enough to be split over threads) and for weights it cannot fuse (F32).
#[test]
fn matmul_many_equals_separate_matmuls() {
    let b = CpuBackend::new();
    let mut rng = Rng(7);
    let k = 576;
    let shapes = [(DType::Q4_1, 1000), (DType::Q8_0, 333), (DType::Q4_1, 17)];
    let ws: Vec<Tensor> = shapes
        .iter()
        .map(|&(dtype, n)| {
            let bytes = quant::quantize(dtype, &rng.vec(n * k)).unwrap();
            up_bytes(&b, dtype, &[n, k], bytes)
        })
        .collect();
    let f32_w = up(&b, &[40, k], &rng.vec(40 * k));
    for m in [1, 3, 16] {
        let x = up(&b, &[m, k], &rng.vec(m * k));
        for set in [vec![&ws[0], &ws[1], &ws[2]], vec![&ws[2], &f32_w, &ws[0]]] {
            let many = b.matmul_many(&x, &set).unwrap();
            assert_eq!(many.len(), set.len());
            for (got, w) in many.iter().zip(&set) {
                let want = b.matmul(&x, w).unwrap();
                assert_eq!(got.shape(), want.shape());
                assert_eq!(
                    b.download(got).unwrap(),
                    b.download(&want).unwrap(),
                    "m = {m}, weight {:?} {:?}",
                    w.dtype(),
                    w.shape()
                );
            }
        }
    }
    // Mismatched inner dimensions are an error, not a panic.
    let x = up(&b, &[1, 64], &rng.vec(64));
    assert!(b.matmul_many(&x, &[&ws[0]]).is_err());
}

#[test]
fn embedding_all_dtypes() {
    let b = CpuBackend::new();
    let mut rng = Rng(7);
    for dtype in DTYPES {
        let (vocab, d) = (257, 96);
        let bytes = quant::quantize(dtype, &rng.vec(vocab * d)).unwrap();
        let ids = [0u32, 256, 3, 3, 17];
        let want = reference::embedding(dtype, &bytes, vocab, d, &ids).unwrap();
        let table = up_bytes(&b, dtype, &[vocab, d], bytes);
        let got = b.embedding(&table, &ids).unwrap();
        assert_eq!(got.shape(), &[ids.len(), d]);
        assert_eq!(
            b.download(&got).unwrap(),
            want,
            "{dtype:?} rows are decoded exactly"
        );
        assert!(
            b.embedding(&table, &[257]).is_err(),
            "out-of-range id is an error"
        );
    }
}

#[test]
fn rowwise_and_elementwise_ops() {
    let b = CpuBackend::new();
    let mut rng = Rng(99);
    for &(rows, d) in &[(1, 1), (3, 17), (17, 33), (257, 64), (1000, 33), (3, 4096)] {
        let x = rng.vec(rows * d);
        let y = rng.vec(rows * d);
        let w = rng.vec(d);
        let (tx, ty) = (up(&b, &[rows, d], &x), up(&b, &[rows, d], &y));
        let tw = up(&b, &[d], &w);
        let what = |op: &str| format!("{op} [{rows}, {d}]");
        let got = b.download(&b.rms_norm(&tx, &tw, 1e-5).unwrap()).unwrap();
        assert_close(
            &what("rms_norm"),
            &got,
            &reference::rms_norm(&x, &w, 1e-5).unwrap(),
            1e-5,
        );
        let got = b.download(&b.softmax(&tx).unwrap()).unwrap();
        assert_close(
            &what("softmax"),
            &got,
            &reference::softmax(&x, d).unwrap(),
            1e-5,
        );
        let got = b.download(&b.add(&tx, &ty).unwrap()).unwrap();
        assert_eq!(got, reference::add(&x, &y).unwrap(), "{}", what("add"));
        let got = b.download(&b.swiglu(&tx, &ty).unwrap()).unwrap();
        assert_close(
            &what("swiglu"),
            &got,
            &reference::swiglu(&x, &y).unwrap(),
            1e-5,
        );
        assert_eq!(
            b.argmax(&tx).unwrap(),
            reference::argmax(&x, d).unwrap(),
            "{}",
            what("argmax")
        );
    }
    // Ties pick the lowest index.
    let t = up(&b, &[2, 4], &[1.0, 5.0, 5.0, 0.0, -1.0, -1.0, -1.0, -1.0]);
    assert_eq!(b.argmax(&t).unwrap(), vec![1, 0]);
}

#[test]
fn rope_both_styles() {
    let b = CpuBackend::new();
    let mut rng = Rng(3);
    for style in [RopeStyle::Normal, RopeStyle::Neox] {
        for &(n, heads, hd) in &[(1, 1, 2), (3, 3, 64), (17, 9, 64), (33, 2, 128)] {
            let x = rng.vec(n * heads * hd);
            let pos: Vec<u32> = (0..n as u32).map(|i| i * 37 + 5).collect();
            let want = reference::rope(&x, heads, hd, &pos, 10000.0, style).unwrap();
            let got = b
                .rope(&up(&b, &[n, heads, hd], &x), &pos, 10000.0, style)
                .unwrap();
            assert_close(
                &format!("rope {style:?} {n}x{heads}x{hd}"),
                &b.download(&got).unwrap(),
                &want,
                1e-5,
            );
        }
    }
}

fn widen<T: KvElem>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// [`attention_case_in`] with f32 pools and with f16 pools.
fn attention_case(
    b: &CpuBackend,
    rng: &mut Rng,
    p: AttnParams,
    block_size: usize,
    seq_lens: &[(usize, usize)],
) {
    attention_case_in::<f32>(b, rng, p, block_size, seq_lens);
    attention_case_in::<f16>(b, rng, p, block_size, seq_lens);
}

/// Fill a paged pool of `T` for several sequences with random K/V through `kv_write`, check the
/// pool against the reference writer (bit for bit), then compare attention against the reference.
fn attention_case_in<T: KvElem>(
    b: &CpuBackend,
    rng: &mut Rng,
    p: AttnParams,
    block_size: usize,
    seq_lens: &[(usize, usize)],
) {
    let row = p.n_kv_heads * p.head_dim;
    let total_blocks: usize = seq_lens
        .iter()
        .map(|&(past, new)| (past + new).div_ceil(block_size))
        .sum();
    let n_blocks = total_blocks + 3;
    // A shuffled, non-contiguous assignment of pool blocks to sequences.
    let mut free: Vec<u32> = (0..n_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i + 1));
    }
    let tables: Vec<Vec<u32>> = seq_lens
        .iter()
        .map(|&(past, new)| {
            (0..(past + new).div_ceil(block_size))
                .map(|_| free.pop().unwrap_or(0))
                .collect()
        })
        .collect();
    let pool_shape = [n_blocks, block_size, p.n_kv_heads, p.head_dim];
    let (kp, vp) = (
        b.zeros_dtype(&pool_shape, T::DTYPE).unwrap(),
        b.zeros_dtype(&pool_shape, T::DTYPE).unwrap(),
    );
    assert_eq!(kp.dtype(), T::DTYPE);
    let mut host_k = vec![T::default(); n_blocks * block_size * row];
    let mut host_v = host_k.clone();
    for (t, &(past, new)) in tables.iter().zip(seq_lens) {
        let n = past + new;
        let slots: Vec<u32> = (0..n)
            .map(|pos| t[pos / block_size] * block_size as u32 + (pos % block_size) as u32)
            .collect();
        let (k, v) = (rng.vec(n * row), rng.vec(n * row));
        reference::kv_write(&mut host_k, &mut host_v, &k, &v, row, &slots).unwrap();
        b.kv_write(
            &kp,
            &vp,
            &up(b, &[n, p.n_kv_heads, p.head_dim], &k),
            &up(b, &[n, p.n_kv_heads, p.head_dim], &v),
            &slots,
        )
        .unwrap();
    }
    assert_eq!(
        b.download(&kp).unwrap(),
        widen(&host_k),
        "k pool after kv_write"
    );
    assert_eq!(
        b.download(&vp).unwrap(),
        widen(&host_v),
        "v pool after kv_write"
    );
    let seqs: Vec<AttnSeq<'_>> = tables
        .iter()
        .zip(seq_lens)
        .map(|(t, &(n_past, n_new))| AttnSeq {
            block_table: t,
            n_past,
            n_new,
        })
        .collect();
    let rows: usize = seq_lens.iter().map(|s| s.1).sum();
    let q = rng.vec(rows * p.n_heads * p.head_dim);
    let want = reference::attention(&q, &host_k, &host_v, block_size, &seqs, &p).unwrap();
    let got = b
        .attention(
            &up(b, &[rows, p.n_heads, p.head_dim], &q),
            &kp,
            &vp,
            &seqs,
            &p,
        )
        .unwrap();
    assert_eq!(got.shape(), &[rows, p.n_heads * p.head_dim]);
    let what = format!(
        "attention {:?} {p:?} bs {block_size} seqs {seq_lens:?}",
        T::DTYPE
    );
    assert_close(&what, &b.download(&got).unwrap(), &want, 1e-4);
}

#[test]
fn attention_gqa_windows_blocks_multi_sequence() {
    let b = CpuBackend::new();
    let mut rng = Rng(0xa77e);
    for &(nh, nkv) in &[(3, 3), (9, 3), (8, 1)] {
        for &hd in &[16, 64] {
            for window in [None, Some(5), Some(40)] {
                for &bs in &[16, 32] {
                    let p = AttnParams {
                        n_heads: nh,
                        n_kv_heads: nkv,
                        head_dim: hd,
                        scale: 1.0 / (hd as f32).sqrt(),
                        window,
                    };
                    // Prefill from scratch, prefill after a cached prefix, and decode steps, in one call.
                    attention_case(&b, &mut rng, p, bs, &[(0, 17), (33, 3), (100, 1), (0, 1)]);
                }
            }
        }
    }
}

/// Long contexts: query chunks larger than one task and decode over many keys (split key ranges).
#[test]
fn attention_long_prefill_and_split_key_decode() {
    let b = CpuBackend::new();
    let mut rng = Rng(0x1009);
    let p = AttnParams {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        scale: 0.125,
        window: None,
    };
    attention_case(&b, &mut rng, p, 16, &[(1000, 1)]);
    attention_case(&b, &mut rng, p, 32, &[(257, 70), (1500, 1), (3, 1)]);
    let pw = AttnParams {
        window: Some(300),
        ..p
    };
    attention_case(&b, &mut rng, pw, 32, &[(1200, 1), (0, 257)]);
}

struct LinInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    beta: Vec<f32>,
    g: Vec<f32>,
}

fn l2_rows(x: &mut [f32], d: usize) {
    for r in x.chunks_exact_mut(d) {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-6);
        r.iter_mut().for_each(|v| *v /= n);
    }
}

fn lin_inputs(rng: &mut Rng, n: usize, p: &LinearAttnParams) -> LinInputs {
    let (h, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
    let mut q = rng.vec(n * h * dk);
    let mut k = rng.vec(n * h * dk);
    l2_rows(&mut q, dk);
    l2_rows(&mut k, dk);
    LinInputs {
        q,
        k,
        v: rng.vec(n * h * dv),
        beta: (0..n * h)
            .map(|_| 0.05 + 0.45 * (rng.next() + 1.0))
            .collect(),
        g: (0..n * h).map(|_| -0.5 * (rng.next() + 1.0)).collect(),
    }
}

fn run_linear(b: &CpuBackend, inp: &LinInputs, state: &Tensor, p: &LinearAttnParams) -> Vec<f32> {
    let n = inp.beta.len() / p.n_heads;
    let (h, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
    let out = b
        .linear_attention(
            &up(b, &[n, h, dk], &inp.q),
            &up(b, &[n, h, dk], &inp.k),
            &up(b, &[n, h, dv], &inp.v),
            &up(b, &[n, h], &inp.beta),
            &up(b, &[n, h], &inp.g),
            state,
            p,
        )
        .unwrap();
    assert_eq!(out.shape(), &[n, h * dv]);
    b.download(&out).unwrap()
}

#[test]
fn linear_attention_chunked_equals_step_and_reference() {
    let b = CpuBackend::new();
    let mut rng = Rng(0xde17a);
    for &(h, dk, dv, n) in &[(1, 16, 16, 1), (3, 16, 24, 100), (2, 64, 32, 130)] {
        let base = LinearAttnParams {
            n_heads: h,
            key_dim: dk,
            value_dim: dv,
            scale: 1.0 / (dk as f32).sqrt(),
            chunk: 1,
        };
        let inp = lin_inputs(&mut rng, n, &base);
        let init = rng.vec(h * dv * dk);
        let mut ref_state = init.clone();
        let want = reference::linear_attention(
            &inp.q,
            &inp.k,
            &inp.v,
            &inp.beta,
            &inp.g,
            &mut ref_state,
            &base,
        )
        .unwrap();
        for chunk in [1, 7, 64] {
            let p = LinearAttnParams { chunk, ..base };
            let state = up(&b, &[h, dv, dk], &init);
            let got = run_linear(&b, &inp, &state, &p);
            let what = format!("linear attention h{h} dk{dk} dv{dv} n{n} chunk {chunk}");
            assert_close(&what, &got, &want, 2e-4);
            assert_close(
                &format!("{what} state"),
                &b.download(&state).unwrap(),
                &ref_state,
                2e-4,
            );
        }
    }
}

#[test]
fn linear_attention_state_carries_across_calls() {
    let b = CpuBackend::new();
    let mut rng = Rng(0x57a7e);
    let p = LinearAttnParams {
        n_heads: 2,
        key_dim: 32,
        value_dim: 16,
        scale: 0.2,
        chunk: 16,
    };
    let n = 75;
    let inp = lin_inputs(&mut rng, n, &p);
    let whole_state = b.zeros(&[2, 16, 32]).unwrap();
    let whole = run_linear(&b, &inp, &whole_state, &p);
    // Split at 41: prefill 40 tokens (chunked), then one decode step, then the rest.
    let split = |a: usize, z: usize| {
        let (h, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
        LinInputs {
            q: inp.q[a * h * dk..z * h * dk].to_vec(),
            k: inp.k[a * h * dk..z * h * dk].to_vec(),
            v: inp.v[a * h * dv..z * h * dv].to_vec(),
            beta: inp.beta[a * h..z * h].to_vec(),
            g: inp.g[a * h..z * h].to_vec(),
        }
    };
    let state = b.zeros(&[2, 16, 32]).unwrap();
    let mut parts = run_linear(&b, &split(0, 40), &state, &p);
    parts.extend(run_linear(&b, &split(40, 41), &state, &p));
    parts.extend(run_linear(&b, &split(41, n), &state, &p));
    assert_close("split outputs", &parts, &whole, 1e-4);
    assert_close(
        "split state",
        &b.download(&state).unwrap(),
        &b.download(&whole_state).unwrap(),
        1e-4,
    );
}

#[test]
fn gather_scatter_and_write_round_trip() {
    let b = CpuBackend::new();
    let mut rng = Rng(11);
    let shape = [6, 16, 3, 8];
    let block = 16 * 3 * 8;
    let init = rng.vec(6 * block);
    let pool = up(&b, &shape, &init);
    let got = b.gather_blocks(&pool, &[4, 0, 5]).unwrap();
    assert_eq!(
        got,
        reference::gather_blocks(&init, block, &[4, 0, 5]).unwrap()
    );
    let data = rng.vec(2 * block);
    b.scatter_blocks(&pool, &[1, 3], &data).unwrap();
    let mut expect = init.clone();
    reference::scatter_blocks(&mut expect, block, &[1, 3], &data).unwrap();
    assert_eq!(b.download(&pool).unwrap(), expect);
    // A clone of the handle sees the write (shared storage, as the engine relies on).
    let alias = pool.clone();
    b.write(&pool, &init).unwrap();
    assert_eq!(b.download(&alias).unwrap(), init);
}

/// F16 pools: `scatter_blocks` rounds like the reference (to nearest even), `gather_blocks`
/// widens exactly, and gathered f16 values scatter back bit for bit (odd block sizes too).
#[test]
fn gather_scatter_f16_pools_round_trip_exactly() {
    let b = CpuBackend::new();
    let mut rng = Rng(0xf16);
    common::f16_pools_round_trip(
        &b,
        &[
            [1usize, 1, 1, 1],
            [7, 3, 1, 7],
            [5, 16, 3, 64],
            [33, 2, 2, 33],
        ],
        |n| rng.vec(n),
    );
    // Mixed pool dtypes, raw-byte dtypes and f16 `write` are refused.
    let kp = b.zeros_dtype(&[2, 4, 1, 8], DType::F16).unwrap();
    let vp = b.zeros(&[2, 4, 1, 8]).unwrap();
    let k = up(&b, &[1, 1, 8], &[0.5; 8]);
    assert!(b.kv_write(&kp, &vp, &k, &k, &[0]).is_err());
    assert!(b.zeros_dtype(&[2, 32], DType::Q8_0).is_err());
    assert!(b.write(&kp, &[0.0; 64]).is_err());
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let b = CpuBackend::new();
    let x = up(&b, &[2, 4], &[0.0; 8]);
    let w = up(&b, &[3, 5], &[0.0; 15]);
    assert!(matches!(b.matmul(&x, &w), Err(KernelError::Shape(_))));
    let q = up_bytes(&b, DType::Q4_1, &[1, 32], vec![0; 20]);
    assert!(b.download(&q).is_err(), "download of a quantized tensor");
    assert!(b.add(&x, &q).is_err());
    assert!(b
        .upload(&HostTensor {
            dtype: DType::Q8_0,
            shape: vec![1, 32],
            bytes: vec![0; 33]
        })
        .is_err());
    let pool = b.zeros(&[2, 16, 1, 4]).unwrap();
    assert!(b.gather_blocks(&pool, &[2]).is_err());
    assert!(b.scatter_blocks(&pool, &[0], &[0.0; 3]).is_err());
    assert!(b.write(&pool, &[0.0; 3]).is_err());
    let k = up(&b, &[1, 1, 4], &[0.0; 4]);
    assert!(
        b.kv_write(&pool, &pool, &k, &k, &[0]).is_err(),
        "same pool for k and v"
    );
    let vpool = b.zeros(&[2, 16, 1, 4]).unwrap();
    assert!(
        b.kv_write(&pool, &vpool, &k, &k, &[32]).is_err(),
        "slot out of range"
    );
    let p = AttnParams {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        scale: 0.5,
        window: None,
    };
    let qt = up(&b, &[1, 2, 4], &[0.0; 8]);
    let short = [0u32];
    let seqs = [AttnSeq {
        block_table: &short,
        n_past: 20,
        n_new: 1,
    }];
    assert!(
        b.attention(&qt, &pool, &vpool, &seqs, &p).is_err(),
        "block table too short"
    );
    let bad = [7u32, 0];
    let seqs = [AttnSeq {
        block_table: &bad,
        n_past: 20,
        n_new: 1,
    }];
    assert!(
        b.attention(&qt, &pool, &vpool, &seqs, &p).is_err(),
        "block index out of range"
    );
}

/// The small-batch quantized kernels (decode): every row-tile size (1..8 and the balanced splits
/// of 9..32 rows), column counts that are not multiples of the 16-column panel, long rows,
/// all-zero and tiny-magnitude activation blocks (activations are quantized per block, scaled by
/// its maximum), compared with the dequantize-then-multiply reference. The tolerance is 3e-4, not
/// 1e-4: with 8-bit-plane activations (two planes, ~2^-16 of a block's maximum per value) the
/// rounding of `x` summed over k products is ~1e-4 of a typical output on its own.
#[test]
fn matmul_quantized_small_batches_odd_shapes() {
    let b = CpuBackend::new();
    let mut rng = Rng(0xdec0de);
    for &m in &[1, 2, 3, 4, 5, 9, 16, 17, 19, 31, 32] {
        for &(k, n) in &[(32, 1), (96, 7), (576, 33), (1536, 13)] {
            for dtype in [DType::Q4_1, DType::Q8_0] {
                let mut x = rng.vec(m * k);
                // Row 0: first block all zero, second block ~1e-6 (relative rounding still fine).
                x[..32].fill(0.0);
                if k >= 64 {
                    x[32..64].iter_mut().for_each(|v| *v *= 1e-6);
                }
                let w = rng.vec(n * k);
                let bytes = quant::quantize(dtype, &w).unwrap();
                let want = reference::matmul(&x, m, k, dtype, &bytes, n).unwrap();
                let got = b
                    .matmul(&up(&b, &[m, k], &x), &up_bytes(&b, dtype, &[n, k], bytes))
                    .unwrap();
                assert_close(
                    &format!("small-batch matmul {dtype:?} {m}x{k}x{n}"),
                    &b.download(&got).unwrap(),
                    &want,
                    3e-4,
                );
            }
        }
    }
}
