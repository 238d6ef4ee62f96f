"""Tencent Hunyuan dense models (HunYuanDenseV1ForCausalLM: Hunyuan-0.5B to 7B): the Llama layout
with an RMSNorm of each query and key head applied after the rotary (query_layernorm,
key_layernorm; Qwen3's come before it), attention_bias on q/k/v/o, an MLP without biases, and
Hunyuan's NTK-alpha RoPE: a "dynamic" rope_scaling with an `alpha` is the default rotary with
the base theta * alpha ** (head_dim / (head_dim - 2)), whatever the sequence length."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import llama
from .base import RMSNorm


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "hunyuan_v1_dense"
    rms_norm_eps: float = 1e-5  # HunYuanDenseV1Config's default
    max_position_embeddings: int | None = 2048

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "hunyuan_v1_dense"})
        a.mlp_bias = False  # HunYuan's MLP has none, whatever config.json says
        rope = a.rope
        if rope["rope_type"] == "dynamic" and rope.get("alpha"):
            d = a.head_dim
            a.rope = {**rope, "rope_type": "default", "rope_theta": rope["rope_theta"] * rope["alpha"] ** (d / (d - 2))}
        return a


class Attention(llama.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.query_layernorm = RMSNorm(self.hd, a.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.hd, a.rms_norm_eps)

    def position(self, q, k, cos, sin):
        q, k = super().position(q, k, cos, sin)
        return self.query_layernorm(q), self.key_layernorm(k)


class Block(llama.Block):
    attention_class = Attention


class Model(llama.Model):
    block_class = Block
