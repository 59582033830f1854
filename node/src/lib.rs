//! prfaas node: the model engine (`engine`, `kv`) and, later, the actix serving node.

pub mod engine;
pub mod kv;
