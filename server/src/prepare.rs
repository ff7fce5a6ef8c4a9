//! A checked request made ready for the batch, off the async threads: its images
//! read, sized against the context before they are decoded, decoded and patched; its
//! conversation tokenised (refused as soon as it passes the context); its generation
//! sized to the room left.

use crate::api::{ChatRequest, ImageRef, ImageSource};
use crate::error::ApiError;
use crate::queue::{Event, Job, PreparedImage};
use crate::routes::App;
use q3vl_engine::GenerateParams;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Images one conversation may hold (each costs a pass of the vision tower and its
/// tokens of context).
pub const MAX_IMAGES: usize = 8;

/// A request made ready for the batch, and what its answer needs.
pub struct Prepared {
    /// What the batch runs.
    pub job: Job,
    /// Prompt tokens (for `usage`).
    pub prompt_tokens: usize,
    /// The request as checked.
    pub req: ChatRequest,
}

/// 400 `context_length_exceeded` naming `param`.
fn over_context(param: &str, msg: String) -> ApiError {
    ApiError::invalid_code(param, "context_length_exceeded", msg)
}

/// Reads and checks `body`, prepares its images and prompt, and sizes the generation.
pub fn prepare(
    app: &App,
    body: &[u8],
    events: UnboundedSender<Event>,
) -> Result<Prepared, ApiError> {
    let req = ChatRequest::parse(body)?;
    if req.model != app.opts.model {
        return Err(ApiError::unknown_model(&req.model, &app.opts.model));
    }
    let context = app.engine.context();
    // Every message costs at least its role marker: refused before any work.
    if req.messages.len() > context {
        let n = req.messages.len();
        return Err(over_context(
            "messages",
            format!("the conversation has {n} messages; the context holds {context} tokens"),
        ));
    }
    if let Some(extra) = req.images.get(MAX_IMAGES) {
        let msg = format!("a conversation may hold at most {MAX_IMAGES} images");
        return Err(ApiError::invalid(&extra.param, msg));
    }
    let images = prepare_images(app, &req.images, context)?;
    let grids: Vec<[usize; 3]> = images.iter().map(|i| i.patched.grid_thw).collect();
    let prompt = app
        .prompts
        .conversation_within(&req.messages, &grids, context)
        .map_err(|e| match e {
            q3vl_model::Error::PromptTooLong { .. } => over_context(
                "messages",
                format!("the conversation is longer than the context of {context} tokens"),
            ),
            e => ApiError::invalid("messages", e.to_string()),
        })?;
    let n = prompt.ids.len();
    let params = GenerateParams {
        max_new_tokens: new_tokens(app, &req, n, context)?,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        ignore_eos: req.ignore_eos,
        keep_logits: false,
    };
    let job = Job {
        ids: prompt.ids,
        images,
        params,
        events,
        queued_at: Instant::now(),
    };
    Ok(Prepared {
        job,
        prompt_tokens: n,
        req,
    })
}

/// Tokens to generate: the request's `max_tokens` if it fits the room the prompt
/// leaves, else the server's default, never past the context.
fn new_tokens(app: &App, req: &ChatRequest, n: usize, context: usize) -> Result<usize, ApiError> {
    let room = context.saturating_sub(n);
    match req.max_tokens {
        Some(m) if m > room => Err(over_context(
            "max_tokens",
            format!("the conversation ({n} tokens) plus max_tokens {m} exceeds the context of {context} tokens"),
        )),
        Some(m) => Ok(m),
        None if room == 0 => Err(over_context(
            "messages",
            format!("the conversation ({n} tokens) fills the context of {context} tokens"),
        )),
        None => Ok(app.opts.default_max_tokens.min(room)),
    }
}

/// Every image read and sized first (from its header: the tokens it will take), so
/// that images the context cannot hold are refused before any is decoded; then each
/// decoded and patched.
fn prepare_images(
    app: &App,
    images: &[ImageRef],
    context: usize,
) -> Result<Vec<PreparedImage>, ApiError> {
    let mut read = Vec::with_capacity(images.len());
    let mut tokens = 0usize;
    for img in images {
        let bad = |msg: String| ApiError::invalid(&img.param, format!("{}: {msg}", img.param));
        let bytes = image_bytes(app, img)?;
        let name = Path::new(&img.param);
        let (w, h) = q3vl_model::image::dimensions(&bytes, name).map_err(|e| bad(e.to_string()))?;
        let dynamic = app.opts.dynamic_resolution;
        tokens += app
            .engine
            .image_tokens(w, h, dynamic)
            .map_err(|e| bad(e.to_string()))?;
        if tokens > context {
            return Err(over_context(
                &img.param,
                format!("the images take more than the context of {context} tokens"),
            ));
        }
        read.push(bytes);
    }
    images
        .iter()
        .zip(read)
        .map(|(img, bytes)| patch(app, img, &bytes))
        .collect()
}

/// An image's bytes: a `data:` URL's (borrowed), or a local file's (only with
/// `--allow-local-files`).
fn image_bytes<'a>(app: &App, img: &'a ImageRef) -> Result<Cow<'a, [u8]>, ApiError> {
    let bad = |msg: String| ApiError::invalid(&img.param, format!("{}: {msg}", img.param));
    match &img.source {
        ImageSource::Data(bytes) => Ok(Cow::Borrowed(bytes)),
        ImageSource::File(path) if app.opts.allow_local_files => {
            q3vl_model::input::read_stream(path, q3vl_model::image::MAX_IMAGE_BYTES)
                .map(Cow::Owned)
                .map_err(|e| bad(format!("{}: {e}", path.display())))
        }
        ImageSource::File(_) => Err(bad(
            "local files are not read unless the server runs with --allow-local-files".into(),
        )),
    }
}

/// One image decoded, resized and patched; its key hashes the patch rows.
fn patch(app: &App, img: &ImageRef, bytes: &[u8]) -> Result<PreparedImage, ApiError> {
    let bad = |msg: String| ApiError::invalid(&img.param, format!("{}: {msg}", img.param));
    let rgb = q3vl_model::image::decode_rgb(bytes, Path::new(&img.param))
        .map_err(|e| bad(e.to_string()))?;
    let patched = app
        .engine
        .preprocess(&rgb, app.opts.dynamic_resolution)
        .map_err(|e| bad(e.to_string()))?;
    let mut h = Sha256::new();
    for v in &patched.pixel_values {
        h.update(v.to_le_bytes());
    }
    for g in patched.grid_thw {
        h.update((g as u64).to_le_bytes());
    }
    Ok(PreparedImage {
        patched,
        key: h.finalize().into(),
    })
}
