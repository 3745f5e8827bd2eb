//! The f32 recurrences of [`crate::rnn_seq`] on persistent threads: every thread of the pool owns a slice of the
//! hidden units for the whole sequence (its columns of `W_hh`, packed once, stay in its cache) and the threads meet
//! at one spin barrier per step, where a task per step would pay a wake-up per step (a step is tens of
//! microseconds). This is llm.c's `#pragma omp parallel` structure, on rayon's `broadcast`.
//!
//! Forward step: each thread forms the gates of its units, `gx_t + h_{t−1} W_hhᵀ[:, units]` (register-blocked
//! kernel on its packed weights), applies the cell to them, writes its columns of `h_t`; barrier. Backward step:
//! each thread back-propagates its units through the cell into the step's gate gradients; barrier; then forms its
//! columns of `dh_{t−1} = dgates_t W_hh[:, units]` (its own columns only, so no second barrier).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::flash::gemm::{gemm_strided, QUANTUM};
use crate::flash::simd::Isa;
use crate::flash::SyncPtr;
use crate::rnn::{gru_backward_isa, gru_forward_isa, lstm_backward_isa, lstm_forward_isa};
use crate::rnn_seq::{SeqDims, SeqSaved};

/// A barrier for the threads of one broadcast: spins (a step is short), yielding after a while so an
/// oversubscribed machine still makes progress.
struct SpinBarrier {
    waiting: AtomicUsize,
    generation: AtomicUsize,
    n: usize,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        Self { waiting: AtomicUsize::new(0), generation: AtomicUsize::new(0), n }
    }

    fn wait(&self) {
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
            if spins < 20_000 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
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

    /// Runs `work(units)` on `threads` pool threads at once, each with its hidden units (on this thread alone for a
    /// team of one). Threads of the pool beyond the team return at once (the barrier counts only the team).
    fn run(&self, h: usize, work: impl Fn(std::ops::Range<usize>) + Sync) {
        if self.threads == 1 {
            return work(0..h);
        }
        rayon::broadcast(|ctx| {
            if ctx.index() < self.threads && ctx.num_threads() >= self.threads {
                work(units(h, self.threads, ctx.index()))
            }
        });
    }
}

/// The hidden units of thread `p` of `threads`: contiguous, multiples of 4 (so 4 gate chunks fill whole
/// micro-kernel quanta where possible).
fn units(h: usize, threads: usize, p: usize) -> std::ops::Range<usize> {
    let per = h.div_ceil(threads).div_ceil(4) * 4;
    (p * per).min(h)..((p + 1) * per).min(h)
}

/// Threads for a recurrence of `h` units: at most one per 16 units, and the pool's size.
fn threads_for(h: usize) -> usize {
    rayon::current_num_threads().min(h.div_ceil(16)).max(1)
}

/// Columns per panel of a packed operand: one AVX-512 micro-tile wide.
const PANEL: usize = 64;

/// A row-major `(k × n)` B operand stored as contiguous column panels of [`PANEL`] columns (the last narrower, a
/// multiple of the micro-kernel's quantum). A panel's rows are 256 B apart instead of `4n` B: streaming it does not
/// alias in L1 (rows 4 KiB apart all map to one set), and each panel stays in L2 across the steps.
struct Panels {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl Panels {
    /// Element `(p, j)` from `f`, `n` padded to a multiple of the quantum (padding columns are `f`'s too).
    fn from_fn(k: usize, n: usize, f: impl Fn(usize, usize) -> f32) -> Self {
        let n = n.div_ceil(QUANTUM) * QUANTUM;
        let mut data = vec![0f32; k * n];
        for j0 in (0..n).step_by(PANEL) {
            let w = PANEL.min(n - j0);
            for p in 0..k {
                for j in 0..w {
                    data[j0 * k + p * w + j] = f(p, j0 + j);
                }
            }
        }
        Self { data, k, n }
    }

    /// `c (m × n, ldc) (+)= a (m × k, lda) · self`.
    ///
    /// # Safety
    /// `a` and `c` address the rows and columns named; `isa` is supported.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(&self, isa: Isa, m: usize, a: *const f32, lda: usize, c: *mut f32, ldc: usize, accumulate: bool) {
        for j0 in (0..self.n).step_by(PANEL) {
            let w = PANEL.min(self.n - j0);
            gemm_strided(
                isa,
                m,
                w,
                self.k,
                a,
                (lda, 1),
                self.data.as_ptr().add(j0 * self.k),
                w,
                c.add(j0),
                ldc,
                accumulate,
            );
        }
    }
}

