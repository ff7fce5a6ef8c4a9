//! `q3vl export`: a verified bundle pair in another runtime's format.

use crate::Outcome;
use clap::Subcommand;
use q3vl_export::{compressed_tensors, gguf, Request};
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
    /// The text model and vision projector GGUF files llama.cpp runs: the int8 weights as
    /// Q8_0 blocks (the same values and scales, not re-quantized).
    Gguf(CommonArgs),
}

/// The arguments every export takes.
#[derive(clap::Args)]
struct CommonArgs {
    /// A conversion's output folder, or its language bundle folder.
    #[arg(long)]
    bundle: PathBuf,
    /// The export folder to create.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing export of this format in --out (never another folder).
    #[arg(long)]
    force: bool,
    /// Export a pair without a valid verification stamp (its files are still checked
    /// against metadata.json).
    #[arg(long)]
    allow_unverified: bool,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
}

/// Arguments of `q3vl export compressed-tensors`.
#[derive(clap::Args)]
struct CompressedTensorsArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Shard size in bytes (default ~4 GiB).
    #[arg(long, hide = true)]
    shard_size: Option<u64>,
}

impl CommonArgs {
    fn request(&self) -> Request {
        Request {
            bundle: self.bundle.clone(),
            out: self.out.clone(),
            force: self.force,
            allow_unverified: self.allow_unverified,
            producer: crate::convert::producer(),
        }
    }
}

/// Runs `q3vl export`.
pub fn run(a: ExportArgs) -> anyhow::Result<Outcome> {
    let cancel = crate::convert::ctrl_c();
    let progress = q3vl_convert::progress::terminal();
    let (json, verified, summary, paths) = match a.format {
        Format::CompressedTensors(a) => {
            let shard = a
                .shard_size
                .map(|n| q3vl_bundle::ShardPolicy { max_shard_bytes: n })
                .unwrap_or_default();
            let req = a.common.request();
            let s = compressed_tensors::export(&req, shard, progress.as_ref(), &cancel)?;
            (
                a.common.json,
                s.verified,
                serde_json::to_value(&s)?,
                vec![s.path],
            )
        }
        Format::Gguf(a) => {
            let s = gguf::export(&a.request(), progress.as_ref(), &cancel)?;
            let paths = vec![s.path.join(&s.model), s.path.join(&s.mmproj)];
            (a.json, s.verified, serde_json::to_value(&s)?, paths)
        }
    };
    if !verified {
        eprintln!("note: exported without a verification stamp (--allow-unverified)");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        paths.iter().for_each(|p| println!("{}", p.display()));
    }
    Ok(Outcome::Success)
}
