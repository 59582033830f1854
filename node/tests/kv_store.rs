//! Behaviour of the paged KV store: accounting, refcounts, prefix cache, eviction, leases.

use std::time::{Duration, Instant};

use prfaas_node::kv::{
    block_hashes, BlockId, BlockState, KvError, KvStats, KvStore, KvStoreConfig, PrefixHit,
    StateSlot,
};

const BS: usize = 4;
const TTL: Duration = Duration::from_secs(5);

fn config(n_blocks: usize, n_state_slots: usize, state_required: bool) -> KvStoreConfig {
    KvStoreConfig {
        n_blocks,
        block_size: BS,
        n_state_slots,
        lease_ttl: TTL,
        max_leases: 4,
        block_bytes: 1000,
        state_slot_bytes: 300,
        state_required,
    }
}

fn store(n_blocks: usize) -> KvStore {
    KvStore::new(config(n_blocks, 0, false)).unwrap()
}

fn hybrid_store(n_blocks: usize, n_states: usize) -> KvStore {
    KvStore::new(config(n_blocks, n_states, true)).unwrap()
}

fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}

#[track_caller]
fn check(s: &KvStore) -> KvStats {
    s.audit().unwrap();
    let st = s.stats();
    assert_eq!(st.free + st.cached + st.in_use + st.leased, st.total_blocks);
    assert_eq!(
        st.state_slots_free + st.state_slots_cached + st.state_slots_used + st.state_slots_leased,
        st.state_slots_total
    );
    st
}

/// Runs `tokens` as a finished sequence: allocate, cache its full blocks, release.
fn cache_sequence(s: &mut KvStore, tokens: &[u32], now: Instant) -> Vec<BlockId> {
    let blocks = s.allocate(tokens.len().div_ceil(BS)).unwrap();
    s.insert_prefix(tokens, &blocks, None, now).unwrap();
    s.release(&blocks).unwrap();
    blocks
}

#[test]
fn rejects_bad_configs() {
    let mut c = config(4, 0, false);
    c.block_size = 0;
    assert!(matches!(KvStore::new(c), Err(KvError::InvalidConfig(_))));
    let mut c = config(4, 0, false);
    c.max_leases = 0;
    assert!(matches!(KvStore::new(c), Err(KvError::InvalidConfig(_))));
    assert!(matches!(
        KvStore::new(config(4, 0, true)),
        Err(KvError::InvalidConfig(_))
    ));
}

#[test]
fn allocation_and_free_accounting() {
    let mut s = store(8);
    assert_eq!(check(&s).free, 8);
    let a = s.allocate(3).unwrap();
    let b = s.allocate(5).unwrap();
    let st = check(&s);
    assert_eq!((st.free, st.in_use), (0, 8));
    assert_eq!(st.bytes_used, 8 * 1000);
    let mut all: Vec<_> = a.iter().chain(&b).copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 8, "no block handed out twice");

    assert_eq!(
        s.allocate(1),
        Err(KvError::OutOfBlocks { needed: 1, free: 0 })
    );
    s.release(&a).unwrap();
    let st = check(&s);
    assert_eq!((st.free, st.in_use, st.bytes_used), (3, 5, 5000));
    // A failed allocation changes nothing.
    assert_eq!(
        s.allocate(4),
        Err(KvError::OutOfBlocks { needed: 4, free: 3 })
    );
    assert_eq!(check(&s).free, 3);
    assert_eq!(s.allocate(0).unwrap(), vec![]);
}

#[test]
fn refcounts() {
    let mut s = store(4);
    let a = s.allocate(2).unwrap();
    s.retain(&a).unwrap();
    s.retain(&[a[0]]).unwrap();
    assert_eq!(s.block_state(a[0]), Some(BlockState::InUse { refcount: 3 }));
    s.release(&a).unwrap();
    assert_eq!(s.block_state(a[1]), Some(BlockState::InUse { refcount: 1 }));
    // Releasing more references than held fails as a whole and changes nothing.
    assert_eq!(s.release(&[a[1], a[1]]), Err(KvError::BlockNotHeld(a[1])));
    assert_eq!(s.block_state(a[1]), Some(BlockState::InUse { refcount: 1 }));
    s.release(&[a[0], a[0], a[1]]).unwrap();
    assert_eq!(s.block_state(a[0]), Some(BlockState::Free));
    assert_eq!(check(&s).free, 4);
    // Free blocks cannot be retained or released; unknown ids are reported.
    assert_eq!(s.retain(&[a[0]]), Err(KvError::BlockNotHeld(a[0])));
    assert_eq!(s.release(&[a[0]]), Err(KvError::BlockNotHeld(a[0])));
    assert_eq!(
        s.retain(&[BlockId(99)]),
        Err(KvError::InvalidBlock(BlockId(99)))
    );
    assert_eq!(s.block_state(BlockId(99)), None);
    check(&s);
}

