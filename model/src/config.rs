//! Qwen3-VL configuration: the text and vision towers as `config.json` describes them,
//! the real 2B/4B/8B presets, and the image preprocessor and generation settings.
//!
//! Both spellings of the rotary settings are read: `rope_theta` + `rope_scaling`
//! (transformers 4.57, the hub files) and `rope_parameters` (transformers 5.x).

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The text decoder's hyper-parameters (`text_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Residual stream width H.
    pub hidden_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// SwiGLU width I.
    pub intermediate_size: usize,
    /// Rows of the embedding table and of the head.
    pub vocab_size: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Frequency slots given to the (t, h, w) axes; sums to `head_dim / 2`.
    pub mrope_section: [usize; 3],
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
}

/// The vision tower's hyper-parameters (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Number of ViT blocks.
    pub depth: usize,
    /// ViT width Dv.
    pub hidden_size: usize,
    /// ViT MLP width.
    pub intermediate_size: usize,
    /// ViT attention heads.
    pub num_heads: usize,
    /// Patch side in pixels (16).
    pub patch_size: usize,
    /// Frames per temporal patch (2).
    pub temporal_patch_size: usize,
    /// Patches merged per side into one token (2).
    pub spatial_merge_size: usize,
    /// Image channels (3).
    pub in_channels: usize,
    /// Merger output width Do (= text hidden size).
    pub out_hidden_size: usize,
    /// Rows of the learned position table (a square G×G grid).
    pub num_position_embeddings: usize,
    /// ViT blocks whose outputs feed the DeepStack mergers.
    pub deepstack_visual_indexes: Vec<usize>,
    /// Base of the ViT's 2D RoPE (10000).
    pub rope_theta: f64,
}

/// A whole Qwen3-VL checkpoint's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3VlConfig {
    /// The decoder.
    pub text: TextConfig,
    /// The vision tower.
    pub vision: VisionConfig,
    /// Whether the LM head shares the embedding table (2B/4B).
    pub tie_word_embeddings: bool,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// `<|video_pad|>`.
    pub video_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
}

/// The published dense sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// Qwen3-VL-2B-Instruct.
    B2,
    /// Qwen3-VL-4B-Instruct.
    B4,
    /// Qwen3-VL-8B-Instruct.
    B8,
}

fn field<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a Value> {
    v.get(key)
        .filter(|x| !x.is_null())
        .ok_or_else(|| Error::Config(format!("{path}.{key} is missing")))
}

fn usize_of(v: &Value, path: &str, key: &str) -> Result<usize> {
    field(v, path, key)?
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| Error::Config(format!("{path}.{key} is not a non-negative integer")))
}

fn f64_of(v: &Value, path: &str, key: &str) -> Result<f64> {
    field(v, path, key)?
        .as_f64()
        .ok_or_else(|| Error::Config(format!("{path}.{key} is not a number")))
}

fn opt_usize(v: &Value, path: &str, key: &str, default: usize) -> Result<usize> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(_) => usize_of(v, path, key),
    }
}

fn usize_list(v: &Value, path: &str, key: &str) -> Result<Vec<usize>> {
    field(v, path, key)?
        .as_array()
        .ok_or_else(|| Error::Config(format!("{path}.{key} is not a list")))?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| Error::Config(format!("{path}.{key} holds a non-integer")))
        })
        .collect()
}

/// Upper bounds on the sizes a `config.json` may give: about four times the largest
/// published Qwen3-VL (the 235B-A22B and 32B: hidden 5120, 94 layers, 64 heads,
/// intermediate 25600, a 27-block vision tower of width 1152), so every real model
/// fits and a corrupted or hostile file is refused before anything is sized from it
/// (a huge layer count once made convert grow without bound; zero heads divided by
/// zero).
pub mod limits {
    /// Text residual width.
    pub const HIDDEN: usize = 32_768;
    /// Decoder layers.
    pub const LAYERS: usize = 512;
    /// Query (and key/value) heads.
    pub const HEADS: usize = 512;
    /// Width of one attention head.
    pub const HEAD_DIM: usize = 1024;
    /// SwiGLU width.
    pub const INTERMEDIATE: usize = 131_072;
    /// Vocabulary rows.
    pub const VOCAB: usize = 1 << 21;
    /// Longest context.
    pub const POSITIONS: usize = 1 << 22;
    /// ViT blocks.
    pub const VISION_DEPTH: usize = 256;
    /// ViT width.
    pub const VISION_HIDDEN: usize = 16_384;
    /// ViT MLP width.
    pub const VISION_INTERMEDIATE: usize = 65_536;
    /// ViT heads.
    pub const VISION_HEADS: usize = 256;
    /// Patch side in pixels.
    pub const PATCH: usize = 64;
    /// Frames per temporal patch, and patches merged per side.
    pub const SMALL_FACTOR: usize = 8;
    /// Rows of the learned position table (a 256 × 256 grid).
    pub const POSITION_TABLE: usize = 1 << 16;
}

