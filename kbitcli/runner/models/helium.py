"""Kyutai Helium (HeliumForCausalLM, Helium-1 2B): the Llama layout with RMSNorms that multiply
by their weight in float32 before rounding (OLMo 2's: olmo2.Olmo2RMSNorm), GLM's rotary layout
over the whole head (adjacent features rotated as pairs: glm.Attention), no bias on o_proj, and
HeliumConfig's defaults (head_dim 128, 20 key/value heads, rms_norm_eps 1e-8, RoPE theta 100000)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import glm, llama
from .base import rope_settings
from .olmo2 import Olmo2RMSNorm


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "helium"
    # HeliumConfig's defaults
    num_key_value_heads: int | None = 20
    head_dim: int | None = 128
    rms_norm_eps: float = 1e-8
    max_position_embeddings: int | None = 4096

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "helium"})
        a.rope = rope_settings(cfg, default_theta=100000.0)
        return a

    @property
    def o_bias(self) -> bool:
        return False


class Block(llama.Block):
    attention_class = glm.Attention
    norm_class = Olmo2RMSNorm


class Model(llama.Model):
    block_class = Block
    norm_class = Olmo2RMSNorm
