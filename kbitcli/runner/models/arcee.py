"""Arcee AFM (ArceeForCausalLM, AFM-4.5B): the Llama layout with an MLP of two projections and
no gate (down_proj(act(up_proj(x))), the activation ReLU² by default)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from . import llama
from .base import activation


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "arcee"
    # ArceeConfig's defaults
    rms_norm_eps: float = 1e-5
    hidden_act: str = "relu2"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        return super().from_config({**cfg, "model_type": "arcee"})


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.act = activation(a.hidden_act, a.model_type)

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


class Block(llama.Block):
    mlp_class = MLP


class Model(llama.Model):
    block_class = Block
