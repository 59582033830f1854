//! HF model directories: `config.json` + `*.safetensors` (+ `tokenizer.json`, `tokenizer_config.json`).
//!
//! Supports the Llama, Qwen2 and Gemma 3 (text, `gemma3_text`) families. HF checkpoints keep Q/K
//! in the order the Python code rotates them (halves), so they run with [`RopeStyle::Neox`]; GGUF
//! files of Llama models are permuted for adjacent pairs. The weights go through the same
//! [`load_weights`] walk as GGUF's, with the family's [`NameMap`]. Qwen3 is refused with a clear
//! error (its QK-norm sits where the Gemma one does, but nobody has checked it against a reference).

use std::path::{Path, PathBuf};

use prfaas_kernels::{DType, GluAct, HostTensor, RopeStyle};
use safetensors::SafeTensors;

use super::config::{BlockStyle, LayerKind, ModelConfig};
use super::gguf::LoadedModel;
use super::tokenizer::{Tokenizer, TokenizerError};
use super::weights::{load_weights, NameMap, TensorSource, WeightError};

#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors { path: String, reason: String },
    #[error("no *.safetensors files in {0}")]
    NoWeights(String),
    #[error("unsupported model type {0:?} (supported: llama, mistral, qwen2, gemma3_text)")]
    UnsupportedArch(String),
    #[error("config.json: {0}")]
    Config(String),
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    BadShape {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name:?} has dtype {dtype} (supported: F32, F16, BF16)")]
    UnsupportedDType { name: String, dtype: String },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    /// A tensor that is there but unusable (see [`WeightError`]).
    #[error(transparent)]
    Weight(WeightError),
}

impl From<WeightError> for HfError {
    fn from(e: WeightError) -> Self {
        match e {
            WeightError::Missing(name) => HfError::MissingTensor(name),
            WeightError::BadShape {
                name,
                actual,
                expected,
            } => HfError::BadShape {
                name,
                actual,
                expected,
            },
            WeightError::UnsupportedDType { name, dtype, .. } => {
                HfError::UnsupportedDType { name, dtype }
            }
            other => HfError::Weight(other),
        }
    }
}

/// The subset of HF `config.json` we read.
#[derive(Debug, Clone, serde::Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f32,
    #[serde(default = "default_rope_theta")]
    rope_theta: f32,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    /// Absent: false for Llama/Qwen2, true for Gemma 3 (`Gemma3TextConfig`'s default).
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    /// Llama's optional q/k/v/o biases.
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    name_or_path: Option<String>,
    // Gemma 3 (`configuration_gemma3.py`, `Gemma3TextConfig`).
    /// Per layer, `"sliding_attention"` or `"full_attention"`.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    /// Older configs: layer `i` slides iff `(i + 1) % pattern != 0`.
    #[serde(default)]
    sliding_window_pattern: Option<usize>,
    #[serde(default)]
    sliding_window: Option<usize>,
    /// RoPE base of the sliding-window layers.
    #[serde(default)]
    rope_local_base_freq: Option<f32>,
    /// Queries are scaled by `query_pre_attn_scalar^-0.5`.
    #[serde(default)]
    query_pre_attn_scalar: Option<f32>,
    #[serde(default)]
    hidden_activation: Option<String>,
    #[serde(default)]
    final_logit_softcapping: Option<f32>,
    #[serde(default)]
    attn_logit_softcapping: Option<f32>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}

fn default_rope_theta() -> f32 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

