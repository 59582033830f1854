//! `prfaas bench engine`: prefill/decode throughput and KV throughput Φ_kv of the model engine,
//! next to llama.cpp on the same GGUF file when `scripts/bench-llamacpp` has a cached build.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use prfaas_kernels::BackendKind;
use prfaas_node::engine::{Engine, EngineConfig, Model, NullSink};
use prfaas_node::kv::KvDType;
use serde_json::{json, Value};

use super::generate::{load_model, make_backend, LoadedModel, DEFAULT_MODEL};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print one JSON object with every figure instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Compute backend: auto, cpu or wgpu.
    #[arg(long, default_value = "auto")]
    pub backend: BackendKind,
    /// The real model for the prefill/decode figures.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Prompt lengths for prefill tok/s.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    pub prefill_lengths: Vec<usize>,
    /// Context lengths for Φ_kv (longer ones are skipped when the model's context or
    /// `--phi-max-tokens` does not allow them).
    #[arg(long, value_delimiter = ',', default_value = "1024,8192,32768")]
    pub phi_lengths: Vec<usize>,
    /// Longest context to prefill for Φ_kv on the real model (time grows quadratically).
    #[arg(long, default_value_t = 8192)]
    pub phi_max_tokens: usize,
    /// Decode steps timed per decode figure.
    #[arg(long, default_value_t = 64)]
    pub decode_steps: usize,
    /// Skip running llama.cpp even if its build is cached.
    #[arg(long)]
    pub no_llamacpp: bool,
    /// KV cache element types (`f16`, `f32`). The first one is used for every figure; with
    /// more than one, decode at batch 1 and 16 is also timed for each, alternating runs, and
    /// reported as ratios to the first.
    #[arg(long, value_delimiter = ',', default_value = "f16")]
    pub kv_dtype: Vec<KvDType>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Deterministic prompt of `n` ordinary token ids.
fn bench_prompt(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(300).max(1);
    (0..n)
        .map(|i| (256 + (i * 7919 + salt * 104_729) % span) as u32)
        .collect()
}

fn engine_for(
    loaded: &LoadedModel,
    backend: BackendKind,
    capacity: usize,
    kv_dtype: KvDType,
) -> anyhow::Result<Engine> {
    let be = make_backend(backend)?;
    let model = Model::new(loaded.config.clone(), &loaded.weights, be)?;
    let cfg = EngineConfig {
        prefix_cache: false,
        kv_dtype,
        ..EngineConfig::with_capacity(capacity)
    };
    Ok(Engine::new(model, cfg)?)
}

/// Median prefill time of an `n`-token prompt (fresh sequence each time, no prefix cache).
fn time_prefill(engine: &mut Engine, n: usize, reps: usize) -> anyhow::Result<Duration> {
    let vocab = engine.model().config().vocab_size;
    let mut times = Vec::with_capacity(reps);
    for r in 0..reps.max(1) {
        let p = bench_prompt(n, vocab, r);
        let t = Instant::now();
        let out = engine.prefill(&p, &mut NullSink)?;
        times.push(t.elapsed().as_secs_f64());
        engine.release(out.seq)?;
    }
    Ok(Duration::from_secs_f64(median(times)))
}

/// CPU time (user + system, all threads) this process has used, from `/proc/self/stat`
/// (`None` off Linux). In ticks of `USER_HZ`, which is 100 on every Linux ABI.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Decode throughput of one batch size: aggregate tok/s of wall time, and tokens per CPU-second
/// (all threads): on a shared machine the wall figure moves with everyone else's load, while CPU
/// time per token mostly does not (it still includes rayon's spinning).
#[derive(Debug, Clone, Copy)]
struct DecodeRate {
    tok_s: f64,
    tok_per_cpu_s: f64,
}

/// Prompt tokens of each sequence the decode figures time.
const DECODE_PROMPT: usize = 128;
/// The widest decode batch timed.
const DECODE_BATCH: usize = 16;

/// KV capacity (tokens) for the decode figures: every sequence of the widest batch with its
/// prompt and `steps` decoded tokens, plus a block of slack per sequence.
fn decode_capacity(steps: usize) -> usize {
    DECODE_BATCH * (DECODE_PROMPT + steps + 16)
}

