//! A model's weights on a compute backend and its forward pass.
//!
//! One function, [`Model::forward`], serves both prefill (one sequence, a chunk of many tokens)
//! and decode (many sequences, one token each): rows of the batch are grouped by sequence, each
//! sequence brings its block table and its linear-attention states. Keeping one code path is
//! what makes "prefill locally" and "prefill remotely, decode here" produce the same numbers.

use std::sync::Arc;

use prfaas_kernels::{
    AttnParams, AttnSeq, Backend, HostTensor, KernelError, LinearAttnParams, Tensor,
};
use sha2::{Digest, Sha256};

use super::config::{LayerKind, MixerWeights, ModelConfig, ModelWeights};

/// Errors from building or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("invalid batch: {0}")]
    Batch(String),
}

/// Chunk length handed to the chunked linear-attention kernel.
const LINEAR_CHUNK: usize = 64;

enum DevMixer {
    Attention {
        wq: Tensor,
        wk: Tensor,
        wv: Tensor,
        wo: Tensor,
        /// Biases stay on the host: the backend has no broadcast add, so they are expanded to the
        /// batch's row count per call (only Qwen2-style models have them).
        bq: Option<Vec<f32>>,
        bk: Option<Vec<f32>>,
        bv: Option<Vec<f32>>,
        /// Per-head RMSNorm of queries and keys before RoPE (Gemma 3's QK-norm).
        q_norm: Option<Tensor>,
        k_norm: Option<Tensor>,
        window: Option<usize>,
        rope_base: f32,
    },
    Linear {
        wq: Tensor,
        wk: Tensor,
        wv: Tensor,
        w_beta: Tensor,
        w_g: Tensor,
        wo: Tensor,
        heads: usize,
        key_dim: usize,
        value_dim: usize,
    },
}

struct DevLayer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    mixer: DevMixer,
    /// RMSNorm of the mixer / FFN output before its residual add (Gemma's post-norms).
    post_mixer_norm: Option<Tensor>,
    post_ffn_norm: Option<Tensor>,
}

/// K and V pools of one paged layer, `[n_blocks, block_size, n_kv_heads, head_dim]` each.
#[derive(Debug, Clone)]
pub struct PagedPool {
    pub k: Tensor,
    pub v: Tensor,
}

/// One sequence's rows in a [`Batch`].
#[derive(Debug, Clone, Copy)]
pub struct SeqRows<'a> {
    /// Block ids of the sequence, in token order, covering `0..n_past + n_new`.
    pub block_table: &'a [u32],
    /// The sequence's blocks in the sliding-window ring (see [`Batch::window_slots`]), in token
    /// order; entries before the window may be any valid id (never read).
    pub window_table: Option<&'a [u32]>,
    pub n_past: usize,
    pub n_new: usize,
    /// The sequence's recurrent state per linear layer, in layer order (`[heads, dv, dk]` each).
    pub states: &'a [Tensor],
}

/// A forward batch: `tokens`, `positions` and `slots` have one entry per row, rows grouped by
/// sequence in the order of `seqs`.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    /// Flat KV slot (`block · block_size + offset`) of each row in the paged pools.
    pub slots: &'a [u32],
    /// When the engine keeps sliding-window layers in a ring of their own blocks: each row's
    /// slot there. Sliding-window layers then write `window_slots` and read each sequence's
    /// `window_table`; full-attention layers always use `slots` / `block_table`.
    pub window_slots: Option<&'a [u32]>,
    pub seqs: &'a [SeqRows<'a>],
}