fn read(path: &Path) -> Result<Vec<u8>, HfError> {
    std::fs::read(path).map_err(|source| HfError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The family a `model_type` belongs to: its tensor names and block details.
fn family(model_type: &str) -> Result<&'static NameMap, HfError> {
    match model_type {
        "llama" | "mistral" | "qwen2" => Ok(&NameMap::HF_LLAMA),
        "gemma3_text" => Ok(&NameMap::HF_GEMMA3),
        other => Err(HfError::UnsupportedArch(other.to_string())),
    }
}

fn model_config(cfg: &HfConfig, dir: &Path) -> Result<ModelConfig, HfError> {
    family(&cfg.model_type)?;
    let gemma = cfg.model_type == "gemma3_text";
    let qkv_bias = match cfg.model_type.as_str() {
        "qwen2" => true,
        _ => cfg.attention_bias,
    };
    let n_kv_heads = cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads);
    let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
    if h == 0
        || nh == 0
        || n_kv_heads == 0
        || nh % n_kv_heads != 0
        || (cfg.head_dim.is_none() && h % nh != 0)
    {
        return Err(HfError::Config(format!(
            "inconsistent attention geometry: hidden {h}, heads {nh}, kv heads {n_kv_heads}"
        )));
    }
    if cfg.num_hidden_layers == 0 || cfg.num_hidden_layers > 1024 || cfg.vocab_size == 0 {
        return Err(HfError::Config(
            "layer count or vocab size out of range".into(),
        ));
    }
    let name = cfg.name_or_path.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "hf-model".into())
    });
    let head_dim = cfg.head_dim.unwrap_or(h / nh);
    let (layers, block) = if gemma {
        gemma3_details(cfg, h, head_dim)?
    } else {
        (
            vec![LayerKind::Full; cfg.num_hidden_layers],
            BlockStyle::default(),
        )
    };
    Ok(ModelConfig {
        name,
        arch: if gemma {
            "gemma3".into()
        } else {
            cfg.model_type.clone()
        },
        vocab_size: cfg.vocab_size,
        hidden_size: h,
        intermediate_size: cfg.intermediate_size,
        n_heads: nh,
        n_kv_heads,
        head_dim,
        rms_eps: cfg.rms_norm_eps,
        rope_base: cfg.rope_theta,
        rope_style: RopeStyle::Neox,
        max_context: cfg.max_position_embeddings,
        tie_embeddings: cfg.tie_word_embeddings.unwrap_or(gemma),
        qkv_bias,
        layers,
        block,
    })
}

