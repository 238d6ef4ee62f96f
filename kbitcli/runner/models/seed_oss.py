"""ByteDance Seed-OSS (SeedOssForCausalLM): the Llama layout with biases on q/k/v by default
(attention_bias, True) and on the output projection only with attention_out_bias, and
head_dim 128 unless config.json says otherwise (SeedOssConfig's defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "seed_oss"
    # SeedOssConfig's defaults
    head_dim: int | None = 128
    attention_bias: bool = True
    attention_out_bias: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        return super().from_config({**cfg, "model_type": "seed_oss"})

    @property
    def o_bias(self) -> bool:
        return bool(self.attention_out_bias)


Model = llama.Model
