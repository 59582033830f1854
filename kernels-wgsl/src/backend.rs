//! The one interface both compute backends implement.
//!
//! The engine (crate `prfaas-node`) only ever talks to `dyn Backend` and opaque [`Tensor`]s, so a
//! model runs unchanged on the native `cpu` backend and on the portable `wgpu` backend. Shapes are
//! row-major; the last dimension is contiguous. Matmul weights use the GGUF convention: a weight of
//! shape `[n, k]` maps `k` inputs to `n` outputs and `matmul(x, w) = x · wᵀ`.
//!
//! The wgpu backend records operations lazily and submits them when a result is read back
//! ([`Backend::download`], [`Backend::argmax`]) or on [`Backend::sync`], so that a whole forward
//! step is one submission.

use std::fmt;
use std::sync::Arc;

use crate::reference;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
#[allow(non_camel_case_types)] // GGUF's names: Q4_K is not Q4K.
pub enum DType {
    F32,
    F16,
    /// GGUF Q4_1: blocks of 32 values, `{d: f16, m: f16, qs: [u8; 16]}` (20 bytes), `x = d·q + m`.
    Q4_1,
    /// GGUF Q8_0: blocks of 32 values, `{d: f16, qs: [i8; 32]}` (34 bytes), `x = d·q`.
    Q8_0,
    /// GGUF Q5_0: blocks of 32 values, `{d: f16, qh: [u8; 4], qs: [u8; 16]}` (22 bytes),
    /// `x = d·(q − 16)` with 5-bit `q`.
    Q5_0,
    /// GGUF Q4_K: super-blocks of 256 values, `{d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]}`
    /// (144 bytes): 8 sub-blocks of 32 with 6-bit scale and min, `x = d·sc·q − dmin·m`.
    Q4_K,
    /// GGUF Q6_K: super-blocks of 256 values, `{ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16}`
    /// (210 bytes): 16 sub-blocks of 16 with an 8-bit scale, `x = d·sc·(q − 32)` with 6-bit `q`.
    Q6_K,
}

impl DType {
    /// Values per storage block (1 for plain floats).
    pub const fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 => 1,
            DType::Q4_1 | DType::Q8_0 | DType::Q5_0 => 32,
            DType::Q4_K | DType::Q6_K => 256,
        }
    }

    /// Bytes per storage block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::Q4_1 => 20,
            DType::Q8_0 => 34,
            DType::Q5_0 => 22,
            DType::Q4_K => 144,
            DType::Q6_K => 210,
        }
    }

    /// Bytes needed for `n` values (`n` must be a multiple of [`DType::block_len`]).
    pub const fn bytes_for(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }
}

/// Which backend to use; `Auto` follows the rule in [`crate::select_backend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Auto,
    Cpu,
    Wgpu,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "wgpu" | "gpu" => Ok(BackendKind::Wgpu),
            other => Err(KernelError::InvalidArgument(format!(
                "unknown backend `{other}` (expected auto, cpu or wgpu)"
            ))),
        }
    }
}

/// Errors from the compute backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    #[error("no GPU adapter available: {0}")]
    NoAdapter(String),
    #[error("GPU device error: {0}")]
    Device(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("tensor belongs to another backend ({0})")]
    WrongBackend(&'static str),
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// The activation of a gated feed-forward layer, `act(gate) · up` ([`Backend::glu`]).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum GluAct {
    /// `silu(x) = x / (1 + e^−x)` (SwiGLU: Llama, Qwen, SmolLM2).
    #[default]
    Silu,
    /// The tanh approximation of GELU, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (GeGLU:
    /// Gemma; ggml's `ggml_gelu`).
    GeluTanh,
}

/// Rotary embedding layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])` rotate together (GGUF llama, llama.cpp `ROPE_TYPE_NORM`).
    Normal,
    /// Halves `(x[i], x[i + d/2])` rotate together (HF Llama/Qwen, llama.cpp `ROPE_TYPE_NEOX`).
    Neox,
}

/// Parameters of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub n_heads: usize,
    /// Must divide `n_heads` (GQA: query head `h` reads KV head `h / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Sliding window: a query at position `p` sees keys at positions `> p - window`.
    pub window: Option<usize>,
}

/// One sequence's view of a paged KV pool for [`Backend::attention`].
///
/// The sequence occupies token positions `0..n_past + n_new`; token at position `p` lives in
/// pool block `block_table[p / block_size]`, slot `p % block_size`. The `n_new` new tokens'
/// K/V must already have been written with [`Backend::kv_write`].
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    pub block_table: &'a [u32],
    /// Tokens before the new ones (cached prefix or earlier decode steps).
    pub n_past: usize,
    /// New query tokens (their rows are consecutive in `q`).
    pub n_new: usize,
}

