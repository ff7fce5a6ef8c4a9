//! `q3vl synth`: a random-weight checkpoint of a real shape, for scale tests and
//! benchmarks without a download.

use crate::common::WriteArgs;
use crate::Outcome;
use q3vl_convert::synth::{synth, SynthOptions, SynthSize};
use q3vl_model::config::read_json;
use q3vl_model::{Error, PreprocessorConfig, Qwen3VlConfig};
use std::path::{Path, PathBuf};

/// Arguments of `q3vl synth`.
#[derive(clap::Args)]
pub struct SynthArgs {
    /// tiny (tests), 2b, 4b or 8b.
    #[arg(long, value_parser = ["tiny", "2b", "4b", "8b"], required_unless_present = "config")]
    pub size: Option<String>,
    /// A Qwen3-VL config.json (Hugging Face layout) giving the shape, instead of --size.
    #[arg(long, value_name = "FILE", conflicts_with = "size")]
    pub config: Option<PathBuf>,
    /// A preprocessor_config.json whose pixel bounds, mean, std and rescale factor to
    /// write instead of the Qwen3-VL defaults (patch and merge sizes follow the config).
    #[arg(long, value_name = "FILE")]
    pub preprocessor: Option<PathBuf>,
    /// Multiply the decoder's final norm weight by this, so the logits spread like a
    /// trained model's (synth's random values alone give nearly flat logits; 20 gives
    /// a spread of about 3, for tests of the gates).
    #[arg(long, default_value_t = 1.0, value_parser = logit_scale)]
    pub logit_scale: f32,
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
    /// Worker threads and shard size.
    #[command(flatten)]
    pub write: WriteArgs,
    /// Override tie_word_embeddings (tests of tied checkpoints).
    #[arg(long, hide = true)]
    pub tied: Option<bool>,
}

/// Runs `q3vl synth`.
pub fn run(a: SynthArgs) -> anyhow::Result<Outcome> {
    let mut config = match (&a.size, &a.config) {
        (_, Some(path)) => load_config(path)?,
        (Some(size), None) => SynthSize::parse(size)
            .expect("clap checked the size")
            .config(),
        (None, None) => unreachable!("clap requires --size or --config"),
    };
    if let Some(t) = a.tied {
        config.tie_word_embeddings = t;
    }
    let preprocessor = match &a.preprocessor {
        Some(path) => load_preprocessor(path, &config)?,
        None => PreprocessorConfig::default(),
    };
    let opts = SynthOptions {
        out: a.out,
        config,
        seed: a.seed,
        tokenizer_dir: a.tokenizer,
        force: a.force,
        shard: a.write.shard(),
        preprocessor,
        logit_scale: a.logit_scale,
    };
    let cancel = crate::convert::ctrl_c();
    let progress = q3vl_convert::progress::terminal();
    let run = || synth(&opts, progress.as_ref(), &cancel);
    let s = match a.write.threads {
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

/// Reads a `config.json`; any error names the file.
fn load_config(path: &Path) -> Result<Qwen3VlConfig, Error> {
    Qwen3VlConfig::from_json(&read_json(path)?).map_err(|e| in_file(path, e))
}

/// Reads a `preprocessor_config.json`, whose patch and merge sizes must match the
/// config's (synth writes the config's).
fn load_preprocessor(path: &Path, cfg: &Qwen3VlConfig) -> Result<PreprocessorConfig, Error> {
    let p = PreprocessorConfig::from_json(&read_json(path)?).map_err(|e| in_file(path, e))?;
    let v = &cfg.vision;
    let pairs = [
        ("patch_size", p.patch_size, v.patch_size),
        (
            "temporal_patch_size",
            p.temporal_patch_size,
            v.temporal_patch_size,
        ),
        ("merge_size", p.merge_size, v.spatial_merge_size),
    ];
    for (key, got, want) in pairs {
        if got != want {
            let msg = format!("{key} is {got}, the config's is {want}");
            return Err(in_file(path, Error::Config(msg)));
        }
    }
    Ok(p)
}

/// A config error as one naming `path`.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Config(msg) => Error::Json {
            path: path.to_path_buf(),
            msg,
        },
        e => e,
    }
}

/// A finite, positive `--logit-scale`.
fn logit_scale(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a finite number above 0")),
    }
}

fn rayon_pool(n: usize) -> anyhow::Result<rayon::ThreadPool> {
    Ok(rayon::ThreadPoolBuilder::new().num_threads(n).build()?)
}
