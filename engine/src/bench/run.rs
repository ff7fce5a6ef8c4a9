//! `q3vl bench`'s engine measurement: vision encode, prefill and decode of a
//! synthetic image prompt, repeated, next to the decode bound from the memory
//! bandwidth measured before and after, the prefill and vision arithmetic next to
//! the instruction peaks measured in the same run, the time to the first token, the
//! peak resident set, the untimed warm-up, the stamp check's cost and the kernel rates.

use super::kernels::{kernel_rates, q8_sweep_rates, KernelShapes};
use super::memory::{memory_read_bandwidth, weights_read_bandwidth, ReadBandwidth};
use super::ops::{prefill_ops, vision_ops};
use super::peaks::{instruction_peaks, peak_of, Peak};
use super::KernelRate;
use crate::kernels::matvec::Prefetch;
use crate::kernels::path::{best_path, cpu_features};
use crate::kernels::peak::Instruction;
use crate::{Engine, EngineError, GenerateParams, Result};
use q3vl_model::image::{PatchedImage, Resize, Rgb8};
use q3vl_model::prompt::Prompt;
use std::time::Instant;

/// How to run the engine benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Repetitions of the vision encode and the prefill + decode run (at least 1).
    pub reps: usize,
    /// Decode steps to time (at least 1); one token more is generated, the first
    /// coming from prefill.
    pub decode_tokens: usize,
    /// Bytes of the bandwidth test's buffer (choose ≫ the last-level cache).
    pub bandwidth_bytes: usize,
    /// The kernel micro-benchmarks' shapes.
    pub kernels: KernelShapes,
}

/// A one-off cost: time and the bytes it covered.
#[derive(Debug, Clone, Copy)]
pub struct Cost {
    /// Wall time, milliseconds.
    pub ms: f64,
    /// Bytes covered.
    pub bytes: u64,
}

/// The mean and sample standard deviation of a figure over the repetitions.
#[derive(Debug, Clone, Copy)]
pub struct MeanSd {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (0 for a single repetition).
    pub sd: f64,
}

impl MeanSd {
    fn of(v: &[f64]) -> MeanSd {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        if v.len() < 2 {
            return MeanSd { mean, sd: 0.0 };
        }
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        MeanSd {
            mean,
            sd: var.sqrt(),
        }
    }
}

/// The timed repetitions: wall rates and per-phase CPU seconds (means).
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// Vision encode, milliseconds.
    pub vision_ms: MeanSd,
    /// Time to the first token: from the start of the vision encode to the first
    /// generated token (vision + prefill + the first token's sampling), milliseconds.
    pub ttft_ms: MeanSd,
    /// Prefill wall time, milliseconds (mean).
    pub prefill_ms: f64,
    /// Prefill, prompt tokens per second.
    pub prefill_tok_s: MeanSd,
    /// Decode steps per second.
    pub decode_tok_s: MeanSd,
    /// Decode steps of the last repetition.
    pub decode_steps: usize,
    /// CPU seconds of the vision encode (mean).
    pub vision_cpu_s: f64,
    /// CPU seconds of the prefill (mean).
    pub prefill_cpu_s: f64,
    /// CPU seconds of the decode (mean).
    pub decode_cpu_s: f64,
}

