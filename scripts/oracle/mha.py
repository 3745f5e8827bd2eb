"""PyTorch oracle for the multi-head attention layer (crates/attend/src/attention/mha.rs): fixtures/mha/<case>.safetensors.

Two oracles, each checked against the other where both apply:
  torch  torch.nn.MultiheadAttention(batch_first=True), need_weights=True, average_attn_weights=False. Its packed
         `in_proj_weight` (3C, C) / `in_proj_bias` (3C) (or `q_proj_weight`, `k_proj_weight`, `v_proj_weight` when
         kdim/vdim != embed_dim) are split into the layer's checkpoint names `q_proj.weight`, `q_proj.bias`, ...
  indep  an independent implementation: F.linear projections, F.scaled_dot_product_attention(enable_gqa=True) for the
         output and its gradients, the weights from an explicit softmax over K repeated per group. It covers what
         nn.MultiheadAttention cannot express: GQA / MQA (Hkv < H), head_dim != C/H, rotary embeddings.
Every torch case is also run through `indep` and must agree to 1e-10 (out, weights, every gradient); every indep case
checks its SDPA output against the explicit weights @ V.

Tensors
  x (B,T,C)                      queries (self-attention: also keys and values)
  [kv (B,S,Ckv)]                 one memory for keys and values (cross-attention)
  [key (B,S,Ck), value (B,S,Cv)] separate key and value inputs (cross-attention, kdim != vdim)
  q_proj.weight (H*D, C)   k_proj.weight (Hkv*D, Ck)   v_proj.weight (Hkv*D, Cv)   out_proj.weight (C, H*D)
  [q_proj.bias, k_proj.bias, v_proj.bias, out_proj.bias]                         when meta bias = true
  [torch.<name>]                 the nn.MultiheadAttention state_dict as PyTorch names it (torch cases)
  dout (B,T,C)                   upstream gradient; the loss is sum(out * dout)
  out (B,T,C)  weights (B,H,T,S) outputs (weights before dropout; there is no dropout here)
  dx [dkv | dkey dvalue] d<param> gradients of every input and every parameter
Metadata (JSON values)
  d_model, n_heads, n_kv_heads, head_dim, kv_dim, value_dim, bias, causal, key_lengths (null or B ints: key j of
  batch b is padding iff j >= key_lengths[b]), rope (null or {rotary_dim, max_positions, theta}; layout "halves",
  Hugging Face rotate_half, positions 0..T), oracle ("torch" | "indep")

Everything is computed in float64 from float32-rounded inputs and parameters; results are stored as float32.

Run: ATTEND_ORACLE_VENV=/work/venv-oracle bash scripts/gen_fixtures.sh mha
"""
import math
import zlib

import torch
import torch.nn.functional as F

from attention import save  # sorted metadata: byte-for-byte reproducible files
from common import fresh_area, write_readme

AREA = "mha"
F64 = torch.float64
README = []


def seed_of(name: str) -> int:
    return zlib.crc32(("mha/" + name).encode())


def rnd(g, *shape, amp=1.0):
    """float32-rounded normal values held in float64 (what the Rust side reads back exactly)."""
    return (torch.randn(*shape, generator=g, dtype=F64) * amp).float().to(F64)


def max_err(a, b):
    return (a.detach() - b.detach()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------------
# Masks and RoPE, as the layer defines them
# ---------------------------------------------------------------------------------------------------------------------


def keep_mask(B, T, S, causal, key_lengths):
    """Boolean (B,1,T,S), True = may attend. Causal is end-aligned: query i sees key j iff j <= i + S - T."""
    i = torch.arange(T).view(1, 1, T, 1)
    j = torch.arange(S).view(1, 1, 1, S)
    keep = torch.ones(B, 1, T, S, dtype=torch.bool)
    if causal:
        keep = keep & (j <= i + (S - T))
    if key_lengths is not None:
        keep = keep & (j < torch.tensor(key_lengths).view(B, 1, 1, 1))
    return keep


def rope_apply(x, rope, offset=0):
    """Hugging Face Llama rotary embedding (rotate_half), full or partial: x (B,H,T,D)."""
    r, theta = rope["rotary_dim"], rope["theta"]
    T = x.shape[2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=F64) / r))  # (r/2,)
    pos = torch.arange(offset, offset + T, dtype=F64)
    freqs = pos[:, None] * inv_freq[None, :]  # (T, r/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, r)
    cos, sin = emb.cos(), emb.sin()
    xr, xp = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rotated = xr * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, xp], dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# The independent implementation
