//! compressed-tensors' `pack-quantized` layout of 8-bit weights, exactly.
//!
//! For `num_bits` = 8 the library (`compressors/pack_quantized/helpers.py`,
//! `pack_to_int32`, compressed-tensors 0.20.1) stores a weight `q` of shape
//! `[out, in]` (int8, symmetric, so no zero point) as `weight_packed`, int32
//! `[out, in / 4]`:
//!
//! ```text
//! u[r, c]              = q[r, c] + 128                       (0 ..= 255; q = -128 gives 0)
//! weight_packed[r, w]  = Σ_{k<4} u[r, 4w + k] << (8k)        (as an int32: bit 31 is a sign)
//! ```
//!
//! so element `4w + k` is byte `k` (least significant first) of word `w`, and the
//! little-endian bytes of a row of words are the row's `u` values in column order.
//! Unpacking takes byte `k` of the word and subtracts 128. Dequantization
//! (`lifecycle/forward.py`, `dequantize`) is `q · weight_scale[r, c / group_size]`,
//! computed in the scale's dtype.

/// The `weight_packed` bytes (little-endian int32 words) of int8 values `q`, a
/// row-major `[out, in]` matrix with `in` a multiple of 4.
pub fn pack_q8(q: &[i8]) -> Vec<u8> {
    // q + 128 as a byte is q's two's-complement byte with its top bit flipped.
    q.iter().map(|&v| (v as u8) ^ 0x80).collect()
}

/// The int8 values in `weight_packed` bytes: [`pack_q8`] undone.
pub fn unpack_q8(packed: &[u8]) -> Vec<i8> {
    packed.iter().map(|&b| (b ^ 0x80) as i8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library's definition, written out word by word: element 4w + k is byte k of
    /// word w, holding q + 128.
    fn pack_by_words(q: &[i8]) -> Vec<u8> {
        q.chunks_exact(4)
            .flat_map(|w| {
                let word = (0..4).fold(0u32, |acc, k| {
                    acc | (((w[k] as i32 + 128) as u32) << (8 * k))
                });
                (word as i32).to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn packing_follows_the_library_word_by_word() {
        let q: Vec<i8> = (i8::MIN..=i8::MAX).chain([0, -1, 1, 127]).collect();
        assert_eq!(q.len() % 4, 0);
        assert_eq!(pack_q8(&q), pack_by_words(&q));
        assert_eq!(unpack_q8(&pack_q8(&q)), q);
    }

    #[test]
    fn the_extremes_and_the_sign_bit() {
        // -128 → 0, 0 → 128, 127 → 255; the first element is the least significant byte.
        let w = i32::from_le_bytes(pack_q8(&[-128, 0, 127, -1]).try_into().unwrap());
        assert_eq!(w as u32, 0x7fff_8000);
        let w = i32::from_le_bytes(pack_q8(&[0, 0, 0, 127]).try_into().unwrap());
        assert!(w < 0, "a top byte of 255 makes the int32 negative");
    }
}
