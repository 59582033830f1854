//! Verified remote prefill (DESIGN.md §8) on the synthetic models, cpu backend: honest
//! imports pass; (a) random KV, (b) the KV of another prompt, (c) one corrupted layer and
//! (d) one corrupted position are detected, and the cost of verifying is measured against the
//! prefill it replaces. tiny-dense recomputes single positions; tiny-hybrid (linear-attention
//! state) recomputes stretches from the state checkpoints its transfers carry.
//!
//! CI runs a few trials per attack. `PRFAAS_VERIFY_TRIALS=100` (or more) runs the long mode and
//! prints the detection rates and the cost figure for RELIABILITY.md:
//! `PRFAAS_VERIFY_TRIALS=100 cargo test --release -p prfaas-node --test verify_import -- --nocapture`
//! (`PRFAAS_VERIFY_TOKENS` sets tiny-hybrid's prompt length, 300 by default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::Backend;
use prfaas_node::engine::synthetic::{synthetic_model, SyntheticKind, DEFAULT_SEED};
use prfaas_node::engine::{
    CollectSink, Engine, EngineConfig, EngineError, KvExport, KvPiece, LayerKv, Model, NullSink,
    VerifyConfig, VerifyReport,
};

fn engine(kind: SyntheticKind) -> Engine {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let (config, weights) = synthetic_model(kind, DEFAULT_SEED);
    let model = Model::new(config, &weights, backend).expect("synthetic model uploads");
    let cfg = EngineConfig {
        prefill_chunk: 64,
        // The sender must recompute every prompt (no cache hits between trials).
        prefix_cache: false,
        ..EngineConfig::with_capacity(4096)
    };
    Engine::new(model, cfg).expect("engine")
}

/// xorshift64*: deterministic trials without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// Roughly normal (sum of uniforms), unit variance.
    fn normal(&mut self) -> f32 {
        let s: f32 = (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (s - 2.0) * 3f32.sqrt()
    }
}

fn prompt(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| 32 + rng.below(90) as u32).collect()
}

/// The sender's honest work: the prompt's KV and last-position logits, and how long it took.
fn prefill(sender: &mut Engine, tokens: &[u32]) -> (KvExport, Vec<f32>, Duration) {
    let t0 = Instant::now();
    let out = sender.prefill(tokens, &mut NullSink).expect("prefill");
    let took = t0.elapsed();
    let export = sender.export_kv(out.seq).expect("export");
    sender.release(out.seq).expect("release");
    (export, out.logits, took)
}

/// Row length (elements of one token's K) of paged layer `kv` holding `n_rows` tokens.
fn rows(kv: &LayerKv, n_rows: usize) -> usize {
    match kv {
        LayerKv::Paged { k, .. } => k.len() / n_rows,
        LayerKv::State { .. } => 0,
    }
}

/// Replaces values with noise of the same scale.
fn scramble(rng: &mut Rng, xs: &mut [f32]) {
    let rms = (xs.iter().map(|x| x * x).sum::<f32>() / xs.len().max(1) as f32)
        .sqrt()
        .max(1e-3);
    xs.iter_mut().for_each(|x| *x = rng.normal() * rms);
}

/// Leases room for `kv` in `home` and writes every layer (not finished yet).
fn start_import(home: &mut Engine, kv: &KvExport) -> prfaas_node::kv::LeaseId {
    let id = home
        .begin_import(kv.tokens.clone(), Instant::now())
        .expect("lease");
    for piece in kv.pieces() {
        home.import_piece(id, &piece, Instant::now())
            .expect("sizes are right");
    }
    id
}

/// Imports `kv` into `home` and verifies it against `logits`; the import is then cancelled.
fn verify(home: &mut Engine, kv: &KvExport, logits: &[f32], cfg: &VerifyConfig) -> VerifyReport {
    let id = start_import(home, kv);
    let r = home.verify_import(id, logits, cfg).expect("verify runs");
    home.cancel_import(id);
    r
}

