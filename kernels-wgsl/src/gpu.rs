//! wgpu backend running the WGSL kernels (placeholder: being implemented).

/// GPU buffer behind a wgpu tensor.
pub struct GpuStorage {
    pub(crate) buffer: wgpu::Buffer,
}
