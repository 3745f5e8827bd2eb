"""The round trip of attend's Hugging Face writers: `cargo run --example save_hf` writes tiny attend models under
fixtures/hf_saved/<name>/ (GPT-2, BERT masked-LM, BERT sequence classifier, ViT, T5); `transformers` loads each with
`from_pretrained` — strictly: a missing, unexpected or mismatched tensor is an error here — and writes what it
computes on fixed inputs to fixtures/hf_roundtrip/<name>.safetensors. tests/hf_roundtrip.rs checks that attend
computes the same from the same directories. Run: bash scripts/gen_fixtures.sh hf_roundtrip
"""
import os
import subprocess

import torch
from transformers import (BertForMaskedLM, BertForSequenceClassification, GPT2LMHeadModel,
                          T5ForConditionalGeneration, ViTForImageClassification)

from common import FIXTURES, ROOT, fresh_area, save_sorted

SAVED = os.path.join(FIXTURES, "hf_saved")
subprocess.run(["cargo", "run", "-q", "--release", "-p", "attend", "--example", "save_hf", "--", SAVED], cwd=ROOT,
               check=True)


def strict(cls, name):
    model, info = cls.from_pretrained(os.path.join(SAVED, name), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs" or (k == "error_msgs" and v)}
    # Tied weights transformers re-ties itself are reported missing; anything else is a layout error.
    bad.get("missing_keys", set()).difference_update(
        {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"})
    assert not any(bad.values()), f"{name}: {bad}"
    return model.eval()


fresh_area("hf_roundtrip")
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 97, (2, 9), generator=g)
mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
with torch.no_grad():
    gpt = strict(GPT2LMHeadModel, "gpt2")
    save_sorted("hf_roundtrip", "gpt2", {"input_ids": ids, "attention_mask": mask,
                                         "logits": gpt(input_ids=ids, attention_mask=mask).logits}, {})
    mlm = strict(BertForMaskedLM, "bert-mlm")
    save_sorted("hf_roundtrip", "bert-mlm", {"input_ids": ids, "attention_mask": mask,
                                             "logits": mlm(input_ids=ids, attention_mask=mask).logits}, {})
    cls = strict(BertForSequenceClassification, "bert-cls")
    save_sorted("hf_roundtrip", "bert-cls", {"input_ids": ids, "attention_mask": mask,
                                             "logits": cls(input_ids=ids, attention_mask=mask).logits}, {})
    vit = strict(ViTForImageClassification, "vit")
    pixels = torch.randn(2, 3, 8, 8, generator=g)
    save_sorted("hf_roundtrip", "vit", {"pixel_values": pixels, "logits": vit(pixel_values=pixels).logits}, {})
    t5 = strict(T5ForConditionalGeneration, "t5")
    dec = torch.randint(0, 97, (2, 5), generator=g)
    dec[:, 0] = 0
    o = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    save_sorted("hf_roundtrip", "t5", {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
                                       "logits": o.logits}, {})
print("hf_roundtrip: transformers loaded gpt2, bert-mlm, bert-cls, vit, t5 written by attend")
