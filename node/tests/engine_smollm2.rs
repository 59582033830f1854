//! Engine invariants on the real default model (SmolLM2-135M-Instruct Q4_1), cpu backend.
//! Skipped with a loud line when `models/SmolLM2-135M-Instruct.Q4_1.gguf` is absent
//! (`scripts/fetch-model` downloads it).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{compare_runs, FixtureRun};
use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::Backend;
use prfaas_node::engine::chat::{ChatMessage, ChatTemplate};
use prfaas_node::engine::gguf::LoadedModel;
use prfaas_node::engine::sampler::argmax;
use prfaas_node::engine::{Engine, EngineConfig, Model, NullSink, Sampler, SamplingParams, SeqId};
use prfaas_node::kv::KvDType;

fn model_path() -> PathBuf {
    common::model_file("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn load() -> Option<LoadedModel> {
    common::load_or_skip(&model_path(), "PRFAAS_REQUIRE_MODEL", "scripts/fetch-model")
}

fn engine(m: &LoadedModel, cfg: EngineConfig) -> Engine {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    Engine::new(
        Model::new(m.config.clone(), &m.weights, backend).unwrap(),
        cfg,
    )
    .unwrap()
}

fn cfg() -> EngineConfig {
    EngineConfig {
        prefill_chunk: 64,
        ..EngineConfig::with_capacity(512)
    }
}

fn continue_greedy(e: &mut Engine, seq: SeqId, first: u32, n: usize) -> Vec<u32> {
    let mut s = Sampler::new(SamplingParams::greedy(n));
    s.accept(first);
    e.continue_decode(seq, first, &mut s, &mut |_| {})
        .unwrap()
        .0
}

/// Invariants (2) and (3) on the real model, and a coherent chat answer.
#[test]
fn engine_smollm2_remote_prefill_prefix_cache_and_chat() {
    let Some(m) = load() else { return };
    let tok = &m.tokenizer;

    // (2) export after prefill → import into a fresh engine → identical greedy continuation.
    let p = tok
        .encode("The three primary colors are red, yellow and", false, false)
        .unwrap();
    let mut a = engine(&m, cfg());
    let pre = a.prefill(&p, &mut NullSink).unwrap();
    let first = argmax(&pre.logits);
    let export = a.export_kv(pre.seq).unwrap();
    let local = continue_greedy(&mut a, pre.seq, first, 8);
    let mut b = engine(&m, cfg());
    let seq = b.import_kv(&export).unwrap();
    assert_eq!(
        continue_greedy(&mut b, seq, first, 8),
        local,
        "imported KV diverged"
    );

    // (3) prefix-cache hit + incremental prefill == cold prefill.
    let shared: Vec<u32> = tok
        .encode(
            "A long shared system prompt that many requests start with, so that it fills blocks.",
            false,
            false,
        )
        .unwrap();
    assert!(shared.len() > 16);
    let mut p1 = shared.clone();
    p1.extend(tok.encode(" First question?", false, false).unwrap());
    let mut p2 = shared.clone();
    p2.extend(
        tok.encode(" Second, different question about colours?", false, false)
            .unwrap(),
    );
    let mut warm = engine(&m, cfg());
    let r1 = warm.prefill(&p1, &mut NullSink).unwrap();
    warm.release(r1.seq).unwrap();
    let hit = warm.prefill(&p2, &mut NullSink).unwrap();
    assert_eq!(hit.cached_tokens, shared.len() / 16 * 16);
    let mut cold_e = engine(
        &m,
        EngineConfig {
            prefix_cache: false,
            ..cfg()
        },
    );
    let cold = cold_e.prefill(&p2, &mut NullSink).unwrap();
    let range = cold.logits.iter().fold(0f32, |x, v| x.max(v.abs()));
    let diff = cold
        .logits
        .iter()
        .zip(&hit.logits)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        diff < 1e-3 * range.max(1.0),
        "prefix-hit logits differ by {diff}"
    );
    let f = argmax(&cold.logits);
    assert_eq!(
        continue_greedy(&mut warm, hit.seq, f, 6),
        continue_greedy(&mut cold_e, cold.seq, f, 6)
    );

    // Coherence: the chat model answers a factual question.
    let tpl =
        ChatTemplate::new(m.chat_template.as_deref().expect("chat template"), "", "").unwrap();
    let text = tpl
        .render(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let ids = tok.encode(&text, false, true).unwrap();
    let stops: Vec<u32> = (0..tok.vocab_size() as u32)
        .filter(|&t| tok.is_eog(t))
        .collect();
    let mut e = engine(&m, cfg());
    let g = e
        .generate(
            &ids,
            &SamplingParams {
                stop_tokens: stops,
                ..SamplingParams::greedy(24)
            },
            &mut |_| {},
        )
        .unwrap();
    let answer = tok.decode(&g.tokens, true).unwrap();
    eprintln!("SmolLM2 answer: {answer:?}");
    assert!(answer.contains("Paris"), "incoherent answer: {answer:?}");
}

fn run_fixture(m: &LoadedModel, kv_dtype: KvDType, int8_wire: bool) -> FixtureRun {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_greedy.json");
    let c = EngineConfig {
        prefix_cache: false,
        kv_dtype,
        ..cfg()
    };
    common::run_fixture(&path, &|| engine(m, c.clone()), int8_wire, 8)
}

/// Greedy fixture from llama.cpp (node/tests/fixtures/smollm2_greedy.json, see its
/// `produced_by`): teacher-forced on llama.cpp's own continuation, compare at every step the
/// logits of llama.cpp's top-5 tokens, top-5 overlap, and the greedy token wherever llama.cpp's
/// top-2 margin is clear. Thresholds follow DESIGN.md §7: valid llama.cpp settings alone move
/// logits by up to ~0.35, and llama.cpp also rounds activations to 8 bits for its quantized dot
/// products (we keep them f32), so we allow 0.35 on average and 1.5 for the worst single logit
/// (measured: mean 0.19, max 1.01). Only the first 8 steps per case keep the test short.
///
/// Run with the default f16 KV, and with f32 KV and f16 KV after an int8 transfer to measure
/// what each costs (printed; BENCHMARKS.md): f16 must stay within the thresholds and close to
/// f32, int8 within looser ones.
#[test]
fn engine_smollm2_matches_llamacpp_fixture() {
    let Some(m) = load() else { return };
    let f16 = run_fixture(&m, KvDType::F16, false);
    let f32 = run_fixture(&m, KvDType::F32, false);
    let int8 = run_fixture(&m, KvDType::F16, true);
    eprintln!("llama.cpp fixture, {}", f16.line("f16 KV (default)"));
    eprintln!("llama.cpp fixture, {}", f32.line("f32 KV"));
    eprintln!("llama.cpp fixture, {}", int8.line("f16 KV, int8 wire"));
    for (what, run) in [("f16 KV", &f16), ("int8 wire", &int8)] {
        let (max, mean, agree) = compare_runs(run, &f32);
        eprintln!(
            "{what} vs f32 KV: logit diff mean {mean:.4} max {max:.4} (all {} logits of {} steps), argmax agreement {agree}/{}",
            m.config.vocab_size,
            run.steps,
            run.steps
        );
    }
    for run in [&f16, &f32] {
        assert!(run.steps >= 40);
        assert!(
            run.mean_err() < 0.35 && run.max_err < 1.5,
            "logits too far from llama.cpp"
        );
        assert!(
            run.overlap as f32 / run.steps as f32 >= 4.0,
            "top-5 sets disagree"
        );
        assert_eq!(
            run.clear_agree, run.clear,
            "greedy token differs from llama.cpp on a clear-margin step"
        );
    }
    let (f16_max, _, f16_agree) = compare_runs(&f16, &f32);
    assert!(
        f16_max < 0.5,
        "f16 KV moved a logit by {f16_max} from f32 KV"
    );
    assert!(
        f16_agree + 1 >= f16.steps,
        "f16 KV changed the greedy token"
    );
    assert!(
        int8.mean_err() < 0.5 && int8.overlap as f32 / int8.steps as f32 >= 3.5,
        "{}",
        int8.line("int8 wire too lossy")
    );
}
