//! Model engine: configs, weights, tokenizer, forward pass split as prefill / decode.

pub mod chat;
pub mod config;
#[allow(clippy::module_inception)]
pub mod engine;
pub mod gguf;
pub mod hf;
pub mod loader;
pub mod model;
pub mod sampler;
pub mod sink;
pub mod spm;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use config::{LayerKind, ModelConfig, ModelWeights};
pub use engine::verify::{VerifyConfig, VerifyReport};
pub use engine::{Engine, EngineConfig, EngineError, Generation, PrefillOutput, SeqId, StepLogits};
pub use model::{Model, ModelError};
pub use sampler::{logprobs_of, FinishReason, Sampler, SamplingParams, TokenLogprobs};
pub use sink::{CollectSink, KvExport, KvPiece, KvSink, LayerKv, NullSink, SinkError};
pub use synthetic::{synthetic_model, ByteTokenizer, SyntheticKind};
