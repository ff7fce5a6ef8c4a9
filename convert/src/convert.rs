//! The streaming converter: one pass over the source checkpoint that writes the
//! language and vision bundles, tensor by tensor, with bounded memory.
//!
//! Order of work: open and check the whole source (config, every file, every tensor's
//! presence, shape and dtype, in-features of int8 tensors) and the output folder
//! before writing anything; then stream each bundle's tensors into its staging folder
//! in file order while a second thread hashes the source files; then write the small
//! files and `metadata.json`, and rename both bundles into place. Any error, or Ctrl-C,
//! removes the staging folders.

use crate::cancel::Cancel;
use crate::error::{ConvertError, Result};
use crate::memory::peak_rss_bytes;
use crate::plan::{plan, OutTensor, Part, Plan};
use crate::progress::Progress;
use crate::source::{hash_files, SourceCheckpoint};
use crate::stream::stream_tensor;
use crate::tokenizer_files::tokenizer_files;
use crate::vision_meta::preprocessing;
use q3vl_bundle::names::{language_dir, short_name, vision_dir, CONFIG_FILE, PREPROCESSOR_FILE};
use q3vl_bundle::{
    BundleWriter, FileEntry, Kind, Metadata, Mode, Producer, ShardPolicy, Source, StagedBundle,
    TensorMeta, TensorPlan, WeightsWriter,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to convert, where to, and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The source checkpoint folder (HF layout).
    pub src: PathBuf,
    /// The output folder; the two bundles are created inside it.
    pub out: PathBuf,
    /// The conversion mode.
    pub mode: Mode,
    /// Replace existing bundles.
    pub force: bool,
    /// Keep int8 tensors whose in-features are not a multiple of 32 as f16 instead of failing.
    pub fallback_f16: bool,
    /// The hub repo the source came from (names the bundles and goes into the metadata).
    pub hf_id: Option<String>,
    /// The source's commit sha, when known.
    pub revision: Option<String>,
    /// Who is converting (the CLI passes its version and git commit).
    pub producer: Producer,
    /// Weight file sharding.
    pub shard: ShardPolicy,
    /// Worker threads (all cores when `None`).
    pub threads: Option<usize>,
    /// Digests of source files already verified (by `fetch`, against the hub's LFS
    /// sha256), by file name: these are not hashed again.
    pub known_hashes: BTreeMap<String, FileEntry>,
}

impl ConvertOptions {
    /// Options with the defaults: mode `int8hu`, no force, no fallback, 4 GiB shards.
    pub fn new(src: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        ConvertOptions {
            src: src.into(),
            out: out.into(),
            mode: Mode::Int8hu,
            force: false,
            fallback_f16: false,
            hf_id: None,
            revision: None,
            producer: Producer::default(),
            shard: ShardPolicy::default(),
            threads: None,
            known_hashes: BTreeMap::new(),
        }
    }
}

/// One bundle in the summary.
#[derive(Debug, Clone, Serialize)]
pub struct BundleReport {
    /// Its folder.
    pub path: PathBuf,
    /// Total bytes of its files (metadata included).
    pub bytes: u64,
    /// Number of files (metadata included).
    pub files: usize,
    /// Logical tensors.
    pub tensors: usize,
    /// True when an identical vision bundle was already there and was kept as is.
    pub kept_existing: bool,
}

/// Per tensor class in the summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClassReport {
    /// Tensors of the class.
    pub count: usize,
    /// How many are stored with each scheme.
    pub schemes: BTreeMap<String, usize>,
    /// Stored bytes (scales included).
    pub bytes: u64,
}

/// The source in the summary.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    /// Its folder.
    pub path: PathBuf,
    /// The hub repo, if any.
    pub hf_id: Option<String>,
    /// The commit, if known.
    pub revision: Option<String>,
    /// Bytes of the files read.
    pub bytes: u64,
}

