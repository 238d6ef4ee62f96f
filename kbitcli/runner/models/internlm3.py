"""InternLM 3 (InternLM3ForCausalLM, internlm3-8b-instruct): the Llama layout under another
model_type, with InternLM3Config's defaults (head_dim 128, 2 key/value heads, epsilon 1e-5) and its
key names: qkv_bias (attention_bias: q/k/v and o_proj) and bias (mlp_bias), which transformers
requires to be equal."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from kbitcli.errors import InputError

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "internlm3"
    # InternLM3Config's defaults
    num_key_value_heads: int | None = 2
    head_dim: int | None = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int | None = 32768

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        # InternLM3's own keys, under their Llama names (a Llama name present wins)
        cfg = {"attention_bias": cfg.get("qkv_bias"), "mlp_bias": cfg.get("bias"), **cfg}
        a = super().from_config({**cfg, "model_type": "internlm3"})
        if bool(a.attention_bias) != bool(a.mlp_bias):
            raise InputError(f"config.json: an internlm3 model has one bias setting for the attention and the MLP; "
                             f"got qkv_bias (attention_bias) {a.attention_bias} and bias (mlp_bias) {a.mlp_bias}")
        return a


Model = llama.Model