/// `W_hh` rows `q·H + units` for each gate chunk `q`, as the B operand of `h · Wᵀ`: `(H × G·u)` with column
/// `q·u + j` = `W_hh[q·H + a + j][·]`, zero-padded.
fn pack_forward(w: &[f32], g: usize, h: usize, u: std::ops::Range<usize>) -> (Panels, usize) {
    let un = u.len();
    let panels =
        Panels::from_fn(
            h,
            g * un,
            |k, col| if col < g * un { w[((col / un) * h + u.start + col % un) * h + k] } else { 0.0 },
        );
    let n = panels.n;
    (panels, n)
}

/// `W_hh[:, units]` as the B operand of `dgates · W_hh`: `(G·H × u)`, zero-padded.
fn pack_backward(w: &[f32], g: usize, h: usize, u: std::ops::Range<usize>) -> (Panels, usize) {
    let un = u.len();
    let panels = Panels::from_fn(g * h, un, |r, col| if col < un { w[r * h + u.start + col] } else { 0.0 });
    let n = panels.n;
    (panels, n)
}

/// Shared buffers addressed by column ranges that no two threads share within a phase.
#[derive(Clone, Copy)]
struct Shared(SyncPtr<f32>);

impl Shared {
    fn of(v: &mut [f32]) -> Self {
        Shared(SyncPtr(v.as_mut_ptr()))
    }
    /// # Safety
    /// `[at, at + len)` lies in the buffer and no other thread touches it in this phase.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.get().add(at), len)
    }
}

/// LSTM forward; see `rnn_seq::lstm_sequence_forward` (same contract, f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn lstm_forward(
    d: SeqDims,
    gx: &[f32],
    w: &[f32],
    lengths: &[usize],
    h: &mut [f32],
    c: &mut [f32],
    y: &mut [f32],
    saved: &mut SeqSaved<f32>,
) {
    let SeqDims { b, t: tt, h: hw, .. } = d;
    let team = Team::new(&d);
    let (order, barrier, isa) = (&team.order, &team.barrier, team.isa);
    let mut hb = [h.to_vec(), vec![0f32; b * hw]];
    let (h0, h1) = hb.split_at_mut(1);
    let hs = [Shared::of(&mut h0[0]), Shared::of(&mut h1[0])];
    let (cs, ys) = (Shared::of(c), Shared::of(y));
    let (sg, sh, sc) = (Shared::of(&mut saved.gates), Shared::of(&mut saved.h_prev), Shared::of(&mut saved.c_prev));
    team.run(hw, |u| {
        let un = u.len();
        let (wp, np) = pack_forward(w, 4, hw, u.clone());
        // SAFETY: this thread's units of the initial cell, read before anyone writes the final one.
        let mut cp: Vec<f32> = (0..b).flat_map(|r| unsafe { cs.slice(r * hw + u.start, un).to_vec() }).collect();
        let (mut gates, mut hc) = (vec![0f32; b * np], vec![0f32; 2 * un]);
        for (s, &t) in order.iter().enumerate() {
            let (cur, next) = (hs[s % 2], hs[(s + 1) % 2]);
            // SAFETY: the current state is only read in this phase (written in the previous one, behind the barrier).
            let hcur = unsafe { cur.slice(0, b * hw) as &[f32] };
            for r in 0..b {
                for q in 0..4 {
                    let src = &gx[(r * tt + t) * 4 * hw + q * hw + u.start..(r * tt + t) * 4 * hw + q * hw + u.end];
                    gates[r * np + q * un..r * np + (q + 1) * un].copy_from_slice(src);
                }
            }
            if un > 0 {
                // SAFETY: `isa` detected; np is a multiple of QUANTUM; the buffers hold the rows and columns named.
                unsafe { wp.product(isa, b, hcur.as_ptr(), hw, gates.as_mut_ptr(), np, true) };
            }
            for r in 0..b {
                // SAFETY: this thread's units of step t's rows; nobody else writes them.
                unsafe {
                    let g = sg.slice((t * b + r) * 4 * hw, 4 * hw);
                    for q in 0..4 {
                        g[q * hw + u.start..q * hw + u.end]
                            .copy_from_slice(&gates[r * np + q * un..r * np + (q + 1) * un]);
                    }
                    sh.slice((t * b + r) * hw + u.start, un).copy_from_slice(&hcur[r * hw + u.start..r * hw + u.end]);
                    sc.slice((t * b + r) * hw + u.start, un).copy_from_slice(&cp[r * un..(r + 1) * un]);
                }
                let hn = unsafe { next.slice(r * hw + u.start, un) };
                if t < lengths[r] && un > 0 {
                    // SAFETY: as above; one row of this thread's gates and cells.
                    unsafe {
                        lstm_forward_isa(isa, &gates[r * np..r * np + 4 * un], &cp[r * un..(r + 1) * un], &mut hc, un)
                    };
                    hn.copy_from_slice(&hc[..un]);
                    cp[r * un..(r + 1) * un].copy_from_slice(&hc[un..]);
                    unsafe { ys.slice((r * tt + t) * hw + u.start, un).copy_from_slice(&hc[..un]) };
                } else {
                    hn.copy_from_slice(&hcur[r * hw + u.start..r * hw + u.end]);
                }
            }
            barrier.wait();
        }
        for r in 0..b {
            // SAFETY: this thread's units.
            unsafe { cs.slice(r * hw + u.start, un).copy_from_slice(&cp[r * un..(r + 1) * un]) };
        }
    });
    h.copy_from_slice(&hb[order.len() % 2]);
}

