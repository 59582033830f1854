//! [`WgpuBackend`]: every [`Backend`] operation as a WGSL dispatch recorded into the pending
//! command encoder. All inputs are checked on the host so bad shapes or indices are typed errors,
//! never out-of-bounds GPU accesses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Gpu, GpuOptions, GpuStorage, Kernel, MatmulPath, Res, RowParts, WeightTex};
use crate::backend::{
    AttnParams, AttnSeq, Backend, BackendInfo, BackendKind, DType, GluAct, HostTensor, KernelError,
    LinearAttnParams, Result, RopeStyle, Storage, Tensor,
};

/// Output rows per workgroup of `matmul_tex.wgsl` (its constant `R`).
const TEX_ROWS: usize = 8;
/// Output columns per lane of `matmul_tex.wgsl` (its constant `C`; a workgroup has 8 lanes).
const TEX_COLS: usize = 4;

/// Up to this many rows, matmul runs `matvec.wgsl` (decode); `MAX_ROWS` there.
const MATVEC_ROWS: usize = 8;

/// `WTYPE` constant of `dequant.wgsl`.
fn wtype(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_1 => 2,
        DType::Q8_0 => 3,
        DType::Q5_0 => 4,
        DType::Q4_K => 5,
        DType::Q6_K => 6,
    }
}

/// Rows per workgroup and keys per lane of `attention_tex.wgsl` (its `R` and `C`) for sequences of
/// at most `max_items` rows (new tokens × GQA group). Measured on lavapipe (GFLOP per CPU-second,
/// prefill of 512 tokens): 4 rows × 2 keys is best at head_dim 64 (5.9; 4×1 5.3, 2×2 4.0) and at
/// 256 (7.5, though its 32 vec4 accumulators spill; 2×2 5.3, 1×2 3.2): sharing each K/V texel
/// across more rows pays more than keeping every accumulator in a register.
fn attn_tile(max_items: usize) -> (usize, usize) {
    (4.min(max_items.next_power_of_two()), 2)
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| KernelError::Unsupported(format!("{what} = {n} exceeds u32")))
}

/// The wgpu backend. Cheap to clone (shares one [`Gpu`]); `Send + Sync`, operations from several
/// threads interleave safely (each is recorded atomically).
///
/// `download`, `argmax`, `gather_blocks` and `sync` submit the recorded work and block the calling
/// thread until the GPU is done (the device is polled on a dedicated thread): call them from the
/// engine's compute threads, never from an async runtime worker.
#[derive(Clone)]
pub struct WgpuBackend {
    gpu: Arc<Gpu>,
    /// The last rotary (cos, sin) table: q and k of every layer in a step share the positions.
    rope_cache: Arc<Mutex<Option<RopeTable>>>,
}

/// Rotations for one (positions, head_dim, base), computed on the host in f64.
struct RopeTable {
    positions: Vec<u32>,
    head_dim: usize,
    base_bits: u32,
    buffer: wgpu::Buffer,
}

impl WgpuBackend {
    /// Open the best adapter (see [`Gpu::new`]); `KernelError::NoAdapter` when there is none.
    pub fn new() -> Result<Self> {
        Self::with_matmul(MatmulPath::Auto)
    }

    /// Like [`WgpuBackend::new`] with an explicit matmul kernel choice.
    pub fn with_matmul(path: MatmulPath) -> Result<Self> {
        Self::with_options(GpuOptions {
            matmul: path,
            ..GpuOptions::default()
        })
    }

    /// Like [`WgpuBackend::new`] with explicit [`GpuOptions`].
    pub fn with_options(options: GpuOptions) -> Result<Self> {
        Ok(Self {
            gpu: Arc::new(Gpu::with_options(options)?),
            rope_cache: Arc::new(Mutex::new(None)),
        })
    }

    /// The device context (adapter facts, limits).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// True when matmuls with texture-friendly shapes use the subgroup/texture kernel.
    pub fn uses_texture_matmul(&self) -> bool {
        self.gpu.tex_matmul
    }

    /// True when attention uses the texture/subgroup kernel (`attention_tex.wgsl`).
    pub fn uses_texture_attention(&self) -> bool {
        self.gpu.tex_attention
    }

    /// How many buffers hold `t`: 1, or its row parts when it was uploaded larger than one
    /// storage binding (see [`GpuStorage`]).
    pub fn buffers_of(&self, t: &Tensor) -> Result<usize> {
        Ok(self
            .storage(t)?
            .parts
            .as_ref()
            .map_or(1, |p| p.buffers.len()))
    }

