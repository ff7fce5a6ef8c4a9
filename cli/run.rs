//! `q3vl run`: generate an answer with the runtime engine, streamed to stdout.

use crate::Outcome;
use anyhow::{bail, Context};
use q3vl_engine::detokenize::StreamDecoder;
use q3vl_engine::{
    pair_status, Engine, EngineError, EngineOptions, GenerateParams, Generation, StampStatus,
};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Arguments of `q3vl run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// A conversion's output folder (or its language bundle folder).
    #[arg(long)]
    pub bundle: PathBuf,
    /// An image (PNG or JPEG) to ask about; repeat for several, in order.
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    // Negative values are parsed so that the range check below names the option.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// PRNG seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON document instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Do not stop at eos: produce exactly --max-new-tokens tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Worker threads (default: all cores; at most 4 per core).
    #[arg(long, value_parser = crate::common::threads())]
    pub threads: Option<usize>,
    /// Resize the image with smart_resize instead of the fixed grid.
    #[arg(long)]
    pub dynamic_resolution: bool,
    /// Check every bundle file's sha256 before running.
    #[arg(long)]
    pub verify_checksums: bool,
    /// Refuse a bundle without a valid verification stamp.
    #[arg(long)]
    pub require_verified: bool,
    /// Largest conversation in tokens (prompt + new tokens); default: the model's.
    #[arg(long)]
    pub context: Option<usize>,
}

/// An engine and the shared claim on its output folder ([`q3vl_bundle::ReadClaim`]),
/// held for the engine's life: no conversion replaces the bundles it was opened from
/// (and whose stamps were checked) while it runs. Dereferences to the [`Engine`].
pub struct ClaimedEngine {
    engine: Engine,
    _claim: q3vl_bundle::ReadClaim,
}

impl ClaimedEngine {
    /// The engine and its claim, for a caller that must own the engine (the server);
    /// the claim must live as long as the engine is used.
    pub fn into_parts(self) -> (Engine, q3vl_bundle::ReadClaim) {
        (self.engine, self._claim)
    }
}

impl std::ops::Deref for ClaimedEngine {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

/// Opens the engine under a shared claim on the bundles' output folder and checks its
/// stamp; returns the stamp line for stderr, which the caller prints once the run
/// succeeded (an error stays the only line).
///
/// A conversion writing into the folder makes this fail at once, naming the folder.
/// With `require_verified` (the hint a refusal ends with), every byte of both bundles the engine opened is hashed
/// against their stamps before anything is generated (the claim keeps them the bytes
/// loaded; the engine's page-in left them in the page cache). Without it, the line
/// only says whether stamps are present.
pub fn open_engine(
    bundle: &Path,
    threads: Option<usize>,
    verify: bool,
    context: Option<usize>,
    require_verified: Option<&str>,
) -> anyhow::Result<(ClaimedEngine, String)> {
    crate::common::reuse_large_buffers();
    let claim = q3vl_bundle::ReadClaim::for_bundles(bundle)?;
    let opts = EngineOptions {
        threads,
        verify_checksums: verify,
        context,
    };
    let engine = Engine::open(bundle, &opts)?;
    let dirs = [engine.language().dir(), engine.vision_bundle().dir()];
    let line = if let Some(hint) = require_verified {
        // On the engine's thread count, like everything else the run does.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(engine.threads())
            .build()?;
        let status = pool.install(|| pair_status(dirs[0], dirs[1]));
        let line = format!("{}: {status}", dirs[0].display());
        if status != StampStatus::Valid {
            bail!("{line} ({hint})");
        }
        line
    } else {
        format!("{}: {}", dirs[0].display(), stamps_present(&dirs))
    };
    let engine = ClaimedEngine {
        engine,
        _claim: claim,
    };
    Ok((engine, line))
}

/// `e` as `run` reports it: a context overflow names `--max-new-tokens`, the option
/// that set the tokens to generate (the library names no option).
fn run_error(e: EngineError) -> anyhow::Error {
    match e {
        EngineError::ContextOverflow {
            prompt,
            new_tokens,
            context,
        } => anyhow::anyhow!(
            "the prompt ({prompt} tokens) plus --max-new-tokens {new_tokens} exceeds the context of {context} tokens"
        ),
        e => e.into(),
    }
}

/// The stamp line of a run that does not check the stamps: whether both are present.
fn stamps_present(dirs: &[&Path]) -> String {
    if dirs
        .iter()
        .all(|d| d.join(q3vl_bundle::STAMP_FILE).exists())
    {
        "stamped (not checked: --require-verified checks every byte)".into()
    } else {
        StampStatus::Missing.to_string()
    }
}

/// Runs `q3vl run`.
pub fn run(a: RunArgs) -> anyhow::Result<Outcome> {
    check_sampling(&a)?;
    // Read before the engine opens: a bad image fails at once, and a pipe's writer
    // (`--image <(…)`) is not kept waiting while the weights page in.
    let rgbs = a
        .image
        .iter()
        .map(|p| q3vl_model::image::load_rgb(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (engine, stamp_line) = open_engine(
        &a.bundle,
        a.threads,
        a.verify_checksums,
        a.context,
        a.require_verified.then_some("--require-verified"),
    )?;
    let pb = engine.prompt_builder()?;
    let spinner = crate::common::spinner(if a.image.is_empty() {
        "prefill"
    } else {
        "encoding the image"
    });
    let t_vis = Instant::now();
    let mut images = Vec::with_capacity(rgbs.len());
    for (path, rgb) in a.image.iter().zip(&rgbs) {
        let patched = engine
            .preprocess(rgb, a.dynamic_resolution)
            .with_context(|| format!("{}", path.display()))?;
        let f = engine.encode_image(&patched.pixel_values, patched.grid_thw)?;
        images.push(std::sync::Arc::new(f));
    }
    let vision_ms = t_vis.elapsed().as_secs_f64() * 1e3;
    spinner.set_message("prefill");
    let grids: Vec<[usize; 3]> = images.iter().map(|f| f.grid_thw).collect();
    let prompt = pb.chat_images(&a.prompt, &grids)?;
    let tok = pb.tokenizer();
    let decode = |ids: &[u32]| tok.decode(ids, true);
    let mut out = TextOut {
        decode: &decode,
        stream: StreamDecoder::new(),
        spinner: &spinner,
        json: a.json,
        hidden: if a.ignore_eos { &[] } else { engine.eos_ids() },
        stdout: std::io::stdout().lock(),
        write_err: None,
        started: t_vis,
        first_token_ms: None,
    };
    let params = generate_params(&a);
    let g = engine.generate(&prompt.ids, &images, &params, &mut |id| out.token(id));
    spinner.finish_and_clear();
    let g = g.map_err(run_error)?;
    if let Some(e) = out.write_err.take() {
        return Err(anyhow::Error::new(e).context("writing to stdout"));
    }
    eprintln!("{stamp_line}");
    let done = Done {
        prompt_tokens: prompt.ids.len(),
        generation: &g,
        vision_ms,
        first_token_ms: out.first_token_ms,
    };
    if a.json {
        let text = tok
            .decode(&g.tokens, true)
            .map_err(|e| anyhow::anyhow!("detokenizer failed: {e}"))?;
        println!("{}", done.json(&text, engine.threads()));
    } else {
        let rest = out.stream.finish(&decode).unwrap_or_default();
        println!("{rest}");
        eprintln!("{}", done.summary(a.max_new_tokens));
    }
    Ok(Outcome::Success)
}

/// Refuses a `--top-p` outside (0, 1] and a negative or non-finite `--temperature`,
/// naming the option, before any work.
fn check_sampling(a: &RunArgs) -> anyhow::Result<()> {
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", a.top_p);
    }
    if !a.temperature.is_finite() || a.temperature < 0.0 {
        bail!(
            "--temperature must be a finite number ≥ 0, got {}",
            a.temperature
        );
    }
    Ok(())
}

/// The generation settings the options ask for.
fn generate_params(a: &RunArgs) -> GenerateParams {
    GenerateParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        ignore_eos: a.ignore_eos,
        keep_logits: false,
    }
}

/// Where generated tokens go as they arrive: their text streamed to stdout (nothing
/// under `--json`, nor for a stopping eos), the spinner cleared at the first one.
struct TextOut<'a, E> {
    /// Ids to text, special tokens skipped (the tokenizer's decode).
    decode: &'a dyn Fn(&[u32]) -> Result<String, E>,
    stream: StreamDecoder,
    spinner: &'a indicatif::ProgressBar,
    json: bool,
    /// Ids whose text is not printed: the eos ids, unless `--ignore-eos`.
    hidden: &'a [u32],
    stdout: std::io::StdoutLock<'static>,
    /// The first failed write; generation goes on, the run fails after it.
    write_err: Option<std::io::Error>,
    /// When the image encode (or, without images, the prefill) started.
    started: Instant,
    /// Milliseconds from `started` to the first generated token.
    first_token_ms: Option<f64>,
}

impl<E> TextOut<'_, E> {
    fn token(&mut self, id: u32) {
        self.first_token_ms
            .get_or_insert_with(|| self.started.elapsed().as_secs_f64() * 1e3);
        if !self.spinner.is_finished() {
            self.spinner.finish_and_clear();
        }
        if self.json || self.hidden.contains(&id) {
            return;
        }
        if let Ok(piece) = self.stream.push(id, self.decode) {
            if let Err(e) = self
                .stdout
                .write_all(piece.as_bytes())
                .and_then(|_| self.stdout.flush())
            {
                self.write_err.get_or_insert(e);
            }
        }
    }
}

/// A finished generation, for the closing report.
struct Done<'a> {
    prompt_tokens: usize,
    generation: &'a Generation,
    vision_ms: f64,
    /// Time to the first token (None: none was generated).
    first_token_ms: Option<f64>,
}

impl Done<'_> {
    /// The `--json` document: ids, `text`, timings, threads and kernel path.
    fn json(&self, text: &str, threads: usize) -> serde_json::Value {
        let (g, t) = (self.generation, &self.generation.timings);
        json!({
            "prompt_tokens": self.prompt_tokens,
            "tokens": g.tokens,
            "text": text,
            "timings": {
                "vision_ms": self.vision_ms,
                "first_token_ms": self.first_token_ms,
                "prefill_ms": t.prefill_ms,
                "decode_ms": t.decode_ms,
                "prefill_tok_s": t.prefill_tok_s,
                "decode_tok_s": t.decode_tok_s,
                "decode_steps": t.decode_steps,
                "threads": threads,
                "kernel_path": q3vl_engine::kernels::path::best_path().name(),
            },
        })
    }

    /// The line stderr ends a text run with: token counts and rates.
    fn summary(&self, max_new_tokens: usize) -> String {
        if max_new_tokens == 0 {
            // The engine returns before prefill: there are no rates to give.
            return format!(
                "{} prompt tokens, 0 generated (--max-new-tokens 0: prefill and decode skipped)",
                self.prompt_tokens
            );
        }
        let t = &self.generation.timings;
        let first = self
            .first_token_ms
            .map_or_else(String::new, |ms| format!(", first token at {ms:.0} ms"));
        format!(
            "{} prompt tokens, {} generated; vision {:.0} ms{first}, prefill {:.1} tok/s, decode {:.2} tok/s",
            self.prompt_tokens,
            self.generation.tokens.len(),
            self.vision_ms,
            t.prefill_tok_s,
            t.decode_tok_s
        )
    }
}
