//! wgpu backend vs the plain reference implementations (`prfaas_kernels::reference`), on odd
//! shapes, with relative tolerances.
//!
//! Needs a wgpu adapter (lavapipe in CI). Without one the tests print a loud SKIPPED line and
//! return, unless `PRFAAS_REQUIRE_GPU=1`, in which case they fail. Shapes are kept small so the
//! whole file runs in seconds on lavapipe.

use std::sync::OnceLock;

mod common {
    mod f16_pools;
    pub use f16_pools::f16_pools_round_trip;
}

use half::f16;
use prfaas_kernels::gpu::{MatmulPath, WgpuBackend};
use prfaas_kernels::{
    gpu_required, quant, reference, AttnParams, AttnSeq, Backend, DType, HostTensor, KernelError,
    KvElem, LinearAttnParams, RopeStyle,
};

// ---------------------------------------------------------------------------------------------
// Harness

fn open(path: MatmulPath) -> Option<WgpuBackend> {
    match WgpuBackend::with_matmul(path) {
        Ok(b) => {
            eprintln!(
                "wgpu backend: {} (texture matmul: {})",
                b.info().description,
                b.uses_texture_matmul()
            );
            Some(b)
        }
        Err(e @ KernelError::NoAdapter(_)) => {
            if gpu_required() {
                panic!("PRFAAS_REQUIRE_GPU is set but no GPU adapter is available: {e}");
            }
            // Written to the stderr handle directly: the test harness captures `eprintln!`.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: no GPU adapter (set PRFAAS_REQUIRE_GPU=1 to fail instead)"
            );
            None
        }
        Err(e) => panic!("opening the wgpu backend failed: {e}"),
    }
}

/// The default backend (shared by all tests in this file: one device).
fn gpu() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    B.get_or_init(|| open(MatmulPath::Auto)).as_ref()
}

/// Backends for both matmul kernel families (the texture one only where the adapter has it).
fn matmul_backends() -> Vec<(&'static str, &'static WgpuBackend)> {
    static S: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    static T: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let mut out = Vec::new();
    if let Some(b) = S.get_or_init(|| open(MatmulPath::Storage)).as_ref() {
        out.push(("storage", b));
    }
    if let Some(b) = T.get_or_init(|| open(MatmulPath::Texture)).as_ref() {
        if b.uses_texture_matmul() {
            out.push(("texture", b));
        } else {
            eprintln!("note: adapter lacks 8-lane subgroups; texture matmul not tested");
        }
    }
    out
}

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
}

/// `|got - want| <= tol · (|want| + mean|want|)` everywhere.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len().max(1) as f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * (w.abs() + scale) || (g.is_nan() && w.is_nan()),
            "{what}: element {i}: got {g}, want {w} (err {err}, tol {tol})"
        );
    }
}

fn up(b: &WgpuBackend, shape: &[usize], data: &[f32]) -> prfaas_kernels::Tensor {
    b.upload(&HostTensor::from_f32(shape.to_vec(), data))
        .expect("upload")
}

fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
    quant::quantize(dtype, v).expect("quantize")
}

// ---------------------------------------------------------------------------------------------
// Dense ops

