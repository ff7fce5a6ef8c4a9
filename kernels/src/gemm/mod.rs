//! f32 matrix products for the vision tower (and prefill attention): a packed,
//! cache-blocked GEMM with a 6 × 16 AVX2/FMA register kernel, or a 6 × 32 AVX-512
//! one over two adjacent panels where the CPU has it (the same chains, so the same
//! bits). Per `kk` the AVX-512 tile does the multiply-adds of two AVX2 tiles with half
//! the instructions (12 FMAs of 16 lanes instead of 24 of 8, 6 broadcasts instead of
//! 12, 2 loads instead of 4). So it is the faster on a core whose 512-bit FMAs retire
//! more lanes per cycle than its 256-bit ones, or where issuing the AVX2 tile's
//! instructions, not the FMA units, limits it; it was on the AVX-512 host measured
//! (the vision rows of the "Kernel A/B, one process per path" table in
//! docs/benchmarks-history.md). The "weight" operand can be f16 (the vision tower's
//! tensors), widened to f32 once per cache tile while it is packed, so no f32 copy of
//! a tensor is ever made.
//!
//! Blocking (per task of up to 256 output columns): for each [`KC`]-long slice of
//! the reduction the weight tile (`columns × KC`) is packed and stays in L2; `MC`
//! rows of the packed activations ([`PackedA`]) at a time stay in L2; each register
//! tile (`MR × NR`) sums its slice in registers and adds it to the output.
//!
//! Determinism: an output element is always the same chain, `((0 + s₀) + s₁) + …`
//! over the `KC` slices in order, each slice a sequential fused multiply-add chain
//! over its `k`; how columns are split into tasks (which depends on the thread
//! count) never changes that chain.
//!
//! Paths: the AVX2 and AVX-512 paths run the AVX2 packing; the AVX2 path its tile, the
//! AVX-512 path a two-panel tile and a one-panel tile of 512-bit lanes (the tests check
//! they equal two AVX2 tiles and one, bit for bit);
//! the portable tile rounds each multiply-add (no FMA), so it agrees with the SIMD
//! tiles to rounding, not bit for bit. There is no NEON tile: aarch64 runs the
//! portable one. The tests run every entry on every path the CPU has: each path's
//! packing equals the portable packing bit for bit, and each path's products agree
//! with the portable ones within the bound of their roundings (stated in the test).

use crate::path::{assert_available, best_path, Path};
use crate::OutPtr;
use half::f16;
use rayon::prelude::*;
use std::ops::Range;

mod pack;
#[cfg(target_arch = "x86_64")]
mod x86;

use pack::{pack_b, ASrc};
pub use pack::{PackedA, PackedB};

/// The C-tile prefetch and the 8 × 8 register transpose, shared with the int16 GEMM.
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{prefetch_tile, transpose8};

/// Rows of the register tile.
pub const MR: usize = 6;
/// Columns of the register tile.
pub const NR: usize = 16;
/// Reduction slice per packing pass.
pub const KC: usize = 256;
/// Rows of activations per L2 block.
const MC: usize = 16 * MR;
/// Columns of `B` packed at a time by the serial entries and [`PackedB`] (a
/// multiple of [`NR`]); also the narrowest parallel task.
pub const NC: usize = 64;
/// The widest parallel task of [`linear_f16`], in output columns: its `B` tile
/// (`MAX_TASK_COLS × KC` f32, 256 KiB) stays in L2.
const MAX_TASK_COLS: usize = 256;

/// The "weight" operand `B`, read as `B[j, kk]` for output column `j` and reduction
/// index `kk`.
#[derive(Clone, Copy)]
pub enum BSrc<'a> {
    /// f16, `B[j, kk] = w[j·k + kk]` (a PyTorch `Linear` weight `[n, k]`).
    F16(&'a [f16]),
    /// int8 per-block-32 (`docs/quantization.md`), dequantized exactly while packing:
    /// `B[j, kk] = f32(q[j·k + kk]) · f32(s[j·k/32 + kk/32])` (8 × 11 significant
    /// bits, so the f32 product is exact). Only with the cargo feature `q8`.
    #[cfg(feature = "q8")]
    Q8 {
        /// `[n, k]` values.
        q: &'a [i8],
        /// `[n, k/32]` block scales.
        s: &'a [f16],
    },
    /// f32 with strides: `B[j, kk] = data[j·rs + kk·cs]`.
    F32 {
        /// The values.
        data: &'a [f32],
        /// Stride between output columns.
        rs: usize,
        /// Stride along the reduction.
        cs: usize,
    },
}

