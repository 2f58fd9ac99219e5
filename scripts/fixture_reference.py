"""transformers' reference outputs for a saved fixture: `reference.json`, per conversation, the ids
of `apply_chat_template(messages, tokenize=True, add_generation_prompt=False)` (or the NeMo
prompt format), the float32 logits and the reward, plus an `fp8` block: the same forward pass with
the FP8 scheme scorestream implements emulated in PyTorch (per-output-channel E4M3 weights and
per-token E4M3 inputs of every q/k/v/o/gate/up/down projection, scale = amax/448,
round-to-nearest-even with saturation).

Imported by make_fixtures.py (the random-weight fixtures) and train_arith.py (the arithmetic
reward model); it imports neither.
"""
import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

STEERLM = ["quality", "toxicity", "humor", "creativity", "helpfulness", "correctness", "coherence", "complexity", "verbosity"]
STEERLM_WEIGHTS = [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]
NEMO_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def chat_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def nemo_ids(tok, messages):
    system, turns = (messages[0]["content"], messages[1:]) if messages[0]["role"] == "system" else (NEMO_SYSTEM, messages)
    text = f"<extra_id_0>System\n{system}\n"
    for m in turns:
        who = {"user": "User", "assistant": "Assistant", "system": "System"}[m["role"]]
        text += f"<extra_id_1>{who}\n{m['content']}\n"
    text += "<extra_id_2>"
    return tok(text, add_special_tokens=False)["input_ids"]


def reward_of(cfg, logits):
    if len(logits) == 9 and [cfg.id2label[i] for i in range(9)] == STEERLM:
        return sum(w * l for w, l in zip(STEERLM_WEIGHTS, logits))
    return logits[0]


def fake_quant_rows(x):
    """E4M3 per row of the last dim: scale = amax/448, RNE, saturating; back to float32."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448.0
    q = (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.float() * scale


def to_fp8_emulation(model, noise=None):
    """Quantize every projection's weight per output channel and its input per token, in place.

    With `noise` (a torch.Generator), inputs get a 1e-6 relative perturbation before quantizing:
    the size of the float32 differences between two correct implementations after a few layers
    (summation order, exp/rsqrt rounding). Running a
    few perturbed passes measures how far the emulation itself moves under such differences."""
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LINEARS:
            with torch.no_grad():
                mod.weight.copy_(fake_quant_rows(mod.weight))
            if noise is None:
                hooks.append(mod.register_forward_pre_hook(lambda m, args: (fake_quant_rows(args[0]),)))
            else:
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, args: (fake_quant_rows(args[0] * (1 + 1e-6 * torch.randn(args[0].shape, generator=noise))),)))
    return hooks


def run(model, cfg, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    row = logits[0, -1, :1] if logits.dim() == 3 else logits[0]
    vals = [float(v) for v in row]
    return vals, float(reward_of(cfg, vals))


def references(d, events, nemo=False):
    """Reload the saved fixture in float32 and record transformers' outputs, then the fp8 emulation."""
    cfg = AutoConfig.from_pretrained(d)
    causal = cfg.architectures[0].endswith("ForCausalLM")
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    tok = AutoTokenizer.from_pretrained(d)
    model = cls.from_pretrained(d, dtype=torch.float32).eval()
    out = {"fixture": os.path.basename(d), "architecture": cfg.architectures[0], "dtype": "float32", "events": []}
    ids_of = {}
    for ev in events:
        ids = nemo_ids(tok, ev["messages"]) if nemo else chat_ids(tok, ev["messages"])
        ids_of[ev["id"]] = ids
        logits, reward = run(model, cfg, ids)
        out["events"].append({"id": ev["id"], "input_ids": ids, "logits": logits, "reward": reward})
    out["fp8"] = {"scheme": "e4m3 per-channel weights, per-token activations, scale=amax/448, RNE saturating",
                  "spread": "max-min of the reward over 6 passes with 1e-6 relative input perturbations", "events": []}
    perturbed = []
    for seed in range(6):
        m = cls.from_pretrained(d, dtype=torch.float32).eval()
        to_fp8_emulation(m, noise=torch.Generator().manual_seed(seed))
        perturbed.append(m)
    to_fp8_emulation(model)
    for ev in events:
        logits, reward = run(model, cfg, ids_of[ev["id"]])
        others = [run(m, cfg, ids_of[ev["id"]])[1] for m in perturbed] + [reward]
        out["fp8"]["events"].append({"id": ev["id"], "logits": logits, "reward": reward,
                                     "spread": max(others) - min(others)})
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    return out
