//! One GGUF file, read by candle's GGUF reader and then held to what llama.cpp's own
//! loader requires before any weight is trusted: the header's counts, every tensor's
//! data inside the file, aligned, not overlapping another's, and a whole number of
//! blocks of its type.
//!
//! The header is parsed once; each tensor is read on demand with positioned reads, so
//! verifying an 8B file holds about one layer in memory, not the file.

use crate::error::{GgufError, Result};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// GGUF's default alignment, when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;

/// A parsed, checked GGUF file.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    content: Content,
}

/// Where a 2-D tensor's rows are: type, rows, columns, bytes per row, first byte.
struct Rows {
    ty: GgmlDType,
    n: usize,
    cols: usize,
    row_bytes: usize,
    base: u64,
}

impl GgufFile {
    /// Opens and checks `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(bad(path, "not a regular file".into()));
        }
        let mut reader = BufReader::new(&file);
        // candle divides by `general.alignment` unchecked: a 0 there must be an error
        // naming the file, not a panic.
        let content = match q3vl_model::error::catch_quietly(|| Content::read(&mut reader)) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(bad(path, header_fault(&e))),
            Err(why) => {
                return Err(bad(
                    path,
                    format!("its header stops the reader ({why}): general.alignment 0?"),
                ))
            }
        };
        let f = GgufFile {
            path: path.to_path_buf(),
            file,
            content,
        };
        f.check_counts()?;
        f.check_layout(meta.len())?;
        Ok(f)
    }

    /// The header's counts are the numbers of distinct tensors and keys read: two
    /// entries under one name would leave one unread, and llama.cpp refuses them.
    fn check_counts(&self) -> Result<()> {
        let mut head = [0u8; 20];
        self.file
            .read_exact_at(&mut head, 4)
            .map_err(|e| self.bad(format!("header: {e}")))?;
        let u32_at =
            |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let u64_at = |i: usize| u32_at(i) as u64 | (u32_at(i + 4) as u64) << 32;
        let (tensors, keys) = match u32_at(0) {
            1 => (u32_at(4) as u64, u32_at(8) as u64),
            _ => (u64_at(4), u64_at(12)),
        };
        let counts = [
            ("tensors", tensors, self.content.tensor_infos.len()),
            ("metadata keys", keys, self.content.metadata.len()),
        ];
        for (what, declared, read) in counts {
            if declared != read as u64 {
                return Err(self.bad(format!(
                    "the header declares {declared} {what} but {read} distinct names were read (a name is repeated)"
                )));
            }
        }
        Ok(())
    }

    /// Every tensor's bytes inside the data section, aligned and disjoint.
    fn check_layout(&self, file_len: u64) -> Result<()> {
        let align = self.alignment()?;
        let start = self.content.tensor_data_offset;
        if start > file_len {
            return Err(self.bad(format!(
                "truncated: the data section starts at byte {start}, past the end ({file_len})"
            )));
        }
        let mut spans = Vec::new();
        for name in self.content.tensor_infos.keys() {
            let (offset, size) = self.span(name, file_len, align)?;
            let end = start.saturating_add(offset).saturating_add(size);
            if end > file_len {
                return Err(self.bad(format!(
                    "truncated: tensor {name} ends at byte {end}, past the end ({file_len})"
                )));
            }
            spans.push((offset, offset + size, name.as_str()));
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(self.bad(format!(
                    "tensors {} and {} overlap in the data section",
                    w[0].2, w[1].2
                )));
            }
        }
        Ok(())
    }

    /// A tensor's offset and byte size, its shape and offset checked: a whole number
    /// of blocks, no more elements than the file could hold, aligned.
    fn span(&self, name: &str, file_len: u64, align: u64) -> Result<(u64, u64)> {
        let info = &self.content.tensor_infos[name];
        let dims = info.shape.dims();
        // Overflow-checked: candle multiplies the dimensions unchecked.
        let elems = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .filter(|&n| n <= file_len.saturating_mul(64))
            .ok_or_else(|| {
                self.bad(format!(
                    "tensor {name}: shape {dims:?} is more than the file could hold"
                ))
            })?;
        let (ty, block) = (info.ggml_dtype, info.ggml_dtype.block_size() as u64);
        if elems == 0 || !elems.is_multiple_of(block) {
            return Err(self.bad(format!(
                "tensor {name}: {elems} elements is not a whole number of {ty:?} blocks of {block}"
            )));
        }
        if !info.offset.is_multiple_of(align) {
            return Err(self.bad(format!(
                "tensor {name}: offset {} is not aligned to {align}",
                info.offset
            )));
        }
        Ok((info.offset, elems / block * ty.type_size() as u64))
    }

    /// `general.alignment`, checked: a power of two.
    fn alignment(&self) -> Result<u64> {
        match self.content.metadata.get("general.alignment") {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(v) => match integer(v) {
                Some(a) if a > 0 && (a as u64).is_power_of_two() => Ok(a as u64),
                _ => Err(self.bad(format!(
                    "general.alignment is {}, not a power of two",
                    crate::config::show(v)
                ))),
            },
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error about this file.
    pub fn bad(&self, msg: String) -> GgufError {
        bad(&self.path, msg)
    }

    /// A metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A required metadata value.
    pub fn value(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.bad(format!("metadata {key} is missing")))
    }

    /// A required non-negative integer (of any GGUF integer type).
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        integer(v)
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| {
                let v = crate::config::show(v);
                self.bad(format!("metadata {key} is {v}, not a non-negative integer"))
            })
    }

    /// A required float (f32 or f64).
    pub fn f64(&self, key: &str) -> Result<f64> {
        match self.value(key)? {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            v => Err(self.bad(format!(
                "metadata {key} is {}, not a float",
                crate::config::show(v)
            ))),
        }
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.value(key)?;
        v.to_string()
            .map(String::as_str)
            .map_err(|_| self.bad(format!("metadata {key} is not a string")))
    }

    /// A required array, each element converted by `f` (None: the wrong type).
    pub fn array<T>(&self, key: &str, f: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>> {
        let items = self
            .value(key)?
            .to_vec()
            .map_err(|_| self.bad(format!("metadata {key} is not an array")))?;
        items
            .iter()
            .map(|x| {
                f(x).ok_or_else(|| {
                    let x = crate::config::show(x);
                    self.bad(format!("metadata {key} holds {x}, of the wrong type"))
                })
            })
            .collect()
    }

    /// A tensor's type and shape (torch order: the GGUF dimensions reversed).
    pub fn info(&self, name: &str) -> Option<(GgmlDType, &[usize])> {
        let i = self.content.tensor_infos.get(name)?;
        Some((i.ggml_dtype, i.shape.dims()))
    }

    /// A tensor dequantized to f32 by candle, row-major in its torch shape.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let fail = |e: candle_core::Error| self.bad(format!("tensor {name}: {}", first_line(&e)));
        let mut reader = BufReader::new(&self.file);
        let q = self
            .content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(fail)?;
        let t = q.dequantize(&Device::Cpu).map_err(fail)?;
        let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).map_err(fail)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.bad(format!("tensor {name}: non-finite value at flat index {i}")));
        }
        Ok(v)
    }

    /// Where 2-D tensor `name`'s rows are, its rows whole blocks of its type.
    fn rows_of(&self, name: &str) -> Result<Rows> {
        let (ty, dims) = self
            .info(name)
            .ok_or_else(|| self.bad(format!("tensor {name} is missing")))?;
        let [n, cols] = *dims else {
            return Err(self.bad(format!("tensor {name} has shape {dims:?}, expected 2-D")));
        };
        if !cols.is_multiple_of(ty.block_size()) {
            return Err(self.bad(format!(
                "tensor {name}: rows of {cols} are not whole {ty:?} blocks"
            )));
        }
        let base = self.content.tensor_data_offset + self.content.tensor_infos[name].offset;
        let row_bytes = cols / ty.block_size() * ty.type_size();
        Ok(Rows {
            ty,
            n,
            cols,
            row_bytes,
            base,
        })
    }

    /// Rows `ids` of 2-D tensor `name`, dequantized: `ids.len() × cols` values. Runs
    /// of consecutive ids are read at once.
    pub fn rows(&self, name: &str, ids: &[u32]) -> Result<Vec<f32>> {
        let Rows {
            ty,
            n,
            cols,
            row_bytes,
            base,
        } = self.rows_of(name)?;
        let fail = |e: candle_core::Error| self.bad(format!("tensor {name}: {}", first_line(&e)));
        let mut out = Vec::with_capacity(ids.len() * cols);
        let mut i = 0;
        while i < ids.len() {
            let first = ids[i] as usize;
            if first >= n {
                return Err(self.bad(format!(
                    "tensor {name}: row {first} is outside its {n} rows"
                )));
            }
            let mut run = 1;
            while i + run < ids.len() && ids[i + run] as usize == first + run && first + run < n {
                run += 1;
            }
            let mut buf = vec![0u8; run * row_bytes];
            self.file
                .read_exact_at(&mut buf, base + (first * row_bytes) as u64)
                .map_err(|e| self.bad(format!("tensor {name}: {e}")))?;
            let q = qtensor_from_ggml(ty, &buf, vec![run, cols], &Device::Cpu).map_err(fail)?;
            let v: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all()?.to_vec1())
                .map_err(fail)?;
            out.extend(v);
            i += run;
        }
        if let Some(j) = out.iter().position(|x| !x.is_finite()) {
            let row = ids[j / cols];
            return Err(self.bad(format!("tensor {name}: non-finite value in row {row}")));
        }
        Ok(out)
    }

    /// Row `row` of 2-D tensor `name`, as stored.
    pub fn raw_row(&self, name: &str, row: usize) -> Result<Vec<u8>> {
        let Rows {
            n, row_bytes, base, ..
        } = self.rows_of(name)?;
        if row >= n {
            return Err(self.bad(format!("tensor {name}: row {row} is outside its {n} rows")));
        }
        let mut buf = vec![0u8; row_bytes];
        self.file
            .read_exact_at(&mut buf, base + (row * row_bytes) as u64)
            .map_err(|e| self.bad(format!("tensor {name}: {e}")))?;
        Ok(buf)
    }
}

/// An integer metadata value of any width (None for other types; candle's own
/// conversions would also take a bool as 1).
pub fn integer(v: &Value) -> Option<i128> {
    Some(match *v {
        Value::U8(x) => x as i128,
        Value::I8(x) => x as i128,
        Value::U16(x) => x as i128,
        Value::I16(x) => x as i128,
        Value::U32(x) => x as i128,
        Value::I32(x) => x as i128,
        Value::U64(x) => x as i128,
        Value::I64(x) => x as i128,
        _ => return None,
    })
}

/// An error's message without the backtrace candle appends under RUST_BACKTRACE.
fn first_line(e: &candle_core::Error) -> String {
    let text = e.to_string();
    text.lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

/// What a header candle could not read says, as one line.
fn header_fault(e: &candle_core::Error) -> String {
    let msg = first_line(e);
    match msg.strip_prefix("unknown dtype for tensor ") {
        Some(id) => format!(
            "a tensor has type id {id}, an unsupported tensor type (readable: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K to Q8_K)"
        ),
        None => format!("not a readable GGUF file: {msg}"),
    }
}

fn bad(path: &Path, msg: String) -> GgufError {
    GgufError::File {
        path: path.to_path_buf(),
        msg,
    }
}