/// Everything `q3vl bench` reports for a bundle.
#[derive(Debug, Clone)]
pub struct EngineBench {
    /// The CPU (None where it cannot be read).
    pub cpu: Option<q3vl_host::cpu::Cpu>,
    /// The CPU's SIMD extensions the kernels look for ([`cpu_features`]).
    pub cpu_features: Vec<&'static str>,
    /// Worker threads.
    pub threads: usize,
    /// The kernels' instruction path.
    pub kernel_path: &'static str,
    /// The decode kernel's software prefetch on this CPU.
    pub decode_prefetch: &'static str,
    /// Repetitions.
    pub reps: usize,
    /// Read bandwidth before the timed phases, by reader.
    pub bandwidth_before: ReadBandwidth,
    /// Read bandwidth after them, by reader.
    pub bandwidth_after: ReadBandwidth,
    /// The instruction peaks on all threads, measured after the timed phases.
    pub peaks: Vec<Peak>,
    /// Operations of the prefill ([`prefill_ops`]).
    pub prefill_ops: f64,
    /// Operations of the vision tower on the test image ([`vision_ops`]).
    pub vision_ops: f64,
    /// The untimed warm-up: opening the engine (which pages in the language weights a
    /// pass reads whole) and paging in the vision tower.
    pub warmup: Cost,
    /// Hashing every file of both bundles, as `q3vl run --require-verified` does.
    pub stamp_check: Cost,
    /// The test image's side, pixels.
    pub image_side: usize,
    /// Image tokens of the prompt.
    pub image_tokens: usize,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// The timed phases.
    pub phases: Phases,
    /// Bytes one decode step reads at the middle of the timed decode.
    pub decode_bytes_per_token: u64,
    /// Peak resident set after the timed phases (before the micro-benchmarks).
    pub peak_rss_bytes: Option<u64>,
    /// Kernel rates ([`kernel_rates`]).
    pub kernels: Vec<(String, KernelRate)>,
    /// The decode sweep over the bundle's int8 weights with each prefetch variant
    /// (x86; off x86, the chosen one), bytes/s ([`super::q8_sweep_rates`]).
    pub decode_sweeps: Vec<(Prefetch, f64)>,
    /// A plain read of the same weights, bytes/s ([`weights_read_bandwidth`]).
    pub weights_read: f64,
    /// Bytes of the language bundle's mapping resident, and of those on 2 MiB pages.
    pub weights_resident: (u64, u64),
}

impl EngineBench {
    /// The better of the two bandwidth passes: a slow moment of one cannot flatter
    /// the decode ratio.
    pub fn bandwidth(&self) -> f64 {
        self.bandwidth_by_reader().best()
    }

    /// The decode sweep with the prefetch the decode kernel issues, bytes/s (0 if it
    /// was not timed).
    pub fn decode_sweep(&self) -> f64 {
        let chosen = crate::kernels::matvec::prefetch();
        let s = self.decode_sweeps.iter().find(|s| s.0 == chosen);
        s.map_or(0.0, |s| s.1)
    }

    /// Each reader's bandwidth, the better of the two passes.
    pub fn bandwidth_by_reader(&self) -> ReadBandwidth {
        self.bandwidth_before.max(&self.bandwidth_after)
    }

    /// The prefill's arithmetic, G operations/s (mean prefill time).
    pub fn prefill_g_per_s(&self) -> f64 {
        self.prefill_ops / (self.phases.prefill_ms * 1e-3) / 1e9
    }

    /// The vision tower's arithmetic, G operations/s (mean encode time).
    pub fn vision_g_per_s(&self) -> f64 {
        self.vision_ops / (self.phases.vision_ms.mean * 1e-3) / 1e9
    }

    /// The prefill's share of the int16 product peak (None: the path has no peak).
    pub fn prefill_fraction_of_peak(&self) -> Option<f64> {
        peak_of(&self.peaks, Instruction::Int16Dot).map(|p| self.prefill_g_per_s() / p)
    }

    /// The vision encode's share of the f32 FMA peak (None: the path has no peak).
    pub fn vision_fraction_of_peak(&self) -> Option<f64> {
        peak_of(&self.peaks, Instruction::F32Fma).map(|p| self.vision_g_per_s() / p)
    }

    /// The decode bound, tokens/s: bandwidth / bytes per token.
    pub fn decode_bound_tok_s(&self) -> f64 {
        self.bandwidth() / self.decode_bytes_per_token as f64
    }

    /// The decode rate's share of the bound.
    pub fn decode_fraction_of_bound(&self) -> f64 {
        self.phases.decode_tok_s.mean / self.decode_bound_tok_s()
    }

    /// The share of the resident weights on 2 MiB pages (None: nothing resident).
    pub fn huge_page_fraction(&self) -> Option<f64> {
        let (resident, huge) = self.weights_resident;
        (resident > 0).then(|| huge as f64 / resident as f64)
    }
}

