//! One verification run, as `q3vl verify` asks for it: the traces opened, the fp32
//! ladder on a checkpoint and/or the quantized ladder on a bundle (with the engine ≡
//! reference gate), one [`Report`]; then the report files and the bundles' stamps.

use crate::bundle_source::BundleSource;
use crate::engine_gate::GATE as ENGINE_GATE;
use crate::error::{Result, VerifyError};
use crate::gates::Gates;
use crate::ladder::{verify_trace, Profile, Subject, TraceReport};
use crate::noise::RoundingVariance;
use crate::report::{NotRun, Report};
use crate::stamping::{self, Digests, Stamping};
use crate::trace::OracleTrace;
use q3vl_bundle::{Bundles, ReadClaim};
use q3vl_engine::{Engine, EngineError, EngineOptions};
use q3vl_model::prompt::PromptBuilder;
use q3vl_model::{Checkpoint, PreprocessorConfig, Qwen3VlConfig, WeightSource};
use std::path::{Path, PathBuf};

/// Opens an engine for the engine ≡ reference gate, given the verified bundles' folder.
pub type EngineOpener<'a> = &'a dyn Fn(&Path) -> std::result::Result<Engine, EngineError>;

/// Whether and with what engine the engine ≡ reference gate runs.
pub enum EngineGate<'a> {
    /// Run it with the engine on the verified bundles themselves, opened under the
    /// run's claim on them ([`open_engine`]), as `q3vl verify` runs it.
    Bundles,
    /// Run it with the engine `opener` gives (a test's deliberately wrong engine, say).
    /// The gate then says nothing about the verified bundles' own engine, so the run
    /// cannot stamp them.
    Other(EngineOpener<'a>),
    /// Do not run it (the engine needs the whole bundle resident); the report lists
    /// the gate as not run, saying why, and the run cannot stamp.
    Skip(String),
}

/// The engine on the bundles in `out`, with the default options: what the gate holds
/// against the reference.
pub fn open_engine(out: &Path) -> std::result::Result<Engine, EngineError> {
    Engine::open(out, &EngineOptions::default())
}

/// Told when a long step starts and ends, for a spinner ([`Quiet`] ignores it).
pub trait Progress {
    /// A step starts, named as a person reads it.
    fn start(&mut self, step: &str);
    /// The step ended.
    fn end(&mut self);
}

/// Progress that shows nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: &str) {}
    fn end(&mut self) {}
}

/// What to verify, against what.
pub struct Request<'a> {
    /// A Hugging Face checkpoint folder (`--src`): the fp32 ladder on its original
    /// weights (unless `fp32_ladder` is off), and the configuration a GGUF's metadata is
    /// checked against.
    pub src: Option<&'a Path>,
    /// Run the fp32 ladder on `src`. Off when the traces were written by the fp32
    /// reference on `src` itself (`--prompt`): it would compare the reference with itself.
    pub fp32_ladder: bool,
    /// A conversion output folder (language + vision bundles): the quantized ladder
    /// and the engine ≡ reference gate (`--bundle`).
    pub bundle: Option<&'a Path>,
    /// A GGUF text model and projector: the quantized ladder on their weights, with
    /// their metadata checked against `src`'s configuration when given (`--gguf`).
    pub gguf: Option<GgufInput<'a>>,
    /// The oracle traces (`--trace`).
    pub traces: &'a [PathBuf],
    /// The thresholds.
    pub gates: &'a Gates,
    /// The engine ≡ reference gate (bundle only).
    pub engine: EngineGate<'a>,
    /// Take the bundles' digests before the gates run, so [`Verified::stamp`] can
    /// stamp them (`--stamp`).
    pub stamp: bool,
    /// The verifier's name and version, recorded in the report and the stamps.
    pub tool: String,
}

/// A GGUF pair to verify (`--gguf`, `--mmproj`).
#[derive(Clone, Copy)]
pub struct GgufInput<'a> {
    /// The text model.
    pub text: &'a Path,
    /// Its projector (needed for image traces).
    pub mmproj: Option<&'a Path>,
}

/// A finished run: its report, and what stamping the bundles needs.
pub struct Verified {
    /// Every trace's results, the fp32 run of a trace beside its bundle run. Private:
    /// [`Verified::stamp`] decides from it, so it is read, never changed, from outside.
    report: Report,
    /// The engine ≡ reference gate ran an engine not opened from the bundles.
    other_engine: bool,
    /// The verified bundles, still claimed, with their digests (bundle runs).
    bundles: Option<Checked>,
    /// Each trace's file name and sha256, in the order given.
    traces: Vec<(String, String)>,
}

