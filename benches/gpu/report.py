#!/usr/bin/env python3
"""Turn the JSON lines of gpu_bench and torch_ref.py (files given as arguments, as written by
scripts/gpu_check.sh) into the Markdown that goes into BENCHMARKS.md. Prints only what the
runs measured; lines that are not JSON objects (logs, a line cut off by a timeout) are skipped,
and a missing or empty file only leaves its section out. Rows from benches/gpu/sample/ carry
{"kind": "sample"}: the output then says, first and last, that nothing in it was measured.
Standard library only."""
import json
import re
import sys

SAMPLE_BANNER = "**SAMPLE DATA: recorded format from benches/gpu/sample/, NOT a measurement.**"


def is_error(line):
    """Rust's `Error: ...` / `error: ...`, a panic, or Python's final `SomeError: ...` line."""
    return bool(re.match(r"[\w.]*(Error|Exception)\b|error:", line)) or "panicked" in line


def read_rows(paths):
    """Every JSON object with a "kind"; a step row also gets "why": the file's last error line
    (else its last line of text), so a failed step's table row says what went wrong."""
    rows = []
    for path in paths:
        text_lines, errors = [], []
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if not line.startswith("{"):
                        if line:
                            text_lines.append(line)
                            if is_error(line):
                                errors.append(line)
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(row, dict) and "kind" in row:
                        if row["kind"] == "step" and row.get("status") != "ok":
                            why = (errors or text_lines or [""])[-1]
                            row["why"] = why if len(why) <= 160 else why[:157] + "..."
                        rows.append(row)
        except OSError as e:
            print(f"(cannot read {path}: {e.strerror})")
    return rows


def of(rows, kind):
    return [r for r in rows if r.get("kind") == kind]


def table(header, body):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in body:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


def environment(rows):
    dev = next((r for r in rows if r.get("kind") == "device"), None)
    detail = ""
    if dev and "arch" in dev:
        cap = f"compute capability {dev['capability']}, " if "capability" in dev else ""
        prec = f", best precision {dev['precision']}" if "precision" in dev else ""
        detail = f" ({cap}{dev.get('arch')}, {dev.get('sms')} SMs{prec})"
    print(f"Device: {dev.get('name', '?') if dev else '?'}" + detail + "\n")
    for e in of(rows, "env")[:1]:
        print(f"- driver CUDA {e.get('driver_cuda')}; NVRTC {e.get('nvrtc')} ({e.get('nvrtc_path')}); "
              f"cuBLASLt {e.get('cublaslt')}")
    for m in of(rows, "memory")[:1]:
        print(f"- memory: {m['free_bytes'] / 2**30:.1f} GiB free of {m['total_bytes'] / 2**30:.1f} GiB; kernels: {m.get('kernels')}")
        if m.get("loaded"):
            print(f"- libraries loaded: {', '.join(m['loaded'])}")
    print()


def steps(rows):
    st = of(rows, "step")
    if st:
        table(["step", "status", "exit code", "seconds", "limit s", "last error"],
              [[s.get("step"), s.get("status"), s.get("rc"), s.get("seconds"), s.get("limit"),
                s.get("why", "").replace("|", "/")] for s in st])


def checks(rows):
    cs = of(rows, "check")
    if cs:
        bad = [c["kernel"] for c in cs if not c.get("pass")]
        worst = max(cs, key=lambda c: c.get("rel_err", 0))
        print(f"Kernel checks: {len(cs) - len(bad)}/{len(cs)} pass; worst {worst['kernel']} "
              f"rel err {worst['rel_err']:.2e}" + (f"; FAILED: {', '.join(bad)}" if bad else "") + "\n")
    for p in of(rows, "parity"):
        prec = f" {p['precision']}" if "precision" in p else ""
        # The v2 attention rows and the shared-prefix (tree) rows name what they ran.
        prec += "".join(f" {key} {p[key]}" for key in ("layout", "attention") if key in p)
        if "skipped" in p:
            print(f"- parity {p['fixture']}{prec}: skipped ({p['skipped']})")
        else:
            print(f"- parity {p['fixture']}{prec} vs {p['against']}: max |Δreward| {p['max_abs_diff']:.2e} "
                  f"(max |reward| {p['max_abs_reward']:.2e}) {'pass' if p['pass'] else 'FAIL'}")
    print()


def gemms(rows):
    gs = of(rows, "gemm")
    if gs:
        table(["cuBLASLt GEMM", "dtype", "m×n×k", "fast accum", "scales", "ms", "TFLOP/s"],
              [[g["shape"], g.get("dtype", "fp8"), f"{g['m']}×{g['n']}×{g['k']}", g["fast_accum"], g["mode"], g["ms"],
                g["tflops"]] for g in gs])
    tg = of(rows, "torch_gemm")
    if tg:
        table(["torch GEMM only", "tokens", "variant", "ms", "TFLOP/s"],
              [[g["shape"], g["tokens"], g["variant"], g["ms"], g["tflops"]] for g in tg])


def kernel_times(rows):
    ks = of(rows, "kernel_time")
    if ks:
        table(["kernel alone", "tokens", "ms", "GB/s", "TFLOP/s"],
              [[k["kernel"] + (f" ({k['seqs']})" if "seqs" in k else ""), k.get("tokens", "-"), k["ms"],
                k.get("gb_per_s", "-"), k.get("tflops", "-")] for k in ks])
    ta = of(rows, "torch_attention")
    if ta:
        table(["torch SDPA attention only", "tokens", "ms", "TFLOP/s"],
              [[a["seqs"], a["tokens"], a["ms"], a["tflops"]] for a in ta])


