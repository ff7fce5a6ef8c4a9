//! The element types q3vl writes: what a bundle stores, what a synthesized checkpoint
//! stores, and the integer types of an export (`q3vl export`).

use std::fmt;

/// An element type, spelled as safetensors spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// 32-bit float (vectors, the vision position table).
    F32,
    /// 16-bit IEEE float (embedding, vision, scales, fp16 weights).
    F16,
    /// bfloat16 (only in synthesized source checkpoints).
    BF16,
    /// Signed 8-bit integer (quantized weights).
    I8,
    /// Signed 32-bit integer (an export's packed weights; never in a bundle).
    I32,
    /// Signed 64-bit integer (an export's weight shapes; never in a bundle).
    I64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I8 => 1,
            Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }

    /// The safetensors spelling (`"F16"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I8 => "I8",
            Dtype::I32 => "I32",
            Dtype::I64 => "I64",
        }
    }

    /// Parses the safetensors spelling.
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I8" => Dtype::I8,
            "I32" => Dtype::I32,
            "I64" => Dtype::I64,
            _ => return None,
        })
    }

    /// The safetensors crate's dtype, as `q3vl_model::Checkpoint` reports it; `None`
    /// for every dtype a bundle does not store (the export-only integers included).
    pub fn from_safetensors(d: safetensors::tensor::Dtype) -> Option<Dtype> {
        use safetensors::tensor::Dtype as S;
        Some(match d {
            S::F32 => Dtype::F32,
            S::F16 => Dtype::F16,
            S::BF16 => Dtype::BF16,
            S::I8 => Dtype::I8,
            _ => return None,
        })
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
