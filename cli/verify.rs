//! `q3vl verify`: the fp32 ladder (`--src`) and/or the quantized gates (`--bundle`,
//! or `--gguf` for a GGUF pair made by anyone)
//! against oracle traces; terminal table, report.json, report.html, JUnit, stamp.

use crate::{common, Outcome};
use anyhow::Result;
use clap::Args;
use q3vl_verify::session::{EngineGate, GgufInput, Progress, Request};
use q3vl_verify::{Gates, Stamping};
use std::path::{Path, PathBuf};

/// Arguments of `q3vl verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// A Hugging Face checkpoint folder: run the fp32 ladder on its original weights
    /// (with --bundle too, both ladders run and are plotted side by side).
    /// With --gguf, the GGUF's metadata (rope sections, DeepStack, epsilons, image
    /// normalization, tokenizer) is also checked against this checkpoint's.
    #[arg(long, required_unless_present_any = ["bundle", "gguf"])]
    src: Option<PathBuf>,
    /// A conversion output folder (language + vision bundles): run the quantized gates
    /// and the engine ≡ reference gate (the engine's greedy decode on each trace's
    /// inputs against the reference's on the same bundle).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// A Qwen3-VL GGUF text model made by any converter (F32, F16, BF16, Q8_0, the
    /// 4- and 5-bit types and the K-quants): the quantized ladder on its weights as
    /// llama.cpp reads them, with the thresholds of its coarsest type.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// The GGUF's vision projector (`mmproj`), needed for image traces.
    #[arg(long, requires = "gguf")]
    mmproj: Option<PathBuf>,
    /// An oracle trace (`qwen3vl-oracle-trace/2`, or /1); repeat for several.
    #[arg(long, required_unless_present = "prompt")]
    trace: Vec<PathBuf>,
    /// Instead of --trace: q3vl's fp32 reference on --src (itself gated against HF)
    /// serves as the oracle for this prompt, so no Python is needed. Its trace is
    /// written into the report folder. Needs --bundle or --gguf.
    #[arg(long, requires = "src", conflicts_with_all = ["trace", "stamp"])]
    prompt: Option<String>,
    /// With --prompt: an image (PNG or JPEG) the prompt asks about.
    #[arg(long, requires = "prompt")]
    image: Option<PathBuf>,
    /// Where to write report.json and report.html.
    #[arg(long, default_value = "verify-report")]
    report: PathBuf,
    /// A gates file overriding the built-in thresholds.
    #[arg(long)]
    gates: Option<PathBuf>,
    /// Write JUnit XML (one test case per gate) to this file.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// With --bundle: write verification.json into each bundle when every gate passed
    /// (not with --gguf: a stamp speaks for the bundles alone).
    #[arg(long, requires = "bundle", conflicts_with = "gguf")]
    stamp: bool,
    /// With --bundle: do not run the engine ≡ reference gate (the engine needs the
    /// whole bundle resident; the streamed ladder alone needs about one layer). The
    /// report says the gate did not run, and such a run cannot stamp.
    #[arg(long, requires = "bundle", conflicts_with = "stamp")]
    no_engine_gate: bool,
    /// Print the report as one JSON document on stdout.
    #[arg(long)]
    json: bool,
}

/// Runs the command.
pub fn run(a: VerifyArgs) -> Result<Outcome> {
    let gates = match &a.gates {
        Some(p) => Gates::from_file(p)?,
        None => Gates::builtin(),
    };
    let gguf = a.gguf.as_deref().map(|text| GgufInput {
        text,
        mmproj: a.mmproj.as_deref(),
    });
    // Removes the --prompt oracle's trace again unless the reports are written.
    let mut oracle_dir = Cleanup(None);
    let traces = match &a.prompt {
        Some(prompt) => {
            // Every input checked before the (long) reference run writes anything.
            if let Some(g) = gguf {
                q3vl_verify::session::open_gguf(g, &gates)?;
                if a.image.is_some() && g.mmproj.is_none() {
                    anyhow::bail!("--image with --gguf needs the projector (--mmproj)");
                }
            }
            let trace = self_oracle_trace(&a, prompt)?;
            oracle_dir.0 = trace.parent().map(Path::to_path_buf);
            vec![trace]
        }
        None => a.trace.clone(),
    };
    let request = Request {
        src: a.src.as_deref(),
        fp32_ladder: a.prompt.is_none(),
        bundle: a.bundle.as_deref(),
        gguf,
        traces: &traces,
        gates: &gates,
        engine: match a.no_engine_gate {
            true => EngineGate::Skip("--no-engine-gate".into()),
            false => EngineGate::Bundles,
        },
        stamp: a.stamp,
        tool: format!("q3vl {}", common::VERSION),
    };
    let verified = q3vl_verify::verify(&request, &mut Spinner(None))?;
    let report = verified.report();
    q3vl_verify::write_reports(report, &a.report, a.junit.as_deref())?;
    oracle_dir.0 = None;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if a.stamp {
        match verified.stamp()? {
            Stamping::Stamped(files) => {
                for f in files {
                    eprintln!("stamped {}", f.display());
                }
            }
            Stamping::GateFailed => eprintln!("not stamped: a gate failed"),
        }
    }
    Ok(if report.passed() {
        Outcome::Success
    } else {
        Outcome::GateFailed
    })
}

/// The trace of q3vl's fp32 reference on --src for --prompt (and --image), written as
/// `REPORT/oracle/prompt.safetensors`.
fn self_oracle_trace(a: &VerifyArgs, prompt: &str) -> Result<PathBuf> {
    use q3vl_verify::self_oracle::{write_trace, TraceRequest};
    if a.bundle.is_none() && a.gguf.is_none() {
        anyhow::bail!(
            "--prompt needs --bundle or --gguf: the reference would be checked against itself"
        );
    }
    let src = a.src.as_deref().expect("clap: --prompt requires --src");
    let cfg = q3vl_model::Qwen3VlConfig::from_dir(src)?;
    let ck = q3vl_model::Checkpoint::open(src)?;
    ck.check(&q3vl_model::layout::checkpoint_tensors(&cfg))?;
    let pb = common::spinner("q3vl's fp32 reference on --src (the oracle for --prompt)");
    let req = TraceRequest {
        prompt,
        image: a.image.as_deref(),
        full_logits: false,
    };
    let trace = a.report.join("oracle").join("prompt.safetensors");
    let written = write_trace(src, &ck, &trace, &req);
    pb.finish_and_clear();
    Ok(written?)
}

/// A folder removed when dropped, unless emptied first: what a run that failed wrote.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The terminal spinner of the step running (nothing when stderr is not a terminal).
struct Spinner(Option<indicatif::ProgressBar>);

impl Progress for Spinner {
    fn start(&mut self, step: &str) {
        self.0 = Some(common::spinner(step));
    }

    fn end(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
        }
    }
}
