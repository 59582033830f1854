//! The `wgpu` backend: portable WGSL kernels on Vulkan, Metal, DX12 (and Mesa lavapipe in CI).
//!
//! * [`Gpu`] owns one device/queue, a pipeline cache keyed by (kernel, specialisation constant), a
//!   size-bucketed buffer pool, and the command encoder that operations are recorded into.
//! * Operations are recorded lazily and submitted only when a result is read back
//!   ([`crate::Backend::download`], [`crate::Backend::argmax`], `gather_blocks`) or on
//!   [`crate::Backend::sync`], so a whole forward step is one submission (a submit + wait costs
//!   ~90 µs on lavapipe, more than many small kernels).
//! * The device is polled on a dedicated thread. Read-backs block the *calling* thread until that
//!   poller reports completion, so call them from the engine's own compute threads, never from an
//!   actix/tokio worker.
//! * wgpu validation errors do not panic: they are recorded and returned as
//!   [`KernelError::Device`] by the next read-back or `sync`.
//! * Matmul has three kernels: `matmul_tex.wgsl` (operands in textures, rows shared with
//!   `subgroupBroadcast`; weights are repacked into textures once, on first use, and cached on the
//!   tensor) where subgroups of >= 8 lanes exist and it pays (lavapipe: ~10× the storage kernel);
//!   otherwise `matvec.wgsl` for <= 8 rows (decode) and the 64×64-tiled `matmul.wgsl`. Quantized
//!   weights (Q4_1, Q8_0) and F16 are dequantized in-kernel; no path needs `SHADER_F16`.
//! * Attention likewise: `attention_tex.wgsl` (query heads and the visible keys/values gathered
//!   from the paged pool into textures, K/V tiles shared across all GQA heads of several query
//!   tokens with `subgroupBroadcast`) where the texture matmul would run, `attention.wgsl`
//!   (storage buffers, one workgroup per query row and head) elsewhere.

mod kernels;
mod ops;

pub use ops::WgpuBackend;

/// Which kernel family to use for matmul or for attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelPath {
    /// Texture/subgroup kernel on software adapters with >= 8-lane subgroups (where it is measured
    /// to be 10× faster and more), storage-buffer kernel elsewhere. `PRFAAS_WGPU_MATMUL=tex|storage`
    /// and `PRFAAS_WGPU_ATTENTION=tex|storage` override.
    #[default]
    Auto,
    /// Texture/subgroup kernel whenever the adapter supports it and shapes fit.
    Texture,
    /// Portable storage-buffer kernel only.
    Storage,
}

/// The matmul kernel choice (see [`KernelPath`]).
pub type MatmulPath = KernelPath;

impl KernelPath {
    /// Whether the texture/subgroup kernel runs, given the environment override `env`.
    fn texture(self, env: &str, subgroups8: bool, software: bool) -> bool {
        match (self, std::env::var(env).as_deref()) {
            (KernelPath::Texture, _) => subgroups8,
            (KernelPath::Storage, _) => false,
            (KernelPath::Auto, Ok("tex")) => subgroups8,
            (KernelPath::Auto, Ok("storage")) => false,
            (KernelPath::Auto, _) => subgroups8 && software,
        }
    }
}

/// How [`Gpu::with_options`] opens the device.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuOptions {
    pub matmul: MatmulPath,
    pub attention: KernelPath,
    /// Store uploads larger than this many bytes as row parts. `None` (and any larger value)
    /// means the adapter's `max_storage_buffer_binding_size`; tests force a few KiB to run the
    /// split path on small tensors.
    pub max_part_bytes: Option<u64>,
}

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, Weak};

use wgpu::util::DeviceExt;

use crate::backend::{KernelError, Result};
pub(crate) use kernels::{Bind, Kernel};

/// Ops recorded before an automatic (non-blocking) submit, bounding encoder memory.
const MAX_PENDING_OPS: usize = 1024;
/// Bytes of idle buffers the pool keeps for reuse.
const POOL_CAP_BYTES: u64 = 512 << 20;
/// Pool size classes are multiples of this.
const POOL_GRANULE: u64 = 256;

/// What [`Gpu::probe`] found, without creating a device.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: wgpu::DeviceType,
    /// True for software adapters (lavapipe, WARP, SwiftShader: `DeviceType::Cpu`).
    pub software: bool,
}

