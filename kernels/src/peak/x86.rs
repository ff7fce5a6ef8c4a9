//! The x86 peak loops: [`super::CHAINS`] accumulators (registers 0–11), the two
//! sources in registers 12 and 13, a counted loop of one step per accumulator.

use super::Instruction;
use std::arch::asm;
use std::arch::x86_64::*;

/// `op r0, r12, r13` … `op r11, r12, r13`: one step on each accumulator.
macro_rules! steps {
    ($op:literal, $r:literal) => {
        concat!(
            $op, " ", $r, "0, ", $r, "12, ", $r, "13\n", $op, " ", $r, "1, ", $r, "12, ", $r,
            "13\n", $op, " ", $r, "2, ", $r, "12, ", $r, "13\n", $op, " ", $r, "3, ", $r, "12, ",
            $r, "13\n", $op, " ", $r, "4, ", $r, "12, ", $r, "13\n", $op, " ", $r, "5, ", $r,
            "12, ", $r, "13\n", $op, " ", $r, "6, ", $r, "12, ", $r, "13\n", $op, " ", $r, "7, ",
            $r, "12, ", $r, "13\n", $op, " ", $r, "8, ", $r, "12, ", $r, "13\n", $op, " ", $r,
            "9, ", $r, "12, ", $r, "13\n", $op, " ", $r, "10, ", $r, "12, ", $r, "13\n", $op, " ",
            $r, "11, ", $r, "12, ", $r, "13\n",
        )
    };
}

/// The AVX2 int16 step on each accumulator: `vpmaddwd` into a temporary (registers
/// 14 and 15 in turn), `vpaddd` into the accumulator.
macro_rules! madd_add_steps {
    () => {
        concat!(
            "vpmaddwd ymm14, ymm12, ymm13\nvpaddd ymm0, ymm0, ymm14\n",
            "vpmaddwd ymm15, ymm12, ymm13\nvpaddd ymm1, ymm1, ymm15\n",
            "vpmaddwd ymm14, ymm12, ymm13\nvpaddd ymm2, ymm2, ymm14\n",
            "vpmaddwd ymm15, ymm12, ymm13\nvpaddd ymm3, ymm3, ymm15\n",
            "vpmaddwd ymm14, ymm12, ymm13\nvpaddd ymm4, ymm4, ymm14\n",
            "vpmaddwd ymm15, ymm12, ymm13\nvpaddd ymm5, ymm5, ymm15\n",
            "vpmaddwd ymm14, ymm12, ymm13\nvpaddd ymm6, ymm6, ymm14\n",
            "vpmaddwd ymm15, ymm12, ymm13\nvpaddd ymm7, ymm7, ymm15\n",
            "vpmaddwd ymm14, ymm12, ymm13\nvpaddd ymm8, ymm8, ymm14\n",
            "vpmaddwd ymm15, ymm12, ymm13\nvpaddd ymm9, ymm9, ymm15\n",
            "vpmaddwd ymm14, ymm12, ymm13\nvpaddd ymm10, ymm10, ymm14\n",
            "vpmaddwd ymm15, ymm12, ymm13\nvpaddd ymm11, ymm11, ymm15\n",
        )
    };
}

/// Zeroes the accumulators with `op r, r, r` (finite sums: no denormal or NaN
/// inputs, which some CPUs slow down on).
macro_rules! zero {
    ($op:literal, $r:literal) => {
        concat!(
            $op, " ", $r, "0, ", $r, "0, ", $r, "0\n", $op, " ", $r, "1, ", $r, "1, ", $r, "1\n",
            $op, " ", $r, "2, ", $r, "2, ", $r, "2\n", $op, " ", $r, "3, ", $r, "3, ", $r, "3\n",
            $op, " ", $r, "4, ", $r, "4, ", $r, "4\n", $op, " ", $r, "5, ", $r, "5, ", $r, "5\n",
            $op, " ", $r, "6, ", $r, "6, ", $r, "6\n", $op, " ", $r, "7, ", $r, "7, ", $r, "7\n",
            $op, " ", $r, "8, ", $r, "8, ", $r, "8\n", $op, " ", $r, "9, ", $r, "9, ", $r, "9\n",
            $op, " ", $r, "10, ", $r, "10, ", $r, "10\n", $op, " ", $r, "11, ", $r, "11, ", $r,
            "11\n",
        )
    };
}

/// The counted loop around `body`, with sources `a`, `b` in registers 12 and 13, the
/// first accumulator's final value written to `acc0` and the others clobbered.
macro_rules! peak_loop {
    ($rounds:expr, $a:expr, $b:expr, $zero:expr, $body:expr, $acc0:ident,
     $r0:tt, $r12:tt, $r13:tt, [$($acc:tt),*] $(, $extra:tt)*) => {
        asm!(
            $zero,
            "2:",
            $body,
            "dec {n}",
            "jnz 2b",
            n = inout(reg) $rounds => _,
            in($r12) $a,
            in($r13) $b,
            out($r0) $acc0,
            $(out($acc) _,)*
            $(out($extra) _,)*
            options(nomem, nostack),
        )
    };
}

