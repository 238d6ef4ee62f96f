"""Phi-3.5-MoE (PhimoeForCausalLM): Mixtral's layout (moe.py: `block_sparse_moe` on every layer,
experts stored per expert as w1 / w3 / w2 = gate / up / down, a window on every layer when the
config sets sliding_window) with LayerNorms (weight and bias, eps rms_norm_eps) in place of the
RMSNorms, an optional bias on lm_head (lm_head_bias) and SparseMixer routing instead of the
softmax top k:

* the router `block_sparse_moe.gate` (kept unquantized by the default recipe) gives logits s;
  the first expert is the best one, weighted by the softmax over the experts whose logit is
  within 2 * router_jitter_noise (relative: (max - s) / max(|s|, max)) of the best;
* the second is the best of the others, weighted by the softmax over the others within the same
  distance of it (the first excluded); both softmaxes in the compute dtype, no renormalisation.
SparseMixer always picks two experts; a config with another num_experts_per_tok is refused.

LongRoPE: cos and sin are scaled by short_mscale (long_mscale past original_max_position_embeddings;
kbit's Rotary takes one factor, so the two must be equal, as in Phi-3.5-MoE's config). Past
original_max_position_embeddings the runner rotates with the long factors, as Phi-3 does;
transformers 5's PhimoeRotaryEmbedding keeps the short ones there."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from kbitcli.errors import InputError

from . import moe


@dataclass
class ModelArgs(moe.ModelArgs):
    model_type: str = "phimoe"
    router_jitter_noise: float = 0.01
    lm_head_bias: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "phimoe"})
        if a.num_experts_per_tok != 2:
            raise InputError(f"config.json: phimoe's SparseMixer routing picks 2 experts, not num_experts_per_tok "
                             f"{a.num_experts_per_tok}")
        if a.rope["rope_type"] != "default":
            short, long = a.rope.get("short_mscale"), a.rope.get("long_mscale")
            if not isinstance(short, (int, float)) or short != long:
                raise InputError(f"config.json: phimoe's RoPE scaling needs equal short_mscale and long_mscale, got "
                                 f"{short!r} and {long!r}")
            a.rope["attention_factor"] = float(short)
        return a

    def window(self, layer: int) -> int | None:
        return self.sliding_window  # every layer


def sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseMixer's choice at inference: logits [N, experts] -> (chosen [N, 2], weights [N, 2])."""
    chosen, weights = [], []
    for _ in range(2):
        best, idx = logits.max(dim=-1, keepdim=True)
        # the candidates within eps of the best (relative to the larger of |logit| and the best)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        weights.append(torch.softmax(logits.masked_fill(far, float("-inf")), dim=-1).gather(-1, idx))
        chosen.append(idx)
        logits = logits.scatter(-1, idx, float("-inf"))  # the second: among the others
    return torch.cat(chosen, dim=-1), torch.cat(weights, dim=-1)


class SparseMoe(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.eps = float(a.router_jitter_noise)
        self.gate = nn.Linear(a.hidden_size, a.num_experts, bias=False)
        self.experts = nn.ModuleList(moe.MixtralExpert(a) for _ in range(a.num_experts))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        return moe.run_experts(self.experts, x, *sparsemixer(self.gate(x), self.eps)).view(shape)


class Block(moe.Block):
    moe_class = SparseMoe
    norm_class = nn.LayerNorm


class Model(moe.Model):
    block_class = Block
    norm_class = nn.LayerNorm

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        if args.lm_head_bias and self.lm_head is not None:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=True)
