//! One weight-mapping path for every file format.
//!
//! A format's reader implements [`TensorSource`] (a tensor by name, its shape checked); a
//! [`NameMap`] says what that format calls each weight of the model and how its values differ
//! from the engine's convention (HF Gemma stores RMSNorm weights as `w` and applies `1 + w`; the
//! GGUF converter writes `1 + w`). [`load_weights`] walks the model once, for GGUF and HF
//! safetensors alike.

use prfaas_kernels::{DType, HostTensor};

use super::config::{AttentionWeights, LayerWeights, MixerWeights, ModelConfig, ModelWeights};

/// Why a weight could not be taken from a [`TensorSource`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightError {
    #[error("missing tensor {0:?}")]
    Missing(String),
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    BadShape {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name:?} has dtype {dtype} ({supported})")]
    UnsupportedDType {
        name: String,
        dtype: String,
        supported: &'static str,
    },
    /// The file is damaged where this tensor lies.
    #[error("tensor {name:?}: {reason}")]
    Corrupt { name: String, reason: String },
}

/// Tensors of one model file (or directory of shards), by the names the format uses.
pub trait TensorSource {
    /// The tensor `name`, which must have shape `expected`.
    fn tensor(&self, name: &str, expected: &[usize]) -> Result<HostTensor, WeightError>;
    /// Whether the source holds a tensor called `name`.
    fn has(&self, name: &str) -> bool;
}

/// A weight of a decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    AttnNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    QNorm,
    KNorm,
    PostAttnNorm,
    FfnNorm,
    Gate,
    Up,
    Down,
    PostFfnNorm,
}

impl LayerWeight {
    pub const ALL: [LayerWeight; 16] = [
        LayerWeight::AttnNorm,
        LayerWeight::Q,
        LayerWeight::K,
        LayerWeight::V,
        LayerWeight::O,
        LayerWeight::QBias,
        LayerWeight::KBias,
        LayerWeight::VBias,
        LayerWeight::QNorm,
        LayerWeight::KNorm,
        LayerWeight::PostAttnNorm,
        LayerWeight::FfnNorm,
        LayerWeight::Gate,
        LayerWeight::Up,
        LayerWeight::Down,
        LayerWeight::PostFfnNorm,
    ];
}

/// A weight outside the blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelWeight {
    TokenEmbd,
    OutputNorm,
    Output,
}

/// What one format (and model family) calls each weight.
#[derive(Debug, Clone, Copy)]
pub struct NameMap {
    /// Tensors of block `i` are named `{layer_prefix}{i}.{layer(w)}`; `None` for a weight the
    /// family's blocks do not have.
    pub layer_prefix: &'static str,
    pub layer: fn(LayerWeight) -> Option<&'static str>,
    pub model: fn(ModelWeight) -> &'static str,
    /// Added to every RMSNorm weight on load (1 for HF Gemma, whose norms compute `x̂·(1 + w)`).
    pub norm_offset: f32,
}

impl NameMap {
    /// llama.cpp's names (`convert_hf_to_gguf.py`), every architecture the engine runs.
    pub const GGUF: NameMap = NameMap {
        layer_prefix: "blk.",
        layer: |w| {
            Some(match w {
                LayerWeight::AttnNorm => "attn_norm.weight",
                LayerWeight::Q => "attn_q.weight",
                LayerWeight::K => "attn_k.weight",
                LayerWeight::V => "attn_v.weight",
                LayerWeight::O => "attn_output.weight",
                LayerWeight::QBias => "attn_q.bias",
                LayerWeight::KBias => "attn_k.bias",
                LayerWeight::VBias => "attn_v.bias",
                LayerWeight::QNorm => "attn_q_norm.weight",
                LayerWeight::KNorm => "attn_k_norm.weight",
                LayerWeight::PostAttnNorm => "post_attention_norm.weight",
                LayerWeight::FfnNorm => "ffn_norm.weight",
                LayerWeight::Gate => "ffn_gate.weight",
                LayerWeight::Up => "ffn_up.weight",
                LayerWeight::Down => "ffn_down.weight",
                LayerWeight::PostFfnNorm => "post_ffw_norm.weight",
            })
        },
        model: |w| match w {
            ModelWeight::TokenEmbd => "token_embd.weight",
            ModelWeight::OutputNorm => "output_norm.weight",
            ModelWeight::Output => "output.weight",
        },
        norm_offset: 0.0,
    };

