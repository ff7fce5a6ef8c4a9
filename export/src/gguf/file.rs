//! The GGUF container (version 3), written in one pass with bounded memory: the header,
//! the metadata, every tensor's info, then each tensor's data in info order, each padded
//! with zeros to the alignment (32, `general.alignment` not written).
//!
//! What llama.cpp's loader (`ggml/src/gguf.cpp`) holds a file to, and so what this writer
//! produces: little-endian; strings as a u64 length and the bytes; a value as its u32
//! type id and the value (an array: the element type, a u64 count, the elements); a
//! tensor info as its name, u32 dimension count, the dimensions as u64 in ggml order (the
//! torch shape reversed: the first is the fastest-varying), u32 ggml type and u64 offset
//! into the data section; each offset exactly the sum of the padded sizes before it.

use q3vl_bundle::DirectFile;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The alignment of the data section and of every tensor in it (GGUF's default).
pub const ALIGNMENT: u64 = 32;

/// A metadata value, with the GGUF type it is written as.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// UINT32 (type 4): counts, lengths, ids.
    U32(u32),
    /// INT32 (type 5).
    I32(i32),
    /// FLOAT32 (type 6).
    F32(f32),
    /// BOOL (type 7).
    Bool(bool),
    /// STRING (type 8).
    Str(String),
    /// ARRAY (type 9) of INT32.
    I32s(Vec<i32>),
    /// ARRAY of FLOAT32.
    F32s(Vec<f32>),
    /// ARRAY of BOOL.
    Bools(Vec<bool>),
    /// ARRAY of STRING.
    Strs(Vec<String>),
}

const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;

/// A ggml tensor type this exporter writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// Blocks of 32: an f16 scale, then 32 int8 values (34 bytes).
    Q8_0,
}

impl GgmlType {
    /// The type id in a tensor info.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
        }
    }

    /// Bytes of `n` elements (`n` a multiple of 32 for Q8_0).
    pub fn bytes(self, n: u64) -> u64 {
        match self {
            GgmlType::F32 => 4 * n,
            GgmlType::F16 => 2 * n,
            GgmlType::Q8_0 => 34 * (n / 32),
        }
    }

    /// The name llama.cpp prints (`q8_0`).
    pub fn as_str(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q8_0 => "q8_0",
        }
    }
}

/// One tensor's info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its GGUF name (shorter than 64 bytes).
    pub name: String,
    /// The torch shape (written reversed, as ggml orders dimensions).
    pub shape: Vec<usize>,
    /// Its type.
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Bytes of its data, unpadded.
    pub fn bytes(&self) -> u64 {
        self.ty.bytes(self.shape.iter().product::<usize>() as u64)
    }
}

