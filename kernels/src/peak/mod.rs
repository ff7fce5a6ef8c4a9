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

/// Issues `rounds` × [`CHAINS`] steps of `instr` the way `path` does ([`form`]) on
/// the calling thread; the operations done, or None where [`form`] is None.
pub fn issue(instr: Instruction, path: Path, rounds: u64) -> Option<f64> {
    let (_, ops) = form(instr, path)?;
    #[cfg(target_arch = "x86_64")]
    if rounds > 0 {
        match path {
            // SAFETY: `form` checked that the CPU runs the path and the instruction.
            Path::Avx512Vnni => unsafe { x86::issue_avx512(instr, rounds) },
            // SAFETY: as above.
            Path::Avx2 => unsafe { x86::issue_avx2(instr, rounds) },
            _ => unreachable!("form is None for {path:?}"),
        }
    }
    Some((rounds * CHAINS * ops) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::available_paths;

    #[test]
    fn every_form_runs_and_counts_its_operations() {
        for path in available_paths() {
            for instr in Instruction::ALL {
                let Some((_, ops)) = form(instr, path) else {
                    assert_eq!(issue(instr, path, 3), None);
                    continue;
                };
                assert!(ops >= 16, "{path:?} {instr:?}");
                assert_eq!(issue(instr, path, 1000), Some((1000 * CHAINS * ops) as f64));
                assert_eq!(issue(instr, path, 0), Some(0.0));
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
