//! The KV store: block and state-slot accounting, prefix cache, leases, LRU eviction.
//!
//! Pure bookkeeping: the engine owns the device pools and uses the ids handed out here. No I/O,
//! no clocks of its own (every time-dependent call takes `now`), every structure bounded by the
//! configured number of blocks, state slots and leases.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::layout::KvLayout;
use super::lease::{KvLease, LeaseId};
pub use super::pool::BlockState;
use super::pool::{Pool, PoolError};
use super::prefix::{block_hashes, BlockHash};

/// Index of a block in the engine's per-layer KV pools (`[n_blocks, block_size, n_kv_heads,
/// head_dim]`); the same id addresses the block in every paged layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId(pub u32);

/// Index of a state slot: one sequence's recurrent states across all linear-attention layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StateSlot(pub u32);

/// Default bound on concurrent leases (incoming transfers) per store.
pub const DEFAULT_MAX_LEASES: usize = 256;

/// Sizing of a [`KvStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvStoreConfig {
    /// Number of paged blocks (the engine's pools have this many rows).
    pub n_blocks: usize,
    /// Tokens per block; must equal the layout's `block_size`.
    pub block_size: usize,
    /// Number of linear-attention state slots (0 for models without linear layers).
    pub n_state_slots: usize,
    /// How long a lease may stay uncommitted before [`KvStore::expire`] frees it.
    pub lease_ttl: Duration,
    /// Bound on concurrent leases.
    pub max_leases: usize,
    /// Bytes one block id stands for (all paged layers), for [`KvStats::bytes_used`].
    pub block_bytes: u64,
    /// Bytes one state slot stands for (all linear layers), for [`KvStats::bytes_used`].
    pub state_slot_bytes: u64,
    /// True for models with linear-attention layers: a prefix hit is only usable together with
    /// the exact-match state at its end, so [`KvStore::lookup_prefix`] reports only such hits.
    pub state_required: bool,
}

impl KvStoreConfig {
    /// A config sized for `layout`, with [`DEFAULT_MAX_LEASES`].
    pub fn for_layout(
        layout: &KvLayout,
        n_blocks: usize,
        n_state_slots: usize,
        lease_ttl: Duration,
    ) -> Self {
        Self {
            n_blocks,
            block_size: layout.block_size,
            n_state_slots,
            lease_ttl,
            max_leases: DEFAULT_MAX_LEASES,
            block_bytes: layout.block_bytes_all_layers() as u64,
            state_slot_bytes: layout.state_slot_bytes() as u64,
            state_required: layout.has_state(),
        }
    }
}

/// Errors of [`KvStore`] operations. Every failing operation leaves the store unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    #[error("invalid KV store config: {0}")]
    InvalidConfig(&'static str),
    #[error("out of KV blocks: needed {needed}, only {free} free or evictable")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("out of state slots: needed {needed}, only {free} free or evictable")]
    OutOfStateSlots { needed: usize, free: usize },
    #[error("too many concurrent KV leases (max {max})")]
    TooManyLeases { max: usize },
    #[error("unknown or finished {0}")]
    UnknownLease(LeaseId),
    #[error("lease deadline overflows the clock")]
    DeadlineOverflow,
    #[error("no such block {0:?}")]
    InvalidBlock(BlockId),
    #[error("block {0:?} is not held (free, leased, or released too often)")]
    BlockNotHeld(BlockId),
    #[error("no such state slot {0:?}")]
    InvalidStateSlot(StateSlot),
    #[error("state slot {0:?} is not held (free, leased, or released too often)")]
    StateSlotNotHeld(StateSlot),
    #[error("prefix of {n_tokens} tokens needs {needed} blocks, got {got}")]
    TooFewBlocks {
        n_tokens: usize,
        needed: usize,
        got: usize,
    },
    #[error("block {0:?} appears twice in one prefix")]
    DuplicateBlock(BlockId),
    #[error("block {0:?} is already cached under a different prefix")]
    BlockHashConflict(BlockId),
    #[error("a state can only be cached at a block boundary: {n_tokens} tokens, block size {block_size}")]
    StateNotBlockAligned { n_tokens: usize, block_size: usize },
    #[error("state slot {0:?} is already in the prefix cache")]
    StateAlreadyCached(StateSlot),
}

