// Rotary position embedding of `x: [n, heads, head_dim]`, one thread per rotated pair.
// Pair j rotates by `pos · base^(-2j/head_dim)`; `neox` picks the pair layout
// (0: adjacent (2j, 2j+1) as in GGUF llama; 1: halves (j, j + head_dim/2) as in HF/NeoX).

struct Params {
    n: u32,
    heads: u32,
    head_dim: u32,
    neox: u32,
    log2_base: f32,
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> pos: array<u32>;
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
    let freq = exp2(-f32(2u * j) / f32(p.head_dim) * p.log2_base);
    let ang = f32(pos[row]) * freq;
    let c = cos(ang);
    let s = sin(ang);
    let a = x[i0];
    let b = x[i1];
    out[i0] = a * c - b * s;
    out[i1] = a * s + b * c;
}
