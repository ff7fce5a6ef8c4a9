//! The decode matrix-vector product ("W8A16"): int8 per-block-32 weights with f16
//! scales, times activations rounded per block of 32 to int16.
//!
//! Why int16 activations: decode streams every weight once per token, so the
//! kernel must retire 32 weight bytes in fewer cycles than memory delivers them.
//! With f32 activations each 8 weights cost a widen, a convert and an FMA, and one
//! core could not keep up with memory. With int16 activations 16 products are one
//! `vpmaddwd`, and half the instructions remain. Rounding to 16 bits per block moves
//! an activation by at most 2⁻¹⁶ of its block's largest value, far below the int8
//! weights' own step (int8 activations, llama.cpp's Q8_0 way, moved greedy tokens
//! away from the reference on an untrained fixture; see the `q8` kernel, behind the
//! cargo feature `q8`).
//!
//! # The arithmetic (every path, bit for bit)
//!
//! The activation row `x` is quantized once per product ([`Acts16`]): per block
//! `d = amax / 32767`, `q = round_half_even(x / d)`, so `|q| ≤ 32767`. Then for one
//! weight row `w` with `nb` blocks (an odd last block is paired with a block of zero
//! weights, zero values and scale 0):
//!
//! ```text
//! acc[0..16] = 0                                            (f32 lanes)
//! for b in 0..nb (rounded up to even):
//!     sc = f32(ws[b]) · xd[b]                               (f32 product, rounded)
//!     for h in 0..2, v in 0..4:
//!         p = Σ w[32b+e] · q[32b+e]  over e in {16h+2v, 16h+2v+1, 16h+8+2v, 16h+9+2v}
//!                                                           (exact, i32)
//!         m = 8h + 2v + b % 2
//!         acc[m] = fma(f32(p), sc, acc[m])                  (fused multiply-add)
//! t[l] = acc[l] + acc[l+8]                                  (l < 8)
//! result = ((t0+t4) + (t2+t6)) + ((t1+t5) + (t3+t7))
//! ```
//!
//! Lane `m` holds four products of one block, and the even and odd blocks of a pair
//! alternate lanes: that is what one `vpmaddwd` and one `vpdpwssd` form when a pair
//! of blocks' 64 bytes are interleaved word by word (`vpunpcklwd`/`vpunpckhwd`) and
//! sign-extended to int16 in two 512-bit registers, so a pair of blocks costs two
//! integer products, one convert and one FMA per activation row, whose scale pair a
//! 64-bit broadcast load supplies. The activations are stored in that order once per
//! product (`paired_index`). `|p| ≤ 4 · 128 · 32767 < 2²⁴`, so `f32(p)` is exact
//! and a path only changes how it forms the exact sums. An output never depends on the
//! task split or the thread count.
//!
//! Why this layout: decode steps of several sequences (continuous batching) run each
//! weight block against several activation rows, and there the instructions per
//! activation row, not memory, bound the step. One lane per `vpmaddwd` pair (the
//! earlier definition) needed a convert and an FMA per block and activation row; four
//! products per lane halve both (docs/benchmarks-history.md: "The decode arithmetic
//! sums four products per lane").
//!
//! # Paths
//!
//! `rows_fn` maps the [`Path`] to its row loop: the portable one (the definition),
//! AVX2 (per pair of blocks four 256-bit `vpmaddwd` and two adds, also run on CPUs
//! with AVX-512 but without the path chosen), AVX-512 (one `vpmaddwd` and one
//! `vpdpwssd` per pair), NEON (`zip`, `smull` + `addp`). Several activation rows at
//! once take the x86 group loops (`group_fn`). The x86 loops each come in two
//! prefetch variants ([`Prefetch`]), of which the CPU vendor picks one. The tests compare every path
//! the CPU has with the portable one, bit for bit.

use crate::path::{assert_available, best_path, debug_assert_available, Path};
use crate::{OutPtr, BLOCK};
use half::f16;
use rayon::prelude::*;

/// Largest activation magnitude after quantization.
const QMAX: f32 = 32767.0;

