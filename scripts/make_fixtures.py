#!/usr/bin/env python3
"""Build the tiny HF-format fixtures under tests/fixtures/ and transformers' reference outputs.

    python3 scripts/make_fixtures.py            # random-weight fixtures + references
    python3 scripts/make_fixtures.py --arith    # also (re)train the arithmetic reward model

Needs torch and transformers (not needed by the tests, which read the committed files).
Every fixture is a real checkpoint written by `save_pretrained` (safetensors), a real
`tokenizer.json` trained with the `tokenizers` library, and a chat template in one of the layouts
real checkpoints use. `reference.json` holds transformers' outputs for every conversation of
tests/fixtures/conversations.jsonl, float32 and under the FP8 emulation (fixture_reference.py).
"""
import argparse
import json
import os
import shutil
import sys

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                          MistralForSequenceClassification, NemotronConfig, NemotronForSequenceClassification,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification, Qwen3Config,
                          Qwen3ForSequenceClassification)

from fixture_reference import LINEARS, STEERLM, references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
TEMPLATES = os.path.join(ROOT, "scripts", "templates")


def template(name):
    with open(os.path.join(TEMPLATES, name)) as f:
        return f.read()


def conversations():
    with open(os.path.join(FIX, "conversations.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


# Pre-tokenizer patterns of the real Qwen2 and Llama-3 tokenizer.json files (transformers 5
# rebuilds Qwen2's from its tokenizer class, so the fixture must carry the real one).
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train_tokenizer(specials, corpus, vocab=400, pattern=None):
    tok = Tokenizer(models.BPE(unk_token=None))
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def corpus_text():
    texts = []
    for ev in conversations():
        texts += [m["content"] for m in ev["messages"]]
    texts += ["The quick brown fox jumps over the lazy dog. " * 3, "system user assistant header text",
              "What is the capital of France? Paris is the capital.", "def add(a, b): return a + b"]
    return texts


def save_tokenizer(d, tok, layout, chat_template, **special):
    """Save tokenizer files; layout: 'string' | 'list' | 'jinja' | 'none'."""
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(d)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("chat_template", None)
    jinja = os.path.join(d, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    if layout == "string":
        cfg["chat_template"] = chat_template
    elif layout == "list":
        cfg["chat_template"] = [{"name": "default", "template": chat_template},
                                {"name": "tool_use", "template": "{{ raise_exception('tools are not used here') }}"}]
    elif layout == "jinja":
        with open(jinja, "w") as f:
            f.write(chat_template)
    json.dump(cfg, open(cfg_path, "w"), indent=2, ensure_ascii=False)


def write_2024_rope(d, theta, scaling):
    """Rewrite config.json the way transformers 4.4x wrote it: rope_theta + rope_scaling."""
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = scaling
    json.dump(cfg, open(p, "w"), indent=2)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.08))


COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024)


def build(name, model, tok_specials, layout, tmpl, special, seed, dtype=torch.bfloat16, post=None, shard=None):
    d = os.path.join(FIX, name)
    shutil.rmtree(d, ignore_errors=True)
    randomize(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, **kwargs)
    if post:
        post(d)
    save_tokenizer(d, TOKENIZERS[tok_specials], layout, tmpl, **special)
    print(name, "written", flush=True)
    return d


TOKENIZERS = {}


