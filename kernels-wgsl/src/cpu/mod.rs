//! Native CPU backend: multi-threaded (rayon) kernels on host memory.
//!
//! * matmul: the `gemm` crate for f32 and for many-row products with quantized weights
//!   (dequantized panel by panel), quantized dot products decoded on the fly for decode mat-vecs;
//! * attention: flash-style online softmax over the paged pool, parallel over (sequence, KV head,
//!   query chunk, key range);
//! * linear attention: exact chunked gated delta rule for prefill, step form for decode;
//! * everything else: row-parallel loops once a tensor is big enough to pay for the fork.
//!
//! Hot loops are compiled for AVX-512 / AVX2+FMA / baseline and picked at run time (see
//! [`simd`]), because the workspace builds for the portable x86-64 baseline.

mod attention;
mod linear;
pub(crate) mod matmul;
mod q8act;
#[cfg(target_arch = "x86_64")]
mod q8amx;
mod qmatvec;
pub(crate) mod simd;

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::f16;
use rayon::prelude::*;

use crate::backend::{
    AttnParams, AttnSeq, Backend, BackendInfo, BackendKind, DType, GluAct, HostTensor, KernelError,
    LinearAttnParams, Result, RopeStyle, Storage, Tensor,
};
use crate::kv::{is_kv_dtype, KvElem};
use crate::{quant, reference};
pub(crate) use attention::KvRows;

/// Activations of small-batch quantized matmuls, from `PRFAAS_CPU_DECODE` (read once):
/// `q8x2` (default: two 8-bit planes, ~15 bits), `q8x1` (one plane, llama.cpp's precision) or
/// `f32` (the older f32-activation kernels). For A/B benchmarks of the same build.
fn decode_planes() -> Option<q8act::Planes> {
    static MODE: std::sync::OnceLock<Option<q8act::Planes>> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("PRFAAS_CPU_DECODE").as_deref() {
        Ok("f32") => None,
        Ok("q8x1") => Some(q8act::Planes::One),
        Ok("q8x2") | Err(_) => Some(q8act::DEFAULT_PLANES),
        Ok(other) => {
            tracing::warn!("PRFAAS_CPU_DECODE={other} is not f32, q8x1 or q8x2: using q8x2");
            Some(q8act::DEFAULT_PLANES)
        }
    })
}

/// Elements from which an elementwise or row-wise op is split over rayon.
const PAR_MIN_ELEMS: usize = 1 << 14;

/// Host memory behind a CPU tensor.
///
/// Behind a lock because `kv_write`, `linear_attention`, `scatter_blocks` and `write` mutate
/// tensors through shared `&Tensor` handles (KV pools and recurrent state are long-lived and shared
/// by clones of the handle). F32 data is kept as `f32` so it is always aligned.
pub struct CpuStorage {
    pub(crate) data: RwLock<CpuData>,
    /// Q4_1/Q8_0 `[n, k]` weights repacked for the 8-bit-activation decode kernels (built at
    /// upload when this CPU runs them; the GGUF bytes in `data` stay for the prefill and
    /// embedding paths). Weights are never written after upload, so no lock.
    pub(crate) packed: Option<q8act::PackedWeight>,
}

/// Contents of a [`CpuStorage`].
pub(crate) enum CpuData {
    /// `F32` tensors.
    F32(Vec<f32>),
    /// `F16` tensors (weights and KV pools), as `f16` so that they are always aligned.
    F16(Vec<f16>),
    /// Every other dtype, as stored (GGUF byte layout).
    Raw(Vec<u8>),
}

impl CpuData {
    /// The stored bytes of a non-`F32` tensor (GGUF layout; `F16` is little-endian pairs).
    fn bytes(&self) -> &[u8] {
        match self {
            CpuData::F32(v) => bytemuck::cast_slice(v),
            CpuData::F16(v) => bytemuck::cast_slice(v),
            CpuData::Raw(b) => b,
        }
    }
}

/// Read access to the `f32` contents of a tensor (checked to be `F32` when created).
struct F32Read<'a>(RwLockReadGuard<'a, CpuData>);

impl std::ops::Deref for F32Read<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.0 {
            CpuData::F32(v) => v,
            _ => &[],
        }
    }
}

/// Write access to the `f32` contents of a tensor.
struct F32Write<'a>(RwLockWriteGuard<'a, CpuData>);

