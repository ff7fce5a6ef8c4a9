//! Compute kernels: int8×int8 block dot products (Q8_0-style), f16-weight × f32
//! dot products, and the f32 GEMM the vision tower uses.
//!
//! Determinism rule shared by every kernel here: one output element is always
//! produced by one dot product whose reduction runs in a fixed order on one thread,
//! so results do not depend on the thread count.

pub mod f16dot;
pub mod gemm;
pub mod q8;
