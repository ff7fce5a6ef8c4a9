//! `metadata.json`: what a bundle holds, how each tensor class is stored, where the
//! weights came from, who made them, and the size and sha256 of every other file.
//!
//! Every map is a `BTreeMap` and no field holds a time, so the same input always
//! serializes to the same bytes.

use crate::error::BundleError;
use crate::names::METADATA_FILE;
use q3vl_model::layout::TensorClass;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The `format` tag of every bundle's `metadata.json`.
pub const FORMAT_TAG: &str = "q3vl-bundle";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Columns per quantization block: an int8 weight `[out, in]` carries one f16 scale
/// per row per `BLOCK` columns (`NAME.scales` is `[out, in / BLOCK]`;
/// `docs/quantization.md`).
pub const BLOCK: usize = 32;

/// Which half of the model a bundle holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The decoder: embedding, layers, final norm, head, tokenizer.
    Language,
    /// The vision tower with its mergers and preprocessing settings.
    Vision,
}

/// A conversion mode (`docs/quantization.md`, "Modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// int8 body ("clip") and int8 head ("absmax"); the shipped mode.
    Int8hu,
    /// int8 body ("clip"), f16 head (tied heads stay tied).
    Int8lin,
    /// Everything f16 (vectors and the vision position table f32).
    Fp16,
}

impl Mode {
    /// Every mode, default first.
    pub const ALL: [Mode; 3] = [Mode::Int8hu, Mode::Int8lin, Mode::Fp16];

    /// The spelling used in folder names and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Int8hu => "int8hu",
            Mode::Int8lin => "int8lin",
            Mode::Fp16 => "fp16",
        }
    }

    /// Parses `int8hu`, `int8lin` or `fp16`.
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// How this mode stores a tensor of `class` (before any f16 fallback).
    pub fn scheme(self, class: TensorClass) -> Scheme {
        match (class, self) {
            (TensorClass::TextLinear, Mode::Int8hu | Mode::Int8lin) => Scheme::Int8Clip,
            (TensorClass::Head, Mode::Int8hu) => Scheme::Int8AbsMax,
            (TensorClass::Vector | TensorClass::VisionPosEmbed, _) => Scheme::F32,
            _ => Scheme::F16,
        }
    }

    /// Whether the head is stored as its own tensor even when the source ties it to
    /// the embedding (only `int8hu`, which quantizes a copy of the table).
    pub fn unties_head(self) -> bool {
        self == Mode::Int8hu
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scheme {
    /// int8 per row per 32 columns, scale `amax/127`, q in [-127, 127].
    #[serde(rename = "int8-block32-clip")]
    Int8Clip,
    /// int8 per row per 32 columns, scale `amax/127.5`, q in [-128, 127].
    #[serde(rename = "int8-block32-absmax")]
    Int8AbsMax,
    /// IEEE half precision.
    #[serde(rename = "f16")]
    F16,
    /// Single precision (exact from bf16).
    #[serde(rename = "f32")]
    F32,
}

impl Scheme {
    /// The metadata spelling (`"int8-block32-clip"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Int8Clip => "int8-block32-clip",
            Scheme::Int8AbsMax => "int8-block32-absmax",
            Scheme::F16 => "f16",
            Scheme::F32 => "f32",
        }
    }

    /// Whether the tensor is stored as int8 values plus `NAME.scales`.
    pub fn is_quantized(self) -> bool {
        matches!(self, Scheme::Int8Clip | Scheme::Int8AbsMax)
    }

    /// The stored dtype of the tensor itself (its scales are F16).
    pub fn dtype(self) -> crate::Dtype {
        match self {
            Scheme::Int8Clip | Scheme::Int8AbsMax => crate::Dtype::I8,
            Scheme::F16 => crate::Dtype::F16,
            Scheme::F32 => crate::Dtype::F32,
        }
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Size and sha256 of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Lower-case hex sha256 of the whole file.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// One logical tensor of the bundle (a quantized weight's `.scales` is not listed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Its role (`TensorClass::as_str`: `text_linear`, `head`, ...).
    pub class: String,
    /// How it is stored.
    pub scheme: Scheme,
    /// The source tensor it was made from, when that is not the same name
    /// (the untied int8 head of a tied checkpoint comes from the embedding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Which tensor is the LM head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadInfo {
    /// The bundle tensor to multiply the final hidden state with: `lm_head.weight`,
    /// or the embedding table when a tied source was converted without untying.
    pub tensor: String,
    /// Whether the source checkpoint ties the head to the embedding.
    pub tied_in_source: bool,
}

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Source {
    /// The Hugging Face repo id, when fetched from the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_id: Option<String>,
    /// The commit sha of that repo, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The source folder's name (not its full path, which would make bundles differ
    /// between machines).
    pub folder: String,
    /// Size and sha256 of every source file the conversion read.
    pub files: BTreeMap<String, FileEntry>,
}

