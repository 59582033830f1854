//! Model engine: configs, weights, tokenizer, forward pass split as prefill / decode.

pub mod config;

pub use config::{LayerKind, ModelConfig, ModelWeights};
