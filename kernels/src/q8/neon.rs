use super::{ActRows, WeightRows, BLOCK};
use std::arch::aarch64::*;

/// Lanes 0..4 (bytes 0..16) or 4..8 (bytes 16..32) of one block: widening
/// i8×i8 → i16 products (|p| ≤ 2¹⁴), pairwise-added to i32 twice, so lane `l`
/// holds bytes `4l..4l+3` as on x86.
#[inline(always)]
unsafe fn half_lanes(w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let lo = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(x)));
    let hi = vpaddlq_s16(vmull_high_s8(w, x));
    vpaddq_s32(lo, hi)
}

/// NEON tile: two `float32x4` accumulators per pair (lanes 0..4 and 4..8).
#[target_feature(enable = "neon")]
pub unsafe fn tile_neon<const R: usize, const C: usize>(
    w: WeightRows,
    x: ActRows,
    nb: usize,
    sc: *mut f32,
    out: *mut f32,
) {
    let WeightRows {
        q: w,
        s: ws,
        ld: ldw,
    } = w;
    let ActRows {
        q: x,
        d: xd,
        ld: ldx,
    } = x;
    super::scale_products::<R, C>(ws, xd, nb, sc);
    let mut lo = [[vdupq_n_f32(0.0); C]; R];
    let mut hi = [[vdupq_n_f32(0.0); C]; R];
    for b in 0..nb {
        let o = b * BLOCK;
        for r in 0..R {
            let w0 = vld1q_s8(w.add(r * ldw + o));
            let w1 = vld1q_s8(w.add(r * ldw + o + 16));
            for c in 0..C {
                let x0 = vld1q_s8(x.add(c * ldx + o));
                let x1 = vld1q_s8(x.add(c * ldx + o + 16));
                let s = vdupq_n_f32(*sc.add((r * C + c) * nb + b));
                lo[r][c] = vfmaq_f32(lo[r][c], vcvtq_f32_s32(half_lanes(w0, x0)), s);
                hi[r][c] = vfmaq_f32(hi[r][c], vcvtq_f32_s32(half_lanes(w1, x1)), s);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            // (a0+a4, a1+a5, a2+a6, a3+a7), then (s0+s2, s1+s3), then their sum.
            let s = vaddq_f32(lo[r][c], hi[r][c]);
            let t = vadd_f32(vget_low_f32(s), vget_high_f32(s));
            *out.add(r * C + c) = vget_lane_f32::<0>(t) + vget_lane_f32::<1>(t);
        }
    }
}
