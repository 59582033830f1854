//! The backend conformance suite: every case is written once over `&dyn Backend` and run on every
//! available backend (native `cpu`; `wgpu` with its storage-buffer and texture matmul kernels)
//! against the plain reference implementations (`prfaas_kernels::reference`), on odd shapes, every
//! weight dtype, GQA ratios, windows and paged layouts, with relative tolerances.
//!
//! The `wgpu` backends need an adapter (lavapipe in CI). Without one the cases run on `cpu` only
//! and print a loud SKIPPED line, unless `PRFAAS_REQUIRE_GPU=1`, in which case they fail. Shapes
//! are kept small so the whole file runs in seconds on lavapipe. Tests of one backend's own
//! machinery (texture folding, submissions, thread pools) live in `gpu_kernels.rs`.

use std::sync::OnceLock;

mod common {
    mod f16_pools;
    pub use f16_pools::f16_pools_round_trip;
}

use half::f16;
use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::gpu::{GpuOptions, KernelPath, MatmulPath, WgpuBackend};
use prfaas_kernels::{
    gpu_required, quant, reference, AttnParams, AttnSeq, Backend, DType, GluAct, HostTensor,
    KernelError, KvElem, LinearAttnParams, RopeStyle, Tensor,
};

// ---------------------------------------------------------------------------------------------
// Harness

type Named = (&'static str, &'static dyn Backend);

fn open(matmul: MatmulPath) -> Option<WgpuBackend> {
    open_with(GpuOptions {
        matmul,
        ..GpuOptions::default()
    })
}

fn open_with(options: GpuOptions) -> Option<WgpuBackend> {
    match WgpuBackend::with_options(options) {
        Ok(b) => Some(b),
        Err(e @ KernelError::NoAdapter(_)) => {
            if gpu_required() {
                panic!("PRFAAS_REQUIRE_GPU is set but no GPU adapter is available: {e}");
            }
            // Written to the stderr handle directly: the test harness captures `eprintln!`.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (wgpu cases): no GPU adapter (set PRFAAS_REQUIRE_GPU=1 to fail instead)"
            );
            None
        }
        Err(e) => panic!("opening the wgpu backend failed: {e}"),
    }
}

fn cpu() -> &'static CpuBackend {
    static C: OnceLock<CpuBackend> = OnceLock::new();
    C.get_or_init(CpuBackend::new)
}

/// Backends for every op: cpu and wgpu with its default kernels (one device for the whole file).
fn backends() -> Vec<Named> {
    static G: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let mut out: Vec<Named> = vec![("cpu", cpu())];
    if let Some(g) = G.get_or_init(|| open(MatmulPath::Auto)).as_ref() {
        out.push(("wgpu", g));
    }
    out
}

/// Backends for attention: cpu, and both wgpu attention kernels (the texture one only where the
/// adapter has 8-lane subgroups).
fn attention_backends() -> Vec<Named> {
    static S: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    static T: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let open_attention = |attention| {
        open_with(GpuOptions {
            attention,
            ..GpuOptions::default()
        })
    };
    let mut out: Vec<Named> = vec![("cpu", cpu())];
    if let Some(b) = S
        .get_or_init(|| open_attention(KernelPath::Storage))
        .as_ref()
    {
        out.push(("wgpu-storage-attention", b));
    }
    if let Some(b) = T
        .get_or_init(|| open_attention(KernelPath::Texture))
        .as_ref()
    {
        if b.uses_texture_attention() {
            out.push(("wgpu-texture-attention", b));
        } else {
            eprintln!("note: adapter lacks 8-lane subgroups; texture attention not tested");
        }
    }
    out
}

/// Backends for matmuls: cpu, and both wgpu matmul kernel families (the texture one only where
/// the adapter has it).
fn matmul_backends() -> Vec<Named> {
    static S: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    static T: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let mut out: Vec<Named> = vec![("cpu", cpu())];
    if let Some(b) = S.get_or_init(|| open(MatmulPath::Storage)).as_ref() {
        out.push(("wgpu-storage", b));
    }
    if let Some(b) = T.get_or_init(|| open(MatmulPath::Texture)).as_ref() {
        if b.uses_texture_matmul() {
            out.push(("wgpu-texture", b));
        } else {
            eprintln!("note: adapter lacks 8-lane subgroups; texture matmul not tested");
        }
    }
    out
}

/// Tensors above this many bytes are stored in row parts by the `wgpu-split` backends, so small
/// test weights run the path that real weights over the adapter's storage binding limit take
/// (Gemma 3's 178 MB tied embedding against lavapipe's 128 MiB).
const SPLIT_BYTES: u64 = 4096;

