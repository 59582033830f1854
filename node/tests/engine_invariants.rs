//! Engine invariants on the synthetic models (always run, cpu backend):
//! (2) export after prefill + import into a fresh engine continues token-identically,
//! (3) prefix-cache hit + incremental prefill equals a cold prefill,
//! plus chunked == one-shot prefill, continuous batching == one-at-a-time, and nothing stranded.

use std::sync::Arc;

use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::Backend;
use prfaas_node::engine::synthetic::{synthetic_model, SyntheticKind, DEFAULT_SEED};
use prfaas_node::engine::{
    CollectSink, Engine, EngineConfig, EngineError, KvPiece, LayerKv, Model, NullSink, Sampler,
    SamplingParams,
};
use prfaas_node::kv::KvDType;

const KINDS: [SyntheticKind; 2] = [SyntheticKind::TinyDense, SyntheticKind::TinyHybrid];

fn engine(kind: SyntheticKind, cfg: EngineConfig) -> Engine {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let (config, weights) = synthetic_model(kind, DEFAULT_SEED);
    let model = Model::new(config, &weights, backend).expect("synthetic model uploads");
    Engine::new(model, cfg).expect("engine")
}

fn cfg() -> EngineConfig {
    EngineConfig {
        prefill_chunk: 32,
        ..EngineConfig::with_capacity(1024)
    }
}

/// A deterministic "text" prompt of `n` byte tokens.
fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 32 + (i * 7 + salt * 13 + i * i) % 90)
        .collect()
}

/// Logit tolerance between two ways of computing the same prefill (chunked vs one-shot, prefix
/// hit vs cold). Different chunkings differ in the last bits of f32; f16 KV rounds those to
/// different f16 neighbours now and then (a 2⁻¹¹ relative step), which moves logits by up to a
/// few thousandths on the synthetic models. The exact invariant (remote == local) holds for both.
const DTYPES_AND_TOLERANCES: [(KvDType, f32); 2] = [(KvDType::F32, 1e-3), (KvDType::F16, 2e-2)];

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Greedy continuation of a live sequence whose next input is `first`.
fn continue_greedy(
    e: &mut Engine,
    seq: prfaas_node::engine::SeqId,
    first: u32,
    n: usize,
) -> Vec<u32> {
    let mut s = Sampler::new(SamplingParams::greedy(n));
    s.accept(first);
    let (toks, _) = e
        .continue_decode(seq, first, &mut s, &mut |_| {})
        .expect("decode");
    toks
}

#[test]
fn engine_greedy_output_is_not_degenerate() {
    for kind in KINDS {
        let mut e = engine(kind, cfg());
        let g = e
            .generate(&prompt(40, 1), &SamplingParams::greedy(24), &mut |_| {})
            .unwrap();
        let distinct: std::collections::HashSet<_> = g.tokens.iter().collect();
        assert_eq!(g.tokens.len(), 24);
        assert!(
            distinct.len() >= 3,
            "{kind:?} greedy output collapsed: {:?}",
            g.tokens
        );
    }
}

/// Concatenates a layer's paged pieces (in the order given) into one export-layout layer.
fn join_pieces(pieces: &[&KvPiece]) -> LayerKv {
    match &pieces[0].kv {
        LayerKv::State { .. } => pieces[0].kv.clone(),
        LayerKv::Paged { .. } => {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for p in pieces {
                let LayerKv::Paged { k: pk, v: pv } = &p.kv else {
                    panic!("mixed piece kinds in one layer");
                };
                k.extend_from_slice(pk);
                v.extend_from_slice(pv);
            }
            LayerKv::Paged { k, v }
        }
    }
}

