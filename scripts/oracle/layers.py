"""PyTorch oracle for `attend op layer` (docs/layers.md): fixtures/layers/<case>/{params,input,expected}.safetensors.

One directory per case:
  params.safetensors    the layer's parameters under the reference's state_dict names (no tensors: no parameters)
  input.safetensors     the inputs (float32; `lengths`, `memory_lengths`, `lengths1`, `lengths2`, `edge_index` int64)
                        and, for every output `o`, the upstream gradient `d<o>` (same shape);
                        metadata `layer` = NAME, `options` = the options as a JSON string, `torch` = version
  expected.safetensors  every output, and `d<name>` for every float input and every parameter: the gradient of
                        L = sum_o sum(o * d<o>)

References
  sparsemax, entmax15                 the `entmax` package (entmax.sparsemax, entmax.entmax15) over the last axis
  lstm, gru, elman                    nn.LSTM / nn.GRU / nn.RNN(batch_first=True) and their own state_dict; with
                                      `lengths`: pack_padded_sequence(enforce_sorted=False) -> module ->
                                      pad_packed_sequence(total_length=T) (padded outputs 0, h_n/c_n last valid states)
  jordan                              hand-written (docs/layers.md): h_t = tanh(W_ih x_t + b_ih + W_hh y_{t-1} + b_hh),
                                      y_t = tanh(W_ho h_t + b_ho)
  luong-dot, luong-general,           OpenNMT-py onmt/modules/global_attention.py `GlobalAttention` (score(), forward():
  luong-concat, bahdanau              sequence_mask -> masked_fill -inf -> softmax | sparsemax, c = bmm(align, memory),
                                      linear_out([c, source]), tanh for dot/general), re-implemented batch-first;
                                      bahdanau = its "mlp" type, luong-concat = the mlp score with the tanh output and
                                      no linear_out bias; `entmax15` and `sigmoid` normalizers as the spec extends it
  luong-local-p                       Luong et al. 2015 sec. 3.2 predictive alignment, as docs/layers.md writes it
  coattention, han-pool, spatial, din hand-written from docs/layers.md
  gat, gatv2                          torch_geometric GATConv / GATv2Conv(return_attention_weights=True), state_dict
                                      names as the installed PyG writes them; alpha in the order PyG returns its edges

Everything is computed in float64 from float32-rounded inputs and parameters (modules are cast with .double());
results are stored as float32. Masked positions use -inf before the normaliser (as OpenNMT-py does); no row is ever
fully masked (1 <= lengths <= T), and rows of padded queries (co-attention) are multiplied by the row mask, so
padded outputs and their gradients are exact zeros, never NaN.

Run: PYTHONPATH=scripts/oracle scripts/.venv/bin/python scripts/oracle/layers.py
"""
import json
import math
import os
import shutil

import entmax
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_geometric
from safetensors import safe_open
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch_geometric.nn import GATConv, GATv2Conv

from common import FIXTURES, gen, write_readme
from common import save_sorted as save, seed_of

AREA = "layers"
F64 = torch.float64
NEG_INF = float("-inf")
README = []  # (case, description)
WRITTEN = {}  # case -> {"layer", "options", "params", "inputs", "outputs", "checks"}
MARGIN = 1e-4  # distance from a kink (sparsemax threshold, relu, window edge) that f32 rounding must not cross


def rnd(g, *shape, amp=1.0):
    """float32-rounded normal values held in float64 (what the Rust side reads back exactly)."""
    return (torch.randn(*shape, generator=g, dtype=F64) * amp).float().to(F64)


def as_f64(t):
    """An f32-exact float64 copy (for hand-picked values)."""
    return torch.as_tensor(t, dtype=F64).float().to(F64)


def fill_module(g, module, amp=0.5):
    """Deterministic parameters from the case's generator (sorted names, so the order is fixed), f32-rounded."""
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(rnd(g, *p.shape, amp=amp))
    module.double()
    module.eval()
    names = set(module.state_dict().keys())
    assert names == {n for n, _ in module.named_parameters()}, f"state_dict has buffers: {names}"
    return dict(module.named_parameters())


def seq_mask(lengths, T):
    """(B, T) bool, True at valid steps."""
    return torch.arange(T)[None, :] < lengths[:, None]


def emit(case, desc, layer, options, params, inputs, outputs, g, checks=None):
    """Write the three files of a case. params: {name: f64 leaf}; inputs: {name: f64 leaf | int64};
    outputs: {name: f64 tensor} computed from them. Upstream gradients are drawn from g after the forward."""
    assert case not in WRITTEN, case
    ups = {"d" + o: rnd(g, *v.shape) for o, v in outputs.items()}
    loss = sum((v * ups["d" + o]).sum() for o, v in outputs.items())
    leaves = dict(params)
    leaves.update({k: v for k, v in inputs.items() if v.is_floating_point()})
    for k, v in leaves.items():
        assert v.requires_grad and v.is_leaf and v.dtype == F64, k
    gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {"d" + k: (torch.zeros_like(v) if gr is None else gr) for (k, v), gr in zip(leaves.items(), gs)}

    def f32(t):
        return t.detach().float() if t.is_floating_point() else t.detach()

    area = f"{AREA}/{case}"
    save(area, "params", {k: f32(v) for k, v in params.items()})
    inp = {k: f32(v) for k, v in inputs.items()}
    inp.update({k: v.float() for k, v in ups.items()})
    save(area, "input", inp, {"layer": layer, "options": json.dumps(options)})
    exp = {k: f32(v) for k, v in outputs.items()}
    exp.update({k: f32(v) for k, v in grads.items()})
    assert not set(exp) & set(inp), f"{case}: name clash {set(exp) & set(inp)}"
    save(area, "expected", exp)
    WRITTEN[case] = {"layer": layer, "options": options, "params": list(params), "inputs": list(inputs),
                     "outputs": list(outputs), "checks": checks or {}}
    README.append((case, f"`{layer}` {json.dumps(options)}: {desc}"))
    shapes = " ".join(f"{k}{tuple(v.shape)}" for k, v in outputs.items())
    print(f"  {case}: {layer} {json.dumps(options)} -> {shapes}")