    /// HF transformers' Llama / Qwen2 names (`modeling_llama.py`): the norm before the FFN is
    /// `post_attention_layernorm`.
    pub const HF_LLAMA: NameMap = NameMap {
        layer_prefix: "model.layers.",
        layer: |w| match w {
            LayerWeight::FfnNorm => Some("post_attention_layernorm.weight"),
            LayerWeight::PostAttnNorm | LayerWeight::PostFfnNorm => None,
            LayerWeight::QNorm | LayerWeight::KNorm => None,
            other => hf_common(other),
        },
        model: hf_model,
        norm_offset: 0.0,
    };

    /// HF transformers' Gemma 3 names (`modeling_gemma3.py`): `post_attention_layernorm` is the
    /// norm *after* attention, `pre_feedforward_layernorm` the one before the FFN, and every
    /// `Gemma3RMSNorm` computes `x̂·(1 + w)` (llama.cpp's `conversion/gemma.py` adds the 1 when it
    /// writes a GGUF; here the loader does).
    pub const HF_GEMMA3: NameMap = NameMap {
        layer_prefix: "model.layers.",
        layer: |w| match w {
            LayerWeight::PostAttnNorm => Some("post_attention_layernorm.weight"),
            LayerWeight::FfnNorm => Some("pre_feedforward_layernorm.weight"),
            LayerWeight::PostFfnNorm => Some("post_feedforward_layernorm.weight"),
            LayerWeight::QNorm => Some("self_attn.q_norm.weight"),
            LayerWeight::KNorm => Some("self_attn.k_norm.weight"),
            other => hf_common(other),
        },
        model: hf_model,
        norm_offset: 1.0,
    };

    /// The full name of block `i`'s weight `w`; a weight the family does not have is
    /// [`WeightError::Missing`] (a config that asks for one is wrong for the family).
    pub fn layer_name(&self, i: usize, w: LayerWeight) -> Result<String, WeightError> {
        match (self.layer)(w) {
            Some(suffix) => Ok(format!("{}{i}.{suffix}", self.layer_prefix)),
            None => Err(WeightError::Missing(format!(
                "{}{i}.<{w:?}> (this model family has no such weight)",
                self.layer_prefix
            ))),
        }
    }

    /// The full name of the model-level weight `w`.
    pub fn model_name(&self, w: ModelWeight) -> &'static str {
        (self.model)(w)
    }
}

/// Names HF's Llama-like families share; the norms around attention and the FFN differ per
/// family (Gemma's `post_attention_layernorm` is Llama's pre-FFN norm) and are not here.
fn hf_common(w: LayerWeight) -> Option<&'static str> {
    match w {
        LayerWeight::AttnNorm => Some("input_layernorm.weight"),
        LayerWeight::Q => Some("self_attn.q_proj.weight"),
        LayerWeight::K => Some("self_attn.k_proj.weight"),
        LayerWeight::V => Some("self_attn.v_proj.weight"),
        LayerWeight::O => Some("self_attn.o_proj.weight"),
        LayerWeight::QBias => Some("self_attn.q_proj.bias"),
        LayerWeight::KBias => Some("self_attn.k_proj.bias"),
        LayerWeight::VBias => Some("self_attn.v_proj.bias"),
        LayerWeight::Gate => Some("mlp.gate_proj.weight"),
        LayerWeight::Up => Some("mlp.up_proj.weight"),
        LayerWeight::Down => Some("mlp.down_proj.weight"),
        LayerWeight::QNorm
        | LayerWeight::KNorm
        | LayerWeight::PostAttnNorm
        | LayerWeight::FfnNorm
        | LayerWeight::PostFfnNorm => None,
    }
}

