//! What the ladder observes: named intermediate tensors, under the oracle trace's
//! names (`vision.block.3`, `text.layer.0`, `text.norm`, ...).

use candle_core::Tensor;
use std::collections::BTreeMap;

/// A recorder of intermediate tensors; a disabled one records nothing (decode steps).
#[derive(Debug, Default)]
pub struct Taps {
    enabled: bool,
    map: BTreeMap<String, Tensor>,
}

impl Taps {
    /// A recorder that keeps what it is shown.
    pub fn recording() -> Self {
        Taps {
            enabled: true,
            map: BTreeMap::new(),
        }
    }

    /// A recorder that drops everything.
    pub fn off() -> Self {
        Taps::default()
    }

    /// Records `t` under `name` (tensors are reference-counted: no copy).
    pub fn put(&mut self, name: impl Into<String>, t: &Tensor) {
        if self.enabled {
            self.map.insert(name.into(), t.clone());
        }
    }

    /// A recorded tensor.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    /// Every recorded name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Takes the recorded tensors.
    pub fn into_map(self) -> BTreeMap<String, Tensor> {
        self.map
    }
}

/// Trace name of ViT block `j`'s output.
pub fn vision_block(j: usize) -> String {
    format!("vision.block.{j}")
}

/// Trace name of DeepStack merger `k`'s output.
pub fn vision_deepstack(k: usize) -> String {
    format!("vision.deepstack.{k}")
}

/// Trace name of decoder layer `i`'s output (before any DeepStack addition).
pub fn text_layer(i: usize) -> String {
    format!("text.layer.{i}")
}

/// Decoder layer `i` run once more on the oracle's own input to it (the verifier's
/// local replay): its error is the layer's own, with nothing accumulated upstream.
pub fn text_layer_local(i: usize) -> String {
    format!("text.layer.{i}.local")
}

/// Patch embedding + position embedding (input of ViT block 0).
pub const VISION_EMBED: &str = "vision.embed";
/// Main merger output.
pub const VISION_MERGER: &str = "vision.merger";
/// Input of decoder layer 0.
pub const TEXT_EMBED: &str = "text.embed";
/// Final RMSNorm output.
pub const TEXT_NORM: &str = "text.norm";
/// Prompt logits.
pub const LOGITS: &str = "logits";
