//! The step walks of [`crate::rnn_seq`] on persistent threads: every thread of the pool owns a slice of the hidden
//! units for the whole sequence (its columns of `W_hh`, packed once, stay in its cache) and the threads meet at one
//! spin barrier per step, where a task per step would pay a wake-up per step (a step is tens of microseconds). This
//! is llm.c's `#pragma omp parallel` structure, on rayon's `broadcast`.
//!
//! Forward step: each thread forms its columns of the step's gates, `b + x_t W_ihᵀ + h_{t−1} W_hhᵀ`, in a tile of its
//! own (no gathers or scatters per step), applies the cell to its units and writes their new state into the slot the
//! next step reads; barrier. Backward step: each thread back-propagates its units through the cell into the step's
//! gate gradients; barrier; then forms its units of `dh_{t−1} = dgates_t W_hh` (its own units only, so no second
//! barrier) and its share of `dx_t = dgates_t W_ih`. The weight gradient goes a chunk of steps at a time:
//! `dW[rows of a thread's gates] += dgates[chunk, its gates]ᵀ [x | h_prev][chunk]` needs no barrier, so its pieces
//! are done by whichever thread waits at one (the time a faster core would spin), and the gate gradients of the
//! whole sequence are never written out.
//!
//! The gate columns are **blocked** ([`Blocks`]): units in blocks of [`BLOCK`], each block holding its `G` gate
//! chunks side by side, so a thread's units own one contiguous run of columns and one cell call covers a block.
//! The layout does not depend on the thread count (a forward and its backward may run on different teams).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::flash::gemm::{gemm_strided, Init, QUANTUM};
use crate::flash::simd::Isa;
use crate::flash::SyncPtr;
use crate::rnn::{
    gru_backward_blocked, gru_backward_blocked_isa, gru_forward_blocked, gru_forward_blocked_isa,
    lstm_backward_blocked, lstm_backward_blocked_isa, lstm_forward_blocked, lstm_forward_blocked_isa,
};
use crate::rnn_seq::{Cell, SeqDims, SeqParams, SeqSaved};
use crate::Real;

/// Hidden units per block of the gate layout: one AVX-512 vector of f32.
pub const BLOCK: usize = 16;

/// The blocked order of the `G·H` gate columns: block `k` holds units `k·BLOCK ..` (width `w ≤ BLOCK`, the last
/// block narrower when `BLOCK ∤ H`) as `[gate 0 (w) | gate 1 (w) | … ]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocks {
    pub g: usize,
    pub h: usize,
}

impl Blocks {
    /// Units in block `k`.
    #[inline]
    pub fn width(&self, k: usize) -> usize {
        BLOCK.min(self.h - k * BLOCK)
    }

    /// The first column of block `k`.
    #[inline]
    pub fn start(&self, k: usize) -> usize {
        self.g * BLOCK * k
    }

    /// The PyTorch row `q·H + j` (gate `q`, unit `j`) of blocked column `col`.
    pub fn natural(&self, col: usize) -> usize {
        let k = col / (self.g * BLOCK);
        let (w, within) = (self.width(k), col % (self.g * BLOCK));
        (within / w) * self.h + k * BLOCK + within % w
    }

    /// Every block: (width, first column, first unit).
    pub fn iter(self) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..self.h.div_ceil(BLOCK)).map(move |k| (self.width(k), self.start(k), k * BLOCK))
    }
}

