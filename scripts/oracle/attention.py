"""PyTorch oracle for the attention core: fixtures/attention/<case>.safetensors.

Tensors
  q (B,H,T,D)  k (B,Hkv,S,D)  v (B,Hkv,S,Dv)  dout (B,H,T,Dv)                              inputs, float32
  [mask]  uint8 (1 = may attend) or float32 additive, broadcastable to (B,H,T,S)         when meta mask.tensor set
  [q_doc (B,T), k_doc (B,S)] int64                                                       when meta mask.documents
  out (B,H,T,Dv)  lse (B,H,T)  weights (B,H,T,S)                                         outputs
  dq dk dv [dmask]                                                                       gradients of sum(out*dout)
Metadata
  mask   = {"causal", "window", "key_lengths", "prefix_lengths", "documents", "alibi", "softcap", "tensor"} (JSON)
  scale  = float or "default" (1/sqrt(D))
  oracle = "sdpa" (out and gradients from F.scaled_dot_product_attention, checked against the manual reference)
           or "manual" (a fully masked row or a softcap: the manual reference only)

Semantics (query i < T, key j < S, diagonal d = i + S - T):
  s = scale * q.k -> softcap c*tanh(s/c) -> + alibi (-m_h |d - j|) + additive tensor
    -> positions not visible set to -inf -> safe softmax (fully masked row: weights 0, lse -inf, no NaN)
    -> weights @ v.   Query head h reads K/V head h // (H / Hkv).
Everything is computed in float64 from the stored float32 inputs; results are stored as float32.

Run: PYTHONPATH=scripts/oracle python scripts/oracle/attention.py
"""
import math

import torch
import torch.nn.functional as F

from common import fresh_area, gen, write_readme
from common import save_sorted as save, seed_of

AREA = "attention"
F64 = torch.float64
NEG_INF = float("-inf")
README = []




# ---------------------------------------------------------------------------------------------------------------------
# ALiBi slopes: the get_slopes function of the ALiBi reference implementation (ofirpress/attention_with_linear_biases)
# ---------------------------------------------------------------------------------------------------------------------


def get_slopes(n):
    def get_slopes_power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio ** i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return get_slopes_power_of_2(closest_power_of_2) + get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]


# ---------------------------------------------------------------------------------------------------------------------
# The mask, built twice: vectorised, and element by element in plain Python (cross-check of the vectorised one)
# ---------------------------------------------------------------------------------------------------------------------


def keep_mask(spec, B, H, T, S, mask_tensor=None, q_doc=None, k_doc=None):
    """Boolean (B,H,T,S): True where query i of (b,h) may see key j."""
    i = torch.arange(T).view(1, 1, T, 1)
    j = torch.arange(S).view(1, 1, 1, S)
    d = i + (S - T)
    keep = torch.ones(B, H, T, S, dtype=torch.bool)
    if spec["causal"]:
        keep &= j <= d
    if spec["window"] is not None:
        left, right = spec["window"]
        keep &= (j >= d - left) & (j <= d + right)
    if spec["key_lengths"] is not None:
        kl = torch.tensor(spec["key_lengths"]).view(B, 1, 1, 1)
        keep &= j < kl
    if spec["prefix_lengths"] is not None:
        pl = torch.tensor(spec["prefix_lengths"]).view(B, 1, 1, 1)
        keep &= (j <= d) | (j < pl)
    if spec["documents"]:
        keep &= q_doc.view(B, 1, T, 1) == k_doc.view(B, 1, 1, S)
    if spec["tensor"] == "bool":
        keep &= mask_tensor.to(torch.bool)
    return keep


