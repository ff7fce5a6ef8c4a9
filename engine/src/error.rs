//! The engine's error type: every variant says what is at fault in one line.

use std::path::PathBuf;

/// Errors from opening bundles or running the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A bundle could not be opened, or failed its checks.
    #[error(transparent)]
    Bundle(#[from] q3vl_bundle::BundleError),
    /// Preprocessing, tokenisation or a config file failed (model crate).
    #[error(transparent)]
    Model(#[from] q3vl_model::Error),
    /// The language and vision bundles do not belong together, or a bundle's
    /// tensors do not fit its config.
    #[error("{path}: {msg}")]
    Mismatch {
        /// The bundle folder at fault.
        path: PathBuf,
        /// What does not fit.
        msg: String,
    },
    /// A tensor is missing or stored in a way the engine cannot use.
    #[error("tensor {name}: {msg}")]
    Tensor {
        /// The tensor name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt, plus the tokens to generate, does not fit the context.
    #[error("{}", context_overflow(*prompt, *new_tokens, *context))]
    ContextOverflow {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens to generate (0 when scoring a prompt).
        new_tokens: usize,
        /// The largest conversation accepted, in tokens.
        context: usize,
    },
    /// A prompt id is not in the vocabulary (image pads are mapped past it).
    #[error("token id {id} is outside the vocabulary ({vocab} ids)")]
    TokenOutsideVocab {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: u32,
    },
    /// The prompt's image pads do not match the image given (or its absence).
    #[error("{}", image_token_count(*prompt, *image))]
    ImageTokenCount {
        /// Image pads in the prompt.
        prompt: usize,
        /// Image tokens the image gives; None when no image was given.
        image: Option<usize>,
    },
    /// The image pads are split into several runs.
    #[error("the image tokens are not one contiguous run (one image per prompt)")]
    ImageTokensSplit,
    /// The image features are not as wide as the decoder's hidden state.
    #[error("image features are {width} wide, the decoder needs {hidden}")]
    ImageWidth {
        /// The features' row width.
        width: usize,
        /// The decoder's hidden size.
        hidden: usize,
    },
    /// A patch grid the vision tower cannot run: a video (t > 1), or sides that are
    /// not positive multiples of the merge size.
    #[error("{}", bad_grid(*grid, *merge))]
    ImageGrid {
        /// The grid (t, h, w).
        grid: [usize; 3],
        /// The merge size.
        merge: usize,
    },
    /// The pixel rows do not fill the grid.
    #[error("pixel_values has {found} values, grid {grid:?} needs {patches}×{patch_dim}")]
    PixelCount {
        /// Values given.
        found: usize,
        /// The grid (t, h, w).
        grid: [usize; 3],
        /// Patches of the grid.
        patches: usize,
        /// Values per patch.
        patch_dim: usize,
    },
    /// The worker thread pool could not start.
    #[error("cannot start {threads} threads: {source}")]
    ThreadPool {
        /// Threads asked for.
        threads: usize,
        /// Why not.
        source: rayon::ThreadPoolBuildError,
    },
    /// The logits stopped being finite: the weights or config hold a value that
    /// turned the computation into NaN or infinity. Generation stops instead of
    /// sampling garbage.
    #[error("the logits are not finite at {at} (logit {index} is {value}): the bundle's weights or config are damaged")]
    NonFinite {
        /// Where: `prompt position N` or `generated token N`.
        at: String,
        /// The first bad logit (a vocabulary id).
        index: usize,
        /// Its value.
        value: f32,
    },
}

fn context_overflow(prompt: usize, new_tokens: usize, context: usize) -> String {
    if new_tokens == 0 {
        format!("the prompt ({prompt} tokens) exceeds the context of {context} tokens")
    } else {
        format!(
            "the prompt ({prompt} tokens) plus {new_tokens} new tokens exceeds the context of {context} tokens"
        )
    }
}

fn image_token_count(prompt: usize, image: Option<usize>) -> String {
    match image {
        None => format!("the prompt has {prompt} image tokens but no image was given"),
        Some(n) => format!("the prompt has {prompt} image tokens but the image has {n}"),
    }
}

fn bad_grid(grid: [usize; 3], merge: usize) -> String {
    if grid[0] != 1 {
        format!("grid {grid:?}: only still images (t = 1) are supported")
    } else {
        format!("grid {grid:?} is not a positive multiple of the merge size {merge}")
    }
}

/// `Err(NonFinite)` at the first non-finite value of `logits` (`[rows, vocab]`), with
/// `at(row)` saying where that row is.
pub fn check_logits(logits: &[f32], vocab: usize, at: impl Fn(usize) -> String) -> Result<()> {
    match logits.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(EngineError::NonFinite {
            at: at(i / vocab.max(1)),
            index: i % vocab.max(1),
            value: logits[i],
        }),
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, EngineError>;
