"""The language model of multimodal checkpoints, run on text only: Llava (llava-1.5), LLaVA-NeXT
(llava-1.6), LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA, VipLlava, Mistral 3 (Mistral Small
3.1 / 3.2; Ministral 3), Idefics2, Idefics3 and SmolVLM, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3 (4B-27B),
Llama 4 (Scout, Maverick), Aya Vision and Command A Vision (Cohere 2), InternVL (the -hf
checkpoints), DeepSeek-VL, Janus and GLM-4.1V. Each is a supported text model inside a wrapper
class (kbitcli.architectures.MULTIMODAL_TEXT and LANGUAGE_MODELS): the text model's module runs it,
with these differences.

* Settings: config.json's text_config over the defaults of the text model's configuration class
  (TEXT_DEFAULTS: Hub configs list only what differs, e.g. llava-1.5's names no hidden_size);
  Qwen2-VL's first configs hold them at the top level. The head is tied when the wrapper (by its
  configuration class's default when config.json names none: `Wrapper.tied`) or its text_config
  says so (transformers 5 reads the wrapper's flag, older releases the text model's), unless the
  checkpoint stores a head of its own (`for_checkpoint`): transformers then keeps it.
* Tensor names: the wrapper's (Hub files: language_model.model.layers..., language_model.lm_head;
  transformers 5: model.language_model.layers..., lm_head; Idefics2/3: model.text_model...; Qwen2-VL:
  model.layers... or model.language_model.layers...) map to the text model's (`Layout`); the vision
  tower and the projector (Janus: its image generation parts too) are not loaded.
* Qwen2-VL's, Qwen3-VL's (interleaved) and GLM-4.1V's M-RoPE give the three sections of a text
  token the same position, which is the plain rotary of the text model (an "mrope" type is read as
  the default one); Qwen3-VL's deepstack adds the vision features at image positions only.
* GLM-4.1V's text model is GLM-4-0414's, with its own defaults: the rotary over the whole head
  and head_dim hidden_size / heads (`_DERIVED_HEAD_DIM`).
* Aya Vision's and Command A Vision's logits are multiplied by Cohere 2's logit_scale, as their
  text model (and vLLM) does; transformers 5's wrappers apply a head of their own without it.

Not among them: PaliGemma, whose language model attends bidirectionally over the whole prompt (a
prefix LM), which the runner's causal attention does not do; Mllama (Llama 3.2 Vision), whose
language model has cross-attention layers of its own; FastVLM (Qwen2), whose vision tower needs
timm, which the tests cannot build."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from torch import nn

from kbitcli.architectures import LANGUAGE_MODELS, MULTIMODAL_TEXT, config_architecture
from kbitcli.errors import InputError

from . import MODEL_MODULES, model_type_of


@dataclass(frozen=True)
class Layout:
    """Where a wrapper keeps its language model's tensors: stored name prefix -> the text model's
    (the first match wins), and the prefixes of the parts the runner does not load."""

    text: tuple[tuple[str, str], ...]
    skip: tuple[str, ...]

    def text_name(self, name: str) -> str | None:
        if name.startswith(self.skip):
            return None
        for prefix, to in self.text:
            if name.startswith(prefix):
                return to + name[len(prefix):]
        return name


#: Llava's layout (also Mistral 3 and Gemma 3): the Hub names, then transformers 5's
_LLAVA = Layout(text=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                      ("model.language_model.", "model.")),
                skip=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."))
#: Idefics3's and SmolVLM's (transformers names them the same in the Hub files and in memory)
_IDEFICS3 = Layout(text=(("model.text_model.", "model."),), skip=("model.vision_model.", "model.connector."))
#: Qwen2-VL's: the Hub files name the language model as Qwen2's own (model.layers...), transformers 5
#: as model.language_model.layers...
_QWEN2_VL = Layout(text=(("model.language_model.", "model."),), skip=("visual.", "model.visual."))
#: LLaVA-NeXT's (also LLaVA-OneVision): Llava's and the image_newline vector
_LLAVA_NEXT = Layout(_LLAVA.text, _LLAVA.skip + ("image_newline", "model.image_newline"))
#: Qwen3-VL's and GLM-4.1V's: transformers 5's names in the Hub files too
_QWEN3_VL = Layout(_QWEN2_VL.text, ("model.visual.",))
#: DeepSeek-VL's and Janus's: transformers 5's names in the Hub files too (the vision parts differ)
_DEEPSEEK_VL = Layout(_QWEN2_VL.text, ("model.vision_model.", "model.aligner."))


@dataclass(frozen=True)
class Wrapper:
    layout: Layout
    flat: bool = False           # the text settings may be config.json's own (Qwen2-VL's first configs)
    tied: bool = False           # the configuration class's tie_word_embeddings, when config.json has none


WRAPPERS: dict[str, Wrapper] = {
    "gemma3": Wrapper(_LLAVA, tied=True),
    "llava": Wrapper(_LLAVA),
    "llava_next": Wrapper(_LLAVA_NEXT),
    "mistral3": Wrapper(_LLAVA, tied=True),
    "idefics3": Wrapper(_IDEFICS3),
    "smolvlm": Wrapper(_IDEFICS3),
    "qwen2_vl": Wrapper(_QWEN2_VL, flat=True),
    "qwen2_5_vl": Wrapper(_QWEN2_VL, flat=True),
    "llama4": Wrapper(Layout(_LLAVA.text, ("vision_model.", "multi_modal_projector.", "model.vision_model.",
                                          "model.multi_modal_projector."))),
    "llava_onevision": Wrapper(_LLAVA_NEXT),
    "vipllava": Wrapper(_LLAVA),
    "video_llava": Wrapper(Layout(_LLAVA.text, ("image_tower.", "video_tower.", "multi_modal_projector.",
                                                "model.image_tower.", "model.video_tower.",
                                                "model.multi_modal_projector."))),
    "llava_next_video": Wrapper(Layout(_LLAVA.text, _LLAVA_NEXT.skip + ("vision_resampler.",
                                                                        "model.vision_resampler."))),
    "aya_vision": Wrapper(_LLAVA, tied=True),
    "cohere2_vision": Wrapper(_LLAVA, tied=True),
    "internvl": Wrapper(_LLAVA, tied=True),
    "idefics2": Wrapper(_IDEFICS3),
    "deepseek_vl": Wrapper(_DEEPSEEK_VL, tied=True),
    "janus": Wrapper(Layout(_DEEPSEEK_VL.text, _DEEPSEEK_VL.skip + (
        "model.vqmodel.", "model.generation_embeddings.", "model.generation_aligner.", "model.generation_head.")),
        tied=True),
    "qwen3_vl": Wrapper(_QWEN3_VL),
    "glm4v": Wrapper(_QWEN3_VL),
}

#: the defaults of the language models' configuration classes (tested against transformers'),
#: for the fields a text_config may leave out; those the runner derives as transformers does
#: (num_key_value_heads, head_dim from the other sizes) are not listed
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=1e4,
                  tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6, max_position_embeddings=131072,
                    rope_theta=1e4, sliding_window=4096, tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1e4,
                  sliding_window=None, max_window_layers=28, tie_word_embeddings=False),
    # its rotaries' defaults are gemma._gemma3_rope's
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                        max_position_embeddings=131072, sliding_window=4096, tie_word_embeddings=True),
    "qwen2_vl_text": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                          max_position_embeddings=32768, rope_theta=1e6, sliding_window=None, max_window_layers=80),
}
TEXT_DEFAULTS["qwen2_5_vl_text"] = TEXT_DEFAULTS["qwen2_vl_text"]
TEXT_DEFAULTS["qwen3"] = dict(TEXT_DEFAULTS["qwen2"], head_dim=128)
TEXT_DEFAULTS["qwen3_vl_text"] = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                                      num_hidden_layers=32, num_attention_heads=32, head_dim=128, rms_norm_eps=1e-6,
                                      max_position_embeddings=128000, rope_theta=5e5)
# GLM-4.1V's text model is GLM-4-0414's with Glm4vTextConfig's defaults: the rotary over the whole head
# (GLM-4's: half) and head_dim hidden_size / heads (GLM-4's: 128, _DERIVED_HEAD_DIM)
TEXT_DEFAULTS["glm4v_text"] = dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                                   num_attention_heads=32, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   max_position_embeddings=32768, rope_theta=1e4, partial_rotary_factor=1.0)
# the window and its layers (three of every four) are cohere.ModelArgs's defaults
TEXT_DEFAULTS["cohere2"] = dict(vocab_size=256000, hidden_size=8192, intermediate_size=22528, num_hidden_layers=40,
                                num_attention_heads=64, layer_norm_eps=1e-5, max_position_embeddings=8192,
                                rope_theta=1e4, logit_scale=0.0625, tie_word_embeddings=True)
TEXT_DEFAULTS["llama4_text"] = {}  # llama4.ModelArgs applies Llama4TextConfig's defaults itself
# Ministral 3 (Ministral3Config; inside Mistral3ForConditionalGeneration); its YaRN defaults are ministral3.py's
TEXT_DEFAULTS["ministral3"] = dict(vocab_size=131072, hidden_size=4096, intermediate_size=14336, num_hidden_layers=34,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                  max_position_embeddings=262144, sliding_window=None, tie_word_embeddings=False)
#: the language models whose configuration class always derives head_dim, where the module that runs
#: them defaults it otherwise
_DERIVED_HEAD_DIM = frozenset({"glm4v_text"})


def text_config(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the runner's model_type of the language model, its config.json) of a multimodal config."""
    mt = model_type_of(cfg)  # by the architectures class: a config.json's model_type may differ
    wrapper = WRAPPERS[mt]
    text = cfg.get("text_config")
    if text is None and wrapper.flat:
        text = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "vision_config")}
    if not isinstance(text, Mapping):
        raise InputError(f"config.json of a {config_architecture(cfg)} model has no text_config")
    name = str(text.get("model_type") or MULTIMODAL_TEXT[mt])  # one of LANGUAGE_MODELS (model_type_of checked)
    out = {**TEXT_DEFAULTS[name], **text, "model_type": LANGUAGE_MODELS[name]}
    size, heads = out.get("hidden_size"), out.get("num_attention_heads")
    if name in _DERIVED_HEAD_DIM and out.get("head_dim") is None and isinstance(size, int) and isinstance(heads, int) \
            and heads > 0:  # (bad sizes are the text module's to report)
        out["head_dim"] = size // heads
    tied = cfg.get("tie_word_embeddings", wrapper.tied)
    out["tie_word_embeddings"] = bool(tied) or bool(out.get("tie_word_embeddings"))
    for key in ("rope_parameters", "rope_scaling"):
        rp = out.get(key)
        if isinstance(rp, Mapping) and (rp.get("rope_type") or rp.get("type")) == "mrope":
            out[key] = {**{k: v for k, v in rp.items() if k != "type"}, "rope_type": "default"}
    return LANGUAGE_MODELS[name], out


