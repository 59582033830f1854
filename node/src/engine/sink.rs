//! The seam through which prefill hands out KV layer by layer, and the exported-KV container.
//!
//! A remote prefill node streams each layer to the decode node as soon as that layer is final
//! for the whole prompt, overlapping transfer with the remaining layers' compute; [`KvSink`] is
//! that hook. [`KvExport`] is the whole-sequence form (same per-layer data, plus the layout and
//! hash the receiver checks before importing). Byte layout: see [`crate::kv::layout`].

use crate::kv::layout::STATE_DTYPE;
use crate::kv::{KvDType, KvLayout};

/// One layer of one sequence's KV, in the export layout of [`crate::kv::layout`], as f32 values
/// (an f16 layout's values widened exactly; [`LayerKv::to_le_bytes`] encodes them in the
/// layout's dtype).
#[derive(Debug, Clone, PartialEq)]
pub enum LayerKv {
    /// Full / sliding attention: `k` and `v` are each `[n_tokens_padded, n_kv_heads, head_dim]`
    /// (padded to whole blocks; the padding is zero or stale and must be ignored).
    Paged { k: Vec<f32>, v: Vec<f32> },
    /// Linear attention: the recurrent state `[heads, value_dim, key_dim]`.
    State { state: Vec<f32> },
}

impl LayerKv {
    /// The element type this layer takes in a layout of paged-KV `dtype` (state is always f32).
    fn wire_dtype(&self, dtype: KvDType) -> KvDType {
        match self {
            LayerKv::Paged { .. } => dtype,
            LayerKv::State { .. } => STATE_DTYPE,
        }
    }

    /// Bytes this layer takes in the export layout with paged-KV `dtype` (the layout's `dtype`).
    pub fn size_bytes(&self, dtype: KvDType) -> usize {
        self.wire_dtype(dtype).size_bytes()
            * match self {
                LayerKv::Paged { k, v } => k.len() + v.len(),
                LayerKv::State { state } => state.len(),
            }
    }

    /// The layer's bytes in the export layout with paged-KV `dtype` (the layout's `dtype`):
    /// K then V in `dtype`, or the state in f32; little-endian.
    pub fn to_le_bytes(&self, dtype: KvDType) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size_bytes(dtype));
        let d = self.wire_dtype(dtype);
        match self {
            LayerKv::Paged { k, v } => {
                d.encode(k, &mut out);
                d.encode(v, &mut out);
            }
            LayerKv::State { state } => d.encode(state, &mut out),
        }
        out
    }

    /// Parses one layer's bytes for `layer` of `layout` holding `n_tokens` tokens.
    pub fn from_le_bytes(
        layout: &KvLayout,
        layer: usize,
        n_tokens: usize,
        bytes: &[u8],
    ) -> Result<Self, SinkError> {
        let want = layout.export_layer_bytes(layer, n_tokens);
        if bytes.len() != want || want == 0 {
            return Err(SinkError::BadLayer {
                layer,
                got: bytes.len(),
                want,
            });
        }
        // The length check above makes this a whole number of values.
        let vals = layout
            .layer_dtype(layer)
            .decode(bytes)
            .map_err(|_| SinkError::BadLayer {
                layer,
                got: bytes.len(),
                want,
            })?;
        Ok(if layout.layers[layer].is_paged() {
            let half = vals.len() / 2;
            LayerKv::Paged {
                k: vals[..half].to_vec(),
                v: vals[half..].to_vec(),
            }
        } else {
            LayerKv::State { state: vals }
        })
    }
}

/// Errors raised by sinks or when checking exported KV.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("layer {layer}: {got} bytes of KV, layout says {want}")]
    BadLayer {
        layer: usize,
        got: usize,
        want: usize,
    },
    #[error("KV sink closed: {0}")]
    Closed(String),
}

/// Receives each layer's KV once that layer is final for the whole prompt.
///
/// Called in layer order, exactly once per layer, from the engine's compute thread: an
/// implementation that ships KV over the network must hand the data to a bounded queue and
/// return, not block on the network.
pub trait KvSink {
    fn layer(&mut self, layer: usize, kv: LayerKv) -> Result<(), SinkError>;

    /// False for sinks that drop everything, so the engine can skip the device→host copies.
    fn wants_kv(&self) -> bool {
        true
    }
}

/// Discards KV (local generation: the KV stays in the engine's pools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl KvSink for NullSink {
    fn layer(&mut self, _layer: usize, _kv: LayerKv) -> Result<(), SinkError> {
        Ok(())
    }
    fn wants_kv(&self) -> bool {
        false
    }
}

/// Keeps every layer in memory (tests, and building a [`KvExport`] from a prefill).
#[derive(Debug, Default, Clone)]
pub struct CollectSink {
    pub layers: Vec<(usize, LayerKv)>,
}

impl KvSink for CollectSink {
    fn layer(&mut self, layer: usize, kv: LayerKv) -> Result<(), SinkError> {
        self.layers.push((layer, kv));
        Ok(())
    }
}

/// A whole sequence's KV as shipped from a prefill node to a decode node.
#[derive(Debug, Clone, PartialEq)]
pub struct KvExport {
    pub layout: KvLayout,
    /// [`KvLayout::layout_hash`] of the producing engine (model weights + layout).
    pub layout_hash: [u8; 32],
    /// The tokens whose KV this is (the receiver needs them for its prefix cache and positions).
    pub tokens: Vec<u32>,
    /// One entry per model layer, in order.
    pub layers: Vec<LayerKv>,
}

impl KvExport {
    /// Total KV bytes (what crosses the network).
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.size_bytes(self.layout.dtype))
            .sum()
    }
}