/// The program that wrote the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Producer {
    /// Program name (`q3vl`).
    pub name: String,
    /// Its version.
    pub version: String,
    /// The git commit it was built from (`unknown` outside a checkout).
    pub commit: String,
}

/// The fixed 448×448 grid the vision bundle is exported for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixedGrid {
    /// Image height in pixels after resizing.
    pub height: usize,
    /// Image width in pixels after resizing.
    pub width: usize,
    /// (t, h, w) in patches.
    pub grid_thw: [usize; 3],
    /// Patch rows fed to the tower (t·h·w).
    pub patches: usize,
    /// Values per patch row (C·T·P·P).
    pub patch_dim: usize,
    /// Merged tokens out of the tower: (448 / patch / merge)².
    pub tokens: usize,
}

/// Image preprocessing, for the host that feeds the vision bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// Per-channel mean.
    pub image_mean: [f32; 3],
    /// Per-channel std.
    pub image_std: [f32; 3],
    /// Pixel rescale factor (1/255).
    pub rescale_factor: f64,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Frames per temporal patch.
    pub temporal_patch_size: usize,
    /// Patches merged per side into one token.
    pub merge_size: usize,
    /// Smallest pixel count of dynamic resizing.
    pub min_pixels: usize,
    /// Largest pixel count of dynamic resizing.
    pub max_pixels: usize,
    /// The fixed grid.
    pub fixed_grid: FixedGrid,
    /// ViT blocks whose outputs feed the DeepStack mergers.
    pub deepstack_visual_indexes: Vec<usize>,
    /// Width of the merged tokens (the text hidden size).
    pub out_hidden_size: usize,
}

/// The contents of `metadata.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Always [`FORMAT_TAG`].
    pub format: String,
    /// Always [`FORMAT_VERSION`] for bundles this build writes.
    pub format_version: u32,
    /// Language or vision.
    pub kind: Kind,
    /// The bundle's folder name.
    pub name: String,
    /// The conversion mode (language bundles; the vision bundle is the same in every mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// The other bundle of the pair, a sibling folder (the language bundle names its vision bundle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub companion: Option<String>,
    /// The sha256 of the companion's `metadata.json` (which lists the sha256 of every
    /// companion file): binds the pair, so a vision bundle from another conversion is
    /// refused by [`crate::Bundles::open`] instead of being run with this decoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub companion_sha256: Option<String>,
    /// The scheme of every tensor class present (class name → scheme), before fallbacks.
    pub schemes: BTreeMap<String, Scheme>,
    /// The LM head (language bundles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadInfo>,
    /// Every logical tensor.
    pub tensors: BTreeMap<String, TensorMeta>,
    /// Tensors kept f16 instead of int8, with the reason.
    #[serde(default)]
    pub fallbacks: BTreeMap<String, String>,
    /// Per tensor stored f16: how many nonzero values became subnormal or zero.
    #[serde(default)]
    pub f16_underflow: BTreeMap<String, u64>,
    /// Per quantized tensor: how many blocks with a nonzero maximum got a zero f16 scale.
    #[serde(default)]
    pub scale_underflow: BTreeMap<String, u64>,
    /// Source tensors deliberately not converted (a tied checkpoint's redundant head).
    #[serde(default)]
    pub ignored_source_tensors: Vec<String>,
    /// Image preprocessing (vision bundles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessing: Option<Preprocessing>,
    /// Where the weights came from.
    pub source: Source,
    /// Who wrote the bundle.
    pub producer: Producer,
    /// Size and sha256 of every file of the bundle except `metadata.json` itself
    /// (and the verifier's later `verification.json`), keyed by `/`-separated path.
    pub files: BTreeMap<String, FileEntry>,
}

impl Metadata {
    /// An empty metadata record of `kind` named `name`, to be filled by the converter.
    pub fn new(kind: Kind, name: &str) -> Self {
        Metadata {
            format: FORMAT_TAG.into(),
            format_version: FORMAT_VERSION,
            kind,
            name: name.into(),
            mode: None,
            companion: None,
            companion_sha256: None,
            schemes: BTreeMap::new(),
            head: None,
            tensors: BTreeMap::new(),
            fallbacks: BTreeMap::new(),
            f16_underflow: BTreeMap::new(),
            scale_underflow: BTreeMap::new(),
            ignored_source_tensors: Vec::new(),
            preprocessing: None,
            source: Source::default(),
            producer: Producer::default(),
            files: BTreeMap::new(),
        }
    }