def keep_mask_loop(spec, B, H, T, S, mask_tensor=None, q_doc=None, k_doc=None):
    mt = None
    if spec["tensor"] == "bool":
        mt = mask_tensor.to(torch.bool).expand(B, H, T, S)
    keep = torch.zeros(B, H, T, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                d = i + S - T
                for j in range(S):
                    ok = True
                    if spec["causal"] and not j <= d:
                        ok = False
                    if spec["window"] is not None:
                        left, right = spec["window"]
                        if not (d - left <= j <= d + right):
                            ok = False
                    if spec["key_lengths"] is not None and not j < spec["key_lengths"][b]:
                        ok = False
                    if spec["prefix_lengths"] is not None and not (j <= d or j < spec["prefix_lengths"][b]):
                        ok = False
                    if spec["documents"] and int(q_doc[b, i]) != int(k_doc[b, j]):
                        ok = False
                    if mt is not None and not bool(mt[b, h, i, j]):
                        ok = False
                    keep[b, h, i, j] = ok
    return keep


def alibi_bias(H, T, S):
    """(1,H,T,S) float64: -m_h * |d - j|."""
    m = torch.tensor(get_slopes(H), dtype=F64).view(1, H, 1, 1)
    i = torch.arange(T, dtype=F64).view(1, 1, T, 1)
    j = torch.arange(S, dtype=F64).view(1, 1, 1, S)
    d = i + (S - T)
    return -m * (d - j).abs()


# ---------------------------------------------------------------------------------------------------------------------
# The manual reference and the SDPA oracle
# ---------------------------------------------------------------------------------------------------------------------


def manual(q, k, v, scale, spec, keep, madd):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = H // Hkv
    kk = k.repeat_interleave(rep, dim=1)
    vv = v.repeat_interleave(rep, dim=1)
    s = scale * torch.matmul(q, kk.transpose(-1, -2))
    if spec["softcap"] is not None:
        c = spec["softcap"]
        s = c * torch.tanh(s / c)
    if spec["alibi"]:
        s = s + alibi_bias(H, T, S)
    if madd is not None:
        s = s + madd
    s = s.masked_fill(~keep, NEG_INF)
    dead = (s == NEG_INF).all(-1, keepdim=True)
    zero = torch.zeros((), dtype=F64)
    s_safe = torch.where(dead, zero, s)
    w = torch.where(dead, zero, torch.softmax(s_safe, -1))
    out = torch.matmul(w, vv)
    lse = torch.logsumexp(s.detach(), -1)
    return out, w, lse, dead.squeeze(-1)


def sdpa(q, k, v, scale, spec, keep, madd):
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    bias = torch.where(keep, 0.0, NEG_INF).to(F64)
    if keep.all():
        bias = None
    if spec["alibi"]:
        bias = alibi_bias(H, T, S) if bias is None else bias + alibi_bias(H, T, S)
    if madd is not None:
        bias = madd if bias is None else bias + madd
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=(H != Hkv))


