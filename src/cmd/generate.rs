//! `prfaas generate`: run a model on this machine and stream its tokens to stdout.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use prfaas_kernels::BackendKind;
use prfaas_node::engine::chat::ChatMessage;
use prfaas_node::engine::{Engine, EngineConfig, Model, SamplingParams};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A GGUF file, an HF model directory (`config.json`, `*.safetensors`, `tokenizer.json`), a
    /// fetchable model's alias (`gemma3-270m`), or a built-in synthetic model: `tiny-hybrid`,
    /// `tiny-dense`.
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

pub(crate) use prfaas_node::engine::loader::{
    load_model, make_backend, ModelBundle as LoadedModel, TextSide, Utf8Stream, DEFAULT_MODEL,
};

pub fn run(args: Args) -> anyhow::Result<()> {
    let t_load = Instant::now();
    let loaded = load_model(&args.model)?;
    let backend = make_backend(args.backend)?;
    let info = backend.info();
    let prompt = if args.chat {
        chat_prompt(&loaded.text, &args.prompt)?
    } else {
        loaded.text.codec.encode(&args.prompt, false)?
    };
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
        stop_tokens: loaded.text.stop_tokens.clone(),
        max_tokens: args.max_tokens,
        ..SamplingParams::default()
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut stream = Utf8Stream::default();
    let codec = &loaded.text.codec;
    let stops = &loaded.text.stop_tokens;
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

/// The prompt as one user message in the model's chat template, tokenized.
fn chat_prompt(text: &TextSide, prompt: &str) -> anyhow::Result<Vec<u32>> {
    if text.chat_template.is_none() {
        tracing::warn!("model has no chat template; using the raw prompt");
    }
    Ok(text.encode_chat(&[ChatMessage::new("user", prompt)])?)
}
