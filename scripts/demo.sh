#!/usr/bin/env bash
# The main job end to end, on the embedded default (no arguments, no network):
#   set up (if needed) -> convert SmolLM2-135M-Instruct to 4 bits -> verify every tensor against
#   the source -> generate with the 4-bit model -> compare it with the source on real Wikipedia
#   text, failing (non-zero exit) if perplexity, KL divergence or top-1 agreement are off.
# Extra arguments go to `kbit quantize` (e.g. --bits 3 --dtype lloyd).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
out=kbit-out/SmolLM2-135M-Instruct-kbit
kbit quantize embedded "$out" --force "$@"
kbit verify "$out" --against embedded --max-error 0.25
kbit generate "$out" --prompt "The capital of France is" --max-new-tokens 12 --device cpu
kbit compare "$out" embedded --dataset wiki --max-tokens 2048 --ctx 512 \
  --max-ppl-ratio 1.5 --max-kld 0.5 --min-top1 0.6