/// A barrier for the threads of one broadcast: spins (a step is short), yielding after a while so an
/// oversubscribed machine still makes progress. A thread that panics poisons it, and every thread waiting or
/// arriving then panics too, so the team ends and the panic reaches the caller instead of the others spinning
/// forever for a thread that will never come.
struct SpinBarrier {
    waiting: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
    n: usize,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        Self { waiting: AtomicUsize::new(0), generation: AtomicUsize::new(0), poisoned: AtomicBool::new(false), n }
    }

    fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    fn check(&self) {
        if self.poisoned.load(Ordering::Acquire) {
            panic!("rnn team: another thread of the team panicked");
        }
    }

    fn wait(&self) {
        self.wait_with(|| false)
    }

    /// Waits, running `idle` (a piece of work that needs no other thread; `false` when it had none) while the
    /// others have not arrived: the time a faster thread would spin goes into work a slower one then need not do.
    fn wait_with(&self, mut idle: impl FnMut() -> bool) {
        if self.n == 1 {
            return;
        }
        let gen = self.generation.load(Ordering::Acquire);
        if self.waiting.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.waiting.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            self.check();
            if idle() {
                continue;
            }
            Self::pause(&mut spins);
        }
    }

    /// One turn of a spin: a pause, and after a while a yield, so an oversubscribed machine still makes progress.
    fn pause(spins: &mut u32) {
        if *spins < 20_000 {
            std::hint::spin_loop();
            *spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

/// Work that needs no other thread, in chunks, run chunk after chunk by whichever thread of a team has time: one
/// waiting at the barrier ([`Pieces::try_run`]), or one that needs a chunk done before it goes on
/// ([`Pieces::finish`]). A chunk's pieces run only once the walk opens it ([`Pieces::open`]); chunks are worked in
/// order, so a result that pieces of successive chunks add to sums its terms in the same order whichever thread
/// runs them. Each piece has an owner, the thread whose cache holds its operands (its packed weights, its gate
/// gradients): a thread runs its own pieces first and another's only when its own are taken, so the faster core
/// takes over no more of the slower one's work than the gap between them.
struct Pieces {
    owners: usize,
    per_owner: usize,
    /// Pieces handed out, per chunk and owner.
    claimed: Vec<AtomicUsize>,
    /// Pieces done, per chunk.
    done: Vec<AtomicUsize>,
    /// Chunks open to run.
    open: AtomicUsize,
    /// The chunk being worked (every earlier one is done).
    next: AtomicUsize,
}

impl Pieces {
    /// `chunks` of `per_owner` pieces for each of `owners`: piece `o·per_owner + i` of a chunk is owner o's i-th.
    fn new(chunks: usize, owners: usize, per_owner: usize) -> Self {
        let counters = |n: usize| (0..n).map(|_| AtomicUsize::new(0)).collect();
        Self {
            owners,
            per_owner,
            claimed: counters(chunks * owners),
            done: counters(chunks),
            open: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
        }
    }

    /// Chunks `..n` may run (their inputs are complete and their outputs free).
    fn open(&self, n: usize) {
        self.open.fetch_max(n.min(self.done.len()), Ordering::AcqRel);
    }

    /// Runs one piece, `run(chunk, piece)`, of the earliest chunk with pieces left, if one may run now: thread `me`'s
    /// own first.
    fn try_run(&self, me: usize, run: &impl Fn(usize, usize)) -> bool {
        let total = self.owners * self.per_owner;
        loop {
            let w = self.next.load(Ordering::Acquire);
            if w >= self.open.load(Ordering::Acquire) {
                return false;
            }
            for o in (0..self.owners).map(|k| (me + k) % self.owners) {
                let i = self.claimed[w * self.owners + o].fetch_add(1, Ordering::AcqRel);
                if i < self.per_owner {
                    run(w, o * self.per_owner + i);
                    if self.done[w].fetch_add(1, Ordering::AcqRel) + 1 == total {
                        self.next.store(w + 1, Ordering::Release);
                    }
                    return true;
                }
            }
            if self.done[w].load(Ordering::Acquire) < total {
                return false; // the rest of w is running elsewhere; w + 1 must wait for it
            }
            // Done, but its last finisher may not have moved `next` on yet: do it here rather than spin.
            let _ = self.next.compare_exchange(w, w + 1, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Every piece of chunk `ci` (open) done, thread `me` helping with what is left; what they wrote is then
    /// visible here.
    fn finish(&self, me: usize, ci: usize, barrier: &SpinBarrier, run: &impl Fn(usize, usize)) {
        let mut spins = 0;
        while self.done[ci].load(Ordering::Acquire) < self.owners * self.per_owner {
            barrier.check();
            if !self.try_run(me, run) {
                SpinBarrier::pause(&mut spins);
            }
        }
    }
}

/// The threads of one recurrence, the order they walk the steps in, and their barrier.
struct Team {
    order: Vec<usize>,
    threads: usize,
    barrier: SpinBarrier,
    isa: Isa,
}

impl Team {
    fn new(d: &SeqDims) -> Self {
        let order = d.order();
        // Called from inside the pool (a layer run within a rayon task), the team is this thread alone: its members
        // spin at the barrier without taking other work, so two teams broadcast from two busy workers could each
        // wait for a thread that is spinning in the other.
        let threads = if rayon::current_thread_index().is_some() { 1 } else { threads_for(d.h) };
        Self { order, threads, barrier: SpinBarrier::new(threads), isa: Isa::detect() }
    }

    /// Runs `work(p, units)` on `threads` pool threads at once, thread `p` of the team with its hidden units (on this
    /// thread alone for a team of one). Threads of the pool beyond the team return at once (the barrier counts only the team). Every
    /// member must reach every barrier: a member that panics poisons the barrier (see [`SpinBarrier`]) and the
    /// panic resumes on the caller.
    fn run(&self, h: usize, work: impl Fn(usize, std::ops::Range<usize>) + Sync) {
        if self.threads == 1 {
            return work(0, 0..h);
        }
        assert!(
            rayon::current_num_threads() >= self.threads,
            "rnn team of {} threads in a pool of {}",
            self.threads,
            rayon::current_num_threads()
        );
        rayon::broadcast(|ctx| {
            if ctx.index() < self.threads {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    work(ctx.index(), units(h, self.threads, ctx.index()))
                }));
                if let Err(payload) = r {
                    self.barrier.poison();
                    std::panic::resume_unwind(payload);
                }
            }
        });
    }
}

/// The hidden units of thread `p` of `threads`: contiguous whole blocks (possibly none).
fn units(h: usize, threads: usize, p: usize) -> std::ops::Range<usize> {
    let per = h.div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    (p * per).min(h)..((p + 1) * per).min(h)
}

/// Threads for a recurrence of `h` units: at most one per block, the pool's size, and the cap.
fn threads_for(h: usize) -> usize {
    let n = rayon::current_num_threads().min(h.div_ceil(BLOCK)).max(1);
    match TEAM_CAP.load(Ordering::Relaxed) {
        0 => n,
        cap => n.min(cap),
    }
}

static TEAM_CAP: AtomicUsize = AtomicUsize::new(0);

/// Caps the threads of every recurrence team from now on (0 removes the cap). Results never depend on it; tests
/// use it to show that on machines of any size.
#[doc(hidden)]
pub fn cap_team_threads(n: usize) {
    TEAM_CAP.store(n, Ordering::Relaxed);
}

/// Columns per panel of a packed f32 operand: one AVX-512 micro-tile wide.
const PANEL: usize = 64;

/// Rows of a panel per pass of the f32 product: a `KC × PANEL` block (32 KiB) stays in L1 while every row tile of
/// A streams past it, where the whole panel (`k × PANEL`) would be re-read from L2 by each row tile.
const KC: usize = 128;

/// A row-major `(k × n)` B operand, packed for repeated products with a small A. f32: contiguous column panels of
/// [`PANEL`] columns (the last narrower, `n` padded to the micro-kernel's quantum), whose rows are 256 B apart
/// instead of `4n` B (rows 4 KiB apart all map to one L1 set) and which stay in L2 across the steps. f64 (the
/// checking dtype): plain row-major, for the `gemm` crate.
#[doc(hidden)]
pub struct Panels<T> {
    data: Aligned<T>,
    k: usize,
    /// Columns stored (padded).
    n: usize,
    /// Columns of the operand (the product writes only these).
    cols: usize,
}

/// What a packed product's `C` starts from.
#[derive(Clone, Copy, Debug)]
pub enum Start<'a, T> {
    /// `C = A·B`.
    Zero,
    /// `C += A·B`.
    Accumulate,
    /// `C = bias + A·B`, the same bias row (the operand's columns) for every row.
    Bias(&'a [T]),
}

/// The dtypes the walks run in: their products and cells.
pub trait SeqFloat: Real {
    /// Column padding of a packed operand.
    const PAD: usize;
    /// Panel width of a packed operand.
    const PANEL: usize;

    /// `c (m × p.cols, ldc) = start + a (m × p.k, lda) · p`: only the operand's own columns of `c` are written.
    ///
    /// # Safety
    /// `a` and `c` address the rows and columns named; `isa` is supported; a bias holds `p.cols` elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(
        p: &Panels<Self>,
        isa: Isa,
        m: usize,
        a: *const Self,
        a_strides: (usize, usize),
        c: *mut Self,
        ldc: usize,
        start: Start<Self>,
    ) {
        Self::product_rows(p, 0..p.k, isa, m, a, a_strides, c, ldc, start)
    }

    /// Copies `src` to `dst` with cache-bypassing stores where there are some (see [`Shared::stream`]).
    ///
    /// # Safety
    /// `dst` addresses `src.len()` elements no one else touches.
    unsafe fn stream(dst: *mut Self, src: &[Self]);

    /// [`SeqFloat::product`] over the operand's rows `ks` only (`a` then has `ks.len()` columns).
    ///
    /// # Safety
    /// As [`SeqFloat::product`]; `ks` lies within the operand's rows.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product_rows(
        p: &Panels<Self>,
        ks: std::ops::Range<usize>,
        isa: Isa,
        m: usize,
        a: *const Self,
        a_strides: (usize, usize),
        c: *mut Self,
        ldc: usize,
        start: Start<Self>,
    );

    /// The cells over one blocked row of `un` units (see `rnn::lstm_forward_blocked` and friends): the LSTM's
    /// replaces its gate pre-activations `g` by their activations, which its backward reads as `g`.
    ///
    /// # Safety
    /// `isa` is supported.
    unsafe fn lstm_fwd(isa: Isa, g: &mut [Self], c: &[Self], hn: &mut [Self], cn: &mut [Self], un: usize);
    /// # Safety
    /// `isa` is supported.
    #[allow(clippy::too_many_arguments)]
    unsafe fn lstm_bwd(
        isa: Isa,
        g: &[Self],
        c: &[Self],
        dh: &[Self],
        dy: &[Self],
        dc: &mut [Self],
        dg: &mut [Self],
        un: usize,
    );
    /// # Safety
    /// `isa` is supported.
    unsafe fn gru_fwd(isa: Isa, x: &[Self], g: &[Self], hp: &[Self], out: &mut [Self], un: usize);
    /// # Safety
    /// `isa` is supported.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gru_bwd(
        isa: Isa,
        x: &[Self],
        g: &[Self],
        hp: &[Self],
        dh: &[Self],
        dy: &[Self],
        dx: &mut [Self],
        dg: &mut [Self],
        direct: &mut [Self],
        un: usize,
    );
}

impl SeqFloat for f32 {
    const PAD: usize = QUANTUM;
    const PANEL: usize = PANEL;

