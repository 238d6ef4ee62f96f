"""OLMo 2 (Olmo2ForCausalLM): the Llama layout with the norms after the sublayers instead of
before them (x + norm(attention(x)), then x + norm(mlp(x)); no input norm), an RMSNorm over the
whole query and key projections (all heads of a token together) before the rotary, and RMSNorms
that multiply by their weight in float32 and round afterwards.

OLMo 3 (Olmo3ForCausalLM) is OLMo 2 with a sliding window on the layers layer_types marks (by
default three of every four) and a RoPE setting per layer type (transformers 5's
rope_parameters per type; older configs scale only the full-attention layers' RoPE)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import llama
from .base import RMSNorm, per_layer, rope_settings


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-5  # Olmo2Config's default
    model_type: str = "olmo2"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        if str(cfg.get("model_type")) != "olmo3":
            return super().from_config({**cfg, "model_type": "olmo2"})
        full, local = _olmo3_rope(cfg)
        a = super().from_config({**full, "model_type": "olmo3"})
        a.rope_local = rope_settings(local)
        a.sliding_window = cfg.get("sliding_window", 4096)  # Olmo3Config's default
        if a.layer_types is None:
            a.layer_types = ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
                             for i in range(a.num_hidden_layers)]
        per_layer(a, "layer_types")
        return a

    @property
    def qk_norm(self) -> bool:
        return True


def _olmo3_rope(cfg: Mapping[str, Any]) -> tuple[dict, dict]:
    """config.json with the full-attention layers' RoPE in place of its own, and the sliding
    layers' RoPE as a config rope_settings reads (theta 500000 by default)."""
    rp = cfg.get("rope_parameters") or {}
    if isinstance(rp, Mapping) and any(isinstance(v, Mapping) for v in rp.values()):
        full, local = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
    else:  # before transformers 5: rope_theta for both, rope_scaling for the full-attention layers
        full, local = dict(rp or cfg.get("rope_scaling") or {}), {}
    theta = cfg.get("rope_theta", 500000.0)
    full.setdefault("rope_theta", theta)
    local.setdefault("rope_theta", theta)
    rest = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    return {**rest, "rope_parameters": full}, {"rope_parameters": local,
                                               "max_position_embeddings": cfg.get("max_position_embeddings")}


class Olmo2RMSNorm(RMSNorm):
    round_first = False


class HeadsRMSNorm(Olmo2RMSNorm):
    """One RMSNorm over all heads of a token ([..., heads, head_dim] in and out): OLMo 2
    normalises the query and key projections as a whole."""

    def forward(self, x):
        return super().forward(x.flatten(-2)).view(x.shape)


class Attention(llama.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.q_norm = HeadsRMSNorm(self.nh * self.hd, a.rms_norm_eps)
        self.k_norm = HeadsRMSNorm(self.nkv * self.hd, a.rms_norm_eps)


class Block(llama.Block):
    attention_class = Attention

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        del self.input_layernorm
        self.post_attention_layernorm = Olmo2RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_feedforward_layernorm = Olmo2RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, cos, sin, step, cache):
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, step, cache))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Model(llama.Model):
    block_class = Block
    norm_class = Olmo2RMSNorm
