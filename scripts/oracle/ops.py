"""PyTorch oracle for the fused ops: fixtures/ops/<case>.safetensors.

Every case stores its float inputs as float32 (the exact values used), computes in float64 from those values, and
stores float32 results. Gradients come from torch autograd of the loss sum(out * dout).

  softmax_*        x, [mask_bool uint8 | mask_add f32], dout, out, dx, [dmask_add]
  logsoftmax_*     x, dout, out, dx
  cross_entropy_*  logits, targets (int64), dout, out, dlogits; meta ignore_index, label_smoothing, reduction
  layer_norm_*     x, weight, [bias], dout, out, dx, dweight, [dbias]; meta eps
  rms_norm_*       x, weight, dout, out, dx, dweight; meta eps
  gelu_*           x, dout, out, dx; meta approximate ("tanh" | "none")
  tanh             x, dout, out, dx

Run: PYTHONPATH=scripts/oracle python scripts/oracle/ops.py
"""

import torch
import torch.nn.functional as F

from common import fresh_area, gen, randn
from common import save_sorted as save, seed_of

AREA = "ops"
F64 = torch.float64
NEG_INF = float("-inf")




def leaf(t32: torch.Tensor) -> torch.Tensor:
    """A float64 autograd leaf holding exactly the float32 values of t32."""
    return t32.to(F64).clone().requires_grad_(True)


def f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32)


def assert_finite(case: str, **ts):
    for k, t in ts.items():
        if t is None:
            continue
        assert not torch.isnan(t).any(), f"{case}: NaN in {k}"


def assert_all_finite(case: str, **ts):
    for k, t in ts.items():
        if t is None:
            continue
        assert torch.isfinite(t).all(), f"{case}: non-finite value in {k}"


# ---------------------------------------------------------------------------------------------------------------------
# softmax with optional mask
# ---------------------------------------------------------------------------------------------------------------------


def safe_softmax(s: torch.Tensor) -> torch.Tensor:
    dead = (s == NEG_INF).all(-1, keepdim=True)
    s_safe = torch.where(dead, torch.zeros((), dtype=s.dtype), s)
    return torch.where(dead, torch.zeros((), dtype=s.dtype), torch.softmax(s_safe, -1)), dead


def softmax_case(name, x32, mask_bool=None, mask_add32=None):
    g = gen(seed_of(name) + 1)
    x = leaf(x32)
    madd = leaf(mask_add32) if mask_add32 is not None else None
    if mask_bool is not None:
        s = x.masked_fill(mask_bool == 0, NEG_INF)
    elif madd is not None:
        s = x + madd
    else:
        s = x
    out, dead = safe_softmax(s)
    # reference check on the rows that are not fully masked
    alive = ~dead.expand_as(s)
    ref = torch.softmax(s.detach(), -1)
    assert torch.allclose(out.detach()[alive], ref[alive], rtol=1e-12, atol=1e-15), name
    assert (out.detach()[~alive] == 0).all(), name
    dout32 = randn(g, *out.shape)
    (out * dout32.to(F64)).sum().backward()
    assert_finite(name, out=out, dx=x.grad, dmask_add=None if madd is None else madd.grad)
    assert (x.grad[~alive] == 0).all(), name
    if madd is not None:
        assert madd.grad.shape == madd.shape
    tensors = {"x": x32, "dout": dout32, "out": f32(out), "dx": f32(x.grad)}
    if mask_bool is not None:
        tensors["mask_bool"] = mask_bool.to(torch.uint8)
    if madd is not None:
        tensors["mask_add"] = mask_add32
        tensors["dmask_add"] = f32(madd.grad)
    n_dead = int(dead.sum())
    save(AREA, name, tensors, {"dead_rows": n_dead})
    return name


