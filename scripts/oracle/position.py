"""Oracle for crates/attend/src/position: sinusoidal, learned, RoPE (halves / interleaved / partial), T5 relative
buckets and bias, ALiBi slopes. Writes fixtures/position/<case>.safetensors.

References: The Annotated Transformer (sinusoidal), transformers' Llama `apply_rotary_pos_emb` + `LlamaRotaryEmbedding`,
GPT-NeoX's partial `apply_rotary_pos_emb`, GPT-J's `apply_rotary_pos_emb` / `rotate_every_two`, T5Attention
`_relative_position_bucket` / `compute_bias`, the ALiBi repo's `get_slopes` (cross-checked against bloom's).

Numbers are computed in float64 and stored as float32 (angles grow with the position; an f32 reference would be the
least accurate party in the comparison). Run: ATTEND_ORACLE_VENV=... bash scripts/gen_fixtures.sh position
"""
import math

import torch
from transformers import LlamaConfig, T5Config
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply_rotary_pos_emb
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb
from transformers.models.t5.modeling_t5 import T5Attention

from common import gen, grads, randn, save

AREA = "position"
F64 = torch.float64


def f32(d: dict) -> dict:
    return {k: (v.detach().to(torch.float32) if v.is_floating_point() else v) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------------------- #
# Sinusoidal (The Annotated Transformer's PositionalEncoding, in f64; odd d_model drops the last cos column)
# ---------------------------------------------------------------------------------------------------------------- #
def annotated_pe(max_len: int, d_model: int) -> torch.Tensor:
    pe = torch.zeros(max_len, d_model, dtype=F64)
    position = torch.arange(0, max_len, dtype=F64).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=F64) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
    return pe


def sinusoidal(case: str, seed: int, b: int, t: int, c: int, offset: int):
    g = gen(seed)
    table = annotated_pe(offset + t, c)[offset:]  # (T, C)
    x = randn(g, b, t, c, dtype=F64)
    out = x + table
    save(AREA, case, f32({"table": table, "x": x, "out": out}), {"offset": str(offset), "d_model": str(c)})


# ---------------------------------------------------------------------------------------------------------------- #
# Learned positions (GPT-2's wpe: x + wpe(position_ids))
# ---------------------------------------------------------------------------------------------------------------- #
def learned(case: str, seed: int, b: int, t: int, c: int, max_len: int, offset: int):
    g = gen(seed)
    weight = randn(g, max_len, c, dtype=F64, requires_grad=True)
    x = randn(g, b, t, c, dtype=F64, requires_grad=True)
    dout = randn(g, b, t, c, dtype=F64)
    pos = torch.arange(offset, offset + t)[None, :]  # (1, T)
    out = x + torch.nn.functional.embedding(pos, weight)  # (B, T, C)
    (out * dout).sum().backward()
    save(
        AREA,
        case,
        f32({"weight": weight, "x": x, "dout": dout, "out": out, **grads({"weight": weight, "x": x})}),
        {"offset": str(offset), "max_len": str(max_len)},
    )