/// Gemma 3's layer pattern and block details from `Gemma3TextConfig`, as `modeling_gemma3.py`
/// applies them (the same [`BlockStyle`] the GGUF reader derives from llama.cpp's gemma3 code).
fn gemma3_details(
    cfg: &HfConfig,
    hidden: usize,
    head_dim: usize,
) -> Result<(Vec<LayerKind>, BlockStyle), HfError> {
    let n = cfg.num_hidden_layers;
    if cfg.final_logit_softcapping.is_some() || cfg.attn_logit_softcapping.is_some() {
        return Err(HfError::Config(
            "gemma3: logit soft-capping is not supported".into(),
        ));
    }
    // Gemma 3 1B+ scale the global layers' RoPE (`rope_scaling`); the engine has one base per
    // layer kind and no scaling, so refuse rather than run those wrong.
    if cfg.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(HfError::Config(
            "gemma3: rope_scaling is not supported".into(),
        ));
    }
    match cfg.hidden_activation.as_deref() {
        None | Some("gelu_pytorch_tanh") => {}
        Some(other) => {
            return Err(HfError::Config(format!(
                "gemma3: hidden_activation {other:?} (supported: gelu_pytorch_tanh)"
            )))
        }
    }
    let sliding: Vec<bool> = match (&cfg.layer_types, cfg.sliding_window_pattern) {
        (Some(types), _) => {
            if types.len() != n {
                return Err(HfError::Config(format!(
                    "layer_types has {} entries for {n} layers",
                    types.len()
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(HfError::Config(format!("unknown layer type {other:?}"))),
                })
                .collect::<Result<_, _>>()?
        }
        (None, Some(0)) => vec![false; n],
        (None, pattern) => {
            let p = pattern.unwrap_or(6);
            (0..n).map(|i| (i + 1) % p != 0).collect()
        }
    };
    let window = cfg.sliding_window.unwrap_or(0);
    if window == 0 && sliding.iter().any(|&s| s) {
        return Err(HfError::Config(
            "sliding-window layers without a sliding_window".into(),
        ));
    }
    let layers = sliding
        .iter()
        .map(|&s| {
            if s {
                LayerKind::Sliding { window }
            } else {
                LayerKind::Full
            }
        })
        .collect();
    let query_scalar = cfg.query_pre_attn_scalar.unwrap_or(head_dim as f32);
    if !(query_scalar > 0.0 && query_scalar.is_finite()) {
        return Err(HfError::Config(format!(
            "query_pre_attn_scalar {query_scalar}"
        )));
    }
    let block = BlockStyle {
        glu_act: GluAct::GeluTanh,
        // Gemma3TextScaledWordEmbedding: embeddings · hidden_size^0.5.
        embed_scale: Some((hidden as f32).sqrt()),
        query_scale: Some(1.0 / query_scalar.sqrt()),
        qk_norm: true,
        post_norms: true,
        rope_base_local: Some(cfg.rope_local_base_freq.unwrap_or(10_000.0)),
    };
    Ok((layers, block))
}

/// All `*.safetensors` shards, parsed (bounds and header checked by the `safetensors` crate).
struct Shards {
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl Shards {
    fn open(dir: &Path) -> Result<Self, HfError> {
        let rd = std::fs::read_dir(dir).map_err(|source| HfError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(HfError::NoWeights(dir.display().to_string()));
        }
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let bytes = read(&p)?;
            // Validate now so later lookups cannot fail on a corrupt header.
            SafeTensors::deserialize(&bytes).map_err(|e| HfError::Safetensors {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?;
            files.push((p, bytes));
        }
        Ok(Self { files })
    }

    fn hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        for (_, bytes) in &self.files {
            h.update_rayon(bytes);
        }
        h.finalize().to_hex().to_string()
    }
}

impl TensorSource for Shards {
    fn tensor(&self, name: &str, expected: &[usize]) -> Result<HostTensor, WeightError> {
        for (path, bytes) in &self.files {
            // Validated in `open`; a failure here would be a changed file, still an error.
            let st = SafeTensors::deserialize(bytes).map_err(|e| WeightError::Corrupt {
                name: name.into(),
                reason: format!("{}: {e}", path.display()),
            })?;
            let Ok(view) = st.tensor(name) else { continue };
            if view.shape() != expected {
                return Err(WeightError::BadShape {
                    name: name.into(),
                    actual: view.shape().to_vec(),
                    expected: expected.to_vec(),
                });
            }
            let data = view.data();
            let (dtype, bytes) = match view.dtype() {
                safetensors::Dtype::F32 => (DType::F32, data.to_vec()),
                safetensors::Dtype::F16 => (DType::F16, data.to_vec()),
                // No bf16 kernels: widen exactly to f32.
                safetensors::Dtype::BF16 => {
                    let mut out = Vec::with_capacity(data.len() * 2);
                    for c in data.chunks_exact(2) {
                        out.extend_from_slice(&[0, 0, c[0], c[1]]);
                    }
                    (DType::F32, out)
                }
                other => {
                    return Err(WeightError::UnsupportedDType {
                        name: name.into(),
                        dtype: format!("{other:?}"),
                        supported: "supported: F32, F16, BF16",
                    })
                }
            };
            return Ok(HostTensor {
                dtype,
                shape: expected.to_vec(),
                bytes,
            });
        }
        Err(WeightError::Missing(name.to_string()))
    }

    fn has(&self, name: &str) -> bool {
        self.files
            .iter()
            .any(|(_, b)| SafeTensors::deserialize(b).is_ok_and(|st| st.tensor(name).is_ok()))
    }
}

/// `tokenizer_config.json`, when the directory has one.
fn tokenizer_config(dir: &Path) -> Result<Option<serde_json::Value>, HfError> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(None);
    }
    serde_json::from_slice(&read(&path)?)
        .map(Some)
        .map_err(|source| HfError::Json {
            path: path.display().to_string(),
            source,
        })
}

/// Chat template from `tokenizer_config.json` (a string, or HF's list of named templates).
fn chat_template(config: Option<&serde_json::Value>) -> Option<String> {
    let v = config?;
    match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Load an HF model directory.
pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel, HfError> {
    let cfg_path = dir.join("config.json");
    let hf: HfConfig =
        serde_json::from_slice(&read(&cfg_path)?).map_err(|source| HfError::Json {
            path: cfg_path.display().to_string(),
            source,
        })?;
    let mut config = model_config(&hf, dir)?;
    let names = family(&hf.model_type)?;
    let shards = Shards::open(dir)?;
    // Some tied checkpoints still store lm_head; tie only when it is absent.
    config.tie_embeddings = config.tie_embeddings && !shards.has("lm_head.weight");
    let weights = load_weights(&shards, &config, names)?;
    let tok_config = tokenizer_config(dir)?;
    let add_bos = tok_config
        .as_ref()
        .and_then(|v| v.get("add_bos_token"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let tokenizer = Tokenizer::from_hf_file(&dir.join("tokenizer.json"))?.with_add_bos(add_bos);
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(HfError::Config(format!(
            "tokenizer has {} tokens but vocab_size is {}",
            tokenizer.vocab_size(),
            config.vocab_size
        )));
    }
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        chat_template: chat_template(tok_config.as_ref()),
        weights_hash: shards.hash(),
    })
}