def softmax_cases():
    names = []
    g = gen(1001)
    names.append(softmax_case("softmax_2d", randn(g, 5, 7) * 2))
    names.append(softmax_case("softmax_4d", randn(g, 2, 3, 4, 9) * 2))

    # boolean masks in two broadcast shapes (no dead rows)
    mb = (torch.rand(1, 1, 4, 9, generator=g) < 0.6)
    mb[..., 0] = True
    names.append(softmax_case("softmax_bool_1149", randn(g, 2, 3, 4, 9) * 2, mask_bool=mb))
    mb = (torch.rand(2, 1, 1, 9, generator=g) < 0.6)
    mb[..., 3] = True
    names.append(softmax_case("softmax_bool_2119", randn(g, 2, 3, 4, 9) * 2, mask_bool=mb))

    # additive masks: same shape as x, and a broadcast shape, both with -inf entries (no dead rows)
    ma = randn(g, 2, 3, 4, 9)
    ma[(torch.rand(2, 3, 4, 9, generator=g) < 0.3)] = NEG_INF
    ma[..., 1] = 0.5
    names.append(softmax_case("softmax_add_full", randn(g, 2, 3, 4, 9) * 2, mask_add32=ma))
    ma = randn(g, 2, 1, 4, 9)
    ma[(torch.rand(2, 1, 4, 9, generator=g) < 0.3)] = NEG_INF
    ma[..., 5] = -1.0
    names.append(softmax_case("softmax_add_2149", randn(g, 2, 3, 4, 9) * 2, mask_add32=ma))
    ma = randn(g, 1, 1, 1, 9)
    ma[..., 2] = NEG_INF
    ma[..., 7] = NEG_INF
    names.append(softmax_case("softmax_add_1119", randn(g, 2, 3, 4, 9) * 2, mask_add32=ma))

    # fully masked rows
    mb = (torch.rand(2, 1, 4, 9, generator=g) < 0.5)
    mb[..., 0] = True
    mb[0, 0, 1, :] = False
    mb[1, 0, 3, :] = False
    names.append(softmax_case("softmax_bool_dead", randn(g, 2, 3, 4, 9) * 2, mask_bool=mb))
    mb = (torch.rand(5, 7, generator=g) < 0.5)
    mb[:, 6] = True
    mb[2, :] = False
    names.append(softmax_case("softmax_bool_dead_2d", randn(g, 5, 7) * 2, mask_bool=mb))
    ma = randn(g, 1, 3, 4, 9)
    ma[(torch.rand(1, 3, 4, 9, generator=g) < 0.3)] = NEG_INF
    ma[..., 4] = 0.25
    ma[0, 0, 2, :] = NEG_INF
    ma[0, 2, 0, :] = NEG_INF
    names.append(softmax_case("softmax_add_dead", randn(g, 2, 3, 4, 9) * 2, mask_add32=ma))

    # large magnitudes (±80)
    x = (torch.rand(2, 3, 4, 9, generator=g, dtype=F64) * 160 - 80).float()
    x[0, 0, 0, :] = 80.0
    x[0, 0, 1, :] = -80.0
    x[1, 2, 3, 0] = 80.0
    x[1, 2, 3, 1:] = -80.0
    names.append(softmax_case("softmax_large", x))
    x = (torch.rand(5, 7, generator=g, dtype=F64) * 160 - 80).float()
    mb = (torch.rand(5, 7, generator=g) < 0.6)
    mb[:, 0] = True
    mb[4, :] = False
    names.append(softmax_case("softmax_large_bool", x, mask_bool=mb))
    return names


# ---------------------------------------------------------------------------------------------------------------------
# log_softmax
# ---------------------------------------------------------------------------------------------------------------------


def logsoftmax_case(name, x32):
    g = gen(seed_of(name) + 1)
    x = leaf(x32)
    out = torch.log_softmax(x, -1)
    dout32 = randn(g, *out.shape)
    (out * dout32.to(F64)).sum().backward()
    assert_all_finite(name, out=out, dx=x.grad)
    save(AREA, name, {"x": x32, "dout": dout32, "out": f32(out), "dx": f32(x.grad)})
    return name


