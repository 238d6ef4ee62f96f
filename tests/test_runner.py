"""kbit's runner against transformers (the reference), the kbit packed path against
dequantize-on-load, the torch dequantizer against the numpy reference, and kbit generate's
errors."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kbitformat import QuantSpec, dequantize, quantize
from kbitformat.reference import NumpyOps

from kbitcli.cli.main import main
from kbitcli.errors import InputError
from kbitcli.runner import KbitLinear, dequantize_torch, generate, generate_ids, load, parameter_bytes
from kbitcli.runner.layers import GEMV_MAX_ROWS
from kbitcli.runner.models import MODEL_MODULES
from kbitcli.runner.models.base import KVCache
from hf_reference import transformers_gguf_model

torch.set_num_threads(2)
VECTORS = Path(__file__).resolve().parents[1] / "formats" / "vectors"
VOCAB = 100
TOL = 1e-4


# ----------------------------------------------------------------------------- tiny models
def _configs():
    import transformers as tf
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    return {
        "llama": lambda: (tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         rope_parameters=llama3, **common), tf.LlamaForCausalLM),
        "llama-tied-bias": lambda: (tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                                                   mlp_bias=True, tie_word_embeddings=True,
                                                   max_position_embeddings=128, **common), tf.LlamaForCausalLM),
        # YaRN (Qwen2.5-Coder and Qwen3 long-context configs): the frequency blend and the
        # attention factor on cos/sin; the DeepSeek form (mscale, mscale_all_dim, beta_*)
        "qwen2-yarn": lambda: (tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                              rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                               "original_max_position_embeddings": 32},
                                              **common), tf.Qwen2ForCausalLM),
        "llama-yarn-mscale": lambda: (tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                                                     rope_parameters={"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e4,
                                                                      "original_max_position_embeddings": 32, "mscale": 0.9,
                                                                      "mscale_all_dim": 0.6, "beta_fast": 16, "beta_slow": 2},
                                                     **common), tf.LlamaForCausalLM),
        # dynamic NTK: the default RoPE within max_position_embeddings
        "llama-dynamic": lambda: (tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                                 rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                                                 **common), tf.LlamaForCausalLM),
        "mistral": lambda: (tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=1, sliding_window=5,
                                             max_position_embeddings=128, **common), tf.MistralForCausalLM),
        "qwen2": lambda: (tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         max_position_embeddings=128, **common), tf.Qwen2ForCausalLM),
        # Qwen3: q_norm / k_norm per head; head_dim (16) is not hidden_size / heads (12)
        "qwen3": lambda: (tf.Qwen3Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=128, **common), tf.Qwen3ForCausalLM),
        "qwen3-window": lambda: (tf.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                                num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                                attention_bias=True, tie_word_embeddings=True,
                                                use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                                max_position_embeddings=128, **common), tf.Qwen3ForCausalLM),
        # SmolLM3: no rotary on every 4th layer (NoPE), tied embeddings
        "smollm3": lambda: (tf.SmolLM3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, **common), tf.SmolLM3ForCausalLM),
        # SmolLM3 with the window on its NoPE layers (layers 1 and 3), untied
        "smollm3-window": lambda: (tf.SmolLM3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                                    num_attention_heads=4, num_key_value_heads=4,
                                                    no_rope_layers=[1, 0, 1, 0], use_sliding_window=True,
                                                    sliding_window=4, tie_word_embeddings=False,
                                                    max_position_embeddings=128, **common), tf.SmolLM3ForCausalLM),
        # Granite: embedding, residual and attention multipliers, scaled logits
        "granite": lambda: (tf.GraniteConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=3.0,
                                             residual_multiplier=0.3, attention_multiplier=0.05, logits_scaling=4.0,
                                             max_position_embeddings=128, **common), tf.GraniteForCausalLM),
        # OLMo 2: norms after the sublayers, q/k norms over the whole projection
        "olmo2": lambda: (tf.Olmo2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, **common), tf.Olmo2ForCausalLM),
        # OLMo 3: OLMo 2 with windows on layers 0-2 and a RoPE per layer type
        "olmo3": lambda: (tf.Olmo3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                         rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                             "rope_theta": 1e4},
                                                          "sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": 5e4}},
                                         max_position_embeddings=128, **common), tf.Olmo3ForCausalLM),
        # Arcee AFM: up -> ReLU² -> down, no gate
        "arcee": lambda: (tf.ArceeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, **common), tf.ArceeForCausalLM),
        # ERNIE 4.5: the interleaved rotary, use_bias on all seven projections, tied by default
        "ernie4_5": lambda: (tf.Ernie4_5Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                               use_bias=True, max_position_embeddings=128, **common),
                             tf.Ernie4_5ForCausalLM),
        # Seed-OSS: q/k/v biases (attention_bias) but none on o_proj (attention_out_bias), as
        # Seed-OSS-36B; head_dim 24
        "seed_oss": lambda: (tf.SeedOssConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                              attention_bias=True, attention_out_bias=False,
                                              max_position_embeddings=128, **common),
                             tf.SeedOssForCausalLM),
        # Nemotron: LayerNorm1P (weight + 1), up -> ReLU² -> down, the rotary on half of each head (the default)
        "nemotron": lambda: (tf.NemotronConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=128, **common), tf.NemotronForCausalLM),
        # ... with biases everywhere, head_dim 24 with a quarter rotated, tied embeddings
        "nemotron-bias": lambda: (tf.NemotronConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=4, head_dim=24,
                                                    attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                                    rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                     "partial_rotary_factor": 0.25},
                                                    max_position_embeddings=128, **common), tf.NemotronForCausalLM),
        # Hunyuan dense: q/k RMSNorms after the rotary, the NTK-alpha RoPE of its Hub configs, biases
        "hunyuan_v1_dense": lambda: (tf.HunYuanDenseV1Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                             attention_bias=True,
                                                             rope_parameters={"rope_type": "dynamic", "alpha": 1000.0,
                                                                              "factor": 1.0, "rope_theta": 1e4},
                                                             max_position_embeddings=128, **common),
                                     tf.HunYuanDenseV1ForCausalLM),
        # Apertus: xIELU, q/k norms before the rotary, attention_layernorm / feedforward_layernorm, the
        # llama3 RoPE of ApertusConfig's default
        "apertus": lambda: (tf.ApertusConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                             max_position_embeddings=128, **common), tf.ApertusForCausalLM),
        # InternLM3: Llama under its own model_type and class (transformers runs it as Llama), biases
        "internlm3": lambda: (tf.InternLM3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                                 qkv_bias=True, bias=True, max_position_embeddings=128, **common),
                              _internlm3_class()),
        # VaultGemma: Gemma 2 with two norms a block; windows of 4 on layers 0 and 2, soft-capping
        "vaultgemma": lambda: (tf.VaultGemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                   sliding_window=4, query_pre_attn_scalar=24,
                                                   attn_logit_softcapping=5.0, final_logit_softcapping=8.0,
                                                   max_position_embeddings=128, **common), tf.VaultGemmaForCausalLM),
        # Persimmon: per-head fused query_key_value, shared q/k LayerNorms, ReLU², half the head rotated
        "persimmon": lambda: (tf.PersimmonConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=128, **common),
                              tf.PersimmonForCausalLM),
        # ... without the q/k LayerNorms, a quarter rotated, tied embeddings
        "persimmon-plain": lambda: (tf.PersimmonConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                       num_attention_heads=4, qk_layernorm=False,
                                                       tie_word_embeddings=True,
                                                       rope_parameters={"rope_type": "default", "rope_theta": 2e4,
                                                                        "partial_rotary_factor": 0.25},
                                                       max_position_embeddings=128, **common),
                                    tf.PersimmonForCausalLM),
        # MPT: ALiBi with MPT's slopes, Wqkv clamped to clip_qkv, no biases, tied
        "mpt": lambda: (tf.MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64,
                                     attn_config={"clip_qkv": 1.0}, **common), tf.MptForCausalLM),
        # ... 6 heads (slopes interleaved as MPT does), its own softmax_scale, untied
        "mpt-6heads": lambda: (tf.MptConfig(d_model=48, n_heads=6, n_layers=2, max_seq_len=64,
                                            attn_config={"softmax_scale": 0.2}, tie_word_embeddings=False,
                                            **common), tf.MptForCausalLM),
        # CodeGen: GPT-J with qkv_proj in four groups of [q, v, k]; 8 heads (two per group), 8 of 16 features
        # rotated
        "codegen": lambda: (tf.CodeGenConfig(n_embd=128, n_layer=2, n_head=8, rotary_dim=8, n_positions=64, n_ctx=64,
                                             **common), tf.CodeGenForCausalLM),
        # GLM-4: fused gate_up_proj, GLM's pairwise rotary on half of each head (the default), q/k/v
        # biases (the default); head_dim 24 (hidden_size / heads is 16)
        "glm": lambda: (tf.GlmConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                     max_position_embeddings=128, **common), tf.GlmForCausalLM),
        # GLM-4-0414: GLM-4 with norms on the sublayers' outputs too
        "glm4": lambda: (tf.Glm4Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128, **common), tf.Glm4ForCausalLM),
        # ... without biases, tied, a quarter of each head rotated, another theta
        "glm4-tied": lambda: (tf.Glm4Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                                            attention_bias=False, tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": 5e4,
                                                             "partial_rotary_factor": 0.25},
                                            max_position_embeddings=128, **common), tf.Glm4ForCausalLM),
        # EXAONE 4.0: norms after the sublayers, q/k norms, windows (4) on layers 0-2 (the default pattern)
        # and layer 3 global without positions
        "exaone4": lambda: (tf.Exaone4Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                             max_position_embeddings=128, **common), tf.Exaone4ForCausalLM),
        # ... EXAONE 4.0 1.2B: no window, every layer global and rotated; tied, llama3 RoPE
        "exaone4-global": lambda: (tf.Exaone4Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=4, sliding_window=None,
                                                    layer_types=["full_attention"] * 2, tie_word_embeddings=True,
                                                    rope_parameters=llama3, max_position_embeddings=128, **common),
                                   tf.Exaone4ForCausalLM),
        # OLMo 1: LayerNorms without parameters, q/k/v clipped (clip_qkv 1.0 clips many of these values)
        "olmo": lambda: (tf.OlmoConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, clip_qkv=1.0,
                                       max_position_embeddings=128, **common), tf.OlmoForCausalLM),
        # ... biases on the four attention projections, tied, no clipping
        "olmo-bias": lambda: (tf.OlmoConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, attention_bias=True, tie_word_embeddings=True,
                                            max_position_embeddings=128, **common), tf.OlmoForCausalLM),
        # Helium: RMSNorms with the weight in float32, GLM's pairwise rotary, biases on q/k/v and the MLP
        "helium": lambda: (tf.HeliumConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           attention_bias=True, mlp_bias=True,
                                           max_position_embeddings=128, **common), tf.HeliumForCausalLM),
        # Ministral: Mistral with windows (4) on the layers layer_types marks (0 and 2)
        "ministral": lambda: (tf.MinistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                 sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                              "sliding_attention"],
                                                 max_position_embeddings=128, **common), tf.MinistralForCausalLM),
        # Ministral 3: the queries scaled by position (Llama 4's temperature; original_max_position_embeddings
        # 4, so that it grows within the prompts), YaRN, a window of 5 on every layer, head_dim 24
        "ministral3": lambda: (tf.Ministral3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                                   sliding_window=5,
                                                   rope_parameters={"rope_type": "yarn", "rope_theta": 1e6,
                                                                    "factor": 16.0, "original_max_position_embeddings": 4,
                                                                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                                                                    "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5},
                                                   max_position_embeddings=128, **common), tf.Ministral3ForCausalLM),
        # CWM: CwmConfig's layer pattern (layer 0 global, 1-3 windowed), the llama3 RoPE
        "cwm": lambda: (tf.CwmConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                     rope_parameters=llama3, max_position_embeddings=128, **common),
                        tf.CwmForCausalLM),
        # Phi-3: stored-fused qkv_proj / gate_up_proj, partial rotary (Phi-4-mini), a window
        "phi3": lambda: (tf.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.5},
                                       max_position_embeddings=128, **common), tf.Phi3ForCausalLM),
        # Phi-3.5 / Phi-4-mini LongRoPE: the short factors (sequences up to 16), tied embeddings
        "phi3-longrope": lambda: (tf.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                                original_max_position_embeddings=16, max_position_embeddings=128,
                                                rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                                 "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 4.0],
                                                                 "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 12.0, 16.0]},
                                                **common), tf.Phi3ForCausalLM),
        # Mixture of experts (kbitcli/runner/models/moe.py): top-2 of 4-8 experts, renormalised
        # (Mixtral always; Qwen with norm_topk_prob). Mixtral with a window on every layer. Top-k is
        # discontinuous: these seeds keep the k-th and next router probability >= 5e-4 apart on the
        # test inputs; if one flakes, separate its router scores, do not loosen the tolerance
        "mixtral": lambda: (tf.MixtralConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2, sliding_window=5, max_position_embeddings=128,
                                             **common), tf.MixtralForCausalLM),
        # Qwen2-MoE: a shared expert with its sigmoid gate, q/k/v biases, weights not renormalised
        "qwen2_moe": lambda: (tf.Qwen2MoeConfig(hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                                num_experts_per_tok=2, max_position_embeddings=128, **common),
                              tf.Qwen2MoeForCausalLM),
        # Qwen3-MoE: q/k norms, a dense MLP on layer 1 (mlp_only_layers), renormalised weights, tied
        "qwen3_moe": lambda: (tf.Qwen3MoeConfig(hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=24, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                                                norm_topk_prob=True, tie_word_embeddings=True,
                                                max_position_embeddings=128, **common), tf.Qwen3MoeForCausalLM),
        # ... the weights not renormalised, biases on the attention, MoE on every 2nd layer only
        "qwen3_moe-step": lambda: (tf.Qwen3MoeConfig(hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                     num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
                                                     attention_bias=True, max_position_embeddings=128, **common),
                                   tf.Qwen3MoeForCausalLM),
        # DeepSeek-V2 / V3 (models/deepseek.py): multi-head latent attention (v_head_dim unlike the q/k
        # head size; rms_norm_eps unlike the q_a / kv_a norms' 1e-6), a dense first layer, routed and
        # shared experts. V2-Lite: a direct q_proj, softmax router, greedy top 2
        "deepseek_v2-lite": lambda: (tf.DeepseekV2Config(q_lora_rank=None, n_routed_experts=4, **_deepseek(),
                                                         **common), tf.DeepseekV2ForCausalLM),
        # V2 / V2.5: q through q_a_proj -> q_a_layernorm -> q_b_proj, group_limited_greedy (the best of 2
        # groups of 4: with k 2 and the groups ranked by their best, keeping 1 group is what changes the
        # choice), routed_scaling_factor, attention biases, two shared experts
        "deepseek_v2": lambda: (tf.DeepseekV2Config(q_lora_rank=24, n_routed_experts=8, n_group=2, topk_group=1,
                                                    topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                                                    attention_bias=True, **{**_deepseek(), "n_shared_experts": 2},
                                                    **common),
                                tf.DeepseekV2ForCausalLM),
        # V3: sigmoid router choosing with e_score_correction_bias (random, non-zero: make_tiny), groups
        # ranked by their two best, renormalised, routed_scaling_factor
        "deepseek_v3": lambda: (tf.DeepseekV3Config(q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
                                                    norm_topk_prob=True, routed_scaling_factor=2.5, **_deepseek(),
                                                    **common), tf.DeepseekV3ForCausalLM),
        # ... YaRN with mscale_all_dim (the softmax scale's correction), the rotary on the two halves
        # (rope_interleave false), one group (Kimi-K2), not renormalised
        "deepseek_v3-yarn": lambda: (tf.DeepseekV3Config(
            q_lora_rank=24, n_routed_experts=4, n_group=1, topk_group=1, norm_topk_prob=False, rope_interleave=False,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                             "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.8},
            **{**_deepseek(), "num_hidden_layers": 2}, **common), tf.DeepseekV3ForCausalLM),
        # OLMoE (models/olmoe.py): q/k norms over the whole projections, softmax top 2 of 8, not renormalised
        "olmoe": lambda: (tf.OlmoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                         num_experts_per_tok=2, max_position_embeddings=128, **common),
                          tf.OlmoeForCausalLM),
        # Phi-3.5-MoE (models/phimoe.py): SparseMixer (router_jitter_noise 0.3: several experts within the
        # threshold, so the masked softmaxes matter), LayerNorms, biased attention and lm_head, a window,
        # LongRoPE's short factors and mscale (the test stays within original_max_position_embeddings)
        "phimoe": lambda: (tf.PhimoeConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                           num_experts_per_tok=2, router_jitter_noise=0.3, sliding_window=5,
                                           attention_bias=True, lm_head_bias=True, max_position_embeddings=128,
                                           rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                            "original_max_position_embeddings": 64,
                                                            "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 4.0],
                                                            "long_factor": [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0],
                                                            "short_mscale": 1.2, "long_mscale": 1.2},
                                           **common), tf.PhimoeForCausalLM),
        # GLM-4.5 (models/glm4_moe.py): a dense first layer, DeepSeek-V3's sigmoid router with its correction
        # bias in 4 groups of which 2 are kept, renormalised (the default) times 2.5, a shared expert, per-head
        # q/k norms, q/k/v biases, the rotary on half of each head (the default)
        "glm4_moe": lambda: (tf.Glm4MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                              head_dim=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                              topk_group=2, routed_scaling_factor=2.5, use_qk_norm=True,
                                              attention_bias=True, max_position_embeddings=128, **common),
                             tf.Glm4MoeForCausalLM),
        # ... GLM-4.5-Air's one group, no q/k norms, not renormalised, two shared experts, every layer sparse
        "glm4_moe-air": lambda: (tf.Glm4MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2,
                                                  first_k_dense_replace=0, norm_topk_prob=False,
                                                  max_position_embeddings=128, **common), tf.Glm4MoeForCausalLM),
        # dots.llm1 (models/glm4_moe.py): GLM's MoE with Qwen3's attention (per-head q/k norms, o_proj biased
        # too), a window on layer 2 (from max_window_layers), renormalised, 2 groups of 4 of which 1 is kept
        "dots1": lambda: (tf.Dots1Config(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
                                         topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                                         routed_scaling_factor=1.5, attention_bias=True, sliding_window=5,
                                         max_window_layers=2, max_position_embeddings=128, **common),
                          tf.Dots1ForCausalLM),
        # ERNIE 4.5 MoE (models/ernie4_5_moe.py): softmax router choosing with its correction bias (random,
        # non-zero: make_tiny), renormalised; a dense layer 0 (moe_layer_start_index 1), a shared expert
        "ernie4_5_moe": lambda: (tf.Ernie4_5_MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                                       num_hidden_layers=3, num_attention_heads=4,
                                                       num_key_value_heads=2, moe_num_experts=6, moe_k=2,
                                                       moe_num_shared_experts=1, max_position_embeddings=128,
                                                       **common), tf.Ernie4_5_MoeForCausalLM),
        # Hunyuan MoE (models/hunyuan_v1_moe.py): Hunyuan's attention (q/k norms after the rotary, biases),
        # a float32 softmax router, top 2 of 4 renormalised, the shared MLP on every token
        "hunyuan_v1_moe": lambda: (tf.HunYuanMoEV1Config(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                         num_experts=4, moe_topk=2, attention_bias=True,
                                                         max_position_embeddings=128,
                                                         rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                                         **common), tf.HunYuanMoEV1ForCausalLM),
        # gpt-oss (models/gpt_oss.py): attention sinks, a window on layers 0 and 2, YaRN (not truncated),
        # a router with a bias, stacked experts with biases, a SwiGLU clamp low enough to matter
        "gpt_oss": lambda: (tf.GptOssConfig(
            hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=5, swiglu_limit=1.0,
            max_position_embeddings=128, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                          "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                          "original_max_position_embeddings": 32},
            **common), tf.GptOssForCausalLM),
        # Llama 4 (models/llama4.py): chunks of 5 positions on the rotary layers (0-2), the NoPE layer 3
        # with a temperature that grows every 3 positions, stacked experts on layers 1 and 3 with the
        # router weight on the input, dense layers of intermediate_size_mlp, llama3 RoPE scaling
        "llama4_text": lambda: (tf.Llama4TextConfig(
            hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
            attention_chunk_size=5, floor_scale=3, attn_scale=0.5, max_position_embeddings=128,
            rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            **common), tf.Llama4ForCausalLM),
        # Granite MoE: Granite's multipliers, a router over the top-2 logits, experts stacked [E, out, in];
        # GraniteMoeShared: plus a shared expert
        "granitemoe": lambda: (tf.GraniteMoeConfig(
            hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0, residual_multiplier=0.5,
            attention_multiplier=0.1, logits_scaling=2.0, max_position_embeddings=128, **common),
            tf.GraniteMoeForCausalLM),
        "granitemoeshared": lambda: (tf.GraniteMoeSharedConfig(
            hidden_size=64, intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1,
            residual_multiplier=0.5, max_position_embeddings=128, **common), tf.GraniteMoeSharedForCausalLM),
        # top-2 routing, no q/k norm, no temperature tuning, every layer sparse
        "llama4_text-top2": lambda: (tf.Llama4TextConfig(
            hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, use_qk_norm=False,
            attn_temperature_tuning=False, no_rope_layer_interval=2, attention_chunk_size=4,
            max_position_embeddings=128, **common), tf.Llama4ForCausalLM),
        # StableLM 2: per-head q/k LayerNorms, parallel residual, q/k/v biases, GQA, partial rotary
        "stablelm": lambda: (tf.StableLmConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True,
                                               use_parallel_residual=True, use_qkv_bias=True,
                                               max_position_embeddings=128, **common), tf.StableLmForCausalLM),
        # StableLM-3B-4E1T: sequential residual, no biases, its default rotary fraction (0.25)
        "stablelm-plain": lambda: (tf.StableLmConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=4,
                                                     max_position_embeddings=128, **common), tf.StableLmForCausalLM),
        # Phi-2: partial rotary 0.4, parallel attention + MLP, biased lm_head
        "phi": lambda: (tf.PhiConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                      "partial_rotary_factor": 0.4}, **common), tf.PhiForCausalLM),
        # Phi with q/k LayerNorms, grouped-query attention and tied embeddings (lm_head keeps its bias)
        "phi-qk": lambda: (tf.PhiConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, qk_layernorm=True,
                                        tie_word_embeddings=True, max_position_embeddings=128, **common),
                           tf.PhiForCausalLM),
        # StarCoder2: LayerNorms, biases, GELU MLP, a window (5) shorter than the test prompts
        "starcoder2": lambda: (tf.Starcoder2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
                                                   max_position_embeddings=128, **common),
                               tf.Starcoder2ForCausalLM),
        # Gemma: (1 + w) norms in float32, the scaled embedding, GELU-tanh ("gelu" in old configs)
        "gemma": lambda: (tf.GemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, hidden_act="gelu",
                                         max_position_embeddings=128, **common), tf.GemmaForCausalLM),
        # Gemma 2: four norms a block, soft-capped scores and logits, a window on layers 0 and 2
        "gemma2": lambda: (tf.Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           query_pre_attn_scalar=24, sliding_window=4, attn_logit_softcapping=2.0,
                                           final_logit_softcapping=5.0, max_position_embeddings=128, **common),
                           tf.Gemma2ForCausalLM),
        # Gemma 3: q/k norms, a rotary per layer type (linear scaling on the full-attention layers)
        "gemma3": lambda: (tf.Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                               query_pre_attn_scalar=16, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                                   "rope_theta": 1e6},
                                                                "sliding_attention": {"rope_type": "default",
                                                                                      "rope_theta": 1e4}},
                                               max_position_embeddings=128, **common), tf.Gemma3ForCausalLM),
        # Gemma 3 4B-27B: a multimodal checkpoint run as its language model (the vision tower and
        # projector are in the file but not loaded); text_config leaves out defaults (rms_norm_eps)
        "gemma3-mm": lambda: (tf.Gemma3Config(
            text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                             max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, boi_token_index=97, eoi_token_index=98, image_token_index=99),
            tf.Gemma3ForConditionalGeneration),
        # the language model of other multimodal checkpoints (kbitcli/runner/models/multimodal.py), with
        # tiny vision towers that are stored but not loaded; transformers' wrapper with text-only input is
        # the reference. Llava (llava-1.5): Llama; LLaVA-NeXT (llava-1.6): Mistral with a window
        "llava": lambda: (tf.LlavaConfig(text_config=dict(model_type="llama", **_mm_text()),
                                         vision_config=dict(model_type="clip_vision_model", **_mm_vision()),
                                         image_token_index=99), tf.LlavaForConditionalGeneration),
        "llava_next": lambda: (tf.LlavaNextConfig(text_config=dict(model_type="mistral", sliding_window=5, **_mm_text()),
                                                  vision_config=dict(model_type="clip_vision_model", **_mm_vision()),
                                                  image_token_index=99), tf.LlavaNextForConditionalGeneration),
        # Mistral 3 (Mistral Small 3.1): Mistral, the head tied by Mistral3Config's default
        "mistral3": lambda: (tf.Mistral3Config(text_config=dict(model_type="mistral", sliding_window=None, **_mm_text()),
                                               vision_config=dict(model_type="pixtral", head_dim=16, **_mm_vision()),
                                               image_token_index=99), tf.Mistral3ForConditionalGeneration),
        # Ministral 3 (3B-14B): Mistral3ForConditionalGeneration around Ministral 3 (queries scaled by position)
        "mistral3-ministral3": lambda: (tf.Mistral3Config(
            text_config=dict(model_type="ministral3", head_dim=16, rope_parameters={
                "rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 4,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5},
                **_mm_text()),
            vision_config=dict(model_type="pixtral", head_dim=16, **_mm_vision()), image_token_index=99),
            tf.Mistral3ForConditionalGeneration),
        # Idefics3 and SmolVLM: Llama under model.text_model
        "idefics3": lambda: (tf.Idefics3Config(text_config=dict(model_type="llama", **_mm_text()),
                                               vision_config=_mm_vision(), image_token_id=99, scale_factor=2),
                             tf.Idefics3ForConditionalGeneration),
        "smolvlm": lambda: (tf.SmolVLMConfig(text_config=dict(model_type="llama", tie_word_embeddings=True, **_mm_text()),
                                             vision_config=_mm_vision(), image_token_id=99, scale_factor=2),
                            tf.SmolVLMForConditionalGeneration),
        # Qwen2-VL and Qwen2.5-VL: Qwen2 with M-RoPE, which is the plain rotary for text only
        "qwen2_vl": lambda: (tf.Qwen2VLConfig(text_config=dict(rope_parameters=_MROPE, **_mm_text()),
                                              vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2,
                                                                 mlp_ratio=2, patch_size=14),
                                              image_token_id=99, video_token_id=98, vision_start_token_id=97),
                             tf.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": lambda: (tf.Qwen2_5_VLConfig(text_config=dict(rope_parameters=_MROPE, **_mm_text()),
                                                   vision_config=dict(depth=1, hidden_size=32, intermediate_size=37,
                                                                      num_heads=2, out_hidden_size=64, patch_size=14,
                                                                      fullatt_block_indexes=[0]),
                                                   image_token_id=99, video_token_id=98, vision_start_token_id=97,
                                                   tie_word_embeddings=True), tf.Qwen2_5_VLForConditionalGeneration),
        # Qwen3-VL: Qwen3 (q/k norms, head_dim 16) with interleaved M-RoPE, the plain rotary for text only;
        # its deepstack layers add to image positions only
        "qwen3_vl": lambda: (tf.Qwen3VLConfig(
            text_config=dict(head_dim=16, rope_parameters=dict(_MROPE, mrope_interleaved=True), **_mm_text()),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=37, num_heads=2, out_hidden_size=64,
                               patch_size=14, deepstack_visual_indexes=[0, 1]),
            image_token_id=99, video_token_id=98, vision_start_token_id=97, tie_word_embeddings=True),
            tf.Qwen3VLForConditionalGeneration),
        # GLM-4.1V: GLM-4-0414 with interleaved M-RoPE (the plain rotary for text only) on half of each head,
        # head_dim hidden_size / heads (16); and Glm4vTextConfig's default, the rotary on the whole head
        "glm4v": lambda: (tf.Glm4vConfig(
            text_config=dict(rope_parameters=dict(_MROPE, mrope_section=[1, 1, 2], partial_rotary_factor=0.5),
                             **_mm_text()), vision_config=_GLM4V_VISION, image_token_id=99, video_token_id=98),
            tf.Glm4vForConditionalGeneration),
        "glm4v-full-rotary": lambda: (tf.Glm4vConfig(text_config=dict(rope_parameters=_MROPE, **_mm_text()),
                                                     vision_config=_GLM4V_VISION, image_token_id=99, video_token_id=98,
                                                     tie_word_embeddings=True), tf.Glm4vForConditionalGeneration),
        # LLaVA-OneVision: Qwen2, tied by its text_config (transformers 5 then ties the wrapper)
        "llava_onevision": lambda: (tf.LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", tie_word_embeddings=True, **_mm_text()),
            vision_config=dict(model_type="siglip_vision_model", **_mm_vision()), image_token_index=99,
            video_token_index=98), tf.LlavaOnevisionForConditionalGeneration),
        # VipLlava, Video-LLaVA: Llama; LLaVA-NeXT-Video: Mistral with a window
        "vipllava": lambda: (tf.VipLlavaConfig(text_config=dict(model_type="llama", **_mm_text()),
                                               vision_config=dict(model_type="clip_vision_model", **_mm_vision()),
                                               vision_feature_layers=[-2, -1], image_token_index=99),
                             tf.VipLlavaForConditionalGeneration),
        "video_llava": lambda: (tf.VideoLlavaConfig(text_config=dict(model_type="llama", **_mm_text()),
                                                    vision_config=dict(model_type="clip_vision_model", **_mm_vision()),
                                                    image_token_index=99, video_token_index=98),
                                tf.VideoLlavaForConditionalGeneration),
        "llava_next_video": lambda: (tf.LlavaNextVideoConfig(
            text_config=dict(model_type="mistral", sliding_window=5, **_mm_text()),
            vision_config=dict(model_type="clip_vision_model", **_mm_vision()), image_token_index=99,
            video_token_index=98), tf.LlavaNextVideoForConditionalGeneration),
        # Aya Vision and Command A Vision: Cohere 2 (windows of 4 on layers 0-2), tied by the wrappers'
        # default; the second with a head of its own; logit_scale 0.25 (_cohere2_vision_class)
        "aya_vision": lambda: (tf.AyaVisionConfig(text_config=dict(model_type="cohere2", sliding_window=4,
                                                                   logit_scale=0.25, **_mm_text(num_hidden_layers=4)),
                                                  vision_config=dict(model_type="siglip_vision_model", **_mm_vision()),
                                                  image_token_index=99),
                               _cohere2_vision_class(tf.AyaVisionForConditionalGeneration)),
        "cohere2_vision": lambda: (tf.Cohere2VisionConfig(
            text_config=dict(model_type="cohere2", sliding_window=4, logit_scale=0.25, **_mm_text(num_hidden_layers=4)),
            vision_config=dict(model_type="siglip_vision_model", **_mm_vision()), image_token_id=99,
            tie_word_embeddings=False), _cohere2_vision_class(tf.Cohere2VisionForConditionalGeneration)),
        # InternVL (the -hf checkpoints): Qwen3 (q/k norms, head_dim 16), untied; tied by default around Qwen2
        "internvl": lambda: (tf.InternVLConfig(text_config=dict(model_type="qwen3", **_mm_text(head_dim=16)),
                                               vision_config=dict(_mm_vision(), image_size=[28, 28],
                                                                  patch_size=[14, 14]),
                                               image_token_id=99, tie_word_embeddings=False),
                             tf.InternVLForConditionalGeneration),
        "internvl-qwen2": lambda: (tf.InternVLConfig(text_config=dict(model_type="qwen2", **_mm_text()),
                                                     vision_config=dict(_mm_vision(), image_size=[28, 28],
                                                                        patch_size=[14, 14]),
                                                     image_token_id=99), tf.InternVLForConditionalGeneration),
        # Idefics2: Mistral under model.text_model, as Idefics3's Llama
        "idefics2": lambda: (tf.Idefics2Config(text_config=dict(model_type="mistral", sliding_window=5, **_mm_text()),
                                               vision_config=_mm_vision(),
                                               perceiver_config=dict(hidden_size=64, resampler_n_latents=4,
                                                                     resampler_depth=1, resampler_n_heads=2,
                                                                     resampler_head_dim=8, num_key_value_heads=1),
                                               image_token_id=99), tf.Idefics2ForConditionalGeneration),
        # DeepSeek-VL (tied by default) and Janus (its image generation parts are not loaded either): Llama
        "deepseek_vl": lambda: (tf.DeepseekVLConfig(
            text_config=dict(model_type="llama", **_mm_text()),
            vision_config=dict(model_type="siglip_vision_model", **_mm_vision()), image_token_id=99),
            tf.DeepseekVLForConditionalGeneration),
        "janus": lambda: (tf.JanusConfig(text_config=dict(model_type="llama", **_mm_text()),
                                         vision_config=dict(_mm_vision(), projection_dim=64),
                                         vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32,
                                                        channel_multiplier=[1, 1], num_res_blocks=1, num_patches=4,
                                                        projection_dim=64, image_token_embed_dim=64),
                                         image_token_id=99, tie_word_embeddings=False),
                          tf.JanusForConditionalGeneration),
        # Cohere (Command-R): parallel block, float32 LayerNorms, interleaved rotary, q/k norms, logit_scale, tied
        "cohere": lambda: (tf.CohereConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True,
                                           logit_scale=0.5, max_position_embeddings=128, **common), tf.CohereForCausalLM),
        # ... with biases on the attention, untied, another rotary base, no q/k norms
        "cohere-bias": lambda: (tf.CohereConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                                num_attention_heads=4, attention_bias=True, tie_word_embeddings=False,
                                                rope_parameters={"rope_type": "default", "rope_theta": 5e4},
                                                max_position_embeddings=128, **common), tf.CohereForCausalLM),
        # Cohere 2 (Command R7B): windows (4, shorter than the prompts) with the rotary on layers 0-2,
        # layer 3 global without positions
        "cohere2": lambda: (tf.Cohere2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                             logit_scale=0.25, max_position_embeddings=128, **common),
                            tf.Cohere2ForCausalLM),
        "gpt2": lambda: (tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common), tf.GPT2LMHeadModel),
        "gpt_neox": lambda: (tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=128, max_position_embeddings=64,
                                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "partial_rotary_factor": 0.25}, **common),
                             tf.GPTNeoXForCausalLM),
        "gpt_neox-seq": lambda: (tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                  intermediate_size=128, max_position_embeddings=64,
                                                  use_parallel_residual=False, **common), tf.GPTNeoXForCausalLM),
        "opt": lambda: (tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                     max_position_embeddings=64, word_embed_proj_dim=32, **common),
                        tf.OPTForCausalLM),
        "opt-postln": lambda: (tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                            max_position_embeddings=64, do_layer_norm_before=False, **common),
                               tf.OPTForCausalLM),
        "bloom": lambda: (tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common), tf.BloomForCausalLM),
        # 6 heads: ALiBi slopes for a head count that is not a power of two (BLOOM-176B has 112)
        "bloom-6heads": lambda: (tf.BloomConfig(hidden_size=48, n_layer=2, n_head=6, **common), tf.BloomForCausalLM),
        # GPT-J: parallel block, interleaved rotary on 8 of the 16 features of each head, biased lm_head
        "gptj": lambda: (tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, **common),
                         tf.GPTJForCausalLM),
        # ... the rotary over the whole head, another MLP width, tied embeddings (lm_head keeps its bias)
        "gptj-tied": lambda: (tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=16, n_inner=96,
                                            tie_word_embeddings=True, n_positions=64, **common), tf.GPTJForCausalLM),
        # GPT-Neo: unscaled scores, local layers (0 and 2) with a window of 5, shorter than the test prompts
        "gpt_neo": lambda: (tf.GPTNeoConfig(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96,
                                            attention_types=[[["local", "global"], 1], [["local"], 1]], window_size=5,
                                            max_position_embeddings=64, **common), tf.GPTNeoForCausalLM),
        # GPTBigCode: multi-query attention (StarCoder, SantaCoder); and multi-head, untied
        "gpt_bigcode": lambda: (tf.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common),
                                tf.GPTBigCodeForCausalLM),
        "gpt_bigcode-mha": lambda: (tf.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=64,
                                                        multi_query=False, tie_word_embeddings=False, **common),
                                    tf.GPTBigCodeForCausalLM),
        # Falcon-7B: multi-query, parallel attention + MLP from one LayerNorm, rotary, no biases
        "falcon": lambda: (tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           max_position_embeddings=64, **common), tf.FalconForCausalLM),
        # Falcon-40B/180B: new_decoder_architecture, 2 key/value groups, ln_attn + ln_mlp, untied
        "falcon-40b": lambda: (tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=96,
                                               tie_word_embeddings=False, max_position_embeddings=64,
                                               rope_parameters={"rope_type": "default", "rope_theta": 5e4}, **common),
                               tf.FalconForCausalLM),
        # Falcon 2 11B: the new decoder with one LayerNorm (num_ln_in_parallel_attn 1), one key/value group
        "falcon-11b": lambda: (tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               new_decoder_architecture=True, num_kv_heads=1, num_ln_in_parallel_attn=1,
                                               max_position_embeddings=64, **common), tf.FalconForCausalLM),
        # Falcon-RW: ALiBi (bfloat16, divided by sqrt(head_dim)), multi-head, sequential, biases; 12 heads:
        # slopes that are not powers of two, so that the bfloat16 rounding matters (Falcon-RW-1B has 32)
        "falcon-rw": lambda: (tf.FalconConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=12, alibi=True,
                                              multi_query=False, parallel_attn=False, bias=True,
                                              max_position_embeddings=64, **common), tf.FalconForCausalLM),
    }


def _cohere2_vision_class(wrapper: type):
    """Builds Aya Vision's or Command A Vision's wrapper with its head's logits multiplied by the
    Cohere 2 text model's logit_scale, as Cohere2ForCausalLM (and vLLM's wrappers) do: transformers
    5's wrappers apply a head of their own and drop it. (A hook, not a subclass: save_pretrained
    names a subclass's tensors otherwise.)"""

    def build(cfg):
        m = wrapper(cfg)
        m.lm_head.register_forward_hook(lambda _, __, out: out * cfg.text_config.logit_scale)
        return m
    return build


