"""Ministral 3 (Ministral3ForCausalLM, the language model of Ministral 3 3B-14B): Mistral with the
queries scaled by position after the rotary (Llama 4's attention temperature: times
1 + llama_4_scaling_beta * log(1 + floor(position / original_max_position_embeddings)), both
from the RoPE parameters), a sliding window on every layer only when config.json sets one, and
Ministral3Config's defaults (head_dim 128, 8 key/value heads, rms_norm_eps 1e-5, and YaRN with
theta 1e6, factor 16 over 16384 positions and beta 0.1 when config.json has no RoPE parameters)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from kbitcli.errors import InputError

from . import llama

#: Ministral3Config's RoPE parameters when config.json gives none
DEFAULT_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "ministral3"
    # Ministral3Config's defaults
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int | None = 262144

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        if not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):
            cfg = {**cfg, "rope_parameters": DEFAULT_ROPE}
        a = super().from_config({**cfg, "model_type": "ministral3"})
        for key in ("llama_4_scaling_beta", "original_max_position_embeddings"):
            if not isinstance(a.rope.get(key), (int, float)):
                raise InputError(f"config.json: the RoPE parameters of a ministral3 model need {key}")
        return a

    def window(self, layer: int) -> int | None:
        return self.sliding_window  # Mistral's attention: on every layer (layer_types is not read)


class Attention(llama.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.beta = float(a.rope["llama_4_scaling_beta"])
        self.old = a.rope["original_max_position_embeddings"]

    def attend(self, q, k, v, step):
        # the rotated queries times Llama 4's temperature of their position ([B, S] -> [B, 1, S, 1])
        scale = 1 + self.beta * torch.log(1 + torch.floor(step.positions / self.old))
        return super().attend(q * scale[:, None, :, None].to(q.dtype), k, v, step)


class Block(llama.Block):
    attention_class = Attention


class Model(llama.Model):
    block_class = Block