#[test]
fn engine_streams_every_chunk_and_import_continues_token_identically() {
    for kind in KINDS {
        // 45 tokens: not a multiple of the block size (16), longer than tiny-hybrid's sliding
        // window; chunks of 16 tokens, so the KV leaves in three pieces per paged layer.
        let p = prompt(45, 2);
        let chunked = EngineConfig {
            prefill_chunk: 16,
            ..cfg()
        };
        let mut a = engine(kind, chunked);
        let mut sink = CollectSink::default();
        let pre = a.prefill(&p, &mut sink).unwrap();
        let first = prfaas_node::engine::sampler::argmax(&pre.logits);
        let export = a.export_kv(pre.seq).unwrap();
        assert_eq!(export.tokens, p);
        assert_eq!(export.size_bytes(), a.layout().export_bytes(p.len()));

        // Per layer, the pieces come in token order, each ends on a block boundary (or at the
        // end), they cover exactly what the layer exports, and together equal the export.
        let layout = a.layout().clone();
        for (l, ex) in export.layers.iter().enumerate() {
            let mine: Vec<&KvPiece> = sink.pieces.iter().filter(|x| x.layer == l).collect();
            if layout.layers[l].is_paged() {
                let span = layout.transfer_rows(l, p.len());
                assert_eq!(mine.first().unwrap().tokens.start, span.start, "layer {l}");
                assert_eq!(mine.last().unwrap().tokens.end, span.end, "layer {l}");
                for w in mine.windows(2) {
                    assert_eq!(
                        w[0].tokens.end, w[1].tokens.start,
                        "layer {l}: gap or overlap"
                    );
                }
                if span.start == 0 {
                    assert_eq!(mine.len(), 3, "{kind:?} layer {l}: one piece per chunk");
                } else {
                    assert!(span.len() < p.len(), "a window trims what is sent");
                }
            } else {
                assert_eq!(mine.len(), 1, "a state layer sends one piece");
                assert_eq!(mine[0].tokens, 0..p.len());
            }
            assert_eq!(&join_pieces(&mine), ex, "{kind:?} layer {l}");
            // Byte round trip of the documented layout.
            for piece in &mine {
                let bytes = piece.kv.to_le_bytes(layout.dtype);
                assert_eq!(bytes.len(), layout.piece_bytes(l, piece.tokens.len()));
                let back = LayerKv::from_le_bytes(&layout, l, piece.tokens.len(), &bytes).unwrap();
                assert_eq!(&back, &piece.kv);
            }
        }
        // Every piece but the last layer's last one was handed out before the compute ended.
        let last = sink.pieces.last().unwrap();
        assert!(last.layer == layout.layers.len() - 1 || !layout.layers[last.layer].is_paged());

        let local = continue_greedy(&mut a, pre.seq, first, 12);

        // Import the export into a fresh engine (the remote-prefill path) …
        let mut b = engine(kind, cfg());
        let seq_b = b.import_kv(&export).unwrap();
        assert_eq!(b.seq_len(seq_b).unwrap(), p.len());
        let remote = continue_greedy(&mut b, seq_b, first, 12);
        assert_eq!(local, remote, "{kind:?}: imported KV diverged");

        // … and the streamed pieces, in reverse arrival order (the wire may reorder them).
        let mut c = engine(kind, cfg());
        let t0 = std::time::Instant::now();
        let id = c.begin_import(p.clone(), t0).unwrap();
        for piece in sink.pieces.iter().rev() {
            c.import_piece(id, piece, t0).unwrap();
        }
        let seq_c = c.finish_import(id).unwrap();
        assert_eq!(continue_greedy(&mut c, seq_c, first, 12), local);
    }
}

/// KV dtypes: f16 is the default; f16 KV shipped as bytes (the wire form) and imported
/// continues token-identically to the engine that prefilled it; `f32` still works the same way;
/// f16 exports are half the paged bytes of f32 ones (state stays f32); and the two dtypes never
/// exchange KV (the layout hash differs).
#[test]
fn engine_kv_dtypes_wire_round_trip_and_f32_still_works() {
    assert_eq!(cfg().kv_dtype, KvDType::F16, "f16 is the default");
    for kind in KINDS {
        let p = prompt(45, 5);
        let mut exports = Vec::new();
        for dtype in [KvDType::F16, KvDType::F32] {
            let c = EngineConfig {
                kv_dtype: dtype,
                ..cfg()
            };
            let mut a = engine(kind, c.clone());
            assert_eq!(a.layout().dtype, dtype);
            let pre = a.prefill(&p, &mut NullSink).unwrap();
            let first = prfaas_node::engine::sampler::argmax(&pre.logits);
            let export = a.export_kv(pre.seq).unwrap();
            let local = continue_greedy(&mut a, pre.seq, first, 12);

            // Through the wire encoding, layer by layer into leased blocks (the home's path).
            let mut b = engine(kind, c);
            let id = b
                .begin_import(p.clone(), std::time::Instant::now())
                .unwrap();
            let mut wire_bytes = 0;
            for mut piece in export.pieces() {
                let (l, rows) = (piece.layer, piece.tokens.len());
                let bytes = piece.kv.to_le_bytes(dtype);
                assert_eq!(bytes.len(), b.layout().export_layer_bytes(l, p.len()));
                wire_bytes += bytes.len();
                let back = LayerKv::from_le_bytes(b.layout(), l, rows, &bytes).unwrap();
                assert_eq!(
                    back, piece.kv,
                    "{kind:?} {dtype}: layer {l} changed on the wire"
                );
                piece.kv = back;
                b.import_piece(id, &piece, std::time::Instant::now())
                    .unwrap();
            }
            assert_eq!(wire_bytes, export.size_bytes());
            let seq = b.finish_import(id).unwrap();
            // Re-exporting the imported KV gives the same values (f16 values survive exactly).
            assert_eq!(b.export_kv(seq).unwrap().layers, export.layers);
            assert_eq!(
                continue_greedy(&mut b, seq, first, 12),
                local,
                "{kind:?} {dtype}: remote prefill diverged from local"
            );
            exports.push(export);
        }
        let (h, f) = (&exports[0], &exports[1]);
        assert_ne!(h.layout_hash, f.layout_hash, "{kind:?}");
        let state = h.layout.state_slot_bytes();
        assert_eq!(state, f.layout.state_slot_bytes());
        assert_eq!(
            2 * (h.size_bytes() - state),
            f.size_bytes() - state,
            "{kind:?}"
        );
        let mut f32_engine = engine(
            kind,
            EngineConfig {
                kv_dtype: KvDType::F32,
                ..cfg()
            },
        );
        assert!(matches!(
            f32_engine.import_kv(h),
            Err(EngineError::Incompatible(_))
        ));
        assert_eq!(f32_engine.kv_stats().in_use, 0);
    }
}

