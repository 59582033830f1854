//! GGUF (v2/v3) reader: metadata + tensor table → [`ModelConfig`] + [`ModelWeights`] + [`Tokenizer`].
//!
//! A small hand-written parser rather than a crate: the maintained GGUF readers either live inside a
//! whole inference framework (candle) or do not bound hostile length fields. Every length read from
//! the file is checked against the bytes that remain before anything is allocated, so a corrupt or
//! malicious file gives a [`GgufError`], never a panic or a huge allocation.
//!
//! Tensor data stays quantized: each tensor becomes a [`HostTensor`] whose shape is GGUF's `ne`
//! reversed (`[out, in]` for matrices), with the raw block bytes copied out of the file.

use std::collections::HashMap;
use std::path::Path;

use prfaas_kernels::{DType, GluAct, HostTensor, RopeStyle};

use super::config::{BlockStyle, LayerKind, ModelConfig, ModelWeights};
use super::tokenizer::{Tokenizer, TokenizerError};
use super::weights::{load_weights, NameMap, TensorSource, WeightError};

/// "GGUF" read as a little-endian u32.
const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: usize = 4;
/// Nested metadata arrays deeper than this are not produced by any writer we know of; refusing them
/// bounds the recursion on hostile input.
const MAX_ARRAY_DEPTH: usize = 4;
const DEFAULT_ALIGNMENT: u64 = 32;
/// Longest metadata array accepted. Real vocabularies are < 300k entries; the bound keeps a hostile
/// file from turning each of its bytes into a 32-byte [`MetaValue`] (a 100 MB file → 3 GB).
const MAX_ARRAY_LEN: u64 = 1 << 22;
/// Up-front reservation cap: counts from the file are only trusted as far as the bytes behind them.
const MAX_RESERVE: usize = 4096;

/// Why a GGUF file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("file truncated: needed {needed} bytes at offset {offset} while reading {what}, file has {len}")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: u64,
        len: usize,
    },
    #[error("invalid GGUF: {0}")]
    Invalid(String),
    #[error("unknown metadata value type {ty} for key {key:?}")]
    UnknownValueType { key: String, ty: u32 },
    #[error("tensor {name:?} has ggml type {ty} which this engine does not support (supported: F32, F16, Q4_1, Q8_0, Q5_0, Q4_K, Q6_K)")]
    UnsupportedTensorType { name: String, ty: u32 },
    #[error(
        "tensor {name:?}: data [{start}, {end}) lies outside the file's data section (size {size})"
    )]
    TensorOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("missing metadata key {0:?}")]
    MissingKey(String),
    #[error("metadata key {key:?} has the wrong type (expected {expected})")]
    WrongType { key: String, expected: &'static str },
    #[error("unsupported architecture {0:?} (supported: llama, gemma3)")]
    UnsupportedArch(String),
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    /// A tensor that is there but unusable (see [`WeightError`]).
    #[error(transparent)]
    Weight(WeightError),
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    BadShape {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
}

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type as u64 (negative values are rejected).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `ne[0]` is the contiguous (input) dimension.
    pub ne: Vec<u64>,
    pub dtype: DType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    /// Byte length of the tensor data.
    pub size: u64,
}

