//! The one internal model description. GGUF metadata, HF `config.json` and the built-in synthetic
//! models are all parsed into [`ModelConfig`] + [`ModelWeights`]; nothing downstream looks at the
//! file format.

use prfaas_kernels::{GluAct, HostTensor, RopeStyle};

/// What kind of token mixing a layer does. Decides what KV it keeps and ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayerKind {
    /// Causal softmax attention over all previous tokens (paged K/V blocks).
    Full,
    /// Softmax attention over the last `window` tokens (paged K/V blocks).
    Sliding { window: usize },
    /// Gated delta-rule linear attention: a fixed-size recurrent state per sequence.
    Linear {
        heads: usize,
        key_dim: usize,
        value_dim: usize,
    },
}

impl LayerKind {
    /// True for layers that keep per-token K/V blocks.
    pub fn has_kv_blocks(self) -> bool {
        matches!(self, LayerKind::Full | LayerKind::Sliding { .. })
    }
}

/// Architecture hyper-parameters of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    /// Human name, e.g. "SmolLM2-135M-Instruct" or "tiny-hybrid".
    pub name: String,
    /// Architecture family, e.g. "llama", "qwen2", "synthetic".
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Softmax-attention geometry (used by `Full` and `Sliding` layers).
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub rope_style: RopeStyle,
    pub max_context: usize,
    /// Output projection shares the token embedding table.
    pub tie_embeddings: bool,
    /// Qwen2-style biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// One entry per layer, in order (`layers.len()` is the number of layers).
    pub layers: Vec<LayerKind>,
    /// How a block differs from the Llama one (all defaults for Llama/Qwen2/SmolLM2).
    #[serde(default)]
    pub block: BlockStyle,
}

/// The details in which a decoder block departs from Llama's (Gemma 3 uses all of them).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct BlockStyle {
    /// Activation of the gated FFN.
    pub glu_act: GluAct,
    /// Token embeddings are multiplied by this (Gemma: `sqrt(hidden_size)`).
    pub embed_scale: Option<f32>,
    /// Attention scale applied to the queries; `None` is `1/sqrt(head_dim)`.
    pub query_scale: Option<f32>,
    /// Per-head RMSNorm of queries and keys before RoPE (weights `attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before each residual add (`post_attention_norm`,
    /// `post_ffw_norm`).
    pub post_norms: bool,
    /// RoPE base of the sliding-window layers when it differs from `rope_base` (global layers).
    pub rope_base_local: Option<f32>,
}

impl ModelConfig {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The same model with every sliding window widened to the whole context (`max_context`):
    /// every layer attends globally and keeps dense KV, with the same weights and RoPE. For
    /// measuring what hybrid attention saves (`engine.global_attention`); outputs differ from
    /// the model's own once a prompt is longer than its window.
    pub fn with_global_attention(mut self) -> Self {
        for l in &mut self.layers {
            if let LayerKind::Sliding { window } = l {
                *window = (*window).max(self.max_context);
            }
        }
        self
    }
}

/// Weights of one softmax-attention layer's token mixer (GGUF layout: `[out, in]`).
#[derive(Debug, Clone)]
pub struct AttentionWeights {
    pub wq: HostTensor,
    pub wk: HostTensor,
    pub wv: HostTensor,
    pub wo: HostTensor,
    pub bq: Option<HostTensor>,
    pub bk: Option<HostTensor>,
    pub bv: Option<HostTensor>,
    /// Per-head RMSNorm weights `[head_dim]` of queries and keys (`BlockStyle::qk_norm`).
    pub q_norm: Option<HostTensor>,
    pub k_norm: Option<HostTensor>,
}

/// Weights of one gated delta-rule layer's token mixer.
#[derive(Debug, Clone)]
pub struct LinearAttentionWeights {
    /// `[heads·key_dim, hidden]`
    pub wq: HostTensor,
    /// `[heads·key_dim, hidden]`
    pub wk: HostTensor,
    /// `[heads·value_dim, hidden]`
    pub wv: HostTensor,
    /// `[heads, hidden]`: β = sigmoid(x·w_betaᵀ)
    pub w_beta: HostTensor,
    /// `[heads, hidden]`: g = −softplus(x·w_gᵀ) (log decay ≤ 0)
    pub w_g: HostTensor,
    /// `[hidden, heads·value_dim]`
    pub wo: HostTensor,
}

#[derive(Debug, Clone)]
pub enum MixerWeights {
    Attention(AttentionWeights),
    Linear(LinearAttentionWeights),
}

#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: HostTensor,
    pub mixer: MixerWeights,
    pub ffn_norm: HostTensor,
    pub w_gate: HostTensor,
    pub w_up: HostTensor,
    pub w_down: HostTensor,
    /// RMSNorm weights of the mixer and FFN outputs (`BlockStyle::post_norms`).
    pub post_mixer_norm: Option<HostTensor>,
    pub post_ffn_norm: Option<HostTensor>,
}

/// All weights of a model, still on the host (uploaded to a backend by the engine).
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// `[vocab, hidden]`, any dtype (Q8_0 in the default model).
    pub token_embd: HostTensor,
    pub output_norm: HostTensor,
    /// `None` when `tie_embeddings`.
    pub output: Option<HostTensor>,
    pub layers: Vec<LayerWeights>,
}
