#!/usr/bin/env python3
"""PyTorch baselines for scripts/gpu_check.sh, on the same shapes as `gpu_bench layers`.

Llama-3.1-70B layer shape (hidden 8192, 64 heads, 8 KV heads, head_dim 128, MLP 28672) with
random weights, batches of 4k/16k/64k tokens packed from sequences of 512-4096 tokens:
  bf16: nn.Linear (fused QKV and gate|up) + RMSNorm + rotary + per-sequence causal SDPA (GQA)
  fp8:  the same with every linear layer as torch._scaled_mm on E4M3 (per-token activation
        scales computed in PyTorch, per-channel weight scales), bf16 output
  gemm-only:      the four projections of one layer (bf16 F.linear, FP8 _scaled_mm with the
                  activations already quantized), kind "torch_gemm"
  attention-only: rotary-free per-sequence causal SDPA (GQA) on the batch, kind
                  "torch_attention", in TFLOP/s like `gpu_bench time`
Prints one JSON object per line, flushed as measured, like gpu_bench. Times are medians of
timed repetitions (CUDA events) after warm-up; tokens/s is extrapolated to 80 layers.
"""
import json
import os
import random

import torch
import torch.nn.functional as F

HIDDEN, HEADS, KV, HD, INTER = 8192, 64, 8, 128, 28672
LAYERS = int(os.environ.get("TORCH_LAYERS", "6"))
BATCHES = [4096, 16384, 65536]
REPS = int(os.environ.get("TORCH_REPS", "3"))
E4M3_MAX = 448.0


def batch(tokens, rng):
    lens, left = [], tokens
    while left > 0:
        n = min(rng.randint(512, 4096), left)
        lens.append(n)
        left -= n
    return lens


def rotary_tables(lens, dev):
    inv = 1.0 / (500000.0 ** (torch.arange(0, HD, 2, device=dev, dtype=torch.float32) / HD))
    pos = torch.cat([torch.arange(n, device=dev, dtype=torch.float32) for n in lens])
    ang = pos[:, None] * inv[None, :]
    return ang.cos().to(torch.bfloat16)[:, None, :], ang.sin().to(torch.bfloat16)[:, None, :]


def rope(x, cos, sin):
    x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def quant_rows(x):
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Layer:
    def __init__(self, fp8, dev):
        shapes = {"qkv": ((HEADS + 2 * KV) * HD, HIDDEN), "o": (HIDDEN, HEADS * HD),
                  "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
        self.fp8 = fp8
        self.w = {}
        for name, (out, inp) in shapes.items():
            w = torch.randn(out, inp, device=dev, dtype=torch.bfloat16) / inp ** 0.5
            if fp8:
                q, s = quant_rows(w)
                # _scaled_mm wants B column-major: pass wᵀ of a row-major [out, in].
                self.w[name] = (q.t(), s.t().contiguous())
            else:
                self.w[name] = w
        self.n1 = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)
        self.n2 = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)

    def linear(self, x, name):
        if not self.fp8:
            return F.linear(x, self.w[name])
        q, s = quant_rows(x)
        wq, ws = self.w[name]
        return torch._scaled_mm(q, wq, scale_a=s, scale_b=ws, out_dtype=torch.bfloat16)

    def forward(self, x, lens, cos, sin):
        t = x.shape[0]
        h = F.rms_norm(x, (HIDDEN,), self.n1, 1e-5)
        qkv = self.linear(h, "qkv")
        q = rope(qkv[:, : HEADS * HD].view(t, HEADS, HD), cos, sin)
        k = rope(qkv[:, HEADS * HD : (HEADS + KV) * HD].view(t, KV, HD), cos, sin)
        v = qkv[:, (HEADS + KV) * HD :].view(t, KV, HD)
        outs, start = [], 0
        for n in lens:
            sl = slice(start, start + n)
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None],
                is_causal=True, enable_gqa=True)
            outs.append(o[0].transpose(0, 1).reshape(n, HEADS * HD))
            start += n
        x = x + self.linear(torch.cat(outs), "o")
        h = F.rms_norm(x, (HIDDEN,), self.n2, 1e-5)
        gu = self.linear(h, "gate_up")
        a = F.silu(gu[:, :INTER]) * gu[:, INTER:]
        return x + self.linear(a, "down")