/// `v` must lie in `lo..=hi`; the error names the field.
fn bounded(path: &str, key: &str, v: usize, lo: usize, hi: usize) -> Result<usize> {
    if (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(Error::Config(format!(
            "{path}.{key} is {v}, outside the supported {lo}..={hi}"
        )))
    }
}

/// `v` must be finite and in `(0, hi)`; the error names the field.
fn positive(path: &str, key: &str, v: f64, hi: f64) -> Result<f64> {
    if v.is_finite() && v > 0.0 && v < hi {
        Ok(v)
    } else {
        Err(Error::Config(format!(
            "{path}.{key} is {v}, it must be a finite number in (0, {hi:e})"
        )))
    }
}

/// The text tower's rotary base and M-RoPE sections, from either spelling
/// (`rope_theta` + `rope_scaling`, or `rope_parameters`); the sections must sum to
/// `head_dim / 2`.
fn rope_from_json(t: &Value, p: &str, head_dim: usize) -> Result<(f64, [usize; 3])> {
    // transformers 5 moves theta and the sections into `rope_parameters`.
    let rope = t
        .get("rope_parameters")
        .filter(|x| x.is_object())
        .or_else(|| t.get("rope_scaling").filter(|x| x.is_object()));
    let rope_theta = match t.get("rope_theta").and_then(Value::as_f64) {
        Some(x) => x,
        None => rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .ok_or_else(|| Error::Config(format!("{p}.rope_theta is missing")))?,
    };
    let rope = rope.ok_or_else(|| {
        Error::Config(format!(
            "{p}: neither rope_scaling nor rope_parameters is present"
        ))
    })?;
    if let Some(kind) = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(Value::as_str)
    {
        if kind != "default" {
            return Err(Error::Config(format!(
                "{p}.rope_type {kind:?} is not supported (only \"default\")"
            )));
        }
    }
    let sec = usize_list(rope, &format!("{p}.rope_scaling"), "mrope_section")?;
    let mrope_section: [usize; 3] = sec.as_slice().try_into().map_err(|_| {
        Error::Config(format!(
            "{p}.mrope_section must have 3 entries, has {}",
            sec.len()
        ))
    })?;
    // Bounded one by one first, so the sum cannot overflow.
    let sum = mrope_section
        .iter()
        .map(|&x| bounded(p, "mrope_section", x, 0, limits::HEAD_DIM))
        .sum::<Result<usize>>()?;
    if sum * 2 != head_dim {
        return Err(Error::Config(format!(
            "{p}.mrope_section {mrope_section:?} does not sum to head_dim/2 = {}",
            head_dim / 2
        )));
    }
    Ok((rope_theta, mrope_section))
}

impl TextConfig {
    fn from_json(t: &Value) -> Result<Self> {
        let p = "text_config";
        use limits as l;
        let hidden_size = bounded(
            p,
            "hidden_size",
            usize_of(t, p, "hidden_size")?,
            1,
            l::HIDDEN,
        )?;
        let heads = usize_of(t, p, "num_attention_heads")?;
        let num_attention_heads = bounded(p, "num_attention_heads", heads, 1, l::HEADS)?;
        let head_dim = opt_usize(t, p, "head_dim", hidden_size / num_attention_heads)?;
        let head_dim = bounded(p, "head_dim", head_dim, 2, l::HEAD_DIM)?;
        // The text tower's width need not be heads × head_dim (the 4B: 2560 against
        // 32 × 128); the rotary sections must fill head_dim exactly.
        let (rope_theta, mrope_section) = rope_from_json(t, p, head_dim)?;
        if t.get("attention_bias").and_then(Value::as_bool) == Some(true) {
            return Err(Error::Config(format!(
                "{p}.attention_bias=true is not supported"
            )));
        }
        if let Some(act) = t.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(Error::Config(format!(
                    "{p}.hidden_act {act:?} is not supported"
                )));
            }
        }
        let size = |key: &str, hi: usize| bounded(p, key, usize_of(t, p, key)?, 1, hi);
        let cfg = TextConfig {
            hidden_size,
            num_hidden_layers: size("num_hidden_layers", l::LAYERS)?,
            num_attention_heads,
            num_key_value_heads: size("num_key_value_heads", l::HEADS)?,
            head_dim,
            intermediate_size: size("intermediate_size", l::INTERMEDIATE)?,
            vocab_size: size("vocab_size", l::VOCAB)?,
            rope_theta: positive(p, "rope_theta", rope_theta, f64::INFINITY)?,
            mrope_section,
            // Negative or zero, the RMSNorm divides by zero or by a negative mean.
            rms_norm_eps: positive(p, "rms_norm_eps", f64_of(t, p, "rms_norm_eps")?, 1.0)?,
            max_position_embeddings: bounded(
                p,
                "max_position_embeddings",
                opt_usize(t, p, "max_position_embeddings", 262144)?,
                1,
                l::POSITIONS,
            )?,
        };
        if !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
        {
            return Err(Error::Config(format!(
                "{p}: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                cfg.num_attention_heads, cfg.num_key_value_heads
            )));
        }
        Ok(cfg)
    }

    /// Query heads per key/value head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