# ---------------------------------------------------------------------------------------------------------------------


def indep(P, x, key, value, H, Hkv, D, causal, key_lengths, rope):
    """Returns out (B,T,C), weights (B,H,T,S); P maps the layer's parameter names to float64 leaves."""
    B, T, _ = x.shape
    S = key.shape[1]
    q = F.linear(x, P["q_proj.weight"], P.get("q_proj.bias")).view(B, T, H, D).transpose(1, 2)  # (B,H,T,D)
    k = F.linear(key, P["k_proj.weight"], P.get("k_proj.bias")).view(B, S, Hkv, D).transpose(1, 2)  # (B,Hkv,S,D)
    v = F.linear(value, P["v_proj.weight"], P.get("v_proj.bias")).view(B, S, Hkv, D).transpose(1, 2)  # (B,Hkv,S,D)
    if rope is not None:
        q, k = rope_apply(q, rope), rope_apply(k, rope)
    keep = keep_mask(B, T, S, causal, key_lengths)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=(H != Hkv))  # (B,H,T,D)
    # Weights, explicitly: K and V repeated per group (query head h reads K/V head h // (H/Hkv)).
    kr, vr = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    s = (q @ kr.transpose(-1, -2)) / math.sqrt(D)
    w = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)  # (B,H,T,S)
    assert max_err(w @ vr, o) < 1e-12, "SDPA vs explicit weights @ V"
    out = F.linear(o.transpose(1, 2).reshape(B, T, H * D), P["out_proj.weight"], P.get("out_proj.bias"))
    return out, w


PARAM_NAMES = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight",
               "q_proj.bias", "k_proj.bias", "v_proj.bias", "out_proj.bias"]


def random_params(g, C, H, Hkv, D, Ck, Cv, bias):
    shapes = {"q_proj.weight": (H * D, C), "k_proj.weight": (Hkv * D, Ck), "v_proj.weight": (Hkv * D, Cv),
              "out_proj.weight": (C, H * D)}
    if bias:
        shapes |= {"q_proj.bias": (H * D,), "k_proj.bias": (Hkv * D,), "v_proj.bias": (Hkv * D,),
                   "out_proj.bias": (C,)}
    # Weights ~ N(0, 1/fan_in) keep activations O(1); biases O(0.3) so their gradients and effects are not tiny.
    return {n: rnd(g, *s, amp=(1 / math.sqrt(s[1]) if len(s) == 2 else 0.3)) for n, s in shapes.items()}


# ---------------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------------


