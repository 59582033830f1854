// Row-wise argmax (lowest index on ties; NaNs never win): one 256-thread workgroup per row.

struct Params {
    rows: u32,
    d: u32,
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<uniform> p: Params;

var<workgroup> rv: array<f32, 256>;
var<workgroup> ri: array<u32, 256>;

// True when candidate (v, i) beats (bv, bi).
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

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
    var bv = -3.4028235e38;
    var bi = 0xffffffffu;
    for (var c = li; c < p.d; c += 256u) {
        let v = x[base + c];
        if (better(v, c, bv, bi)) {
            bv = v;
            bi = c;
        }
    }
    rv[li] = bv;
    ri[li] = bi;
    workgroupBarrier();
    for (var st = 128u; st > 0u; st >>= 1u) {
        if (li < st && better(rv[li + st], ri[li + st], rv[li], ri[li])) {
            rv[li] = rv[li + st];
            ri[li] = ri[li + st];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        // A row of only NaNs (or -inf) reports index 0.
        out[row] = select(ri[0], 0u, ri[0] == 0xffffffffu);
    }
}
