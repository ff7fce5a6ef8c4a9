//! The SIMD paths of the kernels and which of them this CPU can run, detected once
//! and shared by every kernel (each maps a path to its own implementation; a path a
//! kernel has no code for runs the best one it has below it).
//!
//! `Q3VL_KERNEL_PATH` (see [`PATH_VAR`]) picks a lower path than the best one, to
//! measure one path against another on one machine or to reproduce what a CPU
//! without the best path computes (the int8 products give the same bits on every
//! path; the f32 ones agree to rounding).
//!
//! # How a kernel dispatches (one style for every kernel)
//!
//! The path is detected once ([`best_path`], behind a `OnceLock`). A kernel's public
//! entry passes it to the kernel's `…_on(path, …)` function or to a small function
//! of the kernel that `match`es the [`Path`] to an implementation: one arm per SIMD
//! path (`#[cfg]`-gated to its architecture), `_ =>` the portable code. A kernel whose
//! tiles are const-generic in their size picks the instance inside the same arm, with
//! a `match` on the size.
//!
//! Why a `match` on the path rather than a function pointer cached per kernel or a
//! static table per path: the tests run each path the CPU has through the very
//! function the engine calls (`for path in available_paths()`), which a pointer
//! cached for the best path cannot do; the arms list every implementation of a
//! kernel in one place, next to the portable definition; and a match on a `Copy`
//! enum costs a compare per call, nothing beside the kernel it calls.

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

impl Path {
    /// The path's name, as `Q3VL_KERNEL_PATH` takes it and reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::Avx512Vnni => "avx512vnni",
            Path::Neon => "neon",
        }
    }
}

/// The environment variable naming the kernel path to run instead of the best.
pub const PATH_VAR: &str = "Q3VL_KERNEL_PATH";

/// A `Q3VL_KERNEL_PATH` value that names no path this CPU runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRequestError {
    /// The variable's value.
    pub value: String,
    /// The paths this CPU runs, by name.
    pub available: Vec<&'static str>,
}

impl std::fmt::Display for PathRequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{PATH_VAR}={:?} is not a kernel path this CPU runs (it runs: {})",
            self.value,
            self.available.join(", ")
        )
    }
}

impl std::error::Error for PathRequestError {}

/// The path `Q3VL_KERNEL_PATH` asks for: `Ok(None)` when it is unset or empty, an
/// error naming the variable when it names no path or one this CPU cannot run.
pub fn requested_path() -> Result<Option<Path>, PathRequestError> {
    let Ok(v) = std::env::var(PATH_VAR) else {
        return Ok(None);
    };
    if v.is_empty() {
        return Ok(None);
    }
    let avail = available_paths();
    match avail.iter().find(|p| p.name() == v.to_ascii_lowercase()) {
        Some(p) => Ok(Some(*p)),
        None => Err(PathRequestError {
            value: v,
            available: avail.iter().map(|p| p.name()).collect(),
        }),
    }
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

/// The path every kernel runs, chosen once: the one `Q3VL_KERNEL_PATH` names, else
/// the best of this CPU (a bad value is the caller's to report, through
/// [`requested_path`]; here it falls back to the best).
pub fn best_path() -> Path {
    static BEST: OnceLock<Path> = OnceLock::new();
    *BEST.get_or_init(|| {
        requested_path()
            .ok()
            .flatten()
            .unwrap_or_else(|| *available_paths().last().expect("portable is always there"))
    })
}