/// Adding 1.5 · 2²³ rounds `|v / d| ≤ 32767 + ε` half-to-even in the default
/// rounding mode (as `round_ties_even` does, without a libm call per value).
const MAGIC: f32 = 12_582_912.0;

/// Activations quantized per block of 32 to int16, one f32 scale per block.
#[derive(Debug, Clone, Default)]
pub struct Acts16 {
    /// Row-major int16 values.
    pub q: Vec<i16>,
    /// Row-major block scales, `cols / 32` per row.
    pub d: Vec<f32>,
    /// Row length; a multiple of 32.
    pub cols: usize,
}

impl Acts16 {
    /// Quantizes `x` (rows of `cols`, a multiple of 32) block by block.
    pub fn quantize(x: &[f32], cols: usize) -> Acts16 {
        Acts16::quantize_on(best_path(), x, cols)
    }

    /// [`Acts16::quantize`] on a given path, which this CPU must run (checked in debug
    /// builds; every path gives the same bits).
    pub(crate) fn quantize_on(path: Path, x: &[f32], cols: usize) -> Acts16 {
        debug_assert_available(path);
        assert!(cols.is_multiple_of(BLOCK) && cols > 0 && x.len().is_multiple_of(cols));
        let mut q = vec![0i16; x.len()];
        let mut d = vec![0f32; x.len() / BLOCK];
        for ((xb, qb), db) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(d.iter_mut())
        {
            *db = quantize_block16_on(path, xb, qb);
        }
        Acts16 { q, d, cols }
    }

    /// Row `r`'s values and scales.
    pub fn row(&self, r: usize) -> (&[i16], &[f32]) {
        let nb = self.cols / BLOCK;
        (
            &self.q[r * self.cols..(r + 1) * self.cols],
            &self.d[r * nb..(r + 1) * nb],
        )
    }
}

/// Quantizes one block (32 values) to int16; returns its scale: 0 for an all-zero
/// block, and NaN or ±∞ when the block holds one (its values are then 0, so every
/// product with the block is NaN, as in f32 arithmetic). The same bits on every path
/// (a prefill quantizes every prompt row before each of its products: on one
/// scalar division per value that was about 1% of an 8B prefill).
pub fn quantize_block16(x: &[f32], q: &mut [i16]) -> f32 {
    quantize_block16_on(best_path(), x, q)
}

/// [`quantize_block16`] on a given path (the AVX2 code also runs on the AVX-512 path),
/// which this CPU must run (checked in debug builds).
pub(crate) fn quantize_block16_on(path: Path, x: &[f32], q: &mut [i16]) -> f32 {
    debug_assert_available(path);
    assert!(x.len() == BLOCK && q.len() == BLOCK);
    match path {
        // SAFETY: both hold one block (checked); the path's features are present.
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 | Path::Avx512Vnni => unsafe {
            x86::quantize_block16_avx2(x.as_ptr(), q.as_mut_ptr())
        },
        _ => quantize_block16_portable(x, q),
    }
}

/// [`quantize_block16`] in plain Rust: the definition.
pub fn quantize_block16_portable(x: &[f32], q: &mut [i16]) -> f32 {
    let mut amax = 0f32;
    for v in x {
        if v.is_nan() {
            q.fill(0);
            return f32::NAN;
        }
        amax = amax.max(v.abs());
    }
    let d = amax / QMAX;
    if d == 0.0 || !d.is_finite() {
        q.fill(0);
        return d;
    }
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (((v / d) + MAGIC) - MAGIC).clamp(-QMAX, QMAX) as i16;
    }
    d
}

/// One dot product on the portable path: the module's arithmetic, on activations in
/// their natural order.
pub fn dot_portable(w: &[i8], ws: &[f16], xq: &[i16], xd: &[f32]) -> f32 {
    dot_portable_by(w, ws, |i| xq[i], xd)
}