impl VisionConfig {
    fn from_json(v: &Value) -> Result<Self> {
        use limits as l;
        let p = "vision_config";
        let size = |key: &str, hi: usize| bounded(p, key, usize_of(v, p, key)?, 1, hi);
        let opt = |key: &str, d: usize, hi: usize| bounded(p, key, opt_usize(v, p, key, d)?, 1, hi);
        let theta = v
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let cfg = VisionConfig {
            depth: size("depth", l::VISION_DEPTH)?,
            hidden_size: size("hidden_size", l::VISION_HIDDEN)?,
            intermediate_size: size("intermediate_size", l::VISION_INTERMEDIATE)?,
            num_heads: size("num_heads", l::VISION_HEADS)?,
            patch_size: opt("patch_size", 16, l::PATCH)?,
            temporal_patch_size: opt("temporal_patch_size", 2, l::SMALL_FACTOR)?,
            spatial_merge_size: opt("spatial_merge_size", 2, l::SMALL_FACTOR)?,
            // Images are decoded to RGB: three channels, nothing else.
            in_channels: bounded(p, "in_channels", opt_usize(v, p, "in_channels", 3)?, 3, 3)?,
            out_hidden_size: size("out_hidden_size", l::HIDDEN)?,
            num_position_embeddings: size("num_position_embeddings", l::POSITION_TABLE)?,
            deepstack_visual_indexes: usize_list(v, p, "deepstack_visual_indexes")?,
            rope_theta: positive(p, "rope_theta", theta, f64::INFINITY)?,
        };
        if !cfg.hidden_size.is_multiple_of(cfg.num_heads)
            || !(cfg.hidden_size / cfg.num_heads).is_multiple_of(4)
        {
            return Err(Error::Config(format!(
                "{p}: head width hidden_size/num_heads = {}/{} must be a multiple of 4",
                cfg.hidden_size, cfg.num_heads
            )));
        }
        let g = cfg.pos_grid();
        if g * g != cfg.num_position_embeddings {
            return Err(Error::Config(format!(
                "{p}.num_position_embeddings {} is not a square",
                cfg.num_position_embeddings
            )));
        }
        if let Some(&j) = cfg
            .deepstack_visual_indexes
            .iter()
            .find(|&&j| j >= cfg.depth)
        {
            return Err(Error::Config(format!(
                "{p}.deepstack_visual_indexes holds {j}, past depth {}",
                cfg.depth
            )));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "gelu_pytorch_tanh" {
                return Err(Error::Config(format!(
                    "{p}.hidden_act {act:?} is not supported"
                )));
            }
        }
        Ok(cfg)
    }

    /// ViT head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Side G of the learned position grid.
    pub fn pos_grid(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }

    /// Values in one patch row: C · T · P · P (1536 for the real models).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Width of a merged token before the merger MLP: Dv · merge².
    pub fn merged_dim(&self) -> usize {
        self.hidden_size * self.spatial_merge_size * self.spatial_merge_size
    }
}