/// A row-major f32 matrix read in place: element `(i, j)` at `data[i·stride + j]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    /// The elements (at least `(rows − 1)·stride + cols` of them).
    pub data: &'a [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Elements from one row's start to the next's (≥ `cols`).
    pub stride: usize,
}

/// A row-major f32 matrix written in place: element `(i, j)` at `data[i·stride + j]`
/// (elements past `cols` in a row are not touched).
pub struct MatMut<'a> {
    /// The elements (at least `(rows − 1)·stride + cols` of them).
    pub data: &'a mut [f32],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Elements from one row's start to the next's (≥ `cols`).
    pub stride: usize,
}

impl MatMut<'_> {
    /// Panics unless the view's rows fit its data.
    fn check(&self) {
        let MatMut {
            ref data,
            rows,
            cols,
            stride,
        } = *self;
        assert!(cols <= stride && (rows == 0 || data.len() >= (rows - 1) * stride + cols));
    }
}

/// One register tile: `c[i·ldc + j] (=|+=) Σ_kk a[kk·MR + i] · b[kk·NR + j]` for
/// `i < MR`, `j < NR`, `kk` in order; stores when `first`, else adds.
///
/// # Safety
/// `a` holds `kc·MR` floats, `b` holds `kc·NR`, `c` addresses an `MR × NR` tile with
/// row stride `ldc`, and the function's target features are present.
type MicroFn =
    unsafe fn(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, first: bool);

/// Portable register tile (unfused multiply-add; the SIMD path fuses, so the two
/// agree to rounding, not bit for bit).
unsafe fn micro_portable(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for kk in 0..kc {
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: see `MicroFn`.
            let av = unsafe { *a.add(kk * MR + i) };
            for (j, v) in row.iter_mut().enumerate() {
                *v += av * unsafe { *b.add(kk * NR + j) };
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            // SAFETY: see `MicroFn`.
            let p = unsafe { c.add(i * ldc + j) };
            unsafe { *p = if first { *v } else { *p + *v } };
        }
    }
}

/// The register tiles of a path: the one-panel tile, and the tile over two adjacent
/// full panels (`MR` × 2[`NR`]) where the path has one (AVX-512).
#[derive(Clone, Copy)]
struct Tiles {
    one: MicroFn,
    pair: Option<MicroFn>,
}

/// The register tiles of `path`.
fn tiles(path: Path) -> Tiles {
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Vnni => Tiles {
            one: x86::micro_avx512_one,
            pair: Some(x86::micro_avx512_pair),
        },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => Tiles {
            one: x86::micro_avx2,
            pair: None,
        },
        _ => Tiles {
            one: micro_portable,
            pair: None,
        },
    }
}

/// Where [`gemm_cols`] gets its `B` tiles.
#[derive(Clone, Copy)]
enum BOp<'a> {
    /// Packed tile by tile from the source (weights: no full copy).
    Src(BSrc<'a>),
    /// Already packed.
    Packed(&'a PackedB),
}

/// Where a product writes `C[i, j]`: at `c + i·ldc + j`, plus `bias[j]` (indexed by
/// column) when there is a bias.
#[derive(Clone, Copy)]
struct Dest<'a> {
    c: *mut f32,
    ldc: usize,
    bias: Option<&'a [f32]>,
}

/// One register tile's place in C: `rows × cols` elements from `c` (row stride
/// `ldc`); `first` when its reduction slice is the product's first.
#[derive(Clone, Copy)]
pub(crate) struct CTile {
    pub(crate) c: *mut f32,
    pub(crate) ldc: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) first: bool,
}