/// [`dot_portable`] reading value `i` (natural order) of the activation row as `x(i)`.
fn dot_portable_by(w: &[i8], ws: &[f16], x: impl Fn(usize) -> i16, xd: &[f32]) -> f32 {
    let nb = ws.len();
    let mut acc = [0f32; 16];
    for b in 0..nb.next_multiple_of(2) {
        // The partner of an odd last block: zero weights, values and scale.
        let sc = if b < nb { ws[b].to_f32() * xd[b] } else { 0.0 };
        for h in 0..2 {
            for v in 0..4 {
                let e0 = 16 * h + 2 * v;
                let p: i32 = if b < nb {
                    [e0, e0 + 1, e0 + 8, e0 + 9]
                        .iter()
                        .map(|&e| w[32 * b + e] as i32 * x(32 * b + e) as i32)
                        .sum()
                } else {
                    0
                };
                let m = 8 * h + 2 * v + b % 2;
                acc[m] = (p as f32).mul_add(sc, acc[m]);
            }
        }
    }
    let t: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]))
}

/// Values per pair of blocks in the paired layout.
const PAIR: usize = 2 * BLOCK;

/// Where value `e` (< 32) of block `b` of an activation row sits in its paired
/// layout: pair `b / 2` holds 64 values, the first 32 in the order the first
/// `vpmaddwd` of the module's arithmetic reads them (the pair's words
/// `16h + 2v .. +1`, blocks alternating by lane) and the last 32 in the order the
/// `vpdpwssd` reads them (words `16h + 8 + 2v .. +1`).
pub(crate) fn paired_index(b: usize, e: usize) -> usize {
    let (h, r) = (e / 16, e % 16);
    let (half, v, i) = (r / 8, (r % 8) / 2, r % 2);
    let m = 8 * h + 2 * v + b % 2;
    (b / 2) * PAIR + half * BLOCK + 2 * m + i
}

/// Activation rows in the paired layout ([`paired_index`]), each `pairs · 64` values
/// (an odd last block's partner zero), with `pairs · 2` scales (its scale 0).
#[derive(Debug, Clone)]
struct PairedActs {
    q: Vec<i16>,
    d: Vec<f32>,
    pairs: usize,
}

impl PairedActs {
    /// `xa` in the paired layout.
    fn new(xa: &Acts16) -> PairedActs {
        let nb = xa.cols / BLOCK;
        let pairs = nb.div_ceil(2);
        let t = xa.d.len() / nb;
        let mut q = vec![0i16; t * pairs * PAIR];
        let mut d = vec![0f32; t * pairs * 2];
        // Where each value of a pair lands, once.
        let slot: [usize; PAIR] = std::array::from_fn(|i| paired_index(i / BLOCK, i % BLOCK));
        for tok in 0..t {
            let (xq, xd) = xa.row(tok);
            let pq = &mut q[tok * pairs * PAIR..(tok + 1) * pairs * PAIR];
            for (src, dst) in xq.chunks(PAIR).zip(pq.chunks_exact_mut(PAIR)) {
                for (&v, &j) in src.iter().zip(&slot) {
                    dst[j] = v;
                }
            }
            d[tok * pairs * 2..][..nb].copy_from_slice(xd);
        }
        PairedActs { q, d, pairs }
    }

    /// Row `r`'s values and scales.
    fn row(&self, r: usize) -> ActRow {
        ActRow {
            q: self.q[r * self.pairs * PAIR..].as_ptr(),
            d: self.d[r * self.pairs * 2..].as_ptr(),
        }
    }
}

/// `n` consecutive rows' dot products into `out[0..n]`: rows `w`, `w + nb · 32`, …
/// with scales `ws`, `ws + nb`, …, against one quantized activation row.
///
/// Why a loop inside each path's function rather than a call per row from the
/// driver: with the loop inside the path's target features storing the results,
/// decode streams the weights faster than with the driver storing each call's
/// result (docs/benchmarks-history.md: "Each path loops over its task's rows
/// itself"). The row itself stays a call (see `row_avx2`).
///
/// # Safety
/// `w` addresses `n` rows of `nb · 32` bytes, `ws` their `n · nb` f16 scales, `x` one
/// activation row in the paired layout ([`PairedActs`]), `sc` scratch for `nb + 1`
/// floats and `out` `n` floats; the function's target features are present.
type RowsFn = unsafe fn(
    w: *const i8,
    ws: *const f16,
    x: ActRow,
    nb: usize,
    sc: *mut f32,
    n: usize,
    out: *mut f32,
);