#[test]
fn prefix_hits_partial_exact_and_miss() {
    let t0 = Instant::now();
    let mut s = store(16);
    let prompt = toks(0..14); // 3 full blocks + 2 tokens
    let blocks = s.allocate(4).unwrap();
    let ins = s.insert_prefix(&prompt, &blocks, None, t0).unwrap();
    assert_eq!(ins.blocks_cached, 3);
    s.release(&blocks).unwrap();
    let st = check(&s);
    assert_eq!((st.cached, st.free), (3, 13), "partial tail block is freed");

    // Exact: all three full blocks.
    let hit = s.lookup_prefix(&prompt, t0);
    assert_eq!(hit.blocks, blocks[..3]);
    assert_eq!(hit.n_tokens, 12);
    assert_eq!(hit.state, None);
    assert_eq!(
        s.block_state(blocks[0]),
        Some(BlockState::InUse { refcount: 1 })
    );
    s.release(&hit.blocks).unwrap();

    // Partial: shares the first two blocks, diverges in the third.
    let mut other = toks(0..20);
    other[9] = 777;
    let hit = s.lookup_prefix(&other, t0);
    assert_eq!(hit.blocks, blocks[..2]);
    assert_eq!(hit.n_tokens, 8);
    s.release(&hit.blocks).unwrap();

    // Divergence in the first block: a miss, even though later blocks match token for token.
    let mut first = prompt.clone();
    first[0] = 777;
    assert_eq!(s.lookup_prefix(&first, t0), PrefixHit::default());
    // Shorter than one block: a miss.
    assert_eq!(s.lookup_prefix(&prompt[..3], t0), PrefixHit::default());

    let st = check(&s);
    assert_eq!(st.prefix_lookups_total, 4);
    assert_eq!(st.prefix_hits_total, 2);
    assert_eq!(st.prefix_hit_tokens_total, 20);
    assert_eq!(st.cached, 3);
}

#[test]
fn shared_prefix_blocks_are_refcounted_across_sequences() {
    let t0 = Instant::now();
    let mut s = store(8);
    let prompt = toks(0..8);
    let a = s.allocate(2).unwrap();
    s.insert_prefix(&prompt, &a, None, t0).unwrap();
    // A second sequence hits while the first still holds the blocks.
    let hit = s.lookup_prefix(&prompt, t0);
    assert_eq!(hit.blocks, a);
    assert_eq!(s.block_state(a[0]), Some(BlockState::InUse { refcount: 2 }));
    s.release(&a).unwrap();
    assert_eq!(s.block_state(a[0]), Some(BlockState::InUse { refcount: 1 }));
    s.release(&hit.blocks).unwrap();
    assert_eq!(s.block_state(a[0]), Some(BlockState::Cached));

    // The same prefix computed again in other blocks: the cache keeps the first copy, the new
    // blocks are freed on release.
    let b = s.allocate(2).unwrap();
    let ins = s.insert_prefix(&prompt, &b, None, t0).unwrap();
    assert_eq!(ins.blocks_cached, 0);
    s.release(&b).unwrap();
    assert_eq!(s.block_state(b[0]), Some(BlockState::Free));
    let st = check(&s);
    assert_eq!((st.cached, st.free), (2, 6));
}