# ---------------------------------------------------------------------------------------------------------------- #
# RoPE
# ---------------------------------------------------------------------------------------------------------------- #
def cos_sin_halves(positions: torch.Tensor, rotary_dim: int, theta: float):
    """Llama's cos/sin ((T, r), duplicated halves) in f64, cross-checked against LlamaRotaryEmbedding's f32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=F64) / rotary_dim))
    freqs = positions.to(F64)[:, None] * inv_freq[None, :]  # (T, r/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, r)
    cos, sin = emb.cos(), emb.sin()
    cfg = LlamaConfig(
        hidden_size=rotary_dim, num_attention_heads=1, head_dim=rotary_dim,
        max_position_embeddings=int(positions.max()) + 1, rope_theta=theta,
    )
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), positions[None, :])
    assert torch.allclose(hf_cos[0].to(F64), cos, atol=2e-5), "Llama rotary cos disagrees with the f64 reference"
    assert torch.allclose(hf_sin[0].to(F64), sin, atol=2e-5), "Llama rotary sin disagrees with the f64 reference"
    return cos, sin


def rope(case: str, seed: int, layout: str, b: int, h: int, t: int, d: int, rotary_dim: int, offset: int,
         theta: float = 10000.0, max_positions: int = 64):
    g = gen(seed)
    x = randn(g, b, h, t, d, dtype=F64, requires_grad=True)
    dout = randn(g, b, h, t, d, dtype=F64)
    positions = torch.arange(offset, offset + t)
    if layout == "halves":
        cos, sin = cos_sin_halves(positions, rotary_dim, theta)  # (T, r)
        cos, sin = cos[None], sin[None]  # (1, T, r): HF passes (batch, seq, dim) and unsqueezes the head axis
        if rotary_dim == d:
            out, _ = llama_apply_rotary_pos_emb(x, x, cos, sin)
        else:
            out, _ = neox_apply_rotary_pos_emb(x, x, cos, sin)  # rotates the first r features, passes the rest
    elif layout == "interleaved":
        # GPT-J: sincos table (pos, r) = [sin | cos] from create_sinusoidal_positions, in f64 here; the rotated part
        # is x[..., :r] in (B, T, H, D) layout; the rest passes.
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=F64) / rotary_dim))
        sinusoid = positions.to(F64)[:, None] * inv_freq[None, :]  # (T, r/2)
        sin, cos = torch.sin(sinusoid)[None], torch.cos(sinusoid)[None]  # (1, T, r/2)
        xt = x.transpose(1, 2)  # (B, T, H, D)
        rot = gptj_apply_rotary_pos_emb(xt[..., :rotary_dim], sin, cos)
        out = torch.cat([rot, xt[..., rotary_dim:]], dim=-1).transpose(1, 2)  # (B, H, T, D)
    else:
        raise ValueError(layout)
    (out * dout).sum().backward()
    save(
        AREA,
        case,
        f32({"x": x, "dout": dout, "out": out, **grads({"x": x})}),
        {"layout": layout, "rotary_dim": str(rotary_dim), "offset": str(offset), "theta": repr(theta),
         "max_positions": str(max_positions)},
    )


# ---------------------------------------------------------------------------------------------------------------- #
# T5 relative position buckets and bias
# ---------------------------------------------------------------------------------------------------------------- #
BUCKET_SETTINGS = [  # (bidirectional, num_buckets, max_distance)
    (True, 32, 128),
    (False, 32, 128),
    (True, 16, 64),
    (False, 8, 20),
    (True, 64, 256),
]


def t5_buckets():
    rel = torch.arange(-300, 301, dtype=torch.long)
    tensors = {"relative_position": rel}
    settings = []
    for bidir, nb, md in BUCKET_SETTINGS:
        name = f"bucket_{'bidir' if bidir else 'causal'}_{nb}_{md}"
        tensors[name] = T5Attention._relative_position_bucket(rel, bidirectional=bidir, num_buckets=nb, max_distance=md)
        settings.append({"name": name, "bidirectional": bidir, "num_buckets": nb, "max_distance": md})
    save(AREA, "t5_buckets", tensors, {"settings": settings})


def t5_bias(case: str, seed: int, bidirectional: bool, n_heads: int, num_buckets: int, max_distance: int,
            t: int, s: int, offset: int):
    g = gen(seed)
    cfg = T5Config(
        d_model=8, d_kv=2, num_heads=n_heads, relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=max_distance, is_decoder=not bidirectional,
    )
    attn = T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0).to(F64)
    weight = randn(g, num_buckets, n_heads, dtype=F64)
    with torch.no_grad():
        attn.relative_attention_bias.weight.copy_(weight)
    out = attn.compute_bias(t, s, past_seen_tokens=offset)  # (1, H, T, S)
    dout = randn(g, *out.shape, dtype=F64)
    (out * dout).sum().backward()
    save(
        AREA,
        case,
        f32({"weight": weight, "dout": dout, "out": out, "dweight": attn.relative_attention_bias.weight.grad}),
        {"bidirectional": bidirectional, "n_heads": str(n_heads), "num_buckets": str(num_buckets),
         "max_distance": str(max_distance), "t": str(t), "s": str(s), "offset": str(offset)},
    )


# ---------------------------------------------------------------------------------------------------------------- #
# ALiBi slopes (the ALiBi repo's get_slopes, in Python floats; cross-checked against bloom's f32 slopes)
# ---------------------------------------------------------------------------------------------------------------- #
def get_slopes(n):
    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return get_slopes_power_of_2(closest_power_of_2) + get_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]


def alibi_slopes():
    heads = list(range(1, 17)) + [20, 24, 32, 40, 64]
    tensors = {}
    for n in heads:
        s = torch.tensor(get_slopes(n), dtype=F64)
        bloom = _get_alibi_slopes(n, torch.device("cpu")).to(F64)
        assert torch.allclose(s, bloom, rtol=1e-6, atol=0), f"ALiBi slopes for {n} heads: repo vs bloom disagree"
        tensors[f"slopes_{n}"] = s  # f64: slopes are exact powers of two's roots, compared at f64 tolerance
    save(AREA, "alibi_slopes", tensors, {"heads": heads})


def main():
    sinusoidal("sinusoidal_c16_t12", seed=1, b=2, t=12, c=16, offset=0)
    sinusoidal("sinusoidal_c32_t9_offset40", seed=2, b=1, t=9, c=32, offset=40)
    sinusoidal("sinusoidal_c7_t5_offset3_odd", seed=3, b=2, t=5, c=7, offset=3)

    learned("learned_offset0", seed=10, b=2, t=5, c=8, max_len=16, offset=0)
    learned("learned_offset9", seed=11, b=3, t=4, c=6, max_len=16, offset=9)

    rope("rope_halves", seed=20, layout="halves", b=2, h=3, t=5, d=8, rotary_dim=8, offset=0)
    rope("rope_halves_offset", seed=21, layout="halves", b=1, h=2, t=4, d=16, rotary_dim=16, offset=37)
    rope("rope_halves_partial", seed=22, layout="halves", b=2, h=2, t=6, d=12, rotary_dim=8, offset=3)
    rope("rope_halves_theta500k", seed=23, layout="halves", b=1, h=2, t=7, d=8, rotary_dim=8, offset=50,
         theta=500000.0)
    rope("rope_interleaved", seed=24, layout="interleaved", b=2, h=3, t=5, d=8, rotary_dim=8, offset=0)
    rope("rope_interleaved_partial_offset", seed=25, layout="interleaved", b=2, h=2, t=3, d=10, rotary_dim=6,
         offset=21)

    t5_buckets()
    t5_bias("t5_bias_bidir", seed=30, bidirectional=True, n_heads=3, num_buckets=8, max_distance=16, t=9, s=9,
            offset=0)
    t5_bias("t5_bias_causal", seed=31, bidirectional=False, n_heads=4, num_buckets=8, max_distance=16, t=12, s=12,
            offset=0)
    t5_bias("t5_bias_causal_decode", seed=32, bidirectional=False, n_heads=2, num_buckets=8, max_distance=16, t=2,
            s=13, offset=11)
    t5_bias("t5_bias_bidir_cross_shape", seed=33, bidirectional=True, n_heads=2, num_buckets=32, max_distance=128,
            t=5, s=40, offset=0)

    alibi_slopes()


if __name__ == "__main__":
    main()
