//! Machine measurements for `q3vl bench`: the engine's vision encode, prefill and
//! decode against the decode bound of the memory bandwidth measured in the same run
//! ([`run`]), streaming read bandwidths ([`memory`]), and kernel micro-benchmarks on
//! random data of the real shapes ([`kernels`]: the decoder's int8-weight linears for
//! prefill and decode, and the vision f32 GEMM), the instruction peaks of this CPU
//! ([`peaks`]) and the arithmetic of prefill and vision counted from the model's
//! shape ([`ops`]). The int8 × int8 and dequantized f32
//! kernels kept for comparison are measured by `make bench-q8` (module `q8`, feature
//! `q8-bench`), not by `q3vl bench`.

pub mod kernels;
pub mod memory;
pub mod ops;
pub mod peaks;
#[cfg(feature = "q8-bench")]
pub mod q8;
pub mod run;

pub use kernels::{
    f16_linear_rate, kernel_rates, kernels_only, q8_linear_rate, q8_sweep_rate, q8_sweep_rates,
    KernelBench, KernelShapes,
};
pub use memory::{memory_read_bandwidth, weights_read_bandwidth, ReadBandwidth, Reader};
pub use peaks::{instruction_peaks, Peak};
pub use q3vl_host::cpu::Cpu;
pub use run::{measure, BenchOptions, EngineBench};

use std::time::Instant;

/// One micro-benchmark's result: best-of wall time and the rate it implies.
#[derive(Debug, Clone, Copy)]
pub struct KernelRate {
    /// Best wall time of one call, milliseconds.
    pub ms: f64,
    /// Operations (2 per multiply-add) per second, in units of 10⁹.
    pub g_per_s: f64,
    /// Operations per CPU-second of all threads (best call), in units of 10⁹: on a
    /// shared machine, a steadier per-core figure than the wall-time rate. None when
    /// the CPU time is unavailable or too short to register (a call of microseconds).
    pub g_per_cpu_s: Option<f64>,
}

impl KernelRate {
    /// The rate of `ops` operations done in `wall` seconds using `cpu` CPU-seconds.
    pub(crate) fn of(ops: f64, wall: f64, cpu: f64) -> KernelRate {
        KernelRate {
            ms: wall * 1e3,
            g_per_s: ops / wall / 1e9,
            // `best_of` leaves f64::MAX where /proc is unreadable.
            g_per_cpu_s: (cpu > 0.0 && cpu < f64::MAX).then(|| ops / cpu / 1e9),
        }
    }
}

/// Runs `f` `reps` times; the best wall time and the best CPU time (seconds).
pub(crate) fn best_of(reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
    for _ in 0..reps.max(1) {
        let c0 = q3vl_host::threads_cpu_seconds();
        let t = Instant::now();
        f();
        wall = wall.min(t.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (c0, q3vl_host::threads_cpu_seconds()) {
            cpu = cpu.min(b - a);
        }
    }
    (wall, cpu)
}

/// A deterministic generator for benchmark data.
pub(crate) fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}
