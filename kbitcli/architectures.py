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
    "arcee": ("ArceeForCausalLM",),
    "ernie4_5": ("Ernie4_5ForCausalLM",),
    "seed_oss": ("SeedOssForCausalLM",),
    "glm": ("GlmForCausalLM",),
    "glm4": ("Glm4ForCausalLM",),
    "exaone4": ("Exaone4ForCausalLM",),
    "olmo": ("OlmoForCausalLM",),
    "helium": ("HeliumForCausalLM",),
    "ministral": ("MinistralForCausalLM",),
    "ministral3": ("Ministral3ForCausalLM",),
    "cwm": ("CwmForCausalLM",),
    "gpt2": ("GPT2LMHeadModel",),
    "gpt_neox": ("GPTNeoXForCausalLM",),
    "opt": ("OPTForCausalLM",),
    "bloom": ("BloomForCausalLM",),
    "gptj": ("GPTJForCausalLM",),
    "gpt_neo": ("GPTNeoForCausalLM",),
    "gpt_bigcode": ("GPTBigCodeForCausalLM",),
    "falcon": ("FalconForCausalLM",),
    "phi3": ("Phi3ForCausalLM",),
    "phi": ("PhiForCausalLM",),
    "stablelm": ("StableLmForCausalLM",),
    "starcoder2": ("Starcoder2ForCausalLM",),
    "mixtral": ("MixtralForCausalLM",),
    "qwen2_moe": ("Qwen2MoeForCausalLM",),
    "qwen3_moe": ("Qwen3MoeForCausalLM",),
    "deepseek_v2": ("DeepseekV2ForCausalLM",),
    "deepseek_v3": ("DeepseekV3ForCausalLM",),
    "olmoe": ("OlmoeForCausalLM",),
    "phimoe": ("PhimoeForCausalLM",),
    "glm4_moe": ("Glm4MoeForCausalLM",),
    "dots1": ("Dots1ForCausalLM",),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM",),
    "hunyuan_v1_moe": ("HunYuanMoEV1ForCausalLM",),
    "gpt_oss": ("GptOssForCausalLM",),
    "llama4_text": ("Llama4ForCausalLM",),
    "granitemoe": ("GraniteMoeForCausalLM",),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM",),
    "gemma": ("GemmaForCausalLM",),
    "gemma2": ("Gemma2ForCausalLM",),
    "gemma3_text": ("Gemma3ForCausalLM",),
    "cohere": ("CohereForCausalLM",),
    "cohere2": ("Cohere2ForCausalLM",),
    "nemotron": ("NemotronForCausalLM",),
    "hunyuan_v1_dense": ("HunYuanDenseV1ForCausalLM",),
    "apertus": ("ApertusForCausalLM",),
    "internlm3": ("InternLM3ForCausalLM",),
    "vaultgemma": ("VaultGemmaForCausalLM",),
    "persimmon": ("PersimmonForCausalLM",),
    "mpt": ("MptForCausalLM",),
    "codegen": ("CodeGenForCausalLM",),
    # multimodal checkpoints: kbit runs their language model, text only (MULTIMODAL_TEXT)
    "gemma3": ("Gemma3ForConditionalGeneration",),
    "llava": ("LlavaForConditionalGeneration",),
    "llava_next": ("LlavaNextForConditionalGeneration",),
    "mistral3": ("Mistral3ForConditionalGeneration",),
    "idefics3": ("Idefics3ForConditionalGeneration",),
    "smolvlm": ("SmolVLMForConditionalGeneration",),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration",),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration",),
    "llama4": ("Llama4ForConditionalGeneration",),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration",),
    "vipllava": ("VipLlavaForConditionalGeneration",),
    "video_llava": ("VideoLlavaForConditionalGeneration",),
    "llava_next_video": ("LlavaNextVideoForConditionalGeneration",),
    "aya_vision": ("AyaVisionForConditionalGeneration",),
    "cohere2_vision": ("Cohere2VisionForConditionalGeneration",),
    "internvl": ("InternVLForConditionalGeneration",),
    "idefics2": ("Idefics2ForConditionalGeneration",),
    "deepseek_vl": ("DeepseekVLForConditionalGeneration",),
    "janus": ("JanusForConditionalGeneration",),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration",),
    "glm4v": ("Glm4vForConditionalGeneration",),
}

