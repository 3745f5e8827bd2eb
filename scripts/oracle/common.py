"""Shared helpers for the PyTorch oracle: every generator writes small safetensors fixtures under fixtures/.

Run everything with `bash scripts/gen_fixtures.sh` (it makes a venv and installs torch from PyPI).
Conventions (read by crates/attend/tests/common/mod.rs):
  * one file per case: fixtures/<area>/<case>.safetensors
  * inputs are named as the Rust API names them; outputs `out`, `lse`, ...; gradients `d<name>`
  * the upstream gradient of an output `out` is stored as `dout` (the loss is sum(out * dout))
  * scalar / integer settings go in the safetensors metadata (string -> string), e.g. {"scale": "0.125"}
  * f32 unless the case is about another dtype; integer index tensors are int64
"""
import os
import json
import struct
import zlib
import torch
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "fixtures")

torch.set_num_threads(2)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    return g


def randn(g, *shape, dtype=torch.float32, requires_grad=False):
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if requires_grad:
        t.requires_grad_(True)
    return t


def save(area: str, case: str, tensors: dict, meta: dict | None = None):
    """Write fixtures/<area>/<case>.safetensors; tensors are detached and made contiguous."""
    d = os.path.join(FIXTURES, area)
    os.makedirs(d, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().contiguous().clone()
        else:
            raise TypeError(f"{case}: {k} is not a tensor")
    md = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (meta or {}).items()}
    md["torch"] = torch.__version__
    save_file(out, os.path.join(d, case + ".safetensors"), metadata=md)


def grads(names_and_tensors: dict) -> dict:
    """{name: leaf} -> {"d"+name: leaf.grad} for leaves that received a gradient."""
    return {"d" + k: v.grad for k, v in names_and_tensors.items() if v.grad is not None}


def fresh_area(area: str) -> str:
    """Make fixtures/<area>/ and delete its *.safetensors, so cases dropped from a script do not linger."""
    d = os.path.join(FIXTURES, area)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(d, f))
    return d


def write_readme(area: str, title: str, blurb: str, cases: list):
    """fixtures/<area>/README.md: a title, a paragraph, and one line per (name, description) case."""
    names = [n for n, _ in cases]
    assert len(names) == len(set(names)), f"{area}: duplicate case names"
    with open(os.path.join(FIXTURES, area, "README.md"), "w") as fh:
        fh.write(f"# {title}\n\n{blurb}\n\n")
        for n, desc in cases:
            fh.write(f"- `{n}`: {desc}\n")
    print(f"{area}: {len(names)} cases: " + " ".join(names))


def save_sorted(area: str, case: str, tensors: dict, meta: dict | None = None):
    """save, then the header's metadata keys sorted: safetensors writes them in hash order, and sorting them makes
    regeneration byte-for-byte reproducible (same length, so tensor offsets are unchanged)."""
    save(area, case, tensors, meta)
    path = os.path.join(FIXTURES, area, case + ".safetensors")
    with open(path, "rb") as fh:
        raw = fh.read()
    n = struct.unpack("<Q", raw[:8])[0]
    text = raw[8:8 + n].decode("utf-8")
    header = json.loads(text)
    if json.dumps(header, separators=(",", ":"), ensure_ascii=False) != text.rstrip(" "):
        return  # unexpected formatting: leave the file as safetensors wrote it
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8").ljust(n, b" ")
    assert len(new) == n
    with open(path, "wb") as fh:
        fh.write(raw[:8] + new + raw[8 + n:])


def seed_of(name: str) -> int:
    """A case's seed: its name's CRC-32, so adding a case changes no other case's numbers."""
    return zlib.crc32(name.encode())
