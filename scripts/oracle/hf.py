"""Oracle for attend's Hugging Face loaders: tiny randomly initialised checkpoints saved with `save_pretrained` under
fixtures/hf/<name>/ and what `transformers` (and `sentence-transformers`) compute with them in
fixtures/hf_ref/<name>.safetensors.

  gpt2      GPT2LMHeadModel + byte-level BPE tokenizer trained here: logits and hidden states (right padding), left
            padding with position ids, training loss and every gradient, greedy generate (single, left-padded batch,
            from text)
  bert      BertModel + WordPiece tokenizer trained here: last_hidden_state, pooler_output (a pair and a padded row)
  bert-mlm  BertForMaskedLM, same tokenizer and inputs: mlm_logits
  st-bert   SentenceTransformer(Transformer(bert, max_seq_length=16), mean Pooling, Normalize): embeddings
  t5        T5ForConditionalGeneration (gated-gelu, untied head): logits, encoder states, greedy generate
  vit       ViTForImageClassification: logits, last_hidden_state

Nothing is downloaded: configs are built in code, tokenizers are trained on text generated from a seeded word list.
Every LayerNorm / RMSNorm parameter and every bias is perturbed with seeded noise, so a loader that skips one fails.
initializer_range is 0.3 (not 0.02) for GPT-2, BERT and ViT, so attention is far from uniform and greedy
generation depends on the context. The script reloads every directory with from_pretrained and checks it
reproduces its reference. Run: bash scripts/gen_fixtures.sh hf
"""
import json
import os
import random
import shutil
import sys
from collections import Counter

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast, GPT2Config,
                          GPT2LMHeadModel, GPT2TokenizerFast, T5Config, T5ForConditionalGeneration, ViTConfig,
                          ViTForImageClassification)

from common import FIXTURES, fresh_area, save_sorted

HF = os.path.join(FIXTURES, "hf")
INIT = 0.3  # initializer_range for GPT-2, BERT, ViT
EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4

# GPT-2's corpus: whole words only (byte-level BPE learns ~43 merges on top of the 256 bytes + <|endoftext|>).
WORDS = ("the a cat dog sat on mat runs fast slow red blue green house tree river stone light dark "
         "over under near far old young small large quick lazy jumps sleeps eats reads writes").split()
# BERT's corpus: stems with suffixes, so WordPiece keeps ## pieces (and does not saturate below 300).
STEMS = ("walk jump play talk look read writ build find keep sing swim fly paint open close turn start help call "
         "move rest wait watch learn teach bright quiet loud warm cold soft hard slow quick dark light green").split()
SUFFIXES = ["", "", "s", "ed", "ing", "er", "ly", "ness"]
NOUNS = ("cat dog bird fish horse mouse garden window door table chair paper book letter song road city village "
         "mountain forest field flower river stone tree house").split()


def fresh_dir(name):
    d = os.path.join(HF, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def lines(words, n=400, seed=0, commas=False):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(4, 12))]
        if commas and rng.random() < 0.3:
            ws[rng.randrange(len(ws) - 1)] += ","
        out.append(" ".join(ws) + ".")
    return out


def bert_words():
    rng = random.Random(1)
    return ["the", "a", "on", "under", "near", "and", "of"] + NOUNS + sorted(
        {rng.choice(STEMS) + rng.choice(SUFFIXES) for _ in range(300)})


