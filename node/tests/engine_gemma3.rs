//! Gemma 3 270M (GGUF Q4_K_M, `scripts/fetch-model gemma3-270m`) on the cpu backend: the config
//! parsed from its metadata, the tokenizer, a coherent greedy continuation, and remote prefill
//! (export → import) giving the same continuation as local prefill.
//!
//! The model (253 MB) is not in CI's fetch, so without it these tests print a loud SKIPPED line;
//! `PRFAAS_REQUIRE_GEMMA=1` makes its absence a failure.

mod common;

use std::sync::Arc;

use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::{Backend, GluAct, RopeStyle};
use prfaas_node::engine::config::LayerKind;
use prfaas_node::engine::gguf::LoadedModel;
use prfaas_node::engine::sampler::argmax;
use prfaas_node::engine::{Engine, EngineConfig, Model, NullSink, Sampler, SamplingParams, SeqId};

fn load() -> Option<LoadedModel> {
    common::load_or_skip(
        &common::model_file("gemma-3-270m-q4_k_m.gguf"),
        "PRFAAS_REQUIRE_GEMMA",
        "scripts/fetch-model gemma3-270m",
    )
}

fn engine(m: &LoadedModel) -> Engine {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    Engine::new(
        Model::new(m.config.clone(), &m.weights, backend).unwrap(),
        EngineConfig {
            prefill_chunk: 64,
            ..EngineConfig::with_capacity(512)
        },
    )
    .unwrap()
}

fn continue_greedy(e: &mut Engine, seq: SeqId, first: u32, n: usize) -> Vec<u32> {
    let mut s = Sampler::new(SamplingParams::greedy(n));
    s.accept(first);
    e.continue_decode(seq, first, &mut s, &mut |_| {})
        .unwrap()
        .0
}

#[test]
fn gemma3_config_from_metadata() {
    let Some(m) = load() else { return };
    let c = &m.config;
    assert_eq!(c.arch, "gemma3");
    assert_eq!(
        (c.n_layers(), c.hidden_size, c.intermediate_size),
        (18, 640, 2048)
    );
    assert_eq!((c.n_heads, c.n_kv_heads, c.head_dim), (4, 1, 256));
    assert_eq!(c.vocab_size, 262_144);
    assert_eq!(c.rope_base, 1e6);
    assert_eq!(c.rope_style, RopeStyle::Neox);
    assert!(c.tie_embeddings);
    // 5 sliding-window layers to 1 global: layers 5, 11 and 17 are global.
    for (i, kind) in c.layers.iter().enumerate() {
        let want = if i % 6 == 5 {
            LayerKind::Full
        } else {
            LayerKind::Sliding { window: 512 }
        };
        assert_eq!(*kind, want, "layer {i}");
    }
    let b = &c.block;
    assert_eq!(b.glu_act, GluAct::GeluTanh);
    assert_eq!(b.embed_scale, Some(640f32.sqrt()));
    assert_eq!(b.query_scale, Some(1.0 / 16.0));
    assert!(b.qk_norm && b.post_norms);
    assert_eq!(b.rope_base_local, Some(10_000.0));
    // SentencePiece vocabulary: BOS added, words carry their leading space, bytes fall back.
    let tok = &m.tokenizer;
    assert!(tok.add_bos());
    let ids = tok.encode("Hello world", true, false).unwrap();
    assert_eq!(Some(ids[0]), tok.bos());
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world");
    for text in [
        "  two  spaces",
        "naïve café 東京 🙂",
        "x = [1, 22, 333]\n\tif x:",
    ] {
        let ids = tok.encode(text, false, false).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), text, "round trip");
    }
}

#[test]
fn gemma3_continues_text_and_remote_prefill_matches_local() {
    let Some(m) = load() else { return };
    let tok = &m.tokenizer;
    // A base model: a continuation every reading of the prompt agrees on.
    let prompt = "Monday, Tuesday, Wednesday,";
    let p = tok.encode(prompt, true, false).unwrap();
    let mut a = engine(&m);
    let pre = a.prefill(&p, &mut NullSink).unwrap();
    let first = argmax(&pre.logits);
    let export = a.export_kv(pre.seq).unwrap();
    let local = continue_greedy(&mut a, pre.seq, first, 8);
    let text = tok.decode(&local, true).unwrap();
    eprintln!("Gemma 3 270M: {prompt:?} → {text:?}");
    assert!(
        text.contains("Friday, Saturday"),
        "incoherent continuation: {text:?}"
    );
    let mut b = engine(&m);
    let seq = b.import_kv(&export).unwrap();
    assert_eq!(
        continue_greedy(&mut b, seq, first, 8),
        local,
        "imported KV diverged"
    );
}