/// Int8 on the wire (`mesh.kv_wire = "int8"`): each piece takes exactly the bytes the layout
/// says, is 1.125 bytes per paged value (state travels exact), decodes within half a
/// quantization step of its block's largest value, imports into leased blocks and decodes; a
/// malformed int8 piece is an error, never a panic.
#[test]
fn engine_int8_wire_is_bounded_and_imports() {
    use prfaas_node::kv::wire::{KvWire, INT8_BLOCK};
    for kind in KINDS {
        let p = prompt(45, 9);
        let mut a = engine(kind, cfg());
        let pre = a.prefill(&p, &mut NullSink).unwrap();
        let first = prfaas_node::engine::sampler::argmax(&pre.logits);
        let export = a.export_kv(pre.seq).unwrap();
        let layout = a.layout().clone();
        let mut b = engine(kind, cfg());
        let id = b
            .begin_import(p.clone(), std::time::Instant::now())
            .unwrap();
        let (mut int8_bytes, mut exact_bytes) = (0, 0);
        for mut piece in export.pieces() {
            let (l, rows) = (piece.layer, piece.tokens.len());
            let bytes = piece.kv.to_wire(layout.dtype, KvWire::Int8).unwrap();
            assert_eq!(
                bytes.len(),
                layout.wire_export_layer_bytes(l, p.len(), KvWire::Int8)
            );
            int8_bytes += bytes.len();
            exact_bytes += layout.export_layer_bytes(l, p.len());
            let back = LayerKv::from_wire(&layout, KvWire::Int8, l, rows, &bytes).unwrap();
            match (&piece.kv, &back) {
                (LayerKv::Paged { k, v }, LayerKv::Paged { k: k2, v: v2 }) => {
                    for (x, y) in [(k, k2), (v, v2)] {
                        for (xs, ys) in x.chunks(INT8_BLOCK).zip(y.chunks(INT8_BLOCK)) {
                            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                            for (a, b) in xs.iter().zip(ys) {
                                assert!((a - b).abs() <= amax / 254.0 + amax * 1e-6);
                            }
                        }
                    }
                }
                (LayerKv::State { .. }, LayerKv::State { .. }) => {
                    assert_eq!(back, piece.kv, "state travels exact")
                }
                _ => panic!("{kind:?} layer {l}: the piece changed kind"),
            }
            // Malformed int8: truncated, or a NaN scale in the V half.
            if layout.layers[l].is_paged() {
                assert!(LayerKv::from_wire(&layout, KvWire::Int8, l, rows, &bytes[1..]).is_err());
                let mut bad = bytes.clone();
                let v0 = bytes.len() / 2;
                bad[v0..v0 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
                assert!(LayerKv::from_wire(&layout, KvWire::Int8, l, rows, &bad).is_err());
            }
            piece.kv = back;
            b.import_piece(id, &piece, std::time::Instant::now())
                .unwrap();
        }
        assert_eq!(int8_bytes, layout.wire_export_bytes(p.len(), KvWire::Int8));
        let state = layout.state_slot_bytes();
        // f16 paged values take 2 bytes, int8 ones 1 + 4/32 (a little more for partial blocks).
        let ratio = (int8_bytes - state) as f64 / (exact_bytes - state) as f64;
        assert!(
            (0.5625..0.6).contains(&ratio),
            "{kind:?}: int8/f16 = {ratio}"
        );
        let seq = b.finish_import(id).unwrap();
        let remote = continue_greedy(&mut b, seq, first, 12);
        assert_eq!(remote.len(), 12, "{kind:?}: decodes from int8 KV");
    }
}

#[test]
fn engine_import_rejects_foreign_or_malformed_kv() {
    let mut dense = engine(SyntheticKind::TinyDense, cfg());
    let pre = dense.prefill(&prompt(20, 3), &mut NullSink).unwrap();
    let export = dense.export_kv(pre.seq).unwrap();

    let mut hybrid = engine(SyntheticKind::TinyHybrid, cfg());
    assert!(matches!(
        hybrid.import_kv(&export),
        Err(EngineError::Incompatible(_))
    ));

    // Same model, different weights (seed) → different hash.
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let (c, w) = synthetic_model(SyntheticKind::TinyDense, DEFAULT_SEED + 1);
    let mut other = Engine::new(Model::new(c, &w, backend).unwrap(), cfg()).unwrap();
    assert!(matches!(
        other.import_kv(&export),
        Err(EngineError::Incompatible(_))
    ));

    let mut truncated = export.clone();
    if let LayerKv::Paged { k, .. } = &mut truncated.layers[0] {
        k.pop();
    }
    let mut fresh = engine(SyntheticKind::TinyDense, cfg());
    assert!(fresh.import_kv(&truncated).is_err());
    assert_eq!(fresh.kv_stats().in_use, 0, "failed import stranded blocks");

    // Non-finite values never enter the cache.
    let mut poisoned = export.clone();
    if let LayerKv::Paged { v, .. } = &mut poisoned.layers[1] {
        v[7] = f32::NAN;
    }
    assert!(matches!(
        fresh.import_kv(&poisoned),
        Err(EngineError::Incompatible(_))
    ));
    assert_eq!(fresh.kv_stats().in_use, 0, "failed import stranded blocks");
}

#[test]
fn engine_prefix_cache_hit_equals_cold_prefill() {
    for (kind, (kv_dtype, tol)) in KINDS
        .into_iter()
        .flat_map(|k| DTYPES_AND_TOLERANCES.map(|d| (k, d)))
    {
        let cfg = || EngineConfig { kv_dtype, ..cfg() };
        // 48 shared tokens = 3 blocks; the first prompt ends one token later so that tiny-hybrid
        // snapshots its linear state exactly at the shared boundary.
        let shared = prompt(48, 4);
        let mut p1 = shared.clone();
        p1.push(33);
        let mut p2 = shared.clone();
        p2.extend(prompt(21, 5));

        let mut warm = engine(kind, cfg());
        let pre1 = warm.prefill(&p1, &mut NullSink).unwrap();
        warm.release(pre1.seq).unwrap();
        let hit = warm.prefill(&p2, &mut NullSink).unwrap();
        assert_eq!(
            hit.cached_tokens, 48,
            "{kind:?}: expected a 3-block prefix hit"
        );

        let mut cold_engine = engine(
            kind,
            EngineConfig {
                prefix_cache: false,
                ..cfg()
            },
        );
        let cold = cold_engine.prefill(&p2, &mut NullSink).unwrap();
        assert_eq!(cold.cached_tokens, 0);
        let d = max_abs_diff(&hit.logits, &cold.logits);
        assert!(
            d < tol,
            "{kind:?} {kv_dtype}: prefix-hit logits differ from cold by {d}"
        );

        let first = prfaas_node::engine::sampler::argmax(&cold.logits);
        assert_eq!(first, prfaas_node::engine::sampler::argmax(&hit.logits));
        let a = continue_greedy(&mut warm, hit.seq, first, 8);
        let b = continue_greedy(&mut cold_engine, cold.seq, first, 8);
        assert_eq!(a, b, "{kind:?}: continuation after prefix hit diverged");
    }
}

#[test]
fn engine_chunked_prefill_equals_one_shot() {
    for (kind, (kv_dtype, tol)) in KINDS
        .into_iter()
        .flat_map(|k| DTYPES_AND_TOLERANCES.map(|d| (k, d)))
    {
        let cfg = || EngineConfig { kv_dtype, ..cfg() };
        let p = prompt(70, 6);
        let mut one = engine(
            kind,
            EngineConfig {
                prefill_chunk: 512,
                prefix_cache: false,
                ..cfg()
            },
        );
        let mut chunked = engine(
            kind,
            EngineConfig {
                prefill_chunk: 7,
                prefix_cache: false,
                ..cfg()
            },
        );
        let a = one.prefill(&p, &mut NullSink).unwrap();
        let b = chunked.prefill(&p, &mut NullSink).unwrap();
        let d = max_abs_diff(&a.logits, &b.logits);
        assert!(
            d < tol,
            "{kind:?} {kv_dtype}: chunked prefill differs by {d}"
        );
        assert_eq!(
            one.export_kv(a.seq).unwrap().layers.len(),
            chunked.export_kv(b.seq).unwrap().layers.len()
        );
    }
}

#[test]
fn engine_continuous_batching_matches_sequential() {
    for kind in KINDS {
        let prompts: Vec<Vec<u32>> = [5usize, 17, 33, 50, 9]
            .iter()
            .enumerate()
            .map(|(i, &n)| prompt(n, i as u32))
            .collect();
        let params = SamplingParams {
            max_tokens: 10,
            stop_tokens: vec![],
            ..SamplingParams::greedy(10)
        };
        let mut seq_engine = engine(
            kind,
            EngineConfig {
                prefix_cache: false,
                ..cfg()
            },
        );
        let sequential: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| seq_engine.generate(p, &params, &mut |_| {}).unwrap().tokens)
            .collect();
        // max_batch 3 < 5 prompts: sequences join as others leave.
        let mut batch_engine = engine(
            kind,
            EngineConfig {
                prefix_cache: false,
                ..cfg()
            },
        );
        let batched = batch_engine.generate_batch(&prompts, &params, 3).unwrap();
        assert_eq!(batched, sequential, "{kind:?}: batched decode diverged");
        assert_eq!(batch_engine.live_sequences(), 0);
        let st = batch_engine.kv_stats();
        assert_eq!(
            st.in_use + st.leased,
            0,
            "{kind:?}: blocks stranded: {st:?}"
        );
    }
}