/// Parameters of a gated delta-rule linear-attention layer.
///
/// Per head, with state `S ∈ R^{dv×dk}`, for each token `t` (keys/queries L2-normalised by the caller):
/// `S ← exp(g_t) · S`, `S ← S + β_t (v_t − S k_t) k_tᵀ`, `o_t = scale · S q_t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearAttnParams {
    pub n_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub scale: f32,
    /// Chunk length of the chunked (prefill) form; the result must equal the token-by-token form.
    pub chunk: usize,
}

/// A host-side tensor in any [`DType`], e.g. a weight read from a GGUF file.
#[derive(Clone)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl HostTensor {
    pub fn from_f32(shape: Vec<usize>, data: &[f32]) -> Self {
        Self {
            dtype: DType::F32,
            shape,
            bytes: bytemuck::cast_slice(data).to_vec(),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A tensor owned by one backend. Opaque to callers: read it with [`Backend::download`].
#[derive(Clone)]
pub struct Tensor {
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: DType,
    pub(crate) storage: Storage,
}

#[derive(Clone)]
pub(crate) enum Storage {
    Cpu(Arc<crate::cpu::CpuStorage>),
    Gpu(Arc<crate::gpu::GpuStorage>),
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Storage size in bytes.
    pub fn size_bytes(&self) -> usize {
        self.dtype.bytes_for(self.numel())
    }
    /// The same storage seen with another shape of equal element count (no copy). The engine
    /// needs it between ops that disagree on rank, e.g. a matmul's `[n, heads·head_dim]` output
    /// fed to `rope`, which wants `[n, heads, head_dim]`.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != self.numel() {
            return Err(KernelError::Shape(format!(
                "reshape {:?} -> {shape:?}",
                self.shape
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype: self.dtype,
            storage: self.storage.clone(),
        })
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match self.storage {
            Storage::Cpu(_) => "cpu",
            Storage::Gpu(_) => "wgpu",
        };
        write!(f, "Tensor({backend}, {:?}, {:?})", self.dtype, self.shape)
    }
}

/// What a backend reports about itself (logged at start-up and advertised by nodes).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendInfo {
    pub kind: BackendKind,
    /// e.g. "cpu (2 threads)" or "wgpu: NVIDIA H100 (Vulkan, discrete)".
    pub description: String,
    /// True for software rasterisers such as lavapipe.
    pub software: bool,
}

/// Compute operations used by the model engine. All tensors are `F32` unless stated otherwise
/// (weights may be quantized; KV pools may be `F16`).
///
/// Every operation has a plain reference twin in [`crate::reference`]; tests compare both
/// backends against it.
pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> BackendInfo;

    /// Copy a host tensor (any dtype; quantized weights stay quantized) to the backend.
    fn upload(&self, host: &HostTensor) -> Result<Tensor>;
    /// Read an `F32` or `F16` tensor back as `f32` (flushes pending GPU work).
    fn download(&self, t: &Tensor) -> Result<Vec<f32>>;
    /// A zero-filled `F32` tensor (recurrent state, f32 KV pools).
    fn zeros(&self, shape: &[usize]) -> Result<Tensor>;
    /// A zero-filled tensor of `dtype`: `F32`, or `F16` for KV pools (see [`crate::kv`]).
    /// The wgpu backend stores `F16` as pairs in 32-bit words, so it needs an even last
    /// dimension (a pool's `head_dim`); other dtypes are [`KernelError::Unsupported`].
    fn zeros_dtype(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => self.zeros(shape),
            other => Err(KernelError::Unsupported(format!(
                "zero-filled {other:?} tensors"
            ))),
        }
    }
    /// Wait until all recorded work has finished.
    fn sync(&self) -> Result<()>;
    /// Runs `f`, a sequence of ops, where this backend launches ops most cheaply. The CPU backend
    /// runs it on one of its worker threads: an op called from outside the pool is handed over
    /// and waited for (a wake-up of a worker and a sleep and wake-up of the caller, tens of µs),
    /// which is more than a batch-1 decode op takes; called from a worker, an op forks its work
    /// directly. Other backends run `f` in place.
    fn run(&self, f: &mut (dyn FnMut() + Send)) {
        f()
    }

    /// Rows of `table` (`[vocab, d]`, any dtype) for `ids` → `[ids.len(), d]`.
    fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor>;
    /// `x: [m, k]` (F32) · `w: [n, k]` (F32/F16/Q4_1/Q8_0)ᵀ → `[m, n]`.
    fn matmul(&self, x: &Tensor, w: &Tensor) -> Result<Tensor>;
    /// `x · wᵢᵀ` for several weights with the same `k` (a layer's q/k/v, or gate/up). Backends
    /// may share work between the products: the CPU backend quantizes `x` once and runs them all
    /// in one parallel region. Same results as one `matmul` per weight.
    fn matmul_many(&self, x: &Tensor, ws: &[&Tensor]) -> Result<Vec<Tensor>> {
        ws.iter().map(|w| self.matmul(x, w)).collect()
    }
    /// Row-wise RMSNorm: `x / sqrt(mean(x²) + eps) · w`, `w: [d]`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor>;
    /// Rotate `x: [n, heads, head_dim]` in place semantics (returns the result); row `i` is at
    /// position `positions[i]`; frequencies `base^(-2j/head_dim)`.
    fn rope(&self, x: &Tensor, positions: &[u32], base: f32, style: RopeStyle) -> Result<Tensor>;
    /// `act(gate) * up`, elementwise.
    fn glu(&self, gate: &Tensor, up: &Tensor, act: GluAct) -> Result<Tensor>;
    /// `silu(gate) * up`, elementwise.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        self.glu(gate, up, GluAct::Silu)
    }
    /// `x · s`, elementwise (Gemma's embedding scale). The default goes through the host; it
    /// runs once per forward step on `[tokens, hidden]`.
    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        let v = reference::scale(&self.download(x)?, s);
        self.upload(&HostTensor::from_f32(x.shape().to_vec(), &v))
    }
    /// `a + b`, elementwise, same shape.
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// Row-wise softmax of `x: [n, d]`.
    fn softmax(&self, x: &Tensor) -> Result<Tensor>;
    /// Index of the maximum of each row of `x: [n, d]` (lowest index on ties).
    fn argmax(&self, x: &Tensor) -> Result<Vec<u32>>;

    /// Write `k`, `v` (`[n, n_kv_heads, head_dim]`, `F32`) into a paged pool
    /// (`k_pool`, `v_pool`: `[n_blocks, block_size, n_kv_heads, head_dim]`, both `F32` or both
    /// `F16`; f16 pools get the values rounded to nearest even) at flat slots
    /// `slots[i] = block * block_size + offset`.
    fn kv_write(
        &self,
        k_pool: &Tensor,
        v_pool: &Tensor,
        k: &Tensor,
        v: &Tensor,
        slots: &[u32],
    ) -> Result<()>;
    /// Causal flash-style attention of `q: [Σ n_new, n_heads, head_dim]` over paged K/V for
    /// several sequences (rows of `q` are grouped by sequence, in order) → `[Σ n_new, n_heads·head_dim]`.
    /// The pools may be `F32` or `F16` (widened exactly; all arithmetic is `f32`).
    fn attention(
        &self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        seqs: &[AttnSeq<'_>],
        params: &AttnParams,
    ) -> Result<Tensor>;
    /// Gated delta-rule linear attention for one sequence: `q, k: [n, heads, dk]`,
    /// `v: [n, heads, dv]`, `beta, g: [n, heads]` (β in (0,1), g = log decay ≤ 0);
    /// `state: [heads, dv, dk]` is updated in place. Returns `[n, heads·dv]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        beta: &Tensor,
        g: &Tensor,
        state: &Tensor,
        params: &LinearAttnParams,
    ) -> Result<Tensor>;

    /// Copy rows/blocks out of a pool: `[indices.len(), rest of pool shape]` (KV export), as
    /// `f32` whatever the pool's dtype (`F32` or `F16`).
    fn gather_blocks(&self, pool: &Tensor, indices: &[u32]) -> Result<Vec<f32>>;
    /// Overwrite blocks of a pool from host data laid out as `gather_blocks` returns (KV import);
    /// an `F16` pool gets the values rounded to nearest even, so the f16 values `gather_blocks`
    /// returned come back bit for bit.
    fn scatter_blocks(&self, pool: &Tensor, indices: &[u32], data: &[f32]) -> Result<()>;
    /// Overwrite a whole `F32` tensor from host data (e.g. importing linear-attention state).
    fn write(&self, t: &Tensor, data: &[f32]) -> Result<()>;
}
