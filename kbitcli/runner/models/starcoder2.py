"""StarCoder2 (Starcoder2ForCausalLM): the Mistral layout (grouped-query attention, rotary
embeddings, a sliding window on every layer when the config sets one) with LayerNorms (with
bias, epsilon norm_epsilon) in place of the RMSNorms, biases on all four attention projections
(use_bias), a c_fc -> gelu_pytorch_tanh -> c_proj MLP in place of SwiGLU, and tied embeddings by
default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from . import llama
from .base import activation


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "starcoder2"
    # Starcoder2Config's defaults
    num_key_value_heads: int | None = 2
    hidden_act: str = "gelu_pytorch_tanh"
    norm_epsilon: float = 1e-5
    use_bias: bool = True
    tie_word_embeddings: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**cfg, "model_type": "starcoder2"})
        a.rms_norm_eps = a.norm_epsilon  # the epsilon llama's classes read: here the LayerNorms'
        return a

    @property
    def qkv_bias(self) -> bool:
        return bool(self.use_bias)

    o_bias = qkv_bias

    def window(self, layer: int) -> int | None:
        return self.sliding_window


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.c_fc = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.use_bias)
        self.c_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.use_bias)
        self.act = activation(a.hidden_act, "starcoder2")

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(llama.Block):
    mlp_class = MLP

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.input_layernorm = nn.LayerNorm(a.hidden_size, a.norm_epsilon)
        self.post_attention_layernorm = nn.LayerNorm(a.hidden_size, a.norm_epsilon)


class Model(llama.Model):
    block_class = Block
    norm_class = nn.LayerNorm
