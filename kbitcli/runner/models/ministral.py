"""Ministral (MinistralForCausalLM, Ministral-8B-Instruct-2410): Mistral with the sliding window
on the layers layer_types marks (llama.ModelArgs.window reads them); without layer_types, on every
layer (as Mistral's). MinistralConfig's defaults: 8 key/value heads, a window of 4096."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import llama
from .base import per_layer


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "ministral"
    # MinistralConfig's defaults
    num_key_value_heads: int | None = 8
    max_position_embeddings: int | None = 131072
    sliding_window: int | None = 4096

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "ministral"})
        if cfg.get("sliding_window", 4096) is None:  # absent: the default; null: no window
            a.sliding_window = None
        per_layer(a, "layer_types")
        return a

    def window(self, layer: int) -> int | None:
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        return self.sliding_window


Model = llama.Model
