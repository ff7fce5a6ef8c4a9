//! [`Engine`]: both bundles opened and checked, the vision tower, the decoder, and
//! generation with greedy or seeded sampling.

use crate::awake::install_awake;
use crate::decoder::{Rows, TextModel};
use crate::error::{check_logits, EngineError, Result};
use crate::images::PromptImages;
use crate::kv_cache::KvCache;
use crate::positions::{map_image_ids, ImageSpan};
use crate::vision::{EncodedImage, VisionModel};
use q3vl_bundle::{Bundle, Bundles};
use q3vl_model::image::{PatchedImage, Resize};
use q3vl_model::prompt::PromptBuilder;
use q3vl_model::{PreprocessorConfig, Qwen3VlConfig};
use std::path::Path;
use std::sync::Arc;

/// How to open the engine.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Worker threads (None: all cores). Results do not depend on it.
    pub threads: Option<usize>,
    /// Check every file's sha256 against `metadata.json` at open (reads everything).
    pub verify_checksums: bool,
    /// Largest conversation (prompt + new tokens) accepted; None: the model's
    /// `max_position_embeddings`.
    pub context: Option<usize>,
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// 0 (or less): greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// PRNG seed for sampling.
    pub seed: u64,
    /// Keep going past eos (exactly `max_new_tokens` tokens).
    pub ignore_eos: bool,
    /// Return the logits that chose each token.
    pub keep_logits: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            ignore_eos: false,
            keep_logits: false,
        }
    }
}

/// Wall-clock timings of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens taken from a cached earlier prompt instead of run again.
    pub cached_tokens: usize,
    /// Prefill (all prompt tokens at once, plus the first token's logits).
    pub prefill_ms: f64,
    /// Decode steps after the first token.
    pub decode_ms: f64,
    /// Decode steps run.
    pub decode_steps: usize,
    /// Prompt tokens per second of prefill.
    pub prefill_tok_s: f64,
    /// Decode steps per second.
    pub decode_tok_s: f64,
}

/// What [`Engine::generate`] produced.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids; a stopping eos is not included.
    pub tokens: Vec<u32>,
    /// With `keep_logits`: the logits that chose each token of `tokens`.
    pub step_logits: Vec<Vec<f32>>,
    /// Whether generation stopped at an eos id.
    pub stopped_at_eos: bool,
    /// Timings.
    pub timings: Timings,
}

impl Timings {
    /// The rates, from the token counts and times.
    pub(crate) fn set_rates(&mut self) {
        let run = self.prompt_tokens - self.cached_tokens;
        self.prefill_tok_s = run as f64 / (self.prefill_ms / 1e3).max(1e-9);
        self.decode_tok_s = self.decode_steps as f64 / (self.decode_ms / 1e3).max(1e-9);
    }
}

/// Whether a forward pass reads tensor `name` in full: every tensor but the token
/// embedding table, unless it is also the head (or no head is recorded). A pass reads
/// only its prompt's embedding rows; paging in all of the table (1.2 GB at 8B) would
/// grow the resident set for nothing.
fn read_whole(name: &str, head: Option<&str>) -> bool {
    name != q3vl_model::layout::EMBED || head.is_none_or(|h| h == name)
}

/// The runtime engine over one language + vision bundle pair.
pub struct Engine {
    bundles: Bundles,
    pub(crate) text: TextModel,
    vision: VisionModel,
    eos: Vec<u32>,
    context: usize,
    pool: rayon::ThreadPool,
    threads: usize,
    /// Bytes of the language bundle paged in at open.
    paged_bytes: usize,
    /// The vision tower's bytes, paged in at its first use (a text-only run never
    /// reads it).
    vision_paged: std::sync::OnceLock<usize>,
}