/// A prefix-cache hit. The caller holds one reference to each block and to the state (release
/// them with [`KvStore::release`] / [`KvStore::release_state`] when the sequence ends).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrefixHit {
    /// Blocks holding the KV of the first `n_tokens` tokens, in order.
    pub blocks: Vec<BlockId>,
    /// Tokens covered (`blocks.len() · block_size`); 0 on a miss.
    pub n_tokens: usize,
    /// For hybrid models: the cached states after exactly `n_tokens` tokens. **Read-only**: it may be
    /// shared with other sequences; copy it into a slot of your own before decoding further.
    pub state: Option<StateSlot>,
}

/// What [`KvStore::insert_prefix`] added to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefixInsert {
    /// Blocks newly registered (blocks whose prefix was already cached are not counted).
    pub blocks_cached: usize,
    /// Whether the state slot was kept by the cache (false: an equal state was already cached and
    /// the slot given was released).
    pub state_cached: bool,
}

/// Counts for `/metrics`. `free + cached + in_use + leased == total_blocks` always holds (and the
/// same for state slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KvStats {
    pub total_blocks: usize,
    pub free: usize,
    /// Refcount 0 but kept for the prefix cache (evictable).
    pub cached: usize,
    pub in_use: usize,
    pub leased: usize,
    pub state_slots_total: usize,
    pub state_slots_free: usize,
    pub state_slots_cached: usize,
    pub state_slots_used: usize,
    pub state_slots_leased: usize,
    pub leases_active: usize,
    /// Bytes of blocks and state slots that are not free (in use, cached or leased).
    pub bytes_used: u64,
    pub leases_expired_total: u64,
    /// Cached blocks evicted to make room.
    pub evictions_total: u64,
    /// Cached state slots evicted to make room.
    pub state_evictions_total: u64,
    pub prefix_lookups_total: u64,
    /// Lookups that returned at least one block.
    pub prefix_hits_total: u64,
    /// Sum of [`PrefixHit::n_tokens`] over all lookups.
    pub prefix_hit_tokens_total: u64,
}

/// An invariant of the store does not hold (a bug, never bad input). See [`KvStore::audit`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV store invariant violated: {0}")]
pub struct KvInvariantViolation(pub String);

#[derive(Debug, Clone)]
struct LeaseEntry {
    blocks: Vec<u32>,
    state: Option<u32>,
    expires_at: Instant,
}

/// Paged KV bookkeeping for one model on one node.
#[derive(Debug, Clone)]
pub struct KvStore {
    config: KvStoreConfig,
    blocks: Pool,
    states: Pool,
    leases: HashMap<LeaseId, LeaseEntry>,
    /// Lease deadlines, earliest first.
    deadlines: BTreeSet<(Instant, LeaseId)>,
    next_lease: u64,
    leases_expired_total: u64,
    prefix_lookups_total: u64,
    prefix_hits_total: u64,
    prefix_hit_tokens_total: u64,
}

fn block_err(e: PoolError) -> KvError {
    match e {
        PoolError::Invalid(i) => KvError::InvalidBlock(BlockId(i)),
        PoolError::NotHeld(i) => KvError::BlockNotHeld(BlockId(i)),
    }
}

fn state_err(e: PoolError) -> KvError {
    match e {
        PoolError::Invalid(i) => KvError::InvalidStateSlot(StateSlot(i)),
        PoolError::NotHeld(i) => KvError::StateSlotNotHeld(StateSlot(i)),
    }
}

fn raw_blocks(ids: &[BlockId]) -> Vec<u32> {
    ids.iter().map(|b| b.0).collect()
}

