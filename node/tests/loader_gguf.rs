//! GGUF loader tests: a tiny GGUF written here (always runs), hostile headers, truncation and byte
//! flips (never a panic), and the real SmolLM2 file when it is present.
//!
//! Real-model tests need `models/SmolLM2-135M-Instruct.Q4_1.gguf` (`scripts/fetch-model`). Without it
//! they print a notice and return, unless `PRFAAS_REQUIRE_MODEL=1`, where they fail.

use std::path::{Path, PathBuf};

use prfaas_kernels::{DType, RopeStyle};
use prfaas_node::engine::config::MixerWeights;
use prfaas_node::engine::gguf::{load_gguf, GgufError, GgufFile};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// A minimal GGUF writer (test-only): enough to build valid files and then break them.

#[derive(Clone)]
enum Val {
    U32(u32),
    F32(f32),
    Str(String),
    StrArr(Vec<String>),
    I32Arr(Vec<i32>),
}

struct TensorSpec {
    name: String,
    ne: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_gguf(kvs: &[(&str, Val)], tensors: &[TensorSpec]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        match v {
            Val::U32(x) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Val::F32(x) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Val::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Val::StrArr(a) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for s in a {
                    put_str(&mut out, s);
                }
            }
            Val::I32Arr(a) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&5u32.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for d in &t.ne {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    let base = out.len();
    for (t, off) in tensors.iter().zip(offsets) {
        out.resize(base + off as usize, 0);
        out.extend_from_slice(&t.data);
    }
    out
}

/// GPT-2 byte → char table (same construction as the tokenizer's).
fn byte_chars() -> Vec<char> {
    let mut n = 0;
    (0..=255u8)
        .map(|b| {
            if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                char::from(b)
            } else {
                n += 1;
                char::from_u32(256 + n - 1).unwrap()
            }
        })
        .collect()
}

const H: u64 = 64;
const FF: u64 = 96;
const N_LAYERS: usize = 2;

fn f32_tensor(name: &str, ne: &[u64], seed: u32) -> TensorSpec {
    let n: u64 = ne.iter().product();
    let data = (0..n)
        .flat_map(|i| {
            (((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
                .to_le_bytes()
        })
        .collect();
    TensorSpec {
        name: name.into(),
        ne: ne.to_vec(),
        ty: 0,
        data,
    }
}

fn q4_1_tensor(name: &str, ne: &[u64]) -> TensorSpec {
    let n: u64 = ne.iter().product();
    let data = (0..n / 32 * 20).map(|i| (i * 7 % 251) as u8).collect();
    TensorSpec {
        name: name.into(),
        ne: ne.to_vec(),
        ty: 3,
        data,
    }
}

/// Tokens: 256 byte tokens, "he", "hel", then two control tokens.
fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    tokens.push("he".into());
    tokens.push("hel".into());
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let mut types = vec![1; tokens.len()];
    let n = types.len();
    types[n - 2] = 3;
    types[n - 1] = 3;
    (tokens, types, vec!["h e".into(), "he l".into()])
}

fn tiny_kvs(arch: &str) -> Vec<(&'static str, Val)> {
    let (tokens, types, merges) = tiny_vocab();
    vec![
        ("general.architecture", Val::Str(arch.into())),
        ("general.name", Val::Str("tiny-gguf".into())),
        ("llama.block_count", Val::U32(N_LAYERS as u32)),
        ("llama.context_length", Val::U32(512)),
        ("llama.embedding_length", Val::U32(H as u32)),
        ("llama.feed_forward_length", Val::U32(FF as u32)),
        ("llama.attention.head_count", Val::U32(2)),
        ("llama.attention.head_count_kv", Val::U32(1)),
        ("llama.rope.freq_base", Val::F32(100000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5)),
        ("tokenizer.ggml.model", Val::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Val::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Val::StrArr(tokens)),
        ("tokenizer.ggml.token_type", Val::I32Arr(types)),
        ("tokenizer.ggml.merges", Val::StrArr(merges)),
        ("tokenizer.ggml.bos_token_id", Val::U32(258)),
        ("tokenizer.ggml.eos_token_id", Val::U32(259)),
        (
            "tokenizer.chat_template",
            Val::Str("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ),
    ]
}

fn tiny_tensors() -> Vec<TensorSpec> {
    let v = tiny_vocab().0.len() as u64;
    let mut t = vec![
        f32_tensor("token_embd.weight", &[H, v], 1),
        f32_tensor("output_norm.weight", &[H], 2),
    ];
    for i in 0..N_LAYERS {
        let n = |s: &str| format!("blk.{i}.{s}");
        t.push(f32_tensor(&n("attn_norm.weight"), &[H], 3));
        t.push(q4_1_tensor(&n("attn_q.weight"), &[H, H]));
        t.push(q4_1_tensor(&n("attn_k.weight"), &[H, 32]));
        t.push(q4_1_tensor(&n("attn_v.weight"), &[H, 32]));
        t.push(q4_1_tensor(&n("attn_output.weight"), &[H, H]));
        t.push(f32_tensor(&n("ffn_norm.weight"), &[H], 4));
        t.push(q4_1_tensor(&n("ffn_gate.weight"), &[H, FF]));
        t.push(q4_1_tensor(&n("ffn_up.weight"), &[H, FF]));
        t.push(q4_1_tensor(&n("ffn_down.weight"), &[FF, H]));
    }
    t
}

fn tiny_gguf() -> Vec<u8> {
    write_gguf(&tiny_kvs("llama"), &tiny_tensors())
}

fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prfaas-loader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------

#[test]
fn tiny_gguf_loads_with_expected_config_weights_and_tokenizer() {
    let path = write_temp("tiny.gguf", &tiny_gguf());
    let m = load_gguf(&path).unwrap();
    let c = &m.config;
    assert_eq!(
        (c.n_layers(), c.hidden_size, c.intermediate_size),
        (N_LAYERS, 64, 96)
    );
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size),
        (2, 1, 32, 260)
    );
    assert_eq!(c.rope_base, 100000.0);
    assert_eq!(c.rope_style, RopeStyle::Normal);
    assert!(c.tie_embeddings && m.weights.output.is_none());
    assert!(!c.qkv_bias);
    let MixerWeights::Attention(a) = &m.weights.layers[1].mixer else {
        panic!("expected attention")
    };
    assert_eq!(
        (a.wq.dtype, a.wq.shape.clone()),
        (DType::Q4_1, vec![64, 64])
    );
    assert_eq!(a.wk.shape, vec![32, 64]);
    assert_eq!(a.wk.bytes.len(), 32 * 64 / 32 * 20);
    assert_eq!(m.weights.layers[0].w_down.shape, vec![64, 96]);
    // Bytes are copied verbatim from the file.
    let expected: Vec<u8> = (0..64 * 64 / 32 * 20)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    assert_eq!(a.wq.bytes, expected);
    assert_eq!(m.weights.token_embd.shape, vec![260, 64]);
    assert_eq!(
        m.chat_template.as_deref(),
        Some("{% for m in messages %}{{ m.content }}{% endfor %}")
    );
    assert_eq!(m.weights_hash.len(), 64);
    // The tokenizer really uses the merges and the control tokens.
    let t = &m.tokenizer;
    assert_eq!(
        t.encode("hello", false, false).unwrap(),
        vec![257, b'l' as u32, b'o' as u32]
    );
    assert_eq!(
        t.encode("<|im_start|>hello", false, true).unwrap(),
        vec![258, 257, b'l' as u32, b'o' as u32]
    );
    assert_eq!(t.bos(), Some(258));
    assert!(t.is_eog(259));
}

#[test]
fn weights_hash_changes_with_any_tensor_byte() {
    let bytes = tiny_gguf();
    let a = GgufFile::parse(bytes.clone()).unwrap();
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let b = GgufFile::parse(flipped).unwrap();
    assert_ne!(a.weights_hash(), b.weights_hash());
    assert_eq!(
        a.weights_hash(),
        GgufFile::parse(bytes).unwrap().weights_hash()
    );
}

#[test]
fn missing_tensor_and_wrong_arch_are_typed_errors() {
    let mut tensors = tiny_tensors();
    tensors.retain(|t| t.name != "blk.1.ffn_up.weight");
    let p = write_temp("missing.gguf", &write_gguf(&tiny_kvs("llama"), &tensors));
    assert!(
        matches!(load_gguf(&p), Err(GgufError::MissingTensor(n)) if n == "blk.1.ffn_up.weight")
    );
    let p = write_temp(
        "arch.gguf",
        &write_gguf(&tiny_kvs("mamba"), &tiny_tensors()),
    );
    assert!(matches!(load_gguf(&p), Err(GgufError::UnsupportedArch(a)) if a == "mamba"));
    let mut tensors = tiny_tensors();
    tensors[2] = f32_tensor("blk.0.attn_norm.weight", &[32], 3);
    let p = write_temp("shape.gguf", &write_gguf(&tiny_kvs("llama"), &tensors));
    assert!(matches!(load_gguf(&p), Err(GgufError::BadShape { .. })));
    let p = Path::new("/nonexistent/prfaas/model.gguf");
    assert!(matches!(load_gguf(p), Err(GgufError::Io { .. })));
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&n_tensors.to_le_bytes());
    v.extend_from_slice(&n_kv.to_le_bytes());
    v
}

#[test]
fn hostile_headers_are_rejected_without_huge_allocations() {
    let parse = |b: Vec<u8>| GgufFile::parse(b).unwrap_err();
    // Magic and version.
    let mut b = tiny_gguf();
    b[0] = b'X';
    assert!(matches!(parse(b), GgufError::BadMagic(_)));
    let mut b = tiny_gguf();
    b[4] = 1;
    assert!(matches!(parse(b), GgufError::UnsupportedVersion(1)));
    assert!(matches!(parse(b"GG".to_vec()), GgufError::Truncated { .. }));
    // Absurd counts.
    assert!(matches!(parse(header(u64::MAX, 0)), GgufError::Invalid(_)));
    assert!(matches!(parse(header(0, u64::MAX)), GgufError::Invalid(_)));
    // A key whose length claims more bytes than exist.
    let mut b = header(0, 1);
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    b.extend_from_slice(&[0; 64]);
    assert!(matches!(parse(b), GgufError::Truncated { .. }));
    // An array with 2^60 elements.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 60).to_le_bytes());
    b.extend_from_slice(&[0; 64]);
    assert!(matches!(parse(b), GgufError::Truncated { .. }));
    // An array that fits in the file but would blow up in memory (one byte → one MetaValue).
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    let n = (1u64 << 22) + 1;
    b.extend_from_slice(&n.to_le_bytes());
    b.resize(b.len() + n as usize, 0);
    assert!(matches!(parse(b), GgufError::Invalid(m) if m.contains("limit")));
    // Unknown value type, deeply nested arrays.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&99u32.to_le_bytes());
    b.extend_from_slice(&[0; 64]);
    assert!(matches!(
        parse(b),
        GgufError::UnknownValueType { ty: 99, .. }
    ));
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..10 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    b.extend_from_slice(&[0; 64]);
    assert!(matches!(parse(b), GgufError::Invalid(_)));
    // Tensor table: too many dims, unsupported dtype, shape overflow, data out of bounds.
    let tensor = |n_dims: u32, ne: &[u64], ty: u32, offset: u64| {
        let mut b = header(1, 0);
        put_str(&mut b, "t");
        b.extend_from_slice(&n_dims.to_le_bytes());
        for d in ne {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32 + 128, 0);
        b
    };
    assert!(matches!(
        parse(tensor(5, &[1, 1, 1, 1, 1], 0, 0)),
        GgufError::Invalid(_)
    ));
    assert!(matches!(
        parse(tensor(1, &[32], 2, 0)),
        GgufError::UnsupportedTensorType { ty: 2, .. }
    ));
    assert!(matches!(
        parse(tensor(2, &[u64::MAX, 4], 0, 0)),
        GgufError::Invalid(_)
    ));
    assert!(matches!(
        parse(tensor(1, &[33], 3, 0)),
        GgufError::Invalid(_)
    ));
    assert!(matches!(
        parse(tensor(1, &[64], 0, 0)),
        GgufError::TensorOutOfBounds { .. }
    ));
    assert!(matches!(
        parse(tensor(1, &[4], 0, u64::MAX - 2)),
        GgufError::TensorOutOfBounds { .. }
    ));
    assert!(GgufFile::parse(tensor(1, &[4], 0, 0)).is_ok());
}

#[test]
fn every_truncation_of_a_tiny_file_is_an_error() {
    let bytes = tiny_gguf();
    for cut in (0..bytes.len()).step_by(7) {
        let r = GgufFile::parse(bytes[..cut].to_vec());
        assert!(r.is_err(), "truncated at {cut} of {} parsed", bytes.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// Random byte flips in the header region must give Ok or a typed error, never a panic.
    #[test]
    fn random_header_corruption_never_panics(flips in prop::collection::vec((0usize..6000, any::<u8>()), 1..8)) {
        let mut bytes = tiny_gguf();
        for (pos, val) in flips {
            let p = pos % bytes.len();
            bytes[p] = val;
        }
        if let Ok(f) = GgufFile::parse(bytes) {
            // A file that still parses must also load or fail cleanly.
            if let Ok(cfg) = f.model_config() {
                let _ = f.model_weights(&cfg);
            }
            let _ = prfaas_node::engine::tokenizer::Tokenizer::from_gguf(&f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real model.

fn real_model() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("PRFAAS_REQUIRE_MODEL")
            .map(|v| v != "1")
            .unwrap_or(true),
        "PRFAAS_REQUIRE_MODEL=1 but {} is missing (run scripts/fetch-model)",
        p.display()
    );
    eprintln!(
        "skipping: {} missing (run scripts/fetch-model)",
        p.display()
    );
    None
}

#[test]
fn smollm2_loads_with_the_documented_geometry() {
    let Some(path) = real_model() else { return };
    let t0 = std::time::Instant::now();
    let m = load_gguf(&path).unwrap();
    eprintln!(
        "load_gguf (parse, copy tensors, tokenizer, hash): {:?}",
        t0.elapsed()
    );
    let c = &m.config;
    assert_eq!(c.arch, "llama");
    assert_eq!(
        (c.n_layers(), c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size),
        (9, 3, 64, 49152)
    );
    assert_eq!(c.rope_base, 100000.0);
    assert_eq!(c.rope_style, RopeStyle::Normal);
    assert!((c.rms_eps - 1e-5).abs() < 1e-9, "rms eps {}", c.rms_eps);
    assert!(c.tie_embeddings && m.weights.output.is_none());
    assert_eq!(m.weights.token_embd.dtype, DType::Q8_0);
    assert_eq!(m.weights.token_embd.shape, vec![49152, 576]);
    let MixerWeights::Attention(a) = &m.weights.layers[0].mixer else {
        panic!("expected attention")
    };
    assert_eq!(
        (a.wq.dtype, a.wq.shape.clone()),
        (DType::Q4_1, vec![576, 576])
    );
    assert_eq!(a.wk.shape, vec![192, 576]);
    assert_eq!(m.weights.layers[0].attn_norm.dtype, DType::F32);
    assert!(m
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("<|im_start|>")));
    assert_eq!(m.tokenizer.bos(), Some(1));
    assert_eq!(m.tokenizer.eos(), Some(2));
    assert!(!m.tokenizer.add_bos());
}

#[test]
fn smollm2_weights_hash_is_fast_and_stable() {
    let Some(path) = real_model() else { return };
    let f = GgufFile::open(&path).unwrap();
    let t0 = std::time::Instant::now();
    let h1 = f.weights_hash();
    let dt = t0.elapsed();
    assert_eq!(h1, f.weights_hash());
    eprintln!(
        "blake3 over {} tensor bytes: {:?}",
        f.tensors.iter().map(|t| t.size).sum::<u64>(),
        dt
    );
    // Generous bound: blake3 is built optimised even in debug (deps opt-level 2); 0.5 s in release.
    assert!(dt.as_secs_f64() < 2.0, "hashing took {dt:?}");
}

#[test]
fn smollm2_truncated_anywhere_is_a_clear_error() {
    let Some(path) = real_model() else { return };
    let bytes = std::fs::read(&path).unwrap();
    let full = GgufFile::parse(bytes.clone()).unwrap();
    let header_end = full.data_offset;
    let mut cuts: Vec<usize> = vec![0, 3, 4, 8, 16, 24, 100, 1000, 10_000, 100_000, 1_000_000];
    cuts.extend([
        header_end - 1,
        header_end,
        header_end + 1,
        bytes.len() / 2,
        bytes.len() - 1,
    ]);
    for cut in cuts {
        let err = GgufFile::parse(bytes[..cut].to_vec()).unwrap_err();
        let msg = err.to_string();
        assert!(!msg.is_empty());
        if cut >= header_end {
            assert!(
                matches!(err, GgufError::TensorOutOfBounds { .. }),
                "cut {cut}: {msg}"
            );
        } else {
            assert!(
                matches!(err, GgufError::Truncated { .. } | GgufError::Invalid(_)),
                "cut {cut}: {msg}"
            );
        }
    }
}
