"""GPT-Neo (GPTNeoForCausalLM): GPT-2's block and learned positions (gpt2.py) with nn.Linear layers
and GPT-J's separate q/k/v projections without biases (gptj.Attention: no rotary here), a bias on
out_proj, scores NOT scaled by 1/sqrt(head_dim), and attention_types alternating global layers with
local ones, which attend over the last window_size positions only. The attention of a layer is
stored one level down (h.<i>.attn.attention.q_proj), as transformers nests it."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from kbitcli.errors import InputError

from . import gpt2, gptj
from .base import attention, positive

ALIASES = {**gpt2.ALIASES, "num_layers": "n_layer", "num_heads": "n_head", "intermediate_size": "n_inner"}


@dataclass
class ModelArgs(gpt2.ModelArgs):
    # GPTNeoConfig's defaults
    n_positions: int = 2048
    attention_types: list | None = None
    window_size: int = 256
    arch: ClassVar[str] = "gpt_neo"
    aliases: ClassVar[Mapping[str, str]] = ALIASES

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config(cfg)
        positive(a, "window_size", arch="gpt_neo")
        a.attention_types = a.attention_types or [[["global", "local"], 12]]
        layers = a.attention_layers
        if len(layers) != a.n_layer or not set(layers) <= {"global", "local"}:
            raise InputError(f"config.json: attention_types must give each of the {a.n_layer} layers 'global' or "
                             f"'local' attention for a gpt_neo model, got {a.attention_types!r}")
        return a

    @property
    def attention_layers(self) -> list:
        """attention_types expanded to one type per layer ([[["global", "local"], 2]] -> global, local,
        global, local); [] when it is malformed."""
        try:
            return [kind for kinds, repeat in self.attention_types for _ in range(repeat) for kind in kinds]
        except (TypeError, ValueError):
            return []

    def window(self, layer: int) -> int | None:
        return self.window_size if self.attention_layers[layer] == "local" else None


class SelfAttention(gptj.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer, out_bias=True)
        self.scale = 1.0
        self.window = a.window(layer)

    def attend(self, q, k, v, step):
        # unscaled scores, so computed in float32 as transformers' GPT-Neo does (float16 may overflow)
        return attention(q.float(), k.float(), v.float(), step, self.scale, window=self.window).to(q.dtype)


class Attention(nn.Module):
    """transformers' GPTNeoAttention: only holds the layer, as .attention."""

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.attention = SelfAttention(a, layer)

    def forward(self, x, step, cache):
        return self.attention(x, None, None, step, cache)  # no rotary


class Block(gpt2.Block):
    attention_class = Attention
    mlp_class = gpt2.LinearMLP


_BUFFER = re.compile(r"\.attn\.attention\.(bias|masked_bias)$")  # the causal masks of old checkpoints


class Model(gpt2.Model):
    block_class = Block

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        return None if _BUFFER.search(name) else gpt2.Model.checkpoint_name(name)