def max_err(a, b):
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def case(name, desc, *, B=2, H=3, Hkv=None, T=8, S=8, D=16, Dv=None, scale="default", causal=False, window=None,
         key_lengths=None, prefix_lengths=None, docs=None, alibi=False, softcap=None, tensor=None, amp=1.3):
    """tensor: None, or ("bool", uint8 tensor) or ("additive", float32 tensor); docs: (q_doc, k_doc) int64."""
    Hkv = Hkv or H
    Dv = Dv or D
    assert H % Hkv == 0
    g = gen(seed_of(name))

    def rn(*shape, a=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * a).float()

    q32 = rn(B, H, T, D, a=amp)
    k32 = rn(B, Hkv, S, D, a=amp)
    v32 = rn(B, Hkv, S, Dv)
    dout32 = rn(B, H, T, Dv)
    spec = {"causal": causal, "window": list(window) if window is not None else None,
            "key_lengths": list(key_lengths) if key_lengths is not None else None,
            "prefix_lengths": list(prefix_lengths) if prefix_lengths is not None else None,
            "documents": docs is not None, "alibi": alibi, "softcap": float(softcap) if softcap is not None else None,
            "tensor": tensor[0] if tensor is not None else None}
    if window is not None and causal:
        assert window[1] == 0, "causal + window only as [l, 0]"
    if prefix_lengths is not None:
        assert not causal, "prefix_lengths implies causality itself"
    mask_t = tensor[1] if tensor is not None else None
    q_doc, k_doc = docs if docs is not None else (None, None)
    if mask_t is not None:
        torch.broadcast_shapes(mask_t.shape, (B, H, T, S))  # must broadcast
        assert mask_t.dim() == 4
        assert mask_t.dtype == (torch.uint8 if tensor[0] == "bool" else torch.float32)
    if docs is not None:
        assert q_doc.shape == (B, T) and k_doc.shape == (B, S) and q_doc.dtype == k_doc.dtype == torch.int64

    sc = 1.0 / math.sqrt(D) if scale == "default" else float(scale)
    keep = keep_mask(spec, B, H, T, S, mask_t if spec["tensor"] == "bool" else None, q_doc, k_doc)
    keep_ref = keep_mask_loop(spec, B, H, T, S, mask_t if spec["tensor"] == "bool" else None, q_doc, k_doc)
    assert torch.equal(keep, keep_ref), name

    def leaves():
        ls = [q32.to(F64).requires_grad_(True), k32.to(F64).requires_grad_(True), v32.to(F64).requires_grad_(True)]
        m = mask_t.to(F64).requires_grad_(True) if spec["tensor"] == "additive" else None
        return ls, m

    # manual reference
    (q, k, v), madd = leaves()
    out_m, w_m, lse_m, dead = manual(q, k, v, sc, spec, keep, madd)
    (out_m * dout32.to(F64)).sum().backward()
    g_m = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
    if madd is not None:
        g_m["dmask"] = madd.grad
        assert madd.grad.shape == mask_t.shape
    for key, t in [("out", out_m), ("weights", w_m), *g_m.items()]:
        assert not torch.isnan(t).any(), f"{name}: NaN in {key}"
        assert torch.isfinite(t).all(), f"{name}: non-finite {key}"
    assert not torch.isnan(lse_m).any(), name
    assert torch.equal(torch.isinf(lse_m), dead), name
    any_dead = bool(dead.any())
    if any_dead:
        assert (w_m.detach()[dead] == 0).all() and (out_m.detach()[dead] == 0).all()
        assert (g_m["dq"][dead] == 0).all()
    # weights rows sum to 1 where alive
    rs = w_m.detach().sum(-1)
    assert torch.allclose(rs[~dead], torch.ones_like(rs[~dead]), atol=1e-12), name
    assert (w_m.detach()[~keep.expand_as(w_m)] == 0).all(), name

    result = {"out": out_m, **g_m}
    oracle = "manual"
    if not any_dead and softcap is None:
        oracle = "sdpa"
        (q, k, v), madd = leaves()
        out_s = sdpa(q, k, v, sc, spec, keep, madd)
        (out_s * dout32.to(F64)).sum().backward()
        g_s = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
        if madd is not None:
            assert madd.grad is not None, f"{name}: SDPA gave no gradient for the additive mask"
            g_s["dmask"] = madd.grad
        errs = {"out": max_err(out_s, out_m)} | {kk: max_err(g_s[kk], g_m[kk]) for kk in g_m}
        for kk, e in errs.items():
            assert e <= 1e-5, f"{name}: SDPA vs manual {kk} differ by {e}"
        assert max(errs.values()) < 1e-10, f"{name}: SDPA vs manual {errs}"
        result = {"out": out_s, **g_s}
        # extra: PyTorch's own causal flag where it means the same thing
        if spec == {**spec, "causal": True, "window": None, "key_lengths": None, "prefix_lengths": None,
                    "documents": False, "alibi": False, "tensor": None} and T == S:
            (q, k, v), _ = leaves()
            o2 = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc, enable_gqa=(H != Hkv))
            assert max_err(o2, out_m) < 1e-10, name

    tensors = {"q": q32, "k": k32, "v": v32, "dout": dout32}
    if mask_t is not None:
        tensors["mask"] = mask_t
    if docs is not None:
        tensors["q_doc"], tensors["k_doc"] = q_doc, k_doc
    tensors["out"] = result["out"].detach().float()
    tensors["lse"] = lse_m.float()
    tensors["weights"] = w_m.detach().float()
    for kk in ("dq", "dk", "dv", "dmask"):
        if kk in result:
            tensors[kk] = result[kk].detach().float()
    meta = {"mask": spec, "scale": "default" if scale == "default" else float(scale), "oracle": oracle,
            "fully_masked_rows": int(dead.sum())}
    if alibi:
        meta["alibi_slopes"] = get_slopes(H)
    save(AREA, name, tensors, meta)
    README.append((name, f"{desc} [B={B} H={H} Hkv={Hkv} T={T} S={S} D={D} Dv={Dv}; oracle {oracle}"
                         + (f"; {int(dead.sum())} fully masked rows" if any_dead else "") + "]"))
    return name


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------


def bool_mask(g, shape, p=0.6):
    return (torch.rand(*shape, generator=g) < p)