@dataclass
class ModelArgs:
    model_type: str        # the wrapper's
    text_type: str         # the runner's model_type of its language model
    text: Any              # that model's ModelArgs

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        text_type, text = text_config(cfg)
        return cls(model_type_of(cfg), text_type, _text_module(text_type).ModelArgs.from_config(text))


def _text_module(text_type: str):
    return importlib.import_module(f"{__package__}.{MODEL_MODULES[text_type]}")


def for_checkpoint(args: ModelArgs, names: Iterable[str]) -> ModelArgs:
    """A head tied by config.json but stored in the checkpoint is used as stored (transformers 5
    ties a multimodal model by the wrapper's flag, which Mistral 3 sets by default, and keeps a
    stored head that differs)."""
    layout = WRAPPERS[args.model_type].layout
    if args.text.tie_word_embeddings and any(layout.text_name(n) == "lm_head.weight" for n in names):
        args.text.tie_word_embeddings = False
    return args


class LanguageModel:
    """Mixed in before a text module's Model: the wrapper's tensor names."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args.text)  # type: ignore[call-arg]
        self.layout = WRAPPERS[args.model_type].layout
        self.language_model_type = args.text_type

    def checkpoint_name(self, name: str) -> str | None:
        name = self.layout.text_name(name)
        return None if name is None else super().checkpoint_name(name)  # type: ignore[misc]


_CLASSES: dict[type, type] = {}


def Model(args: ModelArgs) -> nn.Module:  # noqa: N802 - the module protocol's name
    """The text module's Model with LanguageModel mixed in (one class per text model class)."""
    base = _text_module(args.text_type).Model
    cls = _CLASSES.get(base)
    if cls is None:
        name = f"LanguageModel{base.__module__.rsplit('.', 1)[-1].title()}"  # LanguageModelLlama, ...
        cls = _CLASSES[base] = type(name, (LanguageModel, base), {})
    return cls(args)
