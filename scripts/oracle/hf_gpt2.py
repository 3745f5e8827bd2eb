"""Oracle for attend's GPT-2 loader: a tiny randomly initialised GPT2LMHeadModel (with a byte-level BPE tokenizer
trained here on generated text) saved as a Hugging Face directory under fixtures/hf/gpt2/, and what transformers
computes with it in fixtures/hf_ref/gpt2.safetensors: logits and hidden states with right and left padding, the
training loss and every parameter's gradient, greedy generation (single and left-padded batch), and a text prompt.
Nothing is downloaded. Run: bash scripts/gen_fixtures.sh hf_gpt2
"""
import json
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from common import FIXTURES, save

OUT = os.path.join(FIXTURES, "hf", "gpt2")
WORDS = ("the a cat dog sat on mat runs fast slow red blue green house tree river stone light dark "
         "over under near far old young small large quick lazy jumps sleeps eats reads writes").split()


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(n)]


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = tokenizer()
    eos = tok.token_to_id("<|endoftext|>")
    tok.save(os.path.join(OUT, "tokenizer.json"))
    GPT2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                      unk_token="<|endoftext|>").save_pretrained(OUT)
    os.replace(os.path.join(OUT, "tokenizer.json"), os.path.join(OUT, "tokenizer.json"))
    V = tok.get_vocab_size()
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new",
                     bos_token_id=eos, eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    perturb(model, 1)
    model.save_pretrained(OUT, safe_serialization=True)

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    ids[1, 4:] = eos
    mask[1, 4:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        hidden = model.transformer(ids, attention_mask=mask).last_hidden_state
    left_ids = torch.randint(0, V, (2, 7), generator=g)
    left_mask = torch.ones(2, 7, dtype=torch.long)
    left_ids[1, :3] = eos
    left_mask[1, :3] = 0
    left_pos = (left_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        left_logits = model(left_ids, attention_mask=left_mask, position_ids=left_pos).logits

    # Training: loss and the gradient of every parameter (the tied head appears once, as transformer.wte.weight).
    train_ids = torch.randint(0, V, (2, 9), generator=g)
    model.train()
    model.zero_grad()
    loss = model(train_ids, labels=train_ids).loss
    loss.backward()
    grads = {"grad." + n: p.grad for n, p in model.named_parameters()}
    model.eval()

    # Greedy generation: ids that run at least 8 new tokens before any eos.
    def greedy(prompt, attention_mask=None, new=12):
        with torch.no_grad():
            return model.generate(prompt, attention_mask=attention_mask, do_sample=False, max_new_tokens=new,
                                  pad_token_id=eos)
    for seed in range(100):
        gp = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(100 + seed))
        gen = greedy(gp)
        if eos not in gen[0, 5:13].tolist():
            break
    bp = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(7))
    bmask = torch.ones(2, 6, dtype=torch.long)
    bp[1, :2] = eos
    bmask[1, :2] = 0
    bgen = greedy(bp, bmask)

    prompt = "the quick dog jumps over"
    pids = tok.encode(prompt).ids
    tgen = greedy(torch.tensor([pids]), new=10)[0].tolist()

    save("hf_ref", "gpt2", {
        "input_ids": ids, "attention_mask": mask, "logits": logits, "last_hidden_state": hidden,
        "left_input_ids": left_ids, "left_attention_mask": left_mask, "left_position_ids": left_pos,
        "left_logits": left_logits, "train_ids": train_ids, "loss": loss.detach(), **grads,
        "gen_prompt_ids": gp, "gen_ids": gen, "gen_batch_prompt_ids": bp, "gen_batch_attention_mask": bmask,
        "gen_batch_ids": bgen,
    }, {"eos_token_id": str(eos), "prompt": prompt, "prompt_ids": json.dumps(pids),
        "gen_text_ids": json.dumps(tgen), "gen_text": tok.decode(tgen, skip_special_tokens=False)})


if __name__ == "__main__":
    main()