/// Bundles held for stamping: no conversion replaces them while their gates run and
/// they are stamped.
struct Checked {
    _claim: ReadClaim,
    bundles: Bundles,
    /// Taken before the gates (empty unless the request asked to stamp).
    digests: Option<Digests>,
}

/// Runs every ladder `request` asks for on every trace.
pub fn verify(request: &Request<'_>, progress: &mut dyn Progress) -> Result<Verified> {
    let traces: Vec<OracleTrace> = request
        .traces
        .iter()
        .map(|p| OracleTrace::open(p))
        .collect::<Result<_>>()?;
    let mut reports = Vec::new();
    let mut subject = Vec::new();
    let mut not_run = Vec::new();
    match (request.src, request.fp32_ladder) {
        (Some(src), true) => {
            reports.extend(fp32_ladder(src, &traces, request.gates, progress)?);
            subject.push(src.display().to_string());
        }
        (Some(_), false) => not_run.push(NotRun {
            gate: "fp32.ladder".into(),
            why: "the oracle is q3vl's fp32 reference on --src itself (--prompt)".into(),
        }),
        (None, _) => {}
    }
    let bundles = match request.bundle {
        Some(out) => {
            let (r, checked) = bundle_ladder(out, request, &traces, progress)?;
            reports.extend(r);
            subject.push(out.display().to_string());
            Some(checked)
        }
        None => None,
    };
    if let (EngineGate::Skip(why), Some(_)) = (&request.engine, request.bundle) {
        not_run.push(NotRun {
            gate: ENGINE_GATE.into(),
            why: why.clone(),
        });
    }
    if let Some(g) = request.gguf {
        let (r, skipped) = gguf_ladder(g, request, &traces, progress)?;
        reports.extend(r);
        not_run.extend(skipped);
        subject.push(g.text.display().to_string());
    }
    // Side by side: each trace's fp32 run next to its bundle or GGUF run (stable: in
    // the order they ran).
    reports.sort_by(|x, y| x.trace.cmp(&y.trace));
    let report = Report {
        format: "q3vl-verify-report/1",
        tool: request.tool.clone(),
        subject: subject.join(" + "),
        gates: request.gates.clone(),
        traces: reports,
        not_run,
    };
    let traces = traces.iter().map(name_and_sha).collect();
    Ok(Verified {
        report,
        other_engine: matches!(request.engine, EngineGate::Other(_)),
        bundles,
        traces,
    })
}

impl Verified {
    /// The run's report.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Stamps both bundles when every gate passed and their bytes are still the ones
    /// checked before the gates; otherwise removes any old stamp. Needs a bundle run
    /// whose request asked to stamp, with the engine ≡ reference gate run on the
    /// bundles' own engine ([`EngineGate::Bundles`]).
    pub fn stamp(&self) -> Result<Stamping> {
        let unstampable = |why: &str| VerifyError::Unstampable { why: why.into() };
        let b = self
            .bundles
            .as_ref()
            .ok_or_else(|| unstampable("no bundle was verified"))?;
        let digests = b
            .digests
            .as_ref()
            .ok_or_else(|| unstampable("the run did not ask to stamp before its gates"))?;
        if !self.report.not_run.is_empty() {
            return Err(unstampable("a gate did not run"));
        }
        if self.other_engine {
            return Err(unstampable(
                "the engine gate ran an engine not opened from these bundles",
            ));
        }
        stamping::stamp(&b.bundles, digests, &self.report, &self.traces)
    }
}

/// Writes `report.json` and `report.html` into `dir` (created when missing) and, given
/// `junit`, the JUnit XML there.
pub fn write_reports(report: &Report, dir: &Path, junit: Option<&Path>) -> Result<()> {
    let arg = |arg, path: &Path, e: std::io::Error| VerifyError::Arg {
        arg,
        path: path.to_path_buf(),
        source: e.into(),
    };
    std::fs::create_dir_all(dir).map_err(|e| arg("--report", dir, e))?;
    for (name, text) in [
        ("report.json", report.to_json()),
        ("report.html", report.to_html()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| VerifyError::Io { path, source })?;
    }
    if let Some(j) = junit {
        std::fs::write(j, report.to_junit()).map_err(|e| arg("--junit", j, e))?;
    }
    Ok(())
}

