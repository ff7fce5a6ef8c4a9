//! `q3vl export`: a verified bundle pair in another runtime's format.

use crate::Outcome;
use clap::Subcommand;
use q3vl_export::compressed_tensors::{self, Options};
use std::path::PathBuf;

/// Arguments of `q3vl export`.
#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    format: Format,
}

#[derive(Subcommand)]
enum Format {
    /// An HF checkpoint in the compressed-tensors pack-quantized format (int8, group 32),
    /// for vLLM and HF transformers: the bundles' int8 weights unchanged.
    CompressedTensors(CompressedTensorsArgs),
}

/// Arguments of `q3vl export compressed-tensors`.
#[derive(clap::Args)]
struct CompressedTensorsArgs {
    /// A conversion's output folder (int8hu or int8lin), or its language bundle folder.
    #[arg(long)]
    bundle: PathBuf,
    /// The export folder to create.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing compressed-tensors export in --out (never another folder).
    #[arg(long)]
    force: bool,
    /// Export a pair without a valid verification stamp (its files are still checked
    /// against metadata.json).
    #[arg(long)]
    allow_unverified: bool,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
    /// Shard size in bytes (default ~4 GiB).
    #[arg(long, hide = true)]
    shard_size: Option<u64>,
}

/// Runs `q3vl export`.
pub fn run(a: ExportArgs) -> anyhow::Result<Outcome> {
    match a.format {
        Format::CompressedTensors(a) => compressed(a),
    }
}

fn compressed(a: CompressedTensorsArgs) -> anyhow::Result<Outcome> {
    let opts = Options {
        bundle: a.bundle,
        out: a.out,
        force: a.force,
        allow_unverified: a.allow_unverified,
        shard: a
            .shard_size
            .map(|n| q3vl_bundle::ShardPolicy { max_shard_bytes: n })
            .unwrap_or_default(),
        producer: crate::convert::producer(),
    };
    let cancel = crate::convert::ctrl_c();
    let progress = q3vl_convert::progress::terminal();
    let s = compressed_tensors::export(&opts, progress.as_ref(), &cancel)?;
    if !s.verified {
        eprintln!("note: exported without a verification stamp (--allow-unverified)");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("{}", s.path.display());
    }
    Ok(Outcome::Success)
}
