//! The model crate's error type: every variant names the file, tensor or field at fault.

use std::path::PathBuf;

/// Errors from loading, preprocessing or running the reference model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read, written, synced or renamed (every crate's I/O error:
    /// the others wrap this one).
    #[error("{}: {source}", printable(.path.display()))]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file is malformed or lacks a required field.
    #[error("{}: {}", printable(.path.display()), printable(.msg))]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A config value is missing, inconsistent or unsupported.
    #[error("config: {}", printable(.0))]
    Config(String),
    /// A safetensors file is damaged (bad header, truncated data).
    #[error("{}: {}", printable(.path.display()), printable(.msg))]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// An expected tensor is absent from the checkpoint.
    #[error("tensor {}: missing from the checkpoint", printable(.name))]
    MissingTensor {
        /// The tensor name.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor {}: shape {found:?}, expected {expected:?}", printable(.name))]
    Shape {
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape on disk.
        found: Vec<usize>,
    },
    /// A tensor has a dtype this tool does not read.
    #[error("tensor {}: dtype {} is not supported (expected {expected})", printable(.name), printable(.dtype))]
    Dtype {
        /// The tensor name.
        name: String,
        /// The dtype on disk.
        dtype: String,
        /// What was expected.
        expected: String,
    },
    /// A tensor holds NaN or infinity.
    #[error("tensor {}: non-finite value {value} at flat index {index}", printable(.name))]
    NonFinite {
        /// The tensor name.
        name: String,
        /// First bad flat index.
        index: usize,
        /// The value found there.
        value: f32,
    },
    /// The tokenizer or chat template failed.
    #[error("prompt: {}", printable(.0))]
    Prompt(String),
    /// The prompt has more tokens than the limit it was tokenised under.
    #[error("the prompt is longer than {limit} tokens")]
    PromptTooLong {
        /// The limit.
        limit: usize,
    },
    /// The image could not be decoded or is unusable.
    #[error("image {}: {}", printable(.path.display()), printable(.msg))]
    Image {
        /// The image file (or a description of the source).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor operation failed (shape bugs surface here).
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The text a panic carries (`panic!("…")` payloads are a `&str` or a `String`).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    panic_payload_text(payload)
}

/// Runs `f` with a panic caught and the panic hook silenced, for third-party parsers that
/// panic on malformed input instead of returning an error (tokenizers on some files,
/// candle's GGUF reader on a zero alignment): a bad file becomes an error naming it, not
/// an internal error. Returns the panic's text on a panic. The lock keeps concurrent
/// callers from restoring each other's silent hook.
pub fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = HOOK.lock().unwrap_or_else(|p| p.into_inner());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    caught.map_err(|p| panic_payload_text(p.as_ref()))
}

fn panic_payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// A panic hook's view of a panic: its text and where it happened (`… at file:line`).
pub fn panic_summary(info: &std::panic::PanicHookInfo<'_>) -> String {
    let at = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    format!("{}{at}", panic_text(info.payload()))
}

/// `text` with its control characters escaped (a newline becomes `\n`), so an error
/// that quotes a name, path or message taken from a file stays on one line.
pub fn printable(text: impl std::fmt::Display) -> String {
    let text = text.to_string();
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| match c.is_control() {
            true => c.escape_default().to_string(),
            false => c.to_string(),
        })
        .collect()
}
