use super::*;
use crate::path::available_paths;
use crate::testing::{assert_same_bits, lcg, on_threads, random_weight};

/// One row's dot product (the signature of every path's row, which the x86 tests
/// call alone): weight row `w`, its scales `ws`, the quantized activation row
/// `xq`/`xd`, and `sc`; the contract is [`RowsFn`]'s for one row.
#[cfg(target_arch = "x86_64")]
type RowFn = unsafe fn(
    w: *const i8,
    ws: *const f16,
    xq: *const i16,
    xd: *const f32,
    nb: usize,
    sc: *mut f32,
) -> f32;

#[test]
fn quantization_is_bounded_and_within_half_a_step() {
    let mut seed = 3u64;
    let x: Vec<f32> = (0..32 * 40)
        .map(|i| match i % 5 {
            0 => 0.0,
            1 => ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-3,
            2 => -1e-30,
            _ => ((lcg(&mut seed) % 2001) as f32 - 1000.0) * 10f32.powi(i % 7 - 3),
        })
        .collect();
    let a = Acts16::quantize(&x, 64);
    for (i, v) in x.iter().enumerate() {
        let d = a.d[i / 32];
        assert!(a.q[i].unsigned_abs() <= 32767);
        assert!(
            (a.q[i] as f32 * d - v).abs() <= d * 0.5 * (1.0 + 1e-6),
            "{i}"
        );
    }
    // The block's largest magnitude maps to ±32767.
    for (b, xb) in x.chunks_exact(32).enumerate() {
        let k = (0..32)
            .max_by(|&i, &j| xb[i].abs().total_cmp(&xb[j].abs()))
            .unwrap();
        assert_eq!(a.q[b * 32 + k].unsigned_abs(), 32767, "block {b}");
    }
    // Exactly half-way values round to even (a block whose step is exactly 1).
    for (i, v) in x.iter().enumerate() {
        let d = a.d[i / 32];
        assert_eq!(a.q[i], (v / d).round_ties_even() as i16, "{i}");
    }
    let mut ties = [0f32; 32];
    ties[0] = 32767.0;
    for (i, t) in ties.iter_mut().enumerate().skip(1) {
        *t = (i as f32 - 16.0) + 0.5;
    }
    let ta = Acts16::quantize(&ties, 32);
    assert_eq!(ta.d[0], 1.0);
    for (i, t) in ties.iter().enumerate() {
        assert_eq!(ta.q[i], t.round_ties_even() as i16, "tie {t}");
    }
    let z = Acts16::quantize(&[0.0; 32], 32);
    assert_eq!(z.d[0], 0.0);
    assert!(z.q.iter().all(|&v| v == 0));
}

#[test]
fn block_quantization_paths_agree_bit_for_bit() {
    let mut seed = 41u64;
    let specials = [
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        -1e-40,
        1e-45,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        0.5,
        -32767.5,
    ];
    for case in 0..400 {
        let mut x: Vec<f32> = (0..BLOCK)
            .map(|_| {
                let e = (lcg(&mut seed) % 60) as i32 - 30;
                ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-4 * 2f32.powi(e)
            })
            .collect();
        // Some blocks get one or two special values, some are all one value.
        match case % 4 {
            0 => x[(case / 4) % BLOCK] = specials[(case / 4) % specials.len()],
            1 => x.fill(specials[(case / 4) % specials.len()]),
            2 => {
                x[3] = specials[case % specials.len()];
                x[31] = specials[(case / 7) % specials.len()];
            }
            _ => {}
        }
        let mut b = [0i16; BLOCK];
        let db = quantize_block16_portable(&x, &mut b);
        for path in available_paths() {
            let mut a = [0i16; BLOCK];
            let da = quantize_block16_on(path, &x, &mut a);
            assert_eq!(da.to_bits(), db.to_bits(), "{path:?} case {case}: scale");
            assert_eq!(a, b, "{path:?} case {case}: values");
        }
    }
}

#[test]
fn non_finite_activations_give_nan_not_garbage() {
    // Odd block counts (a zero partner block) and several activation rows (the group
    // loops), one of them bad.
    for (nb, t) in [(2usize, 1usize), (3, 1), (3, 3), (3, 8)] {
        let cols = nb * BLOCK;
        let (q, s) = random_weight(&mut 9, 3, nb);
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![0.5f32; t * cols];
            let bad_row = t / 2;
            x[bad_row * cols + cols - 3] = bad;
            for &p in &available_paths() {
                let mut out = vec![0f32; t * 3];
                matvec_on(p, &q, &s, 3, cols, &x, &mut out);
                for (k, row) in out.chunks(3).enumerate() {
                    let what = format!("{p:?} {bad} nb={nb} t={t} row {k}: {row:?}");
                    if k == bad_row {
                        assert!(row.iter().all(|v| v.is_nan()), "{what}");
                    } else {
                        assert!(row.iter().all(|v| v.is_finite()), "{what}");
                    }
                }
            }
        }
    }
}