/// cpu, and the wgpu matmul kernel families with uploads split past [`SPLIT_BYTES`]; each wgpu
/// entry also returns its concrete backend, to check that a tensor really was split.
fn split_backends() -> Vec<(
    &'static str,
    &'static dyn Backend,
    Option<&'static WgpuBackend>,
)> {
    static S: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    static T: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    let open_split = |matmul| {
        open_with(GpuOptions {
            matmul,
            max_part_bytes: Some(SPLIT_BYTES),
            ..GpuOptions::default()
        })
    };
    let mut out: Vec<(&str, &dyn Backend, Option<&WgpuBackend>)> = vec![("cpu", cpu(), None)];
    if let Some(b) = S.get_or_init(|| open_split(MatmulPath::Storage)).as_ref() {
        out.push(("wgpu-storage-split", b, Some(b)));
    }
    if let Some(b) = T.get_or_init(|| open_split(MatmulPath::Texture)).as_ref() {
        if b.uses_texture_matmul() {
            out.push(("wgpu-texture-split", b, Some(b)));
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
    fn below(&mut self, n: usize) -> usize {
        ((self.next() + 1.0) * 0.5 * n as f32) as usize % n.max(1)
    }
}

/// `|got - want| <= tol · (|want| + mean|want|)` everywhere.
#[track_caller]
/// Tolerance of a product with `dtype` weights on backend `name` against the reference. 3e-4
/// covers the 8-bit-plane activations (see `matmul_quantized_small_batches_odd_shapes`). The
/// cpu backend's decode kernels (≤ 32 rows) run Q4_K weights as Q4_1 blocks whose scales
/// `d·sc`, `−dmin·m` are rounded to f16 (≤ 2⁻¹¹ of each; see `cpu::q8act::PackedWeight`).
fn product_tol(name: &str, dtype: DType) -> f32 {
    match (name, dtype) {
        ("cpu", DType::Q4_K) => 3e-3,
        _ => 3e-4,
    }
}

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

fn up(b: &dyn Backend, shape: &[usize], data: &[f32]) -> Tensor {
    b.upload(&HostTensor::from_f32(shape.to_vec(), data))
        .expect("upload")
}

fn up_bytes(b: &dyn Backend, dtype: DType, shape: &[usize], bytes: Vec<u8>) -> Tensor {
    b.upload(&HostTensor {
        dtype,
        shape: shape.to_vec(),
        bytes,
    })
    .expect("upload")
}

fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
    quant::quantize(dtype, v).expect("quantize")
}

/// Every weight dtype.
const DTYPES: [DType; 7] = [
    DType::F32,
    DType::F16,
    DType::Q4_1,
    DType::Q8_0,
    DType::Q5_0,
    DType::Q4_K,
    DType::Q6_K,
];

/// Row lengths for `dtype`: odd ones for plain floats, odd multiples of the block otherwise.
fn ks_for(dtype: DType) -> &'static [usize] {
    match dtype.block_len() {
        1 => &[1, 7, 33, 96],
        32 => &[32, 96, 320],
        _ => &[256, 768],
    }
}

// ---------------------------------------------------------------------------------------------
// Products

#[test]
fn matmul_all_dtypes_odd_shapes() {
    let backends = matmul_backends();
    let mut rng = Rng(0x5eed);
    // m covers the mat-vec paths (decode, < 8 rows) and the tiled paths.
    for &m in &[1, 3, 8, 17, 33] {
        for &n in &[1, 17, 257] {
            for dtype in DTYPES {
                for &k in ks_for(dtype) {
                    let x = rng.vec(m * k);
                    let bytes = encode(dtype, &rng.vec(n * k));
                    let want = reference::matmul(&x, m, k, dtype, &bytes, n).unwrap();
                    for &(name, b) in &backends {
                        let got = b
                            .matmul(
                                &up(b, &[m, k], &x),
                                &up_bytes(b, dtype, &[n, k], bytes.clone()),
                            )
                            .unwrap();
                        assert_eq!(got.shape(), &[m, n]);
                        assert_close(
                            &format!("{name} matmul {dtype:?} {m}x{k}x{n}"),
                            &b.download(&got).unwrap(),
                            &want,
                            product_tol(name, dtype),
                        );
                    }
                }
            }
        }
    }
}

/// The small-batch quantized kernels (decode): every row-tile size (1..8 and the balanced splits
/// of 9..32 rows), column counts that are not multiples of a 16-column panel, long rows,
/// all-zero and tiny-magnitude activation blocks (activations may be quantized per block, scaled
/// by its maximum), compared with the dequantize-then-multiply reference. The tolerance is 3e-4:
/// with 8-bit-plane activations (two planes, ~2^-16 of a block's maximum per value) the rounding
/// of `x` summed over k products is ~1e-4 of a typical output on its own.
#[test]
fn matmul_quantized_small_batches_odd_shapes() {
    let backends = matmul_backends();
    let mut rng = Rng(0xdec0de);
    for &m in &[1, 2, 3, 4, 5, 9, 16, 17, 31] {
        for &(k, n) in &[(32usize, 1), (96, 7), (576, 33), (1536, 13), (256, 9)] {
            for dtype in [
                DType::Q4_1,
                DType::Q8_0,
                DType::Q5_0,
                DType::Q4_K,
                DType::Q6_K,
            ] {
                if !k.is_multiple_of(dtype.block_len()) {
                    continue;
                }
                let mut x = rng.vec(m * k);
                // Row 0: first block all zero, second block ~1e-6 (relative rounding still fine).
                x[..32].fill(0.0);
                if k >= 64 {
                    x[32..64].iter_mut().for_each(|v| *v *= 1e-6);
                }
                let bytes = encode(dtype, &rng.vec(n * k));
                let want = reference::matmul(&x, m, k, dtype, &bytes, n).unwrap();
                for &(name, b) in &backends {
                    let got = b
                        .matmul(
                            &up(b, &[m, k], &x),
                            &up_bytes(b, dtype, &[n, k], bytes.clone()),
                        )
                        .unwrap();
                    assert_close(
                        &format!("{name} small-batch matmul {dtype:?} {m}x{k}x{n}"),
                        &b.download(&got).unwrap(),
                        &want,
                        product_tol(name, dtype),
                    );
                }
            }
        }
    }
}

