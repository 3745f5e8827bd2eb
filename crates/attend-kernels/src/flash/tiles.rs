//! Tile sizes per CPU. The kernels are correct for any sizes (tested from 1 × 16 up); these choose fast ones, once
//! per process and deterministically — picked from the detected micro-architecture, never timed at start-up, since
//! tile sizes set the summation order and a run must give the same bits every time on the same machine.
//!
//! `ATTEND_TILES=BQxBK` (e.g. `64x128`) overrides the choice, for tuning on a new CPU with `attend bench attention`
//! (which reports the tiles it ran with). The same goes for bf16 storage: [`bf16_dots_pay_off`] says whether the
//! AVX512-BF16 dot-product kernel beats converting to f32 on this CPU (`ATTEND_BF16_DOTS=1|0` overrides).

use super::simd::Isa;
use crate::cpu::CpuInfo;

/// Query rows and keys per tile, and why they were chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub block_q: usize,
    pub block_k: usize,
    /// `"ATTEND_TILES"`, `"table: <micro-architecture>"` or `"default"`.
    pub source: &'static str,
}

/// The tiles for head dims `d`, `dv` on this CPU and instruction set.
pub fn tiles_for(isa: Isa, d: usize, dv: usize) -> Tiles {
    if let Some((block_q, block_k)) = env_override() {
        return Tiles { block_q, block_k, source: "ATTEND_TILES" };
    }
    let cpu = CpuInfo::get();
    let wide = d.max(dv);
    // Measured with `attend bench attention` and the kernel bench (BENCHMARKS.md), best of interleaved repeats.
    match (isa, cpu.microarchitecture()) {
        // Golden Cove cores (48 KB L1d, 2 MB L2): longer key tiles amortise the per-tile softmax bookkeeping at
        // D ≤ 64 (+5% forward); at D = 128 a 64-key tile keeps K and V tiles in L1.
        (Isa::Avx512, "Sapphire Rapids" | "Emerald Rapids") if wide <= 64 => {
            Tiles { block_q: 64, block_k: 128, source: "table: Golden Cove" }
        }
        _ => Tiles { block_q: 64, block_k: 64, source: "default" },
    }
}

/// `ATTEND_TILES=BQxBK`, read once; ignored unless both are positive and BK is a multiple of 16.
fn env_override() -> Option<(usize, usize)> {
    static TILES: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    *TILES.get_or_init(|| {
        let v = std::env::var("ATTEND_TILES").ok()?;
        let (q, k) = v.split_once('x')?;
        let (q, k) = (q.trim().parse().ok()?, k.trim().parse().ok()?);
        (q > 0 && k > 0 && k % super::QUANTUM == 0).then_some((q, k))
    })
}

/// Whether bf16 storage should run the AVX512-BF16 dot-product kernel here, rather than be converted to f32 for
/// the f32 kernel. Zen 4 and Zen 5 issue `vdpbf16ps` on two ports (twice the f32 FMA rate: measured 3–4× PyTorch's
/// bf16 on Zen 5); Golden Cove issues it on one, and there the dot-product kernel ran at half the f32 kernel's speed
/// (BENCHMARKS.md), so bf16 goes through f32. Unmeasured CPUs keep the dot products.
pub fn bf16_dots_pay_off() -> bool {
    static CHOICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        if !super::bf16_dot_supported() {
            return false;
        }
        match std::env::var("ATTEND_BF16_DOTS").as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => !matches!(CpuInfo::get().microarchitecture(), "Sapphire Rapids" | "Emerald Rapids"),
        }
    })
}