/// LSTM backward; see `rnn_seq::lstm_sequence_backward` (f32). Returns the gate gradients `(T, B, 4H)`; `dh`, `dc`
/// become the initial state's gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lstm_backward(
    d: SeqDims,
    w: &[f32],
    lengths: &[usize],
    saved: &SeqSaved<f32>,
    dy: &[f32],
    dh: &mut [f32],
    dc: &mut [f32],
) -> Vec<f32> {
    let SeqDims { b, t: tt, h: hw, .. } = d;
    let team = Team::new(&d);
    let (order, barrier, isa) = (&team.order, &team.barrier, team.isa);
    let mut dgates = vec![0f32; tt * b * 4 * hw];
    let dgs = Shared::of(&mut dgates);
    let (dhs, dcs) = (Shared::of(dh), Shared::of(dc));
    team.run(hw, |u| {
        let un = u.len();
        let (wp, up) = pack_backward(w, 4, hw, u.clone());
        // This thread's columns of dh and dc, for the whole walk.
        let mut dhp: Vec<f32> = (0..b).flat_map(|r| unsafe { dhs.slice(r * hw + u.start, un).to_vec() }).collect();
        let mut dcp: Vec<f32> = (0..b).flat_map(|r| unsafe { dcs.slice(r * hw + u.start, un).to_vec() }).collect();
        let (mut g, mut cprev, mut dout, mut dg, mut dcn) =
            (vec![0f32; 4 * un], vec![0f32; un], vec![0f32; 2 * un], vec![0f32; 4 * un], vec![0f32; un]);
        let mut prod = vec![0f32; b * up];
        for &t in order.iter().rev() {
            for r in 0..b {
                // SAFETY: this thread's units of step t, row r.
                let dgr = unsafe { dgs.slice((t * b + r) * 4 * hw, 4 * hw) };
                if t >= lengths[r] || un == 0 {
                    (0..4).for_each(|q| dgr[q * hw + u.start..q * hw + u.end].iter_mut().for_each(|v| *v = 0.0));
                    continue;
                }
                let gs = &saved.gates[(t * b + r) * 4 * hw..(t * b + r + 1) * 4 * hw];
                (0..4).for_each(|q| g[q * un..(q + 1) * un].copy_from_slice(&gs[q * hw + u.start..q * hw + u.end]));
                cprev.copy_from_slice(&saved.c_prev[(t * b + r) * hw + u.start..(t * b + r) * hw + u.end]);
                for j in 0..un {
                    dout[j] = dhp[r * un + j] + dy[(r * tt + t) * hw + u.start + j];
                    dout[un + j] = dcp[r * un + j];
                }
                // SAFETY: `isa` detected; one row of this thread's units.
                unsafe { lstm_backward_isa(isa, &g, &cprev, &dout, &mut dg, &mut dcn, un) };
                (0..4).for_each(|q| dgr[q * hw + u.start..q * hw + u.end].copy_from_slice(&dg[q * un..(q + 1) * un]));
                dcp[r * un..(r + 1) * un].copy_from_slice(&dcn);
            }
            barrier.wait();
            // SAFETY: every thread has written step t's gate gradients (barrier); they are only read now.
            let dgt = unsafe { dgs.slice(t * b * 4 * hw, b * 4 * hw) as &[f32] };
            if un > 0 {
                // SAFETY: as in the forward.
                unsafe { wp.product(isa, b, dgt.as_ptr(), 4 * hw, prod.as_mut_ptr(), up, false) };
            }
            for r in 0..b {
                if t < lengths[r] {
                    dhp[r * un..(r + 1) * un].copy_from_slice(&prod[r * up..r * up + un]);
                }
            }
        }
        for r in 0..b {
            // SAFETY: this thread's units.
            unsafe {
                dhs.slice(r * hw + u.start, un).copy_from_slice(&dhp[r * un..(r + 1) * un]);
                dcs.slice(r * hw + u.start, un).copy_from_slice(&dcp[r * un..(r + 1) * un]);
            }
        }
    });
    dgates
}

