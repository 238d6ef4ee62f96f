"""kbit's standalone runner: load a kbit model (or the checkpoint it came from) and generate
text with plain torch. No transformers at run time.

    from kbitcli.runner import load, generate
    model, tok, config = load("out/SmolLM2-kbit", device="cpu")
    print(generate(model, tok, "The capital of France is", max_new_tokens=16).completions[0].text)

Modules: load (checkpoints -> model), layers (KbitLinear), models/ (one per architecture),
generate (KV cache, batching, sampling, streaming), tokenizer (tokenizer.json, chat template).
"""
from __future__ import annotations

from .generate import Completion, GenerationResult, SamplingParams, generate, generate_ids
from .layers import KbitLinear, dequantize_torch
from .load import load, parameter_bytes, resolve_device

__all__ = ["Completion", "GenerationResult", "KbitLinear", "SamplingParams", "dequantize_torch", "generate",
           "generate_ids", "load", "parameter_bytes", "resolve_device"]
