"""PyTorch oracle for `attend::models::seq2seq` (Seq2Seq::forward, teacher forcing): fixtures/seq2seq/<case>.safetensors.

One file per case:
  inputs     `src` (B,S) int64 (ids in 3..V_src-1, 0 at padding), `src_lengths` (B) int64 (S for cases without
             lengths), `tgt_in` (B,T) int64 (column 0 = bos = 1, then ids in 3..V_tgt-1)
  parameters `p.<name>` under the model's names (PyTorch RNN names under `encoder.` / `decoder.`, OpenNMT-py
             GlobalAttention names under `attention.`, `src_embedding.weight`, `tgt_embedding.weight`,
             `generator.{weight,bias}`)
  outputs    `logits` (B,T,V_tgt); `align` (B,T,S) unless attention is none; `coverage_loss` (B) with coverage
  upstream   `d<output>` for every output (the loss is L = sum_o sum(o * d<o>))
  gradients  `dp.<name>` = dL/dp for every parameter
  metadata   `config` = the Seq2SeqConfig as JSON (serde form), `torch` = version

The model (docs of crates/attend/src/models/seq2seq.rs), with H = hidden_size and dirs = 2 for a bidirectional encoder:
  encoder    emb(src) -> nn.LSTM/nn.GRU(E, H/dirs, L, bidirectional) over pack_padded_sequence(enforce_sorted=False)
             -> pad_packed_sequence(total_length=S): memory (B,S,H), zeros at padding
  bridge     h_n.view(L, 2, B, H/2).permute(0, 2, 1, 3).reshape(L, B, H) when bidirectional (the same for c_n)
  decoder    nn.LSTM/nn.GRU(E + X, H, L) stepped one token at a time, X = 0 (no attention) or H
  none       o_t = s_t
  bahdanau   q = previous top-layer state h[L-1]; e = v tanh(W_q q + b_q + W_c m_s [+ W_cov cov_s]);
             a = softmax over s < len; c = a @ memory; s_t = RNN([emb; c]); o_t = tanh(W_out [c; s_t] + b_out)
  luong      h_t = RNN([emb; o_{t-1}]) (input feeding, o_{-1} = 0); score as layers.py's global_score (dot, general,
             concat [+ W_cov cov_s]); a = softmax over s < len; o_t = tanh(W_out [a @ memory; h_t])
  local_m    luong general, visible also needs |s - t| <= D (t = the 0-based step)
  local_p    luong general; p = len_b sigmoid(v_p tanh(W_p h_t)); visible also needs |s - p| <= D (p detached);
             a = softmax over visible times exp(-(s - p)^2 / (2 (D/2)^2))
  coverage   (bahdanau, luong concat) step loss sum_s min(a_s, cov_s); cov += a; coverage_loss = sum over steps
  logits_t = W_gen o_t + b_gen

Everything is computed in float64 from float32-rounded inputs and parameters; results are stored as float32.
The forward runs twice: once through nn.LSTM / nn.GRU (torch.func.functional_call with the parameter leaves; this is
what is saved) and once through hand-written cells; outputs and gradients must agree. Every attention step without
coverage is also checked against layers.py's global_forward / local_p_forward.

Run: PYTHONPATH=scripts/oracle scripts/.venv/bin/python scripts/oracle/seq2seq.py
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import layers
from common import FIXTURES, fresh_area, gen, seed_of, write_readme
from common import save_sorted as save

AREA = "seq2seq"
F64 = torch.float64
NEG_INF = float("-inf")
B, S, T = 2, 5, 4
V_SRC, V_TGT, E, H = 7, 9, 4, 6
BOS, PAD = 1, 0
AMP = 0.5  # parameters ~ N(0, 0.5^2): no saturated gate or tanh
LOCAL_P_MARGIN = 1e-3  # no |s - p| within this of D
MIN_MARGIN = 1e-3  # no visible |align - cov| (the kink of min) below this
MAX_ATTEMPTS = 20
TOL = 1e-11
README = []
WRITTEN = {}  # case -> info for the self-check


def rnd(g, *shape, amp=1.0):
    """float32-rounded normal values held in float64."""
    return (torch.randn(*shape, generator=g, dtype=F64) * amp).float().to(F64)


def seq_mask(lengths, n):
    return torch.arange(n)[None, :] < lengths[:, None]


# ---------------------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------------------


def rnn_shapes(prefix, kind, inp, hid, L, bidir):
    gates = 4 if kind == "lstm" else 3
    dirs = 2 if bidir else 1
    out = {}
    for l in range(L):
        for d in range(dirs):
            sfx = f"_l{l}" + ("_reverse" if d else "")
            width = inp if l == 0 else hid * dirs
            out[f"{prefix}weight_ih{sfx}"] = (gates * hid, width)
            out[f"{prefix}weight_hh{sfx}"] = (gates * hid, hid)
            out[f"{prefix}bias_ih{sfx}"] = (gates * hid,)
            out[f"{prefix}bias_hh{sfx}"] = (gates * hid,)
    return out


def attention_key(att):
    """"none" | "bahdanau" | "dot" | "general" | "concat" | "local_m" | "local_p"."""
    return att["luong"] if isinstance(att, dict) else att


def param_shapes(cfg):
    """The spec's parameter list (shapes), in a fixed order (the order they are drawn in)."""
    L, kind, bidir = cfg["num_layers"], cfg["rnn"], cfg["bidirectional_encoder"]
    dirs = 2 if bidir else 1
    att = attention_key(cfg["attention"])
    shapes = {"src_embedding.weight": (V_SRC, E), "tgt_embedding.weight": (V_TGT, E)}
    shapes.update(rnn_shapes("encoder.", kind, E, H // dirs, L, bidir))
    shapes.update(rnn_shapes("decoder.", kind, E + (0 if att == "none" else H), H, L, False))
    a = {}
    if att in ("general", "local_m", "local_p"):
        a["linear_in.weight"] = (H, H)
    if att in ("concat", "bahdanau"):
        a.update({"linear_context.weight": (H, H), "linear_query.weight": (H, H), "linear_query.bias": (H,),
                  "v.weight": (1, H)})
    if att != "none":
        a["linear_out.weight"] = (H, 2 * H)
    if att == "bahdanau":
        a["linear_out.bias"] = (H,)
    if cfg["coverage"]:
        assert att in ("concat", "bahdanau"), "coverage needs an additive score"
        a["linear_cover.weight"] = (H, 1)
    if att == "local_p":
        a.update({"linear_p.weight": (H, H), "v_p.weight": (1, H)})
    shapes.update({"attention." + k: v for k, v in a.items()})
    shapes.update({"generator.weight": (V_TGT, H), "generator.bias": (V_TGT,)})
    return shapes


def make_modules(cfg):
    """nn.LSTM / nn.GRU encoder and decoder (float64); their names and shapes must be the spec's."""
    L, bidir = cfg["num_layers"], cfg["bidirectional_encoder"]
    cls = nn.LSTM if cfg["rnn"] == "lstm" else nn.GRU
    X = 0 if attention_key(cfg["attention"]) == "none" else H
    enc = cls(E, H // (2 if bidir else 1), num_layers=L, bidirectional=bidir, batch_first=True).double().eval()
    dec = cls(E + X, H, num_layers=L, batch_first=True).double().eval()
    shapes = param_shapes(cfg)
    for prefix, m in (("encoder.", enc), ("decoder.", dec)):
        got = {prefix + k: tuple(v.shape) for k, v in m.named_parameters()}
        want = {k: v for k, v in shapes.items() if k.startswith(prefix)}
        assert got == want, f"{prefix}: module {got} != spec {want}"
    return enc, dec


def sub(p, prefix):
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------------------
# Recurrent networks: nn modules (saved) and hand-written cells (cross-check)
# ---------------------------------------------------------------------------------------------------------------------


def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    i, f, g, o = (x @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, -1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c2), c2


def gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    ir, iz, inn = (x @ w_ih.T + b_ih).chunk(3, -1)
    hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, -1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(inn + r * hn)
    return (1 - z) * n + z * h


def manual_rnn(kind, p, prefix, x, lengths, L, bidir, h0=None, c0=None):
    """Multi-layer (bi)directional LSTM/GRU by hand with masked updates: (out, h_n, c_n | None)."""
    Bn, Tn, _ = x.shape
    dirs = 2 if bidir else 1
    mask = seq_mask(lengths, Tn)
    inp, hs, cs = x, [], []
    for l in range(L):
        outs_dir = []
        for d in range(dirs):
            sfx = f"_l{l}" + ("_reverse" if d else "")
            W = [p[f"{prefix}{n}{sfx}"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            hid = W[1].shape[1]
            k = l * dirs + d
            h = h0[k] if h0 is not None else torch.zeros(Bn, hid, dtype=F64)
            c = (c0[k] if c0 is not None else torch.zeros(Bn, hid, dtype=F64)) if kind == "lstm" else None
            outs = [None] * Tn
            for t in (range(Tn) if d == 0 else reversed(range(Tn))):
                m = mask[:, t:t + 1]
                if kind == "lstm":
                    h2, c2 = lstm_cell(inp[:, t], h, c, *W)
                    c = torch.where(m, c2, c)
                else:
                    h2 = gru_cell(inp[:, t], h, *W)
                h = torch.where(m, h2, h)
                outs[t] = torch.where(m, h2, torch.zeros_like(h2))
            outs_dir.append(torch.stack(outs, 1))
            hs.append(h)
            cs.append(c)
        inp = torch.cat(outs_dir, -1)
    return inp, torch.stack(hs), (torch.stack(cs) if kind == "lstm" else None)


class Rnns:
    """Encoder run and decoder step, through the nn modules ("torch") or by hand ("manual")."""

    def __init__(self, cfg, impl, p):
        self.cfg, self.impl, self.p = cfg, impl, p
        self.kind, self.L = cfg["rnn"], cfg["num_layers"]
        self.enc, self.dec = make_modules(cfg)

    def encode(self, x, lengths):
        bidir = self.cfg["bidirectional_encoder"]
        if self.impl == "manual":
            return manual_rnn(self.kind, self.p, "encoder.", x, lengths, self.L, bidir)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, state = functional_call(self.enc, sub(self.p, "encoder."), (packed,))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return (out, *state) if self.kind == "lstm" else (out, state, None)

    def step(self, inp, h, c):
        """inp (B, I), states (L, B, H) -> (top output (B, H), h, c)."""
        if self.impl == "manual":
            ones = torch.ones(inp.shape[0], dtype=torch.int64)
            out, h, c = manual_rnn(self.kind, self.p, "decoder.", inp[:, None], ones, self.L, False, h, c)
            return out[:, 0], h, c
        hx = (h, c) if self.kind == "lstm" else h
        out, state = functional_call(self.dec, sub(self.p, "decoder."), (inp[:, None], hx))
        if self.kind == "lstm":
            h, c = state
        else:
            h = state
        return out[:, 0], h, c


def bridge(state, L, bidir):
    if state is None or not bidir:
        return state
    return state.view(L, 2, B, H // 2).permute(0, 2, 1, 3).reshape(L, B, H)


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------


def additive_score(pa, q, memory, cov):
    """v tanh(W_q q + b_q + W_c m_s [+ W_cov cov_s]): (B, C) x (B, S, C) -> (B, S)."""
    wq = (q @ pa["linear_query.weight"].T + pa["linear_query.bias"]).unsqueeze(1)  # (B, 1, C)
    pre = wq + memory @ pa["linear_context.weight"].T  # (B, S, C)
    if cov is not None:
        pre = pre + cov.unsqueeze(-1) @ pa["linear_cover.weight"].T
    return (torch.tanh(pre) @ pa["v.weight"].T).squeeze(-1)


def general_score(pa, h_t, memory, dot):
    q = h_t if dot else h_t @ pa["linear_in.weight"].T
    return torch.bmm(memory, q.unsqueeze(-1)).squeeze(-1)  # (B, S)


def forward(cfg, p, inputs, impl, trace=None):
    """Teacher-forced forward: {"logits", "align"?, "coverage_loss"?} and, for local_p, the window margin."""
    L, bidir, D = cfg["num_layers"], cfg["bidirectional_encoder"], cfg["window"]
    att = attention_key(cfg["attention"])
    coverage = cfg["coverage"]
    src, lengths, tgt_in = inputs["src"], inputs["src_lengths"], inputs["tgt_in"]
    rnns = Rnns(cfg, impl, p)
    pa = sub(p, "attention.")
    memory, h_n, c_n = rnns.encode(p["src_embedding.weight"][src], lengths)
    h, c = bridge(h_n, L, bidir), bridge(c_n, L, bidir)
    valid_len = seq_mask(lengths, S)  # (B, S)
    pos = torch.arange(S, dtype=F64)
    feed = torch.zeros(B, H, dtype=F64)
    cov = torch.zeros(B, S, dtype=F64) if coverage else None
    cov_loss = torch.zeros(B, dtype=F64)
    logits, aligns, windows = [], [], []
    margins = {}
    for t in range(T):
        emb = p["tgt_embedding.weight"][tgt_in[:, t]]
        a = None
        if att == "none":
            o, h, c = rnns.step(emb, h, c)
        elif att == "bahdanau":
            q = h[L - 1]
            score = additive_score(pa, q, memory, cov)
            a = F.softmax(score.masked_fill(~valid_len, NEG_INF), -1)
            ctx = torch.bmm(a.unsqueeze(1), memory).squeeze(1)
            s_t, h, c = rnns.step(torch.cat([emb, ctx], -1), h, c)
            o = torch.tanh(torch.cat([ctx, s_t], -1) @ pa["linear_out.weight"].T + pa["linear_out.bias"])
            if trace is not None:
                trace.append({"t": t, "query": q.detach(), "align": a.detach()})
            windows.append(valid_len)
        else:
            h_t, h, c = rnns.step(torch.cat([emb, feed], -1), h, c)
            if att == "concat":
                score = additive_score(pa, h_t, memory, cov)
            else:
                score = general_score(pa, h_t, memory, att == "dot")
            visible = valid_len
            if att == "local_m":
                visible = visible & ((pos - t).abs() <= D)[None, :]
            if att == "local_p":
                pt = lengths.to(F64) * torch.sigmoid(
                    torch.tanh(h_t @ pa["linear_p.weight"].T) @ pa["v_p.weight"].T).squeeze(-1)  # (B,)
                dist = pos[None, :] - pt[:, None]  # (B, S)
                visible = visible & (dist.detach().abs() <= D)
                margins.setdefault("local_p", []).append((dist.detach().abs() - D).abs().min().item())
            assert visible.any(-1).all(), f"step {t}: an empty window"
            a = F.softmax(score.masked_fill(~visible, NEG_INF), -1)
            if att == "local_p":
                sigma = D / 2.0
                a = a * torch.exp(-dist ** 2 / (2 * sigma ** 2))
            ctx = torch.bmm(a.unsqueeze(1), memory).squeeze(1)
            o = torch.tanh(torch.cat([ctx, h_t], -1) @ pa["linear_out.weight"].T)
            feed = o
            if trace is not None:
                trace.append({"t": t, "query": h_t.detach(), "align": a.detach(), "o": o.detach()})
            windows.append(visible)
        if coverage:
            if t > 0:
                gap = (a - cov).detach().abs()[valid_len]
                margins.setdefault("coverage", []).append(gap.min().item())
            cov_loss = cov_loss + torch.minimum(a, cov).sum(-1)
            cov = cov + a
        if a is not None:
            aligns.append(a)
        logits.append(o @ p["generator.weight"].T + p["generator.bias"])
    outputs = {"logits": torch.stack(logits, 1)}
    if aligns:
        outputs["align"] = torch.stack(aligns, 1)
    if coverage:
        outputs["coverage_loss"] = cov_loss
    extra = {"memory": memory.detach(), "windows": torch.stack(windows, 1) if windows else None,
             "margins": {k: min(v) for k, v in margins.items()}}
    return outputs, extra


def check_attention_steps(cfg, p, inputs, trace, memory):
    """Every step without coverage against layers.py's GlobalAttention / local-p forms."""
    att = attention_key(cfg["attention"])
    if cfg["coverage"] or att in ("none", "local_m"):
        return 0.0
    assert len(trace) == T, f"trace holds {len(trace)} steps"
    pa = sub(p, "attention.")
    lengths = inputs["src_lengths"]
    err = 0.0
    with torch.no_grad():
        for st in trace:
            q = st["query"].unsqueeze(1)
            if att == "local_p":
                attn_h, align, _, _ = layers.local_p_forward(pa, q, memory, lengths, cfg["window"])
            else:
                layer = "bahdanau" if att == "bahdanau" else f"luong-{att}"
                attn_h, align, _ = layers.global_forward(layer, pa, q, memory, lengths, "softmax")
            err = max(err, (align[:, 0] - st["align"]).abs().max().item())
            if "o" in st:
                err = max(err, (attn_h[:, 0] - st["o"]).abs().max().item())
    assert err < TOL, f"attention steps differ from layers.py by {err}"
    return err


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------


def config(attention, rnn="lstm", L=1, bidir=True, window=2, coverage=False):
    return {"src_vocab": V_SRC, "tgt_vocab": V_TGT, "embed_dim": E, "hidden_size": H, "num_layers": L,
            "bidirectional_encoder": bidir, "rnn": rnn, "attention": attention, "window": window,
            "coverage": coverage, "dropout": 0.0}


def draw(g, cfg, lengths):
    lengths = torch.tensor(lengths, dtype=torch.int64)
    src = torch.randint(3, V_SRC, (B, S), generator=g, dtype=torch.int64)
    src = src.masked_fill(~seq_mask(lengths, S), PAD)
    tgt_in = torch.randint(3, V_TGT, (B, T), generator=g, dtype=torch.int64)
    tgt_in[:, 0] = BOS
    inputs = {"src": src, "src_lengths": lengths, "tgt_in": tgt_in}
    params = {k: rnd(g, *s, amp=AMP) for k, s in param_shapes(cfg).items()}
    return inputs, params


def run_case(case, desc, cfg, lengths):
    assert case not in WRITTEN, case
    for attempt in range(MAX_ATTEMPTS):
        seed = seed_of(f"{AREA}/{case}" + (f"#{attempt}" if attempt else ""))
        g = gen(seed)
        inputs, params = draw(g, cfg, lengths)
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        trace = []
        outputs, extra = forward(cfg, p, inputs, "torch", trace)
        m = extra["margins"]
        if m.get("local_p", 1.0) >= LOCAL_P_MARGIN and m.get("coverage", 1.0) >= MIN_MARGIN:
            break
        print(f"  {case}: seed {seed} redrawn (margins {m})")
    else:
        raise AssertionError(f"{case}: no seed with the margins in {MAX_ATTEMPTS} attempts")
    ups = {"d" + o: rnd(g, *v.shape) for o, v in outputs.items()}
    loss = sum((v * ups["d" + o]).sum() for o, v in outputs.items())
    grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()), allow_unused=True)))
    assert all(v is not None for v in grads.values()), [k for k, v in grads.items() if v is None]

    # cross-check: hand-written cells, same parameter values
    p2 = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    out2, _ = forward(cfg, p2, inputs, "manual")
    loss2 = sum((v * ups["d" + o]).sum() for o, v in out2.items())
    grads2 = dict(zip(p2, torch.autograd.grad(loss2, list(p2.values()))))
    err_out = max((outputs[k] - out2[k]).abs().max().item() for k in outputs)
    err_grad = max((grads[k] - grads2[k]).abs().max().item() for k in grads)
    assert err_out < TOL and err_grad < TOL, f"{case}: manual cells differ: out {err_out}, grads {err_grad}"
    err_att = check_attention_steps(cfg, p, inputs, trace, extra["memory"])

    tensors = dict(inputs)
    tensors.update({"p." + k: v.float() for k, v in params.items()})
    tensors.update({k: v.detach().float() for k, v in outputs.items()})
    tensors.update({k: v.float() for k, v in ups.items()})
    tensors.update({"dp." + k: v.float() for k, v in grads.items()})
    save(AREA, case, tensors, {"config": json.dumps(cfg, separators=(",", ":"))})
    WRITTEN[case] = {"config": cfg, "params": list(params), "outputs": list(outputs), "windows": extra["windows"],
                     "margins": extra["margins"], "seed": seed}
    README.append((case, desc))
    att_max = outputs["logits"].detach().abs().max().item()
    print(f"  {case}: seed {seed}; " + " ".join(f"{k}{tuple(v.shape)}" for k, v in outputs.items())
          + f"; max|logit| {att_max:.3f}; manual cells: out {err_out:.1e} grads {err_grad:.1e}; "
          + f"layers.py steps {err_att:.1e}; margins {extra['margins']}")


CASES = [
    ("none_lstm", "no attention, LSTM, 1 layer, bidirectional encoder, src_lengths [5,3]",
     config("none"), [5, 3]),
    ("bahdanau_lstm", "Bahdanau (OpenNMT mlp score on the previous state), LSTM, bidirectional, src_lengths [5,3]",
     config("bahdanau"), [5, 3]),
    ("bahdanau_coverage_gru", "Bahdanau + coverage, GRU, bidirectional, src_lengths [4,5]",
     config("bahdanau", rnn="gru", coverage=True), [4, 5]),
    ("luong_general_lstm_2layers", "Luong general, input feeding, LSTM, 2 layers, bidirectional, src_lengths [5,2]",
     config({"luong": "general"}, L=2), [5, 2]),
    ("luong_dot_gru_unidirectional", "Luong dot, GRU, unidirectional encoder, no lengths (src_lengths [5,5])",
     config({"luong": "dot"}, rnn="gru", bidir=False), [5, 5]),
    ("luong_concat_coverage", "Luong concat + coverage, LSTM, bidirectional, src_lengths [3,5]",
     config({"luong": "concat"}, coverage=True), [3, 5]),
    ("local_m", "Luong local-m (window |s - t| <= 1, general score), LSTM, bidirectional, src_lengths [5,4]",
     config("local_m", window=1), [5, 4]),
    ("local_p", "Luong local-p (predicted p, window 2, Gaussian sigma 1), LSTM, bidirectional, src_lengths [5,3]",
     config("local_p", window=2), [5, 3]),
]


# ---------------------------------------------------------------------------------------------------------------------
# Self-check of the written files
# ---------------------------------------------------------------------------------------------------------------------


def self_check():
    problems = []
    total = 0
    for case, info in WRITTEN.items():
        path = os.path.join(FIXTURES, AREA, case + ".safetensors")
        total += os.path.getsize(path)
        with safe_open(path, "pt") as f:
            ts = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}

        def bad(msg):
            problems.append(f"{case}: {msg}")

        cfg = info["config"]
        if json.loads(meta.get("config", "null")) != cfg:
            bad("metadata config")
        att = attention_key(cfg["attention"])
        want_out = ["logits"] + ([] if att == "none" else ["align"]) + (["coverage_loss"] if cfg["coverage"] else [])
        if info["outputs"] != want_out:
            bad(f"outputs {info['outputs']} != {want_out}")
        if sorted(info["params"]) != sorted(param_shapes(cfg)):
            bad("parameter list")
        want = {"src", "src_lengths", "tgt_in"} | set(want_out) | {"d" + o for o in want_out}
        want |= {"p." + k for k in info["params"]} | {"dp." + k for k in info["params"]}
        if set(ts) != want:
            bad(f"unexpected / missing tensors {sorted(set(ts) ^ want)}")
            continue
        for k in ("src", "src_lengths", "tgt_in"):
            if ts[k].dtype != torch.int64:
                bad(f"{k} is {ts[k].dtype}")
        lengths = ts["src_lengths"]
        if ts["src"].shape != (B, S) or ts["tgt_in"].shape != (B, T) or lengths.shape != (B,):
            bad("input shapes")
        if (ts["tgt_in"][:, 0] != BOS).any() or (ts["tgt_in"][:, 1:] < 3).any() or (ts["tgt_in"] >= V_TGT).any():
            bad("tgt_in ids")
        if (ts["src"] >= V_SRC).any() or (ts["src"] < 0).any() or not ((lengths >= 1) & (lengths <= S)).all():
            bad("src ids / lengths")
        for k, shape in param_shapes(cfg).items():
            if ts["p." + k].shape != shape or ts["dp." + k].shape != shape:
                bad(f"{k}: shape")
            dp = ts["dp." + k]
            if not torch.isfinite(dp).all() or (dp == 0).all():
                bad(f"dp.{k} is not finite or all zero")
        for k, t in ts.items():
            if t.is_floating_point() and (t.dtype != torch.float32 or not torch.isfinite(t).all()):
                bad(f"{k}: {t.dtype}, finite {bool(torch.isfinite(t).all())}")
        shapes = {"logits": (B, T, V_TGT), "align": (B, T, S), "coverage_loss": (B,)}
        for o in want_out:
            if ts[o].shape != shapes[o] or ts["d" + o].shape != shapes[o]:
                bad(f"{o} / d{o} shape")
        if "align" in ts:
            a = ts["align"].double()
            hidden = ~seq_mask(lengths, S).unsqueeze(1).expand(B, T, S)
            if (a[hidden] != 0).any():
                bad("align non-zero at padding")
            if (a[~info["windows"]] != 0).any():
                bad("align non-zero outside the visible window")
            if (a < 0).any():
                bad("negative align")
            if att != "local_p" and (a.sum(-1) - 1).abs().max() > 1e-6:
                bad("align rows do not sum to 1")
            if att == "local_p" and (a.sum(-1) > 1 + 1e-6).any():
                bad("local-p rows sum above 1")
        m = info["margins"]
        if att == "local_p" and not m.get("local_p", 0) >= LOCAL_P_MARGIN:
            bad(f"an |s - p| is within {m.get('local_p')} of D")
        if cfg["coverage"] and not m.get("coverage", 0) >= MIN_MARGIN:
            bad(f"a visible |align - cov| is {m.get('coverage')}")
        if cfg["coverage"] and not (ts["coverage_loss"] > 0).all():
            bad("coverage_loss not positive")
    for p in problems:
        print("SELF-CHECK FAILED:", p)
    assert not problems, f"{len(problems)} self-check failures"
    print(f"self-check: {len(WRITTEN)} cases ok; fixtures/{AREA} total {total} bytes")
    assert total < 300_000


def main():
    torch.manual_seed(0)
    fresh_area(AREA)
    print(f"torch {torch.__version__}")
    for case, desc, cfg, lengths in CASES:
        run_case(case, desc, cfg, lengths)
    write_readme(
        AREA,
        "Seq2seq fixtures for `attend::models::seq2seq` (generated by scripts/oracle/seq2seq.py)",
        "Regenerate: `bash scripts/gen_fixtures.sh seq2seq`. One file per case: inputs `src`, `src_lengths`, "
        "`tgt_in`; parameters `p.<name>`; outputs `logits`, `align`, `coverage_loss` (as the model has them); "
        "upstream gradients `d<output>`; gradients `dp.<name>`; metadata `config` (Seq2SeqConfig as JSON). "
        f"B={B} S={S} T={T}, V_src={V_SRC} V_tgt={V_TGT} E={E} H={H}; see the script's docstring for the model.",
        README,
    )
    self_check()


if __name__ == "__main__":
    main()