def attention_flops(n):
    return 4.0 * n * (n + 1) / 2 * HEADS * HD


def median_ms(fn, reps=REPS, warm=1):
    times = []
    for rep in range(reps + warm):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        if rep >= warm:
            times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def gemm_only(dev, tokens):
    """The four projections alone: what the engine's cuBLASLt GEMMs are measured against."""
    layer_bf16, layer_fp8 = Layer(False, dev), Layer(True, dev)
    with torch.no_grad():
        for name in ["qkv", "o", "gate_up", "down"]:
            inp = layer_bf16.w[name].shape[1]
            x = torch.randn(tokens, inp, device=dev, dtype=torch.bfloat16)
            q, s = quant_rows(x)
            wq, ws = layer_fp8.w[name]
            flops = 2.0 * tokens * layer_bf16.w[name].numel()
            for variant, fn in [("bf16", lambda: F.linear(x, layer_bf16.w[name])),
                                ("fp8", lambda: torch._scaled_mm(q, wq, scale_a=s, scale_b=ws, out_dtype=torch.bfloat16))]:
                ms = median_ms(fn, reps=10)
                print(json.dumps({"kind": "torch_gemm", "variant": variant, "shape": name, "tokens": tokens,
                                  "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}), flush=True)
    del layer_bf16, layer_fp8
    torch.cuda.empty_cache()


def attention_only(dev, label, lens):
    tokens = sum(lens)
    q = torch.randn(tokens, HEADS, HD, device=dev, dtype=torch.bfloat16)
    k = torch.randn(tokens, KV, HD, device=dev, dtype=torch.bfloat16)
    v = torch.randn(tokens, KV, HD, device=dev, dtype=torch.bfloat16)

    def run():
        start = 0
        for n in lens:
            sl = slice(start, start + n)
            F.scaled_dot_product_attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                           v[sl].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
            start += n

    with torch.no_grad():
        ms = median_ms(run, reps=10)
    flops = sum(attention_flops(n) for n in lens)
    print(json.dumps({"kind": "torch_attention", "seqs": label, "tokens": tokens, "ms": round(ms, 4),
                      "tflops": round(flops / ms / 1e9, 1)}), flush=True)


def main():
    dev = torch.device("cuda")
    linear_params = ((HEADS + 2 * KV) * HD * HIDDEN + HIDDEN * HEADS * HD + 2 * INTER * HIDDEN + HIDDEN * INTER)
    print(json.dumps({"kind": "device", "name": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    for variant in ["bf16", "fp8"]:
        torch.manual_seed(0)
        layers = [Layer(variant == "fp8", dev) for _ in range(LAYERS)]
        rng = random.Random(12345)
        for tokens in BATCHES:
            lens = batch(tokens, rng)
            cos, sin = rotary_tables(lens, dev)
            x0 = torch.randn(tokens, HIDDEN, device=dev, dtype=torch.bfloat16)
            out = {}

            def run():
                x = x0
                for layer in layers:
                    x = layer.forward(x, lens, cos, sin)
                out["x"] = x

            with torch.no_grad():
                per_layer = median_ms(run) / LAYERS
            x = out["x"]
            flops = 2.0 * linear_params * tokens + sum(attention_flops(n) for n in lens)
            print(json.dumps({
                "kind": "torch", "variant": variant, "tokens": tokens, "seqs": len(lens), "layers": LAYERS,
                "ms_per_layer": round(per_layer, 3), "tflops": round(flops / per_layer / 1e9, 1),
                "tokens_per_s_80_layers": round(tokens / (per_layer * 80 / 1e3)),
                "nan": bool(torch.isnan(x).any().item()),
            }), flush=True)
        del layers
        torch.cuda.empty_cache()
    # The same shapes as `gpu_bench gemm` (16k tokens) and `gpu_bench time` (attention).
    gemm_only(dev, 16384)
    lens = batch(16384, random.Random(777))
    attention_only(dev, "512-4096", lens)
    attention_only(dev, "4x4096", [4096] * 4)


if __name__ == "__main__":
    main()
