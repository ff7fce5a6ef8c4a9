//! A small deterministic mutator of valid files: a seeded RNG, byte-level mutations,
//! and structure-aware ones for JSON documents and safetensors files (whose headers
//! are JSON with offsets, shapes and dtypes behind an 8-byte length).

use serde_json::{json, Map, Value};

/// splitmix64: tiny, seedable, good enough to pick mutations; every case is replayable
/// from its seed.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// True once in `n` draws.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Bytes that make parsers take unusual branches.
const INTERESTING_BYTES: [u8; 7] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'\\'];

/// 64-bit values at the edges of every integer width.
const INTERESTING_U64: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// One random byte-level mutation of `data`, with offsets drawn from `0..span` (or the
/// whole length when `span` is larger): a bit flip, an interesting byte or word,
/// truncation, extension, or a chunk duplicated or deleted.
pub fn bytes(rng: &mut Rng, data: &mut Vec<u8>, span: usize) {
    let at = |rng: &mut Rng, len: usize| rng.below(len.min(span).max(1));
    match rng.below(8) {
        0 if !data.is_empty() => {
            let i = at(rng, data.len());
            data[i] ^= 1 << rng.below(8);
        }
        1 if !data.is_empty() => {
            let i = at(rng, data.len());
            data[i] = *rng.pick(&INTERESTING_BYTES);
        }
        2 if data.len() >= 8 => {
            let i = at(rng, data.len() - 7);
            let v = rng.pick(&INTERESTING_U64).to_le_bytes();
            let w = *rng.pick(&[1usize, 2, 4, 8]);
            data[i..i + w].copy_from_slice(&v[..w]);
        }
        3 => {
            let keep = at(rng, data.len());
            data.truncate(keep);
        }
        4 => {
            let n = 1 + rng.below(64);
            let fill = if rng.one_in(2) {
                0
            } else {
                rng.next_u64() as u8
            };
            data.extend(std::iter::repeat_n(fill, n));
        }
        5 if !data.is_empty() => {
            let i = at(rng, data.len());
            let n = (1 + rng.below(64)).min(data.len() - i);
            let chunk = data[i..i + n].to_vec();
            let j = at(rng, data.len());
            data.splice(j..j, chunk);
        }
        6 if !data.is_empty() => {
            let i = at(rng, data.len());
            let n = (1 + rng.below(64)).min(data.len() - i);
            data.drain(i..i + n);
        }
        _ => {
            let i = at(rng, data.len());
            data.insert(i.min(data.len()), rng.next_u64() as u8);
        }
    }
}

/// Up to four byte mutations within the first `span` bytes.
pub fn bytes_n(rng: &mut Rng, data: &mut Vec<u8>, span: usize) {
    for _ in 0..1 + rng.below(4) {
        bytes(rng, data, span);
    }
}

/// A value of the wrong kind or at the edge of its range, for any JSON field.
fn odd_value(rng: &mut Rng, old: &Value) -> Value {
    let n = old.as_f64().unwrap_or(1.0);
    let choices = [
        json!(0),
        json!(-1),
        json!(1),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1u64 << 32),
        json!((1u64 << 31) - 1),
        json!(1e308),
        json!(-1e308),
        json!(1e-308),
        json!(0.5),
        json!(n + 1.0),
        json!(n - 1.0),
        json!(n * 1000.0),
        json!("NaN"),
        json!("inf"),
        json!("-1"),
        json!(""),
        json!("../../../../etc/passwd"),
        json!("/dev/zero"),
        json!("x\ny"),
        Value::Null,
        json!(true),
        json!([]),
        json!({}),
        json!([0, 0]),
    ];
    // Integers keep their kind more often: those are the sizes and offsets.
    if old.is_u64() && rng.one_in(2) {
        let v = old.as_u64().unwrap_or(0);
        return json!(match rng.below(6) {
            0 => v.wrapping_add(1),
            1 => v.saturating_sub(1),
            2 => v.saturating_mul(2),
            3 => v / 2,
            4 => *rng.pick(&INTERESTING_U64),
            _ => v ^ (1 << rng.below(64)),
        });
    }
    rng.pick(&choices).clone()
}

/// A key that should not be there, or is a path that escapes its folder.
fn odd_key(rng: &mut Rng) -> String {
    rng.pick(&[
        "",
        "../x",
        "/etc/passwd",
        "a/../../b",
        "x\ny",
        "__metadata__",
        ".",
    ])
    .to_string()
}

