//! The int8 per-block-32 arithmetic of `docs/quantization.md`, bit for bit.
//!
//! For one row of a weight `[out, in]` (values widened exactly to f32), block `b` holds
//! columns `32b .. 32b+31`:
//!
//! ```text
//! amax = max |w|                                   (f32)
//! clip   (body): s32 = amax / 127    q ∈ [-127, 127]
//! absmax (head): s32 = amax / 127.5  q ∈ [-128, 127]
//! s    = f16(s32)                                  round to nearest, ties to even
//! q    = clamp(round_half_even(w / f32(s)))        (s == 0 → every q = 0)
//! w'   = f32(q) · f32(s)
//! ```
//!
//! Quantizing against the stored (f16-rounded) scale means dequantization uses exactly
//! the scale the values were rounded against.

use half::f16;

/// Columns per block: the bundle format's.
pub use q3vl_bundle::BLOCK;

/// The two int8 rounding ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// Text body linears: scale `amax/127`, q in [-127, 127] (coreai-opt's
    /// `symmetric_with_clipping`; the block format of GGML's Q8_0).
    Clip,
    /// The LM head: scale `amax/127.5`, q in [-128, 127] (coreai-opt's `symmetric`).
    AbsMax,
}

impl QuantKind {
    /// The kind a bundle scheme stands for, if it is an int8 scheme.
    pub fn of(scheme: q3vl_bundle::Scheme) -> Option<QuantKind> {
        match scheme {
            q3vl_bundle::Scheme::Int8Clip => Some(QuantKind::Clip),
            q3vl_bundle::Scheme::Int8AbsMax => Some(QuantKind::AbsMax),
            _ => None,
        }
    }

    fn divisor(self) -> f32 {
        match self {
            QuantKind::Clip => 127.0,
            QuantKind::AbsMax => 127.5,
        }
    }

    fn qmin(self) -> f32 {
        match self {
            QuantKind::Clip => -127.0,
            QuantKind::AbsMax => -128.0,
        }
    }
}

const QMAX: f32 = 127.0;

/// 1.5 · 2²³: adding it to an f32 `x` with |x| < 2²² leaves `round_half_even(x)` in
/// the low mantissa bits (the FPU rounds the sum to nearest, ties to even, and at that
/// magnitude the spacing of f32 is exactly 1).
const MAGIC: f32 = 12_582_912.0;
/// The bit pattern of [`MAGIC`].
const MAGIC_BITS: i32 = 0x4B40_0000;

/// `clamp(round_half_even(x), lo, hi)` as an integer, for integer bounds within ±2²².
///
/// Clamping first is the same thing, since rounding is monotonic and the bounds are
/// integers, and it keeps the magic-number rounding in its exact range. This is plain
/// float add and integer arithmetic, so the block loop vectorizes on baseline x86-64
/// (SSE2 has no `roundps`, and a saturating float-to-int cast per value is slow).
#[inline(always)]
fn round_clamped(x: f32, lo: f32, hi: f32) -> i32 {
    let y = x.clamp(lo, hi) + MAGIC;
    y.to_bits() as i32 - MAGIC_BITS
}

/// The f16 scale of a block with maximum magnitude `amax`.
#[inline]
pub fn block_scale(amax: f32, kind: QuantKind) -> f16 {
    f16::from_f32(amax / kind.divisor())
}

/// What quantizing a row found beyond its values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowReport {
    /// Blocks whose maximum was nonzero but whose scale rounded to zero in f16 (their
    /// values all quantize to 0).
    pub zero_scale_blocks: u32,
    /// The first block whose scale overflowed f16 (a maximum above ~8.3e6), if any.
    pub scale_overflow: Option<usize>,
}