def _internlm3_class():
    """InternLM3ForCausalLM as the Hub's config.json names it: transformers runs InternLM3Config with
    its Llama classes (the saved config then names this class, model_type internlm3)."""
    import transformers as tf

    class InternLM3ForCausalLM(tf.LlamaForCausalLM):
        config_class = tf.InternLM3Config
    return InternLM3ForCausalLM


def _deepseek() -> dict:
    """The sizes the tiny DeepSeek models share (a large rms_norm_eps: the q_a / kv_a norms keep 1e-6)."""
    return dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, rms_norm_eps=0.05,
                max_position_embeddings=128)


_MROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
_GLM4V_VISION = dict(depth=1, hidden_size=32, intermediate_size=37, num_heads=2, out_hidden_size=64, patch_size=14)


def _mm_text(**kw) -> dict:
    """The language model of a tiny multimodal test model (kw: other sizes)."""
    return {**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0), **kw}


def _mm_vision() -> dict:
    return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                patch_size=14)


ARCHS = list(_configs())


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "pad_token": "t0", "bos_token": "t1"}))


def make_tiny(arch: str, folder: Path):
    """A random transformers model of `arch`, saved (safetensors) in folder; returns it."""
    cfg, cls = _configs()[arch]()
    torch.manual_seed(0)
    m = cls(cfg).eval()
    with torch.no_grad():  # weights large enough that every part of the model matters
        for name, p in m.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's routing bias: non-zero, so that it matters
                b.copy_(0.3 * torch.randn_like(b))
    m.save_pretrained(folder)
    _write_tokenizer(folder)
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            d = tmp_path_factory.mktemp(arch.replace("-", "_"))
            cache[arch] = (d, make_tiny(arch, d))
        return cache[arch]
    return get


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_module_table_matches_supported_architectures():
    from kbitcli.architectures import SUPPORTED_ARCHITECTURES
    assert set(MODEL_MODULES) == set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tiny):
    folder, hf = tiny(arch)
    model, tok, _ = load(folder)
    assert model.kbit_info["kind"] == "safetensors-dir"
    ids = _ids(12, 1)
    ref = _hf_logits(hf, ids)
    with torch.no_grad():
        # full forward
        full = model(torch.tensor([ids]))[0]
        assert (full - ref).abs().max().item() < TOL
        # incremental decode with the KV cache: prefill 5, then one token at a time
        cache = KVCache(model.num_layers)
        parts = [model(torch.tensor([ids[:5]]), cache=cache)[0]]
        for t in ids[5:]:
            parts.append(model(torch.tensor([[t]]), cache=cache)[0])
        inc = torch.cat(parts)
        assert (inc - ref).abs().max().item() < TOL
        # a left-padded batch: prompts of 12 and 7 tokens, then 3 decode steps
        short = _ids(7, 2)
        extra = [_ids(3, 3), _ids(3, 4)]
        batch = torch.full((2, 12), 0, dtype=torch.long)
        batch[0] = torch.tensor(ids)
        batch[1, 5:] = torch.tensor(short)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, :5] = 0
        cache = KVCache(model.num_layers, capacity=15)
        out = [model(batch, attention_mask=mask, cache=cache)]
        for j in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out.append(model(torch.tensor([[extra[0][j]], [extra[1][j]]]), attention_mask=mask, cache=cache))
        got = torch.cat(out, dim=1)
    ref0 = _hf_logits(hf, ids + extra[0])
    ref1 = _hf_logits(hf, short + extra[1])
    assert (got[0] - ref0).abs().max().item() < TOL
    assert (got[1, 5:] - ref1).abs().max().item() < TOL


