//! "Nothing stranded" and "bounded" for the KV store, over random operation sequences.
//!
//! A test-side model tracks exactly which references the "engine" holds (blocks per sequence,
//! state slots, open leases). After every operation the store must pass its own audit, its counts
//! must add up, and every refcount must equal what the model holds; at the end, once every sequence
//! is released and every lease expired, only free and cached blocks may remain.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prfaas_node::kv::{
    BlockId, BlockState, KvError, KvLease, KvStats, KvStore, KvStoreConfig, StateSlot,
};
use proptest::prelude::*;

const BS: usize = 4;
const N_BLOCKS: usize = 24;
const N_STATES: usize = 4;
const TTL_S: u64 = 10;

#[derive(Debug, Clone)]
enum Op {
    /// A new sequence over prompt `prompt` of `len` tokens: prefix lookup, allocate the rest,
    /// cache it (with a state snapshot for hybrid models when block-aligned).
    Start {
        prompt: u32,
        len: usize,
    },
    /// Another holder of a running sequence's blocks (e.g. a forked sampling branch).
    Share(usize),
    End(usize),
    Lease {
        n: usize,
        with_state: bool,
    },
    Commit {
        lease: usize,
        prompt: u32,
    },
    Cancel(usize),
    /// Let time pass and reap expired leases.
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..3, 0usize..20).prop_map(|(prompt, len)| Op::Start { prompt, len }),
        1 => (0usize..8).prop_map(Op::Share),
        3 => (0usize..8).prop_map(Op::End),
        2 => (0usize..6, any::<bool>()).prop_map(|(n, with_state)| Op::Lease { n, with_state }),
        1 => (0usize..4, 0u32..3).prop_map(|(lease, prompt)| Op::Commit { lease, prompt }),
        1 => (0usize..4).prop_map(Op::Cancel),
        1 => (0u64..8).prop_map(Op::Tick),
    ]
}

/// Prompts share their first 6 tokens (one full block), then diverge.
fn prompt_tokens(prompt: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| if i < 6 { i } else { 1000 * (prompt + 1) + i })
        .collect()
}

/// A holder of references, as the engine would keep it.
#[derive(Debug, Clone)]
struct Seq {
    blocks: Vec<BlockId>,
    state: Option<StateSlot>,
}

struct Harness {
    store: KvStore,
    hybrid: bool,
    t0: Instant,
    now: Instant,
    seqs: Vec<Seq>,
    leases: Vec<KvLease>,
}