/// A trace's file name and sha256, as a stamp records it.
fn name_and_sha(t: &OracleTrace) -> (String, String) {
    let name = t
        .path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    (name, t.sha256.clone())
}

/// The fp32 ladder on the checkpoint in `src`.
fn fp32_ladder(
    src: &Path,
    traces: &[OracleTrace],
    gates: &Gates,
    progress: &mut dyn Progress,
) -> Result<Vec<TraceReport>> {
    let cfg = Qwen3VlConfig::from_dir(src)?;
    let ck = Checkpoint::open(src)?;
    ck.check(&q3vl_model::layout::checkpoint_tensors(&cfg))?;
    let pipes = Pipelines::load(&cfg, src, src)?;
    let model = Model {
        cfg: &cfg,
        src: &ck,
        engine: None,
        mode: None,
        vision_mode: None,
        rounding: None,
    };
    let run = Ladder {
        what: "fp32 ladder",
        profile: Profile::Fp32,
        gates,
    };
    run.traces(&model, &pipes, traces, progress)
}

/// The quantized ladder on the bundles in `out` (claimed and checked first), with the
/// engine ≡ reference gate unless the request skips it.
fn bundle_ladder(
    out: &Path,
    request: &Request<'_>,
    traces: &[OracleTrace],
    progress: &mut dyn Progress,
) -> Result<(Vec<TraceReport>, Checked)> {
    let arg = |e: Box<dyn std::error::Error + Send + Sync>| VerifyError::Arg {
        arg: "--bundle",
        path: out.to_path_buf(),
        source: e,
    };
    // Held to the end: the engine opens the very pair `Bundles::open` found.
    let claim = ReadClaim::for_bundles(out).map_err(|e| arg(e.into()))?;
    let b = Bundles::open(out).map_err(|e| arg(e.into()))?;
    progress.start("checking the bundles' checksums");
    let digests = stamping::check(&b, request.stamp)?;
    progress.end();
    let cfg = b.language.config().clone();
    let src = BundleSource::new(&b);
    let pipes = Pipelines::load(&cfg, &b.language.dir().join("tokenizer"), b.vision.dir())?;
    let engine = match &request.engine {
        EngineGate::Bundles => Some(open_engine(out).map_err(|e| arg(e.into()))?),
        EngineGate::Other(open) => Some(open(out).map_err(|e| arg(e.into()))?),
        EngineGate::Skip(_) => None,
    };
    let model = Model {
        cfg: &cfg,
        src: &src,
        engine: engine.as_ref(),
        mode: b.language.metadata().mode.map(|m| m.as_str()),
        vision_mode: None,
        rounding: Some(&src),
    };
    let run = Ladder {
        what: "quantized ladder",
        profile: Profile::Bundle,
        gates: request.gates,
    };
    let reports = run.traces(&model, &pipes, traces, progress)?;
    let checked = Checked {
        _claim: claim,
        bundles: b,
        digests: request.stamp.then_some(digests),
    };
    Ok((reports, checked))
}

/// The quantized ladder on a GGUF pair, its metadata gates first in every trace's list
/// (against `--src`'s configuration; without it they are reported as not run).
fn gguf_ladder(
    g: GgufInput<'_>,
    request: &Request<'_>,
    traces: &[OracleTrace],
    progress: &mut dyn Progress,
) -> Result<(Vec<TraceReport>, Vec<NotRun>)> {
    progress.start("reading the GGUF files");
    let model = open_gguf(g, request.gates);
    progress.end();
    let model = model?;
    if let (None, Some(t)) = (g.mmproj, traces.iter().find(|t| t.has_image())) {
        return Err(t.mismatch(
            "is an image trace: verifying a GGUF on it needs its projector (--mmproj)".into(),
        ));
    }
    let (checks, not_run) = match request.src {
        Some(src) => (crate::gguf_checks::metadata_gates(&model, src)?, vec![]),
        None => (
            vec![],
            vec![NotRun {
                gate: "gguf.metadata".into(),
                why: "no --src: the GGUF's metadata is checked against the checkpoint's config"
                    .into(),
            }],
        ),
    };
    let src = crate::gguf_source::GgufSource::new(&model);
    let pipes = Pipelines {
        prompt: PromptBuilder::from_parts(
            g.text,
            &model.tokenizer_json,
            &model.tokenizer_config,
            &model.cfg,
        )?,
        preprocessor: gguf_preprocessor(&model, request.src)?,
    };
    let m = Model {
        cfg: &model.cfg,
        src: &src,
        engine: None,
        mode: Some(model.mode()),
        vision_mode: model.vision_mode(),
        rounding: Some(&src),
    };
    let run = Ladder {
        what: "GGUF ladder",
        profile: Profile::Gguf,
        gates: request.gates,
    };
    let mut reports = run.traces(&m, &pipes, traces, progress)?;
    for r in &mut reports {
        r.gates.splice(0..0, checks.iter().cloned());
    }
    Ok((reports, not_run))
}

