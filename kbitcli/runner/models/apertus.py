"""Swiss AI Apertus (ApertusForCausalLM, Apertus-8B/70B): the Llama layout with Qwen3's RMSNorm of
each query and key head before the rotary (q_norm, k_norm), the block's norms named
attention_layernorm and feedforward_layernorm, an up_proj -> xIELU -> down_proj MLP without gate
or biases (xIELU has two trained scalars per layer: mlp.act_fn.alpha_p, alpha_n, and the stored
beta and eps), attention_bias on q/k/v/o, and ApertusConfig's defaults (the llama3 RoPE with
theta 12e6 when config.json gives no RoPE parameters)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import llama
from .base import RMSNorm, activation

#: ApertusConfig's RoPE when config.json has neither rope_parameters nor rope_scaling (a
#: top-level rope_theta alone does not change it)
_ROPE = {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0, "original_max_position_embeddings": 8192,
         "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "apertus"
    # ApertusConfig's defaults
    rms_norm_eps: float = 1e-5
    hidden_act: str = "xielu"
    max_position_embeddings: int | None = 65536

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        if not (cfg.get("rope_parameters") or cfg.get("rope_scaling")):
            cfg = {**cfg, "rope_parameters": _ROPE}
        a = super().from_config({**cfg, "model_type": "apertus"})
        return a

    @property
    def qk_norm(self) -> bool:
        return True


class XIELU(nn.Module):
    """xIELU: alpha_p x² + beta x for x > 0, else alpha_n (expm1(min(x, eps)) - x) + beta x, with
    alpha_p = softplus(a_p) and alpha_n = beta + softplus(a_n) from the stored a_p, a_n."""

    def __init__(self) -> None:
        super().__init__()
        # all four are stored in the checkpoint (beta and eps as buffers of transformers' module)
        self.alpha_p, self.alpha_n = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.beta, self.eps = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))

    def forward(self, x):
        alpha_p = F.softplus(self.alpha_p)
        alpha_n = self.beta + F.softplus(self.alpha_n)
        return torch.where(x > 0, alpha_p * x * x + self.beta * x,
                           (torch.expm1(torch.min(x, self.eps)) - x) * alpha_n + self.beta * x)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        # xIELU is a module with weights (mlp.act_fn.*); the other activations are functions
        self.act_fn = XIELU() if a.hidden_act == "xielu" else activation(a.hidden_act, a.model_type)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class Block(llama.Block):
    mlp_class = MLP

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        del self.input_layernorm, self.post_attention_layernorm  # named otherwise here
        self.attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, cos, sin, step, cache):
        x = x + self.self_attn(self.attention_layernorm(x), cos, sin, step, cache)
        return x + self.mlp(self.feedforward_layernorm(x))


class Model(llama.Model):
    block_class = Block
