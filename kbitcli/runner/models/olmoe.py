"""OLMoE (OlmoeForCausalLM): moe.py's Qwen-style sparse block on every layer (a float32 softmax
router `mlp.gate` over num_experts, the top num_experts_per_tok, renormalised with norm_topk_prob
and rounded to the compute dtype; experts of intermediate_size stored per expert as
mlp.experts.N.gate_proj / up_proj / down_proj) in Llama's pre-norm layout, with OLMo 2's RMSNorm
over the whole query and key projections (all heads of a token together) before the rotary.
Unlike OLMo 2's norms, OLMoE's round the normalised value to the compute dtype before the weight
multiplies it (Llama's RMSNorm). clip_qkv (clamping q, k and v; null in the published OLMoE
configs) is refused."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from kbitcli.errors import InputError

from . import llama, moe, olmo2


@dataclass
class ModelArgs(moe.ModelArgs):
    model_type: str = "olmoe"
    clip_qkv: float | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "olmoe"})
        if a.clip_qkv is not None:
            raise InputError(f"config.json: clip_qkv ({a.clip_qkv}) is not supported for olmoe by kbit's runner")
        return a


class HeadsRMSNorm(olmo2.HeadsRMSNorm):
    round_first = True  # Llama's rounding, not OLMo 2's


class Attention(llama.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.q_norm = HeadsRMSNorm(self.nh * self.hd, a.rms_norm_eps)
        self.k_norm = HeadsRMSNorm(self.nkv * self.hd, a.rms_norm_eps)


class Block(moe.Block):
    attention_class = Attention


class Model(moe.Model):
    block_class = Block
