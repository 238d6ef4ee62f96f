"""Cohere (CohereForCausalLM: Command-R, Command-R+, Aya 23) and Cohere 2 (Cohere2ForCausalLM:
Command R7B, Command A): the Llama layout with

* LayerNorms without bias, computed in float32, one a block: the attention and the MLP read the
  same normalised input and both are added to the residual (a parallel block);
* the interleaved rotary (adjacent features rotated as pairs: base.apply_rotary_interleaved, as
  GPT-J's), computed in float32;
* the logits multiplied by logit_scale; tied embeddings by default;
* Cohere: an optional LayerNorm of each query and key head before the rotary (use_qk_norm; one
  weight row per head: q_norm.weight is [heads, head_dim]);
* Cohere 2: a sliding window on the layers layer_types marks (or three of every four:
  sliding_window_pattern, when the config predates layer_types), and the rotary on those layers
  only: the full-attention layers use no positions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from . import llama
from .base import apply_rotary_interleaved, per_layer


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "cohere"
    # CohereConfig's / Cohere2Config's defaults
    max_position_embeddings: int | None = 8192
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    logit_scale: float = 0.0625
    use_qk_norm: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        mt = str(cfg.get("model_type") or "cohere")
        a = super().from_config({**cfg, "model_type": mt})
        a.rms_norm_eps = a.layer_norm_eps  # the epsilon llama's classes read: here the LayerNorms'
        if mt == "cohere2":
            a.use_qk_norm = False  # Cohere2Config has none
            a.head_dim = a.hidden_size // a.num_attention_heads  # Cohere2Config always derives it
            if "sliding_window" not in cfg:  # absent: the default; null: no window
                a.sliding_window = 4096
            if a.layer_types is None:
                every = int(cfg.get("sliding_window_pattern") or 4)
                a.layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                                 for i in range(a.num_hidden_layers)]
            per_layer(a, "layer_types")
        return a


class LayerNorm(nn.Module):
    """Cohere's LayerNorm: no bias; mean, variance and the weight's product in float32, then cast
    back. `shape` is the normalised size, or (heads, head_dim) for the q/k norms (each head's
    features normalised, with the weights of its row)."""

    def __init__(self, shape: int | tuple[int, int], eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        return (self.weight.float() * ((h - mean) * torch.rsqrt(var + self.eps))).to(x.dtype)


class Attention(llama.Attention):
    """llama.Attention with the interleaved rotary (none on Cohere 2's full-attention layers) and
    Cohere's q/k LayerNorms."""

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        # Cohere 2 rotates exactly where a window applies (a null sliding_window: nowhere)
        self.rope = a.model_type != "cohere2" or self.window is not None
        if a.use_qk_norm:
            self.q_norm = LayerNorm((self.nh, self.hd), a.layer_norm_eps)
            self.k_norm = LayerNorm((self.nkv, self.hd), a.layer_norm_eps)

    def forward(self, x, cos, sin, step, cache):
        if not self.rope:
            cos = sin = None
        return super().forward(x, cos, sin, step, cache)

    def rotate(self, x, cos, sin):
        # in float32 from cos and sin rounded to the compute dtype, as transformers does
        return apply_rotary_interleaved(x.float(), cos.float(), sin.float()).to(x.dtype)


class Block(llama.Block):
    attention_class = Attention

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.input_layernorm = LayerNorm(a.hidden_size, a.layer_norm_eps)
        self.post_attention_layernorm = None

    def forward(self, x, cos, sin, step, cache):
        h = self.input_layernorm(x)
        return x + self.self_attn(h, cos, sin, step, cache) + self.mlp(h)


class Model(llama.Model):
    block_class = Block
    norm_class = LayerNorm

    def logits(self, x):
        return super().logits(x) * self.args.logit_scale