def leafs(d):
    return {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in d.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Normalisers (entmax package)
# ---------------------------------------------------------------------------------------------------------------------


def threshold_margin(name, z, p):
    """Smallest distance of a score from the threshold tau, over all entries (f32 must not flip the support)."""
    if name == "sparsemax":
        supp = p > 0
        tau = ((z * supp).sum(-1, keepdim=True) - 1) / supp.sum(-1, keepdim=True)
        return (z - tau).abs().min().item()
    x = z / 2  # entmax15: p = relu(z/2 - tau)^2
    supp = p > 0
    tau = ((x - p.sqrt()) * supp).sum(-1, keepdim=True) / supp.sum(-1, keepdim=True)
    return (x - tau).abs().min().item()


def normaliser_cases():
    ties = [
        [1.0, 1.0, 1.0, 0.0, 0.0, 0.0],  # three-way tie on top
        [5.0, 0.1, -0.3, 0.2, 0.0, -1.0],  # one dominant score: one-hot
        None,  # random
        [0.5, 0.5, -0.2, 0.5, -0.2, 0.1],  # ties on top and below the threshold
        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # all equal: uniform
        None,
    ]
    for fn_name, fn in (("sparsemax", entmax.sparsemax), ("entmax15", entmax.entmax15)):
        case = f"{fn_name}_ties"
        g = gen(seed_of(f"layers/{case}"))
        rows = [as_f64(r) if r is not None else rnd(g, 6, amp=1.5) for r in ties]
        scores = torch.stack(rows).view(2, 3, 6)
        inputs = leafs({"scores": scores})
        w = fn(inputs["scores"], dim=-1)
        emit(case, "(2,3,6): ties, a dominant score (one-hot), an all-equal row, random rows", fn_name, {}, {},
             inputs, {"weights": w}, g, {"rows_sum_to_one": "weights", "margin": threshold_margin(fn_name, scores, w)})

        case = f"{fn_name}_rand"
        g = gen(seed_of(f"layers/{case}"))
        scores = rnd(g, 3, 7, amp=2.0)
        inputs = leafs({"scores": scores})
        w = fn(inputs["scores"], dim=-1)
        emit(case, "(3,7) random scores", fn_name, {}, {}, inputs, {"weights": w}, g,
             {"rows_sum_to_one": "weights", "margin": threshold_margin(fn_name, scores, w)})


# ---------------------------------------------------------------------------------------------------------------------
# Recurrent networks
# ---------------------------------------------------------------------------------------------------------------------


def run_rnn(module, x, lengths, hx):
    T = x.shape[1]
    if lengths is None:
        return module(x, hx)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, state = module(packed, hx)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    return out, state


def manual_elman(p, x, lengths, h0, L, relu):
    """Unidirectional multi-layer Elman RNN by hand: cross-check of nn.RNN and the relu kink margin."""
    B, T, _ = x.shape
    act = torch.relu if relu else torch.tanh
    inp, hn, pre_all = x, [], []
    for k in range(L):
        h = h0[k] if h0 is not None else torch.zeros(B, p[f"weight_hh_l{k}"].shape[0], dtype=F64)
        outs = []
        for t in range(T):
            pre = (inp[:, t] @ p[f"weight_ih_l{k}"].T + p[f"bias_ih_l{k}"]
                   + h @ p[f"weight_hh_l{k}"].T + p[f"bias_hh_l{k}"])
            hn_t = act(pre)
            m = torch.ones(B, 1, dtype=torch.bool) if lengths is None else (t < lengths)[:, None]
            pre_all.append(pre[m.expand_as(pre)])
            h = torch.where(m, hn_t, h)
            outs.append(torch.where(m, hn_t, torch.zeros_like(hn_t)))
        inp = torch.stack(outs, 1)
        hn.append(h)
    return inp, torch.stack(hn), torch.cat(pre_all).abs().min().item()


def rnn_case(case, desc, kind, B, T, C, H, L=1, bidir=False, lengths=None, h0=False, nonlinearity=None):
    g = gen(seed_of(f"layers/{case}"))
    dirs = 2 if bidir else 1
    x = rnd(g, B, T, C)
    inputs = {"x": x}
    if lengths is not None:
        inputs["lengths"] = torch.tensor(lengths, dtype=torch.int64)
    if h0:
        inputs["h0"] = rnd(g, L * dirs, B, H, amp=0.5)
        if kind == "lstm":
            inputs["c0"] = rnd(g, L * dirs, B, H, amp=0.5)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "elman": nn.RNN}[kind]
    kw = {"nonlinearity": nonlinearity} if nonlinearity else {}
    module = cls(C, H, num_layers=L, bidirectional=bidir, batch_first=True, **kw)
    params = fill_module(g, module)
    inputs = leafs(inputs)
    hx = None
    if h0:
        hx = (inputs["h0"], inputs["c0"]) if kind == "lstm" else inputs["h0"]
    out, state = run_rnn(module, inputs["x"], inputs.get("lengths"), hx)
    outputs = {"output": out}
    if kind == "lstm":
        outputs["h_n"], outputs["c_n"] = state
    else:
        outputs["h_n"] = state
    options = {"hidden_size": H}
    if L != 1:
        options["num_layers"] = L
    if bidir:
        options["bidirectional"] = True
    if nonlinearity:
        options["nonlinearity"] = nonlinearity
    checks = {"padded_zero": ("output", "lengths", 1)} if lengths is not None else {}
    if kind == "elman" and not bidir:
        with torch.no_grad():
            mo, mh, margin = manual_elman(params, inputs["x"], inputs.get("lengths"), inputs.get("h0"), L,
                                          nonlinearity == "relu")
        err = max((mo - out).abs().max().item(), (mh - state).abs().max().item())
        assert err < 1e-12, f"{case}: manual Elman differs from nn.RNN by {err}"
        if nonlinearity == "relu":
            checks["margin"] = margin
    emit(case, desc, kind, options, params, inputs, outputs, g, checks)


