//! The f16 KV pool round trip every backend must pass (used by `conformance`):
//! `scatter_blocks` rounds bit for bit like the reference (ties to even,
//! overflow to inf, subnormals), `gather_blocks` widens exactly, and gathered f16 values
//! scatter back unchanged (what an export → import of f16 KV relies on).

use half::f16;
use prfaas_kernels::{reference, Backend, DType};

/// Runs the round trip on pools of each shape (`[blocks, block_size, kv heads, head_dim]`),
/// with `data(n)` giving `n` pseudo-random values in [-1, 1).
pub fn f16_pools_round_trip(
    b: &dyn Backend,
    shapes: &[[usize; 4]],
    mut data: impl FnMut(usize) -> Vec<f32>,
) {
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for &shape in shapes {
        let block: usize = shape[1..].iter().product();
        let pool = b.zeros_dtype(&shape, DType::F16).unwrap();
        let mut host = vec![f16::ZERO; shape[0] * block];
        let mut values: Vec<f32> = data(shape[0] * block).iter().map(|v| v * 70000.0).collect();
        let specials = [
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            65519.0,
            65520.0,
            -2f32.powi(-24),
            3.0 * 2f32.powi(-26),
            2f32.powi(-26),
            f32::NEG_INFINITY,
        ];
        for (d, s) in values.iter_mut().zip(specials) {
            *d = s;
        }
        let idx: Vec<u32> = (0..shape[0] as u32).rev().collect();
        b.scatter_blocks(&pool, &idx, &values).unwrap();
        reference::scatter_blocks(&mut host, block, &idx, &values).unwrap();
        let widened: Vec<f32> = host.iter().map(|x| x.to_f32()).collect();
        assert_eq!(
            bits(&b.download(&pool).unwrap()),
            bits(&widened),
            "{shape:?}"
        );
        let pick: Vec<u32> = (0..shape[0] as u32).step_by(2).collect();
        let got = b.gather_blocks(&pool, &pick).unwrap();
        assert_eq!(got, reference::gather_blocks(&host, block, &pick).unwrap());
        let other = b.zeros_dtype(&shape, DType::F16).unwrap();
        b.scatter_blocks(&other, &pick, &got).unwrap();
        assert_eq!(
            bits(&b.gather_blocks(&other, &pick).unwrap()),
            bits(&got),
            "{shape:?}: f16 values must survive export/import unchanged"
        );
    }
}