/// Non-finite and zero weight scales reach the same outputs on every path (NaN as
/// NaN: its payload may differ with the order of an FMA's operands).
#[test]
fn non_finite_weight_scales_agree_on_every_path() {
    let (rows, nb, t) = (5usize, 3usize, 6usize);
    let cols = nb * BLOCK;
    let (q, mut s) = random_weight(&mut 13, rows, nb);
    s[1] = f16::INFINITY;
    s[nb + 2] = f16::NAN;
    s[2 * nb] = f16::ZERO;
    s[3 * nb + 1] = f16::from_f32(-0.5);
    let x: Vec<f32> = (0..t * cols).map(|i| (i % 13) as f32 - 6.0).collect();
    let mut want = vec![0f32; t * rows];
    matvec_on(Path::Portable, &q, &s, rows, cols, &x, &mut want);
    for &p in &available_paths() {
        let mut out = vec![0f32; t * rows];
        matvec_on(p, &q, &s, rows, cols, &x, &mut out);
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            assert!(same, "{p:?} output {i}: {a} vs {b}");
        }
    }
}

#[test]
fn extreme_block_sum_is_exact_on_every_path() {
    // 32 · 128 · 32767: the largest block sum, from eight lanes each at
    // 4 · 128 · 32767, under 2²⁴; exact only if every lane sum is.
    let w = vec![-128i8; 32];
    let x = vec![-1.0f32; 32];
    let xa = Acts16::quantize(&x, 32);
    assert!(xa.q.iter().all(|&v| v == -32767));
    assert_eq!(
        dot_portable(&w, &[f16::ONE], &xa.q, &[1.0]),
        (32 * 128 * 32767) as f32
    );
    let want = dot_portable(&w, &[f16::ONE], &xa.q, &xa.d);
    for &p in &available_paths() {
        let mut out = [0f32];
        matvec_on(p, &w, &[f16::ONE], 1, 32, &x, &mut out);
        assert_eq!(out[0].to_bits(), want.to_bits(), "{p:?}");
    }
}

/// Both prefetch hints of each x86 row (only one runs on a given CPU) give the
/// portable row's bits.
#[cfg(target_arch = "x86_64")]
#[test]
fn both_prefetch_variants_of_each_row_match_portable() {
    let mut seed = 31;
    for nb in [1usize, 2, 17, 128] {
        let cols = nb * BLOCK;
        let (q, s) = random_weight(&mut seed, 1, nb);
        let x: Vec<f32> = (0..cols)
            .map(|_| ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-3)
            .collect();
        let xa = Acts16::quantize(&x, cols);
        let want = dot_portable(&q, &s, &xa.q, &xa.d);
        let paired = PairedActs::new(&xa);
        let xp = paired.row(0);
        let mut rows: Vec<(RowFn, &str)> = Vec::new();
        if available_paths().contains(&Path::Avx2) {
            rows.push((x86::row_avx2::<true>, "avx2 t1"));
            rows.push((x86::row_avx2::<false>, "avx2 nta"));
        }
        if available_paths().contains(&Path::Avx512Vnni) {
            rows.push((x86::row_avx512::<true>, "avx512 t1"));
            rows.push((x86::row_avx512::<false>, "avx512 nta"));
        }
        let mut sc = vec![0f32; nb + 1];
        for (row, what) in rows {
            // SAFETY: one row of nb blocks, its scales and paired activations; sc holds
            // nb + 1 floats; the row's path is available.
            let got = unsafe { row(q.as_ptr(), s.as_ptr(), xp.q, xp.d, nb, sc.as_mut_ptr()) };
            assert_eq!(got.to_bits(), want.to_bits(), "{what} nb={nb}");
        }
    }
}

