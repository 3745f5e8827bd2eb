"""PyTorch oracle for NaN and ±inf through the row kernels: fixtures/nan_rows/<case>.safetensors.

The same tensor names and metadata as fixtures/ops (so the same Rust tests read both areas):
  softmax_*        x, [mask_bool uint8 | mask_add f32], dout, out, dx, [dmask_add]
  logsoftmax_*     x, dout, out, dx
  cross_entropy_*  logits, targets (int64), dout, out, dlogits; meta ignore_index, label_smoothing, reduction
  layer_norm_*     x, weight, bias, dout, out, dx, dweight, dbias; meta eps
  rms_norm_*       x, weight, dout, out, dx, dweight; meta eps

Semantics: plain IEEE arithmetic as PyTorch computes it (a NaN or +inf in a row makes the row's softmax NaN; all-NaN
rows are NaN, never mistaken for fully masked rows), with the library's two masking conventions:
  * a mask entry (boolean 0, or additive -inf) *replaces* the input, so a NaN it hides is gone; PyTorch's `x + mask`
    would give NaN + (-inf) = NaN. The oracle computes where(mask == -inf, -inf, x + mask) with torch autograd.
  * a row whose entries are all -inf (fully masked) gives softmax 0 and zero gradient (PyTorch: NaN).
Everything in float64 from the stored float32 inputs; stored as float32.

Run: PYTHONPATH=scripts/oracle python scripts/oracle/nan_rows.py
"""
import torch
import torch.nn.functional as F

from common import fresh_area, gen, randn, write_readme
from common import save_sorted as save, seed_of
from ops import f32, leaf

AREA = "nan_rows"
F64 = torch.float64
NAN, INF = float("nan"), float("inf")
README = []


def poked_rows(g, n, width):
    """n rows of normals; row 0 finite, then one NaN, all NaN, one +inf, one -inf, and NaN next to +inf."""
    x = randn(g, n, width) * 2
    x[1, 3] = NAN
    x[2, :] = NAN
    x[3, 5] = INF
    x[4, 0] = -INF
    x[5, 1], x[5, 6] = NAN, INF
    return x


def grad_of(out, *leaves, seed):
    dout32 = randn(gen(seed), *out.shape) if out.dim() > 0 else torch.randn((), generator=gen(seed), dtype=F64).float()
    (out * dout32.to(F64)).sum().backward()
    return dout32, [f32(t.grad) for t in leaves]


def softmax_case(name, x32, mask_bool=None, mask_add32=None, desc=""):
    x = leaf(x32)
    madd = leaf(mask_add32) if mask_add32 is not None else None
    if mask_bool is not None:
        s = torch.where(mask_bool == 0, torch.tensor(-INF, dtype=F64), x)
    elif madd is not None:
        hidden = madd.detach() == -INF
        s = torch.where(hidden, torch.tensor(-INF, dtype=F64), x + torch.where(hidden, 0.0, madd))
    else:
        s = x
    # Fully masked rows (every entry -inf) give 0: softmax of a zero row, then zeroed, so no NaN enters autograd.
    dead = (s == -INF).all(-1, keepdim=True)
    out = torch.where(dead, 0.0, torch.softmax(torch.where(dead, 0.0, s), -1))
    leaves = [x] + ([madd] if madd is not None else [])
    dout32, grads = grad_of(out, *leaves, seed=seed_of(name))
    tensors = {"x": x32, "dout": dout32, "out": f32(out), "dx": grads[0]}
    if mask_bool is not None:
        tensors["mask_bool"] = mask_bool.to(torch.uint8)
    if madd is not None:
        tensors["mask_add"] = mask_add32
        tensors["dmask_add"] = grads[1]
    save(AREA, name, tensors, {"dead_rows": int(dead.sum())})
    README.append((name, desc))