/// A task's `n` consecutive weight rows (as [`RowsFn`]) against the `t` activation
/// rows of one [`ActGroup`] ([`GroupTask`]): output `(k, r)` goes to
/// `out[k · stride + r]`. Each output is the same dot product a [`RowsFn`] gives.
///
/// Why: a decode step of several sequences (continuous batching) multiplies each
/// weight row by several activation rows. Row by row, each product is one chain of
/// dependent FMAs, and its latency, not memory, bounds the step; interleaving the
/// activation rows' chains on one sign-extended weight block hides it, and reads the
/// weights from memory once for all of them.
///
/// # Safety
/// `w` addresses `n` rows of `nb · 32` bytes, `ws` their `n · nb` f16 scales; `x` and
/// `xd` an [`ActGroup`] of `t` rows and `nb` blocks, `1 ≤ t ≤` the loop's most
/// ([`group_fn`]); `sc` scratch for
/// [`GROUP_SCRATCH`]` · (nb + 1)` floats; `out` holds `(t − 1) · stride + n` floats; the
/// function's target features are present.
#[cfg(target_arch = "x86_64")]
type GroupFn = unsafe fn(GroupTask);

/// What a [`GroupFn`] works on.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct GroupTask {
    /// `n` weight rows of `nb · 32` bytes.
    w: *const i8,
    /// Their `n · nb` scales.
    ws: *const f16,
    /// The group's values ([`ActGroup::q`]).
    x: *const i16,
    /// The group's scales ([`ActGroup::d`]).
    xd: *const f32,
    /// Activation rows in the group.
    t: usize,
    nb: usize,
    /// Scratch for [`GROUP_SCRATCH`]` · (nb + 1)` floats.
    sc: *mut f32,
    n: usize,
    /// Output `(k, r)` at `out[k · stride + r]`.
    out: *mut f32,
    stride: usize,
}

/// Most activation rows in one [`ActGroup`] (the AVX-512 kernel's; AVX2 takes four).
#[cfg(target_arch = "x86_64")]
const GROUP_MAX: usize = 8;

/// Scratch floats per block a [`GroupFn`] needs: on AVX2 the scale products of one
/// weight row against a group (two per activation row, eight rows' worth per pair) and
/// the row's scales in f32; on AVX-512 two rows' scales in f32.
#[cfg(target_arch = "x86_64")]
const GROUP_SCRATCH: usize = 2 * GROUP_MAX + 1;

/// Up to [`GROUP_MAX`] activation rows in the paired layout, interleaved pair by pair
/// so that a kernel finds every row's pair `c` side by side at fixed offsets: row `k`'s
/// pair `c` at `q[(c · t + k) · 64 ..]`, its two scales at `d[(c · 8 + k) · 2 ..]`
/// (the scales of rows past `t` zero).
#[cfg(target_arch = "x86_64")]
struct ActGroup {
    q: Vec<i16>,
    d: Vec<f32>,
    t: usize,
}

#[cfg(target_arch = "x86_64")]
impl ActGroup {
    /// Rows `k0 .. k0 + t` of `xp`.
    fn gather(xp: &PairedActs, k0: usize, t: usize) -> ActGroup {
        assert!(t > 0 && t <= GROUP_MAX);
        let pairs = xp.pairs;
        let mut q = vec![0i16; t * pairs * PAIR];
        let mut d = vec![0f32; pairs * GROUP_MAX * 2];
        for k in 0..t {
            let r = k0 + k;
            let xq = &xp.q[r * pairs * PAIR..(r + 1) * pairs * PAIR];
            let xd = &xp.d[r * pairs * 2..(r + 1) * pairs * 2];
            for c in 0..pairs {
                q[(c * t + k) * PAIR..][..PAIR].copy_from_slice(&xq[c * PAIR..][..PAIR]);
                d[(c * GROUP_MAX + k) * 2..][..2].copy_from_slice(&xd[2 * c..2 * c + 2]);
            }
        }
        ActGroup { q, d, t }
    }
}