#[test]
fn engine_seeded_sampling_is_reproducible() {
    let params = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        seed: 9,
        max_tokens: 12,
        stop_tokens: vec![],
        ..SamplingParams::default()
    };
    let mut e = engine(SyntheticKind::TinyHybrid, cfg());
    let a = e
        .generate(&prompt(12, 7), &params, &mut |_| {})
        .unwrap()
        .tokens;
    let b = e
        .generate(&prompt(12, 7), &params, &mut |_| {})
        .unwrap()
        .tokens;
    assert_eq!(a, b);
    let c = e
        .generate(
            &prompt(12, 7),
            &SamplingParams {
                seed: 10,
                ..params.clone()
            },
            &mut |_| {},
        )
        .unwrap()
        .tokens;
    assert_eq!(c.len(), 12);
}

#[test]
fn engine_rejects_bad_requests_and_runs_out_cleanly() {
    let mut e = engine(
        SyntheticKind::TinyDense,
        EngineConfig {
            n_blocks: 4,
            ..cfg()
        },
    );
    assert!(matches!(
        e.prefill(&[], &mut NullSink),
        Err(EngineError::Request(_))
    ));
    assert!(matches!(
        e.prefill(&[100_000], &mut NullSink),
        Err(EngineError::Request(_))
    ));
    // 4 blocks of 16 tokens: a 100-token prompt does not fit.
    assert!(matches!(
        e.prefill(&prompt(100, 1), &mut NullSink),
        Err(EngineError::Kv(_))
    ));
    let st = e.kv_stats();
    assert_eq!(st.in_use, 0, "failed prefill stranded blocks: {st:?}");
    // A prompt that fits still works afterwards.
    let pre = e.prefill(&prompt(30, 1), &mut NullSink).unwrap();
    e.release(pre.seq).unwrap();
}

