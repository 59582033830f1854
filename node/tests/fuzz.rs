//! Structure-aware fuzzing of the node's decoders and of the home's KV import state machine:
//!
//! * `int8_wire_codec`: `decode_int8` / `int8_encoded_len` / `encode_int8` on any sizes and bytes.
//! * `kv_piece_bytes`: `LayerKv::from_le_bytes` (what a home does with each received piece) for
//!   tiny-dense and tiny-hybrid layouts, any layer, row count and length.
//! * `kv_import_sequences`: the engine's import (lease → pieces in any order → finish / cancel /
//!   expiry) fed valid piece plans with mutations: dropped, duplicated, overlapping, misaligned,
//!   out-of-range or wrongly sized pieces, wrong kinds, non-finite values. After every input no
//!   block is leased or in use and no import is pending; an unmutated plan always imports.
//! * `gguf_headers`: GGUF files generated from their grammar (metadata of every type, nested
//!   arrays, tensor infos) then mutated, through `GgufFile::parse`, `model_config` and
//!   `Tokenizer::from_gguf`.
//! * `tokenizer_input`: SmolLM2's tokenizer (the HF fixture, always present) on arbitrary and
//!   control-token-laden text, chat rendering + masking, decoding arbitrary ids.
//! * `http_request_bodies`: OpenAI request bodies built from their schema with wrong types and
//!   extreme values, then mutated, through `parse_body` and `validate` for both endpoints.
//!
//! Short mode by default (CI); long mode:
//! `PRFAAS_FUZZ_ITERS=1000000 cargo test --workspace --test fuzz -- --nocapture`.

#[path = "../../mesh/tests/fuzz_harness/mod.rs"]
mod fuzz_harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use fuzz_harness::{mutate, run, tricky_string};
use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::Backend;
use prfaas_node::api::wire::{parse_body, validate, Endpoint, RequestBounds};
use prfaas_node::engine::chat::{ChatMessage, CHATML_TEMPLATE};
use prfaas_node::engine::gguf::GgufFile;
use prfaas_node::engine::loader::{TextCodec, TextSide};
use prfaas_node::engine::synthetic::{synthetic_model, SyntheticKind, DEFAULT_SEED};
use prfaas_node::engine::tokenizer::{Tokenizer, TokenizerError};
use prfaas_node::engine::{Engine, EngineConfig, KvPiece, LayerKv, Model};
use prfaas_node::kv::wire::{decode_int8, encode_int8, int8_encoded_len};
use prfaas_node::kv::KvLayout;
use serde_json::{json, Value};

#[test]
fn int8_wire_codec() {
    run("int8 wire codec", 20_000, 2048, |u| {
        let block = match u.int_in_range(0..=3u8)? {
            0 => 0,
            1 => u.int_in_range(1..=64usize)?,
            2 => 32,
            _ => u.arbitrary()?,
        };
        let n = match u.int_in_range(0..=3u8)? {
            0 => u.arbitrary()?,
            1 => usize::MAX - u.int_in_range(0..=8usize)?,
            _ => u.int_in_range(0..=300usize)?,
        };
        let _ = int8_encoded_len(n, block);
        let bytes: Vec<u8> = u.arbitrary()?;
        if let Ok(v) = decode_int8(&bytes, n, block) {
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|x| x.is_finite()), "decoded non-finite KV");
        }
        // Round trip of arbitrary (sometimes non-finite) values.
        let vals: Vec<f32> = (0..u.int_in_range(0..=100usize)?)
            .map(|_| -> arbitrary::Result<f32> {
                Ok(if u.ratio(1, 16)? {
                    f32::from_bits(u.arbitrary()?)
                } else {
                    f32::from(u.arbitrary::<i16>()?) / 64.0
                })
            })
            .collect::<arbitrary::Result<_>>()?;
        let mut out = Vec::new();
        let block = block.clamp(1, 1 << 16);
        if encode_int8(&vals, block, &mut out).is_ok() {
            assert_eq!(out.len(), int8_encoded_len(vals.len(), block));
            let back = decode_int8(&out, vals.len(), block).expect("own encoding decodes");
            assert_eq!(back.len(), vals.len());
        }
        Ok(())
    });
}

