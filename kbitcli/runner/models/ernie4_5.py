"""Baidu ERNIE 4.5 dense models (Ernie4_5ForCausalLM, ERNIE-4.5-0.3B): the Llama layout with
one use_bias for all seven projections (q/k/v/o and the MLP's), the interleaved rotary (adjacent
features rotated as pairs, as GPT-J's: base.apply_rotary_interleaved) computed in float32, and
Ernie4_5Config's defaults: tied embeddings, head_dim 128, RoPE theta 500000."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import llama
from .base import apply_rotary_interleaved, rope_settings


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "ernie4_5"
    # Ernie4_5Config's defaults
    rms_norm_eps: float = 1e-5
    head_dim: int | None = 128
    tie_word_embeddings: bool = True
    use_bias: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "ernie4_5"})
        a.rope = rope_settings(cfg, default_theta=500000.0)
        a.mlp_bias = bool(a.use_bias)
        return a

    @property
    def qkv_bias(self) -> bool:
        return bool(self.use_bias)

    @property
    def o_bias(self) -> bool:
        return bool(self.use_bias)


class Attention(llama.Attention):
    def rotate(self, x, cos, sin):
        # ERNIE's rotate_half pairs x[2i] with x[2i+1]; in float32 as transformers does
        return apply_rotary_interleaved(x.float(), cos.float(), sin.float()).to(x.dtype)


class Block(llama.Block):
    attention_class = Attention


class Model(llama.Model):
    block_class = Block
