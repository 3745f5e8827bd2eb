//! Masks and score modifications as code, in the spirit of FlexAttention's `mask_mod` / `score_mod`, but compiled
//! by Rust generics: the kernel is instantiated for each type, so a causal kernel contains no check for document
//! ids. Tiles a mask classifies as [`TileKind::Empty`] are skipped, [`TileKind::Full`] tiles skip the per-element
//! check; only [`TileKind::Partial`] tiles ask [`MaskMod::visible`] per element.
//!
//! Positions are end-aligned: for `T` queries and `S` keys, query `i`'s diagonal is `d = i + S − T`.

/// How a tile of queries × keys relates to a mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileKind {
    /// No query of the tile sees any key of it: skipped.
    Empty,
    /// Every query sees every key: no per-element check.
    Full,
    /// Mixed: checked per element.
    Partial,
}

impl TileKind {
    /// The kind of a tile under two masks that must both allow a key.
    pub fn and(self, other: TileKind) -> TileKind {
        match (self, other) {
            (TileKind::Empty, _) | (_, TileKind::Empty) => TileKind::Empty,
            (TileKind::Full, TileKind::Full) => TileKind::Full,
            _ => TileKind::Partial,
        }
    }
}

/// Which keys a query may see. Implement it for your own rule; `classify` is optional (the default never skips).
pub trait MaskMod: Sync {
    /// Whether query `i` of batch `b`, head `h` may see key `j`.
    fn visible(&self, b: usize, h: usize, i: usize, j: usize) -> bool;

    /// Queries `i0..i1` × keys `j0..j1` (non-empty ranges) of `(b, h)`.
    fn classify(&self, _b: usize, _h: usize, _i0: usize, _i1: usize, _j0: usize, _j1: usize) -> TileKind {
        TileKind::Partial
    }
}

/// A change of the scaled scores before the softmax. Implement it for your own score function.
pub trait ScoreMod: Sync {
    /// `false` only for the identity, so the kernel can leave the call out.
    const ACTIVE: bool = true;

    /// `row[x] ← f(row[x])` for keys `j0 + x` of query `i` of `(b, h)`; `row` holds scaled scores.
    fn apply(&self, b: usize, h: usize, i: usize, j0: usize, row: &mut [f32]);

    /// `ds[x] ← ds[x] · ∂f/∂s` evaluated at the scaled scores `s[x]` (as they were before [`apply`](Self::apply)).
    fn chain(&self, b: usize, h: usize, i: usize, j0: usize, s: &[f32], ds: &mut [f32]);
}

// ---------------------------------------------------------------------------------------------------------------
// Masks

/// Every query sees every key.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoMask;

impl MaskMod for NoMask {
    #[inline(always)]
    fn visible(&self, _: usize, _: usize, _: usize, _: usize) -> bool {
        true
    }
    fn classify(&self, _: usize, _: usize, _: usize, _: usize, _: usize, _: usize) -> TileKind {
        TileKind::Full
    }
}

/// Causal, end-aligned: query `i` sees key `j` iff `j ≤ i + offset`, `offset = S − T`.
#[derive(Clone, Copy, Debug)]
pub struct Causal {
    pub offset: isize,
}

impl MaskMod for Causal {
    #[inline(always)]
    fn visible(&self, _: usize, _: usize, i: usize, j: usize) -> bool {
        j as isize <= i as isize + self.offset
    }
    fn classify(&self, _: usize, _: usize, i0: usize, i1: usize, j0: usize, j1: usize) -> TileKind {
        band_kind(self.offset, i0, i1, j0, j1, None, Some(0))
    }
}

/// A window side that reaches every key: any side ≥ the sequence length is unbounded, this one says so by name.
pub const UNBOUNDED: usize = usize::MAX;

/// A window side as a signed distance; sides beyond `isize::MAX` (e.g. [`UNBOUNDED`]) saturate, and every use
/// below adds or subtracts with saturation, so no side overflows.
#[inline(always)]
fn side(x: usize) -> isize {
    isize::try_from(x).unwrap_or(isize::MAX)
}

