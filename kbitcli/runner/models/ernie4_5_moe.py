"""Baidu ERNIE 4.5 MoE (Ernie4_5_MoeForCausalLM: ERNIE-4.5-21B-A3B, 300B-A47B): ernie4_5.py's
attention (the interleaved rotary in float32) with a sparse MoE on every moe_layer_interval-th layer
from moe_layer_start_index to moe_layer_end_index (-1: the last), a dense llama.MLP elsewhere:

* the router `mlp.gate` (float32, kept unquantized by the default recipe) gives a float32 softmax;
  the experts are chosen by it plus `mlp.moe_statics.e_score_correction_bias` ([1, experts]) and
  weighted by the plain probabilities, divided by their sum (at least moe_norm_min) and rounded
  to the compute dtype;
* moe_num_experts experts of moe_intermediate_size stored per expert (mlp.experts.N.gate_proj /
  up_proj / down_proj) and moe_num_shared_experts shared experts as one MLP (`mlp.shared_experts`).
The multi-token-prediction tensors (`mtp*`) are ignored, as transformers ignores them. use_bias
(biases on every projection and on the tied lm_head; false in the published configs) is refused."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from . import ernie4_5
from .base import positive
from .moe import _mlp, run_experts


@dataclass
class ModelArgs(ernie4_5.ModelArgs):
    # Ernie4_5_MoeConfig's defaults (head_dim: hidden_size / heads, unlike the dense class)
    head_dim: int | None = None
    num_key_value_heads: int | None = 4
    moe_num_experts: int = 64
    moe_k: int = 6
    moe_intermediate_size: int = 1536
    moe_num_shared_experts: int = 2
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        # transformers' names for the expert count and k (its attribute_map)
        cfg = {"moe_num_experts": cfg.get("num_experts"), "moe_k": cfg.get("num_experts_per_tok"), **cfg}
        a = super().from_config(cfg)
        a.model_type = "ernie4_5_moe"
        positive(a, "moe_num_experts", "moe_k", "moe_intermediate_size", "moe_layer_interval", arch=a.model_type)
        if a.moe_k > a.moe_num_experts:
            raise InputError(f"config.json: moe_k ({a.moe_k}) is more than the {a.moe_num_experts} experts of this "
                             f"ernie4_5_moe model")
        if not isinstance(a.moe_num_shared_experts, int) or a.moe_num_shared_experts < 0:
            raise InputError(f"config.json: moe_num_shared_experts must be a non-negative integer, got "
                             f"{a.moe_num_shared_experts!r}")
        if a.use_bias:
            raise InputError("config.json: use_bias is not supported for ernie4_5_moe by kbit's runner")
        if a.moe_layer_end_index == -1:
            a.moe_layer_end_index = a.num_hidden_layers - 1
        return a

    def sparse(self, layer: int) -> bool:
        """Whether the layer's feed-forward is the MoE block (else a dense llama.MLP)."""
        return ((layer + 1) % self.moe_layer_interval == 0
                and self.moe_layer_start_index <= layer <= self.moe_layer_end_index)


class Statics(nn.Module):
    """`mlp.moe_statics`: the routing bias [1, experts] under its checkpoint name."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.empty(1, experts))


class MoE(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.top_k, self.norm_min = a.moe_k, float(a.moe_norm_min)
        self.gate = nn.Linear(a.hidden_size, a.moe_num_experts, bias=False)
        self.moe_statics = Statics(a.moe_num_experts)
        self.experts = nn.ModuleList(_mlp(a, a.moe_intermediate_size) for _ in range(a.moe_num_experts))
        self.shared_experts = (_mlp(a, a.moe_intermediate_size * a.moe_num_shared_experts)
                               if a.moe_num_shared_experts else None)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.linear(x.float(), self.gate.weight.float()).softmax(dim=-1)
        chosen = torch.topk(probs + self.moe_statics.e_score_correction_bias.float()[0], self.top_k, dim=-1).indices
        weights = probs.gather(1, chosen)
        weights = (weights / weights.sum(dim=-1, keepdim=True).clamp(min=self.norm_min)).to(x.dtype)
        out = run_experts(self.experts, x, chosen, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class Block(ernie4_5.Block):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        if a.sparse(layer):
            self.mlp = MoE(a)


class Model(ernie4_5.Model):
    block_class = Block
    #: the expert grouping reads device values on the host: no CUDA graph capture (generate.py)
    cuda_graphs = False
    #: the router stays float32 in any compute dtype (transformers' _keep_in_fp32_modules_strict)
    float32_parameters = (".mlp.gate.weight", ".mlp.moe_statics.e_score_correction_bias")

    def checkpoint_name(self, name: str) -> str | None:
        return None if "mtp" in name else super().checkpoint_name(name)
