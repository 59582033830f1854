//! The engine: a [`Model`], its paged KV pools and linear-attention states, the [`KvStore`]
//! bookkeeping, and the operations the node and the mesh need: chunked prefill that hands KV to a
//! [`KvSink`] layer by layer, KV export/import, and continuously batched decode steps.
//!
//! Device memory: one K and one V pool per paged layer (`[n_blocks, block_size, n_kv_heads,
//! head_dim]` of [`EngineConfig::kv_dtype`], a block id addresses the same rows in every layer)
//! and, per state slot, one
//! `[heads, value_dim, key_dim]` tensor per linear layer. Which ids are free, cached or in use is
//! decided by [`KvStore`]; the engine only moves data.
//!
//! **Sliding-window ring.** In a model with sliding-window layers and no linear layers (Gemma 3:
//! 5 sliding to 1 global), the sliding layers keep their KV in a second block space, the *ring*
//! (its own [`KvStore`] and pools of [`EngineConfig::ring_blocks`] rows): a sequence holds ring
//! blocks only from the first block any window still reads ([`KvLayout::transfer_rows`]: what an
//! export sends; one block more so that a repeated prompt finds its window in the prefix cache)
//! to its end, and frees the others after every prefill chunk and decode step: about
//! `(window + prefill_chunk) / block_size + 3` ring blocks at most during a prefill and
//! `window / block_size + 3` during decode, whatever the context. The prefix cache stays correct: a cached
//! prefix is reused only up to a block boundary whose window blocks the ring still caches
//! ([`KvStore::lookup_blocks`]). Models with linear layers keep every paged layer in the shared
//! space (their prefix reuse is bound to exact-state snapshots already).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prfaas_kernels::{Backend, KernelError, Tensor};

use super::model::{Batch, Model, ModelError, PagedPool, SeqRows};
use super::sampler::{FinishReason, Sampler, SamplingParams};
use super::sink::{KvExport, KvPiece, KvSink, LayerKv, NullSink, SinkError};
use crate::kv::{
    block_hashes, BlockId, KvDType, KvError, KvLayout, KvLayoutError, KvStats, KvStore,
    KvStoreConfig, LayerKvShape, LeaseId, PrefixHit, StateSlot,
};

/// Errors of engine operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Layout(#[from] KvLayoutError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("unknown sequence {0:?}")]
    UnknownSeq(SeqId),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("incompatible KV: {0}")]
    Incompatible(String),
    /// Imported KV failed verification (see [`verify`]): made up, of another prompt, corrupted.
    #[error("imported KV failed verification: {0}")]
    Unverified(String),
}

#[path = "verify.rs"]
pub mod verify;

/// Sizing and behaviour of an [`Engine`].
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pools (capacity = `n_blocks · block_size` tokens over all sequences).
    pub n_blocks: usize,
    /// Linear-attention state slots (live sequences + cached prefix states); ignored for models
    /// without linear layers.
    pub n_state_slots: usize,
    /// Prompt tokens per forward call during prefill (bounds activation memory).
    pub prefill_chunk: usize,
    /// Look up and fill the prefix cache on prefill.
    pub prefix_cache: bool,
    pub lease_ttl: Duration,
    /// Element type of the paged KV pools and of exported KV (f16 by default). Part of the
    /// layout hash: engines exchange KV only when they agree on it.
    pub kv_dtype: KvDType,
    /// Keep sliding-window layers in a ring of their own blocks (see the module docs) when the
    /// model allows it; `false` keeps every block of every layer (for comparisons).
    pub window_ring: bool,
    /// Blocks of the sliding-window ring's pools; `None`: `n_blocks`, so the ring is never the
    /// tighter limit. Ignored without a ring.
    pub ring_blocks: Option<usize>,
}

impl EngineConfig {
    /// A config holding `capacity_tokens` tokens of KV in 16-token blocks.
    pub fn with_capacity(capacity_tokens: usize) -> Self {
        Self {
            block_size: 16,
            n_blocks: capacity_tokens.div_ceil(16).max(1),
            n_state_slots: 64,
            prefill_chunk: 512,
            prefix_cache: true,
            lease_ttl: Duration::from_secs(30),
            kv_dtype: KvDType::default(),
            window_ring: true,
            ring_blocks: None,
        }
    }
}

/// Identifies a live sequence of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

#[derive(Debug)]
struct Seq {
    /// Tokens whose KV is in the pools (position `i` holds token `tokens[i]`).
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    state: Option<StateSlot>,
    /// Ring blocks of the sliding-window layers by block index (engines with a ring); `None`
    /// before the first block a window still reads.
    window: Vec<Option<BlockId>>,
}

/// A ring's block table for the kernels. Blocks before the windows are no longer held, and the
/// attention kernels never read them (a sliding window starts after them), so any valid id
/// stands in for them.
fn ring_table(window: &[Option<BlockId>]) -> Vec<u32> {
    let fill = window.iter().flatten().next().map_or(0, |b| b.0);
    window.iter().map(|b| b.map_or(fill, |b| b.0)).collect()
}

/// Flat slots of positions `rows` in a block table.
fn slots_of(table: &[u32], rows: std::ops::Range<usize>, bs: usize) -> Vec<u32> {
    rows.map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
        .collect()
}

/// One sequence's block tables: the shared one and, with a ring, the ring's.
#[derive(Clone, Copy)]
struct Tables<'a> {
    shared: &'a [u32],
    ring: Option<&'a [u32]>,
}

/// Result of a prefill.
#[derive(Debug, Clone)]
pub struct PrefillOutput {
    pub seq: SeqId,
    /// Logits of the last prompt token (`[vocab]`).
    pub logits: Vec<f32>,
    /// Prompt tokens whose KV came from the prefix cache (not recomputed).
    pub cached_tokens: usize,
}

