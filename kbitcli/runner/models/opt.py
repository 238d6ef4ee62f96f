"""OPT: learned positions with an offset of 2, pre- or post-LayerNorm (do_layer_norm_before),
separate q/k/v projections (q scaled before the product, as in fairseq), ReLU MLP,
optional project_in/project_out when word_embed_proj_dim differs, tied head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch.nn.functional as F
from torch import nn

from .base import KVCache, activation, args_from_config, attention, fuse_group, positive, prepare_step

POSITION_OFFSET = 2


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    ffn_dim: int
    vocab_size: int
    max_position_embeddings: int
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = args_from_config(cls, cfg, arch="opt")
        positive(a, "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size",
                 "max_position_embeddings", arch="opt")
        a.word_embed_proj_dim = a.word_embed_proj_dim or a.hidden_size
        return a


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.nh, self.hd = layer, a.num_attention_heads, a.hidden_size // a.num_attention_heads
        self.scaling = self.hd ** -0.5
        E = a.hidden_size
        self.k_proj = nn.Linear(E, E, bias=a.enable_bias)
        self.v_proj = nn.Linear(E, E, bias=a.enable_bias)
        self.q_proj = nn.Linear(E, E, bias=a.enable_bias)
        self.out_proj = nn.Linear(E, E, bias=a.enable_bias)
        self.qkv_proj = None  # q_proj, k_proj and v_proj as one layer, after fuse()

    def fuse(self) -> bool:
        """Replace q_proj, k_proj and v_proj by one qkv_proj when they can be fused."""
        return fuse_group(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"))

    def forward(self, x, step, cache):
        B, S, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        q = (q * self.scaling).view(B, S, self.nh, self.hd).transpose(1, 2)
        k = k.view(B, S, self.nh, self.hd).transpose(1, 2)
        v = v.view(B, S, self.nh, self.hd).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.out_proj(attention(q, k, v, step, 1.0))


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.pre = a.do_layer_norm_before
        E, aff = a.hidden_size, a.layer_norm_elementwise_affine
        self.self_attn = Attention(a, layer)
        self.self_attn_layer_norm = nn.LayerNorm(E, elementwise_affine=aff)
        self.fc1 = nn.Linear(E, a.ffn_dim, bias=a.enable_bias)
        self.fc2 = nn.Linear(a.ffn_dim, E, bias=a.enable_bias)
        self.final_layer_norm = nn.LayerNorm(E, elementwise_affine=aff)
        self.act = activation(a.activation_function, "opt")

    def forward(self, x, step, cache):
        h = self.self_attn_layer_norm(x) if self.pre else x
        x = x + self.self_attn(h, step, cache)
        if not self.pre:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre else self.final_layer_norm(x)


class Decoder(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        E, P = a.hidden_size, a.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(a.vocab_size, P)
        self.embed_positions = nn.Embedding(a.max_position_embeddings + POSITION_OFFSET, E)
        self.project_in = nn.Linear(P, E, bias=False) if P != E else None
        self.project_out = nn.Linear(E, P, bias=False) if P != E else None
        self.final_layer_norm = (nn.LayerNorm(E, elementwise_affine=a.layer_norm_elementwise_affine)
                                 if a.do_layer_norm_before and not a._remove_final_layer_norm else None)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))


class Body(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.decoder = Decoder(a)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.num_layers = args.num_hidden_layers
        self.context_length = args.max_position_embeddings
        self.model = Body(args)
        self.tied = bool(args.tie_word_embeddings)
        self.lm_head = None if self.tied else nn.Linear(args.word_embed_proj_dim, args.vocab_size, bias=False)

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "model.decoder.embed_tokens.weight"} if self.tied else {}

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        if name.startswith("decoder."):  # facebook/opt-* checkpoints saved from OPTModel
            return "model." + name
        return name

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                last_only: bool = False):
        step = prepare_step(input_ids, attention_mask, positions, cache)
        d = self.model.decoder
        x = d.embed_tokens(input_ids)
        if d.project_in is not None:
            x = d.project_in(x)
        x = x + d.embed_positions(step.positions + POSITION_OFFSET)
        for layer in d.layers:
            x = layer(x, step, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_only:
            x = x[:, -1:]
        if d.final_layer_norm is not None:
            x = d.final_layer_norm(x)
        if d.project_out is not None:
            x = d.project_out(x)
        return F.linear(x, d.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
