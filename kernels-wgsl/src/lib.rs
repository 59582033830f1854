//! Compute backends for prfaas.
//!
//! * [`cpu`]: native, multi-threaded kernels (matmul on the `gemm` crate, quantized dot products).
//! * [`gpu`]: portable WGSL kernels run through wgpu (Vulkan, Metal, DX12; Mesa lavapipe in CI).
//! * [`reference`]: plain, obvious Rust twins of every kernel, used as the oracle in tests.
//!
//! Both backends implement [`Backend`]. [`select_backend`] applies the `auto` rule: `wgpu` on a
//! discrete or integrated GPU, `cpu` when the only adapter is a software one or none exists.
//! `PRFAAS_REQUIRE_GPU=1` turns a missing adapter into an error instead of a fallback.

pub mod backend;
pub mod bench;
pub mod cpu;
pub mod gpu;
pub mod kv;
pub mod quant;
pub mod reference;

pub use backend::{
    AttnParams, AttnSeq, Backend, BackendInfo, BackendKind, DType, GluAct, HostTensor, KernelError,
    LinearAttnParams, Result, RopeStyle, Tensor,
};
pub use kv::KvElem;

use std::sync::Arc;

/// Environment variable that makes "no GPU adapter" an error instead of a CPU fallback.
pub const REQUIRE_GPU_ENV: &str = "PRFAAS_REQUIRE_GPU";

/// True when `PRFAAS_REQUIRE_GPU` is set to a truthy value.
pub fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_ENV)
        .map(|v| !matches!(v.as_str(), "" | "0" | "false" | "no"))
        .unwrap_or(false)
}

/// The backend for `kind`, applying the `auto` rule and logging the choice.
///
/// * `Cpu` → the native backend.
/// * `Wgpu` → the wgpu backend; [`KernelError::NoAdapter`] when there is no adapter.
/// * `Auto` → wgpu on a discrete/integrated (or virtual) GPU; cpu when the only adapter is a
///   software one (lavapipe is ~4–40× slower than native code on the same cores) or there is none.
///   A GPU whose device cannot be opened also falls back to cpu (with a warning). With
///   `PRFAAS_REQUIRE_GPU=1`, no adapter or a failing device is an error even for `Auto`.
pub fn select_backend(kind: BackendKind) -> Result<Arc<dyn Backend>> {
    let cpu = || -> Arc<dyn Backend> { Arc::new(cpu::CpuBackend::new()) };
    let backend: Arc<dyn Backend> = match kind {
        BackendKind::Cpu => cpu(),
        BackendKind::Wgpu => Arc::new(gpu::WgpuBackend::new()?),
        BackendKind::Auto => match gpu::Gpu::probe() {
            None if gpu_required() => {
                return Err(KernelError::NoAdapter(format!(
                    "no wgpu adapter and {REQUIRE_GPU_ENV}=1"
                )))
            }
            None => {
                tracing::info!("backend auto: no wgpu adapter, using cpu");
                cpu()
            }
            Some(a) if a.software => {
                tracing::info!(adapter = %a.name, "backend auto: only a software adapter, using cpu");
                cpu()
            }
            Some(a) => match gpu::WgpuBackend::new() {
                Ok(b) => {
                    tracing::info!(adapter = %a.name, device_type = ?a.device_type, "backend auto: using wgpu");
                    Arc::new(b)
                }
                Err(e) if !gpu_required() => {
                    tracing::warn!(adapter = %a.name, error = %e, "backend auto: wgpu device failed, using cpu");
                    cpu()
                }
                Err(e) => return Err(e),
            },
        },
    };
    tracing::info!(backend = %backend.info().description, requested = %kind, "compute backend selected");
    Ok(backend)
}
