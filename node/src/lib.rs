//! prfaas node: the model engine (`engine`, `kv`), the actix serving actors (`actors`), the
//! OpenAI-compatible HTTP API (`api`) and the contract between them (`service`).

pub mod api;
pub mod engine;
pub mod kv;
pub mod metrics;
pub mod service;