impl Qwen3VlConfig {
    /// Parses a `config.json` document.
    pub fn from_json(v: &Value) -> Result<Self> {
        match v.get("model_type").and_then(Value::as_str) {
            Some("qwen3_vl") => {}
            Some(other) => {
                return Err(Error::Config(format!(
                    "model_type {other:?} is not supported (expected \"qwen3_vl\")"
                )))
            }
            None => return Err(Error::Config("model_type is missing".into())),
        }
        let t = field(v, "config", "text_config")?;
        let vis = field(v, "config", "vision_config")?;
        let text = TextConfig::from_json(t)?;
        let vision = VisionConfig::from_json(vis)?;
        if vision.out_hidden_size != text.hidden_size {
            return Err(Error::Config(format!(
                "vision_config.out_hidden_size {} differs from text_config.hidden_size {}",
                vision.out_hidden_size, text.hidden_size
            )));
        }
        if vision.deepstack_visual_indexes.len() > text.num_hidden_layers {
            return Err(Error::Config(format!(
                "vision_config.deepstack_visual_indexes has {} entries, more than the {} decoder layers they feed",
                vision.deepstack_visual_indexes.len(),
                text.num_hidden_layers
            )));
        }
        // HF 4.57 ties from text_config; fall back to the top level.
        let tie = t
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .or_else(|| v.get("tie_word_embeddings").and_then(Value::as_bool))
            .unwrap_or(false);
        let id = |k: &str, d: u32| -> Result<u32> {
            let x = opt_usize(v, "config", k, d as usize)?;
            u32::try_from(x).map_err(|_| Error::Config(format!("config.{k} {x} is not a token id")))
        };
        Ok(Qwen3VlConfig {
            text,
            vision,
            tie_word_embeddings: tie,
            image_token_id: id("image_token_id", 151655)?,
            video_token_id: id("video_token_id", 151656)?,
            vision_start_token_id: id("vision_start_token_id", 151652)?,
            vision_end_token_id: id("vision_end_token_id", 151653)?,
        })
    }

    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let v = read_json(&path)?;
        Self::from_json(&v).map_err(|e| match e {
            Error::Config(msg) => Error::Json { path, msg },
            e => e,
        })
    }

    /// The published configuration of one of the dense sizes.
    pub fn preset(size: Size) -> Self {
        let (h, layers, heads, inter, tie) = match size {
            Size::B2 => (2048, 28, 16, 6144, true),
            Size::B4 => (2560, 36, 32, 9728, true),
            Size::B8 => (4096, 36, 32, 12288, false),
        };
        let (depth, dv, iv, ds) = match size {
            Size::B2 | Size::B4 => (24, 1024, 4096, vec![5, 11, 17]),
            Size::B8 => (27, 1152, 4304, vec![8, 16, 24]),
        };
        Qwen3VlConfig {
            text: TextConfig {
                hidden_size: h,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_key_value_heads: 8,
                head_dim: 128,
                intermediate_size: inter,
                vocab_size: 151936,
                rope_theta: 5_000_000.0,
                mrope_section: [24, 20, 20],
                rms_norm_eps: 1e-6,
                max_position_embeddings: 262144,
            },
            vision: VisionConfig {
                depth,
                hidden_size: dv,
                intermediate_size: iv,
                num_heads: 16,
                patch_size: 16,
                temporal_patch_size: 2,
                spatial_merge_size: 2,
                in_channels: 3,
                out_hidden_size: h,
                num_position_embeddings: 2304,
                deepstack_visual_indexes: ds,
                rope_theta: 10000.0,
            },
            tie_word_embeddings: tie,
            image_token_id: 151655,
            video_token_id: 151656,
            vision_start_token_id: 151652,
            vision_end_token_id: 151653,
        }
    }

    /// The `config.json` document for this configuration, in the hub's (4.57) spelling.
    pub fn to_hf_json(&self) -> Value {
        let t = &self.text;
        let v = &self.vision;
        json!({
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen3_vl_text",
                "hidden_size": t.hidden_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim,
                "intermediate_size": t.intermediate_size,
                "vocab_size": t.vocab_size,
                "rope_theta": t.rope_theta,
                "rope_scaling": {"rope_type": "default", "mrope_section": t.mrope_section, "mrope_interleaved": true},
                "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "hidden_act": "silu",
                "attention_bias": false,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "dtype": "bfloat16"
            },
            "vision_config": {
                "model_type": "qwen3_vl",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "in_channels": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": v.deepstack_visual_indexes,
                "hidden_act": "gelu_pytorch_tanh"
            }
        })
    }
}