def softmax_cases():
    g = gen(seed_of("softmax"))
    x = poked_rows(g, 7, 8)
    x[6, :] = -INF  # fully masked
    softmax_case("softmax_nan", x, desc="rows: finite, one NaN, all NaN, +inf, -inf, NaN and +inf, all -inf")
    keep = torch.ones(7, 8, dtype=torch.uint8)
    keep[1, 3] = 0  # hides row 1's NaN: row 1 is finite
    keep[5, 1] = 0  # hides one of row 5's two: still NaN
    keep[0, :] = 0  # a fully masked row
    softmax_case("softmax_nan_bool_mask", x, mask_bool=keep,
                 desc="boolean mask hiding row 1's NaN and one of row 5's; row 0 fully masked")
    add = randn(g, 7, 8) * 0.5
    add[1, 3] = -INF  # hides the NaN of row 1
    add[0, 7] = NAN  # a NaN in the mask reaches row 0
    add[4, :] = -INF  # row 4 fully masked
    softmax_case("softmax_nan_additive_mask", x, mask_add32=add,
                 desc="additive mask: -inf hides row 1's NaN, a NaN mask entry reaches row 0, row 4 fully masked")


def logsoftmax_cases():
    g = gen(seed_of("logsoftmax"))
    x32 = poked_rows(g, 6, 9)
    x = leaf(x32)
    out = torch.log_softmax(x, -1)
    dout32, (dx,) = grad_of(out, x, seed=seed_of("logsoftmax_nan"))
    save(AREA, "logsoftmax_nan", {"x": x32, "dout": dout32, "out": f32(out), "dx": dx})
    README.append(("logsoftmax_nan", "rows: finite, one NaN, all NaN, +inf, -inf, NaN and +inf"))


def cross_entropy_cases():
    g = gen(seed_of("cross_entropy"))
    logits32 = poked_rows(g, 6, 7)
    targets = torch.tensor([2, 1, 0, 5, 0, 3], dtype=torch.int64)  # row 4 targets its -inf logit: loss +inf
    for reduction in ["none", "mean"]:
        name = f"cross_entropy_nan_{reduction}"
        logits = leaf(logits32)
        out = F.cross_entropy(logits, targets, reduction=reduction)
        dout32, (dl,) = grad_of(out, logits, seed=seed_of(name))
        save(AREA, name, {"logits": logits32, "targets": targets, "dout": dout32, "out": f32(out), "dlogits": dl},
             {"ignore_index": -100, "label_smoothing": 0.0, "reduction": reduction, "n_ignored": 0})
        README.append((name, f"poked logits rows, reduction {reduction} (one NaN row makes the mean NaN)"))


def norm_cases():
    g = gen(seed_of("norms"))
    x32 = poked_rows(g, 6, 8)
    w32, b32 = randn(g, 8), randn(g, 8)
    x, w, b = leaf(x32), leaf(w32), leaf(b32)
    out = F.layer_norm(x, (8,), w, b, 1e-5)
    dout32, (dx, dw, db) = grad_of(out, x, w, b, seed=seed_of("layer_norm_nan"))
    save(AREA, "layer_norm_nan", {"x": x32, "weight": w32, "bias": b32, "dout": dout32, "out": f32(out), "dx": dx,
                                  "dweight": dw, "dbias": db}, {"eps": 1e-5})
    README.append(("layer_norm_nan", "poked rows: a non-finite entry makes its row NaN, and dweight/dbias NaN"))
    x, w = leaf(x32), leaf(w32)
    out = F.rms_norm(x, (8,), w, 1e-6)
    dout32, (dx, dw) = grad_of(out, x, w, seed=seed_of("rms_norm_nan"))
    save(AREA, "rms_norm_nan", {"x": x32, "weight": w32, "dout": dout32, "out": f32(out), "dx": dx, "dweight": dw},
         {"eps": 1e-6})
    README.append(("rms_norm_nan", "poked rows through RMS norm"))


def main():
    fresh_area(AREA)
    softmax_cases()
    logsoftmax_cases()
    cross_entropy_cases()
    norm_cases()
    write_readme(AREA, "NaN and ±inf through the row kernels",
                 "Inputs with NaN, +inf and -inf placed row by row; outputs and gradients from PyTorch in float64 "
                 "(see the docstring of scripts/oracle/nan_rows.py for the two masking conventions).", README)


if __name__ == "__main__":
    main()
