use super::{Panels, MR, NR, PAIRS};
use std::arch::aarch64::*;

/// The `R` × 16 NEON register tile, one row at a time: per pair, the row's
/// activation pair broadcast and four weight vectors (four columns' pairs each)
/// multiplied into eight int32 accumulators with `smlal`/`smlal2`, each lane one
/// product half of a column; per block, `addp` joins each column's two halves
/// (exact: 32 products of at most 128 · 32767), and the sums are converted and
/// fused into the row's four f32 accumulators.
#[target_feature(enable = "neon")]
pub unsafe fn micro_neon<const R: usize>(
    nbk: usize,
    p: Panels,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    let Panels { a, ad, b, bd } = p;
    for i in 0..R {
        let crow = c.add(i * ldc);
        let mut f: [float32x4_t; 4] = if first {
            [vdupq_n_f32(0.0); 4]
        } else {
            std::array::from_fn(|q| vld1q_f32(crow.add(4 * q)))
        };
        for blk in 0..nbk {
            let mut acc = [vdupq_n_s32(0); 8];
            for pp in 0..PAIRS {
                let o = blk * PAIRS + pp;
                let av = vreinterpretq_s16_s32(vdupq_n_s32(*a.add(o * MR + i)));
                let bp = b.add(o * NR) as *const i16;
                for q in 0..NR / 4 {
                    let bv = vld1q_s16(bp.add(8 * q));
                    acc[2 * q] = vmlal_s16(acc[2 * q], vget_low_s16(bv), vget_low_s16(av));
                    acc[2 * q + 1] = vmlal_high_s16(acc[2 * q + 1], bv, av);
                }
            }
            let d = vdupq_n_f32(*ad.add(blk * MR + i));
            for (q, fq) in f.iter_mut().enumerate() {
                let s = vpaddq_s32(acc[2 * q], acc[2 * q + 1]);
                let sc = vmulq_f32(vld1q_f32(bd.add(blk * NR + 4 * q)), d);
                *fq = vfmaq_f32(*fq, vcvtq_f32_s32(s), sc);
            }
        }
        for (q, fq) in f.iter().enumerate() {
            vst1q_f32(crow.add(4 * q), *fq);
        }
    }
}
