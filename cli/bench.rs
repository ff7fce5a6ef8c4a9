//! `q3vl bench`: vision encode, prefill and decode speed and peak memory on this
//! machine, next to the decode bound from the memory bandwidth measured in the same
//! run, and the kernels' own rates on the 8B shapes (the decoder's int8-weight
//! linears for prefill and decode, and the vision f32 GEMM). The measuring is
//! [`q3vl_engine::bench`]'s; this parses, calls and prints. The int8 × int8
//! comparison kernels are `make bench-q8`'s.

use crate::Outcome;
use q3vl_engine::bench::{
    kernels_only, measure, BenchOptions, Cpu, EngineBench, KernelBench, KernelRate, KernelShapes,
    Peak,
};

use q3vl_engine::EngineError;
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

fn print_kernel_rates(rates: &[(String, KernelRate)]) {
    for (name, r) in rates {
        let per_cpu = r
            .g_per_cpu_s
            .map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}"));
        println!(
            "kernel {name:<30} {:.1} GFLOP/s ({:.1} ms; {per_cpu} per CPU-s)",
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

impl BenchArgs {
    fn shapes(&self) -> KernelShapes {
        KernelShapes {
            prefill: self.q8_shape.clone(),
            vision: self.gemm_shape.clone(),
        }
    }
}

/// `q3vl bench --kernels-only`: the micro-benchmarks, plus the decode sweep over a
/// bundle's int8 weights when `--bundle` is given.
fn run_kernels_only(a: &BenchArgs) -> anyhow::Result<Outcome> {
    let engine = match &a.bundle {
        Some(b) => Some(crate::run::open_engine(b, a.threads, false, None, None)?.0),
        None => None,
    };
    let k = kernels_only(engine.as_deref(), a.threads, &a.shapes())?;
    if a.json {
        println!("{}", kernels_json(&k));
    } else {
        println!("threads                 {}", k.threads);
        println!("kernel path             {}", k.kernel_path);
        println!("decode prefetch         {}", k.decode_prefetch);
        print_kernel_rates(&k.rates);
        if let Some(v) = k.decode_sweep {
            println!(
                "decode sweep            {:.2} GB/s (every int8 weight x 1 token)",
                v / 1e9
            );
        }
    }
    Ok(Outcome::Success)
}

fn kernels_json(k: &KernelBench) -> serde_json::Value {
    json!({
        "threads": k.threads,
        "kernel_path": k.kernel_path,
        "decode_prefetch": k.decode_prefetch,
        "kernels": rates_json(&k.rates),
        "decode_sweep_gb_s": k.decode_sweep.map(|v| v / 1e9),
    })
}

/// Runs `q3vl bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<Outcome> {
    if a.kernels_only {
        return run_kernels_only(&a);
    }
    let bundle = a.bundle.as_ref().expect("clap requires --bundle");
    // The warm-up's clock starts before the open, which pages the weights in.
    let opened = Instant::now();
    let (engine, stamp_line) = crate::run::open_engine(bundle, a.threads, false, None, None)?;
    // At most `max_bandwidth_mib` (64 GiB), so the shift cannot overflow.
    let bandwidth_bytes = a
        .bandwidth_mib
        .unwrap_or(1024.min(crate::common::max_bandwidth_mib() as usize))
        << 20;
    let opts = BenchOptions {
        reps: a.reps as usize,
        decode_tokens: a.decode_tokens,
        bandwidth_bytes,
        kernels: a.shapes(),
    };
    let b = measure(&engine, &opts, opened).map_err(|e| match e {
        // The library counts the untimed extra token; the message names the option.
        EngineError::ContextOverflow {
            prompt, context, ..
        } => anyhow::anyhow!(
            "--decode-tokens {steps}: the prompt ({prompt} tokens) plus {steps} decode steps \
             exceeds the model's context of {context} tokens",
            steps = a.decode_tokens
        ),
        e => e.into(),
    })?;
    if a.json {
        println!("{}", bench_json(&b));
    } else {
        print_bench(&b);
    }
    eprintln!("{stamp_line}");
    Ok(Outcome::Success)
}

/// The CPU, as `--json` gives it (null where it cannot be read).
fn cpu_json(cpu: &Option<Cpu>, features: &[&str]) -> serde_json::Value {
    match cpu {
        Some(c) => json!({
            "vendor": c.vendor,
            "family": c.family,
            "model": c.model,
            "stepping": c.stepping,
            "name": c.name,
            "features": features,
        }),
        None => json!({ "features": features }),
    }
}

/// The instruction peaks: name → form and G operations/s.
fn peaks_json(peaks: &[Peak]) -> serde_json::Value {
    serde_json::Value::Object(
        peaks
            .iter()
            .map(|p| {
                let v = json!({"form": p.form, "g_per_s": p.g_per_s});
                (p.instruction.name().replace(' ', "_"), v)
            })
            .collect(),
    )
}

/// Each reader's bandwidth of the better pass, GB/s.
fn readers_json(b: &EngineBench) -> serde_json::Value {
    let both = b.bandwidth_by_reader();
    serde_json::Value::Object(
        both.by_reader
            .iter()
            .map(|(r, v)| (r.name().to_string(), json!(v / 1e9)))
            .collect(),
    )
}

/// The JSON document of `q3vl bench --json`.
fn bench_json(b: &EngineBench) -> serde_json::Value {
    let p = &b.phases;
    let mut v = json!({
        "cpu": cpu_json(&b.cpu, &b.cpu_features),
        "threads": b.threads,
        "kernel_path": b.kernel_path,
        "decode_prefetch": b.decode_prefetch,
        "reps": b.reps,
        "bandwidth_gb_s": b.bandwidth() / 1e9,
        "bandwidth_before_gb_s": b.bandwidth_before.best() / 1e9,
        "bandwidth_after_gb_s": b.bandwidth_after.best() / 1e9,
        "bandwidth_by_reader_gb_s": readers_json(b),
        "peaks": peaks_json(&b.peaks),
        "ttft_ms": p.ttft_ms.mean,
        "ttft_ms_sd": p.ttft_ms.sd,
        "prefill_ops": b.prefill_ops,
        "prefill_g_per_s": b.prefill_g_per_s(),
        "prefill_fraction_of_peak": b.prefill_fraction_of_peak(),
        "vision_ops": b.vision_ops,
        "vision_g_per_s": b.vision_g_per_s(),
        "vision_fraction_of_peak": b.vision_fraction_of_peak(),
    });
    // Two literals: one is past serde_json's macro recursion limit.
    let rest = json!({
        "warmup_ms": b.warmup.ms,
        "warmup_bytes": b.warmup.bytes,
        "stamp_check_ms": b.stamp_check.ms,
        "stamp_check_bytes": b.stamp_check.bytes,
        "vision_ms": p.vision_ms.mean,
        "vision_ms_sd": p.vision_ms.sd,
        "vision_cpu_s": p.vision_cpu_s,
        "prefill_cpu_s": p.prefill_cpu_s,
        "decode_cpu_s": p.decode_cpu_s,
        "image_tokens": b.image_tokens,
        "prompt_tokens": b.prompt_tokens,
        "prefill_ms": p.prefill_ms,
        "prefill_tok_s": p.prefill_tok_s.mean,
        "prefill_tok_s_sd": p.prefill_tok_s.sd,
        "decode_steps": p.decode_steps,
        "decode_tok_s": p.decode_tok_s.mean,
        "decode_tok_s_sd": p.decode_tok_s.sd,
        "decode_bytes_per_token": b.decode_bytes_per_token,
        "decode_bound_tok_s": b.decode_bound_tok_s(),
        "decode_fraction_of_bound": b.decode_fraction_of_bound(),
        "peak_rss_bytes": b.peak_rss_bytes,
        "kernels": rates_json(&b.kernels),
        "decode_sweep_gb_s": b.decode_sweep() / 1e9,
        "decode_sweep_by_prefetch_gb_s": serde_json::Value::Object(
            b.decode_sweeps
                .iter()
                .map(|(pf, v)| (pf.name().to_string(), json!(v / 1e9)))
                .collect(),
        ),
        "weights_read_gb_s": b.weights_read / 1e9,
        "weights_resident_bytes": b.weights_resident.0,
        "weights_huge_page_fraction": b.huge_page_fraction(),
    });
    if let (Some(m), serde_json::Value::Object(r)) = (v.as_object_mut(), rest) {
        m.extend(r);
    }
    v
}

/// ", N% of the P peak" where the peak was measured.
fn of_peak(fraction: Option<f64>, peak: &str) -> String {
    fraction.map_or_else(String::new, |f| {
        format!(", {:.0}% of the {peak} peak", f * 100.0)
    })
}

/// The machine lines of `q3vl bench`: the CPU, threads, kernel path, decode
/// prefetch and the instruction peaks.
fn print_machine(b: &EngineBench) {
    let cpu = b
        .cpu
        .as_ref()
        .map_or_else(|| "unknown".to_string(), |c| c.to_string());
    println!("cpu                     {cpu}");
    println!("cpu features            {}", b.cpu_features.join(" "));
    println!("threads                 {}", b.threads);
    println!("kernel path             {}", b.kernel_path);
    println!("decode prefetch         {}", b.decode_prefetch);
    for p in &b.peaks {
        println!(
            "peak {:<19} {:.0} G ops/s ({}, all threads)",
            p.instruction.name(),
            p.g_per_s,
            p.form
        );
    }
}

/// The table of `q3vl bench`.
fn print_bench(b: &EngineBench) {
    let (p, bandwidth) = (&b.phases, b.bandwidth());
    print_machine(b);
    println!(
        "memory read bandwidth   {:.2} GB/s (best of {:.2} before and {:.2} after; by reader: {})",
        bandwidth / 1e9,
        b.bandwidth_before.best() / 1e9,
        b.bandwidth_after.best() / 1e9,
        b.bandwidth_by_reader()
            .by_reader
            .iter()
            .map(|(r, v)| format!("{} {:.2}", r.name(), v / 1e9))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "warm-up                 {:.2} GB of mapped weights paged in at open, {:.0} ms (untimed)",
        b.warmup.bytes as f64 / 1e9,
        b.warmup.ms
    );
    println!(
        "stamp check             {:.2} GB hashed in {:.0} ms (what --require-verified adds to a load)",
        b.stamp_check.bytes as f64 / 1e9,
        b.stamp_check.ms
    );
    println!("repetitions             {} (mean ± sd)", b.reps);
    println!(
        "time to first token     {:.0} ± {:.0} ms (vision encode + prefill + first token)",
        p.ttft_ms.mean, p.ttft_ms.sd
    );
    println!(
        "vision encode ({}²)    {:.0} ± {:.0} ms ({} image tokens; {:.1} CPU-s; {:.0} G ops/s{})",
        b.image_side,
        p.vision_ms.mean,
        p.vision_ms.sd,
        b.image_tokens,
        p.vision_cpu_s,
        b.vision_g_per_s(),
        of_peak(b.vision_fraction_of_peak(), "f32 fma")
    );
    println!(
        "prefill                 {} tokens, {:.0} ms, {:.2} ± {:.2} tok/s ({:.1} CPU-s; {:.0} G ops/s{})",
        b.prompt_tokens,
        p.prefill_ms,
        p.prefill_tok_s.mean,
        p.prefill_tok_s.sd,
        p.prefill_cpu_s,
        b.prefill_g_per_s(),
        of_peak(b.prefill_fraction_of_peak(), "int16 dot")
    );
    println!(
        "decode                  {} steps, {:.3} ± {:.3} tok/s ({:.1} CPU-s)",
        p.decode_steps, p.decode_tok_s.mean, p.decode_tok_s.sd, p.decode_cpu_s
    );
    println!(
        "decode bytes / token    {:.3} GB",
        b.decode_bytes_per_token as f64 / 1e9
    );
    println!(
        "decode bound            {:.3} tok/s (bandwidth / bytes per token)",
        b.decode_bound_tok_s()
    );
    println!(
        "decode / bound          {:.1}%",
        b.decode_fraction_of_bound() * 100.0
    );
    if let Some(r) = b.peak_rss_bytes {
        println!(
            "peak RSS (VmHWM)        {:.2} GiB",
            r as f64 / (1u64 << 30) as f64
        );
    }
    println!(
        "decode sweep            {:.2} GB/s ({:.1}% of bandwidth; every int8 weight x 1 token, no other work; by prefetch: {})",
        b.decode_sweep() / 1e9,
        b.decode_sweep() / bandwidth * 100.0,
        b.decode_sweeps
            .iter()
            .map(|(pf, v)| format!("{} {:.2}", pf.name(), v / 1e9))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "weights read            {:.2} GB/s (a plain sum over the same mapped bytes; the sweep is {:.1}% of it)",
        b.weights_read / 1e9,
        b.decode_sweep() / b.weights_read * 100.0
    );
    if let Some(f) = b.huge_page_fraction() {
        println!(
            "weights on 2 MiB pages  {:.1}% of {:.2} GB resident (the rest is mapped 4 KiB at a time)",
            f * 100.0,
            b.weights_resident.0 as f64 / 1e9
        );
    }
    print_kernel_rates(&b.kernels);
}