impl Harness {
    fn new(hybrid: bool) -> Self {
        let config = KvStoreConfig {
            n_blocks: N_BLOCKS,
            block_size: BS,
            n_state_slots: N_STATES,
            lease_ttl: Duration::from_secs(TTL_S),
            max_leases: 3,
            block_bytes: 64,
            state_slot_bytes: 1000,
            state_required: hybrid,
        };
        let t0 = Instant::now();
        Self {
            store: KvStore::new(config).unwrap(),
            hybrid,
            t0,
            now: t0,
            seqs: Vec::new(),
            leases: Vec::new(),
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let before = self.store.stats();
        match *op {
            Op::Start { prompt, len } => {
                let tokens = prompt_tokens(prompt, len);
                // Keep one token to run, as the engine does.
                let hit = self
                    .store
                    .lookup_prefix(&tokens[..len.saturating_sub(1)], self.now);
                prop_assert_eq!(hit.n_tokens, hit.blocks.len() * BS);
                prop_assert!(hit.n_tokens < len.max(1));
                prop_assert_eq!(hit.state.is_some(), self.hybrid && hit.n_tokens > 0);
                let need = len.div_ceil(BS) - hit.blocks.len();
                let new = match self.store.allocate(need) {
                    Ok(b) => b,
                    Err(KvError::OutOfBlocks { needed, free }) => {
                        prop_assert_eq!(needed, need);
                        prop_assert!(free < need);
                        self.store.release(&hit.blocks).unwrap();
                        if let Some(s) = hit.state {
                            self.store.release_state(s).unwrap();
                        }
                        return Ok(());
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("allocate: {e}"))),
                };
                let mut blocks = hit.blocks.clone();
                blocks.extend(new);
                // The engine copies the cached (read-only) state into a live slot of its own.
                let live = if self.hybrid {
                    match self.store.allocate_state() {
                        Ok(s) => Some(s),
                        Err(KvError::OutOfStateSlots { .. }) => {
                            self.store.release(&blocks).unwrap();
                            if let Some(s) = hit.state {
                                self.store.release_state(s).unwrap();
                            }
                            return Ok(());
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("state: {e}"))),
                    }
                } else {
                    None
                };
                if let Some(s) = hit.state {
                    self.store.release_state(s).unwrap();
                }
                // Snapshot the state at the last block boundary when a slot is free.
                let aligned = len / BS * BS;
                let snapshot = if self.hybrid && aligned > 0 {
                    self.store.allocate_state().ok()
                } else {
                    None
                };
                let ins = self
                    .store
                    .insert_prefix(&tokens[..aligned], &blocks, snapshot, self.now)
                    .map_err(|e| TestCaseError::fail(format!("insert_prefix: {e}")))?;
                prop_assert!(ins.blocks_cached <= aligned / BS);
                self.seqs.push(Seq {
                    blocks,
                    state: live,
                });
            }
            Op::Share(i) => {
                if let Some(seq) = self.seqs.get(i).cloned() {
                    self.store.retain(&seq.blocks).unwrap();
                    if let Some(s) = seq.state {
                        self.store.retain_state(s).unwrap();
                    }
                    self.seqs.push(seq);
                }
            }
            Op::End(i) => {
                if i < self.seqs.len() {
                    let seq = self.seqs.swap_remove(i);
                    self.store.release(&seq.blocks).unwrap();
                    if let Some(s) = seq.state {
                        self.store.release_state(s).unwrap();
                    }
                }
            }
            Op::Lease { n, with_state } => match self.store.lease(n, with_state, self.now) {
                Ok(lease) => {
                    prop_assert_eq!(lease.blocks.len(), n);
                    prop_assert_eq!(lease.state.is_some(), with_state);
                    for b in &lease.blocks {
                        prop_assert_eq!(
                            self.store.block_state(*b),
                            Some(BlockState::Leased(lease.id))
                        );
                    }
                    self.leases.push(lease);
                }
                Err(KvError::TooManyLeases { max }) => prop_assert_eq!(self.leases.len(), max),
                Err(KvError::OutOfBlocks { free, .. }) => prop_assert!(free < n),
                Err(KvError::OutOfStateSlots { free, .. }) => {
                    prop_assert!(with_state);
                    prop_assert_eq!(free, 0);
                }
                Err(e) => return Err(TestCaseError::fail(format!("lease: {e}"))),
            },
            Op::Commit { lease, prompt } => {
                if lease < self.leases.len() {
                    let l = self.leases.swap_remove(lease);
                    let (blocks, state) = self.store.commit(l.id).unwrap();
                    prop_assert_eq!(&blocks, &l.blocks);
                    prop_assert_eq!(state, l.state);
                    // The transferred KV covers whole blocks of some prompt: cache it.
                    let tokens = prompt_tokens(prompt, blocks.len() * BS);
                    self.store
                        .insert_prefix(&tokens, &blocks, None, self.now)
                        .map_err(|e| TestCaseError::fail(format!("insert after commit: {e}")))?;
                    self.seqs.push(Seq { blocks, state });
                }
            }
            Op::Cancel(i) => {
                if i < self.leases.len() {
                    let l = self.leases.swap_remove(i);
                    self.store.cancel(l.id).unwrap();
                }
            }
            Op::Tick(secs) => {
                self.now += Duration::from_secs(secs);
                let mut expired = self.store.expire(self.now);
                expired.sort();
                let mut due: Vec<_> = self
                    .leases
                    .iter()
                    .filter(|l| l.expires_at <= self.now)
                    .map(|l| l.id)
                    .collect();
                due.sort();
                prop_assert_eq!(&expired, &due);
                self.leases.retain(|l| l.expires_at > self.now);
            }
        }
        self.check(&before)
    }

    /// Every invariant that must hold between operations.
    fn check(&self, before: &KvStats) -> Result<(), TestCaseError> {
        self.store
            .audit()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let st = self.store.stats();
        prop_assert_eq!(st.total_blocks, N_BLOCKS);
        prop_assert_eq!(st.free + st.cached + st.in_use + st.leased, st.total_blocks);
        prop_assert_eq!(
            st.state_slots_free
                + st.state_slots_cached
                + st.state_slots_used
                + st.state_slots_leased,
            N_STATES
        );
        prop_assert_eq!(
            st.bytes_used,
            (N_BLOCKS - st.free) as u64 * 64 + (N_STATES - st.state_slots_free) as u64 * 1000
        );
        prop_assert!(st.leases_active <= 3);
        prop_assert!(st.evictions_total >= before.evictions_total);

        // Refcounts equal exactly the references the model holds.
        let mut held: HashMap<BlockId, u32> = HashMap::new();
        let mut held_states: HashMap<StateSlot, u32> = HashMap::new();
        for seq in &self.seqs {
            for b in &seq.blocks {
                *held.entry(*b).or_default() += 1;
            }
            if let Some(s) = seq.state {
                *held_states.entry(s).or_default() += 1;
            }
        }
        prop_assert_eq!(st.in_use, held.len());
        for (b, n) in &held {
            prop_assert_eq!(
                self.store.block_state(*b),
                Some(BlockState::InUse { refcount: *n })
            );
        }
        prop_assert_eq!(st.state_slots_used, held_states.len());
        for (s, n) in &held_states {
            prop_assert_eq!(
                self.store.state_slot_state(*s),
                Some(BlockState::InUse { refcount: *n })
            );
        }
        let leased: usize = self.leases.iter().map(|l| l.blocks.len()).sum();
        prop_assert_eq!(st.leased, leased);
        prop_assert_eq!(st.leases_active, self.leases.len());
        Ok(())
    }

    /// Ends every sequence and lets every lease expire: nothing may stay held or leased.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for seq in std::mem::take(&mut self.seqs) {
            self.store.release(&seq.blocks).unwrap();
            if let Some(s) = seq.state {
                self.store.release_state(s).unwrap();
            }
        }
        let expired = self.store.expire(self.now + Duration::from_secs(TTL_S));
        prop_assert_eq!(expired.len(), self.leases.len());
        self.leases.clear();
        let before = self.store.stats();
        self.check(&before)?;
        let st = self.store.stats();
        prop_assert_eq!((st.in_use, st.leased, st.leases_active), (0, 0, 0));
        prop_assert_eq!((st.state_slots_used, st.state_slots_leased), (0, 0));
        prop_assert_eq!(st.free + st.cached, N_BLOCKS);
        // Everything cached can still be reclaimed: the whole store is allocatable.
        let all = self.store.allocate(N_BLOCKS).unwrap();
        self.store.release(&all).unwrap();
        prop_assert_eq!(self.store.stats().free, N_BLOCKS);
        prop_assert!(self.now >= self.t0);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn nothing_stranded(hybrid in any::<bool>(), ops in prop::collection::vec(op(), 1..60)) {
        let mut h = Harness::new(hybrid);
        for op in &ops {
            h.apply(op)?;
        }
        h.drain()?;
    }
}

/// Guards against a vacuous harness: one long deterministic run must reach the interesting paths
/// (prefix hits, evictions, expiries, state evictions) while holding every invariant.
#[test]
fn long_run_reaches_every_path() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    for hybrid in [false, true] {
        let mut runner = TestRunner::deterministic();
        let mut h = Harness::new(hybrid);
        for _ in 0..3000 {
            let op = op().new_tree(&mut runner).unwrap().current();
            h.apply(&op).unwrap();
        }
        let st = h.store.stats();
        assert!(st.prefix_hit_tokens_total > 0, "{st:?}");
        assert!(st.evictions_total > 0, "{st:?}");
        assert!(st.leases_expired_total > 0, "{st:?}");
        if hybrid {
            assert!(st.state_evictions_total > 0, "{st:?}");
        }
        h.drain().unwrap();
    }
}
