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
//! The path is detected once ([`best_path`], behind a `OnceLock`). Every public entry
//! of a kernel that runs SIMD code is its `…_on(path, …)` function called with that
//! path, beside at most checks of its arguments' shapes that do not depend on the path.
//! The path is matched once per product, panel or row, never per element, so no inner
//! loop pays for it. An `…_on` function hands the path to a small function of the
//! kernel that `match`es the [`Path`] to an implementation: one arm per SIMD path
//! (`#[cfg]`-gated to its architecture), `_ =>` the portable code. A kernel whose tiles
//! are const-generic in their size picks the instance inside the same arm, with a
//! `match` on the size. An `…_on` function checks that the CPU runs the path it is
//! given (`is_available`: once per product, or in debug builds for the primitives
//! called per row or panel).
//!
//! Why a `match` on the path rather than a function pointer cached per kernel or a
//! static table per path: the tests run each path the CPU has through the `…_on`
//! function behind the engine's entry (`for path in available_paths()`), packing
//! included, which a pointer cached for the best path cannot do; the arms list every
//! implementation of a kernel in one place, next to the portable definition; and a
//! match on a `Copy` enum costs a compare per call, nothing beside the kernel it calls.

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

/// The SIMD extensions of this CPU that the kernels and their peaks look for, by
/// the names `is_x86_feature_detected!` takes (on aarch64: `neon`, `dotprod`).
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! detect {
            ($($f:tt),*) => {
                $(if is_x86_feature_detected!($f) {
                    v.push($f);
                })*
            };
        }
        detect!(
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16",
            "avx512fp16",
            "avxvnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push("neon");
        }
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            v.push("dotprod");
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

/// Whether this CPU runs `path` (is one of [`available_paths`]), from a detection made
/// once: an atomic load and a bit test, cheap enough for every call of an `…_on` entry.
pub(crate) fn is_available(path: Path) -> bool {
    static AVAILABLE: OnceLock<u8> = OnceLock::new();
    let mask = AVAILABLE.get_or_init(|| available_paths().iter().fold(0, |m, &p| m | 1 << p as u8));
    mask & 1 << path as u8 != 0
}

/// Panics unless this CPU runs `path`: the check of a product's `…_on` entry, whose
/// callers pass the detected path or one of [`available_paths`].
#[track_caller]
pub(crate) fn assert_available(path: Path) {
    assert!(is_available(path), "{path:?} is not available on this CPU");
}

/// [`assert_available`] in debug builds only: the check of the row primitives'
/// `…_on` functions, called once per row or slice (nothing in release builds).
#[inline(always)]
#[track_caller]
pub(crate) fn debug_assert_available(path: Path) {
    debug_assert!(is_available(path), "{path:?} is not available on this CPU");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_check_agrees_with_the_detection() {
        let avail = available_paths();
        for path in [Path::Portable, Path::Avx2, Path::Avx512Vnni, Path::Neon] {
            assert_eq!(is_available(path), avail.contains(&path), "{path:?}");
        }
        assert!(is_available(best_path()));
    }

    /// A row primitive refuses, in debug builds, a path this CPU cannot run.
    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "is not available on this CPU")]
    fn a_primitive_refuses_a_path_the_cpu_lacks() {
        let lacking = [Path::Neon, Path::Avx2]
            .into_iter()
            .find(|&p| !is_available(p))
            .expect("no CPU has both NEON and AVX2");
        crate::row::dot_f32_on(lacking, &[1.0], &[1.0]);
    }
}