def jordan_forward(p, x, lengths, h0):
    B, T, _ = x.shape
    O = p["weight_ho_l0"].shape[0]
    y = h0[0] if h0 is not None else torch.zeros(B, O, dtype=F64)
    outs = []
    for t in range(T):
        h = torch.tanh(x[:, t] @ p["weight_ih_l0"].T + p["bias_ih_l0"] + y @ p["weight_hh_l0"].T + p["bias_hh_l0"])
        yt = torch.tanh(h @ p["weight_ho_l0"].T + p["bias_ho_l0"])
        if lengths is None:
            y = yt
            outs.append(yt)
        else:
            m = (t < lengths)[:, None]
            y = torch.where(m, yt, y)
            outs.append(torch.where(m, yt, torch.zeros_like(yt)))
    return torch.stack(outs, 1), y.unsqueeze(0)


def jordan_case(case, desc, B, T, C, H, O, lengths=None, h0=False):
    g = gen(seed_of(f"layers/{case}"))
    inputs = {"x": rnd(g, B, T, C)}
    if lengths is not None:
        inputs["lengths"] = torch.tensor(lengths, dtype=torch.int64)
    if h0:
        inputs["h0"] = rnd(g, 1, B, O, amp=0.5)
    shapes = {"weight_ih_l0": (H, C), "weight_hh_l0": (H, O), "bias_ih_l0": (H,), "bias_hh_l0": (H,),
              "weight_ho_l0": (O, H), "bias_ho_l0": (O,)}
    params = leafs({k: rnd(g, *s, amp=0.5) for k, s in shapes.items()})
    inputs = leafs(inputs)
    out, hn = jordan_forward(params, inputs["x"], inputs.get("lengths"), inputs.get("h0"))
    checks = {"padded_zero": ("output", "lengths", 1)} if lengths is not None else {}
    emit(case, desc, "jordan", {"hidden_size": H, "output_size": O}, params, inputs, {"output": out, "h_n": hn}, g,
         checks)


def rnn_cases():
    for kind in ("lstm", "gru", "elman"):
        rnn_case(f"{kind}_1layer", "1 layer, unidirectional, no lengths, zero initial state", kind,
                 B=2, T=5, C=3, H=5)
        rnn_case(f"{kind}_2layer_bidir_lengths",
                 "2 layers, bidirectional, lengths [4,1,5] (unsorted), h0" + (" and c0" if kind == "lstm" else ""),
                 kind, B=3, T=5, C=4, H=4, L=2, bidir=True, lengths=[4, 1, 5], h0=True)
    rnn_case("elman_relu_2layer_lengths", "nonlinearity relu, 2 layers, unidirectional, lengths [3,5], h0", "elman",
             B=2, T=5, C=4, H=5, L=2, lengths=[3, 5], h0=True, nonlinearity="relu")
    jordan_case("jordan", "H=5, O=3, no lengths, zero initial output", B=2, T=5, C=4, H=5, O=3)
    jordan_case("jordan_lengths_h0", "H=4, O=3, lengths [2,5,4], h0 (1,B,O)", B=3, T=5, C=4, H=4, O=3,
                lengths=[2, 5, 4], h0=True)


# ---------------------------------------------------------------------------------------------------------------------
# Global attention (OpenNMT-py GlobalAttention, batch-first) and Luong local-p
# ---------------------------------------------------------------------------------------------------------------------


def global_score(layer, p, h_t, h_s):
    """GlobalAttention.score: (B, T, C) x (B, S, C) -> (B, T, S)."""
    if layer in ("luong-dot", "luong-general", "luong-local-p"):
        if layer != "luong-dot":
            h_t = h_t @ p["linear_in.weight"].T
        return torch.bmm(h_t, h_s.transpose(1, 2))
    wq = (h_t @ p["linear_query.weight"].T + p["linear_query.bias"]).unsqueeze(2)  # (B, T, 1, C)
    uh = (h_s @ p["linear_context.weight"].T).unsqueeze(1)  # (B, 1, S, C)
    return (torch.tanh(wq + uh) @ p["v.weight"].T).squeeze(-1)  # (B, T, S)