impl TensorInfo {
    /// Row-major shape, outermost first (`ne` reversed): `[out, in]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file: metadata, tensor table and the raw bytes.
#[derive(Debug)]
pub struct GgufFile {
    pub version: u32,
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    /// Offset of the data section in `bytes`.
    pub data_offset: usize,
    bytes: Vec<u8>,
}

impl From<WeightError> for GgufError {
    fn from(e: WeightError) -> Self {
        match e {
            WeightError::Missing(name) => GgufError::MissingTensor(name),
            WeightError::BadShape {
                name,
                actual,
                expected,
            } => GgufError::BadShape {
                name,
                actual,
                expected,
            },
            other => GgufError::Weight(other),
        }
    }
}

/// Everything needed to run a model, whatever format it came from.
#[derive(Debug)]
pub struct LoadedModel {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
    /// Jinja chat template from the file, if it has one (render with [`super::chat::ChatTemplate`]).
    pub chat_template: Option<String>,
    /// blake3 of the weights, hex. Two nodes with the same hash run bit-identical weights; the mesh
    /// uses it to decide whether a peer's KV is usable.
    pub weights_hash: String,
}

/// Bounds-checked little-endian cursor over the file bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n,
                len: self.buf.len(),
            });
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            GgufError::Invalid(format!("{what} at offset {} is not valid UTF-8", self.pos))
        })
    }

    fn value(&mut self, key: &str, ty: u32, depth: usize) -> Result<MetaValue, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(W)?[0]),
            1 => MetaValue::I8(self.array::<1>(W)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(W)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(W)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(W)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(W)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(W)?)),
            7 => match self.array::<1>(W)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(GgufError::Invalid(format!("key {key:?}: bool byte {b}"))),
            },
            8 => MetaValue::String(self.string("metadata string")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Invalid(format!(
                        "key {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem_ty = self.u32("array element type")?;
                let count = self.u64("array length")?;
                let min_elem =
                    min_value_size(elem_ty).ok_or_else(|| GgufError::UnknownValueType {
                        key: key.to_string(),
                        ty: elem_ty,
                    })?;
                // A hostile count cannot make us allocate more than the file could hold.
                if count.saturating_mul(min_elem) > self.remaining() {
                    return Err(GgufError::Truncated {
                        what: "metadata array",
                        offset: self.pos,
                        needed: count.saturating_mul(min_elem),
                        len: self.buf.len(),
                    });
                }
                if count > MAX_ARRAY_LEN {
                    return Err(GgufError::Invalid(format!(
                        "key {key:?}: array of {count} elements (limit {MAX_ARRAY_LEN})"
                    )));
                }
                let mut out = Vec::with_capacity((count as usize).min(MAX_RESERVE));
                for _ in 0..count {
                    out.push(self.value(key, elem_ty, depth + 1)?);
                }
                MetaValue::Array(out)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(W)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(W)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(W)?)),
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_string(),
                    ty,
                })
            }
        })
    }
}

/// Smallest encoded size of a value of GGUF type `ty` (None for unknown types).
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,     // u64 length
        9 => 4 + 8, // element type + count
        10..=12 => 8,
        _ => return None,
    })
}

/// ggml type id → our dtype (None for types the kernels cannot run).
fn ggml_dtype(ty: u32) -> Option<DType> {
    match ty {
        0 => Some(DType::F32),
        1 => Some(DType::F16),
        3 => Some(DType::Q4_1),
        6 => Some(DType::Q5_0),
        8 => Some(DType::Q8_0),
        12 => Some(DType::Q4_K),
        14 => Some(DType::Q6_K),
        _ => None,
    }
}

