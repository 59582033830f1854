// Embedding gather `out[i, c] = table[ids[i], c]` for any table dtype (prefixed by dequant.wgsl).
// One thread per output element; the grid is folded into 2D for large outputs. The bound table
// may be one row part of a larger one (see `GpuStorage`): it holds rows `row0..row0 + rows`, and
// ids outside them are left to the dispatches of the other parts.

struct Params {
    n: u32,
    d: u32,
    row0: u32,
    rows: u32,
}

@group(0) @binding(0) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n * p.d) {
        return;
    }
    let r = i / p.d;
    let c = i % p.d;
    let id = ids[r];
    if (id < p.row0 || id - p.row0 >= p.rows) {
        return;
    }
    out[i] = wval((id - p.row0) * p.d + c);
}