def normalise(name, align):
    if name == "softmax":
        return F.softmax(align, -1)
    if name == "sparsemax":
        return entmax.sparsemax(align, dim=-1)
    if name == "entmax15":
        return entmax.entmax15(align, dim=-1)
    if name == "sigmoid":
        return torch.sigmoid(align)
    raise ValueError(name)


def global_forward(layer, p, source, memory_bank, memory_lengths, normalizer):
    B, T, C = source.shape
    S = memory_bank.shape[1]
    align = global_score(layer, p, source, memory_bank)
    scores = align.detach().clone()
    if memory_lengths is not None:
        mask = seq_mask(memory_lengths, S).unsqueeze(1)  # (B, 1, S)
        align = align.masked_fill(~mask, NEG_INF)
    align_vectors = normalise(normalizer, align)
    c = torch.bmm(align_vectors, memory_bank)
    concat_c = torch.cat([c, source], 2)
    attn_h = concat_c @ p["linear_out.weight"].T
    if layer == "bahdanau":
        attn_h = attn_h + p["linear_out.bias"]
    else:
        attn_h = torch.tanh(attn_h)
    return attn_h, align_vectors, scores


def global_params(g, layer, C):
    shapes = {}
    if layer == "luong-general":
        shapes["linear_in.weight"] = (C, C)
    if layer in ("luong-concat", "bahdanau"):
        shapes.update({"linear_context.weight": (C, C), "linear_query.weight": (C, C), "linear_query.bias": (C,),
                       "v.weight": (1, C)})
    shapes["linear_out.weight"] = (C, 2 * C)
    if layer == "bahdanau":
        shapes["linear_out.bias"] = (C,)
    return leafs({k: rnd(g, *s, amp=0.5) for k, s in shapes.items()})


def global_case(case, desc, layer, B, T, S, C, lengths=None, normalizer="softmax", amp=1.0):
    g = gen(seed_of(f"layers/{case}"))
    inputs = {"source": rnd(g, B, T, C, amp=amp), "memory_bank": rnd(g, B, S, C, amp=amp)}
    if lengths is not None:
        inputs["memory_lengths"] = torch.tensor(lengths, dtype=torch.int64)
    params = global_params(g, layer, C)
    inputs = leafs(inputs)
    attn_h, align, scores = global_forward(layer, params, inputs["source"], inputs["memory_bank"],
                                           inputs.get("memory_lengths"), normalizer)
    options = {} if normalizer == "softmax" else {"normalizer": normalizer}
    checks = {}
    if lengths is not None:
        checks["padded_zero"] = ("align", "memory_lengths", 2)
    if normalizer != "sigmoid":
        checks["rows_sum_to_one"] = "align"
    if normalizer in ("sparsemax", "entmax15"):
        a = align.detach()
        z = scores
        if lengths is not None:  # hidden entries at -1e9: far below any threshold, out of the margin
            z = scores.masked_fill(~seq_mask(inputs["memory_lengths"], S).unsqueeze(1), -1e9)
        checks["margin"] = threshold_margin(normalizer, z, a)
        # the case must exercise both: a visible entry set to zero, and a row with more than one non-zero weight
        checks["sparse"] = (((a == 0) & (z > -1e8)).sum().item(), (a > 0).sum(-1).max().item())
    emit(case, desc, layer, options, params, inputs, {"attn_h": attn_h, "align": align}, g, checks)


def local_p_forward(p, source, memory_bank, memory_lengths, D):
    B, T, C = source.shape
    S = memory_bank.shape[1]
    Sb = memory_lengths.to(F64) if memory_lengths is not None else torch.full((B,), float(S), dtype=F64)
    pt = Sb[:, None] * torch.sigmoid(torch.tanh(source @ p["linear_p.weight"].T) @ p["v_p.weight"].T).squeeze(-1)
    score = global_score("luong-local-p", p, source, memory_bank)  # general score
    pos = torch.arange(S, dtype=F64)
    dist = pos[None, None, :] - pt[:, :, None]  # (B, T, S)
    valid = (dist.detach().abs() <= D)
    if memory_lengths is not None:
        valid = valid & seq_mask(memory_lengths, S).unsqueeze(1)
    a = F.softmax(score.masked_fill(~valid, NEG_INF), -1)
    sigma = D / 2.0
    align = a * torch.exp(-dist ** 2 / (2 * sigma ** 2))
    c = torch.bmm(align, memory_bank)
    attn_h = torch.tanh(torch.cat([c, source], 2) @ p["linear_out.weight"].T)
    margin = (dist.detach().abs() - D).abs().min().item()
    return attn_h, align, valid, margin


def local_p_case(case, desc, B, T, S, C, D, lengths=None):
    g = gen(seed_of(f"layers/{case}"))
    inputs = {"source": rnd(g, B, T, C), "memory_bank": rnd(g, B, S, C)}
    if lengths is not None:
        inputs["memory_lengths"] = torch.tensor(lengths, dtype=torch.int64)
    shapes = {"linear_in.weight": (C, C), "linear_out.weight": (C, 2 * C), "linear_p.weight": (C, C),
              "v_p.weight": (1, C)}
    params = leafs({k: rnd(g, *s, amp=0.7) for k, s in shapes.items()})
    inputs = leafs(inputs)
    attn_h, align, valid, margin = local_p_forward(params, inputs["source"], inputs["memory_bank"],
                                                   inputs.get("memory_lengths"), D)
    assert valid.any(-1).all(), f"{case}: an empty window"
    checks = {"margin": margin, "zero_outside": valid}
    if lengths is not None:
        checks["padded_zero"] = ("align", "memory_lengths", 2)
    emit(case, desc, "luong-local-p", {"window": D}, params, inputs, {"attn_h": attn_h, "align": align}, g, checks)


