// Elementwise binary ops on equal-shaped tensors. `OP` is a pipeline constant:
//   0: add `a + b`; 1: SwiGLU `silu(a) · b` with a = gate, b = up.

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
        default: {
            out[i] = av / (1.0 + exp(-av)) * bv;
        }
    }
}
