//! The KV layout: what a model's cache looks like in memory and on the wire.
//!
//! A [`KvLayout`] is what two nodes must agree on before one ships KV to the other; its
//! [`KvLayout::layout_hash`] (mixed with the model's weights hash) is what adverts and KV stream
//! headers carry, so a mismatch is caught before a single byte of KV is written.
//!
//! # Export layout (version 3)
//!
//! KV travels as *pieces*: one layer's KV for a range of tokens `start..end` of a sequence of
//! `n_tokens` tokens. A piece's bytes are
//!
//! * for a **paged** layer ([`LayerKvShape::Paged`], full or sliding-window attention): the K
//!   rows, then the V rows, each `[end - start, n_kv_heads, head_dim]` (no padding), with
//!   elements of the layout's [`KvDType`] (`f16` by default, `f32` when the engine is configured
//!   so). `start` is a multiple of `block_size`; `end` is one too, or `n_tokens`. The pieces of a
//!   layer cover exactly [`KvLayout::transfer_rows`]: every token for full attention, and for a
//!   sliding-window layer only the last `window` tokens (from the block boundary at or before
//!   `n_tokens - window`), the only ones a decode will read;
//! * for a **state** layer ([`LayerKvShape::State`], linear attention): the recurrent state
//!   `[heads, value_dim, key_dim]`, one piece covering `0..n_tokens`, always `f32` whatever
//!   `dtype` says: the state is updated in place at every token, so it is kept (and shipped) at
//!   full precision, and a remote prefill hands over exactly the bits a local one would have.
//!
//! Every element is little-endian, row-major (last index fastest). A whole-sequence export is one
//! piece per layer, concatenated in layer order. [`KvDType::encode`] and [`KvDType::decode`] are
//! the element codecs. (Version 1 shipped whole layers of f32, padded to whole blocks, and every
//! token of sliding-window layers; version 2 had no checkpoints.)
//!
//! # Checkpoints (layouts with state)
//!
//! A home verifies imported KV by recomputing a few positions from it (DESIGN.md §8). For a
//! layout with linear-attention state that needs the state *before* those positions, which the
//! export does not hold. So a **transfer** (what a remote prefill streams, unlike an export)
//! of a layout with state also carries [`KvLayout::checkpoints`]: at each checkpoint `c`, every
//! state layer's state after token `c` (a piece `0..c`) and every sliding-window layer's
//! [`KvLayout::transfer_rows`] of a `c`-token sequence (the window a decode resuming at `c`
//! would read), merged with the rows the export sends ([`KvLayout::transfer_spans`]). The home
//! can then run any stretch `c..` from its checkpoint as the prefill did. Positions depend on
//! the token count and the layout only (both ends compute them): one per 1,024 tokens, or per
//! four states' worth of per-token KV when that is more (at most 7, evenly spaced), and a tail
//! one at the block boundary at or before `n − 32`, so the last position and the final state
//! are always recomputable cheaply. Layouts without state carry none.
//!
//! In device memory the engine keeps one K and one V pool per paged layer, each
//! `[n_blocks, block_size, n_kv_heads, head_dim]` of `dtype`; one [`super::BlockId`] indexes the
//! same block in every paged layer, so a block of a given id holds `block_size` tokens of K/V for
//! all of them. An `f16` pool holds exactly the values an export carries, so export → import →
//! decode is bit-identical to decoding where the prefill ran.

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::engine::{LayerKind, ModelConfig};

/// The layout version this code writes and accepts. Bump on any change to the export layout or
/// to the hash encoding.
pub const KV_LAYOUT_VERSION: u32 = 3;

/// Tokens per evenly spaced checkpoint of a transfer with state, at least (see the module docs).
pub const CHECKPOINT_SPACING: usize = 1024;
/// At most this many evenly spaced checkpoints (the tail one comes on top).
pub const MAX_EVEN_CHECKPOINTS: usize = 7;
/// The tail checkpoint lies at the block boundary at or before `n − CHECKPOINT_TAIL`.
pub const CHECKPOINT_TAIL: usize = 32;

/// Element type of linear-attention state, in memory and in the export layout, whatever the
/// layout's `dtype` (see the module docs).
pub const STATE_DTYPE: KvDType = KvDType::F32;

/// Element type of paged KV, in device memory and in the export layout (`engine.kv_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum KvDType {
    /// IEEE-754 binary32, little-endian.
    F32,
    /// IEEE-754 binary16, little-endian: half the memory and wire bytes of f32, what llama.cpp
    /// keeps by default. Values are rounded to nearest even when written.
    #[default]
    F16,
}

/// A KV byte string that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{got} bytes of {dtype} KV: not a whole number of {size}-byte values")]
pub struct KvDecodeError {
    pub dtype: KvDType,
    pub got: usize,
    pub size: usize,
}

impl std::fmt::Display for KvDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
        })
    }
}

impl std::str::FromStr for KvDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(KvDType::F32),
            "f16" => Ok(KvDType::F16),
            other => Err(format!("unknown KV dtype `{other}` (expected f16 or f32)")),
        }
    }
}