/// A weight larger than one cpu dequantization panel (4 MiB of f32) and a batched `x` whose
/// leading dims are kept.
#[test]
fn matmul_quantized_multi_panel_and_batched_x() {
    let mut rng = Rng(42);
    let (m, k, n) = (9, 256, 4200);
    let x = rng.vec(m * k);
    let w = rng.vec(n * k);
    for dtype in [DType::Q4_1, DType::Q8_0, DType::Q4_K] {
        let bytes = encode(dtype, &w);
        let want = reference::matmul(&x, m, k, dtype, &bytes, n).unwrap();
        for (name, b) in backends() {
            let got = b
                .matmul(
                    &up(b, &[3, 3, k], &x),
                    &up_bytes(b, dtype, &[n, k], bytes.clone()),
                )
                .unwrap();
            assert_eq!(got.shape(), &[3, 3, n]);
            assert_close(
                &format!("{name} matmul {dtype:?} multi-panel"),
                &b.download(&got).unwrap(),
                &want,
                product_tol(name, dtype),
            );
        }
    }
}

/// `matmul_many` gives bitwise the same products as one `matmul` per weight (the cpu backend
/// shares one activation quantization and one parallel region between them), for mixed weight
/// dtypes and sizes and for weights it cannot fuse (F32).
#[test]
fn matmul_many_equals_separate_matmuls() {
    for (name, b) in backends() {
        let mut rng = Rng(7);
        let k = 576;
        let shapes = [(DType::Q4_1, 1000), (DType::Q8_0, 333), (DType::Q5_0, 17)];
        let ws: Vec<Tensor> = shapes
            .iter()
            .map(|&(dtype, n)| up_bytes(b, dtype, &[n, k], encode(dtype, &rng.vec(n * k))))
            .collect();
        let f32_w = up(b, &[40, k], &rng.vec(40 * k));
        for m in [1, 3, 16] {
            let x = up(b, &[m, k], &rng.vec(m * k));
            for set in [vec![&ws[0], &ws[1], &ws[2]], vec![&ws[2], &f32_w, &ws[0]]] {
                let many = b.matmul_many(&x, &set).unwrap();
                assert_eq!(many.len(), set.len());
                for (got, w) in many.iter().zip(&set) {
                    let want = b.matmul(&x, w).unwrap();
                    assert_eq!(got.shape(), want.shape());
                    assert_eq!(
                        b.download(got).unwrap(),
                        b.download(&want).unwrap(),
                        "{name} m = {m}, weight {:?} {:?}",
                        w.dtype(),
                        w.shape()
                    );
                }
            }
        }
        // Mismatched inner dimensions are an error, not a panic.
        let x = up(b, &[1, 64], &rng.vec(64));
        assert!(b.matmul_many(&x, &[&ws[0]]).is_err(), "{name}");
    }
}

#[test]
fn embedding_all_dtypes() {
    let mut rng = Rng(7);
    for dtype in DTYPES {
        let (vocab, d) = (37, 256);
        let bytes = encode(dtype, &rng.vec(vocab * d));
        let ids = [0u32, 36, 3, 3, 17];
        let want = reference::embedding(dtype, &bytes, vocab, d, &ids).unwrap();
        for (name, b) in backends() {
            let table = up_bytes(b, dtype, &[vocab, d], bytes.clone());
            let got = b.embedding(&table, &ids).unwrap();
            assert_eq!(got.shape(), &[ids.len(), d]);
            assert_close(
                &format!("{name} embedding {dtype:?}"),
                &b.download(&got).unwrap(),
                &want,
                1e-6,
            );
            assert!(
                matches!(
                    b.embedding(&table, &[37]),
                    Err(KernelError::InvalidArgument(_))
                ),
                "{name}: out-of-range id is an error"
            );
        }
    }
}

