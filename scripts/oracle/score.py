"""Oracle for crates/attend/src/attention/score.rs: the classic attention score functions.

Independent PyTorch implementations, written the way their reference codebases write them:
  * dot, general, mlp (additive): OpenNMT-py `GlobalAttention.score` (onmt/modules/global_attention.py), generalised
    to Dq != Dk (and an attention dim A for mlp) with the same module names `linear_in`, `linear_query`,
    `linear_context`, `v`;
  * scaled dot: Vaswani et al. 2017, eq. 1 without the softmax: q k^T / sqrt(d_k) (or the `scale` in the metadata);
  * han_context: Yang et al. 2016, eq. 5-6 without the softmax: u = tanh(proj(h)), score = u . context.

Every case stores its inputs (q, k or h), its parameters under their state_dict names, `dout` (same shape as `out`),
`out`, and the gradient `d<name>` of sum(out * dout) for every input and parameter.
"""
import math

import torch
import torch.nn as nn

from common import gen, randn, save

AREA = "score"


class General(nn.Module):
    """OpenNMT-py "general": score = (linear_in q) k^T, linear_in: nn.Linear(Dq, Dk, bias=False)."""

    def __init__(self, dq, dk):
        super().__init__()
        self.linear_in = nn.Linear(dq, dk, bias=False)

    def forward(self, h_t, h_s):
        tgt_batch, tgt_len, tgt_dim = h_t.size()
        h_t_ = self.linear_in(h_t.reshape(tgt_batch * tgt_len, tgt_dim))
        h_t = h_t_.view(tgt_batch, tgt_len, -1)
        return torch.bmm(h_t, h_s.transpose(1, 2))


class Mlp(nn.Module):
    """OpenNMT-py "mlp" (Bahdanau): score = v^T tanh(linear_query q + linear_context k)."""

    def __init__(self, dq, dk, a):
        super().__init__()
        self.linear_context = nn.Linear(dk, a, bias=False)
        self.linear_query = nn.Linear(dq, a, bias=True)
        self.v = nn.Linear(a, 1, bias=False)
        self.a = a

    def forward(self, h_t, h_s):
        src_batch, src_len, src_dim = h_s.size()
        tgt_batch, tgt_len, tgt_dim = h_t.size()
        a = self.a
        wq = self.linear_query(h_t.reshape(-1, tgt_dim)).view(tgt_batch, tgt_len, 1, a)
        wq = wq.expand(tgt_batch, tgt_len, src_len, a)
        uh = self.linear_context(h_s.contiguous().view(-1, src_dim)).view(src_batch, 1, src_len, a)
        uh = uh.expand(src_batch, tgt_len, src_len, a)
        wquh = torch.tanh(wq + uh)  # (B, T, S, A)
        return self.v(wquh.reshape(-1, a)).view(tgt_batch, tgt_len, src_len)


class HanContext(nn.Module):
    """Yang et al. 2016 word/sentence attention score: u_s = tanh(W h_s + b), score_s = u_s^T u_w."""

    def __init__(self, c, a):
        super().__init__()
        self.proj = nn.Linear(c, a, bias=True)
        self.context = nn.Parameter(torch.zeros(a))

    def forward(self, h):
        u = torch.tanh(self.proj(h))  # (B, S, A)
        return torch.matmul(u, self.context)  # (B, S)


def fill_params(g, module, scale=0.5):
    """Deterministic parameters from the case's generator (not torch's global RNG)."""
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(randn(g, *p.shape) * scale)


def run_case(case, seed, inputs_shapes, fn, module=None, meta=None):
    g = gen(seed)
    inputs = {name: randn(g, *shape, requires_grad=True) for name, shape in inputs_shapes}
    if module is not None:
        fill_params(g, module)
    out = fn(*inputs.values())
    dout = randn(g, *out.shape)
    (out * dout).sum().backward()
    tensors = dict(inputs)
    tensors["dout"] = dout
    tensors["out"] = out
    for name, t in inputs.items():
        tensors["d" + name] = t.grad
    if module is not None:
        for name, p in module.named_parameters():
            tensors[name] = p
            tensors["d" + name] = p.grad
    save(AREA, case, tensors, meta)
    print(f"  {case}: out {tuple(out.shape)}, {len(tensors)} tensors")


def main():
    B, T, S = 2, 5, 7

    # Luong dot: Dq must equal Dk.
    D = 8
    run_case("dot", 1, [("q", (B, T, D)), ("k", (B, S, D))], lambda q, k: torch.bmm(q, k.transpose(1, 2)))

    # Vaswani scaled dot with the default 1/sqrt(Dk) and with an explicit scale.
    run_case(
        "scaled_dot",
        2,
        [("q", (B, T, D)), ("k", (B, S, D))],
        lambda q, k: torch.bmm(q, k.transpose(1, 2)) / math.sqrt(k.shape[-1]),
    )
    scale = 0.3
    run_case(
        "scaled_dot_scale",
        3,
        [("q", (B, T, D)), ("k", (B, S, D))],
        lambda q, k: torch.bmm(q, k.transpose(1, 2)) * scale,
        meta={"scale": repr(scale)},
    )

    # Luong general with Dq != Dk.
    Dq, Dk, A = 6, 8, 10
    m = General(Dq, Dk)
    run_case("general", 4, [("q", (B, T, Dq)), ("k", (B, S, Dk))], m, module=m,
             meta={"query_dim": str(Dq), "key_dim": str(Dk)})

    # Bahdanau / OpenNMT mlp with Dq != Dk != A.
    m = Mlp(Dq, Dk, A)
    run_case("additive", 5, [("q", (B, T, Dq)), ("k", (B, S, Dk))], m, module=m,
             meta={"query_dim": str(Dq), "key_dim": str(Dk), "attn_dim": str(A)})

    # HAN context-vector score with C != A.
    C, A = 8, 6
    m = HanContext(C, A)
    run_case("han_context", 6, [("h", (B, S, C))], m, module=m, meta={"input_dim": str(C), "attn_dim": str(A)})


if __name__ == "__main__":
    main()
