"""Oracle for attend's sentence pooling (layers/pooling.rs): sentence-transformers' own `Pooling` module on random
token states with right-, left- and no padding.

fixtures/pooling/<mode>.safetensors: `hidden (B, T, C)`, `mask (B, T)` int64, `out (B, k·C)`, `dout` and `dhidden`
(the gradient of sum(out * dout)); metadata `modes` (a JSON list, in the order given). Run:
bash scripts/gen_fixtures.sh pooling
"""
import torch
from sentence_transformers.sentence_transformer.modules import Pooling

from common import fresh_area, gen, randn, save

B, T, C = 4, 6, 5
# Rows: full, right-padded (4 real), left-padded (3 real), one real token in the middle of padding.
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 0, 0]])
CASES = {
    "cls": ["cls"], "max": ["max"], "mean": ["mean"], "mean_sqrt_len_tokens": ["mean_sqrt_len_tokens"],
    "weightedmean": ["weightedmean"], "lasttoken": ["lasttoken"],
    # Several modes concatenate in the order given (not a fixed order).
    "combo": ["mean", "cls", "max"],
}

fresh_area("pooling")
for i, (case, modes) in enumerate(CASES.items()):
    g = gen(100 + i)
    hidden = randn(g, B, T, C, requires_grad=True)
    pool = Pooling(C, pooling_mode=modes if len(modes) > 1 else modes[0])
    out = pool({"token_embeddings": hidden, "attention_mask": MASK})["sentence_embedding"]
    dout = randn(g, *out.shape)
    (out * dout).sum().backward()
    save("pooling", case, {"hidden": hidden, "mask": MASK, "out": out, "dout": dout, "dhidden": hidden.grad},
         {"modes": modes})
    print(f"pooling {case}: out {tuple(out.shape)}")