    unsafe fn product_rows(
        p: &Panels<f32>,
        ks: std::ops::Range<usize>,
        isa: Isa,
        m: usize,
        a: *const f32,
        (lda, a_cs): (usize, usize),
        c: *mut f32,
        ldc: usize,
        start: Start<f32>,
    ) {
        debug_assert!(ks.end <= p.k);
        let kb = ks.end - ks.start;
        if let Start::Bias(b) = start {
            assert!(b.len() >= p.cols, "packed product: bias of {} for {} columns", b.len(), p.cols);
        }
        if kb == 0 {
            // No rows to sum (a batch of none, an input of no features): C is its start.
            start_only(m, p.cols, c, ldc, start);
            return;
        }
        for j0 in (0..p.n).step_by(PANEL) {
            let w = PANEL.min(p.n - j0);
            let panel = p.data.as_ptr().add(j0 * p.k + ks.start * w);
            let real = p.cols.saturating_sub(j0).min(w);
            if real == w {
                for k0 in (0..kb).step_by(KC) {
                    let kc = KC.min(kb - k0);
                    let init = match (start, k0) {
                        (_, 1..) | (Start::Accumulate, _) => Init::Accumulate,
                        (Start::Zero, _) => Init::Zero,
                        (Start::Bias(b), _) => Init::Row(b.as_ptr().add(j0)),
                    };
                    gemm_strided(
                        isa,
                        m,
                        w,
                        kc,
                        a.add(k0 * a_cs),
                        (lda, a_cs),
                        panel.add(k0 * w),
                        w,
                        c.add(j0),
                        ldc,
                        init,
                    );
                }
                continue;
            }
            // The padded tail panel: C's columns past `cols` belong to someone else (another thread's gates, or
            // lie past the buffer), so its rows go through a scratch tile. The tile starts from C and takes the
            // same KC passes as a full panel, so every element is summed in the same order whichever thread's
            // panel (full or tail) it falls in: results do not depend on the thread count.
            const ROWS: usize = 16;
            let mut tile = [0f32; ROWS * PANEL];
            for r0 in (0..m).step_by(ROWS) {
                let mr = ROWS.min(m - r0);
                for r in 0..mr {
                    let row = &mut tile[r * w..(r + 1) * w];
                    match start {
                        Start::Zero => row.fill(0.0),
                        Start::Accumulate => {
                            row[..real].copy_from_slice(std::slice::from_raw_parts(c.add((r0 + r) * ldc + j0), real))
                        }
                        Start::Bias(b) => row[..real].copy_from_slice(&b[j0..j0 + real]),
                    }
                    row[real..].fill(0.0);
                }
                for k0 in (0..kb).step_by(KC) {
                    let kc = KC.min(kb - k0);
                    let (ar, pk) = (a.add(r0 * lda + k0 * a_cs), panel.add(k0 * w));
                    gemm_strided(isa, mr, w, kc, ar, (lda, a_cs), pk, w, tile.as_mut_ptr(), w, Init::Accumulate);
                }
                for r in 0..mr {
                    // Raw: C may be fresh memory (see `Fresh`) when nothing is accumulated.
                    std::ptr::copy_nonoverlapping(tile[r * w..].as_ptr(), c.add((r0 + r) * ldc + j0), real);
                }
            }
        }
    }

    unsafe fn lstm_fwd(isa: Isa, g: &mut [f32], c: &[f32], hn: &mut [f32], cn: &mut [f32], un: usize) {
        lstm_forward_blocked_isa(isa, g, c, hn, cn, un)
    }

    unsafe fn stream(dst: *mut f32, src: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
            // SSE is part of x86_64: no detection. The 16-byte aligned middle streams, the ends are plain stores.
            let head = (dst.align_offset(16)).min(src.len());
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, head);
            let body = (src.len() - head) / 4 * 4;
            for i in (head..head + body).step_by(4) {
                _mm_stream_ps(dst.add(i), _mm_loadu_ps(src.as_ptr().add(i)));
            }
            std::ptr::copy_nonoverlapping(src.as_ptr().add(head + body), dst.add(head + body), src.len() - head - body);
        }
        #[cfg(not(target_arch = "x86_64"))]
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
    }
    unsafe fn lstm_bwd(
        isa: Isa,
        g: &[f32],
        c: &[f32],
        dh: &[f32],
        dy: &[f32],
        dc: &mut [f32],
        dg: &mut [f32],
        un: usize,
    ) {
        lstm_backward_blocked_isa(isa, g, c, dh, dy, dc, dg, un)
    }
    unsafe fn gru_fwd(isa: Isa, x: &[f32], g: &[f32], hp: &[f32], out: &mut [f32], un: usize) {
        gru_forward_blocked_isa(isa, x, g, hp, out, un)
    }
    unsafe fn gru_bwd(
        isa: Isa,
        x: &[f32],
        g: &[f32],
        hp: &[f32],
        dh: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dg: &mut [f32],
        direct: &mut [f32],
        un: usize,
    ) {
        gru_backward_blocked_isa(isa, x, g, hp, dh, dy, dx, dg, direct, un)
    }
}

impl SeqFloat for f64 {
    const PAD: usize = 1;
    const PANEL: usize = usize::MAX;

    unsafe fn product_rows(
        p: &Panels<f64>,
        ks: std::ops::Range<usize>,
        _: Isa,
        m: usize,
        a: *const f64,
        (lda, a_cs): (usize, usize),
        c: *mut f64,
        ldc: usize,
        start: Start<f64>,
    ) {
        debug_assert!(ks.end <= p.k);
        if m == 0 || p.n == 0 {
            return;
        }
        if ks.is_empty() {
            start_only(m, p.cols, c, ldc, start);
            return;
        }
        if let Start::Bias(b) = start {
            for r in 0..m {
                std::slice::from_raw_parts_mut(c.add(r * ldc), p.cols).copy_from_slice(&b[..p.cols]);
            }
        }
        gemm::gemm(
            m,
            p.n,
            ks.len(),
            c,
            1,
            ldc as isize,
            !matches!(start, Start::Zero),
            a,
            a_cs as isize,
            lda as isize,
            p.data.as_ptr().add(ks.start * p.n),
            1,
            p.n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }

    unsafe fn lstm_fwd(_: Isa, g: &mut [f64], c: &[f64], hn: &mut [f64], cn: &mut [f64], un: usize) {
        lstm_forward_blocked(g, c, hn, cn, un)
    }

    unsafe fn stream(dst: *mut f64, src: &[f64]) {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len())
    }
    unsafe fn lstm_bwd(
        _: Isa,
        g: &[f64],
        c: &[f64],
        dh: &[f64],
        dy: &[f64],
        dc: &mut [f64],
        dg: &mut [f64],
        un: usize,
    ) {
        lstm_backward_blocked(g, c, dh, dy, dc, dg, un)
    }
    unsafe fn gru_fwd(_: Isa, x: &[f64], g: &[f64], hp: &[f64], out: &mut [f64], un: usize) {
        gru_forward_blocked(x, g, hp, out, un)
    }
    unsafe fn gru_bwd(
        _: Isa,
        x: &[f64],
        g: &[f64],
        hp: &[f64],
        dh: &[f64],
        dy: &[f64],
        dx: &mut [f64],
        dg: &mut [f64],
        direct: &mut [f64],
        un: usize,
    ) {
        gru_backward_blocked(x, g, hp, dh, dy, dx, dg, direct, un)
    }
}

impl<T: SeqFloat> Panels<T> {
    /// Element `(p, j)` from `f` for `j < n`; padding columns are zero.
    #[cfg(test)]
    fn from_fn(k: usize, n: usize, f: impl Fn(usize, usize) -> T) -> Self {
        let np = n.div_ceil(T::PAD) * T::PAD;
        let mut data = Aligned::zeroed(k * np);
        for j0 in (0..np).step_by(T::PANEL.min(np.max(1))) {
            let w = T::PANEL.min(np - j0);
            for p in 0..k {
                for j in 0..w.min(n.saturating_sub(j0)) {
                    data[j0 * k + p * w + j] = f(p, j0 + j);
                }
            }
        }
        Self { data, k, n: np, cols: n }
    }

