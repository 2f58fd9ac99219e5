#!/usr/bin/env python3
"""Build the real Llama-3.1 tokenizer at test-setup time and transformers' ids for the fixtures.

    python3 scripts/llama3_tokenizer.py OUTDIR

Converts Meta's tiktoken file shipped by the `llama-models` package
(llama_models/llama3/tokenizer.model) with transformers' TikTokenConverter, adds the 256
Llama-3.1 special tokens from id 128000, writes OUTDIR/tokenizer.json and tokenizer_config.json
(with the Llama-3.1 chat template, scripts/templates/llama31.jinja) and OUTDIR/reference_ids.json:
transformers' apply_chat_template ids for tests/fixtures/conversations.jsonl. Needs transformers,
tokenizers, tiktoken and llama-models; no torch. Meta's files are never committed.
"""
import json
import os
import sys

import llama_models
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
           + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])


def main(out):
    os.makedirs(out, exist_ok=True)
    model = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
    converted = TikTokenConverter(vocab_file=model, extra_special_tokens=SPECIAL).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert len(fast) == 128256, len(fast)
    assert fast.convert_tokens_to_ids("<|begin_of_text|>") == 128000
    assert fast.convert_tokens_to_ids("<|eot_id|>") == 128009
    with open(os.path.join(ROOT, "scripts", "templates", "llama31.jinja")) as f:
        fast.chat_template = f.read()
    fast.save_pretrained(out)
    # Reload as a user would, then record transformers' ids.
    tok = AutoTokenizer.from_pretrained(out)
    refs = []
    with open(os.path.join(ROOT, "tests", "fixtures", "conversations.jsonl")) as f:
        for line in f:
            if line.strip():
                ev = json.loads(line)
                ids = tok.apply_chat_template(ev["messages"], tokenize=True, add_generation_prompt=False)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
                refs.append({"id": ev["id"], "input_ids": ids})
    with open(os.path.join(out, "reference_ids.json"), "w") as f:
        json.dump(refs, f)
    print(f"wrote {out}: {len(fast)} tokens, {len(refs)} reference conversations")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