def layers(rows, ceiling):
    for m in of(rows, "layers_memory"):
        dtype = m.get("dtype", "fp8")
        print(f"Layer loop ({dtype}): {m['layers']} layers resident ({m['layers'] * m['layer_bytes'] / 2**30:.1f} GiB of "
              f"{dtype} weights, {m['workspace_bytes'] / 2**30:.1f} GiB of activations; "
              f"{m['free_after'] / 2**30:.1f} GiB left)\n")
    ours = {(r.get("dtype", "fp8"), r["tokens"]): r for r in of(rows, "layers")}
    torch_rows = {(r["variant"], r["tokens"]): r for r in of(rows, "torch")}
    if not (ours or torch_rows):
        return
    body = []
    for tokens in sorted({t for _, t in ours} | {t for _, t in torch_rows}):
        tb, tf = torch_rows.get(("bf16", tokens)), torch_rows.get(("fp8", tokens))
        for name, r in [("scorestream fp8", ours.get(("fp8", tokens))), ("scorestream bf16", ours.get(("bf16", tokens))),
                        ("torch bf16", tb), ("torch fp8 _scaled_mm", tf)]:
            if not r:
                continue
            pct = f"{100 * r['tflops'] / ceiling:.0f} %" if ceiling else "-"
            x_bf16 = f"{r['tokens_per_s_80_layers'] / tb['tokens_per_s_80_layers']:.2f}" if tb else "-"
            x_fp8 = f"{r['tokens_per_s_80_layers'] / tf['tokens_per_s_80_layers']:.2f}" if tf else "-"
            nan = " (NaN!)" if r.get("nan") else ""
            body.append([tokens, name + nan, r["layers"], r["ms_per_layer"], r["tokens_per_s_80_layers"],
                         r["tflops"], pct, x_bf16, x_fp8])
    table(["batch tokens", "engine", "layers run", "ms/layer", "tokens/s (80 layers)", "TFLOP/s",
           "% of FP8 ceiling", "× torch bf16", "× torch fp8"], body)


def loads(rows):
    for p in of(rows, "load_parity"):
        if "skipped" in p:
            print(f"- load parity {p['fixture']} {p['precision']}: skipped ({p['skipped']})")
            continue
        where = "on the device" if p.get("on_device") else "host fallback"
        gate = "" if p.get("gated", True) else ", not gated: FP8 checkpoint codes as stored"
        print(f"- load parity {p['fixture']} {p['precision']} ({where}): {p['differing_bytes']} of {p['bytes']} "
              f"weight bytes differ from the host load{gate} {'pass' if p['pass'] else 'FAIL'}")
    if of(rows, "load_parity"):
        print()
    for c in of(rows, "load_checkpoint"):
        print(f"Load checkpoint: 70B-shaped bf16, {c['layers']} layers (the disk held {c['fit']}), "
              f"{c['bytes'] / 1e9:.1f} GB written at {c['write_gb_per_s']} GB/s\n")
    ls = of(rows, "load")
    if ls:
        table(["load path", "precision", "layers", "GB read", "seconds", "GB/s", "reader s", "upload wait s", "cold cache"],
              [[l["path"], l["precision"], l["layers"], f"{l['read_bytes'] / 1e9:.2f}", l["seconds"], l["gb_per_s"],
                l["reader_seconds"], l["upload_wait_seconds"], l["page_cache_dropped"]] for l in ls])


def hops(rows):
    for p in of(rows, "hop_parity"):
        if "error" in p:
            print(f"- hop parity {p['fixture']}: FAIL ({p['error']})")
        else:
            print(f"- hop parity {p['fixture']} ({p['stages']}): max |Δreward| {p['max_abs_diff']:.2e} "
                  f"{'pass' if p['pass'] else 'FAIL'}")
    if of(rows, "hop_parity"):
        print()
    hs = of(rows, "hop")
    if hs:
        table(["hop", "tokens", "MB", "hop ms", "GB/s", "layer ms", "hop / layer", "host round trip ms", "exact"],
              [[h["hop"], h["tokens"], f"{h['bytes'] / 1e6:.0f}", h["hop_ms"], h["gb_per_s"], h["layer_ms"],
                h["hop_per_layer"], h["host_round_trip_ms"], h["exact"]] for h in hs])


def section(fn, *args):
    """One section; a malformed row loses only its own section, never the rest of the table."""
    try:
        fn(*args)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        print(f"\n({fn.__name__}: malformed rows, section left out: {type(e).__name__} {e})\n")


def main():
    rows = read_rows(sys.argv[1:])
    sample = any(r.get("kind") == "sample" for r in rows)
    if sample:
        print(SAMPLE_BANNER + "\n")
    for fn in (environment, steps, checks, gemms, kernel_times):
        section(fn, rows)
    ceiling = bf16_ceiling = None
    try:
        square = [g for g in of(rows, "gemm") if g.get("shape") == "square"]
        ceiling = max((g["tflops"] for g in square if g.get("dtype", "fp8") == "fp8"), default=None)
        bf16_ceiling = max((g["tflops"] for g in square if g.get("dtype") == "bf16"), default=None)
    except (KeyError, TypeError):
        pass
    section(layers, rows, ceiling)
    section(loads, rows)
    section(hops, rows)
    if ceiling:
        print(f"FP8 ceiling: {ceiling} TFLOP/s (best cuBLASLt 8192³ run above).")
    if bf16_ceiling:
        print(f"bf16 ceiling: {bf16_ceiling} TFLOP/s (best cuBLASLt bf16 8192³ run above).")
    if sample:
        print("\n" + SAMPLE_BANNER)


if __name__ == "__main__":
    main()
