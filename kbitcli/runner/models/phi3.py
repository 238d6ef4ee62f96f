"""Phi-3, Phi-3.5 and Phi-4 (Phi3ForCausalLM): the Llama layout with the projections stored
fused (self_attn.qkv_proj: q, k, v rows; mlp.gate_up_proj: gate, up rows), partial rotary
embeddings (Phi-4-mini), LongRoPE (short factors up to original_max_position_embeddings, long
ones past it, chosen per forward as transformers does) and a sliding window on every layer when
the config sets one.

Where a generation crosses original_max_position_embeddings, transformers' generate() throws its
KV cache away and reprocesses the sequence with the long factors; the runner keeps its cache, so
only the steps past the boundary use them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from . import llama


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-5  # Phi3Config's default (original_max_position_embeddings: rope_settings)
    model_type: str = "phi3"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        return super().from_config({**cfg, "model_type": "phi3"})

    def window(self, layer: int) -> int | None:
        return self.sliding_window


class Attention(llama.Attention):
    """q, k and v from one stored projection (what llama.Attention runs after fuse())."""

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = nn.Linear(a.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=False)

    def fuse(self) -> bool:
        return False  # stored fused already


class MLP(llama.MLP):
    """gate and up from one stored projection (what llama.MLP runs after fuse())."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__(a)
        del self.gate_proj, self.up_proj
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)

    def fuse(self) -> bool:
        return False


class Block(llama.Block):
    attention_class = Attention
    mlp_class = MLP


class Model(llama.Model):
    block_class = Block
