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
pub mod cpu;
pub mod gpu;
pub mod quant;
pub mod reference;

pub use backend::{
    AttnParams, AttnSeq, Backend, BackendInfo, BackendKind, DType, HostTensor, KernelError,
    LinearAttnParams, Result, RopeStyle, Tensor,
};

use std::sync::Arc;

/// Environment variable that makes "no GPU adapter" an error instead of a CPU fallback.
pub const REQUIRE_GPU_ENV: &str = "PRFAAS_REQUIRE_GPU";

/// True when `PRFAAS_REQUIRE_GPU` is set to a truthy value.
pub fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_ENV)
        .map(|v| !matches!(v.as_str(), "" | "0" | "false" | "no"))
        .unwrap_or(false)
}