#: the multimodal model_types above -> the model_type of their language model when config.json's
#: text_config names none (what their configuration classes assume)
MULTIMODAL_TEXT: dict[str, str] = {
    "gemma3": "gemma3_text", "llava": "llama", "llava_next": "llama", "mistral3": "mistral", "idefics3": "llama",
    "smolvlm": "llama", "qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text", "llama4": "llama4_text",
    "llava_onevision": "qwen2", "vipllava": "llama", "video_llava": "llama", "llava_next_video": "llama",
    "aya_vision": "cohere2", "cohere2_vision": "cohere2", "internvl": "qwen2", "idefics2": "mistral",
    "deepseek_vl": "llama", "janus": "llama", "qwen3_vl": "qwen3_vl_text", "glm4v": "glm4v_text",
}
#: the language models kbit runs inside them: text_config model_type -> the supported model_type
#: that runs it (Qwen2-VL's text model is Qwen2: for text only its M-RoPE is the plain rotary)
LANGUAGE_MODELS: dict[str, str] = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3_text": "gemma3_text", "qwen2_vl_text": "qwen2",
    "qwen2_5_vl_text": "qwen2", "llama4_text": "llama4_text", "cohere2": "cohere2", "qwen3": "qwen3",
    "qwen3_vl_text": "qwen3", "glm4v_text": "glm4", "ministral3": "ministral3",
}

SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset(SUPPORTED_ARCHITECTURES)
SUPPORTED_CLASSES: frozenset[str] = frozenset(c for cs in SUPPORTED_ARCHITECTURES.values() for c in cs)


def describe_supported() -> str:
    """'LlamaForCausalLM (llama), MistralForCausalLM (mistral), ...' for messages."""
    return ", ".join(f"{'/'.join(cs)} ({mt})" for mt, cs in SUPPORTED_ARCHITECTURES.items())


def config_classes(config: Mapping[str, Any]) -> list[str]:
    """The class names config.json lists under "architectures" (a single string counts as one)."""
    archs = config.get("architectures") or []
    return [archs] if isinstance(archs, str) else list(archs)


def config_model_types(config: Mapping[str, Any]) -> list[str]:
    """The supported model_types a config names: by its classes when it lists any (a supported
    model_type with an unsupported head class names none), else by its model_type."""
    archs = config_classes(config)
    if archs:
        return [mt for mt, cs in SUPPORTED_ARCHITECTURES.items() if any(a in cs for a in archs)]
    return [mt for mt in [str(config.get("model_type") or "")] if mt in SUPPORTED_MODEL_TYPES]


def config_architecture(config: Mapping[str, Any]) -> str:
    """A short label of a config's architecture: its first class name, else its model_type."""
    archs = config_classes(config)
    if archs:
        return str(archs[0])
    return str(config.get("model_type") or "unknown")


def is_supported_config(config: Mapping[str, Any]) -> bool:
    """True when config.json names a supported class or model_type.

    A config whose "architectures" list is present decides by it (a supported model_type
    with an unsupported head class, e.g. LlamaForSequenceClassification, is refused);
    otherwise the model_type decides. A multimodal class (MULTIMODAL_TEXT) needs a language model
    of LANGUAGE_MODELS in its text_config.
    """
    # a multimodal class counts when its language model is one kbit runs
    return any(mt not in MULTIMODAL_TEXT or language_model_type(config, mt) is not None
               for mt in config_model_types(config))


def is_multimodal_config(config: Mapping[str, Any]) -> bool:
    """True when config.json names one of the multimodal wrappers of MULTIMODAL_TEXT."""
    return any(mt in MULTIMODAL_TEXT for mt in config_model_types(config))


def language_model_type(config: Mapping[str, Any], model_type: str) -> str | None:
    """The supported model_type of the language model of a multimodal config (model_type is one of
    MULTIMODAL_TEXT: its text_config's model_type, else the class's default), None when kbit does
    not run that language model. Qwen2-VL's first configs hold the text settings at the top level."""
    text = config.get("text_config")
    name = text.get("model_type") if isinstance(text, Mapping) else None
    return LANGUAGE_MODELS.get(str(name or MULTIMODAL_TEXT[model_type]))
