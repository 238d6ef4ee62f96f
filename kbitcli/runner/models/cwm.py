"""Meta Code World Model (CwmForCausalLM, CWM 32B): the Llama layout with a sliding window on the
layers layer_types marks, and CwmConfig's defaults where config.json leaves them out: three of
every four layers windowed (layers 0, 4, 8, ... global), a window of 8192, head_dim 128, 8
key/value heads, rms_norm_eps 1e-5, and the llama3 RoPE (theta 1e6, factor 16 over 8192
positions) when config.json has no RoPE parameters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import llama
from .base import per_layer

#: CwmConfig's RoPE parameters when config.json gives none
DEFAULT_ROPE = {"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 16.0, "high_freq_factor": 4.0,
                "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "cwm"
    # CwmConfig's defaults
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int | None = 131072
    sliding_window: int | None = 8192

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        if not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):
            cfg = {**cfg, "rope_parameters": DEFAULT_ROPE}
        a = super().from_config({**cfg, "model_type": "cwm"})
        a.attention_bias = False  # not a field of CwmConfig: no attention biases
        a.sliding_window = cfg.get("sliding_window", 8192) or None  # absent: the default; null or 0: none
        if a.layer_types is None:
            a.layer_types = ["full_attention" if i % 4 == 0 else "sliding_attention"
                             for i in range(a.num_hidden_layers)]
        per_layer(a, "layer_types")
        return a


Model = llama.Model