/// Quantizes one block of exactly [`BLOCK`] values into `q`, returning its scale.
/// The values must be finite (the converter checks them first).
#[inline(always)]
pub fn quantize_block(w: &[f32], kind: QuantKind, q: &mut [i8]) -> f16 {
    debug_assert_eq!(w.len(), BLOCK);
    debug_assert_eq!(q.len(), BLOCK);
    // Eight independent running maxima: a straight fold is a serial dependency chain.
    let mut lanes = [0f32; 8];
    // A plain compare, not `f32::max`: with finite values it is the same maximum,
    // and it is one vector instruction instead of a NaN-aware sequence.
    for c in w.chunks_exact(8) {
        for (m, x) in lanes.iter_mut().zip(c) {
            let a = x.abs();
            *m = if a > *m { a } else { *m };
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &x| if x > m { x } else { m });
    let s = block_scale(amax, kind);
    let sf = s.to_f32();
    if sf == 0.0 {
        q.fill(0);
        return s;
    }
    let lo = kind.qmin();
    for (o, &x) in q.iter_mut().zip(w) {
        *o = round_clamped(x / sf, lo, QMAX) as i8;
    }
    s
}

/// Quantizes one row (`w.len()` a multiple of 32, every value finite) into `q` (same
/// length) and `s` (`w.len()/32` scales).
#[inline(always)]
pub fn quantize_row(w: &[f32], kind: QuantKind, q: &mut [i8], s: &mut [f16]) -> RowReport {
    debug_assert_eq!(w.len() % BLOCK, 0);
    let mut rep = RowReport::default();
    for (b, ((wb, qb), sb)) in w
        .chunks_exact(BLOCK)
        .zip(q.chunks_exact_mut(BLOCK))
        .zip(s.iter_mut())
        .enumerate()
    {
        *sb = quantize_block(wb, kind, qb);
        // Not finite (with finite inputs, only an overflow): never written.
        if !sb.is_finite() {
            rep.scale_overflow.get_or_insert(b);
        } else if sb.to_f32() == 0.0 && wb.iter().any(|&x| x != 0.0) {
            rep.zero_scale_blocks += 1;
        }
    }
    rep
}

/// Dequantizes one row: `out[j] = f32(q[j]) · f32(s[j/32])`.
pub fn dequantize_row(q: &[i8], s: &[f16], out: &mut [f32]) {
    for ((ob, qb), sc) in out.chunks_mut(BLOCK).zip(q.chunks(BLOCK)).zip(s) {
        let sf = sc.to_f32();
        for (o, &v) in ob.iter_mut().zip(qb) {
            *o = v as f32 * sf;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(head: &[f32]) -> Vec<f32> {
        let mut w = head.to_vec();
        w.resize(BLOCK, 0.0);
        w
    }

    fn quant(w: &[f32], kind: QuantKind) -> (Vec<i8>, f16) {
        let mut q = vec![0i8; BLOCK];
        let s = quantize_block(w, kind, &mut q);
        (q, s)
    }

    #[test]
    fn magic_rounding_matches_round_ties_even() {
        let reference = |x: f32, lo: f32| x.round_ties_even().clamp(lo, QMAX) as i32;
        let mut x = -300.0f32;
        while x <= 300.0 {
            for d in [0.0, 1e-4, -1e-4, 0.4999999, -0.4999999] {
                let v = x + d;
                for lo in [-127.0, -128.0] {
                    assert_eq!(round_clamped(v, lo, QMAX), reference(v, lo), "{v}");
                }
            }
            x += 0.25;
        }
        for v in [
            1e-30f32,
            -1e-30,
            4194303.5,
            -4194303.5,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(round_clamped(v, -128.0, QMAX), reference(v, -128.0), "{v}");
        }
    }

    #[test]
    fn ties_round_to_even_in_both_signs() {
        // amax 127 → s32 = 1 exactly, so w / s = w.
        let w = block(&[
            127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, -3.5,
        ]);
        let (q, s) = quant(&w, QuantKind::Clip);
        assert_eq!(s, f16::ONE);
        assert_eq!(&q[..11], &[127, 0, 2, 2, 0, -2, -2, 126, -126, 4, -4]);
        // absmax: amax 127.5 → s32 = 1; ±127.5 round to ±128, +128 clamps to 127.
        let w = block(&[127.5, -127.5, 0.5, -2.5]);
        let (q, s) = quant(&w, QuantKind::AbsMax);
        assert_eq!(s, f16::ONE);
        assert_eq!(&q[..4], &[127, -128, 0, -2]);
    }

    #[test]
    fn zero_block_and_flushed_scale_give_zeros() {
        let (q, s) = quant(&[0.0; BLOCK], QuantKind::Clip);
        assert_eq!(s.to_f32(), 0.0);
        assert!(q.iter().all(|&x| x == 0));
        // s32 = 0.4 · 2^-24: below half the smallest f16 subnormal, rounds to 0.
        let tiny = 127.0 * 0.4 * 2f32.powi(-24);
        let w = block(&[tiny, -tiny, tiny / 2.0]);
        let mut q = vec![0i8; BLOCK];
        let mut s = vec![f16::ZERO; 1];
        let rep = quantize_row(&w, QuantKind::Clip, &mut q, &mut s);
        assert_eq!(s[0].to_f32(), 0.0);
        assert!(q.iter().all(|&x| x == 0));
        assert_eq!(rep.zero_scale_blocks, 1);
        assert_eq!(rep.scale_overflow, None);
    }

    #[test]
    fn subnormal_scales_clamp_at_the_range_ends() {
        // s32 = 1.4 · 2^-24 rounds down to the subnormal 2^-24, so amax / s ≈ 177.8.
        for (kind, lo) in [(QuantKind::Clip, -127i8), (QuantKind::AbsMax, -128)] {
            let amax = kind.divisor() * 1.4 * 2f32.powi(-24);
            let (q, s) = quant(&block(&[amax, -amax]), kind);
            assert_eq!(s.to_f32(), 2f32.powi(-24));
            assert_eq!(&q[..2], &[127, lo], "{kind:?}");
        }
    }

    #[test]
    fn scale_is_rounded_before_quantizing() {
        // amax = 1 → s32 = 1/127 = 0.007874016; f16 rounds it to 0.007873535.
        let w = block(&[1.0, 0.5, -0.25]);
        let (q, s) = quant(&w, QuantKind::Clip);
        assert_eq!(s, f16::from_f32(1.0 / 127.0));
        let sf = s.to_f32();
        for (x, qv) in w.iter().zip(&q) {
            assert_eq!(*qv as f32, (x / sf).round_ties_even().clamp(-127.0, 127.0));
        }
        let mut back = vec![0f32; BLOCK];
        dequantize_row(&q, &[s], &mut back);
        assert_eq!(back[0], 127.0 * sf);
    }

    #[test]
    fn overflowing_scale_is_reported() {
        let w = block(&[1e10]);
        let mut q = vec![0i8; 2 * BLOCK];
        let mut s = vec![f16::ZERO; 2];
        let mut row = vec![0.5f32; BLOCK];
        row.extend_from_slice(&w);
        let rep = quantize_row(&row, QuantKind::Clip, &mut q, &mut s);
        assert_eq!(rep.scale_overflow, Some(1));
    }
}
