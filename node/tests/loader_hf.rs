//! HF directory loader tests on a tiny Llama/Qwen2-shaped model written here (config.json,
//! safetensors, tokenizer.json, tokenizer_config.json), plus corrupt and inconsistent variants.

mod common;

use std::path::Path;

use common::TestDir;

use prfaas_kernels::{DType, RopeStyle};
use prfaas_node::engine::config::MixerWeights;
use prfaas_node::engine::hf::{load_hf_dir, HfError};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

const H: usize = 64;
const FF: usize = 96;
const V: usize = 260;
const LAYERS: usize = 2;

fn fresh_dir(name: &str) -> TestDir {
    common::fresh_dir("prfaas-hf", name)
}

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

fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_chars().iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    vocab.insert("he".into(), json!(256));
    vocab.insert("hel".into(), json!(257));
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(258, "<|im_start|>"), added(259, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["h e", "he l"]}
    })
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect()
}

/// (name, shape) of every tensor of the tiny model.
fn tensor_specs(qkv_bias: bool) -> Vec<(String, Vec<usize>)> {
    let mut t = vec![
        ("model.embed_tokens.weight".to_string(), vec![V, H]),
        ("model.norm.weight".into(), vec![H]),
    ];
    for i in 0..LAYERS {
        let n = |s: &str| format!("model.layers.{i}.{s}");
        t.push((n("input_layernorm.weight"), vec![H]));
        t.push((n("self_attn.q_proj.weight"), vec![H, H]));
        t.push((n("self_attn.k_proj.weight"), vec![32, H]));
        t.push((n("self_attn.v_proj.weight"), vec![32, H]));
        t.push((n("self_attn.o_proj.weight"), vec![H, H]));
        if qkv_bias {
            t.push((n("self_attn.q_proj.bias"), vec![H]));
            t.push((n("self_attn.k_proj.bias"), vec![32]));
            t.push((n("self_attn.v_proj.bias"), vec![32]));
        }
        t.push((n("post_attention_layernorm.weight"), vec![H]));
        t.push((n("mlp.gate_proj.weight"), vec![FF, H]));
        t.push((n("mlp.up_proj.weight"), vec![FF, H]));
        t.push((n("mlp.down_proj.weight"), vec![H, FF]));
    }
    t
}

/// Value i of every tensor: exactly representable in bf16.
fn value(i: usize) -> f32 {
    ((i % 17) as f32 - 8.0) * 0.125
}