/// GRU forward; see `rnn_seq::gru_sequence_forward` (f32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gru_forward(
    d: SeqDims,
    gx: &[f32],
    w: &[f32],
    b_hh: &[f32],
    lengths: &[usize],
    h: &mut [f32],
    y: &mut [f32],
    saved: &mut SeqSaved<f32>,
) {
    let SeqDims { b, t: tt, h: hw, .. } = d;
    let team = Team::new(&d);
    let (order, barrier, isa) = (&team.order, &team.barrier, team.isa);
    let mut hb = [h.to_vec(), vec![0f32; b * hw]];
    let (h0, h1) = hb.split_at_mut(1);
    let hs = [Shared::of(&mut h0[0]), Shared::of(&mut h1[0])];
    let ys = Shared::of(y);
    let (sg, sh) = (Shared::of(&mut saved.gates), Shared::of(&mut saved.h_prev));
    team.run(hw, |u| {
        let un = u.len();
        let (wp, np) = pack_forward(w, 3, hw, u.clone());
        let bias: Vec<f32> = (0..3).flat_map(|q| b_hh[q * hw + u.start..q * hw + u.end].to_vec()).collect();
        let (mut gh, mut xg, mut hn) = (vec![0f32; b * np], vec![0f32; 3 * un], vec![0f32; un]);
        for (s, &t) in order.iter().enumerate() {
            let (cur, next) = (hs[s % 2], hs[(s + 1) % 2]);
            // SAFETY: read-only in this phase.
            let hcur = unsafe { cur.slice(0, b * hw) as &[f32] };
            for r in 0..b {
                gh[r * np..r * np + 3 * un].copy_from_slice(&bias);
            }
            if un > 0 {
                // SAFETY: as in the LSTM.
                unsafe { wp.product(isa, b, hcur.as_ptr(), hw, gh.as_mut_ptr(), np, true) };
            }
            for r in 0..b {
                // SAFETY: this thread's units of step t.
                unsafe {
                    let sgr = sg.slice((t * b + r) * 3 * hw, 3 * hw);
                    (0..3).for_each(|q| {
                        sgr[q * hw + u.start..q * hw + u.end]
                            .copy_from_slice(&gh[r * np + q * un..r * np + (q + 1) * un])
                    });
                    sh.slice((t * b + r) * hw + u.start, un).copy_from_slice(&hcur[r * hw + u.start..r * hw + u.end]);
                }
                let out = unsafe { next.slice(r * hw + u.start, un) };
                if t < lengths[r] && un > 0 {
                    let base = (r * tt + t) * 3 * hw;
                    (0..3).for_each(|q| {
                        xg[q * un..(q + 1) * un].copy_from_slice(&gx[base + q * hw + u.start..base + q * hw + u.end])
                    });
                    // SAFETY: `isa` detected; one row.
                    unsafe {
                        gru_forward_isa(
                            isa,
                            &xg,
                            &gh[r * np..r * np + 3 * un],
                            &hcur[r * hw + u.start..r * hw + u.end],
                            &mut hn,
                            un,
                        )
                    };
                    out.copy_from_slice(&hn);
                    unsafe { ys.slice((r * tt + t) * hw + u.start, un).copy_from_slice(&hn) };
                } else {
                    out.copy_from_slice(&hcur[r * hw + u.start..r * hw + u.end]);
                }
            }
            barrier.wait();
        }
    });
    h.copy_from_slice(&hb[order.len() % 2]);
}

