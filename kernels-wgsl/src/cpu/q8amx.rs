//! The [`super::q8act`] panels on **AMX tiles** (Intel Sapphire Rapids and later): the same
//! packed weights, the same 8-bit activations, the same integers and the same float operations in
//! the same order, so its results are bitwise those of the AVX-512 VNNI and scalar kernels.
//!
//! `vpdpbusd` does 64 byte products per instruction; one `tdpbsud` does `rows × 16 × 32` (up to
//! 8,192). A (panel, block) of the packed layout — 8 vectors whose lane `c` holds 4 consecutive
//! quants of weight row `c` — is exactly the B operand of a tile product with K = 32 (K/4 rows of
//! 16 × 4 bytes), and `rows` activation rows of one block (32 signed bytes each, row stride `k`)
//! are the A operand, so a block's integer dot products for up to 16 activation rows × 16 weight
//! rows are one tile load of each operand and one `tdpbsud` (two with two activation planes).
//! The int32 results go through a 1 KiB stack tile to the same per-row float scaling as the
//! VNNI kernel (each block has its own weight and activation scales, so integers cannot be
//! summed across blocks).
//!
//! Linux gives a process AMX state only after `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`;
//! [`available`] asks once and reports false when the CPU, the kernel or `PRFAAS_CPU_AMX=0`
//! says no, and the backend then uses the VNNI kernel. Rust has no stable AMX intrinsics, so
//! the five instructions used are written as `asm!`.

use std::arch::asm;
use std::arch::x86_64::*;

use super::q8act::{
    panel_block_bytes, ActQ8, PackedWeight, Planes, PANEL, Q4_QUANT_BYTES, Q8_QUANT_BYTES,
};
use crate::backend::DType;
use crate::quant::QK;

/// How many blocks ahead of its tile loads a panel's weights are prefetched.
const PREFETCH_BLOCKS: usize = 4;

/// Activation rows per tile product (the tile height limit).
pub(super) const TILE_ROWS: usize = 16;

/// True when this process may run AMX int8 tile products (checked once): the CPU has AMX-TILE and
/// AMX-INT8 (CPUID leaf 7), AVX-512 VNNI for the rest of the kernel, Linux granted the tile data
/// state, and `PRFAAS_CPU_AMX` is not `0` (for A/B benchmarks of one build).
pub(crate) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var("PRFAAS_CPU_AMX").as_deref() == Ok("0") {
            return false;
        }
        // CPUID leaf 7 exists on every x86_64 CPU that reports AVX-512 (checked first).
        let cpu = super::q8act::vnni_available() && {
            let l7 = __cpuid_count(7, 0);
            (l7.edx >> 24) & 1 == 1 && (l7.edx >> 25) & 1 == 1
        };
        cpu && request_tile_permission()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: 0 when the kernel enables the tile
/// data state for this process (Linux ≥ 5.16).
#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain syscall with integer arguments; it reads and writes no user memory.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// The 64-byte tile configuration (palette 1) for `rows` activation rows.
///
/// * Q8_0 / Q4_1 layouts, two panels per step: tmm0/tmm1 the activation planes (rows × 32
///   bytes), tmm2/tmm3 a (panel, block) of weights of each panel (8 × 64 bytes), tmm4..tmm7 the
///   int32 products (panel 0 high, panel 0 low, panel 1 high, panel 1 low; rows × 16 lanes):
///   four independent tile products per block, so they overlap instead of waiting on each other.
/// * Q6_K's 16-value halves: tmm0/tmm1 the activation planes (rows × 16 bytes), tmm2 half a
///   block of weights (4 × 64 bytes), tmm3/tmm4 the products of each plane.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(rows: usize, q6: bool) -> Self {
        debug_assert!((1..=TILE_ROWS).contains(&rows));
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut set = |t: usize, rows: usize, colsb: u16| {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = rows as u8;
        };
        if q6 {
            set(0, rows, QK as u16 / 2);
            set(1, rows, QK as u16 / 2);
            set(2, QK / 8, 64);
            set(3, rows, 64);
            set(4, rows, 64);
        } else {
            set(0, rows, QK as u16);
            set(1, rows, QK as u16);
            set(2, QK / 4, 64);
            set(3, QK / 4, 64);
            for t in 4..8 {
                set(t, rows, 64);
            }
        }
        Self(c)
    }
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Tile([i32; TILE_ROWS * PANEL]);

