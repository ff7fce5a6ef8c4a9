//! A GGUF pair read as a Qwen3-VL model: the configuration, the tokenizer files, and
//! each weight by its HF name (the patch embedding's temporal halves stacked back into
//! the Conv3d weight), dequantized by candle.

use crate::error::{GgufError, Result};
use crate::file::GgufFile;
use crate::{config, names, tokenizer};
use candle_core::quantized::GgmlDType;
use q3vl_model::layout::{EMBED, LM_HEAD};
use q3vl_model::{PreprocessorConfig, Qwen3VlConfig};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::Path;

/// Which file of the pair a tensor is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The text model.
    Text,
    /// The projector.
    Mmproj,
}

/// A GGUF text model and, optionally, its projector.
pub struct GgufModel {
    /// The text file.
    pub text: GgufFile,
    /// The projector file.
    pub mmproj: Option<GgufFile>,
    /// The configuration the metadata describes.
    pub cfg: Qwen3VlConfig,
    /// The image preprocessing the projector describes (defaults without one).
    pub preprocessor: PreprocessorConfig,
    /// The tokenizer, as `tokenizer.json` bytes.
    pub tokenizer_json: Vec<u8>,
    /// `tokenizer_config.json`: the chat template and eos token.
    pub tokenizer_config: Json,
    /// Each HF name's file and GGUF name.
    names: BTreeMap<String, (Part, String)>,
}

impl GgufModel {
    /// Opens and checks `text` and, given, `mmproj`: both well formed, of Qwen3-VL's
    /// architectures, every tensor the configuration needs present, and the pair
    /// matched.
    pub fn open(text: &Path, mmproj: Option<&Path>) -> Result<Self> {
        let text = GgufFile::open(text)?;
        config::check_text_arch(&text)?;
        let mmproj = mmproj.map(GgufFile::open).transpose()?;
        if let Some(m) = &mmproj {
            config::check_mmproj_arch(m)?;
        }
        let tokens = tokenizer::tokens(&text)?;
        let (cfg, preprocessor) = config::read(&text, mmproj.as_ref(), &tokens)?;
        let (tokenizer_json, tokenizer_config) = tokenizer::hf_files(&text, &tokens)?;
        let mut names = BTreeMap::new();
        for (hf, gg) in names::text_pairs(&cfg, !cfg.tie_word_embeddings) {
            names.insert(hf, (Part::Text, gg));
        }
        if mmproj.is_some() {
            for (hf, gg) in names::mmproj_pairs(&cfg) {
                names.insert(hf, (Part::Mmproj, gg));
            }
        }
        let model = GgufModel {
            text,
            mmproj,
            cfg,
            preprocessor,
            tokenizer_json,
            tokenizer_config,
            names,
        };
        model.check_present()?;
        Ok(model)
    }

    /// Every tensor the configuration needs is in its file.
    fn check_present(&self) -> Result<()> {
        for (part, gg) in self.names.values() {
            let f = self.file(*part)?;
            if f.info(gg).is_none() {
                return Err(f.bad(format!("tensor {gg} is missing")));
            }
        }
        if let Some(m) = &self.mmproj {
            for k in 0..self.cfg.vision.temporal_patch_size {
                if m.info(&names::patch_half(k)).is_none() {
                    return Err(m.bad(format!("tensor {} is missing", names::patch_half(k))));
                }
            }
        }
        Ok(())
    }

    fn file(&self, part: Part) -> Result<&GgufFile> {
        match part {
            Part::Text => Ok(&self.text),
            Part::Mmproj => self.mmproj.as_ref().ok_or_else(|| GgufError::File {
                path: self.text.path().to_path_buf(),
                msg: "an image needs the projector (--mmproj)".into(),
            }),
        }
    }

    /// The file and GGUF name holding HF tensor `hf` (not the patch embedding).
    pub fn locate(&self, hf: &str) -> Option<(&GgufFile, &str)> {
        let (part, gg) = self.names.get(hf)?;
        Some((self.file(*part).ok()?, gg.as_str()))
    }

    /// HF tensor `hf` as f32 in its HF shape, with that shape.
    pub fn weight(&self, hf: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        if hf == names::patch_embed() {
            return self.patch_embed();
        }
        let (f, gg) = self.locate(hf).ok_or_else(|| GgufError::File {
            path: self.text.path().to_path_buf(),
            msg: format!("no GGUF tensor holds {hf}"),
        })?;
        let dims = f.info(gg).map(|(_, d)| d.to_vec()).unwrap_or_default();
        Ok((f.dequantize(gg)?, dims))
    }

