//! A small seeded generator (SplitMix64) for tests, benchmarks and examples: the same seed gives the same numbers on
//! every machine, with no dependency. Dropout uses the counter-based form in [`crate::dropout`].

/// SplitMix64 (Steele, Lea & Flood, 2014): a 64-bit state advanced by a constant, finalised by a bijective mix.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        crate::dropout::mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// An odd number in `1..=2·half − 1` (`half > 0`): odd lengths catch tiling bugs that even ones hide.
    pub fn odd(&mut self, half: usize) -> usize {
        2 * self.below(half) + 1
    }
}