impl GgufFile {
    /// Read and parse a GGUF file from disk.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let bytes = std::fs::read(path).map_err(|source| GgufError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(bytes)
    }

    /// Parse GGUF bytes already in memory.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, GgufError> {
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
        };
        let magic: [u8; 4] = r.array("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each KV needs ≥ 8 (key len) + 4 (type) + 1 bytes, each tensor info ≥ 8 + 4 + 8 + 4 + 8.
        if n_kv.saturating_mul(13) > r.remaining() {
            return Err(GgufError::Invalid(format!(
                "metadata count {n_kv} cannot fit in a {}-byte file",
                bytes.len()
            )));
        }
        if n_tensors.saturating_mul(32) > r.remaining() {
            return Err(GgufError::Invalid(format!(
                "tensor count {n_tensors} cannot fit in a {}-byte file",
                bytes.len()
            )));
        }
        let mut metadata = HashMap::with_capacity((n_kv as usize).min(MAX_RESERVE));
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata value type")?;
            let value = r.value(&key, ty, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity((n_tensors as usize).min(MAX_RESERVE));
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dims")? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Invalid(format!(
                    "tensor {name:?} has {n_dims} dimensions (1..={MAX_DIMS})"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(r.u64("tensor shape")?);
            }
            let ty = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            let dtype = ggml_dtype(ty).ok_or_else(|| GgufError::UnsupportedTensorType {
                name: name.clone(),
                ty,
            })?;
            let block = dtype.block_len() as u64;
            if ne[0] % block != 0 {
                return Err(GgufError::Invalid(format!(
                    "tensor {name:?}: row length {} is not a multiple of the {dtype:?} block size {block}",
                    ne[0]
                )));
            }
            // Overflow means a hostile shape; a merely large one is caught by the bounds check below.
            let size = ne
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .and_then(|n| (n / block).checked_mul(dtype.block_bytes() as u64))
                .ok_or_else(|| {
                    GgufError::Invalid(format!("tensor {name:?} shape {ne:?} overflows"))
                })?;
            tensors.push(TensorInfo {
                name,
                ne,
                dtype,
                offset,
                size,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| {
                GgufError::Invalid("general.alignment is not a power of two".into())
            })?,
        };
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        if data_offset > bytes.len() as u64 {
            return Err(GgufError::Truncated {
                what: "data section",
                offset: r.pos,
                needed: data_offset - r.pos as u64,
                len: bytes.len(),
            });
        }
        let data_size = bytes.len() as u64 - data_offset;
        for t in &tensors {
            let end = t.offset.saturating_add(t.size);
            if end > data_size {
                return Err(GgufError::TensorOutOfBounds {
                    name: t.name.clone(),
                    start: t.offset,
                    end,
                    size: data_size,
                });
            }
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            data_offset: data_offset as usize,
            bytes,
        })
    }

    /// Raw bytes of a tensor's data (bounds were checked in [`GgufFile::parse`]).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = self.data_offset + t.offset as usize;
        &self.bytes[start..start + t.size as usize]
    }

    /// blake3 over the whole data section (all tensor bytes), hex.
    pub fn weights_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update_rayon(&self.bytes[self.data_offset..]);
        h.finalize().to_hex().to_string()
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    fn req(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.req(key)?.as_str().ok_or(GgufError::WrongType {
            key: key.into(),
            expected: "string",
        })
    }
    pub fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.req(key)?.as_u64().ok_or(GgufError::WrongType {
            key: key.into(),
            expected: "unsigned integer",
        })?;
        usize::try_from(v).map_err(|_| GgufError::Invalid(format!("{key} = {v} is too large")))
    }
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.req(key)?.as_f32().ok_or(GgufError::WrongType {
            key: key.into(),
            expected: "number",
        })
    }
    /// A string array (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let arr = self.req(key)?.as_array().ok_or(GgufError::WrongType {
            key: key.into(),
            expected: "array",
        })?;
        arr.iter()
            .map(|v| {
                v.as_str().ok_or(GgufError::WrongType {
                    key: key.into(),
                    expected: "array of strings",
                })
            })
            .collect()
    }
    /// An integer array (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        let arr = self.req(key)?.as_array().ok_or(GgufError::WrongType {
            key: key.into(),
            expected: "array",
        })?;
        arr.iter()
            .map(|v| {
                v.as_i64().ok_or(GgufError::WrongType {
                    key: key.into(),
                    expected: "array of integers",
                })
            })
            .collect()
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
    }

    /// Architecture hyper-parameters from the metadata (arch `llama` or `gemma3`).
    pub fn model_config(&self) -> Result<ModelConfig, GgufError> {
        let arch = self.get_str("general.architecture")?.to_string();
        if arch != "llama" && arch != "gemma3" {
            return Err(GgufError::UnsupportedArch(arch));
        }
        let prefix = arch.clone();
        let k = |s: &str| format!("{prefix}.{s}");
        let hidden = self.get_usize(&k("embedding_length"))?;
        let n_layers = self.get_usize(&k("block_count"))?;
        let n_heads = self.get_usize(&k("attention.head_count"))?;
        let n_kv_heads = match self.get(&k("attention.head_count_kv")) {
            Some(_) => self.get_usize(&k("attention.head_count_kv"))?,
            None => n_heads,
        };
        if hidden == 0
            || n_heads == 0
            || n_kv_heads == 0
            || hidden % n_heads != 0
            || n_heads % n_kv_heads != 0
        {
            return Err(GgufError::Invalid(format!(
                "inconsistent attention geometry: hidden {hidden}, heads {n_heads}, kv heads {n_kv_heads}"
            )));
        }
        if n_layers == 0 || n_layers > 1024 {
            return Err(GgufError::Invalid(format!(
                "block_count {n_layers} out of range"
            )));
        }
        let head_dim = match self.get(&k("attention.key_length")) {
            Some(_) => self.get_usize(&k("attention.key_length"))?,
            None => hidden / n_heads,
        };
        let vocab_size = match self.get(&k("vocab_size")) {
            Some(_) => self.get_usize(&k("vocab_size"))?,
            None => self.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_base = match self.get(&k("rope.freq_base")) {
            Some(_) => self.get_f32(&k("rope.freq_base"))?,
            None => 10_000.0,
        };
        let name = self
            .get("general.name")
            .and_then(MetaValue::as_str)
            .unwrap_or("gguf-model")
            .to_string();
        let (layers, block, rope_style) = if arch == "gemma3" {
            self.gemma3_details(n_layers, hidden, n_heads, head_dim)?
        } else {
            // convert_hf_to_gguf.py permutes Q/K rows of llama models so that adjacent-pair
            // rotation is correct (llama.cpp ROPE_TYPE_NORM).
            (
                vec![LayerKind::Full; n_layers],
                BlockStyle::default(),
                RopeStyle::Normal,
            )
        };
        Ok(ModelConfig {
            name,
            arch,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: self.get_usize(&k("feed_forward_length"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_eps: self.get_f32(&k("attention.layer_norm_rms_epsilon"))?,
            rope_base,
            rope_style,
            max_context: self.get_usize(&k("context_length"))?,
            tie_embeddings: !self.has_tensor("output.weight"),
            qkv_bias: self.has_tensor("blk.0.attn_q.bias"),
            layers,
            block,
        })
    }

    /// Gemma 3's layer pattern and block details, each as llama.cpp's gemma3 implementation
    /// (vendored llama.cpp 0c1e570: `src/models/gemma3.cpp`, `src/llama-hparams.cpp`,
    /// `conversion/gemma.py`) reads or applies it.
    fn gemma3_details(
        &self,
        n_layers: usize,
        hidden: usize,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<(Vec<LayerKind>, BlockStyle, RopeStyle), GgufError> {
        let k = |s: &str| format!("gemma3.{s}");
        // `final_logit_softcapping` is gone in Gemma 3 (the converter writes it only when the HF
        // config has one); refuse a file that has it rather than run it wrong.
        if let Some(cap) = self
            .get(&k("final_logit_softcapping"))
            .and_then(MetaValue::as_f32)
        {
            if cap != 0.0 {
                return Err(GgufError::Invalid(format!(
                    "gemma3 final_logit_softcapping {cap} is not supported"
                )));
            }
        }
        // Sliding window: `attention.sliding_window` (absent means every layer is global,
        // LLAMA_SWA_TYPE_NONE). Pattern: a per-layer bool array, or an integer n with layer `il`
        // sliding iff `il % n < n - 1` (`set_swa_pattern`, default n = 6: 5 local : 1 global).
        let window = match self.get(&k("attention.sliding_window")) {
            Some(_) => self.get_usize(&k("attention.sliding_window"))?,
            None => 0,
        };
        let pattern_key = k("attention.sliding_window_pattern");
        let is_swa: Vec<bool> = match self.get(&pattern_key) {
            Some(MetaValue::Array(a)) => {
                let v: Option<Vec<bool>> = a.iter().map(MetaValue::as_bool).collect();
                match v {
                    Some(v) if v.len() == n_layers => v,
                    _ => {
                        return Err(GgufError::Invalid(format!(
                            "{pattern_key}: expected {n_layers} booleans"
                        )))
                    }
                }
            }
            Some(_) => {
                let n = self.get_usize(&pattern_key)?;
                (0..n_layers).map(|il| n == 0 || il % n < n - 1).collect()
            }
            None => (0..n_layers).map(|il| il % 6 < 5).collect(),
        };
        let layers = is_swa
            .iter()
            .map(|&swa| {
                if swa && window > 0 {
                    LayerKind::Sliding { window }
                } else {
                    LayerKind::Full
                }
            })
            .collect();
        // Local layers' RoPE base: `rope.freq_base_swa`, else llama.cpp's default
        // `rope_freq_base_train_swa = 10000` (the converter does not write it for Gemma 3; HF's
        // `rope_local_base_freq` is 10000).
        let rope_base_local = match self.get(&k("rope.freq_base_swa")) {
            Some(_) => self.get_f32(&k("rope.freq_base_swa"))?,
            None => 10_000.0,
        };
        // `f_attention_scale` (gemma3.cpp, after gemma_pytorch config.py): 1/sqrt(head_dim), but
        // 1/sqrt(hidden / heads) for the 62-layer 27B model; it scales Q before attention.
        let query_scale = if n_layers == 62 {
            1.0 / ((hidden / n_heads) as f32).sqrt()
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        let block = BlockStyle {
            // build_ffn(..., LLM_FFN_GELU, LLM_FFN_PAR): ggml_geglu_split = gelu_tanh(gate) · up.
            glu_act: GluAct::GeluTanh,
            // `ggml_scale(inpL, sqrtf(n_embd))` on token embeddings.
            embed_scale: Some((hidden as f32).sqrt()),
            query_scale: Some(query_scale),
            // attn_q_norm / attn_k_norm: RMSNorm over each head before RoPE.
            qk_norm: true,
            // attn_post_norm before the attention residual, ffn_post_norm before the FFN one.
            post_norms: true,
            rope_base_local: Some(rope_base_local),
        };
        // Norm weights need no `1 +`: `conversion/gemma.py` (Gemma3Model.norm_shift) adds it when
        // writing the GGUF. RoPE: LLM_ARCH_GEMMA3 is LLAMA_ROPE_TYPE_NEOX (halves rotate).
        Ok((layers, block, RopeStyle::Neox))
    }

    /// Tensors named as llama.cpp names them (llama, gemma3), shapes checked against `cfg`.
    pub fn model_weights(&self, cfg: &ModelConfig) -> Result<ModelWeights, GgufError> {
        Ok(load_weights(self, cfg, &NameMap::GGUF)?)
    }
}

impl TensorSource for GgufFile {
    fn tensor(&self, name: &str, expected: &[usize]) -> Result<HostTensor, WeightError> {
        let t = self
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| WeightError::Missing(name.to_string()))?;
        let shape = t.shape();
        if shape != expected {
            return Err(WeightError::BadShape {
                name: name.into(),
                actual: shape,
                expected: expected.to_vec(),
            });
        }
        Ok(HostTensor {
            dtype: t.dtype,
            shape,
            bytes: self.tensor_data(t).to_vec(),
        })
    }

    fn has(&self, name: &str) -> bool {
        self.has_tensor(name)
    }
}

/// Load a GGUF model: config, quantized weights, tokenizer, chat template and weights hash.
pub fn load_gguf(path: &Path) -> Result<LoadedModel, GgufError> {
    let file = GgufFile::open(path)?;
    let config = file.model_config()?;
    let weights = file.model_weights(&config)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    if tokenizer.vocab_size() != config.vocab_size {
        return Err(GgufError::Invalid(format!(
            "tokenizer has {} tokens but the model's vocab is {}",
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    let chat_template = file
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
        .map(str::to_string);
    let weights_hash = file.weights_hash();
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        chat_template,
        weights_hash,
    })
}