def logsoftmax_cases():
    g = gen(2002)
    names = [
        logsoftmax_case("logsoftmax_2d", randn(g, 5, 7) * 2),
        logsoftmax_case("logsoftmax_3d", randn(g, 2, 4, 9) * 2),
    ]
    x = (torch.rand(3, 11, generator=g, dtype=F64) * 160 - 80).float()
    names.append(logsoftmax_case("logsoftmax_large", x))
    return names


# ---------------------------------------------------------------------------------------------------------------------
# cross entropy
# ---------------------------------------------------------------------------------------------------------------------


def cross_entropy_case(name, logits32, targets, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    g = gen(seed_of(name) + 1)
    logits = leaf(logits32)
    out = F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                          reduction=reduction)
    # shape () for mean / sum, (N,) for none; common.randn cannot make a 0-d tensor
    dout32 = torch.randn(tuple(out.shape), generator=g, dtype=F64).float()
    (out * dout32.to(F64)).sum().backward()
    assert_all_finite(name, out=out, dlogits=logits.grad)
    ignored = targets == ignore_index
    assert (logits.grad[ignored] == 0).all(), name
    save(AREA, name,
         {"logits": logits32, "targets": targets.to(torch.int64), "dout": dout32, "out": f32(out),
          "dlogits": f32(logits.grad)},
         {"ignore_index": int(ignore_index), "label_smoothing": float(label_smoothing), "reduction": reduction,
          "n_ignored": int(ignored.sum())})
    return name


def cross_entropy_cases():
    g = gen(3003)
    N, V = 6, 11

    def logits():
        return randn(g, N, V) * 2

    def targets():
        return torch.randint(0, V, (N,), generator=g, dtype=torch.int64)

    names = []
    names.append(cross_entropy_case("cross_entropy_mean", logits(), targets()))
    names.append(cross_entropy_case("cross_entropy_sum", logits(), targets(), reduction="sum"))
    names.append(cross_entropy_case("cross_entropy_none", logits(), targets(), reduction="none"))
    t = targets()
    t[[1, 4]] = -100
    names.append(cross_entropy_case("cross_entropy_ignore_mean", logits(), t))
    names.append(cross_entropy_case("cross_entropy_smooth_mean", logits(), targets(), label_smoothing=0.1))
    t = targets()
    t[[0, 3, 5]] = -1
    names.append(cross_entropy_case("cross_entropy_smooth_ignore_sum", logits(), t, ignore_index=-1,
                                    label_smoothing=0.1, reduction="sum"))
    t = targets()
    t[[2]] = -100
    names.append(cross_entropy_case("cross_entropy_smooth_ignore_none", logits(), t, label_smoothing=0.2,
                                    reduction="none"))
    t = targets()
    t[[0, 2]] = -100
    names.append(cross_entropy_case("cross_entropy_smooth_ignore_mean", logits(), t, label_smoothing=0.1))
    # ALL targets ignored with reduction "mean" is deliberately not a fixture: torch returns NaN (0/0) there and the
    # Rust side defines its own behaviour for it.
    return names


# ---------------------------------------------------------------------------------------------------------------------
# layer norm / rms norm
# ---------------------------------------------------------------------------------------------------------------------


def layer_norm_case(name, x32, w32, b32, eps):
    g = gen(seed_of(name) + 1)
    x, w = leaf(x32), leaf(w32)
    b = leaf(b32) if b32 is not None else None
    out = F.layer_norm(x, (x.shape[-1],), w, b, eps)
    dout32 = randn(g, *out.shape)
    (out * dout32.to(F64)).sum().backward()
    assert_all_finite(name, out=out, dx=x.grad, dweight=w.grad, dbias=None if b is None else b.grad)
    tensors = {"x": x32, "weight": w32, "dout": dout32, "out": f32(out), "dx": f32(x.grad), "dweight": f32(w.grad)}
    if b is not None:
        tensors["bias"] = b32
        tensors["dbias"] = f32(b.grad)
    save(AREA, name, tensors, {"eps": float(eps)})
    return name