/// The definition, restated from the module docs one operation at a time: a change
/// to `dot_portable` that changes its bits must change the docs too.
#[test]
fn portable_dot_is_the_documented_arithmetic() {
    let mut seed = 77;
    for nb in [1usize, 2, 5, 40] {
        let (w, ws) = random_weight(&mut seed, 1, nb);
        let x: Vec<f32> = (0..nb * BLOCK)
            .map(|i| ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-3 * (1 + i % 7) as f32)
            .collect();
        let xa = Acts16::quantize(&x, nb * BLOCK);
        let mut acc = [0f32; 16];
        for b in 0..nb + nb % 2 {
            let sc = if b < nb {
                ws[b].to_f32() * xa.d[b]
            } else {
                0.0
            };
            for h in 0..2 {
                for v in 0..4 {
                    let mut p = 0i32;
                    if b < nb {
                        for e in [16 * h + 2 * v, 16 * h + 2 * v + 1, 16 * h + 8 + 2 * v] {
                            p += w[32 * b + e] as i32 * xa.q[32 * b + e] as i32;
                        }
                        let e = 16 * h + 9 + 2 * v;
                        p += w[32 * b + e] as i32 * xa.q[32 * b + e] as i32;
                    }
                    let m = 8 * h + 2 * v + b % 2;
                    acc[m] = (p as f32).mul_add(sc, acc[m]);
                }
            }
        }
        let t: Vec<f32> = (0..8).map(|l| acc[l] + acc[l + 8]).collect();
        let want = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
        let got = dot_portable(&w, &ws, &xa.q, &xa.d);
        assert_eq!(got.to_bits(), want.to_bits(), "nb={nb}");
    }
}

/// The paired layout places each value of a pair of blocks in its own one of the
/// pair's 64 slots, and no value outside the pair.
#[test]
fn paired_layout_is_a_permutation_of_each_pair() {
    for b in 0..6 {
        let mut slots: Vec<usize> = (0..BLOCK).map(|e| paired_index(b, e)).collect();
        slots.extend((0..BLOCK).map(|e| paired_index(b ^ 1, e)));
        slots.sort_unstable();
        let first = (b / 2) * PAIR;
        assert_eq!(
            slots,
            (first..first + PAIR).collect::<Vec<_>>(),
            "block {b}"
        );
    }
}

/// Each path's task loop over more rows than it gathers at once (and an odd count)
/// gives each row's portable bits in place.
#[test]
fn task_loops_cover_every_row() {
    let mut seed = 5;
    let (rows, nb) = (2 * ROWS_MAX + 23, 3);
    let cols = nb * BLOCK;
    let (q, s) = random_weight(&mut seed, rows, nb);
    let x: Vec<f32> = (0..cols)
        .map(|_| ((lcg(&mut seed) % 2001) as f32 - 1000.0) * 1e-2)
        .collect();
    let xa = Acts16::quantize(&x, cols);
    let want: Vec<f32> = (0..rows)
        .map(|r| {
            dot_portable(
                &q[r * cols..(r + 1) * cols],
                &s[r * nb..(r + 1) * nb],
                &xa.q,
                &xa.d,
            )
        })
        .collect();
    let xp = PairedActs::new(&xa);
    for &p in &available_paths() {
        let mut out = vec![f32::NAN; rows + 1];
        let mut sc = vec![0f32; nb + 1];
        // SAFETY: `rows` rows of q and s, one paired activation row, nb + 1 scratch
        // floats, `rows` outputs; the path is available.
        unsafe {
            rows_fn(p, prefetch())(
                q.as_ptr(),
                s.as_ptr(),
                xp.row(0),
                nb,
                sc.as_mut_ptr(),
                rows,
                out.as_mut_ptr(),
            )
        };
        assert_same_bits(&out[..rows], &want, &format!("{p:?}"));
        assert!(out[rows].is_nan(), "{p:?} wrote past its rows");
    }
}

