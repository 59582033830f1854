//! Helpers shared by the node's model tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prfaas_kernels::cpu::CpuBackend;
use prfaas_kernels::Backend;
use prfaas_node::engine::gguf::{load_gguf, LoadedModel};
use prfaas_node::engine::sampler::argmax;
use prfaas_node::engine::{Engine, EngineConfig, LayerKv, Model, NullSink};
use prfaas_node::kv::wire::{decode_int8, encode_int8, INT8_BLOCK};

/// `models/<file>` of the repository.
pub fn model_file(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(file)
}

/// Loads `path`, or skips loudly when it is missing (`None`), unless `require_var=1` makes the
/// missing file a failure. `fetch` is the command that gets the file.
pub fn load_or_skip(path: &Path, require_var: &str, fetch: &str) -> Option<LoadedModel> {
    if !path.exists() {
        let required = std::env::var(require_var).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{require_var}=1 but {} is missing (run {fetch})",
            path.display()
        );
        eprintln!(
            "\n*** SKIPPED: {} not found (run {fetch}) ***\n",
            path.display()
        );
        return None;
    }
    Some(load_gguf(path).unwrap_or_else(|e| panic!("{} loads: {e}", path.display())))
}

/// Gemma 3 270M (`models/gemma-3-270m-q4_k_m.gguf`), or a loud skip (`None`); with
/// `PRFAAS_REQUIRE_GEMMA=1` a missing file fails the test.
pub fn load_gemma3() -> Option<LoadedModel> {
    load_or_skip(
        &model_file("gemma-3-270m-q4_k_m.gguf"),
        "PRFAAS_REQUIRE_GEMMA",
        "scripts/fetch-model gemma3-270m",
    )
}

/// A cpu-backend engine for `m` with room for 512 tokens, prefilling in chunks of 64.
pub fn cpu_engine(m: &LoadedModel) -> Engine {
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

/// Teacher-forced figures of one engine configuration on the llama.cpp fixture.
pub struct FixtureRun {
    pub steps: usize,
    pub sum_err: f32,
    pub max_err: f32,
    pub overlap: usize,
    pub clear: usize,
    pub clear_agree: usize,
    /// Our logits at every step, for comparing configurations with each other.
    pub logits: Vec<Vec<f32>>,
}

impl FixtureRun {
    pub fn mean_err(&self) -> f32 {
        self.sum_err / (self.steps * 5) as f32
    }
    pub fn line(&self, what: &str) -> String {
        format!(
            "{what}: {} steps, logit err vs llama.cpp mean {:.3} max {:.3}, top-5 overlap {:.2}/5, \
             greedy agreement on clear-margin steps {}/{}",
            self.steps,
            self.mean_err(),
            self.max_err,
            self.overlap as f32 / self.steps as f32,
            self.clear_agree,
            self.clear
        )
    }
}

pub fn fixture_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Runs a llama.cpp greedy fixture (`path`, see `scripts/make-fixtures`), teacher-forced, for the
/// first `steps_per_case` steps of each case, on engines from `make`. With `int8_wire` the
/// prompt's KV goes through the int8 wire codec (paged layers) into a second engine, which
/// decodes: what a home sees after an int8 transfer. The first step's logits are the prefill's
/// (the trailer carries them exactly).
pub fn run_fixture(
    path: &Path,
    make: &dyn Fn() -> Engine,
    int8_wire: bool,
    steps_per_case: usize,
) -> FixtureRun {
    let text = std::fs::read_to_string(path).expect("fixture present");
    let fx: serde_json::Value = serde_json::from_str(&text).expect("fixture parses");
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 5);
    let mut r = FixtureRun {
        steps: 0,
        sum_err: 0.0,
        max_err: 0.0,
        overlap: 0,
        clear: 0,
        clear_agree: 0,
        logits: Vec::new(),
    };
    let mut e = make();
    let mut home = int8_wire.then(make);
    for case in cases {
        let prompt = fixture_ids(&case["prompt_ids"]);
        let cont = fixture_ids(&case["continuation_ids"]);
        let tops = case["top_logits"].as_array().expect("top_logits");
        let pre = e.prefill(&prompt, &mut NullSink).unwrap();
        let (d, seq) = match home.as_mut() {
            Some(h) => {
                let mut export = e.export_kv(pre.seq).unwrap();
                e.release(pre.seq).unwrap();
                for kv in &mut export.layers {
                    if let LayerKv::Paged { k, v } = kv {
                        for x in [k, v] {
                            let mut bytes = Vec::new();
                            encode_int8(x, INT8_BLOCK, &mut bytes).unwrap();
                            *x = decode_int8(&bytes, x.len(), INT8_BLOCK).unwrap();
                        }
                    }
                }
                let seq = h.import_kv(&export).unwrap();
                (h, seq)
            }
            None => (&mut e, pre.seq),
        };
        let mut logits = pre.logits;
        for (i, top) in tops.iter().take(steps_per_case).enumerate() {
            let top: Vec<(u32, f32)> = top
                .as_array()
                .expect("top list")
                .iter()
                .map(|p| {
                    (
                        p[0].as_u64().expect("id") as u32,
                        p[1].as_f64().expect("logit") as f32,
                    )
                })
                .collect();
            for &(id, l) in &top {
                let err = (logits[id as usize] - l).abs();
                r.sum_err += err;
                r.max_err = r.max_err.max(err);
            }
            let mut ours: Vec<u32> = (0..logits.len() as u32).collect();
            ours.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            r.overlap += top.iter().filter(|(id, _)| ours[..5].contains(id)).count();
            if top.len() >= 2 && top[0].1 - top[1].1 > 0.5 {
                r.clear += 1;
                if ours[0] == top[0].0 {
                    r.clear_agree += 1;
                }
            }
            r.steps += 1;
            r.logits.push(logits.clone());
            let Some(&next) = cont.get(i) else { break };
            if i + 1 < tops.len().min(steps_per_case) {
                let s = d.decode_step(&[(seq, next)]).unwrap();
                logits = d.backend().download(&s.tensor).unwrap();
            }
        }
        d.release(seq).unwrap();
    }
    r
}

/// Max and mean |a − b| over every step's logits, and how often the argmax agrees.
pub fn compare_runs(a: &FixtureRun, b: &FixtureRun) -> (f32, f32, usize) {
    let (mut max, mut sum, mut n, mut agree) = (0f32, 0f64, 0usize, 0);
    for (x, y) in a.logits.iter().zip(&b.logits) {
        for (p, q) in x.iter().zip(y) {
            max = max.max((p - q).abs());
            sum += f64::from((p - q).abs());
            n += 1;
        }
        if argmax(x) == argmax(y) {
            agree += 1;
        }
    }
    (max, (sum / n.max(1) as f64) as f32, agree)
}

/// Unique empty directory per test (tests run in parallel), removed when the test ends, passed
/// or failed.
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh `<tmp>/<prefix>-<pid>-<name>` directory.
pub fn fresh_dir(prefix: &str, name: &str) -> TestDir {
    let d = std::env::temp_dir().join(format!("{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TestDir(d)
}
