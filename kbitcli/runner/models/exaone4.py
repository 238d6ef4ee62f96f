"""LG EXAONE 4.0 (Exaone4ForCausalLM): OLMo 2's block (the norms after the sublayers, none
before) with Llama's RMSNorm, an RMSNorm of each query and key head before the rotary (as
Qwen3's), no biases, and hybrid attention: a sliding window on the layers layer_types marks (by
default three of every four: sliding_window_pattern), which alone take the rotary; the global
layers use no positions (NoPE). Without a sliding_window (EXAONE 4.0 1.2B) every layer is global
and rotated."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from kbitcli.errors import InputError

from . import llama, olmo2
from .base import RMSNorm, per_layer


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "exaone4"
    # Exaone4Config's defaults
    num_key_value_heads: int | None = 32
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int | None = 2048
    sliding_window: int | None = 4096

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "exaone4"})
        a.attention_bias = a.mlp_bias = False  # not fields of Exaone4Config: its projections have none
        if cfg.get("sliding_window", 4096) is None:  # absent: the default; null: no window, every layer global
            a.sliding_window = None
        if a.layer_types is None:
            every = cfg.get("sliding_window_pattern", 4)
            if a.sliding_window is None:
                a.layer_types = ["full_attention"] * a.num_hidden_layers
            elif isinstance(every, int) and not isinstance(every, bool) and every > 0:
                a.layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                                 for i in range(a.num_hidden_layers)]
            else:
                raise InputError(f"config.json: an exaone4 model with sliding_window_pattern {every!r} needs "
                                 "layer_types")
        per_layer(a, "layer_types")
        return a

    @property
    def qk_norm(self) -> bool:
        return True


class Attention(llama.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        # with a sliding_window, only the windowed layers are rotated
        self.rope = a.sliding_window is None or self.window is not None

    def forward(self, x, cos, sin, step, cache):
        if not self.rope:
            cos = sin = None
        return super().forward(x, cos, sin, step, cache)


class Block(olmo2.Block):
    attention_class = Attention

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        # Llama's RMSNorm (rounded to the compute dtype before the weight), not OLMo 2's
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class Model(llama.Model):
    block_class = Block
