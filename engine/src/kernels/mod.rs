//! Compute kernels: the int8×int8 block matrix product (Q8_0-style) of the decoder,
//! f16-weight × f32 dot products, the packed f32 GEMM the vision tower and prefill
//! attention use, and vectorized element-wise math.
//!
//! Determinism rule shared by every kernel here: one output element is always
//! produced by one dot product whose reduction runs in a fixed order on one thread,
//! so results do not depend on the thread count.

pub mod f16dot;
pub mod gemm;
pub mod q8;
pub mod vmath;