def case(name, desc, *, B, T, C, H, Hkv=None, D=None, S=None, memory=None, Ck=None, Cv=None, bias=True,
         causal=False, key_lengths=None, rope=None):
    """memory: None (self-attention), "kv" (one tensor for keys and values) or "key_value" (separate tensors)."""
    Hkv = Hkv or H
    D = D or C // H
    S = T if memory is None else S
    Ck = C if memory is None else Ck
    Cv = Ck if memory in (None, "kv") else Cv
    g = torch.Generator().manual_seed(seed_of(name))
    torch_ok = Hkv == H and D * H == C and rope is None
    oracle = "torch" if torch_ok else "indep"

    x32 = rnd(g, B, T, C).float()
    mem32 = {}
    if memory == "kv":
        mem32["kv"] = rnd(g, B, S, Ck).float()
    elif memory == "key_value":
        mem32["key"] = rnd(g, B, S, Ck).float()
        mem32["value"] = rnd(g, B, S, Cv).float()
    P32 = {n: t.float() for n, t in random_params(g, C, H, Hkv, D, Ck, Cv, bias).items()}
    dout32 = rnd(g, B, T, C).float()

    def leaves():
        x = x32.to(F64).requires_grad_(True)
        mem = {n: t.to(F64).requires_grad_(True) for n, t in mem32.items()}
        P = {n: t.to(F64).requires_grad_(True) for n, t in P32.items()}
        if memory is None:
            key = value = x
        elif memory == "kv":
            key = value = mem["kv"]
        else:
            key, value = mem["key"], mem["value"]
        return x, mem, P, key, value

    def grads_of(x, mem, P):
        gr = {"dx": x.grad} | {"d" + n: t.grad for n, t in mem.items()} | {"d" + n: t.grad for n, t in P.items()}
        for n, t in gr.items():
            assert t is not None, f"{name}: no gradient for {n}"
            assert torch.isfinite(t).all() and t.abs().max() > 0, f"{name}: gradient {n} not finite / all zero"
        return gr

    # The independent implementation (every case).
    x, mem, P, key, value = leaves()
    out_i, w_i = indep(P, x, key, value, H, Hkv, D, causal, key_lengths, rope)
    (out_i * dout32.to(F64)).sum().backward()
    g_i = grads_of(x, mem, P)
    out, w, gr = out_i, w_i, g_i
    torch_state = {}

    if torch_ok:
        x, mem, P, key, value = leaves()
        mha = torch.nn.MultiheadAttention(C, H, bias=bias, batch_first=True, kdim=Ck, vdim=Cv, dtype=F64)
        # Load the split parameters into torch's own layout (packed when kdim == vdim == C).
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([P32["q_proj.weight"], P32["k_proj.weight"],
                                                    P32["v_proj.weight"]]).to(F64))
            else:
                for n in "qkv":
                    getattr(mha, f"{n}_proj_weight").copy_(P32[f"{n}_proj.weight"].to(F64))
            mha.out_proj.weight.copy_(P32["out_proj.weight"].to(F64))
            if bias:
                mha.in_proj_bias.copy_(torch.cat([P32["q_proj.bias"], P32["k_proj.bias"], P32["v_proj.bias"]]).to(F64))
                mha.out_proj.bias.copy_(P32["out_proj.bias"].to(F64))
        torch_state = {"torch." + n: t.detach().float() for n, t in mha.state_dict().items()}
        kw = {}
        if causal:
            kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=F64) == float("-inf")
            kw["is_causal"] = True
        if key_lengths is not None:
            kw["key_padding_mask"] = torch.arange(S).view(1, S) >= torch.tensor(key_lengths).view(B, 1)  # True = pad
        out_t, w_t = mha(x, key, value, need_weights=True, average_attn_weights=False, **kw)
        (out_t * dout32.to(F64)).sum().backward()
        # Gradients of torch's packed parameters, split into the layer's names.
        g_t = {"dx": x.grad} | {"d" + n: t.grad for n, t in mem.items()}
        if mha._qkv_same_embed_dim:
            for n, gw in zip("qkv", mha.in_proj_weight.grad.chunk(3)):
                g_t[f"d{n}_proj.weight"] = gw
        else:
            for n in "qkv":
                g_t[f"d{n}_proj.weight"] = getattr(mha, f"{n}_proj_weight").grad
        g_t["dout_proj.weight"] = mha.out_proj.weight.grad
        if bias:
            for n, gb in zip("qkv", mha.in_proj_bias.grad.chunk(3)):
                g_t[f"d{n}_proj.bias"] = gb
            g_t["dout_proj.bias"] = mha.out_proj.bias.grad
        assert set(g_t) == set(g_i), f"{name}: gradient names {sorted(g_t)} vs {sorted(g_i)}"
        errs = {"out": max_err(out_t, out_i), "weights": max_err(w_t, w_i)} | {n: max_err(g_t[n], g_i[n]) for n in g_t}
        assert max(errs.values()) < 1e-10, f"{name}: nn.MultiheadAttention vs independent: {errs}"
        out, w, gr = out_t, w_t, g_t

    assert w.shape == (B, H, T, S), f"{name}: weights {tuple(w.shape)}"
    keep = keep_mask(B, T, S, causal, key_lengths).expand(B, H, T, S)
    assert (w.detach()[~keep] == 0).all(), f"{name}: weight on a masked key"
    assert torch.allclose(w.detach().sum(-1), torch.ones(B, H, T, dtype=F64), atol=1e-12), name

    tensors = {"x": x32, **mem32, **P32, **torch_state, "dout": dout32, "out": out.detach().float(),
               "weights": w.detach().float()}
    tensors |= {n: t.detach().float() for n, t in gr.items()}
    meta = {"d_model": C, "n_heads": H, "n_kv_heads": Hkv, "head_dim": D, "kv_dim": Ck, "value_dim": Cv,
            "bias": bias, "causal": causal, "key_lengths": key_lengths, "rope": rope, "oracle": oracle,
            "memory": memory}
    save(AREA, name, tensors, meta)
    README.append((name, f"{desc} [B={B} T={T} S={S} C={C} H={H} Hkv={Hkv} D={D} Ckv={Ck} Cv={Cv} bias={bias}; "
                         f"oracle {oracle}]"))


