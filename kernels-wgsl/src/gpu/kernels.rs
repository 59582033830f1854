//! The WGSL kernel registry: sources (`include_str!`), entry points and bind-group layouts.
//!
//! Kernels are parameterised with WGSL pipeline constants (`override`) rather than copy-pasted;
//! a pipeline is compiled once per (kernel, constants) pair and cached by [`super::Gpu`].

use std::borrow::Cow;

const DEQUANT: &str = include_str!("../wgsl/dequant.wgsl");
const MATMUL: &str = include_str!("../wgsl/matmul.wgsl");
const MATVEC: &str = include_str!("../wgsl/matvec.wgsl");
const MATMUL_TEX: &str = include_str!("../wgsl/matmul_tex.wgsl");
const REPACK: &str = include_str!("../wgsl/repack.wgsl");
const EMBEDDING: &str = include_str!("../wgsl/embedding.wgsl");
const RMS_NORM: &str = include_str!("../wgsl/rms_norm.wgsl");
const ROPE: &str = include_str!("../wgsl/rope.wgsl");
const ELEMENTWISE: &str = include_str!("../wgsl/elementwise.wgsl");
const SOFTMAX: &str = include_str!("../wgsl/softmax.wgsl");
const ARGMAX: &str = include_str!("../wgsl/argmax.wgsl");
const ROWS: &str = include_str!("../wgsl/rows.wgsl");
const ATTENTION: &str = include_str!("../wgsl/attention.wgsl");
const ATTENTION_TEX: &str = include_str!("../wgsl/attention_tex.wgsl");
const LINEAR_ATTENTION: &str = include_str!("../wgsl/linear_attention.wgsl");

/// How a kernel binding is used (decides its bind-group layout entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bind {
    /// `var<storage, read>`
    Read,
    /// `var<storage, read_write>`
    ReadWrite,
    /// `var<uniform>`
    Uniform,
    /// `texture_2d<f32>` (sampled type float, not filterable: read with `textureLoad`).
    TexF32,
    /// `texture_2d<u32>`
    TexU32,
    /// `texture_storage_2d<rgba32float, write>`
    StoreTexF32,
    /// `texture_storage_2d<rgba32uint, write>`
    StoreTexU32,
}

/// Every compute kernel the wgpu backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Matmul,
    Matvec,
    MatmulTex,
    RepackF32,
    RepackQ41,
    Embedding,
    RmsNorm,
    Rope,
    Elementwise,
    Softmax,
    Argmax,
    Rows,
    Attention,
    AttentionTex,
    AttentionGather,
    LinearStep,
    LinearChunked,
}

impl Kernel {
    #[cfg(test)]
    pub(crate) const ALL: [Kernel; 17] = [
        Kernel::Matmul,
        Kernel::Matvec,
        Kernel::MatmulTex,
        Kernel::RepackF32,
        Kernel::RepackQ41,
        Kernel::Embedding,
        Kernel::RmsNorm,
        Kernel::Rope,
        Kernel::Elementwise,
        Kernel::Softmax,
        Kernel::Argmax,
        Kernel::Rows,
        Kernel::Attention,
        Kernel::AttentionTex,
        Kernel::AttentionGather,
        Kernel::LinearStep,
        Kernel::LinearChunked,
    ];