@pytest.mark.parametrize("B,S,past,pad,window,alibi", [
    (1, 9, 0, 0, None, False), (1, 9, 0, 0, 9, False), (1, 9, 0, 0, 4, False), (2, 9, 0, 3, None, False),
    (1, 1, 8, 0, None, False), (1, 1, 8, 0, 4, False), (2, 1, 8, 2, None, False), (1, 5, 8, 0, None, False),
    (1, 9, 0, 0, None, True), (2, 9, 0, 2, None, True), (1, 1, 8, 0, None, True), (1, 3, 8, 0, None, True)])
def test_attention_fast_paths_equal_the_explicit_mask(B, S, past, pad, window, alibi):
    """attention(step) (cached masks, SDPA's is_causal path, no mask for one new token, SDPA's own
    grouped-query attention) against the explicit boolean mask with k/v repeated per head."""
    from kbitcli.runner.models.base import attention, prepare_step
    g = torch.Generator().manual_seed(B * 1000 + S * 10 + past)
    H, Hkv, T = 6, 2, past + S
    q, k, v = torch.randn(B, H, S, 16, generator=g), torch.randn(B, Hkv, T, 16, generator=g), torch.randn(B, Hkv, T, 16, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :pad] = 0
    cache = KVCache(1)
    cache.length = past
    step = prepare_step(torch.zeros(B, S, dtype=torch.long), mask if pad else None, None, cache if past else None)
    bias = torch.randn(B, H, 1, T, generator=g) if alibi else None
    m = step.mask(window)
    assert step.mask(window) is m  # built once per forward
    kr, vr = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, kr, vr, attn_mask=m if bias is None else bias.masked_fill(~m, float("-inf")), scale=0.25)
    ref = ref.transpose(1, 2).reshape(B, S, H * 16)
    got = attention(q, k, v, step, 0.25, bias=bias, window=window)
    assert (got - ref).abs().max().item() < 1e-6
    assert torch.equal(attention(q, k, v, m, 0.25, bias=bias), got)


@pytest.mark.parametrize("arch", ["mistral", "bloom", "gpt_neox", "qwen3-window", "gemma2", "gemma3", "starcoder2",
                                  "gpt_neo", "falcon-rw"])
def test_cache_chunks_equal_full_forward(arch, tiny):
    """A prompt fed as 5 tokens, a chunk of 4 after the cache, then single tokens equals one forward."""
    folder, _ = tiny(arch)
    model, _, _ = load(folder)
    ids = _ids(12, 1)
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
        cache = KVCache(model.num_layers)
        parts = [model(torch.tensor([ids[:5]]), cache=cache)[0], model(torch.tensor([ids[5:9]]), cache=cache)[0]]
        parts += [model(torch.tensor([[t]]), cache=cache)[0] for t in ids[9:]]
    assert (torch.cat(parts) - full).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom", "qwen3-window", "gemma2", "gemma3", "stablelm", "phi",
                                  "starcoder2", "gptj", "gpt_neo", "falcon-rw"])
def test_greedy_generation_matches_transformers(arch, tiny):
    folder, hf = tiny(arch)
    model, tok, _ = load(folder)
    prompts = [_ids(6, 5), _ids(3, 6)]
    new, reasons, _ = generate_ids(model, prompts, 6, eos_token_ids=[], pad_token_id=0)
    for p, got in zip(prompts, new):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        assert got == ref
    assert reasons == ["length", "length"]


# ----------------------------------------------------------------------------- kbit folders
def _convert(src: Path, out: Path, spec: QuantSpec = QuantSpec(4, "nf", 64)) -> Path:
    from kbitcli.convert import convert
    from kbitcli.recipe import Recipe
    convert(src, out, Recipe.build(spec), measure_error=False)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen3", "gemma2", "gemma3-mm", "phi3", "smollm3-window",
                                  "granite", "olmo2", "stablelm", "phi-qk", "starcoder2", "mixtral", "qwen2_moe",
                                  "qwen3_moe", "llava", "qwen2_5_vl", "cohere", "cohere2", "gptj", "gpt_neo",
                                  "gpt_bigcode", "falcon-40b", "deepseek_v2-lite", "deepseek_v3", "arcee",
                                  "ernie4_5", "seed_oss", "gpt_oss", "olmoe", "phimoe", "glm4_moe", "dots1", "ernie4_5_moe", "hunyuan_v1_moe", "llama4_text",
                                  "nemotron", "apertus", "persimmon", "mpt", "codegen", "glm4", "exaone4", "olmo",
                                  "granitemoe", "granitemoeshared"])
def test_kbit_packed_equals_dequantize_on_load(arch, tiny, tmp_path):
    folder, _ = tiny(arch)
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "affine", 32))
    packed, _, _ = load(out)
    dense, _, _ = load(out, dequantize_on_load=True)
    assert packed.kbit_info["packed"] > 0 and dense.kbit_info["packed"] == 0
    assert any(isinstance(m, KbitLinear) for m in packed.modules())
    # 10 rows take the dequantize + matmul path; an MoE expert sees a few of them, which would take
    # the fused GEMV (equal to float rounding: test_kbit_packed_decode_step_close_to_dequantize_on_load)
    _set_fused_gemv(packed, False)
    ids = torch.tensor([_ids(10, 7)])
    with torch.no_grad():
        a, b = packed(ids), dense(ids)
    assert torch.equal(a, b)
    assert parameter_bytes(packed) < parameter_bytes(dense)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_kbit_routers_kept_experts_packed(arch, tiny, tmp_path):
    """The default recipe keeps the routers (block_sparse_moe.gate / mlp.gate and
    mlp.shared_expert_gate) unquantized and packs every expert projection; each expert's gate
    and up are fused, and a decode step of one sequence runs only the chosen top-k experts."""
    from kbitformat.io import KbitReader
    from kbitcli.runner.models.moe import SparseMoe
    folder, _ = tiny(arch)
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 32))
    reader = KbitReader(out)
    names = reader.names()
    routers = [n for n in names if n.endswith((".gate.weight", ".shared_expert_gate.weight"))]
    experts = [n for n in names if ".experts." in n]
    assert len(routers) == (2 if arch == "mixtral" else 4) and len(experts) == 2 * 3 * (4 if arch == "mixtral" else 8)
    assert not any(reader.is_quantized(n) for n in routers)
    assert all(reader.is_quantized(n) for n in experts)
    model, _, _ = load(out)
    moes = [m for m in model.modules() if isinstance(m, SparseMoe)]
    assert len(moes) == 2
    for moe in moes:
        assert type(moe.gate) is torch.nn.Linear
        assert all(isinstance(e.gate_up_proj, KbitLinear) for e in moe.experts)  # fused on load
    # k experts a layer, one row each
    assert _expert_rows_of_a_decode_step(model, moes) == [1] * (2 * moes[0].top_k)