fn engine(kind: SyntheticKind, blocks: usize, prefix_cache: bool) -> Engine {
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let (config, weights) = synthetic_model(kind, DEFAULT_SEED);
    let model = Model::new(config, &weights, backend).expect("synthetic model uploads");
    let cfg = EngineConfig {
        prefix_cache,
        n_state_slots: 4,
        ..EngineConfig::with_capacity(blocks * 16)
    };
    Engine::new(model, cfg).expect("engine")
}

#[test]
fn kv_piece_bytes() {
    let layouts: Vec<KvLayout> = [SyntheticKind::TinyDense, SyntheticKind::TinyHybrid]
        .into_iter()
        .map(|k| engine(k, 4, false).layout().clone())
        .collect();
    run("kv piece bytes", 20_000, 4096, |u| {
        let layout = u.choose(&layouts)?;
        let layer = match u.int_in_range(0..=3u8)? {
            0 => u.arbitrary::<u32>()? as usize,
            _ => u.int_in_range(0..=layout.layers.len() + 1)?,
        };
        // A piece's rows come from a `PieceId`'s u32 token range.
        let rows = match u.int_in_range(0..=3u8)? {
            0 => u.arbitrary::<u32>()? as usize,
            _ => u.int_in_range(0..=40usize)?,
        };
        let want = layout.piece_bytes(layer, rows);
        let bytes: Vec<u8> = if u.arbitrary()? && want <= 1 << 16 {
            let mut b = vec![0u8; want];
            u.fill_buffer(&mut b)?;
            mutate(u, &mut b)?;
            b
        } else {
            u.arbitrary()?
        };
        if let Ok(kv) = LayerKv::from_le_bytes(layout, layer, rows, &bytes) {
            assert_eq!(bytes.len(), want);
            assert_eq!(kv.len(), layout.piece_elems(layer, rows));
        }
        Ok(())
    });
}

/// A piece of the import plan (before mutation).
#[derive(Debug, Clone)]
struct Planned {
    layer: usize,
    rows: std::ops::Range<usize>,
    paged: bool,
    elems: usize,
}

fn plan(u: &mut Unstructured<'_>, layout: &KvLayout, n: usize) -> arbitrary::Result<Vec<Planned>> {
    let bs = 16;
    let mut out = Vec::new();
    for layer in 0..layout.layers.len() {
        if !layout.layers[layer].is_paged() {
            out.push(Planned {
                layer,
                rows: 0..n,
                paged: false,
                elems: layout.piece_elems(layer, n),
            });
            continue;
        }
        let span = layout.transfer_rows(layer, n);
        let mut start = span.start;
        while start < span.end {
            let end = (start + bs * u.int_in_range(1..=3usize)?).min(span.end);
            out.push(Planned {
                layer,
                rows: start..end,
                paged: true,
                elems: layout.piece_elems(layer, end - start),
            });
            start = end;
        }
    }
    // Any arrival order.
    for i in (1..out.len()).rev() {
        let j = u.int_in_range(0..=i)?;
        out.swap(i, j);
    }
    Ok(out)
}

fn piece(u: &mut Unstructured<'_>, p: &Planned, bad_values: bool) -> arbitrary::Result<KvPiece> {
    let value = if bad_values {
        *u.choose(&[f32::NAN, f32::INFINITY, 1e30])?
    } else {
        0.25
    };
    let kv = if p.paged {
        LayerKv::Paged {
            k: vec![value; p.elems / 2],
            v: vec![value; p.elems / 2],
        }
    } else {
        LayerKv::State {
            state: vec![value; p.elems],
        }
    };
    Ok(KvPiece {
        layer: p.layer,
        tokens: p.rows.clone(),
        kv,
    })
}

