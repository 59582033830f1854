// Gated delta-rule linear attention (Gated DeltaNet / Kimi Delta Attention), per head with state
// S ∈ R^{dv×dk}: for each token, S ← exp(g)·S; S ← S + β (v − S k) kᵀ; o = scale · S q.
//
// Every row i of S evolves independently given the keys, so threads own state rows.
//   * `step`: one thread per (head, row), tokens in order (decode, n = 1).
//   * `chunked`: one workgroup per head; within a chunk of C tokens the row recurrence is solved as
//     a unit-lower-triangular system, with the C×C key/key and key/query products (decay-weighted)
//     computed once per chunk in workgroup memory and shared by all rows. With G_t the cumulative
//     log decay inside the chunk and u_t = β_t (v_t − S'_t k_t):
//       u_t = β_t (v_t − e^{G_t} s0·k_t − Σ_{s<t} e^{G_t−G_s} (k_s·k_t) u_s)
//       o_t = scale (e^{G_t} s0·q_t + Σ_{s≤t} e^{G_t−G_s} (k_s·q_t) u_s)
//       s_C = e^{G_C} s0 + Σ_s e^{G_C−G_s} u_s k_s
//     The state is read and written once per chunk instead of twice per token.
// Layouts: q, k [n, heads, dk]; v [n, heads, dv]; beta, g [n, heads]; state [heads, dv, dk];
// out [n, heads·dv].

struct Params {
    n: u32,
    heads: u32,
    dk: u32,
    dv: u32,
    scale: f32,
    chunk: u32,
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<f32>;
@group(0) @binding(5) var<storage, read_write> state: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<uniform> p: Params;

@compute @workgroup_size(64)
fn step(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x;
    if (idx >= p.heads * p.dv) {
        return;
    }
    let h = idx / p.dv;
    let i = idx % p.dv;
    let sb = idx * p.dk;
    for (var t = 0u; t < p.n; t++) {
        let th = t * p.heads + h;
        let decay = exp(g[th]);
        let kb = th * p.dk;
        var sk = 0.0;
        for (var j = 0u; j < p.dk; j++) {
            let s = state[sb + j] * decay;
            state[sb + j] = s;
            sk += s * k[kb + j];
        }
        let u = beta[th] * (v[th * p.dv + i] - sk);
        var o = 0.0;
        for (var j = 0u; j < p.dk; j++) {
            let s = state[sb + j] + u * k[kb + j];
            state[sb + j] = s;
            o += s * q[kb + j];
        }
        out[th * p.dv + i] = p.scale * o;
    }
}

const MAXC: u32 = 32u;
const WG: u32 = 64u;

var<workgroup> kk: array<f32, 1024>;
var<workgroup> kq: array<f32, 1024>;
var<workgroup> gc: array<f32, 32>;
var<workgroup> bc: array<f32, 32>;

@compute @workgroup_size(64)
fn chunked(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let h = wid.x;
    let c = clamp(p.chunk, 1u, MAXC);
    for (var c0 = 0u; c0 < p.n; c0 += c) {
        let cl = min(c, p.n - c0);
        if (li == 0u) {
            var acc = 0.0;
            for (var t = 0u; t < cl; t++) {
                let th = (c0 + t) * p.heads + h;
                acc += g[th];
                gc[t] = acc;
                bc[t] = beta[th];
            }
        }
        workgroupBarrier();
        for (var e = li; e < cl * cl; e += WG) {
            let t = e / cl;
            let s = e % cl;
            var a = 0.0;
            var b = 0.0;
            if (s <= t) {
                let kt = ((c0 + t) * p.heads + h) * p.dk;
                let ks = ((c0 + s) * p.heads + h) * p.dk;
                for (var j = 0u; j < p.dk; j++) {
                    let kv = k[ks + j];
                    a += kv * k[kt + j];
                    b += kv * q[kt + j];
                }
                let f = exp(gc[t] - gc[s]);
                a = select(0.0, f * a, s < t);
                b = f * b;
            }
            kk[t * MAXC + s] = a;
            kq[t * MAXC + s] = b;
        }
        workgroupBarrier();
        for (var i = li; i < p.dv; i += WG) {
            let sb = (h * p.dv + i) * p.dk;
            var u: array<f32, 32>;
            for (var t = 0u; t < cl; t++) {
                let th = (c0 + t) * p.heads + h;
                let kb = th * p.dk;
                var sk = 0.0;
                var sq = 0.0;
                for (var j = 0u; j < p.dk; j++) {
                    let s = state[sb + j];
                    sk += s * k[kb + j];
                    sq += s * q[kb + j];
                }
                let eg = exp(gc[t]);
                var corr = 0.0;
                for (var s = 0u; s < t; s++) {
                    corr += kk[t * MAXC + s] * u[s];
                }
                let ut = bc[t] * (v[th * p.dv + i] - eg * sk - corr);
                u[t] = ut;
                var o = eg * sq;
                for (var s = 0u; s <= t; s++) {
                    o += kq[t * MAXC + s] * u[s];
                }
                out[th * p.dv + i] = p.scale * o;
            }
            let gl = gc[cl - 1u];
            let egl = exp(gl);
            for (var j = 0u; j < p.dk; j++) {
                var s = egl * state[sb + j];
                for (var t = 0u; t < cl; t++) {
                    s += exp(gl - gc[t]) * u[t] * k[((c0 + t) * p.heads + h) * p.dk + j];
                }
                state[sb + j] = s;
            }
        }
        workgroupBarrier();
    }
}
