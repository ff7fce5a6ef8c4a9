//! The SIMD paths of the kernels and which of them this CPU can run, detected once
//! and shared by every kernel (each maps a path to its own implementation; a path a
//! kernel has no code for runs the best one it has below it).

use std::sync::OnceLock;

/// Which kernel path runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Plain Rust.
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 VNNI (with VL/BW).
    Avx512Vnni,
    /// aarch64 NEON.
    Neon,
}

/// The paths this CPU can run, best last.
pub fn available_paths() -> Vec<Path> {
    let mut v = vec![Path::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if avx2 {
            v.push(Path::Avx2);
        }
        if avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
        {
            v.push(Path::Avx512Vnni);
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Path::Neon);
        }
    }
    v
}

/// The best path of this CPU, chosen once.
pub fn best_path() -> Path {
    static BEST: OnceLock<Path> = OnceLock::new();
    *BEST.get_or_init(|| *available_paths().last().expect("portable is always there"))
}
