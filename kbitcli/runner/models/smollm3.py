"""SmolLM3 (SmolLM3ForCausalLM): the Llama layout where some layers use no positional encoding
at all (NoPE): no_rope_layers[i] is 1 for a layer with the rotary, 0 for one without (by default
every 4th layer has none); a sliding window only with use_sliding_window, on the layers that
layer_types marks; tied embeddings by default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import llama
from .base import per_layer, positive


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "smollm3"
    tie_word_embeddings: bool = True  # SmolLM3Config's default
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "smollm3"})
        positive(a, "no_rope_layer_interval", arch="smollm3")
        per_layer(a, "no_rope_layers", "layer_types")
        return a

    def rope_layer(self, layer: int) -> bool:
        if self.no_rope_layers is not None:
            return bool(self.no_rope_layers[layer])
        return (layer + 1) % self.no_rope_layer_interval != 0

    def window(self, layer: int) -> int | None:
        if not self.use_sliding_window or not self.sliding_window:
            return None
        if self.layer_types is None:  # SmolLM3Config's default: the window on the NoPE layers
            return None if self.rope_layer(layer) else self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


class Attention(llama.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.rope = a.rope_layer(layer)

    def forward(self, x, cos, sin, step, cache):
        if not self.rope:
            cos = sin = None
        return super().forward(x, cos, sin, step, cache)


class Block(llama.Block):
    attention_class = Attention


class Model(llama.Model):
    block_class = Block