#[test]
fn paths_match_portable_bit_for_bit_and_are_accurate() {
    let mut seed = 23;
    for (rows, nb, t) in [
        (1usize, 1usize, 1usize),
        (7, 3, 2),
        (13, 9, 1),
        (9, 131, 1),
        (64, 16, 3),
        (300, 4, 1),
        (11, 5, 4),
        (9, 7, 5),
        (21, 6, 8),
        (5, 3, 11),
        (19, 7, 16),
        (4, 2, 6),
        // Several tasks (64 rows each at 4 blocks), a partial last one, several groups.
        (150, 4, 11),
        (130, 3, 5),
    ] {
        let cols = nb * BLOCK;
        let (q, s) = random_weight(&mut seed, rows, nb);
        let x: Vec<f32> = (0..t * cols)
            .map(|i| ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-4 * (1 + i % 3) as f32)
            .collect();
        let xa = Acts16::quantize(&x, cols);
        let mut want = vec![0f32; t * rows];
        for tok in 0..t {
            let (xq, xd) = xa.row(tok);
            let xr = &x[tok * cols..(tok + 1) * cols];
            for r in 0..rows {
                let (w, sr) = (&q[r * cols..(r + 1) * cols], &s[r * nb..(r + 1) * nb]);
                let got = dot_portable(w, sr, xq, xd);
                want[tok * rows + r] = got;
                // Against the exact product on the unrounded activations: the
                // int16 rounding is at most half a step of each block.
                let term = |c: usize| w[c] as f64 * sr[c / 32].to_f64() * xr[c] as f64;
                let exact: f64 = (0..cols).map(term).sum();
                let slack: f64 = (0..cols)
                    .map(|c| (w[c] as f64 * sr[c / 32].to_f64()).abs() * xd[c / 32] as f64)
                    .sum::<f64>()
                    * 0.5;
                let mag: f64 = (0..cols).map(|c| term(c).abs()).sum();
                assert!(
                    (got as f64 - exact).abs() <= slack + mag * 1e-6 + 1e-30,
                    "{got} vs {exact}"
                );
            }
        }
        for &p in &available_paths() {
            for threads in [1usize, 2, 3] {
                let mut out = vec![f32::NAN; t * rows];
                on_threads(threads, || matvec_on(p, &q, &s, rows, cols, &x, &mut out));
                let what = format!("{p:?} threads={threads} rows={rows} nb={nb} t={t}");
                assert_same_bits(&out, &want, &what);
            }
        }
    }
}

/// Both prefetch variants of each x86 group loop (only one runs on a given CPU), for
/// every group size it takes, odd and even row and block counts, give each output
/// the portable bits in place and write nothing else.
#[cfg(target_arch = "x86_64")]
#[test]
fn both_prefetch_variants_of_each_group_loop_match_portable() {
    let mut loops: Vec<(GroupFn, usize, &str)> = Vec::new();
    if available_paths().contains(&Path::Avx2) {
        loops.push((x86::groups_avx2_l2, 4, "avx2 t1"));
        loops.push((x86::groups_avx2_nta, 4, "avx2 nta"));
    }
    if available_paths().contains(&Path::Avx512Vnni) {
        loops.push((x86::groups_avx512_l2, GROUP_MAX, "avx512 t1"));
        loops.push((x86::groups_avx512_nta, GROUP_MAX, "avx512 nta"));
    }
    let mut seed = 61;
    for (rows, nb) in [(1usize, 1usize), (2, 2), (5, 3), (8, 6), (7, 17)] {
        let cols = nb * BLOCK;
        let (q, s) = random_weight(&mut seed, rows, nb);
        for &(group, most, what) in &loops {
            for t in 1..=most {
                let x: Vec<f32> = (0..t * cols)
                    .map(|_| ((lcg(&mut seed) % 20001) as f32 - 10000.0) * 1e-3)
                    .collect();
                let xa = Acts16::quantize(&x, cols);
                let g = ActGroup::gather(&PairedActs::new(&xa), 0, t);
                let stride = rows + 3;
                let mut out = vec![f32::NAN; t * stride];
                let mut sc = vec![0f32; GROUP_SCRATCH * (nb + 1)];
                // SAFETY: rows rows of q and s, a group of t rows of nb blocks, the
                // scratch GroupFn asks for, t · stride outputs; the path is available.
                unsafe {
                    group(GroupTask {
                        w: q.as_ptr(),
                        ws: s.as_ptr(),
                        x: g.q.as_ptr(),
                        xd: g.d.as_ptr(),
                        t,
                        nb,
                        sc: sc.as_mut_ptr(),
                        n: rows,
                        out: out.as_mut_ptr(),
                        stride,
                    })
                };
                for k in 0..t {
                    let (xq, xd) = xa.row(k);
                    let want: Vec<f32> = (0..rows)
                        .map(|r| dot_portable(&q[r * cols..][..cols], &s[r * nb..][..nb], xq, xd))
                        .collect();
                    let row = &out[k * stride..(k + 1) * stride];
                    let ctx = format!("{what} rows={rows} nb={nb} t={t} k={k}");
                    assert_same_bits(&row[..rows], &want, &ctx);
                    assert!(row[rows..].iter().all(|v| v.is_nan()), "{ctx}: wrote past");
                }
            }
        }
    }
}

