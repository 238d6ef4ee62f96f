"""Phi-1, Phi-1.5 and Phi-2 (PhiForCausalLM): StableLM's parallel block (stablelm.py) with other
parts and names: attention and MLP both read the one input_layernorm, biases on q/k/v and on the
output projection (self_attn.dense), an fc1 -> gelu_new -> fc2 MLP with biases, partial rotary
embeddings (0.5 by default; Phi-2: 0.4), an optional LayerNorm (with bias) of the queries and keys
shared by all heads (qk_layernorm), model.final_layernorm, and an lm_head with a bias, which stays
the head's own when the embeddings are tied."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import stablelm
from .base import activation


@dataclass
class ModelArgs(stablelm.ModelArgs):
    model_type: str = "phi"
    hidden_act: str = "gelu_new"
    use_parallel_residual: bool = True  # always: PhiConfig has no sequential form
    partial_rotary: ClassVar[float] = 0.5

    @property
    def qkv_bias(self) -> bool:
        return True


class Attention(stablelm.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        del self.o_proj
        self.dense = nn.Linear(self.nh * self.hd, a.hidden_size)

    def qk_layernorm(self, a: ModelArgs, heads: int) -> nn.Module:
        return nn.LayerNorm(self.hd, a.layer_norm_eps)  # one for all heads

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.fc1 = nn.Linear(a.hidden_size, a.intermediate_size)
        self.fc2 = nn.Linear(a.intermediate_size, a.hidden_size)
        self.act = activation(a.hidden_act, "phi")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(stablelm.Block):
    attention_class = Attention
    mlp_class = MLP


class Model(stablelm.Model):
    block_class = Block
    norm_class = nn.Identity  # Phi's final norm is model.final_layernorm, applied by logits()

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.model.final_layernorm = nn.LayerNorm(args.hidden_size, args.layer_norm_eps)
        if self.tied:  # the embedding matrix with the head's own bias (lm_head.bias)
            self.lm_head = nn.Module()
            self.lm_head.bias = nn.Parameter(torch.zeros(args.vocab_size))
        else:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size)

    def logits(self, x):
        x = self.model.final_layernorm(x)
        if self.tied:
            return F.linear(x, self.model.embed_tokens.weight, self.lm_head.bias)
        return self.lm_head(x)