/// Frame-level mutations of the plan; returns whether the plan is still certainly valid.
fn mutate_plan(
    u: &mut Unstructured<'_>,
    pieces: &mut Vec<KvPiece>,
    n_layers: usize,
) -> arbitrary::Result<bool> {
    let mut valid = true;
    for _ in 0..u.int_in_range(0..=2u8)? {
        if pieces.is_empty() {
            break;
        }
        let i = u.int_in_range(0..=pieces.len() - 1)?;
        let mut changed = true;
        match u.int_in_range(0..=8u8)? {
            0 => {
                pieces.remove(i);
            }
            1 => {
                let p = pieces[i].clone();
                let at = u.int_in_range(0..=pieces.len())?;
                pieces.insert(at, p);
            }
            2 => pieces[i].layer = u.int_in_range(0..=n_layers + 2)?,
            3 => {
                let p = &mut pieces[i];
                p.tokens.start = p.tokens.start.wrapping_add(u.int_in_range(0..=17usize)?);
            }
            4 => {
                let p = &mut pieces[i];
                p.tokens.end = p.tokens.end.wrapping_add(u.int_in_range(0..=17usize)?);
            }
            5 => {
                let p = &mut pieces[i];
                (p.tokens.start, p.tokens.end) = (p.tokens.end, p.tokens.start);
            }
            6 => match &mut pieces[i].kv {
                LayerKv::Paged { k, v } => {
                    if u.arbitrary()? {
                        k.pop();
                    } else {
                        v.push(0.0);
                        k.push(0.0);
                    }
                }
                LayerKv::State { state } => state.truncate(state.len() / 2),
            },
            7 => {
                // The wrong kind of KV for the layer.
                let len = pieces[i].kv.len();
                pieces[i].kv = match &pieces[i].kv {
                    LayerKv::Paged { .. } => LayerKv::State {
                        state: vec![0.0; len],
                    },
                    LayerKv::State { .. } => LayerKv::Paged {
                        k: vec![0.0; len / 2],
                        v: vec![0.0; len - len / 2],
                    },
                };
            }
            _ => changed = false,
        }
        valid &= !changed;
    }
    Ok(valid)
}

#[test]
fn kv_import_sequences() {
    let mut engines = [
        engine(SyntheticKind::TinyDense, 12, true),
        engine(SyntheticKind::TinyHybrid, 12, false),
    ];
    let (mut imported, mut refused) = (0u64, 0u64);
    run("kv import sequences", 2_000, 512, |u| {
        let e = &mut engines[u.int_in_range(0..=1usize)?];
        let n = u.int_in_range(1..=100usize)?;
        let tokens: Vec<u32> = (0..n).map(|i| 32 + (i as u32 % 90)).collect();
        let now = Instant::now();
        let layout = e.layout().clone();
        let plan = plan(u, &layout, n)?;
        let bad_values = u.ratio(1, 16)?;
        let mut pieces = plan
            .iter()
            .map(|p| piece(u, p, bad_values))
            .collect::<arbitrary::Result<Vec<_>>>()?;
        let valid = mutate_plan(u, &mut pieces, layout.layers.len())?;
        let ending = u.int_in_range(0..=5u8)?;
        let r = (|| {
            let id = e.begin_import(tokens.clone(), now)?;
            for p in &pieces {
                e.import_piece(id, p, now)?;
            }
            match ending {
                0 => {
                    e.cancel_import(id);
                    Ok(None)
                }
                1 => {
                    let expired = e.expire_imports(now + Duration::from_secs(3600));
                    assert!(expired.contains(&id), "a stale import did not expire");
                    Ok(None)
                }
                _ => e.finish_import(id).map(Some),
            }
        })();
        match r {
            Ok(Some(seq)) => {
                e.release(seq).expect("release an imported sequence");
                imported += 1;
            }
            Ok(None) => {}
            Err(_) => {
                assert!(
                    !(valid && ending >= 2 && !bad_values),
                    "a valid import of {n} tokens failed: {r:?}"
                );
                refused += 1;
            }
        }
        let s = e.kv_stats();
        assert_eq!(e.pending_imports(), 0, "an import is left pending");
        assert_eq!(
            (
                s.leased,
                s.in_use,
                s.leases_active,
                s.state_slots_leased,
                s.state_slots_used
            ),
            (0, 0, 0, 0, 0),
            "blocks stranded after an import: {s:?}"
        );
        Ok(())
    });
    eprintln!("kv imports: {imported} committed, {refused} refused");
    assert!(imported > 0 && refused > 0);
}