/// Counts the nodes of a JSON tree (the root included).
fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// The node that comes `*i` nodes after `v` in depth-first order (the root first).
fn nth<'a>(v: &'a mut Value, i: &mut usize) -> Option<&'a mut Value> {
    if *i == 0 {
        return Some(v);
    }
    *i -= 1;
    match v {
        Value::Array(a) => a.iter_mut().find_map(|c| nth(c, i)),
        Value::Object(o) => o.values_mut().find_map(|c| nth(c, i)),
        _ => None,
    }
}

/// One structure-aware mutation of a JSON tree: a node replaced by an odd value, or
/// (in containers) an entry deleted, duplicated, renamed or added, or emptied.
pub fn json_value(rng: &mut Rng, root: &mut Value) {
    let mut i = rng.below(count(root));
    let node = nth(root, &mut i).expect("an index below the node count");
    match node {
        Value::Object(o) if !o.is_empty() && !rng.one_in(3) => mutate_object(rng, o),
        Value::Array(a) if !a.is_empty() && !rng.one_in(3) => match rng.below(4) {
            0 => {
                let i = rng.below(a.len());
                a.remove(i);
            }
            1 => {
                let i = rng.below(a.len());
                let v = a[i].clone();
                a.insert(i, v);
            }
            2 => a.clear(),
            _ => {
                let i = rng.below(a.len());
                a[i] = odd_value(rng, &a[i].clone());
            }
        },
        other => *other = odd_value(rng, &other.clone()),
    }
}

fn mutate_object(rng: &mut Rng, o: &mut Map<String, Value>) {
    let keys: Vec<String> = o.keys().cloned().collect();
    let key = rng.pick(&keys).clone();
    match rng.below(4) {
        0 => {
            o.remove(&key);
        }
        1 => {
            let v = o.remove(&key).unwrap_or(Value::Null);
            o.insert(odd_key(rng), v);
        }
        2 => {
            let other = rng.pick(&keys).clone();
            let v = o[&other].clone();
            o.insert(key, v);
        }
        _ => {
            let v = odd_value(rng, &Value::Null);
            o.insert(odd_key(rng), v);
        }
    }
}

/// A JSON file mutated: mostly parsed, changed node by node and re-serialized (compact
/// or pretty), sometimes with byte mutations on top; byte mutations only when the seed
/// does not parse.
pub fn json_file(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<Value>(seed) else {
        let mut out = seed.to_vec();
        bytes_n(rng, &mut out, usize::MAX);
        return out;
    };
    if rng.one_in(5) {
        let mut out = seed.to_vec();
        bytes_n(rng, &mut out, usize::MAX);
        return out;
    }
    for _ in 0..1 + rng.below(3) {
        json_value(rng, &mut v);
    }
    let mut out = if rng.one_in(2) {
        serde_json::to_vec(&v)
    } else {
        serde_json::to_vec_pretty(&v)
    }
    .expect("a JSON value serializes");
    if rng.one_in(6) {
        bytes(rng, &mut out, usize::MAX);
    }
    out
}

/// A safetensors file split into its header (parsed) and data, when it parses.
fn split_safetensors(file: &[u8]) -> Option<(Map<String, Value>, &[u8])> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header = file.get(8..8usize.checked_add(n)?)?;
    let Value::Object(h) = serde_json::from_slice(header).ok()? else {
        return None;
    };
    Some((h, &file[8 + n..]))
}