/// `C[i, j] = Σ_kk A[i, kk] · B[j, kk]` for all rows and the columns `cols`, on the
/// calling thread, `chunk` columns of `B` packed at a time (a multiple of [`NR`];
/// [`NC`] for a [`PackedB`]). With a bias, `C[i, j] + bias[j]` is stored instead,
/// added to each tile after its last slice while the tile is still in cache: the
/// same two roundings as a separate pass over `C`, without the pass.
///
/// # Safety
/// `dst.c` addresses `a.m` rows of `dst.ldc` floats with `cols.end ≤ dst.ldc`, no
/// other thread touches columns `cols` meanwhile, and a bias holds at least
/// `cols.end` values.
unsafe fn gemm_cols(
    path: Path,
    a: &PackedA,
    b: BOp<'_>,
    cols: Range<usize>,
    chunk: usize,
    dst: Dest<'_>,
) {
    let k = a.k;
    let kern = tiles(path);
    // The B tile buffer is kept per thread: a fresh one per call (up to 256 KiB)
    // costs a memset and page faults every time.
    let mut bp = B_TILE.take();
    if matches!(b, BOp::Src(_)) && bp.len() < chunk * KC {
        bp.resize(chunk * KC, 0.0);
    }
    let mut row = vec![0f32; KC];
    let mut buf = [0f32; MR * NR];
    let mut n0 = cols.start;
    while n0 < cols.end {
        let n1 = (n0 + chunk).min(cols.end);
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            let bt: &[f32] = match b {
                BOp::Src(src) => {
                    pack_b(path, src, k, n0..n1, k0..k0 + kc, &mut bp, &mut row);
                    &bp
                }
                BOp::Packed(pb) => pb.tile(n0, n1, k0),
            };
            let dst = Dest {
                bias: dst.bias.filter(|_| k0 + kc == k),
                ..dst
            };
            // SAFETY: as this function's; bt holds the tile's panels.
            unsafe { slice_tiles(kern, a, bt, k0..k0 + kc, n0..n1, dst, &mut buf) };
            k0 += kc;
        }
        n0 = n1;
    }
    B_TILE.set(bp);
}

/// Every register tile of one reduction slice `ks` over the packed `B` tile `bt` of
/// columns `cols`: all rows of `a`, stored (first slice) or added to `dst`.
///
/// # Safety
/// As [`gemm_cols`]'; `bt` holds `cols` padded to panels × `ks.len()`.
unsafe fn slice_tiles(
    kern: Tiles,
    a: &PackedA,
    bt: &[f32],
    ks: Range<usize>,
    cols: Range<usize>,
    dst: Dest<'_>,
    buf: &mut [f32; MR * NR],
) {
    let m = a.m;
    let (k0, kc, n0, n1) = (ks.start, ks.len(), cols.start, cols.end);
    let mut ic = 0;
    while ic < m {
        let mc = MC.min(m - ic);
        let panels = (n1 - n0).div_ceil(NR);
        let mut p = 0;
        while p < panels {
            let jc = n0 + p * NR;
            // Two full panels at once where the path has a tile for them.
            let pair = kern.pair.filter(|_| jc + 2 * NR <= n1);
            let span = if pair.is_some() { 2 } else { 1 };
            let cols = (span * NR).min(n1 - jc);
            let bptr = bt[p * kc * NR..(p + span) * kc * NR].as_ptr();
            let mut ir = ic;
            while ir < ic + mc {
                let t = CTile {
                    // SAFETY: row ir, column jc is inside C.
                    c: unsafe { dst.c.add(ir * dst.ldc + jc) },
                    ldc: dst.ldc,
                    rows: MR.min(m - ir),
                    cols,
                    first: k0 == 0,
                };
                let tiles = Tiles { pair, ..kern };
                // SAFETY: the A panel holds kc·MR floats, the B panels span·kc·NR;
                // the tile is inside C.
                unsafe { run_tile(tiles, kc, a.panel(k0, kc, ir), bptr, t, buf) };
                if let Some(bv) = dst.bias {
                    // SAFETY: as above; the bias holds n1 ≥ jc + cols values.
                    unsafe { add_bias(t, &bv[jc..jc + cols]) };
                }
                ir += MR;
            }
            p += span;
        }
        ic += mc;
    }
}

/// One register tile into `t`: `kern.pair` (already filtered to two full panels)
/// on a full pair, `kern.one` on a full tile, else `kern.one` into `buf` per panel,
/// copied (first slice) or added to C.
///
/// # Safety
/// `aptr` holds `kc·MR` floats, `bptr` `kc·NR` per panel of `t`; `t` lies inside C.
unsafe fn run_tile(
    kern: Tiles,
    kc: usize,
    aptr: *const f32,
    bptr: *const f32,
    t: CTile,
    buf: &mut [f32; MR * NR],
) {
    let CTile {
        c: out,
        ldc,
        rows,
        cols,
        first,
    } = t;
    let span = if kern.pair.is_some() { 2 } else { 1 };
    // SAFETY: as this function's.
    unsafe {
        match kern.pair {
            Some(kp) if rows == MR => kp(kc, aptr, bptr, out, ldc, first),
            None if rows == MR && cols == NR => (kern.one)(kc, aptr, bptr, out, ldc, first),
            _ => {
                for u in 0..span {
                    let bu = bptr.add(u * kc * NR);
                    (kern.one)(kc, aptr, bu, buf.as_mut_ptr(), NR, true);
                    for i in 0..rows {
                        for j in 0..NR.min(cols - u * NR) {
                            let p = out.add(i * ldc + u * NR + j);
                            let v = buf[i * NR + j];
                            *p = if first { v } else { *p + v };
                        }
                    }
                }
            }
        }
    }
}

