//! What a conversion writes: every bundle tensor, where it comes from, which bundle it
//! goes to and how it is stored, decided from the config and the mode alone, before
//! any value is read.

use crate::error::{ConvertError, Result};
use crate::quantize::BLOCK;
use q3vl_bundle::names::scales_name;
use q3vl_bundle::{Dtype, HeadInfo, Mode, Scheme, TensorPlan};
use q3vl_model::layout::{self, TensorClass, EMBED, LM_HEAD};
use q3vl_model::Qwen3VlConfig;

/// Which bundle a tensor goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The language bundle.
    Language,
    /// The vision bundle.
    Vision,
}

/// One tensor of the output.
#[derive(Debug, Clone, PartialEq)]
pub struct OutTensor {
    /// Its name in the bundle (the HF name).
    pub name: String,
    /// The source tensor its values come from (the embedding for an untied copy of a
    /// tied head).
    pub source: String,
    /// Its role.
    pub class: TensorClass,
    /// How it is stored (after any fallback).
    pub scheme: Scheme,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its bundle.
    pub part: Part,
    /// Why it is f16 although its class is int8 in this mode.
    pub fallback: Option<String>,
}

impl OutTensor {
    /// The stored tensors: the tensor itself, plus `NAME.scales` when quantized.
    pub fn stored(&self) -> Vec<TensorPlan> {
        let mut v = vec![TensorPlan::new(
            &self.name,
            self.scheme.dtype(),
            self.shape.clone(),
        )];
        if self.scheme.is_quantized() {
            v.push(TensorPlan::new(
                scales_name(&self.name),
                Dtype::F16,
                vec![self.shape[0], self.shape[1] / BLOCK],
            ));
        }
        v
    }

    /// Rows and columns as the converter walks it: the first axis, and everything else.
    /// A vector is one row.
    pub fn rows_cols(&self) -> (usize, usize) {
        if self.shape.len() <= 1 {
            (1, self.shape.iter().product())
        } else {
            (self.shape[0], self.shape[1..].iter().product())
        }
    }
}

/// The whole output of one conversion.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Every output tensor, language then vision, in layout order.
    pub tensors: Vec<OutTensor>,
    /// The LM head.
    pub head: HeadInfo,
    /// Source tensors deliberately not converted.
    pub ignored: Vec<String>,
}

impl Plan {
    /// The tensors of one bundle.
    pub fn part(&self, part: Part) -> impl Iterator<Item = &OutTensor> {
        self.tensors.iter().filter(move |t| t.part == part)
    }
}