/// Opens a GGUF pair to verify, its types checked to have thresholds in `gates` (so a
/// file no gate can judge is refused before any work, naming the file and the type).
pub fn open_gguf(g: GgufInput<'_>, gates: &Gates) -> Result<q3vl_gguf::GgufModel> {
    let model = q3vl_gguf::GgufModel::open(g.text, g.mmproj)?;
    let files = [
        (g.text, Some(model.mode())),
        (g.mmproj.unwrap_or(g.text), model.vision_mode()),
    ];
    for (file, ty) in files {
        if let Some(ty) = ty.filter(|t| !gates.bundle.modes.contains_key(*t)) {
            return Err(VerifyError::Arg {
                arg: "--gguf",
                path: file.to_path_buf(),
                source: format!(
                    "its weights are {ty}, a type with no thresholds under bundle.modes in the gates file (add them with --gates)"
                )
                .into(),
            });
        }
    }
    Ok(model)
}

/// The image preprocessing of a GGUF pair: the projector's, with the pixel limits of
/// `--src` when given (a GGUF does not carry HF's `min_pixels`/`max_pixels`).
fn gguf_preprocessor(
    model: &q3vl_gguf::GgufModel,
    src: Option<&Path>,
) -> Result<PreprocessorConfig> {
    let mut pre = model.preprocessor.clone();
    if let Some(src) = src {
        let hf = PreprocessorConfig::from_dir(src)?;
        (pre.min_pixels, pre.max_pixels) = (hf.min_pixels, hf.max_pixels);
    }
    Ok(pre)
}

/// Small models keep decoder layers resident; large ones stream them layer by layer.
fn keep_weights(cfg: &Qwen3VlConfig) -> bool {
    let f32_bytes: usize = q3vl_model::layout::checkpoint_tensors(cfg)
        .iter()
        .map(|t| t.shape.iter().product::<usize>() * 4)
        .sum();
    f32_bytes < (4usize << 30)
}

/// The prompt and image pipelines of a checkpoint or bundle, for rebuilding the
/// trace's inputs.
struct Pipelines {
    prompt: PromptBuilder,
    preprocessor: PreprocessorConfig,
}

impl Pipelines {
    fn load(cfg: &Qwen3VlConfig, tokenizer_dir: &Path, preproc_dir: &Path) -> Result<Self> {
        Ok(Pipelines {
            prompt: PromptBuilder::from_dir(tokenizer_dir, cfg)?,
            preprocessor: PreprocessorConfig::from_dir(preproc_dir)?,
        })
    }
}

/// What one ladder runs on: the model and, for a bundle, its engine, mode and rounding.
struct Model<'a> {
    cfg: &'a Qwen3VlConfig,
    src: &'a dyn WeightSource,
    engine: Option<&'a Engine>,
    mode: Option<&'a str>,
    vision_mode: Option<&'a str>,
    rounding: Option<&'a dyn RoundingVariance>,
}

/// One ladder: its name on the spinner, its profile, its thresholds.
struct Ladder<'a> {
    what: &'a str,
    profile: Profile,
    gates: &'a Gates,
}

impl Ladder<'_> {
    /// Runs the ladder on every trace.
    fn traces(
        &self,
        m: &Model<'_>,
        pipes: &Pipelines,
        traces: &[OracleTrace],
        progress: &mut dyn Progress,
    ) -> Result<Vec<TraceReport>> {
        let subject = Subject {
            cfg: m.cfg,
            src: m.src,
            prompt: &pipes.prompt,
            preprocessor: &pipes.preprocessor,
            keep_weights: keep_weights(m.cfg),
            engine: m.engine,
            mode: m.mode,
            vision_mode: m.vision_mode,
            rounding: m.rounding,
        };
        traces
            .iter()
            .map(|t| {
                progress.start(&format!("{} on {}", self.what, t.path.display()));
                let r = verify_trace(&subject, t, self.gates, self.profile);
                progress.end();
                r
            })
            .collect()
    }
}