/// Whether key `j` lies in `d − left ≤ j ≤ d + right`, without overflow for any sides.
#[inline(always)]
pub fn in_window(d: isize, j: isize, left: usize, right: usize) -> bool {
    j >= d.saturating_sub(side(left)) && j <= d.saturating_add(side(right))
}

/// Sliding window around the end-aligned diagonal: `d − left ≤ j ≤ d + right` (causal sliding window: `right = 0`;
/// either side may be [`UNBOUNDED`]).
#[derive(Clone, Copy, Debug)]
pub struct SlidingWindow {
    pub offset: isize,
    pub left: usize,
    pub right: usize,
}

impl MaskMod for SlidingWindow {
    #[inline(always)]
    fn visible(&self, _: usize, _: usize, i: usize, j: usize) -> bool {
        in_window(i as isize + self.offset, j as isize, self.left, self.right)
    }
    fn classify(&self, _: usize, _: usize, i0: usize, i1: usize, j0: usize, j1: usize) -> TileKind {
        band_kind(self.offset, i0, i1, j0, j1, Some(self.left), Some(self.right))
    }
}

/// Tile kind of the band `d − left ≤ j ≤ d + right` (`None` = unbounded on that side), `d = i + offset`.
fn band_kind(
    offset: isize,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    left: Option<usize>,
    right: Option<usize>,
) -> TileKind {
    let (d_lo, d_hi) = (i0 as isize + offset, i1 as isize - 1 + offset);
    let (j_lo, j_hi) = (j0 as isize, j1 as isize - 1);
    let right = right.map(side);
    let left = left.map(side);
    // Empty: every key right of every query's band, or left of it.
    if right.is_some_and(|r| j_lo > d_hi.saturating_add(r)) || left.is_some_and(|l| j_hi < d_lo.saturating_sub(l)) {
        return TileKind::Empty;
    }
    // Full: every key inside every query's band.
    let right_ok = right.is_none_or(|r| j_hi <= d_lo.saturating_add(r));
    let left_ok = left.is_none_or(|l| j_lo >= d_hi.saturating_sub(l));
    if right_ok && left_ok {
        TileKind::Full
    } else {
        TileKind::Partial
    }
}

/// The general mask of the attention core: every rule optional, all must allow a key. Slices are row-major as in
/// the attend crate's `ResolvedMask`; `keep` is an explicit boolean tensor read through broadcast strides.
#[derive(Clone, Copy, Debug, Default)]
pub struct StandardMask<'a> {
    pub t: usize,
    pub s: usize,
    pub causal: bool,
    pub window: Option<(usize, usize)>,
    pub key_lengths: Option<&'a [usize]>,
    pub prefix_lengths: Option<&'a [usize]>,
    /// `(q_doc (B·T), k_doc (B·S))`.
    pub documents: Option<(&'a [i64], &'a [i64])>,
    /// `(data, strides of (B, H, T, S))`, 1 = visible.
    pub keep: Option<(&'a [u8], [usize; 4])>,
}

impl StandardMask<'_> {
    fn offset(&self) -> isize {
        self.s as isize - self.t as isize
    }
}

