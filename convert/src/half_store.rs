//! Storing values as f16, counting what the narrowing loses.
//!
//! bf16 has f32's range, f16 does not: a value above 65504 in magnitude cannot be
//! stored (an error, never a silent infinity), and a nonzero value below f16's
//! smallest normal (2⁻¹⁴ ≈ 6.1e-5) becomes subnormal or zero (counted, and reported
//! per tensor in the metadata and the conversion summary).

use half::f16;
use half::slice::HalfFloatSliceExt;

/// The largest finite f16.
pub const F16_MAX: f32 = 65504.0;

/// What narrowing a slice found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NarrowReport {
    /// Nonzero values that became subnormal or zero.
    pub underflow: u64,
    /// Index (within the slice) of the first value with |x| > 65504.
    pub overflow: Option<usize>,
}

/// Converts `values` to little-endian f16 bytes in `out` (2 bytes per value), round to
/// nearest even.
#[inline(always)]
pub fn narrow_into(values: &[f32], out: &mut [u8]) -> NarrowReport {
    debug_assert_eq!(out.len(), values.len() * 2);
    // SAFETY: f16 is a plain 16-bit value, valid for every bit pattern; `align_to_mut`
    // only hands out the correctly aligned middle part.
    let (pre, mid, _) = unsafe { out.align_to_mut::<f16>() };
    if pre.is_empty() && mid.len() == values.len() {
        // Bulk conversion (F16C when the CPU has it), then a branch-free scan.
        mid.convert_from_f32_slice(values);
        if cfg!(target_endian = "big") {
            mid.iter_mut()
                .for_each(|h| *h = f16::from_bits(h.to_bits().to_le()));
        }
        return scan(values, mid);
    }
    // An unaligned buffer (not produced by this crate's allocations): one by one.
    let mut halves = vec![f16::ZERO; values.len()];
    halves.convert_from_f32_slice(values);
    for (o, h) in out.chunks_exact_mut(2).zip(&halves) {
        o.copy_from_slice(&h.to_le_bytes());
    }
    scan(values, &halves)
}

/// Counts underflows (nonzero in, exponent field zero out) and finds the first
/// overflow.
#[inline(always)]
fn scan(values: &[f32], halves: &[f16]) -> NarrowReport {
    let underflow = values
        .iter()
        .zip(halves)
        .map(|(&x, h)| ((h.to_bits() & 0x7c00) == 0 && x != 0.0) as u64)
        .sum();
    // A branch-free fold first (it vectorizes), the search only when it is needed.
    let over = values
        .iter()
        .fold(false, |acc, x| acc | (x.abs() > F16_MAX));
    let overflow = if over {
        values.iter().position(|x| x.abs() > F16_MAX)
    } else {
        None
    };
    NarrowReport {
        underflow,
        overflow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_underflow_and_finds_overflow() {
        let v = [1.0f32, 1e-5, -1e-9, 0.0, 6.2e-5, 70000.0, -65504.0];
        let mut out = vec![0u8; v.len() * 2];
        let rep = narrow_into(&v, &mut out);
        assert_eq!(rep.underflow, 2);
        assert_eq!(rep.overflow, Some(5));
        let back: Vec<f32> = out
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        assert_eq!(back[0], 1.0);
        assert_eq!(back[6], -65504.0);
        assert_eq!(back[2], -0.0);
    }
}
