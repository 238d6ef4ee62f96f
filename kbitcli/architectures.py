"""The model architectures kbit's runner supports: the single source of truth.

`kbit pull` refuses other architectures before downloading any weights (unless --any-arch),
and the runner uses the same table to decide whether it can run a converted model.

Each entry maps a Hugging Face `model_type` (config.json "model_type") to the class
names that config.json lists under "architectures".
"""
from __future__ import annotations

from typing import Any, Mapping

SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaForCausalLM",),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "qwen3": ("Qwen3ForCausalLM",),
    "smollm3": ("SmolLM3ForCausalLM",),
    "granite": ("GraniteForCausalLM",),
    "olmo2": ("Olmo2ForCausalLM",),
    "olmo3": ("Olmo3ForCausalLM",),
    "gpt2": ("GPT2LMHeadModel",),
    "gpt_neox": ("GPTNeoXForCausalLM",),
    "opt": ("OPTForCausalLM",),
    "bloom": ("BloomForCausalLM",),
    "phi3": ("Phi3ForCausalLM",),
    "phi": ("PhiForCausalLM",),
    "stablelm": ("StableLmForCausalLM",),
    "starcoder2": ("Starcoder2ForCausalLM",),
    "mixtral": ("MixtralForCausalLM",),
    "qwen2_moe": ("Qwen2MoeForCausalLM",),
    "qwen3_moe": ("Qwen3MoeForCausalLM",),
    "gemma": ("GemmaForCausalLM",),
    "gemma2": ("Gemma2ForCausalLM",),
    "gemma3_text": ("Gemma3ForCausalLM",),
    "gemma3": ("Gemma3ForConditionalGeneration",),  # its language model (kbit runs text only)
}

SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset(SUPPORTED_ARCHITECTURES)
SUPPORTED_CLASSES: frozenset[str] = frozenset(c for cs in SUPPORTED_ARCHITECTURES.values() for c in cs)


def describe_supported() -> str:
    """'LlamaForCausalLM (llama), MistralForCausalLM (mistral), ...' for messages."""
    return ", ".join(f"{'/'.join(cs)} ({mt})" for mt, cs in SUPPORTED_ARCHITECTURES.items())


def config_architecture(config: Mapping[str, Any]) -> str:
    """A short label of a config's architecture: its first class name, else its model_type."""
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if archs:
        return str(archs[0])
    return str(config.get("model_type") or "unknown")


def is_supported_config(config: Mapping[str, Any]) -> bool:
    """True when config.json names a supported class or model_type.

    A config whose "architectures" list is present decides by it (a supported model_type
    with an unsupported head class, e.g. LlamaForSequenceClassification, is refused);
    otherwise the model_type decides.
    """
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if archs:
        return any(a in SUPPORTED_CLASSES for a in archs)
    return str(config.get("model_type") or "") in SUPPORTED_MODEL_TYPES