    fn storage<'t>(&self, t: &'t Tensor) -> Result<&'t Arc<GpuStorage>> {
        match &t.storage {
            Storage::Gpu(s) => Ok(s),
            Storage::Cpu(_) => Err(KernelError::WrongBackend("cpu")),
        }
    }

    /// The one buffer of a whole tensor; a tensor stored in row parts is an error here (only
    /// matmul and embedding read those, through [`WgpuBackend::row_parts`]).
    fn buf<'t>(&self, t: &'t Tensor) -> Result<&'t wgpu::Buffer> {
        let st = self.storage(t)?;
        if let Some(parts) = &st.parts {
            return Err(KernelError::Unsupported(format!(
                "{:?} tensor {:?} is stored in {} row parts (larger than one storage binding of \
                 {} bytes); only matmul weights and embedding tables may be that large",
                t.dtype,
                t.shape,
                parts.buffers.len(),
                self.gpu.max_part_bytes
            )));
        }
        Ok(&st.buffer)
    }

    /// `(first row, rows, buffer)` of each row part of a 2D weight `[n, k]` (one part for a
    /// whole tensor).
    fn row_parts<'t>(
        &self,
        w: &'t Tensor,
        n: usize,
        k: usize,
    ) -> Result<Vec<(usize, usize, &'t wgpu::Buffer)>> {
        let st = self.storage(w)?;
        let Some(parts) = &st.parts else {
            return Ok(vec![(0, n, &st.buffer)]);
        };
        if parts.row_len != k {
            return Err(KernelError::Unsupported(format!(
                "tensor {:?} was split into rows of {} values and cannot be read as rows of {k}",
                w.shape, parts.row_len
            )));
        }
        Ok(parts
            .buffers
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let row0 = i * parts.rows;
                (row0, parts.rows.min(n - row0), b)
            })
            .collect())
    }

    /// Uploads `host` as row parts of at most `max_part_bytes` each (see [`GpuStorage`]).
    fn upload_parts(&self, host: &HostTensor) -> Result<Arc<GpuStorage>> {
        let limit = self.gpu.max_part_bytes;
        let too_big = |why: String| {
            KernelError::Unsupported(format!(
                "{:?} tensor {:?} of {} bytes exceeds the storage binding limit of {limit} bytes \
                 and cannot be split into row parts: {why}",
                host.dtype,
                host.shape,
                host.bytes.len()
            ))
        };
        let row_len = match host.shape[..] {
            [.., d] if host.shape.len() >= 2 && d > 0 => d,
            _ => return Err(too_big("it has no rows".into())),
        };
        if !row_len.is_multiple_of(host.dtype.block_len()) {
            return Err(too_big(format!(
                "rows of {row_len} values are not whole {:?} blocks",
                host.dtype
            )));
        }
        let row_bytes = host.dtype.bytes_for(row_len);
        let n_rows = host.numel() / row_len;
        let max_rows = (limit / row_bytes as u64) as usize;
        if max_rows == 0 {
            return Err(too_big(format!("one row is {row_bytes} bytes")));
        }
        // Balanced parts: the same rows in each (but the last), as few parts as the limit allows.
        let n_parts = n_rows.div_ceil(max_rows);
        let rows = n_rows.div_ceil(n_parts);
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        let buffers = host
            .bytes
            .chunks(rows * row_bytes)
            .map(|part| self.gpu.buffer_init(part, usage))
            .collect();
        Ok(self.gpu.split_storage(RowParts {
            rows,
            row_len,
            buffers,
        }))
    }

    fn f32_tensor<'t>(&self, t: &'t Tensor, what: &str) -> Result<&'t wgpu::Buffer> {
        if t.dtype != DType::F32 {
            return Err(KernelError::InvalidArgument(format!(
                "{what} must be F32, got {:?}",
                t.dtype
            )));
        }
        self.buf(t)
    }

    /// The buffer of a KV pool (`F32` or `F16`) and whether it is `F16`.
    fn pool<'t>(&self, t: &'t Tensor, what: &str) -> Result<(&'t wgpu::Buffer, bool)> {
        match t.dtype {
            DType::F32 => Ok((self.buf(t)?, false)),
            DType::F16 => Ok((self.buf(t)?, true)),
            other => Err(KernelError::InvalidArgument(format!(
                "{what} must be F32 or F16, got {other:?}"
            ))),
        }
    }

    /// A fresh F32 tensor of `shape` (uninitialised; every op writes all of it).
    fn output(&self, shape: Vec<usize>) -> Result<(Tensor, Arc<GpuStorage>)> {
        let numel: usize = shape.iter().product();
        let storage = self.gpu.storage(self.gpu.alloc(numel as u64 * 4)?);
        let t = Tensor {
            shape,
            dtype: DType::F32,
            storage: Storage::Gpu(Arc::clone(&storage)),
        };
        Ok((t, storage))
    }

    /// Row-wise kernels (`rows` rows of `d`).
    fn rows_of(&self, x: &Tensor) -> Result<(usize, usize)> {
        let d = *x
            .shape
            .last()
            .ok_or_else(|| KernelError::Shape("scalar tensor".into()))?;
        if d == 0 {
            return Ok((0, 0));
        }
        Ok((x.numel() / d, d))
    }

    /// Texture form of a matmul weight (one per row part), created on first use by a repack
    /// kernel; `None` when some part does not fit the adapter's textures.
    fn weight_tex(&self, w: &Tensor, n: usize, k: usize) -> Result<Option<Arc<[WeightTex]>>> {
        let st = self.storage(w)?;
        let mut slot = st
            .tex
            .lock()
            .map_err(|_| KernelError::Device("tex lock poisoned".into()))?;
        if let Some(t) = slot.as_ref().filter(|t| t[0].dims == (n, k)) {
            return Ok(Some(Arc::clone(t)));
        }
        let max = self.gpu.limits.max_texture_dimension_2d as usize;
        let parts = self.row_parts(w, n, k)?;
        let row_texels = if w.dtype == DType::Q4_1 {
            k / 32
        } else {
            k.div_ceil(4)
        };
        if parts
            .iter()
            .any(|&(_, rows, _)| rows.div_ceil(rows.min(max).max(1)) * row_texels > max)
        {
            return Ok(None);
        }
        let texs = parts
            .into_iter()
            .map(|(row0, rows, buf)| self.repack_weight(w.dtype, buf, row0..row0 + rows, k, (n, k)))
            .collect::<Result<Vec<_>>>()?;
        let texs: Arc<[WeightTex]> = texs.into();
        *slot = Some(Arc::clone(&texs));
        Ok(Some(texs))
    }

    /// Repacks the weight rows `rows` (of `k` values of `dtype`, all of `buf`) into textures
    /// (`dims`: the whole weight's shape, for the cache check).
    fn repack_weight(
        &self,
        dtype: DType,
        buf: &wgpu::Buffer,
        rows: std::ops::Range<usize>,
        k: usize,
        dims: (usize, usize),
    ) -> Result<WeightTex> {
        let n = rows.len();
        let max = self.gpu.limits.max_texture_dimension_2d as usize;
        let quantized = dtype == DType::Q4_1;
        let row_texels = if quantized { k / 32 } else { k.div_ceil(4) };
        let rows_per_fold = n.min(max);
        let folds = n.div_ceil(rows_per_fold.max(1));
        let (w_tex, h_tex) = (
            u32_of(folds * row_texels, "texture width")?,
            rows_per_fold as u32,
        );
        let params =
            self.gpu
                .uniform(&[n as u32, k as u32, rows_per_fold as u32, row_texels as u32]);
        let dummy_f = || self.gpu.texture(1, 1, wgpu::TextureFormat::Rgba32Float);
        let tex = if quantized {
            let q_view = self
                .gpu
                .texture(w_tex, h_tex, wgpu::TextureFormat::Rgba32Uint);
            let s_view = self
                .gpu
                .texture(w_tex, h_tex, wgpu::TextureFormat::Rgba32Float);
            self.gpu.dispatch(
                Kernel::RepackQ41,
                wtype(dtype),
                &[
                    (1, Res::Buf(buf)),
                    (3, Res::Buf(&params)),
                    (4, Res::Tex(&q_view)),
                    (5, Res::Tex(&s_view)),
                ],
                Gpu::grid(n * row_texels, 256),
            )?;
            WeightTex {
                f32_view: dummy_f(),
                q_view,
                s_view,
                rows_per_fold: h_tex,
                row_texels: row_texels as u32,
                quantized,
                dims,
                rows: rows.clone(),
            }
        } else {
            let f32_view = self
                .gpu
                .texture(w_tex, h_tex, wgpu::TextureFormat::Rgba32Float);
            self.gpu.dispatch(
                Kernel::RepackF32,
                wtype(dtype),
                &[
                    (1, Res::Buf(buf)),
                    (2, Res::Tex(&f32_view)),
                    (3, Res::Buf(&params)),
                ],
                Gpu::grid(n * row_texels, 256),
            )?;
            WeightTex {
                f32_view,
                q_view: self.gpu.texture(1, 1, wgpu::TextureFormat::Rgba32Uint),
                s_view: dummy_f(),
                rows_per_fold: h_tex,
                row_texels: row_texels as u32,
                quantized,
                dims,
                rows: rows.clone(),
            }
        };
        Ok(tex)
    }

    /// The texture/subgroup matmul; `Ok(false)` when shapes do not fit it.
    fn matmul_tex(
        &self,
        x: &wgpu::Buffer,
        w: &Tensor,
        out: &wgpu::Buffer,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<bool> {
        let max = self.gpu.limits.max_texture_dimension_2d as usize;
        if !self.gpu.tex_matmul || !k.is_multiple_of(32) || m > max || k / 4 > max {
            return Ok(false);
        }
        let Some(parts) = self.weight_tex(w, n, k)? else {
            return Ok(false);
        };
        // Activations: repack x into a texture (one row per texture row).
        let x_tex = self.gpu.scratch_texture(
            u32_of(k / 4, "k")?,
            u32_of(m, "m")?,
            wgpu::TextureFormat::Rgba32Float,
        );
        let x_view = x_tex.create_view(&wgpu::TextureViewDescriptor::default());
        let xp = self
            .gpu
            .uniform(&[m as u32, k as u32, m as u32, (k / 4) as u32]);
        self.gpu.dispatch(
            Kernel::RepackF32,
            0,
            &[(1, Res::Buf(x)), (2, Res::Tex(&x_view)), (3, Res::Buf(&xp))],
            Gpu::grid(m * k / 4, 256),
        )?;
        // Few-row (decode) matmuls get a pipeline specialised to 1, 2 or 4 rows per workgroup.
        let rows = if m < TEX_ROWS {
            m.next_power_of_two()
        } else {
            TEX_ROWS
        };
        for wt in parts.iter() {
            let part_n = wt.rows.len();
            let params = self.gpu.uniform(&[
                m as u32,
                u32_of(part_n, "n")?,
                k as u32,
                wt.rows_per_fold,
                wt.row_texels,
                u32_of(n, "n")?,
                u32_of(wt.rows.start, "row")?,
                0,
            ]);
            self.gpu.dispatch(
                Kernel::MatmulTex,
                u32::from(wt.quantized) | (rows as u32) << 1,
                &[
                    (0, Res::Tex(&x_view)),
                    (1, Res::Tex(&wt.f32_view)),
                    (2, Res::Buf(out)),
                    (3, Res::Buf(&params)),
                    (4, Res::Tex(&wt.q_view)),
                    (5, Res::Tex(&wt.s_view)),
                ],
                (
                    u32_of(part_n.div_ceil(8 * TEX_COLS), "n")?,
                    u32_of(m.div_ceil(rows), "m")?,
                    1,
                ),
            )?;
        }
        self.gpu.give_texture(x_tex);
        Ok(true)
    }

    /// The texture/subgroup attention (`attention_tex.wgsl`): gather the query heads and the
    /// keys/values the sequences see into textures, then one dispatch over (KV head, row tile).
    /// `Ok(false)` when the textures would exceed the adapter's limits (the storage kernel runs).
    /// Shapes, tables and slots are checked by the caller.
    #[allow(clippy::too_many_arguments)]
    fn attention_tex(
        &self,
        q: &wgpu::Buffer,
        pools: [&wgpu::Buffer; 2],
        f16: bool,
        block_size: usize,
        tables: &[&[u32]],
        seqs: &[AttnSeq<'_>],
        params: &AttnParams,
        out: &wgpu::Buffer,
    ) -> Result<bool> {
        let AttnParams {
            n_heads,
            n_kv_heads,
            head_dim,
            scale,
            window,
        } = *params;
        let group = n_heads / n_kv_heads;
        let texels = head_dim.div_ceil(4);
        // Output texels per lane; head_dim <= 256 makes it <= 8.
        let oc = texels.div_ceil(8);
        let max_items = seqs.iter().map(|s| s.n_new * group).max().unwrap_or(1);
        let (r, c) = attn_tile(max_items);
        let max = self.gpu.limits.max_texture_dimension_2d as usize;
        // Lines (one head of one token) per texture row: a power of two, so the kernel shifts.
        let Some(lpr) = (max / texels).checked_ilog2().map(|b| 1usize << b) else {
            return Ok(false);
        };
        let mut tiles: Vec<u32> = Vec::new();
        let mut slots: Vec<u32> = Vec::new();
        let mut row0 = 0usize;
        let bs = block_size as u32;
        for (s, table) in seqs.iter().zip(tables) {
            if s.n_new == 0 {
                continue;
            }
            // Keys before the first query's window are never visible: not gathered.
            let kmin = window.map_or(0, |w| (s.n_past + 1).saturating_sub(w));
            let kv_off = u32_of(slots.len(), "gathered tokens")?;
            slots.extend(
                (kmin..s.n_past + s.n_new)
                    .map(|t| table[t / block_size] * bs + (t % block_size) as u32),
            );
            let items = s.n_new * group;
            for i0 in (0..items).step_by(r) {
                tiles.extend_from_slice(&[
                    u32_of(row0, "row")?,
                    u32_of(i0, "item")?,
                    u32_of(r.min(items - i0), "items")?,
                    u32_of(s.n_past, "position")?,
                    kv_off,
                    u32_of(kmin, "position")?,
                    0,
                    0,
                ]);
            }
            row0 += s.n_new;
        }
        let q_lines = row0 * n_heads;
        let kv_lines = slots.len() * n_kv_heads;
        if q_lines.max(kv_lines).div_ceil(lpr) > max {
            return Ok(false);
        }
        u32_of(q_lines.max(kv_lines) * texels, "gathered texels")?;
        let slot_buf = self.gpu.storage_u32(&slots);
        let shift = lpr.trailing_zeros();
        let gather = |src: &wgpu::Buffer, lines: usize, heads: usize, spec: u32| {
            let tex = self.gpu.scratch_texture(
                (lines.min(lpr) * texels) as u32,
                lines.div_ceil(lpr) as u32,
                wgpu::TextureFormat::Rgba32Float,
            );
            let view = tex.create_view(&wgpu::TextureViewDescriptor::default());
            let gp = self.gpu.uniform(&[
                lines as u32,
                heads as u32,
                head_dim as u32,
                texels as u32,
                shift,
                0,
                0,
                0,
            ]);
            self.gpu.dispatch(
                Kernel::AttentionGather,
                spec,
                &[
                    (7, Res::Buf(&gp)),
                    (8, Res::Buf(src)),
                    (9, Res::Buf(&slot_buf)),
                    (10, Res::Tex(&view)),
                ],
                Gpu::grid(lines, 64),
            )?;
            Ok::<_, KernelError>((tex, view))
        };
        let paged = 2 | u32::from(f16);
        let (qt, qv) = gather(q, q_lines, n_heads, 0)?;
        let (kt, kv) = gather(pools[0], kv_lines, n_kv_heads, paged)?;
        let (vt, vv) = gather(pools[1], kv_lines, n_kv_heads, paged)?;
        let tile_buf = self.gpu.storage_u32(&tiles);
        let n_tiles = tiles.len() / 8;
        let ub = self.gpu.uniform(&[
            n_heads as u32,
            n_kv_heads as u32,
            group as u32,
            head_dim as u32,
            texels as u32,
            shift,
            u32_of(window.unwrap_or(0), "window")?,
            scale.to_bits(),
            u32_of(n_tiles, "tiles")?,
            0,
            0,
            0,
        ]);
        self.gpu.dispatch(
            Kernel::AttentionTex,
            (r | c << 4 | oc << 8) as u32,
            &[
                (0, Res::Tex(&qv)),
                (1, Res::Tex(&kv)),
                (2, Res::Tex(&vv)),
                (3, Res::Buf(&tile_buf)),
                (5, Res::Buf(out)),
                (6, Res::Buf(&ub)),
            ],
            (
                n_kv_heads as u32,
                n_tiles.min(65535) as u32,
                n_tiles.div_ceil(65535) as u32,
            ),
        )?;
        for t in [qt, kt, vt] {
            self.gpu.give_texture(t);
        }
        Ok(true)
    }

    /// `[n, head_dim/2, (cos, sin)]` for `positions`, as `crate::reference::rope_angle` defines
    /// the angles (in f64; see rope.wgsl for why not on the GPU). Cached for the next call.
    fn rope_table(&self, positions: &[u32], head_dim: usize, base: f32) -> wgpu::Buffer {
        let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.as_ref() {
            if t.head_dim == head_dim && t.base_bits == base.to_bits() && t.positions == positions {
                return t.buffer.clone();
            }
        }
        let half = head_dim / 2;
        let mut cs = Vec::with_capacity(positions.len() * head_dim);
        for &pos in positions {
            for j in 0..half {
                let (sin, cos) = crate::reference::rope_angle(pos, j, head_dim, base).sin_cos();
                cs.push(cos as f32);
                cs.push(sin as f32);
            }
        }
        let buffer = self
            .gpu
            .buffer_init(bytemuck::cast_slice(&cs), wgpu::BufferUsages::STORAGE);
        *cache = Some(RopeTable {
            positions: positions.to_vec(),
            head_dim,
            base_bits: base.to_bits(),
            buffer: buffer.clone(),
        });
        buffer
    }

    /// Host-checked row scatter `dst[idx[r]] = src[r]`, `row` floats per index. A repeated index
    /// keeps the last row written (as the reference does): rows are dispatched in generations
    /// (the g-th occurrence of each index in generation g), since one parallel dispatch would
    /// leave the winner undefined; skipped rows carry the sentinel index `u32::MAX`.
    /// `f16`: `dst` holds f16 values (`row` must then be even: one invocation writes a word).
    fn scatter_rows(
        &self,
        dst: &wgpu::Buffer,
        src: &wgpu::Buffer,
        idx: &[u32],
        row: usize,
        f16: bool,
    ) -> Result<()> {
        if f16 && !row.is_multiple_of(2) {
            return Err(KernelError::Unsupported(format!(
                "f16 rows of {row} values (the wgpu backend writes f16 pairs)"
            )));
        }
        let mut seen: HashMap<u32, u32> = HashMap::with_capacity(idx.len());
        let generation: Vec<u32> = idx
            .iter()
            .map(|&i| {
                let g = seen.entry(i).or_insert(0);
                *g += 1;
                *g - 1
            })
            .collect();
        let generations = generation.iter().copied().max().map_or(0, |g| g + 1);
        for g in 0..generations {
            let gen_idx: Vec<u32> = if generations == 1 {
                idx.to_vec()
            } else {
                idx.iter()
                    .zip(&generation)
                    .map(|(&i, &gi)| if gi == g { i } else { u32::MAX })
                    .collect()
            };
            self.scatter_generation(dst, src, &gen_idx, row, f16)?;
        }
        Ok(())
    }

    fn scatter_generation(
        &self,
        dst: &wgpu::Buffer,
        src: &wgpu::Buffer,
        idx: &[u32],
        row: usize,
        f16: bool,
    ) -> Result<()> {
        let items = if f16 {
            idx.len() * row / 2
        } else {
            idx.len() * row
        };
        let ib = self.gpu.storage_u32(idx);
        let params = self
            .gpu
            .uniform(&[u32_of(idx.len(), "rows")?, u32_of(row, "row")?, 0, 0]);
        self.gpu.dispatch(
            Kernel::Rows,
            u32::from(f16) << 1,
            &[
                (0, Res::Buf(src)),
                (1, Res::Buf(&ib)),
                (2, Res::Buf(dst)),
                (3, Res::Buf(&params)),
            ],
            Gpu::grid(items, 256),
        )
    }

    /// `(rows, row length)` of a pool tensor, checking indices against its first dimension.
    fn pool_rows(&self, pool: &Tensor, indices: &[u32]) -> Result<usize> {
        let blocks = *pool
            .shape
            .first()
            .ok_or_else(|| KernelError::Shape("scalar pool".into()))?;
        if let Some(&bad) = indices.iter().find(|&&i| i as usize >= blocks) {
            return Err(KernelError::InvalidArgument(format!(
                "block index {bad} >= {blocks} blocks"
            )));
        }
        Ok(pool.numel().checked_div(blocks).unwrap_or(0))
    }
}

impl Backend for WgpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Wgpu,
            description: self.gpu.describe(),
            software: self.gpu.software,
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
        if host.bytes.len() as u64 > self.gpu.max_part_bytes {
            return Ok(Tensor {
                shape: host.shape.clone(),
                dtype: host.dtype,
                storage: Storage::Gpu(self.upload_parts(host)?),
            });
        }
        let buffer = self.gpu.buffer_init(
            &host.bytes,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        );
        Ok(Tensor {
            shape: host.shape.clone(),
            dtype: host.dtype,
            storage: Storage::Gpu(self.gpu.storage(buffer)),
        })
    }

    fn download(&self, t: &Tensor) -> Result<Vec<f32>> {
        if t.dtype == DType::F16 {
            let bytes = self.gpu.read(self.buf(t)?, t.numel() as u64 * 2)?;
            let halves: Vec<half::f16> = bytemuck::pod_collect_to_vec(&bytes);
            let mut out = vec![0.0f32; halves.len()];
            crate::KvElem::slice_to_f32(&halves, &mut out);
            return Ok(out);
        }
        let b = self.f32_tensor(t, "download")?;
        let bytes = self.gpu.read(b, t.numel() as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        self.zeros_dtype(shape, DType::F32)
    }

    fn zeros_dtype(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        match dtype {
            DType::F32 => {}
            DType::F16 if shape.last().is_some_and(|d| d % 2 == 0) => {}
            DType::F16 => {
                return Err(KernelError::Unsupported(format!(
                    "F16 tensor {shape:?}: the wgpu backend stores f16 in pairs, the last dimension must be even"
                )))
            }
            other => {
                return Err(KernelError::Unsupported(format!(
                    "zero-filled {other:?} tensors"
                )))
            }
        }
        let storage = self
            .gpu
            .storage(self.gpu.alloc(dtype.bytes_for(numel) as u64)?);
        let buffer = storage.buffer.clone();
        self.gpu.record(|enc| enc.clear_buffer(&buffer, 0, None))?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Gpu(storage),
        })
    }

    fn sync(&self) -> Result<()> {
        self.gpu.sync()
    }

    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let [vocab, d] = table.shape[..] else {
            return Err(KernelError::Shape(format!(
                "embedding table must be 2D, got {:?}",
                table.shape
            )));
        };
        if !d.is_multiple_of(table.dtype.block_len()) {
            return Err(KernelError::Shape(format!(
                "row length {d} is not a whole number of blocks"
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(KernelError::InvalidArgument(format!(
                "token id {bad} >= vocab {vocab}"
            )));
        }
        let (out, st) = self.output(vec![ids.len(), d])?;
        let idb = self.gpu.storage_u32(ids);
        // One dispatch per row part that holds any of the ids (each writes only its rows).
        for (row0, rows, buf) in self.row_parts(table, vocab, d)? {
            if !ids
                .iter()
                .any(|&i| (row0..row0 + rows).contains(&(i as usize)))
            {
                continue;
            }
            let params = self.gpu.uniform(&[
                u32_of(ids.len(), "ids")?,
                u32_of(d, "d")?,
                u32_of(row0, "row")?,
                u32_of(rows, "rows")?,
            ]);
            self.gpu.dispatch(
                Kernel::Embedding,
                wtype(table.dtype),
                &[
                    (0, Res::Buf(&idb)),
                    (1, Res::Buf(buf)),
                    (2, Res::Buf(&st.buffer)),
                    (3, Res::Buf(&params)),
                ],
                Gpu::grid(ids.len() * d, 256),
            )?;
        }
        Ok(out)
    }

    fn matmul(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let xb = self.f32_tensor(x, "matmul input")?;
        let [n, k] = w.shape[..] else {
            return Err(KernelError::Shape(format!(
                "matmul weight must be 2D, got {:?}",
                w.shape
            )));
        };
        let (m, xk) = self.rows_of(x)?;
        if xk != k {
            return Err(KernelError::Shape(format!(
                "matmul: x {:?} vs w {:?}",
                x.shape, w.shape
            )));
        }
        if !k.is_multiple_of(w.dtype.block_len()) {
            return Err(KernelError::Shape(format!(
                "matmul: k = {k} is not a whole number of {:?} blocks",
                w.dtype
            )));
        }
        let mut shape = x.shape.clone();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        let (out, st) = self.output(shape)?;
        if m == 0 || n == 0 {
            return Ok(out);
        }
        if k == 0 {
            let b = st.buffer.clone();
            self.gpu.record(|enc| enc.clear_buffer(&b, 0, None))?;
            return Ok(out);
        }
        // On lavapipe the texture kernel wins at every m (matvec.wgsl: 0.04 GFLOP/s there at
        // 1×576×1536 vs ~1–2); elsewhere few-row matmuls use the bandwidth-friendly matvec.
        if self.matmul_tex(xb, w, &st.buffer, m, n, k)? {
            return Ok(out);
        }
        // One dispatch per row part of the weight, each writing its own output columns.
        for (row0, rows, buf) in self.row_parts(w, n, k)? {
            let params = self.gpu.uniform(&[
                u32_of(m, "m")?,
                u32_of(rows, "n")?,
                u32_of(k, "k")?,
                u32_of(n, "n")?,
                u32_of(row0, "row")?,
                0,
                0,
                0,
            ]);
            let (kernel, groups) = if m <= MATVEC_ROWS {
                (Kernel::Matvec, Gpu::grid(rows, 1))
            } else {
                (
                    Kernel::Matmul,
                    (
                        u32_of(rows.div_ceil(64), "n")?,
                        u32_of(m.div_ceil(64), "m")?,
                        1,
                    ),
                )
            };
            self.gpu.dispatch(
                kernel,
                wtype(w.dtype),
                &[
                    (0, Res::Buf(xb)),
                    (1, Res::Buf(buf)),
                    (2, Res::Buf(&st.buffer)),
                    (3, Res::Buf(&params)),
                ],
                groups,
            )?;
        }
        Ok(out)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let xb = self.f32_tensor(x, "rms_norm input")?;
        let wb = self.f32_tensor(w, "rms_norm weight")?;
        let (rows, d) = self.rows_of(x)?;
        if w.numel() != d {
            return Err(KernelError::Shape(format!(
                "rms_norm: x {:?} vs w {:?}",
                x.shape, w.shape
            )));
        }
        let (out, st) = self.output(x.shape.clone())?;
        let params = self
            .gpu
            .uniform(&[u32_of(rows, "rows")?, u32_of(d, "d")?, eps.to_bits(), 0]);
        self.gpu.dispatch(
            Kernel::RmsNorm,
            0,
            &[
                (0, Res::Buf(xb)),
                (1, Res::Buf(wb)),
                (2, Res::Buf(&st.buffer)),
                (3, Res::Buf(&params)),
            ],
            Gpu::grid(rows, 1),
        )?;
        Ok(out)
    }

    fn rope(&self, x: &Tensor, positions: &[u32], base: f32, style: RopeStyle) -> Result<Tensor> {
        let xb = self.f32_tensor(x, "rope input")?;
        let [n, heads, hd] = x.shape[..] else {
            return Err(KernelError::Shape(format!(
                "rope input must be [n, heads, head_dim], got {:?}",
                x.shape
            )));
        };
        if positions.len() != n || !hd.is_multiple_of(2) {
            return Err(KernelError::Shape(format!(
                "rope: {} positions for {n} rows, head_dim {hd} (must be even)",
                positions.len()
            )));
        }
        if !(base > 0.0 && base.is_finite()) {
            return Err(KernelError::InvalidArgument(format!("rope base {base}")));
        }
        let (out, st) = self.output(x.shape.clone())?;
        let table = self.rope_table(positions, hd, base);
        let neox = u32::from(style == RopeStyle::Neox);
        let params = self.gpu.uniform(&[
            u32_of(n, "n")?,
            u32_of(heads, "heads")?,
            u32_of(hd, "head_dim")?,
            neox,
        ]);
        self.gpu.dispatch(
            Kernel::Rope,
            0,
            &[
                (0, Res::Buf(xb)),
                (1, Res::Buf(&table)),
                (2, Res::Buf(&st.buffer)),
                (3, Res::Buf(&params)),
            ],
            Gpu::grid(n * heads * hd / 2, 256),
        )?;
        Ok(out)
    }

    fn glu(&self, gate: &Tensor, up: &Tensor, act: GluAct) -> Result<Tensor> {
        elementwise(
            self,
            gate,
            up,
            match act {
                GluAct::Silu => 1,
                GluAct::GeluTanh => 2,
            },
        )
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        elementwise(self, a, b, 0)
    }

    fn softmax(&self, x: &Tensor) -> Result<Tensor> {
        let xb = self.f32_tensor(x, "softmax input")?;
        let (rows, d) = self.rows_of(x)?;
        let (out, st) = self.output(x.shape.clone())?;
        let params = self
            .gpu
            .uniform(&[u32_of(rows, "rows")?, u32_of(d, "d")?, 0, 0]);
        self.gpu.dispatch(
            Kernel::Softmax,
            0,
            &[
                (0, Res::Buf(xb)),
                (1, Res::Buf(&st.buffer)),
                (2, Res::Buf(&params)),
            ],
            Gpu::grid(rows, 1),
        )?;
        Ok(out)
    }

    fn argmax(&self, x: &Tensor) -> Result<Vec<u32>> {
        let xb = self.f32_tensor(x, "argmax input")?;
        let (rows, d) = self.rows_of(x)?;
        if d == 0 {
            return Err(KernelError::Shape("argmax of empty rows".into()));
        }
        let ob = self.gpu.alloc(rows as u64 * 4)?;
        let params = self
            .gpu
            .uniform(&[u32_of(rows, "rows")?, u32_of(d, "d")?, 0, 0]);
        self.gpu.dispatch(
            Kernel::Argmax,
            0,
            &[
                (0, Res::Buf(xb)),
                (1, Res::Buf(&ob)),
                (2, Res::Buf(&params)),
            ],
            Gpu::grid(rows, 1),
        )?;
        let bytes = self.gpu.read(&ob, rows as u64 * 4)?;
        // Scratch buffer goes back to the pool.
        drop(self.gpu.storage(ob));
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn kv_write(
        &self,
        k_pool: &Tensor,
        v_pool: &Tensor,
        k: &Tensor,
        v: &Tensor,
        slots: &[u32],
    ) -> Result<()> {
        let (kp, f16) = self.pool(k_pool, "k_pool")?;
        let (vp, _) = self.pool(v_pool, "v_pool")?;
        let kb = self.f32_tensor(k, "k")?;
        let vb = self.f32_tensor(v, "v")?;
        if k_pool.dtype != v_pool.dtype {
            return Err(KernelError::InvalidArgument(format!(
                "kv_write: k_pool is {:?}, v_pool {:?}",
                k_pool.dtype, v_pool.dtype
            )));
        }
        if k_pool.shape != v_pool.shape || k_pool.shape.len() != 4 || k.shape != v.shape {
            return Err(KernelError::Shape(format!(
                "kv_write: pools {:?}/{:?}, k/v {:?}/{:?}",
                k_pool.shape, v_pool.shape, k.shape, v.shape
            )));
        }
        let n_slots = k_pool.shape[0] * k_pool.shape[1];
        let row = k_pool.shape[2] * k_pool.shape[3];
        if k.numel() != slots.len() * row {
            return Err(KernelError::Shape(format!(
                "kv_write: k {:?} does not hold {} rows of {row}",
                k.shape,
                slots.len()
            )));
        }
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= n_slots) {
            return Err(KernelError::InvalidArgument(format!(
                "slot {bad} >= {n_slots} pool slots"
            )));
        }
        if Arc::ptr_eq(self.storage(k_pool)?, self.storage(v_pool)?) {
            return Err(KernelError::InvalidArgument(
                "kv_write: k_pool and v_pool are the same tensor".into(),
            ));
        }
        if slots.is_empty() {
            return Ok(());
        }
        self.storage(k_pool)?.invalidate();
        self.storage(v_pool)?.invalidate();
        self.scatter_rows(kp, kb, slots, row, f16)?;
        self.scatter_rows(vp, vb, slots, row, f16)
    }

    fn attention(
        &self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        seqs: &[AttnSeq<'_>],
        params: &AttnParams,
    ) -> Result<Tensor> {
        let qb = self.f32_tensor(q, "q")?;
        let (kp, f16) = self.pool(k_pool, "k_pool")?;
        let (vp, _) = self.pool(v_pool, "v_pool")?;
        if k_pool.dtype != v_pool.dtype {
            return Err(KernelError::InvalidArgument(format!(
                "attention: k_pool is {:?}, v_pool {:?}",
                k_pool.dtype, v_pool.dtype
            )));
        }
        let AttnParams {
            n_heads,
            n_kv_heads,
            head_dim,
            scale,
            window,
        } = *params;
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) || head_dim == 0 {
            return Err(KernelError::Shape(format!(
                "attention: n_kv_heads {n_kv_heads} must divide n_heads {n_heads} (head_dim {head_dim})"
            )));
        }
        if head_dim > 256 {
            return Err(KernelError::Unsupported(format!(
                "attention: head_dim {head_dim} > 256"
            )));
        }
        if window == Some(0) {
            return Err(KernelError::InvalidArgument(
                "attention window of 0 tokens".into(),
            ));
        }
        let [n_blocks, block_size, pk, pd] = k_pool.shape[..] else {
            return Err(KernelError::Shape(format!(
                "k_pool must be 4D, got {:?}",
                k_pool.shape
            )));
        };
        if v_pool.shape != k_pool.shape || pk != n_kv_heads || pd != head_dim || block_size == 0 {
            return Err(KernelError::Shape(format!(
                "attention: pools {:?}/{:?} vs {n_kv_heads} kv heads × {head_dim}",
                k_pool.shape, v_pool.shape
            )));
        }
        let rows: usize = seqs.iter().map(|s| s.n_new).sum();
        if q.numel() != rows * n_heads * head_dim {
            return Err(KernelError::Shape(format!(
                "attention: q {:?} vs {rows} new tokens × {n_heads} heads × {head_dim}",
                q.shape
            )));
        }
        u32_of(n_blocks * block_size, "pool slots")?;
        let mut tables = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let len = s.n_past + s.n_new;
            let need = len.div_ceil(block_size);
            let table = s.block_table.get(..need).ok_or_else(|| {
                KernelError::Shape(format!(
                    "sequence {i}: {len} tokens need {need} blocks, table has {}",
                    s.block_table.len()
                ))
            })?;
            if let Some(&bad) = table.iter().find(|&&b| b as usize >= n_blocks) {
                return Err(KernelError::InvalidArgument(format!(
                    "sequence {i}: block {bad} >= {n_blocks}"
                )));
            }
            tables.push(table);
        }
        let (out, st) = self.output(vec![rows, n_heads * head_dim])?;
        if rows == 0 {
            return Ok(out);
        }
        if self.gpu.tex_attention
            && self.attention_tex(
                qb,
                [kp, vp],
                f16,
                block_size,
                &tables,
                seqs,
                params,
                &st.buffer,
            )?
        {
            return Ok(out);
        }
        let mut rowinfo = Vec::with_capacity(rows * 2);
        let mut bt = Vec::new();
        for (s, table) in seqs.iter().zip(&tables) {
            let off = u32_of(bt.len(), "block table")?;
            bt.extend_from_slice(table);
            for j in 0..s.n_new {
                rowinfo.push(u32_of(s.n_past + j, "position")?);
                rowinfo.push(off);
            }
        }
        let rib = self.gpu.storage_u32(&rowinfo);
        let btb = self.gpu.storage_u32(&bt);
        let ub = self.gpu.uniform(&[
            u32_of(n_heads, "heads")?,
            u32_of(n_kv_heads, "kv heads")?,
            head_dim as u32,
            (n_heads / n_kv_heads) as u32,
            u32_of(block_size, "block size")?,
            u32_of(window.unwrap_or(0), "window")?,
            u32_of(rows, "rows")?,
            scale.to_bits(),
        ]);
        let groups = (
            u32_of(n_heads, "heads")?,
            rows.min(65535) as u32,
            rows.div_ceil(65535) as u32,
        );
        self.gpu.dispatch(
            Kernel::Attention,
            u32::from(f16),
            &[
                (0, Res::Buf(qb)),
                (1, Res::Buf(kp)),
                (2, Res::Buf(vp)),
                (3, Res::Buf(&rib)),
                (4, Res::Buf(&btb)),
                (5, Res::Buf(&st.buffer)),
                (6, Res::Buf(&ub)),
            ],
            groups,
        )?;
        Ok(out)
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
        let LinearAttnParams {
            n_heads: h,
            key_dim: dk,
            value_dim: dv,
            scale,
            chunk,
        } = *params;
        let n = beta.numel() / h.max(1);
        let shape_ok = h > 0
            && dk > 0
            && dv > 0
            && q.numel() == n * h * dk
            && k.numel() == n * h * dk
            && v.numel() == n * h * dv
            && beta.numel() == n * h
            && g.numel() == n * h
            && state.numel() == h * dv * dk;
        if !shape_ok {
            return Err(KernelError::Shape(format!(
                "linear_attention: q {:?} k {:?} v {:?} beta {:?} g {:?} state {:?} for {h} heads, dk {dk}, dv {dv}",
                q.shape, k.shape, v.shape, beta.shape, g.shape, state.shape
            )));
        }
        let bufs = [
            self.f32_tensor(q, "q")?,
            self.f32_tensor(k, "k")?,
            self.f32_tensor(v, "v")?,
            self.f32_tensor(beta, "beta")?,
            self.f32_tensor(g, "g")?,
            self.f32_tensor(state, "state")?,
        ];
        let (out, st) = self.output(vec![n, h * dv])?;
        if n == 0 || dv == 0 {
            return Ok(out);
        }
        self.storage(state)?.invalidate();
        let ub = self.gpu.uniform(&[
            u32_of(n, "n")?,
            u32_of(h, "heads")?,
            u32_of(dk, "dk")?,
            u32_of(dv, "dv")?,
            scale.to_bits(),
            // The chunk length changes how work is split, never the result; the kernel's
            // workgroup matrices hold at most 32 tokens.
            u32_of(chunk.min(32), "chunk")?,
            0,
            0,
        ]);
        let res = [
            (0, Res::Buf(bufs[0])),
            (1, Res::Buf(bufs[1])),
            (2, Res::Buf(bufs[2])),
            (3, Res::Buf(bufs[3])),
            (4, Res::Buf(bufs[4])),
            (5, Res::Buf(bufs[5])),
            (6, Res::Buf(&st.buffer)),
            (7, Res::Buf(&ub)),
        ];
        // Decode (and chunk <= 1) runs the token-by-token kernel; prefill the chunked one.
        if n == 1 || chunk <= 1 {
            self.gpu
                .dispatch(Kernel::LinearStep, 0, &res, Gpu::grid(h * dv, 64))?;
        } else {
            self.gpu
                .dispatch(Kernel::LinearChunked, 0, &res, (u32_of(h, "heads")?, 1, 1))?;
        }
        Ok(out)
    }

    fn gather_blocks(&self, pool: &Tensor, indices: &[u32]) -> Result<Vec<f32>> {
        let (pb, f16) = self.pool(pool, "pool")?;
        let row = self.pool_rows(pool, indices)?;
        let n = indices.len() * row;
        if n == 0 {
            return Ok(Vec::new());
        }
        let ob = self.gpu.alloc(n as u64 * 4)?;
        let ib = self.gpu.storage_u32(indices);
        let params = self
            .gpu
            .uniform(&[u32_of(indices.len(), "rows")?, u32_of(row, "row")?, 0, 0]);
        self.gpu.dispatch(
            Kernel::Rows,
            1 | u32::from(f16) << 1,
            &[
                (0, Res::Buf(pb)),
                (1, Res::Buf(&ib)),
                (2, Res::Buf(&ob)),
                (3, Res::Buf(&params)),
            ],
            Gpu::grid(n, 256),
        )?;
        let bytes = self.gpu.read(&ob, n as u64 * 4)?;
        drop(self.gpu.storage(ob));
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    fn scatter_blocks(&self, pool: &Tensor, indices: &[u32], data: &[f32]) -> Result<()> {
        let (pb, f16) = self.pool(pool, "pool")?;
        let row = self.pool_rows(pool, indices)?;
        if data.len() != indices.len() * row {
            return Err(KernelError::Shape(format!(
                "scatter_blocks: {} values for {} blocks of {row}",
                data.len(),
                indices.len()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.storage(pool)?.invalidate();
        let src = self
            .gpu
            .buffer_init(bytemuck::cast_slice(data), wgpu::BufferUsages::STORAGE);
        self.scatter_rows(pb, &src, indices, row, f16)
    }

    fn write(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        let b = self.f32_tensor(t, "write target")?;
        if data.len() != t.numel() {
            return Err(KernelError::Shape(format!(
                "write: {} values into {:?}",
                data.len(),
                t.shape
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.storage(t)?.invalidate();
        // Copy through the encoder (not queue.write_buffer) so the write stays ordered after
        // already-recorded reads of the old contents.
        let src = self
            .gpu
            .buffer_init(bytemuck::cast_slice(data), wgpu::BufferUsages::COPY_SRC);
        let size = data.len() as u64 * 4;
        self.gpu
            .record(|enc| enc.copy_buffer_to_buffer(&src, 0, b, 0, size))
    }
}

/// `add` (op 0) and `glu` (op 1: SiLU, op 2: GELU-tanh).
fn elementwise(be: &WgpuBackend, a: &Tensor, b: &Tensor, op: u32) -> Result<Tensor> {
    let ab = be.f32_tensor(a, "lhs")?;
    let bb = be.f32_tensor(b, "rhs")?;
    if a.shape != b.shape {
        return Err(KernelError::Shape(format!(
            "elementwise: {:?} vs {:?}",
            a.shape, b.shape
        )));
    }
    let (out, st) = be.output(a.shape.clone())?;
    let len = a.numel();
    let params = be.gpu.uniform(&[u32_of(len, "len")?, 0, 0, 0]);
    be.gpu.dispatch(
        Kernel::Elementwise,
        op,
        &[
            (0, Res::Buf(ab)),
            (1, Res::Buf(bb)),
            (2, Res::Buf(&st.buffer)),
            (3, Res::Buf(&params)),
        ],
        Gpu::grid(len, 256),
    )?;
    Ok(out)
}