    /// Column `j < n` from `row(j)`: `k` elements in up to two pieces (a row of PyTorch's `W_ih`, then one of
    /// `W_hh`). The rows of a panel are looked up once, then its lines are written in order, each from the panel's
    /// rows side by side (which stay in L1 across the next elements); a lookup per element cost 3 % of an LSTM
    /// forward.
    fn from_rows<'a>(k: usize, n: usize, row: impl Fn(usize) -> [&'a [T]; 2]) -> Self
    where
        T: 'a,
    {
        let np = n.div_ceil(T::PAD) * T::PAD;
        let mut data = Aligned::zeroed(k * np);
        for j0 in (0..np).step_by(T::PANEL.min(np.max(1))) {
            let w = T::PANEL.min(np - j0);
            let rows: Vec<[&[T]; 2]> = (j0..j0 + w.min(n.saturating_sub(j0))).map(&row).collect();
            for r in &rows {
                assert!(r[0].len() + r[1].len() == k, "packed operand: a row of {} for k {k}", r[0].len() + r[1].len());
            }
            let panel = &mut data[j0 * k..(j0 + w) * k];
            for (p, line) in panel.chunks_exact_mut(w).enumerate() {
                for (x, r) in line.iter_mut().zip(&rows) {
                    *x = if p < r[0].len() { r[0][p] } else { r[1][p - r[0].len()] };
                }
            }
        }
        Self { data, k, n: np, cols: n }
    }
}

impl<T: SeqFloat> Panels<T> {
    /// `k` rows of a row-major `(k × n)` matrix, `row(p)` holding at least `n` elements: each panel's lines are
    /// slices of the rows (a copy per line, where an element at a time cost 3 % of an LSTM backward).
    fn pack<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [T]) -> Self
    where
        T: 'a,
    {
        let mut p = Self::room(k, n);
        let width = p.width().max(1);
        p.data.chunks_mut((k * width).max(1)).enumerate().for_each(|(q, panel)| Self::fill(q, panel, k, n, &row));
        p
    }

    /// [`Panels::pack`] by the pool's threads, a panel each.
    fn pack_par<'a>(k: usize, n: usize, row: impl Fn(usize) -> &'a [T] + Sync) -> Self
    where
        T: 'a,
    {
        use rayon::prelude::*;
        let mut p = Self::room(k, n);
        let width = p.width().max(1);
        p.data.par_chunks_mut((k * width).max(1)).enumerate().for_each(|(q, panel)| Self::fill(q, panel, k, n, &row));
        p
    }

    /// Zeroed panels for a `(k × n)` operand.
    fn room(k: usize, n: usize) -> Self {
        let np = n.div_ceil(T::PAD) * T::PAD;
        Self { data: Aligned::zeroed(k * np), k, n: np, cols: n }
    }

    fn width(&self) -> usize {
        T::PANEL.min(self.n)
    }

    /// Panel `q` (`k` lines) from the rows; its padding columns stay zero.
    fn fill<'a>(q: usize, panel: &mut [T], k: usize, n: usize, row: &impl Fn(usize) -> &'a [T])
    where
        T: 'a,
    {
        if k == 0 {
            return;
        }
        let w = panel.len() / k;
        let j0 = q * T::PANEL.min(n.div_ceil(T::PAD) * T::PAD);
        let real = w.min(n.saturating_sub(j0));
        for (p, line) in panel.chunks_exact_mut(w).enumerate() {
            line[..real].copy_from_slice(&row(p)[j0..j0 + real]);
        }
    }
}

/// Rows (steps × sequences) of the gate gradients a backward walk gathers before it adds their share of the weight
/// gradient: a thread's `(G·H / threads) × WEIGHT_ROWS` operand and the chunk's packed `[x | h]` then stay in L2/L3.
const WEIGHT_ROWS: usize = 256;

/// A zeroed buffer whose first element sits on a 64-byte boundary: the products' vector loads and stores then never
/// straddle two cache lines (a `Vec` starts 16 bytes past one, and a straddling load costs two; measured: the thread
/// whose packed weights happened to be misaligned ran its products 30–50 % slower than the other).
struct Aligned<T> {
    buf: Vec<T>,
    off: usize,
    n: usize,
}

impl<T: Real> Aligned<T> {
    const LINE: usize = 64;

    fn zeroed(n: usize) -> Self {
        let size = std::mem::size_of::<T>();
        let buf = vec![T::ZERO; n + Self::LINE / size];
        let off = (Self::LINE - buf.as_ptr() as usize % Self::LINE) % Self::LINE / size;
        Self { buf, off, n }
    }
}

impl<T> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.off..self.off + self.n]
    }
}

impl<T> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.n]
    }
}

/// Shared buffers addressed by ranges that no two threads share within a phase.
#[derive(Clone, Copy)]
struct Shared<T>(SyncPtr<T>);

impl<T: Send> Shared<T> {
    fn of(v: &mut [T]) -> Self {
        Shared(SyncPtr(v.as_mut_ptr()))
    }
    /// A range this thread alone writes.
    ///
    /// # Safety
    /// `[at, at + len)` lies in the buffer and no other thread reads or writes it until the next barrier.
    #[allow(clippy::mut_from_ref)]
    unsafe fn at(&self, at: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.get().add(at), len)
    }
    /// A range this thread only reads (other threads may read it too, as the step's product reads every unit of the
    /// state row).
    ///
    /// # Safety
    /// `[at, at + len)` lies in the buffer and no thread writes it until the next barrier.
    unsafe fn read(&self, at: usize, len: usize) -> &[T] {
        std::slice::from_raw_parts(self.0.get().add(at), len)
    }
    /// A pointer `at` elements in (wrapping: only dereferenced where it lies in the buffer).
    fn ptr(&self, at: usize) -> *mut T {
        self.0.get().wrapping_add(at)
    }
    /// Copies `src` to `[at, at + src.len())`, which need not be initialised.
    ///
    /// # Safety
    /// As for [`Shared::at`].
    unsafe fn write(&self, at: usize, src: &[T]) {
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.get().add(at), src.len())
    }
    /// Zeroes `[at, at + len)`, which need not be initialised (all-zero bits are 0.0 for f32 and f64).
    ///
    /// # Safety
    /// As for [`Shared::at`].
    unsafe fn zero(&self, at: usize, len: usize)
    where
        T: Real,
    {
        std::ptr::write_bytes(self.0.get().add(at), 0, len)
    }
}

/// A buffer the walk's threads initialise: `len` elements of room, no zero-filling first (the allocator's
/// `calloc` zeroed 8 MB on the calling thread per B32 T64 H256 LSTM forward, while the team waited); each element
/// is written through [`Shared::write`] or [`Shared::zero`] before any slice covers it, and the length is set
/// once all are.
struct Fresh<'a, T> {
    v: &'a mut Vec<T>,
    len: usize,
}

impl<'a, T: Real> Fresh<'a, T> {
    fn new(v: &'a mut Vec<T>, len: usize) -> Self {
        v.clear();
        v.reserve_exact(len);
        Self { v, len }
    }
    fn shared(&mut self) -> Shared<T> {
        Shared(SyncPtr(self.v.as_mut_ptr()))
    }
    /// # Safety
    /// Every element of the room has been written.
    unsafe fn done(self) {
        self.v.set_len(self.len)
    }
}

impl<T: SeqFloat> Shared<T> {
    /// As [`Shared::write`], with stores that bypass the caches where the target has them (activations saved for
    /// a backward that runs after the whole forward: read-for-ownership of their lines and the eviction of the
    /// packed weights would be pure loss). The writer calls [`store_fence`] before its stores are published.
    ///
    /// # Safety
    /// As for [`Shared::at`].
    unsafe fn stream(&self, at: usize, src: &[T]) {
        T::stream(self.0.get().add(at), src)
    }
}

/// Orders this thread's cache-bypassing stores ([`Shared::stream`]) before its later stores: what another thread
/// reads after synchronising with it then includes them.
fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    }
}