    /// The Conv3d weight `[out, channels, temporal, p, p]` from its temporal halves.
    fn patch_embed(&self) -> Result<(Vec<f32>, Vec<usize>)> {
        let m = self.file(Part::Mmproj)?;
        let t = self.cfg.vision.temporal_patch_size;
        let halves = (0..t)
            .map(|k| {
                let name = names::patch_half(k);
                let dims = m.info(&name).map(|(_, d)| d.to_vec()).unwrap_or_default();
                Ok((m.dequantize(&name)?, dims))
            })
            .collect::<Result<Vec<_>>>()?;
        let dims = halves[0].1.clone();
        if let Some((_, d)) = halves.iter().find(|h| h.1 != dims) {
            return Err(m.bad(format!(
                "the patch embedding's halves differ in shape: {dims:?} and {d:?}"
            )));
        }
        let [d, c, p, q] = dims[..] else {
            return Err(m.bad(format!(
                "tensor {} has shape {dims:?}, expected 4-D",
                names::patch_half(0)
            )));
        };
        let plane = p * q;
        let mut out = Vec::with_capacity(d * c * t * plane);
        for oc in 0..d * c {
            for (v, _) in &halves {
                out.extend_from_slice(&v[oc * plane..(oc + 1) * plane]);
            }
        }
        Ok((out, vec![d, c, t, p, q]))
    }

    /// The type HF tensor `hf` is stored in (the patch embedding: its first half's).
    pub fn dtype(&self, hf: &str) -> Option<GgmlDType> {
        if hf == names::patch_embed() {
            return Some(self.mmproj.as_ref()?.info(&names::patch_half(0))?.0);
        }
        let (f, gg) = self.locate(hf)?;
        Some(f.info(gg)?.0)
    }

    /// The tensor the LM head reads: `output` when the file has one, else the embedding.
    pub fn head_name(&self) -> &'static str {
        match self.cfg.tie_word_embeddings {
            true => EMBED,
            false => LM_HEAD,
        }
    }

    /// The coarsest type among the decoder's linears and the head: which thresholds
    /// hold this model (`q8_0`, `q4_k`, `f16`, ...).
    pub fn mode(&self) -> &'static str {
        let head = self.head_name();
        let leaves = q3vl_model::layout::text_linears(&self.cfg);
        let linear = |hf: &str| hf == head || leaves.iter().any(|(leaf, _)| hf.ends_with(leaf));
        self.coarsest(linear).unwrap_or("f32")
    }

    /// The coarsest type among the projector's linears (None without a projector):
    /// which thresholds hold the vision tower.
    pub fn vision_mode(&self) -> Option<&'static str> {
        self.mmproj.as_ref()?;
        let linear = |hf: &str| {
            hf.starts_with(q3vl_model::layout::VISUAL)
                && hf.ends_with(".weight")
                && !hf.contains("norm")
                && !hf.contains("pos_embed")
        };
        self.coarsest(linear)
    }

    /// The coarsest type among the tensors `pick` selects.
    fn coarsest(&self, pick: impl Fn(&str) -> bool) -> Option<&'static str> {
        self.names
            .keys()
            .filter(|hf| pick(hf))
            .filter_map(|hf| self.dtype(hf))
            .max_by_key(|t| coarseness(*t))
            .map(type_name)
    }
}

/// How coarsely a type rounds, as a rank: by bits per weight, and among types of as many
/// bits the one with the larger step (bf16 over f16) ranks coarser, so a file mixing
/// them is held to the looser thresholds.
fn coarseness(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::BF16 => 2,
        GgmlDType::Q8K => 3,
        GgmlDType::Q8_0 => 4,
        GgmlDType::Q8_1 => 5,
        GgmlDType::Q6K => 6,
        GgmlDType::Q5K => 7,
        GgmlDType::Q5_1 => 8,
        GgmlDType::Q5_0 => 9,
        GgmlDType::Q4K => 10,
        GgmlDType::Q4_1 => 11,
        GgmlDType::Q4_0 => 12,
        GgmlDType::Q3K => 13,
        GgmlDType::Q2K => 14,
    }
}

/// llama.cpp's lowercase name of a type (`q8_0`, `q4_k`, `bf16`).
pub fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q8K => "q8_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q2K => "q2_k",
    }
}