/// Rank for adapter choice: discrete > integrated > virtual > software > other.
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 1,
        wgpu::DeviceType::Other => 0,
    }
}

/// Among equal device types prefer the native APIs over GL (fewer features, no subgroups).
fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 1,
        _ => 0,
    }
}

fn is_software(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
        || info.name.to_ascii_lowercase().contains("llvmpipe")
        || info.name.to_ascii_lowercase().contains("lavapipe")
}

/// The best adapter: native APIs first (Vulkan/Metal/DX12); GL only when none of those has an
/// adapter (probing GL first would also spam EGL warnings on headless machines).
/// `WGPU_BACKEND` in the environment overrides the backend set.
fn pick_adapter() -> Option<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = wgpu::Backends::PRIMARY;
        if let Some(a) = best_adapter(&wgpu::Instance::new(desc)) {
            return Some(a);
        }
        let mut gl = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        gl.backends = wgpu::Backends::SECONDARY;
        return best_adapter(&wgpu::Instance::new(gl));
    }
    best_adapter(&wgpu::Instance::new(desc))
}

fn best_adapter(instance: &wgpu::Instance) -> Option<wgpu::Adapter> {
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    // `max_by_key` keeps the last maximum; reverse so enumeration order breaks ties.
    adapters.into_iter().rev().max_by_key(|a| {
        let info = a.get_info();
        (rank(info.device_type), backend_rank(info.backend))
    })
}

/// A pipeline and the bind-group layout it was built with.
pub(crate) struct Pipeline {
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
}

/// A resource bound to a kernel binding.
pub(crate) enum Res<'a> {
    Buf(&'a wgpu::Buffer),
    Tex(&'a wgpu::TextureView),
}

/// Idle storage buffers by size class, reused by later allocations of the same class.
pub(crate) struct BufferPool {
    inner: Mutex<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
}

impl BufferPool {
    fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut inner = self.inner.lock().ok()?;
        let buf = inner.free.get_mut(&size)?.pop()?;
        inner.bytes -= size;
        Some(buf)
    }

    fn give(&self, buf: wgpu::Buffer) {
        let size = buf.size();
        if let Ok(mut inner) = self.inner.lock() {
            if inner.bytes + size <= POOL_CAP_BYTES {
                inner.bytes += size;
                inner.free.entry(size).or_default().push(buf);
            }
        }
    }
}

/// The repacked texture form of a matmul weight (see `repack.wgsl`).
pub(crate) struct WeightTex {
    /// F32 values (all dtypes but Q4_1), or a 1×1 dummy.
    pub(crate) f32_view: wgpu::TextureView,
    /// Q4_1 quant bytes and (d, m) scales, or 1×1 dummies.
    pub(crate) q_view: wgpu::TextureView,
    pub(crate) s_view: wgpu::TextureView,
    pub(crate) rows_per_fold: u32,
    pub(crate) row_texels: u32,
    pub(crate) quantized: bool,
    /// The `[n, k]` view of the whole weight it was built for (a reshaped tensor shares the
    /// storage).
    pub(crate) dims: (usize, usize),
    /// The weight rows (output columns) this texture holds: all of them, or one row part's.
    pub(crate) rows: std::ops::Range<usize>,
}

/// GPU buffers behind a wgpu tensor. Returned to the pool when the last tensor handle drops.
///
/// A tensor is one buffer unless it was uploaded larger than one storage binding may be (the
/// adapter's `max_storage_buffer_binding_size`, e.g. 128 MiB on lavapipe, or a smaller forced
/// [`GpuOptions::max_part_bytes`]). Such a tensor is stored as row parts: consecutive runs of
/// [`RowParts::rows`] rows of [`RowParts::row_len`] values, each in its own buffer. Matmul and
/// embedding dispatch once per part; every other op needs a whole tensor and says so.
pub struct GpuStorage {
    /// The whole tensor, or its first row part.
    pub(crate) buffer: wgpu::Buffer,
    /// `Some` when the tensor is split into row parts (the first of which is `buffer`).
    pub(crate) parts: Option<RowParts>,
    pool: Weak<BufferPool>,
    /// Cached texture form (one per row part) when this tensor is used as a matmul weight;
    /// cleared on writes.
    pub(crate) tex: Mutex<Option<Arc<[WeightTex]>>>,
}