def perturb(model, seed, scale=0.1):
    """Add seeded noise to every normalisation parameter and every bias (tied parameters once)."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or id(p) in norms:
                p.add_(scale * torch.randn(p.shape, generator=g))


def randint(g, lo, hi, *shape):
    return torch.randint(lo, hi, shape, generator=g)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def expect_close(label, got, want, tol=1e-6):
    d = maxdiff(got, want)
    assert d <= tol, f"{label}: max abs diff {d}"


# ---------------------------------------------------------------- GPT-2

def bpe_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines(WORDS), trainer)
    return tok


def printable(text):
    return all(32 <= ord(c) < 127 for c in text)


def gpt2():
    out = fresh_dir("gpt2")
    tok = bpe_tokenizer()
    eos = tok.token_to_id(EOT)
    V = tok.get_vocab_size()
    hf_tok = GPT2TokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, unk_token=EOT)
    hf_tok.save_pretrained(out)
    tok.save(os.path.join(out, "tokenizer.json"))  # the trained tokenizer itself, as tokenizers writes it

    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, activation_function="gelu_new",
                     bos_token_id=eos, eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     initializer_range=INIT)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    perturb(model, 1)
    model.save_pretrained(out, safe_serialization=True)

    g = torch.Generator().manual_seed(2)
    # Right padding: row 1 has 4 real tokens, then eos as padding under mask 0.
    ids = randint(g, 1, V, 2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    ids[1, 4:] = eos
    mask[1, 4:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        hidden = model.transformer(ids, attention_mask=mask).last_hidden_state
    # Left padding: row 1 has 3 pads, then 4 real tokens; positions as generate computes them.
    left_ids = randint(g, 1, V, 2, 7)
    left_mask = torch.ones(2, 7, dtype=torch.long)
    left_ids[1, :3] = eos
    left_mask[1, :3] = 0
    left_pos = (left_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        left_logits = model(left_ids, attention_mask=left_mask, position_ids=left_pos).logits

    # Training (dropouts are 0): loss and every parameter's gradient; the tied head is transformer.wte.weight.
    train_ids = randint(g, 0, V, 2, 9)
    model.train()
    model.zero_grad()
    loss = model(train_ids, labels=train_ids).loss
    loss.backward()
    grads = {"grad." + n: p.grad for n, p in model.named_parameters()}
    assert all(v is not None for v in grads.values())
    model.eval()
    model.zero_grad(set_to_none=True)

    def greedy(prompt, attention_mask, new):
        with torch.no_grad():
            return model.generate(prompt, attention_mask=attention_mask, do_sample=False, max_new_tokens=new,
                                  pad_token_id=eos)

    def good(new_ids):  # no eos (so nothing is padded and a stop-on-eos decoder runs the same) and not one repeat
        return eos not in new_ids and len(set(new_ids)) >= 4

    # Greedy generation from ids: the first seed whose 12 new tokens are good.
    for s in range(1000):
        gp = randint(torch.Generator().manual_seed(100 + s), 1, V, 1, 5)
        gen = greedy(gp, torch.ones_like(gp), 12)
        if good(gen[0, 5:].tolist()):
            break
    else:
        raise RuntimeError("no good single prompt")
    # Left-padded batch (as a padding_side="left" tokenizer pads, pad = eos): row 1 has 2 pads.
    for s in range(1000):
        bp = randint(torch.Generator().manual_seed(2000 + s), 1, V, 2, 6)
        bmask = torch.ones(2, 6, dtype=torch.long)
        bp[1, :2] = eos
        bmask[1, :2] = 0
        bgen = greedy(bp, bmask, 12)
        if all(good(bgen[r, 6:].tolist()) for r in range(2)):
            break
    else:
        raise RuntimeError("no good batch prompt")

    # Text: the first prompt whose greedy continuation is good and decodes to printable ASCII.
    rng = random.Random(3)
    candidates = ["the quick dog jumps over"] + [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(5000)]
    for prompt in candidates:
        pids = tok.encode(prompt).ids
        tgen = greedy(torch.tensor([pids]), torch.ones(1, len(pids), dtype=torch.long), 10)[0].tolist()
        text = tok.decode(tgen, skip_special_tokens=False)
        if good(tgen[len(pids):]) and printable(text):
            break
    else:
        raise RuntimeError("no good text prompt")
    assert hf_tok(prompt)["input_ids"] == pids
    assert hf_tok.decode(tgen) == text, (hf_tok.decode(tgen), text)

    save_sorted("hf_ref", "gpt2", {
        "input_ids": ids, "attention_mask": mask, "logits": logits, "last_hidden_state": hidden,
        "left_input_ids": left_ids, "left_attention_mask": left_mask, "left_position_ids": left_pos,
        "left_logits": left_logits, "train_ids": train_ids, "loss": loss.detach(), **grads,
        "gen_prompt_ids": gp, "gen_ids": gen, "gen_batch_prompt_ids": bp, "gen_batch_attention_mask": bmask,
        "gen_batch_ids": bgen,
    }, {"eos_token_id": str(eos), "prompt": prompt, "prompt_ids": json.dumps(pids),
        "gen_text_ids": json.dumps(tgen), "gen_text": text})

    # Reload and check.
    back = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        expect_close("gpt2 logits", back(ids, attention_mask=mask).logits, logits)
        expect_close("gpt2 hidden", back.transformer(ids, attention_mask=mask).last_hidden_state, hidden)
        expect_close("gpt2 left_logits",
                     back(left_ids, attention_mask=left_mask, position_ids=left_pos).logits, left_logits)
        assert torch.equal(back.generate(gp, attention_mask=torch.ones_like(gp), do_sample=False, max_new_tokens=12,
                                         pad_token_id=eos), gen)
        assert torch.equal(back.generate(bp, attention_mask=bmask, do_sample=False, max_new_tokens=12,
                                         pad_token_id=eos), bgen)
    back.train()
    l2 = back(train_ids, labels=train_ids).loss
    l2.backward()
    expect_close("gpt2 loss", l2, loss)
    for n, p in back.named_parameters():
        expect_close("gpt2 grad." + n, p.grad, grads["grad." + n])
    rt = AutoTokenizer.from_pretrained(out)
    assert rt(prompt)["input_ids"] == pids and rt.decode(tgen) == text
    assert Tokenizer.from_file(os.path.join(out, "tokenizer.json")).encode(prompt).ids == pids
    print(f"gpt2: V {V}, eos {eos}, prompt {prompt!r} -> {text!r}; gen {gen[0].tolist()}; batch {bgen.tolist()}")
    return {"V": V, "eos": eos}


# ---------------------------------------------------------------- BERT

def learn_wordpiece(counts, size):
    """WordPiece vocabulary the way tokenizers' WordPieceTrainer learns it (BPE merges with a ## continuation prefix),
    but deterministic: that trainer breaks ties between equally frequent pairs in hash-map order, so its vocabulary
    changes from run to run. Here ties go to the lexicographically smallest pair."""
    words = sorted(counts)
    splits = {w: [w[0]] + ["##" + c for c in w[1:]] for w in words}
    vocab = list(BERT_SPECIALS) + sorted({w[0] for w in words}) + sorted({"##" + c for w in words for c in w[1:]})
    seen = set(vocab)
    while len(vocab) < size:
        pairs = Counter()
        for w in words:
            sp = splits[w]
            for a, b in zip(sp, sp[1:]):
                pairs[(a, b)] += counts[w]
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        new = a + b[2:]
        if new not in seen:
            vocab.append(new)
            seen.add(new)
        for w in words:
            sp, out, i = splits[w], [], 0
            while i < len(sp):
                if i + 1 < len(sp) and sp[i] == a and sp[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(sp[i])
                    i += 1
            splits[w] = out
    return {t: i for i, t in enumerate(vocab)}


def wordpiece_tokenizer():
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for line in lines(bert_words(), seed=4, commas=True)
                     for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)))
    vocab = learn_wordpiece(counts, 300)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    assert [tok.token_to_id(t) for t in BERT_SPECIALS] == [0, 1, 2, 3, 4]
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    for t in BERT_SPECIALS:  # as BertWordPieceTokenizer registers them: never split, skipped by decode
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    return tok


def save_bert_tokenizer(tok, out):
    BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
                      pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]").save_pretrained(out)
    tok.save(os.path.join(out, "tokenizer.json"))


def bert_config(V):
    return BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu", initializer_range=INIT,
                      pad_token_id=0)


# Row 0: a pair filling all 8 positions; row 1: one sentence of 5 tokens, right-padded with [PAD] = 0.
BERT_TEXTS = [["The dog jumped", "a bird"], ["Quietly walking"]]
# Sentence-transformers texts: empty, short, accents and an unknown character, and one over 16 tokens.
ST_TEXTS = ["", "The cat walked slowly to the garden.", "Café jumpers, quietly singing!",
            "the horse and the bird were walking under the bright green trees near the quiet river all morning"]


def bert_inputs(tok):
    e0 = tok.encode(*BERT_TEXTS[0])
    e1 = tok.encode(*BERT_TEXTS[1])
    assert len(e0.ids) == 8 and len(e1.ids) == 5, (e0.tokens, e1.tokens)
    assert any(t.startswith("##") for t in e0.tokens + e1.tokens), (e0.tokens, e1.tokens)
    pad = 8 - len(e1.ids)
    ids = torch.tensor([e0.ids, e1.ids + [0] * pad])
    tt = torch.tensor([e0.type_ids, e1.type_ids + [0] * pad])
    mask = torch.tensor([e0.attention_mask, e1.attention_mask + [0] * pad])
    return ids, tt, mask, [e0.tokens, e1.tokens]


def bert():
    tok = wordpiece_tokenizer()
    V = tok.get_vocab_size()
    ids, tt, mask, tokens = bert_inputs(tok)
    inputs = {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}
    meta = {"texts": json.dumps(BERT_TEXTS), "tokens": json.dumps(tokens), "pad_token_id": "0"}

    out = fresh_dir("bert")
    save_bert_tokenizer(tok, out)
    torch.manual_seed(1)
    model = BertModel(bert_config(V)).eval()
    perturb(model, 11)
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        o = model(**inputs)
    save_sorted("hf_ref", "bert", {**inputs, "last_hidden_state": o.last_hidden_state,
                                   "pooler_output": o.pooler_output}, meta)
    back = BertModel.from_pretrained(out).eval()
    with torch.no_grad():
        b = back(**inputs)
    expect_close("bert last_hidden_state", b.last_hidden_state, o.last_hidden_state)
    expect_close("bert pooler_output", b.pooler_output, o.pooler_output)
    rt = AutoTokenizer.from_pretrained(out)
    enc = rt([BERT_TEXTS[0][0]], [BERT_TEXTS[0][1]])
    assert enc["input_ids"][0] == ids[0].tolist() and enc["token_type_ids"][0] == tt[0].tolist()
    enc = rt(BERT_TEXTS[1][0], padding="max_length", max_length=8)
    assert enc["input_ids"] == ids[1].tolist() and enc["attention_mask"] == mask[1].tolist()

    out = fresh_dir("bert-mlm")
    save_bert_tokenizer(tok, out)
    torch.manual_seed(1)
    mlm = BertForMaskedLM(bert_config(V)).eval()
    perturb(mlm, 12)
    mlm.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        logits = mlm(**inputs).logits
    save_sorted("hf_ref", "bert-mlm", {**inputs, "mlm_logits": logits}, meta)
    back = BertForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        expect_close("bert-mlm logits", back(**inputs).logits, logits)
    print(f"bert: V {V}, specials {dict(zip(BERT_SPECIALS, range(5)))}, tokens {tokens}")
    st_bert(tok)
    st_dense()
    return {"V": V}


def st_bert(tok):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    out = fresh_dir("st-bert")
    st = SentenceTransformer(modules=[Transformer(os.path.join(HF, "bert"), max_seq_length=16),
                                      Pooling(32, pooling_mode="mean"), Normalize()], device="cpu").eval()
    st.save(out, create_model_card=False)
    emb = st.encode(ST_TEXTS, batch_size=len(ST_TEXTS), convert_to_tensor=True)
    feats = st.preprocess(ST_TEXTS)
    ids, mask = feats["input_ids"], feats["attention_mask"]
    # What the tokenizer.json alone gives, truncated to 16, must be what sentence-transformers fed the model.
    for r, t in enumerate(ST_TEXTS):
        raw = tok.encode(t).ids
        want = raw if len(raw) <= 16 else raw[:15] + [raw[-1]]
        assert ids[r][mask[r] == 1].tolist() == want, (t, ids[r].tolist(), want)
    assert mask.sum(1).max() == 16 and len(tok.encode(ST_TEXTS[-1]).ids) > 16
    # By hand: BertModel, mean over real tokens, L2 normalise.
    with torch.no_grad():
        h = BertModel.from_pretrained(os.path.join(HF, "bert")).eval()(
            input_ids=ids, attention_mask=mask, token_type_ids=feats.get("token_type_ids")).last_hidden_state
    m = mask.unsqueeze(-1).float()
    manual = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    expect_close("st-bert by hand", manual, emb, 1e-5)
    tensors = {"embeddings": emb, "input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in feats:
        tensors["token_type_ids"] = feats["token_type_ids"]
    save_sorted("hf_ref", "st-bert", tensors, {"texts": json.dumps(ST_TEXTS, ensure_ascii=False),
                                                "max_seq_length": "16"})
    back = SentenceTransformer(out, device="cpu")
    expect_close("st-bert reload", back.encode(ST_TEXTS, batch_size=len(ST_TEXTS), convert_to_tensor=True), emb)
    print(f"st-bert: lengths {mask.sum(1).tolist()}")


def st_dense():
    """`st-bert` with two Dense modules between the pooling and the normalisation: 32 -> 24 with tanh (the default),
    24 -> 16 with no activation (`torch.nn.Identity`, no bias)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    out = fresh_dir("st-dense")
    torch.manual_seed(41)
    st = SentenceTransformer(modules=[Transformer(os.path.join(HF, "bert"), max_seq_length=16),
                                      Pooling(32, pooling_mode="mean"), Dense(32, 24),
                                      Dense(24, 16, bias=False, activation_function=torch.nn.Identity()),
                                      Normalize()], device="cpu").eval()
    st.save(out, create_model_card=False)
    emb = st.encode(ST_TEXTS, batch_size=len(ST_TEXTS), convert_to_tensor=True)
    feats = st.preprocess(ST_TEXTS)
    ids, mask = feats["input_ids"], feats["attention_mask"]
    # By hand: BertModel, mean over real tokens, tanh(W1 x + b1), W2 ·, L2 normalise.
    with torch.no_grad():
        h = BertModel.from_pretrained(os.path.join(HF, "bert")).eval()(
            input_ids=ids, attention_mask=mask, token_type_ids=feats.get("token_type_ids")).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
        d1, d2 = st[2].linear, st[3].linear
        manual = torch.nn.functional.normalize(d2(torch.tanh(d1(pooled))), dim=-1)
    expect_close("st-dense by hand", manual, emb, 1e-5)
    tensors = {"embeddings": emb, "input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in feats:
        tensors["token_type_ids"] = feats["token_type_ids"]
    save_sorted("hf_ref", "st-dense", tensors, {"texts": json.dumps(ST_TEXTS, ensure_ascii=False)})
    back = SentenceTransformer(out, device="cpu")
    expect_close("st-dense reload", back.encode(ST_TEXTS, batch_size=len(ST_TEXTS), convert_to_tensor=True), emb)
    print(f"st-dense: embeddings {tuple(emb.shape)}")


# ---------------------------------------------------------------- T5

def t5():
    out = fresh_dir("t5")
    V = 128
    cfg = T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                   eos_token_id=1, pad_token_id=0)
    torch.manual_seed(2)
    model = T5ForConditionalGeneration(cfg).eval()
    # transformers 5 always ties lm_head to shared (tie_word_embeddings=False only turns off the d_model**-0.5
    # scaling of the decoder output). Untie it as T5 v1.1 checkpoints are: lm_head ~ N(0, 1), the init transformers
    # gives an untied head; from_pretrained keeps a head that differs from shared untied.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32, generator=torch.Generator().manual_seed(22)))
    assert model.lm_head.weight is not model.shared.weight and not model.config.scale_decoder_outputs
    perturb(model, 21)
    model.save_pretrained(out, safe_serialization=True)
    # config.json as T5 v1.1 checkpoints on the Hub have it (and transformers 4 wrote it): tie_word_embeddings false,
    # no scale_decoder_outputs (transformers 5 writes tie_word_embeddings true + scale_decoder_outputs false).
    path = os.path.join(out, "config.json")
    with open(path) as fh:
        c = json.load(fh)
    assert c.pop("scale_decoder_outputs") is False
    c["tie_word_embeddings"] = False
    with open(path, "w") as fh:
        json.dump(c, fh, indent=2, sort_keys=True)
        fh.write("\n")

    def gen_of(ids, mask):
        with torch.no_grad():
            return model.generate(ids[:1], attention_mask=mask[:1], do_sample=False, max_new_tokens=8)

    # Row 0: 6 tokens + eos; row 1: 3 tokens + eos + 3 pads. The first seed whose row 0 generates 8 tokens, no eos.
    for s in range(1000):
        g = torch.Generator().manual_seed(200 + s)
        ids = randint(g, 2, V, 2, 7)
        mask = torch.ones(2, 7, dtype=torch.long)
        ids[0, 6] = 1
        ids[1, 3] = 1
        ids[1, 4:] = 0
        mask[1, 4:] = 0
        gen = gen_of(ids, mask)
        new = gen[0, 1:].tolist()
        if len(new) == 8 and 1 not in new and len(set(new)) >= 4:
            break
    else:
        raise RuntimeError("no good t5 input")
    dec = randint(g, 2, V, 2, 5)
    dec[:, 0] = 0
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    save_sorted("hf_ref", "t5", {
        "input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "logits": o.logits,
        "encoder_last_hidden_state": o.encoder_last_hidden_state, "gen_ids": gen,
    }, {"decoder_start_token_id": "0", "eos_token_id": "1", "pad_token_id": "0", "max_new_tokens": "8"})
    back = T5ForConditionalGeneration.from_pretrained(out).eval()
    assert back.lm_head.weight is not back.shared.weight and not back.config.scale_decoder_outputs
    with torch.no_grad():
        b = back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        expect_close("t5 logits", b.logits, o.logits)
        expect_close("t5 encoder", b.encoder_last_hidden_state, o.encoder_last_hidden_state)
        assert torch.equal(back.generate(ids[:1], attention_mask=mask[:1], do_sample=False, max_new_tokens=8), gen)
    print(f"t5: gen {gen.tolist()}")


