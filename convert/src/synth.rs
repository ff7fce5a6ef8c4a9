//! Random checkpoints of the real shapes, in the exact Hugging Face layout (sharded
//! bf16 safetensors + index, config, generation and preprocessor configs, the real
//! Qwen3 tokenizer with the Qwen3-VL chat template), for scale tests and benchmarks
//! without a download.
//!
//! Values are a pure function of (seed, tensor name, element index), so the output is
//! the same whatever the thread count or chunking: matrices and embeddings ≈ N(0, 0.02²),
//! norm weights ≈ 1 + N(0, 0.02²), biases ≈ N(0, 0.02²). The normal is approximated by
//! a scaled sum of four uniforms (cheap, bounded at ±3.5σ): 8B = 17 GB must be written
//! in minutes on two cores.

use crate::cancel::Cancel;
use crate::error::{ConvertError, Result};
use crate::progress::Progress;
use q3vl_bundle::{Dtype, ShardPolicy, Staging, TensorPlan, WeightsWriter, WrittenFile};
use q3vl_host::peak_rss_bytes;
use q3vl_model::config::{TextConfig, VisionConfig};
use q3vl_model::layout::{self, TensorClass};
use q3vl_model::{shipped, PreprocessorConfig, Qwen3VlConfig, Size};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The shapes `q3vl synth` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthSize {
    /// A small config with the real vocabulary (tests).
    Tiny,
    /// Qwen3-VL-2B-Instruct's shape.
    B2,
    /// Qwen3-VL-4B-Instruct's shape.
    B4,
    /// Qwen3-VL-8B-Instruct's shape.
    B8,
}

impl SynthSize {
    /// Parses `tiny`, `2b`, `4b` or `8b`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "tiny" => SynthSize::Tiny,
            "2b" => SynthSize::B2,
            "4b" => SynthSize::B4,
            "8b" => SynthSize::B8,
            _ => return None,
        })
    }

    /// The config of this size.
    pub fn config(self) -> Qwen3VlConfig {
        match self {
            SynthSize::Tiny => tiny_config(),
            SynthSize::B2 => Qwen3VlConfig::preset(Size::B2),
            SynthSize::B4 => Qwen3VlConfig::preset(Size::B4),
            SynthSize::B8 => Qwen3VlConfig::preset(Size::B8),
        }
    }
}

/// `tiny`: two decoder layers of width 64 and a two-block vision tower of width 64 with
/// two DeepStack taps, but the real vocabulary (151 936), token ids, patch, merge and
/// position-grid sizes, and an untied head like the 8B. About 40 MB in bf16.
pub fn tiny_config() -> Qwen3VlConfig {
    let real = Qwen3VlConfig::preset(Size::B8);
    Qwen3VlConfig {
        text: TextConfig {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 32,
            intermediate_size: 128,
            mrope_section: [6, 5, 5],
            ..real.text
        },
        vision: VisionConfig {
            depth: 2,
            hidden_size: 64,
            intermediate_size: 128,
            num_heads: 4,
            out_hidden_size: 64,
            deepstack_visual_indexes: vec![0, 1],
            ..real.vision
        },
        tie_word_embeddings: false,
        ..real
    }
}

/// What to synthesize.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// The checkpoint folder to create.
    pub out: PathBuf,
    /// Its configuration.
    pub config: Qwen3VlConfig,
    /// The seed of every value.
    pub seed: u64,
    /// A folder holding a Qwen3 `tokenizer.json` and `tokenizer_config.json` to use
    /// instead of the ones q3vl ships ([`q3vl_model::shipped`]).
    pub tokenizer_dir: Option<PathBuf>,
    /// Replace an existing non-empty `out`.
    pub force: bool,
    /// Shard size.
    pub shard: ShardPolicy,
    /// Pixel bounds, mean, std and rescale factor of `preprocessor_config.json` (the
    /// Qwen3-VL defaults normally; small `min_pixels` keeps test images small). Patch,
    /// temporal-patch and merge sizes always come from `config`.
    pub preprocessor: PreprocessorConfig,
    /// Multiplies the decoder's final norm weight, so the logits spread like a trained
    /// model's (1: synth's values as they are, whose logits are nearly flat, std about
    /// 0.02·√hidden; 20 gives a trained model's spread of about 3).
    pub logit_scale: f32,
}

