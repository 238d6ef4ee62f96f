"""Adept Persimmon (PersimmonForCausalLM, Persimmon-8B, Fuyu's language model): StableLM's
sequential block with LayerNorms (stablelm.py) and Phi's attention parts (phi.py: the output
projection `dense` with a bias, one LayerNorm with bias of the queries and of the keys shared by the
heads, qk_layernorm, on by default), with the q/k/v projections stored fused per head
(query_key_value: [q_h, k_h, v_h] for each head h, as GPT-NeoX), a dense_h_to_4h -> ReLU² ->
dense_4h_to_h MLP with biases, partial rotary (half of each head by default), the final norm
model.final_layernorm and an lm_head without bias."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from . import gpt_neox, phi, stablelm


@dataclass
class ModelArgs(stablelm.ModelArgs):
    model_type: str = "persimmon"
    # PersimmonConfig's defaults
    hidden_act: str = "relu2"
    qk_layernorm: bool = True
    max_position_embeddings: int | None = 16384
    partial_rotary: ClassVar[float] = 0.5


class Attention(phi.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        del self.q_proj, self.k_proj, self.v_proj
        self.query_key_value = nn.Linear(a.hidden_size, 3 * self.nh * self.hd)

    def fuse(self) -> bool:
        return False  # already one layer

    def project(self, x):
        qkv = self.query_key_value(x).unflatten(-1, (self.nh, 3, self.hd))
        return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]


class Block(stablelm.Block):
    attention_class = Attention
    mlp_class = gpt_neox.MLP


class Model(stablelm.Model):
    block_class = Block
    norm_class = nn.Identity  # the final norm is model.final_layernorm, applied by logits()

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.model.final_layernorm = nn.LayerNorm(args.hidden_size, args.layer_norm_eps)

    def logits(self, x):
        return super().logits(self.model.final_layernorm(x))
