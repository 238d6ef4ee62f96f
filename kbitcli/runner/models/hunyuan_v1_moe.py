"""Tencent Hunyuan MoE (HunYuanMoEV1ForCausalLM): hunyuan_v1_dense.py's attention (q/k head norms
after the rotary, attention_bias, the NTK-alpha RoPE) with a sparse block on every layer:

* the router `mlp.gate.wg` (float32 in any compute dtype, as transformers builds it; kept
  unquantized by the default recipe) gives a float32 softmax over num_experts; the top moe_topk,
  renormalised, weigh the experts in float32;
* the experts and the shared `mlp.shared_mlp` (run on every token) are SwiGLU MLPs of
  intermediate_size, stored per expert (mlp.experts.N.gate_proj / up_proj / down_proj).
Per-layer lists for num_experts or moe_topk (which transformers' config allows) are refused."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from . import hunyuan_v1_dense, llama
from .base import positive
from .moe import run_experts


@dataclass
class ModelArgs(hunyuan_v1_dense.ModelArgs):
    num_experts: int = 1  # HunYuanMoEV1Config's defaults
    moe_topk: int = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config(cfg)
        a.model_type = "hunyuan_v1_moe"
        if isinstance(a.num_experts, list) or isinstance(a.moe_topk, list):
            raise InputError("config.json: per-layer num_experts / moe_topk lists are not supported for "
                             "hunyuan_v1_moe by kbit's runner")
        positive(a, "num_experts", "moe_topk", arch=a.model_type)
        if a.moe_topk > a.num_experts:
            raise InputError(f"config.json: moe_topk ({a.moe_topk}) is more than the {a.num_experts} experts of "
                             f"this hunyuan_v1_moe model")
        return a


class Router(nn.Module):
    """`mlp.gate`: its one linear layer `wg`."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.wg = nn.Linear(a.hidden_size, a.num_experts, bias=False)


class MoE(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.top_k = a.moe_topk
        self.gate = Router(a)
        self.experts = nn.ModuleList(llama.MLP(a) for _ in range(a.num_experts))
        self.shared_mlp = llama.MLP(a)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.linear(x.float(), self.gate.wg.weight.float()).softmax(dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        out = run_experts(self.experts, x, chosen, weights / weights.sum(dim=-1, keepdim=True))
        return (out + self.shared_mlp(x)).view(shape)


class Block(hunyuan_v1_dense.Block):
    mlp_class = MoE


class Model(hunyuan_v1_dense.Model):
    block_class = Block
    #: the expert grouping reads device values on the host: no CUDA graph capture (generate.py)
    cuda_graphs = False
    #: the router stays float32 in any compute dtype (transformers builds it so)
    float32_parameters = (".mlp.gate.wg.weight",)