def cases():
    # nn.MultiheadAttention (checked against the independent implementation too)
    case("mha_self", "self-attention", B=2, T=5, C=12, H=3)
    case("mha_cross", "cross-attention, one memory for keys and values, kdim = vdim = 8 != C", B=2, T=4, S=7, C=12,
         H=2, memory="kv", Ck=8)
    case("mha_cross_kv", "cross-attention, separate key (kdim 6) and value (vdim 10) inputs", B=2, T=3, S=6, C=8, H=2,
         memory="key_value", Ck=6, Cv=10)
    case("mha_causal", "causal self-attention (attn_mask + is_causal)", B=2, T=6, C=16, H=4, causal=True)
    case("mha_key_padding", "key_padding_mask, key lengths [6, 3]", B=2, T=6, C=12, H=3, key_lengths=[6, 3])
    case("mha_causal_padding", "causal + key_padding_mask, key lengths [7, 5]", B=2, T=7, C=8, H=2, causal=True,
         key_lengths=[7, 5])
    case("mha_no_bias", "no biases on any projection", B=2, T=5, C=12, H=4, bias=False)
    # independent implementation only
    case("mha_gqa", "grouped-query attention H=4 Hkv=2", B=2, T=5, C=16, H=4, Hkv=2)
    case("mha_gqa_causal", "GQA H=4 Hkv=2, causal, key lengths [6, 4]", B=2, T=6, C=16, H=4, Hkv=2, causal=True,
         key_lengths=[6, 4])
    case("mha_mqa", "multi-query attention H=4 Hkv=1, causal", B=2, T=5, C=16, H=4, Hkv=1, causal=True)
    case("mha_head_dim", "head_dim 8 != C/H = 6, no bias", B=2, T=4, C=12, H=2, D=8, bias=False)
    case("mha_cross_gqa", "cross-attention, GQA H=4 Hkv=2, kdim 10", B=2, T=3, S=5, C=16, H=4, Hkv=2, memory="kv",
         Ck=10)
    case("mha_rope_gqa", "RoPE (halves, rotary_dim = D = 8) + GQA H=4 Hkv=2 + causal", B=2, T=7, C=16, H=4, Hkv=2,
         D=8, causal=True, rope={"rotary_dim": 8, "max_positions": 32, "theta": 10000.0})
    case("mha_rope_partial", "partial RoPE (rotary_dim 4 of D = 8), H=2, causal", B=1, T=6, C=16, H=2, D=8,
         causal=True, rope={"rotary_dim": 4, "max_positions": 16, "theta": 500.0})


def main():
    torch.manual_seed(0)
    fresh_area(AREA)
    cases()
    write_readme(
        AREA,
        "Multi-head attention fixtures (generated by scripts/oracle/mha.py)",
        "Regenerate: `bash scripts/gen_fixtures.sh mha`. Tensors x [kv | key value] <params> [torch.<name>] "
                 "dout -> out weights dx [dkv | dkey dvalue] d<param>; metadata describes the layer config (see the "
                 "script's docstring).",
        README,
    )


if __name__ == "__main__":
    main()
