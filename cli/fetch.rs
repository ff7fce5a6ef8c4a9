//! `q3vl fetch`: download a checkpoint into the Hugging Face cache and print its
//! snapshot folder.

use crate::Outcome;
use anyhow::Context;
use q3vl_convert::fetch::{fetch, FetchOptions};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Arguments of `q3vl fetch`.
#[derive(clap::Args)]
pub struct FetchArgs {
    /// The hub repo, e.g. Qwen/Qwen3-VL-8B-Instruct.
    #[arg(long)]
    pub hf_id: String,
    /// A branch, tag or commit sha to pin (default: main).
    #[arg(long)]
    pub revision: Option<String>,
    /// The hub cache folder (default: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Print a JSON document (commit, snapshot folder, files) instead of the folder.
    #[arg(long)]
    pub json: bool,
}

/// Options for a fetch as the CLI runs it: environment, bars on a terminal only.
pub fn options(hf_id: &str, revision: Option<String>, cache_dir: Option<PathBuf>) -> FetchOptions {
    let mut o = FetchOptions::from_env(hf_id, revision, cache_dir);
    o.progress = std::io::stderr().is_terminal();
    o
}

/// Runs `q3vl fetch`.
pub fn run(a: FetchArgs) -> anyhow::Result<Outcome> {
    let o = options(&a.hf_id, a.revision, a.cache_dir);
    let f = fetch(&o).with_context(|| format!("fetch {}", a.hf_id))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
    } else {
        println!("{}", f.snapshot.display());
    }
    Ok(Outcome::Success)
}