#[test]
fn insert_prefix_validates_before_changing_anything() {
    let t0 = Instant::now();
    let mut s = hybrid_store(8, 2);
    let prompt = toks(0..8);
    let a = s.allocate(2).unwrap();
    assert_eq!(
        s.insert_prefix(&prompt, &a[..1], None, t0),
        Err(KvError::TooFewBlocks {
            n_tokens: 8,
            needed: 2,
            got: 1
        })
    );
    assert_eq!(
        s.insert_prefix(&prompt, &[a[0], a[0]], None, t0),
        Err(KvError::DuplicateBlock(a[0]))
    );
    let free_block = BlockId(7);
    assert_eq!(s.block_state(free_block), Some(BlockState::Free));
    assert_eq!(
        s.insert_prefix(&prompt, &[a[0], free_block], None, t0),
        Err(KvError::BlockNotHeld(free_block))
    );
    let st = s.allocate_state().unwrap();
    assert_eq!(
        s.insert_prefix(&prompt[..6], &a, Some(st), t0),
        Err(KvError::StateNotBlockAligned {
            n_tokens: 6,
            block_size: BS
        })
    );
    assert_eq!(
        s.insert_prefix(&[], &[], Some(st), t0),
        Err(KvError::StateNotBlockAligned {
            n_tokens: 0,
            block_size: BS
        })
    );
    assert_eq!(check(&s).cached, 0);
    assert_eq!(
        s.state_slot_state(st),
        Some(BlockState::InUse { refcount: 1 })
    );

    s.insert_prefix(&prompt, &a, Some(st), t0).unwrap();
    // Block 0 now belongs to prefix 0..4; caching it under another prefix is refused.
    let other = toks(100..108);
    assert_eq!(
        s.insert_prefix(&other, &a, None, t0),
        Err(KvError::BlockHashConflict(a[0]))
    );
    check(&s);
}

#[test]
fn eviction_is_lru_and_spares_held_and_leased_blocks() {
    let t0 = Instant::now();
    let t = |s| t0 + Duration::from_secs(s);
    let mut s = store(6);
    let a = cache_sequence(&mut s, &toks(0..4), t(1));
    let b = cache_sequence(&mut s, &toks(10..14), t(2));
    let c = cache_sequence(&mut s, &toks(20..24), t(3));
    // Touch `a` again: now `b` is the least recently used.
    let hit = s.lookup_prefix(&toks(0..4), t(4));
    s.release(&hit.blocks).unwrap();
    assert_eq!(check(&s).cached, 3);

    // A held cached block (refcount > 0) and a leased block are never evicted.
    let held = s.lookup_prefix(&toks(20..24), t(5));
    assert_eq!(held.blocks, c);
    let lease = s.lease(1, false, t(5)).unwrap();
    let st = check(&s);
    assert_eq!((st.free, st.cached, st.in_use, st.leased), (2, 2, 1, 1));

    // Needs 3: the two free ones, then evicts the LRU cached block (b, not a).
    let x = s.allocate(3).unwrap();
    assert!(x.contains(&b[0]));
    assert_eq!(s.block_state(a[0]), Some(BlockState::Cached));
    assert_eq!(s.lookup_prefix(&toks(10..14), t(6)), PrefixHit::default());
    assert_eq!(check(&s).evictions_total, 1);

    // Needs 1 more: only `a` is evictable.
    let y = s.allocate(1).unwrap();
    assert_eq!(y, a);
    // Nothing else may go: c is held, the lease is leased, x/y are in use.
    assert_eq!(
        s.allocate(1),
        Err(KvError::OutOfBlocks { needed: 1, free: 0 })
    );
    assert_eq!(s.block_state(c[0]), Some(BlockState::InUse { refcount: 1 }));
    assert_eq!(
        s.block_state(lease.blocks[0]),
        Some(BlockState::Leased(lease.id))
    );
    let st = check(&s);
    assert_eq!(st.evictions_total, 2);
    assert_eq!((st.in_use, st.leased), (5, 1));
}

#[test]
fn eviction_trims_chains_from_the_leaves() {
    let t0 = Instant::now();
    let mut s = store(4);
    let chain = cache_sequence(&mut s, &toks(0..12), t0); // 3 blocks cached at the same instant
    let x = s.allocate(2).unwrap(); // 1 free + 1 evicted
    assert!(x.contains(&chain[2]), "deepest block goes first");
    let hit = s.lookup_prefix(&toks(0..12), t0);
    assert_eq!(
        hit.blocks,
        chain[..2],
        "the rest of the chain is still reachable"
    );
    s.release(&hit.blocks).unwrap();
    check(&s);
}

