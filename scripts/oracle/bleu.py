"""sacreBLEU oracle for `attend train`'s corpus BLEU-4 (crates/attend-cli/src/train/metrics.rs):
fixtures/train/bleu.json holds token-id corpora and sacreBLEU's score of each (tokenize="none" on the ids joined by
spaces, smooth_method="none", one reference per sentence), as a fraction in [0, 1].

Run: scripts/.venv/bin/pip install sacrebleu && scripts/.venv/bin/python scripts/oracle/bleu.py
"""
import json
import os
import random

import sacrebleu

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def corpus(rng, n, vocab, noise):
    hyps, refs = [], []
    for _ in range(n):
        ref = [rng.randrange(vocab) for _ in range(rng.randint(4, 14))]
        hyp = [t if rng.random() > noise else rng.randrange(vocab) for t in ref]
        if rng.random() < 0.3:
            hyp = hyp[: max(1, len(hyp) - rng.randint(1, 3))]  # shorter: the brevity penalty
        elif rng.random() < 0.2:
            hyp = hyp + [rng.randrange(vocab)]
        hyps.append(hyp)
        refs.append(ref)
    return hyps, refs


def main():
    rng = random.Random(2026)
    cases = []
    for n, vocab, noise in [(20, 10, 0.1), (40, 30, 0.3), (15, 5, 0.5), (30, 50, 0.05)]:
        hyps, refs = corpus(rng, n, vocab, noise)
        s = sacrebleu.corpus_bleu(
            [" ".join(map(str, h)) for h in hyps],
            [[" ".join(map(str, r)) for r in refs]],
            tokenize="none",
            smooth_method="none",
        )
        cases.append({"hyps": hyps, "refs": refs, "bleu": s.score / 100.0})
    out = os.path.join(ROOT, "fixtures", "train")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bleu.json"), "w") as f:
        json.dump({"sacrebleu": sacrebleu.__version__, "cases": cases}, f)
    print("bleu:", [round(c["bleu"], 4) for c in cases])


if __name__ == "__main__":
    main()
