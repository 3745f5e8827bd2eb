//! What CPU this is, from CPUID: vendor, family and model, the brand string, the data cache sizes. Benchmarks
//! name the machine with it (speed claims are per CPU), and the flash kernel picks its tiles and bf16 kernel from
//! the micro-architecture (`flash::tiles`).

/// The processor, as CPUID describes it. Off x86-64 every field is empty or zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuInfo {
    /// `GenuineIntel`, `AuthenticAMD`, …
    pub vendor: String,
    /// Display family and model (extended fields folded in, as `lscpu` shows them).
    pub family: u32,
    pub model: u32,
    /// The brand string, e.g. `Intel(R) Xeon(R) Processor` or `AMD EPYC 9R14 96-Core Processor`.
    pub name: String,
    /// Level-1 data cache per core, bytes (0 if CPUID does not say).
    pub l1d_bytes: usize,
    /// Level-2 cache per core, bytes (0 if CPUID does not say).
    pub l2_bytes: usize,
}

impl CpuInfo {
    /// Reads CPUID once per process.
    pub fn get() -> &'static CpuInfo {
        static INFO: std::sync::OnceLock<CpuInfo> = std::sync::OnceLock::new();
        INFO.get_or_init(detect)
    }

    /// A short name for the micro-architecture where the family/model is known to us (for tables), else `""`.
    pub fn microarchitecture(&self) -> &'static str {
        match (self.vendor.as_str(), self.family, self.model) {
            ("AuthenticAMD", 0x19, 0x10..=0x1f | 0x60..=0x7f | 0xa0..=0xaf) => "Zen 4",
            ("AuthenticAMD", 0x19, _) => "Zen 3",
            ("AuthenticAMD", 0x1a, _) => "Zen 5",
            ("GenuineIntel", 6, 0x55) => "Skylake-SP / Cascade Lake",
            ("GenuineIntel", 6, 0x6a | 0x6c) => "Ice Lake-SP",
            ("GenuineIntel", 6, 0x8f) => "Sapphire Rapids",
            ("GenuineIntel", 6, 0xcf) => "Emerald Rapids",
            ("GenuineIntel", 6, 0xad | 0xae) => "Granite Rapids",
            _ => "",
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unused_unsafe)] // `__cpuid` is unsafe on older toolchains
fn detect() -> CpuInfo {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86-64 processor; leaves above the reported maxima are not read.
    unsafe {
        let l0 = __cpuid(0);
        let vendor: Vec<u8> = [l0.ebx, l0.edx, l0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        let vendor = String::from_utf8_lossy(&vendor).into_owned();
        let l1 = __cpuid(1);
        let base_family = (l1.eax >> 8) & 0xf;
        let family = if base_family == 0xf { base_family + ((l1.eax >> 20) & 0xff) } else { base_family };
        let model = if base_family == 0x6 || base_family == 0xf {
            ((l1.eax >> 4) & 0xf) | (((l1.eax >> 16) & 0xf) << 4)
        } else {
            (l1.eax >> 4) & 0xf
        };
        let ext_max = __cpuid(0x8000_0000).eax;
        let name = if ext_max >= 0x8000_0004 {
            let bytes: Vec<u8> = (0x8000_0002u32..=0x8000_0004)
                .flat_map(|leaf| {
                    let r = __cpuid(leaf);
                    [r.eax, r.ebx, r.ecx, r.edx].into_iter().flat_map(|x| x.to_le_bytes())
                })
                .collect();
            String::from_utf8_lossy(&bytes).trim_matches(char::from(0)).trim().to_string()
        } else {
            String::new()
        };
        // Deterministic cache parameters: leaf 4 on Intel, 0x8000_001D (same layout) on AMD.
        let cache_leaf = if vendor == "AuthenticAMD" && ext_max >= 0x8000_001d {
            Some(0x8000_001d)
        } else if l0.eax >= 4 {
            Some(4)
        } else {
            None
        };
        let (mut l1d_bytes, mut l2_bytes) = (0, 0);
        if let Some(leaf) = cache_leaf {
            for sub in 0..16 {
                let r = __cpuid_count(leaf, sub);
                let kind = r.eax & 0x1f; // 0 none, 1 data, 2 instruction, 3 unified
                if kind == 0 {
                    break;
                }
                let level = (r.eax >> 5) & 0x7;
                let ways = ((r.ebx >> 22) & 0x3ff) as usize + 1;
                let partitions = ((r.ebx >> 12) & 0x3ff) as usize + 1;
                let line = (r.ebx & 0xfff) as usize + 1;
                let sets = r.ecx as usize + 1;
                let bytes = ways * partitions * line * sets;
                match (level, kind) {
                    (1, 1) => l1d_bytes = bytes,
                    (2, 1 | 3) => l2_bytes = bytes,
                    _ => {}
                }
            }
        }
        CpuInfo { vendor, family, model, name, l1d_bytes, l2_bytes }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuInfo {
    CpuInfo { vendor: String::new(), family: 0, model: 0, name: String::new(), l1d_bytes: 0, l2_bytes: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPUID agrees with what the kernel reports in /proc/cpuinfo (Linux), field by field.
    #[test]
    fn cpuid_agrees_with_proc_cpuinfo() {
        let info = CpuInfo::get();
        let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") else {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIP cpuid_agrees_with_proc_cpuinfo: no /proc/cpuinfo");
            return;
        };
        let field = |k: &str| {
            text.lines().find(|l| l.starts_with(k)).and_then(|l| l.split(':').nth(1)).map(|v| v.trim().to_string())
        };
        if cfg!(target_arch = "x86_64") {
            assert_eq!(Some(info.vendor.clone()), field("vendor_id"));
            assert_eq!(Some(info.family.to_string()), field("cpu family"));
            assert_eq!(Some(info.model.to_string()), field("model\t"));
            assert_eq!(Some(info.name.clone()), field("model name"));
            // AMD reports caches through leaf 0x8000_001D only with topology extensions; 0 then means "unknown".
            if info.l1d_bytes != 0 || info.vendor != "AuthenticAMD" {
                assert!(info.l1d_bytes >= 16 << 10 && info.l1d_bytes <= 1 << 20, "L1d {} bytes", info.l1d_bytes);
            }
        }
    }
}