/// The row parts of a tensor larger than one storage binding (see [`GpuStorage`]).
pub(crate) struct RowParts {
    /// Rows per part (the last part may hold fewer).
    pub(crate) rows: usize,
    /// Values per row when the tensor was split; a reshape to another row length cannot be read
    /// by part.
    pub(crate) row_len: usize,
    pub(crate) buffers: Vec<wgpu::Buffer>,
}

impl GpuStorage {
    /// Drop any cached derived form (the buffer contents are about to change).
    pub(crate) fn invalidate(&self) {
        if let Ok(mut t) = self.tex.lock() {
            *t = None;
        }
    }
}

impl Drop for GpuStorage {
    fn drop(&mut self) {
        // Safe to reuse even if recorded-but-unsubmitted commands still reference the buffer:
        // later commands that overwrite it are recorded after them in the same queue order.
        if let Some(pool) = self.pool.upgrade() {
            match self.parts.take() {
                Some(parts) => parts.buffers.into_iter().for_each(|b| pool.give(b)),
                None => pool.give(self.buffer.clone()),
            }
        }
    }
}

struct Pending {
    encoder: Option<wgpu::CommandEncoder>,
    ops: usize,
}

type PollRequest = (wgpu::SubmissionIndex, SyncSender<Result<(), String>>);

/// One wgpu device with its pipeline cache, buffer pool, pending command encoder and poller thread.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) software: bool,
    /// `Features::SUBGROUP` enabled and subgroups hold at least 8 lanes (texture matmul usable).
    pub(crate) subgroups8: bool,
    pub(crate) shader_f16: bool,
    pub(crate) limits: wgpu::Limits,
    /// Use the texture matmul when shapes allow (see [`Gpu::new`]).
    pub(crate) tex_matmul: bool,
    /// Use the texture attention (`attention_tex.wgsl`) when shapes allow.
    pub(crate) tex_attention: bool,
    /// Uploads larger than this many bytes are stored as row parts (see [`GpuStorage`]).
    pub(crate) max_part_bytes: u64,
    pipelines: Mutex<HashMap<(Kernel, u32), Arc<Pipeline>>>,
    pool: Arc<BufferPool>,
    /// Idle scratch textures (activation operands of the texture matmul) by size and format.
    tex_pool: Mutex<HashMap<(u32, u32, wgpu::TextureFormat), Vec<wgpu::Texture>>>,
    pending: Mutex<Pending>,
    poll_tx: SyncSender<PollRequest>,
    /// Command buffers submitted so far (observability; tests check one submission per step).
    submissions: AtomicU64,
    error: Arc<Mutex<Option<String>>>,
}

impl Gpu {
    /// Describe the adapter [`Gpu::new`] would pick, or `None` when there is none.
    pub fn probe() -> Option<AdapterSummary> {
        let adapter = pick_adapter()?;
        let info = adapter.get_info();
        Some(AdapterSummary {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: info.device_type,
            software: is_software(&info),
        })
    }

    /// Open the best adapter (discrete > integrated > software) and start the poller thread.
    ///
    /// The texture matmul and attention are used when the adapter has subgroups of >= 8 lanes and
    /// is a software adapter (where they are measured to win); `PRFAAS_WGPU_MATMUL=tex|storage`
    /// and `PRFAAS_WGPU_ATTENTION=tex|storage` override.
    pub fn new() -> Result<Self> {
        Self::with_matmul(MatmulPath::Auto)
    }

    /// Like [`Gpu::new`] with an explicit matmul kernel choice (used by tests and benchmarks).
    pub fn with_matmul(path: MatmulPath) -> Result<Self> {
        Self::with_options(GpuOptions {
            matmul: path,
            ..GpuOptions::default()
        })
    }

