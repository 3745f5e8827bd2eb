"""Oracle for `attend viz`: what Hugging Face `transformers` says each layer attends to, for the tiny checkpoints that
scripts/oracle/hf.py writes under fixtures/hf/ (run that first), and the summaries computed from those weights.

  fixtures/viz/bert.safetensors   BertModel on a text pair, tokenized with its own tokenizer.json
  fixtures/viz/gpt2.safetensors   GPT2Model on a text (causal)

Each file holds `input_ids`, `token_type_ids`, `special_mask` (int64, (T,)), `attentions` (L, H, T, T) from
`output_attentions=True` on the eager attention path, and, computed here with numpy from those weights:
  * `rollout` (L, T, T): attention rollout (Abnar & Zuidema 2020, as their reference code computes it): the heads'
    mean plus the identity for the residual, rows renormalised, multiplied from the first layer up;
  * `entropy` (L, H): each head's mean over query rows of −Σ a log a (natural log, 0·log 0 = 0);
  * `distance` (L, H): each head's mean over query rows of Σ_j a_ij |i − j|;
  * `special` (L, H): each head's mean over query rows of the mass on special tokens;
  * `flow` (T, T): attention flow (Abnar & Zuidema 2020) into the last layer, with networkx's Edmonds–Karp on the
    layered graph their reference code builds: capacities from the same residual-augmented head mean as the
    rollout, row i the maximum flow from position i after the last layer to each input token, normalised.
The texts go in the metadata (`text`, `pair`) so the Rust test tokenizes the same strings.

  fixtures/viz/vit.safetensors    ViTModel of fixtures/hf/vit on a generated 40 x 24 image
  fixtures/viz/vit_image.png      that image (and vit_image.jpg, the same at JPEG quality 95, 4:4:4)
  fixtures/hf/vit/preprocessor_config.json   ViTImageProcessor resizing to the model's 16 x 16

`pixel_values` (1, 3, 16, 16) is what ViTImageProcessor makes of the PNG (PIL's bilinear resize with its antialias
when shrinking, then rescale and normalise), `pixel_values_jpeg` the same from the JPEG, `pixel_values_bicubic` with `resample=3`,
`pixel_values_small` from vit_image_small.png (its top-left 10 x 6, enlarged), `attentions` (L, H, T, T)
with T = 1 + 16 patches, and `rollout` as above.
"""
import os

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import BertModel, GPT2Model

from common import FIXTURES, save

HF = os.path.join(FIXTURES, "hf")


def summaries(att, special):
    """att (L, H, T, T) float64; special (T,) bool."""
    L, H, T, _ = att.shape
    logs = np.where(att > 0, np.log(np.where(att > 0, att, 1.0)), 0.0)
    entropy = -(att * logs).sum(-1).mean(-1)
    dist = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :])
    distance = (att * dist).sum(-1).mean(-1)
    special_mass = att[..., special].sum(-1).mean(-1)
    return entropy, distance, special_mass


def rollout(att):
    """Abnar & Zuidema's compute_joint_attention with add_residual=True, on the heads' mean."""
    mean = att.mean(1)  # (L, T, T)
    aug = mean + np.eye(mean.shape[-1])[None]
    aug = aug / aug.sum(-1, keepdims=True)
    joint = np.zeros_like(aug)
    joint[0] = aug[0]
    for i in range(1, aug.shape[0]):
        joint[i] = aug[i] @ joint[i - 1]
    return joint


def flow(att):
    """Abnar & Zuidema's get_adjmat + compute_flows, for the nodes of the last layer only."""
    import networkx as nx
    mean = att.mean(1)
    aug = mean + np.eye(mean.shape[-1])[None]
    aug = aug / aug.sum(-1, keepdims=True)
    L, T, _ = aug.shape
    g = nx.DiGraph()
    for l in range(1, L + 1):
        for i in range(T):
            for j in range(T):
                if aug[l - 1, i, j] > 0:
                    g.add_edge(l * T + i, (l - 1) * T + j, capacity=float(aug[l - 1, i, j]))
    out = np.zeros((T, T))
    for i in range(T):
        for j in range(T):
            out[i, j] = nx.maximum_flow_value(g, L * T + i, j, flow_func=nx.algorithms.flow.edmonds_karp)
        out[i] /= out[i].sum()
    return out