def _expert_rows_of_a_decode_step(model, moes) -> list[int]:
    """The rows each expert call of the MoE layers `moes` gets in one decode step of one sequence
    (after a 6-token prompt): one call per chosen expert, one row each."""
    runs = []
    hooks = [e.register_forward_hook(lambda mod, inp, out: runs.append(inp[0].shape[0]))
             for moe in moes for e in moe.experts]
    cache = KVCache(model.num_layers)
    with torch.no_grad():
        model(torch.tensor([_ids(6, 8)]), cache=cache)
        runs.clear()
        model(torch.tensor([[7]]), cache=cache)
    for h in hooks:
        h.remove()
    return runs


@pytest.mark.parametrize("arch,routers", [
    ("olmoe", ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]),
    ("phimoe", ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.gate.weight"]),
    ("glm4_moe", [f"model.layers.{i}.mlp.gate.{w}" for i in (1, 2) for w in ("e_score_correction_bias", "weight")]),
    ("ernie4_5_moe", [f"model.layers.{i}.mlp.{w}" for i in (1, 2)
                      for w in ("gate.weight", "moe_statics.e_score_correction_bias")]),
    ("hunyuan_v1_moe", ["model.layers.0.mlp.gate.wg.weight", "model.layers.1.mlp.gate.wg.weight"])])
def test_olmoe_phimoe_glm4_moe_kbit_routers_kept_experts_packed(arch, routers, tiny, tmp_path):
    """OLMoE, Phi-3.5-MoE, GLM-4.5 and ERNIE 4.5 MoE under the default recipe: the routers (and the
    correction biases: GLM's 1-D, ERNIE's [1, experts]) stay unquantized, every expert and
    shared-expert projection is packed;
    a decode step of one sequence runs the 2 chosen experts of each MoE layer, one row each."""
    from kbitformat.io import KbitReader
    folder, _ = tiny(arch)
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 32))
    reader = KbitReader(out)
    names = reader.names()
    assert sorted(n for n in names if ".gate." in n or "moe_statics" in n) == routers
    assert not any(reader.is_quantized(n) for n in routers)
    experts = [n for n in names if ("experts." in n or "shared_mlp." in n) and n.endswith((".w1.weight", ".w2.weight", ".w3.weight",
                                                                    "_proj.weight"))]
    assert len(experts) == 2 * 3 * {"olmoe": 8, "phimoe": 4, "glm4_moe": 8 + 1, "ernie4_5_moe": 6 + 1,
                                    "hunyuan_v1_moe": 4 + 1}[arch]
    assert all(reader.is_quantized(n) for n in experts)
    model, _, _ = load(out)
    moes = [m for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.ModuleList)]
    assert len(moes) == 2
    assert _expert_rows_of_a_decode_step(model, moes) == [1] * (2 * 2)


def test_deepseek_kbit_routers_kept_experts_packed(tiny, tmp_path):
    """DeepSeek-V3 under the default recipe: the routers (mlp.gate.weight and the 1-D
    e_score_correction_bias) stay unquantized, every expert, shared expert and MLA projection is
    packed; a decode step of one sequence runs the k chosen experts of each MoE layer."""
    from kbitformat.io import KbitReader
    from kbitcli.runner.models.deepseek import MoE
    folder, _ = tiny("deepseek_v3")
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 32))
    reader = KbitReader(out)
    names = reader.names()
    routers = [n for n in names if ".mlp.gate." in n]
    assert sorted(routers) == [f"model.layers.{i}.mlp.gate.{w}" for i in (1, 2)
                               for w in ("e_score_correction_bias", "weight")]
    assert not any(reader.is_quantized(n) for n in routers)
    packed = [n for n in names if "_proj" in n]  # 5 attention projections a layer, 3 per MLP / expert
    assert len(packed) == 3 * 5 + 3 + 2 * 3 * (8 + 1) and all(reader.is_quantized(n) for n in packed)
    model, _, _ = load(out)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == 2
    assert _expert_rows_of_a_decode_step(model, moes) == [1] * (2 * 2)  # k = 2 experts a layer, one row each


def test_gpt_oss_kbit_stacked_experts_packed(tiny, tmp_path, monkeypatch):
    """gpt-oss under the default recipe: the stacked experts (3-D gate_up_proj, down_proj) are
    quantized, their biases, the routers and the sinks kept; the runner keeps each quantized stacked
    tensor packed (KbitStacked) and a decode step of one sequence dequantizes only the k chosen
    experts' rows e*R..(e+1)*R of each."""
    from kbitformat.io import KbitReader
    from kbitcli.runner.layers import KbitStacked
    folder, _ = tiny("gpt_oss")
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 32))
    reader = KbitReader(out)
    names = reader.names()
    stacked = [n for n in names if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(stacked) == 2 * 3 and all(reader.is_quantized(n) for n in stacked)
    assert reader.recipe("model.layers.0.mlp.experts.gate_up_proj")["shape"] == [4, 64, 64]
    kept = [n for n in names if n.endswith(("_bias", "router.weight", "router.bias", "sinks"))]
    assert len(kept) == 5 * 3 and not any(reader.is_quantized(n) for n in kept)
    model, _, _ = load(out)
    layers = {m.packed: m for m in model.modules() if isinstance(m, KbitStacked)}
    assert len(layers) == 6 and model.kbit_info["packed"] == 6 + 4 * 3
    rows = []
    real = KbitLinear.dequantized

    def spy(self, start=0, stop=None):
        if self in layers:
            rows.append((layers[self].shape[1], start, stop))
        return real(self, start, stop)
    monkeypatch.setattr(KbitLinear, "dequantized", spy)
    cache = KVCache(model.num_layers)
    chosen = []  # the experts the routers choose in the decode step, layer by layer
    with torch.no_grad():
        model(torch.tensor([_ids(6, 8)]), cache=cache)
        rows.clear()
        for layer in model.model.layers:
            layer.mlp.router.register_forward_hook(lambda mod, inp, o: chosen.append(sorted(o[1][0].tolist())))
        model(torch.tensor([[7]]), cache=cache)
    assert all(len(es) == 2 for es in chosen) and len(chosen) == 3
    want = [(R, e * R, (e + 1) * R) for es in chosen for e in es for R in (64, 32)]
    assert rows == want


@pytest.mark.parametrize("arch", ["granitemoe", "granitemoeshared"])
def test_granitemoe_kbit_stacked_experts_packed_router_kept(arch, tiny, tmp_path):
    """Granite MoE under the default recipe: the stacked experts (3-D input_linear / output_linear
    [E, out, in]) quantized and kept packed, the router (router.layer) unquantized, the shared
    expert's projections quantized as any linear layer."""
    from kbitformat.io import KbitReader
    from kbitcli.runner.layers import KbitStacked
    folder, _ = tiny(arch)
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 32))
    reader = KbitReader(out)
    for i in range(2):
        pre = f"model.layers.{i}."
        assert reader.is_quantized(pre + "block_sparse_moe.input_linear.weight")
        assert reader.recipe(pre + "block_sparse_moe.output_linear.weight")["shape"] == [4, 64, 32]
        assert not reader.is_quantized(pre + "block_sparse_moe.router.layer.weight")
        if arch == "granitemoeshared":
            assert reader.is_quantized(pre + "shared_mlp.input_linear.weight")
    model, _, _ = load(out)
    moe = model.model.layers[0].block_sparse_moe
    assert isinstance(moe.input_linear.weight, KbitStacked) and isinstance(moe.output_linear.weight, KbitStacked)


@pytest.mark.parametrize("arch", ["deepseek_v2-lite", "deepseek_v3"])
def test_deepseek_fused_projections_same_model(arch, tiny, tmp_path):
    """The two projections of the input in multi-head latent attention (q_proj or q_a_proj, and
    kv_a_proj_with_mqa) run as one qkv_a_proj, and every expert's gate/up as one layer: the
    same logits as unfused (float32 rounding; packed decode steps bit for bit)."""
    folder, _ = tiny(arch)
    fused, _, _ = load(folder)
    plain, _, _ = load(folder, fuse=False)
    attn = [layer.self_attn for layer in fused.model.layers]
    assert all(a.qkv_a_proj is not None and not hasattr(a, "kv_a_proj_with_mqa") for a in attn)
    ids = torch.tensor([_ids(9, 5)])
    with torch.no_grad():
        a, b = fused(ids), plain(ids)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 32))
    kf, _, _ = load(out)
    ku, _, _ = load(out, fuse=False)
    assert kf.kbit_info["fused"] > 0 and ku.kbit_info["fused"] == 0
    with torch.no_grad():
        for m in (kf, ku):
            m.cache = KVCache(m.num_layers)
            m(ids, cache=m.cache)
        for t in _ids(4, 6):
            step = torch.tensor([[t]])
            assert torch.equal(kf(step, cache=kf.cache), ku(step, cache=ku.cache))


def _set_fused_gemv(model, on: bool) -> int:
    layers = [m for m in model.modules() if isinstance(m, KbitLinear)]
    for m in layers:
        m.fused_gemv = on
    return len(layers)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "mixtral", "qwen2_moe"])
def test_kbit_packed_decode_step_close_to_dequantize_on_load(arch, tiny, tmp_path):
    """Few input rows (decode steps) go through the fused GEMV on the CPU: not bit-identical
    to dequantize + F.linear (another summation order), but within float32 rounding; the
    same input with the fused GEMV switched off is bit-identical again."""
    folder, _ = tiny(arch)
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "affine", 32))
    packed, _, _ = load(out)
    dense, _, _ = load(out, dequantize_on_load=True)
    assert _set_fused_gemv(packed, True) > 0
    for n in (1, 3, GEMV_MAX_ROWS):
        ids = torch.tensor([_ids(n, 11 + n)])
        with torch.no_grad():
            a, b = packed(ids), dense(ids)
            assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), (arch, n)
            _set_fused_gemv(packed, False)
            assert torch.equal(packed(ids), b), (arch, n)
            _set_fused_gemv(packed, True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_kbit_4bit_greedy_tokens_same_through_gemv(arch, tiny, tmp_path):
    """Greedy generation of a 4-bit model: the packed model (decode steps through the fused
    CPU GEMV) makes the same tokens as the model dequantized on load."""
    folder, _ = tiny(arch)
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 32))
    packed, _, _ = load(out)
    dense, _, _ = load(out, dequantize_on_load=True)
    calls = []
    import kbitcli.runner.layers as L
    real = L.numba_gemv_plan()
    assert real is not None
    prompts = [_ids(5, 21), _ids(9, 22)]

    def counting(*a):
        plan = real(*a)

        def call(x):
            calls.append(x.shape[0])
            return plan(x)
        return call
    orig, L.numba_gemv_plan = L.numba_gemv_plan, lambda: counting
    try:
        got, _, _ = generate_ids(packed, prompts[:1], 16, eos_token_ids=[], pad_token_id=0)
        got2, _, _ = generate_ids(packed, prompts, 12, eos_token_ids=[], pad_token_id=0)
    finally:
        L.numba_gemv_plan = orig
    assert calls and set(calls) <= {1, 2, 5}  # decode steps (and the 5-token prompt) took the GEMV
    ref, _, _ = generate_ids(dense, prompts[:1], 16, eos_token_ids=[], pad_token_id=0)
    ref2, _, _ = generate_ids(dense, prompts, 12, eos_token_ids=[], pad_token_id=0)
    assert got == ref and got2 == ref2


# ----------------------------------------------------------------------------- fused projections
def _kbit_layer(rows: int, cols: int, spec: QuantSpec, seed: int, bias: bool = False) -> KbitLinear:
    rng = np.random.default_rng(seed)
    qt = quantize(rng.standard_normal((rows, cols)).astype(np.float32), spec)
    return KbitLinear.from_quantized(qt, bias=rng.standard_normal(rows).astype(np.float32) if bias else None)


@pytest.mark.parametrize("spec,bias", [(QuantSpec(4, "nf", 64), False), (QuantSpec(4, "affine", 32), True),
                                       (QuantSpec(3, "int", 32, scale="dq"), False), (QuantSpec(8, "fp", 64), True)])
def test_kbit_linear_concat_is_the_layers_side_by_side(spec, bias):
    """The fused layer's output is the separate layers' outputs concatenated: bit for bit in a
    decode step (the fused GEMV computes each output row alone) and in the dequantized weight;
    a prompt pass (matmul over the stacked weight) within float32 rounding."""
    from kbitcli.runner.layers import fuse_linears
    layers = [_kbit_layer(r, 96, spec, seed, bias) for seed, r in enumerate((64, 32, 32))]
    fused = fuse_linears(layers)
    assert isinstance(fused, KbitLinear) and fused.shape == (128, 96)
    assert torch.equal(fused.dequantized(), torch.cat([m.dequantized() for m in layers]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in (1, 3, 12):
            x = torch.randn(1, n, 96, generator=g)
            want = torch.cat([m(x) for m in layers], dim=-1)
            got = fused(x)
            if n <= GEMV_MAX_ROWS:
                assert torch.equal(got, want), n
            else:
                assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item(), n


def test_fuse_linears_refuses_layers_that_cannot_share_one():
    from kbitcli.runner.layers import fuse_linears
    a = _kbit_layer(32, 64, QuantSpec(4, "nf", 64), 0)
    assert fuse_linears([a, _kbit_layer(32, 64, QuantSpec(8, "nf", 64), 1)]) is None          # bits
    assert fuse_linears([a, _kbit_layer(32, 64, QuantSpec(4, "nf", 32), 1)]) is None          # block size
    assert fuse_linears([a, _kbit_layer(32, 128, QuantSpec(4, "nf", 64), 1)]) is None         # in_features
    assert fuse_linears([a, _kbit_layer(32, 64, QuantSpec(4, "nf", 64), 1, bias=True)]) is None  # bias
    assert fuse_linears([a, _kbit_layer(32, 64, QuantSpec(4, "fp", 64), 1)]) is None          # codebook
    assert fuse_linears([a, torch.nn.Linear(64, 32)]) is None                                 # packed + plain
    assert fuse_linears([torch.nn.Linear(64, 8), torch.nn.Linear(32, 8)]) is None             # in_features
    assert fuse_linears([a]) is None


@pytest.mark.parametrize("arch,groups", [("llama", 2), ("llama-tied-bias", 2), ("qwen2", 2), ("mistral", 2),
                                         ("qwen3", 2), ("gemma", 2), ("gemma3", 2), ("opt", 1), ("gpt2", 0),
                                         ("smollm3", 2), ("granite", 2), ("olmo2", 2),
                                         ("stablelm", 2), ("phi", 1), ("starcoder2", 1), ("gptj", 1), ("gpt_neo", 1),
                                         ("arcee", 1), ("ernie4_5", 2), ("seed_oss", 2)])
def test_fused_projections_same_model(arch, groups, tiny, tmp_path):
    """load(fuse=True) runs q/k/v (and gate/up) as one layer: the same logits as the unfused
    model (plain checkpoint: within float32 rounding; packed kbit decode steps: bit for bit)."""
    folder, _ = tiny(arch)
    fused, _, _ = load(folder)
    plain, _, _ = load(folder, fuse=False)
    n_layers = fused.num_layers
    assert fused.kbit_info["fused"] == groups * n_layers and plain.kbit_info["fused"] == 0
    names = {n for n, _ in fused.named_modules()}
    assert any(n.endswith("qkv_proj") for n in names) == (groups > 0)
    assert not any(n.endswith(".q_proj") for n in names) or groups == 0
    ids = torch.tensor([_ids(9, 5)])
    with torch.no_grad():
        a, b = fused(ids), plain(ids)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 32))
    kf, _, _ = load(out)
    ku, _, _ = load(out, fuse=False)
    assert kf.kbit_info["fused"] == groups * n_layers
    with torch.no_grad():
        for m in (kf, ku):
            m.cache = KVCache(m.num_layers)
            m(ids, cache=m.cache)
        for t in _ids(4, 6):  # decode steps: the fused GEMV, row by row as before
            step = torch.tensor([[t]])
            assert torch.equal(kf(step, cache=kf.cache), ku(step, cache=ku.cache))