def global_cases():
    B, T, S, C = 2, 3, 5, 6
    global_case("luong_dot", "B=2 T=3 S=5 C=6, no memory_lengths", "luong-dot", B, T, S, C)
    global_case("luong_dot_lengths", "memory_lengths [5,3]", "luong-dot", B, T, S, C, lengths=[5, 3])
    global_case("luong_general", "no memory_lengths", "luong-general", B, T, S, C)
    global_case("luong_general_lengths", "memory_lengths [2,5]", "luong-general", B, T, S, C, lengths=[2, 5])
    global_case("luong_general_sparsemax", "sparsemax normaliser (supports of 1 to 4 keys), memory_lengths [4,5]",
                "luong-general", B, T, S, C, lengths=[4, 5], normalizer="sparsemax", amp=0.5)
    global_case("luong_dot_entmax15", "entmax15 normaliser, memory_lengths [5,3]", "luong-dot", B, T, S, C,
                lengths=[5, 3], normalizer="entmax15", amp=0.6)
    global_case("luong_concat_lengths", "memory_lengths [3,5]", "luong-concat", B, T, S, C, lengths=[3, 5])
    global_case("luong_concat_sigmoid", "sigmoid normaliser (not normalised), memory_lengths [5,2]", "luong-concat",
                B, T, S, C, lengths=[5, 2], normalizer="sigmoid")
    global_case("bahdanau", "OpenNMT-py mlp, no memory_lengths", "bahdanau", B, T, S, C)
    global_case("bahdanau_lengths", "OpenNMT-py mlp, memory_lengths [4,2]", "bahdanau", B, T, S, C, lengths=[4, 2])
    local_p_case("luong_local_p", "window D=1, S=7, no memory_lengths", B=2, T=3, S=7, C=5, D=1)
    local_p_case("luong_local_p_lengths", "window D=2, S=7, memory_lengths [7,4]", B=2, T=3, S=7, C=5, D=2,
                 lengths=[7, 4])


# ---------------------------------------------------------------------------------------------------------------------
# Co-attention, HAN pooling, spatial attention, DIN
# ---------------------------------------------------------------------------------------------------------------------


def masked_softmax(scores, key_mask, row_mask=None):
    """softmax over the last axis with hidden keys at -inf; rows of padded queries multiplied to zero."""
    w = F.softmax(scores.masked_fill(~key_mask, NEG_INF), -1)
    if row_mask is not None:
        w = w * row_mask.to(F64)
    return w


def coattention_case(case, desc, B, T1, T2, C, weight=False, lengths1=None, lengths2=None):
    g = gen(seed_of(f"layers/{case}"))
    inputs = {"x1": rnd(g, B, T1, C), "x2": rnd(g, B, T2, C)}
    if lengths1 is not None:
        inputs["lengths1"] = torch.tensor(lengths1, dtype=torch.int64)
    if lengths2 is not None:
        inputs["lengths2"] = torch.tensor(lengths2, dtype=torch.int64)
    params = leafs({"weight": rnd(g, C, C, amp=0.5)}) if weight else {}
    inputs = leafs(inputs)
    x1, x2 = inputs["x1"], inputs["x2"]
    E = (x1 @ params["weight"] if weight else x1) @ x2.transpose(1, 2)  # (B, T1, T2)
    m1 = seq_mask(inputs["lengths1"], T1) if lengths1 is not None else torch.ones(B, T1, dtype=torch.bool)
    m2 = seq_mask(inputs["lengths2"], T2) if lengths2 is not None else torch.ones(B, T2, dtype=torch.bool)
    w1 = masked_softmax(E, m2[:, None, :], m1[:, :, None])
    w2 = masked_softmax(E.transpose(1, 2), m1[:, None, :], m2[:, :, None])
    outputs = {"weights1": w1, "attended1": w1 @ x2, "weights2": w2, "attended2": w2 @ x1}
    checks = {}
    if lengths1 is not None or lengths2 is not None:
        checks["coattention_padding"] = True
    emit(case, desc, "coattention", {}, params, inputs, outputs, g, checks)


def han_case(case, desc, B, T, C, A, lengths=None):
    g = gen(seed_of(f"layers/{case}"))
    inputs = {"x": rnd(g, B, T, C)}
    if lengths is not None:
        inputs["lengths"] = torch.tensor(lengths, dtype=torch.int64)
    params = leafs({"W_omega": rnd(g, C, A, amp=0.7), "b_omega": rnd(g, A, amp=0.5), "u_omega": rnd(g, A)})
    inputs = leafs(inputs)
    x = inputs["x"]
    u = torch.tanh(x @ params["W_omega"] + params["b_omega"])  # (B, T, A)
    s = u @ params["u_omega"]  # (B, T)
    mask = seq_mask(inputs["lengths"], T) if lengths is not None else torch.ones(B, T, dtype=torch.bool)
    alphas = masked_softmax(s, mask)
    pooled = (alphas.unsqueeze(-1) * x).sum(1)
    checks = {"rows_sum_to_one": "alphas"}
    if lengths is not None:
        checks["padded_zero"] = ("alphas", "lengths", 1)
    emit(case, desc, "han-pool", {}, params, inputs, {"pooled": pooled, "alphas": alphas}, g, checks)


