"""Salesforce CodeGen (CodeGenForCausalLM: CodeGen 1 and 2, 350M to 16B): GPT-J (gptj.py: the same
configuration keys and defaults, parallel block, interleaved rotary on rotary_dim features, biased
lm_head) with the q/k/v projections stored as one qkv_proj in CodeGen's own order: four groups
(the model-parallel shards it was trained with), each holding a quarter of the queries, then of
the values, then of the keys. The quantizer's default recipe packs qkv_proj as any linear layer
(its blocks run along the input), so the order only matters to the split."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from torch import nn

from kbitcli.errors import InputError

from . import gptj

#: the groups of CodeGen's qkv_proj rows (mp_num in transformers)
GROUPS = 4


@dataclass
class ModelArgs(gptj.ModelArgs):
    arch: ClassVar[str] = "codegen"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config(cfg)
        if a.n_embd % GROUPS:
            raise InputError(f"config.json: n_embd ({a.n_embd}) must be a multiple of {GROUPS} for a codegen model "
                             "(its qkv_proj holds four groups)")
        return a


class Attention(gptj.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = nn.Linear(a.n_embd, 3 * a.n_embd, bias=False)

    def project(self, x):
        qvk = self.qkv_proj(x).unflatten(-1, (GROUPS, 3, -1))  # [..., group, (q, v, k), features]
        q, v, k = (qvk[..., i, :].flatten(-2) for i in range(3))
        return q, k, v


class Block(gptj.Block):
    attention_class = Attention


class Model(gptj.Model):
    block_class = Block