/// Image preprocessing settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    /// Smallest pixel count `smart_resize` allows.
    pub min_pixels: usize,
    /// Largest pixel count `smart_resize` allows.
    pub max_pixels: usize,
    /// Patch side.
    pub patch_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Merge side.
    pub merge_size: usize,
    /// Per-channel mean.
    pub image_mean: [f32; 3],
    /// Per-channel std.
    pub image_std: [f32; 3],
    /// 1/255 normally.
    pub rescale_factor: f64,
}

impl Default for PreprocessorConfig {
    /// The Qwen3-VL hub values.
    fn default() -> Self {
        PreprocessorConfig {
            min_pixels: 65536,
            max_pixels: 16777216,
            patch_size: 16,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            rescale_factor: 1.0 / 255.0,
        }
    }
}

impl PreprocessorConfig {
    /// Parses `preprocessor_config.json` (missing fields take the Qwen3-VL defaults).
    pub fn from_json(v: &Value) -> Result<Self> {
        let d = PreprocessorConfig::default();
        let p = "preprocessor_config";
        let size = v.get("size");
        let min_pixels = size
            .and_then(|s| s.get("shortest_edge"))
            .or_else(|| v.get("min_pixels"))
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(d.min_pixels);
        let max_pixels = size
            .and_then(|s| s.get("longest_edge"))
            .or_else(|| v.get("max_pixels"))
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(d.max_pixels);
        let triple = |k: &str, dv: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(dv),
                Some(x) => {
                    let a: Vec<f32> = x
                        .as_array()
                        .ok_or_else(|| Error::Config(format!("{p}.{k} is not a list")))?
                        .iter()
                        // Finite as f32, not only as f64: 1e308 is infinite in f32.
                        .map(|y| y.as_f64().map(|y| y as f32).filter(|y| y.is_finite()))
                        .collect::<Option<_>>()
                        .ok_or_else(|| {
                            Error::Config(format!(
                                "{p}.{k} holds a non-number or one out of f32 range"
                            ))
                        })?;
                    a.as_slice()
                        .try_into()
                        .map_err(|_| Error::Config(format!("{p}.{k} must have 3 numbers")))
                }
            }
        };
        let small = |k: &str, dv: usize, hi: usize| bounded(p, k, opt_usize(v, p, k, dv)?, 1, hi);
        let c = PreprocessorConfig {
            min_pixels,
            max_pixels,
            patch_size: small("patch_size", d.patch_size, limits::PATCH)?,
            temporal_patch_size: small(
                "temporal_patch_size",
                d.temporal_patch_size,
                limits::SMALL_FACTOR,
            )?,
            merge_size: small("merge_size", d.merge_size, limits::SMALL_FACTOR)?,
            image_mean: triple("image_mean", d.image_mean)?,
            image_std: triple("image_std", d.image_std)?,
            rescale_factor: positive(
                p,
                "rescale_factor",
                v.get("rescale_factor")
                    .and_then(Value::as_f64)
                    .unwrap_or(d.rescale_factor),
                f64::INFINITY,
            )?,
        };
        c.check()?;
        Ok(c)
    }

    /// Pixel bounds ordered and within what the decoder accepts; no zero std.
    fn check(&self) -> Result<()> {
        let p = "preprocessor_config";
        let most = crate::image::MAX_DECODE_PIXELS as usize;
        bounded(p, "max_pixels", self.max_pixels, 1, most)?;
        bounded(p, "min_pixels", self.min_pixels, 1, self.max_pixels)?;
        if self.image_std.contains(&0.0) {
            return Err(Error::Config(format!("{p}.image_std holds a zero")));
        }
        Ok(())
    }

    /// Reads `DIR/preprocessor_config.json`, or the defaults when the file is absent.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        Self::from_json(&read_json(&path)?).map_err(|e| match e {
            Error::Config(msg) => Error::Json { path, msg },
            e => e,
        })
    }
}

/// Reads and parses a JSON file, naming it in any error.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = crate::input::read_regular(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