/// A GGUF file written from its grammar with arbitrary choices.
fn gguf(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn value(
        u: &mut Unstructured<'_>,
        out: &mut Vec<u8>,
        ty: u32,
        depth: u32,
    ) -> arbitrary::Result<()> {
        match ty {
            0 | 1 | 7 => out.push(if ty == 7 {
                u.int_in_range(0..=2u8)?
            } else {
                u.arbitrary()?
            }),
            2 | 3 => out.extend_from_slice(&u.arbitrary::<[u8; 2]>()?),
            4..=6 => out.extend_from_slice(&u.arbitrary::<[u8; 4]>()?),
            8 => string(out, &tricky_string(u)?),
            9 => {
                let elem = if depth < 3 {
                    u.int_in_range(0..=12u32)?
                } else {
                    4
                };
                let count = u.int_in_range(0..=6u64)?;
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
                for _ in 0..count {
                    value(u, out, elem, depth + 1)?;
                }
            }
            _ => out.extend_from_slice(&u.arbitrary::<[u8; 8]>()?),
        }
        Ok(())
    }
    const KEYS: &[&str] = &[
        "general.architecture",
        "general.alignment",
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ];
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&u.choose(&[3u32, 2, 1, 4])?.to_le_bytes());
    let n_tensors = u.int_in_range(0..=3u64)?;
    let n_kv = u.int_in_range(0..=8u64)?;
    out.extend_from_slice(&n_tensors.to_le_bytes());
    out.extend_from_slice(&n_kv.to_le_bytes());
    for _ in 0..n_kv {
        let key = *u.choose(KEYS)?;
        string(&mut out, key);
        // Mostly the type the key wants, sometimes any.
        let ty = match (key, u.ratio(3, 4)?) {
            (
                "general.architecture"
                | "tokenizer.ggml.model"
                | "tokenizer.ggml.pre"
                | "tokenizer.chat_template",
                true,
            ) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                let s = *u.choose(&["llama", "gemma3", "gpt2", "smollm", "", "qwen2"])?;
                string(&mut out, s);
                continue;
            }
            ("tokenizer.ggml.tokens" | "tokenizer.ggml.merges", true) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                let count = u.int_in_range(0..=5u64)?;
                out.extend_from_slice(&count.to_le_bytes());
                for _ in 0..count {
                    let s = *u.choose(&["a", "b", "a b", "Ġ", "<|im_start|>", "", "ab"])?;
                    string(&mut out, s);
                }
                continue;
            }
            (_, true) => *u.choose(&[4u32, 5, 6, 10])?,
            _ => u.int_in_range(0..=13u32)?,
        };
        out.extend_from_slice(&ty.to_le_bytes());
        value(u, &mut out, ty, 0)?;
    }
    let names = [
        "token_embd.weight",
        "output_norm.weight",
        "blk.0.attn_q.weight",
    ];
    for _ in 0..n_tensors {
        string(&mut out, u.choose(&names)?);
        let dims = u.int_in_range(0..=5u32)?;
        out.extend_from_slice(&dims.to_le_bytes());
        for _ in 0..dims {
            let d: u64 = match u.int_in_range(0..=3u8)? {
                0 => u.arbitrary()?,
                _ => *u.choose(&[0u64, 1, 32, 64, 256])?,
            };
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&u.choose(&[0u32, 1, 3, 6, 8, 12, 14, 2, 99])?.to_le_bytes());
        let offset: u64 = if u.arbitrary()? { 0 } else { u.arbitrary()? };
        out.extend_from_slice(&offset.to_le_bytes());
    }
    // Padding and some data.
    let data = u.int_in_range(0..=512usize)?;
    out.extend(std::iter::repeat_n(0u8, data));
    Ok(out)
}