/// One quantized activation row in the paired layout, as a [`RowsFn`] reads it:
/// `pairs · 64` int16 values and `pairs · 2` scales ([`PairedActs`]).
#[derive(Clone, Copy)]
struct ActRow {
    q: *const i16,
    d: *const f32,
}

/// Rows a [`RowsFn`] gathers on the stack before writing them out.
const ROWS_MAX: usize = 64;

/// Defines a [`RowsFn`] named `$name` looping `$row` under the attributes given.
macro_rules! rows_of {
    ($(#[$attr:meta])* $vis:vis $name:ident, $row:expr) => {
        $(#[$attr])*
        $vis unsafe fn $name(
            w: *const i8,
            ws: *const f16,
            x: $crate::matvec::ActRow,
            nb: usize,
            sc: *mut f32,
            n: usize,
            out: *mut f32,
        ) {
            // Results gather on the stack and reach `out` once per 64 rows.
            let mut done = 0;
            while done < n {
                let m = (n - done).min($crate::matvec::ROWS_MAX);
                let mut loc = [0f32; $crate::matvec::ROWS_MAX];
                for (i, v) in loc[..m].iter_mut().enumerate() {
                    let r = done + i;
                    // SAFETY: see `RowsFn`.
                    *v = unsafe { $row(w.add(r * nb * BLOCK), ws.add(r * nb), x.q, x.d, nb, sc) };
                }
                // SAFETY: out addresses n floats (`RowsFn`); done + m ≤ n.
                unsafe { std::ptr::copy_nonoverlapping(loc.as_ptr(), out.add(done), m) };
                done += m;
            }
        }
    };
}

rows_of!(
    /// [`row_portable`] over consecutive rows.
    rows_portable,
    row_portable
);

/// The portable row (the reference of every path).
unsafe fn row_portable(
    w: *const i8,
    ws: *const f16,
    xq: *const i16,
    xd: *const f32,
    nb: usize,
    _sc: *mut f32,
) -> f32 {
    let n = nb * BLOCK;
    // SAFETY: see `RowsFn` (for one row); the paired row holds every paired_index of
    // its nb blocks.
    unsafe {
        let xq = std::slice::from_raw_parts(xq, nb.div_ceil(2) * PAIR);
        dot_portable_by(
            std::slice::from_raw_parts(w, n),
            std::slice::from_raw_parts(ws, nb),
            |i| xq[paired_index(i / BLOCK, i % BLOCK)],
            std::slice::from_raw_parts(xd, nb),
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
mod neon;

/// The software prefetch of the decode kernel's weight stream, 8 KiB ahead along a
/// task's rows (x86 only; the hardware prefetchers stop at 4 KiB pages).
///
/// Which hint reads fastest depends on the CPU. On Intel the non-temporal hint fills
/// L1 only, so the L2 streamer never sees the stream: there `prefetchnta` read the
/// weights slower than no prefetch at all, and `prefetcht1` (4–32 KiB ahead) fastest
/// of the hints; on Zen 3 `prefetchnta` read fastest (docs/benchmarks-history.md:
/// "Decode prefetches into L2 on Intel"). So the vendor picks ([`prefetch`]),
/// `Q3VL_DECODE_PREFETCH` ([`PREFETCH_VAR`]) overrides it, and `q3vl bench` times the
/// decode sweep with each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// `prefetcht1`: into L2 (Intel's default).
    L2,
    /// `prefetchnta`: non-temporal (every other vendor's default).
    Nta,
}

impl Prefetch {
    /// Both variants.
    pub const ALL: [Prefetch; 2] = [Prefetch::L2, Prefetch::Nta];

    /// The variant's name, as `Q3VL_DECODE_PREFETCH` takes it and reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Prefetch::L2 => "l2",
            Prefetch::Nta => "nta",
        }
    }
}

/// The environment variable naming the decode prefetch to issue instead of the
/// vendor's choice (`l2` or `nta`).
pub const PREFETCH_VAR: &str = "Q3VL_DECODE_PREFETCH";

/// The prefetch `Q3VL_DECODE_PREFETCH` asks for: `Ok(None)` when it is unset or
/// empty, an error naming the variable and its value when it names no variant.
pub fn requested_prefetch() -> Result<Option<Prefetch>, String> {
    match std::env::var(PREFETCH_VAR) {
        Ok(v) if !v.is_empty() => Prefetch::ALL
            .into_iter()
            .find(|p| p.name() == v.to_ascii_lowercase())
            .map(Some)
            .ok_or_else(|| format!("{PREFETCH_VAR}={v:?} is not a decode prefetch (l2 or nta)")),
        _ => Ok(None),
    }
}

/// The prefetch the decode kernel issues, chosen once: `Q3VL_DECODE_PREFETCH`'s,
/// else into L2 on Intel CPUs and non-temporal elsewhere (a bad value is the
/// caller's to report, through [`requested_prefetch`]; here it falls back).
pub fn prefetch() -> Prefetch {
    static CHOSEN: std::sync::OnceLock<Prefetch> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        requested_prefetch()
            .ok()
            .flatten()
            .unwrap_or_else(vendor_prefetch)
    })
}