/// Measures `engine`, opened (the warm-up's clock) at `opened`: warm-up, stamp check
/// cost, then `opts.reps` timed runs between two bandwidth passes, then the kernels.
pub fn measure(engine: &Engine, opts: &BenchOptions, opened: Instant) -> Result<EngineBench> {
    // Untimed warm-up, as llama-bench's: opening the engine paged in every tensor a
    // forward pass reads whole (`Bundle::populate`); the vision tower follows.
    let warm_bytes = engine.paged_bytes() + engine.page_in_vision();
    let warmup = Cost {
        ms: opened.elapsed().as_secs_f64() * 1e3,
        bytes: warm_bytes as u64,
    };
    let stamp_check = stamp_check_cost(engine)?;
    let threads = engine.threads();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|source| EngineError::ThreadPool { threads, source })?;
    let (side, patched, prompt) = bench_prompt(engine)?;
    // Refused before any timing: the run generates one token more than it times.
    engine.check_context(prompt.ids.len(), opts.decode_tokens.saturating_add(1))?;
    let bandwidth_before = pool.install(|| memory_read_bandwidth(opts.bandwidth_bytes, 5));
    let (phases, image_tokens) = time_phases(engine, &patched, &prompt, opts)?;
    let bandwidth_after = pool.install(|| memory_read_bandwidth(opts.bandwidth_bytes, 5));
    let peaks = pool.install(|| instruction_peaks(best_path(), 5));
    let [t, h, w] = patched.grid_thw;
    let config = engine.language().config();
    let prefill_ops = prefill_ops(&config.text, prompt.ids.len());
    let vision_ops = vision_ops(&engine.vision_bundle().config().vision, t * h * w);
    let mid = prompt.ids.len() + opts.decode_tokens / 2;
    let decode_bytes_per_token = engine.decode_bytes(mid)?;
    let peak_rss_bytes = q3vl_host::peak_rss_bytes();
    // After the peak RSS: the micro-benchmarks' buffers are not the engine's.
    let kernels = pool.install(|| kernel_rates(&opts.kernels));
    let sweeps = pool.install(|| q8_sweep_rates(engine.language(), 3, &sweep_variants()));
    let weights_read = pool.install(|| weights_read_bandwidth(engine.language(), 3));
    // How much of the language bundle's resident mapping has 2 MiB entries: pages
    // cached earlier in small folios keep 4 KiB entries and read more slowly.
    let weights_resident = engine
        .language()
        .checkpoint()
        .resident_huge_bytes()
        .unwrap_or((0, 0));
    Ok(EngineBench {
        cpu: q3vl_host::cpu::cpu(),
        cpu_features: cpu_features(),
        threads,
        kernel_path: best_path().name(),
        decode_prefetch: decode_prefetch_name(),
        reps: opts.reps,
        bandwidth_before,
        bandwidth_after,
        peaks,
        prefill_ops,
        vision_ops,
        warmup,
        stamp_check,
        image_side: side,
        image_tokens,
        prompt_tokens: prompt.ids.len(),
        phases,
        decode_bytes_per_token,
        peak_rss_bytes,
        kernels,
        decode_sweeps: sweeps,
        weights_read,
        weights_resident,
    })
}

/// The prefetch variants the decode sweep is timed with: both on x86 (they differ by
/// CPU), elsewhere (where the kernel issues none) the one chosen, so the chosen
/// variant's figure is always there.
fn sweep_variants() -> Vec<Prefetch> {
    if cfg!(target_arch = "x86_64") {
        Prefetch::ALL.to_vec()
    } else {
        vec![crate::kernels::matvec::prefetch()]
    }
}

/// The decode kernel's prefetch, as reports name it (`none` where the path issues
/// none: off x86).
pub fn decode_prefetch_name() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        crate::kernels::matvec::prefetch().name()
    } else {
        "none"
    }
}