/// The stop ids of `generation_config.json` (`eos_token_id`, a number or a list).
pub fn eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(vec![]);
    }
    let v = read_json(&path)?;
    Ok(match v.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_through_hf_json() {
        for s in [Size::B2, Size::B4, Size::B8] {
            let c = Qwen3VlConfig::preset(s);
            assert_eq!(Qwen3VlConfig::from_json(&c.to_hf_json()).unwrap(), c);
        }
    }

    #[test]
    fn rope_parameters_spelling_is_read() {
        let mut v = Qwen3VlConfig::preset(Size::B2).to_hf_json();
        let t = v["text_config"].as_object_mut().unwrap();
        t.remove("rope_scaling");
        t.remove("rope_theta");
        t.insert(
            "rope_parameters".into(),
            json!({"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": true}),
        );
        let c = Qwen3VlConfig::from_json(&v).unwrap();
        assert_eq!(c.text.rope_theta, 5e6);
        assert_eq!(c.text.mrope_section, [24, 20, 20]);
    }

    #[test]
    fn text_config_tie_flag_wins() {
        let mut v = Qwen3VlConfig::preset(Size::B8).to_hf_json();
        v["text_config"]["tie_word_embeddings"] = json!(true);
        assert!(Qwen3VlConfig::from_json(&v).unwrap().tie_word_embeddings);
    }

    /// The error of parsing the 8B preset after `edit`.
    fn refused(edit: impl FnOnce(&mut Value)) -> String {
        let mut v = Qwen3VlConfig::preset(Size::B8).to_hf_json();
        edit(&mut v);
        Qwen3VlConfig::from_json(&v).unwrap_err().to_string()
    }

    #[test]
    fn sizes_are_bounded_and_values_sane() {
        let (t, v) = ("text_config", "vision_config");
        let cases = [
            (t, "num_hidden_layers", json!(10_000_000_000u64)),
            (t, "num_hidden_layers", json!(0)),
            (t, "num_attention_heads", json!(0)),
            (t, "num_key_value_heads", json!(0)),
            (t, "vocab_size", json!(1u64 << 40)),
            (t, "hidden_size", json!(0)),
            (t, "rms_norm_eps", json!(-1e-6)),
            (t, "rms_norm_eps", json!(0.0)),
            (t, "rope_theta", json!(-5.0)),
            (v, "depth", json!(1u64 << 50)),
            (v, "num_heads", json!(0)),
            (v, "patch_size", json!(0)),
            (v, "in_channels", json!(4)),
        ];
        for (part, key, val) in cases {
            let e = refused(|c| c[part][key] = val.clone());
            assert!(e.contains(&format!("{part}.{key}")), "{key}={val}: {e}");
        }
        let e = refused(|v| {
            v["text_config"]["rope_scaling"]["mrope_section"] = json!([u64::MAX, u64::MAX, 2])
        });
        assert!(e.contains("mrope_section"), "{e}");
        let e = refused(|v| v["text_config"]["num_hidden_layers"] = json!(2));
        assert!(e.contains("deepstack_visual_indexes"), "{e}");
        let e = refused(|v| v["image_token_id"] = json!(1u64 << 33));
        assert!(e.contains("image_token_id"), "{e}");
        // The real sizes, and the vision default, pass.
        for s in [Size::B2, Size::B4, Size::B8] {
            Qwen3VlConfig::from_json(&Qwen3VlConfig::preset(s).to_hf_json()).unwrap();
        }
    }

    #[test]
    fn preprocessor_values_are_checked() {
        let bad = |v: Value, needle: &str| {
            let e = PreprocessorConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        };
        bad(json!({"image_mean": ["x", 0.5, 0.5]}), "image_mean");
        // Finite in f64 but not in f32 (found by the fuzzer).
        bad(json!({"image_mean": [-1e308, 0.5, 0.5]}), "image_mean");
        bad(json!({"image_std": [0.5, 0.0, 0.5]}), "image_std");
        bad(json!({"patch_size": 0}), "patch_size");
        bad(json!({"merge_size": 0}), "merge_size");
        bad(json!({"rescale_factor": -1.0}), "rescale_factor");
        bad(json!({"min_pixels": 100, "max_pixels": 10}), "min_pixels");
        assert_eq!(
            PreprocessorConfig::from_json(&json!({})).unwrap(),
            PreprocessorConfig::default()
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut v = Qwen3VlConfig::preset(Size::B2).to_hf_json();
        v["model_type"] = json!("llava");
        assert!(Qwen3VlConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("llava"));
        let mut v = Qwen3VlConfig::preset(Size::B2).to_hf_json();
        v["text_config"]
            .as_object_mut()
            .unwrap()
            .remove("hidden_size");
        assert!(Qwen3VlConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("text_config.hidden_size"));
        let mut v = Qwen3VlConfig::preset(Size::B2).to_hf_json();
        v["text_config"]["rope_scaling"]["mrope_section"] = json!([24, 20, 21]);
        assert!(Qwen3VlConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("mrope_section"));
    }
}