    /// Reads and checks `DIR/metadata.json` (format tag and version).
    pub fn read(dir: &Path) -> Result<Self, BundleError> {
        let path = dir.join(METADATA_FILE);
        let text = q3vl_model::input::read_regular(&path).map_err(|e| BundleError::io(&path, e))?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| BundleError::json(&path, format!("not valid JSON: {e}")))?;
        match v.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT_TAG) => {}
            other => {
                return Err(BundleError::Format {
                    path,
                    msg: format!("format is {other:?}, not {FORMAT_TAG:?}: not a q3vl bundle"),
                })
            }
        }
        match v.get("format_version").and_then(|f| f.as_u64()) {
            Some(x) if x == FORMAT_VERSION as u64 => {}
            other => {
                return Err(BundleError::Format {
                    path,
                    msg: format!(
                    "format_version {other:?} is not supported (this build reads {FORMAT_VERSION})"
                ),
                })
            }
        }
        let m: Metadata =
            serde_json::from_value(v).map_err(|e| BundleError::json(&path, e.to_string()))?;
        m.check_paths()
            .map_err(|msg| BundleError::json(path, msg))?;
        Ok(m)
    }

    /// Every file it lists is inside the bundle, and its companion is a sibling folder:
    /// a reader joins these names to the bundle's folder, so `../x` or an absolute
    /// path would make it read (or hash) a file elsewhere.
    fn check_paths(&self) -> Result<(), String> {
        use q3vl_model::input::{is_inner_path, is_plain_name};
        if let Some(f) = self.files.keys().find(|f| !is_inner_path(f)) {
            return Err(format!("files lists {f:?}, not a path inside the bundle"));
        }
        match &self.companion {
            Some(c) if !is_plain_name(c) => Err(format!(
                "companion {c:?} is not the name of a sibling folder"
            )),
            _ => Ok(()),
        }
    }

    /// The canonical bytes of `metadata.json`: pretty-printed, sorted maps, a final newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("metadata serializes");
        b.push(b'\n');
        b
    }

    /// Records the scheme of `class`.
    pub fn set_scheme(&mut self, class: TensorClass, scheme: Scheme) {
        self.schemes.insert(class.as_str().into(), scheme);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_schemes_follow_the_spec() {
        use TensorClass::*;
        assert_eq!(Mode::Int8hu.scheme(TextLinear), Scheme::Int8Clip);
        assert_eq!(Mode::Int8hu.scheme(Head), Scheme::Int8AbsMax);
        assert_eq!(Mode::Int8lin.scheme(Head), Scheme::F16);
        assert_eq!(Mode::Fp16.scheme(TextLinear), Scheme::F16);
        for m in Mode::ALL {
            assert_eq!(m.scheme(Embedding), Scheme::F16);
            assert_eq!(m.scheme(Vector), Scheme::F32);
            assert_eq!(m.scheme(VisionPosEmbed), Scheme::F32);
            assert_eq!(m.scheme(Vision), Scheme::F16);
            assert_eq!(Mode::parse(m.as_str()), Some(m));
        }
        assert_eq!(
            serde_json::to_string(&Scheme::Int8AbsMax).unwrap(),
            "\"int8-block32-absmax\""
        );
    }

    #[test]
    fn metadata_round_trips_and_rejects_other_formats() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Metadata::new(Kind::Language, "x_decode_int8hu");
        m.mode = Some(Mode::Int8hu);
        m.set_scheme(TensorClass::Head, Scheme::Int8AbsMax);
        std::fs::write(dir.path().join(METADATA_FILE), m.to_bytes()).unwrap();
        assert_eq!(Metadata::read(dir.path()).unwrap(), m);
        let mut v: serde_json::Value = serde_json::from_slice(&m.to_bytes()).unwrap();
        v["format_version"] = 2.into();
        std::fs::write(dir.path().join(METADATA_FILE), v.to_string()).unwrap();
        let e = Metadata::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("format_version") && e.contains("metadata.json"),
            "{e}"
        );
        std::fs::write(dir.path().join(METADATA_FILE), "{\"format\": \"gguf\"}").unwrap();
        let e = Metadata::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a q3vl bundle"), "{e}");
    }

    #[test]
    fn listed_paths_stay_inside_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let entry = FileEntry {
            sha256: "0".repeat(64),
            size: 1,
        };
        for (file, companion) in [
            ("../../etc/passwd", None),
            ("/etc/passwd", None),
            ("model.safetensors", Some("../elsewhere")),
            ("model.safetensors", Some("/tmp/v")),
        ] {
            let mut m = Metadata::new(Kind::Language, "x");
            m.files.insert(file.into(), entry.clone());
            m.companion = companion.map(str::to_string);
            std::fs::write(dir.path().join(METADATA_FILE), m.to_bytes()).unwrap();
            let e = Metadata::read(dir.path()).unwrap_err().to_string();
            let culprit = companion.unwrap_or(file);
            assert!(e.contains("metadata.json") && e.contains(culprit), "{e}");
        }
        let mut m = Metadata::new(Kind::Language, "x");
        m.files.insert("tokenizer/tokenizer.json".into(), entry);
        m.companion = Some("x_vision".into());
        std::fs::write(dir.path().join(METADATA_FILE), m.to_bytes()).unwrap();
        assert_eq!(Metadata::read(dir.path()).unwrap(), m);
    }
}