/// Adds `bias[j]` to column `j` of every row of the tile `t` (`bias` holds its
/// `t.cols` values).
///
/// # Safety
/// `t` lies inside C, and no other thread touches it.
unsafe fn add_bias(t: CTile, bias: &[f32]) {
    for i in 0..t.rows {
        // SAFETY: as this function's.
        let row = unsafe { std::slice::from_raw_parts_mut(t.c.add(i * t.ldc), t.cols) };
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

thread_local! {
    /// [`gemm_cols`]' packing buffer for `B` tiles, reused by the thread's next call.
    static B_TILE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `out[i, j] = Σ_kk x[i, kk] · w[j, kk] (+ bias[j])`: `x` is `m × k` f32, `w` is the
/// f16 `n × k` weight (PyTorch `Linear` layout), `out` is `m × n`, all row-major.
/// Parallel over tasks of [`NC`] columns on the current rayon pool.
pub fn linear_f16(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f16],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(w.len(), n * k);
    let l = Linear {
        x,
        m,
        k,
        b: BSrc::F16(w),
        n,
        bias,
    };
    linear_on(best_path(), l, out);
}

/// [`linear_f16`] into a new vector, which is never zeroed: the product writes
/// every element (zeroing a vision tower's outputs first cost about 1% of an encode,
/// on the allocating thread alone).
pub fn linear_f16_vec(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f16],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(w.len(), n * k);
    let l = Linear {
        x,
        m,
        k,
        b: BSrc::F16(w),
        n,
        bias,
    };
    linear_vec_on(best_path(), l)
}

/// `out[i, j] = Σ_kk x[i, kk] · W[j, kk]` for an int8 per-block-32 weight `W`
/// (`q`: `[n, k]`, `s`: `[n, k/32]` f16 scales), dequantized exactly tile by tile
/// while packing: the reference's arithmetic on the bundle's weights, up to the
/// summation order. Parallel as [`linear_f16`]. The engine's prefill used this until
/// [`crate::gemm16`] replaced it; the engine's comparison benchmarks still measure
/// it beside that (cargo feature `q8`).
#[cfg(feature = "q8")]
pub fn linear_q8(x: &[f32], m: usize, k: usize, q: &[i8], s: &[f16], n: usize, out: &mut [f32]) {
    assert!(k.is_multiple_of(32));
    assert_eq!(q.len(), n * k);
    assert_eq!(s.len(), n * k / 32);
    let l = Linear {
        x,
        m,
        k,
        b: BSrc::Q8 { q, s },
        n,
        bias: None,
    };
    linear_on(best_path(), l, out);
}

/// [`linear_f16`] for an f32 weight (the tests' product on exact f32 weights).
#[cfg(test)]
pub(crate) fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(w.len(), n * k);
    let b = BSrc::F32 {
        data: w,
        rs: k,
        cs: 1,
    };
    let l = Linear {
        x,
        m,
        k,
        b,
        n,
        bias,
    };
    linear_on(best_path(), l, out);
}

/// The operands of one linear product: `x` (`m × k`, row-major), the weight `b` (`n`
/// columns of `k` values) and an optional bias of `n` values.
#[derive(Clone, Copy)]
pub(crate) struct Linear<'a> {
    pub(crate) x: &'a [f32],
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) b: BSrc<'a>,
    pub(crate) n: usize,
    pub(crate) bias: Option<&'a [f32]>,
}