def random_fixtures():
    corpus = corpus_text()
    llama_sp = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]
    qwen_sp = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    mistral_sp = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    nemo_sp = ["<unk>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
    patterns = {"llama": LLAMA3_PATTERN, "qwen": QWEN_PATTERN}
    for k, sp in {"llama": llama_sp, "qwen": qwen_sp, "mistral": mistral_sp, "nemo": nemo_sp}.items():
        TOKENIZERS[k] = train_tokenizer(sp, corpus, pattern=patterns.get(k))
    V = 400
    pad_llama = TOKENIZERS["llama"].token_to_id("<|pad|>")
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
    built = []
    # Llama-3.1-Nemotron-70B-Reward-HF layout: CausalLM, GQA, llama3 rope in 2024 config style,
    # template string inside tokenizer_config.json.
    m = LlamaForCausalLM(LlamaConfig(**COMMON, vocab_size=V, rope_theta=500000.0, rope_scaling=dict(llama3_rope),
                                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=4))
    built.append(build("llama_causal", m, "llama", "string", template("llama31.jinja"),
                       dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), 1,
                       post=lambda d: write_2024_rope(d, 500000.0, dict(llama3_rope))))
    m = LlamaForSequenceClassification(LlamaConfig(**COMMON, vocab_size=V, num_labels=1, pad_token_id=pad_llama))
    built.append(build("llama_seqcls", m, "llama", "list", template("llama3_simple.jinja"),
                       dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>"), 2))
    m = MistralForSequenceClassification(MistralConfig(**COMMON, vocab_size=V, num_labels=1, sliding_window=16,
                                                       pad_token_id=0))
    built.append(build("mistral_seqcls", m, "mistral", "string", template("mistral.jinja"),
                       dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), 3))
    qwen_pad = TOKENIZERS["qwen"].token_to_id("<|endoftext|>")
    m = Qwen2ForSequenceClassification(Qwen2Config(**COMMON, vocab_size=V, num_labels=2, pad_token_id=qwen_pad,
                                                   id2label={0: "helpful", 1: "harmless"},
                                                   label2id={"helpful": 0, "harmless": 1}))
    built.append(build("qwen2_seqcls", m, "qwen", "jinja", template("qwen25.jinja"),
                       dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), 4, dtype=torch.float16, shard="40KB"))
    m = Qwen3ForSequenceClassification(Qwen3Config(**COMMON, vocab_size=V, head_dim=24, num_labels=1,
                                                   pad_token_id=qwen_pad))
    built.append(build("qwen3_seqcls", m, "qwen", "jinja", template("qwen3.jinja"),
                       dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), 5))
    ncfg = NemotronConfig(**{**COMMON, "num_key_value_heads": 2}, vocab_size=V, head_dim=32, partial_rotary_factor=0.5,
                          hidden_act="relu2", num_labels=9, id2label=dict(enumerate(STEERLM)),
                          label2id={l: i for i, l in enumerate(STEERLM)}, pad_token_id=0)
    m = NemotronForSequenceClassification(ncfg)
    built.append(build("nemotron_seqcls", m, "nemo", "none", None, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), 6))
    events = conversations()
    for d in built:
        references(d, events, nemo=os.path.basename(d).startswith("nemotron"))
    compressed_tensors_fixture(os.path.join(FIX, "llama_causal"), os.path.join(FIX, "llama_causal_fp8_ct"), events)


def compressed_tensors_fixture(src, dst, events):
    """An FP8 checkpoint as llm-compressor writes it (F8_E4M3 weights, per-channel weight_scale)."""
    from safetensors.torch import load_file, save_file
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "reference.json"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.startswith("model.layers.") and name.split(".")[-2] in LINEARS:
            w = t.float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
            out[name] = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[name.replace(".weight", ".weight_scale")] = scale
        else:
            out[name] = t
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    p = os.path.join(dst, "config.json")
    cfg = json.load(open(p))
    q = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**q, "strategy": "channel", "dynamic": False},
                                      "input_activations": {**q, "strategy": "token", "dynamic": True},
                                      "output_activations": None}},
        "ignore": ["lm_head"], "kv_cache_scheme": None}
    json.dump(cfg, open(p, "w"), indent=2)
    # Reference: transformers runs the original bf16 weights under the fp8 emulation; the stored
    # codes and scales are exactly what that emulation computes.
    ref = json.load(open(os.path.join(src, "reference.json")))
    ref["fixture"] = os.path.basename(dst)
    ref["note"] = "events = fp8 emulation (the checkpoint is FP8)"
    ref["events"] = [{**e, "logits": f["logits"], "reward": f["reward"]} for e, f in zip(ref["events"], ref["fp8"]["events"])]
    json.dump(ref, open(os.path.join(dst, "reference.json"), "w"), indent=1, ensure_ascii=False)
    print("llama_causal_fp8_ct written", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arith", action="store_true", help="also train the arithmetic reward model")
    a = ap.parse_args()
    torch.manual_seed(0)
    random_fixtures()
    if a.arith:
        import train_arith
        train_arith.main()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
