// Rotary position embedding of `x: [n, heads, head_dim]`, one thread per rotated pair.
// `neox` picks the pair layout (0: adjacent (2j, 2j+1) as in GGUF llama; 1: halves
// (j, j + head_dim/2) as in HF/NeoX).
//
// The rotation `(cos, sin)` of pair j at row r is read from `cs[(r · head_dim/2 + j) · 2 ..]`,
// computed on the host in f64: shader sin/cos are only specified to ~2^-11 absolute error on
// [-π, π] and f32 angles at position 10^5 are already off by ~10^-2 rad, while the engine needs
// rotations that match the CPU backend (KV from one backend is decoded by the other).

struct Params {
    n: u32,
    heads: u32,
    head_dim: u32,
    neox: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> cs: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.head_dim / 2u;
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n * p.heads * half) {
        return;
    }
    let j = i % half;
    let rh = i / half;
    let row = rh / p.heads;
    let base = rh * p.head_dim;
    var i0 = base + 2u * j;
    var i1 = i0 + 1u;
    if (p.neox != 0u) {
        i0 = base + j;
        i1 = base + j + half;
    }
    let t = (row * half + j) * 2u;
    let c = cs[t];
    let s = cs[t + 1u];
    let a = x[i0];
    let b = x[i1];
    out[i0] = a * c - b * s;
    out[i1] = a * s + b * c;
}
