#!/usr/bin/env bash
# Fused attention against PyTorch's F.scaled_dot_product_attention, measured one after the other in one go on this
# machine, printed as a markdown table of GFLOP/s and their ratio (attend / PyTorch).
#
# Usage: scripts/bench_attention.sh [--quick] [--seqs "1024 2048 4096"] [--dims "64 128"] [--threads N]
#                                   [--iters N] [--impl fused|materialized|reference]
#
#   default matrix: T = S ∈ {1024, 2048, 4096} × D ∈ {64, 128} × {non-causal, causal} × {fwd, fwd+bwd}, f32,
#                   plus bf16 fwd at T = 2048 (both masks, each D); B = 1, H = 8, 2 threads
#   --quick         T = 1024 only, f32 (a smoke run)
#   --rounds N      run every row N times, PyTorch and attend alternately, and keep each side's best median: on a
#                   shared or virtual machine, interference only ever slows a run down
#
# Environment:
#   ATTEND_TORCH_PYTHON  python with torch (default: python3), e.g. /work/venv-oracle/bin/python
#   ATTEND_BIN           a built attend binary; default: `cargo run --release -p attend-cli` (built first)
#   ATTEND_BENCH_JSON    if set, every raw JSON line (both sides) is also appended to this file
#   (allocator)          the attend binary keeps freed memory in the process (mallopt at start-up), as PyTorch's
#                        caching allocator does; the `faults/iter` column shows page faults per timed iteration
#
# The ratio is PyTorch's median time over attend's (the same work on both sides). GF/s columns use each side's
# count: PyTorch's halves T² for causal, attend counts the T(T+1)/2 visible pairs (4·B·H·D each, ×3.5 with the
# backward); both use the median of the timed iterations; PyTorch times `sdpa` forward and `sdpa` + `torch.autograd.grad(o, (q, k, v), do)`
# as /work/shared/bench/torch_anchor.py does. The rows are run alternately (PyTorch, then attend, for each row), so
# drift on the machine hits both sides alike.
set -euo pipefail

seqs="1024 2048 4096"
dims="64 128"
threads=2
iters=5
warmup=2
impl=fused
quick=0
rounds=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1; seqs="1024"; shift ;;
        --seqs) seqs="$2"; shift 2 ;;
        --dims) dims="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --iters) iters="$2"; shift 2 ;;
        --impl) impl="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "error: unknown argument \`$1\` (try --help)" >&2; exit 2 ;;
    esac
done

root="$(cd "$(dirname "$0")/.." && pwd)"
python="${ATTEND_TORCH_PYTHON:-python3}"
b=1
h=8

if ! "$python" -c "import torch" 2>/dev/null; then
    echo "error: \`$python\` cannot import torch; set ATTEND_TORCH_PYTHON (e.g. /work/venv-oracle/bin/python)" >&2
    exit 1
fi

if [[ -n "${ATTEND_BIN:-}" ]]; then
    attend=("$ATTEND_BIN")
else
    (cd "$root" && cargo build --release -q -p attend-cli)
    attend=(cargo run --release -q --manifest-path "$root/Cargo.toml" -p attend-cli --)
fi

# One SDPA row in PyTorch, printed as one JSON line; the same timing as torch_anchor.py (warmup, then the upper
# median of `iters` timed calls), with an explicit thread count.
torch_row() { # seq dim causal(0|1) backward(0|1) dtype
    "$python" - "$@" "$threads" "$iters" "$warmup" "$b" "$h" <<'PY'
import json, sys, time
import torch
import torch.nn.functional as F

s, d, causal, backward, dtype, threads, iters, warmup, b, h = sys.argv[1:]
s, d, threads, iters, warmup, b, h = map(int, (s, d, threads, iters, warmup, b, h))
causal, backward = causal == "1", backward == "1"
torch.set_num_threads(threads)
torch.manual_seed(0)
dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
q, k, v = (torch.randn(b, h, s, d, dtype=dt) for _ in range(3))
if backward:
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    go = torch.randn(b, h, s, d, dtype=dt)
    def fn():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.autograd.grad(o, (q, k, v), go)
else:
    def fn():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
for _ in range(warmup):
    fn()
ts = []
for _ in range(iters):
    t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
ts.sort()
med = ts[len(ts) // 2]
flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)
print(json.dumps({"impl": "torch-sdpa", "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "seq": s, "head_dim": d, "causal": causal, "backward": backward, "dtype": dtype,
                  "median_ms": med * 1e3, "gflops": flops / med / 1e9}))
PY
}

attend_row() { # seq dim causal(0|1) backward(0|1) dtype
    local flags=(--batch "$b" --heads "$h" --seq "$1" --head-dim "$2" --dtype "$5" --impl "$impl"
        --threads "$threads" --warmup "$warmup" --iters "$iters" --json)
    [[ "$3" == 1 ]] && flags+=(--causal)
    [[ "$4" == 1 ]] && flags+=(--backward)
    "${attend[@]}" bench attention "${flags[@]}"
}

# The JSON line with the smaller median_ms (the first argument may be empty).
best() {
    "$python" - "$1" "$2" <<'PY'
import json, sys
a, b = sys.argv[1], sys.argv[2]
print(b if not a or json.loads(b)["median_ms"] < json.loads(a)["median_ms"] else a)
PY
}

rows=()
for s in $seqs; do
    for d in $dims; do
        for causal in 0 1; do
            for backward in 0 1; do
                rows+=("$s $d $causal $backward f32")
            done
        done
    done
done
if [[ $quick == 0 ]]; then
    for d in $dims; do
        for causal in 0 1; do
            rows+=("2048 $d $causal 0 bf16")
        done
    done
fi

cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//' || true)"
echo "attend $impl vs PyTorch SDPA: B=$b H=$h, $threads threads, median of $iters after $warmup warmup (best of $rounds rounds); ${cpu:-unknown CPU}"
echo
echo "| T = S | D | mask | pass | dtype | attend GF/s | PyTorch GF/s | ratio | attend ms | PyTorch ms | attend peak RSS MB | attend faults/iter |"
echo "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
for row in "${rows[@]}"; do
    read -r s d causal backward dtype <<<"$row"
    t_json="" a_json=""
    for ((round = 0; round < rounds; round++)); do
        t_new="$(torch_row "$s" "$d" "$causal" "$backward" "$dtype")"
        a_new="$(attend_row "$s" "$d" "$causal" "$backward" "$dtype")"
        t_json="$(best "$t_json" "$t_new")"
        a_json="$(best "$a_json" "$a_new")"
    done
    if [[ -n "${ATTEND_BENCH_JSON:-}" ]]; then
        printf '%s\n%s\n' "$t_json" "$a_json" >>"$ATTEND_BENCH_JSON"
    fi
    "$python" - "$row" "$t_json" "$a_json" <<'PY'
import json, sys
s, d, causal, backward, dtype = sys.argv[1].split()
t, a = json.loads(sys.argv[2]), json.loads(sys.argv[3])
mask = "causal" if causal == "1" else "none"
pas = "fwd+bwd" if backward == "1" else "fwd"
print(f"| {s} | {d} | {mask} | {pas} | {dtype} | {a['gflops']:.1f} | {t['gflops']:.1f} | "
      f"{t['median_ms'] / a['median_ms']:.2f}× | {a['median_ms']:.2f} | {t['median_ms']:.2f} | {a['peak_rss_mb']:.0f} | {a['page_faults_per_iter']:.0f} |")
PY
done
