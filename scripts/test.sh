#!/usr/bin/env bash
# The test command (README and .ci/run): every test of the crate, the CUDA engine's host side
# and kernel compilation included (no GPU needed). Expects the tools .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."

# The real Llama-3.1 vocabulary, converted from the tiktoken file that the llama-models package
# ships (Meta's files are never committed), with transformers' token ids for the fixtures.
if [ ! -f target/llama3-tokenizer/reference_ids.json ]; then
    python3 scripts/llama3_tokenizer.py target/llama3-tokenizer
fi

# The default build needs no CUDA at all; the tests also build the `cuda` feature's host code.
cargo check --locked --all-targets
cargo test --locked --all-targets --features cuda
