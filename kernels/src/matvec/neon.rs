use super::{BLOCK, PAIR};
use half::f16;
use std::arch::aarch64::*;

rows_of!(
    /// [`row_neon`] over consecutive rows.
    #[target_feature(enable = "neon")]
    pub rows_neon,
    row_neon
);

/// Half `h` of a pair of blocks (bytes `16h ..` of the block at `p` and of its partner,
/// or zero) against the paired activations `x`: the words interleaved (`zip1` gives
/// words `2v .. +1` of the half, `zip2` words `8 + 2v ..`), widened, multiplied into
/// int32 (`smull`), adjacent products added (`addp`) and the two interleaves summed:
/// the exact sums of lanes `8h .. 8h + 4` and `8h + 4 .. 8h + 8`.
#[target_feature(enable = "neon")]
#[inline]
unsafe fn pair_half(p: *const i8, partner: bool, x: *const i16, h: usize) -> [int32x4_t; 2] {
    let b = vreinterpretq_s16_s8(vld1q_s8(p.add(16 * h)));
    let c = if partner {
        vreinterpretq_s16_s8(vld1q_s8(p.add(BLOCK + 16 * h)))
    } else {
        vdupq_n_s16(0)
    };
    // Lanes 8h + 4j .. + 4 of one interleave `z` against its 16 activations at `xz`.
    let lanes = |z: int8x16_t, xz: *const i16, j: usize| {
        let wz = if j == 0 {
            vmovl_s8(vget_low_s8(z))
        } else {
            vmovl_high_s8(z)
        };
        let xv = vld1q_s16(xz.add(8 * j));
        vpaddq_s32(
            vmull_s16(vget_low_s16(wz), vget_low_s16(xv)),
            vmull_high_s16(wz, xv),
        )
    };
    let (lo, hi) = (
        vreinterpretq_s8_s16(vzip1q_s16(b, c)),
        vreinterpretq_s8_s16(vzip2q_s16(b, c)),
    );
    let (xa, xb) = (x.add(16 * h), x.add(BLOCK + 16 * h));
    [0, 1].map(|j| vaddq_s32(lanes(lo, xa, j), lanes(hi, xb, j)))
}

/// NEON row: per pair of blocks the sums of lanes 0–3, 4–7, 8–11 and 12–15
/// ([`pair_half`]), converted and fused with the pair's scales (even lanes the first
/// block's, odd lanes the second's).
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
    for c in 0..nb.div_ceil(2) {
        let (b0, partner) = (2 * c, 2 * c + 1 < nb);
        let s0 = (*ws.add(b0)).to_f32() * *xd.add(b0);
        // The partner of an odd last block: scale 0.
        let s1 = if partner {
            (*ws.add(b0 + 1)).to_f32() * *xd.add(b0 + 1)
        } else {
            0.0
        };
        let s = vld1q_f32([s0, s1, s0, s1].as_ptr());
        let (p, x) = (w.add(c * PAIR), xq.add(c * PAIR));
        let [p0, p1] = pair_half(p, partner, x, 0);
        let [p2, p3] = pair_half(p, partner, x, 1);
        for (a, p) in acc.iter_mut().zip([p0, p1, p2, p3]) {
            *a = vfmaq_f32(*a, vcvtq_f32_s32(p), s);
        }
    }
    // t[0..4] and t[4..8], then [t0+t4, t1+t5, t2+t6, t3+t7], then the module's
    // order.
    let s = vaddq_f32(vaddq_f32(acc[0], acc[2]), vaddq_f32(acc[1], acc[3]));
    (vgetq_lane_f32::<0>(s) + vgetq_lane_f32::<2>(s))
        + (vgetq_lane_f32::<1>(s) + vgetq_lane_f32::<3>(s))
}
