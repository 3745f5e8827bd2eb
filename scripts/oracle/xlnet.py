"""Oracle for attend's permutation language model (models/xlnet.rs): two-stream self-attention (Yang et al. 2019
§2.3) written here with plain PyTorch ops, independently of attend — post-norm layers, learned absolute positions,
content stream h⁰ = E[x] + P, query stream g⁰ = w + P, keys and values from the content stream, partial prediction
of the last ⌈n/K⌉ ranks.

fixtures/xlnet/two_stream.safetensors: every parameter under attend's names, `input_ids`, `attention_mask`, `ranks`
(int64, -1 on padding), outputs `content` and `query` (B, T, C), `loss`, and `grad.<name>` for every parameter;
metadata `config` (JSON). Run: bash scripts/gen_fixtures.sh xlnet
"""
import json
import math

import torch
import torch.nn.functional as F

from common import fresh_area, gen, randn, save

V, P, C, H, FF, L, K, EPS = 23, 12, 16, 4, 24, 2, 3, 1e-12
B, T = 2, 7

g = gen(7)
params = {
    "word_embeddings.weight": randn(g, V, C) * 0.5,
    "position_embeddings.weight": randn(g, P, C) * 0.5,
    "query_embedding": randn(g, 1, 1, C) * 0.5,
    "lm_bias": randn(g, V) * 0.1,
}
for i in range(L):
    for p in ["q_proj", "k_proj", "v_proj", "out_proj"]:
        params[f"layers.{i}.self_attn.{p}.weight"] = randn(g, C, C) * 0.4
        params[f"layers.{i}.self_attn.{p}.bias"] = randn(g, C) * 0.1
    for n in ["self_attn_norm", "ffn_norm"]:
        params[f"layers.{i}.{n}.weight"] = 1 + randn(g, C) * 0.1
        params[f"layers.{i}.{n}.bias"] = randn(g, C) * 0.1
    params[f"layers.{i}.ffn.fc_in.weight"] = randn(g, FF, C) * 0.4
    params[f"layers.{i}.ffn.fc_in.bias"] = randn(g, FF) * 0.1
    params[f"layers.{i}.ffn.fc_out.weight"] = randn(g, C, FF) * 0.4
    params[f"layers.{i}.ffn.fc_out.bias"] = randn(g, C) * 0.1
for t in params.values():
    t.requires_grad_(True)

ids = torch.randint(0, V, (B, T), generator=g)
mask = torch.tensor([[1] * T, [1] * 5 + [0] * (T - 5)])
ranks = torch.full((B, T), -1, dtype=torch.int64)
for b in range(B):
    n = int(mask[b].sum())
    ranks[b, :n] = torch.randperm(n, generator=g)
real = mask.bool()
r_i, r_j = ranks.unsqueeze(2), ranks.unsqueeze(1)
content_keep = (r_j <= r_i) & real.unsqueeze(1) & real.unsqueeze(2)  # (B, T, T)
query_keep = (r_j < r_i) & real.unsqueeze(1) & real.unsqueeze(2)


def attention(i, x, kv, keep):
    p = lambda n: (params[f"layers.{i}.self_attn.{n}.weight"], params[f"layers.{i}.self_attn.{n}.bias"])
    heads = lambda t: t.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)
    q, k, v = heads(F.linear(x, *p("q_proj"))), heads(F.linear(kv, *p("k_proj"))), heads(F.linear(kv, *p("v_proj")))
    s = q @ k.transpose(-1, -2) / math.sqrt(C // H)
    keep4 = keep.unsqueeze(1)
    s = s.masked_fill(~keep4, float("-inf"))
    w = torch.softmax(s, -1)
    w = torch.where(keep4.any(-1, keepdim=True), w, torch.zeros_like(w))  # a row that sees nothing gives zeros
    o = (w @ v).transpose(1, 2).reshape(B, T, C)
    return F.linear(o, *p("out_proj"))


def norm(i, name, x):
    return F.layer_norm(x, (C,), params[f"layers.{i}.{name}.weight"], params[f"layers.{i}.{name}.bias"], EPS)


def ffn(i, x):
    h = F.gelu(F.linear(x, params[f"layers.{i}.ffn.fc_in.weight"], params[f"layers.{i}.ffn.fc_in.bias"]))
    return F.linear(h, params[f"layers.{i}.ffn.fc_out.weight"], params[f"layers.{i}.ffn.fc_out.bias"])


pos = params["position_embeddings.weight"][:T]
h = params["word_embeddings.weight"][ids] + pos
q = params["query_embedding"].expand(B, T, C) + pos
for i in range(L):
    h_in = h
    h = norm(i, "self_attn_norm", h_in + attention(i, h_in, h_in, content_keep))
    q = norm(i, "self_attn_norm", q + attention(i, q, h_in, query_keep))
    h = norm(i, "ffn_norm", h + ffn(i, h))
    q = norm(i, "ffn_norm", q + ffn(i, q))

targets = torch.full((B, T), -100, dtype=torch.int64)
for b in range(B):
    n = int(mask[b].sum())
    n_pred = min(math.ceil(n / K), n - 1)
    sel = (ranks[b] >= n - n_pred) & real[b]
    targets[b][sel] = ids[b][sel]
logits = F.linear(q, params["word_embeddings.weight"], params["lm_bias"])
loss = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(-1), ignore_index=-100)
loss.backward()

fresh_area("xlnet")
out = {k: v.detach() for k, v in params.items()}
out.update({"input_ids": ids, "attention_mask": mask, "ranks": ranks, "targets": targets, "content": h, "query": q,
            "loss": loss})
out.update({f"grad.{k}": v.grad for k, v in params.items()})
config = {"vocab_size": V, "max_len": P, "d_model": C, "n_layers": L, "n_heads": H, "d_ff": FF, "activation": "gelu",
          "layer_norm_eps": EPS, "norm_position": "post", "predict_one_in": K}
save("xlnet", "two_stream", out, {"config": json.dumps(config)})
print(f"xlnet: loss {loss.item():.6f}, targets {(targets >= 0).sum().item()}")
