//! `q3vl bench`: vision encode, prefill and decode speed and peak memory on this
//! machine, next to the decode bound from the memory bandwidth measured in the same run.

use crate::Outcome;
use q3vl_engine::bench::{memory_read_bandwidth, peak_rss_bytes};
use q3vl_engine::GenerateParams;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `q3vl bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// A conversion's output folder (or its language bundle folder).
    #[arg(long)]
    pub bundle: PathBuf,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Decode steps to time.
    #[arg(long, default_value_t = 16)]
    pub decode_tokens: usize,
    /// Size of the bandwidth test buffer in MiB (choose ≫ the last-level cache).
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
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

/// Runs `q3vl bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<Outcome> {
    let (engine, stamp_line) = crate::run::open_engine(&a.bundle, a.threads, false, None, false)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(engine.threads())
        .build()?;
    let bandwidth = pool.install(|| memory_read_bandwidth(a.bandwidth_mib << 20, 5));
    let pb = engine.prompt_builder()?;
    let q3vl_model::image::Resize::Fixed(side) = engine.fixed_resize() else {
        unreachable!("fixed_resize is fixed")
    };
    let patched = engine.preprocess(&test_image(side), false)?;
    let t = Instant::now();
    let feats = engine.encode_image(&patched.pixel_values, patched.grid_thw)?;
    let vision_ms = t.elapsed().as_secs_f64() * 1e3;
    let prompt = pb.chat("Describe this image.", Some(patched.grid_thw))?;
    let params = GenerateParams {
        max_new_tokens: a.decode_tokens + 1,
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let g = engine.generate(&prompt.ids, Some(&feats), &params, &mut |_| {})?;
    let tm = g.timings;
    let mid = prompt.ids.len() + a.decode_tokens / 2;
    let bytes_per_token = engine.decode_bytes(mid)?;
    let bound = bandwidth / bytes_per_token as f64;
    let ratio = tm.decode_tok_s / bound;
    let rss = peak_rss_bytes();
    if a.json {
        let doc = json!({
            "threads": engine.threads(),
            "bandwidth_gb_s": bandwidth / 1e9,
            "vision_ms": vision_ms,
            "image_tokens": feats.tokens,
            "prompt_tokens": prompt.ids.len(),
            "prefill_ms": tm.prefill_ms,
            "prefill_tok_s": tm.prefill_tok_s,
            "decode_steps": tm.decode_steps,
            "decode_tok_s": tm.decode_tok_s,
            "decode_bytes_per_token": bytes_per_token,
            "decode_bound_tok_s": bound,
            "decode_fraction_of_bound": ratio,
            "peak_rss_bytes": rss,
        });
        println!("{doc}");
    } else {
        println!("threads                 {}", engine.threads());
        println!("memory read bandwidth   {:.2} GB/s", bandwidth / 1e9);
        println!(
            "vision encode ({side}²)    {vision_ms:.0} ms ({} image tokens)",
            feats.tokens
        );
        println!(
            "prefill                 {} tokens, {:.0} ms, {:.2} tok/s",
            prompt.ids.len(),
            tm.prefill_ms,
            tm.prefill_tok_s
        );
        println!(
            "decode                  {} steps, {:.3} tok/s",
            tm.decode_steps, tm.decode_tok_s
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
    }
    eprintln!("{stamp_line}");
    Ok(Outcome::Success)
}
