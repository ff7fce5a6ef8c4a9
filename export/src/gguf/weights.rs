//! Each GGUF tensor's bytes, streamed from the bundles in pieces, each piece's mapped
//! source pages let go once read (so the resident set stays near one piece).

use super::file::WriteError;
use super::plan::{GgufTensor, Origin};
use crate::error::{ExportError, Result};
use crate::source::ExportSource;
use q3vl_bundle::{Bundle, BLOCK};
use q3vl_model::layout;
use std::path::Path;

/// Bytes handed to the writer at a time (about).
const CHUNK: usize = 8 << 20;

/// A GGUF writer's error as the export's, naming the file.
pub fn write_error(path: &Path, e: WriteError) -> ExportError {
    match e {
        WriteError::Io(p, e) => ExportError::io(p, e),
        WriteError::Plan(msg) => ExportError::Unsupported {
            path: path.to_path_buf(),
            msg,
        },
    }
}

/// Produces tensor `t`'s bytes, in order, into `sink`.
pub fn emit(
    src: &ExportSource,
    t: &GgufTensor,
    sink: &mut dyn FnMut(Vec<u8>) -> Result<()>,
) -> Result<()> {
    let (lang, vision) = (&src.bundles.language, &src.bundles.vision);
    match &t.origin {
        Origin::Q8(n) => q8_0_blocks(lang, n, sink),
        Origin::Text(n) => stored(lang, n, sink),
        Origin::Vision(n) => stored(vision, n, sink),
        Origin::PatchHalf(k) => patch_half(vision, *k, sink),
    }
}

/// An int8 weight as Q8_0 blocks: for each row, for each block of 32, the block's f16
/// scale (2 bytes, little-endian) and then its 32 int8 values. Exactly the bundle's
/// numbers, so the dequantized values (`d · q`) are the bundle's too.
fn q8_0_blocks(b: &Bundle, name: &str, sink: &mut dyn FnMut(Vec<u8>) -> Result<()>) -> Result<()> {
    let (q, s, [_, cols]) = b.q8(name).ok_or_else(|| ExportError::Unsupported {
        path: b.dir().to_path_buf(),
        msg: format!("tensor {name}: is not an int8 weight with f16 scales"),
    })?;
    let rows_per = (CHUNK / cols).max(1);
    let nb = cols / BLOCK;
    for (i, (qc, sc)) in q
        .chunks(rows_per * cols)
        .zip(s.chunks(rows_per * nb))
        .enumerate()
    {
        // The int8 values' bytes as they are (two's complement, what Q8_0 stores).
        // SAFETY: i8 and u8 have the same size and alignment, every bit pattern valid.
        let qb = unsafe { std::slice::from_raw_parts(qc.as_ptr() as *const u8, qc.len()) };
        let mut out = Vec::with_capacity(qc.len() / BLOCK * (BLOCK + 2));
        for (blk, scale) in qb.chunks_exact(BLOCK).zip(sc) {
            out.extend_from_slice(&scale.to_le_bytes());
            out.extend_from_slice(blk);
        }
        sink(out)?;
        b.checkpoint()
            .release(name, i * rows_per * cols..i * rows_per * cols + qc.len());
    }
    b.release(name);
    Ok(())
}

/// A stored tensor's bytes as they are.
fn stored(b: &Bundle, name: &str, sink: &mut dyn FnMut(Vec<u8>) -> Result<()>) -> Result<()> {
    let (_, _, bytes) = b.raw(name)?;
    for (i, c) in bytes.chunks(CHUNK).enumerate() {
        sink(c.to_vec())?;
        b.checkpoint().release(name, i * CHUNK..i * CHUNK + c.len());
    }
    Ok(())
}

/// Temporal slice `k` of the f16 Conv3d patch embedding `[out, c, t, p, p]`: the
/// `[out, c, p, p]` tensor llama.cpp convolves each frame with.
fn patch_half(b: &Bundle, k: usize, sink: &mut dyn FnMut(Vec<u8>) -> Result<()>) -> Result<()> {
    let name = layout::visual("patch_embed.proj.weight");
    let (_, shape, bytes) = b.raw(&name)?;
    let (t, plane) = (shape[2], shape[3] * shape[4] * 2);
    let mut out = Vec::with_capacity(bytes.len() / t);
    for frames in bytes.chunks(t * plane) {
        out.extend_from_slice(&frames[k * plane..(k + 1) * plane]);
    }
    sink(out)
}