impl F32Write<'_> {
    fn slice(&mut self) -> &mut [f32] {
        match &mut *self.0 {
            CpuData::F32(v) => v,
            _ => &mut [],
        }
    }
}

fn poisoned<T>(_: T) -> KernelError {
    KernelError::Device("cpu tensor lock poisoned by a panicked kernel".into())
}

fn storage(t: &Tensor) -> Result<&Arc<CpuStorage>> {
    match &t.storage {
        Storage::Cpu(s) => Ok(s),
        _ => Err(KernelError::WrongBackend("wgpu")),
    }
}

fn read_f32<'a>(t: &'a Tensor, what: &str) -> Result<F32Read<'a>> {
    if t.dtype != DType::F32 {
        return Err(KernelError::Unsupported(format!(
            "{what}: expected an F32 tensor, got {:?}",
            t.dtype
        )));
    }
    Ok(F32Read(storage(t)?.data.read().map_err(poisoned)?))
}

fn write_f32<'a>(t: &'a Tensor, what: &str) -> Result<F32Write<'a>> {
    if t.dtype != DType::F32 {
        return Err(KernelError::Unsupported(format!(
            "{what}: expected an F32 tensor, got {:?}",
            t.dtype
        )));
    }
    Ok(F32Write(storage(t)?.data.write().map_err(poisoned)?))
}

/// Read access to a KV pool (`F32` or `F16`).
struct PoolRead<'a>(RwLockReadGuard<'a, CpuData>);

impl PoolRead<'_> {
    fn rows(&self) -> KvRows<'_> {
        match &*self.0 {
            CpuData::F16(v) => KvRows::F16(v),
            CpuData::F32(v) => KvRows::F32(v),
            // `read_pool` checked the dtype.
            CpuData::Raw(_) => KvRows::F32(&[]),
        }
    }
}

fn check_pool_dtype(t: &Tensor, what: &str) -> Result<()> {
    if !is_kv_dtype(t.dtype) {
        return Err(KernelError::Unsupported(format!(
            "{what}: KV pools are F32 or F16, got {:?}",
            t.dtype
        )));
    }
    Ok(())
}

fn read_pool<'a>(t: &'a Tensor, what: &str) -> Result<PoolRead<'a>> {
    check_pool_dtype(t, what)?;
    Ok(PoolRead(storage(t)?.data.read().map_err(poisoned)?))
}

fn write_pool<'a>(t: &'a Tensor, what: &str) -> Result<RwLockWriteGuard<'a, CpuData>> {
    check_pool_dtype(t, what)?;
    storage(t)?.data.write().map_err(poisoned)
}

/// Runs `f` on a locked pool's values, typed as what they are.
macro_rules! with_pool_mut {
    ($guard:expr, |$p:ident| $body:expr) => {
        match &mut *$guard {
            CpuData::F32($p) => $body,
            CpuData::F16($p) => $body,
            CpuData::Raw(_) => Err(KernelError::Unsupported("raw-byte KV pool".into())),
        }
    };
}

/// Writes rows `src[i]` (`row` values each) to slots `slots[i]` of `pool`, converting.
/// The reference writes one value at a time; this converts whole rows (vectorised).
fn write_rows<T: KvElem>(pool: &mut [T], src: &[f32], row: usize, slots: &[u32]) {
    for (&s, r) in slots.iter().zip(src.chunks_exact(row.max(1))) {
        T::slice_from_f32(&mut pool[s as usize * row..][..row], r);
    }
}

fn gather_rows<T: KvElem>(pool: &[T], block: usize, indices: &[u32]) -> Result<Vec<f32>> {
    reference::check_blocks("gather_blocks", pool.len(), block, indices)?;
    let mut out = vec![0.0f32; indices.len() * block];
    for (&b, o) in indices.iter().zip(out.chunks_exact_mut(block.max(1))) {
        T::slice_to_f32(&pool[b as usize * block..][..block], o);
    }
    Ok(out)
}

fn scatter_rows<T: KvElem>(
    pool: &mut [T],
    block: usize,
    indices: &[u32],
    data: &[f32],
) -> Result<()> {
    reference::check_blocks("scatter_blocks", pool.len(), block, indices)?;
    if data.len() != indices.len() * block {
        return Err(KernelError::Shape(format!(
            "scatter_blocks: {} values for {} blocks of {block}",
            data.len(),
            indices.len()
        )));
    }
    write_rows(pool, data, block, indices);
    Ok(())
}

fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    match (&a.storage, &b.storage) {
        (Storage::Cpu(x), Storage::Cpu(y)) => Arc::ptr_eq(x, y),
        _ => false,
    }
}

/// The repacked form of weight `w` when a product of `m` rows of width `k` with it takes the
/// 8-bit-activation path: small batches on CPUs with the VNNI kernel, every product on CPUs with
/// AMX tiles (whose integer products beat dequantizing to f32 for `gemm` at any `m`).
fn packed_for(w: &Tensor, m: usize, k: usize) -> Option<&q8act::PackedWeight> {
    let p = storage(w).ok()?.packed.as_ref()?;
    let rows_ok = m <= matmul::QMATVEC_MAX_ROWS || q8act::Kernel::best().has_amx();
    (rows_ok && w.shape[..] == [p.n(), k] && p.k() == k).then_some(p)
}

/// The shape of `x · wᵀ`: `x`'s shape with its last dimension set to `n`.
fn product_shape(x: &Tensor, n: usize) -> Vec<usize> {
    let mut shape = x.shape.clone();
    if let Some(l) = shape.last_mut() {
        *l = n;
    }
    shape
}

fn f32_tensor(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
    debug_assert_eq!(shape.iter().product::<usize>(), data.len());
    Tensor {
        shape,
        dtype: DType::F32,
        storage: Storage::Cpu(Arc::new(CpuStorage {
            data: RwLock::new(CpuData::F32(data)),
            packed: None,
        })),
    }
}

fn last_dim(t: &Tensor, what: &str) -> Result<usize> {
    match t.shape.last() {
        Some(&d) if d > 0 => Ok(d),
        _ => Err(KernelError::Shape(format!(
            "{what}: tensor of shape {:?} has no rows",
            t.shape
        ))),
    }
}

fn same_shape(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    if a.shape != b.shape {
        return Err(KernelError::Shape(format!(
            "{what}: shapes {:?} and {:?} differ",
            a.shape, b.shape
        )));
    }
    Ok(())
}

/// Apply `f` to corresponding rows of `x` and `out` (length `d`), in parallel when large.
fn map_rows(x: &[f32], out: &mut [f32], d: usize, f: impl Fn(&[f32], &mut [f32]) + Sync + Send) {
    if x.len() >= PAR_MIN_ELEMS {
        let rows_per_task = (PAR_MIN_ELEMS / 4 / d).max(1);
        out.par_chunks_mut(d * rows_per_task)
            .zip(x.par_chunks(d * rows_per_task))
            .for_each(|(o, x)| {
                o.chunks_exact_mut(d)
                    .zip(x.chunks_exact(d))
                    .for_each(|(o, x)| f(x, o))
            });
    } else {
        out.chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .for_each(|(o, x)| f(x, o));
    }
}

/// Elementwise `out[i] = f(a[i], b[i])`, in parallel when large.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    let mut out = vec![0.0f32; a.len()];
    let body = |(o, (a, b)): (&mut [f32], (&[f32], &[f32]))| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    };
    if a.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(PAR_MIN_ELEMS / 4)
            .zip(
                a.par_chunks(PAR_MIN_ELEMS / 4)
                    .zip(b.par_chunks(PAR_MIN_ELEMS / 4)),
            )
            .for_each(body);
    } else {
        body((&mut out, (a, b)));
    }
    out
}

