"""PyTorch oracle for NaN / ±inf propagation through the attention core: fixtures/nan/<case>.safetensors.

Tensors
  q (B,H,T,D)  k (B,Hkv,S,D)  v (B,Hkv,S,Dv)  dout (B,H,T,Dv)                              inputs, float32
  [mask]  uint8 (1 = may attend) or float32 additive, broadcastable to (B,H,T,S)         when meta mask.tensor set
  out (B,H,T,Dv)  lse (B,H,T)                                                            outputs
  dq dk dv [dmask]                                                                       gradients of sum(out*dout)
Metadata
  mask   = {"causal", "window", "key_lengths", "prefix_lengths", "documents", "alibi", "softcap", "tensor"} (JSON),
           as in scripts/oracle/attention.py (prefix_lengths, documents and alibi are never set here)
  scale  = float or "default" (1/sqrt(D))
  oracle = "exact"
  sdpa_extra_nan = number of out / gradient elements where PyTorch gives NaN and the exact oracle does not (PyTorch
           forms 0 * NaN across masked pairs); PyTorch is F.scaled_dot_product_attention in float32 with the MATH
           backend (is_causal, or the mask as a user would pass it), or, for softcap cases (SDPA has no softcap),
           the same unfused math by hand in float64
  sdpa_reference = "sdpa" or "naive" (which of the two sdpa_extra_nan counts against)
  sdpa_flash_extra_nan, sdpa_flash_missing_nan = (not for softcap cases) the same count for SDPA's default CPU choice,
           the fused flash kernel, and the count of elements that are NaN in the exact oracle but not there: that
           kernel turns a row of NaN scores into out = 0, so it is counted only, never checked
  fully_masked_rows = number of (b, h, i) rows that see no key

Semantics ("exact masking"; query i < T, key j < S, diagonal d = i + S - T, all masks end-aligned):
  visible(i, j): causal j <= d; window (l, r) d-l <= j <= d+r; key_lengths[b] j < len; bool tensor 1;
                 additive tensor entry != -inf.
  s = scale * q.k -> softcap c*tanh(s/c) -> + additive tensor -> masked pairs set to -inf -> softmax -> @ v.
  A masked pair contributes exactly nothing to any output or gradient, whatever q_i, k_j, v_j, dout_i or the mask
  entry hold: no 0 * NaN is ever formed across it. A visible pair follows plain IEEE arithmetic, as PyTorch would
  (a NaN or +inf score makes its row's softmax NaN). A row that sees no key has out = 0, lse = -inf, zero gradients.
  lse = m + log(sum_j exp(s_j - m)) with m the row max over visible keys, as PyTorch's own attention kernel computes
  it: NaN wherever the row's softmax is NaN (torch.logsumexp would say +inf for a row holding a +inf score).
  A score beyond the float32 range is taken as ±inf (case `overflow`): float32 kernels overflow there, float64 not.
  Query head h reads K/V head h // (H / Hkv).
The oracle is pairwise: every (b, h, i, j) pair gets its own copy of q_i, k_j, v_j, zeroed by a where() when the pair
is masked, so autograd never multiplies a masked pair's zero by a NaN. Everything is computed in float64 from the
stored float32 inputs; results are stored as float32.

Checks (assertions, against the MATH-backend SDPA or the naive math): wherever the exact oracle is NaN, PyTorch is
NaN too; where both are finite they agree to 1e-4 abs + 1e-4 rel; an infinity is the same infinity (or NaN) in both;
for the cases with no non-finite value on a masked pair ("visible-only") the NaN patterns are identical. A NaN q row
under a causal mask is not visible-only: PyTorch's backward forms dk_j += ds_ij q_i with ds_ij = 0 on masked pairs.
Rows that see no key are left out of these comparisons (PyTorch may report them differently). Each case also asserts
what exact masking promises for it (which rows stay finite, which gradients are exactly 0).

Run: PYTHONPATH=scripts/oracle python scripts/oracle/nan.py
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import fresh_area, gen, write_readme
from attention import keep_mask as attention_keep_mask
from common import save_sorted as save, seed_of

AREA = "nan"
F64 = torch.float64
NAN = float("nan")
INF = float("inf")
NEG_INF = float("-inf")
F32_MAX = torch.finfo(torch.float32).max
README = []




# ---------------------------------------------------------------------------------------------------------------------
# Visibility (the rules of scripts/oracle/attention.py, restricted to what these cases use)
# ---------------------------------------------------------------------------------------------------------------------


def keep_mask(spec, B, H, T, S, mask_t=None):
    """attention.py's visibility rules, plus the additive tensor's -inf entries, which hide their pair."""
    keep = attention_keep_mask(spec, B, H, T, S, mask_t)
    if spec["tensor"] == "additive":
        keep &= mask_t != NEG_INF  # NaN and +inf entries stay visible: they poison their pair, they do not hide it
    return keep


def f32_range(s):
    """Scores past the float32 range become ±inf, as in any float32 kernel; straight-through, so the gradient still
    reaches q and k through such a pair (NaN when its row is NaN), as it would in float32."""
    over = torch.isfinite(s) & (s.abs() > F32_MAX)
    return s + torch.where(over, torch.copysign(torch.full_like(s, INF), s), 0.0).detach()


def row_lse(s, dead):
    """m + log(sum exp(s - m)), m the row max: what an attention kernel reports (NaN for a NaN or ±inf-poisoned row,
    where torch.logsumexp special-cases infinities); -inf for a row that sees nothing."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(dead, 0.0, m)
    lse = m + torch.log(torch.exp(s - m).sum(-1, keepdim=True))
    return torch.where(dead, NEG_INF, lse).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# The exact oracle, the naive math, and SDPA