    /// Full WGSL source (shared snippets prepended).
    pub(crate) fn source(self) -> Cow<'static, str> {
        match self {
            Kernel::Matmul => Cow::Owned(format!("{DEQUANT}\n{MATMUL}")),
            Kernel::Matvec => Cow::Owned(format!("{DEQUANT}\n{MATVEC}")),
            Kernel::Embedding => Cow::Owned(format!("{DEQUANT}\n{EMBEDDING}")),
            Kernel::MatmulTex => Cow::Borrowed(MATMUL_TEX),
            Kernel::RepackF32 | Kernel::RepackQ41 => Cow::Owned(format!("{DEQUANT}\n{REPACK}")),
            Kernel::RmsNorm => Cow::Borrowed(RMS_NORM),
            Kernel::Rope => Cow::Borrowed(ROPE),
            Kernel::Elementwise => Cow::Borrowed(ELEMENTWISE),
            Kernel::Softmax => Cow::Borrowed(SOFTMAX),
            Kernel::Argmax => Cow::Borrowed(ARGMAX),
            Kernel::Rows => Cow::Borrowed(ROWS),
            Kernel::Attention => Cow::Borrowed(ATTENTION),
            Kernel::AttentionTex | Kernel::AttentionGather => Cow::Borrowed(ATTENTION_TEX),
            Kernel::LinearStep | Kernel::LinearChunked => Cow::Borrowed(LINEAR_ATTENTION),
        }
    }

    /// File name, for diagnostics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Matmul => "matmul.wgsl",
            Kernel::Matvec => "matvec.wgsl",
            Kernel::MatmulTex => "matmul_tex.wgsl",
            Kernel::RepackF32 => "repack.wgsl:repack_f32",
            Kernel::RepackQ41 => "repack.wgsl:repack_q4_1",
            Kernel::Embedding => "embedding.wgsl",
            Kernel::RmsNorm => "rms_norm.wgsl",
            Kernel::Rope => "rope.wgsl",
            Kernel::Elementwise => "elementwise.wgsl",
            Kernel::Softmax => "softmax.wgsl",
            Kernel::Argmax => "argmax.wgsl",
            Kernel::Rows => "rows.wgsl",
            Kernel::Attention => "attention.wgsl",
            Kernel::AttentionTex => "attention_tex.wgsl",
            Kernel::AttentionGather => "attention_tex.wgsl:gather",
            Kernel::LinearStep => "linear_attention.wgsl:step",
            Kernel::LinearChunked => "linear_attention.wgsl:chunked",
        }
    }

    pub(crate) fn entry(self) -> &'static str {
        match self {
            Kernel::LinearStep => "step",
            Kernel::LinearChunked => "chunked",
            Kernel::RepackF32 => "repack_f32",
            Kernel::RepackQ41 => "repack_q4_1",
            Kernel::AttentionGather => "gather",
            _ => "main",
        }
    }

    /// Pipeline constants for specialisation `spec` (the second half of the pipeline cache key).
    pub(crate) fn constants(self, spec: u32) -> Vec<(&'static str, f64)> {
        match self {
            Kernel::Matmul
            | Kernel::Matvec
            | Kernel::Embedding
            | Kernel::RepackF32
            | Kernel::RepackQ41 => vec![("WTYPE", f64::from(spec))],
            // bit 0: Q4_1 weights; bits 1..: rows per workgroup.
            Kernel::MatmulTex => vec![("WQ", f64::from(spec & 1)), ("ROWS", f64::from(spec >> 1))],
            Kernel::Elementwise => vec![("OP", f64::from(spec))],
            // bit 0: gather (else scatter); bit 1: the pool side is f16.
            Kernel::Rows => vec![
                ("GATHER", f64::from(spec & 1)),
                ("F16", f64::from((spec >> 1) & 1)),
            ],
            Kernel::Attention => vec![("KV_F16", f64::from(spec))],
            // Rows per workgroup, keys per lane and output texels per lane: 4 bits each.
            Kernel::AttentionTex => vec![
                ("R", f64::from(spec & 15)),
                ("C", f64::from((spec >> 4) & 15)),
                ("OC", f64::from((spec >> 8) & 15)),
            ],
            // bit 0: f16 pool; bit 1: paged (K/V) rather than query lines.
            Kernel::AttentionGather => vec![
                ("KV_F16", f64::from(spec & 1)),
                ("PAGED", f64::from((spec >> 1) & 1)),
            ],
            _ => Vec::new(),
        }
    }

    /// Whether the kernel needs `Features::SUBGROUP`.
    pub(crate) fn needs_subgroups(self) -> bool {
        matches!(
            self,
            Kernel::MatmulTex | Kernel::AttentionTex | Kernel::AttentionGather
        )
    }

    /// Bindings of group 0 used by the entry point: `(binding index, kind)`.
    pub(crate) fn bindings(self) -> &'static [(u32, Bind)] {
        use Bind::*;
        match self {
            Kernel::Matmul
            | Kernel::Matvec
            | Kernel::Embedding
            | Kernel::RmsNorm
            | Kernel::Rope
            | Kernel::Elementwise
            | Kernel::Rows => &[(0, Read), (1, Read), (2, ReadWrite), (3, Uniform)],
            // x texture, f32 weight texture, out, params, Q4_1 quant texture, Q4_1 scale texture
            Kernel::MatmulTex => &[
                (0, TexF32),
                (1, TexF32),
                (2, ReadWrite),
                (3, Uniform),
                (4, TexU32),
                (5, TexF32),
            ],
            Kernel::RepackF32 => &[(1, Read), (2, StoreTexF32), (3, Uniform)],
            Kernel::RepackQ41 => &[(1, Read), (3, Uniform), (4, StoreTexU32), (5, StoreTexF32)],
            Kernel::Softmax | Kernel::Argmax => &[(0, Read), (1, ReadWrite), (2, Uniform)],
            Kernel::Attention => &[
                (0, Read),
                (1, Read),
                (2, Read),
                (3, Read),
                (4, Read),
                (5, ReadWrite),
                (6, Uniform),
            ],
            // q, k and v textures, tiles, out, params
            Kernel::AttentionTex => &[
                (0, TexF32),
                (1, TexF32),
                (2, TexF32),
                (3, Read),
                (5, ReadWrite),
                (6, Uniform),
            ],
            // params, source (q or pool), pool slot per token, destination texture
            Kernel::AttentionGather => &[(7, Uniform), (8, Read), (9, Read), (10, StoreTexF32)],
            Kernel::LinearStep | Kernel::LinearChunked => &[
                (0, Read),
                (1, Read),
                (2, Read),
                (3, Read),
                (4, Read),
                (5, ReadWrite),
                (6, ReadWrite),
                (7, Uniform),
            ],
        }
    }
}