/// The native CPU backend. Uses rayon's global thread pool (size it with `RAYON_NUM_THREADS`).
#[derive(Debug, Default, Clone)]
pub struct CpuBackend {
    _private: (),
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Which SIMD instruction set the hot loops run with on this machine.
    pub fn simd_level() -> &'static str {
        match (simd::Isa::get(), q8act::Kernel::best()) {
            (_, k) if k.has_amx() => "avx512+vnni+amx",
            (simd::Isa::Avx512, q8act::Kernel::Scalar) => "avx512",
            (simd::Isa::Avx512, _) => "avx512+vnni",
            (simd::Isa::Avx2, _) => "avx2+fma",
            (simd::Isa::Generic, _) => "baseline",
        }
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Cpu,
            description: format!(
                "cpu ({} threads, {})",
                rayon::current_num_threads(),
                Self::simd_level()
            ),
            software: false,
        }
    }

    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let numel = host.numel();
        if !numel.is_multiple_of(host.dtype.block_len())
            || host.bytes.len() != host.dtype.bytes_for(numel)
        {
            return Err(KernelError::Shape(format!(
                "{:?} tensor {:?} needs {} bytes, got {}",
                host.dtype,
                host.shape,
                host.dtype.bytes_for(numel - numel % host.dtype.block_len()),
                host.bytes.len()
            )));
        }
        let data = match host.dtype {
            DType::F32 => CpuData::F32(quant::dequantize(DType::F32, &host.bytes, numel)?),
            DType::F16 => CpuData::F16(bytemuck::pod_collect_to_vec(&host.bytes)),
            _ => CpuData::Raw(host.bytes.clone()),
        };
        let packed = match host.shape[..] {
            // Q6_K has a packed form for the AMX kernel only.
            [n, k]
                if q8act::Kernel::best() != q8act::Kernel::Scalar
                    && (host.dtype != DType::Q6_K || q8act::Kernel::best().has_amx()) =>
            {
                q8act::PackedWeight::pack(host.dtype, &host.bytes, n, k)
            }
            _ => None,
        };
        Ok(Tensor {
            shape: host.shape.clone(),
            dtype: host.dtype,
            storage: Storage::Cpu(Arc::new(CpuStorage {
                data: RwLock::new(data),
                packed,
            })),
        })
    }

    fn download(&self, t: &Tensor) -> Result<Vec<f32>> {
        if t.dtype == DType::F16 {
            let guard = storage(t)?.data.read().map_err(poisoned)?;
            if let CpuData::F16(v) = &*guard {
                let mut out = vec![0.0f32; v.len()];
                f16::slice_to_f32(v, &mut out);
                return Ok(out);
            }
        }
        Ok(read_f32(t, "download")?.to_vec())
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(f32_tensor(
            shape.to_vec(),
            vec![0.0; shape.iter().product()],
        ))
    }

    fn zeros_dtype(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n = shape.iter().product();
        let data = match dtype {
            DType::F32 => CpuData::F32(vec![0.0; n]),
            DType::F16 => CpuData::F16(vec![f16::ZERO; n]),
            other => {
                return Err(KernelError::Unsupported(format!(
                    "zero-filled {other:?} tensors"
                )))
            }
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Cpu(Arc::new(CpuStorage {
                data: RwLock::new(data),
                packed: None,
            })),
        })
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn run(&self, f: &mut (dyn FnMut() + Send)) {
        // `scope` runs its closure on a pool worker (in place when already on one), so the
        // ops inside `f` fork their work without a hand-over per op.
        rayon::scope(|_| f());
    }

    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let [vocab, d] = table.shape[..] else {
            return Err(KernelError::Shape(format!(
                "embedding: table shape {:?} is not [vocab, d]",
                table.shape
            )));
        };
        let guard = storage(table)?.data.read().map_err(poisoned)?;
        let out = reference::embedding(table.dtype, guard.bytes(), vocab, d, ids)?;
        Ok(f32_tensor(vec![ids.len(), d], out))
    }

    fn matmul(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let [n, k] = w.shape[..] else {
            return Err(KernelError::Shape(format!(
                "matmul: weight shape {:?} is not [n, k]",
                w.shape
            )));
        };
        if x.shape.last() != Some(&k) {
            return Err(KernelError::Shape(format!(
                "matmul: x {:?} · w {:?}ᵀ: inner dims differ",
                x.shape, w.shape
            )));
        }
        let m = x.numel() / k.max(1);
        let xs = read_f32(x, "matmul x")?;
        let ws = storage(w)?;
        let guard = ws.data.read().map_err(poisoned)?;
        let packed = packed_for(w, m, k).zip(decode_planes());
        let out = match (&*guard, packed) {
            (_, Some((pw, planes))) => {
                let mut out = vec![0.0f32; m * n];
                q8act::matmul(&xs, m, pw, &mut out, planes, q8act::Kernel::best());
                out
            }
            (CpuData::F32(wf), None) => {
                let mut out = vec![0.0f32; m * n];
                matmul::gemm_f32(&xs, wf, &mut out, m, k, n, n);
                out
            }
            (data, None) => matmul::matmul(&xs, m, k, w.dtype, data.bytes(), n)?,
        };
        Ok(f32_tensor(product_shape(x, n), out))
    }

    fn matmul_many(&self, x: &Tensor, ws: &[&Tensor]) -> Result<Vec<Tensor>> {
        let k = x.shape.last().copied().unwrap_or(0);
        let m = x.numel() / k.max(1);
        // Only when every weight takes the 8-bit-activation path, as `matmul` would.
        let packed: Option<Vec<&q8act::PackedWeight>> =
            ws.iter().map(|w| packed_for(w, m, k)).collect();
        let (Some(packed), Some(planes)) = (packed, decode_planes()) else {
            return ws.iter().map(|w| self.matmul(x, w)).collect();
        };
        let xs = read_f32(x, "matmul x")?;
        let mut outs: Vec<Vec<f32>> = packed.iter().map(|p| vec![0.0f32; m * p.n()]).collect();
        let mut views: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
        q8act::matmul_many(&xs, m, &packed, &mut views, planes, q8act::Kernel::best());
        Ok(outs
            .into_iter()
            .zip(&packed)
            .map(|(o, p)| f32_tensor(product_shape(x, p.n()), o))
            .collect())
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let d = last_dim(x, "rms_norm")?;
        if w.shape != [d] {
            return Err(KernelError::Shape(format!(
                "rms_norm: weight {:?} for rows of {d}",
                w.shape
            )));
        }
        let (xs, ws) = (read_f32(x, "rms_norm x")?, read_f32(w, "rms_norm w")?);
        let mut out = vec![0.0f32; xs.len()];
        map_rows(&xs, &mut out, d, |x, o| {
            let ms = simd_sumsq(x) / d as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(ws.iter()) {
                *o = x * inv * w;
            }
        });
        Ok(f32_tensor(x.shape.clone(), out))
    }

    fn rope(&self, x: &Tensor, positions: &[u32], base: f32, style: RopeStyle) -> Result<Tensor> {
        let [n, heads, hd] = x.shape[..] else {
            return Err(KernelError::Shape(format!(
                "rope: x shape {:?} is not [n, heads, head_dim]",
                x.shape
            )));
        };
        if n != positions.len() || !hd.is_multiple_of(2) {
            return Err(KernelError::Shape(format!(
                "rope: {n} rows, {} positions, head_dim {hd} (must be even)",
                positions.len()
            )));
        }
        let xs = read_f32(x, "rope")?;
        let half = hd / 2;
        let mut out = vec![0.0f32; xs.len()];
        let row = heads * hd;
        // `base^(-2i/hd)` once per call (the same f64 values as `reference::rope_angle`): a
        // `powf` per (row, pair) was most of a decode step's rope time.
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| reference::rope_angle(1, i, hd, base))
            .collect();
        let rotate_row = |((o, x), &pos): ((&mut [f32], &[f32]), &u32)| {
            // Angles in f64 so long positions keep their precision; one table per row.
            let cs: Vec<(f32, f32)> = inv_freq
                .iter()
                .map(|&f| {
                    let (s, c) = (f64::from(pos) * f).sin_cos();
                    (s as f32, c as f32)
                })
                .collect();
            for (o, x) in o.chunks_exact_mut(hd).zip(x.chunks_exact(hd)) {
                for (i, &(s, c)) in cs.iter().enumerate() {
                    let (a, b) = match style {
                        RopeStyle::Normal => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + half),
                    };
                    o[a] = x[a] * c - x[b] * s;
                    o[b] = x[a] * s + x[b] * c;
                }
            }
        };
        let row = row.max(1);
        if xs.len() >= PAR_MIN_ELEMS {
            out.par_chunks_mut(row)
                .zip(xs.par_chunks(row))
                .zip(positions.par_iter())
                .for_each(rotate_row);
        } else {
            out.chunks_mut(row)
                .zip(xs.chunks(row))
                .zip(positions.iter())
                .for_each(rotate_row);
        }
        Ok(f32_tensor(x.shape.clone(), out))
    }

    fn glu(&self, gate: &Tensor, up: &Tensor, act: GluAct) -> Result<Tensor> {
        same_shape(gate, up, "glu")?;
        let (g, u) = (read_f32(gate, "glu gate")?, read_f32(up, "glu up")?);
        let mut out = vec![0.0f32; g.len()];
        // Vectorised, it is ~0.3 ns per value: split only when that outweighs a fork/join.
        const CHUNK: usize = 1 << 15;
        if g.len() >= 2 * CHUNK {
            out.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .for_each(|(o, (g, u))| glu_into(g, u, o, act));
        } else {
            glu_into(&g, &u, &mut out, act);
        }
        Ok(f32_tensor(gate.shape.clone(), out))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        same_shape(a, b, "add")?;
        let (x, y) = (read_f32(a, "add a")?, read_f32(b, "add b")?);
        Ok(f32_tensor(a.shape.clone(), zip_map(&x, &y, |x, y| x + y)))
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        let d = last_dim(x, "softmax")?;
        let xs = read_f32(x, "softmax")?;
        let mut out = vec![0.0f32; xs.len()];
        map_rows(&xs, &mut out, d, |x, o| {
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0.0f32;
            for (o, &v) in o.iter_mut().zip(x) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        });
        Ok(f32_tensor(x.shape.clone(), out))
    }

    fn argmax(&self, x: &Tensor) -> Result<Vec<u32>> {
        let d = last_dim(x, "argmax")?;
        let xs = read_f32(x, "argmax")?;
        if d == 0 || !xs.len().is_multiple_of(d) {
            return reference::argmax(&xs, d);
        }
        // A decode step's logits are rows of the whole vocabulary (262,144 for Gemma 3): a
        // vectorised maximum, then the first position holding it, row by row in parallel.
        let first_max = |r: &[f32]| {
            let m = simd_max(r);
            r.iter().position(|&v| v == m).unwrap_or(0) as u32
        };
        Ok(if xs.len() >= PAR_MIN_ELEMS {
            xs.par_chunks_exact(d).map(first_max).collect()
        } else {
            xs.chunks_exact(d).map(first_max).collect()
        })
    }

    fn kv_write(
        &self,
        k_pool: &Tensor,
        v_pool: &Tensor,
        k: &Tensor,
        v: &Tensor,
        slots: &[u32],
    ) -> Result<()> {
        let [_, _, nkv, hd] = k_pool.shape[..] else {
            return Err(KernelError::Shape(format!(
                "kv_write: pool shape {:?} is not 4-D",
                k_pool.shape
            )));
        };
        same_shape(k_pool, v_pool, "kv_write pools")?;
        if same_storage(k_pool, v_pool) {
            return Err(KernelError::InvalidArgument(
                "kv_write: k_pool and v_pool are the same tensor".into(),
            ));
        }
        if k.numel() != slots.len() * nkv * hd || v.numel() != k.numel() {
            return Err(KernelError::Shape(format!(
                "kv_write: k {:?} / v {:?} for {} slots of [{nkv}, {hd}]",
                k.shape,
                v.shape,
                slots.len()
            )));
        }
        if k_pool.dtype != v_pool.dtype {
            return Err(KernelError::InvalidArgument(format!(
                "kv_write: k_pool is {:?}, v_pool {:?}",
                k_pool.dtype, v_pool.dtype
            )));
        }
        let (ks, vs) = (read_f32(k, "kv_write k")?, read_f32(v, "kv_write v")?);
        let row = nkv * hd;
        let pool_len = k_pool.numel();
        reference::check_kv_write(ks.len(), vs.len(), pool_len, v_pool.numel(), row, slots)?;
        let mut kp = write_pool(k_pool, "kv_write k_pool")?;
        let mut vp = write_pool(v_pool, "kv_write v_pool")?;
        with_pool_mut!(kp, |p| {
            write_rows(p, &ks, row, slots);
            Ok::<(), KernelError>(())
        })?;
        with_pool_mut!(vp, |p| {
            write_rows(p, &vs, row, slots);
            Ok(())
        })
    }

    fn attention(
        &self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        seqs: &[AttnSeq<'_>],
        params: &AttnParams,
    ) -> Result<Tensor> {
        let [_, bs, nkv, hd] = k_pool.shape[..] else {
            return Err(KernelError::Shape(format!(
                "attention: pool shape {:?} is not 4-D",
                k_pool.shape
            )));
        };
        same_shape(k_pool, v_pool, "attention pools")?;
        if nkv != params.n_kv_heads || hd != params.head_dim {
            return Err(KernelError::Shape(format!(
                "attention: pool [_, {bs}, {nkv}, {hd}] vs params ({} kv heads, head_dim {})",
                params.n_kv_heads, params.head_dim
            )));
        }
        if k_pool.dtype != v_pool.dtype {
            return Err(KernelError::InvalidArgument(format!(
                "attention: k_pool is {:?}, v_pool {:?}",
                k_pool.dtype, v_pool.dtype
            )));
        }
        let qs = read_f32(q, "attention q")?;
        let kp = read_pool(k_pool, "attention k_pool")?;
        let vp = read_pool(v_pool, "attention v_pool")?;
        let out = attention::attention(&qs, kp.rows(), vp.rows(), bs, seqs, params)?;
        let rows = out.len() / (params.n_heads * params.head_dim).max(1);
        Ok(f32_tensor(
            vec![rows, params.n_heads * params.head_dim],
            out,
        ))
    }

    fn linear_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        beta: &Tensor,
        g: &Tensor,
        state: &Tensor,
        params: &LinearAttnParams,
    ) -> Result<Tensor> {
        let (qs, ks, vs) = (read_f32(q, "q")?, read_f32(k, "k")?, read_f32(v, "v")?);
        let (bs, gs) = (read_f32(beta, "beta")?, read_f32(g, "g")?);
        let mut st = write_f32(state, "linear_attention state")?;
        let out = linear::linear_attention(&qs, &ks, &vs, &bs, &gs, st.slice(), params)?;
        let n = bs.len() / params.n_heads.max(1);
        Ok(f32_tensor(vec![n, params.n_heads * params.value_dim], out))
    }

    fn gather_blocks(&self, pool: &Tensor, indices: &[u32]) -> Result<Vec<f32>> {
        let p = read_pool(pool, "gather_blocks")?;
        let block = pool.shape.iter().skip(1).product::<usize>();
        match p.rows() {
            KvRows::F32(v) => gather_rows(v, block, indices),
            KvRows::F16(v) => gather_rows(v, block, indices),
        }
    }

    fn scatter_blocks(&self, pool: &Tensor, indices: &[u32], data: &[f32]) -> Result<()> {
        let block = pool.shape.iter().skip(1).product::<usize>();
        let mut p = write_pool(pool, "scatter_blocks")?;
        with_pool_mut!(p, |v| scatter_rows(v, block, indices, data))
    }

    fn write(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        let mut w = write_f32(t, "write")?;
        let dst = w.slice();
        if dst.len() != data.len() {
            return Err(KernelError::Shape(format!(
                "write: tensor has {} values, data {}",
                dst.len(),
                data.len()
            )));
        }
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// `x · sigmoid(t) · u` with the branch-free [`simd::exp_neg`] (`e^{-|t|}`), so the elementwise
/// loop vectorises instead of calling libm's `expf` per value. Both activations have this form:
/// `silu(x) = x·σ(x)`, and GELU-tanh `0.5·x·(1 + tanh(z)) = x·σ(2z)` (as `1 + tanh(z) = 2σ(2z)`).
#[inline(always)]
fn sigmoid_mul(x: f32, t: f32, u: f32) -> f32 {
    let e = simd::exp_neg(-t.abs());
    let sig = if t >= 0.0 { 1.0 } else { e } / (1.0 + e);
    x * sig * u
}

simd::multiversion! {
    /// `out[i] = act(g[i]) · u[i]`.
    fn glu_into(g: &[f32], u: &[f32], out: &mut [f32], act: GluAct) {
        match act {
            GluAct::Silu => {
                for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                    *o = sigmoid_mul(g, g, u);
                }
            }
            GluAct::GeluTanh => {
                // 2·√(2/π), and 2·√(2/π)·0.044715.
                const A: f32 = 1.595_769;
                const B: f32 = A * 0.044_715;
                for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                    *o = sigmoid_mul(g, g * (A + B * g * g), u);
                }
            }
        }
    }
}

simd::multiversion! {
    /// The largest value of `x` that is not NaN (−∞ when there is none), vectorised: the
    /// reference argmax's choice is the first position holding it (0 when every value is NaN).
    fn simd_max(x: &[f32]) -> f32 {
        simd::max(x)
    }
}

simd::multiversion! {
    /// `Σ x²`, vectorised.
    fn simd_sumsq(x: &[f32]) -> f32 {
        simd::dot(x, x)
    }
}
