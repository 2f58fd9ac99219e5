#!/usr/bin/env python3
"""Side-by-side CPU throughput: scorestream's engine vs transformers on the same token ids.

Usage: python3 benches/cpu_compare.py [MODEL_DIR] [--repeat N] [--threads T]

Both sides score the fixture's own sequences (reference.json `input_ids`, i.e. the chat-templated
conversations) repeated N times. transformers runs float32 with right-padded batches of up to
4096 tokens and an attention mask (its usual batched path); scorestream runs
`cargo bench --bench cpu_throughput` (packed batches of up to 4096 tokens, one stage). Prints
tokens/s of each and their ratio. Needs torch and transformers (not needed by the tests).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batches(seqs, max_tokens=4096, max_events=256):
    out, cur, toks = [], [], 0
    for s in seqs:
        if cur and (len(cur) >= max_events or toks + len(s) > max_tokens):
            out.append(cur)
            cur, toks = [], 0
        cur.append(s)
        toks += len(s)
    if cur:
        out.append(cur)
    return out


def transformers_tokens_per_s(model_dir, seqs):
    cfg = AutoConfig.from_pretrained(model_dir)
    causal = cfg.architectures[0].endswith("ForCausalLM")
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    bs = batches(seqs)
    with torch.inference_mode():
        for b in bs[:1]:  # warm-up
            run_batch(model, b, pad)
        start = time.perf_counter()
        for b in bs:
            run_batch(model, b, pad)
        wall = time.perf_counter() - start
    return sum(map(len, seqs)) / wall


def run_batch(model, batch, pad):
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    model(input_ids=ids, attention_mask=mask)


def scorestream_tokens_per_s(model_dir, repeat):
    cmd = ["cargo", "bench", "--quiet", "--bench", "cpu_throughput", "--", model_dir, "--repeat", str(repeat)]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    print(out.strip())
    m = re.search(r"^\s*1\s+(\d+)", out, re.M)
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=os.path.join(ROOT, "tests/fixtures/arith"))
    ap.add_argument("--repeat", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref = json.load(open(os.path.join(a.model, "reference.json")))
    seqs = [e["input_ids"] for e in ref["events"]] * a.repeat
    ours = scorestream_tokens_per_s(a.model, a.repeat)
    theirs = transformers_tokens_per_s(a.model, seqs)
    print(f"\nmodel {a.model}: {len(seqs)} sequences, {sum(map(len, seqs))} tokens, {a.threads} threads")
    print(f"{'':24}{'tokens/s':>12}")
    print(f"{'scorestream (f32)':24}{ours:>12.0f}")
    print(f"{'transformers (f32)':24}{theirs:>12.0f}")
    print(f"{'ratio':24}{ours / theirs:>12.2f}")


if __name__ == "__main__":
    sys.exit(main())
