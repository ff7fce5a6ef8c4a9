//! `q3vl inspect`: a bundle's metadata, tensor table and checksum status.

use crate::Outcome;
use q3vl_bundle::{Bundle, FileCheck, Kind, Metadata, StampStatus, StoredTensor, STAMP_FILE};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Arguments of `q3vl inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// The bundle folder.
    pub bundle_dir: PathBuf,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Skip the sha256 check of every file and the stamp's check of every byte (sizes
    /// are still checked).
    #[arg(long)]
    pub no_checksums: bool,
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < U.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", U[u])
    }
}

/// The bundle's stamp checked against every byte, and for a language bundle its
/// companion vision bundle's too (a stamp vouches for the pair); `None` when
/// `--no-checksums` asked for speed.
fn stamp_status(b: &Bundle, no_checksums: bool) -> Option<StampStatus> {
    if no_checksums {
        return None;
    }
    let here = b.dir();
    Some(match &b.metadata().companion {
        Some(c) if b.kind() == Kind::Language => {
            let vision = here.parent().unwrap_or(Path::new(".")).join(c);
            q3vl_engine::pair_status(here, &vision)
        }
        _ => q3vl_bundle::check_stamp(here),
    })
}

/// Runs `q3vl inspect`.
pub fn run(a: InspectArgs) -> anyhow::Result<Outcome> {
    let b = Bundle::open(&a.bundle_dir)?;
    let found = Found::gather(&b, a.no_checksums)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&found.json(&b))?);
    } else {
        print_header(&b);
        found.print(b.metadata());
    }
    if let Some(c) = found.bad().next() {
        let why = c.problem().unwrap_or_default();
        anyhow::bail!("{}: {why}", b.dir().join(&c.file).display());
    }
    Ok(Outcome::Success)
}

/// What inspecting a bundle found: its tensors, its files' checks and its stamp.
struct Found {
    tensors: Vec<StoredTensor>,
    /// Every file's check; `None` under `--no-checksums`.
    checks: Option<Vec<FileCheck>>,
    /// The stamp checked; `None` under `--no-checksums`.
    stamp: Option<StampStatus>,
    /// The stamp's line, checked or not.
    stamp_text: String,
}

impl Found {
    fn gather(b: &Bundle, no_checksums: bool) -> anyhow::Result<Found> {
        let tensors = b.stored_tensors()?;
        let checks = (!no_checksums).then(|| b.check_files());
        let stamp = stamp_status(b, no_checksums);
        let stamp_text = match &stamp {
            Some(s) => s.to_string(),
            None if b.dir().join(STAMP_FILE).exists() => {
                "stamped (not checked: --no-checksums)".to_string()
            }
            None => StampStatus::Missing.to_string(),
        };
        Ok(Found {
            tensors,
            checks,
            stamp,
            stamp_text,
        })
    }

    /// The files that failed their check.
    fn bad(&self) -> impl Iterator<Item = &FileCheck> {
        self.checks.iter().flatten().filter(|c| !c.ok())
    }

    /// The `--json` document.
    fn json(&self, b: &Bundle) -> serde_json::Value {
        let checks = self.checks.as_ref();
        json!({
            "path": b.dir(),
            "metadata": b.metadata(),
            "tensors": self.tensors.iter().map(|r| json!({
                "name": r.name, "dtype": r.dtype.to_string(), "shape": r.shape,
                "bytes": r.bytes, "scheme": r.listing.to_string(), "class": r.class,
            })).collect::<Vec<_>>(),
            "checksums": checks.map(|cs| cs.iter().map(|c| json!({
                "file": c.file, "ok": c.ok(), "expected": c.expected,
                "found": c.found, "error": c.error,
            })).collect::<Vec<_>>()),
            "checksums_ok": checks.map(|_| self.bad().next().is_none()),
            "stamp": self.stamp_text,
            "stamp_valid": self.stamp.as_ref().map(|s| *s == StampStatus::Valid),
        })
    }

    /// The tensor table, the file table and the verdicts, as text.
    fn print(&self, m: &Metadata) {
        println!("\ntensors ({}):", self.tensors.len());
        let w = self.tensors.iter().map(|r| r.name.len()).max().unwrap_or(4);
        for r in &self.tensors {
            println!(
                "  {:w$}  {:4}  {:16}  {:>10}  {}",
                r.name,
                r.dtype.to_string(),
                format!("{:?}", r.shape),
                human(r.bytes as u64),
                r.listing
            );
        }
        println!("\nfiles ({}):", m.files.len());
        for (f, e) in &m.files {
            let status = match self.checks.iter().flatten().find(|c| &c.file == f) {
                None => "size ok",
                Some(c) if c.ok() => "ok",
                Some(_) => "MISMATCH",
            };
            println!(
                "  {status:8}  {f}  {}  sha256 {}",
                human(e.size),
                &e.sha256[..16.min(e.sha256.len())]
            );
        }
        let bad = self.bad().count();
        match &self.checks {
            None => println!("\nchecksums: not checked (--no-checksums)"),
            Some(cs) if bad == 0 => {
                println!("\nchecksums: all {} files match metadata.json", cs.len())
            }
            Some(_) => println!("\nchecksums: {bad} file(s) do not match metadata.json"),
        }
        println!("stamp:     {}", self.stamp_text);
    }
}

/// The text output's first lines: what the bundle is, where it came from, how it is
/// stored and what the conversion noted.
fn print_header(b: &Bundle) {
    let m = b.metadata();
    let kind = format!("{:?}", m.kind).to_lowercase();
    let mode = m.mode.map(|x| format!(", {x}")).unwrap_or_default();
    println!("bundle    {} ({kind}{mode})", m.name);
    println!("path      {}", b.dir().display());
    println!("format    {} v{}", m.format, m.format_version);
    let src = match (&m.source.hf_id, &m.source.revision) {
        (Some(id), Some(r)) => format!("{id} @ {r}"),
        (Some(id), None) => id.clone(),
        _ => m.source.folder.clone(),
    };
    println!("source    {src} ({} files)", m.source.files.len());
    println!(
        "producer  {} {} ({})",
        m.producer.name, m.producer.version, m.producer.commit
    );
    let schemes: Vec<String> = m.schemes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("schemes   {}", schemes.join(" "));
    if let Some(h) = &m.head {
        let tied = if h.tied_in_source {
            " (tied in source)"
        } else {
            ""
        };
        println!("head      {}{tied}", h.tensor);
    }
    if let Some(p) = &m.preprocessing {
        println!(
            "vision    {}x{} grid, {} patches of {}, {} tokens, deepstack {:?}",
            p.fixed_grid.width,
            p.fixed_grid.height,
            p.fixed_grid.patches,
            p.fixed_grid.patch_dim,
            p.fixed_grid.tokens,
            p.deepstack_visual_indexes
        );
    }
    for (t, why) in &m.fallbacks {
        println!("fallback  {t}: {why}");
    }
    for (t, n) in &m.f16_underflow {
        println!("underflow {t}: {n} value(s) subnormal or zero in f16");
    }
    for (t, n) in &m.scale_underflow {
        println!("underflow {t}: {n} block(s) with a zero scale");
    }
}