def spatial_case(case, desc, B, L, E, Dd, A):
    g = gen(seed_of(f"layers/{case}"))
    inputs = leafs({"features": rnd(g, B, L, E), "hidden": rnd(g, B, Dd)})
    shapes = {"encoder_att.weight": (A, E), "encoder_att.bias": (A,), "decoder_att.weight": (A, Dd),
              "decoder_att.bias": (A,), "full_att.weight": (1, A), "full_att.bias": (1,), "f_beta.weight": (E, Dd),
              "f_beta.bias": (E,)}
    p = leafs({k: rnd(g, *s, amp=0.6) for k, s in shapes.items()})
    feats, hidden = inputs["features"], inputs["hidden"]
    att1 = F.linear(feats, p["encoder_att.weight"], p["encoder_att.bias"])  # (B, L, A)
    att2 = F.linear(hidden, p["decoder_att.weight"], p["decoder_att.bias"])  # (B, A)
    pre = att1 + att2.unsqueeze(1)
    att = F.linear(torch.relu(pre), p["full_att.weight"], p["full_att.bias"]).squeeze(2)  # (B, L)
    alpha = F.softmax(att, 1)
    beta = torch.sigmoid(F.linear(hidden, p["f_beta.weight"], p["f_beta.bias"]))  # (B, E)
    context = beta * (feats * alpha.unsqueeze(2)).sum(1)
    emit(case, desc, "spatial", {}, p, inputs, {"context": context, "alpha": alpha, "beta": beta}, g,
         {"rows_sum_to_one": "alpha", "margin": pre.detach().abs().min().item()})


def din_case(case, desc, B, S, C, hidden=None, activation="sigmoid", softmax=False, lengths=None):
    g = gen(seed_of(f"layers/{case}"))
    inputs = {"history": rnd(g, B, S, C), "target": rnd(g, B, C)}
    if lengths is not None:
        inputs["lengths"] = torch.tensor(lengths, dtype=torch.int64)
    params = {}
    if not softmax:
        widths = [4 * C] + list(hidden) + [1]
        for k in range(len(widths) - 1):
            params[f"mlp.{k}.weight"] = rnd(g, widths[k + 1], widths[k], amp=0.6)
            params[f"mlp.{k}.bias"] = rnd(g, widths[k + 1], amp=0.3)
    params = leafs(params)
    inputs = leafs(inputs)
    hist, tgt = inputs["history"], inputs["target"]
    mask = seq_mask(inputs["lengths"], S) if lengths is not None else torch.ones(B, S, dtype=torch.bool)
    checks = {}
    if softmax:
        w = masked_softmax((hist @ tgt.unsqueeze(-1)).squeeze(-1) / math.sqrt(C), mask)
        options = {"normalize": "softmax"}
        checks["rows_sum_to_one"] = "weights"
    else:
        et = tgt.unsqueeze(1).expand_as(hist)
        h = torch.cat([hist, et, hist - et, hist * et], -1)  # (B, S, 4C)
        n = len(hidden) + 1
        pres = []
        for k in range(n):
            h = F.linear(h, params[f"mlp.{k}.weight"], params[f"mlp.{k}.bias"])
            if k < n - 1:
                pres.append(h.detach())
                h = torch.sigmoid(h) if activation == "sigmoid" else torch.relu(h)
        w = h.squeeze(-1) * mask.to(F64)
        options = {} if activation == "sigmoid" else {"activation": activation}
        if activation == "relu":
            checks["margin"] = min(pr.abs().min().item() for pr in pres)
    pooled = (w.unsqueeze(-1) * hist).sum(1)
    if lengths is not None:
        checks["padded_zero"] = ("weights", "lengths", 1)
    emit(case, desc, "din", options, params, inputs, {"pooled": pooled, "weights": w}, g, checks)


def misc_cases():
    coattention_case("coattention", "plain E = x1 x2^T, B=2 T1=4 T2=5 C=6, no lengths", B=2, T1=4, T2=5, C=6)
    coattention_case("coattention_lengths", "plain, lengths1 [4,2] lengths2 [3,5]", B=2, T1=4, T2=5, C=6,
                     lengths1=[4, 2], lengths2=[3, 5])
    coattention_case("coattention_weight_lengths", "E = x1 W x2^T, lengths1 [3,4,1] lengths2 [5,2,4]", B=3, T1=4,
                     T2=5, C=5, weight=True, lengths1=[3, 4, 1], lengths2=[5, 2, 4])
    han_case("han_pool", "B=2 T=6 C=5 A=4, no lengths", B=2, T=6, C=5, A=4)
    han_case("han_pool_lengths", "lengths [6,2,4]", B=3, T=6, C=5, A=4, lengths=[6, 2, 4])
    spatial_case("spatial", "B=2, L=6 (2x3 grid), E=5, Dd=4, A=3", B=2, L=6, E=5, Dd=4, A=3)
    din_case("din_mlp_lengths", "MLP 4C=16 -> 6 -> 1, sigmoid, lengths [5,3,1]", B=3, S=5, C=4, hidden=[6],
             lengths=[5, 3, 1])
    din_case("din_mlp_relu", "MLP 16 -> 6 -> 3 -> 1, relu, no lengths", B=2, S=5, C=4, hidden=[6, 3],
             activation="relu")
    din_case("din_softmax_lengths", "normalize softmax: softmax(e_t . e_i / sqrt(C)), lengths [2,5,4]", B=3, S=5,
             C=4, softmax=True, lengths=[2, 5, 4])