fn write_model(dir: &Path, model_type: &str, specs: &[(String, Vec<usize>)]) {
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": model_type, "vocab_size": V, "hidden_size": H,
        "intermediate_size": FF, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 500000.0,
        "max_position_embeddings": 1024, "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .iter()
        .map(|(n, s)| {
            let vals: Vec<f32> = (0..s.iter().product::<usize>()).map(value).collect();
            (n.clone(), s.clone(), bf16_bytes(&vals))
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::BF16, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let tc = json!({"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

#[test]
fn tiny_llama_dir_loads() {
    let dir = fresh_dir("llama");
    write_model(&dir, "llama", &tensor_specs(false));
    let m = load_hf_dir(&dir).unwrap();
    let c = &m.config;
    assert_eq!(
        (
            c.arch.as_str(),
            c.n_layers(),
            c.hidden_size,
            c.intermediate_size
        ),
        ("llama", 2, 64, 96)
    );
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size),
        (2, 1, 32, V)
    );
    assert_eq!(c.rope_style, RopeStyle::Neox);
    assert_eq!(c.rope_base, 500000.0);
    assert!(c.tie_embeddings && m.weights.output.is_none());
    assert!(!c.qkv_bias);
    let MixerWeights::Attention(a) = &m.weights.layers[1].mixer else {
        panic!("expected attention")
    };
    assert_eq!((a.wk.dtype, a.wk.shape.clone()), (DType::F32, vec![32, 64]));
    // bf16 widened exactly.
    let wk: Vec<f32> =
        a.wk.bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
    assert_eq!(wk, (0..32 * 64).map(value).collect::<Vec<_>>());
    assert!(m
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("im_start")));
    assert_eq!(m.weights_hash.len(), 64);
    let t = &m.tokenizer;
    assert_eq!(
        t.encode("hello", false, false).unwrap(),
        vec![256 + 1, b'l' as u32, b'o' as u32]
    );
    assert_eq!(
        t.encode("<|im_start|>hello", false, true).unwrap(),
        vec![258, 257, b'l' as u32, b'o' as u32]
    );
    assert_eq!(
        t.decode(&[258, 257, b'l' as u32], false).unwrap(),
        "<|im_start|>hell"
    );
    assert!(t.is_eog(259));
}

#[test]
fn qwen2_requires_qkv_biases_and_qwen3_is_refused() {
    let dir = fresh_dir("qwen2");
    write_model(&dir, "qwen2", &tensor_specs(true));
    let m = load_hf_dir(&dir).unwrap();
    assert!(m.config.qkv_bias);
    let MixerWeights::Attention(a) = &m.weights.layers[0].mixer else {
        panic!("expected attention")
    };
    assert_eq!(a.bk.as_ref().map(|b| b.shape.clone()), Some(vec![32]));

    let dir = fresh_dir("qwen2-nobias");
    write_model(&dir, "qwen2", &tensor_specs(false));
    assert!(
        matches!(load_hf_dir(&dir), Err(HfError::MissingTensor(n)) if n.ends_with("q_proj.bias"))
    );

    let dir = fresh_dir("qwen3");
    write_model(&dir, "qwen3", &tensor_specs(false));
    assert!(matches!(load_hf_dir(&dir), Err(HfError::UnsupportedArch(a)) if a == "qwen3"));
}

#[test]
fn corrupt_safetensors_give_clear_errors() {
    let dir = fresh_dir("corrupt");
    write_model(&dir, "llama", &tensor_specs(false));
    let st = dir.join("model.safetensors");
    let good = std::fs::read(&st).unwrap();
    // Truncated at several points: header length, header, data.
    for cut in [0, 4, 8, 20, good.len() / 2, good.len() - 1] {
        std::fs::write(&st, &good[..cut]).unwrap();
        let e = load_hf_dir(&dir).unwrap_err();
        assert!(matches!(e, HfError::Safetensors { .. }), "cut {cut}: {e}");
        assert!(e.to_string().contains("model.safetensors"), "{e}");
    }
    // A header length of 2^63 and a header that is not JSON.
    let mut hostile = (1u64 << 63).to_le_bytes().to_vec();
    hostile.extend_from_slice(b"{}");
    std::fs::write(&st, &hostile).unwrap();
    assert!(matches!(
        load_hf_dir(&dir),
        Err(HfError::Safetensors { .. })
    ));
    let mut garbage = 8u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"not json");
    std::fs::write(&st, &garbage).unwrap();
    assert!(matches!(
        load_hf_dir(&dir),
        Err(HfError::Safetensors { .. })
    ));
    std::fs::remove_file(&st).unwrap();
    assert!(matches!(load_hf_dir(&dir), Err(HfError::NoWeights(_))));
}

#[test]
fn inconsistent_configs_and_shapes_are_typed_errors() {
    let dir = fresh_dir("shape");
    let mut specs = tensor_specs(false);
    specs[3].1 = vec![H, 32]; // layer 0 q_proj transposed
    write_model(&dir, "llama", &specs);
    assert!(matches!(load_hf_dir(&dir), Err(HfError::BadShape { .. })));

    let dir = fresh_dir("badjson");
    write_model(&dir, "llama", &tensor_specs(false));
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\"}").unwrap();
    assert!(matches!(load_hf_dir(&dir), Err(HfError::Json { .. })));

    let dir = fresh_dir("badtok");
    write_model(&dir, "llama", &tensor_specs(false));
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    assert!(matches!(load_hf_dir(&dir), Err(HfError::Tokenizer(_))));

    assert!(matches!(
        load_hf_dir(Path::new("/nonexistent/prfaas")),
        Err(HfError::Io { .. })
    ));
}