# ---------------------------------------------------------------- ViT

def vit():
    out = fresh_dir("vit")
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=5, initializer_range=INIT)
    torch.manual_seed(3)
    model = ViTForImageClassification(cfg).eval()
    perturb(model, 31)
    model.save_pretrained(out, safe_serialization=True)
    px = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(pixel_values=px).logits
        hidden = model.vit(pixel_values=px).last_hidden_state
    save_sorted("hf_ref", "vit", {"pixel_values": px, "logits": logits, "last_hidden_state": hidden})
    back = ViTForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
        expect_close("vit logits", back(pixel_values=px).logits, logits)
        expect_close("vit hidden", back.vit(pixel_values=px).last_hidden_state, hidden)
    print(f"vit: logits {logits.shape}, hidden {hidden.shape}")


README = """# Hugging Face oracle directories

Generated by `scripts/oracle/hf.py` (`bash scripts/gen_fixtures.sh hf`, or
`PYTHONPATH=scripts/oracle scripts/.venv/bin/python scripts/oracle/hf.py`) with `transformers`, `tokenizers` and
`sentence-transformers` from PyPI; nothing is downloaded from the Hub. Each directory is what `save_pretrained` writes
for a tiny seeded, randomly initialised model (configs built in code, `initializer_range` 0.3 for GPT-2, BERT and ViT;
every LayerNorm / RMSNorm parameter and every bias perturbed, so a loader that skips one fails); tokenizers are
trained by the script on generated text. `fixtures/hf_ref/<name>.safetensors` holds what the Python libraries compute
with each (inputs int64, outputs f32, texts and settings in the metadata). Regeneration is deterministic.

| directory | model | reference (`fixtures/hf_ref/`) |
|---|---|---|
| `gpt2/` | `GPT2LMHeadModel`, 2 layers, C 32, 4 heads, byte-level BPE of 300 tokens | `gpt2`: logits and hidden states (right padding), left padding with position ids, training loss and every gradient, greedy `generate` (single and left-padded batch), a text prompt and its greedy continuation |
| `bert/` | `BertModel`, 2 layers, C 32, 4 heads, WordPiece of 300 tokens | `bert`: `last_hidden_state`, `pooler_output` for a pair and a right-padded sentence |
| `bert-mlm/` | `BertForMaskedLM`, same shape and tokenizer | `bert-mlm`: `mlm_logits` for the same inputs |
| `st-bert/` | sentence-transformers 6: `bert/` with `max_seq_length` 16 (stored as `model_max_length` in `tokenizer_config.json`), mean pooling, normalize | `st-bert`: `embeddings` of 4 texts (one empty, one truncated) |
| `st-dense/` | `st-bert/` with two sentence-transformers `Dense` modules after the pooling: 32 → 24 with tanh, 24 → 16 with `Identity` and no bias | `st-dense`: `embeddings` of the same 4 texts |
| `t5/` | `T5ForConditionalGeneration`, 2+2 layers, C 32, gated-gelu (`gelu_new`), untied `lm_head` and `config.json` as Hub T5 v1.1 has it (`tie_word_embeddings` false: no d_model^-0.5 scaling), no tokenizer | `t5`: logits, encoder states, greedy `generate` |
| `vit/` | `ViTForImageClassification`, 16x16 images, 4x4 patches, 5 labels | `vit`: logits, `last_hidden_state` |
| `bert-pretrain/` | `BertForPreTraining`, BERT's shape and tokenizer | `bert-pretrain`: corrupted inputs, MLM `labels`, `next_sentence_label`, `prediction_logits`, `seq_relationship_logits`, `loss` and every parameter's gradient (`grad.<name>`; the tied decoder is `bert.embeddings.word_embeddings.weight`) |
| `bert-cls/`, `bert-tok/`, `bert-qa/` | `BertForSequenceClassification` (3 labels), `BertForTokenClassification` (5), `BertForQuestionAnswering` | `logits` (or `start_logits`, `end_logits`), the labels, `loss` |
| `roberta/` | `RobertaModel`, pad id 1, one segment, no tokenizer (ids drawn in 3..300) | `roberta`: `last_hidden_state`, `pooler_output` (row 1 right-padded with 1) |
| `distilbert/` | `DistilBertModel`, learned positions, no tokenizer | `distilbert`: `last_hidden_state` for the BERT inputs |
"""


