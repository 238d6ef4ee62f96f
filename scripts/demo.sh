#!/usr/bin/env bash
# Set up (if needed), convert the embedded SmolLM2-135M-Instruct to 4 bits, then check the result.
# No arguments, no network. Extra arguments go to `kbit quantize` (e.g. --bits 3 --dtype lloyd).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=kbit-out/SmolLM2-135M-Instruct-kbit
kbit quantize embedded "$out" --force "$@"
kbit verify "$out" --against embedded --max-error 0.25