/// The tensor [`SynthOptions::logit_scale`] multiplies.
pub const FINAL_NORM: &str = "model.language_model.norm.weight";

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct SynthSummary {
    /// The checkpoint folder.
    pub path: PathBuf,
    /// Bytes written.
    pub bytes: u64,
    /// Tensors.
    pub tensors: usize,
    /// Safetensors files.
    pub shards: usize,
    /// Wall time.
    pub seconds: f64,
    /// Peak resident set (VmHWM).
    pub peak_rss_bytes: Option<u64>,
}

/// The tokenizer files of the checkpoint: `tokenizer.json` and `tokenizer_config.json`
/// from `dir` when given, else the real Qwen3 ones q3vl ships; the config always gets
/// the Qwen3-VL chat template.
fn tokenizer_files(dir: Option<&Path>) -> Result<(Vec<u8>, Value)> {
    let (tok_bytes, cfg_bytes, cfg_path) = match dir {
        Some(d) => {
            let tok = d.join("tokenizer.json");
            let cfg = d.join("tokenizer_config.json");
            let tok_bytes =
                q3vl_model::input::read_regular(&tok).map_err(|e| ConvertError::io(&tok, e))?;
            let cfg_bytes =
                q3vl_model::input::read_regular(&cfg).map_err(|e| ConvertError::io(&cfg, e))?;
            (tok_bytes, cfg_bytes, cfg)
        }
        None => (
            shipped::tokenizer_json(),
            shipped::TOKENIZER_CONFIG_JSON.as_bytes().to_vec(),
            PathBuf::from("tokenizer_config.json"),
        ),
    };
    let mut cfg: Value = serde_json::from_slice(&cfg_bytes)
        .map_err(|e| ConvertError::input(&cfg_path, format!("not valid JSON: {e}")))?;
    cfg.as_object_mut()
        .ok_or_else(|| ConvertError::input(&cfg_path, "is not a JSON object"))?
        .insert(
            "chat_template".into(),
            Value::String(shipped::CHAT_TEMPLATE.into()),
        );
    Ok((tok_bytes, cfg))
}

