//! The fp32 ladder on the committed fixtures: every gate passes on the original
//! weights, and a perturbed layer fails the ladder at that layer and nowhere earlier.

use candle_core::Tensor;
use q3vl_model::prompt::PromptBuilder;
use q3vl_model::{Checkpoint, PreprocessorConfig, Qwen3VlConfig, WeightSource};
use q3vl_verify::{verify_trace, Gates, OracleTrace, Profile, Subject, TraceReport};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures")
        .join(name)
}

/// Scales one tensor of a checkpoint, as a broken conversion or kernel would.
struct Perturbed<'a> {
    inner: &'a Checkpoint,
    name: String,
    factor: f64,
}

impl WeightSource for Perturbed<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> q3vl_model::Result<Tensor> {
        let t = self.inner.tensor(name, shape)?;
        Ok(if name == self.name {
            (t * self.factor)?
        } else {
            t
        })
    }
    fn rows(&self, name: &str, shape: [usize; 2], ids: &[u32]) -> q3vl_model::Result<Tensor> {
        let t = WeightSource::rows(self.inner, name, shape, ids)?;
        Ok(if name == self.name {
            (t * self.factor)?
        } else {
            t
        })
    }
    fn contains(&self, name: &str) -> bool {
        WeightSource::contains(self.inner, name)
    }
    fn head_name(&self, cfg: &Qwen3VlConfig) -> &'static str {
        self.inner.head_name(cfg)
    }
}

fn ladder(fx: &str, trace: &str, src: Option<(&str, f64)>) -> TraceReport {
    let dir = fixture(fx);
    let cfg = Qwen3VlConfig::from_dir(&dir).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let prompt = PromptBuilder::from_dir(&dir, &cfg).unwrap();
    let pre = PreprocessorConfig::from_dir(&dir).unwrap();
    let perturbed;
    let source: &dyn WeightSource = match src {
        Some((name, factor)) => {
            perturbed = Perturbed {
                inner: &ck,
                name: name.into(),
                factor,
            };
            &perturbed
        }
        None => &ck,
    };
    let subject = Subject {
        cfg: &cfg,
        src: source,
        prompt: &prompt,
        preprocessor: &pre,
        keep_weights: true,
        engine: None,
        vision_mode: None,
        mode: None,
        rounding: None,
    };
    let t = OracleTrace::open(&dir.join("traces").join(trace)).unwrap();
    verify_trace(&subject, &t, &Gates::builtin(), Profile::Fp32).unwrap()
}

fn fixtures() -> Vec<&'static str> {
    ["shapes", "tied", "odd"]
        .into_iter()
        .filter(|f| fixture(f).join("traces").exists())
        .collect()
}

#[test]
fn every_fixture_trace_passes_the_fp32_ladder() {
    let fx = fixtures();
    assert!(fx.contains(&"tied"), "fixtures/tied is committed");
    for f in fx {
        for trace in ["image.safetensors", "text.safetensors"] {
            let r = ladder(f, trace, None);
            let failed: Vec<_> = r.gates.iter().filter(|g| !g.passed).collect();
            assert!(failed.is_empty(), "{f}/{trace}: {failed:#?}");
            let worst = r
                .rows
                .iter()
                .filter(|r| r.gated)
                .map(|r| r.cos)
                .fold(1.0, f64::min);
            eprintln!("{f}/{trace}: worst gated cosine {worst:.9}");
        }
    }
}

/// The first failing row of `r` is `row`, and the gate `gate` fails.
fn fails_first_at(r: &TraceReport, row: &str, gate: &str) {
    let first_bad = r.rows.iter().find(|row| !row.passed).expect("a row fails");
    assert_eq!(first_bad.name, row);
    assert!(!r.gates.iter().find(|g| g.name == gate).unwrap().passed);
}

#[test]
fn a_perturbed_decoder_layer_fails_there_and_nowhere_earlier() {
    let name = "model.language_model.layers.2.mlp.down_proj.weight";
    let r = ladder("tied", "text.safetensors", Some((name, 1.5)));
    fails_first_at(&r, "text.layer.2", "text.ladder");
}

#[test]
fn a_perturbed_vit_block_fails_there_and_nowhere_earlier() {
    let name = "model.visual.blocks.3.attn.proj.weight";
    let r = ladder("tied", "image.safetensors", Some((name, 1.5)));
    fails_first_at(&r, "vision.block.3", "vision.ladder");
}
