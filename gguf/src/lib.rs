//! Qwen3-VL in GGUF, both ways: the names llama.cpp gives each tensor (which
//! `q3vl export gguf` writes), and a GGUF pair made by anyone (a text model and its
//! `mmproj`) read back as a Qwen3-VL model: its configuration from the metadata, its
//! tokenizer from the vocabulary, and each weight by its HF name, dequantized by
//! candle's GGUF reader. `q3vl verify --gguf` runs the ladders on what this reads.

pub mod config;
pub mod error;
pub mod file;
pub mod model;
pub mod names;
pub mod tokenizer;

pub use error::{GgufError, Result};
pub use file::GgufFile;
pub use model::GgufModel;
