//! `prfaas generate`: run a model on this machine and stream its tokens to stdout.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use prfaas_kernels::{Backend, BackendKind};
use prfaas_node::engine::chat::{ChatMessage, ChatTemplate};
use prfaas_node::engine::gguf::load_gguf;
use prfaas_node::engine::synthetic::{synthetic_model, ByteTokenizer, SyntheticKind, DEFAULT_SEED};
use prfaas_node::engine::tokenizer::Tokenizer;
use prfaas_node::engine::{Engine, EngineConfig, Model, ModelConfig, ModelWeights, SamplingParams};

/// Where `scripts/fetch-model` puts the default model.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A GGUF file, or a built-in synthetic model: `tiny-hybrid`, `tiny-dense`.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Maximum number of generated tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// RNG seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute backend: auto, cpu or wgpu.
    #[arg(long, default_value = "auto")]
    pub backend: BackendKind,
}

/// Turns token ids into text for the model at hand.
pub(crate) enum TextCodec {
    Bytes(ByteTokenizer),
    Bpe(Box<Tokenizer>),
}

impl TextCodec {
    /// Token ids of `text`; `special` parses control tokens such as `<|im_start|>` in it.
    pub(crate) fn encode(&self, text: &str, special: bool) -> anyhow::Result<Vec<u32>> {
        match self {
            TextCodec::Bytes(t) => Ok(t.encode(text)),
            TextCodec::Bpe(t) => Ok(t.encode(text, t.add_bos(), special)?),
        }
    }
    /// Raw bytes of one token (a token may be part of a UTF-8 character).
    fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self {
            TextCodec::Bytes(t) => t.token_bytes(id),
            TextCodec::Bpe(t) => t
                .token_bytes(id, true)
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
        }
    }
    fn token_text(&self, id: Option<u32>) -> String {
        match (self, id) {
            (TextCodec::Bpe(t), Some(id)) => {
                String::from_utf8_lossy(t.token_bytes(id, false).unwrap_or_default()).into_owned()
            }
            _ => String::new(),
        }
    }
}

/// A model read from disk or generated, not yet on a backend.
pub(crate) struct LoadedModel {
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub codec: TextCodec,
    pub chat_template: Option<String>,
    /// Tokens that end generation (EOS, `<|im_end|>`).
    pub stop_tokens: Vec<u32>,
}

/// Loads `spec`: a synthetic model name or a GGUF path.
pub(crate) fn load_model(spec: &str) -> anyhow::Result<LoadedModel> {
    if let Some(kind) = SyntheticKind::from_name(spec) {
        let (config, weights) = synthetic_model(kind, DEFAULT_SEED);
        let codec = ByteTokenizer;
        return Ok(LoadedModel {
            config,
            weights,
            stop_tokens: vec![codec.eos()],
            codec: TextCodec::Bytes(codec),
            chat_template: None,
        });
    }
    let path = Path::new(spec);
    if !path.exists() {
        if spec == DEFAULT_MODEL {
            anyhow::bail!("model file {spec} not found: run `scripts/fetch-model` to download it");
        }
        anyhow::bail!("model file {spec} not found (or use `tiny-hybrid` / `tiny-dense`)");
    }
    let m = load_gguf(path).with_context(|| format!("loading {spec}"))?;
    let stop_tokens = (0..m.tokenizer.vocab_size() as u32)
        .filter(|&t| m.tokenizer.is_eog(t))
        .collect();
    Ok(LoadedModel {
        config: m.config,
        weights: m.weights,
        codec: TextCodec::Bpe(Box::new(m.tokenizer)),
        chat_template: m.chat_template,
        stop_tokens,
    })
}

/// The backend for `kind`, following `select_backend`'s `auto` rule.
pub(crate) fn make_backend(kind: BackendKind) -> anyhow::Result<Arc<dyn Backend>> {
    match kind {
        BackendKind::Cpu => Ok(Arc::new(prfaas_kernels::cpu::CpuBackend::new())),
        _ => prfaas_kernels::select_backend(kind).with_context(|| format!("backend `{kind}`")),
    }
}

/// Streams decoded text while holding back incomplete UTF-8 sequences.
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) if e.error_len().is_none() => {
                // Incomplete character at the end: emit the valid part, keep the rest.
                let valid = e.valid_up_to();
                let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                out
            }
            Err(_) => {
                let out = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                out
            }
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let t_load = Instant::now();
    let loaded = load_model(&args.model)?;
    let backend = make_backend(args.backend)?;
    let info = backend.info();
    let text = if args.chat {
        render_chat(&loaded, &args.prompt)?
    } else {
        args.prompt.clone()
    };
    let prompt = loaded.codec.encode(&text, args.chat)?;
    let capacity = (prompt.len() + args.max_tokens + 64).min(loaded.config.max_context.max(1));
    let model = Model::new(loaded.config.clone(), &loaded.weights, backend)?;
    let mut engine = Engine::new(model, EngineConfig::with_capacity(capacity))?;
    tracing::info!(
        model = %loaded.config.name,
        backend = %info.description,
        load_ms = t_load.elapsed().as_millis() as u64,
        prompt_tokens = prompt.len(),
        "generating"
    );
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_tokens: loaded.stop_tokens.clone(),
        max_tokens: args.max_tokens,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut stream = Utf8Stream {
        pending: Vec::new(),
    };
    let codec = &loaded.codec;
    let stops = &loaded.stop_tokens;
    let mut write_err = None;
    let g = engine.generate(&prompt, &params, &mut |tok| {
        if stops.contains(&tok) {
            return;
        }
        let s = stream.push(&codec.token_bytes(tok));
        if let Err(e) = out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
            write_err.get_or_insert(e);
        }
    })?;
    let tail = stream.push(&[]);
    writeln!(out, "{tail}")?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    let decode_tokens = g.tokens.len().saturating_sub(1);
    eprintln!(
        "prefill: {} tokens in {:.3} s ({:.1} tok/s) | decode: {} tokens in {:.3} s ({:.1} tok/s) | backend: {} | finish: {:?}",
        g.prompt_tokens,
        g.prefill_time.as_secs_f64(),
        g.prompt_tokens as f64 / g.prefill_time.as_secs_f64().max(1e-9),
        decode_tokens,
        g.decode_time.as_secs_f64(),
        decode_tokens as f64 / g.decode_time.as_secs_f64().max(1e-9),
        info.description,
        g.finish,
    );
    Ok(())
}

/// The prompt as one user message in the model's chat template.
fn render_chat(loaded: &LoadedModel, prompt: &str) -> anyhow::Result<String> {
    match &loaded.chat_template {
        None => {
            tracing::warn!("model has no chat template; using the raw prompt");
            Ok(prompt.to_string())
        }
        Some(src) => {
            let (bos, eos) = match &loaded.codec {
                TextCodec::Bpe(t) => (
                    loaded.codec.token_text(t.bos()),
                    loaded.codec.token_text(t.eos()),
                ),
                TextCodec::Bytes(_) => (String::new(), String::new()),
            };
            let tpl = ChatTemplate::new(src, &bos, &eos)?;
            Ok(tpl.render(&[ChatMessage::new("user", prompt)], true)?)
        }
    }
}
