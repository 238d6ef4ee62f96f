"""IBM Granite 3.x dense models (GraniteForCausalLM): the Llama layout with four scalar
multipliers from config.json: the embedding times embedding_multiplier, each block's attention
and MLP outputs times residual_multiplier before they join the residual, attention_multiplier as
the attention scale (in place of head_dim ** -0.5), and the logits divided by logits_scaling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "granite"
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        return super().from_config({**cfg, "model_type": "granite"})

    @property
    def scale(self) -> float:
        return float(self.attention_multiplier)


class Block(llama.Block):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.residual = float(a.residual_multiplier)

    def forward(self, x, cos, sin, step, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache) * self.residual
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual


class Model(llama.Model):
    block_class = Block

    def embed(self, input_ids):
        return super().embed(input_ids) * float(self.args.embedding_multiplier)

    def logits(self, x):
        return super().logits(x) / float(self.args.logits_scaling)