/// `C (m × cols) = start` for a product over no rows (`Start::Accumulate` leaves C as it is).
///
/// # Safety
/// `c` addresses `m` rows of `cols` elements at stride `ldc`; a bias holds `cols` elements.
unsafe fn start_only<T: SeqFloat>(m: usize, cols: usize, c: *mut T, ldc: usize, start: Start<T>) {
    for r in 0..m {
        let row = c.add(r * ldc);
        match start {
            Start::Zero => std::ptr::write_bytes(row, 0, cols),
            Start::Bias(b) => std::ptr::copy_nonoverlapping(b.as_ptr(), row, cols),
            Start::Accumulate => {}
        }
    }
}

/// What a walk reads and writes besides the saved activations.
pub(crate) struct Walk<'a, T> {
    pub cell: Cell,
    pub d: SeqDims,
    pub lengths: &'a [usize],
    /// PyTorch's rows; each thread packs its own (blocked) rows from here.
    pub p: SeqParams<'a, T>,
    /// Blocked column → PyTorch row.
    pub perm: &'a [usize],
    /// Blocked `(G·H)`: the LSTM's `b_ih + b_hh`, the GRU's `b_ih`.
    pub bias: &'a [T],
    /// Blocked `(G·H)`: the GRU's `b_hh` (unused by the LSTM).
    pub b_hh: &'a [T],
}

