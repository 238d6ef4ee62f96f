"""gpt-oss (GptOssForCausalLM): the Llama layout (moe.py's neighbour) with

* attention sinks: a learned logit per head (`self_attn.sinks`) joins every query's softmax
  denominator and is dropped after it, so a head may attend to "nothing"; q/k/v/o biases;
  a sliding window on the layers layer_types marks (by default every other one, from the first);
* YaRN RoPE by default (rope_settings; GptOssConfig's defaults when config.json has none);
* RMSNorms that multiply by their weight in float32 and round afterwards (as OLMo 2's);
* an MoE feed-forward whose router (`mlp.router`, a linear layer with a bias) takes the top-k
  logits and softmaxes over the chosen ones only, and whose experts are stored stacked: one
  3-D tensor per projection for all experts, with the input dimension in the middle
  (`mlp.experts.gate_up_proj` [E, hidden, 2*I], gate and up interleaved on the last axis, and
  `down_proj` [E, I, hidden], each with a bias [E, out]). A kbit model keeps such a quantized
  tensor packed (layers.KbitStacked, loaded by load.py) and dequantizes only the chosen
  experts' rows in forward;
* the experts' clamped SwiGLU: gate clamped above at swiglu_limit, up to +-swiglu_limit,
  (up + 1) * gate * sigmoid(swiglu_alpha * gate).

As in moe.py, only the experts some token chose run, grouped on the host: cuda_graphs = False.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from . import llama
from .base import per_layer, positive, repeat_kv
from .moe import run_experts
from .olmo2 import Olmo2RMSNorm

#: GptOssConfig's RoPE when config.json gives none
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096, "rope_theta": 150000.0}


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "gpt_oss"
    # GptOssConfig's defaults
    head_dim: int | None = 64
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    sliding_window: int | None = 128
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        cfg = {"max_position_embeddings": 131072, **cfg}  # GptOssConfig's default
        if "num_experts" in cfg:  # GptOssConfig's attribute alias
            cfg.setdefault("num_local_experts", cfg["num_experts"])
        if not cfg.get("rope_parameters") and not cfg.get("rope_scaling"):
            cfg["rope_parameters"] = {**_DEFAULT_ROPE, "rope_theta": cfg.get("rope_theta", 150000.0)}
        a = super().from_config({**cfg, "model_type": "gpt_oss"})
        positive(a, "num_local_experts", "num_experts_per_tok", arch="gpt_oss")
        if a.num_experts_per_tok > a.num_local_experts:
            raise InputError(f"config.json: num_experts_per_tok ({a.num_experts_per_tok}) is more than the "
                             f"{a.num_local_experts} experts of this gpt_oss model")
        if a.layer_types is None:
            a.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                             for i in range(a.num_hidden_layers)]
        per_layer(a, "layer_types")
        return a


class Attention(llama.Attention):
    """llama.Attention with a sink logit per head in the softmax (eager, as transformers computes it)."""

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.sinks = nn.Parameter(torch.empty(self.nh))

    def attend(self, q, k, v, step):
        B, H, S, D = q.shape
        k, v = repeat_kv(k, H), repeat_kv(v, H)
        w = torch.matmul(q, k.transpose(2, 3)) * self.scale
        w = w.masked_fill(~step.mask(self.window), float("-inf"))
        sinks = self.sinks.to(w.dtype).view(1, H, 1, 1).expand(B, H, S, 1)
        w = torch.cat([w, sinks], dim=-1)
        # the maximum subtracted first in the compute dtype, as transformers does (the same bits in half precision)
        p = torch.softmax(w - w.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]  # the sink's share is dropped
        return torch.matmul(p.to(v.dtype), v).transpose(1, 2).reshape(B, S, H * D)


class Router(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.top_k = a.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(a.num_local_experts, a.hidden_size))
        self.bias = nn.Parameter(torch.empty(a.num_local_experts))

    def forward(self, x):
        """(weights [N, k], chosen [N, k]): the softmax over the k best logits only."""
        top, chosen = torch.topk(F.linear(x, self.weight, self.bias), self.top_k, dim=-1)
        return torch.softmax(top, dim=-1), chosen


class Experts(nn.Module):
    """The stacked experts: plain parameters [E, in, out] or, in a packed kbit model,
    layers.KbitStacked; either gives expert e's matrix as `self.gate_up_proj[e]`."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        E, h, i = a.num_local_experts, a.hidden_size, a.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, h, 2 * i))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(E, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(E, i, h))
        self.down_proj_bias = nn.Parameter(torch.empty(E, h))
        self.num_experts, self.alpha, self.limit = E, a.swiglu_alpha, a.swiglu_limit

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # interleaved
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        return h @ self.down_proj[e] + self.down_proj_bias[e]

    def forward(self, x, chosen, weights):
        return run_experts([functools.partial(self.expert, e) for e in range(self.num_experts)], x, chosen, weights)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.router = Router(a)
        self.experts = Experts(a)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, chosen = self.router(x)
        return self.experts(x, chosen, weights).view(shape)


class Block(llama.Block):
    attention_class = Attention
    mlp_class = MLP
    norm_class = Olmo2RMSNorm


class Model(llama.Model):
    block_class = Block
    norm_class = Olmo2RMSNorm
    #: the expert grouping reads device values on the host: no CUDA graph capture (generate.py)
    cuda_graphs = False