fn hf_model(w: ModelWeight) -> &'static str {
    match w {
        ModelWeight::TokenEmbd => "model.embed_tokens.weight",
        ModelWeight::OutputNorm => "model.norm.weight",
        ModelWeight::Output => "lm_head.weight",
    }
}

/// An RMSNorm weight as the engine applies it (`x̂·w`): F32, with `offset` added.
fn norm(
    src: &dyn TensorSource,
    name: &str,
    len: usize,
    offset: f32,
) -> Result<HostTensor, WeightError> {
    let t = src.tensor(name, &[len])?;
    if offset == 0.0 {
        return Ok(t);
    }
    let values: Vec<f32> = match t.dtype {
        DType::F32 => bytemuck::pod_collect_to_vec(&t.bytes),
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(&t.bytes)
            .into_iter()
            .map(f32::from)
            .collect(),
        other => {
            return Err(WeightError::UnsupportedDType {
                name: name.into(),
                dtype: format!("{other:?}"),
                supported: "norm weights must be F32, F16 or BF16",
            })
        }
    };
    let shifted: Vec<f32> = values.into_iter().map(|v| v + offset).collect();
    Ok(HostTensor::from_f32(vec![len], &shifted))
}

/// Every weight of `cfg`'s model from `src`, named by `names`, shapes checked against `cfg`.
/// The output projection is read only when `cfg.tie_embeddings` is false.
pub fn load_weights(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    names: &NameMap,
) -> Result<ModelWeights, WeightError> {
    let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let q_dim = cfg.n_heads * cfg.head_dim;
    let kv_dim = cfg.n_kv_heads * cfg.head_dim;
    let off = names.norm_offset;
    let mut layers = Vec::with_capacity(cfg.n_layers());
    for i in 0..cfg.n_layers() {
        let get = |w, shape: &[usize]| src.tensor(&names.layer_name(i, w)?, shape);
        let get_norm = |w, len| norm(src, &names.layer_name(i, w)?, len, off);
        let bias = |w, len: usize| cfg.qkv_bias.then(|| get(w, &[len])).transpose();
        let opt_norm = |on: bool, w, len| on.then(|| get_norm(w, len)).transpose();
        layers.push(LayerWeights {
            attn_norm: get_norm(LayerWeight::AttnNorm, h)?,
            mixer: MixerWeights::Attention(AttentionWeights {
                wq: get(LayerWeight::Q, &[q_dim, h])?,
                wk: get(LayerWeight::K, &[kv_dim, h])?,
                wv: get(LayerWeight::V, &[kv_dim, h])?,
                wo: get(LayerWeight::O, &[h, q_dim])?,
                bq: bias(LayerWeight::QBias, q_dim)?,
                bk: bias(LayerWeight::KBias, kv_dim)?,
                bv: bias(LayerWeight::VBias, kv_dim)?,
                q_norm: opt_norm(cfg.block.qk_norm, LayerWeight::QNorm, cfg.head_dim)?,
                k_norm: opt_norm(cfg.block.qk_norm, LayerWeight::KNorm, cfg.head_dim)?,
            }),
            ffn_norm: get_norm(LayerWeight::FfnNorm, h)?,
            w_gate: get(LayerWeight::Gate, &[f, h])?,
            w_up: get(LayerWeight::Up, &[f, h])?,
            w_down: get(LayerWeight::Down, &[h, f])?,
            post_mixer_norm: opt_norm(cfg.block.post_norms, LayerWeight::PostAttnNorm, h)?,
            post_ffn_norm: opt_norm(cfg.block.post_norms, LayerWeight::PostFfnNorm, h)?,
        });
    }
    Ok(ModelWeights {
        token_embd: src.tensor(names.model_name(ModelWeight::TokenEmbd), &[v, h])?,
        output_norm: norm(src, names.model_name(ModelWeight::OutputNorm), h, off)?,
        output: if cfg.tie_embeddings {
            None
        } else {
            Some(src.tensor(names.model_name(ModelWeight::Output), &[v, h])?)
        },
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Tensors held in a map: enough to check the walk and the name maps.
    struct Map(HashMap<String, HostTensor>);

    impl TensorSource for Map {
        fn tensor(&self, name: &str, expected: &[usize]) -> Result<HostTensor, WeightError> {
            let t = self
                .0
                .get(name)
                .ok_or_else(|| WeightError::Missing(name.into()))?;
            if t.shape != expected {
                return Err(WeightError::BadShape {
                    name: name.into(),
                    actual: t.shape.clone(),
                    expected: expected.to_vec(),
                });
            }
            Ok(t.clone())
        }
        fn has(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
    }

    fn gemma_like() -> ModelConfig {
        let (config, _) =
            crate::engine::synthetic_model(crate::engine::SyntheticKind::TinyDense, 1);
        ModelConfig {
            block: crate::engine::config::BlockStyle {
                qk_norm: true,
                post_norms: true,
                ..Default::default()
            },
            tie_embeddings: true,
            ..config
        }
    }

    /// Every weight a config needs, under `names`, valued by its position in the walk.
    fn source_for(cfg: &ModelConfig, names: &NameMap) -> Map {
        let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (q, kv, hd) = (
            cfg.n_heads * cfg.head_dim,
            cfg.n_kv_heads * cfg.head_dim,
            cfg.head_dim,
        );
        let mut m = HashMap::new();
        let mut put = |name: String, shape: Vec<usize>| {
            let n: usize = shape.iter().product();
            let vals: Vec<f32> = (0..n).map(|i| (m.len() * 1000 + i) as f32).collect();
            m.insert(name, HostTensor::from_f32(shape, &vals));
        };
        for i in 0..cfg.n_layers() {
            use LayerWeight::*;
            for (w, shape) in [
                (AttnNorm, vec![h]),
                (Q, vec![q, h]),
                (K, vec![kv, h]),
                (V, vec![kv, h]),
                (O, vec![h, q]),
                (QNorm, vec![hd]),
                (KNorm, vec![hd]),
                (PostAttnNorm, vec![h]),
                (FfnNorm, vec![h]),
                (Gate, vec![f, h]),
                (Up, vec![f, h]),
                (Down, vec![h, f]),
                (PostFfnNorm, vec![h]),
            ] {
                put(names.layer_name(i, w).unwrap(), shape);
            }
        }
        put(names.model_name(ModelWeight::TokenEmbd).into(), vec![v, h]);
        put(names.model_name(ModelWeight::OutputNorm).into(), vec![h]);
        Map(m)
    }

    fn f32s(t: &HostTensor) -> Vec<f32> {
        bytemuck::pod_collect_to_vec(&t.bytes)
    }

    /// The same values under GGUF names and under HF Gemma 3 names (norms stored without the
    /// `1 +`) load to the same weights; names no map shares are told apart.
    #[test]
    fn gguf_and_hf_gemma3_names_load_the_same_weights() {
        let cfg = gemma_like();
        let gguf = source_for(&cfg, &NameMap::GGUF);
        let mut hf = HashMap::new();
        for i in 0..cfg.n_layers() {
            use LayerWeight::*;
            for w in LayerWeight::ALL {
                if matches!(w, QBias | KBias | VBias) {
                    continue;
                }
                let mut t = gguf.0[&NameMap::GGUF.layer_name(i, w).unwrap()].clone();
                if matches!(
                    w,
                    AttnNorm | QNorm | KNorm | PostAttnNorm | FfnNorm | PostFfnNorm
                ) {
                    let minus: Vec<f32> = f32s(&t).iter().map(|v| v - 1.0).collect();
                    t = HostTensor::from_f32(t.shape.clone(), &minus);
                }
                hf.insert(NameMap::HF_GEMMA3.layer_name(i, w).unwrap(), t);
            }
        }
        for w in [ModelWeight::TokenEmbd, ModelWeight::OutputNorm] {
            let mut t = gguf.0[NameMap::GGUF.model_name(w)].clone();
            if w == ModelWeight::OutputNorm {
                let minus: Vec<f32> = f32s(&t).iter().map(|v| v - 1.0).collect();
                t = HostTensor::from_f32(t.shape.clone(), &minus);
            }
            hf.insert(NameMap::HF_GEMMA3.model_name(w).into(), t);
        }
        let a = load_weights(&gguf, &cfg, &NameMap::GGUF).unwrap();
        let b = load_weights(&Map(hf), &cfg, &NameMap::HF_GEMMA3).unwrap();
        assert_eq!(f32s(&a.token_embd), f32s(&b.token_embd));
        assert_eq!(f32s(&a.output_norm), f32s(&b.output_norm));
        assert!(a.output.is_none() && b.output.is_none());
        for (la, lb) in a.layers.iter().zip(&b.layers) {
            for (x, y) in [
                (&la.attn_norm, &lb.attn_norm),
                (&la.ffn_norm, &lb.ffn_norm),
                (&la.w_gate, &lb.w_gate),
                (&la.w_down, &lb.w_down),
                (
                    la.post_mixer_norm.as_ref().unwrap(),
                    lb.post_mixer_norm.as_ref().unwrap(),
                ),
                (
                    la.post_ffn_norm.as_ref().unwrap(),
                    lb.post_ffn_norm.as_ref().unwrap(),
                ),
            ] {
                assert_eq!(f32s(x), f32s(y));
            }
            let (MixerWeights::Attention(ma), MixerWeights::Attention(mb)) = (&la.mixer, &lb.mixer)
            else {
                panic!("attention layers")
            };
            assert_eq!(f32s(&ma.wq), f32s(&mb.wq));
            assert_eq!(
                f32s(ma.k_norm.as_ref().unwrap()),
                f32s(mb.k_norm.as_ref().unwrap())
            );
        }
        // HF Gemma's post-attention norm is Llama's pre-FFN norm, and Llama blocks have no
        // post-norms: a Llama config that asked for them gets an error, not Gemma's tensor.
        assert_eq!(
            NameMap::HF_GEMMA3
                .layer_name(0, LayerWeight::PostAttnNorm)
                .unwrap(),
            NameMap::HF_LLAMA
                .layer_name(0, LayerWeight::FfnNorm)
                .unwrap()
        );
        assert!(matches!(
            NameMap::HF_LLAMA.layer_name(0, LayerWeight::PostAttnNorm),
            Err(WeightError::Missing(_))
        ));
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let cfg = gemma_like();
        let mut src = source_for(&cfg, &NameMap::GGUF);
        let up = NameMap::GGUF.layer_name(1, LayerWeight::Up).unwrap();
        let t = src.0.remove(&up).unwrap();
        assert!(
            matches!(load_weights(&src, &cfg, &NameMap::GGUF), Err(WeightError::Missing(n)) if n == up)
        );
        src.0
            .insert(up.clone(), HostTensor::from_f32(vec![3], &[0.0; 3]));
        assert!(matches!(
            load_weights(&src, &cfg, &NameMap::GGUF),
            Err(WeightError::BadShape { name, .. }) if name == up
        ));
        src.0.insert(up, t);
        // A tied model needs no output projection; an untied one does.
        let untied = ModelConfig {
            tie_embeddings: false,
            ..cfg
        };
        assert!(matches!(
            load_weights(&src, &untied, &NameMap::GGUF),
            Err(WeightError::Missing(n)) if n == "output.weight"
        ));
    }
}