#[test]
fn leases_commit_cancel_and_expire() {
    let t0 = Instant::now();
    let mut s = hybrid_store(10, 2);

    let l1 = s.lease(3, true, t0).unwrap();
    assert_eq!(l1.blocks.len(), 3);
    assert_eq!(l1.expires_at, t0 + TTL);
    let st = check(&s);
    assert_eq!(
        (st.leased, st.state_slots_leased, st.leases_active),
        (3, 1, 1)
    );
    assert_eq!(st.bytes_used, 3 * 1000 + 300);
    // Leased blocks cannot be retained or released by anyone.
    assert_eq!(
        s.retain(&l1.blocks[..1]),
        Err(KvError::BlockNotHeld(l1.blocks[0]))
    );
    assert_eq!(
        s.release(&l1.blocks[..1]),
        Err(KvError::BlockNotHeld(l1.blocks[0]))
    );
    let state = l1.state.unwrap();
    assert_eq!(
        s.release_state(state),
        Err(KvError::StateSlotNotHeld(state))
    );

    let (blocks, state) = s.commit(l1.id).unwrap();
    assert_eq!(blocks, l1.blocks);
    assert_eq!(state, l1.state);
    assert_eq!(
        s.block_state(blocks[0]),
        Some(BlockState::InUse { refcount: 1 })
    );
    assert_eq!(s.commit(l1.id), Err(KvError::UnknownLease(l1.id)));
    assert_eq!(s.cancel(l1.id), Err(KvError::UnknownLease(l1.id)));

    let l2 = s.lease(2, false, t0).unwrap();
    s.cancel(l2.id).unwrap();
    assert_eq!(s.block_state(l2.blocks[0]), Some(BlockState::Free));

    // Two leases; one makes progress and is extended; only the other expires.
    let l3 = s.lease(2, true, t0).unwrap();
    let l4 = s.lease(2, false, t0 + Duration::from_secs(1)).unwrap();
    assert_eq!(s.next_deadline(), Some(t0 + TTL));
    assert_eq!(
        s.extend_lease(l3.id, t0 + Duration::from_secs(4)).unwrap(),
        t0 + Duration::from_secs(9)
    );
    assert!(s.expire(t0 + Duration::from_secs(5)).is_empty());
    assert_eq!(s.expire(t0 + Duration::from_secs(6)), vec![l4.id]);
    assert_eq!(s.expire(t0 + Duration::from_secs(100)), vec![l3.id]);
    let st = check(&s);
    assert_eq!(
        (st.leased, st.state_slots_leased, st.leases_active),
        (0, 0, 0)
    );
    assert_eq!(st.leases_expired_total, 2);
    assert_eq!(s.next_deadline(), None);

    // Release the committed transfer: nothing stranded.
    s.release(&blocks).unwrap();
    s.release_state(state.unwrap()).unwrap();
    let st = check(&s);
    assert_eq!((st.free, st.state_slots_free, st.bytes_used), (10, 2, 0));
}

#[test]
fn leases_are_bounded_and_all_or_nothing() {
    let t0 = Instant::now();
    let mut s = hybrid_store(10, 1);
    let _held_state = s.allocate_state().unwrap();
    // Not enough state slots: no blocks are taken either.
    assert_eq!(
        s.lease(2, true, t0),
        Err(KvError::OutOfStateSlots { needed: 1, free: 0 })
    );
    assert_eq!(
        s.lease(11, false, t0),
        Err(KvError::OutOfBlocks {
            needed: 11,
            free: 10
        })
    );
    assert_eq!(check(&s).free, 10);
    for _ in 0..4 {
        s.lease(1, false, t0).unwrap();
    }
    assert_eq!(
        s.lease(1, false, t0),
        Err(KvError::TooManyLeases { max: 4 })
    );
    assert_eq!(s.expire(t0 + TTL).len(), 4);
    assert_eq!(check(&s).free, 10);
}

