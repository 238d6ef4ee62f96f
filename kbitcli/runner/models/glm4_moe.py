"""GLM-4.5 and GLM-4.6 (Glm4MoeForCausalLM): Llama's attention (q/k/v biases with attention_bias, none
on o_proj; with use_qk_norm, an RMSNorm of each query and key head as Qwen3's; the rotary on the first
partial_rotary_factor of each head, 0.5 by default) and DeepSeek-V3's MoE (deepseek.py: the first
`first_k_dense_replace` layers a dense llama.MLP, then on every layer the float32 sigmoid router
`mlp.gate` choosing with e_score_correction_bias among the topk_group best of n_group groups,
weights renormalised with norm_topk_prob times routed_scaling_factor, experts stored per expert,
plus n_shared_experts shared experts as one MLP). The multi-token-prediction layers stored after the
last layer are ignored, as for DeepSeek-V3.

dots.llm1 (Dots1ForCausalLM) is the same with Qwen3's attention: per-head q/k norms always, o_proj
biased with attention_bias, the whole head rotated, and a window on the layers layer_types marks
(without layer_types: those from max_window_layers on, when sliding_window is set)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from kbitcli.errors import InputError

from . import deepseek, llama
from .base import positive, rope_settings

#: defaults of Glm4MoeConfig and Dots1Config, for config.json files that omit a field (Dots1Config has
#: none for the expert counts: its model fails without them)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "glm4_moe": {"num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                 "moe_intermediate_size": 1408, "num_experts_per_tok": 8, "n_shared_experts": 1,
                 "n_routed_experts": 128, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                 "first_k_dense_replace": 1, "norm_topk_prob": True},
    "dots1": {"num_key_value_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
              "moe_intermediate_size": 1408, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
              "first_k_dense_replace": 0, "norm_topk_prob": False, "sliding_window": 4096, "max_window_layers": 62},
}


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "glm4_moe"
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    use_qk_norm: bool = False
    # deepseek.Router's V3 routing (sigmoid, e_score_correction_bias, expert groups); class attributes
    v3 = True
    grouped = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        mt = "dots1" if cfg.get("model_type") == "dots1" else "glm4_moe"
        cfg = {**_DEFAULTS[mt], **cfg, "model_type": mt}
        a = super().from_config(cfg)
        if mt == "glm4_moe":
            a.rope = rope_settings(cfg, default_partial=0.5)  # Glm4MoeConfig's default rotary fraction
        elif a.layer_types is None:  # Dots1Config's: a window from max_window_layers on
            a.layer_types = ["sliding_attention" if a.sliding_window is not None and i >= a.max_window_layers
                             else "full_attention" for i in range(a.num_hidden_layers)]
        positive(a, "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", arch=mt)
        if not isinstance(a.first_k_dense_replace, int) or a.first_k_dense_replace < 0:
            raise InputError(f"config.json: first_k_dense_replace must be a non-negative integer for a {mt} "
                             f"model, got {a.first_k_dense_replace!r}")
        deepseek.check_routing(a, mt)
        return a

    @property
    def dots1(self) -> bool:
        return self.model_type == "dots1"

    @property
    def o_bias(self) -> bool:
        return bool(self.attention_bias) if self.dots1 else False

    @property
    def qk_norm(self) -> bool:
        return self.dots1 or bool(self.use_qk_norm)

    def sparse(self, layer: int) -> bool:
        """Whether the layer's feed-forward is the MoE block (else a dense llama.MLP)."""
        return layer >= self.first_k_dense_replace


class Block(llama.Block):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        if a.sparse(layer):
            self.mlp = deepseek.MoE(a)


class Model(deepseek.Model):
    block_class = Block
