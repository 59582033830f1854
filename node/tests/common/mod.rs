//! Helpers shared by the node's model tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use prfaas_node::engine::gguf::{load_gguf, LoadedModel};

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
