//! `q3vl synth`: a random-weight checkpoint of a real shape, for scale tests and
//! benchmarks without a download.

use crate::Outcome;
use q3vl_bundle::ShardPolicy;
use q3vl_convert::synth::{synth, SynthOptions, SynthSize};
use std::path::PathBuf;

/// Arguments of `q3vl synth`.
#[derive(clap::Args)]
pub struct SynthArgs {
    /// tiny (tests), 2b, 4b or 8b.
    #[arg(long, value_parser = ["tiny", "2b", "4b", "8b"])]
    pub size: String,
    /// The checkpoint folder to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of every value.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder with a Qwen3 tokenizer.json and tokenizer_config.json to use instead of
    /// the real Qwen3 tokenizer q3vl ships.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Replace an existing non-empty folder.
    #[arg(long)]
    pub force: bool,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (default: all cores; at most 4 per core).
    #[arg(long, value_parser = crate::common::threads())]
    pub threads: Option<usize>,
    /// Shard size in bytes (default ~4 GiB).
    #[arg(long, hide = true)]
    pub shard_size: Option<u64>,
    /// Override tie_word_embeddings (tests of tied checkpoints).
    #[arg(long, hide = true)]
    pub tied: Option<bool>,
}

/// Runs `q3vl synth`.
pub fn run(a: SynthArgs) -> anyhow::Result<Outcome> {
    let size = SynthSize::parse(&a.size).expect("clap checked the size");
    let mut config = size.config();
    if let Some(t) = a.tied {
        config.tie_word_embeddings = t;
    }
    let opts = SynthOptions {
        out: a.out,
        config,
        seed: a.seed,
        tokenizer_dir: a.tokenizer,
        force: a.force,
        shard: a
            .shard_size
            .map(|n| ShardPolicy { max_shard_bytes: n })
            .unwrap_or_default(),
    };
    let cancel = crate::convert::ctrl_c();
    let progress = q3vl_convert::progress::terminal();
    let run = || synth(&opts, progress.as_ref(), &cancel);
    let s = match a.threads {
        Some(n) => rayon_pool(n)?.install(run)?,
        None => run()?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("{}", s.path.display());
    }
    Ok(Outcome::Success)
}

fn rayon_pool(n: usize) -> anyhow::Result<rayon::ThreadPool> {
    Ok(rayon::ThreadPoolBuilder::new().num_threads(n).build()?)
}