impl Engine {
    /// Opens the bundles in `out_dir` (a conversion's output folder or a language
    /// bundle folder), checks sizes (and with `verify_checksums` every sha256), that
    /// the vision bundle fits the language bundle, and every tensor's shape and dtype;
    /// then pages in the language weights a forward pass reads whole, in file order
    /// ([`q3vl_bundle::Bundle::populate`]).
    pub fn open(out_dir: &Path, opts: &EngineOptions) -> Result<Engine> {
        let bundles = Bundles::open(out_dir)?;
        if opts.verify_checksums {
            bundles.language.verify_checksums()?;
            bundles.vision.verify_checksums()?;
        }
        check_pair(&bundles.language, &bundles.vision)?;
        // Paged in now, in order, so the weights sit in 2 MiB folios (see
        // `Bundle::populate`); the first forward pass would page them in anyway.
        let head = bundles.language.head_tensor();
        let paged_bytes = bundles.language.populate(|n| read_whole(n, head));
        let text = TextModel::load(&bundles.language)?;
        let vision = VisionModel::load(&bundles.vision)?;
        let tok_dir = bundles.language.dir().join("tokenizer");
        let mut eos = q3vl_model::config::eos_ids(&tok_dir)?;
        if eos.is_empty() {
            eos = q3vl_model::config::eos_ids(bundles.language.dir())?;
        }
        let threads = opts
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|source| EngineError::ThreadPool { threads, source })?;
        let max_pos = text.config().max_position_embeddings;
        Ok(Engine {
            context: opts.context.unwrap_or(max_pos).min(max_pos),
            bundles,
            text,
            vision,
            eos,
            pool,
            threads,
            paged_bytes,
            vision_paged: std::sync::OnceLock::new(),
        })
    }

    /// Pages the vision tower in, in file order (as [`Engine::open`] does the language
    /// bundle), once per engine; [`Engine::encode_image`] calls it first. Returns the
    /// bytes it covers.
    pub fn page_in_vision(&self) -> usize {
        *self
            .vision_paged
            .get_or_init(|| self.bundles.vision.populate(|_| true))
    }

    /// Bytes of the language bundle [`Engine::open`] paged in: every tensor a forward
    /// pass reads whole.
    pub fn paged_bytes(&self) -> usize {
        self.paged_bytes
    }

    /// The language bundle.
    pub fn language(&self) -> &Bundle {
        &self.bundles.language
    }

    /// The vision bundle.
    pub fn vision_bundle(&self) -> &Bundle {
        &self.bundles.vision
    }

    /// The model config (of the language bundle).
    pub fn config(&self) -> &Qwen3VlConfig {
        self.bundles.language.config()
    }

    /// The largest conversation (prompt + new tokens) accepted, in tokens.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Worker threads in use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The stop ids (the bundle tokenizer's `generation_config.json`).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The chat template and tokenizer of `<language bundle>/tokenizer`.
    pub fn prompt_builder(&self) -> Result<PromptBuilder> {
        Ok(PromptBuilder::from_dir(
            &self.bundles.language.dir().join("tokenizer"),
            self.config(),
        )?)
    }

    /// The vision bundle's preprocessing parameters, checked against the tower: other
    /// patch, merge or temporal sizes would cut the image into rows the tower cannot
    /// read (an error naming neither file, or a fixed side that does not divide).
    pub fn preprocessor(&self) -> Result<PreprocessorConfig> {
        let dir = self.bundles.vision.dir();
        let file = dir.join("preprocessor_config.json");
        let pp = if file.exists() {
            PreprocessorConfig::from_dir(dir)?
        } else {
            PreprocessorConfig::default()
        };
        let v = &self.vision_bundle().config().vision;
        let found = (pp.patch_size, pp.merge_size, pp.temporal_patch_size);
        let want = (v.patch_size, v.spatial_merge_size, v.temporal_patch_size);
        if found != want {
            return Err(EngineError::Mismatch {
                path: file,
                msg: format!(
                    "patch/merge/temporal sizes {found:?} differ from the vision config's {want:?}"
                ),
            });
        }
        Ok(pp)
    }

    /// The default resize: the fixed side recorded in the vision bundle (448 → 196
    /// tokens), stretching the image.
    pub fn fixed_resize(&self) -> Resize {
        let side = self
            .bundles
            .vision
            .metadata()
            .preprocessing
            .as_ref()
            .map(|p| p.fixed_grid.height)
            .filter(|&s| s > 0)
            .unwrap_or(448);
        Resize::Fixed(side)
    }

    /// The image tokens a `width × height` image becomes (fixed grid unless
    /// `dynamic`), known before it is decoded.
    pub fn image_tokens(&self, width: usize, height: usize, dynamic: bool) -> Result<usize> {
        let pp = self.preprocessor()?;
        let factor = pp.patch_size * pp.merge_size;
        let mode = self.resize_mode(dynamic);
        let (h, w) = q3vl_model::image::target_size(height, width, &pp, mode)?;
        Ok((h / factor) * (w / factor))
    }

    /// `smart_resize` when `dynamic`, else the bundle's fixed grid.
    fn resize_mode(&self, dynamic: bool) -> Resize {
        if dynamic {
            Resize::Dynamic
        } else {
            self.fixed_resize()
        }
    }

    /// Preprocesses a decoded image (fixed grid unless `dynamic`).
    pub fn preprocess(&self, img: &q3vl_model::image::Rgb8, dynamic: bool) -> Result<PatchedImage> {
        let mode = self.resize_mode(dynamic);
        Ok(q3vl_model::image::preprocess(
            img,
            &self.preprocessor()?,
            mode,
        )?)
    }

    /// Vision tower on model-ready patch rows (from `model::image::preprocess` or an
    /// oracle trace): image embeddings and DeepStack features, computed once.
    pub fn encode_image(&self, pixel_values: &[f32], grid_thw: [usize; 3]) -> Result<EncodedImage> {
        self.page_in_vision();
        install_awake(&self.pool, || {
            self.vision
                .encode(&self.bundles.vision, pixel_values, grid_thw)
        })
    }

    /// Checks the prompt and the images' features against each other, maps the
    /// `<|image_pad|>` ids to `vocab + slot` and places each image.
    pub(crate) fn map_prompt(
        &self,
        ids: &[u32],
        images: &[Arc<EncodedImage>],
    ) -> Result<(Vec<u32>, PromptImages)> {
        let cfg = self.config();
        let tc = self.text.config();
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        for f in images {
            if f.hidden != tc.hidden_size || f.embeds.len() != f.tokens * f.hidden {
                return Err(EngineError::ImageWidth {
                    width: f.hidden,
                    hidden: tc.hidden_size,
                });
            }
        }
        let merge = self.vision.config().spatial_merge_size;
        let geom: Vec<_> = images
            .iter()
            .map(|f| {
                let (gh, gw) = f.merged_grid(merge);
                (f.tokens, gh, gw)
            })
            .collect();
        let (mapped, spans) = map_image_ids(ids, cfg.image_token_id, tc.vocab_size as u32, &geom)?;
        let features = images.to_vec();
        Ok((mapped, PromptImages { features, spans }))
    }

    /// The conversation's length (`prompt + new_tokens`), or
    /// [`EngineError::ContextOverflow`] when the context cannot hold it.
    pub(crate) fn check_context(&self, prompt: usize, new_tokens: usize) -> Result<usize> {
        // Saturating: new_tokens near usize::MAX must fail the check, not wrap.
        let need = prompt.saturating_add(new_tokens);
        if need > self.context {
            return Err(EngineError::ContextOverflow {
                prompt,
                new_tokens,
                context: self.context,
            });
        }
        Ok(need)
    }

    /// An empty KV cache for `positions` positions.
    pub(crate) fn new_cache(&self, positions: usize) -> KvCache {
        let tc = self.text.config();
        KvCache::new(
            tc.num_hidden_layers,
            tc.num_key_value_heads,
            tc.head_dim,
            positions,
        )
    }

    /// One forward pass of `ids` (in id space) after the cache, then the head:
    /// the logits of `rows` (`[rows, vocab]`), on the engine's pool.
    pub(crate) fn forward_logits(
        &self,
        ids: &[u32],
        images: &PromptImages,
        cache: &mut KvCache,
        rows: Rows,
    ) -> Result<Vec<f32>> {
        let b = &self.bundles.language;
        install_awake(&self.pool, || {
            let h = self.text.forward(b, ids, images, cache, rows)?;
            self.text.logits(b, &h)
        })
    }

    /// One forward pass of `ids` after the cache without the head (a prefill chunk
    /// that is not the prompt's last), on the engine's pool.
    pub(crate) fn forward_only(
        &self,
        ids: &[u32],
        images: &PromptImages,
        cache: &mut KvCache,
    ) -> Result<()> {
        let b = &self.bundles.language;
        install_awake(&self.pool, || {
            self.text
                .forward(b, ids, images, cache, Rows::Last)
                .map(drop)
        })
    }

    /// One decode step of several sequences ([`TextModel::forward_decode`]), then the
    /// head: `[n, vocab]` logits, on the engine's pool.
    pub(crate) fn forward_decode_logits(
        &self,
        ids: &[u32],
        caches: &mut [&mut KvCache],
        images: &[&[ImageSpan]],
    ) -> Result<Vec<f32>> {
        let b = &self.bundles.language;
        install_awake(&self.pool, || {
            let h = self.text.forward_decode(b, ids, caches, images)?;
            self.text.logits(b, &h)
        })
    }

    /// The logits at every prompt position (`[ids.len()][vocab]`): what the model
    /// predicts after each prefix, for scoring a text (perplexity) or checking a
    /// prompt position by position. One prefill pass; the last row equals the first
    /// step's logits of [`Engine::generate`] bit for bit.
    pub fn prompt_logits(
        &self,
        ids: &[u32],
        images: &[Arc<EncodedImage>],
    ) -> Result<Vec<Vec<f32>>> {
        let vocab = self.text.config().vocab_size;
        let (mapped, images) = self.map_prompt(ids, images)?;
        self.check_context(ids.len(), 0)?;
        let mut cache = self.new_cache(ids.len());
        let logits = self.forward_logits(&mapped, &images, &mut cache, Rows::All)?;
        check_logits(&logits, vocab, |r| format!("prompt position {r}"))?;
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// Greedy/sampled generation from prompt ids (HF ids, each image's `<|image_pad|>`
    /// expanded; the engine maps them to `vocab + slot` itself), the prompt's images
    /// being `images` in order. `on_token` sees each token as
    /// it is chosen (a stopping eos included). The steps of [`crate::sequence`], run to
    /// the end: the whole prompt in one prefill, then one decode step at a time.
    pub fn generate(
        &self,
        ids: &[u32],
        images: &[Arc<EncodedImage>],
        params: &GenerateParams,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation> {
        let mut seq = self.begin(ids, images, params, None)?;
        if let Some(first) = self.prefill(&mut seq, usize::MAX)? {
            on_token(first);
        }
        while seq.decoding() {
            let next = self.decode_step(&mut [&mut seq])?;
            on_token(next[0]);
        }
        Ok(seq.generation())
    }

    /// Bytes of KV cache a conversation of `positions` positions holds.
    pub fn kv_bytes(&self, positions: usize) -> usize {
        let tc = self.text.config();
        KvCache::bytes_per_position(tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim)
            * positions
    }

    /// Bytes one decode step reads: every linear and the head once, one embedding
    /// row, and the KV cache at `positions` (for the bandwidth bound).
    pub fn decode_bytes(&self, positions: usize) -> Result<u64> {
        let tc = self.text.config();
        let mut total = self.text.decode_weight_bytes(&self.bundles.language)?;
        total += 2 * tc.hidden_size as u64;
        let kv =
            KvCache::bytes_per_position(tc.num_hidden_layers, tc.num_key_value_heads, tc.head_dim);
        Ok(total + (kv * positions) as u64)
    }
}

/// The vision bundle must be this language bundle's companion and fit its decoder.
fn check_pair(lang: &Bundle, vision: &Bundle) -> Result<()> {
    let (l, v) = (lang.config(), vision.config());
    let mismatch = |msg: String| EngineError::Mismatch {
        path: vision.dir().to_path_buf(),
        msg,
    };
    if v.vision.out_hidden_size != l.text.hidden_size {
        return Err(mismatch(format!(
            "vision bundle out_hidden_size {} does not match the language bundle's hidden size {} ({})",
            v.vision.out_hidden_size,
            l.text.hidden_size,
            lang.dir().display()
        )));
    }
    if v.vision.deepstack_visual_indexes.len() > l.text.num_hidden_layers {
        return Err(mismatch(
            "has more DeepStack taps than the decoder has layers".into(),
        ));
    }
    if v.image_token_id != l.image_token_id {
        return Err(mismatch(format!(
            "image_token_id {} differs from the language bundle's {}",
            v.image_token_id, l.image_token_id
        )));
    }
    Ok(())
}