def cases():
    g = gen(7007)
    # shapes and heads
    case("attn_basic", "no mask, T == S", B=2, H=3, T=8, S=8, D=16)
    case("attn_t_lt_s", "no mask, T < S", B=2, H=2, T=5, S=12, D=8)
    case("attn_t_gt_s", "no mask, T > S", B=2, H=2, T=12, S=5, D=8)
    case("attn_odd", "no mask, odd lengths T=7 S=13", B=1, H=2, T=7, S=13, D=8)
    case("attn_gqa", "grouped-query attention H=4 Hkv=2", B=2, H=4, Hkv=2, T=6, S=9, D=8)
    case("attn_mqa", "multi-query attention H=6 Hkv=1", B=2, H=6, Hkv=1, T=5, S=7, D=8)
    case("attn_dv", "value head dim Dv != D", B=2, H=2, T=6, S=10, D=8, Dv=12)
    case("attn_scale", "custom scale 0.3", B=2, H=2, T=6, S=6, D=8, scale=0.3, amp=1.0)
    case("attn_scale_odd_d", "D=5 with the default scale, Dv=3", B=1, H=3, T=4, S=9, D=5, Dv=3)

    # causal
    case("attn_causal", "causal, T == S", B=2, H=3, T=9, S=9, D=8, causal=True)
    case("attn_causal_decode1", "causal decode T=1 S=11 (sees every key)", B=2, H=2, T=1, S=11, D=8, causal=True)
    case("attn_causal_decode3", "causal, T=3 < S=11, end-aligned", B=2, H=2, T=3, S=11, D=8, causal=True)
    case("attn_causal_t_gt_s", "causal, T=11 > S=6: the first 5 query rows are fully masked", B=2, H=2, T=11, S=6,
         D=8, causal=True)
    case("attn_causal_gqa", "causal + GQA H=4 Hkv=2, Dv != D", B=2, H=4, Hkv=2, T=7, S=7, D=8, Dv=6, causal=True)

    # sliding windows
    case("attn_window", "window [2, 1] both sides, T == S", B=2, H=2, T=10, S=10, D=8, window=(2, 1))
    case("attn_window_t_lt_s", "window [2, 1], T=4 < S=10 (end-aligned)", B=1, H=2, T=4, S=10, D=8, window=(2, 1))
    case("attn_causal_window", "causal + window [3, 0]", B=2, H=2, T=12, S=12, D=8, causal=True, window=(3, 0))

    # key lengths / prefix LM
    case("attn_key_lengths", "key_lengths [5, 9] (padding), no fully masked row", B=2, H=2, T=6, S=9, D=8,
         key_lengths=[5, 9])
    case("attn_key_lengths_zero", "key_lengths [0, 7]: batch 0 fully masked", B=2, H=2, T=5, S=9, D=8,
         key_lengths=[0, 7])
    case("attn_prefix", "prefix-LM prefix_lengths [3, 6], T == S", B=2, H=2, T=10, S=10, D=8, prefix_lengths=[3, 6])
    case("attn_prefix_t_lt_s", "prefix-LM prefix_lengths [2, 9], T=4 < S=10", B=2, H=2, T=4, S=10, D=8,
         prefix_lengths=[2, 9])

    # documents
    qd = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 3, 3, 4, 4]], dtype=torch.int64)
    case("attn_documents_causal", "packed documents + causal, T == S", B=2, H=2, T=12, S=12, D=8, causal=True,
         docs=(qd, qd.clone()))
    qd = torch.tensor([[0, 0, 1, 1, 2, 2], [5, 5, 5, 6, 6, 6]], dtype=torch.int64)
    kd = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 3, 3, 3], [5, 5, 5, 5, 5, 5, 6, 6, 6, 6]], dtype=torch.int64)
    case("attn_documents_missing", "documents, no causal, T=6 S=10; batch 0 doc 2 has no key (fully masked rows)",
         B=2, H=2, T=6, S=10, D=8, docs=(qd, kd))
    qd = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]], dtype=torch.int64)
    kd = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 2, 2, 2, 2]], dtype=torch.int64)
    case("attn_documents_causal_t_lt_s", "documents + causal, T=4 < S=9 (decode of a packed batch)", B=2, H=2, T=4,
         S=9, D=8, causal=True, docs=(qd, kd))

    # boolean tensor masks
    T, S = 6, 9
    m = bool_mask(g, (1, 1, T, S))
    m[..., 0] = True
    case("attn_bool_11ts", "bool tensor mask (1,1,T,S)", B=2, H=3, T=T, S=S, D=8, tensor=("bool", m.to(torch.uint8)))
    m = bool_mask(g, (2, 1, 1, S))
    m[..., 4] = True
    case("attn_bool_b11s", "bool tensor mask (B,1,1,S) (padding style)", B=2, H=3, T=T, S=S, D=8,
         tensor=("bool", m.to(torch.uint8)))
    m = bool_mask(g, (2, 3, T, S))
    m[..., 2] = True
    case("attn_bool_bhts", "bool tensor mask (B,H,T,S)", B=2, H=3, T=T, S=S, D=8, tensor=("bool", m.to(torch.uint8)))
    m = bool_mask(g, (2, 3, T, S), p=0.5)
    m[..., 1] = True
    m[0, 1, 2, :] = False
    m[1, 2, 5, :] = False
    case("attn_bool_bhts_dead", "bool tensor mask (B,H,T,S) with two fully masked rows", B=2, H=3, T=T, S=S, D=8,
         tensor=("bool", m.to(torch.uint8)))
    m = bool_mask(g, (1, 1, T, S), p=0.7)
    case("attn_bool_causal_gqa", "bool tensor (1,1,T,S) AND causal, GQA H=4 Hkv=2, T=6 < S=9", B=2, H=4, Hkv=2, T=T,
         S=S, D=8, causal=True, tensor=("bool", m.to(torch.uint8)))

    # additive tensor masks
    H = 3
    a = (torch.randn(1, H, T, S, generator=g, dtype=F64) * 0.8).float()
    a[torch.rand(1, H, T, S, generator=g) < 0.25] = NEG_INF
    a[..., 3] = 0.0
    case("attn_add_1hts", "additive tensor mask (1,H,T,S) with -inf entries, dmask", B=2, H=H, T=T, S=S, D=8,
         tensor=("additive", a))
    a = (torch.randn(2, 1, T, S, generator=g, dtype=F64) * 0.8).float()
    a[torch.rand(2, 1, T, S, generator=g) < 0.25] = NEG_INF
    a[..., 7] = -0.5
    case("attn_add_b1ts", "additive tensor mask (B,1,T,S) with -inf entries, dmask", B=2, H=H, T=T, S=S, D=8,
         tensor=("additive", a))
    a = (torch.randn(2, 1, T, S, generator=g, dtype=F64) * 0.8).float()
    a[0, 0, 1, :] = NEG_INF
    case("attn_add_causal_dead", "additive (B,1,T,S) + causal; one row all -inf (fully masked), dmask", B=2, H=2, T=T,
         S=S, D=8, causal=True, tensor=("additive", a))

    # ALiBi
    case("attn_alibi4", "ALiBi H=4, no causal (symmetric |d - j|)", B=2, H=4, T=8, S=8, D=8, alibi=True)
    case("attn_alibi4_causal", "ALiBi H=4 + causal", B=2, H=4, T=8, S=8, D=8, alibi=True, causal=True)
    case("attn_alibi6", "ALiBi H=6 (non power of two), no causal, T=5 < S=9", B=1, H=6, T=5, S=9, D=8, alibi=True)
    case("attn_alibi6_causal", "ALiBi H=6 (non power of two) + causal, T=5 < S=9", B=1, H=6, T=5, S=9, D=8,
         alibi=True, causal=True)

    # softcap
    case("attn_softcap", "softcap 5.0 (scores scaled up so the cap bites)", B=2, H=2, T=7, S=7, D=8, softcap=5.0,
         amp=2.5)
    case("attn_softcap_causal", "softcap 5.0 + causal", B=2, H=2, T=7, S=7, D=8, softcap=5.0, causal=True, amp=2.5)

    # combinations
    case("attn_combo", "causal + key_lengths [10, 7] + ALiBi + GQA H=4 Hkv=2, T=4 < S=10", B=2, H=4, Hkv=2, T=4,
         S=10, D=8, causal=True, key_lengths=[10, 7], alibi=True)
    qd = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [3, 3, 3, 3, 3, 3, 4, 4]], dtype=torch.int64)
    a = (torch.randn(1, 4, 8, 8, generator=g, dtype=F64) * 0.5).float()
    a[torch.rand(1, 4, 8, 8, generator=g) < 0.15] = NEG_INF
    case("attn_combo_all",
         "softcap 4.0 + ALiBi + causal window [3, 0] + documents + key_lengths [8, 6] + additive (1,H,T,S) + GQA H=4 "
         "Hkv=2", B=2, H=4, Hkv=2, T=8, S=8, D=8, Dv=6, causal=True, window=(3, 0), key_lengths=[8, 6],
         docs=(qd, qd.clone()), alibi=True, softcap=4.0, tensor=("additive", a), amp=2.0)
    case("attn_combo_scale", "custom scale 0.2 + causal + bool tensor (B,1,1,S) + MQA H=6 Hkv=1", B=2, H=6,
         Hkv=1, T=5, S=8, D=8, scale=0.2, causal=True,
         tensor=("bool", torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 1, 1]], dtype=torch.uint8)
                 .view(2, 1, 1, 8)), amp=1.5)


def main():
    torch.manual_seed(0)
    fresh_area(AREA)
    cases()
    write_readme(
        AREA,
        "Attention-core fixtures (generated by scripts/oracle/attention.py)",
        "Regenerate: `bash scripts/gen_fixtures.sh attention`. Tensors q k v dout [mask q_doc k_doc] -> out lse "
                 "weights dq dk dv [dmask]; metadata `mask`, `scale`, `oracle` (see the script's docstring).",
        README,
    )


if __name__ == "__main__":
    main()