    /// Like [`Gpu::new`] with explicit [`GpuOptions`].
    pub fn with_options(options: GpuOptions) -> Result<Self> {
        let path = options.matmul;
        let adapter =
            pick_adapter().ok_or_else(|| KernelError::NoAdapter("wgpu found no adapter".into()))?;
        let info = adapter.get_info();
        let software = is_software(&info);
        let features = adapter.features();
        let mut wanted = wgpu::Features::empty();
        if features.contains(wgpu::Features::SHADER_F16) {
            wanted |= wgpu::Features::SHADER_F16;
        }
        if features.contains(wgpu::Features::SUBGROUP) {
            wanted |= wgpu::Features::SUBGROUP;
        }
        let alimits = adapter.limits();
        // Raise what large models need (weights beyond 128 MiB, big textures) to the adapter's limits.
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: alimits.max_storage_buffer_binding_size,
            max_buffer_size: alimits.max_buffer_size,
            max_compute_workgroup_storage_size: alimits.max_compute_workgroup_storage_size,
            max_texture_dimension_2d: alimits.max_texture_dimension_2d,
            max_storage_textures_per_shader_stage: alimits.max_storage_textures_per_shader_stage,
            // Never ask for more than the adapter has (GL/mobile adapters sit below the defaults).
            ..wgpu::Limits::default().or_worse_values_from(&alimits)
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("prfaas"),
            required_features: wanted,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| KernelError::Device(format!("request_device: {e}")))?;

