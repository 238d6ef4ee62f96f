"""Google VaultGemma (VaultGemmaForCausalLM, vaultgemma-1b): Gemma 2 (gemma.py: soft-capped
attention and logits, (1 + w) RMSNorms, windows on every other layer by default) with two norms a
block instead of four: input_layernorm before the attention and pre_feedforward_layernorm before
the MLP, none after them. VaultGemmaConfig's defaults are Gemma2Config's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from . import gemma


@dataclass
class ModelArgs(gemma.ModelArgs):
    model_type: str = "vaultgemma"
    max_position_embeddings: int | None = 8192  # VaultGemmaConfig's default

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        return super().from_config({**cfg, "model_type": "vaultgemma"})


class Block(gemma.Block):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        del self.post_attention_layernorm, self.post_feedforward_layernorm

    def forward(self, x, cos, sin, step, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
        return x + self.mlp(self.pre_feedforward_layernorm(x))


class Model(gemma.Model):
    block_class = Block
