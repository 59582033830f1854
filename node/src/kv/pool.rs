//! One fixed-size pool of reference-counted, cacheable, leasable slots.
//!
//! Paged KV blocks and linear-attention state slots follow exactly the same rules (free, held by
//! sequences, cached under a [`BlockHash`] with LRU eviction, leased for a transfer), so both are a
//! [`Pool`]; [`super::KvStore`] wraps the raw `u32` indices in [`super::BlockId`] /
//! [`super::StateSlot`] and maps errors to the right names.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use super::lease::LeaseId;
use super::prefix::BlockHash;

/// LRU order key: last touch time (as passed in by the caller), then a tie-breaking counter.
/// `None` sorts first, i.e. never-touched entries are the first to go.
type LruKey = (Option<Instant>, u64);

/// Where a block (or state slot) is. Exactly one of these holds for every slot at all times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// On the free list: no data anyone cares about.
    Free,
    /// Refcount 0 but still in the prefix cache; evictable (LRU).
    Cached,
    /// Held by `refcount ≥ 1` sequences (and possibly also in the prefix cache); never evicted.
    InUse { refcount: u32 },
    /// Reserved for an incoming transfer; never evicted; freed when the lease is cancelled or
    /// expires.
    Leased(LeaseId),
}

#[derive(Debug, Clone)]
struct Entry {
    refcount: u32,
    lease: Option<LeaseId>,
    /// Prefix-cache key, when this slot's content is registered in the cache.
    key: Option<BlockHash>,
    last_used: LruKey,
}

/// Why a pool refused an operation on one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PoolError {
    /// The index is not a slot of this pool.
    Invalid(u32),
    /// The slot is free or leased (retain), or has no reference to drop (release).
    NotHeld(u32),
}

#[derive(Debug, Clone)]
pub(crate) struct Pool {
    entries: Vec<Entry>,
    /// LIFO, so recently freed (cache-warm) slots are reused first.
    free: Vec<u32>,
    /// Cached slots with refcount 0, oldest first.
    lru: BTreeSet<(LruKey, u32)>,
    index: HashMap<BlockHash, u32>,
    in_use: usize,
    leased: usize,
    evictions: u64,
    tick: u64,
}

impl Pool {
    pub(crate) fn new(n: u32) -> Self {
        Self {
            entries: vec![
                Entry {
                    refcount: 0,
                    lease: None,
                    key: None,
                    last_used: (None, 0),
                };
                n as usize
            ],
            free: (0..n).rev().collect(),
            lru: BTreeSet::new(),
            index: HashMap::new(),
            in_use: 0,
            leased: 0,
            evictions: 0,
            tick: 0,
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.entries.len()
    }
    pub(crate) fn n_free(&self) -> usize {
        self.free.len()
    }
    pub(crate) fn n_cached(&self) -> usize {
        self.lru.len()
    }
    pub(crate) fn n_in_use(&self) -> usize {
        self.in_use
    }
    pub(crate) fn n_leased(&self) -> usize {
        self.leased
    }
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions
    }
    /// Slots that an allocation could obtain right now (free + evictable).
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    pub(crate) fn state(&self, idx: u32) -> Option<BlockState> {
        let e = self.entries.get(idx as usize)?;
        Some(if let Some(l) = e.lease {
            BlockState::Leased(l)
        } else if e.refcount > 0 {
            BlockState::InUse {
                refcount: e.refcount,
            }
        } else if e.key.is_some() {
            BlockState::Cached
        } else {
            BlockState::Free
        })
    }

    pub(crate) fn lookup(&self, key: &BlockHash) -> Option<u32> {
        self.index.get(key).copied()
    }