# ---------------------------------------------------------------------------------------------------------------------


def exact(q, k, v, madd, keep, scale, softcap):
    """Pairwise float64 attention: operands of a masked pair are where()'d to 0 before they meet, and where()'s
    backward routes exactly 0 to them, so a masked pair never contributes (not even 0 * NaN)."""
    H, Hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(H // Hkv, dim=1)  # autograd sums dk / dv back over each group's query heads
    vv = v.repeat_interleave(H // Hkv, dim=1)
    kp = keep[..., None]
    qm = torch.where(kp, q[:, :, :, None, :], 0.0)
    km = torch.where(kp, kk[:, :, None, :, :], 0.0)
    s = f32_range((qm * km).sum(-1) * scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if madd is not None:
        s = s + torch.where(keep, madd, 0.0)
    s = torch.where(keep, s, NEG_INF)
    dead = ~keep.any(-1, keepdim=True)
    # An empty row's softmax would be 0/0: it gets a dummy finite row, and the outer where() sends it (and every masked
    # pair of a NaN row) weight 0 and gradient 0.
    p = torch.where(keep, torch.softmax(torch.where(dead, 0.0, s), -1), 0.0)
    vm = torch.where(kp, vv[:, :, None, :, :], 0.0)
    out = (p[..., None] * vm).sum(3)
    return out, row_lse(s.detach(), dead), dead.squeeze(-1)


def naive(q, k, v, madd, keep, scale, softcap):
    """The usual unfused math (matmuls, masked_fill on the scores): 0 * NaN leaks across masked pairs."""
    H, Hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(H // Hkv, dim=1)
    vv = v.repeat_interleave(H // Hkv, dim=1)
    s = f32_range(scale * torch.matmul(q, kk.transpose(-1, -2)))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if madd is not None:
        s = s + madd
    s = s.masked_fill(~keep, NEG_INF)
    dead = ~keep.any(-1, keepdim=True)
    p = torch.where(dead, 0.0, torch.softmax(torch.where(dead, 0.0, s), -1))
    return torch.matmul(p, vv)


def sdpa(q, k, v, madd, keep, scale, spec, backend):
    """F.scaled_dot_product_attention as a user would call it: is_causal for plain causal T == S, a bool mask for
    the other rules, the additive tensor as is. backend None: PyTorch's default choice."""
    T, S = q.shape[2], k.shape[2]
    rules = spec["window"] is not None or spec["key_lengths"] is not None or spec["tensor"] == "bool"
    kw = {}
    if spec["tensor"] == "additive":
        assert not (rules or spec["causal"]), "additive + other rules: not needed by these cases"
        kw["attn_mask"] = madd
    elif spec["causal"] and not rules and T == S:
        kw["is_causal"] = True  # SDPA's causal is top-left aligned: only equal to ours when T == S
    elif spec["causal"] or rules:
        kw["attn_mask"] = keep
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **kw)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **kw)


def run(fn, inputs, dout, *args):
    """fn on fresh leaves made from `inputs` (None entries stay None); returns fn's result and the gradients of
    sum(out * dout)."""
    leaves = {n: (t.clone().requires_grad_(True) if t is not None else None) for n, t in inputs.items()}
    res = fn(leaves["q"], leaves["k"], leaves["v"], leaves["mask"], *args)
    out = res[0] if isinstance(res, tuple) else res
    names = [n for n, t in leaves.items() if t is not None]
    gs = torch.autograd.grad(out, [leaves[n] for n in names], grad_outputs=dout.to(out.dtype))
    return res, {"d" + n: g for n, g in zip(names, gs)}


# ---------------------------------------------------------------------------------------------------------------------
# Comparison with PyTorch
# ---------------------------------------------------------------------------------------------------------------------


def excluded(name, key, dead, shape, rep, mask_shape):
    """Elements of tensor `key` that rows seeing no key may feed (PyTorch may report those rows differently)."""
    B, H, T = dead.shape
    if key in ("out", "dq"):
        return dead[..., None].expand(shape)
    if key in ("dk", "dv"):
        grp = dead.view(B, H // rep, rep, T).any(-1).any(-1)  # (B,Hkv): any dead row among the group's heads
        return grp[:, :, None, None].expand(shape)
    if key == "dmask":
        x = dead[..., None].expand(B, H, T, shape[-1])
        for dim, n in enumerate(mask_shape):
            if n == 1:
                x = x.any(dim, keepdim=True)
        return x.expand(shape)
    raise KeyError(f"{name}: {key}")


def compare(name, ex, ref, dead, rep, mask_shape, visible_only):
    """Checks (1) NaN in exact => NaN in ref, (2) finite values agree, infinities match, (3) visible-only: identical
    NaN patterns. Returns the number of elements where ref is NaN and exact is not."""
    extra = 0
    for key, a in ex.items():
        b = ref[key].detach().to(F64)
        a = a.detach()
        assert a.shape == b.shape, f"{name}: {key} shapes {a.shape} {b.shape}"
        extra += int((b.isnan() & ~a.isnan()).sum())
        live = ~excluded(name, key, dead, a.shape, rep, mask_shape)
        an, bn = a.isnan() & live, b.isnan() & live
        assert not (an & ~bn).any(), f"{name}: {key}: exact NaN where PyTorch is not at {(an & ~bn).nonzero().tolist()}"
        both = a.isfinite() & b.isfinite() & live
        err = (a - b).abs()
        bad = both & (err > 1e-4 + 1e-4 * a.abs())
        assert not bad.any(), f"{name}: {key}: differ at {bad.nonzero().tolist()[:5]}, max {float(err[both].max())}"
        for x, y in ((a, b), (b, a)):
            xi = x.isinf() & live
            assert ((y[xi] == x[xi]) | y[xi].isnan()).all(), f"{name}: {key}: an infinity that the other lacks"
        if visible_only:
            assert torch.equal(an, bn), f"{name}: {key}: NaN patterns differ at {(an ^ bn).nonzero().tolist()[:8]}"
    return extra


# ---------------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------------


def finite(name, what, t):
    assert torch.isfinite(t).all(), f"{name}: {what} is not finite"


def case(name, desc, *, B=1, H=2, Hkv=2, T=8, S=8, D=8, Dv=8, causal=False, window=None, key_lengths=None,
         softcap=None, tensor=None, poison=None, expect=None, visible_only=False):
    """tensor: (kind, fn) with kind "bool" / "additive" and fn(rn) -> the mask tensor (rn draws standard normals from
    the case's generator, after q k v dout). poison(t) writes the non-finite values into the float32 dict t (q, k, v,
    dout, mask). expect(r) asserts what exact masking promises, on the float64 results r (out, lse, dq, ...)."""
    assert H % Hkv == 0
    g = gen(seed_of(name))

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).float()

    t = {"q": rn(B, H, T, D), "k": rn(B, Hkv, S, D), "v": rn(B, Hkv, S, Dv), "dout": rn(B, H, T, Dv), "mask": None}
    if tensor is not None:
        t["mask"] = tensor[1](rn)
        assert t["mask"].dim() == 4 and t["mask"].dtype == (torch.uint8 if tensor[0] == "bool" else torch.float32)
        torch.broadcast_shapes(t["mask"].shape, (B, H, T, S))
    if poison is not None:
        poison(t)
    spec = {"causal": causal, "window": list(window) if window is not None else None,
            "key_lengths": list(key_lengths) if key_lengths is not None else None, "prefix_lengths": None,
            "documents": False, "alibi": False, "softcap": float(softcap) if softcap is not None else None,
            "tensor": tensor[0] if tensor is not None else None}
    if window is not None and causal:
        assert window[1] == 0, "causal + window only as [l, 0]"
    scale = 1.0 / math.sqrt(D)
    keep = keep_mask(spec, B, H, T, S, t["mask"])
    additive = spec["tensor"] == "additive"

    # The exact oracle, on the float64 upcast of the stored float32 inputs.
    inputs64 = {n: t[n].to(F64) for n in ("q", "k", "v")}
    inputs64["mask"] = t["mask"].to(F64) if additive else None
    (out, lse, dead), grads = run(exact, inputs64, t["dout"], keep, scale, softcap)
    res = {"out": out.detach(), **grads}
    assert (res["out"][dead] == 0).all() and (lse[dead] == NEG_INF).all() and (res["dq"][dead] == 0).all(), name
    assert not (lse == NEG_INF)[~dead].any(), f"{name}: lse -inf on a row that sees a key"

    # What exact masking must leave untouched in this case.
    if expect is not None:
        expect({**res, "lse": lse})

    # PyTorch (float32 SDPA), or for softcap the naive float64 math.
    mask_shape = tuple(t["mask"].shape) if t["mask"] is not None else ()
    if softcap is None:
        inputs32 = {n: t[n] for n in ("q", "k", "v")}
        inputs32["mask"] = t["mask"] if additive else None
        out_r, g_r = run(sdpa, inputs32, t["dout"], keep, scale, spec, SDPBackend.MATH)
        reference = "sdpa"
        # The default CPU choice (the fused flash kernel) is only counted, not checked: it turns some NaN rows into
        # zeros (a row of NaN scores comes out as out 0), so "exact NaN => PyTorch NaN" does not hold for it.
        out_f, g_f = run(sdpa, inputs32, t["dout"], keep, scale, spec, None)
        flash = {"out": out_f, **g_f}
        flash_extra = sum(int((flash[n].isnan() & ~res[n].isnan()).sum()) for n in res)
        flash_missing = sum(int((~flash[n].isnan() & res[n].isnan()).sum()) for n in res)
    else:
        out_r, g_r = run(naive, inputs64, t["dout"], keep, scale, softcap)
        reference = "naive"
    ref = {"out": out_r, **g_r}
    assert ref.keys() == res.keys(), f"{name}: {ref.keys()} vs {res.keys()}"
    extra = compare(name, res, ref, dead, H // Hkv, mask_shape, visible_only)

    tensors = {"q": t["q"], "k": t["k"], "v": t["v"], "dout": t["dout"]}
    if t["mask"] is not None:
        tensors["mask"] = t["mask"]
    tensors["out"] = res["out"].float()
    tensors["lse"] = lse.float()
    for key in ("dq", "dk", "dv", "dmask"):
        if key in res:
            tensors[key] = res[key].float()
    meta = {"mask": spec, "scale": "default", "oracle": "exact", "sdpa_extra_nan": extra, "sdpa_reference": reference,
            "fully_masked_rows": int(dead.sum())}
    if softcap is None:
        meta["sdpa_flash_extra_nan"], meta["sdpa_flash_missing_nan"] = flash_extra, flash_missing
    save(AREA, name, tensors, meta)
    n_nan = sum(int(x.isnan().sum()) for x in res.values()) + int(lse.isnan().sum())
    fl = f"flash +{flash_extra:3d} -{flash_missing:3d}" if softcap is None else "flash    n/a   "
    print(f"  {name:30s} sdpa_extra_nan {extra:4d}  {fl}  (exact NaN elements {n_nan:4d}, vs {reference}"
          f"{', visible-only' if visible_only else ''})")
    README.append((name, f"{desc} [B={B} H={H} Hkv={Hkv} T={T} S={S} D={D} Dv={Dv}; {extra} extra NaN in {reference}"
                         + (f"; {int(dead.sum())} fully masked rows" if dead.any() else "") + "]"))


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------


def put(key, index, value):
    """poison helper: t[key][index] = value."""
    def f(t):
        t[key][index] = value
    return f


def seq(*fs):
    def f(t):
        for fn in fs:
            fn(t)
    return f


def cases():
    # A NaN / inf on a visible pair only: PyTorch and the exact oracle agree NaN for NaN.
    case("q_nan_row", "q[0,0,2,3] = NaN, no mask", poison=put("q", (0, 0, 2, 3), NAN), visible_only=True)

    def q_nan_row_causal(r):
        finite("q_nan_row_causal", "dk/dv of keys 6, 7 (row 5 cannot see them)", r["dk"][0, 1, 6:])
        finite("q_nan_row_causal", "rows other than 5", r["out"][0, 1, [0, 1, 2, 3, 4, 6, 7]])
    # Not visible-only after all: the forward only meets q_i through scores (masked ones are replaced), but the
    # backward forms dk_j = sum_i ds_ij q_i with ds_ij = 0 on the masked pairs (i=5, j=6,7): 0 * NaN in PyTorch.
    case("q_nan_row_causal", "q[0,1,5,0] = NaN, causal", causal=True, poison=put("q", (0, 1, 5, 0), NAN),
         expect=q_nan_row_causal)
    case("k_nan_visible", "k[0,0,4,1] = NaN, no mask", poison=put("k", (0, 0, 4, 1), NAN), visible_only=True)

    def k_nan_causal(r):
        for key in ("out", "lse", "dq"):
            finite("k_nan_causal", f"{key} rows 0..4 of head 0", r[key][0, 0, :5])
            assert r[key][0, 0, 5:].isnan().all(), f"k_nan_causal: {key} rows 5.. of head 0 should be NaN"
            finite("k_nan_causal", f"{key} of head 1", r[key][0, 1])
    case("k_nan_causal", "k[0,0,5,2] = NaN, causal: rows 0..4 of head 0 stay finite (out, lse, dq)", causal=True,
         poison=put("k", (0, 0, 5, 2), NAN), expect=k_nan_causal)

    def v_nan_causal(r):
        for key in ("out", "lse", "dq"):
            finite("v_nan_causal", f"{key} rows 0..4 of head 1", r[key][0, 1, :5])
        finite("v_nan_causal", "out columns 1.. of head 1", r["out"][0, 1, :, 1:])
        assert r["out"][0, 1, 5:, 0].isnan().all()
    case("v_nan_causal", "v[0,1,5,0] = NaN, causal: rows 0..4 of head 1 stay finite", causal=True,
         poison=put("v", (0, 1, 5, 0), NAN), expect=v_nan_causal)
    case("v_inf_visible", "v[0,0,3,2] = +inf, no mask", poison=put("v", (0, 0, 3, 2), INF), visible_only=True)
    case("q_pos_inf", "q[0,0,1,0] = +inf, no mask", poison=put("q", (0, 0, 1, 0), INF), visible_only=True)

    def q_neg_inf(r):
        finite("q_neg_inf", "dk/dv of key 7 of kv head 1 (row 6 cannot see it)", r["dk"][0, 1, 7])
        assert r["out"][0, 1, 6].isnan().all()
    # Like q_nan_row_causal, the masked pair (6, 7) leaks 0 * inf = NaN into dk_7 in PyTorch's backward.
    case("q_neg_inf", "q[0,1,6,4] = -inf, causal", causal=True, poison=put("q", (0, 1, 6, 4), NEG_INF),
         expect=q_neg_inf)

    # Non-finite values that only masked pairs can reach: exact masking keeps them out entirely.
    def key_padding_nan(r):
        for key in ("out", "lse", "dq", "dk", "dv"):
            finite("key_padding_nan", f"{key} of batch 0", r[key][0])
        assert (r["dk"][0, :, 5:] == 0).all() and (r["dv"][0, :, 5:] == 0).all()
    case("key_padding_nan", "key_lengths [5, 8]; k and v of batch 0's padded keys 5.. are NaN: batch 0 entirely finite",
         B=2, key_lengths=[5, 8],
         poison=seq(put("k", (0, slice(None), slice(5, None)), NAN), put("v", (0, slice(None), slice(5, None)), NAN)),
         expect=key_padding_nan)
    case("additive_nan_entry", "additive mask (1,1,T,S) of standard normals with mask[0,0,1,3] = NaN, dmask",
         tensor=("additive", lambda rn: rn(1, 1, 8, 8)), poison=put("mask", (0, 0, 1, 3), NAN), visible_only=True)

    def additive_neginf(r):
        for key in ("out", "lse", "dq", "dk", "dv", "dmask"):
            finite("additive_neginf_hides_nan_key", key, r[key])
        assert (r["dk"][0, 0, 2] == 0).all() and (r["dv"][0, 0, 2] == 0).all() and (r["dmask"][..., 2] == 0).all()

    def neginf_col2(rn):
        m = torch.zeros(1, 1, 1, 8)
        m[..., 2] = NEG_INF
        return m
    case("additive_neginf_hides_nan_key", "k[0,0,2,:] = v[0,0,2,:] = NaN hidden by an additive (1,1,1,S) mask, "
         "-inf at column 2: everything finite, dk/dv of key 2 exactly 0, dmask", tensor=("additive", neginf_col2),
         poison=seq(put("k", (0, 0, 2), NAN), put("v", (0, 0, 2), NAN)), expect=additive_neginf)

    def bool_mask_hides(r):
        for key in ("out", "lse", "dq"):
            finite("bool_mask_hides_nan_key", f"{key} rows 0..3 of head 1", r[key][0, 1, :4])
            finite("bool_mask_hides_nan_key", f"{key} of head 0", r[key][0, 0])
        finite("bool_mask_hides_nan_key", "dk/dv of kv head 0", torch.stack([r["dk"][0, 0], r["dv"][0, 0]]))

    def rows03_not_key6(rn):
        m = torch.ones(1, 1, 8, 8, dtype=torch.uint8)
        m[0, 0, :4, 6] = 0
        return m
    case("bool_mask_hides_nan_key", "bool mask (1,1,T,S): rows 0..3 cannot see key 6; k[0,1,6,0] = v[0,1,6,1] = NaN",
         tensor=("bool", rows03_not_key6), poison=seq(put("k", (0, 1, 6, 0), NAN), put("v", (0, 1, 6, 1), NAN)),
         expect=bool_mask_hides)

    def dout_nan(r):
        finite("dout_nan_causal", "out and lse", torch.cat([r["out"].flatten(), r["lse"].flatten()]))
        finite("dout_nan_causal", "dq rows other than 2", r["dq"][0, 0, [0, 1, 3, 4, 5, 6, 7]])
        finite("dout_nan_causal", "dk/dv of keys 3.. (row 2 cannot see them)",
               torch.stack([r["dk"][0, 0, 3:], r["dv"][0, 0, 3:]]))
    case("dout_nan_causal", "dout[0,0,2,1] = NaN, causal", causal=True, poison=put("dout", (0, 0, 2, 1), NAN),
         expect=dout_nan)

    def softcap_nan(r):
        finite("softcap_nan_q", "rows other than 3", r["out"][0, 0, [0, 1, 2, 4, 5, 6, 7]])
        finite("softcap_nan_q", "dk of keys 4.. (row 3 cannot see them)", r["dk"][0, 0, 4:])
    case("softcap_nan_q", "softcap 5.0, q[0,0,3,2] = NaN, causal (checked against the naive math: SDPA has no softcap)",
         softcap=5.0, causal=True, poison=put("q", (0, 0, 3, 2), NAN), expect=softcap_nan)

    def fully_masked(r):
        assert (r["out"][0] == 0).all() and (r["lse"][0] == NEG_INF).all()
        for key in ("dq", "dk", "dv"):
            assert (r[key][0] == 0).all(), f"fully_masked_with_nan: {key} of batch 0 not 0"
            finite("fully_masked_with_nan", f"{key} of batch 1", r[key][1])
    case("fully_masked_with_nan", "key_lengths [0, 8]; v of batch 0 all NaN and k[0,0,0,0] = NaN: batch 0 sees "
         "nothing (out 0, lse -inf, gradients 0)", B=2, key_lengths=[0, 8],
         poison=seq(put("v", (0,), NAN), put("k", (0, 0, 0, 0), NAN)), expect=fully_masked)

    def window_nan(r):
        for key in ("out", "lse", "dq"):
            finite("window_nan_outside", f"{key} rows 3.. of head 0", r[key][0, 0, 3:])
            finite("window_nan_outside", f"{key} of head 1", r[key][0, 1])
        finite("window_nan_outside", "dk/dv keys 3.. of kv head 0", torch.stack([r["dk"][0, 0, 3:], r["dv"][0, 0, 3:]]))
    case("window_nan_outside", "causal + window [2, 0]; k[0,0,0,1] = v[0,0,0,1] = NaN, seen only by rows 0..2",
         causal=True, window=(2, 0), poison=seq(put("k", (0, 0, 0, 1), NAN), put("v", (0, 0, 0, 1), NAN)),
         expect=window_nan)

    def gqa_k_nan(r):
        for key in ("out", "lse", "dq"):
            finite("gqa_k_nan", f"{key} of heads 0, 1", r[key][0, :2])
        finite("gqa_k_nan", "dk/dv of kv head 0", torch.stack([r["dk"][0, 0], r["dv"][0, 0]]))
    case("gqa_k_nan", "GQA H=4 Hkv=2, k[0,1,3,0] = NaN, no mask (heads 2, 3 only)", H=4, Hkv=2,
         poison=put("k", (0, 1, 3, 0), NAN), expect=gqa_k_nan, visible_only=True)

    def overflow(r):
        assert r["out"][0, 0, 7].isnan().all(), "overflow: row 7 of head 0 should be NaN (+inf score)"
        for key in ("out", "lse", "dq"):
            finite("overflow", f"{key} rows 0..6 of head 0", r[key][0, 0, :7])
    # Causal, so only row 7 meets key 7: any row that saw a 1e20 key would get a one-hot softmax whose gradient is
    # 1e20 times a float32 rounding error, an ill-conditioned case rather than an overflow one.
    case("overflow", "q[0,0,7,:] = 1e20 and k[0,0,7,:] = 1e20, causal: one score overflows float32 to +inf",
         causal=True, poison=seq(put("q", (0, 0, 7), 1e20), put("k", (0, 0, 7), 1e20)), expect=overflow,
         visible_only=True)

    def t_neq_s(r):
        for key in ("out", "lse", "dq"):
            finite("t_neq_s_causal_nan", f"{key} rows 0, 1 of head 0", r[key][0, 0, :2])
            assert r[key][0, 0, 2].isnan().all()
    case("t_neq_s_causal_nan", "T=3 < S=8, causal (row i sees keys j <= i+5); k[0,0,7,0] = NaN, seen by row 2 only",
         T=3, S=8, causal=True, poison=put("k", (0, 0, 7, 0), NAN), expect=t_neq_s)

    def control(r):
        for key, x in r.items():
            finite("finite_control", key, x)
    case("finite_control", "no non-finite value, causal: the exact oracle equals SDPA everywhere", causal=True,
         expect=control, visible_only=True)


def main():
    torch.manual_seed(0)
    fresh_area(AREA)
    cases()
    write_readme(
        AREA,
        "NaN / inf propagation fixtures (generated by scripts/oracle/nan.py)",
        "Regenerate: `bash scripts/gen_fixtures.sh nan`. Tensors q k v dout [mask] -> out lse dq dk dv [dmask]; "
        "metadata `mask`, `scale`, `oracle` = \"exact\", `sdpa_extra_nan`, `sdpa_reference` (see the script's "
        "docstring). Exact masking: a masked (query, key) pair contributes exactly nothing to any output or "
        "gradient, whatever q, k, v, dout or the mask entry hold (no 0 * NaN is formed across it); a visible pair "
        "follows plain IEEE arithmetic (a NaN or +inf score makes its row's softmax NaN, and lse is NaN with it); a "
        "row that sees no key has out 0, lse -inf and zero gradients. `sdpa_extra_nan` counts the out / gradient "
        "elements where PyTorch (float32 F.scaled_dot_product_attention, MATH backend; the unfused float64 math for "
        "softcap cases) gives NaN and the exact oracle does not: PyTorch's 0 * NaN leaking across masked pairs. "
        "`sdpa_flash_extra_nan` / `sdpa_flash_missing_nan`: NaN that SDPA's default CPU flash kernel adds / drops.",
        README,
    )


if __name__ == "__main__":
    main()