/// [`peak_loop!`] over the 512-bit registers: accumulators zmm0–zmm11, sources
/// zmm12 and zmm13.
macro_rules! zmm_loop {
    ($rounds:expr, $a:expr, $b:expr, $body:expr) => {{
        let acc0: __m512i;
        peak_loop!(
            $rounds,
            $a,
            $b,
            zero!("vpxord", "zmm"),
            $body,
            acc0,
            "zmm0",
            "zmm12",
            "zmm13",
            [
                "zmm1", "zmm2", "zmm3", "zmm4", "zmm5", "zmm6", "zmm7", "zmm8", "zmm9", "zmm10",
                "zmm11"
            ]
        );
        std::mem::transmute::<__m512i, [u32; 16]>(acc0)[0]
    }};
}

/// [`peak_loop!`] over the 256-bit registers: accumulators ymm0–ymm11, sources
/// ymm12 and ymm13, temporaries ymm14 and ymm15.
macro_rules! ymm_loop {
    ($rounds:expr, $a:expr, $b:expr, $body:expr) => {{
        let acc0: __m256i;
        peak_loop!(
            $rounds,
            $a,
            $b,
            zero!("vpxor", "ymm"),
            $body,
            acc0,
            "ymm0",
            "ymm12",
            "ymm13",
            [
                "ymm1", "ymm2", "ymm3", "ymm4", "ymm5", "ymm6", "ymm7", "ymm8", "ymm9", "ymm10",
                "ymm11"
            ],
            "ymm14",
            "ymm15"
        );
        std::mem::transmute::<__m256i, [u32; 8]>(acc0)[0]
    }};
}

/// `instr` as the AVX-512 path issues it: mnemonic, operations per step.
pub(super) fn form_avx512(instr: Instruction) -> Option<(&'static str, u64)> {
    match instr {
        Instruction::F32Fma => Some(("vfmadd231ps zmm", 32)),
        Instruction::Int16Dot => Some(("vpdpwssd zmm", 64)),
        Instruction::Int8Dot => Some(("vpdpbusd zmm", 128)),
        Instruction::Bf16Dot => {
            is_x86_feature_detected!("avx512bf16").then_some(("vdpbf16ps zmm", 64))
        }
    }
}

/// `instr` as the AVX2 path issues it: mnemonics, operations per step.
pub(super) fn form_avx2(instr: Instruction) -> Option<(&'static str, u64)> {
    match instr {
        Instruction::F32Fma => Some(("vfmadd231ps ymm", 16)),
        Instruction::Int16Dot => Some(("vpmaddwd + vpaddd ymm", 32)),
        Instruction::Int8Dot | Instruction::Bf16Dot => None,
    }
}

/// Runs `rounds` (> 0) rounds of `instr` on the AVX-512 path; lane 0 of the first
/// accumulator, as bits.
///
/// # Safety
/// The CPU must run AVX-512 VNNI (and AVX-512 BF16 for [`Instruction::Bf16Dot`]).
#[target_feature(enable = "avx512f,avx512vnni")]
pub(super) unsafe fn issue_avx512(instr: Instruction, rounds: u64) -> u32 {
    // f32 1.0 and 2^-10 (as integers, whole registers: the casts move no bits); as
    // int16 or bytes, fixed positive and negative lanes; as bf16 pairs, 1.0 (0x3F80) and
    // 2^-10 (0x3A80).
    let (one, small) = (
        _mm512_castps_si512(_mm512_set1_ps(1.0)),
        _mm512_castps_si512(_mm512_set1_ps(1.0 / 1024.0)),
    );
    let (a, b) = (
        _mm512_set1_epi32(0x3F80_3F80),
        _mm512_set1_epi32(0x3A80_3A80),
    );
    match instr {
        Instruction::F32Fma => zmm_loop!(rounds, one, small, steps!("vfmadd231ps", "zmm")),
        Instruction::Int16Dot => zmm_loop!(rounds, a, b, steps!("vpdpwssd", "zmm")),
        Instruction::Int8Dot => zmm_loop!(rounds, a, b, steps!("vpdpbusd", "zmm")),
        // SAFETY: the caller checked AVX-512 BF16 for this instruction ([`form_avx512`]).
        Instruction::Bf16Dot => issue_bf16(rounds, a, b),
    }
}

/// `vdpbf16ps` rounds: a function of its own, so AVX-512 BF16 is enabled only where
/// [`form_avx512`] found it.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn issue_bf16(rounds: u64, a: __m512i, b: __m512i) -> u32 {
    zmm_loop!(rounds, a, b, steps!("vdpbf16ps", "zmm"))
}

/// Runs `rounds` (> 0) rounds of `instr` on the AVX2 path; lane 0 of the first
/// accumulator, as bits.
///
/// # Safety
/// The CPU must run AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn issue_avx2(instr: Instruction, rounds: u64) -> u32 {
    let (one, small) = (
        _mm256_castps_si256(_mm256_set1_ps(1.0)),
        _mm256_castps_si256(_mm256_set1_ps(1.0 / 1024.0)),
    );
    let (a, b) = (
        _mm256_set1_epi32(0x0001_0002),
        _mm256_set1_epi32(0x0003_0004),
    );
    match instr {
        Instruction::F32Fma => ymm_loop!(rounds, one, small, steps!("vfmadd231ps", "ymm")),
        // Each product into a temporary (two names, renamed by the CPU), then added
        // to its accumulator: what the AVX2 kernels issue per product.
        Instruction::Int16Dot => ymm_loop!(rounds, a, b, madd_add_steps!()),
        Instruction::Int8Dot | Instruction::Bf16Dot => {
            unreachable!("form_avx2 is None for {instr:?}")
        }
    }
}
