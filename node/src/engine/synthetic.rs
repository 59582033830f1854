//! Built-in deterministic synthetic models (`tiny-dense`, `tiny-hybrid`).
//!
//! They exist so the engine, the KV export path and the hybrid-attention KV savings can be run and
//! measured without downloading anything, through exactly the same [`ModelConfig`] +
//! [`ModelWeights`] path as a GGUF file. Weights are drawn from a seeded splitmix64 generator and
//! stored with the same dtype mix as real files (Q8_0 embedding, Q4_1 / Q8_0 projections, F32
//! norms), so the quantized matmul kernels are exercised too. Scales are `~1/sqrt(fan_in)` with a
//! damped output projection so activations stay O(1) across layers and greedy decoding does not
//! collapse to a single token.

use half::f16;
use prfaas_kernels::{DType, HostTensor, RopeStyle};

use super::config::{
    AttentionWeights, LayerKind, LayerWeights, LinearAttentionWeights, MixerWeights, ModelConfig,
    ModelWeights,
};

/// Which synthetic model to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticKind {
    /// Every layer is full softmax attention.
    TinyDense,
    /// Three gated delta-rule linear layers per softmax layer; one of the softmax layers is a
    /// sliding-window layer.
    TinyHybrid,
}

impl SyntheticKind {
    /// Parses the CLI names `tiny-dense` / `tiny-hybrid`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tiny-dense" => Some(Self::TinyDense),
            "tiny-hybrid" => Some(Self::TinyHybrid),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::TinyDense => "tiny-dense",
            Self::TinyHybrid => "tiny-hybrid",
        }
    }
}

/// Seed used by the CLI and the tests unless told otherwise.
pub const DEFAULT_SEED: u64 = 0x5eed_2026;

/// Vocabulary of the synthetic models: 256 byte tokens, then BOS and EOS, padded to 512 rows.
pub const SYNTH_VOCAB: usize = 512;
pub const SYNTH_BOS: u32 = 256;
pub const SYNTH_EOS: u32 = 257;

const HIDDEN: usize = 256;
const INTERMEDIATE: usize = 512;
const N_LAYERS: usize = 8;
const N_HEADS: usize = 4;
const N_KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const LIN_HEADS: usize = 4;
const LIN_KEY_DIM: usize = 32;
const LIN_VALUE_DIM: usize = 64;
const SLIDING_WINDOW: usize = 32;

/// The configuration of a synthetic model (no weights).
pub fn synthetic_config(kind: SyntheticKind) -> ModelConfig {
    let layers = (0..N_LAYERS)
        .map(|i| match kind {
            SyntheticKind::TinyDense => LayerKind::Full,
            SyntheticKind::TinyHybrid => match i % 4 {
                3 if i == 3 => LayerKind::Sliding {
                    window: SLIDING_WINDOW,
                },
                3 => LayerKind::Full,
                _ => LayerKind::Linear {
                    heads: LIN_HEADS,
                    key_dim: LIN_KEY_DIM,
                    value_dim: LIN_VALUE_DIM,
                },
            },
        })
        .collect();
    ModelConfig {
        name: kind.name().to_string(),
        arch: "synthetic".to_string(),
        vocab_size: SYNTH_VOCAB,
        hidden_size: HIDDEN,
        intermediate_size: INTERMEDIATE,
        n_heads: N_HEADS,
        n_kv_heads: N_KV_HEADS,
        head_dim: HEAD_DIM,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        rope_style: RopeStyle::Normal,
        max_context: 32_768,
        tie_embeddings: false,
        qkv_bias: false,
        layers,
        block: Default::default(),
    }
}

