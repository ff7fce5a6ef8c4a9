//! The streaming converter: one pass over the source checkpoint that writes the
//! language and vision bundles, tensor by tensor, with bounded memory.
//!
//! Order of work: open and check the whole source (config, every file, every tensor's
//! presence, shape and dtype, in-features of int8 tensors); claim the output folder
//! ([`Staging::begin`]: an exclusive lock on its `.q3vl-lock` held until the end, so
//! no other conversion into it and no `run`, `verify` or `bench` of its bundles
//! overlaps this one, whichever comes second failing at once naming the folder; a
//! staging folder unique to this run; leftovers of killed runs cleaned); check what
//! is already there; then stream
//! each bundle's tensors into the staging folder in file order while a second thread
//! hashes the source files; then write the small files and `metadata.json`, and commit
//! the vision bundle and then the language bundle that binds it (see [`commit_pair`]).
//! Any error, Ctrl-C, SIGTERM or SIGHUP removes the staging folder.

use crate::cancel::Cancel;
use crate::error::{ConvertError, Result};
use crate::plan::{plan, OutTensor, Part, Plan};
use crate::progress::Progress;
use crate::source::{hash_files, SourceCheckpoint};
use crate::stream::stream_tensor;
use crate::tokenizer_files::{check_tokenizer, tokenizer_files};
use crate::vision_meta::preprocessing;
use q3vl_bundle::names::{
    language_dir, short_name, vision_dir, CONFIG_FILE, METADATA_FILE, PREPROCESSOR_FILE,
};
use q3vl_bundle::{
    ensure_replaceable, sha256_file, BundleError, BundleWriter, Bundles, FileEntry, Kind, Metadata,
    Mode, Preprocessing, Producer, ShardPolicy, Source, StagedBundle, Staging, TensorMeta,
    TensorPlan, WeightsWriter,
};
use q3vl_host::peak_rss_bytes;
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

/// The source, opened and checked, and everything read from it before writing.
struct Job {
    src_dir: PathBuf,
    folder: String,
    src: SourceCheckpoint,
    plan: Plan,
    lang_name: String,
    vis_name: String,
    pre: Preprocessing,
    tok: Vec<(String, Vec<u8>)>,
    pre_bytes: Option<Vec<u8>>,
    source_bytes: u64,
}

impl Job {
    /// Opens and checks the whole source: config, every file, every tensor's presence,
    /// shape and dtype, the tokenizer and the preprocessor (nothing is written yet).
    fn open(opts: &ConvertOptions) -> Result<Job> {
        let src_dir = std::path::absolute(&opts.src).map_err(|e| ConvertError::io(&opts.src, e))?;
        let folder = src_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "source".into());
        let src = SourceCheckpoint::open(&src_dir)?;
        let plan = plan(&src.config, opts.mode, opts.fallback_f16, src.has_head())?;
        let short = short_name(opts.hf_id.as_deref().unwrap_or(&folder));
        let pre = preprocessing(&src.dir, &src.config)?;
        let tok = tokenizer_files(&src.dir)?;
        check_tokenizer(&src.dir, &tok, &src.config)?;
        let pre_path = src.dir.join(PREPROCESSOR_FILE);
        let pre_bytes = if pre_path.is_file() {
            Some(
                q3vl_model::input::read_regular(&pre_path)
                    .map_err(|e| ConvertError::io(&pre_path, e))?,
            )
        } else {
            None
        };
        let source_bytes: u64 = src.sizes()?.values().sum();
        Ok(Job {
            lang_name: language_dir(&short, opts.mode.as_str()),
            vis_name: vision_dir(&short),
            src_dir,
            folder,
            src,
            plan,
            pre,
            tok,
            pre_bytes,
            source_bytes,
        })
    }
}

fn run(opts: &ConvertOptions, progress: &dyn Progress, cancel: &Cancel) -> Result<ConvertSummary> {
    let t0 = Instant::now();
    let job = Job::open(opts)?;
    // The output folder stays locked until this function returns: no other run
    // stages, commits or cleans in it meanwhile.
    let staging = Staging::begin(&opts.out)?;
    let vision_replaceable = check_targets(opts, &job, staging.out())?;
    let (lang, vis, hashes) = write_both(opts, &job, &staging, progress, cancel)?;
    cancel.check()?;
    let source = Source {
        hf_id: opts.hf_id.clone(),
        revision: opts.revision.clone(),
        folder: job.folder.clone(),
        files: hashes,
    };
    let pair = commit_pair(opts, vision_replaceable, &source, lang, vis, cancel)?;
    summary(opts, &job, pair, t0)
}

