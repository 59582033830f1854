// Embedding gather `out[i, c] = table[ids[i], c]` for any table dtype (prefixed by dequant.wgsl).
// One thread per output element; the grid is folded into 2D for large outputs.

struct Params {
    n: u32,
    d: u32,
    _a: u32,
    _b: u32,
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
    out[i] = wval(ids[r] * p.d + c);
}
