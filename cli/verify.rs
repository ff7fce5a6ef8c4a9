//! `q3vl verify`: the fp32 ladder (`--src`) and/or the quantized gates (`--bundle`)
//! against oracle traces; terminal table, report.json, report.html, JUnit, stamp.

use crate::{common, Outcome};
use anyhow::{Context, Result};
use clap::Args;
use q3vl_bundle::stamp::{
    bundle_files, compare, hash_bundle, remove_stamp, write_stamp, StampedFile, STAMP_FORMAT,
};
use q3vl_bundle::{Bundles, ReadClaim, Stamp};
use q3vl_engine::{Engine, EngineOptions};
use q3vl_model::prompt::PromptBuilder;
use q3vl_model::{Checkpoint, PreprocessorConfig, Qwen3VlConfig, WeightSource};
use q3vl_verify::noise::RoundingVariance;
use q3vl_verify::{
    verify_trace, BundleSource, Gates, NotRun, OracleTrace, Profile, Report, Subject, TraceReport,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Arguments of `q3vl verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// A Hugging Face checkpoint folder: run the fp32 ladder on its original weights
    /// (with --bundle too, both ladders run and are plotted side by side).
    #[arg(long, required_unless_present = "bundle")]
    src: Option<PathBuf>,
    /// A conversion output folder (language + vision bundles): run the quantized gates
    /// and the engine ≡ reference gate (the engine's greedy decode on each trace's
    /// inputs against the reference's on the same bundle).
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// An oracle trace (`qwen3vl-oracle-trace/2`, or /1); repeat for several.
    #[arg(long, required = true)]
    trace: Vec<PathBuf>,
    /// Where to write report.json and report.html.
    #[arg(long, default_value = "verify-report")]
    report: PathBuf,
    /// A gates file overriding the built-in thresholds.
    #[arg(long)]
    gates: Option<PathBuf>,
    /// Write JUnit XML (one test case per gate) to this file.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// With --bundle: write verification.json into each bundle when every gate passed.
    #[arg(long, requires = "bundle")]
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
    rounding: Option<&'a dyn RoundingVariance>,
}

fn ladder(
    what: &str,
    m: Model<'_>,
    pipes: &Pipelines,
    traces: &[OracleTrace],
    gates: &Gates,
    profile: Profile,
) -> Result<Vec<TraceReport>> {
    let subject = Subject {
        cfg: m.cfg,
        src: m.src,
        prompt: &pipes.prompt,
        preprocessor: &pipes.preprocessor,
        keep_weights: keep_weights(m.cfg),
        engine: m.engine,
        mode: m.mode,
        rounding: m.rounding,
    };
    traces
        .iter()
        .map(|t| {
            let pb = common::spinner(&format!("{what} on {}", t.path.display()));
            let r = verify_trace(&subject, t, gates, profile);
            pb.finish_and_clear();
            Ok(r?)
        })
        .collect()
}

/// Runs the command.
pub fn run(a: VerifyArgs) -> Result<Outcome> {
    let gates = match &a.gates {
        Some(p) => Gates::from_file(p)?,
        None => Gates::builtin(),
    };
    let traces: Vec<OracleTrace> = a
        .trace
        .iter()
        .map(|p| OracleTrace::open(p))
        .collect::<Result<_, _>>()?;
    let mut reports = Vec::new();
    let mut subject = Vec::new();
    let mut digests = Vec::new();
    if let Some(src) = &a.src {
        let cfg = Qwen3VlConfig::from_dir(src)?;
        let ck = Checkpoint::open(src)?;
        ck.check(&q3vl_model::layout::checkpoint_tensors(&cfg))?;
        let pipes = Pipelines::load(&cfg, src, src)?;
        let model = Model {
            cfg: &cfg,
            src: &ck,
            engine: None,
            mode: None,
            rounding: None,
        };
        reports.extend(ladder(
            "fp32 ladder",
            model,
            &pipes,
            &traces,
            &gates,
            Profile::Fp32,
        )?);
        subject.push(src.display().to_string());
    }
    // Held to the end: no conversion replaces the bundles while their gates run and
    // they are stamped, and the engine opens the very pair `Bundles::open` found.
    let _claim = match &a.bundle {
        Some(out) => Some(
            ReadClaim::for_bundles(out).with_context(|| format!("--bundle {}", out.display()))?,
        ),
        None => None,
    };
    let bundles = match &a.bundle {
        Some(out) => {
            let b = Bundles::open(out).with_context(|| format!("--bundle {}", out.display()))?;
            digests = checked_digests(&b, a.stamp)?;
            let cfg = b.language.config().clone();
            let src = BundleSource::new(&b);
            let tok = b.language.dir().join("tokenizer");
            let pipes = Pipelines::load(&cfg, &tok, b.vision.dir())?;
            // The engine on the same bundles, for the engine ≡ reference gate.
            let engine = if a.no_engine_gate {
                None
            } else {
                let e = Engine::open(out, &EngineOptions::default())
                    .with_context(|| format!("--bundle {}", out.display()))?;
                Some(e)
            };
            let model = Model {
                cfg: &cfg,
                src: &src,
                engine: engine.as_ref(),
                mode: b.language.metadata().mode.map(|m| m.as_str()),
                rounding: Some(&src),
            };
            reports.extend(ladder(
                "quantized ladder",
                model,
                &pipes,
                &traces,
                &gates,
                Profile::Bundle,
            )?);
            subject.push(out.display().to_string());
            Some(b)
        }
        None => None,
    };
    // Side by side: each trace's fp32 run next to its bundle run.
    reports.sort_by(|x, y| x.trace.cmp(&y.trace));
    let report = Report {
        format: "q3vl-verify-report/1",
        tool: format!("q3vl {}", common::VERSION),
        subject: subject.join(" + "),
        gates: gates.clone(),
        traces: reports,
        not_run: if a.no_engine_gate {
            vec![NotRun {
                gate: q3vl_verify::engine_gate::GATE.into(),
                why: "--no-engine-gate".into(),
            }]
        } else {
            vec![]
        },
    };
    write_reports(&a, &report)?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if let (true, Some(b)) = (a.stamp, &bundles) {
        stamp(b, &digests, &report, &gates, &traces)?;
    }
    Ok(if report.passed() {
        Outcome::Success
    } else {
        Outcome::GateFailed
    })
}

fn write_reports(a: &VerifyArgs, report: &Report) -> Result<()> {
    std::fs::create_dir_all(&a.report)
        .with_context(|| format!("--report {}", a.report.display()))?;
    for (name, text) in [
        ("report.json", report.to_json()),
        ("report.html", report.to_html()),
    ] {
        let p = a.report.join(name);
        std::fs::write(&p, text).with_context(|| p.display().to_string())?;
    }
    if let Some(j) = &a.junit {
        std::fs::write(j, report.to_junit()).with_context(|| format!("--junit {}", j.display()))?;
    }
    Ok(())
}

/// Checks both bundles against their `metadata.json` checksums before any gate runs:
/// gates on a damaged bundle mean nothing, and it must never be stamped. With
/// `--stamp`, also returns each folder's digests as they were verified, which must
/// still hold when the stamp is written.
fn checked_digests(b: &Bundles, stamp: bool) -> Result<Vec<BTreeMap<String, StampedFile>>> {
    let pb = common::spinner("checking the bundles' checksums");
    let dirs = [&b.language, &b.vision];
    for bundle in dirs {
        bundle.verify_checksums()?;
        only_listed_files(bundle)?;
    }
    let digests = match stamp {
        true => dirs
            .iter()
            .map(|d| hash_bundle(d.dir()))
            .collect::<Result<_, _>>()?,
        false => Vec::new(),
    };
    pb.finish_and_clear();
    Ok(digests)
}

/// A bundle folder holds only `metadata.json` and the files it lists: anything else
/// would be stamped without a checksum or a gate having looked at it.
fn only_listed_files(bundle: &q3vl_bundle::Bundle) -> Result<()> {
    let listed = |f: &String| {
        f == q3vl_bundle::names::METADATA_FILE || bundle.metadata().files.contains_key(f)
    };
    if let Some(extra) = bundle_files(bundle.dir())?.into_iter().find(|f| !listed(f)) {
        anyhow::bail!(
            "{}: {extra} is not listed in its metadata.json (remove it, or convert again)",
            bundle.dir().display()
        );
    }
    Ok(())
}

/// Stamps both bundles when every gate passed and their bytes are still the ones
/// checked before the gates (`digests`); otherwise removes any old stamp.
fn stamp(
    b: &Bundles,
    digests: &[BTreeMap<String, StampedFile>],
    report: &Report,
    gates: &Gates,
    traces: &[OracleTrace],
) -> Result<()> {
    let dirs = [b.language.dir(), b.vision.dir()];
    for (d, before) in dirs.iter().zip(digests) {
        if let Some(why) = compare(d, before)? {
            for d in dirs {
                remove_stamp(d)?;
            }
            anyhow::bail!(
                "{}: {why} (it changed while the gates ran); not stamped",
                d.display()
            );
        }
    }
    if !report.passed() {
        for d in dirs {
            remove_stamp(d)?;
        }
        eprintln!("not stamped: a gate failed");
        return Ok(());
    }
    let results = serde_json::to_value(
        report
            .traces
            .iter()
            .map(|t| (t.trace.display().to_string(), &t.gates))
            .collect::<Vec<_>>(),
    )?;
    for (d, files) in dirs.into_iter().zip(digests) {
        let s = Stamp {
            format: STAMP_FORMAT.into(),
            tool: report.tool.clone(),
            gates: serde_json::to_value(gates)?,
            results: results.clone(),
            traces: traces
                .iter()
                .map(|t| {
                    let name = t
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().to_string())
                        .unwrap_or_default();
                    (name, t.sha256.clone())
                })
                .collect(),
            files: files.clone(),
        };
        write_stamp(d, &s)?;
        eprintln!("stamped {}", d.join(q3vl_bundle::STAMP_FILE).display());
    }
    Ok(())
}