/// Writes the checkpoint into a run-unique staging folder beside `out` and renames it
/// into place at the end. Only `out` is claimed in its parent folder
/// ([`Staging::begin_entry`]): a second synth into the same `out` fails at once, one
/// into a sibling folder runs alongside, and only what killed synths into `out` left
/// is cleaned first.
pub fn synth(
    opts: &SynthOptions,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<SynthSummary> {
    let t0 = Instant::now();
    let out = std::path::absolute(&opts.out).map_err(|e| ConvertError::io(&opts.out, e))?;
    let leaf = out
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .ok_or_else(|| ConvertError::input(&out, "is not a UTF-8 folder name"))?;
    let (tok_bytes, tok_cfg) = tokenizer_files(opts.tokenizer_dir.as_deref())?;
    let staging = Staging::begin_entry(&out)?;
    let occupied = std::fs::read_dir(&out)
        .map(|mut d| d.next().is_some())
        .unwrap_or(out.symlink_metadata().is_ok());
    if occupied && !opts.force {
        return Err(ConvertError::input(
            &out,
            "exists and is not empty (pass --force to replace it)",
        ));
    }
    let dir = staging.dir().join(&leaf);
    std::fs::create_dir(&dir).map_err(|e| ConvertError::io(&dir, e))?;
    crate::convert::test_hold(cancel)?;
    let mut bytes = write_small_files(&dir, opts, &tok_bytes, &tok_cfg)?;
    let (tensors, files) = write_weights(opts, &dir, progress, cancel)?;
    bytes += files.iter().map(|f| f.entry.size).sum::<u64>();
    let shards = files
        .iter()
        .filter(|f| f.file.ends_with(".safetensors"))
        .count();
    cancel.check()?;
    staging.install(&leaf)?;
    Ok(SynthSummary {
        path: out,
        bytes,
        tensors,
        shards,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Writes the configs and tokenizer files into `dir`; returns their bytes.
fn write_small_files(
    dir: &Path,
    opts: &SynthOptions,
    tok_bytes: &[u8],
    tok_cfg: &Value,
) -> Result<u64> {
    let write = |name: &str, b: &[u8]| -> Result<u64> {
        let p = dir.join(name);
        std::fs::write(&p, b).map_err(|e| ConvertError::io(&p, e))?;
        Ok(b.len() as u64)
    };
    let json = |v: &Value| {
        let mut b = serde_json::to_vec_pretty(v).expect("json serializes");
        b.push(b'\n');
        b
    };
    let pre = preprocessor_config(&opts.config, &opts.preprocessor);
    Ok(write("config.json", &json(&opts.config.to_hf_json()))?
        + write("generation_config.json", &json(&generation_config()))?
        + write("preprocessor_config.json", &json(&pre))?
        + write("tokenizer_config.json", &json(tok_cfg))?
        + write("tokenizer.json", tok_bytes)?)
}

/// Streams every tensor's random values into safetensors files in `dir`; returns the
/// tensor count and the files written.
fn write_weights(
    opts: &SynthOptions,
    dir: &Path,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<(usize, Vec<WrittenFile>)> {
    let specs = layout::checkpoint_tensors(&opts.config);
    let plan: Vec<TensorPlan> = specs
        .iter()
        .map(|s| TensorPlan::new(&s.name, Dtype::BF16, s.shape.clone()))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut w = WeightsWriter::create(dir, &plan, opts.shard, &meta)?;
    let total: u64 = plan.iter().map(TensorPlan::bytes).sum();
    progress.begin("synthesizing", total);
    let by_name: BTreeMap<&str, &layout::TensorSpec> =
        specs.iter().map(|s| (s.name.as_str(), s)).collect();
    let order: Vec<String> = w.order().into_iter().map(str::to_owned).collect();
    for name in &order {
        let spec = by_name[name.as_str()];
        let n: usize = spec.shape.iter().product();
        let (mean, std) = match value_model(spec) {
            (m, s) if name == FINAL_NORM => (m * opts.logit_scale, s * opts.logit_scale),
            ms => ms,
        };
        let key = tensor_key(opts.seed, name);
        let mut at = 0usize;
        while at < n {
            cancel.check()?;
            let end = (at + CHUNK).min(n);
            let mut buf = vec![0u8; (end - at) * 2];
            buf.par_chunks_mut(TASK * 2).enumerate().for_each(|(t, o)| {
                let first = at + t * TASK;
                for (j, b) in o.chunks_exact_mut(2).enumerate() {
                    let v = mean + std * unit_normal(key, (first + j) as u64);
                    b.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            });
            progress.advance(buf.len() as u64);
            w.write(name, buf)?;
            at = end;
        }
    }
    let files = w.finish()?;
    progress.end();
    Ok((plan.len(), files))
}

/// Values generated per chunk handed to the writer.
const CHUNK: usize = 8 << 20;
/// Values per parallel task.
const TASK: usize = 64 << 10;

/// (mean, std) of a tensor's values.
fn value_model(spec: &layout::TensorSpec) -> (f32, f32) {
    let is_norm_weight = spec.class == TensorClass::Vector
        && spec.name.ends_with(".weight")
        && spec.name.contains("norm");
    if is_norm_weight {
        (1.0, 0.02)
    } else {
        (0.0, 0.02)
    }
}

/// splitmix64's finalizer: a strong 64-bit mix.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A per-tensor key from the seed and the name (FNV-1a of the name, mixed).
fn tensor_key(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h ^ mix64(seed))
}

/// An approximately standard normal value for element `i`: the sum of four 16-bit
/// uniforms from one 64-bit hash, centred and scaled to unit variance.
#[inline(always)]
fn unit_normal(key: u64, i: u64) -> f32 {
    let r = mix64(key.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
    // Mean of the sum is 2·65535, variance 4·(65536² − 1)/12.
    const SCALE: f32 = 1.0 / 37_837.23;
    (s as f32 - 131_070.0) * SCALE
}

fn generation_config() -> Value {
    json!({
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "do_sample": true,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "repetition_penalty": 1.0
    })
}

fn preprocessor_config(cfg: &Qwen3VlConfig, d: &PreprocessorConfig) -> Value {
    json!({
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "do_convert_rgb": true,
        "do_resize": true,
        "do_rescale": true,
        "do_normalize": true,
        "rescale_factor": d.rescale_factor,
        "image_mean": d.image_mean,
        "image_std": d.image_std,
        "size": {"shortest_edge": d.min_pixels, "longest_edge": d.max_pixels},
        "patch_size": cfg.vision.patch_size,
        "temporal_patch_size": cfg.vision.temporal_patch_size,
        "merge_size": cfg.vision.spatial_merge_size
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_normal_has_unit_moments() {
        let n = 200_000u64;
        let (mut s, mut s2) = (0f64, 0f64);
        for i in 0..n {
            let x = unit_normal(tensor_key(7, "w"), i) as f64;
            s += x;
            s2 += x * x;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
        assert_ne!(tensor_key(7, "w"), tensor_key(8, "w"));
        assert_ne!(tensor_key(7, "w"), tensor_key(7, "v"));
    }

    #[test]
    fn synth_claims_only_its_folder_in_the_parent() {
        let parent = tempfile::tempdir().unwrap();
        let names = || {
            let mut v: Vec<String> = std::fs::read_dir(parent.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let mut config = tiny_config();
        config.text.vocab_size = 512;
        let mut opts = SynthOptions {
            out: parent.path().join("ck"),
            config,
            seed: 1,
            tokenizer_dir: None,
            force: false,
            shard: ShardPolicy::default(),
            preprocessor: PreprocessorConfig::default(),
            logit_scale: 1.0,
        };
        let held = Staging::begin_entry(&opts.out).unwrap();
        let e = synth(&opts, &crate::Quiet, &Cancel::new()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("another q3vl synth"), "{msg}");
        assert!(msg.starts_with(&opts.out.display().to_string()), "{msg}");
        drop(held);
        // A claim on the whole parent, or on a sibling, does not stop it.
        let whole = Staging::begin(parent.path()).unwrap();
        let sibling = Staging::begin_entry(&parent.path().join("ck-2")).unwrap();
        // What killed runs left: its own staging folder, a sibling's, the parent's.
        for d in [
            ".q3vl-tmp-ck~1-2-0/ck",
            ".q3vl-tmp-ck-2~1-2-0",
            ".q3vl-tmp-1-2-0",
        ] {
            std::fs::create_dir_all(parent.path().join(d)).unwrap();
        }
        synth(&opts, &crate::Quiet, &Cancel::new()).unwrap();
        drop((whole, sibling));
        // The entries' lock files went with their claims.
        let want = [
            ".q3vl-lock",
            ".q3vl-tmp-1-2-0",
            ".q3vl-tmp-ck-2~1-2-0",
            "ck",
        ];
        assert_eq!(names(), want);
        opts.force = true;
        synth(&opts, &crate::Quiet, &Cancel::new()).unwrap();
        assert_eq!(names(), want);
        assert!(parent.path().join("ck/model.safetensors").is_file());
    }

    #[test]
    fn tiny_is_a_valid_config_with_the_real_vocab() {
        let c = tiny_config();
        assert_eq!(Qwen3VlConfig::from_json(&c.to_hf_json()).unwrap(), c);
        assert_eq!(c.text.vocab_size, 151_936);
        for (_, [_, i]) in layout::text_linears(&c) {
            assert_eq!(i % 32, 0);
        }
    }
}