/// Plans a conversion of a checkpoint with `cfg` in `mode`. `source_has_head` says
/// whether the checkpoint stores `lm_head.weight` (a tied one may, redundantly).
/// With `fallback_f16`, an int8 tensor whose in-features are not a multiple of 32 is
/// kept f16 and recorded; without it, that is an error naming the tensor.
pub fn plan(
    cfg: &Qwen3VlConfig,
    mode: Mode,
    fallback_f16: bool,
    source_has_head: bool,
) -> Result<Plan> {
    let tied = cfg.tie_word_embeddings;
    let mut tensors = Vec::new();
    let mut add = |spec: layout::TensorSpec, source: String, part: Part| -> Result<()> {
        let mut scheme = mode.scheme(spec.class);
        let mut fallback = None;
        if scheme.is_quantized() {
            let cols = if spec.shape.len() == 2 {
                spec.shape[1]
            } else {
                0
            };
            if cols == 0 || cols % BLOCK != 0 {
                if !fallback_f16 {
                    return Err(ConvertError::NotMultipleOf32 {
                        name: spec.name.clone(),
                        cols,
                    });
                }
                scheme = Scheme::F16;
                fallback = Some(format!(
                    "in-features {cols} is not a multiple of 32; kept f16 (--fallback-f16)"
                ));
            }
        }
        tensors.push(OutTensor {
            name: spec.name,
            source,
            class: spec.class,
            scheme,
            shape: spec.shape,
            part,
            fallback,
        });
        Ok(())
    };
    for spec in layout::text_tensors(cfg, false) {
        let src = spec.name.clone();
        add(spec, src, Part::Language)?;
    }
    if tied && mode.unties_head() {
        let t = &cfg.text;
        let spec = layout::TensorSpec {
            name: LM_HEAD.into(),
            shape: vec![t.vocab_size, t.hidden_size],
            class: TensorClass::Head,
        };
        add(spec, EMBED.into(), Part::Language)?;
    }
    for spec in layout::vision_tensors(cfg) {
        let src = spec.name.clone();
        add(spec, src, Part::Vision)?;
    }
    let head = HeadInfo {
        tensor: if tied && !mode.unties_head() {
            EMBED.into()
        } else {
            LM_HEAD.into()
        },
        tied_in_source: tied,
    };
    let ignored = if tied && source_has_head {
        vec![LM_HEAD.to_string()]
    } else {
        vec![]
    };
    Ok(Plan {
        tensors,
        head,
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use q3vl_model::Size;

    #[test]
    fn tied_heads_follow_the_mode() {
        let cfg = Qwen3VlConfig::preset(Size::B2);
        let p = plan(&cfg, Mode::Int8hu, false, false).unwrap();
        let head = p.tensors.iter().find(|t| t.name == LM_HEAD).unwrap();
        assert_eq!(
            (head.source.as_str(), head.scheme),
            (EMBED, Scheme::Int8AbsMax)
        );
        assert_eq!(p.head.tensor, LM_HEAD);
        for mode in [Mode::Int8lin, Mode::Fp16] {
            let p = plan(&cfg, mode, false, true).unwrap();
            assert!(p.tensors.iter().all(|t| t.name != LM_HEAD));
            assert_eq!(p.head.tensor, EMBED);
            assert_eq!(p.ignored, vec![LM_HEAD.to_string()]);
        }
        let cfg = Qwen3VlConfig::preset(Size::B8);
        let p = plan(&cfg, Mode::Int8lin, false, true).unwrap();
        let head = p.tensors.iter().find(|t| t.name == LM_HEAD).unwrap();
        assert_eq!((head.source.as_str(), head.scheme), (LM_HEAD, Scheme::F16));
        assert!(p.ignored.is_empty());
    }

    #[test]
    fn schemes_and_parts() {
        let cfg = Qwen3VlConfig::preset(Size::B8);
        let p = plan(&cfg, Mode::Int8hu, false, true).unwrap();
        for t in &p.tensors {
            let want_part = if t.name.starts_with(layout::VISUAL) {
                Part::Vision
            } else {
                Part::Language
            };
            assert_eq!(t.part, want_part, "{}", t.name);
            assert_eq!(t.scheme, Mode::Int8hu.scheme(t.class), "{}", t.name);
        }
        let q = p
            .tensors
            .iter()
            .find(|t| t.class == TensorClass::TextLinear)
            .unwrap();
        let stored = q.stored();
        assert_eq!(stored[1].name, format!("{}.scales", q.name));
        assert_eq!(stored[1].shape, vec![q.shape[0], q.shape[1] / 32]);
    }

    #[test]
    fn odd_in_features_need_the_fallback() {
        let mut cfg = Qwen3VlConfig::preset(Size::B2);
        cfg.text.intermediate_size = 6100;
        let e = plan(&cfg, Mode::Int8hu, false, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mlp.down_proj.weight")
                && e.contains("6100")
                && e.contains("--fallback-f16"),
            "{e}"
        );
        let p = plan(&cfg, Mode::Int8hu, true, false).unwrap();
        let down: Vec<_> = p
            .tensors
            .iter()
            .filter(|t| t.name.ends_with("down_proj.weight"))
            .collect();
        assert!(down
            .iter()
            .all(|t| t.scheme == Scheme::F16 && t.fallback.is_some()));
        // fp16 never quantizes, so nothing falls back.
        assert!(plan(&cfg, Mode::Fp16, false, false)
            .unwrap()
            .tensors
            .iter()
            .all(|t| t.fallback.is_none()));
    }
}