/// The linear entries on a given path, which this CPU must run: `out[i, j] =
/// Σ_kk x[i, kk] · B[j, kk] (+ bias[j])` into `out` (`m × n`, row-major).
pub(crate) fn linear_on(path: Path, l: Linear<'_>, out: &mut [f32]) {
    assert_available(path);
    let Linear { m, k, n, bias, .. } = l;
    assert_eq!(out.len(), m * n);
    l.check();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in out.chunks_exact_mut(n) {
            match bias {
                Some(bv) => row.copy_from_slice(bv),
                None => row.fill(0.0),
            }
        }
    } else {
        // SAFETY: `out` holds m·n floats (checked above), borrowed for the call.
        unsafe { linear_product(path, l, out.as_mut_ptr()) };
    }
}

/// [`linear_on`] into a new vector, never zeroed (see [`linear_f16_vec`]).
pub(crate) fn linear_vec_on(path: Path, l: Linear<'_>) -> Vec<f32> {
    let Linear { m, k, n, .. } = l;
    if m == 0 || n == 0 || k == 0 {
        let mut out = vec![0f32; m * n];
        linear_on(path, l, &mut out);
        return out;
    }
    assert_available(path);
    l.check();
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the capacity is m·n floats; the product writes each of them (every
    // register tile's first reduction slice stores its elements), so all are
    // initialized before the length is set.
    unsafe {
        linear_product(path, l, out.as_mut_ptr());
        out.set_len(m * n);
    }
    out
}

impl Linear<'_> {
    /// Panics unless `x` is `m × k` and a bias holds `n` values (the public entries
    /// check their weight; this checks `b` holds at least `n × k`).
    fn check(&self) {
        assert_eq!(self.x.len(), self.m * self.k);
        if let Some(bv) = self.bias {
            assert_eq!(bv.len(), self.n);
        }
        check_b(self.b, self.n, self.k);
    }
}

/// The output columns of one parallel task of an `n`-column product on the current
/// rayon pool (a multiple of [`NR`], from [`NC`] to 256; the int16 GEMM uses it too).
/// About eight tasks per thread: a thread that finishes early steals the next one, so
/// the last task leaves the other thread idle for a small fraction of the product
/// (with three per thread, the 8B vision's 1152-column products were six tasks, and
/// one slow task idled a core for a sixth of the time). Narrower tasks re-read the
/// packed activations from cache more often, which costs little. The split never
/// changes a value (see the module docs).
pub(crate) fn task_width(n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    (n.div_ceil(8 * threads).div_ceil(NR) * NR).clamp(NC, MAX_TASK_COLS)
}

/// The parallel product behind the linear entries, once their shapes are checked
/// (`m, n, k > 0`): writes every element of the `m × n` output at `out`.
///
/// # Safety
/// `out` addresses `m·n` floats that nothing else touches during the call; this CPU
/// runs `path`.
unsafe fn linear_product(path: Path, l: Linear<'_>, out: *mut f32) {
    let Linear {
        x,
        m,
        k,
        b,
        n,
        bias,
    } = l;
    // The activations are packed once, shared by every column task.
    let a = PackedA::pack(path, ASrc::Rows { data: x, lda: k }, m, k, true);
    let width = task_width(n);
    let optr = OutPtr(out);
    (0..n.div_ceil(width)).into_par_iter().for_each(|t| {
        let j0 = t * width;
        let dst = Dest {
            c: optr.get(),
            ldc: n,
            bias,
        };
        // SAFETY: `out` is m × n; this task alone writes columns j0..j0+width;
        // a bias holds n values.
        unsafe { gemm_cols(path, &a, BOp::Src(b), j0..(j0 + width).min(n), width, dst) };
    });
}

/// `c = a · bᵀ` on the calling thread: `a` is `m × k`, `b` as in [`BSrc`] (`n =
/// c.cols` columns of `k = a.cols`), `c` is `m × n` (`c.rows = a.rows`).
pub fn gemm_serial(a: MatRef<'_>, b: BSrc<'_>, c: MatMut<'_>) {
    gemm_serial_on(best_path(), a, b, c)
}

/// [`gemm_serial`] on a given path, which this CPU must run.
pub(crate) fn gemm_serial_on(path: Path, a: MatRef<'_>, b: BSrc<'_>, c: MatMut<'_>) {
    assert_eq!(a.rows, c.rows);
    c.check();
    check_b(b, c.cols, a.cols);
    serial(path, a, BOp::Src(b), c);
}

