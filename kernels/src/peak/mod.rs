//! Instruction peaks: how many operations per second a thread issues of the
//! instructions the kernels are built on, when it issues nothing else (no loads,
//! independent accumulators, so neither memory nor latency limits it). A kernel's rate
//! over this peak, both measured in one run on all threads at once, says how much of
//! the machine it uses, and so whether a faster kernel or a different instruction is
//! what a target needs (`q3vl bench` reports both).
//!
//! Operations count 2 per multiply-add, as the kernel rates do. Each measurement is
//! a loop of [`CHAINS`] independent accumulations of one instruction (12: more than
//! latency × throughput of any of them on the CPUs measured, e.g. 5 × 2 for
//! `vpdpwssd`), written in assembly so that the compiler can neither split nor fuse
//! them.

#[cfg(target_arch = "x86_64")]
mod x86;

use crate::path::{is_available, Path};

/// Independent accumulators of every peak loop.
pub const CHAINS: u64 = 12;

/// An arithmetic instruction whose throughput bounds a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instruction {
    /// f32 fused multiply-add (`vfmadd231ps`): the vision GEMM and attention.
    F32Fma,
    /// int16 × int16 pairs summed into int32 (`vpdpwssd` on AVX-512 VNNI; `vpmaddwd`
    /// + `vpaddd` on AVX2, the two a product costs there): prefill and decode.
    Int16Dot,
    /// u8 × s8 fours summed into int32 (`vpdpbusd`, AVX-512 VNNI): what int8
    /// activations would issue, twice the products of `vpdpwssd`.
    Int8Dot,
    /// bf16 pairs summed into f32 (`vdpbf16ps`, AVX-512 BF16).
    Bf16Dot,
}

impl Instruction {
    /// Every instruction, in report order.
    pub const ALL: [Instruction; 4] = [
        Instruction::F32Fma,
        Instruction::Int16Dot,
        Instruction::Int8Dot,
        Instruction::Bf16Dot,
    ];

    /// The instruction's short name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Instruction::F32Fma => "f32 fma",
            Instruction::Int16Dot => "int16 dot",
            Instruction::Int8Dot => "int8 dot",
            Instruction::Bf16Dot => "bf16 dot",
        }
    }
}

/// How `path` issues `instr` on this CPU: the instructions of one product step and
/// the operations each step does. None where the path has no such instruction, or
/// the CPU lacks an extension it needs beyond the path's own (AVX-512 BF16).
pub fn form(instr: Instruction, path: Path) -> Option<(&'static str, u64)> {
    if !is_available(path) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    match path {
        Path::Avx512Vnni => return x86::form_avx512(instr),
        Path::Avx2 => return x86::form_avx2(instr),
        _ => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = instr;
    None
}

/// What [`issue`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Issued {
    /// Operations done (2 per multiply-add).
    pub ops: f64,
    /// Lane 0 of the first accumulator after the loop, as bits: `rounds` steps of the
    /// instruction on its fixed sources, which the tests check against the arithmetic
    /// the instruction defines (so a loop that ran fewer steps, or another instruction,
    /// fails them).
    pub lane0: u32,
}

/// Issues `rounds` × [`CHAINS`] steps of `instr` the way `path` does ([`form`]) on
/// the calling thread; None where [`form`] is None.
pub fn issue(instr: Instruction, path: Path, rounds: u64) -> Option<Issued> {
    let (_, ops) = form(instr, path)?;
    #[allow(unused_mut)]
    let mut lane0 = 0;
    #[cfg(target_arch = "x86_64")]
    if rounds > 0 {
        lane0 = match path {
            // SAFETY: `form` checked that the CPU runs the path and the instruction.
            Path::Avx512Vnni => unsafe { x86::issue_avx512(instr, rounds) },
            // SAFETY: as above.
            Path::Avx2 => unsafe { x86::issue_avx2(instr, rounds) },
            _ => unreachable!("form is None for {path:?}"),
        };
    }
    Some(Issued {
        ops: (rounds * CHAINS * ops) as f64,
        lane0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::available_paths;

    /// Lane 0 of the first accumulator after `rounds` steps on the fixed sources (see
    /// `x86.rs`): f32 1.0 × 2⁻¹⁰ per FMA; int16 pairs 16256 · 14976 twice per
    /// `vpdpwssd` (wrapping), (2, 1) · (4, 3) = 11 per AVX2 `vpmaddwd`; bytes
    /// (128, 63, 128, 63) · (−128, 58, −128, 58) = −25460 per `vpdpbusd`; bf16 pairs
    /// 2 · 2⁻¹⁰ per `vdpbf16ps`.
    fn expected_lane0(instr: Instruction, path: Path, rounds: u64) -> u32 {
        match (instr, path) {
            (Instruction::F32Fma, _) => (rounds as f32 / 1024.0).to_bits(),
            (Instruction::Int16Dot, Path::Avx512Vnni) => {
                (rounds as u32).wrapping_mul(2 * 16256 * 14976)
            }
            (Instruction::Int16Dot, _) => rounds as u32 * 11,
            (Instruction::Int8Dot, _) => (rounds as i32 * -25460) as u32,
            (Instruction::Bf16Dot, _) => (rounds as f32 / 512.0).to_bits(),
        }
    }

    #[test]
    fn every_form_runs_its_steps_and_counts_its_operations() {
        for path in available_paths() {
            for instr in Instruction::ALL {
                let Some((_, ops)) = form(instr, path) else {
                    assert_eq!(issue(instr, path, 3), None);
                    continue;
                };
                assert!(ops >= 16, "{path:?} {instr:?}");
                for rounds in [1u64, 1000] {
                    let done = issue(instr, path, rounds).unwrap();
                    assert_eq!(done.ops, (rounds * CHAINS * ops) as f64);
                    let want = expected_lane0(instr, path, rounds);
                    assert_eq!(done.lane0, want, "{path:?} {instr:?} rounds={rounds}");
                }
                assert_eq!(issue(instr, path, 0).map(|d| d.ops), Some(0.0));
            }
        }
    }

    #[test]
    fn the_x86_paths_have_their_forms() {
        if is_available(Path::Avx2) {
            assert!(form(Instruction::Int16Dot, Path::Avx2).is_some());
            assert!(form(Instruction::F32Fma, Path::Avx2).is_some());
        }
        if is_available(Path::Avx512Vnni) {
            for i in [
                Instruction::F32Fma,
                Instruction::Int16Dot,
                Instruction::Int8Dot,
            ] {
                assert!(form(i, Path::Avx512Vnni).is_some(), "{i:?}");
            }
        }
        assert_eq!(form(Instruction::F32Fma, Path::Portable), None);
    }
}