/// Bytes whose end touches an inaccessible page, so that a read one byte past them
/// faults (the bundle's weights are a memory map, whose last row can end at a page).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
struct GuardedBytes {
    map: *mut u8,
    map_len: usize,
    len: usize,
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod guard_sys {
    use std::ffi::c_void;
    pub const PAGE: usize = 4096;
    extern "C" {
        pub fn mmap(
            a: *mut c_void,
            len: usize,
            prot: i32,
            flags: i32,
            fd: i32,
            off: i64,
        ) -> *mut c_void;
        pub fn mprotect(a: *mut c_void, len: usize, prot: i32) -> i32;
        pub fn munmap(a: *mut c_void, len: usize) -> i32;
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl GuardedBytes {
    /// A copy of `data` ending where a `PROT_NONE` page begins.
    fn new(data: &[u8]) -> GuardedBytes {
        use guard_sys::*;
        let pages = data.len().div_ceil(PAGE) + 1;
        let map_len = pages * PAGE;
        // SAFETY: an anonymous private mapping of map_len bytes (PROT_READ|WRITE,
        // MAP_PRIVATE|MAP_ANONYMOUS), checked; its last page then made inaccessible.
        unsafe {
            let map = mmap(std::ptr::null_mut(), map_len, 3, 0x22, -1, 0) as *mut u8;
            assert!(!map.is_null() && map as isize != -1, "mmap failed");
            assert_eq!(mprotect(map.add(map_len - PAGE).cast(), PAGE, 0), 0);
            let start = map.add(map_len - PAGE - data.len());
            std::ptr::copy_nonoverlapping(data.as_ptr(), start, data.len());
            GuardedBytes {
                map,
                map_len,
                len: data.len(),
            }
        }
    }

    /// The bytes as `n` values of `T` (whose size divides the length).
    fn as_slice<T>(&self) -> &[T] {
        let n = self.len / std::mem::size_of::<T>();
        // SAFETY: the copy lies inside the mapping, which lives as long as self; the
        // start is page-aligned minus a multiple of size_of::<T>() (2 at most here).
        unsafe {
            let start = self.map.add(self.map_len - guard_sys::PAGE - self.len);
            std::slice::from_raw_parts(start.cast::<T>(), n)
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
impl Drop for GuardedBytes {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new, unmapped once.
        unsafe { guard_sys::munmap(self.map.cast(), self.map_len) };
    }
}

/// With the weights and their scales ending at an inaccessible page, every path and
/// group size reads nothing past the last row: an odd last block's partner is never
/// loaded (a load would fault and end the test process).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[test]
fn no_path_reads_past_the_last_row() {
    let mut seed = 71;
    for (rows, nb) in [(3usize, 1usize), (2, 3), (5, 17)] {
        let cols = nb * BLOCK;
        let (q, s) = random_weight(&mut seed, rows, nb);
        let qb: Vec<u8> = q.iter().map(|&v| v as u8).collect();
        let sb: Vec<u8> = s.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (gq, gs) = (GuardedBytes::new(&qb), GuardedBytes::new(&sb));
        let (wq, ws): (&[i8], &[f16]) = (gq.as_slice(), gs.as_slice());
        for t in 1..=GROUP_MAX {
            let x: Vec<f32> = (0..t * cols).map(|i| (i % 29) as f32 * 0.1 - 1.4).collect();
            let mut want = vec![0f32; t * rows];
            matvec_on(Path::Portable, &q, &s, rows, cols, &x, &mut want);
            for &p in &available_paths() {
                let mut out = vec![0f32; t * rows];
                matvec_on(p, wq, ws, rows, cols, &x, &mut out);
                assert_same_bits(&out, &want, &format!("{p:?} rows={rows} nb={nb} t={t}"));
            }
        }
    }
}

/// The whole product gives the same bits with either prefetch, one activation row
/// (the row loops) or several (the group loops), on every path.
#[test]
fn both_prefetches_give_the_same_product() {
    let mut seed = 47;
    let (rows, nb) = (37, 9);
    let cols = nb * BLOCK;
    let (q, s) = random_weight(&mut seed, rows, nb);
    for t in [1usize, 5] {
        let x: Vec<f32> = (0..t * cols)
            .map(|_| ((lcg(&mut seed) % 2001) as f32 - 1000.0) * 1e-3)
            .collect();
        for &p in &available_paths() {
            let mut want = vec![0f32; t * rows];
            matvec_on(p, &q, &s, rows, cols, &x, &mut want);
            for pf in Prefetch::ALL {
                let mut got = vec![f32::NAN; t * rows];
                matvec_prefetching(p, pf, &q, &s, rows, cols, &x, &mut got);
                assert_same_bits(&got, &want, &format!("{p:?} {pf:?} t={t}"));
            }
        }
    }
}
