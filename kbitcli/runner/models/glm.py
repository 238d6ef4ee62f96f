"""GLM-4 (GlmForCausalLM: glm-4-9b) and GLM-4-0414 (Glm4ForCausalLM): the Llama layout with

* the MLP's gate and up stored as one projection (mlp.gate_up_proj: gate rows, then up rows), as
  Phi-3's (phi3.MLP);
* the rotary on the first part of each head only (partial_rotary_factor, 0.5 by default) and in
  GLM's layout: adjacent features rotated as pairs (base.apply_rotary_interleaved, as GPT-J's);
* biases on q/k/v by default (attention_bias), never on o_proj or the MLP, and GlmConfig's
  other defaults (head_dim 128, 2 key/value heads, rms_norm_eps 1.5625e-7);
* GLM-4-0414: two more RMSNorms a block, on the attention's and the MLP's outputs before they
  join the residual (post_self_attn_layernorm, post_mlp_layernorm)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import llama, phi3
from .base import RMSNorm, apply_rotary_interleaved, rope_settings


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "glm"
    # GlmConfig's and Glm4Config's defaults
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    rms_norm_eps: float = 1.5625e-7
    max_position_embeddings: int | None = 131072
    attention_bias: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        mt = "glm4" if cfg.get("model_type") == "glm4" else "glm"
        a = super().from_config({**cfg, "model_type": mt})
        a.rope = rope_settings(cfg, default_partial=0.5)
        a.mlp_bias = False  # GLM's MLP has no biases (not a field of its configurations)
        return a

    @property
    def o_bias(self) -> bool:
        return False


class Attention(llama.Attention):
    def rotate(self, x, cos, sin):
        # GLM pairs x[2i] with x[2i+1] on the first cos.shape[-1] features, in the compute dtype
        return apply_rotary_interleaved(x, cos, sin)


class Block(llama.Block):
    attention_class = Attention
    mlp_class = phi3.MLP

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.post_norms = a.model_type == "glm4"
        if self.post_norms:  # GLM-4-0414 normalises each sublayer's output too
            self.post_self_attn_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, cos, sin, step, cache):
        if not self.post_norms:
            return super().forward(x, cos, sin, step, cache)
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, step, cache))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Model(llama.Model):
    block_class = Block