def rms_norm_case(name, x32, w32, eps):
    g = gen(seed_of(name) + 1)
    x, w = leaf(x32), leaf(w32)
    out = F.rms_norm(x, (x.shape[-1],), w, eps)
    # independent check
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-13), name
    dout32 = randn(g, *out.shape)
    (out * dout32.to(F64)).sum().backward()
    assert_all_finite(name, out=out, dx=x.grad, dweight=w.grad)
    save(AREA, name, {"x": x32, "weight": w32, "dout": dout32, "out": f32(out), "dx": f32(x.grad),
                      "dweight": f32(w.grad)}, {"eps": float(eps)})
    return name


def norm_cases():
    g = gen(4004)
    names = []
    names.append(layer_norm_case("layer_norm_3d", randn(g, 2, 5, 16) * 1.5 + 0.5, 1 + 0.2 * randn(g, 16),
                                 0.2 * randn(g, 16), 1e-5))
    names.append(layer_norm_case("layer_norm_2d", randn(g, 3, 7) * 0.7 + 3.0, 1 + 0.2 * randn(g, 7),
                                 0.2 * randn(g, 7), 1e-6))
    names.append(layer_norm_case("layer_norm_nobias", randn(g, 2, 5, 16), 1 + 0.2 * randn(g, 16), None, 1e-5))
    names.append(rms_norm_case("rms_norm_3d", randn(g, 2, 5, 16) * 1.5 + 0.3, 1 + 0.2 * randn(g, 16), 1e-6))
    names.append(rms_norm_case("rms_norm_2d", randn(g, 3, 7), 1 + 0.2 * randn(g, 7), 1e-5))
    return names


# ---------------------------------------------------------------------------------------------------------------------
# gelu
# ---------------------------------------------------------------------------------------------------------------------


def gelu_case(name, x32, approximate):
    g = gen(seed_of(name) + 1)
    x = leaf(x32)
    out = F.gelu(x, approximate=approximate)
    dout32 = randn(g, *out.shape)
    (out * dout32.to(F64)).sum().backward()
    assert_all_finite(name, out=out, dx=x.grad)
    save(AREA, name, {"x": x32, "dout": dout32, "out": f32(out), "dx": f32(x.grad)}, {"approximate": approximate})
    return name


def gelu_cases():
    g = gen(5005)
    base = torch.linspace(-8, 8, 128, dtype=F64) + 0.01 * torch.randn(128, generator=g, dtype=F64)
    extra = torch.tensor([20.0, -20.0, 19.5, -19.5], dtype=F64)
    v = torch.cat([base, extra])
    v = v[torch.randperm(v.numel(), generator=g)]
    x32 = v.reshape(4, 33).float()
    return [gelu_case("gelu_tanh", x32, "tanh"), gelu_case("gelu_erf", x32, "none")]


# ---------------------------------------------------------------------------------------------------------------------
# tanh
# ---------------------------------------------------------------------------------------------------------------------


def tanh_cases():
    name = "tanh"
    g = gen(6006)
    base = torch.linspace(-6, 6, 124, dtype=F64) + 0.01 * torch.randn(124, generator=g, dtype=F64)
    v = torch.cat([base, torch.tensor([30.0, -30.0, 1e-6, -1e-6], dtype=F64)])
    x32 = v[torch.randperm(v.numel(), generator=g)].reshape(4, 32).float()
    x = leaf(x32)
    out = torch.tanh(x)
    dout32 = randn(g, *out.shape)
    (out * dout32.to(F64)).sum().backward()
    assert_all_finite(name, out=out, dx=x.grad)
    save(AREA, name, {"x": x32, "dout": dout32, "out": f32(out), "dx": f32(x.grad)}, {})
    return [name]


def main():
    fresh_area(AREA)
    names = softmax_cases() + logsoftmax_cases() + cross_entropy_cases() + norm_cases() + gelu_cases() + tanh_cases()
    print(f"ops: {len(names)} cases: " + " ".join(names))


if __name__ == "__main__":
    main()
