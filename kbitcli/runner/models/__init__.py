"""One module per architecture; a config.json finds its module through MODEL_MODULES
(mlx-lm style: the name map plus importlib).

Every supported model_type of kbitcli.architectures.SUPPORTED_ARCHITECTURES must appear
here; tests check the two tables agree.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Mapping

from kbitcli.architectures import (LANGUAGE_MODELS, MULTIMODAL_TEXT, SUPPORTED_ARCHITECTURES, config_architecture,
                                   config_classes, describe_supported, language_model_type)
from kbitcli.errors import UnsupportedArchitectureError

#: model_type -> module of kbitcli.runner.models
MODEL_MODULES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "smollm3": "smollm3",
    "granite": "granite",
    "olmo2": "olmo2",
    "olmo3": "olmo2",
    "arcee": "arcee",
    "ernie4_5": "ernie4_5",
    "seed_oss": "seed_oss",
    "glm": "glm",
    "glm4": "glm",
    "exaone4": "exaone4",
    "olmo": "olmo",
    "helium": "helium",
    "ministral": "ministral",
    "ministral3": "ministral3",
    "cwm": "cwm",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "opt": "opt",
    "bloom": "bloom",
    "gptj": "gptj",
    "gpt_neo": "gpt_neo",
    "gpt_bigcode": "gpt_bigcode",
    "falcon": "falcon",
    "phi3": "phi3",
    "phi": "phi",
    "stablelm": "stablelm",
    "starcoder2": "starcoder2",
    "mixtral": "moe",
    "qwen2_moe": "moe",
    "qwen3_moe": "moe",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "olmoe": "olmoe",
    "phimoe": "phimoe",
    "glm4_moe": "glm4_moe",
    "dots1": "glm4_moe",
    "ernie4_5_moe": "ernie4_5_moe",
    "hunyuan_v1_moe": "hunyuan_v1_moe",
    "gpt_oss": "gpt_oss",
    "llama4_text": "llama4",
    "granitemoe": "granitemoe",
    "granitemoeshared": "granitemoe",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "cohere": "cohere",
    "cohere2": "cohere",
    "nemotron": "nemotron",
    "hunyuan_v1_dense": "hunyuan_v1_dense",
    "apertus": "apertus",
    "internlm3": "internlm3",
    "vaultgemma": "vaultgemma",
    "persimmon": "persimmon",
    "mpt": "mpt",
    "codegen": "codegen",
    # multimodal checkpoints, run as their language model
    "gemma3": "multimodal",
    "llava": "multimodal",
    "llava_next": "multimodal",
    "mistral3": "multimodal",
    "idefics3": "multimodal",
    "smolvlm": "multimodal",
    "qwen2_vl": "multimodal",
    "qwen2_5_vl": "multimodal",
    "llama4": "multimodal",
    "llava_onevision": "multimodal",
    "vipllava": "multimodal",
    "video_llava": "multimodal",
    "llava_next_video": "multimodal",
    "aya_vision": "multimodal",
    "cohere2_vision": "multimodal",
    "internvl": "multimodal",
    "idefics2": "multimodal",
    "deepseek_vl": "multimodal",
    "janus": "multimodal",
    "qwen3_vl": "multimodal",
    "glm4v": "multimodal",
}

_CLASS_TO_TYPE = {cls: mt for mt, classes in SUPPORTED_ARCHITECTURES.items() for cls in classes}


def model_type_of(config: Mapping[str, Any]) -> str:
    """The supported model_type of a config (by its architectures class, else model_type);
    UnsupportedArchitectureError listing the supported ones otherwise, or naming the language
    model of a multimodal class when kbit does not run that one."""
    archs = config_classes(config)
    found = next((_CLASS_TO_TYPE[a] for a in archs if a in _CLASS_TO_TYPE and _CLASS_TO_TYPE[a] in MODEL_MODULES), None)
    mt = str(config.get("model_type") or "")
    if found is None and not archs and mt in MODEL_MODULES and mt in SUPPORTED_ARCHITECTURES:
        found = mt
    if found in MULTIMODAL_TEXT and language_model_type(config, found) is None:
        text = config.get("text_config")
        raise UnsupportedArchitectureError(
            f"the language model of this {config_architecture(config)} (text_config model_type "
            f"{text.get('model_type') if isinstance(text, Mapping) else None!r}) is not supported by kbit's runner; "
            f"supported: {', '.join(LANGUAGE_MODELS)}")
    if found is not None:
        return found
    raise UnsupportedArchitectureError(
        f"the architecture {config_architecture(config)} is not supported by kbit's runner; "
        f"supported: {describe_supported()}")


def get_module(config: Mapping[str, Any]) -> ModuleType:
    return importlib.import_module(f"{__name__}.{MODEL_MODULES[model_type_of(config)]}")


def build_args(config: Mapping[str, Any]):
    """(module, ModelArgs) for a config.json."""
    module = get_module(config)
    cfg = dict(config)
    cfg.setdefault("model_type", model_type_of(config))
    return module, module.ModelArgs.from_config(cfg)


__all__ = ["MODEL_MODULES", "build_args", "get_module", "model_type_of"]
