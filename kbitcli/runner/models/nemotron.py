"""NVIDIA Nemotron (NemotronForCausalLM: Nemotron-3/4, Minitron): Arcee's layout (an up_proj ->
ReLU² -> down_proj MLP, no gate) with LayerNorms whose weight is stored minus one
(LayerNorm1P: layer_norm(x) * (1 + w) + b) in place of the RMSNorms, partial rotary embeddings
(half of each head by default), attention_bias on q/k/v/o and mlp_bias (NemotronConfig's
defaults: norm_eps 1e-5, 4096 positions)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch.nn.functional as F
from torch import nn

from . import arcee, llama
from .base import rope_settings


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "nemotron"
    # NemotronConfig's defaults
    norm_eps: float = 1e-5
    hidden_act: str = "relu2"
    max_position_embeddings: int | None = 4096

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "nemotron"})
        a.rope = rope_settings(cfg, default_partial=0.5)
        a.rms_norm_eps = a.norm_eps  # the epsilon llama's classes read: here the LayerNorms'
        return a


class LayerNorm1P(nn.LayerNorm):
    """A LayerNorm (with bias) whose stored weight is its scale minus one."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class Block(llama.Block):
    mlp_class = arcee.MLP

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.input_layernorm = LayerNorm1P(a.hidden_size, a.norm_eps)
        self.post_attention_layernorm = LayerNorm1P(a.hidden_size, a.norm_eps)


class Model(llama.Model):
    block_class = Block
    norm_class = LayerNorm1P