/// What `q3vl run --require-verified` adds to a load: hashing every file of both
/// bundles as the stamp check does (on pages already cached by the warm-up, as they
/// are when the check runs first and the engine's page-in then finds them cached).
fn stamp_check_cost(engine: &Engine) -> Result<Cost> {
    let t = Instant::now();
    let mut bytes = 0;
    for dir in [engine.language().dir(), engine.vision_bundle().dir()] {
        let files = q3vl_bundle::stamp::hash_bundle(dir)?;
        bytes += files.values().map(|f| f.size).sum::<u64>();
    }
    Ok(Cost {
        ms: t.elapsed().as_secs_f64() * 1e3,
        bytes,
    })
}

/// The benchmark's prompt: a synthetic picture of the bundle's fixed side, and a
/// question about it.
fn bench_prompt(engine: &Engine) -> Result<(usize, PatchedImage, Prompt)> {
    let Resize::Fixed(side) = engine.fixed_resize() else {
        unreachable!("fixed_resize is fixed")
    };
    let patched = engine.preprocess(&test_image(side), false)?;
    let prompt = engine
        .prompt_builder()?
        .chat("Describe this image.", Some(patched.grid_thw))?;
    Ok((side, patched, prompt))
}

/// The timed repetitions (image tokens of the last).
fn time_phases(
    engine: &Engine,
    patched: &PatchedImage,
    prompt: &Prompt,
    opts: &BenchOptions,
) -> Result<(Phases, usize)> {
    let params = GenerateParams {
        max_new_tokens: opts.decode_tokens + 1,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let cpu = || q3vl_host::process_cpu_seconds().unwrap_or(f64::NAN);
    let reps = opts.reps as f64;
    let (mut vision, mut prefill, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    let mut ttft = Vec::new();
    let mut prefill_ms = 0.0;
    let (mut vision_cpu, mut prefill_cpu, mut decode_cpu) = (0.0, 0.0, 0.0);
    let mut last = None;
    for _ in 0..opts.reps {
        let (t, c0) = (Instant::now(), cpu());
        let feats =
            std::sync::Arc::new(engine.encode_image(&patched.pixel_values, patched.grid_thw)?);
        vision.push(t.elapsed().as_secs_f64() * 1e3);
        vision_cpu += (cpu() - c0) / reps;
        // The first token arrives right after prefill: split the CPU time there.
        let c1 = cpu();
        let (mut c_first, mut t_first) = (f64::NAN, f64::NAN);
        let g = engine.generate(
            &prompt.ids,
            std::slice::from_ref(&feats),
            &params,
            &mut |_| {
                if c_first.is_nan() {
                    t_first = t.elapsed().as_secs_f64() * 1e3;
                    c_first = cpu();
                }
            },
        )?;
        ttft.push(t_first);
        prefill_cpu += (c_first - c1) / reps;
        decode_cpu += (cpu() - c_first) / reps;
        prefill_ms += g.timings.prefill_ms / reps;
        prefill.push(g.timings.prefill_tok_s);
        decode.push(g.timings.decode_tok_s);
        last = Some((feats.tokens, g.timings.decode_steps));
    }
    let (image_tokens, decode_steps) = last.expect("at least one repetition");
    let phases = Phases {
        vision_ms: MeanSd::of(&vision),
        ttft_ms: MeanSd::of(&ttft),
        prefill_ms,
        prefill_tok_s: MeanSd::of(&prefill),
        decode_tok_s: MeanSd::of(&decode),
        decode_steps,
        vision_cpu_s: vision_cpu,
        prefill_cpu_s: prefill_cpu,
        decode_cpu_s: decode_cpu,
    };
    Ok((phases, image_tokens))
}

/// A synthetic test picture of `side`² pixels (a smooth gradient with a square).
fn test_image(side: usize) -> Rgb8 {
    let mut data = Vec::with_capacity(side * side * 3);
    for y in 0..side {
        for x in 0..side {
            let inside = (side / 4..side / 2).contains(&x) && (side / 4..side / 2).contains(&y);
            data.extend([
                if inside { 220 } else { (x * 255 / side) as u8 },
                (y * 255 / side) as u8,
                if inside { 30 } else { 128 },
            ]);
        }
    }
    Rgb8 {
        width: side,
        height: side,
        data,
    }
}