/// A targeted change to one tensor entry: offsets that overlap another tensor, leave
/// a gap, run past the end or overflow; shapes whose product overflows or disagrees
/// with the bytes; another or an unknown dtype.
fn mutate_tensor_entry(rng: &mut Rng, h: &mut Map<String, Value>, data_len: u64) {
    let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if names.is_empty() {
        return;
    }
    let name = rng.pick(&names).clone();
    let other = rng.pick(&names).clone();
    let other_offsets = h[&other].get("data_offsets").cloned();
    let Some(entry) = h.get_mut(&name).and_then(Value::as_object_mut) else {
        return;
    };
    let off = |e: &Map<String, Value>, i: usize| {
        e.get("data_offsets")
            .and_then(|o| o.get(i))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let (start, end) = (off(entry, 0), off(entry, 1));
    match rng.below(9) {
        0 => {
            if let Some(o) = other_offsets {
                entry.insert("data_offsets".into(), o);
            }
        }
        1 => {
            let d = 1 + rng.below(64) as u64;
            entry.insert("data_offsets".into(), json!([start + d, end + d]));
        }
        2 => {
            entry.insert("data_offsets".into(), json!([end, start]));
        }
        3 => {
            entry.insert(
                "data_offsets".into(),
                json!([data_len, data_len + end.saturating_sub(start)]),
            );
        }
        4 => {
            let big = *rng.pick(&INTERESTING_U64);
            entry.insert("data_offsets".into(), json!([start, big]));
        }
        5 => {
            let dims = [1u64 << 32, 1 << 32, 1 << 32];
            entry.insert("shape".into(), json!(dims[..1 + rng.below(3)]));
        }
        6 => {
            let mut shape: Vec<u64> = entry
                .get("shape")
                .and_then(Value::as_array)
                .map(|s| s.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            match rng.below(3) {
                0 => shape.reverse(),
                1 => shape.push(1),
                _ => shape.iter_mut().for_each(|d| *d = 0),
            }
            entry.insert("shape".into(), json!(shape));
        }
        7 => {
            let dtypes = [
                "F32", "F16", "BF16", "I8", "U8", "I64", "F64", "BOOL", "F8_E4M3", "Q4", "",
            ];
            entry.insert("dtype".into(), json!(rng.pick(&dtypes)));
        }
        _ => {
            let v = entry.remove("dtype").unwrap_or(Value::Null);
            h.insert(format!("{name}\u{0}"), v);
        }
    }
}

/// A safetensors file mutated where it matters: the header's tensor entries (offsets,
/// shapes, dtypes) or any node of it, the 8-byte header length, the bytes around the
/// header, or the data's tail. Falls back to byte mutations when the file has no
/// parsable header.
pub fn safetensors_file(rng: &mut Rng, file: &[u8]) -> Vec<u8> {
    let Some((mut h, data)) = split_safetensors(file) else {
        let mut out = file.to_vec();
        bytes_n(rng, &mut out, 4096);
        return out;
    };
    let header_len = file.len() - data.len();
    match rng.below(10) {
        // Raw bytes near the front (length word and header text).
        0 | 1 => {
            let mut out = file.to_vec();
            bytes_n(rng, &mut out, header_len + 64);
            return out;
        }
        // The data section cut short or extended.
        2 => {
            let mut out = file.to_vec();
            let cut = header_len + rng.below(data.len() + 1);
            if rng.one_in(2) {
                out.truncate(cut);
            } else {
                out.extend(std::iter::repeat_n(0u8, 1 + rng.below(4096)));
            }
            return out;
        }
        3..=6 => mutate_tensor_entry(rng, &mut h, data.len() as u64),
        _ => {
            let mut v = Value::Object(h);
            json_value(rng, &mut v);
            h = match v {
                Value::Object(h) => h,
                other => {
                    // The root itself was replaced: write it as the header.
                    return assemble(&serde_json::to_vec(&other).expect("serializes"), data, rng);
                }
            };
        }
    }
    let json = serde_json::to_vec(&h).expect("a JSON value serializes");
    assemble(&json, data, rng)
}

/// 8-byte length + header + data; the length is usually right, sometimes off.
fn assemble(json: &[u8], data: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut n = json.len() as u64;
    if rng.one_in(8) {
        n = match rng.below(4) {
            0 => n + 1,
            1 => n.saturating_sub(1),
            2 => *rng.pick(&INTERESTING_U64),
            _ => n + data.len() as u64,
        };
    }
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(json);
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mutators_are_deterministic_and_change_their_input() {
        let seed = br#"{"a": 1, "b": [1, 2, {"c": "x"}]}"#;
        let (mut r1, mut r2) = (Rng::new(7), Rng::new(7));
        let mut changed = 0;
        for _ in 0..200 {
            let a = json_file(&mut r1, seed);
            assert_eq!(a, json_file(&mut r2, seed));
            changed += usize::from(
                serde_json::from_slice::<Value>(&a).ok()
                    != serde_json::from_slice::<Value>(seed).ok(),
            );
        }
        assert!(changed > 150, "{changed} of 200 changed");
    }
}