/// `c = a · bᵀ` on the calling thread with a pre-packed `a` ([`PackedA`], for an
/// operand shared by many products: attention's transposed V); `b` as in [`BSrc`]
/// (`n` columns), `c` is `a.m × n` with row stride `ldc`. The results equal
/// [`gemm_serial`]'s on the same operands bit for bit.
pub fn gemm_serial_packed_a(a: &PackedA, b: BSrc<'_>, n: usize, c: &mut [f32], ldc: usize) {
    gemm_serial_packed_a_on(best_path(), a, b, n, c, ldc)
}

/// [`gemm_serial_packed_a`] on a given path, which this CPU must run (`a` may have
/// been packed on any path: every path packs the same bits).
pub(crate) fn gemm_serial_packed_a_on(
    path: Path,
    a: &PackedA,
    b: BSrc<'_>,
    n: usize,
    c: &mut [f32],
    ldc: usize,
) {
    assert_available(path);
    let (m, k) = (a.m, a.k);
    let mut c = MatMut {
        data: c,
        rows: m,
        cols: n,
        stride: ldc,
    };
    c.check();
    check_b(b, n, k);
    if empty_product(k, &mut c) {
        return;
    }
    let dst = Dest {
        c: c.data.as_mut_ptr(),
        ldc,
        bias: None,
    };
    // SAFETY: c holds m rows of ldc ≥ n floats (checked above), used by this thread
    // only; this CPU runs the path (checked above).
    unsafe { gemm_cols(path, a, BOp::Src(b), 0..n, NC, dst) };
}

/// `c = a · bᵀ` on the calling thread with a pre-packed `b` ([`PackedB`]); `a` is
/// `m × b.k` with row stride `lda`, `c` is `m × b.n` with row stride `ldc`. The
/// results equal [`gemm_serial`]'s on the same operands bit for bit.
pub fn gemm_serial_packed(a: &[f32], m: usize, lda: usize, b: &PackedB, c: &mut [f32], ldc: usize) {
    let a = MatRef {
        data: a,
        rows: m,
        cols: b.k,
        stride: lda,
    };
    gemm_serial_packed_on(best_path(), a, b, c, ldc)
}

/// [`gemm_serial_packed`] on a given path, which this CPU must run, with `a` as a
/// view (`a.cols = b.k`; `b` may have been packed on any path: every path packs the
/// same bits).
pub(crate) fn gemm_serial_packed_on(
    path: Path,
    a: MatRef<'_>,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
) {
    let c = MatMut {
        data: c,
        rows: a.rows,
        cols: b.n,
        stride: ldc,
    };
    c.check();
    serial(path, a, BOp::Packed(b), c);
}

/// The serial products' degenerate shapes: nothing to write when `c` is empty,
/// zeros when the reduction length `k` is 0. Returns whether the product is done.
fn empty_product(k: usize, c: &mut MatMut<'_>) -> bool {
    if c.rows == 0 || c.cols == 0 {
        return true;
    }
    if k == 0 {
        for r in 0..c.rows {
            c.data[r * c.stride..r * c.stride + c.cols].fill(0.0);
        }
        return true;
    }
    false
}

/// Panics unless `b` holds `n` columns of `k` values.
fn check_b(b: BSrc<'_>, n: usize, k: usize) {
    match b {
        BSrc::F16(w) => assert!(w.len() >= n * k),
        #[cfg(feature = "q8")]
        BSrc::Q8 { q, s } => {
            assert!(k.is_multiple_of(32) && q.len() >= n * k && s.len() >= n * k / 32)
        }
        BSrc::F32 { data, rs, cs } => {
            assert!(n == 0 || k == 0 || data.len() > (n - 1) * rs + (k - 1) * cs)
        }
    }
}

/// The single-threaded product both serial entry points share, once their operand
/// checks have passed: `c = a · bᵀ` (zeros when `a.cols` is 0) on `path`.
fn serial(path: Path, a: MatRef<'_>, b: BOp<'_>, mut c: MatMut<'_>) {
    assert_available(path);
    if empty_product(a.cols, &mut c) {
        return;
    }
    let a = PackedA::new_on(path, a.data, a.rows, a.cols, a.stride);
    let dst = Dest {
        c: c.data.as_mut_ptr(),
        ldc: c.stride,
        bias: None,
    };
    // SAFETY: c holds m rows of ldc ≥ n floats (checked by the callers), used by this
    // thread only; this CPU runs the path (checked above).
    unsafe { gemm_cols(path, &a, b, 0..c.cols, NC, dst) };
}

#[cfg(test)]
mod tests;