def case(name, cls, text, pair=None):
    d = os.path.join(HF, name)
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
    ids = torch.tensor([enc.ids])
    tt = torch.tensor([enc.type_ids])
    model = cls.from_pretrained(d, attn_implementation="eager").eval()
    with torch.no_grad():
        kw = {"token_type_ids": tt} if cls is BertModel else {}
        out = model(input_ids=ids, output_attentions=True, **kw)
    att = torch.stack([a[0] for a in out.attentions]).double()  # (L, H, T, T)
    special = np.array([bool(m) for m in enc.special_tokens_mask])
    a = att.numpy()
    entropy, distance, special_mass = summaries(a, special)
    meta = {"text": text}
    if pair is not None:
        meta["pair"] = pair
    save("viz", name, {
        "input_ids": ids[0].long(),
        "token_type_ids": tt[0].long(),
        "special_mask": torch.tensor(enc.special_tokens_mask).long(),
        "attentions": att.float(),
        "rollout": torch.from_numpy(rollout(a)).float(),
        "flow": torch.from_numpy(flow(a)).float(),
        "entropy": torch.from_numpy(entropy).float(),
        "distance": torch.from_numpy(distance).float(),
        "special": torch.from_numpy(special_mass).float(),
    }, meta)
    print(f"viz/{name}: T = {len(enc.ids)}, layers {att.shape[0]}, heads {att.shape[1]}")


def vit_image():
    from PIL import Image
    from transformers import ViTImageProcessor, ViTModel
    d = os.path.join(HF, "vit")
    out = os.path.join(FIXTURES, "viz")
    os.makedirs(out, exist_ok=True)
    # A picture with structure in both directions (colour ramps, a checkerboard) and some noise; wider than tall, so
    # the resize shrinks the two axes by different factors.
    h, w = 24, 40
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), ((xx // 5 + yy // 4) % 2) * 200 + 30], -1)
    img = (img + np.random.default_rng(7).integers(-20, 21, img.shape)).clip(0, 255).astype(np.uint8)
    png, jpg = os.path.join(out, "vit_image.png"), os.path.join(out, "vit_image.jpg")
    Image.fromarray(img).save(png)
    Image.fromarray(img).save(jpg, quality=95, subsampling=0)
    proc = ViTImageProcessor(size={"height": 16, "width": 16})
    proc.save_pretrained(d)
    px = proc(images=Image.open(png).convert("RGB"), return_tensors="pt").pixel_values
    pxj = proc(images=Image.open(jpg).convert("RGB"), return_tensors="pt").pixel_values
    # The other resize paths: bicubic shrinking, and bilinear enlarging of a 10 x 6 crop of the picture.
    bicubic = ViTImageProcessor(size={"height": 16, "width": 16}, resample=3)
    pxc = bicubic(images=Image.open(png).convert("RGB"), return_tensors="pt").pixel_values
    small = os.path.join(out, "vit_image_small.png")
    Image.fromarray(img[:6, :10]).save(small)
    pxu = proc(images=Image.open(small).convert("RGB"), return_tensors="pt").pixel_values
    model = ViTModel.from_pretrained(d, attn_implementation="eager", add_pooling_layer=False).eval()
    with torch.no_grad():
        o = model(pixel_values=px, output_attentions=True)
    att = torch.stack([a[0] for a in o.attentions]).double()
    save("viz", "vit", {
        "pixel_values": px,
        "pixel_values_jpeg": pxj,
        "pixel_values_bicubic": pxc,
        "pixel_values_small": pxu,
        "attentions": att.float(),
        "rollout": torch.from_numpy(rollout(att.numpy())).float(),
    }, {"image": "vit_image.png"})
    print(f"viz/vit: pixel_values {tuple(px.shape)}, attentions {tuple(att.shape)}")


if __name__ == "__main__":
    torch.manual_seed(0)
    case("bert", BertModel, "the quick brown fox jumps over the lazy dog", "a lazy dog sleeps")
    case("gpt2", GPT2Model, "the quick brown fox jumps over the lazy dog")
    vit_image()