/// Logits of one decode step, still on the backend (`[rows, vocab]`).
#[derive(Debug, Clone)]
pub struct StepLogits {
    pub tensor: Tensor,
    pub rows: usize,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated tokens, the stop token included if one ended it.
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Model + KV pools + bookkeeping. Not `Sync`-shared: one compute thread drives it.
pub struct Engine {
    model: Model,
    backend: Arc<dyn Backend>,
    config: EngineConfig,
    layout: KvLayout,
    layout_hash: [u8; 32],
    store: KvStore,
    /// The sliding-window layers' own block space (see the module docs).
    ring: Option<KvStore>,
    /// Per layer: whether its KV lives in `ring`.
    in_ring: Vec<bool>,
    pools: Vec<Option<PagedPool>>,
    /// `state_tensors[slot][i]`: state of the `i`-th linear layer for that slot.
    state_tensors: Vec<Vec<Tensor>>,
    seqs: HashMap<SeqId, Seq>,
    next_seq: u64,
    /// KV transfers being written into leased blocks, by lease.
    imports: HashMap<LeaseId, PendingImport>,
}

/// An import between [`Engine::begin_import`] and [`Engine::finish_import`].
#[derive(Debug)]
struct PendingImport {
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    state: Option<StateSlot>,
    /// Per layer, which of its blocks (paged) or which of its states (the final one, then one per
    /// checkpoint) was written. Pieces may come in any order but never twice.
    written: Vec<Vec<bool>>,
    /// The transfer's checkpoints ([`KvLayout::checkpoints`]) and, per checkpoint, the state
    /// of each linear layer after it, as received (kept on the host for verification only).
    checkpoints: Vec<usize>,
    checkpoint_states: Vec<Vec<Option<Vec<f32>>>>,
    /// The ring's lease, for engines with a ring.
    ring: Option<RingLease>,
}

/// Ring blocks leased for an import: blocks `from..` of the sequence.
#[derive(Debug)]
struct RingLease {
    id: LeaseId,
    from: usize,
    blocks: Vec<BlockId>,
}

impl RingLease {
    /// The sequence's ring blocks by block index (see [`Seq::window`]).
    fn window(&self) -> Vec<Option<BlockId>> {
        let mut w = vec![None; self.from];
        w.extend(self.blocks.iter().copied().map(Some));
        w
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model)
            .field("config", &self.config)
            .field("live_seqs", &self.seqs.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Allocates the KV pools and state tensors for `config` on the model's backend.
    pub fn new(model: Model, config: EngineConfig) -> Result<Self, EngineError> {
        if config.prefill_chunk == 0 {
            return Err(EngineError::Request(
                "prefill_chunk must be at least 1".into(),
            ));
        }
        let backend = Arc::clone(model.backend());
        let layout =
            KvLayout::from_model(model.config(), config.block_size)?.with_dtype(config.kv_dtype);
        let n_state_slots = if layout.has_state() {
            config.n_state_slots.max(1)
        } else {
            0
        };
        let sliding: Vec<bool> = layout
            .layers
            .iter()
            .map(|l| {
                matches!(
                    l,
                    LayerKvShape::Paged {
                        window: Some(_),
                        ..
                    }
                )
            })
            .collect();
        let with_ring = config.window_ring && !layout.has_state() && sliding.contains(&true);
        let in_ring = if with_ring {
            sliding
        } else {
            vec![false; layout.layers.len()]
        };
        let bytes_of = |ring: bool| -> u64 {
            (0..layout.layers.len())
                .filter(|&l| layout.layers[l].is_paged() && in_ring[l] == ring)
                .map(|l| layout.block_bytes(l) as u64)
                .sum()
        };
        let store = KvStore::new(KvStoreConfig {
            block_bytes: bytes_of(false),
            ..KvStoreConfig::for_layout(&layout, config.n_blocks, n_state_slots, config.lease_ttl)
        })?;
        let ring_rows = config.ring_blocks.unwrap_or(config.n_blocks);
        let ring = with_ring
            .then(|| {
                KvStore::new(KvStoreConfig {
                    block_bytes: bytes_of(true),
                    ..KvStoreConfig::for_layout(&layout, ring_rows, 0, config.lease_ttl)
                })
            })
            .transpose()?;
        let mut pools = Vec::with_capacity(layout.layers.len());
        let mut state_shapes = Vec::new();
        for (l, shape) in layout.layers.iter().enumerate() {
            match *shape {
                LayerKvShape::Paged {
                    n_kv_heads,
                    head_dim,
                    ..
                } => {
                    let rows = if in_ring[l] {
                        ring_rows
                    } else {
                        config.n_blocks
                    };
                    let dims = [rows, config.block_size, n_kv_heads, head_dim];
                    let dtype = layout.dtype.kernel_dtype();
                    pools.push(Some(PagedPool {
                        k: backend.zeros_dtype(&dims, dtype)?,
                        v: backend.zeros_dtype(&dims, dtype)?,
                    }));
                }
                LayerKvShape::State {
                    heads,
                    key_dim,
                    value_dim,
                } => {
                    pools.push(None);
                    state_shapes.push([heads, value_dim, key_dim]);
                }
            }
        }
        let state_tensors = (0..n_state_slots)
            .map(|_| {
                state_shapes
                    .iter()
                    .map(|s| backend.zeros(s))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let layout_hash = layout.layout_hash(model.model_hash());
        Ok(Self {
            model,
            backend,
            config,
            layout,
            layout_hash,
            store,
            ring,
            in_ring,
            pools,
            state_tensors,
            seqs: HashMap::new(),
            next_seq: 0,
            imports: HashMap::new(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    /// Hash of (model weights, KV layout): KV may move between engines that agree on it.
    pub fn layout_hash(&self) -> [u8; 32] {
        self.layout_hash
    }
    /// Block accounting of the shared block space (every paged layer but the ring's).
    pub fn kv_stats(&self) -> KvStats {
        self.store.stats()
    }
    /// Block accounting of the sliding-window ring, for engines that keep one.
    pub fn ring_kv_stats(&self) -> Option<KvStats> {
        self.ring.as_ref().map(KvStore::stats)
    }
    /// Bytes of KV held for all sequences, cached prefixes and leases (both block spaces).
    pub fn kv_bytes_used(&self) -> u64 {
        self.store.stats().bytes_used + self.ring_kv_stats().map_or(0, |r| r.bytes_used)
    }
    /// The block bookkeeping (leases for incoming transfers are taken here by the node).
    pub fn kv_store_mut(&mut self) -> &mut KvStore {
        &mut self.store
    }
    pub fn live_sequences(&self) -> usize {
        self.seqs.len()
    }
    /// Tokens whose KV is held for `seq`.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        Ok(self.seq(seq)?.tokens.len())
    }

    fn seq(&self, id: SeqId) -> Result<&Seq, EngineError> {
        self.seqs.get(&id).ok_or(EngineError::UnknownSeq(id))
    }

    /// The first ring block a sequence of `n` tokens still needs: the earliest block a sliding
    /// layer exports ([`KvLayout::transfer_rows`]), at or before what the next token's window
    /// reads (`n + 1 - window`).
    fn ring_start(&self, n: usize) -> usize {
        (0..self.layout.layers.len())
            .filter(|&l| self.in_ring[l])
            .map(|l| self.layout.transfer_rows(l, n).start / self.layout.block_size)
            .min()
            .unwrap_or(0)
    }

    /// Gives sequence `id` ring blocks up to the block holding token `n - 1`.
    fn grow_ring(&mut self, id: SeqId, n: usize) -> Result<(), EngineError> {
        let need = self.layout.blocks_for_tokens(n);
        let have = self.seq(id)?.window.len();
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        if need > have {
            let new = ring.allocate(need - have)?;
            let s = self.seqs.get_mut(&id).ok_or(EngineError::UnknownSeq(id))?;
            s.window.extend(new.into_iter().map(Some));
        }
        Ok(())
    }

    /// Frees the ring blocks of sequence `id` that no window of an `n`-token sequence reads, nor
    /// the window of its last full-block prefix before token `n - 1` (what a prefix-cache lookup
    /// of the same prompt finds: it looks up all but the last token).
    fn trim_ring(&mut self, id: SeqId, n: usize) -> Result<(), EngineError> {
        if self.ring.is_none() {
            return Ok(());
        }
        let bs = self.layout.block_size;
        let start = self.ring_start(n.saturating_sub(1) / bs * bs);
        let s = self.seqs.get_mut(&id).ok_or(EngineError::UnknownSeq(id))?;
        let out: Vec<BlockId> = s
            .window
            .iter_mut()
            .take(start)
            .filter_map(Option::take)
            .collect();
        if let (Some(ring), false) = (self.ring.as_mut(), out.is_empty()) {
            ring.release(&out)?;
        }
        Ok(())
    }

    /// Cuts a prefix-cache `hit` on `tokens` back to the longest block boundary whose sliding
    /// windows the ring also caches (a sliding layer's KV of a prefix is reusable only with the
    /// window before the prefix's end), releasing the shared blocks cut off; returns the ring
    /// blocks retained for it.
    fn ring_prefix(
        &mut self,
        tokens: &[u32],
        hit: &mut PrefixHit,
        now: Instant,
    ) -> Result<Vec<Option<BlockId>>, EngineError> {
        let bs = self.layout.block_size;
        let hashes = block_hashes(&tokens[..hit.blocks.len() * bs], bs);
        let mut found = (0, Vec::new());
        for k in (1..=hit.blocks.len()).rev() {
            let from = self.ring_start(k * bs);
            let Some(ring) = self.ring.as_mut() else {
                break;
            };
            if let Some(b) = ring.lookup_blocks(&hashes[from..k], now) {
                let mut w = vec![None; from];
                w.extend(b.into_iter().map(Some));
                found = (k, w);
                break;
            }
        }
        let cut = hit.blocks.split_off(found.0);
        self.store.release(&cut)?;
        hit.n_tokens = found.0 * bs;
        Ok(found.1)
    }

    /// Registers the full ring blocks in `window` (a sequence of `tokens`) in the ring's prefix
    /// cache, once the shared blocks of the same prefix were cached.
    fn cache_ring(&mut self, tokens: &[u32], window: &[Option<BlockId>], now: Instant) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let bs = self.layout.block_size;
        let hashes = block_hashes(tokens, bs);
        let (mut hs, mut bl) = (Vec::new(), Vec::new());
        for (h, b) in hashes.iter().zip(window) {
            if let Some(b) = b {
                hs.push(*h);
                bl.push(*b);
            }
        }
        if let Err(e) = ring.register_blocks(&hs, &bl, now) {
            // Caching is an optimisation: a refusal must not fail the request.
            tracing::warn!(error = %e, "ring prefix cache insert refused");
        }
    }

    fn new_seq_id(&mut self) -> SeqId {
        self.next_seq += 1;
        SeqId(self.next_seq)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), EngineError> {
        let c = self.model.config();
        if tokens.is_empty() {
            return Err(EngineError::Request("empty prompt".into()));
        }
        if tokens.len() > c.max_context {
            return Err(EngineError::Request(format!(
                "{} tokens exceed the model's context of {}",
                tokens.len(),
                c.max_context
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(EngineError::Request(format!(
                "token id {bad} >= vocab {}",
                c.vocab_size
            )));
        }
        Ok(())
    }

    fn copy_state(&self, from: StateSlot, to: StateSlot) -> Result<(), EngineError> {
        let (src, dst) = (self.state_slot(from)?, self.state_slot(to)?);
        for (s, d) in src.iter().zip(dst) {
            self.backend.write(d, &self.backend.download(s)?)?;
        }
        Ok(())
    }

    fn zero_state(&self, slot: StateSlot) -> Result<(), EngineError> {
        for t in self.state_slot(slot)? {
            self.backend.write(t, &vec![0.0; t.numel()])?;
        }
        Ok(())
    }

    fn state_slot(&self, slot: StateSlot) -> Result<&[Tensor], EngineError> {
        self.state_tensors
            .get(slot.0 as usize)
            .map(Vec::as_slice)
            .ok_or(EngineError::Kv(KvError::InvalidStateSlot(slot)))
    }

    /// Drops a sequence's references (its full blocks stay in the prefix cache if registered).
    pub fn release(&mut self, seq: SeqId) -> Result<(), EngineError> {
        let s = self.seqs.remove(&seq).ok_or(EngineError::UnknownSeq(seq))?;
        self.store.release(&s.blocks)?;
        let window: Vec<BlockId> = s.window.iter().flatten().copied().collect();
        if let (Some(ring), false) = (self.ring.as_mut(), window.is_empty()) {
            ring.release(&window)?;
        }
        if let Some(slot) = s.state {
            self.store.release_state(slot)?;
        }
        Ok(())
    }

    /// Prefills `tokens` as a new sequence and returns the last token's logits.
    ///
    /// Uses the prefix cache when enabled (partial block hits for dense models, exact-match state
    /// for hybrid ones) and runs the rest in chunks of `prefill_chunk` tokens. The KV goes to
    /// `sink` piece by piece while the prompt is computed: the cached prefix first, then after
    /// each chunk of each layer that chunk's rows (see [`KvSink`]), so only the last layer's
    /// last piece is left when the compute ends.
    pub fn prefill(
        &mut self,
        tokens: &[u32],
        sink: &mut dyn KvSink,
    ) -> Result<PrefillOutput, EngineError> {
        self.check_tokens(tokens)?;
        let now = Instant::now();
        let n = tokens.len();
        let hybrid = self.layout.has_state();
        // A remote prefill of a layout with state carries checkpoints from token 0 on (see
        // `crate::kv::layout`), which a cached prefix's state cannot provide: such a prefill
        // recomputes the prefix.
        let mut hit = if self.config.prefix_cache && !(hybrid && sink.wants_kv()) {
            self.store.lookup_prefix(&tokens[..n - 1], now)
        } else {
            Default::default()
        };
        let window = if self.ring.is_some() && hit.n_tokens > 0 {
            self.ring_prefix(tokens, &mut hit, now)?
        } else {
            Vec::new()
        };
        let mut seq = Seq {
            tokens: tokens[..hit.n_tokens].to_vec(),
            blocks: hit.blocks,
            state: None,
            window,
        };
        // From here on `seq` holds references: register it first so that `release` cleans up on
        // any error below.
        let id = self.new_seq_id();
        let setup = (|| -> Result<(), EngineError> {
            if hybrid {
                let slot = self.store.allocate_state();
                let slot = match slot {
                    Ok(s) => s,
                    Err(e) => {
                        if let Some(h) = hit.state {
                            self.store.release_state(h)?;
                        }
                        return Err(e.into());
                    }
                };
                seq.state = Some(slot);
                match hit.state {
                    Some(h) => {
                        let copied = self.copy_state(h, slot);
                        self.store.release_state(h)?;
                        copied?;
                    }
                    None => self.zero_state(slot)?,
                }
            }
            let need = self.layout.blocks_for_tokens(n) - seq.blocks.len();
            seq.blocks.extend(self.store.allocate(need)?);
            Ok(())
        })();
        let cached_tokens = hit.n_tokens;
        self.seqs.insert(id, seq);
        if let Err(e) = setup {
            let _ = self.release(id);
            return Err(e);
        }
        match self.prefill_inner(id, tokens, cached_tokens, sink, now) {
            Ok(logits) => Ok(PrefillOutput {
                seq: id,
                logits,
                cached_tokens,
            }),
            Err(e) => {
                let _ = self.release(id);
                Err(e)
            }
        }
    }

    fn prefill_inner(
        &mut self,
        id: SeqId,
        tokens: &[u32],
        start: usize,
        sink: &mut dyn KvSink,
        now: Instant,
    ) -> Result<Vec<f32>, EngineError> {
        let n = tokens.len();
        let bs = self.config.block_size;
        let hybrid = self.layout.has_state();
        // Hybrid models can only reuse a prefix together with the state after exactly that
        // prefix, so a snapshot is taken at the last block boundary before the final token.
        let snap_at = (n - 1) / bs * bs;
        let want_snapshot = self.config.prefix_cache && hybrid && snap_at > start;
        // Chunks also end where the transfer carries a checkpoint (the state is read there).
        let checkpoints = if sink.wants_kv() {
            self.layout.checkpoints(n)
        } else {
            Vec::new()
        };
        let mut bounds = Vec::new();
        let mut a = start;
        while a < n {
            let mut b = (a + self.config.prefill_chunk).min(n);
            // Chunks end on block boundaries where they can, so each streams whole blocks.
            if b < n && b / bs * bs > a {
                b = b / bs * bs;
            }
            if want_snapshot && a < snap_at && b > snap_at {
                b = snap_at;
            }
            if let Some(&c) = checkpoints.iter().find(|&&c| a < c && c < b) {
                b = c;
            }
            bounds.push((a, b));
            a = b;
        }
        let (blocks, state) = {
            let s = self.seq(id)?;
            (s.blocks.iter().map(|b| b.0).collect::<Vec<u32>>(), s.state)
        };
        let states: Vec<Tensor> = match state {
            Some(slot) => self.state_slot(slot)?.to_vec(),
            None => Vec::new(),
        };
        let mut snapshot = None;
        let run = self.run_chunks(
            id,
            tokens,
            &bounds,
            &blocks,
            state,
            &states,
            sink,
            want_snapshot.then_some(snap_at),
            &mut snapshot,
        );
        let logits = match run {
            Ok(l) => l,
            Err(e) => {
                if let Some(s) = snapshot {
                    let _ = self.store.release_state(s);
                }
                return Err(e);
            }
        };
        let seq = self.seqs.get_mut(&id).ok_or(EngineError::UnknownSeq(id))?;
        seq.tokens = tokens.to_vec();
        if self.config.prefix_cache {
            let seq_blocks = seq.blocks.clone();
            let cache_len = if hybrid { snap_at } else { n };
            let window = seq.window.clone();
            if !hybrid || snapshot.is_some() {
                if let Err(e) =
                    self.store
                        .insert_prefix(&tokens[..cache_len], &seq_blocks, snapshot, now)
                {
                    // Caching is an optimisation: a refusal must not fail the request.
                    tracing::warn!(error = %e, "prefix cache insert refused");
                    if let Some(s) = snapshot {
                        let _ = self.store.release_state(s);
                    }
                } else {
                    self.cache_ring(&tokens[..cache_len], &window, now);
                }
            }
        }
        Ok(logits)
    }

    /// Runs the prefill chunks, handing KV to `sink` as it is made (see [`Engine::prefill`]),
    /// and snapshots the linear state into a fresh slot (stored in `snapshot`) when a chunk ends
    /// at `snap_at`.
    #[allow(clippy::too_many_arguments)]
    fn run_chunks(
        &mut self,
        id: SeqId,
        tokens: &[u32],
        bounds: &[(usize, usize)],
        blocks: &[u32],
        state: Option<StateSlot>,
        states: &[Tensor],
        sink: &mut dyn KvSink,
        snap_at: Option<usize>,
        snapshot: &mut Option<StateSlot>,
    ) -> Result<Vec<f32>, EngineError> {
        let n = tokens.len();
        let bs = self.config.block_size;
        let wants = sink.wants_kv();
        // Per paged layer, the rows the transfer carries and the first row not handed to the
        // sink yet. Rows of a block that is still being filled wait for the chunk that completes
        // it (or for the end).
        let spans: Vec<Vec<Range<usize>>> = (0..self.layout.layers.len())
            .map(|l| self.layout.transfer_spans(l, n))
            .collect();
        let checkpoints = self.layout.checkpoints(n);
        let mut sent = vec![0usize; self.layout.layers.len()];
        let with_ring = self.ring.is_some();
        if wants {
            // The cached prefix is ready before any compute: send it first.
            let ready = bounds.first().map_or(0, |&(a, _)| a / bs * bs);
            let ring = with_ring.then(|| self.seq(id).map(|s| ring_table(&s.window)));
            let ring = ring.transpose()?;
            let tables = Tables {
                shared: blocks,
                ring: ring.as_deref(),
            };
            for (layer, spans) in spans.iter().enumerate() {
                self.send_rows(layer, spans, ready, tables, states, &mut sent, sink)?;
            }
        }
        let mut logits = None;
        for (ci, &(a, b)) in bounds.iter().enumerate() {
            let last = ci + 1 == bounds.len();
            let positions: Vec<u32> = (a as u32..b as u32).collect();
            let slots = slots_of(blocks, a..b, bs);
            let ring = if with_ring {
                self.grow_ring(id, b)?;
                Some(ring_table(&self.seq(id)?.window))
            } else {
                None
            };
            let ring_slots = ring.as_deref().map(|t| slots_of(t, a..b, bs));
            let tables = Tables {
                shared: blocks,
                ring: ring.as_deref(),
            };
            let rows = [SeqRows {
                block_table: blocks,
                window_table: ring.as_deref(),
                n_past: a,
                n_new: b - a,
                states,
            }];
            let batch = Batch {
                tokens: &tokens[a..b],
                positions: &positions,
                slots: &slots,
                window_slots: ring_slots.as_deref(),
                seqs: &rows,
            };
            let ready = if last { n } else { b / bs * bs };
            let this = &*self;
            let mut hook = |layer: usize| -> Result<(), EngineError> {
                if this.layout.layers[layer].is_paged() {
                    this.send_rows(layer, &spans[layer], ready, tables, states, &mut sent, sink)
                } else if last || checkpoints.contains(&b) {
                    // The state after token `b`: the final one, or a checkpoint.
                    let kv = this.export_rows(layer, tables, 0..b, states)?;
                    sink.piece(KvPiece {
                        layer,
                        tokens: 0..b,
                        kv,
                    })?;
                    Ok(())
                } else {
                    Ok(())
                }
            };
            let out = self.model.forward(
                &self.pools,
                &batch,
                &[(b - a - 1) as u32],
                if wants { Some(&mut hook) } else { None },
            )?;
            if last {
                logits = Some(self.backend.download(&out)?);
            }
            // Rows a window no longer reads were sent above (they are before `sent`).
            self.trim_ring(id, b)?;
            if let (Some(src), true) = (state, snap_at == Some(b)) {
                // No free slot just means this prefix's state is not cached.
                if let Ok(dst) = self.store.allocate_state() {
                    *snapshot = Some(dst);
                    self.copy_state(src, dst)?;
                }
            }
        }
        logits.ok_or_else(|| EngineError::Request("nothing to prefill".into()))
    }

    /// Hands paged `layer`'s rows from `sent[layer]` up to `ready` that lie in its transfer
    /// `spans` to the sink, one piece per span (none when there is nothing new), and advances
    /// `sent[layer]`.
    #[allow(clippy::too_many_arguments)]
    fn send_rows(
        &self,
        layer: usize,
        spans: &[Range<usize>],
        ready: usize,
        tables: Tables<'_>,
        states: &[Tensor],
        sent: &mut [usize],
        sink: &mut dyn KvSink,
    ) -> Result<(), EngineError> {
        if !self.layout.layers[layer].is_paged() || ready <= sent[layer] {
            return Ok(());
        }
        for span in spans {
            let rows = span.start.max(sent[layer])..span.end.min(ready);
            if rows.is_empty() {
                continue;
            }
            let kv = self.export_rows(layer, tables, rows.clone(), states)?;
            sink.piece(KvPiece {
                layer,
                tokens: rows,
                kv,
            })?;
        }
        sent[layer] = ready;
        Ok(())
    }

    /// Layer `layer`'s KV for the token rows `rows` of a sequence in blocks `blocks`, in the
    /// export layout (see [`crate::kv::layout`]); a state layer's whole state (`rows` ignored).
    fn export_rows(
        &self,
        layer: usize,
        tables: Tables<'_>,
        rows: std::ops::Range<usize>,
        states: &[Tensor],
    ) -> Result<LayerKv, EngineError> {
        let blocks = if self.in_ring[layer] {
            tables.ring.ok_or_else(|| {
                EngineError::Request(format!("layer {layer}: no ring block table"))
            })?
        } else {
            tables.shared
        };
        match (&self.pools[layer], self.layout.layers[layer]) {
            (
                Some(pool),
                LayerKvShape::Paged {
                    n_kv_heads,
                    head_dim,
                    ..
                },
            ) => {
                let bs = self.layout.block_size;
                let (b0, b1) = (rows.start / bs, rows.end.div_ceil(bs));
                let ids = blocks.get(b0..b1).ok_or_else(|| {
                    EngineError::Request(format!("rows {rows:?} but only {} blocks", blocks.len()))
                })?;
                let row = n_kv_heads * head_dim;
                let (from, to) = ((rows.start - b0 * bs) * row, (rows.end - b0 * bs) * row);
                let mut k = self.backend.gather_blocks(&pool.k, ids)?;
                let mut v = self.backend.gather_blocks(&pool.v, ids)?;
                k.truncate(to);
                k.drain(..from);
                v.truncate(to);
                v.drain(..from);
                Ok(LayerKv::Paged { k, v })
            }
            (None, LayerKvShape::State { .. }) => {
                let idx = self.layout.layers[..layer]
                    .iter()
                    .filter(|l| !l.is_paged())
                    .count();
                let t = states
                    .get(idx)
                    .ok_or_else(|| EngineError::Request(format!("no state for layer {layer}")))?;
                Ok(LayerKv::State {
                    state: self.backend.download(t)?,
                })
            }
            _ => Err(EngineError::Request(format!(
                "layer {layer}: pool and layout disagree"
            ))),
        }
    }

    /// The whole KV of a live sequence (e.g. after a prefill, to ship it to a decode node).
    pub fn export_kv(&self, seq: SeqId) -> Result<KvExport, EngineError> {
        let s = self.seq(seq)?;
        let blocks: Vec<u32> = s.blocks.iter().map(|b| b.0).collect();
        let states = match s.state {
            Some(slot) => self.state_slot(slot)?.to_vec(),
            None => Vec::new(),
        };
        let n = s.tokens.len();
        let ring = self.ring.is_some().then(|| ring_table(&s.window));
        let tables = Tables {
            shared: &blocks,
            ring: ring.as_deref(),
        };
        let layers = (0..self.layout.layers.len())
            .map(|l| self.export_rows(l, tables, self.layout.transfer_rows(l, n), &states))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KvExport {
            layout: self.layout.clone(),
            layout_hash: self.layout_hash,
            tokens: s.tokens.clone(),
            layers,
        })
    }

    /// Checks that `export` fits this engine and has the right sizes, without side effects.
    pub fn check_import(&self, export: &KvExport) -> Result<(), EngineError> {
        if export.layout != self.layout || export.layout_hash != self.layout_hash {
            return Err(EngineError::Incompatible(
                "layout or model hash differs from this engine's".into(),
            ));
        }
        self.check_tokens(&export.tokens)?;
        if export.layers.len() != self.layout.layers.len() {
            return Err(EngineError::Incompatible(format!(
                "{} layers of KV, model has {}",
                export.layers.len(),
                self.layout.layers.len()
            )));
        }
        let n = export.tokens.len();
        for piece in export.pieces() {
            self.check_piece(n, &piece)?;
        }
        Ok(())
    }

    /// Checks that `piece` fits an `n`-token sequence: a layer of this model, rows inside what
    /// the layer exports, block-aligned, the right kind and size of data, finite values.
    fn check_piece(&self, n: usize, piece: &KvPiece) -> Result<(), EngineError> {
        let KvPiece { layer, tokens, kv } = piece;
        let layer = *layer;
        let bad = |why: String| EngineError::Incompatible(format!("piece of layer {layer}: {why}"));
        let shape = self
            .layout
            .layers
            .get(layer)
            .ok_or_else(|| bad(format!("the model has {} layers", self.layout.layers.len())))?;
        let bs = self.layout.block_size;
        let ok_kind = match (kv, shape.is_paged()) {
            (LayerKv::Paged { k, v }, true) => {
                let spans = self.layout.transfer_spans(layer, n);
                if tokens.start >= tokens.end
                    || !spans
                        .iter()
                        .any(|s| tokens.start >= s.start && tokens.end <= s.end)
                    || tokens.start % bs != 0
                    || (tokens.end % bs != 0 && tokens.end != n)
                {
                    return Err(bad(format!(
                        "rows {tokens:?} are not whole blocks inside {spans:?}"
                    )));
                }
                k.len() == v.len()
            }
            (LayerKv::State { .. }, false) => {
                if tokens.start != 0
                    || (tokens.end != n && !self.layout.checkpoints(n).contains(&tokens.end))
                {
                    return Err(bad(format!(
                        "a state covers 0..{n} or 0..a checkpoint, not {tokens:?}"
                    )));
                }
                true
            }
            _ => false,
        };
        let want = self.layout.piece_elems(layer, tokens.len());
        if !ok_kind || kv.len() != want {
            return Err(SinkError::BadLayer {
                layer,
                got: kv.len(),
                want,
            }
            .into());
        }
        let finite = match kv {
            LayerKv::Paged { k, v } => k.iter().chain(v).all(|x| x.is_finite()),
            LayerKv::State { state } => state.iter().all(|x| x.is_finite()),
        };
        if !finite {
            return Err(bad("non-finite values".into()));
        }
        Ok(())
    }

    /// Creates a sequence from exported KV (the remote-prefill path). Decode continues from it
    /// exactly as if the prefill had run here. The whole-KV form of
    /// [`begin_import`](Self::begin_import) + [`import_piece`](Self::import_piece) per layer +
    /// [`finish_import`](Self::finish_import).
    pub fn import_kv(&mut self, export: &KvExport) -> Result<SeqId, EngineError> {
        self.check_import(export)?;
        let id = self.begin_import(export.tokens.clone(), Instant::now())?;
        for piece in export.pieces() {
            // `import_piece` cancels the import itself when it fails.
            self.import_piece(id, &piece, Instant::now())?;
        }
        self.finish_import(id)
    }

    /// Starts receiving the KV of `tokens` from elsewhere: leases the blocks (and the
    /// linear-attention state slot) it needs, so the transfer cannot fail at the end for lack of
    /// room and each piece is written straight into its final place as it arrives. The lease
    /// expires (and frees everything) unless [`import_piece`](Self::import_piece) keeps it alive
    /// and [`finish_import`](Self::finish_import) commits it; see [`expire_imports`](Self::expire_imports).
    pub fn begin_import(&mut self, tokens: Vec<u32>, now: Instant) -> Result<LeaseId, EngineError> {
        self.check_tokens(&tokens)?;
        let n_blocks = self.layout.blocks_for_tokens(tokens.len());
        let from = self.ring_start(tokens.len());
        let lease = self.store.lease(n_blocks, self.layout.has_state(), now)?;
        let ring = match self
            .ring
            .as_mut()
            .map(|r| r.lease(n_blocks - from, false, now))
        {
            None => None,
            Some(Ok(l)) => Some(RingLease {
                id: l.id,
                from,
                blocks: l.blocks,
            }),
            Some(Err(e)) => {
                let _ = self.store.cancel(lease.id);
                return Err(e.into());
            }
        };
        let checkpoints = self.layout.checkpoints(tokens.len());
        let written = self
            .layout
            .layers
            .iter()
            .map(|l| {
                vec![
                    false;
                    if l.is_paged() {
                        n_blocks
                    } else {
                        1 + checkpoints.len()
                    }
                ]
            })
            .collect();
        let n_linear = self.layout.layers.iter().filter(|l| !l.is_paged()).count();
        let checkpoint_states = vec![vec![None; n_linear]; checkpoints.len()];
        self.imports.insert(
            lease.id,
            PendingImport {
                tokens,
                blocks: lease.blocks,
                state: lease.state,
                written,
                checkpoints,
                checkpoint_states,
                ring,
            },
        );
        Ok(lease.id)
    }

    /// Writes `piece` of import `id` into its leased blocks by position and extends the lease.
    /// Pieces may come in any order; a piece that does not fit the sequence, or overlaps one
    /// already written, is an error. On any error the import is cancelled and its blocks freed.
    pub fn import_piece(
        &mut self,
        id: LeaseId,
        piece: &KvPiece,
        now: Instant,
    ) -> Result<(), EngineError> {
        let r = self.write_import_piece(id, piece, now);
        if r.is_err() {
            self.cancel_import(id);
        }
        r
    }

    fn write_import_piece(
        &mut self,
        id: LeaseId,
        piece: &KvPiece,
        now: Instant,
    ) -> Result<(), EngineError> {
        let p = self.imports.get(&id).ok_or(KvError::UnknownLease(id))?;
        self.check_piece(p.tokens.len(), piece)?;
        let layer = piece.layer;
        let bs = self.layout.block_size;
        // The final state is entry 0, checkpoint `i`'s entry `i + 1` (`check_piece` made sure
        // a state piece ends at `n` or at a checkpoint).
        let checkpoint = p.checkpoints.iter().position(|&c| c == piece.tokens.end);
        let marks = match (&piece.kv, checkpoint) {
            (LayerKv::Paged { .. }, _) => piece.tokens.start / bs..piece.tokens.end.div_ceil(bs),
            (LayerKv::State { .. }, None) => 0..1,
            (LayerKv::State { .. }, Some(i)) => i + 1..i + 2,
        };
        if p.written[layer][marks.clone()].iter().any(|&w| w) {
            return Err(EngineError::Incompatible(format!(
                "piece of layer {layer}, rows {:?}, overlaps one already written",
                piece.tokens
            )));
        }
        let mut kept = None;
        match (&piece.kv, &self.pools[layer]) {
            (LayerKv::Paged { k, v }, Some(pool)) => {
                let ids = match (&p.ring, self.in_ring[layer]) {
                    (Some(r), true) => marks
                        .start
                        .checked_sub(r.from)
                        .and_then(|a| r.blocks.get(a..marks.end - r.from)),
                    _ => p.blocks.get(marks.clone()),
                };
                let idx: Vec<u32> = ids
                    .ok_or_else(|| {
                        EngineError::Incompatible(format!(
                            "piece of layer {layer}, rows {:?}: no leased blocks there",
                            piece.tokens
                        ))
                    })?
                    .iter()
                    .map(|b| b.0)
                    .collect();
                // Whole blocks: the tail of a last, partly filled block is zero.
                let whole = idx.len() * bs * (k.len() / piece.tokens.len());
                let pad = |x: &[f32]| {
                    let mut x = x.to_vec();
                    x.resize(whole, 0.0);
                    x
                };
                self.backend.scatter_blocks(&pool.k, &idx, &pad(k))?;
                self.backend.scatter_blocks(&pool.v, &idx, &pad(v))?;
            }
            (LayerKv::State { state }, None) => {
                // The i-th linear layer's state lives in the slot's i-th tensor.
                let linear = self.layout.layers[..layer]
                    .iter()
                    .filter(|l| !l.is_paged())
                    .count();
                if let Some(i) = checkpoint {
                    // Kept on the host for verification only (`check_piece` checked its size).
                    kept = Some((i, linear, state.clone()));
                } else {
                    let slot = p.state.ok_or_else(|| {
                        EngineError::Incompatible(format!("layer {layer}: no state slot leased"))
                    })?;
                    let t = self.state_slot(slot)?.get(linear).ok_or_else(|| {
                        EngineError::Incompatible(format!("layer {layer}: no state tensor"))
                    })?;
                    self.backend.write(t, state)?;
                }
            }
            _ => {
                return Err(EngineError::Incompatible(format!(
                    "layer {layer}: wrong kind of KV"
                )))
            }
        }
        self.store.extend_lease(id, now)?;
        if let (Some(r), Some(ring)) = (&p.ring, self.ring.as_mut()) {
            ring.extend_lease(r.id, now)?;
        }
        if let Some(p) = self.imports.get_mut(&id) {
            p.written[layer][marks].iter_mut().for_each(|w| *w = true);
            if let Some((i, linear, state)) = kept {
                p.checkpoint_states[i][linear] = Some(state);
            }
        }
        Ok(())
    }

    /// Commits import `id` once every piece is written: its blocks become a live sequence
    /// (and, for full-attention models whose KV was not trimmed to a window, enter the prefix
    /// cache). Fails, freeing the blocks, when pieces are missing or the lease already expired.
    pub fn finish_import(&mut self, id: LeaseId) -> Result<SeqId, EngineError> {
        let p = self.imports.remove(&id).ok_or(KvError::UnknownLease(id))?;
        let n = p.tokens.len();
        if let Some(layer) = self.missing_layer(&p) {
            self.cancel_leases(id, &p);
            return Err(EngineError::Incompatible(format!(
                "import finished with KV of layer {layer} missing"
            )));
        }
        let window = match (&p.ring, self.ring.as_mut()) {
            (Some(r), Some(ring)) => match ring.commit(r.id) {
                Ok(_) => r.window(),
                Err(e) => {
                    let _ = self.store.cancel(id);
                    return Err(e.into());
                }
            },
            _ => Vec::new(),
        };
        let (blocks, state) = match self.store.commit(id) {
            Ok(c) => c,
            Err(e) => {
                let held: Vec<BlockId> = window.iter().flatten().copied().collect();
                if let Some(ring) = self.ring.as_mut() {
                    let _ = ring.release(&held);
                }
                return Err(e.into());
            }
        };
        // With a ring the shared blocks hold only full-attention layers (complete) and the ring
        // the windows: a trimmed import is cacheable. Without one, the blocks before a window
        // were never written for the sliding layers.
        let complete = self.ring.is_some() || !self.layout.trims(n);
        if self.config.prefix_cache && !self.layout.has_state() && complete {
            let now = Instant::now();
            if let Err(e) = self.store.insert_prefix(&p.tokens, &blocks, None, now) {
                tracing::warn!(error = %e, "prefix cache insert of imported KV refused");
            } else {
                self.cache_ring(&p.tokens, &window, now);
            }
        }
        let seq = self.new_seq_id();
        self.seqs.insert(
            seq,
            Seq {
                tokens: p.tokens,
                blocks,
                state,
                window,
            },
        );
        Ok(seq)
    }

    /// The first layer of import `p` with a piece it needs not written yet, if any.
    fn missing_layer(&self, p: &PendingImport) -> Option<usize> {
        let n = p.tokens.len();
        let bs = self.layout.block_size;
        p.written.iter().enumerate().find_map(|(layer, w)| {
            let need = if self.layout.layers[layer].is_paged() {
                let rows = self.layout.transfer_rows(layer, n);
                rows.start / bs..rows.end.div_ceil(bs)
            } else {
                0..1
            };
            w[need].iter().any(|&x| !x).then_some(layer)
        })
    }

    /// Abandons import `id` and frees its blocks (unknown or expired ids are ignored).
    pub fn cancel_import(&mut self, id: LeaseId) {
        if let Some(p) = self.imports.remove(&id) {
            self.cancel_leases(id, &p);
        }
    }

    /// Frees the shared and ring leases of import `id` (either may have expired already).
    fn cancel_leases(&mut self, id: LeaseId, p: &PendingImport) {
        let _ = self.store.cancel(id);
        if let (Some(r), Some(ring)) = (&p.ring, self.ring.as_mut()) {
            let _ = ring.cancel(r.id);
        }
    }

    /// Frees imports whose lease ran out (a sender that went silent); returns their ids.
    pub fn expire_imports(&mut self, now: Instant) -> Vec<LeaseId> {
        let mut expired = self.store.expire(now);
        // Both leases are extended together, so they run out together; an import is gone as
        // soon as either is.
        let ring_gone = self
            .ring
            .as_mut()
            .map(|r| r.expire(now))
            .unwrap_or_default();
        for (id, p) in &self.imports {
            if p.ring.as_ref().is_some_and(|r| ring_gone.contains(&r.id)) && !expired.contains(id) {
                expired.push(*id);
            }
        }
        for id in &expired {
            if let Some(p) = self.imports.remove(id) {
                self.cancel_leases(*id, &p);
            }
        }
        expired
    }

    /// Imports in progress.
    pub fn pending_imports(&self) -> usize {
        self.imports.len()
    }

    /// One decode step for a batch of live sequences, each fed one token (continuous batching:
    /// any subset of sequences, any lengths). Returns logits `[batch.len(), vocab]` on the backend.
    pub fn decode_step(&mut self, batch: &[(SeqId, u32)]) -> Result<StepLogits, EngineError> {
        if batch.is_empty() {
            return Err(EngineError::Request("empty decode batch".into()));
        }
        let c = self.model.config();
        let bs = self.config.block_size;
        let mut seen = std::collections::HashSet::new();
        for &(id, tok) in batch {
            let s = self.seq(id)?;
            if !seen.insert(id) {
                return Err(EngineError::Request(format!(
                    "{id:?} twice in one decode batch"
                )));
            }
            if tok as usize >= c.vocab_size {
                return Err(EngineError::Request(format!(
                    "token id {tok} >= vocab {}",
                    c.vocab_size
                )));
            }
            if s.tokens.len() >= c.max_context {
                return Err(EngineError::Request(format!(
                    "{id:?} reached the context limit"
                )));
            }
        }
        // Grow block tables first, so a failure leaves every sequence as it was (extra empty
        // blocks are harmless: the next step uses them).
        for &(id, _) in batch {
            let need = {
                let s = self.seq(id)?;
                s.tokens.len() / bs + 1 > s.blocks.len()
            };
            if need {
                let b = self.store.allocate(1)?;
                if let Some(s) = self.seqs.get_mut(&id) {
                    s.blocks.extend(b);
                }
            }
            let len = self.seq(id)?.tokens.len();
            self.grow_ring(id, len + 1)?;
        }
        let mut tokens = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        let mut slots = Vec::with_capacity(batch.len());
        let mut tables: Vec<Vec<u32>> = Vec::with_capacity(batch.len());
        let mut ring_tables: Vec<Vec<u32>> = Vec::with_capacity(batch.len());
        let mut ring_slots = Vec::with_capacity(batch.len());
        let mut states: Vec<Vec<Tensor>> = Vec::with_capacity(batch.len());
        for &(id, tok) in batch {
            let s = self.seq(id)?;
            let p = s.tokens.len();
            tokens.push(tok);
            positions.push(p as u32);
            slots.push(s.blocks[p / bs].0 * bs as u32 + (p % bs) as u32);
            tables.push(s.blocks.iter().map(|b| b.0).collect());
            if self.ring.is_some() {
                let t = ring_table(&s.window);
                ring_slots.extend(slots_of(&t, p..p + 1, bs));
                ring_tables.push(t);
            }
            states.push(match s.state {
                Some(slot) => self.state_slot(slot)?.to_vec(),
                None => Vec::new(),
            });
        }
        let rows: Vec<SeqRows<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, _)| SeqRows {
                block_table: &tables[i],
                window_table: ring_tables.get(i).map(Vec::as_slice),
                n_past: positions[i] as usize,
                n_new: 1,
                states: &states[i],
            })
            .collect();
        let fb = Batch {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
            window_slots: self.ring.is_some().then_some(ring_slots.as_slice()),
            seqs: &rows,
        };
        let all: Vec<u32> = (0..batch.len() as u32).collect();
        let out = self
            .model
            .forward::<EngineError>(&self.pools, &fb, &all, None)?;
        for &(id, tok) in batch {
            let len = match self.seqs.get_mut(&id) {
                Some(s) => {
                    s.tokens.push(tok);
                    s.tokens.len()
                }
                None => continue,
            };
            self.trim_ring(id, len)?;
        }
        Ok(StepLogits {
            tensor: out,
            rows: batch.len(),
        })
    }

    /// Samples one token per row. Batches of plain greedy rows use the backend's argmax, so only the ids
    /// cross to the host; otherwise the logits are downloaded once.
    pub fn sample(
        &self,
        logits: &StepLogits,
        samplers: &mut [&mut Sampler],
    ) -> Result<Vec<u32>, EngineError> {
        if samplers.len() != logits.rows {
            return Err(EngineError::Request(format!(
                "{} samplers for {} rows",
                samplers.len(),
                logits.rows
            )));
        }
        if samplers.iter().all(|s| !s.params().needs_logits()) {
            let ids = self.backend.argmax(&logits.tensor)?;
            samplers
                .iter_mut()
                .zip(&ids)
                .for_each(|(s, &t)| s.accept(t));
            return Ok(ids);
        }
        let all = self.backend.download(&logits.tensor)?;
        let vocab = all.len() / logits.rows.max(1);
        Ok(samplers
            .iter_mut()
            .zip(all.chunks_exact(vocab))
            .map(|(s, row)| s.sample(row))
            .collect())
    }

    /// Generates from `prompt` until a stop token or `max_tokens`; `on_token` sees each token as
    /// it is produced. The sequence is released at the end.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation, EngineError> {
        let t0 = Instant::now();
        let pre = self.prefill(prompt, &mut NullSink)?;
        let mut sampler = Sampler::new(params.clone());
        let first = sampler.sample(&pre.logits);
        let prefill_time = t0.elapsed();
        let result = self.continue_decode(pre.seq, first, &mut sampler, on_token);
        let released = self.release(pre.seq);
        let (tokens, finish) = result?;
        released?;
        Ok(Generation {
            tokens,
            finish,
            prompt_tokens: prompt.len(),
            cached_tokens: pre.cached_tokens,
            prefill_time,
            decode_time: t0.elapsed() - prefill_time,
        })
    }

    /// Decodes a live sequence whose next input token is `first` (already sampled, e.g. by the
    /// prefill node) until the sampler says stop. Does not release the sequence.
    pub fn continue_decode(
        &mut self,
        seq: SeqId,
        first: u32,
        sampler: &mut Sampler,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<(Vec<u32>, FinishReason), EngineError> {
        let mut out = vec![first];
        on_token(first);
        let mut tok = first;
        loop {
            if let Some(f) = sampler.finished(tok) {
                return Ok((out, f));
            }
            let logits = self.decode_step(&[(seq, tok)])?;
            tok = self.sample(&logits, &mut [&mut *sampler])?[0];
            out.push(tok);
            on_token(tok);
        }
    }

    /// Runs many prompts with continuous batching: each is prefilled, then all live sequences
    /// decode together; a sequence leaves the batch as soon as it finishes, and waiting prompts
    /// join (up to `max_batch` live sequences). Returns the generated tokens per prompt.
    pub fn generate_batch(
        &mut self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
        max_batch: usize,
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        struct Live {
            idx: usize,
            seq: SeqId,
            next: u32,
            sampler: Sampler,
        }
        let mut outputs = vec![Vec::new(); prompts.len()];
        let mut waiting = 0..prompts.len();
        let mut live: Vec<Live> = Vec::new();
        let result = (|| -> Result<(), EngineError> {
            loop {
                while live.len() < max_batch.max(1) {
                    let Some(idx) = waiting.next() else { break };
                    let pre = self.prefill(&prompts[idx], &mut NullSink)?;
                    let mut sampler = Sampler::new(params.clone());
                    let next = sampler.sample(&pre.logits);
                    outputs[idx].push(next);
                    live.push(Live {
                        idx,
                        seq: pre.seq,
                        next,
                        sampler,
                    });
                }
                // Finished sequences leave before the step.
                let mut i = 0;
                while i < live.len() {
                    if live[i].sampler.finished(live[i].next).is_some() {
                        let l = live.swap_remove(i);
                        self.release(l.seq)?;
                    } else {
                        i += 1;
                    }
                }
                if live.is_empty() {
                    if waiting.is_empty() {
                        return Ok(());
                    }
                    continue;
                }
                let batch: Vec<(SeqId, u32)> = live.iter().map(|l| (l.seq, l.next)).collect();
                let logits = self.decode_step(&batch)?;
                let mut samplers: Vec<&mut Sampler> =
                    live.iter_mut().map(|l| &mut l.sampler).collect();
                let toks = self.sample(&logits, &mut samplers)?;
                for (l, t) in live.iter_mut().zip(toks) {
                    l.next = t;
                    outputs[l.idx].push(t);
                }
            }
        })();
        for l in live {
            let _ = self.release(l.seq);
        }
        result.map(|()| outputs)
    }
}
