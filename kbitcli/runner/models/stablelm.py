"""StableLM (StableLmForCausalLM: StableLM-3B-4E1T, StableLM 2, StableCode): the Llama layout with
LayerNorms (with bias) in place of the RMSNorms, partial rotary embeddings (partial_rotary_factor,
0.25 by default), optional q/k/v biases (use_qkv_bias), an optional LayerNorm of each query and
key head before the rotary, one per head and without bias (qk_layernorm: q_layernorm.norms.<h>),
and an optional parallel residual (use_parallel_residual: x + attn(ln x) + mlp(ln x) from the one
input_layernorm, and no post_attention_layernorm). phi.py builds Phi on these classes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import llama
from .base import rope_settings


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "stablelm"
    layer_norm_eps: float = 1e-5
    use_qkv_bias: bool = False
    qk_layernorm: bool = False
    use_parallel_residual: bool = False
    #: the configuration class's partial_rotary_factor, for a config.json that gives none
    partial_rotary: ClassVar[float] = 0.25

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": cls.model_type})
        a.rope = rope_settings(cfg, default_partial=cls.partial_rotary)
        a.rms_norm_eps = a.layer_norm_eps  # the epsilon llama's classes read: here the LayerNorms'
        return a

    @property
    def qkv_bias(self) -> bool:
        return bool(self.use_qkv_bias)

    @property
    def o_bias(self) -> bool:
        return False


class HeadLayerNorms(nn.Module):
    """StableLM's q/k norm: one LayerNorm without bias per head (norms.<h>.weight), over
    [..., heads, head_dim]; computed for all heads at once."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps, bias=False) for _ in range(heads))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.stack([n.weight for n in self.norms])  # [heads, head_dim]
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * weight


class Attention(llama.Attention):
    """llama.Attention with this family's optional LayerNorms of each query and key head
    (q_layernorm, k_layernorm, from qk_layernorm()) before the rotary."""

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.q_layernorm = self.qk_layernorm(a, self.nh) if a.qk_layernorm else None
        self.k_layernorm = self.qk_layernorm(a, self.nkv) if a.qk_layernorm else None

    def qk_layernorm(self, a: ModelArgs, heads: int) -> nn.Module:
        return HeadLayerNorms(self.hd, heads, a.layer_norm_eps)

    def norm_qk(self, q, k):
        return (q, k) if self.q_layernorm is None else (self.q_layernorm(q), self.k_layernorm(k))


class Block(llama.Block):
    attention_class = Attention

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.parallel = a.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(a.hidden_size, a.layer_norm_eps)
        self.post_attention_layernorm = None if self.parallel else nn.LayerNorm(a.hidden_size, a.layer_norm_eps)

    def forward(self, x, cos, sin, step, cache):
        h = self.input_layernorm(x)
        attn = self.self_attn(h, cos, sin, step, cache)
        if self.parallel:  # the MLP reads the same normalised input as the attention
            return x + attn + self.mlp(h)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(llama.Model):
    block_class = Block
    norm_class = nn.LayerNorm