        let error = Arc::new(Mutex::new(None::<String>));
        let sink = Arc::clone(&error);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            tracing::error!("wgpu error: {e}");
            if let Ok(mut slot) = sink.lock() {
                slot.get_or_insert_with(|| e.to_string());
            }
        }));

        let subgroups8 = wanted.contains(wgpu::Features::SUBGROUP) && info.subgroup_min_size >= 8;
        let tex_matmul = path.texture("PRFAAS_WGPU_MATMUL", subgroups8, software);
        let tex_attention =
            options
                .attention
                .texture("PRFAAS_WGPU_ATTENTION", subgroups8, software);

        // The poller: blocks on device.poll so no async runtime thread ever has to.
        let (poll_tx, poll_rx) = sync_channel::<PollRequest>(64);
        let poll_device = device.clone();
        std::thread::Builder::new()
            .name("prfaas-wgpu-poll".into())
            .spawn(move || {
                for (index, reply) in poll_rx {
                    let r = poll_device
                        .poll(wgpu::PollType::Wait {
                            submission_index: Some(index),
                            timeout: None,
                        })
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    let _ = reply.send(r);
                }
            })
            .map_err(|e| KernelError::Device(format!("spawn poller: {e}")))?;

        let binding = limits.max_storage_buffer_binding_size;
        // A multiple of 16: uploads are padded to 16 bytes and must still fit the binding.
        let max_part_bytes = options.max_part_bytes.unwrap_or(binding).min(binding) / 16 * 16;
        if max_part_bytes == 0 {
            return Err(KernelError::InvalidArgument(format!(
                "max_part_bytes {:?} (storage binding limit {binding}): need at least 16",
                options.max_part_bytes
            )));
        }
        tracing::info!(
            adapter = %info.name,
            backend = ?info.backend,
            device_type = ?info.device_type,
            software,
            subgroups = subgroups8,
            shader_f16 = wanted.contains(wgpu::Features::SHADER_F16),
            tex_matmul,
            tex_attention,
            max_storage_binding = binding,
            max_part_bytes,
            "wgpu device opened"
        );
        Ok(Self {
            max_part_bytes,
            device,
            queue,
            software,
            subgroups8,
            shader_f16: wanted.contains(wgpu::Features::SHADER_F16),
            limits,
            tex_matmul,
            tex_attention,
            info,
            pipelines: Mutex::new(HashMap::new()),
            pool: Arc::new(BufferPool {
                inner: Mutex::new(PoolInner::default()),
            }),
            tex_pool: Mutex::new(HashMap::new()),
            submissions: AtomicU64::new(0),
            pending: Mutex::new(Pending {
                encoder: None,
                ops: 0,
            }),
            poll_tx,
            error,
        })
    }

    /// Whether `Features::SHADER_F16` was enabled (the kernels decode F16 weights with
    /// `unpack2x16float`, so they do not need it; reported for diagnostics).
    pub fn has_shader_f16(&self) -> bool {
        self.shader_f16
    }

    /// Command buffers submitted to the queue so far. Recorded work is submitted only by
    /// read-backs, `sync`, or when more than 1024 operations are pending.
    pub fn submissions(&self) -> u64 {
        self.submissions.load(Ordering::Relaxed)
    }

    /// True for software adapters such as lavapipe.
    pub fn is_software(&self) -> bool {
        self.software
    }

    /// One-line description for logs and adverts.
    pub fn describe(&self) -> String {
        format!(
            "wgpu: {} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    fn take_error(&self) -> Result<()> {
        match self.error.lock() {
            Ok(mut slot) => match slot.take() {
                Some(e) => Err(KernelError::Device(e)),
                None => Ok(()),
            },
            Err(_) => Err(KernelError::Device("error slot poisoned".into())),
        }
    }

    /// The cached pipeline for `kernel` with its specialisation constant set to `spec`.
    pub(crate) fn pipeline(&self, kernel: Kernel, spec: u32) -> Result<Arc<Pipeline>> {
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| KernelError::Device("pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(&(kernel, spec)) {
            return Ok(Arc::clone(p));
        }
        if kernel.needs_subgroups() && !self.subgroups8 {
            return Err(KernelError::Unsupported(format!(
                "{} needs subgroups",
                kernel.name()
            )));
        }
        let source = kernel.source();
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(kernel.name()),
                source: wgpu::ShaderSource::Wgsl(source),
            });
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .bindings()
            .iter()
            .map(|&(binding, kind)| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: binding_type(kind),
                count: None,
            })
            .collect();
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(kernel.name()),
                entries: &entries,
            });
        let playout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(kernel.name()),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let constants = kernel.constants(spec);
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(kernel.name()),
                layout: Some(&playout),
                module: &module,
                entry_point: Some(kernel.entry()),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        let p = Arc::new(Pipeline { pipeline, layout });
        cache.insert((kernel, spec), Arc::clone(&p));
        Ok(p)
    }

    /// A storage buffer of at least `bytes` bytes (pooled; contents undefined).
    pub(crate) fn alloc(&self, bytes: u64) -> Result<wgpu::Buffer> {
        let size = bytes.max(16).div_ceil(POOL_GRANULE) * POOL_GRANULE;
        if size > self.limits.max_storage_buffer_binding_size {
            return Err(KernelError::Unsupported(format!(
                "buffer of {bytes} bytes exceeds the storage binding limit {}",
                self.limits.max_storage_buffer_binding_size
            )));
        }
        if let Some(b) = self.pool.take(size) {
            return Ok(b);
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tensor"),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// Storage for a tensor (returned to the pool on drop).
    pub(crate) fn storage(&self, buffer: wgpu::Buffer) -> Arc<GpuStorage> {
        Arc::new(GpuStorage {
            buffer,
            parts: None,
            pool: Arc::downgrade(&self.pool),
            tex: Mutex::new(None),
        })
    }

    /// Storage for a tensor split into row parts (`parts.buffers` non-empty).
    pub(crate) fn split_storage(&self, parts: RowParts) -> Arc<GpuStorage> {
        Arc::new(GpuStorage {
            buffer: parts.buffers[0].clone(),
            parts: Some(parts),
            pool: Arc::downgrade(&self.pool),
            tex: Mutex::new(None),
        })
    }

    /// Bytes above which an upload is split into row parts (the adapter's storage binding limit
    /// unless [`GpuOptions::max_part_bytes`] asked for less).
    pub fn max_part_bytes(&self) -> u64 {
        self.max_part_bytes
    }

    /// A buffer initialised from `bytes` (padded to a multiple of 4, at least 16 bytes), usable as
    /// storage, copy source/destination.
    pub(crate) fn buffer_init(&self, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let padded = bytes.len().max(16).div_ceil(16) * 16;
        let mut data = Vec::with_capacity(padded);
        data.extend_from_slice(bytes);
        data.resize(padded, 0);
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("init"),
                contents: &data,
                usage,
            })
    }

    pub(crate) fn uniform(&self, words: &[u32]) -> wgpu::Buffer {
        self.buffer_init(bytemuck::cast_slice(words), wgpu::BufferUsages::UNIFORM)
    }

    pub(crate) fn storage_u32(&self, words: &[u32]) -> wgpu::Buffer {
        self.buffer_init(
            bytemuck::cast_slice(words),
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )
    }

    /// Record something into the pending encoder (submitting without waiting when it gets long).
    pub(crate) fn record<T>(&self, f: impl FnOnce(&mut wgpu::CommandEncoder) -> T) -> Result<T> {
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| KernelError::Device("encoder lock poisoned".into()))?;
        let enc = pending.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("step"),
                })
        });
        let out = f(enc);
        pending.ops += 1;
        if pending.ops >= MAX_PENDING_OPS {
            if let Some(enc) = pending.encoder.take() {
                self.queue.submit([enc.finish()]);
                self.submissions.fetch_add(1, Ordering::Relaxed);
            }
            pending.ops = 0;
        }
        Ok(out)
    }

    /// Record one dispatch of `kernel`.
    pub(crate) fn dispatch(
        &self,
        kernel: Kernel,
        spec: u32,
        resources: &[(u32, Res<'_>)],
        groups: (u32, u32, u32),
    ) -> Result<()> {
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.0 > max || groups.1 > max || groups.2 > max {
            return Err(KernelError::Unsupported(format!(
                "{}: dispatch {groups:?} exceeds {max} workgroups per dimension",
                kernel.name()
            )));
        }
        if groups.0 == 0 || groups.1 == 0 || groups.2 == 0 {
            return Ok(());
        }
        let pipeline = self.pipeline(kernel, spec)?;
        let entries: Vec<wgpu::BindGroupEntry<'_>> = resources
            .iter()
            .map(|(binding, res)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: match res {
                    Res::Buf(b) => b.as_entire_binding(),
                    Res::Tex(v) => wgpu::BindingResource::TextureView(v),
                },
            })
            .collect();
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.name()),
            layout: &pipeline.layout,
            entries: &entries,
        });
        self.record(|enc| {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel.name()),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        })
    }

    /// Workgroup grid for `n` independent items of `per_group` each, folded into 2D past 65535.
    pub(crate) fn grid(n: usize, per_group: usize) -> (u32, u32, u32) {
        let groups = n.div_ceil(per_group.max(1));
        if groups <= 65535 {
            (groups as u32, 1, 1)
        } else {
            (65535, groups.div_ceil(65535) as u32, 1)
        }
    }

    /// Submit everything recorded so far; returns the submission to wait for.
    pub(crate) fn flush(&self) -> Result<wgpu::SubmissionIndex> {
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| KernelError::Device("encoder lock poisoned".into()))?;
        let cmd = pending.encoder.take().map(|e| e.finish());
        pending.ops = 0;
        if cmd.is_some() {
            self.submissions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(self.queue.submit(cmd))
    }

    /// Block the calling thread until `index` has completed (the poller thread does the polling).
    pub(crate) fn wait(&self, index: wgpu::SubmissionIndex) -> Result<()> {
        let (tx, rx) = sync_channel(1);
        self.poll_tx
            .send((index, tx))
            .map_err(|_| KernelError::Device("poller thread is gone".into()))?;
        rx.recv()
            .map_err(|_| KernelError::Device("poller thread is gone".into()))?
            .map_err(KernelError::Device)?;
        self.take_error()
    }

    /// Submit pending work and wait for it.
    pub(crate) fn sync(&self) -> Result<()> {
        let idx = self.flush()?;
        self.wait(idx)
    }

    /// Copy `bytes` bytes of `src` to the host, flushing pending work first.
    pub(crate) fn read(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = bytes.div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.record(|enc| enc.copy_buffer_to_buffer(src, 0, &staging, 0, size))?;
        let idx = self.flush()?;
        let (tx, rx) = sync_channel(1);
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait(idx)?;
        rx.recv()
            .map_err(|_| KernelError::Device("map callback dropped".into()))?
            .map_err(|e| KernelError::Device(format!("map_async: {e}")))?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| KernelError::Device(format!("get_mapped_range: {e}")))?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// A scratch texture from the pool (or a new one); hand it back with [`Gpu::give_texture`]
    /// once the dispatches using it are recorded.
    pub(crate) fn scratch_texture(
        &self,
        width: u32,
        height: u32,
        format: wgpu::TextureFormat,
    ) -> wgpu::Texture {
        let pooled = self
            .tex_pool
            .lock()
            .ok()
            .and_then(|mut p| p.get_mut(&(width, height, format)).and_then(Vec::pop));
        pooled.unwrap_or_else(|| self.new_texture(width, height, format))
    }

    /// Return a scratch texture. Safe right after recording: later writes to it are recorded
    /// (and so execute) after the reads already in the encoder.
    pub(crate) fn give_texture(&self, tex: wgpu::Texture) {
        const PER_SHAPE: usize = 4;
        if let Ok(mut p) = self.tex_pool.lock() {
            let key = (tex.width(), tex.height(), tex.format());
            let idle = p.entry(key).or_default();
            if idle.len() < PER_SHAPE {
                idle.push(tex);
            }
        }
    }

    fn new_texture(&self, width: u32, height: u32, format: wgpu::TextureFormat) -> wgpu::Texture {
        self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("operand"),
            size: wgpu::Extent3d {
                width: width.max(1),
                height: height.max(1),
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::STORAGE_BINDING,
            view_formats: &[],
        })
    }

    /// A 2D texture usable as a sampled (textureLoad) and storage texture.
    pub(crate) fn texture(
        &self,
        width: u32,
        height: u32,
        format: wgpu::TextureFormat,
    ) -> wgpu::TextureView {
        self.new_texture(width, height, format)
            .create_view(&wgpu::TextureViewDescriptor::default())
    }
}

