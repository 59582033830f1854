//! The seam through which prefill hands out KV piece by piece, and the exported-KV container.
//!
//! A remote prefill node streams the KV of every prefill chunk as soon as each layer of that
//! chunk is computed, overlapping the transfer with the rest of the prompt's compute; [`KvSink`]
//! is that hook, and a [`KvPiece`] is one layer's KV for a range of tokens. [`KvExport`] is the
//! whole-sequence form (one piece per layer covering what a decode reads, plus the layout and
//! hash the receiver checks before importing). Byte layout: see [`crate::kv::layout`].

use std::ops::Range;

use crate::kv::layout::STATE_DTYPE;
use crate::kv::wire::{decode_int8, encode_int8, int8_encoded_len, KvWire, WireError, INT8_BLOCK};
use crate::kv::{KvDType, KvLayout};

/// One layer's KV for a range of a sequence's tokens, in the export layout of
/// [`crate::kv::layout`], as f32 values (an f16 layout's values widened exactly;
/// [`LayerKv::to_le_bytes`] encodes them in the layout's dtype).
#[derive(Debug, Clone, PartialEq)]
pub enum LayerKv {
    /// Full / sliding attention: `k` and `v` are each `[rows, n_kv_heads, head_dim]`, one row per
    /// token of the piece's range (no padding).
    Paged { k: Vec<f32>, v: Vec<f32> },
    /// Linear attention: the recurrent state `[heads, value_dim, key_dim]`.
    State { state: Vec<f32> },
}

impl LayerKv {
    /// Values held (K and V, or the state).
    pub fn len(&self) -> usize {
        match self {
            LayerKv::Paged { k, v } => k.len() + v.len(),
            LayerKv::State { state } => state.len(),
        }
    }

    /// True when it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

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

    /// Parses the bytes of `layer` of `layout` for `rows` tokens (ignored for state layers).
    pub fn from_le_bytes(
        layout: &KvLayout,
        layer: usize,
        rows: usize,
        bytes: &[u8],
    ) -> Result<Self, SinkError> {
        let want = layout.piece_bytes(layer, rows);
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

impl LayerKv {
    /// The layer's bytes as they cross the network in `wire` (`dtype` is the layout's paged-KV
    /// dtype): [`to_le_bytes`](Self::to_le_bytes) for the exact encoding and for state; K then V
    /// as int8 blocks ([`crate::kv::wire::encode_int8`]) for [`KvWire::Int8`], which refuses
    /// non-finite values.
    pub fn to_wire(&self, dtype: KvDType, wire: KvWire) -> Result<Vec<u8>, WireError> {
        match (wire, self) {
            (KvWire::Int8, LayerKv::Paged { k, v }) => {
                let mut out = Vec::with_capacity(
                    int8_encoded_len(k.len(), INT8_BLOCK) + int8_encoded_len(v.len(), INT8_BLOCK),
                );
                encode_int8(k, INT8_BLOCK, &mut out)?;
                encode_int8(v, INT8_BLOCK, &mut out)?;
                Ok(out)
            }
            _ => Ok(self.to_le_bytes(dtype)),
        }
    }

    /// Parses what [`to_wire`](Self::to_wire) wrote for `rows` tokens of `layer` of `layout`.
    /// Never panics: a wrong length or a malformed int8 block is [`SinkError::BadLayer`] /
    /// [`SinkError::BadWire`].
    pub fn from_wire(
        layout: &KvLayout,
        wire: KvWire,
        layer: usize,
        rows: usize,
        bytes: &[u8],
    ) -> Result<Self, SinkError> {
        if wire != KvWire::Int8 || !layout.layers.get(layer).is_some_and(|l| l.is_paged()) {
            return Self::from_le_bytes(layout, layer, rows, bytes);
        }
        let want = layout.wire_piece_bytes(layer, rows, wire);
        if bytes.len() != want || want == 0 {
            return Err(SinkError::BadLayer {
                layer,
                got: bytes.len(),
                want,
            });
        }
        let half = layout.piece_elems(layer, rows) / 2;
        let (kb, vb) = bytes.split_at(want / 2);
        let bad = |e: WireError| SinkError::BadWire { layer, error: e };
        Ok(LayerKv::Paged {
            k: decode_int8(kb, half, INT8_BLOCK).map_err(bad)?,
            v: decode_int8(vb, half, INT8_BLOCK).map_err(bad)?,
        })
    }
}

/// Errors raised by sinks or when checking exported KV.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("layer {layer}: {got} values/bytes of KV, layout says {want}")]
    BadLayer {
        layer: usize,
        got: usize,
        want: usize,
    },
    #[error("KV sink closed: {0}")]
    Closed(String),
    #[error("layer {layer}: {error}")]
    BadWire { layer: usize, error: WireError },
}

/// One layer's KV for tokens `tokens` of a sequence: what [`KvSink`] receives and a KV import
/// takes. Paged pieces start on a block boundary and end on one or at the sequence's end; a
/// state piece covers the whole sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct KvPiece {
    pub layer: usize,
    pub tokens: Range<usize>,
    pub kv: LayerKv,
}

/// Receives the prefill's KV piece by piece, as each layer of each chunk is computed.
///
/// Per layer, pieces come in token order and together cover exactly
/// [`KvLayout::transfer_spans`] (a sliding-window layer sends only what a decode will read, and
/// the windows before the transfer's checkpoints); a state layer sends one piece (`0..c`) after
/// the chunk ending at each checkpoint `c` and one (`0..n`) after the last chunk. Sinks that
/// do not want KV get no checkpoints. Called from the engine's compute thread:
/// an implementation that ships KV over the network must queue the data and return at once,
/// never wait on the network.
pub trait KvSink {
    fn piece(&mut self, piece: KvPiece) -> Result<(), SinkError>;

    /// False for sinks that drop everything, so the engine can skip the device→host copies.
    fn wants_kv(&self) -> bool {
        true
    }
}

/// Discards KV (local generation: the KV stays in the engine's pools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl KvSink for NullSink {
    fn piece(&mut self, _piece: KvPiece) -> Result<(), SinkError> {
        Ok(())
    }
    fn wants_kv(&self) -> bool {
        false
    }
}

/// Keeps every piece in memory, in the order they came (tests).
#[derive(Debug, Default, Clone)]
pub struct CollectSink {
    pub pieces: Vec<KvPiece>,
}

impl KvSink for CollectSink {
    fn piece(&mut self, piece: KvPiece) -> Result<(), SinkError> {
        self.pieces.push(piece);
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
    /// One entry per model layer, in order, covering [`KvLayout::transfer_rows`] of that layer.
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

    /// The export as one piece per layer (what [`crate::engine::Engine::import_piece`] takes).
    pub fn pieces(&self) -> impl Iterator<Item = KvPiece> + '_ {
        let n = self.tokens.len();
        self.layers
            .iter()
            .enumerate()
            .map(move |(layer, kv)| KvPiece {
                layer,
                tokens: if self.layout.layers[layer].is_paged() {
                    self.layout.transfer_rows(layer, n)
                } else {
                    0..n
                },
                kv: kv.clone(),
            })
    }
}