impl MaskMod for StandardMask<'_> {
    #[inline]
    fn visible(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let d = i as isize + self.offset();
        let jj = j as isize;
        if self.causal && jj > d {
            return false;
        }
        if let Some((l, r)) = self.window {
            if !in_window(d, jj, l, r) {
                return false;
            }
        }
        if let Some(kl) = self.key_lengths {
            if j >= kl[b] {
                return false;
            }
        }
        if let Some(p) = self.prefix_lengths {
            if jj > d && j >= p[b] {
                return false;
            }
        }
        if let Some((qd, kd)) = self.documents {
            if qd[b * self.t + i] != kd[b * self.s + j] {
                return false;
            }
        }
        if let Some((m, st)) = self.keep {
            if m[b * st[0] + h * st[1] + i * st[2] + j * st[3]] == 0 {
                return false;
            }
        }
        true
    }

    fn classify(&self, b: usize, _h: usize, i0: usize, i1: usize, j0: usize, j1: usize) -> TileKind {
        let mut kind = match (self.causal, self.window) {
            (_, Some((l, r))) => {
                band_kind(self.offset(), i0, i1, j0, j1, Some(l), Some(if self.causal { 0 } else { r }))
            }
            (true, None) => band_kind(self.offset(), i0, i1, j0, j1, None, Some(0)),
            (false, None) => TileKind::Full,
        };
        if let Some(kl) = self.key_lengths {
            kind = kind.and(if j0 >= kl[b] {
                TileKind::Empty
            } else if j1 <= kl[b] {
                TileKind::Full
            } else {
                TileKind::Partial
            });
        }
        if let Some(p) = self.prefix_lengths {
            // Causal part or prefix part: the tile is full if the prefix covers it, else as causal.
            let causal = band_kind(self.offset(), i0, i1, j0, j1, None, Some(0));
            kind = kind.and(if j1 <= p[b] {
                TileKind::Full
            } else if causal == TileKind::Empty && j0 >= p[b] {
                TileKind::Empty
            } else if causal == TileKind::Full {
                TileKind::Full
            } else {
                TileKind::Partial
            });
        }
        if let Some((qd, kd)) = self.documents {
            let q = &qd[b * self.t + i0..b * self.t + i1];
            let k = &kd[b * self.s + j0..b * self.s + j1];
            let (qmin, qmax) = min_max(q);
            let (kmin, kmax) = min_max(k);
            kind = kind.and(if qmax < kmin || kmax < qmin {
                TileKind::Empty
            } else if qmin == qmax && kmin == kmax && qmin == kmin {
                TileKind::Full
            } else {
                TileKind::Partial
            });
        }
        if self.keep.is_some() && kind == TileKind::Full {
            kind = TileKind::Partial;
        }
        kind
    }
}

fn min_max(v: &[i64]) -> (i64, i64) {
    v.iter().fold((i64::MAX, i64::MIN), |(a, b), &x| (a.min(x), b.max(x)))
}

// ---------------------------------------------------------------------------------------------------------------
// Score modifications

/// The identity: plain scaled dot-product scores.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoScoreMod;

impl ScoreMod for NoScoreMod {
    const ACTIVE: bool = false;
    #[inline(always)]
    fn apply(&self, _: usize, _: usize, _: usize, _: usize, _: &mut [f32]) {}
    #[inline(always)]
    fn chain(&self, _: usize, _: usize, _: usize, _: usize, _: &[f32], _: &mut [f32]) {}
}

/// Soft-capping `c · tanh(s / c)` (Gemma 2).
#[derive(Clone, Copy, Debug)]
pub struct Softcap {
    pub cap: f32,
}

impl ScoreMod for Softcap {
    #[inline]
    fn apply(&self, _: usize, _: usize, _: usize, _: usize, row: &mut [f32]) {
        super::modvec::softcap_row(row, self.cap);
    }
    #[inline]
    fn chain(&self, _: usize, _: usize, _: usize, _: usize, s: &[f32], ds: &mut [f32]) {
        super::modvec::softcap_chain_row(s, ds, self.cap);
    }
}

/// ALiBi: adds `−slope[h] · |i + offset − j|`.
#[derive(Clone, Copy, Debug)]
pub struct Alibi<'a> {
    pub slopes: &'a [f32],
    pub offset: isize,
}

impl ScoreMod for Alibi<'_> {
    #[inline]
    fn apply(&self, _: usize, h: usize, i: usize, j0: usize, row: &mut [f32]) {
        // Distances stay exact in f32 up to 2^24 positions.
        super::modvec::alibi_row(row, self.slopes[h], (i as isize + self.offset - j0 as isize) as f32);
    }
    #[inline(always)]
    fn chain(&self, _: usize, _: usize, _: usize, _: usize, _: &[f32], _: &mut [f32]) {}
}

/// The general score modification of the attention core, in its order: soft-cap, then ALiBi, then an additive
/// tensor read through broadcast strides of `(B, H, T, S)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StandardScore<'a> {
    pub softcap: Option<f32>,
    pub alibi: Option<Alibi<'a>>,
    pub bias: Option<(&'a [f32], [usize; 4])>,
}