/// The vendor's prefetch: into L2 on Intel, non-temporal elsewhere.
fn vendor_prefetch() -> Prefetch {
    #[cfg(target_arch = "x86_64")]
    if x86::is_intel() {
        return Prefetch::L2;
    }
    Prefetch::Nta
}

/// The row loop of `path` with prefetch `pf` (see the module's paths). Panics if the
/// CPU lacks the path.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn rows_fn(path: Path, pf: Prefetch) -> RowsFn {
    assert_available(path);
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 if pf == Prefetch::L2 => x86::rows_avx2_l2,
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => x86::rows_avx2_nta,
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni if pf == Prefetch::L2 => x86::rows_avx512_l2,
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => x86::rows_avx512_nta,
        #[cfg(target_arch = "aarch64")]
        Path::Neon => neon::rows_neon,
        _ => rows_portable,
    }
}

/// The group loop of `path` with prefetch `pf`, where it has one, and the most
/// activation rows it takes.
#[cfg(target_arch = "x86_64")]
fn group_fn(path: Path, pf: Prefetch) -> Option<(GroupFn, usize)> {
    assert_available(path);
    match path {
        Path::Avx2 if pf == Prefetch::L2 => Some((x86::groups_avx2_l2, 4)),
        Path::Avx2 => Some((x86::groups_avx2_nta, 4)),
        Path::Avx512Vnni if pf == Prefetch::L2 => Some((x86::groups_avx512_l2, GROUP_MAX)),
        Path::Avx512Vnni => Some((x86::groups_avx512_nta, GROUP_MAX)),
        _ => None,
    }
}

/// `out[t, r] = Σ_c x[t, c] · W[r, c]` for int8 `W` (`rows × cols`, f16 block scales
/// `s`) and f32 activations `x` (`tokens × cols`), quantized here to int16 per block
/// ([`Acts16`]); `out` is `tokens × rows`. Each output is one dot product with the
/// module's arithmetic. Parallel over tasks of weight rows on the current rayon pool;
/// meant for decode (one token), where the weights stream from memory once.
pub fn matvec(q: &[i8], s: &[f16], rows: usize, cols: usize, x: &[f32], out: &mut [f32]) {
    matvec_on(best_path(), q, s, rows, cols, x, out)
}

/// [`matvec`] on a given path (tests compare the paths).
pub fn matvec_on(
    path: Path,
    q: &[i8],
    s: &[f16],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) {
    matvec_prefetching(path, prefetch(), q, s, rows, cols, x, out)
}

