#!/usr/bin/env bash
# SAMPLE stand-in for gpu_bench and torch_ref.py in the dry run of scripts/gpu_check.sh
# (tests/gpu_check_dry_run.rs): prints benches/gpu/sample/<command>.jsonl (invented numbers, marked
# as sample). FAKE_FAIL / FAKE_HANG (comma-separated commands) make a command exit 3 after
# printing, or print and then hang until the script's timeout kills it.
set -u
cmd=${1:-}
file="$(dirname "$0")/$cmd.jsonl"
[ -f "$file" ] || { echo "fake_gpu_bench: unknown command '$cmd'" >&2; exit 2; }
cat "$file"
case ",${FAKE_HANG:-}," in *",$cmd,"*) sleep 600 ;; esac
case ",${FAKE_FAIL:-}," in *",$cmd,"*) echo "Error: sample failure of $cmd" >&2; exit 3 ;; esac
exit 0