# ---------------------------------------------------------------------------------------------------------------------
# Graph attention (PyTorch Geometric)
# ---------------------------------------------------------------------------------------------------------------------

# 8 nodes; edge (3, 3) is a self-loop already in the input; node 6 has no incoming edge; node 7 only a loop.
EDGES = [(0, 1), (1, 0), (2, 1), (3, 3), (4, 2), (1, 4), (5, 2), (0, 5), (3, 4), (6, 0), (2, 3), (7, 7), (4, 0)]
N_NODES = 8


def manual_gat(kind, p, x, ei, heads, out_ch):
    """Edge logits e (E', heads) by hand (before leaky_relu for gat; the leaky_relu input entries for gatv2)."""
    src, dst = ei
    if kind == "gat":
        xs = (x @ p["lin.weight"].T).view(-1, heads, out_ch)
        a_s = (xs * p["att_src"]).sum(-1)
        a_d = (xs * p["att_dst"]).sum(-1)
        return a_s[src] + a_d[dst]
    xl = (x @ p["lin_l.weight"].T + p["lin_l.bias"]).view(-1, heads, out_ch)
    xr = (x @ p["lin_r.weight"].T + p["lin_r.bias"]).view(-1, heads, out_ch)
    return xl[src] + xr[dst]  # (E', heads, out)


def gat_case(case, desc, kind, F_in, heads, out_ch, concat=True, slope=0.2, self_loops=True):
    g = gen(seed_of(f"layers/{case}"))
    inputs = {"x": rnd(g, N_NODES, F_in), "edge_index": torch.tensor(EDGES, dtype=torch.int64).T.contiguous()}
    cls = GATConv if kind == "gat" else GATv2Conv
    module = cls(F_in, out_ch, heads=heads, concat=concat, negative_slope=slope, add_self_loops=self_loops,
                 dropout=0.0)
    params = fill_module(g, module)
    inputs = leafs(inputs)
    out, (ei_out, alpha) = module(inputs["x"], inputs["edge_index"], return_attention_weights=True)
    # the edge order PyG attends over, as the spec states it
    ei = inputs["edge_index"]
    if self_loops:
        keep = ei[0] != ei[1]
        loops = torch.arange(N_NODES).repeat(2, 1)
        want = torch.cat([ei[:, keep], loops], 1)
    else:
        want = ei
    assert torch.equal(ei_out, want), f"{case}: PyG edge order {ei_out.tolist()} != spec {want.tolist()}"
    with torch.no_grad():
        e = manual_gat(kind, params, inputs["x"], ei_out, heads, out_ch)
        margin = e.abs().min().item()
        if kind == "gat":
            logit = F.leaky_relu(e, slope)
        else:
            logit = (F.leaky_relu(e, slope) * params["att"]).sum(-1)
        dst = ei_out[1]
        ref = torch.zeros_like(logit)
        for i in range(N_NODES):
            m = dst == i
            if m.any():
                ref[m] = F.softmax(logit[m], 0)
        err = (ref - alpha).abs().max().item()
        assert err < 1e-12, f"{case}: manual alpha differs from PyG by {err}"
    options = {"heads": heads, "out_channels": out_ch}
    if not concat:
        options["concat"] = False
    if slope != 0.2:
        options["negative_slope"] = slope
    if not self_loops:
        options["add_self_loops"] = False
    emit(case, desc, kind, options, params, inputs, {"out": out, "alpha": alpha}, g,
         {"margin": margin, "alpha_groups_sum_to_one": True})


