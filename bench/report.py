#!/usr/bin/env python3
"""Turn the JSON lines of gpu_bench and torch_ref.py (files given as arguments) into the
Markdown table that goes into BENCHMARKS.md. Prints only what the runs measured."""
import json
import sys


def main():
    rows = [json.loads(l) for f in sys.argv[1:] for l in open(f) if l.startswith("{")]
    device = next((r["name"] for r in rows if r["kind"] == "device"), "?")
    checks = [r for r in rows if r["kind"] == "check"]
    gemms = [r for r in rows if r["kind"] == "gemm"]
    ceiling = max((g["tflops"] for g in gemms if g["shape"] == "square"), default=None)
    print(f"Device: {device}\n")
    if checks:
        bad = [c["kernel"] for c in checks if not c["pass"]]
        worst = max(checks, key=lambda c: c["rel_err"])
        print(f"Kernel checks: {len(checks) - len(bad)}/{len(checks)} pass; worst {worst['kernel']} "
              f"rel err {worst['rel_err']:.2e}" + (f"; FAILED: {', '.join(bad)}" if bad else "") + "\n")
    for p in (r for r in rows if r["kind"] == "parity"):
        if "skipped" in p:
            print(f"- parity {p['fixture']}: skipped ({p['skipped']})")
        else:
            print(f"- parity {p['fixture']} vs {p['against']}: max |Δreward| {p['max_abs_diff']:.2e} "
                  f"(max |reward| {p['max_abs_reward']:.2e}) {'pass' if p['pass'] else 'FAIL'}")
    if gemms:
        print()
        print("| cuBLASLt FP8 GEMM | m×n×k | fast accum | scales | ms | TFLOP/s |")
        print("|---|---|---|---|---|---|")
        for g in gemms:
            print(f"| {g['shape']} | {g['m']}×{g['n']}×{g['k']} | {g['fast_accum']} | {g['mode']} | {g['ms']} | {g['tflops']} |")
        print()
    ours = {r["tokens"]: r for r in rows if r["kind"] == "layers"}
    torch_rows = {(r["variant"], r["tokens"]): r for r in rows if r["kind"] == "torch"}
    if ours or torch_rows:
        print("| batch tokens | engine | layers run | ms/layer | tokens/s (80 layers) | TFLOP/s | % of FP8 ceiling | × torch bf16 | × torch fp8 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for tokens in sorted({t for t in ours} | {t for _, t in torch_rows}):
            tb, tf = torch_rows.get(("bf16", tokens)), torch_rows.get(("fp8", tokens))
            for name, r in [("scorestream fp8", ours.get(tokens)), ("torch bf16", tb), ("torch fp8 _scaled_mm", tf)]:
                if not r:
                    continue
                pct = f"{100 * r['tflops'] / ceiling:.0f} %" if ceiling else "-"
                x_bf16 = f"{r['tokens_per_s_80_layers'] / tb['tokens_per_s_80_layers']:.2f}" if tb else "-"
                x_fp8 = f"{r['tokens_per_s_80_layers'] / tf['tokens_per_s_80_layers']:.2f}" if tf else "-"
                nan = " (NaN!)" if r.get("nan") else ""
                print(f"| {tokens} | {name}{nan} | {r['layers']} | {r['ms_per_layer']} | {r['tokens_per_s_80_layers']} | "
                      f"{r['tflops']} | {pct} | {x_bf16} | {x_fp8} |")
    if ceiling:
        print(f"\nFP8 ceiling: {ceiling} TFLOP/s (best cuBLASLt 8192³ run above).")


if __name__ == "__main__":
    main()