/// Greedy decode of `batch` sequences with 128-token prompts (medians over `reps`).
fn time_decode(
    engine: &mut Engine,
    batch: usize,
    steps: usize,
    reps: usize,
) -> anyhow::Result<DecodeRate> {
    let vocab = engine.model().config().vocab_size;
    let mut rates = Vec::new();
    let mut cpu_rates = Vec::new();
    for r in 0..reps.max(1) {
        let mut live = Vec::with_capacity(batch);
        for b in 0..batch {
            let pre = engine.prefill(
                &bench_prompt(DECODE_PROMPT, vocab, 1000 + r * batch + b),
                &mut NullSink,
            )?;
            live.push((pre.seq, prfaas_node::engine::sampler::argmax(&pre.logits)));
        }
        let t = Instant::now();
        let cpu0 = process_cpu_seconds();
        for _ in 0..steps {
            let logits = engine.decode_step(&live)?;
            let ids = engine.backend().argmax(&logits.tensor)?;
            for (l, id) in live.iter_mut().zip(ids) {
                l.1 = id;
            }
        }
        rates.push((steps * batch) as f64 / t.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu0, process_cpu_seconds()) {
            if b > a {
                cpu_rates.push((steps * batch) as f64 / (b - a));
            }
        }
        for (s, _) in live {
            engine.release(s)?;
        }
    }
    Ok(DecodeRate {
        tok_s: median(rates),
        tok_per_cpu_s: median(cpu_rates),
    })
}

/// Φ_kv figures for one model: KV bytes/token and KV bytes / prefill time at each length.
fn phi_kv(
    loaded: &LoadedModel,
    backend: BackendKind,
    kv_dtype: KvDType,
    lengths: &[usize],
    max_tokens: usize,
    reps: usize,
) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    let mut bytes_per_token = 0;
    for &n in lengths {
        if n > loaded.config.max_context {
            let why = format!(
                "beyond the model's context of {}",
                loaded.config.max_context
            );
            rows.push(json!({ "tokens": n, "skipped": why }));
            continue;
        }
        if n > max_tokens {
            rows.push(json!({ "tokens": n, "skipped": "beyond --phi-max-tokens" }));
            continue;
        }
        let mut engine = engine_for(loaded, backend, n + 16, kv_dtype)?;
        bytes_per_token = engine.layout().bytes_per_token();
        let t = time_prefill(&mut engine, n, reps)?;
        let kv_bytes = engine.layout().export_bytes(n);
        let gbps = kv_bytes as f64 * 8.0 / t.as_secs_f64() / 1e9;
        // What the engine holds after this prefill (shared blocks + the sliding-window ring),
        // measured from its block accounting, not computed.
        let p = bench_prompt(n, engine.model().config().vocab_size, 77);
        let out = engine.prefill(&p, &mut NullSink)?;
        let held = engine.kv_bytes_used();
        engine.release(out.seq)?;
        rows.push(json!({
            "tokens": n,
            "prefill_s": t.as_secs_f64(),
            "prefill_tok_s": n as f64 / t.as_secs_f64(),
            "kv_bytes": kv_bytes,
            "kv_bytes_held": held,
            "phi_kv_gbps": gbps,
        }));
    }
    Ok(json!({
        "model": loaded.config.name,
        "kv_dtype": kv_dtype.to_string(),
        "kv_bytes_per_token": bytes_per_token,
        "points": rows,
    }))
}

/// `loaded` with every sliding-window layer made global (same weights, dense KV), for models
/// that have sliding-window layers; `None` otherwise.
fn every_layer_global(loaded: &LoadedModel) -> Option<LoadedModel> {
    use prfaas_node::engine::config::LayerKind;
    if !loaded
        .config
        .layers
        .iter()
        .any(|l| matches!(l, LayerKind::Sliding { .. }))
    {
        return None;
    }
    let mut dense = loaded.clone();
    for l in &mut dense.config.layers {
        if matches!(l, LayerKind::Sliding { .. }) {
            *l = LayerKind::Full;
        }
    }
    dense.config.name = format!("{} (every layer global)", loaded.config.name);
    Some(dense)
}