fn pad(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// A GGUF file being written: everything up to the data section is written by
/// [`GgufWriter::create`]; then each tensor's bytes, in info order, by
/// [`GgufWriter::write`]; [`GgufWriter::finish`] checks every byte arrived and syncs.
/// The bytes go around the page cache ([`DirectFile`]: gigabytes written once need not
/// be copied into it), hashed on the way.
pub struct GgufWriter {
    path: PathBuf,
    out: Option<DirectFile>,
    hash: Sha256,
    infos: Vec<TensorInfo>,
    cur: usize,
    written: u64,
}

/// What [`GgufWriter`] can fail with: an I/O error, or bytes that do not fit the plan
/// (an exporter bug, reported rather than panicked).
#[derive(Debug)]
pub enum WriteError {
    /// Reading or writing the file failed.
    Io(PathBuf, std::io::Error),
    /// The bytes given do not match the tensor infos.
    Plan(String),
}

type Result<T> = std::result::Result<T, WriteError>;

impl GgufWriter {
    /// Creates `path` and writes the header, `kv` (in order) and `infos`.
    pub fn create(path: &Path, kv: &[(String, Value)], infos: Vec<TensorInfo>) -> Result<Self> {
        let out = DirectFile::create(path).map_err(|e| WriteError::Io(path.into(), e))?;
        let mut w = GgufWriter {
            path: path.into(),
            out: Some(out),
            hash: Sha256::new(),
            infos,
            cur: 0,
            written: 0,
        };
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(w.infos.len() as u64).to_le_bytes());
        head.extend_from_slice(&(kv.len() as u64).to_le_bytes());
        for (key, value) in kv {
            put_str(&mut head, key);
            put_value(&mut head, value);
        }
        let mut offset = 0u64;
        for t in &w.infos {
            let ne0 = t.shape.last().copied().unwrap_or(0);
            let blocks_fit = t.ty != GgmlType::Q8_0 || ne0 % 32 == 0;
            if t.name.len() >= 64 || t.shape.is_empty() || t.shape.len() > 4 || !blocks_fit {
                return Err(WriteError::Plan(format!(
                    "tensor {}: name or rank GGUF cannot hold",
                    t.name
                )));
            }
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += pad(t.bytes());
        }
        head.resize(pad(head.len() as u64) as usize, 0);
        w.put(head)?;
        w.settle()?;
        Ok(w)
    }

    fn put(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.hash.update(&bytes);
        let out = self.out.as_mut().expect("open until finish");
        out.write_all(&bytes)
            .map_err(|e| WriteError::Io(self.path.clone(), e))
    }

    /// Pads and moves past every tensor that is complete (empty ones included).
    fn settle(&mut self) -> Result<()> {
        while let Some(t) = self.infos.get(self.cur) {
            let n = t.bytes();
            if self.written < n {
                break;
            }
            let zeros = vec![0u8; (pad(n) - n) as usize];
            if !zeros.is_empty() {
                self.put(zeros)?;
            }
            self.cur += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// The name of the tensor the next bytes belong to, if any.
    pub fn current(&self) -> Option<&str> {
        self.infos.get(self.cur).map(|t| t.name.as_str())
    }

    /// Appends `bytes` to tensor `name`, which must be the current one.
    pub fn write(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let Some(t) = self.infos.get(self.cur) else {
            return Err(WriteError::Plan(format!(
                "tensor {name}: every tensor is complete"
            )));
        };
        if t.name != name || self.written + bytes.len() as u64 > t.bytes() {
            let msg = format!(
                "tensor {name}: bytes out of order or past its size ({} expected next)",
                t.name
            );
            return Err(WriteError::Plan(msg));
        }
        self.written += bytes.len() as u64;
        self.put(bytes)?;
        self.settle()
    }

    /// Checks every tensor is complete, flushes and syncs; returns (size, sha256 hex).
    pub fn finish(mut self) -> Result<(u64, String)> {
        if let Some(t) = self.infos.get(self.cur) {
            let msg = format!(
                "tensor {}: only {} of {} bytes were written",
                t.name,
                self.written,
                t.bytes()
            );
            return Err(WriteError::Plan(msg));
        }
        let out = self.out.take().expect("open until finish");
        let size = out
            .finish(true)
            .map_err(|e| WriteError::Io(self.path.clone(), e))?;
        Ok((size, hex::encode(std::mem::take(&mut self.hash).finalize())))
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        // An abandoned file (an error, Ctrl-C): no fsync; the staging folder that holds
        // it is removed by the caller's claim.
        if let Some(out) = self.out.take() {
            let _ = out.finish(false);
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_array<T>(out: &mut Vec<u8>, ty: u32, items: &[T], each: impl Fn(&mut Vec<u8>, &T)) {
    out.extend_from_slice(&T_ARR.to_le_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for it in items {
        each(out, it);
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    let scalar = |out: &mut Vec<u8>, ty: u32, bytes: &[u8]| {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(bytes);
    };
    match v {
        Value::U32(x) => scalar(out, T_U32, &x.to_le_bytes()),
        Value::I32(x) => scalar(out, T_I32, &x.to_le_bytes()),
        Value::F32(x) => scalar(out, T_F32, &x.to_le_bytes()),
        Value::Bool(x) => scalar(out, T_BOOL, &[*x as u8]),
        Value::Str(s) => {
            out.extend_from_slice(&T_STR.to_le_bytes());
            put_str(out, s);
        }
        Value::I32s(v) => put_array(out, T_I32, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Value::F32s(v) => put_array(out, T_F32, v, |o, x| o.extend_from_slice(&x.to_le_bytes())),
        Value::Bools(v) => put_array(out, T_BOOL, v, |o, x| o.push(*x as u8)),
        Value::Strs(v) => put_array(out, T_STR, v, |o, s| put_str(o, s)),
    }
}