# ---------------------------------------------------------------- BERT heads, RoBERTa, DistilBERT

def bert_heads():
    """BertForPreTraining (loss and every gradient), the three fine-tuning heads, RoBERTa and DistilBERT encoders."""
    from transformers import (BertForPreTraining, BertForQuestionAnswering, BertForSequenceClassification,
                              BertForTokenClassification, DistilBertConfig, DistilBertModel, RobertaConfig,
                              RobertaModel)
    tok = wordpiece_tokenizer()
    V = tok.get_vocab_size()
    ids, tt, mask, _ = bert_inputs(tok)
    inputs = {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}

    # Pretraining: 80/10/10-style corruption at 5 real positions, labels there, NSP labels [0, 1]; eval mode.
    labels = torch.full_like(ids, -100)
    corrupt = ids.clone()
    for (r, j), how in zip([(0, 1), (0, 2), (0, 6), (1, 1), (1, 3)], ["mask", "mask", "random", "mask", "keep"]):
        labels[r, j] = ids[r, j]
        corrupt[r, j] = 4 if how == "mask" else (ids[r, j] + 17) % V if how == "random" else ids[r, j]
    nsp = torch.tensor([0, 1])
    out = fresh_dir("bert-pretrain")
    save_bert_tokenizer(tok, out)
    torch.manual_seed(21)
    model = BertForPreTraining(bert_config(V)).eval()
    perturb(model, 22)
    model.save_pretrained(out, safe_serialization=True)
    o = model(input_ids=corrupt, token_type_ids=tt, attention_mask=mask, labels=labels, next_sentence_label=nsp)
    o.loss.backward()
    grads = {"grad." + n: p.grad for n, p in model.named_parameters()}
    save_sorted("hf_ref", "bert-pretrain", {"input_ids": corrupt, "token_type_ids": tt, "attention_mask": mask,
                                            "labels": labels, "next_sentence_label": nsp,
                                            "prediction_logits": o.prediction_logits,
                                            "seq_relationship_logits": o.seq_relationship_logits,
                                            "loss": o.loss, **grads}, {})

    # Fine-tuning heads (eval mode: no dropout), logits and loss.
    tok_labels = torch.tensor([[-100, 1, 2, 0, 4, -100, 3, -100], [-100, 2, 1, -100, -100, -100, -100, -100]])
    for name, cls, extra, lab in [
        ("bert-cls", BertForSequenceClassification, {"num_labels": 3}, {"labels": torch.tensor([2, 0])}),
        ("bert-tok", BertForTokenClassification, {"num_labels": 5}, {"labels": tok_labels}),
        ("bert-qa", BertForQuestionAnswering, {},
         {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 2])}),
    ]:
        out = fresh_dir(name)
        save_bert_tokenizer(tok, out)
        torch.manual_seed(31)
        cfg = bert_config(V)
        for k, v in extra.items():
            setattr(cfg, k, v)
        model = cls(cfg).eval()
        perturb(model, 32)
        model.save_pretrained(out, safe_serialization=True)
        with torch.no_grad():
            o = model(**inputs, **lab)
        outs = {"loss": o.loss}
        if name == "bert-qa":
            outs.update(start_logits=o.start_logits, end_logits=o.end_logits)
        else:
            outs["logits"] = o.logits
        save_sorted("hf_ref", name, {**inputs, **lab, **outs}, {})

    # RoBERTa: positions from padding_idx + 1, one segment, right padding with pad id 1.
    g = torch.Generator().manual_seed(41)
    r_ids = randint(g, 3, V, 2, 8)
    r_mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    r_ids[1, 5:] = 1
    out = fresh_dir("roberta")
    torch.manual_seed(42)
    rcfg = RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                         hidden_act="gelu", initializer_range=INIT)
    model = RobertaModel(rcfg).eval()
    perturb(model, 43)
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        o = model(input_ids=r_ids, attention_mask=r_mask)
    save_sorted("hf_ref", "roberta", {"input_ids": r_ids, "attention_mask": r_mask,
                                      "last_hidden_state": o.last_hidden_state,
                                      "pooler_output": o.pooler_output}, {})

    # DistilBERT: no segments, no pooler.
    out = fresh_dir("distilbert")
    torch.manual_seed(44)
    dcfg = DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                            activation="gelu", sinusoidal_pos_embds=False, initializer_range=INIT)
    model = DistilBertModel(dcfg).eval()
    perturb(model, 45)
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask)
    save_sorted("hf_ref", "distilbert", {"input_ids": ids, "attention_mask": mask,
                                         "last_hidden_state": o.last_hidden_state}, {})
    print("bert heads, roberta, distilbert: written")


def main():
    fresh_area("hf_ref")
    os.makedirs(HF, exist_ok=True)
    gpt2()
    bert()
    t5()
    vit()
    bert_heads()
    with open(os.path.join(HF, "README.md"), "w") as fh:
        fh.write(README)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        # One generator alone (its inputs must already be there), e.g. `hf.py st_dense`.
        for name in sys.argv[1:]:
            globals()[name]()
    else:
        main()