/// Runs `scripts/bench-llamacpp` when present and its build is already cached (building it takes
/// ~8 minutes, which a benchmark run should not trigger silently). It prints one JSON object:
/// `{"prefill_tok_s": {"128": x, ...}, "decode_tok_s": {"1": y, "16": z}, "batched_decode_tok_s": ...}`.
fn llamacpp(model: &str, prefill_lengths: &[usize]) -> Option<Value> {
    let script = Path::new("scripts/bench-llamacpp");
    let cache = std::env::var("LLAMACPP_DIR").unwrap_or_else(|_| "target/llamacpp".into());
    if !script.exists() || !Path::new(&cache).join("build/bin/llama-bench").exists() {
        tracing::info!(
            "llama.cpp comparison skipped: scripts/bench-llamacpp or its cached build is missing"
        );
        return None;
    }
    let out = std::process::Command::new(script)
        .arg("--model")
        .arg(model)
        .arg("--prompts")
        .arg(
            prefill_lengths
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .output()
        .ok()?;
    if !out.status.success() {
        tracing::warn!(
            "llama.cpp comparison failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Decode tok/s at batch 1 and 16 for each KV dtype, alternating dtypes run by run so that load
/// changes hit them alike; ratios are to the first dtype.
fn decode_by_kv_dtype(real: &LoadedModel, args: &Args) -> anyhow::Result<Value> {
    let mut engines = args
        .kv_dtype
        .iter()
        .map(|&d| engine_for(real, args.backend, decode_capacity(args.decode_steps), d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut runs = vec![[Vec::new(), Vec::new()]; engines.len()];
    for _ in 0..args.reps.max(1) {
        for (e, r) in engines.iter_mut().zip(&mut runs) {
            r[0].push(time_decode(e, 1, args.decode_steps, 1)?.tok_s);
            r[1].push(time_decode(e, DECODE_BATCH, args.decode_steps / 2, 1)?.tok_s);
        }
    }
    let med: Vec<[f64; 2]> = runs
        .into_iter()
        .map(|[a, b]| [median(a), median(b)])
        .collect();
    Ok(json!(args
        .kv_dtype
        .iter()
        .zip(&med)
        .map(|(d, m)| json!({
            "kv_dtype": d.to_string(),
            "batch1_tok_s": m[0],
            "batch16_tok_s": m[1],
            "batch1_vs_first": m[0] / med[0][0],
            "batch16_vs_first": m[1] / med[0][1],
        }))
        .collect::<Vec<_>>()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let backend_info = make_backend(args.backend)?.info();
    let kv_dtype = args.kv_dtype.first().copied().unwrap_or_default();
    let mut report =
        json!({ "backend": backend_info.description, "kv_dtype": kv_dtype.to_string() });
    let mut phi = Vec::new();

    match load_model(&args.model) {
        Ok(real) => {
            let longest = args.prefill_lengths.iter().copied().max().unwrap_or(0);
            let mut engine = engine_for(
                &real,
                args.backend,
                longest.max(decode_capacity(args.decode_steps)) + 64,
                kv_dtype,
            )
            .context("building the engine for the real model")?;
            let mut prefill = Vec::new();
            for &n in &args.prefill_lengths {
                let t = time_prefill(&mut engine, n, args.reps)?;
                prefill.push(json!({ "tokens": n, "tok_s": n as f64 / t.as_secs_f64() }));
            }
            let d1 = time_decode(&mut engine, 1, args.decode_steps, args.reps)?;
            let d16 = time_decode(
                &mut engine,
                DECODE_BATCH,
                args.decode_steps / 2,
                args.reps.min(3),
            )?;
            report["model"] = json!(real.config.name);
            report["prefill"] = json!(prefill);
            report["decode"] = json!([
                { "batch": 1, "tok_s": d1.tok_s, "tok_per_cpu_s": d1.tok_per_cpu_s },
                { "batch": 16, "tok_s": d16.tok_s, "tok_per_cpu_s": d16.tok_per_cpu_s },
            ]);
            report["decode_batch16_over_batch1"] = json!(d16.tok_s / d1.tok_s);
            report["decode_batch16_over_batch1_cpu_time"] =
                json!(d16.tok_per_cpu_s / d1.tok_per_cpu_s);
            drop(engine);
            if args.kv_dtype.len() > 1 {
                report["decode_by_kv_dtype"] = decode_by_kv_dtype(&real, &args)?;
            }
            phi.push(phi_kv(
                &real,
                args.backend,
                kv_dtype,
                &args.phi_lengths,
                args.phi_max_tokens,
                1,
            )?);
            // The paper's comparison on a hybrid model: the same weights with every layer
            // global (dense KV), as if the model had no sliding windows.
            if let Some(dense) = every_layer_global(&real) {
                phi.push(phi_kv(
                    &dense,
                    args.backend,
                    kv_dtype,
                    &args.phi_lengths,
                    args.phi_max_tokens,
                    1,
                )?);
            }
            if !args.no_llamacpp {
                let model = prfaas_node::engine::loader::resolve_alias(&args.model);
                if let Some(ll) = llamacpp(model, &args.prefill_lengths) {
                    report["ratios_vs_llamacpp"] = ratios(&report, &ll);
                    report["llamacpp"] = ll;
                }
            }
        }
        Err(e) => {
            report["model_skipped"] = json!(format!("{e:#}"));
        }
    }
    for name in ["tiny-dense", "tiny-hybrid"] {
        let m = load_model(name)?;
        phi.push(phi_kv(
            &m,
            args.backend,
            kv_dtype,
            &args.phi_lengths,
            usize::MAX,
            1,
        )?);
    }
    report["phi_kv"] = json!(phi);

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// `ours / llama.cpp` for every figure both sides have.
fn ratios(ours: &Value, theirs: &Value) -> Value {
    let mut out = Vec::new();
    for (key, field, theirs_key) in [
        ("prefill", "tokens", "prefill_tok_s"),
        ("decode", "batch", "decode_tok_s"),
    ] {
        for x in ours[key].as_array().into_iter().flatten() {
            let n = x[field].to_string();
            if let (Some(p), Some(q)) = (x["tok_s"].as_f64(), theirs[theirs_key][&n].as_f64()) {
                out.push(json!({ "figure": key, field: x[field], "ours_tok_s": p, "llamacpp_tok_s": q, "ratio": p / q }));
            }
        }
    }
    json!(out)
}

fn print_table(r: &Value) {
    println!("backend: {}", r["backend"].as_str().unwrap_or("?"));
    if let Some(s) = r["model_skipped"].as_str() {
        println!("real model skipped: {s}");
    }
    if let Some(m) = r["model"].as_str() {
        println!("model: {m}");
        for p in r["prefill"].as_array().into_iter().flatten() {
            println!(
                "  prefill {:>5} tokens: {:>9.1} tok/s",
                p["tokens"],
                p["tok_s"].as_f64().unwrap_or(0.0)
            );
        }
        for d in r["decode"].as_array().into_iter().flatten() {
            println!(
                "  decode batch {:>3}:     {:>9.1} tok/s ({:.1} tokens per CPU-second)",
                d["batch"],
                d["tok_s"].as_f64().unwrap_or(0.0),
                d["tok_per_cpu_s"].as_f64().unwrap_or(f64::NAN)
            );
        }
        println!(
            "  batch 16 / batch 1: {:.2}x wall, {:.2}x per CPU-second",
            r["decode_batch16_over_batch1"].as_f64().unwrap_or(f64::NAN),
            r["decode_batch16_over_batch1_cpu_time"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
    }
    for d in r["decode_by_kv_dtype"].as_array().into_iter().flatten() {
        println!(
            "  KV {}: decode batch 1 {:.1} tok/s ({:.2}x), batch 16 {:.1} tok/s ({:.2}x) (alternating runs)",
            d["kv_dtype"].as_str().unwrap_or("?"),
            d["batch1_tok_s"].as_f64().unwrap_or(f64::NAN),
            d["batch1_vs_first"].as_f64().unwrap_or(f64::NAN),
            d["batch16_tok_s"].as_f64().unwrap_or(f64::NAN),
            d["batch16_vs_first"].as_f64().unwrap_or(f64::NAN),
        );
    }
    for x in r["ratios_vs_llamacpp"].as_array().into_iter().flatten() {
        let what = if x["figure"] == "prefill" {
            format!("prefill {}", x["tokens"])
        } else {
            format!("decode b{}", x["batch"])
        };
        println!(
            "  vs llama.cpp {what}: {:.1} vs {:.1} tok/s = {:.2}x",
            x["ours_tok_s"].as_f64().unwrap_or(0.0),
            x["llamacpp_tok_s"].as_f64().unwrap_or(0.0),
            x["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    let batched = &r["llamacpp"]["batched_decode_tok_s"];
    if let (Some(b1), Some(b16)) = (batched["1"].as_f64(), batched["16"].as_f64()) {
        println!(
            "  llama.cpp batch 16 / batch 1 (llama-batched-bench, same prompts): {b16:.1} / {b1:.1} tok/s = {:.2}x",
            b16 / b1
        );
    }
    for m in r["phi_kv"].as_array().into_iter().flatten() {
        println!(
            "Φ_kv {} (KV {} bytes/token, {}):",
            m["model"].as_str().unwrap_or("?"),
            m["kv_bytes_per_token"],
            m["kv_dtype"].as_str().unwrap_or("?")
        );
        for p in m["points"].as_array().into_iter().flatten() {
            match p["phi_kv_gbps"].as_f64() {
                Some(g) => println!(
                    "  {:>6} tokens: prefill {:>8.1} tok/s, KV sent {:>12} bytes, held {:>12} bytes, Φ_kv {:>8.3} Gbps",
                    p["tokens"],
                    p["prefill_tok_s"].as_f64().unwrap_or(0.0),
                    p["kv_bytes"],
                    p["kv_bytes_held"],
                    g
                ),
                None => println!(
                    "  {:>6} tokens: skipped ({})",
                    p["tokens"],
                    p["skipped"].as_str().unwrap_or("")
                ),
            }
        }
    }
}