/// What a conversion did (`q3vl convert --json`).
#[derive(Debug, Clone, Serialize)]
pub struct ConvertSummary {
    /// The mode.
    pub mode: Mode,
    /// The source.
    pub source: SourceReport,
    /// The language bundle.
    pub language: BundleReport,
    /// The vision bundle.
    pub vision: BundleReport,
    /// Tensor counts and bytes per class.
    pub tensor_classes: BTreeMap<String, ClassReport>,
    /// Tensors kept f16 instead of int8, with the reason.
    pub fallbacks: BTreeMap<String, String>,
    /// Per tensor, nonzero values that became subnormal or zero in f16.
    pub f16_underflow: BTreeMap<String, u64>,
    /// Per tensor, blocks whose scale flushed to zero.
    pub scale_underflow: BTreeMap<String, u64>,
    /// Wall time.
    pub seconds: f64,
    /// Peak resident set of the process (VmHWM).
    pub peak_rss_bytes: Option<u64>,
}

/// Converts `opts.src` into the two bundles in `opts.out`.
pub fn convert(
    opts: &ConvertOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<ConvertSummary> {
    match opts.threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| ConvertError::input("--threads", e.to_string()))?
            .install(|| run(opts, progress, cancel)),
        None => run(opts, progress, cancel),
    }
}

/// A bundle whose weights and files are written, waiting for its metadata.
struct Written {
    writer: BundleWriter,
    metadata: Metadata,
}

