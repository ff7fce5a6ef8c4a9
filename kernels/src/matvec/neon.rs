use super::BLOCK;
use half::f16;
use std::arch::aarch64::*;

rows_of!(
    /// [`row_neon`] over consecutive rows.
    #[target_feature(enable = "neon")]
    pub rows_neon,
    row_neon
);

/// NEON row: per block the four 8-byte quarters widened to int16, multiplied
/// into int32 (`smull`), adjacent products added pairwise (`addp`, so lane `l`
/// of a quarter's result holds its bytes `2l, 2l+1`), converted, and fused into
/// the pair lanes 0–3, 4–7, 8–11 and 12–15.
#[target_feature(enable = "neon")]
pub unsafe fn row_neon(
    w: *const i8,
    ws: *const f16,
    xq: *const i16,
    xd: *const f32,
    nb: usize,
    _sc: *mut f32,
) -> f32 {
    let mut acc = [vdupq_n_f32(0.0); 4];
    for b in 0..nb {
        let o = b * BLOCK;
        let sc = vdupq_n_f32((*ws.add(b)).to_f32() * *xd.add(b));
        // Pair lanes h/2 .. h/2+3 and h/2+4 .. h/2+7 of the 16-byte half at byte h.
        let half = |h: usize| {
            let wv = vld1q_s8(w.add(o + h));
            let (wl, wh) = (vmovl_s8(vget_low_s8(wv)), vmovl_high_s8(wv));
            let (x0, x1) = (vld1q_s16(xq.add(o + h)), vld1q_s16(xq.add(o + h + 8)));
            let p0 = vpaddq_s32(
                vmull_s16(vget_low_s16(wl), vget_low_s16(x0)),
                vmull_high_s16(wl, x0),
            );
            let p1 = vpaddq_s32(
                vmull_s16(vget_low_s16(wh), vget_low_s16(x1)),
                vmull_high_s16(wh, x1),
            );
            (p0, p1)
        };
        let (p0, p1) = half(0);
        let (p2, p3) = half(16);
        for (a, p) in acc.iter_mut().zip([p0, p1, p2, p3]) {
            *a = vfmaq_f32(*a, vcvtq_f32_s32(p), sc);
        }
    }
    // t[0..4] and t[4..8], then [t0+t4, t1+t5, t2+t6, t3+t7], then the module's
    // order.
    let s = vaddq_f32(vaddq_f32(acc[0], acc[2]), vaddq_f32(acc[1], acc[3]));
    (vgetq_lane_f32::<0>(s) + vgetq_lane_f32::<2>(s))
        + (vgetq_lane_f32::<1>(s) + vgetq_lane_f32::<3>(s))
}