impl<T: SeqFloat> Walk<'_, T> {
    /// The forward walk over `x (B, T, C)` from `h0` (and `c0`), each `(B, H)`. On entry `saved.h`,
    /// `saved.c_prev`, `saved.gates`, `saved.gx` and `out` are empty with room for their elements (only
    /// `saved.gates` and the GRU's `saved.gx` may have none: inference keeps no gates); the walk's threads write
    /// every element (see [`Fresh`]) and the lengths are set on return. `h` gets the state each step read,
    /// step-major (see [`SeqSaved::h`]); `out` the outputs `(B, T, H)`, then `h_n` (and `c_n`), each `(B, H)`.
    pub fn forward(&self, x: &[T], h0: &[T], c0: &[T], saved: &mut SeqSaved<T>, out: &mut Vec<T>) {
        let (cell, lengths) = (self.cell, self.lengths);
        let SeqDims { b, t: tt, c, h: hw, .. } = self.d;
        let g = cell.gates();
        let gw = g * hw;
        let lstm = cell == Cell::Lstm;
        let team = Team::new(&self.d);
        let (order, barrier, isa) = (&team.order, &team.barrier, team.isa);
        // The state slots: slot (t, r) at `(t·B + r)·H` holds h_{t−1} of sequence r (step-major).
        let rows = tt * b;
        let save = saved.gates.capacity() >= rows * gw && rows > 0;
        let mut hist = Fresh::new(&mut saved.h, rows * hw);
        let mut cp = Fresh::new(&mut saved.c_prev, if lstm { rows * hw } else { 0 });
        let mut outs = Fresh::new(out, (b * tt + cell.extra_rows() * b) * hw);
        let mut gates = Fresh::new(&mut saved.gates, if save { rows * gw } else { 0 });
        let mut gx = Fresh::new(&mut saved.gx, if save && !lstm { rows * gw } else { 0 });
        let (gates_s, gx_s) = (gates.shared(), gx.shared());
        let (hs, cs, os) = (hist.shared(), cp.shared(), outs.shared());
        team.run(hw, |me, u| {
            let (un, cols) = (u.len(), g * u.start..g * u.end);
            let nc = cols.len();
            // A share of the first step's rows per thread: the initial state in its slots, `c_prev` alike (the
            // products read x where it is). Raw writes: nothing here has been initialised yet.
            let share = rows.div_ceil(team.threads);
            // SAFETY: the rows of this thread's share: no other thread writes
            // them, and none reads them before the barrier below.
            unsafe {
                for row in (me * share).min(rows)..((me + 1) * share).min(rows) {
                    let (t, r) = (row / b, row % b);
                    // Later steps' state slots are written by the walk (every step writes the next one's, for every
                    // row: carried past a sequence's length), before anything reads them.
                    if t == order[0] {
                        hs.write(row * hw, &h0[r * hw..][..hw]);
                        if lstm {
                            cs.write(row * hw, &c0[r * hw..][..hw]);
                        }
                    }
                }
            }
            // This thread's rows of W_ih and W_hh as B operands.
            let wx = Panels::<T>::from_rows(c, nc, |j| [self.p.ih(self.perm[cols.start + j]), &[]]);
            let wh = Panels::<T>::from_rows(hw, nc, |j| [self.p.hh(self.perm[cols.start + j]), &[]]);
            let np = nc.div_ceil(T::PAD) * T::PAD;
            // This thread's columns of the step's gates (LSTM) or `gh` (GRU), and the GRU's `gx`: a tile that stays
            // in cache, copied out to the saved activations only when a backward will want them.
            let mut sg = Aligned::<T>::zeroed(b * np);
            let mut sx = Aligned::<T>::zeroed(if cell == Cell::Gru { b * np } else { 0 });
            // Every thread's share of the first state is in place.
            barrier.wait();
            for (s, &t) in order.iter().enumerate() {
                let next = order.get(s + 1).copied();
                // bias + x_t W_ihᵀ + h_{t−1} W_hhᵀ (the GRU keeps its input and recurrent halves apart).
                if nc > 0 {
                    let (bias, b_hh) = (Start::Bias(&self.bias[cols.clone()]), Start::Bias(&self.b_hh[cols.clone()]));
                    // SAFETY: x_t's rows are T·C apart (read where they are: a row of padding only reaches its own
                    // row's gates, which the cells never read); h_{t−1} (every unit) is complete behind the last
                    // barrier and only read in this phase; the tiles hold b rows of np columns; `isa` detected.
                    unsafe {
                        let (x_t, h_t) = (x.as_ptr().add(t * c), hs.ptr(t * b * hw));
                        match cell {
                            Cell::Lstm => {
                                T::product(&wx, isa, b, x_t, (tt * c, 1), sg.as_mut_ptr(), np, bias);
                                T::product(&wh, isa, b, h_t, (hw, 1), sg.as_mut_ptr(), np, Start::Accumulate);
                            }
                            Cell::Gru => {
                                T::product(&wx, isa, b, x_t, (tt * c, 1), sx.as_mut_ptr(), np, bias);
                                T::product(&wh, isa, b, h_t, (hw, 1), sg.as_mut_ptr(), np, b_hh);
                            }
                        }
                    }
                }
                for r in 0..b {
                    let row = t * b + r;
                    let (own, tile) = (row * hw + u.start, r * np..r * np + nc);
                    // SAFETY: this thread's units of row r. The step's state is only read (every thread's product
                    // read it too, before this point and until the barrier); the next step's slot or the final
                    // state is written by this thread alone and read by others only after the barrier.
                    unsafe {
                        let hp = hs.read(own, un);
                        let (hn, cn) = match next {
                            Some(tn) => (hs.at((tn * b + r) * hw + u.start, un), cs.ptr((tn * b + r) * hw + u.start)),
                            None => (os.at((b * tt + r) * hw + u.start, un), os.ptr((b * tt + b + r) * hw + u.start)),
                        };
                        // The cell state's destination (LSTM only: a GRU has none, and `out` has no row for it).
                        let cn = || std::slice::from_raw_parts_mut(cn, un);
                        match (cell, t < lengths[r]) {
                            (Cell::Lstm, true) => T::lstm_fwd(isa, &mut sg[tile], cs.read(own, un), hn, cn(), un),
                            (Cell::Gru, true) => T::gru_fwd(isa, &sx[tile.clone()], &sg[tile], hp, hn, un),
                            (_, false) => {
                                // Past its length a sequence carries its state.
                                hn.copy_from_slice(hp);
                                if cell == Cell::Lstm {
                                    cn().copy_from_slice(cs.read(own, un));
                                }
                            }
                        }
                    }
                }
                // What the backward reads: the LSTM's gate activations (the cells left them in the tile; padded
                // rows keep their pre-activations, never read), the GRU's `gh` and `gx`.
                if save {
                    for r in 0..b {
                        let at = (t * b + r) * gw + cols.start;
                        // SAFETY: this thread's columns of step t; nobody else touches them.
                        unsafe {
                            gates_s.stream(at, &sg[r * np..r * np + nc]);
                            if cell == Cell::Gru {
                                gx_s.stream(at, &sx[r * np..r * np + nc]);
                            }
                        }
                    }
                }
                barrier.wait();
            }
            // The outputs, from the state history (each step's new state is the next step's saved one): written
            // here, sequence by sequence, rather than per step into rows T·H apart.
            for r in 0..b {
                for (s, &t) in order.iter().enumerate() {
                    // SAFETY: this thread's units of row r of `out` (not yet written: raw writes), and of the
                    // history (complete: own units only).
                    unsafe {
                        let y = (r * tt + t) * hw + u.start;
                        if t < lengths[r] {
                            let from = match order.get(s + 1) {
                                Some(&tn) => hs.read((tn * b + r) * hw + u.start, un),
                                None => os.read((b * tt + r) * hw + u.start, un),
                            };
                            os.write(y, from);
                        } else {
                            os.zero(y, un);
                        }
                    }
                }
            }
            // The streamed activations are ordered before the team's end publishes them.
            store_fence();
        });
        // SAFETY: the team has written every element of each (see the phases above: the first states by the
        // shares, every later state slot of the history and `c_prev` by the step before it, `out` by the last step
        // and the outputs, the gates by every step's save).
        unsafe {
            for f in [hist, cp, outs, gates, gx] {
                f.done();
            }
        }
    }

    /// The backward walk. `dy (B, T, H)` and `dfinal (E, B, H)` are the gradients of the forward's outputs and
    /// final states. Writes the column sums of the gate gradients into `db` (blocked columns; the GRU's recurrent
    /// ones `dgh`, and its input ones `dgx` into `db_x`) and the initial state's gradients into `dh0` (and `dc0`);
    /// refills `dx (B, T, C)` and `dw = [dW_ih (G·H, C), dW_hh (G·H, H)]` (PyTorch's rows). Each step's
    /// `dx_t = dgx_t W_ih` is formed beside its `dh_{t−1} = dgates_t W_hh` while the step's gate gradients are in
    /// cache, each thread its share of the columns of C with its columns of `W_ih` packed once; the weight gradient
    /// a chunk of steps at a time (see the module documentation).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        saved: &SeqSaved<T>,
        x: &[T],
        dy: &[T],
        dfinal: &[T],
        dx: &mut Vec<T>,
        dw: [&mut Vec<T>; 2],
        db: &mut [T],
        db_x: &mut [T],
        dh0: &mut [T],
        dc0: &mut [T],
    ) {
        let (cell, lengths) = (self.cell, self.lengths);
        let SeqDims { b, t: tt, c, h: hw, .. } = self.d;
        let g = cell.gates();
        let gw = g * hw;
        let team = Team::new(&self.d);
        let (order, barrier, isa) = (&team.order, &team.barrier, team.isa);
        let lstm = cell == Cell::Lstm;
        // The gate gradients of the step being walked (the GRU's input side apart), every thread's columns, which
        // the step's products read whole: two slots, used by turns, so a thread may write the next step's while
        // another still reads this one's (it cannot get a step further: the barrier).
        let mut slots = vec![T::ZERO; 2 * b * gw];
        let mut slots_x = vec![T::ZERO; if lstm { 0 } else { 2 * b * gw }];
        let mut fresh_in = Fresh::new(dx, b * tt * c);
        let [dw_ih, dw_hh] = dw;
        let (mut fresh_wi, mut fresh_wh) = (Fresh::new(dw_ih, gw * c), Fresh::new(dw_hh, gw * hw));
        let (dgs, dxs) = (Shared::of(&mut slots), Shared::of(&mut slots_x));
        let (dins, dwis, dwhs) = (fresh_in.shared(), fresh_wi.shared(), fresh_wh.shared());
        let rev: Vec<usize> = order.iter().rev().copied().collect();
        let (dbs, dbxs, dhs, dcs) = (Shared::of(db), Shared::of(db_x), Shared::of(dh0), Shared::of(dc0));
        let threads = team.threads;
        let per = c.div_ceil(threads).div_ceil(T::PAD) * T::PAD;

        // The weight gradient. Each thread gathers its gate gradients of a chunk of steps, gate-major (row
        // `(t − lo)·B + r`, column `q·un + j` for gate q of its unit `u.start + j`; the GRU's input side in a ring
        // of its own), into one of two rings used by turns. A chunk's rows of `[dW_ih | dW_hh]`,
        // `dW[q·H + u] += Σ_rows dgates[row, (q, u)] · [x | h_prev][row]`, are then pieces of work (a quarter of a
        // thread's units of a gate, one half of the columns) that any thread runs while it waits at a barrier, so
        // the faster thread (cores of a shared machine differ by 10–30 % from moment to moment) takes more of them.
        // Chunks are worked in order, so every element sums its rows in the same order whichever thread runs it.
        let chunk = (WEIGHT_ROWS / b.max(1)).max(1);
        let n_chunks = tt.div_ceil(chunk);
        let los: Vec<usize> = (0..n_chunks)
            .map(|ci| rev[ci * chunk..((ci + 1) * chunk).min(tt)].iter().copied().min().unwrap_or(0))
            .collect();
        // Row strides one cache line longer than the largest thread's gates (2 KiB at G·H / threads = 512): a
        // product's walk down a column then does not keep landing in the same few L1 sets when rows are a power of
        // two long.
        let rs = g * units(hw, threads, 0).len() + 64 / std::mem::size_of::<T>();
        let ring_len = chunk.min(tt) * b * rs;
        let mut rings = vec![T::ZERO; threads * 2 * ring_len];
        let mut rings_x = vec![T::ZERO; if lstm { 0 } else { threads * 2 * ring_len }];
        let (rgs, rxs) = (Shared::of(&mut rings), Shared::of(&mut rings_x));
        let ring_of = |owner: usize, ci: usize| (owner * 2 + ci % 2) * ring_len;
        // `[x | h_prev]` of every step as the pieces' B operands, packed once.
        // x zero past a sequence's length: `dW_ih = dgatesᵀ x` must not turn a NaN or inf in the padding into
        // `0 · NaN` (PyTorch's packed sequences never read the padding either).
        let zeros = vec![T::ZERO; c];
        let px = Panels::<T>::pack_par(tt * b, c, |p| match (p / b, p % b) {
            (t, r) if t < lengths[r] => &x[(r * tt + t) * c..][..c],
            _ => &zeros,
        });
        let ph = Panels::<T>::pack_par(tt * b, hw, |p| &saved.h[p * hw..][..hw]);
        const SPLIT: usize = 4;
        let work = Pieces::new(n_chunks, threads, g * 2 * SPLIT);
        let run_piece = |ci: usize, piece: usize| {
            let (o, q) = (piece / (g * 2 * SPLIT), piece / (2 * SPLIT) % g);
            let (half, part) = (piece / SPLIT % 2, piece % SPLIT);
            let uo = units(hw, threads, o);
            let step = uo.len().div_ceil(SPLIT);
            let (r0, r1) = ((part * step).min(uo.len()), ((part + 1) * step).min(uo.len()));
            if r0 == r1 {
                return;
            }
            let steps = ((ci + 1) * chunk).min(tt) - ci * chunk;
            let ks = los[ci] * b..(los[ci] + steps) * b;
            let (panel, out, ld, ring) = match half {
                0 => (&px, &dwis, c, if lstm { &rgs } else { &rxs }),
                _ => (&ph, &dwhs, hw, &rgs),
            };
            let start = if ci == 0 { Start::Zero } else { Start::Accumulate };
            // SAFETY: the owner's ring of chunk ci is complete (open) and is not rewritten before every piece of
            // ci is done; rows q·H + uo.start + r0.. of this half's dW are this piece's alone, written
            // first in chunk 0 (`Start::Zero`) and accumulated chunk after chunk. `isa` detected.
            unsafe {
                let a = ring.ptr(ring_of(o, ci) + q * uo.len() + r0);
                let at = out.ptr((q * hw + uo.start + r0) * ld);
                T::product_rows(panel, ks, isa, r1 - r0, a, (1, rs), at, ld, start);
            }
        };
        team.run(hw, |me, u| {
            let (un, cols) = (u.len(), g * u.start..g * u.end);
            let nc = cols.len();
            // W_hh's columns of this thread's units, its rows (the gates) in blocked order: `(G·H, un)`; W_ih's
            // columns of its share of C alike.
            let wp = Panels::<T>::pack(gw, un, |k| &self.p.hh(self.perm[k])[u.start..]);
            let cx = (me * per).min(c)..((me + 1) * per).min(c);
            let wi = Panels::<T>::pack(gw, cx.len(), |k| &self.p.ih(self.perm[k])[cx.start..]);
            let np = wp.n;
            // This thread's units of dh and dc (gradients of the state after the step being walked), per sequence.
            let last = |r: usize, q: usize| &dfinal[(q * b + r) * hw + u.start..][..un];
            let mut dh: Vec<T> = (0..b).flat_map(|r| last(r, 0).to_vec()).collect();
            let mut dc: Vec<T> = match cell {
                Cell::Lstm => (0..b).flat_map(|r| last(r, 1).to_vec()).collect(),
                Cell::Gru => vec![],
            };
            let (mut sums, mut sums_x) = (vec![T::ZERO; nc], vec![T::ZERO; nc]);
            let mut direct = vec![T::ZERO; b * un];
            let mut prod = Aligned::<T>::zeroed(b * np);
            let mut dxt = Aligned::<T>::zeroed(b * wi.n);
            let gate_major = |src: &[T], dst: &mut [T]| {
                for j0 in (0..un).step_by(BLOCK) {
                    let w = BLOCK.min(un - j0);
                    for q in 0..g {
                        let (to, from) = (&mut dst[q * un + j0..], &src[g * j0 + q * w..]);
                        // A whole block is a copy of known length, which compiles to a few vector moves; a call
                        // to memcpy per 64 bytes cost more than the copy (65 K of them per thread at B32 T64 H256).
                        match w {
                            BLOCK => to[..BLOCK].copy_from_slice(&from[..BLOCK]),
                            _ => to[..w].copy_from_slice(&from[..w]),
                        }
                    }
                }
            };
            for (s, &t) in rev.iter().enumerate() {
                let ci = s / chunk;
                if s % chunk == 0 && ci >= 2 {
                    // This chunk's rings were chunk ci − 2's.
                    work.finish(me, ci - 2, barrier, &run_piece);
                }
                let (lo, mine) = (los[ci], ring_of(me, ci));
                let slot = s % 2 * b;
                for r in 0..b {
                    let row = t * b + r;
                    // SAFETY: this thread's columns of the step's slot; nobody else touches them (the other
                    // threads read the other slot at most). The cells write every gate gradient of a valid row; a
                    // padded row's are zeroed below.
                    let at = (slot + r) * gw + cols.start;
                    let (dgr, dxr) = unsafe { (dgs.at(at, nc), if lstm { &mut [][..] } else { dxs.at(at, nc) }) };
                    // SAFETY: row (t, r) of this thread's ring of chunk ci, which no piece reads before the chunk is
                    // complete (`avail`) and whose previous chunk's pieces are done (`finish` above).
                    let (ring, ring_x) = unsafe {
                        let ra = mine + ((t - lo) * b + r) * rs;
                        (rgs.at(ra, nc), if lstm { &mut [][..] } else { rxs.at(ra, nc) })
                    };
                    if t >= lengths[r] {
                        for v in [&mut *dgr, &mut *dxr, &mut *ring, &mut *ring_x] {
                            v.fill(T::ZERO);
                        }
                        continue;
                    }
                    let (own, mine) = (row * hw + u.start, r * un..(r + 1) * un);
                    let (gates, dy) =
                        (&saved.gates[row * gw + cols.start..][..nc], &dy[(r * tt + t) * hw + u.start..][..un]);
                    // SAFETY: `isa` detected; row r's slices of this thread's units.
                    unsafe {
                        match cell {
                            Cell::Lstm => {
                                let cp = &saved.c_prev[own..own + un];
                                T::lstm_bwd(isa, gates, cp, &dh[mine.clone()], dy, &mut dc[mine], dgr, un);
                            }
                            Cell::Gru => {
                                let hp = &saved.h[row * hw + u.start..][..un];
                                let xg = &saved.gx[row * gw + cols.start..][..nc];
                                T::gru_bwd(isa, xg, gates, hp, &dh[mine.clone()], dy, dxr, dgr, &mut direct[mine], un);
                            }
                        }
                    }
                    sums.iter_mut().zip(dgr.iter()).for_each(|(a, &v)| *a += v);
                    sums_x.iter_mut().zip(dxr.iter()).for_each(|(a, &v)| *a += v);
                    gate_major(dgr, ring);
                    if !lstm {
                        gate_major(dxr, ring_x);
                    }
                }
                barrier.wait_with(|| work.try_run(me, &run_piece));
                if (s + 1) % chunk == 0 || s + 1 == tt {
                    // Every thread's ring of chunk ci is complete: its pieces may run.
                    work.open(ci + 1);
                }
                // SAFETY: every thread has written step t's gate gradients (barrier); they are only read now. Rows
                // (r, t) of dx, T·C apart, this thread's columns: written once, by the product, which reads nothing
                // of them (`Start::Zero`); a padded step's zero gate gradients give its zero rows. `isa` detected.
                unsafe {
                    if un > 0 {
                        T::product(&wp, isa, b, dgs.ptr(slot * gw), (gw, 1), prod.as_mut_ptr(), np, Start::Zero);
                    }
                    if !cx.is_empty() {
                        let a = if lstm { dgs.ptr(slot * gw) } else { dxs.ptr(slot * gw) };
                        T::product(&wi, isa, b, a, (gw, 1), dxt.as_mut_ptr(), wi.n, Start::Zero);
                        for r in 0..b {
                            dins.write((r * tt + t) * c + cx.start, &dxt[r * wi.n..][..cx.len()]);
                        }
                    }
                }
                for r in (0..b).filter(|&r| t < lengths[r]) {
                    let (to, from) = (&mut dh[r * un..(r + 1) * un], &prod[r * np..r * np + un]);
                    match cell {
                        Cell::Lstm => to.copy_from_slice(from),
                        // The GRU's h_{t−1} also reaches h_t directly (z ⊙ h_{t−1}).
                        Cell::Gru => {
                            let direct = &direct[r * un..(r + 1) * un];
                            to.iter_mut().zip(from.iter().zip(direct)).for_each(|(d, (&p, &q))| *d = p + q);
                        }
                    }
                }
            }
            work.finish(me, n_chunks - 1, barrier, &run_piece);
            // SAFETY: this thread's columns and units.
            unsafe {
                dbs.at(cols.start, nc).copy_from_slice(&sums);
                if cell == Cell::Gru {
                    dbxs.at(cols.start, nc).copy_from_slice(&sums_x);
                }
                for r in 0..b {
                    dhs.at(r * hw + u.start, un).copy_from_slice(&dh[r * un..(r + 1) * un]);
                    if cell == Cell::Lstm {
                        dcs.at(r * hw + u.start, un).copy_from_slice(&dc[r * un..(r + 1) * un]);
                    }
                }
            }
        });
        // SAFETY: every step's row of each, each thread's columns, was written above.
        unsafe {
            fresh_in.done();
            fresh_wi.done();
            fresh_wh.done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_product_over_no_rows_leaves_c_at_its_start() {
        // A batch of no sequences (the weight gradient's rows) or an input of no features (the GRU's input half):
        // C must still be zeroed, set to the bias, or left as it was, on full panels and the tail alike.
        let (m, cols, ldc) = (7, 70, 75);
        let bias: Vec<f32> = (0..cols).map(|j| j as f32).collect();
        let p = Panels::<f32>::from_fn(5, cols, |_, _| 1.0);
        for start in [Start::Zero, Start::Accumulate, Start::Bias(&bias)] {
            let mut c = vec![3.0f32; m * ldc];
            // SAFETY: c holds m rows of ldc ≥ cols; `isa` detected; no A is read for no rows.
            unsafe {
                f32::product_rows(&p, 2..2, Isa::detect(), m, std::ptr::null(), (5, 1), c.as_mut_ptr(), ldc, start)
            };
            let mut c64 = vec![3.0f64; m * ldc];
            let p64 = Panels::<f64>::from_fn(5, cols, |_, _| 1.0);
            let b64: Vec<f64> = bias.iter().map(|&v| v as f64).collect();
            let s64 = match start {
                Start::Zero => Start::Zero,
                Start::Accumulate => Start::Accumulate,
                Start::Bias(_) => Start::Bias(&b64),
            };
            // SAFETY: as above.
            unsafe {
                f64::product_rows(&p64, 5..5, Isa::detect(), m, std::ptr::null(), (5, 1), c64.as_mut_ptr(), ldc, s64)
            };
            for r in 0..m {
                for j in 0..ldc {
                    let want = match start {
                        _ if j >= cols => 3.0,
                        Start::Zero => 0.0,
                        Start::Accumulate => 3.0,
                        Start::Bias(b) => b[j],
                    };
                    assert_eq!(c[r * ldc + j], want, "f32 {start:?} ({r}, {j})");
                    assert_eq!(c64[r * ldc + j], want as f64, "f64 {start:?} ({r}, {j})");
                }
            }
        }
    }

    #[test]
    fn streamed_copies_equal_plain_ones_at_every_alignment_and_length() {
        let src: Vec<f32> = (0..70).map(|i| i as f32 * 0.5 - 3.0).collect();
        for off in 0..5 {
            for len in [0, 1, 3, 4, 5, 17, 64, 66] {
                let mut dst = vec![f32::NAN; 80];
                // SAFETY: dst holds off + len ≤ 80 elements; nobody else touches them.
                unsafe { f32::stream(dst.as_mut_ptr().add(off), &src[..len]) };
                store_fence();
                assert_eq!(&dst[off..off + len], &src[..len], "offset {off}, length {len}");
                assert!(dst[..off].iter().chain(&dst[off + len..]).all(|v| v.is_nan()), "written outside");
            }
        }
    }

    #[test]
    fn a_panic_in_one_team_thread_reaches_the_caller_instead_of_hanging_the_others() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let r = pool.install(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let team = Team { order: vec![0], threads: 2, barrier: SpinBarrier::new(2), isa: Isa::detect() };
                team.run(2 * BLOCK, |_, u| {
                    if u.start == 0 {
                        panic!("boom");
                    }
                    team.barrier.wait(); // would wait forever for thread 0 without the poison
                });
            }))
        });
        assert!(r.is_err(), "the panic must reach the caller");
    }

    #[test]
    fn packed_products_write_only_their_own_columns() {
        // A thread's gate columns end mid-quantum when BLOCK ∤ H; the columns after them belong to the next
        // thread (or lie past the buffer) and must not be touched, read-modify-write included.
        // A is read row-major and, as the weight gradient reads its gathered gate gradients, transposed
        // (element (r, q) at r + q·lda); B is packed from a function, and from rows by the pool (a product over a
        // range of its rows checked too).
        let (m, k, cols, ldc) = (19, 150, 20, 37);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
        let lda = m + 3;
        let mut at = vec![f32::NAN; k * lda];
        for r in 0..m {
            for q in 0..k {
                at[q * lda + r] = a[r * k + q];
            }
        }
        let w = |p: usize, j: usize| ((p * 3 + j * 5) % 11) as f32 / 10.0 - 0.5;
        let rows: Vec<Vec<f32>> = (0..k).map(|p| (0..cols + 5).map(|j| w(p, j)).collect()).collect();
        // Rows 30..30 + k of a taller operand: the weight gradient's products over a chunk of steps.
        let tall =
            Panels::<f32>::from_fn(k + 40, cols, |p, j| if (30..30 + k).contains(&p) { w(p - 30, j) } else { 9.0 });
        let packs = [
            Panels::<f32>::from_fn(k, cols, w),
            Panels::<f32>::pack_par(k, cols, |p| &rows[p]),
            tall,
            Panels::<f32>::pack(k, cols, |p| &rows[p]),
        ];
        let bias: Vec<f32> = (0..cols).map(|j| j as f32 / 4.0).collect();
        let operands = [
            (a.as_ptr(), (k, 1), &packs[0], 0..k),
            (at.as_ptr(), (1, lda), &packs[1], 0..k),
            (a.as_ptr(), (k, 1), &packs[2], 30..30 + k),
            (a.as_ptr(), (k, 1), &packs[3], 0..k),
        ];
        for start in [Start::Zero, Start::Accumulate, Start::Bias(&bias)] {
            for (ap, strides, p, ks) in operands.iter().cloned() {
                let mut c = vec![f32::NAN; m * ldc];
                for r in 0..m {
                    c[r * ldc..r * ldc + cols].iter_mut().for_each(|v| *v = 1.0);
                }
                // SAFETY: buffers hold the rows and columns named; `isa` detected.
                unsafe { f32::product_rows(p, ks.clone(), Isa::detect(), m, ap, strides, c.as_mut_ptr(), ldc, start) };
                for r in 0..m {
                    for j in 0..ldc {
                        let v = c[r * ldc + j];
                        if j >= cols {
                            assert!(v.is_nan(), "column {j} of row {r} was written");
                            continue;
                        }
                        let want: f64 = (0..k).map(|q| a[r * k + q] as f64 * w(q, j) as f64).sum::<f64>()
                            + match start {
                                Start::Zero => 0.0,
                                Start::Accumulate => 1.0,
                                Start::Bias(b) => b[j] as f64,
                            };
                        assert!(
                            (v as f64 - want).abs() < 1e-4,
                            "A strides {strides:?}, rows {ks:?} ({r}, {j}): {v} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn blocked_columns_are_a_permutation_and_threads_own_contiguous_runs() {
        for (g, h) in [(4, 37), (3, 16), (4, 5), (3, 50)] {
            let bl = Blocks { g, h };
            let mut seen: Vec<usize> = (0..g * h).map(|c| bl.natural(c)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..g * h).collect::<Vec<_>>(), "g {g} h {h}");
            for threads in 1..4 {
                let mut next = 0;
                for p in 0..threads {
                    let u = units(h, threads, p);
                    assert!(u.start % BLOCK == 0 || u.is_empty());
                    // The run of columns [G·start, G·end) holds exactly the gates of these units.
                    for col in g * u.start..g * u.end {
                        let j = bl.natural(col) % h;
                        assert!(u.contains(&j), "g {g} h {h} threads {threads}: column {col} unit {j} not in {u:?}");
                    }
                    next = next.max(u.end);
                }
                assert_eq!(next, h);
            }
        }
    }
}
