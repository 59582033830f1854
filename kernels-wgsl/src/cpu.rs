//! Native CPU backend (placeholder: being implemented).

/// Host memory behind a CPU tensor.
pub struct CpuStorage {
    pub(crate) bytes: std::sync::RwLock<Vec<u8>>,
}