#[test]
fn matmul_all_dtypes_odd_shapes_both_kernels() {
    let backends = matmul_backends();
    if backends.is_empty() {
        return;
    }
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // (m, n, k): k multiple of 32 so every dtype applies; plus float-only odd k below.
    let shapes = [
        (1, 1, 32),
        (3, 17, 64),
        (17, 33, 96),
        (33, 3, 32),
        (257, 40, 160),
        (5, 129, 320),
    ];
    for dtype in [DType::F32, DType::F16, DType::Q4_1, DType::Q8_0] {
        for &(m, n, k) in &shapes {
            let x = rng.vec(m * k);
            let wv = rng.vec(n * k);
            let bytes = encode(dtype, &wv);
            let want = reference::matmul(&x, m, k, dtype, &bytes, n).unwrap();
            for &(path, b) in &backends {
                let xt = up(b, &[m, k], &x);
                let wt = b
                    .upload(&HostTensor {
                        dtype,
                        shape: vec![n, k],
                        bytes: bytes.clone(),
                    })
                    .unwrap();
                let got = b.download(&b.matmul(&xt, &wt).unwrap()).unwrap();
                assert_close(
                    &format!("matmul {path} {dtype:?} {m}x{n}x{k}"),
                    &got,
                    &want,
                    2e-4,
                );
            }
        }
    }
    for &(m, n, k) in &[(1, 7, 1), (3, 5, 7), (17, 65, 33)] {
        let x = rng.vec(m * k);
        let wv = rng.vec(n * k);
        let want = reference::matmul_f32(&x, &wv, m, k, n).unwrap();
        for &(path, b) in &backends {
            let got = b
                .download(&b.matmul(&up(b, &[m, k], &x), &up(b, &[n, k], &wv)).unwrap())
                .unwrap();
            assert_close(&format!("matmul {path} F32 {m}x{n}x{k}"), &got, &want, 2e-4);
        }
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let Some(b) = gpu() else { return };
    let x = up(b, &[2, 8], &[0.0; 16]);
    let w = up(b, &[3, 9], &[0.0; 27]);
    assert!(matches!(b.matmul(&x, &w), Err(KernelError::Shape(_))));
    let bad = HostTensor {
        dtype: DType::Q4_1,
        shape: vec![2, 32],
        bytes: vec![0; 39],
    };
    assert!(matches!(b.upload(&bad), Err(KernelError::Shape(_))));
}

#[test]
fn embedding_gathers_every_dtype() {
    let Some(b) = gpu() else { return };
    let mut rng = Rng(7);
    let (vocab, d) = (37, 64);
    let table = rng.vec(vocab * d);
    let ids = [0u32, 36, 5, 5, 17];
    for dtype in [DType::F32, DType::F16, DType::Q4_1, DType::Q8_0] {
        let bytes = encode(dtype, &table);
        let want = reference::embedding(dtype, &bytes, vocab, d, &ids).unwrap();
        let t = b
            .upload(&HostTensor {
                dtype,
                shape: vec![vocab, d],
                bytes,
            })
            .unwrap();
        let got = b.download(&b.embedding(&t, &ids).unwrap()).unwrap();
        assert_close(&format!("embedding {dtype:?}"), &got, &want, 1e-6);
        assert!(matches!(
            b.embedding(&t, &[37]),
            Err(KernelError::InvalidArgument(_))
        ));
    }
}

#[test]
fn rms_norm_softmax_add_swiglu() {
    let Some(b) = gpu() else { return };
    let mut rng = Rng(99);
    for &(rows, d) in &[(1, 1), (3, 17), (17, 257), (2, 1000)] {
        let x = rng.vec(rows * d);
        let y = rng.vec(rows * d);
        let w = rng.vec(d);
        let xt = up(b, &[rows, d], &x);
        let yt = up(b, &[rows, d], &y);
        let eps = 1e-5;
        let want = reference::rms_norm(&x, &w, eps).unwrap();
        let got = b
            .download(&b.rms_norm(&xt, &up(b, &[d], &w), eps).unwrap())
            .unwrap();
        assert_close(&format!("rms_norm {rows}x{d}"), &got, &want, 1e-4);
        let want = reference::softmax(&x, d).unwrap();
        let got = b.download(&b.softmax(&xt).unwrap()).unwrap();
        assert_close(&format!("softmax {rows}x{d}"), &got, &want, 1e-4);
        let want = reference::add(&x, &y).unwrap();
        assert_close(
            "add",
            &b.download(&b.add(&xt, &yt).unwrap()).unwrap(),
            &want,
            1e-6,
        );
        let want = reference::swiglu(&x, &y).unwrap();
        assert_close(
            "swiglu",
            &b.download(&b.swiglu(&xt, &yt).unwrap()).unwrap(),
            &want,
            1e-5,
        );
    }
    let a = up(b, &[2, 3], &[0.0; 6]);
    let c = up(b, &[3, 2], &[0.0; 6]);
    assert!(matches!(b.add(&a, &c), Err(KernelError::Shape(_))));
}

#[test]
fn argmax_takes_lowest_index_on_ties() {
    let Some(b) = gpu() else { return };
    let mut rng = Rng(3);
    let (rows, d) = (5, 1000);
    let mut x = rng.vec(rows * d);
    x[d + 10] = 5.0;
    x[d + 900] = 5.0; // tie in row 1: index 10 wins
    x[2 * d + 999] = 7.0; // last column
    x[3 * d] = 9.0; // first column
    x[4 * d] = f32::NAN; // NaNs never win
    x[4 * d + 1] = f32::NAN;
    let want = reference::argmax(&x, d).unwrap();
    assert_eq!(b.argmax(&up(b, &[rows, d], &x)).unwrap(), want);
    assert_eq!(
        b.argmax(&up(b, &[2, 2], &[f32::NAN, 2.0, f32::NAN, f32::NAN]))
            .unwrap(),
        vec![1, 0]
    );
    assert_eq!(want[1], 10);
}

#[test]
fn rope_normal_and_neox() {
    let Some(b) = gpu() else { return };
    let mut rng = Rng(11);
    for &(n, heads, hd) in &[(1, 1, 2), (3, 3, 8), (17, 2, 64)] {
        let x = rng.vec(n * heads * hd);
        let pos: Vec<u32> = (0..n as u32).map(|i| i * 7 + 3).collect();
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            for base in [10000.0f32, 100.0] {
                let want = reference::rope(&x, heads, hd, &pos, base, style).unwrap();
                let got = b
                    .download(
                        &b.rope(&up(b, &[n, heads, hd], &x), &pos, base, style)
                            .unwrap(),
                    )
                    .unwrap();
                assert_close(
                    &format!("rope {style:?} {n}x{heads}x{hd} base {base}"),
                    &got,
                    &want,
                    1e-4,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Paged KV and attention

fn widen<T: KvElem>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

#[test]
fn attention_paged_gqa_windows_multi_sequence() {
    let Some(b) = gpu() else { return };
    attention_paged_cases::<f32>(b);
    attention_paged_cases::<f16>(b);
}

/// Pools of `T` written with `kv_write` hold exactly what the reference writes (f16: the same
/// rounding bit for bit), and attention over them matches the reference.
fn attention_paged_cases<T: KvElem>(b: &WgpuBackend) {
    let mut rng = Rng(2024);
    // (n_heads, n_kv_heads, head_dim, block_size, window)
    let cases = [
        (1, 1, 8, 1, None),
        (3, 1, 16, 4, None),
        (8, 1, 32, 16, Some(5)),
        (8, 8, 4, 3, None),
        (6, 2, 64, 16, Some(40)),
        (2, 2, 256, 8, None),
    ];
    // Sequences as (n_past, n_new): decode steps, a prefill, a prefix + new tokens.
    let seqs_spec = [(0usize, 1usize), (33, 1), (0, 17), (20, 13), (70, 3)];
    for &(nh, nkv, hd, bs, window) in &cases {
        let params = AttnParams {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
        };
        let blocks_per_seq: Vec<usize> = seqs_spec
            .iter()
            .map(|(p, n)| (p + n).div_ceil(bs))
            .collect();
        let n_blocks: usize = blocks_per_seq.iter().sum::<usize>() + 2;
        let row = nkv * hd;
        let kp = b.zeros_dtype(&[n_blocks, bs, nkv, hd], T::DTYPE).unwrap();
        let vp = b.zeros_dtype(&[n_blocks, bs, nkv, hd], T::DTYPE).unwrap();
        let mut host_k = vec![T::default(); n_blocks * bs * row];
        let mut host_v = host_k.clone();
        // Assign blocks in a scrambled order so the block table matters.
        let mut free: Vec<u32> = (0..n_blocks as u32).rev().collect();
        free.swap(0, n_blocks / 2);
        let mut tables = Vec::new();
        for (si, &(n_past, n_new)) in seqs_spec.iter().enumerate() {
            let table: Vec<u32> = (0..blocks_per_seq[si])
                .map(|_| free.pop().unwrap())
                .collect();
            let len = n_past + n_new;
            // Scaled so that f16 pools see ties, subnormals and overflow too.
            let k: Vec<f32> = rng.vec(len * row).iter().map(|x| x * 4.0).collect();
            let mut v = rng.vec(len * row);
            if let Some(x) = v.first_mut() {
                *x = 1.0 + 2f32.powi(-11);
            }
            if let Some(x) = v.get_mut(1) {
                *x = 3.0e-6;
            }
            // Write the prefix and the new tokens in two kv_write calls, as an engine would.
            for range in [0..n_past, n_past..len] {
                if range.is_empty() {
                    continue;
                }
                let slots: Vec<u32> = range
                    .clone()
                    .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
                    .collect();
                let (ks, vs) = (
                    &k[range.start * row..range.end * row],
                    &v[range.start * row..range.end * row],
                );
                b.kv_write(
                    &kp,
                    &vp,
                    &up(b, &[range.len(), nkv, hd], ks),
                    &up(b, &[range.len(), nkv, hd], vs),
                    &slots,
                )
                .unwrap();
                reference::kv_write(&mut host_k, &mut host_v, ks, vs, row, &slots).unwrap();
            }
            tables.push(table);
        }
        let rows: usize = seqs_spec.iter().map(|s| s.1).sum();
        let q = rng.vec(rows * nh * hd);
        let seqs: Vec<AttnSeq<'_>> = seqs_spec
            .iter()
            .zip(&tables)
            .map(|(&(n_past, n_new), t)| AttnSeq {
                block_table: t,
                n_past,
                n_new,
            })
            .collect();
        let got = b
            .download(
                &b.attention(&up(b, &[rows, nh, hd], &q), &kp, &vp, &seqs, &params)
                    .unwrap(),
            )
            .unwrap();
        let want = reference::attention(&q, &host_k, &host_v, bs, &seqs, &params).unwrap();
        // The pools hold exactly what the reference wrote.
        assert_eq!(b.download(&kp).unwrap(), widen(&host_k));
        assert_eq!(b.download(&vp).unwrap(), widen(&host_v));
        assert_close(
            &format!(
                "attention {:?} h{nh} kv{nkv} d{hd} bs{bs} w{window:?}",
                T::DTYPE
            ),
            &got,
            &want,
            1e-4,
        );
    }
}

#[test]
fn attention_and_kv_write_reject_bad_input() {
    let Some(b) = gpu() else { return };
    let kp = b.zeros(&[2, 4, 1, 8]).unwrap();
    let vp = b.zeros(&[2, 4, 1, 8]).unwrap();
    let k = up(b, &[2, 1, 8], &[1.0; 16]);
    assert!(matches!(
        b.kv_write(&kp, &vp, &k, &k, &[8, 0]),
        Err(KernelError::InvalidArgument(_))
    ));
    assert!(matches!(
        b.kv_write(&kp, &kp, &k, &k, &[1, 2]),
        Err(KernelError::InvalidArgument(_))
    ));
    // A repeated slot keeps the last row, as in the reference.
    let kv: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let k2 = up(b, &[2, 1, 8], &kv);
    b.kv_write(&kp, &vp, &k2, &k2, &[5, 5]).unwrap();
    let mut host_k = vec![0.0f32; 2 * 4 * 8];
    let mut host_v = host_k.clone();
    reference::kv_write(&mut host_k, &mut host_v, &kv, &kv, 8, &[5, 5]).unwrap();
    assert_eq!(b.download(&kp).unwrap(), host_k);
    assert_eq!(b.download(&vp).unwrap(), host_v);
    let q = up(b, &[1, 1, 8], &[1.0; 8]);
    let p = AttnParams {
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 8,
        scale: 1.0,
        window: None,
    };
    let short = [AttnSeq {
        block_table: &[0],
        n_past: 4,
        n_new: 1,
    }];
    assert!(matches!(
        b.attention(&q, &kp, &vp, &short, &p),
        Err(KernelError::Shape(_))
    ));
    let gqa = AttnParams {
        n_heads: 3,
        n_kv_heads: 2,
        ..p
    };
    assert!(matches!(
        b.attention(&q, &kp, &vp, &short[..0], &gqa),
        Err(KernelError::Shape(_))
    ));
    let oob = [AttnSeq {
        block_table: &[5],
        n_past: 0,
        n_new: 1,
    }];
    assert!(matches!(
        b.attention(&q, &kp, &vp, &oob, &p),
        Err(KernelError::InvalidArgument(_))
    ));
}

#[test]
fn gather_scatter_blocks_and_write_round_trip() {
    let Some(b) = gpu() else { return };
    let mut rng = Rng(5);
    let shape = [6, 3, 2, 5];
    let row = 3 * 2 * 5;
    let init = rng.vec(6 * row);
    let pool = up(b, &shape, &init);
    let got = b.gather_blocks(&pool, &[4, 0, 5]).unwrap();
    assert_eq!(
        got,
        reference::gather_blocks(&init, row, &[4, 0, 5]).unwrap()
    );
    let data = rng.vec(2 * row);
    b.scatter_blocks(&pool, &[1, 3], &data).unwrap();
    let mut expect = init.clone();
    reference::scatter_blocks(&mut expect, row, &[1, 3], &data).unwrap();
    assert_eq!(b.download(&pool).unwrap(), expect);
    assert!(matches!(
        b.gather_blocks(&pool, &[6]),
        Err(KernelError::InvalidArgument(_))
    ));
    assert!(matches!(
        b.scatter_blocks(&pool, &[1], &data),
        Err(KernelError::Shape(_))
    ));

    // `write` stays ordered after already-recorded reads of the old contents.
    let before = b.add(&pool, &pool).unwrap();
    let fresh = rng.vec(6 * row);
    b.write(&pool, &fresh).unwrap();
    let doubled: Vec<f32> = expect.iter().map(|v| v + v).collect();
    assert_eq!(b.download(&before).unwrap(), doubled);
    assert_eq!(b.download(&pool).unwrap(), fresh);
}

/// F16 pools on the GPU: scatter rounds bit for bit like the reference (ties to even, overflow
/// to inf, subnormals), gather widens exactly, gathered values re-import unchanged, and a
/// repeated index keeps the last row.
#[test]
fn gather_scatter_f16_pools_match_the_reference_bit_for_bit() {
    let Some(b) = gpu() else { return };
    let mut rng = Rng(0xf16);
    common::f16_pools_round_trip(
        b,
        &[
            [1usize, 1, 1, 2],
            [7, 3, 1, 6],
            [5, 16, 3, 64],
            [33, 1, 3, 2],
        ],
        |n| rng.vec(n),
    );
    // Repeated slot in kv_write: last row wins, as in the reference.
    let kp = b.zeros_dtype(&[2, 4, 1, 8], DType::F16).unwrap();
    let vp = b.zeros_dtype(&[2, 4, 1, 8], DType::F16).unwrap();
    let kv: Vec<f32> = (0..16).map(|i| i as f32 * 0.3).collect();
    let k2 = up(b, &[2, 1, 8], &kv);
    b.kv_write(&kp, &vp, &k2, &k2, &[5, 5]).unwrap();
    let mut host_k = vec![f16::ZERO; 2 * 4 * 8];
    let mut host_v = host_k.clone();
    reference::kv_write(&mut host_k, &mut host_v, &kv, &kv, 8, &[5, 5]).unwrap();
    assert_eq!(b.download(&kp).unwrap(), widen(&host_k));
    // Odd last dimension, mixed pool dtypes: errors, not garbage.
    assert!(matches!(
        b.zeros_dtype(&[2, 4, 1, 7], DType::F16),
        Err(KernelError::Unsupported(_))
    ));
    let vf32 = b.zeros(&[2, 4, 1, 8]).unwrap();
    assert!(b.kv_write(&kp, &vf32, &k2, &k2, &[0, 1]).is_err());
}

// ---------------------------------------------------------------------------------------------
// Linear attention

struct LinInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    beta: Vec<f32>,
    g: Vec<f32>,
}

fn lin_inputs(rng: &mut Rng, n: usize, h: usize, dk: usize, dv: usize) -> LinInputs {
    let l2 = |mut v: Vec<f32>| {
        for c in v.chunks_mut(dk) {
            let s = c.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
            c.iter_mut().for_each(|x| *x /= s);
        }
        v
    };
    LinInputs {
        q: l2(rng.vec(n * h * dk)),
        k: l2(rng.vec(n * h * dk)),
        v: rng.vec(n * h * dv),
        beta: rng.vec(n * h).into_iter().map(|x| 0.5 + 0.45 * x).collect(),
        g: rng
            .vec(n * h)
            .into_iter()
            .map(|x| -0.3 * (x + 1.0))
            .collect(),
    }
}

#[test]
fn linear_attention_chunked_step_and_reference_agree() {
    let Some(b) = gpu() else { return };
    let mut rng = Rng(77);
    for &(n, h, dk, dv, chunk) in &[
        (1, 1, 4, 3, 8),
        (17, 2, 16, 8, 4),
        (33, 3, 8, 70, 16),
        (40, 1, 32, 16, 32),
    ] {
        let inp = lin_inputs(&mut rng, n, h, dk, dv);
        let s0 = rng
            .vec(h * dv * dk)
            .into_iter()
            .map(|x| 0.1 * x)
            .collect::<Vec<_>>();
        let scale = 1.0 / (dk as f32).sqrt();
        let mut ref_state = s0.clone();
        let p = LinearAttnParams {
            n_heads: h,
            key_dim: dk,
            value_dim: dv,
            scale,
            chunk,
        };
        let want = reference::linear_attention(
            &inp.q,
            &inp.k,
            &inp.v,
            &inp.beta,
            &inp.g,
            &mut ref_state,
            &p,
        )
        .unwrap();
        let run = |chunk: usize| {
            let st = up(b, &[h, dv, dk], &s0);
            let p = LinearAttnParams {
                n_heads: h,
                key_dim: dk,
                value_dim: dv,
                scale,
                chunk,
            };
            let o = b
                .linear_attention(
                    &up(b, &[n, h, dk], &inp.q),
                    &up(b, &[n, h, dk], &inp.k),
                    &up(b, &[n, h, dv], &inp.v),
                    &up(b, &[n, h], &inp.beta),
                    &up(b, &[n, h], &inp.g),
                    &st,
                    &p,
                )
                .unwrap();
            (b.download(&o).unwrap(), b.download(&st).unwrap())
        };
        let (o_chunk, s_chunk) = run(chunk);
        let (o_step, s_step) = run(1);
        let what = format!("linear n{n} h{h} dk{dk} dv{dv} chunk{chunk}");
        assert_close(&format!("{what} chunked out"), &o_chunk, &want, 1e-4);
        assert_close(&format!("{what} chunked state"), &s_chunk, &ref_state, 1e-4);
        assert_close(&format!("{what} step out"), &o_step, &want, 1e-4);
        assert_close(&format!("{what} step state"), &s_step, &ref_state, 1e-4);
    }
}

#[test]
fn linear_attention_state_carries_across_calls() {
    let Some(b) = gpu() else { return };
    let mut rng = Rng(8);
    let (n, h, dk, dv) = (9, 2, 8, 5);
    let inp = lin_inputs(&mut rng, n, h, dk, dv);
    let mut ref_state = vec![0.0; h * dv * dk];
    let p = LinearAttnParams {
        n_heads: h,
        key_dim: dk,
        value_dim: dv,
        scale: 0.5,
        chunk: 4,
    };
    let want = reference::linear_attention(
        &inp.q,
        &inp.k,
        &inp.v,
        &inp.beta,
        &inp.g,
        &mut ref_state,
        &p,
    )
    .unwrap();
    // Prefill the first 6 tokens chunked, then decode 3 single steps on the same state tensor.
    let st = b.zeros(&[h, dv, dk]).unwrap();
    let mut got = Vec::new();
    for (lo, hi) in [(0, 6), (6, 7), (7, 8), (8, 9)] {
        let m = hi - lo;
        let o = b
            .linear_attention(
                &up(b, &[m, h, dk], &inp.q[lo * h * dk..hi * h * dk]),
                &up(b, &[m, h, dk], &inp.k[lo * h * dk..hi * h * dk]),
                &up(b, &[m, h, dv], &inp.v[lo * h * dv..hi * h * dv]),
                &up(b, &[m, h], &inp.beta[lo * h..hi * h]),
                &up(b, &[m, h], &inp.g[lo * h..hi * h]),
                &st,
                &p,
            )
            .unwrap();
        got.extend(b.download(&o).unwrap());
    }
    assert_close("linear split out", &got, &want, 1e-4);
    assert_close(
        "linear split state",
        &b.download(&st).unwrap(),
        &ref_state,
        1e-4,
    );
}

// ---------------------------------------------------------------------------------------------
// Texture folding and concurrency

#[test]
fn matmul_folds_weights_taller_than_the_texture_limit() {
    let backends = matmul_backends();
    let mut rng = Rng(4242);
    // 16384 is lavapipe's (and most GPUs') max 2D texture size: n = 16387 needs two folds.
    let (m, n, k) = (3, 16387, 64);
    let x = rng.vec(m * k);
    let wv = rng.vec(n * k);
    for dtype in [DType::F32, DType::Q4_1] {
        let bytes = encode(dtype, &wv);
        let want = reference::matmul(&x, m, k, dtype, &bytes, n).unwrap();
        for &(path, b) in &backends {
            let wt = b
                .upload(&HostTensor {
                    dtype,
                    shape: vec![n, k],
                    bytes: bytes.clone(),
                })
                .unwrap();
            let got = b
                .download(&b.matmul(&up(b, &[m, k], &x), &wt).unwrap())
                .unwrap();
            assert_close(
                &format!("matmul {path} {dtype:?} {m}x{n}x{k}"),
                &got,
                &want,
                2e-4,
            );
        }
    }
}

#[test]
fn ops_from_several_threads_interleave_safely() {
    let Some(b) = gpu() else { return };
    std::thread::scope(|s| {
        for t in 0..3u32 {
            s.spawn(move || {
                for i in 0..10u32 {
                    let v = (t * 100 + i) as f32;
                    let a = up(b, &[33], &[v; 33]);
                    let sum = b.add(&a, &a).unwrap();
                    assert_eq!(
                        b.download(&sum).unwrap(),
                        vec![2.0 * v; 33],
                        "thread {t} iteration {i}"
                    );
                }
            });
        }
    });
}

#[test]
fn select_backend_follows_the_auto_rule() {
    use prfaas_kernels::{gpu::Gpu, select_backend, BackendKind};
    assert_eq!(
        select_backend(BackendKind::Cpu).unwrap().info().kind,
        BackendKind::Cpu
    );
    let probe = Gpu::probe();
    match (&probe, select_backend(BackendKind::Wgpu)) {
        (Some(_), Ok(b)) => assert_eq!(b.info().kind, BackendKind::Wgpu),
        (None, Err(KernelError::NoAdapter(_))) => {}
        (p, r) => panic!(
            "probe {p:?} but select_backend(Wgpu) gave {:?}",
            r.map(|b| b.info())
        ),
    }
    let auto = select_backend(BackendKind::Auto);
    match probe {
        Some(a) if a.software => assert_eq!(auto.unwrap().info().kind, BackendKind::Cpu),
        Some(_) => assert_eq!(auto.unwrap().info().kind, BackendKind::Wgpu),
        None if gpu_required() => assert!(matches!(auto, Err(KernelError::NoAdapter(_)))),
        None => assert_eq!(auto.unwrap().info().kind, BackendKind::Cpu),
    }
}

#[test]
fn a_decode_like_step_is_one_submission() {
    // A private device so other tests' submissions do not interleave with the count.
    let Some(b) = open(MatmulPath::Auto) else {
        return;
    };
    let (d, heads, hd, vocab) = (64, 4, 16, 50);
    let mut rng = Rng(31);
    let emb = up(&b, &[vocab, d], &rng.vec(vocab * d));
    let wq = up(&b, &[d, d], &rng.vec(d * d));
    let norm = up(&b, &[d], &rng.vec(d));
    let lm = up(&b, &[vocab, d], &rng.vec(vocab * d));
    let kp = b.zeros(&[4, 8, heads, hd]).unwrap();
    let vp = b.zeros(&[4, 8, heads, hd]).unwrap();
    b.sync().unwrap();
    let before = b.gpu().submissions();
    let x = b.embedding(&emb, &[7]).unwrap();
    let h = b.rms_norm(&x, &norm, 1e-5).unwrap();
    let q = b.matmul(&h, &wq).unwrap().reshape(&[1, heads, hd]).unwrap();
    let q = b.rope(&q, &[3], 10000.0, RopeStyle::Neox).unwrap();
    b.kv_write(&kp, &vp, &q, &q, &[3]).unwrap();
    let seq = [AttnSeq {
        block_table: &[0],
        n_past: 3,
        n_new: 1,
    }];
    let p = AttnParams {
        n_heads: heads,
        n_kv_heads: heads,
        head_dim: hd,
        scale: 0.25,
        window: None,
    };
    let a = b.attention(&q, &kp, &vp, &seq, &p).unwrap();
    let h2 = b.add(&a, &h).unwrap();
    let logits = b.matmul(&h2, &lm).unwrap();
    assert_eq!(
        b.gpu().submissions(),
        before,
        "nothing may be submitted before the read-back"
    );
    let token = b.argmax(&logits).unwrap();
    assert_eq!(
        b.gpu().submissions(),
        before + 1,
        "the whole step must be one submission"
    );
    assert!((token[0] as usize) < vocab);
}

#[test]
fn rope_stays_accurate_at_long_positions() {
    let Some(b) = gpu() else { return };
    let mut rng = Rng(12);
    let (heads, hd) = (2, 64);
    let pos: Vec<u32> = vec![4095, 32_767, 131_071, 1_000_003];
    let x = rng.vec(pos.len() * heads * hd);
    for style in [RopeStyle::Normal, RopeStyle::Neox] {
        let want = reference::rope(&x, heads, hd, &pos, 10000.0, style).unwrap();
        let got = b
            .download(
                &b.rope(&up(b, &[pos.len(), heads, hd], &x), &pos, 10000.0, style)
                    .unwrap(),
            )
            .unwrap();
        assert_close(&format!("rope {style:?} long positions"), &got, &want, 1e-4);
    }
}