/// Checks the folders already at the two targets, under the lock and before anything
/// is written; returns whether the vision bundle there (if any) may be replaced.
///
/// A folder that is not a q3vl bundle of the right kind is never replaced. An existing
/// language bundle needs `--force`, unless its pair is one no conversion completed (a
/// run killed between its two commits): a plain re-run repairs that. An existing vision
/// bundle may be replaced with `--force`, or when no complete pair uses it; otherwise
/// it must come from the same source (and is kept if identical, see [`commit_pair`]).
fn check_targets(opts: &ConvertOptions, job: &Job, out: &Path) -> Result<bool> {
    let lang = out.join(&job.lang_name);
    if lang.symlink_metadata().is_ok() {
        ensure_replaceable(&lang, Kind::Language)?;
        if !opts.force && complete_pair(&lang) {
            return Err(BundleError::Exists { path: lang }.into());
        }
    }
    let vis = out.join(&job.vis_name);
    if vis.symlink_metadata().is_err() {
        return Ok(true);
    }
    ensure_replaceable(&vis, Kind::Vision)?;
    let replaceable = opts.force || !vision_in_use(out, &job.vis_name)?;
    if !replaceable {
        check_existing_vision(&vis, &job.src)?;
    }
    Ok(replaceable)
}

/// Whether the language bundle in `dir` and its vision bundle are a pair one
/// conversion completed.
fn complete_pair(dir: &Path) -> bool {
    Metadata::read(dir).is_ok_and(|m| is_complete(dir, &m))
}

/// Whether language bundle `m` in `dir` is half of a complete pair: bound to its vision
/// bundle, or a legacy pair. A language bundle written before `companion_sha256`
/// existed cannot prove its pair, so it no longer loads; but when its companion is
/// there and is a q3vl vision bundle, it is a finished conversion, which only `--force`
/// may replace (the user may be about to convert another source over it).
fn is_complete(dir: &Path, m: &Metadata) -> bool {
    if Bundles::companion_of(dir, m).is_ok() {
        return true;
    }
    let legacy_companion = match (&m.companion, &m.companion_sha256) {
        (Some(c), None) => dir.parent().map(|p| p.join(c)),
        _ => None,
    };
    legacy_companion.is_some_and(|v| Metadata::read(&v).is_ok_and(|vm| vm.kind == Kind::Vision))
}

