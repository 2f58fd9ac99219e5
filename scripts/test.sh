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

# The NATS worker tests again, against a current nats-server release (.ci/run installs it).
if [ -n "${SCORESTREAM_CURRENT_NATS_SERVER:-}" ]; then
    "$SCORESTREAM_CURRENT_NATS_SERVER" --version
    SCORESTREAM_NATS_SERVER="$SCORESTREAM_CURRENT_NATS_SERVER" \
        cargo test --locked --features cuda --test nats_worker --test nats_reliability --test nats_outage --test nats_routing
elif [ -n "${CI:-}" ]; then
    echo "SCORESTREAM_CURRENT_NATS_SERVER is not set: .ci/run installs a current nats-server" >&2
    exit 1
fi