impl ScoreMod for StandardScore<'_> {
    fn apply(&self, b: usize, h: usize, i: usize, j0: usize, row: &mut [f32]) {
        if let Some(cap) = self.softcap {
            Softcap { cap }.apply(b, h, i, j0, row);
        }
        if let Some(a) = &self.alibi {
            a.apply(b, h, i, j0, row);
        }
        if let Some((data, st)) = self.bias {
            let base = b * st[0] + h * st[1] + i * st[2];
            for (x, v) in row.iter_mut().enumerate() {
                // −∞ replaces the score (NaN + (−∞) would be NaN); callers also mark such pairs hidden.
                let m = data[base + (j0 + x) * st[3]];
                *v = if m == f32::NEG_INFINITY { m } else { *v + m };
            }
        }
    }
    fn chain(&self, b: usize, h: usize, i: usize, j0: usize, s: &[f32], ds: &mut [f32]) {
        // Biases are added after the cap, so only the cap has a derivative other than 1.
        if let Some(cap) = self.softcap {
            Softcap { cap }.chain(b, h, i, j0, s, ds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Classification must never contradict `visible`: Empty tiles have no visible pair, Full tiles no hidden one.
    fn check_classify(m: &impl MaskMod, b: usize, t: usize, s: usize) {
        for (bi, bt) in [(1, 1), (3, 5), (4, 4), (8, 8)] {
            for i0 in (0..t).step_by(bi) {
                for j0 in (0..s).step_by(bt) {
                    let (i1, j1) = ((i0 + bi).min(t), (j0 + bt).min(s));
                    let kind = m.classify(b, 0, i0, i1, j0, j1);
                    let vis: Vec<bool> = (i0..i1)
                        .flat_map(|i| (j0..j1).map(move |j| (i, j)))
                        .map(|(i, j)| m.visible(b, 0, i, j))
                        .collect();
                    match kind {
                        TileKind::Empty => {
                            assert!(vis.iter().all(|v| !v), "Empty tile {i0}..{i1} x {j0}..{j1} has visible keys")
                        }
                        TileKind::Full => {
                            assert!(vis.iter().all(|v| *v), "Full tile {i0}..{i1} x {j0}..{j1} hides keys")
                        }
                        TileKind::Partial => {}
                    }
                }
            }
        }
    }

    #[test]
    fn tile_classification_agrees_with_visibility() {
        for (t, s) in [(9, 9), (5, 13), (13, 5), (1, 7)] {
            let off = s as isize - t as isize;
            check_classify(&Causal { offset: off }, 0, t, s);
            check_classify(&SlidingWindow { offset: off, left: 3, right: 1 }, 0, t, s);
            check_classify(&SlidingWindow { offset: off, left: 2, right: 0 }, 0, t, s);
            for (l, r) in [(UNBOUNDED, 0), (0, UNBOUNDED), (UNBOUNDED, UNBOUNDED), (isize::MAX as usize, 1)] {
                let w = SlidingWindow { offset: off, left: l, right: r };
                check_classify(&w, 0, t, s);
                // An unbounded side hides nothing on that side.
                for i in 0..t {
                    let d = i as isize + off;
                    for j in 0..s {
                        let want = (l >= s || j as isize >= d - l as isize) && (r >= t || j as isize <= d + r as isize);
                        assert_eq!(w.visible(0, 0, i, j), want, "window ({l}, {r}) T{t} S{s} at ({i}, {j})");
                    }
                }
            }
            let kl = [s, s / 2];
            let pre = [2usize, 0];
            let qd: Vec<i64> = (0..2 * t).map(|i| ((i % t) / 3) as i64).collect();
            let kd: Vec<i64> = (0..2 * s).map(|j| ((j % s) / 4) as i64).collect();
            let masks = [
                StandardMask { t, s, causal: true, key_lengths: Some(&kl), ..Default::default() },
                StandardMask { t, s, prefix_lengths: Some(&pre), ..Default::default() },
                StandardMask {
                    t,
                    s,
                    causal: true,
                    window: Some((2, 0)),
                    documents: Some((&qd, &kd)),
                    ..Default::default()
                },
                StandardMask { t, s, window: Some((1, 2)), key_lengths: Some(&kl), ..Default::default() },
            ];
            for m in &masks {
                for b in 0..2 {
                    check_classify(m, b, t, s);
                }
            }
        }
    }
}
