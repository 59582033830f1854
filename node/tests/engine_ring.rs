//! The sliding-window ring (see `engine.rs`'s module docs) on a small synthetic model shaped like
//! Gemma 3 (sliding-window layers with a few global ones, no linear layers; always run, cpu
//! backend): ring blocks out of every window are freed during prefill and decode, the tokens are
//! those of an engine that keeps every block, remote prefill (export → import, either way
//! between ring and no-ring engines) is token-identical to local, the prefix cache reuses a
//! prefix only where the ring still holds its window, and nothing is stranded.

use std::sync::Arc;

use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::Backend;
use prfaas_node::engine::config::LayerKind;
use prfaas_node::engine::sampler::argmax;
use prfaas_node::engine::synthetic::{synthetic_model, SyntheticKind, DEFAULT_SEED};
use prfaas_node::engine::{
    CollectSink, Engine, EngineConfig, Model, NullSink, Sampler, SamplingParams, SeqId,
};

/// Sliding window of the test model: two blocks of 16.
const WINDOW: usize = 32;

/// tiny-dense with Gemma 3's pattern: every third layer global, the others sliding-window.
fn engine(cfg: EngineConfig) -> Engine {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let (mut config, weights) = synthetic_model(SyntheticKind::TinyDense, DEFAULT_SEED);
    for (i, l) in config.layers.iter_mut().enumerate() {
        if i % 3 != 2 {
            *l = LayerKind::Sliding { window: WINDOW };
        }
    }
    assert!(config.layers.contains(&LayerKind::Full));
    let model = Model::new(config, &weights, backend).expect("model uploads");
    Engine::new(model, cfg).expect("engine")
}

fn cfg(ring: bool) -> EngineConfig {
    EngineConfig {
        prefill_chunk: 32,
        window_ring: ring,
        ..EngineConfig::with_capacity(1024)
    }
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 32 + (i * 7 + salt * 13 + i * i) % 90)
        .collect()
}

fn continue_greedy(e: &mut Engine, seq: SeqId, first: u32, n: usize) -> Vec<u32> {
    let mut s = Sampler::new(SamplingParams::greedy(n));
    s.accept(first);
    e.continue_decode(seq, first, &mut s, &mut |_| {})
        .expect("decode")
        .0
}

/// `n` greedy decode steps from `first`; the tokens and the most ring blocks held after a step.
fn decode_n(e: &mut Engine, seq: SeqId, first: u32, n: usize) -> (Vec<u32>, usize) {
    let mut s = Sampler::new(SamplingParams::greedy(n + 1));
    s.accept(first);
    let (mut toks, mut peak, mut next) = (Vec::new(), 0, first);
    for _ in 0..n {
        let logits = e.decode_step(&[(seq, next)]).unwrap();
        next = e.sample(&logits, &mut [&mut s]).unwrap()[0];
        toks.push(next);
        peak = peak.max(e.ring_kv_stats().map_or(0, |r| r.in_use));
    }
    (toks, peak)
}

/// Ring blocks held by live sequences.
fn ring_in_use(e: &Engine) -> usize {
    e.ring_kv_stats().expect("this model has a ring").in_use
}

#[test]
fn ring_frees_blocks_out_of_every_window_and_keeps_the_tokens() {
    let p = prompt(300, 1);
    let mut ring = engine(cfg(true));
    let mut full = engine(cfg(false));
    assert!(full.ring_kv_stats().is_none());
    let (a, b) = (
        ring.prefill(&p, &mut NullSink).unwrap(),
        full.prefill(&p, &mut NullSink).unwrap(),
    );
    assert_eq!(
        a.logits, b.logits,
        "the ring changes where KV lives, not what"
    );
    // 300 tokens are 19 blocks; the windows need the last 2-3 of them (+1 kept for the prefix
    // cache's lookup), whatever the prompt length.
    let shared = ring.kv_stats().in_use;
    assert_eq!(shared, 19);
    let held = ring_in_use(&ring);
    assert!(
        held <= WINDOW / 16 + 2,
        "{held} ring blocks held after prefill"
    );
    let first = argmax(&a.logits);
    let (toks, peak) = decode_n(&mut ring, a.seq, first, 60);
    assert!(
        peak <= WINDOW / 16 + 3,
        "{peak} ring blocks held while decoding"
    );
    assert_eq!(decode_n(&mut full, b.seq, first, 60).0, toks);
    ring.release(a.seq).unwrap();
    full.release(b.seq).unwrap();
    assert_eq!(ring_in_use(&ring), 0);
    assert_eq!(ring.kv_stats().in_use, 0);
}

#[test]
fn ring_remote_prefill_is_token_identical_either_way() {
    for (from_ring, to_ring) in [(true, true), (true, false), (false, true)] {
        let p = prompt(150, 2);
        let mut a = engine(EngineConfig {
            prefill_chunk: 16,
            ..cfg(from_ring)
        });
        let mut sink = CollectSink::default();
        let pre = a.prefill(&p, &mut sink).unwrap();
        let first = argmax(&pre.logits);
        let export = a.export_kv(pre.seq).unwrap();
        // What is sent: the whole prompt for global layers, the windows' blocks for the others.
        let sent: usize = sink.pieces.iter().map(|x| x.kv.len()).sum();
        let exported: usize = export.layers.iter().map(|l| l.len()).sum();
        assert_eq!(sent, exported, "streamed pieces == export");
        assert_eq!(a.layout().layout_hash([0; 32]), {
            let b = engine(cfg(to_ring));
            b.layout().layout_hash([0; 32])
        });
        let local = continue_greedy(&mut a, pre.seq, first, 20);
        let mut b = engine(cfg(to_ring));
        let seq = b.import_kv(&export).unwrap();
        assert_eq!(
            continue_greedy(&mut b, seq, first, 20),
            local,
            "ring {from_ring} → ring {to_ring}"
        );
        // Streamed pieces, imported one by one, give the same.
        let mut c = engine(cfg(to_ring));
        let lease = c
            .begin_import(p.clone(), std::time::Instant::now())
            .unwrap();
        for piece in &sink.pieces {
            c.import_piece(lease, piece, std::time::Instant::now())
                .unwrap();
        }
        let seq = c.finish_import(lease).unwrap();
        assert_eq!(continue_greedy(&mut c, seq, first, 20), local);
        c.release(seq).unwrap();
        if to_ring {
            assert_eq!(ring_in_use(&c), 0);
        }
    }
}