fn run(opts: &ConvertOptions, progress: &dyn Progress, cancel: &Cancel) -> Result<ConvertSummary> {
    let t0 = Instant::now();
    let src_dir = std::path::absolute(&opts.src).map_err(|e| ConvertError::io(&opts.src, e))?;
    let folder = src_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "source".into());
    let src = SourceCheckpoint::open(&src_dir)?;
    let plan = plan(&src.config, opts.mode, opts.fallback_f16, src.has_head())?;
    let short = short_name(opts.hf_id.as_deref().unwrap_or(&folder));
    let lang_name = language_dir(&short, opts.mode.as_str());
    let vis_name = vision_dir(&short);

    // Everything that can be checked is checked before the first byte is written.
    if !opts.force {
        BundleWriter::ensure_absent(&opts.out, &lang_name)?;
        check_existing_vision(&opts.out.join(&vis_name), &src)?;
    }
    let pre = preprocessing(&src.dir, &src.config)?;
    let tok = tokenizer_files(&src.dir)?;
    let pre_path = src.dir.join(PREPROCESSOR_FILE);
    let pre_bytes = if pre_path.is_file() {
        Some(std::fs::read(&pre_path).map_err(|e| ConvertError::io(&pre_path, e))?)
    } else {
        None
    };
    let source_bytes: u64 = src.sizes()?.values().sum();

    let failed = Cancel::new();
    let stop = || cancel.is_cancelled() || failed.is_cancelled();
    let (written, hashes) = std::thread::scope(|scope| {
        let hasher = std::thread::Builder::new()
            .name("q3vl-hash-source".into())
            .spawn_scoped(scope, || {
                let todo: Vec<String> = src
                    .files
                    .iter()
                    .filter(|f| !opts.known_hashes.contains_key(*f))
                    .cloned()
                    .collect();
                let mut all = hash_files(&src.dir, &todo, &stop)?;
                for f in &src.files {
                    if let Some(e) = opts.known_hashes.get(f) {
                        all.insert(f.clone(), e.clone());
                    }
                }
                Ok(all)
            })
            .map_err(|e| ConvertError::io(&src.dir, e))?;
        let total: u64 = plan
            .tensors
            .iter()
            .map(|t| {
                src.weights
                    .info(&t.source)
                    .map_or(0, |i| i.range.len() as u64)
            })
            .sum();
        progress.begin("converting", total);
        let result = (|| -> Result<(Written, Written)> {
            let (mut lang, lang_weights) = write_part(
                opts,
                &src,
                &plan,
                Part::Language,
                &lang_name,
                progress,
                cancel,
            )?;
            lang.writer.add_file(CONFIG_FILE, &src.config_bytes)?;
            for (rel, bytes) in &tok {
                lang.writer.add_file(rel, bytes)?;
            }
            lang.metadata.mode = Some(opts.mode);
            lang.metadata.companion = Some(vis_name.clone());
            lang.metadata.head = Some(plan.head.clone());
            if plan.head.tensor == q3vl_model::layout::EMBED {
                // A tied head that is not stored is the f16 embedding table.
                lang.metadata.set_scheme(
                    q3vl_model::layout::TensorClass::Head,
                    q3vl_bundle::Scheme::F16,
                );
            }
            lang.metadata.ignored_source_tensors = plan.ignored.clone();
            let (mut vis, vis_weights) =
                write_part(opts, &src, &plan, Part::Vision, &vis_name, progress, cancel)?;
            vis.writer.add_file(CONFIG_FILE, &src.config_bytes)?;
            if let Some(b) = &pre_bytes {
                vis.writer.add_file(PREPROCESSOR_FILE, b)?;
            }
            vis.metadata.preprocessing = Some(pre.clone());
            // The language files are closed only now, so their final sync overlapped
            // the vision tower's conversion.
            lang.writer.record(lang_weights.finish()?);
            vis.writer.record(vis_weights.finish()?);
            Ok((lang, vis))
        })();
        progress.end();
        if result.is_err() {
            failed.cancel();
        }
        let hashes = hasher.join().unwrap_or(Err(ConvertError::Interrupted));
        let written = result?;
        Ok::<_, ConvertError>((written, hashes?))
    })?;
    cancel.check()?;

    let source = Source {
        hf_id: opts.hf_id.clone(),
        revision: opts.revision.clone(),
        folder,
        files: hashes,
    };
    let (lang, vis) = written;
    let finish = |w: Written| -> Result<StagedBundle> {
        let mut m = w.metadata;
        m.source = source.clone();
        m.producer = opts.producer.clone();
        Ok(w.writer.finish(m)?)
    };
    let lang = finish(lang)?;
    let vis = finish(vis)?;

    // An identical vision bundle (same source, same bytes) is kept: converting another
    // mode into the same folder needs no --force.
    let vis_target = vis.target().to_path_buf();
    let keep_vision = match q3vl_bundle::Metadata::read(&vis_target) {
        Ok(m) => {
            let same = m.files == vis.metadata().files && m.source == vis.metadata().source;
            if !same && !opts.force {
                return Err(q3vl_bundle::BundleError::Exists { path: vis_target }.into());
            }
            same
        }
        Err(_) => false,
    };
    cancel.check()?;
    let lang_report = report(&lang, false);
    let vis_report = report(&vis, keep_vision);
    let lang_path = lang.commit(opts.force)?;
    let vis_path = if keep_vision {
        drop(vis);
        vis_target
    } else {
        vis.commit(opts.force)?
    };

    let mut classes: BTreeMap<String, ClassReport> = BTreeMap::new();
    for t in &plan.tensors {
        let c = classes.entry(t.class.as_str().into()).or_default();
        c.count += 1;
        *c.schemes.entry(t.scheme.as_str().into()).or_default() += 1;
        c.bytes += t.stored().iter().map(TensorPlan::bytes).sum::<u64>();
    }
    let lang_m = Metadata::read(&lang_path)?;
    let vis_m = Metadata::read(&vis_path)?;
    let merged = |f: fn(&Metadata) -> &BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        f(&lang_m)
            .iter()
            .chain(f(&vis_m))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    Ok(ConvertSummary {
        mode: opts.mode,
        source: SourceReport {
            path: src_dir,
            hf_id: opts.hf_id.clone(),
            revision: opts.revision.clone(),
            bytes: source_bytes,
        },
        language: BundleReport {
            path: lang_path,
            ..lang_report
        },
        vision: BundleReport {
            path: vis_path,
            ..vis_report
        },
        tensor_classes: classes,
        fallbacks: lang_m
            .fallbacks
            .iter()
            .chain(&vis_m.fallbacks)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        f16_underflow: merged(|m| &m.f16_underflow),
        scale_underflow: merged(|m| &m.scale_underflow),
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

fn report(b: &StagedBundle, kept_existing: bool) -> BundleReport {
    let m = b.metadata();
    BundleReport {
        path: b.target().to_path_buf(),
        bytes: m.files.values().map(|f| f.size).sum::<u64>() + m.to_bytes().len() as u64,
        files: m.files.len() + 1,
        tensors: m.tensors.len(),
        kept_existing,
    }
}

/// An existing vision bundle without `--force` is fine only if it was made from the
/// same source files (checked by name and size here, by sha256 at the end).
fn check_existing_vision(dir: &Path, src: &SourceCheckpoint) -> Result<()> {
    if dir.symlink_metadata().is_err() {
        return Ok(());
    }
    let exists = || q3vl_bundle::BundleError::Exists {
        path: dir.to_path_buf(),
    };
    let m = q3vl_bundle::Metadata::read(dir).map_err(|_| exists())?;
    let theirs: BTreeMap<&String, u64> = m.source.files.iter().map(|(k, v)| (k, v.size)).collect();
    let sizes = src.sizes()?;
    let ours: BTreeMap<&String, u64> = sizes.iter().map(|(k, v)| (k, *v)).collect();
    if theirs != ours {
        return Err(exists().into());
    }
    Ok(())
}

/// Streams one bundle's tensors into a fresh staging folder; the caller finishes the
/// returned weights writer.
fn write_part(
    opts: &ConvertOptions,
    src: &SourceCheckpoint,
    plan: &Plan,
    part: Part,
    name: &str,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<(Written, WeightsWriter)> {
    let writer = BundleWriter::create(&opts.out, name)?;
    let tensors: Vec<&OutTensor> = plan.part(part).collect();
    let stored: Vec<TensorPlan> = tensors.iter().flat_map(|t| t.stored()).collect();
    let mut ww = WeightsWriter::create(writer.dir(), &stored, opts.shard, &BTreeMap::new())?;
    let by_name: HashMap<&str, &OutTensor> =
        tensors.iter().map(|t| (t.name.as_str(), *t)).collect();
    let order: Vec<String> = ww.order().into_iter().map(str::to_owned).collect();
    let kind = match part {
        Part::Language => Kind::Language,
        Part::Vision => Kind::Vision,
    };
    let mut metadata = Metadata::new(kind, name);
    let mut first = true;
    for name in &order {
        // `.scales` tensors are written along with their weight.
        let Some(t) = by_name.get(name.as_str()) else {
            continue;
        };
        let stats = stream_tensor(&src.weights, t, &mut ww, cancel, progress)?;
        if std::mem::take(&mut first) {
            test_hold(cancel)?;
        }
        if stats.f16_underflow > 0 {
            metadata
                .f16_underflow
                .insert(t.name.clone(), stats.f16_underflow);
        }
        if stats.scale_underflow > 0 {
            metadata
                .scale_underflow
                .insert(t.name.clone(), stats.scale_underflow);
        }
    }
    for t in &tensors {
        metadata.set_scheme(t.class, opts.mode.scheme(t.class));
        metadata.tensors.insert(
            t.name.clone(),
            TensorMeta {
                class: t.class.as_str().into(),
                scheme: t.scheme,
                source: (t.source != t.name).then(|| t.source.clone()),
            },
        );
        if let Some(why) = &t.fallback {
            metadata.fallbacks.insert(t.name.clone(), why.clone());
        }
    }
    Ok((Written { writer, metadata }, ww))
}

/// Test hook: with `Q3VL_TEST_HOLD_FILE=PATH` in the environment, the converter creates
/// PATH after the first tensor of each bundle and waits while it exists (polling the
/// cancel flag, at most a minute), so the Ctrl-C test can interrupt a conversion
/// mid-way without racing it.
fn test_hold(cancel: &Cancel) -> Result<()> {
    let Some(path) = std::env::var_os("Q3VL_TEST_HOLD_FILE").map(PathBuf::from) else {
        return Ok(());
    };
    std::fs::write(&path, b"held").map_err(|e| ConvertError::io(&path, e))?;
    for _ in 0..6000 {
        cancel.check()?;
        if !path.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}