#[test]
fn gguf_headers() {
    let mut parsed = 0u64;
    run("gguf headers", 20_000, 2048, |u| {
        let mut bytes = gguf(u)?;
        mutate(u, &mut bytes)?;
        if let Ok(file) = GgufFile::parse(bytes) {
            parsed += 1;
            let _ = file.model_config();
            let _ = Tokenizer::from_gguf(&file);
            for t in &file.tensors {
                let _ = file.tensor_data(t).len();
            }
        }
        Ok(())
    });
    assert!(parsed > 0, "no generated GGUF ever parsed");
}

/// SmolLM2's tokenizer from the default model's GGUF, or `None` (skipped loudly) when the model
/// is not fetched; `PRFAAS_REQUIRE_MODEL=1` (CI) makes that a failure.
fn smollm2_tokenizer() -> Option<Tokenizer> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        assert!(
            std::env::var("PRFAAS_REQUIRE_MODEL").as_deref() != Ok("1"),
            "PRFAAS_REQUIRE_MODEL=1 but {} is missing (run scripts/fetch-model)",
            path.display()
        );
        eprintln!(
            "\n*** SKIPPED: tokenizer fuzzing of SmolLM2: {} not found (run scripts/fetch-model) ***\n",
            path.display()
        );
        return None;
    }
    let file = GgufFile::open(&path).expect("default model parses");
    Some(Tokenizer::from_gguf(&file).expect("tokenizer from GGUF"))
}

#[test]
fn tokenizer_input() {
    let Some(tok) = smollm2_tokenizer() else {
        return;
    };
    let text = TextSide {
        codec: TextCodec::Bpe(Box::new(tok.clone())),
        chat_template: Some(CHATML_TEMPLATE.into()),
        stop_tokens: vec![],
    };
    let vocab = tok.vocab_size() as u32;
    let (mut refused, mut checked) = (0u64, 0u64);
    run("tokenizer input", 5_000, 1024, |u| {
        let s = match u.int_in_range(0..=3u8)? {
            0 => {
                let mut parts = Vec::new();
                for _ in 0..u.int_in_range(0..=6u8)? {
                    parts.push(tricky_string(u)?);
                    parts.push(
                        (*u.choose(&[
                            "<|im_start|>",
                            "<|im_end|>",
                            "<|endoftext|>",
                            "\u{F0000}",
                            " ",
                            "\n\n",
                            "123456",
                        ])?)
                        .into(),
                    );
                }
                parts.concat()
            }
            _ => tricky_string(u)?,
        };
        let (bos, special) = (u.arbitrary()?, u.arbitrary()?);
        match tok.encode(&s, bos, special) {
            Ok(ids) => {
                assert!(
                    ids.iter().all(|&i| i < vocab),
                    "token id outside the vocabulary"
                );
                // Plain text either round-trips exactly or is refused (below): never altered.
                if !special && !bos {
                    let back = tok.decode(&ids, false).ok();
                    assert_eq!(back.as_deref(), Some(s.as_str()), "plain text altered");
                    checked += 1;
                }
            }
            Err(TokenizerError::Unrepresentable { .. }) => refused += 1,
            Err(e) => panic!("encoding {s:?} failed: {e}"),
        }
        let role = tricky_string(u)?;
        let msgs = vec![
            ChatMessage::new("system", "be brief"),
            ChatMessage::new(role, s.clone()),
        ];
        let _ = text.encode_chat(&msgs);
        // Arbitrary ids, in and out of the vocabulary, through every decoder.
        let ids: Vec<u32> = (0..u.int_in_range(0..=16u8)?)
            .map(|_| -> arbitrary::Result<u32> {
                Ok(if u.ratio(1, 8)? {
                    u.arbitrary()?
                } else {
                    u.int_in_range(0..=vocab + 2)?
                })
            })
            .collect::<arbitrary::Result<_>>()?;
        let _ = tok.decode(&ids, u.arbitrary()?);
        let mut d = tok.stream_decoder(u.arbitrary()?);
        for &i in &ids {
            let _ = d.push(i);
        }
        let _ = d.finish();
        Ok(())
    });
    eprintln!(
        "tokenizer: {checked} plain-text encodings round-tripped exactly, {refused} texts refused \
         (a byte without a token)"
    );
}

