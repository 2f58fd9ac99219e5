#!/usr/bin/env python3
"""Train the tiny arithmetic reward model fixture (tests/fixtures/arith).

A LlamaForSequenceClassification (4 layers, width 128, character-level vocabulary) learns with the
Bradley-Terry loss, -log σ(r_good - r_bad), to score the correct answer to a single-digit sum
above a wrong one. Of all (question, wrong answer) pairs a random fifth is held out; pairwise
accuracy on the held-out pairs is printed and recorded in training.json. About 4 minutes on 2 CPU cores.

    python3 scripts/train_arith.py              # train, then write the evaluation files
    python3 scripts/train_arith.py --eval-only  # rewrite conversations/references only
"""
import json
import os
import random
import shutil
import sys
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from fixture_reference import references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "arith")
SPECIALS = ["<pad>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = list("0123456789+-=?. WhatisAnswrumbeo\n")
SEED = 1234


def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(CHARS)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.add_special_tokens(SPECIALS)
    return tok


def question(a, b):
    return [{"role": "user", "content": f"What is {a}+{b}?"}]




def conv(a, b, answer):
    return question(a, b) + [{"role": "assistant", "content": str(answer)}]


def split():
    """Every (question, wrong answer) pair; a random fifth (seeded) is held out."""
    pairs = [(a, b, w) for a in range(10) for b in range(10) for w in range(19) if w != a + b]
    random.Random(SEED).shuffle(pairs)
    return pairs[: len(pairs) // 5], pairs[len(pairs) // 5:]


def write_eval():
    """Held-out conversations (every held-out pair: "qA_B_W-good" / "-bad"), README examples,
    and transformers' float32 references for them."""
    held, _ = split()
    events = []
    for a, b, w in held:
        events.append({"id": f"q{a}_{b}_{w}-good", "messages": conv(a, b, a + b)})
        events.append({"id": f"q{a}_{b}_{w}-bad", "messages": conv(a, b, w)})
    with open(os.path.join(OUT, "conversations.jsonl"), "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")
    examples = [
        {"id": "2+5-right", "messages": conv(2, 5, 7)}, {"id": "2+5-wrong", "messages": conv(2, 5, 9)},
        {"id": "9+3-right", "messages": conv(9, 3, 12)}, {"id": "9+3-wrong", "messages": conv(9, 3, 2)},
        {"id": "6+7-right", "messages": conv(6, 7, 13)}, {"id": "6+7-off-by-one", "messages": conv(6, 7, 14)},
        {"id": "0+0-right", "messages": conv(0, 0, 0)}, {"id": "0+0-wrong", "messages": conv(0, 0, 10)},
    ]
    with open(os.path.join(OUT, "examples.jsonl"), "w") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")
    references(OUT, events)


def main():
    if "--eval-only" in sys.argv:
        return write_eval()
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    with open(os.path.join(ROOT, "scripts", "templates", "arith.jinja")) as f:
        tmpl = f.read()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer(), pad_token="<pad>", eos_token="</s>")
    fast.chat_template = tmpl
    pad = fast.convert_tokens_to_ids("<pad>")
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, num_labels=1,
                      pad_token_id=pad, eos_token_id=fast.convert_tokens_to_ids("</s>"))
    model = LlamaForSequenceClassification(cfg)

    def ids(messages):
        out = fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def batch(seqs):
        width = max(map(len, seqs))
        x = torch.full((len(seqs), width), pad)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s)
        return x, (x != pad).long()

    held, kept = split()
    train = [(ids(conv(a, b, a + b)), ids(conv(a, b, w))) for a, b, w in kept]

    def accuracy(pairs):
        model.eval()
        with torch.no_grad():
            good = model(*batch([ids(conv(a, b, a + b)) for a, b, _ in pairs])).logits[:, 0]
            bad = model(*batch([ids(conv(a, b, w)) for a, b, w in pairs])).logits[:, 0]
        model.train()
        return (good > bad).float().mean().item()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, step, acc = time.time(), 0, 0.0
    model.train()
    while time.time() - start < 420:
        sample = random.sample(train, 64)
        x, m = batch([g for g, _ in sample] + [b for _, b in sample])
        r = model(input_ids=x, attention_mask=m).logits[:, 0]
        loss = -F.logsigmoid(r[:64] - r[64:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            acc = accuracy(held)
            print(f"step {step} loss {loss.item():.4f} held-out pairwise accuracy {acc:.4f} ({time.time() - start:.0f} s)", flush=True)
            if acc >= 0.995 and step >= 300:
                break
    model.to(torch.bfloat16).save_pretrained(OUT)
    fast.save_pretrained(OUT)
    # The bf16 checkpoint as committed is what the record describes.
    model = LlamaForSequenceClassification.from_pretrained(OUT, dtype=torch.float32).eval()
    final = accuracy(held)
    record = {"steps": step, "seconds": round(time.time() - start), "held_out_pairs": len(held),
              "held_out_pairwise_accuracy": final, "torch": torch.__version__, "seed": SEED}
    print(json.dumps(record), flush=True)
    json.dump(record, open(os.path.join(OUT, "training.json"), "w"), indent=2)

    write_eval()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
