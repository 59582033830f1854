// Elementwise binary ops on equal-shaped tensors. `OP` is a pipeline constant:
//   0: add `a + b`; 1: SwiGLU `silu(a) · b`; 2: GeGLU `gelu_tanh(a) · b` (a = gate, b = up).
// Both gates are `a · sigmoid(t) · b`: t = a for SiLU, t = 2·√(2/π)·(a + 0.044715·a³) for
// GELU-tanh (as 0.5·(1 + tanh(z)) = sigmoid(2z)); the sigmoid is written so exp never overflows.

override OP: u32 = 0u;

struct Params {
    len: u32,
    _a: u32,
    _b: u32,
    _c: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn sigmoid(t: f32) -> f32 {
    let e = exp(-abs(t));
    return select(e, 1.0, t >= 0.0) / (1.0 + e);
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.len) {
        return;
    }
    let av = a[i];
    let bv = b[i];
    switch OP {
        case 0u: {
            out[i] = av + bv;
        }
        case 1u: {
            out[i] = av * sigmoid(av) * bv;
        }
        default: {
            out[i] = av * sigmoid(av * (1.5957691 + 0.0713548 * av * av)) * bv;
        }
    }
}