/// [`matvec_on`] with a given prefetch (the benchmark times both; the bits are the
/// same).
#[allow(clippy::too_many_arguments)]
pub fn matvec_prefetching(
    path: Path,
    pf: Prefetch,
    q: &[i8],
    s: &[f16],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) {
    assert!(cols.is_multiple_of(BLOCK) && cols > 0);
    let (nb, t) = (cols / BLOCK, x.len() / cols);
    assert_eq!(x.len(), t * cols);
    assert_eq!(q.len(), rows * cols);
    assert_eq!(s.len(), rows * nb);
    assert_eq!(out.len(), t * rows);
    if rows == 0 || t == 0 {
        return;
    }
    let rows_of_path = rows_fn(path, pf);
    let xp = PairedActs::new(&Acts16::quantize_on(path, x, cols));
    #[cfg(target_arch = "x86_64")]
    if t > 1 {
        if let Some((group, most)) = group_fn(path, pf) {
            return matvec_groups(group, most, q, s, rows, cols, &xp, out);
        }
    }
    // About 32 KiB of weights per task: small tasks balance the threads; one row at
    // a time keeps a single sequential stream per thread, which the prefetchers
    // follow best.
    let mc = ((32 << 10) / cols).clamp(1, 64);
    let optr = OutPtr(out.as_mut_ptr());
    (0..rows.div_ceil(mc)).into_par_iter().for_each_init(
        || vec![0f32; nb + 1],
        |sc, task| {
            let (r0, r1) = (task * mc, ((task + 1) * mc).min(rows));
            for tok in 0..t {
                // SAFETY: rows r0..r1 of q and s and token tok of xp are in bounds
                // (checked lengths); sc holds nb + 1 floats; the path was detected on
                // this CPU; outputs (tok, r0..r1) are inside `out` and only this task
                // writes them.
                unsafe {
                    rows_of_path(
                        q.as_ptr().add(r0 * cols),
                        s.as_ptr().add(r0 * nb),
                        xp.row(tok),
                        nb,
                        sc.as_mut_ptr(),
                        r1 - r0,
                        optr.get().add(tok * rows + r0),
                    )
                };
            }
        },
    );
}

/// [`matvec_on`] for several activation rows with a group loop: the activation rows
/// gathered into groups of at most `most`, then the same tasks of weight rows, each
/// running every group against its rows.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn matvec_groups(
    group: GroupFn,
    most: usize,
    q: &[i8],
    s: &[f16],
    rows: usize,
    cols: usize,
    xp: &PairedActs,
    out: &mut [f32],
) {
    let (nb, t) = (cols / BLOCK, xp.d.len() / (2 * xp.pairs));
    let groups: Vec<(usize, ActGroup)> = (0..t)
        .step_by(most)
        .map(|k0| (k0, ActGroup::gather(xp, k0, (t - k0).min(most))))
        .collect();
    let mc = ((32 << 10) / cols).clamp(1, 64);
    let optr = OutPtr(out.as_mut_ptr());
    (0..rows.div_ceil(mc)).into_par_iter().for_each_init(
        || vec![0f32; GROUP_SCRATCH * (nb + 1)],
        |sc, task| {
            let (r0, r1) = (task * mc, ((task + 1) * mc).min(rows));
            for (k0, g) in &groups {
                // SAFETY: rows r0..r1 of q and s are in bounds and every group holds
                // g.t rows of nb blocks (checked lengths in matvec_on); sc holds
                // GROUP_SCRATCH · (nb + 1) floats; the path was detected on this CPU; outputs
                // (k0.., r0..r1) are inside `out` and only this task writes them.
                unsafe {
                    group(GroupTask {
                        w: q.as_ptr().add(r0 * cols),
                        ws: s.as_ptr().add(r0 * nb),
                        x: g.q.as_ptr(),
                        xd: g.d.as_ptr(),
                        t: g.t,
                        nb,
                        sc: sc.as_mut_ptr(),
                        n: r1 - r0,
                        out: optr.get().add(k0 * rows + r0),
                        stride: rows,
                    })
                };
            }
        },
    );
}

#[cfg(test)]
mod tests;