def graph_cases():
    gat_case("gat_concat", "heads 2, concat, out 3; input edges hold a self-loop (3,3) and (7,7)", "gat", 5, 2, 3)
    gat_case("gat_mean", "heads 2, concat false (mean), out 4, negative_slope 0.1", "gat", 5, 2, 4, concat=False,
             slope=0.1)
    gat_case("gat_no_self_loops", "heads 1, add_self_loops false: alpha over the input edges as given", "gat", 5, 1,
             3, self_loops=False)
    gat_case("gatv2_concat", "heads 2, concat, out 3, same graph", "gatv2", 5, 2, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Self-check of the written files
# ---------------------------------------------------------------------------------------------------------------------


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def self_check():
    problems = []
    total = 0
    for case, info in WRITTEN.items():
        d = os.path.join(FIXTURES, AREA, case)
        for fn in ("params", "input", "expected"):
            total += os.path.getsize(os.path.join(d, fn + ".safetensors"))
        par, _ = read(os.path.join(d, "params.safetensors"))
        inp, meta = read(os.path.join(d, "input.safetensors"))
        exp, _ = read(os.path.join(d, "expected.safetensors"))

        def bad(msg):
            problems.append(f"{case}: {msg}")

        if meta.get("layer") != info["layer"]:
            bad("metadata layer")
        if json.loads(meta.get("options", "null")) != info["options"]:
            bad("metadata options")
        if sorted(par) != sorted(info["params"]):
            bad("params file")
        float_inputs = [k for k in info["inputs"] if inp[k].is_floating_point()]
        for k in info["inputs"]:
            if k not in inp:
                bad(f"input {k} missing")
            elif inp[k].dtype not in (torch.float32, torch.int64):
                bad(f"input {k} dtype {inp[k].dtype}")
        for k in list(par) + float_inputs:
            src = par[k] if k in par else inp[k]
            if "d" + k not in exp:
                bad(f"expected lacks d{k}")
            elif exp["d" + k].shape != src.shape:
                bad(f"d{k} shape {tuple(exp['d' + k].shape)} != {tuple(src.shape)}")
        for o in info["outputs"]:
            if o not in exp:
                bad(f"output {o} missing")
            elif "d" + o not in inp or inp["d" + o].shape != exp[o].shape:
                bad(f"upstream d{o} missing or misshapen")
        want = set(info["outputs"]) | {"d" + k for k in list(par) + float_inputs}
        if set(exp) != want:
            bad(f"expected holds {sorted(set(exp) ^ want)} unexpectedly")
        for fname, t in list(par.items()) + list(inp.items()) + list(exp.items()):
            if t.is_floating_point():
                if t.dtype != torch.float32:
                    bad(f"{fname} is {t.dtype}")
                if not torch.isfinite(t).all():
                    bad(f"{fname} is not finite")
        ch = info["checks"]
        if "rows_sum_to_one" in ch:
            w = exp[ch["rows_sum_to_one"]].double()
            if (w.sum(-1) - 1).abs().max() > 1e-6:
                bad(f"{ch['rows_sum_to_one']} rows do not sum to 1")
            if (w < 0).any():
                bad("negative weights")
        if "padded_zero" in ch:
            name, lname, axis = ch["padded_zero"]
            t = exp[name]
            lengths = inp[lname]
            m = seq_mask(lengths, t.shape[axis])  # (B, len)
            shape = [t.shape[0]] + [1] * (t.dim() - 1)
            shape[axis] = t.shape[axis]
            hidden = (~m).view(shape).expand_as(t)
            if (t[hidden] != 0).any():
                bad(f"{name} non-zero at padding")
            if name == "output" and "dx" in exp:
                hx = (~m).view(m.shape[0], m.shape[1], 1).expand_as(exp["dx"])
                if (exp["dx"][hx] != 0).any():
                    bad("dx non-zero at padding")
        if "coattention_padding" in ch:
            B, T1, T2 = exp["weights1"].shape
            m1 = seq_mask(inp["lengths1"], T1) if "lengths1" in inp else torch.ones(B, T1, dtype=torch.bool)
            m2 = seq_mask(inp["lengths2"], T2) if "lengths2" in inp else torch.ones(B, T2, dtype=torch.bool)
            for name, rows, cols in (("weights1", m1, m2), ("weights2", m2, m1)):
                w = exp[name]
                if (w[~rows] != 0).any() or (w.transpose(1, 2)[~cols] != 0).any():
                    bad(f"{name} non-zero at padding")
                if ((w.double().sum(-1) - rows.double()).abs() > 1e-6).any():
                    bad(f"{name} rows do not sum to 1 (valid) / 0 (padded)")
            for name, rows in (("attended1", m1), ("attended2", m2)):
                if (exp[name][~rows] != 0).any():
                    bad(f"{name} non-zero at padded rows")
            for name, m in (("dx1", m1), ("dx2", m2)):
                if (exp[name][~m] != 0).any():
                    bad(f"{name} non-zero at padding")
        if "zero_outside" in ch:
            if (exp["align"][~ch["zero_outside"]] != 0).any():
                bad("local-p align non-zero outside the window")
        if "alpha_groups_sum_to_one" in ch:
            alpha = exp["alpha"].double()
            E_ = alpha.shape[0]
            ei = inp["edge_index"]
            if info["options"].get("add_self_loops", True):
                keep = ei[0] != ei[1]
                dst = torch.cat([ei[1][keep], torch.arange(N_NODES)])
            else:
                dst = ei[1]
            if dst.numel() != E_:
                bad(f"alpha has {E_} rows, want {dst.numel()}")
            sums = torch.zeros(N_NODES, alpha.shape[1], dtype=F64).index_add_(0, dst, alpha)
            has = torch.zeros(N_NODES, dtype=torch.bool)
            has[dst] = True
            if ((sums[has] - 1).abs() > 1e-6).any():
                bad("alpha does not sum to 1 per target")
        if "margin" in ch and ch["margin"] < MARGIN:
            bad(f"an entry is {ch['margin']:.2e} from a kink (threshold / relu / window edge)")
        if "sparse" in ch and (ch["sparse"][0] == 0 or ch["sparse"][1] < 2):
            bad(f"(visible zeros, largest support) = {ch['sparse']}: the sparse normaliser is not exercised")
    for p in problems:
        print("SELF-CHECK FAILED:", p)
    assert not problems, f"{len(problems)} self-check failures"
    print(f"self-check: {len(WRITTEN)} cases ok; fixtures/{AREA} tensors files total {total} bytes")
    assert total < 1_500_000


def main():
    torch.manual_seed(0)
    d = os.path.join(FIXTURES, AREA)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    print(f"torch {torch.__version__}, torch_geometric {torch_geometric.__version__}, entmax {entmax.__version__}")
    normaliser_cases()
    rnn_cases()
    global_cases()
    misc_cases()
    graph_cases()
    write_readme(
        AREA,
        "Layer fixtures for `attend op layer` (generated by scripts/oracle/layers.py)",
        "Regenerate: `bash scripts/gen_fixtures.sh layers`. Each case is a directory holding `params.safetensors`, "
        "`input.safetensors` (inputs, upstream gradients `d<output>`, metadata `layer` and `options`) and "
        "`expected.safetensors` (outputs and `d<name>` for every float input and parameter); see docs/layers.md.",
        README,
    )
    self_check()


if __name__ == "__main__":
    main()
