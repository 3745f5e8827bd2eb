#!/usr/bin/env python3
"""LSTM, GRU and GAT of attend against PyTorch's nn.LSTM / nn.GRU and PyTorch Geometric's GATConv / GATv2Conv,
measured alternately on this machine and printed as a markdown table of median milliseconds and their ratio
(PyTorch time / attend time: above 1 means attend is faster).

Usage: scripts/.venv/bin/python scripts/bench_classic.py [--rounds 3] [--threads 2] [--attend target/release/attend]
       [--only lstm|gru|gat ...]

Shapes (those of the shared anchor /work/shared/bench/torch_rnn_anchor.py): LSTM and GRU with B 32, T 64, C 256,
H 256, forward and forward+backward (loss = sum of the outputs); GAT on 10^4 nodes and 2*10^5 uniform random edges,
64 input features, 8 heads of 8, forward and forward+backward. Each row runs `--rounds` times, PyTorch then attend,
and keeps each side's best median: on a shared or virtual machine interference only ever slows a run down.
Needs torch and torch_geometric (`pip install -r scripts/oracle/requirements.txt`).
"""
import argparse, json, subprocess, sys, time

import torch
import torch.nn as nn


def timed(f, warm=3, n=7):
    for _ in range(warm):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def torch_rnn(kind, backward, B=32, T=64, C=256, H=256):
    m = (nn.LSTM if kind == "lstm" else nn.GRU)(C, H, batch_first=True)
    x = torch.randn(B, T, C, requires_grad=backward)

    if not backward:
        with torch.no_grad():
            return timed(lambda: m(x))

    def f():
        y, _ = m(x)
        y.sum().backward()
    return timed(f)


def torch_gat(v2, backward, N=10_000, E=200_000, F=64, heads=8, out=8):
    from torch_geometric.nn import GATConv, GATv2Conv
    m = (GATv2Conv if v2 else GATConv)(F, out, heads=heads)
    x = torch.randn(N, F, requires_grad=backward)
    ei = torch.randint(0, N, (2, E))
    if not backward:
        with torch.no_grad():
            return timed(lambda: m(x, ei))
    return timed(lambda: m(x, ei).sum().backward())


def attend(binary, args):
    out = subprocess.run([binary, "bench", *args, "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attend", default="target/release/attend")
    ap.add_argument("--only", choices=["lstm", "gru", "gat"], action="append", help="rows to run (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t = ["--threads", str(a.threads)]
    rows = []
    for kind in ["lstm", "gru"]:
        for bwd in [False, True]:
            rows.append((f"{kind} B32 T64 C256 H256 {'fwd+bwd' if bwd else 'fwd'}",
                         lambda kind=kind, bwd=bwd: torch_rnn(kind, bwd),
                         [kind, *t, *(["--backward"] if bwd else [])]))
    for v2 in [False, True]:
        for bwd in [False, True]:
            rows.append((f"{'gatv2' if v2 else 'gat'} N1e4 E2e5 64→8×8 {'fwd+bwd' if bwd else 'fwd'}",
                         lambda v2=v2, bwd=bwd: torch_gat(v2, bwd),
                         ["gat", *t, *(["--v2"] if v2 else []), *(["--backward"] if bwd else [])]))
    cpu = None
    print("| shape | PyTorch ms | attend ms | ratio (PyTorch / attend) |")
    print("|---|---:|---:|---:|")
    if a.only:
        rows = [r for r in rows if r[2][0] in a.only]
    for name, torch_f, args in rows:
        tb, ab = float("inf"), float("inf")
        for _ in range(a.rounds):
            tb = min(tb, torch_f())
            r = attend(a.attend, args)
            ab = min(ab, r["median_ms"])
            cpu = r["cpu"]
        print(f"| {name} | {tb:.1f} | {ab:.1f} | {tb / ab:.2f}× |", flush=True)
    print(f"\nCPU: {cpu['name']} ({cpu['microarchitecture'] or cpu['vendor']}, family {cpu['family']} model {cpu['model']}),"
          f" {a.threads} threads, torch {torch.__version__}, best of {a.rounds} rounds", file=sys.stderr)


if __name__ == "__main__":
    main()
