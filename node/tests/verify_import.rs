//! Verified remote prefill (DESIGN.md §8) on the synthetic dense model, cpu backend: honest
//! imports pass; (a) random KV, (b) the KV of another prompt, (c) one corrupted layer and
//! (d) one corrupted position are detected, and the cost of verifying is measured against the
//! prefill it replaces.
//!
//! CI runs a few trials per attack. `PRFAAS_VERIFY_TRIALS=100` (or more) runs the long mode and
//! prints the detection rates and the cost figure for RELIABILITY.md:
//! `PRFAAS_VERIFY_TRIALS=100 cargo test --release -p prfaas-node --test verify_import -- --nocapture`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::Backend;
use prfaas_node::engine::synthetic::{synthetic_model, SyntheticKind, DEFAULT_SEED};
use prfaas_node::engine::{
    Engine, EngineConfig, EngineError, KvExport, LayerKv, Model, NullSink, VerifyConfig,
    VerifyReport,
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

#[test]
fn verification_passes_honest_kv_and_catches_lies() {
    let trials: usize = std::env::var("PRFAAS_VERIFY_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
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