#[test]
fn ring_prefix_cache_reuses_only_where_the_window_is_cached() {
    let p = prompt(150, 3);
    let mut e = engine(cfg(true));
    let cold = e.prefill(&p, &mut NullSink).unwrap();
    assert_eq!(cold.cached_tokens, 0);
    e.release(cold.seq).unwrap();
    // The same prompt again: all 9 full blocks before the last token, with their window.
    let warm = e.prefill(&p, &mut NullSink).unwrap();
    assert_eq!(warm.cached_tokens, 144);
    let d = warm
        .logits
        .iter()
        .zip(&cold.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d < 2e-2, "prefix hit logits differ by {d}");
    e.release(warm.seq).unwrap();
    // A longer prompt sharing the first 150 tokens reuses up to 144 of them.
    let mut q = p.clone();
    q.extend(prompt(100, 4));
    let ext = e.prefill(&q, &mut NullSink).unwrap();
    assert_eq!(ext.cached_tokens, 144);
    let mut fresh = engine(cfg(true));
    let want = fresh.prefill(&q, &mut NullSink).unwrap();
    assert_eq!(argmax(&ext.logits), argmax(&want.logits));
    e.release(ext.seq).unwrap();
    // A prompt sharing only the first 100 tokens: the shared blocks of 96 are cached, but the
    // window before token 96 fell out of the ring long ago: no reuse.
    let mut r = p[..100].to_vec();
    r.extend(prompt(60, 5));
    let short = e.prefill(&r, &mut NullSink).unwrap();
    assert_eq!(short.cached_tokens, 0, "a prefix whose window is gone");
    let want = fresh.prefill(&r, &mut NullSink).unwrap();
    assert_eq!(short.logits, want.logits);
    e.release(short.seq).unwrap();
    assert_eq!(ring_in_use(&e), 0);
}

#[test]
fn ring_imports_free_their_leases_on_cancel_and_expiry() {
    let p = prompt(120, 6);
    let mut a = engine(cfg(true));
    let pre = a.prefill(&p, &mut NullSink).unwrap();
    let export = a.export_kv(pre.seq).unwrap();
    let mut b = engine(cfg(true));
    let t0 = std::time::Instant::now();
    let lease = b.begin_import(p.clone(), t0).unwrap();
    assert!(b.ring_kv_stats().unwrap().leased > 0);
    b.cancel_import(lease);
    assert_eq!(b.ring_kv_stats().unwrap().leased, 0);
    let lease = b.begin_import(p.clone(), t0).unwrap();
    let piece = export.pieces().next().unwrap();
    b.import_piece(lease, &piece, t0).unwrap();
    let expired = b.expire_imports(t0 + std::time::Duration::from_secs(3600));
    assert_eq!(expired, vec![lease]);
    let (shared, ring) = (b.kv_stats(), b.ring_kv_stats().unwrap());
    assert_eq!((shared.leased, ring.leased), (0, 0));
    assert_eq!((shared.in_use, ring.in_use), (0, 0));
}

/// Verified remote prefill (DESIGN.md §8) reads and recomputes sliding-window layers in the ring:
/// an honest import passes, one whose last sliding-window rows were altered fails and leaves
/// nothing held.
#[test]
fn ring_verified_import_passes_honest_kv_and_catches_altered_kv() {
    use prfaas_node::engine::{LayerKv, VerifyConfig};
    let p = prompt(130, 7);
    let mut a = engine(cfg(true));
    let pre = a.prefill(&p, &mut NullSink).unwrap();
    let export = a.export_kv(pre.seq).unwrap();
    for altered in [false, true] {
        let mut export = export.clone();
        if altered {
            // Layer 0 is a sliding-window layer: scale the K of its last row.
            let LayerKv::Paged { k, .. } = &mut export.layers[0] else {
                panic!("layer 0 is paged");
            };
            let row = k.len() / export.layout.transfer_rows(0, p.len()).len();
            let n = k.len();
            k[n - row..].iter_mut().for_each(|x| *x = *x * 3.0 + 1.0);
        }
        let mut b = engine(cfg(true));
        let lease = b
            .begin_import(p.clone(), std::time::Instant::now())
            .unwrap();
        for piece in export.pieces() {
            b.import_piece(lease, &piece, std::time::Instant::now())
                .unwrap();
        }
        let r = b.finish_verified_import(lease, &pre.logits, &VerifyConfig::default());
        match (altered, r) {
            (false, Ok((seq, report))) => {
                assert!(report.passed(), "{report:?}");
                b.release(seq).unwrap();
            }
            (true, Err(e)) => eprintln!("altered ring KV refused: {e}"),
            (altered, r) => panic!("altered {altered}: {r:?}"),
        }
        assert_eq!((b.kv_stats().in_use, ring_in_use(&b)), (0, 0));
        assert_eq!(b.ring_kv_stats().unwrap().leased, 0);
    }
}
