"""IBM Granite 3.x mixture-of-experts models (GraniteMoeForCausalLM: granite-3.0-1b-a400m,
granite-3.1-3b-a800m; GraniteMoeSharedForCausalLM: the same with a shared expert): Granite's
layout and four multipliers (granite.py) with an MoE feed-forward, `block_sparse_moe`:

* a router (`router.layer`, [experts, hidden], kept unquantized by the default recipe) takes the
  top num_experts_per_tok logits (float32) and softmaxes over the chosen ones only; each chosen
  expert's output is weighed so;
* the experts are stored stacked, each expert's matrices in Linear's (out, in) layout:
  `input_linear.weight` [E, 2I, hidden] (gate rows, then up rows) and `output_linear.weight`
  [E, hidden, I]. A kbit model keeps them packed (layers.KbitStacked, only the chosen experts'
  rows dequantized), as gpt-oss's and Llama 4's;
* GraniteMoeShared adds a shared SwiGLU expert on every token (`shared_mlp.input_linear` [2S,
  hidden], `output_linear`; none when shared_intermediate_size is 0), summed with the experts'
  output before the residual multiplier.

As in moe.py, only the experts some token chose run, grouped on the host: cuda_graphs = False."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from . import granite
from .base import activation, positive
from .moe import run_experts


@dataclass
class ModelArgs(granite.ModelArgs):
    model_type: str = "granitemoe"
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    shared_intermediate_size: int | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        mt = str(cfg.get("model_type") or "granitemoe")
        a = super().from_config(cfg)
        a.model_type = mt  # granite.ModelArgs names every model "granite"
        positive(a, "num_local_experts", "num_experts_per_tok", arch=mt)
        if a.num_experts_per_tok > a.num_local_experts:
            raise InputError(f"config.json: num_experts_per_tok ({a.num_experts_per_tok}) is more than the "
                             f"{a.num_local_experts} experts of this {mt} model")
        if mt == "granitemoeshared" and a.shared_intermediate_size:
            positive(a, "shared_intermediate_size", arch=mt)
        else:
            a.shared_intermediate_size = 0
        return a


class Router(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.top_k = a.num_experts_per_tok
        self.layer = nn.Linear(a.hidden_size, a.num_local_experts, bias=False)

    def forward(self, x):
        """(weights [N, k] in x's dtype, chosen [N, k]): the softmax over the k best logits only."""
        top, chosen = torch.topk(self.layer(x).float(), self.top_k, dim=-1)
        return torch.softmax(top, dim=-1).to(x.dtype), chosen


class MoE(nn.Module):
    """The router and the stacked experts: plain parameters or, in a packed kbit model,
    layers.KbitStacked; either gives expert e's matrix as `self.input_linear[e]`."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        E, h, i = a.num_local_experts, a.hidden_size, a.intermediate_size
        self.router = Router(a)
        self.input_linear = nn.Module()
        self.input_linear.weight = nn.Parameter(torch.empty(E, 2 * i, h))
        self.output_linear = nn.Module()
        self.output_linear.weight = nn.Parameter(torch.empty(E, h, i))
        self.num_experts = E
        self.act = activation(a.hidden_act, a.model_type)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.input_linear.weight[e]).chunk(2, dim=-1)  # [2I, hidden]: gate rows, up rows
        return F.linear(self.act(gate) * up, self.output_linear.weight[e])

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.router(x)
        experts = [functools.partial(self.expert, e) for e in range(self.num_experts)]
        return run_experts(experts, x, chosen, weights).view(shape)


class SharedMLP(nn.Module):
    """GraniteMoeShared's shared expert: one fused gate/up projection (input_linear)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.input_linear = nn.Linear(a.hidden_size, 2 * a.shared_intermediate_size, bias=False)
        self.output_linear = nn.Linear(a.shared_intermediate_size, a.hidden_size, bias=False)
        self.act = activation(a.hidden_act, a.model_type)

    def forward(self, x):
        gate, up = self.input_linear(x).chunk(2, dim=-1)
        return self.output_linear(self.act(gate) * up)


class Block(granite.Block):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        del self.mlp
        self.block_sparse_moe = MoE(a)
        self.shared_mlp = SharedMLP(a) if a.shared_intermediate_size else None

    def forward(self, x, cos, sin, step, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache) * self.residual
        h = self.post_attention_layernorm(x)
        out = self.block_sparse_moe(h)
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(h)
        return x + out * self.residual


class Model(granite.Model):
    block_class = Block
    #: the expert grouping reads device values on the host: no CUDA graph capture (generate.py)
    cuda_graphs = False