/// Config + weights of a synthetic model, deterministic in `seed`.
pub fn synthetic_model(kind: SyntheticKind, seed: u64) -> (ModelConfig, ModelWeights) {
    let cfg = synthetic_config(kind);
    let mut rng = SplitMix64::new(seed ^ (kind as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let h = cfg.hidden_size;
    let inv = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();

    let token_embd = rand_tensor(&mut rng, &[cfg.vocab_size, h], 1.0, DType::Q8_0);
    let mut layers = Vec::with_capacity(cfg.n_layers());
    for kind in &cfg.layers {
        let mixer = match *kind {
            LayerKind::Full | LayerKind::Sliding { .. } => {
                let q = cfg.n_heads * cfg.head_dim;
                let kv = cfg.n_kv_heads * cfg.head_dim;
                MixerWeights::Attention(AttentionWeights {
                    // Larger q/k scales make attention patterns peaked instead of uniform.
                    wq: rand_tensor(&mut rng, &[q, h], 2.0 * inv(h), DType::Q4_1),
                    wk: rand_tensor(&mut rng, &[kv, h], 2.0 * inv(h), DType::Q4_1),
                    wv: rand_tensor(&mut rng, &[kv, h], inv(h), DType::Q8_0),
                    wo: rand_tensor(&mut rng, &[h, q], 0.5 * inv(q), DType::Q4_1),
                    bq: None,
                    bk: None,
                    bv: None,
                    q_norm: None,
                    k_norm: None,
                })
            }
            LayerKind::Linear {
                heads,
                key_dim,
                value_dim,
            } => MixerWeights::Linear(LinearAttentionWeights {
                wq: rand_tensor(&mut rng, &[heads * key_dim, h], inv(h), DType::Q8_0),
                wk: rand_tensor(&mut rng, &[heads * key_dim, h], inv(h), DType::Q8_0),
                wv: rand_tensor(&mut rng, &[heads * value_dim, h], inv(h), DType::Q8_0),
                w_beta: rand_tensor(&mut rng, &[heads, h], inv(h), DType::F32),
                w_g: rand_tensor(&mut rng, &[heads, h], 0.5 * inv(h), DType::F32),
                wo: rand_tensor(
                    &mut rng,
                    &[h, heads * value_dim],
                    0.5 * inv(heads * value_dim),
                    DType::Q4_1,
                ),
            }),
        };
        layers.push(LayerWeights {
            attn_norm: norm_tensor(&mut rng, h),
            mixer,
            ffn_norm: norm_tensor(&mut rng, h),
            w_gate: rand_tensor(&mut rng, &[cfg.intermediate_size, h], inv(h), DType::Q4_1),
            w_up: rand_tensor(&mut rng, &[cfg.intermediate_size, h], inv(h), DType::Q4_1),
            w_down: rand_tensor(
                &mut rng,
                &[h, cfg.intermediate_size],
                0.5 * inv(cfg.intermediate_size),
                DType::Q8_0,
            ),
            post_mixer_norm: None,
            post_ffn_norm: None,
        });
    }
    let weights = ModelWeights {
        token_embd,
        output_norm: norm_tensor(&mut rng, h),
        // Logit spread of a few units: peaked enough that greedy is meaningful, but not one-hot.
        output: Some(rand_tensor(
            &mut rng,
            &[cfg.vocab_size, h],
            3.0 * inv(h),
            DType::Q8_0,
        )),
        layers,
    };
    (cfg, weights)
}

/// splitmix64: tiny, seedable, identical on every platform (no global RNG anywhere).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)` with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Approximately standard normal (sum of four uniforms, rescaled): cheap and bounded.
    fn next_normalish(&mut self) -> f32 {
        let s: f64 = (0..4).map(|_| self.next_f64()).sum::<f64>() - 2.0;
        (s * (3.0f64).sqrt()) as f32
    }
}

fn norm_tensor(rng: &mut SplitMix64, n: usize) -> HostTensor {
    let data: Vec<f32> = (0..n).map(|_| 1.0 + 0.1 * rng.next_normalish()).collect();
    HostTensor::from_f32(vec![n], &data)
}

fn rand_tensor(rng: &mut SplitMix64, shape: &[usize], scale: f32, dtype: DType) -> HostTensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| scale * rng.next_normalish()).collect();
    let bytes = match dtype {
        DType::Q8_0 => quantize_q8_0(&data),
        DType::Q4_1 => quantize_q4_1(&data),
        _ => bytemuck::cast_slice(&data).to_vec(),
    };
    let dtype = match dtype {
        DType::Q8_0 | DType::Q4_1 => dtype,
        _ => DType::F32,
    };
    HostTensor {
        dtype,
        shape: shape.to_vec(),
        bytes,
    }
}