/// A model whose weights live on a backend.
pub struct Model {
    config: ModelConfig,
    backend: Arc<dyn Backend>,
    token_embd: Tensor,
    output_norm: Tensor,
    output: Tensor,
    layers: Vec<DevLayer>,
    model_hash: [u8; 32],
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

fn host_f32(t: &HostTensor, what: &str) -> Result<Vec<f32>, ModelError> {
    if t.dtype != prfaas_kernels::DType::F32 || t.bytes.len() != 4 * t.numel() {
        return Err(ModelError::Invalid(format!(
            "{what} must be F32, got {:?}",
            t.dtype
        )));
    }
    Ok(t.bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// SHA-256 over the config (JSON) and every weight's dtype, shape and bytes: identifies the exact
/// weights so that KV is never exchanged between different models or quantizations.
fn hash_model(config: &ModelConfig, w: &ModelWeights) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"prfaas-model");
    h.update(serde_json::to_vec(config).unwrap_or_default());
    let mut put = |t: &HostTensor| {
        h.update(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
        h.update(&t.bytes);
    };
    put(&w.token_embd);
    put(&w.output_norm);
    if let Some(o) = &w.output {
        put(o);
    }
    for l in &w.layers {
        put(&l.attn_norm);
        put(&l.ffn_norm);
        for t in [&l.post_mixer_norm, &l.post_ffn_norm].into_iter().flatten() {
            put(t);
        }
        put(&l.w_gate);
        put(&l.w_up);
        put(&l.w_down);
        match &l.mixer {
            MixerWeights::Attention(a) => {
                for t in [&a.wq, &a.wk, &a.wv, &a.wo] {
                    put(t);
                }
                for t in [&a.bq, &a.bk, &a.bv, &a.q_norm, &a.k_norm]
                    .into_iter()
                    .flatten()
                {
                    put(t);
                }
            }
            MixerWeights::Linear(m) => {
                for t in [&m.wq, &m.wk, &m.wv, &m.w_beta, &m.w_g, &m.wo] {
                    put(t);
                }
            }
        }
    }
    h.finalize().into()
}

impl Model {
    /// Validates the config against the weights and uploads them (quantized weights stay quantized).
    pub fn new(
        config: ModelConfig,
        weights: &ModelWeights,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, ModelError> {
        let c = &config;
        if c.n_layers() == 0 || weights.layers.len() != c.n_layers() {
            return Err(ModelError::Invalid(format!(
                "{} layers in config, {} in weights",
                c.n_layers(),
                weights.layers.len()
            )));
        }
        if c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) || c.head_dim == 0 {
            return Err(ModelError::Invalid(format!(
                "{} heads / {} kv heads / head_dim {}",
                c.n_heads, c.n_kv_heads, c.head_dim
            )));
        }
        let shape2 = |t: &HostTensor, n: usize, k: usize, what: &str| {
            if t.shape == [n, k] {
                Ok(())
            } else {
                Err(ModelError::Invalid(format!(
                    "{what}: shape {:?}, expected [{n}, {k}]",
                    t.shape
                )))
            }
        };
        let h = c.hidden_size;
        shape2(&weights.token_embd, c.vocab_size, h, "token_embd")?;
        let up = |t: &HostTensor| backend.upload(t);
        let up_opt = |t: &Option<HostTensor>, on: bool, len: usize, what: &str| match (t, on) {
            (Some(t), true) if t.shape == [len] => Ok(Some(backend.upload(t)?)),
            (None, false) => Ok(None),
            _ => Err(ModelError::Invalid(format!(
                "{what}: {} but the config says {}",
                t.as_ref()
                    .map_or("absent".to_string(), |t| format!("shape {:?}", t.shape)),
                if on {
                    format!("[{len}]")
                } else {
                    "none".into()
                }
            ))),
        };
        let mut layers = Vec::with_capacity(c.n_layers());
        for (i, (kind, lw)) in c.layers.iter().zip(&weights.layers).enumerate() {
            shape2(
                &lw.w_gate,
                c.intermediate_size,
                h,
                &format!("layer {i} gate"),
            )?;
            shape2(&lw.w_up, c.intermediate_size, h, &format!("layer {i} up"))?;
            shape2(
                &lw.w_down,
                h,
                c.intermediate_size,
                &format!("layer {i} down"),
            )?;
            let mixer = match (kind, &lw.mixer) {
                (LayerKind::Full | LayerKind::Sliding { .. }, MixerWeights::Attention(a)) => {
                    let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
                    shape2(&a.wq, q, h, &format!("layer {i} wq"))?;
                    shape2(&a.wk, kv, h, &format!("layer {i} wk"))?;
                    shape2(&a.wv, kv, h, &format!("layer {i} wv"))?;
                    shape2(&a.wo, h, q, &format!("layer {i} wo"))?;
                    let bias = |b: &Option<HostTensor>,
                                n: usize|
                     -> Result<Option<Vec<f32>>, ModelError> {
                        b.as_ref()
                            .map(|t| {
                                let v = host_f32(t, "bias")?;
                                if v.len() == n {
                                    Ok(v)
                                } else {
                                    Err(ModelError::Invalid(format!(
                                        "layer {i}: bias of {} values, want {n}",
                                        v.len()
                                    )))
                                }
                            })
                            .transpose()
                    };
                    DevMixer::Attention {
                        wq: up(&a.wq)?,
                        wk: up(&a.wk)?,
                        wv: up(&a.wv)?,
                        wo: up(&a.wo)?,
                        bq: bias(&a.bq, q)?,
                        bk: bias(&a.bk, kv)?,
                        bv: bias(&a.bv, kv)?,
                        q_norm: up_opt(
                            &a.q_norm,
                            c.block.qk_norm,
                            c.head_dim,
                            &format!("layer {i} q_norm"),
                        )?,
                        k_norm: up_opt(
                            &a.k_norm,
                            c.block.qk_norm,
                            c.head_dim,
                            &format!("layer {i} k_norm"),
                        )?,
                        window: match kind {
                            LayerKind::Sliding { window } => Some(*window),
                            _ => None,
                        },
                        rope_base: match (kind, c.block.rope_base_local) {
                            (LayerKind::Sliding { .. }, Some(local)) => local,
                            _ => c.rope_base,
                        },
                    }
                }
                (
                    &LayerKind::Linear {
                        heads,
                        key_dim,
                        value_dim,
                    },
                    MixerWeights::Linear(m),
                ) => {
                    shape2(&m.wq, heads * key_dim, h, &format!("layer {i} linear wq"))?;
                    shape2(&m.wk, heads * key_dim, h, &format!("layer {i} linear wk"))?;
                    shape2(&m.wv, heads * value_dim, h, &format!("layer {i} linear wv"))?;
                    shape2(&m.w_beta, heads, h, &format!("layer {i} w_beta"))?;
                    shape2(&m.w_g, heads, h, &format!("layer {i} w_g"))?;
                    shape2(&m.wo, h, heads * value_dim, &format!("layer {i} linear wo"))?;
                    DevMixer::Linear {
                        wq: up(&m.wq)?,
                        wk: up(&m.wk)?,
                        wv: up(&m.wv)?,
                        w_beta: up(&m.w_beta)?,
                        w_g: up(&m.w_g)?,
                        wo: up(&m.wo)?,
                        heads,
                        key_dim,
                        value_dim,
                    }
                }
                _ => {
                    return Err(ModelError::Invalid(format!(
                        "layer {i}: config says {kind:?} but weights are of the other kind"
                    )))
                }
            };
            layers.push(DevLayer {
                attn_norm: up(&lw.attn_norm)?,
                ffn_norm: up(&lw.ffn_norm)?,
                w_gate: up(&lw.w_gate)?,
                w_up: up(&lw.w_up)?,
                w_down: up(&lw.w_down)?,
                mixer,
                post_mixer_norm: up_opt(
                    &lw.post_mixer_norm,
                    c.block.post_norms,
                    h,
                    &format!("layer {i} post_mixer_norm"),
                )?,
                post_ffn_norm: up_opt(
                    &lw.post_ffn_norm,
                    c.block.post_norms,
                    h,
                    &format!("layer {i} post_ffn_norm"),
                )?,
            });
        }
        let token_embd = up(&weights.token_embd)?;
        let output = match (&weights.output, c.tie_embeddings) {
            (Some(o), _) => {
                shape2(o, c.vocab_size, h, "output")?;
                up(o)?
            }
            (None, true) => token_embd.clone(),
            (None, false) => {
                return Err(ModelError::Invalid(
                    "no output weight and embeddings not tied".into(),
                ))
            }
        };
        let model_hash = hash_model(&config, weights);
        Ok(Self {
            output_norm: up(&weights.output_norm)?,
            token_embd,
            output,
            layers,
            model_hash,
            backend,
            config,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// SHA-256 of config + weights (see `hash_model`).
    pub fn model_hash(&self) -> [u8; 32] {
        self.model_hash
    }

    /// Runs the batch through every layer and returns logits `[logit_rows.len(), vocab]` for the
    /// requested rows. `pools[l]` must be `Some` exactly for paged layers. `after_layer(l)`, if
    /// given, runs once layer `l`'s KV has been written for every row of the batch (the KV sink
    /// hook).
    pub fn forward<E>(
        &self,
        pools: &[Option<PagedPool>],
        batch: &Batch<'_>,
        logit_rows: &[u32],
        mut after_layer: Option<&mut dyn FnMut(usize) -> Result<(), E>>,
    ) -> Result<Tensor, E>
    where
        E: From<ModelError> + From<KernelError> + Send,
    {
        let be = &*self.backend;
        let n = batch.tokens.len();
        let total: usize = batch.seqs.iter().map(|s| s.n_new).sum();
        if n == 0 || total != n || batch.positions.len() != n || batch.slots.len() != n {
            return Err(ModelError::Batch(format!(
                "{n} tokens, {} positions, {} slots, {total} rows in sequences",
                batch.positions.len(),
                batch.slots.len()
            ))
            .into());
        }
        if pools.len() != self.layers.len() {
            return Err(ModelError::Batch(format!(
                "{} pools for {} layers",
                pools.len(),
                self.layers.len()
            ))
            .into());
        }
        let attn_seqs: Vec<AttnSeq<'_>> = batch
            .seqs
            .iter()
            .map(|s| AttnSeq {
                block_table: s.block_table,
                n_past: s.n_past,
                n_new: s.n_new,
            })
            .collect();
        if batch.window_slots.is_some_and(|w| w.len() != n)
            || (batch.window_slots.is_some() && batch.seqs.iter().any(|s| s.window_table.is_none()))
        {
            return Err(ModelError::Batch(
                "window slots need one entry per row and a window table per sequence".into(),
            )
            .into());
        }
        let window_seqs: Vec<AttnSeq<'_>> = batch
            .seqs
            .iter()
            .map(|s| AttnSeq {
                block_table: s.window_table.unwrap_or(s.block_table),
                n_past: s.n_past,
                n_new: s.n_new,
            })
            .collect();
        let seq_tables = [&attn_seqs[..], &window_seqs[..]];

        // The layers run on the backend's workers (`Backend::run`): all in one call without a
        // hook, else one call from the ffn half of layer l-1 to the token mixer of layer l, so
        // that `after_layer(l)` (the KV sink, which need not be `Send`) runs on the caller's
        // thread between them. Step `n_layers` is the last ffn plus the output projection.
        let mut embedded = be.embedding(&self.token_embd, batch.tokens)?;
        if let Some(s) = self.config.block.embed_scale {
            embedded = be.scale(&embedded, s)?;
        }
        let mut hidden = Some(embedded);
        let mut linear_idx = 0usize;
        let n_layers = self.layers.len();
        let mut from = 0usize;
        while from <= n_layers {
            let to = if after_layer.is_some() {
                from
            } else {
                n_layers
            };
            let mut result: Result<(), E> = Ok(());
            be.run(&mut || {
                result = (from..=to).try_for_each(|li| {
                    let mut x = hidden.take().ok_or_else(|| {
                        ModelError::Batch("hidden state missing between layers".into())
                    })?;
                    if li > 0 {
                        x = self.ffn(&self.layers[li - 1], x)?;
                    }
                    x = if li < n_layers {
                        self.mixer(li, x, pools, batch, seq_tables, &mut linear_idx)?
                    } else {
                        self.logits(x, logit_rows)?
                    };
                    hidden = Some(x);
                    Ok(())
                });
            });
            result?;
            if let (Some(hook), true) = (after_layer.as_mut(), to < n_layers) {
                hook(to)?;
            }
            from = to + 1;
        }
        hidden.ok_or_else(|| ModelError::Batch("the backend did not run the model".into()).into())
    }

    /// Token mixer of layer `li` (attention or linear attention) plus its residual.
    fn mixer(
        &self,
        li: usize,
        x: Tensor,
        pools: &[Option<PagedPool>],
        batch: &Batch<'_>,
        [attn_seqs, window_seqs]: [&[AttnSeq<'_>]; 2],
        linear_idx: &mut usize,
    ) -> Result<Tensor, ModelError> {
        let be = &*self.backend;
        let c = &self.config;
        let n = batch.tokens.len();
        let layer = &self.layers[li];
        let xn = be.rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
        let mixed = match &layer.mixer {
            DevMixer::Attention {
                wq,
                wk,
                wv,
                wo,
                bq,
                bk,
                bv,
                q_norm,
                k_norm,
                window,
                rope_base,
            } => {
                let Some(pool) = &pools[li] else {
                    return Err(ModelError::Batch(format!("layer {li} has no KV pool")));
                };
                let [q, k, v] = self.products(&xn, [wq, wk, wv])?;
                let proj = |mut t: Tensor,
                            b: &Option<Vec<f32>>,
                            heads: usize|
                 -> Result<Tensor, KernelError> {
                    if let Some(b) = b {
                        let rows: Vec<f32> = b.iter().copied().cycle().take(n * b.len()).collect();
                        let bt = be.upload(&HostTensor::from_f32(vec![n, b.len()], &rows))?;
                        t = be.add(&t, &bt)?;
                    }
                    t.reshape(&[n, heads, c.head_dim])
                };
                // QK-norm: one RMSNorm per head, the `[n, heads, head_dim]` rows seen as
                // `[n·heads, head_dim]`.
                let head_norm =
                    |t: Tensor, w: &Option<Tensor>, heads: usize| -> Result<Tensor, KernelError> {
                        let Some(w) = w else { return Ok(t) };
                        be.rms_norm(&t.reshape(&[n * heads, c.head_dim])?, w, c.rms_eps)?
                            .reshape(&[n, heads, c.head_dim])
                    };
                let q = head_norm(proj(q, bq, c.n_heads)?, q_norm, c.n_heads)?;
                let k = head_norm(proj(k, bk, c.n_kv_heads)?, k_norm, c.n_kv_heads)?;
                let v = proj(v, bv, c.n_kv_heads)?;
                let q = be.rope(&q, batch.positions, *rope_base, c.rope_style)?;
                let k = be.rope(&k, batch.positions, *rope_base, c.rope_style)?;
                // Sliding-window layers live in the engine's ring when it keeps one.
                let (slots, seqs) = match (window, batch.window_slots) {
                    (Some(_), Some(ws)) => (ws, window_seqs),
                    _ => (batch.slots, attn_seqs),
                };
                be.kv_write(&pool.k, &pool.v, &k, &v, slots)?;
                let params = AttnParams {
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                    head_dim: c.head_dim,
                    scale: c
                        .block
                        .query_scale
                        .unwrap_or(1.0 / (c.head_dim as f32).sqrt()),
                    window: *window,
                };
                let att = be.attention(&q, &pool.k, &pool.v, seqs, &params)?;
                be.matmul(&att, wo)?
            }
            DevMixer::Linear {
                wq,
                wk,
                wv,
                w_beta,
                w_g,
                wo,
                heads,
                key_dim,
                value_dim,
            } => {
                let dims = (*heads, *key_dim, *value_dim);
                let out =
                    self.linear_mixer(&xn, [wq, wk, wv, w_beta, w_g], dims, batch, *linear_idx)?;
                *linear_idx += 1;
                be.matmul(&out, wo)?
            }
        };
        self.residual(x, mixed, &layer.post_mixer_norm)
    }

    /// `x + post_norm(y)` (no norm for Llama-style blocks).
    fn residual(&self, x: Tensor, y: Tensor, post: &Option<Tensor>) -> Result<Tensor, ModelError> {
        let be = &*self.backend;
        let y = match post {
            Some(w) => be.rms_norm(&y, w, self.config.rms_eps)?,
            None => y,
        };
        Ok(be.add(&x, &y)?)
    }

    /// Feed-forward half of `layer` (gated MLP: SwiGLU or GeGLU) plus its residual.
    fn ffn(&self, layer: &DevLayer, x: Tensor) -> Result<Tensor, ModelError> {
        let be = &*self.backend;
        let xn = be.rms_norm(&x, &layer.ffn_norm, self.config.rms_eps)?;
        let [gate, upv] = self.products(&xn, [&layer.w_gate, &layer.w_up])?;
        let act = be.glu(&gate, &upv, self.config.block.glu_act)?;
        let down = be.matmul(&act, &layer.w_down)?;
        self.residual(x, down, &layer.post_ffn_norm)
    }

    /// `x · wᵢᵀ` for `N` weights of the same input (`Backend::matmul_many`).
    fn products<const N: usize>(
        &self,
        x: &Tensor,
        ws: [&Tensor; N],
    ) -> Result<[Tensor; N], ModelError> {
        let out = self.backend.matmul_many(x, &ws)?;
        let got = out.len();
        out.try_into()
            .map_err(|_| ModelError::Batch(format!("{got} products for {N} weights")))
    }

    /// Final norm and output projection of the rows whose logits are wanted.
    fn logits(&self, mut x: Tensor, logit_rows: &[u32]) -> Result<Tensor, ModelError> {
        let be = &*self.backend;
        let n = x.shape().first().copied().unwrap_or(0);
        if logit_rows.len() != n || logit_rows.iter().enumerate().any(|(i, &r)| r as usize != i) {
            // Gather only the rows whose logits are wanted (the last token of a prefill chunk).
            x = be.embedding(&x, logit_rows)?;
        }
        let xn = be.rms_norm(&x, &self.output_norm, self.config.rms_eps)?;
        Ok(be.matmul(&xn, &self.output)?)
    }

    /// Gated delta-rule token mixer for every sequence of the batch → `[n, heads·value_dim]`.
    ///
    /// The backend has no sigmoid/softplus/L2-norm ops, so the small per-token gate vectors and
    /// the q/k normalisation go through the host; the heavy parts (projections, the recurrence)
    /// stay on the backend. The recurrence runs once per sequence since states are per sequence.
    fn linear_mixer(
        &self,
        xn: &Tensor,
        w: [&Tensor; 5],
        (heads, dk, dv): (usize, usize, usize),
        batch: &Batch<'_>,
        linear_idx: usize,
    ) -> Result<Tensor, ModelError> {
        let be = &*self.backend;
        let n = batch.tokens.len();
        let [wq, wk, wv, wb, wg] = w;
        let q = be.download(&be.matmul(xn, wq)?)?;
        let k = be.download(&be.matmul(xn, wk)?)?;
        let v = be.download(&be.matmul(xn, wv)?)?;
        let b = be.download(&be.matmul(xn, wb)?)?;
        let g = be.download(&be.matmul(xn, wg)?)?;
        let params = LinearAttnParams {
            n_heads: heads,
            key_dim: dk,
            value_dim: dv,
            scale: 1.0 / (dk as f32).sqrt(),
            chunk: LINEAR_CHUNK,
        };
        let mut out = Vec::with_capacity(n * heads * dv);
        let mut row = 0usize;
        for s in batch.seqs {
            let state = s.states.get(linear_idx).ok_or_else(|| {
                ModelError::Batch(format!(
                    "sequence has no state for linear layer #{linear_idx}"
                ))
            })?;
            let r = row..row + s.n_new;
            row += s.n_new;
            let mut qs = q[r.start * heads * dk..r.end * heads * dk].to_vec();
            let mut ks = k[r.start * heads * dk..r.end * heads * dk].to_vec();
            l2_normalize(&mut qs, dk);
            l2_normalize(&mut ks, dk);
            let vs = &v[r.start * heads * dv..r.end * heads * dv];
            let bs: Vec<f32> = b[r.start * heads..r.end * heads]
                .iter()
                .map(|&x| sigmoid(x))
                .collect();
            let gs: Vec<f32> = g[r.start * heads..r.end * heads]
                .iter()
                .map(|&x| -softplus(x))
                .collect();
            let m = s.n_new;
            let upl = |shape: Vec<usize>, d: &[f32]| be.upload(&HostTensor::from_f32(shape, d));
            let o = be.linear_attention(
                &upl(vec![m, heads, dk], &qs)?,
                &upl(vec![m, heads, dk], &ks)?,
                &upl(vec![m, heads, dv], vs)?,
                &upl(vec![m, heads], &bs)?,
                &upl(vec![m, heads], &gs)?,
                state,
                &params,
            )?;
            out.extend(be.download(&o)?);
        }
        Ok(be.upload(&HostTensor::from_f32(vec![n, heads * dv], &out))?)
    }
}

fn l2_normalize(x: &mut [f32], d: usize) {
    for v in x.chunks_exact_mut(d) {
        let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-6);
        v.iter_mut().for_each(|a| *a /= norm);
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(1 + e^x)` without overflow.
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}