const ZERO_TILE: Tile = Tile([0; TILE_ROWS * PANEL]);

#[repr(C, align(64))]
struct Quads([u8; 8 * 64]);

/// Panels `p0..p1` of a packed weight against every activation row, in chunks of up to 16 rows.
///
/// # Safety
/// [`available`] returned true; `p1 ≤ w.panels()`; `out` points to an `[act.m, w.n]` row-major
/// buffer of which no other thread writes columns `16·p0 .. 16·p1` meanwhile.
#[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
pub(super) unsafe fn run_panels(
    w: &PackedWeight,
    act: &ActQ8,
    p0: usize,
    p1: usize,
    out: *mut f32,
) {
    let (dtype, panels, panel_bytes, n) = (w.dtype, &w.data[..], w.panel_bytes(), w.n);
    let (k, nb) = (act.k, act.k / QK);
    let two = act.planes() == Planes::Two;
    assert!(
        panel_bytes == nb * panel_block_bytes(dtype)
            && panels.len() >= p1 * panel_bytes
            && act.hi.len() >= act.m * k
            && (!two || act.lo.len() >= act.m * k)
            && [
                act.scale.len(),
                act.sum.len(),
                act.delta.len(),
                act.corr.len()
            ]
            .iter()
            .all(|&l| l >= act.m * nb),
        "q8amx: operands too short"
    );
    let q6 = dtype == DType::Q6_K;
    // Zeroed once per call, not per panel (a prefill makes thousands of `PanelRows::run`s).
    let mut scratch = Scratch {
        c: [[ZERO_TILE; 4]; 2],
        quads: [Quads([0; 8 * 64]), Quads([0; 8 * 64])],
    };
    let mut r0 = 0;
    while r0 < act.m {
        let rows = (act.m - r0).min(TILE_ROWS);
        let cfg = TileConfig::new(rows, q6);
        // SAFETY: AMX is enabled for this process (`available`); the configuration is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        let step = if q6 { 1 } else { 2 };
        for p in (p0..p1).step_by(step) {
            // Panel p and, when it exists, p + 1 (else p again, its results not stored).
            let q = if p + 1 < p1 { p + 1 } else { p };
            let np = q - p + 1;
            // SAFETY: panels p and q are inside `panels` (assert); rows r0..r0+rows exist;
            // columns 16·p (and 16·q) of those rows are in `out` (contract).
            unsafe {
                let w = [p, q].map(|p| panels.as_ptr().add(p * panel_bytes));
                let o = [p, q].map(|p| out.add(r0 * n + p * PANEL));
                let cols = [p, q].map(|p| PANEL.min(n - p * PANEL));
                if q6 {
                    if two {
                        panel_rows_q6::<true>(
                            w[0],
                            act,
                            r0,
                            rows,
                            o[0],
                            n,
                            cols[0],
                            &mut scratch.c[0],
                        );
                    } else {
                        panel_rows_q6::<false>(
                            w[0],
                            act,
                            r0,
                            rows,
                            o[0],
                            n,
                            cols[0],
                            &mut scratch.c[0],
                        );
                    }
                    continue;
                }
                let pr = PanelRows {
                    act,
                    r0,
                    rows,
                    n,
                    np,
                };
                match (dtype == DType::Q4_1, two) {
                    (true, true) => pr.run::<true, true>(w, o, cols, &mut scratch),
                    (true, false) => pr.run::<true, false>(w, o, cols, &mut scratch),
                    (false, true) => pr.run::<false, true>(w, o, cols, &mut scratch),
                    (false, false) => pr.run::<false, false>(w, o, cols, &mut scratch),
                }
            }
        }
        // SAFETY: releases the tile state configured above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
        r0 += rows;
    }
}