/// A JSON value of a random type, often one a field does not expect.
fn any_json(u: &mut Unstructured<'_>, depth: u32) -> arbitrary::Result<Value> {
    Ok(match u.int_in_range(0..=if depth > 2 { 5 } else { 7u8 })? {
        0 => Value::Null,
        1 => json!(u.arbitrary::<bool>()?),
        2 => json!(u.arbitrary::<i64>()?),
        3 => json!(*u.choose(&[-1.0, 0.0, 0.5, 1.0, 2.0, 100.0, 1e30, -1e30, 1e-30])?),
        4 => json!(u.arbitrary::<u64>()?),
        5 => json!(tricky_string(u)?),
        6 => Value::Array(
            (0..u.int_in_range(0..=3u8)?)
                .map(|_| any_json(u, depth + 1))
                .collect::<arbitrary::Result<_>>()?,
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..u.int_in_range(0..=3u8)? {
                m.insert(tricky_string(u)?, any_json(u, depth + 1)?);
            }
            Value::Object(m)
        }
    })
}

fn request_body(u: &mut Unstructured<'_>) -> arbitrary::Result<Value> {
    let mut body = serde_json::Map::new();
    if u.arbitrary()? {
        let mut messages = Vec::new();
        for _ in 0..u.int_in_range(0..=3u8)? {
            let content = match u.int_in_range(0..=3u8)? {
                0 => json!(tricky_string(u)?),
                1 => {
                    json!([{"type": "text", "text": tricky_string(u)?}, {"type": *u.choose(&["text", "image_url"])?}])
                }
                2 => Value::Null,
                _ => any_json(u, 1)?,
            };
            messages.push(json!({"role": *u.choose(&["user", "system", "assistant", "tool", ""])?, "content": content}));
        }
        body.insert("messages".into(), Value::Array(messages));
    }
    if u.arbitrary()? {
        let prompt = if u.arbitrary()? {
            json!(tricky_string(u)?)
        } else {
            any_json(u, 1)?
        };
        body.insert("prompt".into(), prompt);
    }
    const FIELDS: &[&str] = &[
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "tools",
        "tool_choice",
        "response_format",
        "echo",
        "suffix",
        "best_of",
        "user",
        "modalities",
    ];
    for _ in 0..u.int_in_range(0..=6u8)? {
        let f = *u.choose(FIELDS)?;
        let v = match (f, u.ratio(1, 2)?) {
            ("logit_bias", true) => {
                json!({ u.arbitrary::<u32>()?.to_string(): *u.choose(&[-100.0, 0.0, 100.0, 101.0])? })
            }
            ("stop", true) => json!([tricky_string(u)?, ""]),
            ("model", true) => json!("tiny"),
            ("stream_options", true) => json!({"include_usage": u.arbitrary::<bool>()?}),
            (_, true) => json!(*u.choose(&[0.0, 1.0, -1.0, 20.0, 21.0, 4096.0, 1e10])?),
            _ => any_json(u, 0)?,
        };
        body.insert(f.into(), v);
    }
    Ok(Value::Object(body))
}

#[test]
fn http_request_bodies() {
    let mut accepted = 0u64;
    let bounds = RequestBounds {
        max_context: 2048,
        vocab_size: 49152,
    };
    run("http request bodies", 20_000, 1024, |u| {
        let body = request_body(u)?;
        let mut bytes = serde_json::to_vec(&body).expect("json");
        mutate(u, &mut bytes)?;
        if let Ok(req) = parse_body(&bytes) {
            for endpoint in [Endpoint::Chat, Endpoint::Completions] {
                if validate(req.clone(), endpoint, "tiny", bounds).is_ok() {
                    accepted += 1;
                }
            }
        }
        Ok(())
    });
    assert!(accepted > 0, "no generated body was ever valid");
}