/// Weights and embedding tables larger than one storage binding are stored in row parts on
/// wgpu (forced here to 4 KiB parts): matmul (mat-vec, tiled and texture kernels, one dispatch
/// per part writing its own output columns), `matmul_many` and the embedding gather (ids in
/// every part, repeated, first and last rows) give the reference's results, for every dtype and
/// uneven last parts. A split tensor read by an op that needs a whole one, a row too long for one
/// part and a 1-D tensor over the limit are typed errors.
#[test]
fn tensors_over_the_binding_limit_are_split_into_row_parts() {
    let mut rng = Rng(0x5711);
    let n = 101;
    for dtype in DTYPES {
        let k = *ks_for(dtype).last().expect("row lengths");
        let bytes = encode(dtype, &rng.vec(n * k));
        assert!(
            bytes.len() as u64 > 2 * SPLIT_BYTES,
            "{dtype:?}: weight too small to split"
        );
        let ids = [0u32, 100, 50, 3, 3, 99, 27, 0];
        let want_emb = reference::embedding(dtype, &bytes, n, k, &ids).unwrap();
        for (name, b, gpu) in split_backends() {
            let w = up_bytes(b, dtype, &[n, k], bytes.clone());
            if let Some(g) = gpu {
                let parts = g.buffers_of(&w).unwrap();
                assert!(parts >= 3, "{name} {dtype:?}: {parts} buffers");
            }
            for m in [1, 3, 9, 33] {
                let x = rng.vec(m * k);
                let want = reference::matmul(&x, m, k, dtype, &bytes, n).unwrap();
                // Made on the device (`zeros` + `write`): activations are op outputs, never
                // uploads, so the forced part size does not split them.
                let xt = b.zeros(&[m, k]).unwrap();
                b.write(&xt, &x).unwrap();
                let got = b.matmul(&xt, &w).unwrap();
                assert_eq!(got.shape(), &[m, n]);
                let what = format!("{name} split matmul {dtype:?} {m}x{k}x{n}");
                let tol = product_tol(name, dtype);
                assert_close(&what, &b.download(&got).unwrap(), &want, tol);
                let many = b.matmul_many(&xt, &[&w, &w]).unwrap();
                for t in &many {
                    assert_close(&what, &b.download(t).unwrap(), &want, tol);
                }
            }
            let emb = b.embedding(&w, &ids).unwrap();
            assert_eq!(emb.shape(), &[ids.len(), k]);
            let what = format!("{name} split embedding {dtype:?}");
            assert_close(&what, &b.download(&emb).unwrap(), &want_emb, 1e-6);
            assert!(
                matches!(
                    b.embedding(&w, &[n as u32]),
                    Err(KernelError::InvalidArgument(_))
                ),
                "{name}: out-of-range id"
            );
        }
    }
    for (name, b, gpu) in split_backends() {
        let Some(g) = gpu else { continue };
        let (rows, d) = (40, 64);
        let t = up(b, &[rows, d], &rng.vec(rows * d));
        assert!(g.buffers_of(&t).unwrap() > 1, "{name}");
        for (op, r) in [
            ("add", b.add(&t, &t).map(drop)),
            ("download", b.download(&t).map(drop)),
            ("softmax", b.softmax(&t).map(drop)),
            (
                "matmul of a split x",
                b.matmul(&t, &up(b, &[3, d], &[0.5; 3 * 64])).map(drop),
            ),
            (
                "reshaped rows",
                b.matmul(
                    &up(b, &[1, 2 * d], &[0.5; 128]),
                    &t.reshape(&[rows / 2, 2 * d]).unwrap(),
                )
                .map(drop),
            ),
        ] {
            assert!(
                matches!(r, Err(KernelError::Unsupported(_))),
                "{name}: {op} of a split tensor: {r:?}"
            );
        }
        for shape in [vec![2, 2048], vec![4096]] {
            let r = b.upload(&HostTensor::from_f32(shape.clone(), &vec![0.0; 4096]));
            assert!(
                matches!(r, Err(KernelError::Unsupported(_))),
                "{name}: upload {shape:?} over the part size: {r:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Row-wise and elementwise ops

#[test]
fn rowwise_and_elementwise_ops() {
    let mut rng = Rng(99);
    for &(rows, d) in &[(1, 1), (3, 17), (17, 257), (257, 64), (3, 4096)] {
        let x = rng.vec(rows * d);
        let y = rng.vec(rows * d);
        let w = rng.vec(d);
        for (name, b) in backends() {
            let (tx, ty) = (up(b, &[rows, d], &x), up(b, &[rows, d], &y));
            let tw = up(b, &[d], &w);
            let what = |op: &str| format!("{name} {op} [{rows}, {d}]");
            let got = b.download(&b.rms_norm(&tx, &tw, 1e-5).unwrap()).unwrap();
            let want = reference::rms_norm(&x, &w, 1e-5).unwrap();
            assert_close(&what("rms_norm"), &got, &want, 1e-4);
            let got = b.download(&b.softmax(&tx).unwrap()).unwrap();
            let want = reference::softmax(&x, d).unwrap();
            assert_close(&what("softmax"), &got, &want, 1e-4);
            let got = b.download(&b.add(&tx, &ty).unwrap()).unwrap();
            assert_close(&what("add"), &got, &reference::add(&x, &y).unwrap(), 1e-6);
            for act in [GluAct::Silu, GluAct::GeluTanh] {
                let got = b.download(&b.glu(&tx, &ty, act).unwrap()).unwrap();
                let want = reference::glu(&x, &y, act).unwrap();
                assert_close(&what(&format!("glu {act:?}")), &got, &want, 1e-5);
            }
            let got = b.download(&b.swiglu(&tx, &ty).unwrap()).unwrap();
            let want = reference::glu(&x, &y, GluAct::Silu).unwrap();
            assert_close(&what("swiglu"), &got, &want, 1e-5);
            assert_eq!(
                b.argmax(&tx).unwrap(),
                reference::argmax(&x, d).unwrap(),
                "{}",
                what("argmax")
            );
        }
    }
    for (name, b) in backends() {
        let a = up(b, &[2, 3], &[0.0; 6]);
        let c = up(b, &[3, 2], &[0.0; 6]);
        assert!(
            matches!(b.add(&a, &c), Err(KernelError::Shape(_))),
            "{name}"
        );
        assert!(b.glu(&a, &c, GluAct::GeluTanh).is_err(), "{name}");
    }
}

/// Per-head RMSNorm (Gemma 3's QK-norm): `[n, heads, head_dim]` seen as `[n·heads, head_dim]`
/// rows, one weight of `head_dim` shared by every head.
#[test]
fn per_head_rms_norm() {
    let mut rng = Rng(0x9e4d);
    for &(n, heads, hd) in &[(1, 1, 8), (3, 4, 256), (17, 1, 256), (5, 3, 33)] {
        let x = rng.vec(n * heads * hd);
        let w = rng.vec(hd);
        let want = reference::rms_norm(&x, &w, 1e-6).unwrap();
        for (name, b) in backends() {
            let t = up(b, &[n, heads, hd], &x)
                .reshape(&[n * heads, hd])
                .unwrap();
            let got = b
                .rms_norm(&t, &up(b, &[hd], &w), 1e-6)
                .unwrap()
                .reshape(&[n, heads, hd])
                .unwrap();
            assert_close(
                &format!("{name} per-head rms_norm {n}x{heads}x{hd}"),
                &b.download(&got).unwrap(),
                &want,
                1e-4,
            );
        }
    }
}

#[test]
fn argmax_takes_lowest_index_on_ties_and_skips_nans() {
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
    assert_eq!(want[1], 10);
    for (name, b) in backends() {
        assert_eq!(b.argmax(&up(b, &[rows, d], &x)).unwrap(), want, "{name}");
        let small = up(b, &[2, 4], &[1.0, 5.0, 5.0, 0.0, -1.0, -1.0, -1.0, -1.0]);
        assert_eq!(b.argmax(&small).unwrap(), vec![1, 0], "{name}");
        let nans = up(b, &[2, 2], &[f32::NAN, 2.0, f32::NAN, f32::NAN]);
        assert_eq!(b.argmax(&nans).unwrap(), vec![1, 0], "{name}");
    }
}

#[test]
fn rope_both_styles_and_long_positions() {
    let mut rng = Rng(11);
    let cases: [(usize, usize, usize, Vec<u32>); 5] = [
        (1, 1, 2, vec![5]),
        (3, 3, 8, vec![3, 10, 17]),
        (17, 2, 64, (0..17).map(|i| i * 37 + 5).collect()),
        (2, 4, 256, vec![0, 511]),
        (4, 2, 64, vec![4095, 32_767, 131_071, 1_000_003]),
    ];
    for (n, heads, hd, pos) in &cases {
        let x = rng.vec(n * heads * hd);
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            for base in [10000.0f32, 1e6, 100.0] {
                let want = reference::rope(&x, *heads, *hd, pos, base, style).unwrap();
                for (name, b) in backends() {
                    let got = b
                        .rope(&up(b, &[*n, *heads, *hd], &x), pos, base, style)
                        .unwrap();
                    assert_close(
                        &format!("{name} rope {style:?} {n}x{heads}x{hd} base {base}"),
                        &b.download(&got).unwrap(),
                        &want,
                        1e-4,
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Paged KV and attention

fn widen<T: KvElem>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// [`attention_case_in`] with f32 pools and with f16 pools.
fn attention_case(rng: &mut Rng, p: AttnParams, block_size: usize, seq_lens: &[(usize, usize)]) {
    attention_case_in::<f32>(rng, p, block_size, seq_lens);
    attention_case_in::<f16>(rng, p, block_size, seq_lens);
}

/// Fill a paged pool of `T` for several sequences with random K/V through `kv_write` (prefix and
/// new tokens in two calls, as an engine does), check the pool against the reference writer (bit
/// for bit), then compare attention against the reference, on every backend.
fn attention_case_in<T: KvElem>(
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
    let writes: Vec<(Vec<u32>, Vec<f32>, Vec<f32>)> = tables
        .iter()
        .zip(seq_lens)
        .flat_map(|(t, &(past, new))| {
            let n = past + new;
            let slot =
                |pos: usize| t[pos / block_size] * block_size as u32 + (pos % block_size) as u32;
            let (k, v) = (rng.vec(n * row), rng.vec(n * row));
            [0..past, past..n]
                .into_iter()
                .filter(|r| !r.is_empty())
                .map(|r| {
                    (
                        r.clone().map(slot).collect(),
                        k[r.start * row..r.end * row].to_vec(),
                        v[r.start * row..r.end * row].to_vec(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mut host_k = vec![T::default(); n_blocks * block_size * row];
    let mut host_v = host_k.clone();
    for (slots, k, v) in &writes {
        reference::kv_write(&mut host_k, &mut host_v, k, v, row, slots).unwrap();
    }
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
    let pool_shape = [n_blocks, block_size, p.n_kv_heads, p.head_dim];
    for (name, b) in attention_backends() {
        let (kp, vp) = (
            b.zeros_dtype(&pool_shape, T::DTYPE).unwrap(),
            b.zeros_dtype(&pool_shape, T::DTYPE).unwrap(),
        );
        for (slots, k, v) in &writes {
            let n = slots.len();
            let shape = [n, p.n_kv_heads, p.head_dim];
            b.kv_write(&kp, &vp, &up(b, &shape, k), &up(b, &shape, v), slots)
                .unwrap();
        }
        let what = format!("{name} {:?}", T::DTYPE);
        assert_eq!(b.download(&kp).unwrap(), widen(&host_k), "{what} k pool");
        assert_eq!(b.download(&vp).unwrap(), widen(&host_v), "{what} v pool");
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
        let what = format!("{what} attention {p:?} bs {block_size} seqs {seq_lens:?}");
        assert_close(&what, &b.download(&got).unwrap(), &want, 1e-4);
    }
}

#[test]
fn attention_gqa_windows_blocks_multi_sequence() {
    let mut rng = Rng(0xa77e);
    // (n_heads, n_kv_heads, head_dim, block_size, window); the last is Gemma 3 270M's shape.
    let cases = [
        (1, 1, 8, 1, None),
        (3, 1, 16, 4, None),
        (9, 3, 64, 16, Some(5)),
        (8, 8, 4, 3, None),
        (6, 2, 64, 32, Some(40)),
        (4, 1, 256, 16, Some(7)),
    ];
    for &(nh, nkv, hd, bs, window) in &cases {
        let p = attn_params(nh, nkv, hd, window);
        // Prefill from scratch, prefill after a cached prefix, decode steps, in one call.
        attention_case(
            &mut rng,
            p,
            bs,
            &[(0, 17), (33, 3), (70, 1), (0, 1), (20, 13)],
        );
    }
}

/// Attention of `nh` query heads over `nkv` KV heads of `hd` dims, the usual `1/sqrt(hd)` scale.
fn attn_params(nh: usize, nkv: usize, hd: usize, window: Option<usize>) -> AttnParams {
    AttnParams {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        window,
    }
}

/// Shapes at the edges of the texture kernel's tiles: rows that are not a multiple of a row tile
/// (new tokens × GQA group), keys not a multiple of a key tile, head_dim not a multiple of 32 (or
/// of 4), GQA group 4 at head_dim 64 and 256, windows shorter and longer than a key tile, and a
/// decode batch of sequences with different prefixes.
#[test]
fn attention_odd_tiles_gqa4_head_dims() {
    let mut rng = Rng(0x7113);
    // (n_heads, n_kv_heads, head_dim, block_size, window)
    let cases = [
        (8, 2, 64, 16, None),
        (4, 1, 256, 16, None),
        (4, 1, 256, 8, Some(19)),
        (6, 3, 40, 5, Some(3)),
        (5, 5, 6, 7, None),
        (2, 1, 132, 16, Some(70)),
        // Three 16-lane columns per head, 3 vectors per row (the AVX-512 tile remainders).
        (3, 1, 48, 16, Some(150)),
    ];
    for &(nh, nkv, hd, bs, window) in &cases {
        let p = attn_params(nh, nkv, hd, window);
        attention_case(&mut rng, p, bs, &[(0, 37), (100, 5), (9, 1), (257, 2)]);
        let decode: Vec<(usize, usize)> = (0..16).map(|i| (i * 29 % 113, 1)).collect();
        attention_case(&mut rng, p, bs, &decode);
    }
}

/// Long contexts: query chunks larger than one cpu task and decode over many keys (split key
/// ranges), with and without a window.
#[test]
fn attention_long_prefill_and_split_key_decode() {
    let mut rng = Rng(0x1009);
    let p = AttnParams {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        scale: 0.125,
        window: None,
    };
    attention_case(&mut rng, p, 16, &[(1000, 1)]);
    attention_case(&mut rng, p, 32, &[(257, 70), (1500, 1), (3, 1)]);
    let pw = AttnParams {
        window: Some(300),
        ..p
    };
    attention_case(&mut rng, pw, 32, &[(1200, 1), (0, 257)]);
}

#[test]
fn kv_write_repeated_slot_keeps_the_last_row() {
    let kv: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let mut host_k = vec![0.0f32; 2 * 4 * 8];
    let mut host_v = host_k.clone();
    reference::kv_write(&mut host_k, &mut host_v, &kv, &kv, 8, &[5, 5]).unwrap();
    for (name, b) in backends() {
        let kp = b.zeros(&[2, 4, 1, 8]).unwrap();
        let vp = b.zeros(&[2, 4, 1, 8]).unwrap();
        let k2 = up(b, &[2, 1, 8], &kv);
        b.kv_write(&kp, &vp, &k2, &k2, &[5, 5]).unwrap();
        assert_eq!(b.download(&kp).unwrap(), host_k, "{name}");
        assert_eq!(b.download(&vp).unwrap(), host_v, "{name}");
    }
}

/// F16 pools: `scatter_blocks` rounds bit for bit like the reference (ties to even, overflow to
/// inf, subnormals), `gather_blocks` widens exactly, gathered values re-import unchanged; mixed
/// pool dtypes, quantized pools and f16 `write` are refused; a repeated slot keeps the last row.
#[test]
fn gather_scatter_f16_pools_round_trip_exactly() {
    for (name, b) in backends() {
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
        let kp = b.zeros_dtype(&[2, 4, 1, 8], DType::F16).unwrap();
        let vf32 = b.zeros(&[2, 4, 1, 8]).unwrap();
        let k = up(b, &[1, 1, 8], &[0.5; 8]);
        assert!(b.kv_write(&kp, &vf32, &k, &k, &[0]).is_err(), "{name}");
        assert!(b.zeros_dtype(&[2, 32], DType::Q8_0).is_err(), "{name}");
        assert!(b.write(&kp, &[0.0; 64]).is_err(), "{name}");
        let vp = b.zeros_dtype(&[2, 4, 1, 8], DType::F16).unwrap();
        let kv: Vec<f32> = (0..16).map(|i| i as f32 * 0.3).collect();
        let k2 = up(b, &[2, 1, 8], &kv);
        b.kv_write(&kp, &vp, &k2, &k2, &[5, 5]).unwrap();
        let mut host_k = vec![f16::ZERO; 2 * 4 * 8];
        let mut host_v = host_k.clone();
        reference::kv_write(&mut host_k, &mut host_v, &kv, &kv, 8, &[5, 5]).unwrap();
        assert_eq!(b.download(&kp).unwrap(), widen(&host_k), "{name}");
    }
}

#[test]
fn gather_scatter_and_write_round_trip() {
    let mut rng = Rng(11);
    let shape = [6, 16, 3, 8];
    let block = 16 * 3 * 8;
    let init = rng.vec(6 * block);
    let data = rng.vec(2 * block);
    let fresh = rng.vec(6 * block);
    let mut expect = init.clone();
    reference::scatter_blocks(&mut expect, block, &[1, 3], &data).unwrap();
    for (name, b) in backends() {
        let pool = up(b, &shape, &init);
        let got = b.gather_blocks(&pool, &[4, 0, 5]).unwrap();
        assert_eq!(
            got,
            reference::gather_blocks(&init, block, &[4, 0, 5]).unwrap(),
            "{name}"
        );
        b.scatter_blocks(&pool, &[1, 3], &data).unwrap();
        assert_eq!(b.download(&pool).unwrap(), expect, "{name}");
        // `write` stays ordered after already-recorded reads of the old contents, and a clone of
        // the handle sees it (shared storage, as the engine relies on).
        let before = b.add(&pool, &pool).unwrap();
        let alias = pool.clone();
        b.write(&pool, &fresh).unwrap();
        let doubled: Vec<f32> = expect.iter().map(|v| v + v).collect();
        assert_eq!(b.download(&before).unwrap(), doubled, "{name}");
        assert_eq!(b.download(&alias).unwrap(), fresh, "{name}");
    }
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    for (name, b) in backends() {
        let x = up(b, &[2, 4], &[0.0; 8]);
        let w = up(b, &[3, 5], &[0.0; 15]);
        assert!(
            matches!(b.matmul(&x, &w), Err(KernelError::Shape(_))),
            "{name}"
        );
        for (dtype, len) in [(DType::Q8_0, 33), (DType::Q4_K, 143), (DType::Q6_K, 211)] {
            let bad = HostTensor {
                dtype,
                shape: vec![1, dtype.block_len()],
                bytes: vec![0; len],
            };
            assert!(
                matches!(b.upload(&bad), Err(KernelError::Shape(_))),
                "{name} {dtype:?}"
            );
        }
        let q = up_bytes(b, DType::Q4_1, &[1, 32], vec![0; 20]);
        assert!(
            b.download(&q).is_err(),
            "{name}: download of a quantized tensor"
        );
        let pool = b.zeros(&[2, 16, 1, 4]).unwrap();
        assert!(b.gather_blocks(&pool, &[2]).is_err(), "{name}");
        assert!(b.scatter_blocks(&pool, &[0], &[0.0; 3]).is_err(), "{name}");
        assert!(b.write(&pool, &[0.0; 3]).is_err(), "{name}");
        let k = up(b, &[1, 1, 4], &[0.0; 4]);
        assert!(
            b.kv_write(&pool, &pool, &k, &k, &[0]).is_err(),
            "{name}: same pool for k and v"
        );
        let vpool = b.zeros(&[2, 16, 1, 4]).unwrap();
        assert!(
            b.kv_write(&pool, &vpool, &k, &k, &[32]).is_err(),
            "{name}: slot out of range"
        );
        let p = AttnParams {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            scale: 0.5,
            window: None,
        };
        let qt = up(b, &[1, 2, 4], &[0.0; 8]);
        let short = [0u32];
        let seqs = [AttnSeq {
            block_table: &short,
            n_past: 20,
            n_new: 1,
        }];
        assert!(
            b.attention(&qt, &pool, &vpool, &seqs, &p).is_err(),
            "{name}: block table too short"
        );
        let bad = [7u32, 0];
        let seqs = [AttnSeq {
            block_table: &bad,
            n_past: 20,
            n_new: 1,
        }];
        assert!(
            b.attention(&qt, &pool, &vpool, &seqs, &p).is_err(),
            "{name}: block index out of range"
        );
        let gqa = AttnParams {
            n_heads: 3,
            n_kv_heads: 2,
            ..p
        };
        assert!(
            b.attention(&qt, &pool, &vpool, &seqs[..0], &gqa).is_err(),
            "{name}: heads not a multiple of kv heads"
        );
    }
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

impl LinInputs {
    fn new(rng: &mut Rng, n: usize, p: &LinearAttnParams) -> Self {
        let (h, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
        let l2 = |mut v: Vec<f32>| {
            for r in v.chunks_exact_mut(dk) {
                let s = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
                r.iter_mut().for_each(|x| *x /= s);
            }
            v
        };
        Self {
            q: l2(rng.vec(n * h * dk)),
            k: l2(rng.vec(n * h * dk)),
            v: rng.vec(n * h * dv),
            beta: (0..n * h)
                .map(|_| 0.05 + 0.45 * (rng.next() + 1.0))
                .collect(),
            g: (0..n * h).map(|_| -0.5 * (rng.next() + 1.0)).collect(),
        }
    }

    /// Tokens `a..z`.
    fn slice(&self, a: usize, z: usize, p: &LinearAttnParams) -> Self {
        let (h, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
        Self {
            q: self.q[a * h * dk..z * h * dk].to_vec(),
            k: self.k[a * h * dk..z * h * dk].to_vec(),
            v: self.v[a * h * dv..z * h * dv].to_vec(),
            beta: self.beta[a * h..z * h].to_vec(),
            g: self.g[a * h..z * h].to_vec(),
        }
    }

    fn run(&self, b: &dyn Backend, state: &Tensor, p: &LinearAttnParams) -> Vec<f32> {
        let n = self.beta.len() / p.n_heads;
        let (h, dk, dv) = (p.n_heads, p.key_dim, p.value_dim);
        let out = b
            .linear_attention(
                &up(b, &[n, h, dk], &self.q),
                &up(b, &[n, h, dk], &self.k),
                &up(b, &[n, h, dv], &self.v),
                &up(b, &[n, h], &self.beta),
                &up(b, &[n, h], &self.g),
                state,
                p,
            )
            .unwrap();
        assert_eq!(out.shape(), &[n, h * dv]);
        b.download(&out).unwrap()
    }
}

#[test]
fn linear_attention_chunked_equals_step_and_reference() {
    let mut rng = Rng(0xde17a);
    for &(h, dk, dv, n) in &[
        (1, 4, 3, 1),
        (3, 16, 24, 100),
        (2, 64, 32, 130),
        (3, 8, 70, 33),
    ] {
        let base = LinearAttnParams {
            n_heads: h,
            key_dim: dk,
            value_dim: dv,
            scale: 1.0 / (dk as f32).sqrt(),
            chunk: 1,
        };
        let inp = LinInputs::new(&mut rng, n, &base);
        let init: Vec<f32> = rng.vec(h * dv * dk).iter().map(|x| 0.1 * x).collect();
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
        for (name, b) in backends() {
            for chunk in [1, 7, 64] {
                let p = LinearAttnParams { chunk, ..base };
                let state = up(b, &[h, dv, dk], &init);
                let got = inp.run(b, &state, &p);
                let what = format!("{name} linear attention h{h} dk{dk} dv{dv} n{n} chunk {chunk}");
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
}

#[test]
fn linear_attention_state_carries_across_calls() {
    let mut rng = Rng(0x57a7e);
    let p = LinearAttnParams {
        n_heads: 2,
        key_dim: 32,
        value_dim: 16,
        scale: 0.2,
        chunk: 16,
    };
    let n = 75;
    let inp = LinInputs::new(&mut rng, n, &p);
    for (name, b) in backends() {
        let whole_state = b.zeros(&[2, 16, 32]).unwrap();
        let whole = inp.run(b, &whole_state, &p);
        // Prefill 40 tokens (chunked), then one decode step, then the rest.
        let state = b.zeros(&[2, 16, 32]).unwrap();
        let mut parts = inp.slice(0, 40, &p).run(b, &state, &p);
        parts.extend(inp.slice(40, 41, &p).run(b, &state, &p));
        parts.extend(inp.slice(41, n, &p).run(b, &state, &p));
        assert_close(&format!("{name} split outputs"), &parts, &whole, 1e-4);
        assert_close(
            &format!("{name} split state"),
            &b.download(&state).unwrap(),
            &b.download(&whole_state).unwrap(),
            1e-4,
        );
    }
}