def test_fusion_skips_groups_with_different_recipes(tiny, tmp_path):
    """A rule that gives k_proj another type leaves q/k/v separate; gate/up still fuse."""
    from kbitcli.convert import convert
    from kbitcli.recipe import Recipe
    folder, _ = tiny("llama")
    out = tmp_path / "kbit"
    convert(folder, out, Recipe.build(QuantSpec(4, "nf", 32), ["*.k_proj.weight=8:int"]), measure_error=False)
    model, _, _ = load(out)
    assert model.kbit_info["fused"] == model.num_layers
    names = {n for n, _ in model.named_modules()}
    assert any(n.endswith("self_attn.k_proj") for n in names) and any(n.endswith("gate_up_proj") for n in names)
    unfused, _, _ = load(out, fuse=False)
    ids = torch.tensor([_ids(10, 8)])
    with torch.no_grad():
        a, b = model(ids), unfused(ids)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("spec", [QuantSpec(4, "nf", 64), QuantSpec(3, "int", 32, scale="dq"),
                                  QuantSpec(5, "affine", 32), QuantSpec(8, "fp", 128, scale="e8"),
                                  QuantSpec(2, "nf", 0, scale="fp32"), QuantSpec(6, "quantile", 64)])
def test_torch_dequantization_is_bit_exact(spec):
    rng = np.random.default_rng(spec.bits)
    x = (rng.standard_normal((37, 150)) * rng.uniform(0.01, 3, (37, 1))).astype(np.float32)
    qt = quantize(x, spec)
    ref = dequantize(qt, NumpyOps)
    for layout in ("out_in", "in_out"):
        for kernel in ("torch", "numba"):
            got = KbitLinear.from_quantized(qt, layout=layout, kernel=kernel).dequantized().numpy()
            assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), (layout, kernel)


def test_numba_cuda_dequantizer_under_the_simulator():
    """The CUDA plumbing of KbitLinear (dtypes, argument order, the way back to torch), with the
    Numba CUDA kernel run by Numba's simulator at a tiny size."""
    import os
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("Numba's CUDA simulator is not enabled (tests/conftest.py sets it)")
    try:
        import kbitcli.kernels.cuda  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"kbitcli.kernels.cuda is not available ({e})")
    from kbitcli.runner.layers import dequantize_numba_cuda
    rng = np.random.default_rng(5)
    for spec in (QuantSpec(4, "nf", 32), QuantSpec(3, "affine", 32)):
        x = rng.standard_normal((3, 40)).astype(np.float32)
        qt = quantize(x, spec)
        layer = KbitLinear.from_quantized(qt, kernel="torch")
        got = dequantize_numba_cuda(layer.codes, layer.bits, layer.block_size, layer.shape[1], layer.scales,
                                    layer.offsets, layer.codebook).numpy()
        ref = dequantize(qt, NumpyOps)
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
        if layer.use_byte_layout():  # k = 4: the byte layout's CUDA kernel, the same values
            got = dequantize_numba_cuda(layer.codes, layer.bits, layer.block_size, layer.shape[1], layer.scales,
                                        layer.offsets, layer.codebook, layout="bytes").numpy()
            assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_torch_dequantization_golden_vectors():
    from kbitformat.io import KbitReader
    names = sorted(p.name[: -len(".safetensors")] for p in VECTORS.glob("*.safetensors"))
    assert names
    for name in names:
        qt = KbitReader(VECTORS / f"{name}.safetensors").quantized(name)
        s = qt.decoded_scales()
        o = qt.decoded_offsets(s)
        t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
        got = dequantize_torch(torch.from_numpy(np.array(qt.codes).view(np.int32)), qt.spec.bits, qt.block_size, qt.cols,
                               t(s), t(o), t(qt.codebook)).numpy().reshape(qt.shape)
        expected = np.load(VECTORS / f"{name}.expected.npy")
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), name


# ----------------------------------------------------------------------------- SmolLM2-135M
@pytest.fixture(scope="module")
def smol():
    from kbitcli.sources import embedded_model_path
    path = embedded_model_path()
    model, tok, cfg = load(path)
    return path, model, tok


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smol):
    path, model, tok = smol
    hf = transformers_gguf_model(path)
    ids = tok.encode("The quick brown fox jumps over the lazy dog because")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        got = model(torch.tensor([ids]))[0]
    assert (got - ref).abs().max().item() < TOL


@pytest.mark.slow
def test_smollm2_greedy_paris(smol):
    _, model, tok = smol
    res = generate(model, tok, "The capital of France is", max_new_tokens=6)
    assert "Paris" in res.completions[0].text
    assert res.generated_tokens > 0 and res.tokens_per_second > 0


@pytest.mark.slow
def test_smollm2_kbit_4bit_packed_equals_dequantized(smol, tmp_path_factory):
    path, _, tok = smol
    out = _convert(path, tmp_path_factory.mktemp("smol") / "kbit")
    packed, tok2, _ = load(out)
    dense, _, _ = load(out, dequantize_on_load=True)
    assert packed.kbit_info["packed"] == 30 * 7
    ids = torch.tensor([tok2.encode("The capital of France is")])
    assert ids.shape[1] <= GEMV_MAX_ROWS  # so the packed layers take the fused GEMV
    with torch.no_grad():
        a, b = packed(ids), dense(ids)
        # The fused GEMV (few input rows: decode steps, and this short prompt) sums each dot
        # product in another order than F.linear on the dequantized weight (per block, with
        # fused multiply-adds), so the logits agree to float32 rounding, not bit for bit ...
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
        # ... while dequantize + matmul (what the packed layers do for more rows) is exact.
        _set_fused_gemv(packed, False)
        assert torch.equal(packed(ids), b)
        _set_fused_gemv(packed, True)
    assert parameter_bytes(packed) < 0.5 * parameter_bytes(dense)
    res = generate(packed, tok2, "The capital of France is", max_new_tokens=2)
    assert res.generated_tokens > 0


