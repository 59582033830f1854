//! Engine invariants on the real default model (SmolLM2-135M-Instruct Q4_1), cpu backend.
//! Skipped with a loud line when `models/SmolLM2-135M-Instruct.Q4_1.gguf` is absent
//! (`scripts/fetch-model` downloads it).

use std::path::PathBuf;
use std::sync::Arc;

use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::Backend;
use prfaas_node::engine::chat::{ChatMessage, ChatTemplate};
use prfaas_node::engine::gguf::{load_gguf, LoadedModel};
use prfaas_node::engine::sampler::argmax;
use prfaas_node::engine::{Engine, EngineConfig, Model, NullSink, Sampler, SamplingParams, SeqId};

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn load() -> Option<LoadedModel> {
    let p = model_path();
    if !p.exists() {
        eprintln!("\n*** SKIPPED: {} not found (run scripts/fetch-model) ***\n", p.display());
        return None;
    }
    Some(load_gguf(&p).expect("the default model loads"))
}

fn engine(m: &LoadedModel, cfg: EngineConfig) -> Engine {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    Engine::new(Model::new(m.config.clone(), &m.weights, backend).unwrap(), cfg).unwrap()
}

fn cfg() -> EngineConfig {
    EngineConfig { prefill_chunk: 64, ..EngineConfig::with_capacity(512) }
}

fn continue_greedy(e: &mut Engine, seq: SeqId, first: u32, n: usize) -> Vec<u32> {
    let mut s = Sampler::new(SamplingParams::greedy(n));
    s.accept(first);
    e.continue_decode(seq, first, &mut s, &mut |_| {}).unwrap().0
}

/// Invariants (2) and (3) on the real model, and a coherent chat answer.
#[test]
fn engine_smollm2_remote_prefill_prefix_cache_and_chat() {
    let Some(m) = load() else { return };
    let tok = &m.tokenizer;

    // (2) export after prefill → import into a fresh engine → identical greedy continuation.
    let p = tok.encode("The three primary colors are red, yellow and", false, false).unwrap();
    let mut a = engine(&m, cfg());
    let pre = a.prefill(&p, &mut NullSink).unwrap();
    let first = argmax(&pre.logits);
    let export = a.export_kv(pre.seq).unwrap();
    let local = continue_greedy(&mut a, pre.seq, first, 8);
    let mut b = engine(&m, cfg());
    let seq = b.import_kv(&export).unwrap();
    assert_eq!(continue_greedy(&mut b, seq, first, 8), local, "imported KV diverged");

    // (3) prefix-cache hit + incremental prefill == cold prefill.
    let shared: Vec<u32> = tok
        .encode("A long shared system prompt that many requests start with, so that it fills blocks.", false, false)
        .unwrap();
    assert!(shared.len() > 16);
    let mut p1 = shared.clone();
    p1.extend(tok.encode(" First question?", false, false).unwrap());
    let mut p2 = shared.clone();
    p2.extend(tok.encode(" Second, different question about colours?", false, false).unwrap());
    let mut warm = engine(&m, cfg());
    let r1 = warm.prefill(&p1, &mut NullSink).unwrap();
    warm.release(r1.seq).unwrap();
    let hit = warm.prefill(&p2, &mut NullSink).unwrap();
    assert_eq!(hit.cached_tokens, shared.len() / 16 * 16);
    let mut cold_e = engine(&m, EngineConfig { prefix_cache: false, ..cfg() });
    let cold = cold_e.prefill(&p2, &mut NullSink).unwrap();
    let range = cold.logits.iter().fold(0f32, |x, v| x.max(v.abs()));
    let diff = cold.logits.iter().zip(&hit.logits).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-3 * range.max(1.0), "prefix-hit logits differ by {diff}");
    let f = argmax(&cold.logits);
    assert_eq!(continue_greedy(&mut warm, hit.seq, f, 6), continue_greedy(&mut cold_e, cold.seq, f, 6));

    // Coherence: the chat model answers a factual question.
    let tpl = ChatTemplate::new(m.chat_template.as_deref().expect("chat template"), "", "").unwrap();
    let text = tpl.render(&[ChatMessage::new("user", "What is the capital of France?")], true).unwrap();
    let ids = tok.encode(&text, false, true).unwrap();
    let stops: Vec<u32> = (0..tok.vocab_size() as u32).filter(|&t| tok.is_eog(t)).collect();
    let mut e = engine(&m, cfg());
    let g = e
        .generate(&ids, &SamplingParams { stop_tokens: stops, ..SamplingParams::greedy(24) }, &mut |_| {})
        .unwrap();
    let answer = tok.decode(&g.tokens, true).unwrap();
    eprintln!("SmolLM2 answer: {answer:?}");
    assert!(answer.contains("Paris"), "incoherent answer: {answer:?}");
}
