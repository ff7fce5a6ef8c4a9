//! Which CPU this is: vendor, family, model, stepping and brand name, as CPUID
//! reports them on x86-64 (and `/proc/cpuinfo` on other Linux hosts). Benchmarks print
//! it beside every speed figure: machines of one kind come with different CPUs, and a
//! figure means nothing without the CPU it was measured on.

/// The CPU's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    /// The vendor string (`GenuineIntel`, `AuthenticAMD`; on aarch64 the implementer
    /// code, e.g. `0x41`).
    pub vendor: String,
    /// The display family (x86: base family, plus the extended family when the base
    /// is 15).
    pub family: u32,
    /// The display model (x86: base model, plus the extended model × 16 when the
    /// family is 6 or at least 15; aarch64: the part number).
    pub model: u32,
    /// The stepping (aarch64: the revision).
    pub stepping: u32,
    /// The brand string, trimmed (empty where the CPU reports none).
    pub name: String,
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = if self.name.is_empty() {
            &self.vendor
        } else {
            &self.name
        };
        write!(
            f,
            "{name} ({}, family {} model {} stepping {})",
            self.vendor, self.family, self.model, self.stepping
        )
    }
}

/// This CPU's identity; None where it cannot be read (neither x86-64 nor Linux).
pub fn cpu() -> Option<Cpu> {
    #[cfg(target_arch = "x86_64")]
    {
        Some(x86::cpu())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        cpuinfo::cpu(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
    }
}

/// Family, model and stepping from CPUID leaf 1's EAX, by the rule Intel's and
/// AMD's manuals share: the extended family counts only when the base family is 15,
/// the extended model only when the family is 6 or at least 15.
pub fn family_model_stepping(eax: u32) -> (u32, u32, u32) {
    let base_family = (eax >> 8) & 0xF;
    let family = if base_family == 0xF {
        base_family + ((eax >> 20) & 0xFF)
    } else {
        base_family
    };
    let base_model = (eax >> 4) & 0xF;
    let model = if base_family == 0x6 || base_family == 0xF {
        base_model | ((eax >> 16) & 0xF) << 4
    } else {
        base_model
    };
    (family, model, eax & 0xF)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{family_model_stepping, Cpu};
    use std::arch::x86_64::__cpuid;

    /// Four registers as the bytes of a string, in order.
    fn text(regs: &[u32]) -> String {
        let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
        String::from_utf8_lossy(&bytes)
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string()
    }

    pub(super) fn cpu() -> Cpu {
        // SAFETY (for the older toolchains that mark it unsafe): CPUID leaves 0 and
        // 1 and leaf 0x8000_0000 exist on every x86-64 CPU; the brand leaves are read
        // only when leaf 0x8000_0000 says they exist.
        #[allow(unused_unsafe)]
        let leaf = |l: u32| unsafe { __cpuid(l) };
        let l0 = leaf(0);
        let vendor = text(&[l0.ebx, l0.edx, l0.ecx]);
        let (family, model, stepping) = family_model_stepping(leaf(1).eax);
        let name = if leaf(0x8000_0000).eax >= 0x8000_0004 {
            let regs: Vec<u32> = (0x8000_0002..=0x8000_0004)
                .flat_map(|l| {
                    let r = leaf(l);
                    [r.eax, r.ebx, r.ecx, r.edx]
                })
                .collect();
            text(&regs)
        } else {
            String::new()
        };
        Cpu {
            vendor,
            family,
            model,
            stepping,
            name,
        }
    }
}

/// `/proc/cpuinfo` of a non-x86 Linux host (the first CPU's fields).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
mod cpuinfo {
    use super::Cpu;

    /// The value of the first `key : value` line of `info` with this key.
    fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
        info.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim())
        })
    }

    /// A number written in decimal or as `0x…`.
    fn number(v: &str) -> Option<u32> {
        match v.strip_prefix("0x") {
            Some(h) => u32::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    }

    pub(super) fn cpu(info: &str) -> Option<Cpu> {
        let implementer = field(info, "CPU implementer")?;
        Some(Cpu {
            vendor: implementer.to_string(),
            family: field(info, "CPU architecture")
                .and_then(number)
                .unwrap_or(0),
            model: field(info, "CPU part").and_then(number).unwrap_or(0),
            stepping: field(info, "CPU revision").and_then(number).unwrap_or(0),
            name: field(info, "model name").unwrap_or("").to_string(),
        })
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn reads_an_arm_cpuinfo() {
            let info = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n\
                        CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\n\
                        CPU revision\t: 1\n\nprocessor\t: 1\nCPU implementer\t: 0x42\n";
            let c = super::cpu(info).unwrap();
            assert_eq!(
                (c.vendor.as_str(), c.family, c.model, c.stepping),
                ("0x41", 8, 0xd0c, 1)
            );
            assert!(super::cpu("processor : 0\n").is_none());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_family_and_model_as_the_manuals_do() {
        // Intel Ice Lake server (family 6, model 0x6A = 106, stepping 6).
        assert_eq!(family_model_stepping(0x0006_06A6), (6, 106, 6));
        // AMD Zen 3 (base family 15 + extended 0x0A = 25, model 0x01, stepping 1).
        assert_eq!(family_model_stepping(0x00A0_0F11), (25, 1, 1));
        // AMD Zen 4 (family 25, model 0x11 = 17: the extended model counts at 15+).
        assert_eq!(family_model_stepping(0x00A1_0F11), (25, 17, 1));
        // A family below 6 ignores both extended fields.
        assert_eq!(family_model_stepping(0x0FF0_0543), (5, 4, 3));
    }

    #[test]
    fn names_this_cpu() {
        if cfg!(target_arch = "x86_64") {
            let c = cpu().unwrap();
            assert!(!c.vendor.is_empty() && c.family > 0, "{c:?}");
            assert!(c.to_string().contains(&format!("family {}", c.family)));
        }
    }
}
