//! The wgpu backend's own machinery: texture folding of tall weights, submissions per step, ops
//! from several threads, the `auto` backend rule. What every backend must compute alike is in
//! `conformance.rs`.
//!
//! Needs a wgpu adapter (lavapipe in CI). Without one the tests print a loud SKIPPED line and
//! return, unless `PRFAAS_REQUIRE_GPU=1`, in which case they fail.

use std::sync::OnceLock;

use prfaas_kernels::gpu::{MatmulPath, WgpuBackend};
use prfaas_kernels::{
    gpu_required, quant, reference, AttnParams, AttnSeq, Backend, DType, HostTensor, KernelError,
    RopeStyle,
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