    /// Every registered key (held or cached slots alike).
    pub(crate) fn keys(&self) -> impl Iterator<Item = &BlockHash> + '_ {
        self.index.keys()
    }

    pub(crate) fn key_of(&self, idx: u32) -> Option<BlockHash> {
        self.entries.get(idx as usize).and_then(|e| e.key)
    }

    /// Takes `n` slots, evicting least-recently-used cached ones when the free list runs short.
    /// Each comes back held once (`lease == None`) or leased. `None` (and no change) when fewer
    /// than `n` are [`Pool::available`].
    pub(crate) fn take(&mut self, n: usize, lease: Option<LeaseId>) -> Option<Vec<u32>> {
        if n > self.available() {
            return None;
        }
        while self.free.len() < n {
            self.evict_one();
        }
        let split = self.free.len() - n;
        let taken = self.free.split_off(split);
        for &idx in &taken {
            let e = &mut self.entries[idx as usize];
            debug_assert!(e.refcount == 0 && e.lease.is_none() && e.key.is_none());
            match lease {
                Some(l) => {
                    e.lease = Some(l);
                    self.leased += 1;
                }
                None => {
                    e.refcount = 1;
                    self.in_use += 1;
                }
            }
        }
        Some(taken)
    }

    fn evict_one(&mut self) {
        if let Some((_, idx)) = self.lru.pop_first() {
            let e = &mut self.entries[idx as usize];
            if let Some(k) = e.key.take() {
                self.index.remove(&k);
            }
            e.last_used = (None, 0);
            self.free.push(idx);
            self.evictions += 1;
        }
    }

    /// Checks that every slot in `ids` may gain a reference (held or cached; not free or leased).
    pub(crate) fn check_retain(&self, ids: &[u32]) -> Result<(), PoolError> {
        for &idx in ids {
            match self.state(idx) {
                None => return Err(PoolError::Invalid(idx)),
                Some(BlockState::Free | BlockState::Leased(_)) => {
                    return Err(PoolError::NotHeld(idx));
                }
                Some(BlockState::Cached | BlockState::InUse { .. }) => {}
            }
        }
        Ok(())
    }

    /// Adds a reference to a slot that passed [`Pool::check_retain`].
    pub(crate) fn retain_one(&mut self, idx: u32) {
        let e = &mut self.entries[idx as usize];
        if e.refcount == 0 {
            self.lru.remove(&(e.last_used, idx));
            self.in_use += 1;
        }
        e.refcount += 1;
    }

    /// Checks that every occurrence in `ids` has a reference to drop (duplicates count).
    pub(crate) fn check_release(&self, ids: &[u32]) -> Result<(), PoolError> {
        let mut drops: HashMap<u32, u32> = HashMap::with_capacity(ids.len());
        for &idx in ids {
            let e = self
                .entries
                .get(idx as usize)
                .ok_or(PoolError::Invalid(idx))?;
            let d = drops.entry(idx).or_insert(0);
            *d += 1;
            if e.lease.is_some() || *d > e.refcount {
                return Err(PoolError::NotHeld(idx));
            }
        }
        Ok(())
    }

    /// Drops a reference; at zero the slot becomes cached (if registered) or free.
    pub(crate) fn release_one(&mut self, idx: u32) {
        let e = &mut self.entries[idx as usize];
        debug_assert!(e.refcount > 0);
        e.refcount -= 1;
        if e.refcount == 0 {
            self.in_use -= 1;
            if e.key.is_some() {
                self.lru.insert((e.last_used, idx));
            } else {
                self.free.push(idx);
            }
        }
    }

    /// Marks `idx` as used at `now`. Successive touches at the same `now` order later ones as
    /// more recent.
    pub(crate) fn touch(&mut self, idx: u32, now: Instant) {
        self.tick += 1;
        let key = (Some(now), self.tick);
        let e = &mut self.entries[idx as usize];
        let old = std::mem::replace(&mut e.last_used, key);
        if self.lru.remove(&(old, idx)) {
            self.lru.insert((key, idx));
        }
    }

    /// Registers a held, unregistered slot under `key` (callers check both).
    pub(crate) fn register(&mut self, idx: u32, key: BlockHash) {
        let e = &mut self.entries[idx as usize];
        debug_assert!(e.refcount > 0 && e.key.is_none());
        e.key = Some(key);
        self.index.insert(key, idx);
    }

    /// Turns a leased slot into a held one (refcount 1).
    pub(crate) fn commit_lease(&mut self, idx: u32) {
        let e = &mut self.entries[idx as usize];
        debug_assert!(e.lease.is_some());
        e.lease = None;
        e.refcount = 1;
        self.leased -= 1;
        self.in_use += 1;
    }

    /// Returns a leased slot to the free list.
    pub(crate) fn drop_lease(&mut self, idx: u32) {
        let e = &mut self.entries[idx as usize];
        debug_assert!(e.lease.is_some());
        e.lease = None;
        self.leased -= 1;
        self.free.push(idx);
    }

    /// Recomputes every count from the entries and cross-checks the free list, LRU set and index.
    pub(crate) fn audit(&self, what: &str) -> Result<(), String> {
        let (mut free, mut cached, mut in_use, mut leased) = (0, 0, 0, 0);
        let mut on_free = vec![false; self.entries.len()];
        for &idx in &self.free {
            let slot = on_free
                .get_mut(idx as usize)
                .ok_or_else(|| format!("{what} {idx}: on free list but out of range"))?;
            if *slot {
                return Err(format!("{what} {idx}: twice on the free list"));
            }
            *slot = true;
        }
        for (i, e) in self.entries.iter().enumerate() {
            let idx = i as u32;
            let in_lru = self.lru.contains(&(e.last_used, idx));
            let st = self
                .state(idx)
                .ok_or_else(|| format!("{what} {idx}: no state"))?;
            let expect_free = st == BlockState::Free;
            if on_free[i] != expect_free {
                return Err(format!(
                    "{what} {idx}: state {st:?} but on_free_list={}",
                    on_free[i]
                ));
            }
            if in_lru != (st == BlockState::Cached) {
                return Err(format!("{what} {idx}: state {st:?} but in_lru={in_lru}"));
            }
            if e.lease.is_some() && (e.refcount > 0 || e.key.is_some()) {
                return Err(format!("{what} {idx}: leased and also held or cached"));
            }
            if let Some(k) = e.key {
                if self.index.get(&k) != Some(&idx) {
                    return Err(format!("{what} {idx}: key not indexed to it"));
                }
            }
            match st {
                BlockState::Free => free += 1,
                BlockState::Cached => cached += 1,
                BlockState::InUse { .. } => in_use += 1,
                BlockState::Leased(_) => leased += 1,
            }
        }
        if self.index.len() != self.entries.iter().filter(|e| e.key.is_some()).count() {
            return Err(format!("{what}: index has entries for unregistered slots"));
        }
        if self.lru.len() != cached {
            return Err(format!(
                "{what}: lru has {} entries, {cached} cached",
                self.lru.len()
            ));
        }
        if (free, in_use, leased) != (self.free.len(), self.in_use, self.leased) {
            return Err(format!(
                "{what}: counters free/in_use/leased = {}/{}/{} but entries say {free}/{in_use}/{leased}",
                self.free.len(),
                self.in_use,
                self.leased
            ));
        }
        if free + cached + in_use + leased != self.entries.len() {
            return Err(format!("{what}: states do not add up to the total"));
        }
        Ok(())
    }
}