/// Buffers of [`PanelRows::run`]: the int32 tile products of a block, double-buffered
/// (`[parity][panel 0 high, panel 0 low, panel 1 high, panel 1 low]`), and a Q4_1 block of each
/// panel unpacked to bytes.
struct Scratch {
    c: [[Tile; 4]; 2],
    quads: [Quads; 2],
}

/// `rows` activation rows from `r0` against `np` (1 or 2) panels of the Q8_0 or Q4_1 layout.
struct PanelRows<'a> {
    act: &'a ActQ8,
    r0: usize,
    rows: usize,
    n: usize,
    np: usize,
}

impl PanelRows<'_> {
    /// Software-pipelined over blocks: the tile products of block `b` are issued before the
    /// float steps of block `b − 1`, whose int32 results sit in the other half of a double
    /// buffer, so the vector units work while the tiles do.
    ///
    /// # Safety
    /// As [`run_panels`], tiles configured by `TileConfig::new(rows, false)`; `w[i]` is a whole
    /// panel, `o[i]` its output column in row `r0`, with `cols[i]` valid columns.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
    unsafe fn run<const Q4: bool, const TWO: bool>(
        &self,
        w: [*const u8; 2],
        o: [*mut f32; 2],
        cols: [usize; 2],
        scratch: &mut Scratch,
    ) {
        let nb = self.act.k / QK;
        let mut acc = [[_mm512_setzero_ps(); TILE_ROWS]; 2];
        let Scratch { c, quads } = scratch;
        // SAFETY (all calls): as this function's contract; block indices < nb.
        unsafe {
            self.issue::<Q4, TWO>(w, 0, quads, &mut c[0]);
            for b in 1..nb {
                self.issue::<Q4, TWO>(w, b, quads, &mut c[b % 2]);
                self.finish::<Q4, TWO>(w, b - 1, &c[(b - 1) % 2], &mut acc);
            }
            self.finish::<Q4, TWO>(w, nb - 1, &c[(nb - 1) % 2], &mut acc);
            for i in 0..self.np {
                store_rows(&acc[i][..self.rows], o[i], self.n, cols[i]);
            }
        }
    }

    /// The tile products of block `b` for both panels, stored to `c`.
    ///
    /// # Safety
    /// As [`Self::run`], `b < nb`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
    unsafe fn issue<const Q4: bool, const TWO: bool>(
        &self,
        w: [*const u8; 2],
        b: usize,
        quads: &mut [Quads; 2],
        c: &mut [Tile; 4],
    ) {
        let (act, k) = (self.act, self.act.k);
        let pbb = if Q4 {
            panel_block_bytes(DType::Q4_1)
        } else {
            panel_block_bytes(DType::Q8_0)
        };
        let mask = _mm512_set1_epi8(0x0f);
        // SAFETY: (panel, block) b spans `pbb` bytes of each panel; activation rows
        // r0..r0+rows have `k` bytes per plane, block b at b·32; tiles hold `rows` rows.
        unsafe {
            // Tile loads wait for memory rather than run ahead of it: fetch a few blocks ahead
            // (prefetches never fault, so past the panel's end is harmless).
            for wi in w {
                let ahead = wi.wrapping_add((b + PREFETCH_BLOCKS) * pbb);
                for line in (0..pbb).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                }
            }
            let wb = [0, 1].map(|i| {
                let p = w[i].add(b * pbb);
                if !Q4 {
                    return p;
                }
                // Nibbles to the bytes the tile product multiplies (the VNNI kernel's `w`).
                let dst = quads[i].0.as_mut_ptr();
                for j in 0..4 {
                    let v = _mm512_loadu_si512(p.add(j * 64).cast());
                    let l = _mm512_and_si512(v, mask);
                    let h = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
                    _mm512_store_si512(dst.add(j * 64).cast(), l);
                    _mm512_store_si512(dst.add((4 + j) * 64).cast(), h);
                }
                dst.cast_const()
            });
            let [c0h, c0l, c1h, c1l] = c.each_mut().map(|t| t.0.as_mut_ptr());
            asm!(
                "tileloadd tmm2, [{w0} + {ws}*1]",
                "tileloadd tmm3, [{w1} + {ws}*1]",
                "tileloadd tmm0, [{x} + {xs}*1]",
                "tilezero tmm4",
                "tilezero tmm6",
                "tdpbsud tmm4, tmm0, tmm2",
                "tdpbsud tmm6, tmm0, tmm3",
                "tilestored [{c0} + {ws}*1], tmm4",
                "tilestored [{c1} + {ws}*1], tmm6",
                w0 = in(reg) wb[0],
                w1 = in(reg) wb[1],
                ws = in(reg) 64usize,
                x = in(reg) act.hi.as_ptr().add(self.r0 * k + b * QK),
                xs = in(reg) k,
                c0 = in(reg) c0h,
                c1 = in(reg) c1h,
                options(nostack),
            );
            if TWO {
                asm!(
                    "tileloadd tmm1, [{x} + {xs}*1]",
                    "tilezero tmm5",
                    "tilezero tmm7",
                    "tdpbsud tmm5, tmm1, tmm2",
                    "tdpbsud tmm7, tmm1, tmm3",
                    "tilestored [{c0} + {cs}*1], tmm5",
                    "tilestored [{c1} + {cs}*1], tmm7",
                    x = in(reg) act.lo.as_ptr().add(self.r0 * k + b * QK),
                    xs = in(reg) k,
                    c0 = in(reg) c0l,
                    c1 = in(reg) c1l,
                    cs = in(reg) 64usize,
                    options(nostack),
                );
            }
        }
    }

    /// The float steps of block `b` (the VNNI kernel's, in its order: bitwise the same results)
    /// from its int32 products `c`.
    ///
    /// # Safety
    /// As [`Self::run`], `b < nb`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
    unsafe fn finish<const Q4: bool, const TWO: bool>(
        &self,
        w: [*const u8; 2],
        b: usize,
        c: &[Tile; 4],
        acc: &mut [[__m512; TILE_ROWS]; 2],
    ) {
        let (act, nb) = (self.act, self.act.k / QK);
        let (pbb, qb) = if Q4 {
            (panel_block_bytes(DType::Q4_1), Q4_QUANT_BYTES)
        } else {
            (panel_block_bytes(DType::Q8_0), Q8_QUANT_BYTES)
        };
        for (i, acc) in acc.iter_mut().enumerate().take(self.np) {
            // SAFETY: the scales of (panel, block) b follow its quants; rows < rows.
            unsafe {
                let p = w[i].add(b * pbb);
                let wd = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(qb).cast()));
                let (wm, wd8) = if Q4 {
                    (
                        _mm512_cvtph_ps(_mm256_loadu_si256(p.add(qb + 32).cast())),
                        _mm512_mul_ps(wd, _mm512_set1_ps(8.0)),
                    )
                } else {
                    (_mm512_setzero_ps(), _mm512_setzero_ps())
                };
                let (hi, lo) = (&c[2 * i], &c[2 * i + 1]);
                for (r, acc) in acc.iter_mut().enumerate().take(self.rows) {
                    let mut v = _mm512_load_si512(hi.0.as_ptr().add(r * PANEL).cast());
                    if TWO {
                        let l = _mm512_load_si512(lo.0.as_ptr().add(r * PANEL).cast());
                        v = _mm512_add_epi32(_mm512_slli_epi32::<8>(v), l);
                    }
                    let ab = (self.r0 + r) * nb + b;
                    if !Q4 {
                        v = _mm512_sub_epi32(v, _mm512_set1_epi32(*act.corr.get_unchecked(ab)));
                    }
                    let s = _mm512_mul_ps(wd, _mm512_set1_ps(*act.scale.get_unchecked(ab)));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), s, *acc);
                    if Q4 {
                        *acc =
                            _mm512_fmadd_ps(wm, _mm512_set1_ps(*act.sum.get_unchecked(ab)), *acc);
                        let dl = _mm512_set1_ps(*act.delta.get_unchecked(ab));
                        *acc = _mm512_fmadd_ps(wd8, dl, *acc);
                    }
                }
            }
        }
    }
}

