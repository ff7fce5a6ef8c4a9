//! `q3vl bench`: vision encode, prefill and decode speed and peak memory on this
//! machine, next to the decode bound from the memory bandwidth measured in the same
//! run, and the kernels' own rates on the 8B shapes (the decoder's int8-weight
//! linears for prefill and decode, the int8 × int8 kernel for comparison, and the
//! vision f32 GEMM).

use crate::Outcome;
use q3vl_engine::bench::{
    f16_linear_rate, memory_read_bandwidth, peak_rss_bytes, process_cpu_seconds, q8_f32_gemm_rate,
    q8_linear_rate, q8_matmul_rate, q8_sweep_rate, weights_read_bandwidth, KernelRate,
};
use q3vl_engine::kernels::path::best_path;
use q3vl_engine::GenerateParams;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `q3vl bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// A conversion's output folder (or its language bundle folder).
    #[arg(long, required_unless_present = "kernels_only")]
    pub bundle: Option<PathBuf>,
    /// Only the kernel micro-benchmarks (no bundle needed).
    #[arg(long)]
    pub kernels_only: bool,
    /// Shapes of the prefill int8-weight linear micro-benchmark, `ROWSxCOLSxTOKENS`
    /// (repeatable; default: the 8B q_proj over a 211-token prompt; each size at most
    /// 2^20, the buffers at most 8 GiB, at most 2^38 multiply-adds).
    #[arg(long, value_parser = crate::common::q8_shape)]
    pub q8_shape: Vec<(usize, usize, usize)>,
    /// Shapes of the vision f32 GEMM micro-benchmark, `MxKxN` (patches × in → out;
    /// repeatable; default: the 8B qkv, fc1 and fc2 of one 448² image; bounded as
    /// --q8-shape).
    #[arg(long, value_parser = crate::common::gemm_shape)]
    pub gemm_shape: Vec<(usize, usize, usize)>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores; at most 4 per core).
    #[arg(long, value_parser = crate::common::threads())]
    pub threads: Option<usize>,
    /// Decode steps to time (1 to 1000000, and within the model's context).
    // At least one: with none, the decode rate and its share of the bound are 0/0.
    #[arg(long, default_value_t = 16,
          value_parser = crate::common::count_up_to(crate::common::MAX_DECODE_TOKENS))]
    pub decode_tokens: usize,
    /// Size of the bandwidth test buffer in MiB (choose ≫ the last-level cache; at
    /// most 64 GiB and half this machine's memory; default 1024, or that half if less).
    // At least 1 MiB: an empty buffer times only the pool's overhead, which would
    // make the bound tiny and flatter the decode ratio. No clap default: clap checks
    // defaults against the parser, and 1024 is above the bound on a small machine.
    #[arg(long, value_parser = crate::common::bandwidth_mib())]
    pub bandwidth_mib: Option<usize>,
    /// Times to repeat the vision encode and the prefill + decode run; rates are
    /// reported as mean ± standard deviation (like llama-bench's repetitions).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: u32,
}

/// Mean and sample standard deviation (0 for a single value).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// A synthetic 448×448-ish test picture (a smooth gradient with a square).
fn test_image(side: usize) -> q3vl_model::image::Rgb8 {
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
    q3vl_model::image::Rgb8 {
        width: side,
        height: side,
        data,
    }
}

/// The micro-benchmark shapes (Qwen3-VL-8B): the prefill linear (a 4096 × 4096 int8
/// weight over a 211-token prompt; the engine's f32 GEMM on int8 weights, and the int8 × int8
/// W8A8 kernel for comparison) and the vision GEMMs of one 448² image (784 patches;
/// qkv, fc1, fc2).
const Q8_SHAPE: (usize, usize, usize) = (4096, 4096, 211);
/// One decode step's largest matrix (gate/up, 8B), larger than the last-level cache.
const Q8_DECODE_SHAPE: (usize, usize) = (12288, 4096);
const VISION_SHAPES: [(&str, usize, usize, usize); 3] = [
    ("qkv", 784, 1152, 3456),
    ("fc1", 784, 1152, 4304),
    ("fc2", 784, 4304, 1152),
];

/// Kernel rates: (name, rate) lines for the table and the JSON document.
fn kernel_rates(
    q8_shapes: &[(usize, usize, usize)],
    gemm_shapes: &[(usize, usize, usize)],
) -> Vec<(String, KernelRate)> {
    let mut v = Vec::new();
    let default = [Q8_SHAPE];
    let shapes = if q8_shapes.is_empty() {
        &default[..]
    } else {
        q8_shapes
    };
    for &(r, c, t) in shapes {
        v.push((
            format!("prefill w8a16 gemm {r}x{c} x {t} tok"),
            q8_linear_rate(r, c, t, 7),
        ));
        v.push((
            format!("f32 gemm (dequantized) {r}x{c} x {t} tok"),
            q8_f32_gemm_rate(r, c, t, 7),
        ));
        v.push((
            format!("w8a8 {r}x{c} x {t} tok"),
            q8_matmul_rate(r, c, t, 7),
        ));
    }
    let (r, c) = Q8_DECODE_SHAPE;
    v.push((
        format!("decode w8a16 {r}x{c} x 1 tok"),
        q8_linear_rate(r, c, 1, 7),
    ));
    if gemm_shapes.is_empty() {
        for (name, m, k, n) in VISION_SHAPES {
            v.push((
                format!("vision {name} {m}x{k} -> {n}"),
                f16_linear_rate(m, k, n, 5),
            ));
        }
    }
    for &(m, k, n) in gemm_shapes {
        v.push((
            format!("vision {m}x{k} -> {n}"),
            f16_linear_rate(m, k, n, 5),
        ));
    }
    v
}

fn print_kernel_rates(rates: &[(String, KernelRate)]) {
    for (name, r) in rates {
        let unit = if name.starts_with("w8a8") {
            "GOPS int8"
        } else {
            "GFLOP/s"
        };
        let per_cpu = r
            .g_per_cpu_s
            .map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}"));
        println!(
            "kernel {name:<30} {:.1} {unit} ({:.1} ms; {per_cpu} per CPU-s)",
            r.g_per_s, r.ms
        );
    }
}

fn rates_json(rates: &[(String, KernelRate)]) -> serde_json::Value {
    serde_json::Value::Object(
        rates
            .iter()
            .map(|(n, r)| {
                (
                    n.clone(),
                    json!({"ms": r.ms, "g_per_s": r.g_per_s, "g_per_cpu_s": r.g_per_cpu_s}),
                )
            })
            .collect(),
    )
}

/// `q3vl bench --kernels-only`: the micro-benchmarks, plus the decode sweep over a
/// bundle's int8 weights when `--bundle` is given.
fn kernels_only(a: &BenchArgs) -> anyhow::Result<Outcome> {
    let engine = match &a.bundle {
        Some(b) => Some(crate::run::open_engine(b, a.threads, false, None, false)?.0),
        None => None,
    };
    let threads = engine.as_ref().map_or_else(
        || {
            a.threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        },
        |e| e.threads(),
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let rates = pool.install(|| kernel_rates(&a.q8_shape, &a.gemm_shape));
    let sweep = engine
        .as_ref()
        .map(|e| pool.install(|| q8_sweep_rate(e.language(), 5)));
    if a.json {
        println!(
            "{}",
            json!({
                "threads": threads,
                "kernel_path": best_path().name(),
                "kernels": rates_json(&rates),
                "decode_sweep_gb_s": sweep.map(|v| v / 1e9),
            })
        );
    } else {
        println!("threads                 {threads}");
        println!("kernel path             {}", best_path().name());
        print_kernel_rates(&rates);
        if let Some(v) = sweep {
            println!(
                "decode sweep            {:.2} GB/s (every int8 weight x 1 token)",
                v / 1e9
            );
        }
    }
    Ok(Outcome::Success)
}

/// What `q3vl run --require-verified` adds to a load: hashing every file of both
/// bundles as the stamp check does (on pages already cached by the warm-up, as they are
/// when the check runs first and the engine's page-in then finds them cached).
fn stamp_check_cost(engine: &q3vl_engine::Engine) -> anyhow::Result<(f64, u64)> {
    let t = Instant::now();
    let mut bytes = 0;
    for dir in [engine.language().dir(), engine.vision_bundle().dir()] {
        let files = q3vl_bundle::stamp::hash_bundle(dir)?;
        bytes += files.values().map(|f| f.size).sum::<u64>();
    }
    Ok((t.elapsed().as_secs_f64() * 1e3, bytes))
}

/// Refuses a `--decode-tokens` the model's context cannot hold, before any timing:
/// the run generates one token more than it times (the first comes from prefill).
fn check_decode_tokens(
    engine: &q3vl_engine::Engine,
    prompt: usize,
    steps: usize,
) -> anyhow::Result<()> {
    let context = engine.config().text.max_position_embeddings;
    // Both terms are bounded (the prompt by the context, the steps by the parser).
    if prompt.saturating_add(steps).saturating_add(1) > context {
        anyhow::bail!(
            "--decode-tokens {steps}: the prompt ({prompt} tokens) plus {steps} decode steps \
             exceeds the model's context of {context} tokens"
        );
    }
    Ok(())
}

/// Runs `q3vl bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<Outcome> {
    if a.kernels_only {
        return kernels_only(&a);
    }
    let bundle = a.bundle.as_ref().expect("clap requires --bundle");
    // Untimed warm-up, as llama-bench's: opening the engine pages in every tensor a
    // forward pass reads whole (`Bundle::populate`), and the vision tower follows.
    let t = Instant::now();
    let (engine, stamp_line) = crate::run::open_engine(bundle, a.threads, false, None, false)?;
    let warm_bytes = engine.paged_bytes() + engine.page_in_vision();
    let warmup_ms = t.elapsed().as_secs_f64() * 1e3;
    let (stamp_ms, stamp_bytes) = stamp_check_cost(&engine)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(engine.threads())
        .build()?;
    let pb = engine.prompt_builder()?;
    let q3vl_model::image::Resize::Fixed(side) = engine.fixed_resize() else {
        unreachable!("fixed_resize is fixed")
    };
    let patched = engine.preprocess(&test_image(side), false)?;
    let prompt = pb.chat("Describe this image.", Some(patched.grid_thw))?;
    check_decode_tokens(&engine, prompt.ids.len(), a.decode_tokens)?;
    // At most `max_bandwidth_mib` (64 GiB), so the shift cannot overflow.
    let bw_bytes = a
        .bandwidth_mib
        .unwrap_or(1024.min(crate::common::max_bandwidth_mib() as usize))
        << 20;
    // The bound uses the best bandwidth seen before and after the timed phases, so a
    // slow moment of the bandwidth test cannot flatter the decode ratio.
    let bw_before = pool.install(|| memory_read_bandwidth(bw_bytes, 5));
    let params = GenerateParams {
        max_new_tokens: a.decode_tokens + 1,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let cpu = || process_cpu_seconds().unwrap_or(f64::NAN);
    let (mut vision, mut prefill, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    let mut prefill_ms = 0.0;
    let (mut vision_cpu, mut prefill_cpu, mut decode_cpu) = (0.0, 0.0, 0.0);
    let mut last = None;
    for _ in 0..a.reps {
        let (t, c0) = (Instant::now(), cpu());
        let feats = engine.encode_image(&patched.pixel_values, patched.grid_thw)?;
        vision.push(t.elapsed().as_secs_f64() * 1e3);
        vision_cpu += (cpu() - c0) / a.reps as f64;
        // The first token arrives right after prefill: split the CPU time there.
        let c1 = cpu();
        let mut c_first = f64::NAN;
        let g = engine.generate(&prompt.ids, Some(&feats), &params, &mut |_| {
            if c_first.is_nan() {
                c_first = cpu();
            }
        })?;
        prefill_cpu += (c_first - c1) / a.reps as f64;
        decode_cpu += (cpu() - c_first) / a.reps as f64;
        prefill_ms += g.timings.prefill_ms / a.reps as f64;
        prefill.push(g.timings.prefill_tok_s);
        decode.push(g.timings.decode_tok_s);
        last = Some((feats.tokens, g.timings));
    }
    let (image_tokens, tm) = last.expect("at least one repetition");
    let ((vision_ms, vision_sd), (prefill_tok_s, prefill_sd), (decode_tok_s, decode_sd)) =
        (mean_sd(&vision), mean_sd(&prefill), mean_sd(&decode));
    let bw_after = pool.install(|| memory_read_bandwidth(bw_bytes, 5));
    let bandwidth = bw_before.max(bw_after);
    let mid = prompt.ids.len() + a.decode_tokens / 2;
    let bytes_per_token = engine.decode_bytes(mid)?;
    let bound = bandwidth / bytes_per_token as f64;
    let ratio = decode_tok_s / bound;
    let rss = peak_rss_bytes();
    // After the peak RSS: the micro-benchmarks' buffers are not the engine's.
    let rates = pool.install(|| kernel_rates(&a.q8_shape, &a.gemm_shape));
    let sweep = pool.install(|| q8_sweep_rate(engine.language(), 3));
    let weights_read = pool.install(|| weights_read_bandwidth(engine.language(), 3));
    // How much of the language bundle's resident mapping has 2 MiB entries: pages
    // cached earlier in small folios keep 4 KiB entries and read more slowly.
    let (resident, huge) = engine
        .language()
        .checkpoint()
        .resident_huge_bytes()
        .unwrap_or((0, 0));
    let huge_fraction = (resident > 0).then(|| huge as f64 / resident as f64);
    if a.json {
        let doc = json!({
            "threads": engine.threads(),
            "kernel_path": best_path().name(),
            "reps": a.reps,
            "bandwidth_gb_s": bandwidth / 1e9,
            "bandwidth_before_gb_s": bw_before / 1e9,
            "bandwidth_after_gb_s": bw_after / 1e9,
            "warmup_ms": warmup_ms,
            "warmup_bytes": warm_bytes,
            "stamp_check_ms": stamp_ms,
            "stamp_check_bytes": stamp_bytes,
            "vision_ms": vision_ms,
            "vision_ms_sd": vision_sd,
            "vision_cpu_s": vision_cpu,
            "prefill_cpu_s": prefill_cpu,
            "decode_cpu_s": decode_cpu,
            "image_tokens": image_tokens,
            "prompt_tokens": prompt.ids.len(),
            "prefill_ms": prefill_ms,
            "prefill_tok_s": prefill_tok_s,
            "prefill_tok_s_sd": prefill_sd,
            "decode_steps": tm.decode_steps,
            "decode_tok_s": decode_tok_s,
            "decode_tok_s_sd": decode_sd,
            "decode_bytes_per_token": bytes_per_token,
            "decode_bound_tok_s": bound,
            "decode_fraction_of_bound": ratio,
            "peak_rss_bytes": rss,
            "kernels": rates_json(&rates),
            "decode_sweep_gb_s": sweep / 1e9,
            "weights_read_gb_s": weights_read / 1e9,
            "weights_resident_bytes": resident,
            "weights_huge_page_fraction": huge_fraction,
        });
        println!("{doc}");
    } else {
        println!("threads                 {}", engine.threads());
        println!("kernel path             {}", best_path().name());
        println!(
            "memory read bandwidth   {:.2} GB/s (best of {:.2} before and {:.2} after)",
            bandwidth / 1e9,
            bw_before / 1e9,
            bw_after / 1e9
        );
        println!(
            "warm-up                 {:.2} GB of mapped weights paged in at open, {warmup_ms:.0} ms (untimed)",
            warm_bytes as f64 / 1e9
        );
        println!(
            "stamp check             {:.2} GB hashed in {stamp_ms:.0} ms (what --require-verified adds to a load)",
            stamp_bytes as f64 / 1e9
        );
        println!("repetitions             {} (mean ± sd)", a.reps);
        println!(
            "vision encode ({side}²)    {vision_ms:.0} ± {vision_sd:.0} ms ({image_tokens} image tokens; {vision_cpu:.1} CPU-s)"
        );
        println!(
            "prefill                 {} tokens, {prefill_ms:.0} ms, {prefill_tok_s:.2} ± {prefill_sd:.2} tok/s ({prefill_cpu:.1} CPU-s)",
            prompt.ids.len(),
        );
        println!(
            "decode                  {} steps, {decode_tok_s:.3} ± {decode_sd:.3} tok/s ({decode_cpu:.1} CPU-s)",
            tm.decode_steps
        );
        println!(
            "decode bytes / token    {:.3} GB",
            bytes_per_token as f64 / 1e9
        );
        println!("decode bound            {bound:.3} tok/s (bandwidth / bytes per token)");
        println!("decode / bound          {:.1}%", ratio * 100.0);
        if let Some(r) = rss {
            println!(
                "peak RSS (VmHWM)        {:.2} GiB",
                r as f64 / (1u64 << 30) as f64
            );
        }
        println!(
            "decode sweep            {:.2} GB/s ({:.1}% of bandwidth; every int8 weight x 1 token, no other work)",
            sweep / 1e9,
            sweep / bandwidth * 100.0
        );
        println!(
            "weights read            {:.2} GB/s (a plain sum over the same mapped bytes; the sweep is {:.1}% of it)",
            weights_read / 1e9,
            sweep / weights_read * 100.0
        );
        if let Some(f) = huge_fraction {
            println!(
                "weights on 2 MiB pages  {:.1}% of {:.2} GB resident (the rest is mapped 4 KiB at a time)",
                f * 100.0,
                resident as f64 / 1e9
            );
        }
        print_kernel_rates(&rates);
    }
    eprintln!("{stamp_line}");
    Ok(Outcome::Success)
}