impl KvDType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 => 2,
        }
    }

    /// The compute backends' element type for pools of this dtype.
    pub fn kernel_dtype(self) -> prfaas_kernels::DType {
        match self {
            KvDType::F32 => prfaas_kernels::DType::F32,
            KvDType::F16 => prfaas_kernels::DType::F16,
        }
    }

    /// Appends `values` to `out` as little-endian elements of this dtype (`f16`: rounded to
    /// nearest even, vectorised; values that already are f16 values are kept exactly).
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size_bytes());
        match self {
            KvDType::F32 => values
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            KvDType::F16 => {
                const CHUNK: usize = 1024;
                let mut buf = [f16::ZERO; CHUNK];
                for c in values.chunks(CHUNK) {
                    let h = &mut buf[..c.len()];
                    h.convert_from_f32_slice(c);
                    h.iter()
                        .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
                }
            }
        }
    }

    /// Parses little-endian elements of this dtype (widened to f32, exactly).
    pub fn decode(self, bytes: &[u8]) -> Result<Vec<f32>, KvDecodeError> {
        let size = self.size_bytes();
        if !bytes.len().is_multiple_of(size) {
            return Err(KvDecodeError {
                dtype: self,
                got: bytes.len(),
                size,
            });
        }
        Ok(match self {
            KvDType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            KvDType::F16 => {
                let h: Vec<f16> = bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect();
                let mut out = vec![0.0f32; h.len()];
                h.convert_to_f32_slice(&mut out);
                out
            }
        })
    }

    /// Stable one-byte tag used in [`KvLayout::layout_hash`].
    fn hash_tag(self) -> u8 {
        match self {
            KvDType::F32 => 0,
            KvDType::F16 => 1,
        }
    }
}

/// The KV a single layer keeps for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayerKvShape {
    /// Per-token K and V (full attention: `window == None`; sliding-window attention:
    /// `window == Some(w)`), stored in paged blocks.
    Paged {
        n_kv_heads: usize,
        head_dim: usize,
        window: Option<usize>,
    },
    /// A fixed-size recurrent state per sequence (linear attention), `[heads, value_dim, key_dim]`.
    State {
        heads: usize,
        key_dim: usize,
        value_dim: usize,
    },
}

impl LayerKvShape {
    /// True for layers that keep per-token blocks.
    pub fn is_paged(&self) -> bool {
        matches!(self, LayerKvShape::Paged { .. })
    }

    /// Elements per token of K plus V (0 for state layers).
    fn kv_elems_per_token(&self) -> usize {
        match *self {
            LayerKvShape::Paged {
                n_kv_heads,
                head_dim,
                ..
            } => 2 * n_kv_heads * head_dim,
            LayerKvShape::State { .. } => 0,
        }
    }

    /// Elements of the per-sequence state (0 for paged layers).
    fn state_elems(&self) -> usize {
        match *self {
            LayerKvShape::Paged { .. } => 0,
            LayerKvShape::State {
                heads,
                key_dim,
                value_dim,
            } => heads * key_dim * value_dim,
        }
    }
}

/// Errors building a layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvLayoutError {
    #[error("KV block size must be at least 1 token")]
    ZeroBlockSize,
    #[error("layer {layer}: zero-sized KV shape {shape:?}")]
    EmptyLayer { layer: usize, shape: LayerKvShape },
    #[error("layer {layer}: sliding window of 0 tokens")]
    ZeroWindow { layer: usize },
}

/// Versioned description of a model's KV cache (see the module docs for the byte layout).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvLayout {
    /// [`KV_LAYOUT_VERSION`] when produced by this code.
    pub version: u32,
    pub dtype: KvDType,
    /// Tokens per paged block.
    pub block_size: usize,
    /// One entry per model layer, in order.
    pub layers: Vec<LayerKvShape>,
}

impl KvLayout {
    /// Builds and validates a layout from explicit layer shapes (current version, f16; see
    /// [`KvLayout::with_dtype`]).
    pub fn new(block_size: usize, layers: Vec<LayerKvShape>) -> Result<Self, KvLayoutError> {
        if block_size == 0 {
            return Err(KvLayoutError::ZeroBlockSize);
        }
        for (layer, shape) in layers.iter().enumerate() {
            let empty = match *shape {
                LayerKvShape::Paged {
                    n_kv_heads,
                    head_dim,
                    window,
                } => {
                    if window == Some(0) {
                        return Err(KvLayoutError::ZeroWindow { layer });
                    }
                    n_kv_heads == 0 || head_dim == 0
                }
                LayerKvShape::State { .. } => shape.state_elems() == 0,
            };
            if empty {
                return Err(KvLayoutError::EmptyLayer {
                    layer,
                    shape: *shape,
                });
            }
        }
        Ok(Self {
            version: KV_LAYOUT_VERSION,
            dtype: KvDType::default(),
            block_size,
            layers,
        })
    }

