//! HF model directories: `config.json` + `*.safetensors` (+ `tokenizer.json`, `tokenizer_config.json`).
//!
//! Supports the Llama and Qwen2 families. HF checkpoints keep Q/K in the order the Python code rotates
//! them (halves), so they run with [`RopeStyle::Neox`]; GGUF files are permuted for adjacent pairs.
//! Qwen3 is refused with a clear error: it adds per-head q/k RMS norms the engine does not have.

use std::path::{Path, PathBuf};

use prfaas_kernels::{DType, HostTensor, RopeStyle};
use safetensors::SafeTensors;

use super::config::{
    AttentionWeights, LayerKind, LayerWeights, MixerWeights, ModelConfig, ModelWeights,
};
use super::gguf::LoadedModel;
use super::tokenizer::{Tokenizer, TokenizerError};

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
    #[error("unsupported model type {0:?} (supported: llama, qwen2)")]
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
    #[serde(default)]
    tie_word_embeddings: bool,
    /// Llama's optional q/k/v/o biases.
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    name_or_path: Option<String>,
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

fn model_config(cfg: &HfConfig, dir: &Path) -> Result<ModelConfig, HfError> {
    let qkv_bias = match cfg.model_type.as_str() {
        "llama" | "mistral" => cfg.attention_bias,
        "qwen2" => true,
        other => return Err(HfError::UnsupportedArch(other.to_string())),
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
    Ok(ModelConfig {
        name,
        arch: cfg.model_type.clone(),
        vocab_size: cfg.vocab_size,
        hidden_size: h,
        intermediate_size: cfg.intermediate_size,
        n_heads: nh,
        n_kv_heads,
        head_dim: cfg.head_dim.unwrap_or(h / nh),
        rms_eps: cfg.rms_norm_eps,
        rope_base: cfg.rope_theta,
        rope_style: RopeStyle::Neox,
        max_context: cfg.max_position_embeddings,
        tie_embeddings: cfg.tie_word_embeddings,
        qkv_bias,
        layers: vec![LayerKind::Full; cfg.num_hidden_layers],
        block: Default::default(),
    })
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

    fn get(&self, name: &str, expected: &[usize]) -> Result<HostTensor, HfError> {
        for (path, bytes) in &self.files {
            let st = SafeTensors::deserialize(bytes).map_err(|e| HfError::Safetensors {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            let Ok(view) = st.tensor(name) else { continue };
            if view.shape() != expected {
                return Err(HfError::BadShape {
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
                    return Err(HfError::UnsupportedDType {
                        name: name.into(),
                        dtype: format!("{other:?}"),
                    })
                }
            };
            return Ok(HostTensor {
                dtype,
                shape: expected.to_vec(),
                bytes,
            });
        }
        Err(HfError::MissingTensor(name.to_string()))
    }

    fn has(&self, name: &str) -> bool {
        self.files
            .iter()
            .any(|(_, b)| SafeTensors::deserialize(b).is_ok_and(|st| st.tensor(name).is_ok()))
    }
}

fn model_weights(shards: &Shards, cfg: &ModelConfig) -> Result<ModelWeights, HfError> {
    let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let q_dim = cfg.n_heads * cfg.head_dim;
    let kv_dim = cfg.n_kv_heads * cfg.head_dim;
    let mut layers = Vec::with_capacity(cfg.n_layers());
    for i in 0..cfg.n_layers() {
        let n = |s: &str| format!("model.layers.{i}.{s}");
        let bias = |s: &str, len: usize| -> Result<Option<HostTensor>, HfError> {
            if cfg.qkv_bias {
                Ok(Some(shards.get(&n(s), &[len])?))
            } else {
                Ok(None)
            }
        };
        layers.push(LayerWeights {
            attn_norm: shards.get(&n("input_layernorm.weight"), &[h])?,
            mixer: MixerWeights::Attention(AttentionWeights {
                wq: shards.get(&n("self_attn.q_proj.weight"), &[q_dim, h])?,
                wk: shards.get(&n("self_attn.k_proj.weight"), &[kv_dim, h])?,
                wv: shards.get(&n("self_attn.v_proj.weight"), &[kv_dim, h])?,
                wo: shards.get(&n("self_attn.o_proj.weight"), &[h, q_dim])?,
                bq: bias("self_attn.q_proj.bias", q_dim)?,
                bk: bias("self_attn.k_proj.bias", kv_dim)?,
                bv: bias("self_attn.v_proj.bias", kv_dim)?,
                q_norm: None,
                k_norm: None,
            }),
            ffn_norm: shards.get(&n("post_attention_layernorm.weight"), &[h])?,
            w_gate: shards.get(&n("mlp.gate_proj.weight"), &[f, h])?,
            w_up: shards.get(&n("mlp.up_proj.weight"), &[f, h])?,
            w_down: shards.get(&n("mlp.down_proj.weight"), &[h, f])?,
            post_mixer_norm: None,
            post_ffn_norm: None,
        });
    }
    // Some tied checkpoints still store lm_head; prefer tying only when it is absent.
    let output = if cfg.tie_embeddings && !shards.has("lm_head.weight") {
        None
    } else {
        Some(shards.get("lm_head.weight", &[v, h])?)
    };
    Ok(ModelWeights {
        token_embd: shards.get("model.embed_tokens.weight", &[v, h])?,
        output_norm: shards.get("model.norm.weight", &[h])?,
        output,
        layers,
    })
}

/// Chat template from `tokenizer_config.json` (a string, or HF's list of named templates).
fn chat_template(dir: &Path) -> Result<Option<String>, HfError> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&read(&path)?).map_err(|source| HfError::Json {
            path: path.display().to_string(),
            source,
        })?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
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
    let shards = Shards::open(dir)?;
    config.tie_embeddings = config.tie_embeddings && !shards.has("lm_head.weight");
    let weights = model_weights(&shards, &config)?;
    let tokenizer = Tokenizer::from_hf_file(&dir.join("tokenizer.json"))?;
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
        chat_template: chat_template(dir)?,
        weights_hash: shards.hash(),
    })
}