/// GGUF Q8_0: per 32 values `{d: f16, qs: [i8; 32]}` with `x ≈ d·q`.
fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(
            block
                .iter()
                .map(|v| ((v * id).round().clamp(-127.0, 127.0) as i8) as u8),
        );
    }
    out
}

/// GGUF Q4_1: per 32 values `{d: f16, m: f16, qs: [u8; 16]}`, low nibbles hold values 0..16 and
/// high nibbles values 16..32, `x ≈ d·q + m`.
fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 20);
    for block in x.chunks_exact(32) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let q = |v: f32| ((v - min) * id).round().clamp(0.0, 15.0) as u8;
        for j in 0..16 {
            out.push(q(block[j]) | (q(block[j + 16]) << 4));
        }
    }
    out
}

/// Byte-level tokenizer of the synthetic models: one token per UTF-8 byte, plus BOS/EOS.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }
    /// Bytes of one token (empty for specials and unused ids).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        u8::try_from(id).map(|b| vec![b]).unwrap_or_default()
    }
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    pub fn eos(&self) -> u32 {
        SYNTH_EOS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_models_are_deterministic_and_shaped() {
        for kind in [SyntheticKind::TinyDense, SyntheticKind::TinyHybrid] {
            let (c1, w1) = synthetic_model(kind, 7);
            let (_, w2) = synthetic_model(kind, 7);
            let (_, w3) = synthetic_model(kind, 8);
            assert_eq!(w1.token_embd.bytes, w2.token_embd.bytes);
            assert_ne!(w1.token_embd.bytes, w3.token_embd.bytes);
            assert_eq!(w1.layers.len(), c1.n_layers());
            assert_eq!(
                w1.token_embd.bytes.len(),
                DType::Q8_0.bytes_for(SYNTH_VOCAB * HIDDEN)
            );
        }
        let hybrid = synthetic_config(SyntheticKind::TinyHybrid);
        let linear = hybrid
            .layers
            .iter()
            .filter(|l| matches!(l, LayerKind::Linear { .. }))
            .count();
        assert_eq!(linear, 6);
        assert!(hybrid.layers.contains(&LayerKind::Full));
        assert!(hybrid
            .layers
            .iter()
            .any(|l| matches!(l, LayerKind::Sliding { .. })));
    }

    #[test]
    fn quantizers_round_trip_within_step() {
        let mut rng = SplitMix64::new(1);
        let x: Vec<f32> = (0..64).map(|_| rng.next_normalish()).collect();
        let q8 = quantize_q8_0(&x);
        let q4 = quantize_q4_1(&x);
        for (b, block) in x.chunks_exact(32).enumerate() {
            let d8 = f16::from_le_bytes([q8[b * 34], q8[b * 34 + 1]]).to_f32();
            let d4 = f16::from_le_bytes([q4[b * 20], q4[b * 20 + 1]]).to_f32();
            let m4 = f16::from_le_bytes([q4[b * 20 + 2], q4[b * 20 + 3]]).to_f32();
            for (j, &v) in block.iter().enumerate() {
                let y8 = d8 * (q8[b * 34 + 2 + j] as i8) as f32;
                let nib = q4[b * 20 + 4 + j % 16];
                let q = if j < 16 { nib & 15 } else { nib >> 4 };
                let y4 = d4 * q as f32 + m4;
                assert!((y8 - v).abs() <= d8 * 0.51 + 1e-3, "q8 {v} vs {y8}");
                assert!((y4 - v).abs() <= d4 * 0.51 + 1e-2, "q4 {v} vs {y4}");
            }
        }
    }

    #[test]
    fn byte_tokenizer_round_trips() {
        let t = ByteTokenizer;
        let ids = t.encode("héllo");
        assert_eq!(t.decode(&ids), "héllo");
        assert_eq!(t.decode(&[SYNTH_BOS, 104, SYNTH_EOS]), "h");
    }
}