#[test]
fn hybrid_state_is_exact_match_only() {
    let t0 = Instant::now();
    let mut s = hybrid_store(16, 4);
    let prompt = toks(0..12); // 3 blocks

    // Blocks cached but no state: useless for a hybrid model.
    let blocks = s.allocate(3).unwrap();
    s.insert_prefix(&prompt, &blocks, None, t0).unwrap();
    assert_eq!(s.lookup_prefix(&prompt, t0), PrefixHit::default());

    // Snapshot the state after 8 tokens (2 blocks).
    let snap8 = s.allocate_state().unwrap();
    let ins = s
        .insert_prefix(&prompt[..8], &blocks, Some(snap8), t0)
        .unwrap();
    assert!(ins.state_cached);
    assert_eq!(ins.blocks_cached, 0, "blocks were cached already");
    assert_eq!(s.state_slot_state(snap8), Some(BlockState::Cached));

    // The full prompt matches 3 blocks, but the state only exists after 2: the hit is cut back.
    let hit = s.lookup_prefix(&prompt, t0);
    assert_eq!(hit.blocks, blocks[..2]);
    assert_eq!(hit.n_tokens, 8);
    assert_eq!(hit.state, Some(snap8));
    assert_eq!(
        s.state_slot_state(snap8),
        Some(BlockState::InUse { refcount: 1 })
    );
    s.release(&hit.blocks).unwrap();
    s.release_state(snap8).unwrap();

    // A state after all 12 tokens gives the longer hit.
    let snap12 = s.allocate_state().unwrap();
    s.insert_prefix(&prompt, &blocks, Some(snap12), t0).unwrap();
    let hit = s.lookup_prefix(&toks(0..15), t0);
    assert_eq!((hit.n_tokens, hit.state), (12, Some(snap12)));
    s.release(&hit.blocks).unwrap();
    s.release_state(snap12).unwrap();

    // An equal state inserted again is released, not cached twice.
    let dup = s.allocate_state().unwrap();
    let ins = s.insert_prefix(&prompt, &blocks, Some(dup), t0).unwrap();
    assert!(!ins.state_cached);
    assert_eq!(s.state_slot_state(dup), Some(BlockState::Free));
    // A cached state cannot be given to the cache again.
    assert_eq!(
        s.insert_prefix(&prompt, &blocks, Some(snap12), t0),
        Err(KvError::StateSlotNotHeld(snap12))
    );

    s.release(&blocks).unwrap();
    let st = check(&s);
    assert_eq!((st.cached, st.state_slots_cached), (3, 2));
}

#[test]
fn state_slots_evict_lru_cached_states() {
    let t0 = Instant::now();
    let t = |s| t0 + Duration::from_secs(s);
    let mut s = hybrid_store(8, 2);
    let mut cached = Vec::new();
    for (i, start) in [0u32, 100].into_iter().enumerate() {
        let tokens = toks(start..start + 4);
        let b = s.allocate(1).unwrap();
        let snap = s.allocate_state().unwrap();
        s.insert_prefix(&tokens, &b, Some(snap), t(i as u64))
            .unwrap();
        s.release(&b).unwrap();
        cached.push((tokens, snap));
    }
    assert_eq!(check(&s).state_slots_cached, 2);
    // Both slots cached: allocating evicts the older state, whose prefix then misses.
    let live = s.allocate_state().unwrap();
    assert_eq!(live, cached[0].1);
    assert_eq!(s.lookup_prefix(&cached[0].0, t(5)), PrefixHit::default());
    let hit = s.lookup_prefix(&cached[1].0, t(5));
    assert_eq!(hit.state, Some(cached[1].1));
    // The other slot is now held by the hit: nothing left to allocate.
    assert_eq!(
        s.allocate_state(),
        Err(KvError::OutOfStateSlots { needed: 1, free: 0 })
    );
    let st = check(&s);
    assert_eq!(st.state_evictions_total, 1);
    assert_eq!(
        s.release_state(StateSlot(9)),
        Err(KvError::InvalidStateSlot(StateSlot(9)))
    );
}

#[test]
fn cached_prefix_queries_do_not_retain() {
    let t0 = Instant::now();
    let mut s = hybrid_store(8, 2);
    let prompt = toks(0..12);
    let blocks = s.allocate(3).unwrap();
    let snap = s.allocate_state().unwrap();
    s.insert_prefix(&prompt[..8], &blocks, Some(snap), t0)
        .unwrap();
    s.insert_prefix(&prompt, &blocks, None, t0).unwrap();
    s.release(&blocks).unwrap();
    let before = check(&s);

    let hashes = block_hashes(&prompt, BS);
    // Three blocks cached, but the state only after two: two usable.
    assert_eq!(s.cached_prefix_blocks(&hashes), 2);
    assert_eq!(
        s.cached_prefix_blocks(&hashes[..1]),
        0,
        "no state after one block"
    );
    assert_eq!(s.cached_prefix_blocks(&block_hashes(&toks(50..62), BS)), 0);
    let mut adv: Vec<_> = s.cached_block_hashes().copied().collect();
    adv.sort();
    let mut want = hashes.clone();
    want.sort();
    assert_eq!(adv, want);
    assert_eq!(check(&s), before, "queries change nothing");

    let mut dense = store(8);
    cache_sequence(&mut dense, &prompt, t0);
    assert_eq!(dense.cached_prefix_blocks(&hashes), 3);
    let mut other = prompt.clone();
    other[5] = 99;
    assert_eq!(dense.cached_prefix_blocks(&block_hashes(&other, BS)), 1);
}
