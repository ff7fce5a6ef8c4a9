//! Running a forward pass with the pool's other threads kept awake.
//!
//! A decode step is about 250 short parallel sections (each layer's matrix-vector
//! products, 0.1–2 ms each) separated by short serial stretches (norms, rope,
//! attention, the activations' quantization). rayon parks an idle worker after a few
//! microseconds, and waking it costs far more here than a section's imbalance: on a
//! 2-core KVM guest a 100 µs parallel section preceded by 20 µs of serial work took
//! 40 µs longer than its work, by 200 µs of serial work 80 µs longer (the worker's
//! wake-up), against 2–4 µs with the worker kept awake. llama.cpp's thread pool
//! busy-waits between its operations for the same reason.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long a kept-awake thread waits without work before it parks as rayon would.
const IDLE_LIMIT: Duration = Duration::from_millis(5);

/// Runs `f` on `pool` while every other thread of the pool waits for work awake
/// ([`awake_here`]). The work and its results are exactly those of `pool.install(f)`.
pub fn install_awake<R: Send>(pool: &rayon::ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    pool.install(|| awake_here(f))
}

/// Runs `f` on the current thread while every other thread of the current rayon pool
/// waits for work awake: each runs pending pool jobs as they appear and otherwise
/// yields its core to the OS (`sched_yield`, so an oversubscribed machine still runs
/// `f`'s thread), until `f` returns. Outside a pool, or in a pool of one thread,
/// this is `f()`.
pub fn awake_here<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let Some(caller) = rayon::current_thread_index() else {
        return f();
    };
    if rayon::current_num_threads() < 2 {
        return f();
    }
    /// Sets the flag when dropped, so the waiting threads stop even if `f` panics
    /// (otherwise the scope would wait for them forever instead of passing the panic on).
    struct Release<'a>(&'a AtomicBool);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        s.spawn_broadcast(|_, ctx| {
            // The caller's own copy returns at once: waiting there would wait for
            // `f`, which runs below it on the same thread.
            if ctx.index() == caller {
                return;
            }
            // A worker may run this job nested inside a job it stole from `f` (waiting
            // for a sub-job, rayon runs whatever is queued, this broadcast included);
            // spinning there until `f` returns would deadlock, as `f` waits for the
            // stolen job underneath. So the wait ends after IDLE_LIMIT without work:
            // longer than any gap between a pass's sections, short against a hang.
            let mut idle_since = std::time::Instant::now();
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    idle_since = std::time::Instant::now();
                } else if idle_since.elapsed() > IDLE_LIMIT {
                    return;
                } else {
                    std::thread::yield_now();
                }
            }
        });
        let _release = Release(&done);
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn gives_install_results_on_any_pool_size() {
        for threads in [1usize, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let want: Vec<u64> = (0..5000u64).map(|i| i * i % 977).collect();
            let got = install_awake(&pool, || {
                // Many sections with serial work between them, nested joins inside.
                let mut acc = Vec::new();
                for k in 0..50u64 {
                    let part: Vec<u64> = (k * 100..(k + 1) * 100)
                        .into_par_iter()
                        .map(|i| {
                            let (a, b) = rayon::join(|| i * i, || 977u64);
                            a % b
                        })
                        .collect();
                    acc.extend(part);
                }
                acc
            });
            assert_eq!(got, want, "threads={threads}");
            // A panic in `f` reaches the caller; the waiting threads do not keep the
            // scope (and the process) hanging. Checked from a watchdog thread, so a
            // regression fails here instead of hanging the test run.
            let (tx, rx) = std::sync::mpsc::channel();
            let p2 = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            std::thread::spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    install_awake(&p2, || panic!("inside a forward pass"))
                }));
                let _ = tx.send(r.is_err());
            });
            let caught = rx.recv_timeout(std::time::Duration::from_secs(60));
            assert_eq!(
                caught,
                Ok(true),
                "threads={threads}: the panic did not come back"
            );
            assert_eq!(awake_here(|| 7), 7, "outside a pool");
            // Nested joins whose halves take turns being slow: the other thread steals
            // a half, waits inside it, and may run its awake job there. That must not
            // hang (it did: a worker spun inside the stolen job `f` was waiting for).
            if threads > 1 {
                let (tx, rx) = std::sync::mpsc::channel();
                let p3 = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                std::thread::spawn(move || {
                    let mut sum = 0u64;
                    for round in 0..200u64 {
                        sum += install_awake(&p3, || {
                            (0..8u64)
                                .into_par_iter()
                                .map(|i| {
                                    let slow = || {
                                        if (i + round) % 3 == 0 {
                                            std::thread::sleep(Duration::from_micros(200));
                                        }
                                        i
                                    };
                                    let (a, b) = rayon::join(slow, slow);
                                    a + b
                                })
                                .sum::<u64>()
                        });
                    }
                    let _ = tx.send(sum);
                });
                let sum = rx.recv_timeout(Duration::from_secs(120));
                assert_eq!(sum, Ok(200 * 56), "threads={threads}: nested waits hung");
            }
            // The pool is usable afterwards (no worker left spinning in a job).
            assert_eq!(
                pool.install(|| (0..100u32).into_par_iter().sum::<u32>()),
                4950
            );
        }
    }
}