# ----------------------------------------------------------------------------- generation details
def test_old_checkpoint_names_and_config_keys(tiny, tmp_path):
    """GPT-2 saved from GPT2Model (no 'transformer.' prefix, causal-mask buffers); GPT-NeoX's
    older rotary_pct / rotary_emb_base config keys."""
    from safetensors.torch import load_file, save_file
    folder, hf = tiny("gpt2")
    d = tmp_path / "gpt2-old"
    shutil.copytree(folder, d)
    sd = load_file(str(d / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    (d / "model.safetensors").unlink()
    save_file(old, str(d / "model.safetensors"))
    model, _, _ = load(d)
    ids = _ids(9, 11)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL
    from kbitcli.runner.models.base import rope_settings
    r = rope_settings({"rotary_pct": 0.25, "rotary_emb_base": 10000}, default_partial=0.25)
    assert r["partial_rotary_factor"] == 0.25 and r["rope_theta"] == 10000.0 and r["rope_type"] == "default"
    r = rope_settings({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert r["rope_theta"] == 5e5 and r["rope_type"] == "llama3"
    # Qwen2.5's older spelling of YaRN, as its model cards tell users to add it
    r = rope_settings({"max_position_embeddings": 131072, "rope_theta": 1e6,
                       "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    assert (r["rope_type"], r["factor"], r["original_max_position_embeddings"]) == ("yarn", 4.0, 32768)
    from kbitcli.runner.models.base import rope_attention_scaling, rope_inv_freq
    assert rope_attention_scaling(r) == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert rope_inv_freq(r, 128).shape == (64,)
    with pytest.raises(InputError, match="needs 64"):  # a factor per frequency
        rope_inv_freq(rope_settings({"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}}),
                      128)
    with pytest.raises(InputError, match="'ntk-by-parts' is not supported"):
        rope_inv_freq(rope_settings({"rope_scaling": {"rope_type": "ntk-by-parts", "factor": 2.0}}), 128)


@pytest.mark.parametrize("arch,buffers", [
    ("gptj", ["transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias"]),
    ("gpt_neo", ["transformer.h.0.attn.attention.bias", "transformer.h.0.attn.attention.masked_bias"]),
])
def test_old_causal_mask_buffers_ignored(arch, buffers, tiny, tmp_path):
    """Files saved by older transformers (EleutherAI's GPT-J and GPT-Neo) may hold the attention's
    causal-mask buffers: ignored, the same logits."""
    from safetensors.torch import load_file, save_file
    folder, hf = tiny(arch)
    d = tmp_path / "old"
    shutil.copytree(folder, d)
    sd = load_file(str(d / "model.safetensors"))
    sd.update({b: torch.ones(1, 1, 8, 8) for b in buffers})
    save_file(sd, str(d / "model.safetensors"))
    model, _, _ = load(d)
    ids = _ids(9, 11)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_hub_config_keys(arch, tiny, tmp_path):
    """config.json as the Hub files spell it: the RoPE base as rope_theta, or absent (Mixtral's
    default is 1e6); Qwen3-MoE's expert count as num_experts (transformers 5 writes
    num_local_experts)."""
    folder, hf = tiny(arch)
    d = tmp_path / "hub"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    if arch == "qwen3_moe":
        cfg["num_experts"], cfg["rope_theta"] = cfg.pop("num_local_experts"), theta
    (d / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load(d)
    ids = _ids(12, 1)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


def test_deepseek_hub_config_and_mtp_layer(tiny, tmp_path):
    """DeepSeek-V3 as the Hub files spell it (Kimi-K2's model_type, the old rope_scaling with
    "type" and a top-level rope_theta, DeepSeek's own scoring_func / topk_method keys, no
    head_dim) and a multi-token-prediction layer stored after the last layer, which is ignored."""
    from safetensors.torch import load_file, save_file
    folder, hf = tiny("deepseek_v3-yarn")
    d = tmp_path / "hub"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rope.pop("rope_type"), **rope, "beta_fast": 32, "beta_slow": 1}
    for key in ("head_dim", "qk_head_dim"):
        del cfg[key]
    cfg.update(model_type="kimi_k2", scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
    (d / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.2.mlp.experts.0.up_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    model, _, _ = load(d)
    ids = _ids(12, 1)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


def test_glm4_moe_hub_config_and_mtp_layer(tiny, tmp_path):
    """GLM-4.5 as the Hub files spell it (a top-level rope_theta, no partial_rotary_factor: half of
    each head rotates by default) and a multi-token-prediction layer stored after the last layer,
    which is ignored."""
    from safetensors.torch import load_file, save_file
    folder, hf = tiny("glm4_moe")
    d = tmp_path / "hub"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg.pop("partial_rotary_factor", None)
    (d / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    tensors["model.layers.3.mlp.experts.0.up_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    model, _, _ = load(d)
    ids = _ids(12, 1)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


def test_llama4_config_defaults():
    """A Llama 4 config.json naming nothing gets Llama4TextConfig's defaults and derived lists
    (NoPE every 4th layer, chunked attention on the others, every layer sparse)."""
    import transformers as tf
    from kbitcli.runner.models import build_args
    _, a = build_args({"model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"]})
    ref = tf.Llama4TextConfig()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "num_local_experts",
                "num_experts_per_tok", "moe_layers", "no_rope_layers", "layer_types", "attention_chunk_size",
                "floor_scale", "attn_scale", "attn_temperature_tuning", "use_qk_norm", "tie_word_embeddings",
                "max_position_embeddings"):
        assert getattr(a, key) == getattr(ref, key), key
    assert a.rope["rope_theta"] == ref.rope_parameters["rope_theta"]


def test_ernie4_5_moe_mtp_tensors_and_transformers_names(tiny, tmp_path):
    """ERNIE 4.5 MoE with the multi-token-prediction tensors the Hub checkpoints store (ignored) and
    the expert count and k under transformers' names (num_experts, num_experts_per_tok)."""
    from safetensors.torch import load_file, save_file
    folder, hf = tiny("ernie4_5_moe")
    d = tmp_path / "hub"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_experts"], cfg["num_experts_per_tok"] = cfg.pop("moe_num_experts"), cfg.pop("moe_k")
    (d / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(d / "model.safetensors")
    tensors["model.mtp_block.0.mlp.gate_proj.weight"] = torch.zeros(96, 64)
    tensors["model.mtp_linear_proj.0.weight"] = torch.zeros(64, 128)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    model, _, _ = load(d)
    ids = _ids(12, 1)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


def test_llama4_checkpoint_runs_its_language_model(tmp_path):
    """A Llama4ForConditionalGeneration checkpoint (Scout, Maverick) runs its language model: the
    vision model and projector are stored but not loaded; the logits are those of transformers'
    language model inside the wrapper (the wrapper's own forward fails on text alone in
    transformers 5.24), straight and after a 4-bit conversion that keeps the stacked experts packed."""
    import transformers as tf
    from kbitcli.runner.layers import KbitStacked
    cfg = tf.Llama4Config(
        text_config=dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                         interleave_moe_layer_step=2, attention_chunk_size=5, floor_scale=3, max_position_embeddings=128,
                         vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, **_mm_vision()),
        image_token_index=99)
    torch.manual_seed(0)
    hf = tf.Llama4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    _write_tokenizer(folder)
    ids = _ids(12, 1)
    ref = _hf_logits(hf.language_model, ids)
    model, _, _ = load(folder)
    assert model.language_model_type == "llama4_text"
    assert not any("vision" in n or "projector" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - ref).abs().max().item() < TOL
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "affine", 32))
    packed, _, _ = load(out)
    experts = packed.model.layers[1].feed_forward.experts
    assert isinstance(experts.gate_up_proj, KbitStacked) and isinstance(experts.down_proj, KbitStacked)
    dense, _, _ = load(out, dequantize_on_load=True)
    _set_fused_gemv(packed, False)  # the dequantize + matmul path, as test_kbit_packed_equals_dequantize_on_load
    with torch.no_grad():
        q = packed(torch.tensor([ids]))[0]
        assert torch.equal(q, dense(torch.tensor([ids]))[0])
    assert 0 < (q - ref).abs().max().item() < 0.5 * ref.abs().max().item()


@pytest.mark.parametrize("arch", ["deepseek_v2-lite", "deepseek_v3"])
def test_deepseek_cache_holds_the_compressed_kv(arch, tiny):
    """The KV cache keeps MLA's compressed kv and the shared rotated key, one "head" of
    kv_lora_rank + qk_rope_head_dim features a position (no expanded per-head keys or values),
    and decode steps over it (kv_b_proj absorbed) give transformers' logits at every position."""
    folder, hf = tiny(arch)
    model, _, _ = load(folder)
    cfg = json.loads((folder / "config.json").read_text())
    ids = _ids(12, 1)
    cache = KVCache(model.num_layers)
    with torch.no_grad():
        steps = [model(torch.tensor([ids[:8]]), cache=cache)[0]]
        steps += [model(torch.tensor([[t]]), cache=cache)[0] for t in ids[8:]]
    assert cache.k[0].shape[:2] == (1, 1) and cache.k[0].shape[3] == cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    assert cache.v[0].shape[3] == 0
    assert (torch.cat(steps) - _hf_logits(hf, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_bfloat16_same_bits_as_transformers(arch, tiny):
    """In bfloat16 the routers stay float32 (loaded and computed so, as transformers keeps them:
    _keep_in_fp32_modules_strict) and V2 rotates in float32 from float32 tables (its complex
    rotary): the logits equal transformers' bit for bit (its eager experts, the per-expert loop
    the runner's grouping computes alike)."""
    from safetensors.torch import load_file
    folder, _ = tiny(arch)
    hf = _configs()[arch]()[1].from_pretrained(folder, dtype=torch.bfloat16, experts_implementation="eager").eval()
    model, _, _ = load(folder, dtype="bfloat16")
    gate = model.model.layers[1].mlp.gate
    stored = load_file(folder / "model.safetensors")
    assert model.model.layers[1].mlp.experts[0].down_proj.weight.dtype == torch.bfloat16
    assert torch.equal(gate.weight, stored["model.layers.1.mlp.gate.weight"])
    if arch == "deepseek_v3":
        assert torch.equal(gate.e_score_correction_bias, stored["model.layers.1.mlp.gate.e_score_correction_bias"])
    ids = torch.tensor([_ids(12, 1)])
    with torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)


@pytest.mark.parametrize("arch", ["olmoe", "phimoe", "glm4_moe", "dots1", "hunyuan_v1_moe"])
def test_olmoe_phimoe_glm4_moe_bfloat16_same_bits_as_transformers(arch, tiny):
    """In bfloat16 the logits equal transformers' (eager experts) bit for bit: OLMoE's q/k norms
    round before their weight, Phi-3.5-MoE's SparseMixer softmaxes run in bfloat16 and GLM's
    router in float32."""
    folder, _ = tiny(arch)
    hf = _configs()[arch]()[1].from_pretrained(folder, dtype=torch.bfloat16, experts_implementation="eager").eval()
    model, _, _ = load(folder, dtype="bfloat16")
    ids = torch.tensor([_ids(12, 1)])
    with torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)


@pytest.mark.parametrize("arch", ["olmo", "helium", "glm4", "exaone4", "ministral3"])
def test_dense_bfloat16_same_bits_as_transformers(arch, tiny):
    """Where these models round differently from Llama, the runner rounds as transformers does: in
    bfloat16 the logits are transformers' bit for bit (OLMo's float32 LayerNorms and float32 rotary
    tables, Helium's norms multiplying in float32, GLM's pairwise rotary in the compute dtype,
    Ministral 3's query scale rounded to it)."""
    folder, _ = tiny(arch)
    hf = _configs()[arch]()[1].from_pretrained(folder, dtype=torch.bfloat16).eval()
    model, _, _ = load(folder, dtype="bfloat16")
    ids = torch.tensor([_ids(12, 1)])
    with torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_configs_written_before_layer_types(arch, tiny, tmp_path):
    """Hub configs older than transformers 5 have no layer_types (Gemma 2: every other layer
    slides; Gemma 3: sliding_window_pattern) and spell Gemma 3's two rotaries as rope_theta,
    rope_scaling and rope_local_base_freq: the same model, the same logits."""
    folder, hf = tiny(arch)
    d = tmp_path / "old"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.pop("layer_types") == ["sliding_attention", "full_attention", "sliding_attention"]
    if arch == "gemma3":
        rp = cfg.pop("rope_parameters")
        cfg.update(sliding_window_pattern=2, rope_theta=rp["full_attention"]["rope_theta"],
                   rope_local_base_freq=rp["sliding_attention"]["rope_theta"],
                   rope_scaling={"rope_type": "linear", "factor": rp["full_attention"]["factor"]})
    (d / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load(d)
    ids = _ids(12, 4)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("arch,drop", [("smollm3", "no_rope_layers"), ("smollm3-window", "layer_types")])
def test_smollm3_config_defaults(arch, drop, tiny, tmp_path):
    """SmolLM3 configs may leave out no_rope_layers (every 4th layer without the rotary) and
    layer_types (with use_sliding_window, the window is on the NoPE layers): the same logits."""
    folder, hf = tiny(arch)
    d = tmp_path / "old"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.pop(drop) == {"no_rope_layers": [1, 1, 1, 0],
                             "layer_types": ["full_attention", "sliding_attention"] * 2}[drop]
    (d / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load(d)
    ids = _ids(12, 4)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("arch,cls", [("arcee", "ArceeConfig"), ("ernie4_5", "Ernie4_5Config"),
                                      ("seed_oss", "SeedOssConfig")])
def test_llamalike_config_defaults(arch, cls):
    """A config.json naming only the sizes gets the transformers configuration class's defaults
    (head_dim, epsilon, activation, tied head, biases, RoPE theta)."""
    import transformers as tf
    from kbitcli.runner.models import build_args
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    _, a = build_args({"model_type": arch, **sizes})
    ref = getattr(tf, cls)(**sizes)
    assert a.head_dim == ref.head_dim and a.rms_norm_eps == ref.rms_norm_eps and a.hidden_act == ref.hidden_act
    assert a.tie_word_embeddings == ref.tie_word_embeddings
    assert a.rope["rope_theta"] == ref.rope_parameters["rope_theta"]
    bias = getattr(ref, "use_bias", None)
    assert (a.qkv_bias, a.o_bias, a.mlp_bias) == (
        (bias, bias, bias) if bias is not None
        else (ref.attention_bias, getattr(ref, "attention_out_bias", ref.attention_bias), ref.mlp_bias))


@pytest.mark.parametrize("arch,cls", [("granitemoe", "GraniteMoeConfig"), ("granitemoeshared", "GraniteMoeSharedConfig")])
def test_granitemoe_config_defaults(arch, cls):
    """A Granite MoE config.json naming only the sizes gets the configuration class's defaults."""
    import transformers as tf
    from kbitcli.runner.models import build_args
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, vocab_size=VOCAB)
    _, a = build_args({"model_type": arch, **sizes})
    ref = getattr(tf, cls)(**sizes)
    for key in ("num_local_experts", "num_experts_per_tok", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        assert getattr(a, key) == getattr(ref, key), key
    assert a.shared_intermediate_size == (getattr(ref, "shared_intermediate_size", None) or 0)
    assert a.rope["rope_theta"] == ref.rope_parameters["rope_theta"]


@pytest.mark.parametrize("arch,cls", [("olmoe", "OlmoeConfig"), ("phimoe", "PhimoeConfig"),
                                      ("glm4_moe", "Glm4MoeConfig"), ("dots1", "Dots1Config"),
                                      ("ernie4_5_moe", "Ernie4_5_MoeConfig"), ("hunyuan_v1_moe", "HunYuanMoEV1Config")])
def test_moe_config_defaults(arch, cls):
    """A config.json naming only the sizes gets the transformers configuration class's defaults
    (experts and their routing, key/value heads, epsilon, RoPE theta and rotary fraction)."""
    import transformers as tf
    from kbitcli.runner.models import build_args
    # 8 heads: Phimoe's and Glm4Moe's default of 8 key/value heads must divide them
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, vocab_size=VOCAB)
    if arch == "dots1":  # Dots1Config has no default expert counts; its 32 key/value heads need 32 heads;
        # a window (its default 4096) on the layers from max_window_layers on
        sizes.update(num_attention_heads=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                     max_window_layers=1)
    _, a = build_args({"model_type": arch, **sizes})
    ref = getattr(tf, cls)(**sizes)
    assert a.num_key_value_heads == ref.num_key_value_heads and a.rms_norm_eps == ref.rms_norm_eps
    assert a.rope["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert a.rope["partial_rotary_factor"] == ref.rope_parameters.get("partial_rotary_factor", 1.0)
    if arch == "ernie4_5_moe":  # transformers' names: num_experts (moe_num_experts), num_experts_per_tok (moe_k)
        assert (a.moe_num_experts, a.moe_k, a.moe_intermediate_size, a.moe_num_shared_experts, a.moe_layer_start_index,
                a.moe_layer_end_index, a.moe_layer_interval, a.moe_norm_min, a.head_dim) == (
            ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size, ref.moe_num_shared_experts,
            ref.moe_layer_start_index, ref.moe_layer_end_index, ref.moe_layer_interval, ref.moe_norm_min,
            ref.hidden_size // ref.num_attention_heads)
        assert a.tie_word_embeddings == ref.tie_word_embeddings
        return
    if arch == "hunyuan_v1_moe":
        assert (a.num_experts, a.moe_topk, a.tie_word_embeddings, a.qkv_bias, a.head_dim) == (
            ref.num_experts, ref.moe_topk, ref.tie_word_embeddings, ref.attention_bias,
            ref.head_dim or ref.hidden_size // ref.num_attention_heads)
        return
    assert a.num_experts_per_tok == ref.num_experts_per_tok and a.tie_word_embeddings == ref.tie_word_embeddings
    if arch == "dots1":
        assert a.layer_types == ["full_attention", "sliding_attention"] and (a.layer_types, a.sliding_window) == (ref.layer_types, ref.sliding_window)
        assert (a.qkv_bias, a.o_bias) == (ref.attention_bias, ref.attention_bias)
        assert (a.n_group, a.topk_group, a.norm_topk_prob, a.routed_scaling_factor, a.first_k_dense_replace,
                a.moe_intermediate_size) == (ref.n_group, ref.topk_group, ref.norm_topk_prob,
                                             ref.routed_scaling_factor, ref.first_k_dense_replace,
                                             ref.moe_intermediate_size)
    elif arch == "glm4_moe":
        assert (a.n_routed_experts, a.n_shared_experts, a.moe_intermediate_size, a.first_k_dense_replace, a.n_group,
                a.topk_group, a.norm_topk_prob, a.routed_scaling_factor, a.use_qk_norm) == (
            ref.n_routed_experts, ref.n_shared_experts, ref.moe_intermediate_size, ref.first_k_dense_replace,
            ref.n_group, ref.topk_group, ref.norm_topk_prob, ref.routed_scaling_factor, ref.use_qk_norm)
    else:
        assert a.num_experts == ref.num_local_experts and a.moe_intermediate_size == ref.intermediate_size
        assert a.qkv_bias == ref.attention_bias
    if arch == "olmoe":
        assert a.norm_topk_prob == ref.norm_topk_prob and a.clip_qkv == ref.clip_qkv
    if arch == "phimoe":
        assert (a.router_jitter_noise, a.lm_head_bias, a.sliding_window) == (
            ref.router_jitter_noise, ref.lm_head_bias, ref.sliding_window)


@pytest.mark.parametrize("arch,cls", [("nemotron", "NemotronConfig"), ("hunyuan_v1_dense", "HunYuanDenseV1Config"),
                                      ("apertus", "ApertusConfig"), ("internlm3", "InternLM3Config"),
                                      ("vaultgemma", "VaultGemmaConfig"), ("persimmon", "PersimmonConfig")])
def test_config_defaults_of_llama_and_gemma_variants(arch, cls):
    """A config.json naming only the sizes gets the configuration class's defaults: head_dim, key/value
    heads, epsilon, activation, tied head, biases, context, the RoPE settings (Nemotron's and Persimmon's
    partial rotary, Apertus's llama3), Persimmon's q/k LayerNorms, VaultGemma's Gemma 2 settings."""
    import transformers as tf
    from kbitcli.runner.models import build_args
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    _, a = build_args({"model_type": arch, **sizes})
    ref = getattr(tf, cls)(**sizes)
    assert a.head_dim == (getattr(ref, "head_dim", None) or 16)
    assert a.num_key_value_heads == (getattr(ref, "num_key_value_heads", None) or 4)
    eps = next(getattr(ref, k) for k in ("norm_eps", "layer_norm_eps", "rms_norm_eps") if hasattr(ref, k))
    assert a.rms_norm_eps == eps
    assert a.hidden_act == getattr(ref, "hidden_activation", None) or ref.hidden_act
    assert a.tie_word_embeddings == ref.tie_word_embeddings
    assert a.max_position_embeddings == ref.max_position_embeddings
    assert a.rope == {**ref.rope_parameters, "partial_rotary_factor": ref.rope_parameters.get("partial_rotary_factor", 1.0)}
    if arch != "persimmon":  # which has biases on every projection
        assert (a.qkv_bias, a.o_bias, a.mlp_bias) == (ref.attention_bias, ref.attention_bias,
                                                      getattr(ref, "mlp_bias", False))
    if arch == "persimmon":
        assert a.qk_layernorm is True and ref.qk_layernorm is True
    if arch == "vaultgemma":
        assert (a.query_pre_attn_scalar, a.attn_logit_softcapping, a.final_logit_softcapping, a.sliding_window,
                a.layer_types) == (ref.query_pre_attn_scalar, ref.attn_logit_softcapping, ref.final_logit_softcapping,
                                   ref.sliding_window, ref.layer_types)


@pytest.mark.parametrize("arch,cls", [("gemma", "GemmaConfig"), ("gemma2", "Gemma2Config"),
                                      ("gemma3_text", "Gemma3TextConfig"), ("vaultgemma", "VaultGemmaConfig")])
def test_gemma_config_default_key_value_heads(arch, cls):
    """A Gemma config.json without num_key_value_heads gets its configuration class's (Gemma 16,
    the later ones 4), not one per attention head."""
    import transformers as tf
    from kbitcli.runner.models import build_args
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=16, vocab_size=VOCAB)
    _, a = build_args({"model_type": arch, **sizes})
    assert a.num_key_value_heads == getattr(tf, cls)(**sizes).num_key_value_heads


def test_config_defaults_of_mpt_and_codegen():
    """MPT's and CodeGen's configs naming only the sizes get MptConfig's (a 4 x MLP, 2048 positions, a tied
    head, ALiBi's bias_max 8, the 1/sqrt(head_dim) scale) and CodeGenConfig's defaults (GPT-J's)."""
    import transformers as tf
    from kbitcli.runner.models import build_args
    _, m = build_args({"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": VOCAB})
    ref = tf.MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB)
    assert (m.expansion_ratio, m.max_seq_len, m.tie_word_embeddings, m.layer_norm_epsilon) == \
        (ref.expansion_ratio, ref.max_seq_len, ref.tie_word_embeddings, ref.layer_norm_epsilon)
    assert m.scale == 16 ** -0.5 and ref.attn_config.softmax_scale is None and ref.attn_config.alibi_bias_max == 8
    _, c = build_args({"model_type": "codegen", "n_embd": 256, "n_head": 4, "n_layer": 2, "vocab_size": VOCAB})
    ref = tf.CodeGenConfig(n_embd=256, n_head=4, n_layer=2, vocab_size=VOCAB)
    assert (c.rotary_dim, c.n_positions, c.tie_word_embeddings, c.activation_function, c.n_inner) == \
        (ref.rotary_dim, ref.n_positions, ref.tie_word_embeddings, ref.activation_function, 4 * 256)


def test_apertus_scalar_tensors_keep_their_shape(tiny, tmp_path, capsys):
    """xIELU's stored beta and eps (mlp.act_fn.*) are 0-d tensors: the kbit folder keeps them 0-d, so that
    kbit verify accepts it against the source (they were once stored as [1])."""
    folder, _ = tiny("apertus")
    out = _convert(folder, tmp_path / "kbit")
    assert _run(capsys, ["verify", str(out), "--against", str(folder)]) == 0


def test_internlm3_config_keys_and_hub_class(tiny, tmp_path):
    """InternLM3's Hub config.json names its biases qkv_bias and bias and its class InternLM3ForCausalLM
    (transformers runs it as Llama); one bias setting for both, as transformers requires."""
    from kbitcli.runner.models import build_args
    folder, hf = tiny("internlm3")
    d = tmp_path / "hub"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["InternLM3ForCausalLM"]
    cfg["qkv_bias"], cfg["bias"] = cfg.pop("attention_bias"), cfg.pop("mlp_bias")
    (d / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load(d)
    ids = _ids(12, 4)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL
    with pytest.raises(InputError, match="one bias setting"):
        build_args({**cfg, "bias": False})


@pytest.mark.parametrize("arch,name,sizes", [
    ("glm", "Glm", {}), ("glm4", "Glm4", {}), ("exaone4", "Exaone4", {"hidden_size": 128, "num_attention_heads": 64}),
    ("olmo", "Olmo", {}),
    ("helium", "Helium", {"hidden_size": 2560, "num_attention_heads": 20}),
    # MinistralConfig's head_dim None fails in transformers' attention
    ("ministral", "Ministral", {"num_attention_heads": 8, "head_dim": 8}),
    ("ministral3", "Ministral3", {"num_attention_heads": 8}), ("cwm", "Cwm", {"num_attention_heads": 8})])
def test_dense_config_defaults(arch, name, sizes):
    """A config.json naming only the sizes gets the configuration class's defaults (key/value heads,
    head_dim, epsilon, tied head, context, RoPE, windows per layer), and the model has transformers'
    parameters, name for name and shape for shape (the biases, norms and fused projections)."""
    import transformers as tf
    from kbitcli.runner.models import build_args
    sizes = dict(dict(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
                      vocab_size=VOCAB), **sizes)
    module, a = build_args({"model_type": arch, **sizes})
    ref = getattr(tf, f"{name}Config")(**sizes, pad_token_id=0)  # GLM's default is past this vocabulary
    assert a.num_key_value_heads == ref.num_key_value_heads and a.tie_word_embeddings == ref.tie_word_embeddings
    assert a.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert a.max_position_embeddings == ref.max_position_embeddings
    assert a.rms_norm_eps == getattr(ref, "rms_norm_eps", 1e-5)  # OLMo's LayerNorms: 1e-5
    rp = ref.rope_parameters
    assert (a.rope["rope_type"], a.rope["rope_theta"], a.rope["partial_rotary_factor"], a.rope.get("factor")) == \
        (rp["rope_type"], rp["rope_theta"], rp.get("partial_rotary_factor", 1.0), rp.get("factor"))
    window = getattr(ref, "sliding_window", None)
    types = getattr(ref, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * 5
    assert [a.window(i) for i in range(5)] == [window if t == "sliding_attention" else None for t in types]
    with torch.device("meta"):
        hf = getattr(tf, f"{name}ForCausalLM")(ref)
        ours = module.Model(a)
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in hf.named_parameters()}
    if arch == "exaone4":  # the rotary on the windowed layers only
        assert [layer.self_attn.rope for layer in ours.model.layers] == [t == "sliding_attention" for t in types]


@pytest.mark.parametrize("arch,change,msg", [
    ("exaone4", {"sliding_window_pattern": "LLLG"}, "needs layer_types"),
    ("exaone4", {"layer_types": ["full_attention"]}, "layer_types has 1 entries for 2 layers"),
    ("olmo", {"clip_qkv": -1.0}, "clip_qkv must be a positive number"),
    ("ministral", {"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
    ("ministral3", {"rope_parameters": {"rope_type": "yarn", "factor": 16.0, "rope_theta": 1e6,
                                        "original_max_position_embeddings": 16}}, "llama_4_scaling_beta"),
    ("cwm", {"layer_types": ["full_attention"] * 3}, "layer_types has 3 entries"),
    ("glm", {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads")])
def test_dense_bad_configs(arch, change, msg):
    """Configs these modules cannot run are refused with a message naming the field."""
    from kbitcli.runner.models import build_args
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=VOCAB)
    with pytest.raises(InputError, match=msg):
        build_args({"model_type": arch, **sizes, **change})


def test_olmo3_config_before_rope_per_layer_type(tiny, tmp_path):
    """OLMo 3 configs written before transformers 5: rope_theta for every layer, rope_scaling
    for the full-attention ones, no layer_types (three sliding layers in four): the same logits."""
    folder, hf = tiny("olmo3")
    d = tmp_path / "old"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.pop("layer_types") == ["sliding_attention"] * 3 + ["full_attention"]
    rp = cfg.pop("rope_parameters")
    # one theta for both layer types, as OLMo 3's released configs have (500000). With another
    # value transformers 5 gives it to the full-attention layers only (its conversion pops it
    # once); the runner gives it to both, as transformers 4 did.
    cfg.update(rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": rp["full_attention"]["factor"]})
    (d / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load(d)
    ids = _ids(12, 4)
    ref = type(hf)(type(hf.config).from_pretrained(d)).eval()
    ref.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(ref, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_olmo2_norm_rounds_after_the_weight(dtype):
    """OLMo 2's RMSNorm multiplies by its weight in float32 and rounds afterwards (Llama's
    rounds first): the same bits as transformers' in half precision, whole-projection norm too."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm as Theirs

    from kbitcli.runner.models.olmo2 import HeadsRMSNorm, Olmo2RMSNorm
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 16, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(64, generator=g)).to(dtype)
    theirs, ours, heads = Theirs(64, 1e-5), Olmo2RMSNorm(64, 1e-5), HeadsRMSNorm(64, 1e-5)
    for m in (theirs, ours, heads):
        m.weight.data = w.clone()
    with torch.no_grad():
        want = theirs(x.flatten(-2))
        assert torch.equal(ours(x.flatten(-2)), want)
        assert torch.equal(heads(x), want.view(x.shape))


def test_gemma3_multimodal_text_config_defaults_and_names(tiny, tmp_path):
    """A Gemma3ForConditionalGeneration folder whose text_config leaves out fields at their
    defaults, with transformers 5's in-memory tensor names (model.language_model.*): the same
    logits; its vision tensors are skipped, but any other stray tensor is still named."""
    from safetensors.torch import load_file, save_file
    folder, hf = tiny("gemma3-mm")
    d = tmp_path / "mm"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["text_config"].pop("rms_norm_eps") == 1e-6
    (d / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(d / "model.safetensors"))
    assert any(k.startswith("vision_tower.") for k in sd)
    sd = {("model.language_model." + k[len("language_model.model."):]) if k.startswith("language_model.model.")
          else k: v for k, v in sd.items()}
    save_file(sd, str(d / "model.safetensors"))
    model, _, _ = load(d)
    ids = _ids(12, 8)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL
    sd["language_model.stray.weight"] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(InputError, match="stray"):
        load(d)


def test_multimodal_text_defaults_are_the_configuration_classes():
    """multimodal.TEXT_DEFAULTS (what a Hub text_config may leave out) are the defaults of the
    language models' transformers configuration classes, for every language model kbit runs."""
    from transformers import CONFIG_MAPPING
    from kbitcli.architectures import LANGUAGE_MODELS
    from kbitcli.runner.models.multimodal import TEXT_DEFAULTS
    assert set(TEXT_DEFAULTS) == set(LANGUAGE_MODELS)
    for name, defaults in TEXT_DEFAULTS.items():
        cfg = CONFIG_MAPPING[name]()
        for key, value in defaults.items():
            # the rotaries of transformers read partial_rotary_factor from rope_parameters, 1 when absent
            got = cfg.rope_parameters.get(key, 1.0) if key in ("rope_theta", "partial_rotary_factor") \
                else getattr(cfg, key)
            assert got == value, (name, key)


def test_multimodal_wrappers_are_the_configuration_classes():
    """Each wrapper's default language model (MULTIMODAL_TEXT) and head tie (multimodal.WRAPPERS:
    what transformers 5 reads when config.json names none) are its configuration class's."""
    from transformers import CONFIG_MAPPING
    from kbitcli.architectures import MULTIMODAL_TEXT
    from kbitcli.runner.models.multimodal import WRAPPERS
    assert set(WRAPPERS) == set(MULTIMODAL_TEXT)
    for mt, text in MULTIMODAL_TEXT.items():
        cfg = CONFIG_MAPPING[mt]()
        assert (cfg.text_config.model_type, cfg.tie_word_embeddings) == (text, WRAPPERS[mt].tied), mt


def _sparse_text_config(cfg: dict) -> dict:
    """A config.json whose text_config lists only what differs from the text configuration
    class's defaults (as Hub configs written by transformers 4 do)."""
    from transformers import CONFIG_MAPPING
    text = cfg["text_config"]
    defaults = CONFIG_MAPPING[text["model_type"]]().to_dict()
    cfg["text_config"] = {k: v for k, v in text.items() if k == "model_type" or k not in defaults or defaults[k] != v}
    return cfg


@pytest.mark.parametrize("arch,rename,stray", [
    # Llava: the Hub names saved by transformers -> transformers 5's module names
    ("llava", {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
               "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."},
     "model.language_model.stray.weight"),
    ("idefics3", {}, "model.text_model.stray.weight"),
    ("video_llava", {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                     "image_tower.": "model.image_tower.", "video_tower.": "model.video_tower.",
                     "multi_modal_projector.": "model.multi_modal_projector."}, "model.language_model.stray.weight"),
    # InternVL (Qwen3's defaults) in the Hub names; Command A Vision (Cohere 2's), whose Hub names are
    # transformers 5's
    ("internvl", {}, "language_model.model.stray.weight"),
    ("cohere2_vision", {}, "model.language_model.stray.weight"),
    # Qwen2-VL: Qwen2's own names in the Hub files -> transformers 5's
    ("qwen2_vl", {"model.": "model.language_model.", "visual.": "model.visual."}, "model.language_model.stray.weight")])
def test_multimodal_sparse_text_config_and_names(arch, rename, stray, tiny, tmp_path):
    """A multimodal folder whose text_config leaves out what equals the defaults (Qwen2-VL's text
    model has defaults of its own: rms_norm_eps 1e-5, max_window_layers 80), under
    the other naming convention: the same logits as the wrapper in transformers; the vision tensors
    are skipped, any other stray tensor is still named."""
    from safetensors.torch import load_file, save_file
    folder, hf = tiny(arch)
    d = tmp_path / "mm"
    shutil.copytree(folder, d)
    cfg = _sparse_text_config(json.loads((d / "config.json").read_text()))
    assert "rms_norm_eps" not in cfg["text_config"] and "hidden_size" in cfg["text_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(d / "model.safetensors"))

    def renamed(k):
        return next((to + k[len(old):] for old, to in rename.items() if k.startswith(old)), k)
    sd = {renamed(k): v for k, v in sd.items()}
    save_file(sd, str(d / "model.safetensors"))
    model, _, _ = load(d)
    assert model.kbit_info["model_type"] == arch
    ids = _ids(12, 8)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL
    sd[stray] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(InputError, match="stray"):
        load(d)


@pytest.mark.parametrize("arch", ["deepseek_vl", "internvl-qwen2"])
def test_multimodal_head_tied_by_the_wrappers_default(arch, tiny, tmp_path):
    """A config.json that names no tie_word_embeddings (as transformers 4 saved those equal to the
    default) of a wrapper whose configuration class ties the head (text_config's says untied): the
    head is the embedding, as in transformers 5."""
    folder, hf = tiny(arch)
    d = tmp_path / "tied"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.pop("tie_word_embeddings") is True and cfg["text_config"]["tie_word_embeddings"] is False
    (d / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load(d)
    ids = _ids(12, 11)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


def test_qwen2_vl_flat_config(tiny, tmp_path):
    """Qwen2-VL's first Hub configs: the text settings at the top level, no text_config, the
    rotary spelled rope_scaling {"type": "mrope"} + rope_theta; the same model."""
    folder, hf = tiny("qwen2_vl")
    d = tmp_path / "flat"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    text = cfg.pop("text_config")
    rp = text.pop("rope_parameters")
    text.pop("model_type")
    cfg.update(text, rope_theta=rp["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rp["mrope_section"]})
    (d / "config.json").write_text(json.dumps(cfg))
    model, _, _ = load(d)
    ids = _ids(12, 9)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


def test_multimodal_stored_head_is_used_though_tied_by_config(tiny, tmp_path):
    """Mistral3Config ties the head by default, but Mistral Small's files store a head of their own
    (and transformers 5 saves tie_word_embeddings true with it): transformers then keeps the stored
    head, and so does the runner."""
    import transformers as tf
    from safetensors.torch import load_file, save_file
    folder, _ = tiny("mistral3")
    d = tmp_path / "head"
    shutil.copytree(folder, d)
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is True
    sd = load_file(str(d / "model.safetensors"))
    assert "language_model.lm_head.weight" not in sd
    sd["language_model.lm_head.weight"] = 0.15 * torch.randn(VOCAB, 64, generator=torch.Generator().manual_seed(3))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    hf = tf.Mistral3ForConditionalGeneration.from_pretrained(d).eval()
    model, _, _ = load(d)
    assert model.lm_head is not None
    ids = _ids(12, 10)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


def test_multimodal_stored_head_survives_conversion(tiny, tmp_path):
    """kbit quantize stores a head the config ties only once (as the embedding) in a plain model,
    but keeps a multimodal wrapper's stored head, which the runner uses: the converted model
    gives the source's logits (Qwen2.5-VL's transformers 5 names: lm_head.weight at the top)."""
    from safetensors.torch import load_file, save_file
    folder, _ = tiny("qwen2_5_vl")
    d = tmp_path / "head"
    shutil.copytree(folder, d)
    assert json.loads((d / "config.json").read_text())["tie_word_embeddings"] is True
    sd = load_file(str(d / "model.safetensors"))
    sd["lm_head.weight"] = 0.15 * torch.randn(VOCAB, 64, generator=torch.Generator().manual_seed(4))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = _convert(d, tmp_path / "kbit", QuantSpec(8, "int", 32))
    src, kb = load(d)[0], load(out, dequantize_on_load=True)[0]
    assert src.lm_head is not None and kb.lm_head is not None
    ids = _ids(12, 10)
    with torch.no_grad():
        a, b = src(torch.tensor([ids]))[0], kb(torch.tensor([ids]))[0]
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()  # 8-bit layers; a tied head is far off


def test_multimodal_language_model_must_be_supported(tiny, tmp_path, capsys):
    """A wrapper counts as supported (kbit pull, convert's note, the runner) only when its
    text_config is a language model kbit runs; kbit generate says it runs text only."""
    from kbitcli.architectures import is_supported_config
    folder, _ = tiny("llava")
    cfg = json.loads((folder / "config.json").read_text())
    assert is_supported_config(cfg)
    assert is_supported_config({"architectures": ["LlavaForConditionalGeneration"], "text_config": {}})  # llama
    assert is_supported_config({"model_type": "qwen2_vl", "hidden_size": 64})  # flat: Qwen2-VL's text model
    bad = {**cfg, "text_config": {**cfg["text_config"], "model_type": "phi3"}}
    assert not is_supported_config(bad)
    d = tmp_path / "phi3-llava"
    shutil.copytree(folder, d)
    (d / "config.json").write_text(json.dumps(bad))
    assert _run(capsys, ["generate", str(d), "-p", "t5"]) == 3
    err = _one_line_error(capsys)
    assert "LlavaForConditionalGeneration" in err and "'phi3'" in err and "mistral" in err
    assert _run(capsys, ["generate", str(folder), "-p", "t5 t6", "-n", "2"]) == 0
    assert "llava is a multimodal model: generating from text only with its llama language model" \
        in capsys.readouterr().err


def test_cohere2_config_before_layer_types(tiny, tmp_path):
    """Cohere 2 configs older than transformers 5 give sliding_window_pattern instead of
    layer_types (here 2: windows and the rotary on layers 0 and 2, none on 1 and 3)."""
    import transformers as tf
    folder, _ = tiny("cohere2")
    d = tmp_path / "old"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg.pop("layer_types") == ["sliding_attention"] * 3 + ["full_attention"]
    cfg["sliding_window_pattern"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    hf = tf.Cohere2ForCausalLM.from_pretrained(d).eval()
    assert hf.config.layer_types == ["sliding_attention", "full_attention"] * 2
    model, _, _ = load(d)
    ids = _ids(12, 11)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


def test_phi3_longrope_past_the_original_context(tiny):
    """A forward longer than original_max_position_embeddings (16) runs on the long factors
    for every token, as transformers' does; a shorter one on the short factors."""
    folder, hf = tiny("phi3-longrope")
    model, _, _ = load(folder)
    assert model.kbit_info["fused"] == 0  # stored fused: nothing for load(fuse=True) to do
    for n in (16, 17, 40):
        ids = _ids(n, n)
        with torch.no_grad():
            assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL, n


@pytest.mark.parametrize("arch,rope", [("stablelm-plain", {}), ("phi", {"rope_theta": 1e4, "partial_rotary_factor": 0.4})])
def test_stablelm_phi_configs_before_rope_parameters(arch, rope, tiny, tmp_path):
    """Hub configs older than transformers 5 have no rope_parameters: Phi-2 gives rope_theta and
    partial_rotary_factor at the top level; StableLM may leave the factor out (0.25, its class's
    default, not the runner's 1.0): the same logits."""
    folder, hf = tiny(arch)
    d = tmp_path / "old"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters")
    (d / "config.json").write_text(json.dumps({**cfg, **rope}))
    model, _, _ = load(d)
    ids = _ids(12, 4)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - _hf_logits(hf, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("arch,per_layer", [("stablelm", 7), ("phi-qk", 6), ("starcoder2", 6), ("gptj-tied", 6),
                                            ("gpt_neo", 6), ("gpt_bigcode", 4), ("falcon-rw", 4), ("apertus", 6),
                                            ("persimmon", 4), ("mpt", 4), ("codegen", 4)])
def test_default_recipe_quantizes_the_block_linears(arch, per_layer, tiny):
    """kbit quantize's default recipe picks exactly the weights of transformers' linear layers
    inside the numbered blocks; LayerNorm weights and biases (StableLM's per-head q/k norms
    too), the projections' biases, the embedding and Phi's and GPT-J's biased lm_head stay as they are
    (the blocks are model.layers.<i>, transformer.h.<i> or MPT's transformer.blocks.<i>)."""
    from safetensors import safe_open

    from kbitcli.recipe import Recipe
    folder, hf = tiny(arch)
    recipe = Recipe.build(QuantSpec(4, "nf", 64))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    chosen = {k for k, shape in stored.items() if recipe.spec_for(k, shape, True) is not None}
    linears = {f"{n}.weight" for n, m in hf.named_modules()
               if isinstance(m, torch.nn.Linear) and (".layers." in n or ".h." in n or ".blocks." in n)}
    assert chosen == linears and len(linears) == per_layer * hf.config.num_hidden_layers


def test_unexpected_tensor_is_named(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    folder, _ = tiny("opt")
    d = tmp_path / "extra"
    shutil.copytree(folder, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.decoder.layers.0.self_attn.extra.weight"] = torch.zeros(2, 2)
    save_file(sd, str(d / "model.safetensors"))
    assert _run(capsys, ["generate", str(d), "-p", "t5"]) == 3
    assert "model.decoder.layers.0.self_attn.extra.weight" in _one_line_error(capsys)


def test_stop_strings_sampling_and_batch(tiny):
    folder, _ = tiny("llama")
    model, tok, _ = load(folder)
    greedy = generate(model, tok, ["t5 t6 t7", "t9"], max_new_tokens=8)
    assert len(greedy.completions) == 2
    first = greedy.completions[0]
    assert first.finish_reason in ("length", "eos")
    if first.finish_reason == "length" and len(first.token_ids) >= 3:
        words = first.text.split()
        stop = words[2]
        stopped = generate(model, tok, "t5 t6 t7", max_new_tokens=8, stop=[stop])
        c = stopped.completions[0]
        assert c.finish_reason == "stop" and stop not in c.text
    a = generate(model, tok, "t5 t6", max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    b = generate(model, tok, "t5 t6", max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert a.completions[0].token_ids == b.completions[0].token_ids
    streamed = []
    generate(model, tok, "t5 t6 t7", max_new_tokens=8, on_text=lambda i, t: streamed.append(t))
    assert "".join(streamed) == first.text


def test_chat_template(tiny, tmp_path):
    folder, _ = tiny("llama")
    d = tmp_path / "chat"
    shutil.copytree(folder, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                           "{% if add_generation_prompt %}t4{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    model, tok, _ = load(d)
    assert tok.apply_chat_template([{"role": "t7", "content": "t8"}]) == "t7 t8 t4"
    res = generate(model, tok, "t9", max_new_tokens=2, chat=True)
    assert res.prompt_tokens == 3


def test_context_window(tiny):
    folder, _ = tiny("gpt2")  # n_positions = 64
    model, tok, _ = load(folder)
    res = generate(model, tok, " ".join(["t5"] * 60), max_new_tokens=10)
    assert len(res.completions[0].token_ids) <= 4
    assert res.completions[0].finish_reason in ("context", "eos")


# ----------------------------------------------------------------------------- the CLI
def _run(capsys, argv: list[str]) -> int:
    capsys.readouterr()  # drop what fixtures printed (transformers' progress bars)
    return main(argv)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_generate_json(tiny, capsys):
    folder, _ = tiny("qwen2")
    rc = _run(capsys, ["generate", str(folder), "--prompt", "t5 t6", "--prompt", "t7", "-n", "3", "--device", "cpu", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)
    assert len(doc["completions"]) == 2 and doc["model_type"] == "qwen2"


def test_cli_generate_no_fuse_same_tokens(tiny, capsys):
    """--no-fuse keeps q/k/v and gate/up separate; greedy generation gives the same tokens."""
    folder, _ = tiny("llama")
    docs = []
    for flag in ("--fuse", "--no-fuse"):
        rc = _run(capsys, ["generate", str(folder), "--prompt", "t5 t6 t9", "-n", "6", "--device", "cpu", "--json",
                           flag])
        assert rc == 0
        docs.append(json.loads(capsys.readouterr().out))
    assert [c["text"] for c in docs[0]["completions"]] == [c["text"] for c in docs[1]["completions"]]
    assert docs[0]["fused_groups"] == 4 and docs[1]["fused_groups"] == 0  # 2 layers x (qkv, gate/up)


def test_cli_stream_single_prompt(tiny, capsys):
    folder, _ = tiny("gpt_neox")
    rc = _run(capsys, ["generate", str(folder), "-p", "t5 t6", "-n", "3", "--temperature", "0.7", "--seed", "1", "-q"])
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")


def test_cli_unsupported_architecture(tiny, tmp_path, capsys):
    folder, _ = tiny("llama")
    d = tmp_path / "foo"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["FooForCausalLM"], model_type="foo")
    (d / "config.json").write_text(json.dumps(cfg))
    assert _run(capsys, ["generate", str(d), "-p", "t5"]) == 3
    err = _one_line_error(capsys)
    assert "FooForCausalLM" in err and "LlamaForCausalLM" in err and "GPT2LMHeadModel" in err


def test_cli_missing_config_field(tiny, tmp_path, capsys):
    folder, _ = tiny("gpt2")
    d = tmp_path / "nofield"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["n_head"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert _run(capsys, ["generate", str(d), "-p", "t5"]) == 3
    assert "n_head" in _one_line_error(capsys)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_cli_key_value_heads_that_do_not_divide_the_heads(arch, tiny, tmp_path, capsys):
    folder, _ = tiny(arch)
    d = tmp_path / "heads"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 3  # 4 query heads
    (d / "config.json").write_text(json.dumps(cfg))
    assert _run(capsys, ["generate", str(d), "-p", "t5"]) == 3
    assert "num_attention_heads (4) is not a multiple of num_key_value_heads (3)" in _one_line_error(capsys)


@pytest.mark.parametrize("arch,change,msg", [
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok (5) is more than the 4 experts"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size must be a positive"),
    ("qwen3_moe", {"mlp_only_layers": ["1"]}, "mlp_only_layers must list layer numbers"),
    ("deepseek_v2-lite", {"num_experts_per_tok": 5}, "num_experts_per_tok (5) is more than the 4 experts"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method 'noaux_tc' is not supported for deepseek_v2"),
    ("deepseek_v3", {"n_group": 3}, "8 experts in n_group 3 groups, of which topk_group 2 are kept, cannot give"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func 'softmax' is not deepseek_v3's ('sigmoid')"),
    ("deepseek_v3", {"n_group": 8, "topk_group": 4}, "deepseek_v3 ranks each expert group by its two best experts"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv (8.0) is not supported for olmoe"),
    ("olmoe", {"num_experts_per_tok": 9}, "num_experts_per_tok (9) is more than the 8 experts"),
    ("phimoe", {"num_experts_per_tok": 3}, "phimoe's SparseMixer routing picks 2 experts, not num_experts_per_tok 3"),
    ("phimoe", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 64,
                                    "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "short_mscale": 1.0,
                                    "long_mscale": 1.2}},
     "phimoe's RoPE scaling needs equal short_mscale and long_mscale, got 1.0 and 1.2"),
    ("glm4_moe", {"n_group": 3}, "8 experts in n_group 3 groups, of which topk_group 2 are kept, cannot give"),
    ("glm4_moe", {"n_shared_experts": 0}, "n_shared_experts must be a positive integer for a glm4_moe model"),
    ("glm4_moe", {"first_k_dense_replace": -1}, "first_k_dense_replace must be a non-negative integer"),
    ("dots1", {"n_shared_experts": None}, "n_shared_experts must be a positive integer for a dots1 model"),
    ("ernie4_5_moe", {"moe_k": 7}, "moe_k (7) is more than the 6 experts of this ernie4_5_moe model"),
    ("ernie4_5_moe", {"use_bias": True}, "use_bias is not supported for ernie4_5_moe"),
    ("hunyuan_v1_moe", {"moe_topk": [2, 2]}, "per-layer num_experts / moe_topk lists are not supported"),
    ("hunyuan_v1_moe", {"moe_topk": 5}, "moe_topk (5) is more than the 4 experts"),
])
def test_cli_bad_moe_config(arch, change, msg, tiny, tmp_path, capsys):
    folder, _ = tiny(arch)
    d = tmp_path / "bad"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    assert _run(capsys, ["generate", str(d), "-p", "t5"]) == 3
    assert msg in _one_line_error(capsys)


@pytest.mark.parametrize("arch,change,msg", [
    ("gptj", {"rotary_dim": 24}, "rotary_dim must be an even positive integer of at most the head size (16)"),
    ("gptj", {"rotary_dim": None}, "rotary_dim is null, which GPT-J reads as the whole embedding (64)"),
    ("phi", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3125}},
     "the rotary covers 5 of the 16 features of a head (partial_rotary_factor 0.3125); it must be a positive even"),
    ("gpt_neo", {"attention_types": [[["global", "sparse"], 1], [["local"], 1]]},
     "attention_types must give each of the 3 layers 'global' or 'local' attention"),
    ("gpt_neo", {"attention_types": [[["global", "local"], 1]]}, "attention_types must give each of the 3 layers"),
    ("gpt_bigcode", {"n_head": 5}, "n_embd (64) is not a multiple of n_head (5)"),
    ("falcon-40b", {"num_kv_heads": 3}, "num_attention_heads (4) is not a multiple of num_kv_heads (3)"),
    ("mpt", {"n_heads": 5}, "d_model (64) is not a multiple of n_heads (5)"),
    ("mpt", {"attn_config": {"alibi": False, "qk_ln": True}},
     "this mpt model uses alibi false, qk_ln, which kbit's runner (as transformers' MPT) does not support"),
    ("mpt", {"no_bias": False}, "this mpt model uses no_bias false"),
    ("codegen", {"n_embd": 66, "n_head": 2}, "n_embd (66) must be a multiple of 4 for a codegen model"),
    ("codegen", {"rotary_dim": 24}, "rotary_dim must be an even positive integer of at most the head size (16) for a "
                                    "codegen model"),
    ("internlm3", {"mlp_bias": False}, "an internlm3 model has one bias setting for the attention and the MLP"),
])
def test_cli_bad_gptj_neo_bigcode_falcon_config(arch, change, msg, tiny, tmp_path, capsys):
    folder, _ = tiny(arch)
    d = tmp_path / "bad"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    assert _run(capsys, ["generate", str(d), "-p", "t5"]) == 3
    assert msg in _one_line_error(capsys)


def test_cli_no_tokenizer(tiny, tmp_path, capsys):
    folder, _ = tiny("opt")
    d = tmp_path / "notok"
    shutil.copytree(folder, d)
    (d / "tokenizer.json").unlink()
    assert _run(capsys, ["generate", str(d), "-p", "t5"]) == 3
    assert "tokenizer.json" in _one_line_error(capsys)


def test_cli_kbit_tensors_do_not_fit(tiny, tmp_path, capsys):
    folder, _ = tiny("llama")
    out = _convert(folder, tmp_path / "kbit")
    cfg = json.loads((out / "config.json").read_text())
    bad = dict(cfg, intermediate_size=96)
    (out / "config.json").write_text(json.dumps(bad))
    assert _run(capsys, ["generate", str(out), "-p", "t5"]) == 3
    err = _one_line_error(capsys)
    assert "model.layers.0.mlp" in err and "shape" in err
    bad = dict(cfg, num_hidden_layers=3)
    (out / "config.json").write_text(json.dumps(bad))
    assert _run(capsys, ["generate", str(out), "-p", "t5"]) == 3
    err = _one_line_error(capsys)
    assert "model.layers.2." in err and "missing" in err


def test_cli_cuda_unavailable(tiny, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    folder, _ = tiny("llama")
    assert _run(capsys, ["generate", str(folder), "-p", "t5", "--device", "cuda"]) == 2
    assert "--device cpu" in _one_line_error(capsys)


def test_cli_prompt_too_long_and_no_chat_template(tiny, capsys):
    folder, _ = tiny("gpt2")
    assert _run(capsys, ["generate", str(folder), "-p", " ".join(["t5"] * 80)]) == 3
    assert "context window" in _one_line_error(capsys)
    assert _run(capsys, ["generate", str(folder), "-p", "t5", "--chat"]) == 3
    assert "chat template" in _one_line_error(capsys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("partial", [1.0, 0.25])
def test_rotary_same_bits_as_transformers_formula(dtype, partial):
    """apply_rotary (sign of rotate_half folded into Rotary's sin, 4 kernels) gives exactly the
    bits of transformers' x * cos + rotate_half(x) * sin with the plain sin, for full and
    partial rotary, in [B,H,S,D] and in transposed [B,S,H,D] memory order."""
    from kbitcli.runner.models.base import Rotary, apply_rotary, rope_inv_freq, rope_settings
    D = 64
    rd = int(D * partial)
    rot = Rotary(rope_inv_freq(rope_settings({"rope_theta": 10000.0, "partial_rotary_factor": partial}), D))
    g = torch.Generator().manual_seed(3)
    pos = torch.tensor([[0, 5, 17, 1000], [3, 4, 2047, 9]])
    cos, sin_signed = rot(pos, dtype)
    freqs = pos.float()[..., None] * rot.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    c, s = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    assert torch.equal(cos, c)
    for x in (torch.randn(2, 3, 4, D, generator=g).to(dtype),
              torch.randn(2, 4, 3, D, generator=g).to(dtype).transpose(1, 2)):
        xr = x[..., :rd]
        half = torch.cat((-xr[..., rd // 2:], xr[..., :rd // 2]), dim=-1)
        want = torch.cat((xr * c + half * s, x[..., rd:]), dim=-1)
        got = apply_rotary(x, cos, sin_signed)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_interleaved_rotary_same_bits_as_gptj(dtype):
    """apply_rotary_interleaved with Rotary's tables gives exactly the bits of transformers' GPT-J
    rotary (its sin/cos table and rotate_every_two) on the first rotary_dim features of each head."""
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    from kbitcli.runner.models.base import Rotary, apply_rotary_interleaved, rope_settings
    D, rd = 32, 8
    pos = torch.tensor([[0, 5, 17, 1000], [3, 4, 2047, 9]])
    cos, sin = Rotary.from_settings(rope_settings({}), rd)(pos, dtype)
    s, c = create_sinusoidal_positions(2048, rd)[pos].to(dtype).split(rd // 2, dim=-1)
    x = torch.randn(2, 4, 3, D, generator=torch.Generator().manual_seed(5)).to(dtype)  # [B, S, H, D]
    want = torch.cat((apply_rotary_pos_emb(x[..., :rd], s, c), x[..., rd:]), dim=-1)
    got = apply_rotary_interleaved(x.transpose(1, 2), cos, sin).transpose(1, 2)
    assert got.dtype == dtype and torch.equal(got, want)