#[derive(Default, Debug)]
struct Tally {
    trials: usize,
    detected: usize,
    /// (d) only: trials whose corrupted position was among those recomputed.
    sampled: usize,
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn verification_passes_honest_kv_and_catches_lies() {
    let trials = env_or("PRFAAS_VERIFY_TRIALS", 4);
    let n = 96;
    let mut sender = engine(SyntheticKind::TinyDense);
    let mut home = engine(SyntheticKind::TinyDense);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let (mut a, mut b, mut c, mut d) = (
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
    );
    let (mut honest_max, mut honest_logits_max) = (0f32, 0f32);
    let (mut prefill_time, mut verify_time) = (Duration::ZERO, Duration::ZERO);
    for trial in 0..trials {
        let cfg = VerifyConfig {
            seed: rng.next(),
            ..VerifyConfig::default()
        };
        let tokens = prompt(&mut rng, n);
        let (kv, logits, took) = prefill(&mut sender, &tokens);
        prefill_time += took;
        // Exports hold exactly the prompt's rows (dense model: every layer sends all of them).
        let n_rows = n;

        let t0 = Instant::now();
        let honest = verify(&mut home, &kv, &logits, &cfg);
        verify_time += t0.elapsed();
        assert!(
            honest.passed(),
            "trial {trial}: honest KV refused: {honest:?}"
        );
        assert_eq!(honest.positions.len(), cfg.positions + 1);
        honest_max = honest_max.max(honest.max_kv_error);
        honest_logits_max = honest_logits_max.max(honest.logits_error);

        // (a) random KV of the right shape and scale, honest-looking logits.
        let mut fake = kv.clone();
        for layer in &mut fake.layers {
            if let LayerKv::Paged { k, v } = layer {
                scramble(&mut rng, k);
                scramble(&mut rng, v);
            }
        }
        a.trials += 1;
        a.detected += usize::from(!verify(&mut home, &fake, &logits, &cfg).passed());

        // (b) the KV and logits of another prompt of the same length.
        let other = prompt(&mut rng, n);
        let (mut foreign, foreign_logits, _) = prefill(&mut sender, &other);
        foreign.tokens = tokens.clone();
        b.trials += 1;
        b.detected += usize::from(!verify(&mut home, &foreign, &foreign_logits, &cfg).passed());

        // (c) one layer replaced by noise.
        let mut bad_layer = kv.clone();
        let l = rng.below(bad_layer.layers.len());
        if let LayerKv::Paged { k, v } = &mut bad_layer.layers[l] {
            let used = n * (k.len() / n_rows);
            scramble(&mut rng, &mut k[..used]);
            scramble(&mut rng, &mut v[..used]);
        }
        c.trials += 1;
        c.detected += usize::from(!verify(&mut home, &bad_layer, &logits, &cfg).passed());

        // (d) one position replaced by noise in every layer.
        let mut bad_pos = kv.clone();
        let t = rng.below(n);
        for layer in &mut bad_pos.layers {
            let row = rows(layer, n_rows);
            if let LayerKv::Paged { k, v } = layer {
                scramble(&mut rng, &mut k[t * row..(t + 1) * row]);
                scramble(&mut rng, &mut v[t * row..(t + 1) * row]);
            }
        }
        let r = verify(&mut home, &bad_pos, &logits, &cfg);
        d.trials += 1;
        d.detected += usize::from(!r.passed());
        if r.positions.contains(&t) {
            d.sampled += 1;
            assert!(
                !r.passed(),
                "position {t} was recomputed but not caught: {r:?}"
            );
        }
    }
    let k = VerifyConfig::default().positions;
    let rate = |t: &Tally| t.detected as f64 / t.trials.max(1) as f64;
    eprintln!(
        "verify_import: {trials} trials, {n}-token prompts, k = {k}: detection (a) random KV {:.3}, \
         (b) other prompt {:.3}, (c) one layer {:.3}, (d) one position {:.3} (sampling alone \
         predicts {:.3}; recomputed {} of {}); honest max K/V error {honest_max:.2e}, logits \
         {honest_logits_max:.2e}; verification cost {:.3} of the prefill it replaces",
        rate(&a),
        rate(&b),
        rate(&c),
        rate(&d),
        (k + 1) as f64 / n as f64,
        d.sampled,
        d.trials,
        verify_time.as_secs_f64() / prefill_time.as_secs_f64().max(1e-9),
    );
    assert_eq!(a.detected, a.trials, "(a) {a:?}");
    assert_eq!(b.detected, b.trials, "(b) {b:?}");
    assert_eq!(c.detected, c.trials, "(c) {c:?}");
    assert!(
        honest_max < VerifyConfig::default().kv_tolerance / 5.0,
        "honest error {honest_max} too close to the tolerance"
    );
}

/// A remote prefill's pieces as streamed (checkpoints included) and its last logits.
fn stream(sender: &mut Engine, tokens: &[u32]) -> (Vec<KvPiece>, Vec<f32>, Duration) {
    let mut sink = CollectSink::default();
    let t0 = Instant::now();
    let out = sender.prefill(tokens, &mut sink).expect("prefill");
    let took = t0.elapsed();
    sender.release(out.seq).expect("release");
    (sink.pieces, out.logits, took)
}

/// Imports streamed `pieces` of `tokens` into `home`, verifies them, cancels the import.
fn verify_pieces(
    home: &mut Engine,
    tokens: &[u32],
    pieces: &[KvPiece],
    logits: &[f32],
    cfg: &VerifyConfig,
) -> VerifyReport {
    let id = home
        .begin_import(tokens.to_vec(), Instant::now())
        .expect("lease");
    for piece in pieces {
        home.import_piece(id, piece, Instant::now())
            .expect("sizes are right");
    }
    let r = home.verify_import(id, logits, cfg).expect("verify runs");
    home.cancel_import(id);
    r
}

fn scramble_piece(rng: &mut Rng, kv: &mut LayerKv) {
    match kv {
        LayerKv::Paged { k, v } => {
            scramble(rng, k);
            scramble(rng, v);
        }
        LayerKv::State { state } => scramble(rng, state),
    }
}

/// tiny-hybrid: three linear-attention layers per softmax layer, one of those sliding-window.
/// Its transfers carry state checkpoints; verification recomputes the tail (last checkpoint to
/// the end: K/V, final states, logits) and a random earlier segment (checkpoint to checkpoint).
#[test]
fn hybrid_verification_recomputes_segments_from_checkpoints() {
    let trials = env_or("PRFAAS_VERIFY_TRIALS", 3);
    let n = env_or("PRFAAS_VERIFY_TOKENS", 300);
    let mut sender = engine(SyntheticKind::TinyHybrid);
    let mut home = engine(SyntheticKind::TinyHybrid);
    let layout = sender.layout().clone();
    let checkpoints = layout.checkpoints(n);
    assert!(!checkpoints.is_empty(), "{n} tokens: no checkpoint");
    let mut rng = Rng(0x0dd_ba11_cafe_f00d);
    let mut t = [
        Tally::default(),
        Tally::default(),
        Tally::default(),
        Tally::default(),
    ];
    let (mut honest_kv, mut honest_state, mut honest_logits) = (0f32, 0f32, 0f32);
    let (mut prefill_time, mut verify_time, mut recomputed) = (Duration::ZERO, Duration::ZERO, 0);
    for trial in 0..trials {
        let cfg = VerifyConfig {
            seed: rng.next(),
            ..VerifyConfig::default()
        };
        let tokens = prompt(&mut rng, n);
        let (pieces, logits, took) = stream(&mut sender, &tokens);
        prefill_time += took;
        let sent: usize = pieces.iter().map(|p| p.kv.size_bytes(layout.dtype)).sum();
        assert_eq!(sent, layout.transfer_bytes(n), "the stream is the transfer");
        for &c in &checkpoints {
            assert!(
                pieces
                    .iter()
                    .any(|p| p.tokens == (0..c) && matches!(p.kv, LayerKv::State { .. })),
                "no state checkpoint at {c}"
            );
        }

        let t0 = Instant::now();
        let honest = verify_pieces(&mut home, &tokens, &pieces, &logits, &cfg);
        verify_time += t0.elapsed();
        assert!(
            honest.passed(),
            "trial {trial}: honest KV refused: {honest:?}"
        );
        assert!(honest.positions.contains(&(n - 1)), "{honest:?}");
        recomputed += honest.positions.len();
        honest_kv = honest_kv.max(honest.max_kv_error);
        honest_state = honest_state.max(honest.max_state_error);
        honest_logits = honest_logits.max(honest.logits_error);

        // (a) every value replaced by noise of its scale (honest logits).
        let mut fake = pieces.clone();
        fake.iter_mut()
            .for_each(|p| scramble_piece(&mut rng, &mut p.kv));
        t[0].trials += 1;
        t[0].detected +=
            usize::from(!verify_pieces(&mut home, &tokens, &fake, &logits, &cfg).passed());

        // (b) the transfer and logits of another prompt of the same length.
        let (foreign, foreign_logits, _) = stream(&mut sender, &prompt(&mut rng, n));
        t[1].trials += 1;
        t[1].detected += usize::from(
            !verify_pieces(&mut home, &tokens, &foreign, &foreign_logits, &cfg).passed(),
        );

        // (c) one layer (paged rows, or a state and its checkpoints) replaced by noise.
        let l = rng.below(layout.layers.len());
        let mut bad_layer = pieces.clone();
        bad_layer
            .iter_mut()
            .filter(|p| p.layer == l)
            .for_each(|p| scramble_piece(&mut rng, &mut p.kv));
        t[2].trials += 1;
        t[2].detected +=
            usize::from(!verify_pieces(&mut home, &tokens, &bad_layer, &logits, &cfg).passed());

        // (d) one position replaced by noise in every paged layer that sends it.
        let q = rng.below(n);
        let mut bad_pos = pieces.clone();
        for p in bad_pos.iter_mut().filter(|p| p.tokens.contains(&q)) {
            if let LayerKv::Paged { k, v } = &mut p.kv {
                let row = k.len() / p.tokens.len();
                let at = (q - p.tokens.start) * row..(q - p.tokens.start + 1) * row;
                scramble(&mut rng, &mut k[at.clone()]);
                scramble(&mut rng, &mut v[at]);
            }
        }
        let r = verify_pieces(&mut home, &tokens, &bad_pos, &logits, &cfg);
        t[3].trials += 1;
        t[3].detected += usize::from(!r.passed());
        if r.positions.contains(&q) {
            t[3].sampled += 1;
            assert!(
                !r.passed(),
                "position {q} was recomputed but not caught: {r:?}"
            );
        }
    }
    let rate = |t: &Tally| t.detected as f64 / t.trials.max(1) as f64;
    eprintln!(
        "verify_import hybrid: {trials} trials, {n}-token prompts, checkpoints {checkpoints:?} \
         (+{} bytes on a {}-byte export, {:.3}): detection (a) random KV {:.3}, (b) other \
         prompt {:.3}, (c) one layer {:.3}, (d) one position {:.3} (recomputed {} of {}; \
         {:.1} positions recomputed per import, {:.3} of the prompt); honest max K/V error \
         {honest_kv:.2e}, state {honest_state:.2e}, logits {honest_logits:.2e}; verification \
         cost {:.3} of the prefill it replaces",
        layout.transfer_bytes(n) - layout.export_bytes(n),
        layout.export_bytes(n),
        (layout.transfer_bytes(n) - layout.export_bytes(n)) as f64 / layout.export_bytes(n) as f64,
        rate(&t[0]),
        rate(&t[1]),
        rate(&t[2]),
        rate(&t[3]),
        t[3].sampled,
        t[3].trials,
        recomputed as f64 / trials.max(1) as f64,
        recomputed as f64 / (trials.max(1) * n) as f64,
        verify_time.as_secs_f64() / prefill_time.as_secs_f64().max(1e-9),
    );
    for (name, t) in ["(a)", "(b)", "(c)"].iter().zip(&t) {
        assert_eq!(t.detected, t.trials, "{name} {t:?}");
    }
    let tol = VerifyConfig::default().kv_tolerance / 5.0;
    assert!(
        honest_kv < tol && honest_state < tol,
        "honest errors too close to the tolerance"
    );
}

/// A transfer whose state checkpoint is missing cannot be verified: refused, not waved through.
#[test]
fn hybrid_import_without_its_checkpoints_is_refused() {
    let mut sender = engine(SyntheticKind::TinyHybrid);
    let mut home = engine(SyntheticKind::TinyHybrid);
    let tokens: Vec<u32> = (0..120).map(|i| 40 + (i * 7) % 50).collect();
    assert_eq!(sender.layout().checkpoints(tokens.len()), vec![80]);
    let (pieces, logits, _) = stream(&mut sender, &tokens);
    let cfg = VerifyConfig::default();
    assert!(verify_pieces(&mut home, &tokens, &pieces, &logits, &cfg).passed());
    // Without the checkpoint pieces (what a whole-sequence export holds) the import still
    // finishes (decode needs only the export) but verification refuses it.
    let bare: Vec<KvPiece> = pieces
        .iter()
        .filter(|p| !matches!(p.kv, LayerKv::State { .. }) || p.tokens.end == tokens.len())
        .cloned()
        .collect();
    let r = verify_pieces(&mut home, &tokens, &bare, &logits, &cfg);
    assert!(
        r.failure
            .as_deref()
            .is_some_and(|f| f.contains("checkpoint")),
        "{r:?}"
    );
    // A state piece ending anywhere but at the end or a checkpoint is refused as it arrives.
    let mut odd = pieces
        .iter()
        .find(|p| p.tokens == (0..80))
        .expect("checkpoint piece")
        .clone();
    odd.tokens = 0..64;
    let id = home
        .begin_import(tokens.clone(), Instant::now())
        .expect("lease");
    assert!(home.import_piece(id, &odd, Instant::now()).is_err());
    assert_eq!(home.pending_imports(), 0, "the import is cancelled");
}

/// Non-finite values are refused, a failed verification frees the import's blocks and keeps it
/// out of the prefix cache, and a passing one finishes into a live sequence.
#[test]
fn failed_verification_discards_the_import_and_nan_is_refused() {
    let mut sender = engine(SyntheticKind::TinyDense);
    let mut home = engine(SyntheticKind::TinyDense);
    let tokens: Vec<u32> = (0..40).map(|i| 40 + (i * 7) % 50).collect();
    let (kv, logits, _) = prefill(&mut sender, &tokens);
    let free0 = home.kv_stats();

    let mut nan = kv.clone();
    if let LayerKv::Paged { k, .. } = &mut nan.layers[1] {
        k[3] = f32::NAN;
    }
    // A non-finite piece is refused as it arrives (the import is cancelled at once);
    // verification checks finiteness again for anything written by other means.
    let id = home
        .begin_import(nan.tokens.clone(), Instant::now())
        .expect("lease");
    let refused = nan
        .pieces()
        .map(|piece| home.import_piece(id, &piece, Instant::now()))
        .find_map(Result::err)
        .expect("NaN piece refused");
    assert!(refused.to_string().contains("non-finite"), "{refused}");
    assert_eq!(home.pending_imports(), 0);
    assert_eq!(home.kv_stats(), free0, "blocks freed, nothing cached");

    let mut bad_logits = logits.clone();
    bad_logits.iter_mut().for_each(|x| *x = -*x);
    let id = start_import(&mut home, &kv);
    assert!(matches!(
        home.finish_verified_import(id, &bad_logits, &VerifyConfig::default()),
        Err(EngineError::Unverified(_))
    ));
    assert_eq!(home.kv_stats(), free0);

    let id = start_import(&mut home, &kv);
    let (seq, report) = home
        .finish_verified_import(id, &logits, &VerifyConfig::default())
        .expect("honest KV passes");
    assert!(report.passed());
    // The received KV is untouched by the recomputation: decoding matches the sender's.
    let mine = home.export_kv(seq).expect("export");
    for (a, b) in mine.layers.iter().zip(&kv.layers) {
        assert_eq!(a, b, "verification must leave the imported KV as received");
    }
}

/// The tolerance holds on the real model (quantized weights, the cpu backend's 8-bit decode
/// path against its prefill path): honest KV passes with a wide margin, foreign KV fails.
#[test]
fn verification_on_smollm2_honest_margin() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        assert!(
            std::env::var("PRFAAS_REQUIRE_MODEL").map_or(true, |v| v != "1"),
            "PRFAAS_REQUIRE_MODEL=1 but {} is missing",
            p.display()
        );
        eprintln!(
            "skipping: {} missing (run scripts/fetch-model)",
            p.display()
        );
        return;
    }
    let m = prfaas_node::engine::loader::load_model(p.to_str().expect("utf-8")).expect("load");
    let make = || {
        let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
        let model = Model::new(m.config.clone(), &m.weights, backend).expect("model");
        Engine::new(
            model,
            EngineConfig {
                prefill_chunk: 64,
                prefix_cache: false,
                ..EngineConfig::with_capacity(512)
            },
        )
        .expect("engine")
    };
    let (mut sender, mut home) = (make(), make());
    let prompt = m
        .text
        .codec
        .encode(
            "The history of the printing press begins in the fifteenth century, when Johannes \
             Gutenberg combined movable metal type, oil-based ink and a screw press. Within \
             decades, presses spread across Europe and the cost of books fell sharply.",
            false,
        )
        .expect("encode");
    let (kv, logits, prefill_took) = prefill(&mut sender, &prompt);
    let cfg = VerifyConfig {
        positions: 8,
        ..VerifyConfig::default()
    };
    let t0 = Instant::now();
    let honest = verify(&mut home, &kv, &logits, &cfg);
    let verify_took = t0.elapsed();
    eprintln!(
        "SmolLM2, {} tokens: honest K/V error {:.2e} (worst {:?}), logits {:.2e}; verification \
         ({} positions) cost {:.3} of the prefill",
        prompt.len(),
        honest.max_kv_error,
        honest.worst,
        honest.logits_error,
        honest.positions.len(),
        verify_took.as_secs_f64() / prefill_took.as_secs_f64().max(1e-9)
    );
    assert!(honest.passed(), "{honest:?}");
    assert!(honest.max_kv_error < cfg.kv_tolerance / 2.0, "{honest:?}");
    let mut other = prompt.clone();
    other.reverse();
    let (mut foreign, foreign_logits, _) = prefill(&mut sender, &other);
    foreign.tokens = prompt.clone();
    assert!(!verify(&mut home, &foreign, &foreign_logits, &cfg).passed());
}