fn binding_type(kind: Bind) -> wgpu::BindingType {
    let storage = |read_only| wgpu::BindingType::Buffer {
        ty: wgpu::BufferBindingType::Storage { read_only },
        has_dynamic_offset: false,
        min_binding_size: None,
    };
    let tex = |sample_type| wgpu::BindingType::Texture {
        sample_type,
        view_dimension: wgpu::TextureViewDimension::D2,
        multisampled: false,
    };
    let store = |format| wgpu::BindingType::StorageTexture {
        access: wgpu::StorageTextureAccess::WriteOnly,
        format,
        view_dimension: wgpu::TextureViewDimension::D2,
    };
    match kind {
        Bind::Read => storage(true),
        Bind::ReadWrite => storage(false),
        Bind::Uniform => wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        Bind::TexF32 => tex(wgpu::TextureSampleType::Float { filterable: false }),
        Bind::TexU32 => tex(wgpu::TextureSampleType::Uint),
        Bind::StoreTexF32 => store(wgpu::TextureFormat::Rgba32Float),
        Bind::StoreTexU32 => store(wgpu::TextureFormat::Rgba32Uint),
    }
}

#[cfg(test)]
mod tests {
    use super::Kernel;

    /// Every kernel (with its prepended snippets) parses and validates with naga, no GPU needed.
    #[test]
    fn every_wgsl_kernel_validates_with_naga() {
        use naga::valid::{
            Capabilities, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator,
        };
        let mut checked = 0;
        for kernel in Kernel::ALL {
            let src = kernel.source();
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{}: {}", kernel.name(), e.emit_to_string(&src)));
            let mut v = Validator::new(ValidationFlags::all(), Capabilities::all());
            v.subgroup_stages(ShaderStages::COMPUTE);
            v.subgroup_operations(SubgroupOperationSet::all());
            v.validate(&module)
                .unwrap_or_else(|e| panic!("{}: {}", kernel.name(), e.emit_to_string(&src)));
            assert!(
                module.entry_points.iter().any(|e| e.name == kernel.entry()),
                "{}: entry point `{}` missing",
                kernel.name(),
                kernel.entry()
            );
            checked += 1;
        }
        // Every .wgsl file in the source tree is part of some registered kernel.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/wgsl");
        let sources: Vec<String> = Kernel::ALL
            .iter()
            .map(|k| k.source().into_owned())
            .collect();
        let mut files = 0;
        for entry in std::fs::read_dir(dir).expect("wgsl dir") {
            let path = entry.expect("dir entry").path();
            let text = std::fs::read_to_string(&path).expect("read wgsl");
            assert!(
                sources.iter().any(|s| s.contains(&text)),
                "{} is not used by any kernel in Kernel::ALL",
                path.display()
            );
            files += 1;
        }
        assert!(files >= 12, "only {files} .wgsl files found");
        assert_eq!(checked, Kernel::ALL.len());
    }
}
