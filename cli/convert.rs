//! `q3vl convert`: a checkpoint (a local folder, or fetched from the hub) into the
//! language and vision bundles.

use crate::common::WriteArgs;
use crate::Outcome;
use q3vl_bundle::{Mode, Producer};
use q3vl_convert::{convert, Cancel, ConvertOptions};
use std::path::PathBuf;

/// Arguments of `q3vl convert`.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The source checkpoint folder (Hugging Face layout).
    #[arg(long, required_unless_present = "hf_id", conflicts_with = "hf_id")]
    pub src: Option<PathBuf>,
    /// Fetch the source from the hub first (see `q3vl fetch`).
    #[arg(long)]
    pub hf_id: Option<String>,
    /// The hub revision to pin (with --hf-id).
    #[arg(long, requires = "hf_id")]
    pub revision: Option<String>,
    /// The hub cache folder (with --hf-id).
    #[arg(long, requires = "hf_id")]
    pub cache_dir: Option<PathBuf>,
    /// The output folder; `<short>_decode_<mode>/` and `<short>_vision/` are created in
    /// it. It is locked while the conversion runs: a second one into it fails at once.
    #[arg(long)]
    pub out: PathBuf,
    /// int8hu (int8 body and head), int8lin (int8 body, f16 head) or fp16.
    #[arg(long, default_value = "int8hu", value_parser = ["int8hu", "int8lin", "fp16"])]
    pub mode: String,
    /// Replace existing q3vl bundles of the same names (never a folder q3vl did not
    /// write). Not needed to repair a pair an interrupted conversion left incomplete.
    #[arg(long)]
    pub force: bool,
    /// Keep int8 tensors whose in-features are not a multiple of 32 as f16 (recorded in the metadata).
    #[arg(long)]
    pub fallback_f16: bool,
    /// Print a JSON summary (paths, sizes, tensor classes, seconds, peak memory).
    #[arg(long)]
    pub json: bool,
    /// Worker threads and shard size.
    #[command(flatten)]
    pub write: WriteArgs,
}

/// The producer record every bundle carries.
pub fn producer() -> Producer {
    Producer {
        name: "q3vl".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        commit: env!("Q3VL_GIT_COMMIT").into(),
    }
}

/// A cancel flag set by the first Ctrl-C, SIGTERM or SIGHUP (ctrlc's `termination`
/// feature), so each one unwinds the run and removes its staging folder; a second
/// signal exits at once (the next run into that folder removes what is left). A
/// termination signal the process started with ignored (`nohup` ignores SIGHUP) stays
/// ignored.
pub fn ctrl_c() -> Cancel {
    let ignored = ignored_signals();
    let cancel = Cancel::new();
    let c = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if c.is_cancelled() {
            std::process::exit(130);
        }
        c.cancel();
    });
    // ctrlc installs its handler whatever the disposition was: put SIG_IGN back.
    for sig in ignored {
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    cancel
}

/// SIGHUP and SIGTERM, those of them this process started with ignored.
fn ignored_signals() -> Vec<libc::c_int> {
    [libc::SIGHUP, libc::SIGTERM]
        .into_iter()
        .filter(|&sig| {
            // SAFETY: a zeroed sigaction is a valid value to be overwritten, and a null
            // new action makes sigaction only read the current one.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
            rc == 0 && old.sa_sigaction == libc::SIG_IGN
        })
        .collect()
}

/// Runs `q3vl convert`.
pub fn run(a: ConvertArgs) -> anyhow::Result<Outcome> {
    let mode = Mode::parse(&a.mode).expect("clap checked the mode");
    let mut known = std::collections::BTreeMap::new();
    let (src, hf_id, revision) = match (&a.src, &a.hf_id) {
        (Some(src), _) => (src.clone(), None, None),
        (None, Some(id)) => {
            let o = crate::fetch::options(id, a.revision.clone(), a.cache_dir.clone());
            let f = q3vl_convert::fetch::fetch(&o)?;
            // LFS files were just checked against the hub's sha256: no second pass.
            for (name, file) in &f.files {
                if let Some(sha256) = &file.sha256 {
                    let entry = q3vl_bundle::FileEntry {
                        sha256: sha256.to_lowercase(),
                        size: file.size,
                    };
                    known.insert(name.clone(), entry);
                }
            }
            (f.snapshot, Some(id.clone()), Some(f.commit))
        }
        (None, None) => anyhow::bail!("--src or --hf-id is required"),
    };
    let cancel = ctrl_c();
    let mut o = ConvertOptions::new(src, &a.out);
    o.mode = mode;
    o.force = a.force;
    o.fallback_f16 = a.fallback_f16;
    o.hf_id = hf_id;
    o.revision = revision;
    o.producer = producer();
    o.threads = a.write.threads;
    o.known_hashes = known;
    o.shard = a.write.shard();
    let progress = q3vl_convert::progress::terminal();
    let s = convert(&o, progress.as_ref(), &cancel)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("{}", s.language.path.display());
        println!("{}", s.vision.path.display());
        if !s.fallbacks.is_empty() {
            eprintln!(
                "note: {} tensor(s) kept f16 (--fallback-f16); see metadata.json",
                s.fallbacks.len()
            );
        }
        let under: u64 = s.f16_underflow.values().sum();
        if under > 0 {
            eprintln!(
                "note: {under} nonzero value(s) in {} tensor(s) became subnormal or zero in f16; see metadata.json",
                s.f16_underflow.len()
            );
        }
        let zero: u64 = s.scale_underflow.values().sum();
        if zero > 0 {
            eprintln!("note: {zero} int8 block(s) got a zero scale; see metadata.json");
        }
    }
    Ok(Outcome::Success)
}
