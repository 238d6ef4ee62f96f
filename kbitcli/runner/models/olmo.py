"""OLMo 1 (OlmoForCausalLM: OLMo-1B-hf, OLMo-7B-hf, OLMo-1.7): the Llama layout with LayerNorms
that have no weight and no bias (in float32, epsilon 1e-5, not in config.json), the queries, keys
and values clipped to [-clip_qkv, clip_qkv] when config.json sets clip_qkv, attention_bias on all
four attention projections, and the rotary in float32 (cos and sin not rounded to the compute
dtype)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from . import base, llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "olmo"
    max_position_embeddings: int | None = 2048  # OlmoConfig's default
    clip_qkv: float | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "olmo"})
        a.rms_norm_eps = 1e-5  # the epsilon of OLMo's LayerNorms, fixed
        a.mlp_bias = False
        if a.clip_qkv is not None and (not isinstance(a.clip_qkv, (int, float)) or isinstance(a.clip_qkv, bool)
                                       or a.clip_qkv <= 0):
            raise InputError(f"config.json: clip_qkv must be a positive number or null for an olmo model, "
                             f"got {a.clip_qkv!r}")
        return a


class LayerNorm(nn.Module):
    """OLMo's LayerNorm: no parameters, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.dim,), eps=self.eps).to(x.dtype)


class Attention(llama.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.clip = a.clip_qkv

    def project(self, x):
        q, k, v = super().project(x)
        if self.clip is None:
            return q, k, v
        return tuple(t.clamp(-self.clip, self.clip) for t in (q, k, v))

    def rotate(self, x, cos, sin):
        # in float32 (cos and sin are), rounded back to the compute dtype, as transformers does
        return base.apply_rotary(x.float(), cos, sin).to(x.dtype)


class Block(llama.Block):
    attention_class = Attention
    norm_class = LayerNorm


class Model(llama.Model):
    block_class = Block
    norm_class = LayerNorm

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.rotary = base.Float32Rotary.from_settings(args.rope, args.head_dim)