/// GRU backward; see `rnn_seq::gru_sequence_backward` (f32). Writes `dgx`; returns the recurrent gate gradients
/// `(T, B, 3H)`; `dh` becomes the initial state's gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gru_backward(
    d: SeqDims,
    gx: &[f32],
    w: &[f32],
    lengths: &[usize],
    saved: &SeqSaved<f32>,
    dy: &[f32],
    dh: &mut [f32],
    dgx: &mut [f32],
) -> Vec<f32> {
    let SeqDims { b, t: tt, h: hw, .. } = d;
    let team = Team::new(&d);
    let (order, barrier, isa) = (&team.order, &team.barrier, team.isa);
    let mut dghs = vec![0f32; tt * b * 3 * hw];
    let (dgs, dhs, dxs) = (Shared::of(&mut dghs), Shared::of(dh), Shared::of(dgx));
    team.run(hw, |u| {
        let un = u.len();
        let (wp, up) = pack_backward(w, 3, hw, u.clone());
        let mut dhp: Vec<f32> = (0..b).flat_map(|r| unsafe { dhs.slice(r * hw + u.start, un).to_vec() }).collect();
        let mut direct = vec![0f32; b * un];
        let (mut xg, mut gg, mut dyt) = (vec![0f32; 3 * un], vec![0f32; 3 * un], vec![0f32; un]);
        let (mut dxg, mut dgg, mut dd) = (vec![0f32; 3 * un], vec![0f32; 3 * un], vec![0f32; un]);
        let mut prod = vec![0f32; b * up];
        for &t in order.iter().rev() {
            for r in 0..b {
                // SAFETY: this thread's units of step t, row r.
                let (dgr, dxr) =
                    unsafe { (dgs.slice((t * b + r) * 3 * hw, 3 * hw), dxs.slice((r * tt + t) * 3 * hw, 3 * hw)) };
                if t >= lengths[r] || un == 0 {
                    (0..3).for_each(|q| {
                        dgr[q * hw + u.start..q * hw + u.end].iter_mut().for_each(|v| *v = 0.0);
                        dxr[q * hw + u.start..q * hw + u.end].iter_mut().for_each(|v| *v = 0.0);
                    });
                    continue;
                }
                let base = (r * tt + t) * 3 * hw;
                let gs = &saved.gates[(t * b + r) * 3 * hw..(t * b + r + 1) * 3 * hw];
                (0..3).for_each(|q| {
                    xg[q * un..(q + 1) * un].copy_from_slice(&gx[base + q * hw + u.start..base + q * hw + u.end]);
                    gg[q * un..(q + 1) * un].copy_from_slice(&gs[q * hw + u.start..q * hw + u.end]);
                });
                for j in 0..un {
                    dyt[j] = dhp[r * un + j] + dy[(r * tt + t) * hw + u.start + j];
                }
                let hp = &saved.h_prev[(t * b + r) * hw + u.start..(t * b + r) * hw + u.end];
                // SAFETY: `isa` detected; one row.
                unsafe { gru_backward_isa(isa, &xg, &gg, hp, &dyt, &mut dxg, &mut dgg, &mut dd, un) };
                (0..3).for_each(|q| {
                    dgr[q * hw + u.start..q * hw + u.end].copy_from_slice(&dgg[q * un..(q + 1) * un]);
                    dxr[q * hw + u.start..q * hw + u.end].copy_from_slice(&dxg[q * un..(q + 1) * un]);
                });
                direct[r * un..(r + 1) * un].copy_from_slice(&dd);
            }
            barrier.wait();
            // SAFETY: step t's recurrent gate gradients are complete (barrier) and only read now.
            let dgt = unsafe { dgs.slice(t * b * 3 * hw, b * 3 * hw) as &[f32] };
            if un > 0 {
                // SAFETY: as in the forward.
                unsafe { wp.product(isa, b, dgt.as_ptr(), 3 * hw, prod.as_mut_ptr(), up, false) };
            }
            for r in 0..b {
                if t < lengths[r] {
                    for j in 0..un {
                        dhp[r * un + j] = direct[r * un + j] + prod[r * up + j];
                    }
                }
            }
        }
        for r in 0..b {
            // SAFETY: this thread's units.
            unsafe { dhs.slice(r * hw + u.start, un).copy_from_slice(&dhp[r * un..(r + 1) * un]) };
        }
    });
    dghs
}