/// Whether a complete pair (see [`is_complete`]) in `out` uses the vision bundle
/// `vis_name`.
fn vision_in_use(out: &Path, vis_name: &str) -> Result<bool> {
    for lang in Bundles::language_bundles(out, None)? {
        let uses = Metadata::read(&lang)
            .is_ok_and(|m| m.companion.as_deref() == Some(vis_name) && is_complete(&lang, &m));
        if uses {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Streams both bundles into `staging` while a second thread hashes the source files;
/// returns the language and vision bundles and the source digests.
fn write_both(
    opts: &ConvertOptions,
    job: &Job,
    staging: &Staging,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<(Written, Written, BTreeMap<String, FileEntry>)> {
    let src = &job.src;
    let failed = Cancel::new();
    let stop = || cancel.is_cancelled() || failed.is_cancelled();
    std::thread::scope(|scope| {
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
        let total: u64 = job
            .plan
            .tensors
            .iter()
            .map(|t| {
                src.weights
                    .info(&t.source)
                    .map_or(0, |i| i.range.len() as u64)
            })
            .sum();
        progress.begin("converting", total);
        let result = write_parts(opts, job, staging, progress, cancel);
        progress.end();
        if result.is_err() {
            failed.cancel();
        }
        let hashes = hasher.join().unwrap_or(Err(ConvertError::Interrupted));
        let (lang, vis) = result?;
        Ok((lang, vis, hashes?))
    })
}

/// Writes the language bundle's weights, then the vision bundle's, and each one's
/// small files.
fn write_parts(
    opts: &ConvertOptions,
    job: &Job,
    staging: &Staging,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<(Written, Written)> {
    let (src, plan) = (&job.src, &job.plan);
    let part = |part| write_part(opts, job, staging, part, progress, cancel);
    let (mut lang, lang_weights) = part(Part::Language)?;
    lang.writer.add_file(CONFIG_FILE, &src.config_bytes)?;
    for (rel, bytes) in &job.tok {
        lang.writer.add_file(rel, bytes)?;
    }
    lang.metadata.mode = Some(opts.mode);
    lang.metadata.companion = Some(job.vis_name.clone());
    lang.metadata.head = Some(plan.head.clone());
    if plan.head.tensor == q3vl_model::layout::EMBED {
        // A tied head that is not stored is the f16 embedding table.
        lang.metadata.set_scheme(
            q3vl_model::layout::TensorClass::Head,
            q3vl_bundle::Scheme::F16,
        );
    }
    lang.metadata.ignored_source_tensors = plan.ignored.clone();
    let (mut vis, vis_weights) = part(Part::Vision)?;
    vis.writer.add_file(CONFIG_FILE, &src.config_bytes)?;
    if let Some(b) = &job.pre_bytes {
        vis.writer.add_file(PREPROCESSOR_FILE, b)?;
    }
    vis.metadata.preprocessing = Some(job.pre.clone());
    // The language files are closed only now, so their final sync overlapped the
    // vision tower's conversion.
    lang.writer.record(lang_weights.finish()?);
    vis.writer.record(vis_weights.finish()?);
    Ok((lang, vis))
}

/// The committed pair.
struct Pair {
    language: BundleReport,
    vision: BundleReport,
}

/// Finishes both bundles and commits them: the vision bundle first, then the language
/// bundle, which binds it by the sha256 of its `metadata.json` (`companion_sha256`).
/// A kill in between leaves a pair that [`Bundles::open`] refuses and a plain re-run
/// repairs, never one that loads; Ctrl-C and SIGTERM are not polled in between.
fn commit_pair(
    opts: &ConvertOptions,
    vision_replaceable: bool,
    source: &Source,
    lang: Written,
    vis: Written,
    cancel: &Cancel,
) -> Result<Pair> {
    let finish = |w: Written, companion_sha256: Option<String>| -> Result<StagedBundle> {
        let mut m = w.metadata;
        m.source = source.clone();
        m.producer = opts.producer.clone();
        m.companion_sha256 = companion_sha256;
        Ok(w.writer.finish(m)?)
    };
    let vis = finish(vis, None)?;
    // An identical vision bundle (same source, same bytes) is kept: converting another
    // mode into the same folder needs no --force.
    let vis_target = vis.target().to_path_buf();
    let existing = vis_target.symlink_metadata().is_ok();
    let keep = Metadata::read(&vis_target)
        .is_ok_and(|m| m.files == vis.metadata().files && m.source == vis.metadata().source);
    if existing && !keep && !vision_replaceable {
        return Err(BundleError::Exists { path: vis_target }.into());
    }
    let vis_digest = if keep {
        sha256_file(&vis_target.join(METADATA_FILE))?.sha256
    } else {
        vis.metadata_sha256().to_string()
    };
    let lang = finish(lang, Some(vis_digest))?;
    cancel.check()?;
    let (lang_report, vis_report) = (report(&lang, false), report(&vis, keep));
    let vis_path = if keep {
        drop(vis);
        vis_target
    } else {
        vis.commit(true)?
    };
    let lang_path = lang.commit(true)?;
    Ok(Pair {
        language: BundleReport {
            path: lang_path,
            ..lang_report
        },
        vision: BundleReport {
            path: vis_path,
            ..vis_report
        },
    })
}

/// The summary of a committed conversion.
fn summary(opts: &ConvertOptions, job: &Job, pair: Pair, t0: Instant) -> Result<ConvertSummary> {
    let mut classes: BTreeMap<String, ClassReport> = BTreeMap::new();
    for t in &job.plan.tensors {
        let c = classes.entry(t.class.as_str().into()).or_default();
        c.count += 1;
        *c.schemes.entry(t.scheme.as_str().into()).or_default() += 1;
        c.bytes += t.stored().iter().map(TensorPlan::bytes).sum::<u64>();
    }
    let lang_m = Metadata::read(&pair.language.path)?;
    let vis_m = Metadata::read(&pair.vision.path)?;
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
            path: job.src_dir.clone(),
            hf_id: opts.hf_id.clone(),
            revision: opts.revision.clone(),
            bytes: job.source_bytes,
        },
        language: pair.language,
        vision: pair.vision,
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

/// An existing vision bundle that a complete pair uses, without `--force`, is fine
/// only if it was made from the same source files (checked by name and size here, by
/// sha256 at the end).
fn check_existing_vision(dir: &Path, src: &SourceCheckpoint) -> Result<()> {
    let exists = || BundleError::Exists {
        path: dir.to_path_buf(),
    };
    let m = Metadata::read(dir).map_err(|_| exists())?;
    let theirs: BTreeMap<&String, u64> = m.source.files.iter().map(|(k, v)| (k, v.size)).collect();
    let sizes = src.sizes()?;
    let ours: BTreeMap<&String, u64> = sizes.iter().map(|(k, v)| (k, *v)).collect();
    if theirs != ours {
        return Err(exists().into());
    }
    Ok(())
}

/// Streams one bundle's tensors into its folder in the staging folder; the caller
/// finishes the returned weights writer.
fn write_part(
    opts: &ConvertOptions,
    job: &Job,
    staging: &Staging,
    part: Part,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<(Written, WeightsWriter)> {
    let (src, plan) = (&job.src, &job.plan);
    let name = match part {
        Part::Language => &job.lang_name,
        Part::Vision => &job.vis_name,
    };
    let writer = BundleWriter::create_in(staging, name)?;
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
/// PATH after the first tensor of each bundle (`synth`: before its weights) and waits
/// while it exists (polling the cancel flag, at most a minute), so the signal and lock
/// tests can interrupt or overlap a run mid-way without racing it. Debug builds only
/// (the tests'): a release build, the one `make build` ships, has no hook.
#[cfg(debug_assertions)]
pub(crate) fn test_hold(cancel: &Cancel) -> Result<()> {
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

/// Release builds: no hook (the variable is never read).
#[cfg(not(debug_assertions))]
pub(crate) fn test_hold(_cancel: &Cancel) -> Result<()> {
    Ok(())
}