fn to_blocks(ids: &[u32]) -> Vec<BlockId> {
    ids.iter().map(|&b| BlockId(b)).collect()
}

impl KvStore {
    /// An empty store: all blocks and state slots free.
    pub fn new(config: KvStoreConfig) -> Result<Self, KvError> {
        if config.block_size == 0 {
            return Err(KvError::InvalidConfig("block_size must be at least 1"));
        }
        let n_blocks = u32::try_from(config.n_blocks)
            .map_err(|_| KvError::InvalidConfig("n_blocks exceeds u32"))?;
        let n_states = u32::try_from(config.n_state_slots)
            .map_err(|_| KvError::InvalidConfig("n_state_slots exceeds u32"))?;
        if config.max_leases == 0 {
            return Err(KvError::InvalidConfig("max_leases must be at least 1"));
        }
        if config.state_required && n_states == 0 {
            return Err(KvError::InvalidConfig(
                "a model with state layers needs at least one state slot",
            ));
        }
        Ok(Self {
            blocks: Pool::new(n_blocks),
            states: Pool::new(n_states),
            leases: HashMap::new(),
            deadlines: BTreeSet::new(),
            next_lease: 0,
            leases_expired_total: 0,
            prefix_lookups_total: 0,
            prefix_hits_total: 0,
            prefix_hit_tokens_total: 0,
            config,
        })
    }

    pub fn config(&self) -> &KvStoreConfig {
        &self.config
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.config.block_size
    }

    // ---------------------------------------------------------------- blocks