/// The home's receive path: blocks leased up front, pieces written into them by position as they
/// arrive, committed at the end; cancelled, expired or malformed imports free everything.
#[test]
fn engine_leased_piecewise_import_matches_and_never_strands_blocks() {
    for kind in KINDS {
        let p = prompt(45, 4);
        let mut a = engine(kind, cfg());
        let pre = a.prefill(&p, &mut NullSink).unwrap();
        let first = prfaas_node::engine::sampler::argmax(&pre.logits);
        let export = a.export_kv(pre.seq).unwrap();
        let local = continue_greedy(&mut a, pre.seq, first, 12);

        let mut b = engine(kind, cfg());
        let t0 = std::time::Instant::now();
        let id = b.begin_import(p.clone(), t0).unwrap();
        let s = b.kv_stats();
        assert_eq!(s.leases_active, 1, "{kind:?}");
        assert_eq!(s.leased, b.layout().blocks_for_tokens(p.len()), "{kind:?}");
        for piece in export.pieces() {
            b.import_piece(id, &piece, t0).unwrap();
        }
        let seq = b.finish_import(id).unwrap();
        let s = b.kv_stats();
        assert_eq!((s.leased, s.leases_active), (0, 0), "{kind:?}");
        assert_eq!(
            continue_greedy(&mut b, seq, first, 12),
            local,
            "{kind:?}: KV written into leased blocks diverged"
        );
        b.release(seq).unwrap();

        // Cancelled half way: nothing stays leased or in use.
        let mut c = engine(kind, cfg());
        let pieces: Vec<KvPiece> = export.pieces().collect();
        let id = c.begin_import(p.clone(), t0).unwrap();
        c.import_piece(id, &pieces[0], t0).unwrap();
        c.cancel_import(id);
        let s = c.kv_stats();
        assert_eq!((s.leased, s.in_use, s.leases_active), (0, 0, 0), "{kind:?}");
        assert_eq!(c.pending_imports(), 0);

        // A piece written twice, one not on a block boundary, then one of the wrong size:
        // each fails the import and frees it.
        let id = c.begin_import(p.clone(), t0).unwrap();
        c.import_piece(id, &pieces[0], t0).unwrap();
        assert!(c.import_piece(id, &pieces[0], t0).is_err());
        assert_eq!(
            c.kv_stats().leased,
            0,
            "{kind:?}: overlapping piece kept its lease"
        );
        let paged = pieces.iter().find(|x| {
            matches!(x.kv, LayerKv::Paged { .. }) && x.tokens.start == 0 && x.tokens.len() > 3
        });
        let paged = paged.expect("a full-attention layer");
        let LayerKv::Paged { k, v } = &paged.kv else {
            panic!("paged layer without K/V")
        };
        let row = k.len() / paged.tokens.len();
        let shifted = KvPiece {
            layer: paged.layer,
            tokens: 1..paged.tokens.end,
            kv: LayerKv::Paged {
                k: k[row..].to_vec(),
                v: v[row..].to_vec(),
            },
        };
        let id = c.begin_import(p.clone(), t0).unwrap();
        assert!(c.import_piece(id, &shifted, t0).is_err());
        assert_eq!(
            c.kv_stats().leased,
            0,
            "{kind:?}: misaligned piece kept its lease"
        );
        assert!(
            c.finish_import(id).is_err(),
            "a failed import cannot be committed"
        );
        let id = c.begin_import(p.clone(), t0).unwrap();
        let mut bad = pieces[0].clone();
        match &mut bad.kv {
            LayerKv::Paged { k, .. } => {
                k.pop();
            }
            LayerKv::State { state } => {
                state.pop();
            }
        }
        assert!(c.import_piece(id, &bad, t0).is_err());
        assert_eq!(
            c.kv_stats().leased,
            0,
            "{kind:?}: malformed layer kept its lease"
        );

        // Finishing early (pieces missing) fails and frees.
        let id = c.begin_import(p.clone(), t0).unwrap();
        c.import_piece(id, &pieces[0], t0).unwrap();
        assert!(c.finish_import(id).is_err());
        assert_eq!(
            c.kv_stats().leased,
            0,
            "{kind:?}: early finish kept its lease"
        );

        // A sender that goes silent: the lease expires after its TTL and everything is freed.
        let id = c.begin_import(p.clone(), t0).unwrap();
        let ttl = c.config().lease_ttl;
        assert!(c.expire_imports(t0 + ttl / 2).is_empty());
        assert_eq!(c.expire_imports(t0 + ttl * 2), vec![id]);
        let s = c.kv_stats();
        assert_eq!((s.leased, s.in_use, s.leases_active), (0, 0, 0), "{kind:?}");
        assert!(c.import_piece(id, &pieces[0], t0).is_err());

        // No room: the lease is refused up front, before any byte travels.
        let mut tiny = engine(
            kind,
            EngineConfig {
                prefill_chunk: 32,
                ..EngineConfig::with_capacity(32)
            },
        );
        assert!(tiny.begin_import(p.clone(), t0).is_err());
    }
}