    /// The same layout with paged KV of `dtype`.
    pub fn with_dtype(mut self, dtype: KvDType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The layout of `config`'s KV with `block_size` tokens per block.
    pub fn from_model(config: &ModelConfig, block_size: usize) -> Result<Self, KvLayoutError> {
        let layers = config
            .layers
            .iter()
            .map(|kind| match *kind {
                LayerKind::Full => LayerKvShape::Paged {
                    n_kv_heads: config.n_kv_heads,
                    head_dim: config.head_dim,
                    window: None,
                },
                LayerKind::Sliding { window } => LayerKvShape::Paged {
                    n_kv_heads: config.n_kv_heads,
                    head_dim: config.head_dim,
                    window: Some(window),
                },
                LayerKind::Linear {
                    heads,
                    key_dim,
                    value_dim,
                } => LayerKvShape::State {
                    heads,
                    key_dim,
                    value_dim,
                },
            })
            .collect();
        Self::new(block_size, layers)
    }

    /// Number of layers that keep paged blocks.
    pub fn n_paged_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.is_paged()).count()
    }

    /// Number of layers that keep a recurrent state.
    pub fn n_state_layers(&self) -> usize {
        self.layers.len() - self.n_paged_layers()
    }

    /// True when resuming a sequence needs a state slot as well as blocks (hybrid / linear models);
    /// the prefix cache then only reports hits where it also holds the matching state.
    pub fn has_state(&self) -> bool {
        self.n_state_layers() > 0
    }

    /// Bytes of paged K+V one token occupies across all layers (state layers add nothing per
    /// token: that is the whole point of hybrid attention).
    pub fn bytes_per_token(&self) -> usize {
        self.layers
            .iter()
            .map(LayerKvShape::kv_elems_per_token)
            .sum::<usize>()
            * self.dtype.size_bytes()
    }

    /// Element type of `layer` in the export layout: `dtype` for paged layers, [`STATE_DTYPE`]
    /// for state layers.
    pub fn layer_dtype(&self, layer: usize) -> KvDType {
        match self.layers.get(layer) {
            Some(LayerKvShape::State { .. }) => STATE_DTYPE,
            _ => self.dtype,
        }
    }

    /// Bytes of one block (K and V) in `layer`; 0 for state layers and out-of-range layers.
    pub fn block_bytes(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| {
            l.kv_elems_per_token() * self.block_size * self.dtype.size_bytes()
        })
    }

    /// Bytes one [`super::BlockId`] stands for: one block in every paged layer.
    pub fn block_bytes_all_layers(&self) -> usize {
        self.bytes_per_token() * self.block_size
    }

    /// Bytes of one sequence's state in `layer` (always f32); 0 for paged layers and
    /// out-of-range layers.
    pub fn state_bytes(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .map_or(0, |l| l.state_elems() * STATE_DTYPE.size_bytes())
    }

    /// Bytes one [`super::StateSlot`] stands for: the states of every linear layer.
    pub fn state_slot_bytes(&self) -> usize {
        (0..self.layers.len()).map(|l| self.state_bytes(l)).sum()
    }

    /// Blocks needed to hold `n_tokens` tokens.
    pub fn blocks_for_tokens(&self, n_tokens: usize) -> usize {
        n_tokens.div_ceil(self.block_size)
    }

    /// The tokens of paged `layer` that a sequence of `n_tokens` tokens exports: all of them for
    /// full attention; for a sliding window `w`, `n_tokens - w` rounded down to a block boundary
    /// onwards (a decode at position `p ≥ n_tokens` reads only keys after `p - w`). Empty for
    /// state and out-of-range layers.
    pub fn transfer_rows(&self, layer: usize, n_tokens: usize) -> std::ops::Range<usize> {
        match self.layers.get(layer) {
            Some(LayerKvShape::Paged { window: None, .. }) => 0..n_tokens,
            Some(LayerKvShape::Paged {
                window: Some(w), ..
            }) => {
                let from = n_tokens.saturating_sub(*w) / self.block_size * self.block_size;
                from..n_tokens
            }
            _ => 0..0,
        }
    }

    /// The checkpoints of a transfer of `n_tokens` tokens (see the module docs): sorted, distinct
    /// block boundaries in `1..n_tokens`; empty for layouts without state.
    pub fn checkpoints(&self, n_tokens: usize) -> Vec<usize> {
        if !self.has_state() {
            return Vec::new();
        }
        let bs = self.block_size;
        // States large against the per-token KV space their checkpoints out, so that the
        // even ones add at most about a quarter of what the paged KV of those tokens takes in
        // memory (more of the export where sliding windows trim it).
        let spacing = CHECKPOINT_SPACING
            .max(4 * self.state_slot_bytes() / self.bytes_per_token().max(1))
            .next_multiple_of(bs);
        let even = (n_tokens / spacing).min(MAX_EVEN_CHECKPOINTS);
        let mut c: Vec<usize> = (1..=even)
            .map(|i| i * n_tokens / (even + 1) / bs * bs)
            .chain(std::iter::once(
                n_tokens.saturating_sub(CHECKPOINT_TAIL) / bs * bs,
            ))
            .filter(|&c| c > 0 && c < n_tokens)
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    }

    /// The token rows of paged `layer` that a transfer of `n_tokens` tokens carries, as sorted,
    /// disjoint, block-aligned ranges: [`transfer_rows`](Self::transfer_rows) and, for a
    /// sliding-window layer of a layout with state, the window before each checkpoint. Empty for
    /// state and out-of-range layers.
    pub fn transfer_spans(&self, layer: usize, n_tokens: usize) -> Vec<std::ops::Range<usize>> {
        let last = self.transfer_rows(layer, n_tokens);
        if last.is_empty() {
            return Vec::new();
        }
        let mut raw: Vec<std::ops::Range<usize>> = self
            .checkpoints(n_tokens)
            .into_iter()
            .map(|c| self.transfer_rows(layer, c))
            .chain(std::iter::once(last))
            .filter(|r| !r.is_empty())
            .collect();
        raw.sort_by_key(|r| r.start);
        let mut out: Vec<std::ops::Range<usize>> = Vec::with_capacity(raw.len());
        for r in raw {
            match out.last_mut() {
                Some(prev) if r.start <= prev.end => prev.end = prev.end.max(r.end),
                _ => out.push(r),
            }
        }
        out
    }

    /// Whether some layer exports fewer than all `n_tokens` tokens (a sliding window shorter
    /// than the sequence): such KV can resume decoding but cannot serve as a cached prefix.
    pub fn trims(&self, n_tokens: usize) -> bool {
        (0..self.layers.len())
            .any(|l| self.layers[l].is_paged() && self.transfer_rows(l, n_tokens).start > 0)
    }

    /// Bytes of a piece of `layer` holding `rows` tokens (K and V rows for paged layers; the
    /// whole state, whatever `rows`, for state layers).
    pub fn piece_bytes(&self, layer: usize, rows: usize) -> usize {
        self.piece_elems(layer, rows) * self.layer_dtype(layer).size_bytes()
    }

    /// Elements of a piece of `layer` holding `rows` tokens (see [`piece_bytes`](Self::piece_bytes)).
    pub fn piece_elems(&self, layer: usize, rows: usize) -> usize {
        match self.layers.get(layer) {
            Some(l @ LayerKvShape::Paged { .. }) => rows * l.kv_elems_per_token(),
            Some(l @ LayerKvShape::State { .. }) => l.state_elems(),
            None => 0,
        }
    }

    /// Bytes of `layer` in the export layout for a sequence of `n_tokens` tokens: its
    /// [`transfer_rows`](Self::transfer_rows) for paged layers, the state for state layers.
    pub fn export_layer_bytes(&self, layer: usize, n_tokens: usize) -> usize {
        self.wire_export_layer_bytes(layer, n_tokens, super::wire::KvWire::F16)
    }

    /// Total bytes of an exported sequence of `n_tokens` tokens (sum over layers).
    pub fn export_bytes(&self, n_tokens: usize) -> usize {
        self.wire_export_bytes(n_tokens, super::wire::KvWire::F16)
    }

    /// Bytes of a piece of `layer` holding `rows` tokens as it crosses the network in `wire`:
    /// [`piece_bytes`](Self::piece_bytes) for the exact encoding and for state layers (state
    /// always travels as f32); K and V each as int8 blocks ([`super::wire::encode_int8`]) for
    /// [`super::wire::KvWire::Int8`].
    pub fn wire_piece_bytes(&self, layer: usize, rows: usize, wire: super::wire::KvWire) -> usize {
        match (wire, self.layers.get(layer)) {
            (super::wire::KvWire::Int8, Some(l @ LayerKvShape::Paged { .. })) => {
                let half = rows * l.kv_elems_per_token() / 2;
                2 * super::wire::int8_encoded_len(half, super::wire::INT8_BLOCK)
            }
            _ => self.piece_bytes(layer, rows),
        }
    }

    /// [`export_layer_bytes`](Self::export_layer_bytes) in `wire`.
    pub fn wire_export_layer_bytes(
        &self,
        layer: usize,
        n_tokens: usize,
        wire: super::wire::KvWire,
    ) -> usize {
        self.wire_piece_bytes(layer, self.transfer_rows(layer, n_tokens).len(), wire)
    }

    /// [`export_bytes`](Self::export_bytes) in `wire`: what a transfer of `n_tokens` carries.
    pub fn wire_export_bytes(&self, n_tokens: usize, wire: super::wire::KvWire) -> usize {
        (0..self.layers.len())
            .map(|l| self.wire_export_layer_bytes(l, n_tokens, wire))
            .sum()
    }

    /// Bytes of `layer` in a transfer of `n_tokens` tokens in `wire`: its
    /// [`transfer_spans`](Self::transfer_spans) for paged layers; the final state and one per
    /// checkpoint for state layers. At least [`wire_export_layer_bytes`](Self::wire_export_layer_bytes).
    pub fn wire_transfer_layer_bytes(
        &self,
        layer: usize,
        n_tokens: usize,
        wire: super::wire::KvWire,
    ) -> usize {
        match self.layers.get(layer) {
            Some(LayerKvShape::Paged { .. }) => self
                .transfer_spans(layer, n_tokens)
                .iter()
                .map(|r| self.wire_piece_bytes(layer, r.len(), wire))
                .sum(),
            Some(LayerKvShape::State { .. }) => {
                (1 + self.checkpoints(n_tokens).len()) * self.piece_bytes(layer, n_tokens)
            }
            None => 0,
        }
    }

    /// What a remote prefill of `n_tokens` tokens streams in `wire`: the export plus the
    /// checkpoints (sum over layers of [`wire_transfer_layer_bytes`](Self::wire_transfer_layer_bytes)).
    pub fn wire_transfer_bytes(&self, n_tokens: usize, wire: super::wire::KvWire) -> usize {
        (0..self.layers.len())
            .map(|l| self.wire_transfer_layer_bytes(l, n_tokens, wire))
            .sum()
    }

    /// [`wire_transfer_bytes`](Self::wire_transfer_bytes) in the exact encoding.
    pub fn transfer_bytes(&self, n_tokens: usize) -> usize {
        self.wire_transfer_bytes(n_tokens, super::wire::KvWire::F16)
    }

    /// Bytes of KV that decoding after `n_tokens` tokens still reads: every block of full-attention
    /// layers, only the blocks holding the last `window` positions of sliding-window layers, the
    /// state of linear layers. This is what a window-trimmed store keeps and what a transfer of
    /// the sequence needs; [`Self::export_bytes`] is the same with every layer treated as full.
    pub fn resident_bytes(&self, n_tokens: usize) -> usize {
        let bs = self.block_size;
        (0..self.layers.len())
            .map(|l| match self.layers[l] {
                LayerKvShape::Paged {
                    window: Some(w), ..
                } if n_tokens > w => {
                    // Positions n−w .. n−1 span these blocks.
                    let blocks = (n_tokens - 1) / bs - (n_tokens - w) / bs + 1;
                    blocks * self.block_bytes(l)
                }
                _ => self.export_layer_bytes(l, n_tokens),
            })
            .sum()
    }

    /// A hash identifying (model weights, KV layout): two nodes may exchange KV iff they agree on it.
    ///
    /// Stable across runs, machines and compiler versions: SHA-256 over this exact byte string
    /// (integers little-endian, `usize` fields widened to `u64`):
    ///
    /// ```text
    /// b"prfaas-kv-layout"            16 bytes, domain separation
    /// model_hash                     32 bytes
    /// version                        u32
    /// dtype tag                      u8   (F32 = 0, F16 = 1)
    /// block_size                     u64
    /// layers.len()                   u64
    /// per layer, in order:
    ///   Paged: 0u8, n_kv_heads u64, head_dim u64, window u64 (0 = None; a window is never 0)
    ///   State: 1u8, heads u64, key_dim u64, value_dim u64
    /// ```
    pub fn layout_hash(&self, model_hash: [u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"prfaas-kv-layout");
        h.update(model_hash);
        h.update(self.version.to_le_bytes());
        h.update([self.dtype.hash_tag()]);
        h.update((self.block_size as u64).to_le_bytes());
        h.update((self.layers.len() as u64).to_le_bytes());
        for layer in &self.layers {
            let (tag, a, b, c) = match *layer {
                LayerKvShape::Paged {
                    n_kv_heads,
                    head_dim,
                    window,
                } => (0u8, n_kv_heads, head_dim, window.unwrap_or(0)),
                LayerKvShape::State {
                    heads,
                    key_dim,
                    value_dim,
                } => (1u8, heads, key_dim, value_dim),
            };
            h.update([tag]);
            for v in [a, b, c] {
                h.update((v as u64).to_le_bytes());
            }
        }
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prfaas_kernels::RopeStyle;

    fn model(layers: Vec<LayerKind>) -> ModelConfig {
        ModelConfig {
            name: "test".into(),
            arch: "synthetic".into(),
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 64,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            rms_eps: 1e-5,
            rope_base: 10000.0,
            rope_style: RopeStyle::Normal,
            max_context: 256,
            tie_embeddings: true,
            qkv_bias: false,
            layers,
            block: Default::default(),
        }
    }

    fn lin() -> LayerKind {
        LayerKind::Linear {
            heads: 2,
            key_dim: 8,
            value_dim: 8,
        }
    }

    /// 3 linear : 1 full, plus one sliding layer.
    fn hybrid() -> KvLayout {
        let layers = vec![
            lin(),
            lin(),
            lin(),
            LayerKind::Full,
            LayerKind::Sliding { window: 4 },
        ];
        KvLayout::from_model(&model(layers), 16).unwrap()
    }

    fn hex(h: [u8; 32]) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn model_hash() -> [u8; 32] {
        std::array::from_fn(|i| i as u8)
    }

    /// Gemma 3 270M: 18 layers, 5 sliding (window 512) : 1 full, one KV head of 256. Decode reads
    /// all tokens of the 3 full layers but only the last 512 of the 15 sliding ones.
    #[test]
    fn gemma3_window_trimmed_bytes() {
        let layers = (0..18)
            .map(|i| {
                if i % 6 == 5 {
                    LayerKind::Full
                } else {
                    LayerKind::Sliding { window: 512 }
                }
            })
            .collect();
        let mut cfg = model(layers);
        (cfg.n_kv_heads, cfg.head_dim) = (1, 256);
        let l = KvLayout::from_model(&cfg, 16).unwrap();
        let per_layer_token = 2 * 256 * l.dtype.size_bytes();
        assert_eq!(l.bytes_per_token(), 18 * per_layer_token);
        assert_eq!(l.block_bytes(0), 16 * per_layer_token);
        // Within the window nothing is trimmed.
        assert_eq!(l.resident_bytes(300), l.export_bytes(300));
        assert_eq!(l.resident_bytes(512), l.export_bytes(512));
        // 8192 tokens: full layers keep all, sliding ones the 32 blocks of positions 7680..8191.
        let full = |n| 3 * l.export_layer_bytes(5, n);
        assert_eq!(
            l.resident_bytes(8192),
            full(8192) + 15 * 32 * l.block_bytes(0)
        );
        // A window not aligned to blocks spans one block more: positions 489..1000 → blocks 30..62.
        assert_eq!(
            l.resident_bytes(1001),
            full(1001) + 15 * 33 * l.block_bytes(0)
        );
        // Every layer global (dense) keeps everything.
        let dense = KvLayout::from_model(&model(vec![LayerKind::Full; 18]), 16).unwrap();
        assert_eq!(dense.resident_bytes(8192), dense.export_bytes(8192));
        // `engine.global_attention`: the windows widened to the context, the same bytes as
        // every layer global within it, and a layout (hash) of its own.
        cfg.max_context = 32_768;
        let global = KvLayout::from_model(&cfg.clone().with_global_attention(), 16).unwrap();
        assert_eq!(global.export_bytes(8192), 8192 * global.bytes_per_token());
        assert_eq!(global.bytes_per_token(), l.bytes_per_token());
        assert!(!global.trims(32_768));
        assert_ne!(global.layout_hash([0; 32]), l.layout_hash([0; 32]));
    }

    #[test]
    fn smollm2_geometry() {
        // SmolLM2-135M: 30 full-attention layers, 3 KV heads of 64.
        let mut cfg = model(vec![LayerKind::Full; 30]);
        cfg.n_kv_heads = 3;
        cfg.head_dim = 64;
        let l = KvLayout::from_model(&cfg, 16).unwrap();
        assert_eq!(l.version, KV_LAYOUT_VERSION);
        assert_eq!(l.dtype, KvDType::F16, "f16 by default");
        assert_eq!(l.bytes_per_token(), 30 * 2 * 3 * 64 * 2);
        assert_eq!(l.block_bytes(0), 16 * 2 * 3 * 64 * 2);
        assert_eq!(l.block_bytes_all_layers(), 16 * l.bytes_per_token());
        assert_eq!(l.state_slot_bytes(), 0);
        assert!(!l.has_state());
        // 1000 tokens pad to 63 blocks = 1008 tokens.
        // Pieces carry exactly the tokens (no block padding).
        assert_eq!(l.export_bytes(1000), 1000 * l.bytes_per_token());
        assert_eq!(l.export_layer_bytes(0, 1000), 1000 * 2 * 3 * 64 * 2);
        assert_eq!(
            hex(l.layout_hash([0; 32])),
            "f0f6675e895839918d8fe5e4ec4d156cfe2286d4c279cbe0c5e32a6456a984d0"
        );
        let f32l = l.clone().with_dtype(KvDType::F32);
        assert_eq!(f32l.bytes_per_token(), 30 * 2 * 3 * 64 * 4);
        assert_eq!(f32l.export_bytes(1000), 2 * l.export_bytes(1000));
        assert_eq!(
            hex(f32l.layout_hash([0; 32])),
            "598e10509a7ceb0c5e7bce93eaacf372fb313eea0d2e9791b3983dc9a9c2ef0e"
        );
    }

    #[test]
    fn hybrid_geometry() {
        let l = hybrid();
        assert_eq!(l.n_paged_layers(), 2);
        assert_eq!(l.n_state_layers(), 3);
        assert!(l.has_state());
        assert_eq!(
            l.layers[4],
            LayerKvShape::Paged {
                n_kv_heads: 2,
                head_dim: 8,
                window: Some(4)
            }
        );
        // Only the two paged layers cost per-token bytes (f16); state stays f32.
        assert_eq!(l.bytes_per_token(), 2 * (2 * 2 * 8) * 2);
        assert_eq!(l.block_bytes(0), 0);
        assert_eq!(l.block_bytes(3), 16 * 2 * 2 * 8 * 2);
        assert_eq!(l.block_bytes(99), 0);
        assert_eq!(l.state_bytes(0), 2 * 8 * 8 * 4);
        assert_eq!(l.state_bytes(3), 0);
        assert_eq!(l.state_slot_bytes(), 3 * 2 * 8 * 8 * 4);
        assert_eq!(l.export_layer_bytes(0, 5), l.state_bytes(0));
        assert_eq!(l.export_layer_bytes(3, 5), 5 * 2 * 2 * 8 * 2);
        let f32l = l.clone().with_dtype(KvDType::F32);
        assert_eq!(f32l.state_slot_bytes(), l.state_slot_bytes());
        assert_eq!(f32l.export_layer_bytes(3, 5), 5 * 2 * 2 * 8 * 4);
        assert_eq!(l.export_bytes(0), l.state_slot_bytes());
        // Window 4 at 17 tokens: from block 0 (17 - 4 = 13 rounds down to 0), nothing trimmed.
        assert_eq!(l.transfer_rows(4, 17), 0..17);
        assert!(!l.trims(17));
        assert_eq!(
            l.export_bytes(17),
            17 * l.bytes_per_token() + l.state_slot_bytes()
        );
        // At 40 tokens the window layer sends from block 2 (40 - 4 = 36 rounds down to 32).
        assert_eq!(l.transfer_rows(4, 40), 32..40);
        assert_eq!(l.transfer_rows(3, 40), 0..40);
        assert_eq!(l.transfer_rows(0, 40), 0..0, "state layers have no rows");
        assert!(l.trims(40));
        assert_eq!(l.export_layer_bytes(4, 40), 8 * 2 * 2 * 8 * 2);
    }

    /// Transfers of layouts with state carry checkpoints (the states, and the windows before
    /// them); layouts without state carry exactly their export.
    #[test]
    fn checkpoints_and_transfer_spans() {
        let l = hybrid();
        // Too short for a tail checkpoint (45 - 32 rounds down to 0).
        assert_eq!(l.checkpoints(45), Vec::<usize>::new());
        assert_eq!(l.transfer_bytes(45), l.export_bytes(45));
        // The tail: the block boundary at or before 100 - 32.
        assert_eq!(l.checkpoints(100), vec![64]);
        // One even checkpoint per 1,024 tokens, at most 7, plus the tail.
        assert_eq!(l.checkpoints(2500), vec![832, 1664, 2464]);
        let long = l.checkpoints(100_000);
        assert_eq!(long.len(), MAX_EVEN_CHECKPOINTS + 1);
        assert!(long.windows(2).all(|w| w[0] < w[1]) && long.iter().all(|c| c % 16 == 0));
        // Window 4 at 100 tokens: the rows before the checkpoint at 64 (from 60 rounded down
        // to 48) and the export's last window (from 96 rounded down to 96), not merged.
        assert_eq!(l.transfer_spans(4, 100), vec![48..64, 96..100]);
        assert_eq!(
            l.transfer_spans(3, 100),
            vec![0..100],
            "full layers: everything"
        );
        assert!(
            l.transfer_spans(0, 100).is_empty(),
            "state layers have no rows"
        );
        // Adjacent windows merge: at 2500 tokens, 2464's window (2448..2464) and the export's
        // (2496..2500) stay apart; every span is whole blocks but the last.
        assert_eq!(
            l.transfer_spans(4, 2500),
            vec![816..832, 1648..1664, 2448..2464, 2496..2500]
        );
        let extra = 3 * 16 * l.piece_bytes(4, 1) + 3 * 3 * l.state_bytes(0);
        assert_eq!(l.transfer_bytes(2500), l.export_bytes(2500) + extra);
        // A state large against the per-token KV spaces the even checkpoints out: 1 MiB of
        // state against 64 B per token, one per 4 × 16,384 tokens.
        let big = LayerKind::Linear {
            heads: 16,
            key_dim: 128,
            value_dim: 128,
        };
        let big = KvLayout::from_model(&model(vec![big, LayerKind::Full]), 16).unwrap();
        assert_eq!(big.checkpoints(100_000), vec![50_000, 99_968]);
        // No state, no checkpoints: a dense or windowed layout's transfer is its export.
        let dense = KvLayout::from_model(&model(vec![LayerKind::Full; 2]), 16).unwrap();
        assert!(dense.checkpoints(100_000).is_empty());
        assert_eq!(dense.transfer_bytes(5000), dense.export_bytes(5000));
    }

    #[test]
    fn rejects_degenerate_layouts() {
        assert_eq!(
            KvLayout::from_model(&model(vec![LayerKind::Full]), 0),
            Err(KvLayoutError::ZeroBlockSize)
        );
        assert_eq!(
            KvLayout::from_model(&model(vec![LayerKind::Sliding { window: 0 }]), 16),
            Err(KvLayoutError::ZeroWindow { layer: 0 })
        );
        let zero_state = LayerKind::Linear {
            heads: 2,
            key_dim: 0,
            value_dim: 8,
        };
        assert!(matches!(
            KvLayout::from_model(&model(vec![LayerKind::Full, zero_state]), 16),
            Err(KvLayoutError::EmptyLayer { layer: 1, .. })
        ));
    }

    /// Golden value computed independently (Python `hashlib.sha256` over the documented
    /// encoding), so a change to the encoding cannot go unnoticed.
    #[test]
    fn layout_hash_golden() {
        assert_eq!(
            hex(hybrid().layout_hash(model_hash())),
            "3ae14cd7e3b8dba040c00222e1d87f8d9bddb1abc2a1fa674929c82f097e5f74"
        );
    }

    #[test]
    fn layout_hash_changes_with_every_field() {
        let base = hybrid();
        let h0 = base.layout_hash(model_hash());
        let mut other_model = model_hash();
        other_model[31] ^= 1;
        let mut variants: Vec<(&str, KvLayout, [u8; 32])> =
            vec![("model hash", base.clone(), other_model)];
        let mut push = |what: &'static str, f: &dyn Fn(&mut KvLayout)| {
            let mut l = base.clone();
            f(&mut l);
            variants.push((what, l, model_hash()));
        };
        push("version", &|l| l.version = 1);
        push("dtype", &|l| l.dtype = KvDType::F32);
        push("block size", &|l| l.block_size = 32);
        push("layer dropped", &|l| {
            l.layers.pop();
        });
        push("layers reordered", &|l| l.layers.swap(2, 3));
        push("kv heads", &|l| {
            l.layers[3] = LayerKvShape::Paged {
                n_kv_heads: 1,
                head_dim: 8,
                window: None,
            }
        });
        push("head dim", &|l| {
            l.layers[3] = LayerKvShape::Paged {
                n_kv_heads: 2,
                head_dim: 16,
                window: None,
            }
        });
        push("window added", &|l| {
            l.layers[3] = LayerKvShape::Paged {
                n_kv_heads: 2,
                head_dim: 8,
                window: Some(4),
            }
        });
        push("window size", &|l| {
            l.layers[4] = LayerKvShape::Paged {
                n_kv_heads: 2,
                head_dim: 8,
                window: Some(5),
            }
        });
        push("state heads", &|l| {
            l.layers[0] = LayerKvShape::State {
                heads: 3,
                key_dim: 8,
                value_dim: 8,
            }
        });
        push("state key dim", &|l| {
            l.layers[0] = LayerKvShape::State {
                heads: 2,
                key_dim: 4,
                value_dim: 8,
            }
        });
        push("state value dim", &|l| {
            l.layers[0] = LayerKvShape::State {
                heads: 2,
                key_dim: 8,
                value_dim: 4,
            }
        });
        push("paged <-> state with equal numbers", &|l| {
            l.layers[3] = LayerKvShape::State {
                heads: 2,
                key_dim: 8,
                value_dim: 0,
            }
        });
        let mut seen = std::collections::HashSet::from([h0]);
        for (what, l, mh) in &variants {
            assert!(seen.insert(l.layout_hash(*mh)), "hash ignores {what}");
        }
        // Deterministic: same inputs, same hash.
        assert_eq!(hybrid().layout_hash(model_hash()), h0);
    }

    #[test]
    fn element_codecs_round_trip() {
        let vals = [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            1.0 + 2f32.powi(-11),
            65504.0,
            1e-7,
            3.25159,
        ];
        for dtype in [KvDType::F32, KvDType::F16] {
            let mut bytes = vec![0xaa];
            dtype.encode(&vals, &mut bytes);
            assert_eq!(bytes.len(), 1 + vals.len() * dtype.size_bytes());
            let back = dtype.decode(&bytes[1..]).unwrap();
            for (&b, &v) in back.iter().zip(&vals) {
                let want = match dtype {
                    KvDType::F32 => v,
                    KvDType::F16 => f16::from_f32(v).to_f32(),
                };
                assert_eq!(b.to_bits(), want.to_bits(), "{dtype} {v}");
            }
            // Decoded values re-encode to the same bytes.
            let mut again = Vec::new();
            dtype.encode(&back, &mut again);
            assert_eq!(again, bytes[1..]);
        }
        // More values than one conversion chunk.
        let long: Vec<f32> = (0..2500).map(|i| i as f32 * 0.01).collect();
        let mut bytes = Vec::new();
        KvDType::F16.encode(&long, &mut bytes);
        assert_eq!(KvDType::F16.decode(&bytes).unwrap().len(), long.len());
        assert!(KvDType::F16.decode(&[1, 2, 3]).is_err());
        assert!(KvDType::F32.decode(&[1, 2]).is_err());
        assert_eq!("f16".parse::<KvDType>(), Ok(KvDType::F16));
        assert_eq!(
            KvDType::F32.to_string().parse::<KvDType>(),
            Ok(KvDType::F32)
        );
        assert!("bf16".parse::<KvDType>().is_err());
    }

    #[test]
    fn serde_round_trip() {
        let l = hybrid();
        let json = serde_json::to_string(&l).unwrap();
        let back: KvLayout = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.layout_hash(model_hash()), l.layout_hash(model_hash()));
    }
}