    /// Takes `n` blocks, each held once by the caller. Evicts least-recently-used cached blocks when
    /// the free list runs short; never touches held or leased blocks.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, KvError> {
        self.blocks
            .take(n, None)
            .map(|v| to_blocks(&v))
            .ok_or(KvError::OutOfBlocks {
                needed: n,
                free: self.blocks.available(),
            })
    }

    /// Adds a reference to each block (held or cached ones only; duplicates add several).
    pub fn retain(&mut self, blocks: &[BlockId]) -> Result<(), KvError> {
        let raw = raw_blocks(blocks);
        self.blocks.check_retain(&raw).map_err(block_err)?;
        for idx in raw {
            self.blocks.retain_one(idx);
        }
        Ok(())
    }

    /// Drops a reference to each block (duplicates drop several). A block reaching refcount 0 stays
    /// in the prefix cache if it is registered there (evictable), otherwise it is freed.
    pub fn release(&mut self, blocks: &[BlockId]) -> Result<(), KvError> {
        let raw = raw_blocks(blocks);
        self.blocks.check_release(&raw).map_err(block_err)?;
        for idx in raw {
            self.blocks.release_one(idx);
        }
        Ok(())
    }

    /// Where `block` is, or `None` for an id outside the store.
    pub fn block_state(&self, block: BlockId) -> Option<BlockState> {
        self.blocks.state(block.0)
    }

    // ----------------------------------------------------------- state slots

    /// Takes one state slot, held once by the caller (evicting the least-recently-used cached
    /// state if none is free).
    pub fn allocate_state(&mut self) -> Result<StateSlot, KvError> {
        match self.states.take(1, None).as_deref() {
            Some([s]) => Ok(StateSlot(*s)),
            _ => Err(KvError::OutOfStateSlots {
                needed: 1,
                free: self.states.available(),
            }),
        }
    }

    /// Adds a reference to a held or cached state slot.
    pub fn retain_state(&mut self, slot: StateSlot) -> Result<(), KvError> {
        self.states.check_retain(&[slot.0]).map_err(state_err)?;
        self.states.retain_one(slot.0);
        Ok(())
    }

    /// Drops a reference to a state slot (cached states stay cached, others are freed at 0).
    pub fn release_state(&mut self, slot: StateSlot) -> Result<(), KvError> {
        self.states.check_release(&[slot.0]).map_err(state_err)?;
        self.states.release_one(slot.0);
        Ok(())
    }

    /// Where `slot` is, or `None` for an id outside the store.
    pub fn state_slot_state(&self, slot: StateSlot) -> Option<BlockState> {
        self.states.state(slot.0)
    }

    // ---------------------------------------------------------- prefix cache

    /// Longest cached prefix of `tokens`, retained for the caller (one reference per block and on
    /// the state).
    ///
    /// Paged KV hits may be partial (any number of leading full blocks). When the config says
    /// `state_required` (hybrid models), the hit is cut back to the longest matched block boundary
    /// at which the cache also holds the state for exactly that prefix, or is empty.
    ///
    /// To get logits the engine must still run at least one token, so look up
    /// `&prompt[..prompt.len() - 1]` rather than the whole prompt.
    pub fn lookup_prefix(&mut self, tokens: &[u32], now: Instant) -> PrefixHit {
        self.prefix_lookups_total += 1;
        let hashes = block_hashes(tokens, self.config.block_size);
        let mut matched = Vec::new();
        for h in &hashes {
            match self.blocks.lookup(h) {
                Some(idx) => matched.push(idx),
                None => break,
            }
        }
        let mut state = None;
        if self.config.state_required {
            let found = (1..=matched.len())
                .rev()
                .find_map(|j| self.states.lookup(&hashes[j - 1]).map(|s| (j, s)));
            match found {
                Some((j, s)) => {
                    matched.truncate(j);
                    state = Some(s);
                }
                None => matched.clear(),
            }
        }
        // Touch from the last block to the first so that, for one access, the deepest block is the
        // least recent: eviction then trims chains from their leaves, never stranding a child
        // behind an evicted parent.
        for &idx in matched.iter().rev() {
            self.blocks.retain_one(idx);
            self.blocks.touch(idx, now);
        }
        if let Some(s) = state {
            self.states.retain_one(s);
            self.states.touch(s, now);
        }
        let n_tokens = matched.len() * self.config.block_size;
        self.prefix_hit_tokens_total += n_tokens as u64;
        self.prefix_hits_total += u64::from(n_tokens > 0);
        PrefixHit {
            blocks: to_blocks(&matched),
            n_tokens,
            state: state.map(StateSlot),
        }
    }

    /// How many leading blocks of a prefix given by its chained `hashes` a
    /// [`KvStore::lookup_prefix`] would hit right now, without retaining or touching anything.
    ///
    /// This is what a bidder answers to an auction call (which carries block hashes, not tokens);
    /// like `lookup_prefix`, with `state_required` it only counts up to a cached state.
    pub fn cached_prefix_blocks(&self, hashes: &[BlockHash]) -> usize {
        let matched = hashes
            .iter()
            .take_while(|h| self.blocks.lookup(h).is_some())
            .count();
        if !self.config.state_required {
            return matched;
        }
        (1..=matched)
            .rev()
            .find(|&j| self.states.lookup(&hashes[j - 1]).is_some())
            .unwrap_or(0)
    }

    /// Hashes of every block registered in the prefix cache (held or evictable), e.g. to build
    /// an advert's bloom filter. At most `n_blocks` items.
    pub fn cached_block_hashes(&self) -> impl Iterator<Item = &BlockHash> + '_ {
        self.blocks.keys()
    }

    /// Registers the full blocks of a sequence's prefix `tokens` (and optionally the state after
    /// exactly `tokens`) in the prefix cache.
    ///
    /// * `blocks` are the sequence's blocks in order; the caller holds them and keeps its
    ///   references (release them when the sequence ends; they then stay cached). Only the first
    ///   `tokens.len() / block_size` (the full ones) are registered, so their content must not
    ///   change afterwards. A prefix already cached in another block is left as it is.
    /// * `state`, if given, is a **snapshot** slot held by the caller whose reference passes to the
    ///   cache (do not write or release it afterwards). It needs `tokens.len()` to be a non-zero
    ///   multiple of the block size. If an equal prefix's state is already cached, the slot is
    ///   released instead.
    pub fn insert_prefix(
        &mut self,
        tokens: &[u32],
        blocks: &[BlockId],
        state: Option<StateSlot>,
        now: Instant,
    ) -> Result<PrefixInsert, KvError> {
        let bs = self.config.block_size;
        let n_full = tokens.len() / bs;
        if blocks.len() < n_full {
            return Err(KvError::TooFewBlocks {
                n_tokens: tokens.len(),
                needed: n_full,
                got: blocks.len(),
            });
        }
        let blocks = &blocks[..n_full];
        let hashes = block_hashes(tokens, bs);
        // Validate everything before changing anything.
        self.check_registrable(&hashes, blocks)?;
        if let Some(s) = state {
            match self.states.state(s.0) {
                None => return Err(KvError::InvalidStateSlot(s)),
                Some(BlockState::InUse { .. }) => {}
                Some(_) => return Err(KvError::StateSlotNotHeld(s)),
            }
            if self.states.key_of(s.0).is_some() {
                return Err(KvError::StateAlreadyCached(s));
            }
            if n_full == 0 || !tokens.len().is_multiple_of(bs) {
                return Err(KvError::StateNotBlockAligned {
                    n_tokens: tokens.len(),
                    block_size: bs,
                });
            }
        }

        let mut out = PrefixInsert {
            blocks_cached: self.register_checked(&hashes, blocks, now),
            ..PrefixInsert::default()
        };
        if let (Some(s), Some(h)) = (state, hashes.last()) {
            match self.states.lookup(h) {
                Some(existing) => self.states.touch(existing, now),
                None => {
                    self.states.register(s.0, *h);
                    self.states.touch(s.0, now);
                    out.state_cached = true;
                }
            }
            // The caller's reference passes to the cache: cached slots have refcount 0.
            self.states.release_one(s.0);
        }
        Ok(out)
    }

    /// Registers held, full `blocks` under `hashes` (pairwise: `blocks[i]` holds the block whose
    /// chained hash is `hashes[i]`) without the blocks of the prefix before them: a sliding-window
    /// ring keeps only the last blocks of a prefix (see [`KvStore::lookup_blocks`]). Returns how
    /// many were newly registered; an equal block already cached elsewhere is left as it is.
    pub fn register_blocks(
        &mut self,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        now: Instant,
    ) -> Result<usize, KvError> {
        if blocks.len() != hashes.len() {
            return Err(KvError::TooFewBlocks {
                n_tokens: hashes.len() * self.config.block_size,
                needed: hashes.len(),
                got: blocks.len(),
            });
        }
        self.check_registrable(hashes, blocks)?;
        Ok(self.register_checked(hashes, blocks, now))
    }

    /// The blocks cached under every one of `hashes` (consecutive blocks of one prefix, such as
    /// the sliding window before its end), retained for the caller; `None`, retaining nothing,
    /// unless all of them are cached.
    pub fn lookup_blocks(&mut self, hashes: &[BlockHash], now: Instant) -> Option<Vec<BlockId>> {
        let found = hashes
            .iter()
            .map(|h| self.blocks.lookup(h))
            .collect::<Option<Vec<u32>>>()?;
        // Deepest touched first, as in `lookup_prefix`.
        for &idx in found.iter().rev() {
            self.blocks.retain_one(idx);
            self.blocks.touch(idx, now);
        }
        Some(to_blocks(&found))
    }

    /// Checks that `blocks` may be registered under `hashes`: distinct, held, and not cached
    /// under another hash.
    fn check_registrable(&self, hashes: &[BlockHash], blocks: &[BlockId]) -> Result<(), KvError> {
        let mut seen = std::collections::HashSet::with_capacity(blocks.len());
        for (b, h) in blocks.iter().zip(hashes) {
            if !seen.insert(*b) {
                return Err(KvError::DuplicateBlock(*b));
            }
            match self.blocks.state(b.0) {
                None => return Err(KvError::InvalidBlock(*b)),
                Some(BlockState::InUse { .. }) => {}
                Some(_) => return Err(KvError::BlockNotHeld(*b)),
            }
            if let Some(k) = self.blocks.key_of(b.0) {
                if k != *h {
                    return Err(KvError::BlockHashConflict(*b));
                }
            }
        }
        Ok(())
    }

    /// Registers checked blocks (deepest first, as in `lookup_prefix`); returns how many were new.
    fn register_checked(
        &mut self,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        now: Instant,
    ) -> usize {
        let mut new = 0;
        for (b, h) in blocks.iter().zip(hashes).rev() {
            match self.blocks.lookup(h) {
                Some(existing) => self.blocks.touch(existing, now),
                None => {
                    self.blocks.register(b.0, *h);
                    self.blocks.touch(b.0, now);
                    new += 1;
                }
            }
        }
        new
    }

    // ---------------------------------------------------------------- leases

    /// Reserves `n_blocks` blocks (and a state slot if `with_state`) for an incoming transfer until
    /// `now + lease_ttl`. Evicts cached blocks if needed; fails without change when the store cannot
    /// hold the transfer or too many leases are open.
    pub fn lease(
        &mut self,
        n_blocks: usize,
        with_state: bool,
        now: Instant,
    ) -> Result<KvLease, KvError> {
        if self.leases.len() >= self.config.max_leases {
            return Err(KvError::TooManyLeases {
                max: self.config.max_leases,
            });
        }
        let expires_at = now
            .checked_add(self.config.lease_ttl)
            .ok_or(KvError::DeadlineOverflow)?;
        if self.blocks.available() < n_blocks {
            return Err(KvError::OutOfBlocks {
                needed: n_blocks,
                free: self.blocks.available(),
            });
        }
        if with_state && self.states.available() < 1 {
            return Err(KvError::OutOfStateSlots {
                needed: 1,
                free: self.states.available(),
            });
        }
        let id = LeaseId(self.next_lease);
        self.next_lease += 1;
        let blocks = self.blocks.take(n_blocks, Some(id)).unwrap_or_default();
        let state = if with_state {
            self.states
                .take(1, Some(id))
                .and_then(|v| v.first().copied())
        } else {
            None
        };
        self.deadlines.insert((expires_at, id));
        let lease = KvLease {
            id,
            blocks: to_blocks(&blocks),
            state: state.map(StateSlot),
            expires_at,
        };
        self.leases.insert(
            id,
            LeaseEntry {
                blocks,
                state,
                expires_at,
            },
        );
        Ok(lease)
    }

    /// Moves a lease's deadline to `now + lease_ttl` (a transfer that is making progress).
    pub fn extend_lease(&mut self, id: LeaseId, now: Instant) -> Result<Instant, KvError> {
        let expires_at = now
            .checked_add(self.config.lease_ttl)
            .ok_or(KvError::DeadlineOverflow)?;
        let entry = self.leases.get_mut(&id).ok_or(KvError::UnknownLease(id))?;
        self.deadlines.remove(&(entry.expires_at, id));
        entry.expires_at = expires_at;
        self.deadlines.insert((expires_at, id));
        Ok(expires_at)
    }

    /// Ends a lease successfully: its blocks and state become ordinary held ones (refcount 1,
    /// owned by the caller). A lease stays committable until [`KvStore::expire`] reaps it.
    pub fn commit(&mut self, id: LeaseId) -> Result<(Vec<BlockId>, Option<StateSlot>), KvError> {
        let entry = self.take_lease(id)?;
        for &b in &entry.blocks {
            self.blocks.commit_lease(b);
        }
        if let Some(s) = entry.state {
            self.states.commit_lease(s);
        }
        Ok((to_blocks(&entry.blocks), entry.state.map(StateSlot)))
    }

    /// Ends a lease unsuccessfully: everything it reserved is freed.
    pub fn cancel(&mut self, id: LeaseId) -> Result<(), KvError> {
        let entry = self.take_lease(id)?;
        for &b in &entry.blocks {
            self.blocks.drop_lease(b);
        }
        if let Some(s) = entry.state {
            self.states.drop_lease(s);
        }
        Ok(())
    }

    /// Frees every lease whose deadline is at or before `now`; returns their ids (earliest first).
    pub fn expire(&mut self, now: Instant) -> Vec<LeaseId> {
        let mut expired = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            // The deadline set and the lease map always agree, so this cannot fail.
            if self.cancel(id).is_ok() {
                expired.push(id);
            }
        }
        self.leases_expired_total += expired.len() as u64;
        expired
    }

    /// Earliest lease deadline, so a driver knows when to call [`KvStore::expire`] next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(d, _)| d)
    }

    fn take_lease(&mut self, id: LeaseId) -> Result<LeaseEntry, KvError> {
        let entry = self.leases.remove(&id).ok_or(KvError::UnknownLease(id))?;
        self.deadlines.remove(&(entry.expires_at, id));
        Ok(entry)
    }

    // ---------------------------------------------------------------- stats

    pub fn stats(&self) -> KvStats {
        let b = &self.blocks;
        let s = &self.states;
        let used_blocks = (b.total() - b.n_free()) as u64;
        let used_states = (s.total() - s.n_free()) as u64;
        KvStats {
            total_blocks: b.total(),
            free: b.n_free(),
            cached: b.n_cached(),
            in_use: b.n_in_use(),
            leased: b.n_leased(),
            state_slots_total: s.total(),
            state_slots_free: s.n_free(),
            state_slots_cached: s.n_cached(),
            state_slots_used: s.n_in_use(),
            state_slots_leased: s.n_leased(),
            leases_active: self.leases.len(),
            bytes_used: used_blocks * self.config.block_bytes
                + used_states * self.config.state_slot_bytes,
            leases_expired_total: self.leases_expired_total,
            evictions_total: b.evictions(),
            state_evictions_total: s.evictions(),
            prefix_lookups_total: self.prefix_lookups_total,
            prefix_hits_total: self.prefix_hits_total,
            prefix_hit_tokens_total: self.prefix_hit_tokens_total,
        }
    }

    /// Recomputes all accounting from scratch and checks it (each block in exactly one state,
    /// counters match, leases own exactly the leased blocks). O(n_blocks); for tests and debug
    /// endpoints, not hot paths.
    pub fn audit(&self) -> Result<(), KvInvariantViolation> {
        self.blocks.audit("block").map_err(KvInvariantViolation)?;
        self.states
            .audit("state slot")
            .map_err(KvInvariantViolation)?;
        if self.deadlines.len() != self.leases.len() {
            return Err(KvInvariantViolation(
                "lease deadlines and leases disagree".into(),
            ));
        }
        let mut leased_blocks = 0;
        let mut leased_states = 0;
        for (&id, e) in &self.leases {
            if !self.deadlines.contains(&(e.expires_at, id)) {
                return Err(KvInvariantViolation(format!("{id} has no deadline")));
            }
            for &b in &e.blocks {
                if self.blocks.state(b) != Some(BlockState::Leased(id)) {
                    return Err(KvInvariantViolation(format!(
                        "{id} owns block {b} that is not leased to it"
                    )));
                }
            }
            leased_blocks += e.blocks.len();
            if let Some(s) = e.state {
                if self.states.state(s) != Some(BlockState::Leased(id)) {
                    return Err(KvInvariantViolation(format!(
                        "{id} owns state slot {s} that is not leased to it"
                    )));
                }
                leased_states += 1;
            }
        }
        if leased_blocks != self.blocks.n_leased() || leased_states != self.states.n_leased() {
            return Err(KvInvariantViolation(
                "leased counts disagree with the lease table".into(),
            ));
        }
        Ok(())
    }
}