/// `acc[r]`'s first `cols` lanes to `out[r·n ..]`.
///
/// # Safety
/// Rows `0..acc.len()` of `out` (stride `n`) have `cols ≤ 16` writable columns.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_rows(acc: &[__m512], out: *mut f32, n: usize, cols: usize) {
    let m: __mmask16 = if cols >= PANEL {
        0xffff
    } else {
        (1u16 << cols) - 1
    };
    for (r, &a) in acc.iter().enumerate() {
        // SAFETY: row r exists and columns < cols are inside it (contract).
        unsafe { _mm512_mask_storeu_ps(out.add(r * n), m, a) };
    }
}

/// One panel of the Q6_K layout: per block, two tile products of K = 16 (one per 16-value
/// half and its scale), signed weights times signed activations (`tdpbssd`).
///
/// # Safety
/// As [`run_panels`], tiles configured by `TileConfig::new(rows, true)`; `panel` is one whole
/// panel, `out` its output column in row `r0`; `c` is scratch.
#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
unsafe fn panel_rows_q6<const TWO: bool>(
    panel: *const u8,
    act: &ActQ8,
    r0: usize,
    rows: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
    c: &mut [Tile; 4],
) {
    let (k, nb) = (act.k, act.k / QK);
    let pbb = panel_block_bytes(DType::Q6_K);
    let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
    // Each half's int32 products: high plane in c[0..2], low plane in c[2..4].
    let (hi, lo) = c.split_at_mut(2);
    for b in 0..nb {
        // SAFETY (whole block body): as in `PanelRows::issue`; half h of the block's quants is the 4
        // vectors from byte 256·h, its scales the 16 f32 from byte 512 + 64·h.
        unsafe {
            let p = panel.add(b * pbb);
            for h in 0..2 {
                let xh = act.hi.as_ptr().add(r0 * k + b * QK + 16 * h);
                asm!(
                    "tilezero tmm3",
                    "tileloadd tmm2, [{w} + {ws}*1]",
                    "tileloadd tmm0, [{x} + {xs}*1]",
                    "tdpbssd tmm3, tmm0, tmm2",
                    "tilestored [{c} + {cs}*1], tmm3",
                    w = in(reg) p.add(256 * h),
                    ws = in(reg) 64usize,
                    x = in(reg) xh,
                    xs = in(reg) k,
                    c = in(reg) hi[h].0.as_mut_ptr(),
                    cs = in(reg) 64usize,
                    options(nostack),
                );
                if TWO {
                    let xl = act.lo.as_ptr().add(r0 * k + b * QK + 16 * h);
                    asm!(
                        "tilezero tmm4",
                        "tileloadd tmm1, [{x} + {xs}*1]",
                        "tdpbssd tmm4, tmm1, tmm2",
                        "tilestored [{c} + {cs}*1], tmm4",
                        x = in(reg) xl,
                        xs = in(reg) k,
                        c = in(reg) lo[h].0.as_mut_ptr(),
                        cs = in(reg) 64usize,
                        options(nostack),
                    );
                }
            }
            let wd = [0, 1].map(|h| _mm512_loadu_ps(p.add(Q8_QUANT_BYTES + 64 * h).cast()));
            // The scalar twin's float steps, in its order (bitwise the same results).
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                let xs = _mm512_set1_ps(*act.scale.get_unchecked((r0 + r) * nb + b));
                for h in 0..2 {
                    let mut i = _mm512_load_si512(hi[h].0.as_ptr().add(r * PANEL).cast());
                    if TWO {
                        let l = _mm512_load_si512(lo[h].0.as_ptr().add(r * PANEL).cast());
                        i = _mm512_add_epi32(_mm512_slli_epi32::<8>(i), l);
                    }
                    let s = _mm512_mul_ps(wd[h], xs);
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, *acc);
                }
            }
        }
    }
    // SAFETY: as this function's contract.
    unsafe { store_rows(&acc[..rows], out, n, cols) };
}
