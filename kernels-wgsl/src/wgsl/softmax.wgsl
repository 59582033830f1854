// Row-wise softmax (max-subtracted): one 256-thread workgroup per row, two tree reductions.

struct Params {
    rows: u32,
    d: u32,
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.rows) {
        return;
    }
    let base = row * p.d;
    var mx = -3.0e38;
    for (var c = li; c < p.d; c += 256u) {
        mx = max(mx, x[base + c]);
    }
    red[li] = mx;
    workgroupBarrier();
    for (var st = 128u; st > 0u; st >>= 1u) {
        if (li < st) {
            red[li] = max(red[li], red[li + st]);
        }
        workgroupBarrier();
    }
    let row_max = red[0];
    workgroupBarrier();
    var s = 0.0;
    for (var c = li; c < p.d; c += 256u) {
        s += exp(x[base + c] - row_max);
    }
    red[li] = s;
    workgroupBarrier();
    for (var st = 128u; st > 0u; st >>= 1u) {
        if (li < st) {
            red[li] += red[li + st];
        }
        workgroupBarrier();
    }
    let inv = 1.0 / red[0];
    for (var c = li; c < p.d; c += 256u) {
        out[base + c] = exp(x[base + c] - row_max) * inv;
    }
}
