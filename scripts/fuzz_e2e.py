#!/usr/bin/env python3
"""End-to-end fuzz: random tiny transformers models through every kbit command.

Each case builds a random model of a random supported architecture (odd sizes, grouped-query
attention, windows, tied heads, biases, partial rotary, soft-capping, as the architecture
allows), saves it in fp32, fp16 or bf16, and draws a random recipe (k 2-8, every data type,
block 32 to a whole row, every scale form, sometimes a rule, an mse search or small shards).
Then it checks, stopping the case at the first failure:

  kbit quantize            exit 0, or a clean refusal (exit 2-6 without a traceback)
  kbit verify --against    every checksum and every tensor's error
  runner                   packed == dequantize-on-load == unfused, finite logits
  kbit dequantize          a plain checkpoint that transformers loads, whose logits equal the
                           runner's (to float32 rounding)
  kbit generate, kbit perplexity   exit 0

    .venv/bin/python scripts/fuzz_e2e.py --seed 1 --cases 20
    .venv/bin/python scripts/fuzz_e2e.py --archs phi3,gemma2 --cases 10

Needs the test extras (transformers). Prints one line per case and exits 1 if any failed.
It found the BLOOM head-count, --ctx and kbit-model-as-source bugs of 2026-11-29.
"""
from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "formats"), str(ROOT / "tests")]

VOCAB = 100
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "gpt2", "gpt_neox", "opt",
         "bloom", "smollm3", "granite", "olmo2", "olmo3", "stablelm", "phi", "starcoder2", "mixtral", "qwen2_moe",
         "qwen3_moe", "deepseek_v2", "deepseek_v3", "gptj", "gpt_neo", "gpt_bigcode", "falcon", "cohere", "cohere2",
         "llava", "mistral3", "idefics3", "qwen2_5_vl", "llava_onevision", "video_llava", "aya_vision", "internvl",
         "idefics2", "janus", "qwen3_vl", "glm4v", "arcee", "ernie4_5", "seed_oss",
         "olmoe", "phimoe", "glm4_moe", "dots1", "ernie4_5_moe", "hunyuan_v1_moe", "llama4_text",
         "nemotron", "hunyuan_v1_dense", "apertus", "internlm3", "vaultgemma", "persimmon", "mpt", "codegen",
         "gpt_oss", "glm", "glm4", "exaone4", "olmo", "helium", "ministral", "ministral3", "cwm",
         "granitemoe")


def model_for(r: random.Random, arch: str):
    """(config, class) of a random tiny model of `arch`."""
    import transformers as tf
    heads, hd = r.choice([2, 3, 4, 6]), r.choice([8, 16, 24, 32])
    H, inter, L = heads * hd, r.choice([40, 72, 100, 130, 200]), r.choice([1, 2, 3])
    kv = r.choice([d for d in range(1, heads + 1) if heads % d == 0])
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dec = dict(hidden_size=H, intermediate_size=inter, num_hidden_layers=L, num_attention_heads=heads,
               num_key_value_heads=kv, max_position_embeddings=128, **common)
    if arch == "llama":
        kw = dict(attention_bias=r.random() < .3, mlp_bias=r.random() < .3, tie_word_embeddings=r.random() < .5)
        if r.random() < .3:
            kw["head_dim"] = r.choice([8, 16, 32])
        if r.random() < .3:
            kw["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                     "original_max_position_embeddings": 32}
        return tf.LlamaConfig(**dec, **kw), tf.LlamaForCausalLM
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=r.choice([4, 7, None]), **dec), tf.MistralForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(tie_word_embeddings=r.random() < .5, **dec), tf.Qwen2ForCausalLM
    if arch == "qwen3":
        kw = dict(head_dim=r.choice([8, 16, 32]), attention_bias=r.random() < .3, tie_word_embeddings=r.random() < .5)
        if r.random() < .4:
            kw.update(use_sliding_window=True, sliding_window=r.choice([3, 6]), max_window_layers=r.choice([0, 1]))
        return tf.Qwen3Config(**dec, **kw), tf.Qwen3ForCausalLM
    if arch == "phi3":
        rp = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": r.choice([0.5, 1.0])}
        return tf.Phi3Config(sliding_window=r.choice([None, 4]), rope_parameters=rp,
                             tie_word_embeddings=r.random() < .5, **dec), tf.Phi3ForCausalLM
    if arch.startswith("gemma"):
        dec["head_dim"] = r.choice([8, 16, 32])
        if arch == "gemma":
            return tf.GemmaConfig(**dec), tf.GemmaForCausalLM
        dec.update(sliding_window=r.choice([3, 5, 64]), query_pre_attn_scalar=r.choice([8, 16, 24]))
        if arch == "gemma2":
            return tf.Gemma2Config(attn_logit_softcapping=r.choice([2.0, 50.0]),
                                   final_logit_softcapping=r.choice([5.0, 30.0]), **dec), tf.Gemma2ForCausalLM
        return tf.Gemma3TextConfig(tie_word_embeddings=r.random() < .7, **dec), tf.Gemma3ForCausalLM
    if arch == "smollm3":
        return tf.SmolLM3Config(no_rope_layer_interval=r.choice([2, 3, 4]), use_sliding_window=r.random() < .4,
                                sliding_window=r.choice([3, 6]), tie_word_embeddings=r.random() < .5,
                                **dec), tf.SmolLM3ForCausalLM
    if arch == "granite":
        return tf.GraniteConfig(embedding_multiplier=r.choice([1.0, 12.0]), residual_multiplier=r.choice([1.0, 0.22]),
                                attention_multiplier=r.choice([0.0078125, 0.1]), logits_scaling=r.choice([1.0, 8.0]),
                                tie_word_embeddings=r.random() < .5, **dec), tf.GraniteForCausalLM
    if arch in ("olmo2", "olmo3"):
        if arch == "olmo2":
            return tf.Olmo2Config(tie_word_embeddings=r.random() < .3, **dec), tf.Olmo2ForCausalLM
        return tf.Olmo3Config(sliding_window=r.choice([3, 6]), **dec), tf.Olmo3ForCausalLM
    if arch == "arcee":
        return tf.ArceeConfig(attention_bias=r.random() < .3, mlp_bias=r.random() < .3,
                              tie_word_embeddings=r.random() < .5, **dec), tf.ArceeForCausalLM
    if arch == "ernie4_5":
        return tf.Ernie4_5Config(head_dim=r.choice([8, 16, 32]), use_bias=r.random() < .5,
                                 tie_word_embeddings=r.random() < .7, **dec), tf.Ernie4_5ForCausalLM
    if arch == "seed_oss":
        return tf.SeedOssConfig(head_dim=r.choice([8, 16, 32]), attention_bias=r.random() < .7,
                                attention_out_bias=r.random() < .3, tie_word_embeddings=r.random() < .3,
                                **dec), tf.SeedOssForCausalLM
    if arch == "nemotron":
        return tf.NemotronConfig(head_dim=r.choice([8, 16, 32]), attention_bias=r.random() < .3,
                                 mlp_bias=r.random() < .3, tie_word_embeddings=r.random() < .3,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                  "partial_rotary_factor": r.choice([0.25, 0.5, 1.0])},
                                 **dec), tf.NemotronForCausalLM
    if arch == "hunyuan_v1_dense":
        rp = r.choice([{"rope_type": "default", "rope_theta": 1e4},
                       {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 1e4}])
        return tf.HunYuanDenseV1Config(head_dim=r.choice([8, 16, 32]), attention_bias=r.random() < .3,
                                       tie_word_embeddings=r.random() < .5, rope_parameters=rp, **dec), \
            tf.HunYuanDenseV1ForCausalLM
    if arch == "apertus":
        return tf.ApertusConfig(attention_bias=r.random() < .3, tie_word_embeddings=r.random() < .3, **dec), \
            tf.ApertusForCausalLM
    if arch == "internlm3":
        from test_runner import _internlm3_class
        bias = r.random() < .3
        return tf.InternLM3Config(head_dim=r.choice([8, 16, 32]), qkv_bias=bias, bias=bias,
                                  tie_word_embeddings=r.random() < .3, **dec), _internlm3_class()
    if arch == "vaultgemma":
        dec.update(head_dim=r.choice([8, 16, 32]), sliding_window=r.choice([3, 5, 64]),
                   query_pre_attn_scalar=r.choice([8, 16, 24]))
        return tf.VaultGemmaConfig(attn_logit_softcapping=r.choice([2.0, 50.0]),
                                   final_logit_softcapping=r.choice([5.0, 30.0]), **dec), tf.VaultGemmaForCausalLM
    if arch == "persimmon":
        return tf.PersimmonConfig(hidden_size=H, intermediate_size=inter, num_hidden_layers=L,
                                  num_attention_heads=heads, qk_layernorm=r.random() < .6, tie_word_embeddings=r.random() < .3,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                   "partial_rotary_factor": r.choice([0.25, 0.5, 1.0])},
                                  max_position_embeddings=128, **common), tf.PersimmonForCausalLM
    if arch == "mpt":
        attn = {"clip_qkv": r.choice([None, 0.5, 8.0]), "softmax_scale": r.choice([None, 0.2])}
        return tf.MptConfig(d_model=H, n_heads=heads, n_layers=L, max_seq_len=128, attn_config=attn,
                            tie_word_embeddings=r.random() < .7, **common), tf.MptForCausalLM
    if arch == "codegen":  # heads not a multiple of 4 split across CodeGen's four qkv groups too
        return tf.CodeGenConfig(n_embd=H, n_layer=L, n_head=heads, rotary_dim=r.choice([2, 8, hd]), n_positions=64,
                                n_ctx=64, n_inner=inter if r.random() < .5 else None,
                                tie_word_embeddings=r.random() < .3, **common), tf.CodeGenForCausalLM
    if arch in ("glm", "glm4"):
        rp = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": r.choice([0.25, 0.5, 1.0])}
        return (tf.GlmConfig if arch == "glm" else tf.Glm4Config)(
            head_dim=r.choice([8, 16, 32]), attention_bias=r.random() < .7, tie_word_embeddings=r.random() < .3,
            rope_parameters=rp, **dec), (tf.GlmForCausalLM if arch == "glm" else tf.Glm4ForCausalLM)
    if arch == "exaone4":
        window = r.choice([3, 6, None])
        kw = dict(sliding_window_pattern=r.choice([2, 4])) if window else dict(layer_types=["full_attention"] * L)
        return tf.Exaone4Config(sliding_window=window, tie_word_embeddings=r.random() < .5, **kw, **dec), \
            tf.Exaone4ForCausalLM
    if arch == "olmo":
        return tf.OlmoConfig(clip_qkv=r.choice([None, 0.5, 8.0]), attention_bias=r.random() < .3,
                             tie_word_embeddings=r.random() < .5, **dec), tf.OlmoForCausalLM
    if arch == "helium":  # its o_proj is hidden x hidden: head_dim is hidden_size / heads
        return tf.HeliumConfig(head_dim=hd, attention_bias=r.random() < .3, mlp_bias=r.random() < .3,
                               tie_word_embeddings=r.random() < .3, **dec), tf.HeliumForCausalLM
    if arch == "ministral":  # transformers' MinistralModel builds a window mask whatever the layers: it needs one
        types = [r.choice(["sliding_attention", "full_attention"]) for _ in range(L)]
        return tf.MinistralConfig(head_dim=r.choice([8, 16, 32]), sliding_window=r.choice([3, 6]), layer_types=types,
                                  tie_word_embeddings=r.random() < .3, **dec), tf.MinistralForCausalLM
    if arch == "ministral3":
        rp = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "beta_fast": 32.0, "beta_slow": 1.0,
              "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": r.choice([4, 16]),
              "llama_4_scaling_beta": r.choice([0.1, 0.5])}
        return tf.Ministral3Config(head_dim=r.choice([8, 16, 32]), sliding_window=r.choice([None, 4]),
                                   rope_parameters=rp, tie_word_embeddings=r.random() < .3, **dec), \
            tf.Ministral3ForCausalLM
    if arch == "cwm":
        return tf.CwmConfig(head_dim=r.choice([8, 16, 32]), sliding_window=r.choice([3, 6]),
                            tie_word_embeddings=r.random() < .3, **dec), tf.CwmForCausalLM
    if arch == "stablelm":
        return tf.StableLmConfig(use_qkv_bias=r.random() < .5, qk_layernorm=r.random() < .5,
                                 use_parallel_residual=r.random() < .5, **dec), tf.StableLmForCausalLM
    if arch == "phi":
        return tf.PhiConfig(qk_layernorm=r.random() < .5, tie_word_embeddings=r.random() < .3,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                             "partial_rotary_factor": r.choice([0.25, 0.5, 1.0])},
                            **dec), tf.PhiForCausalLM
    if arch == "starcoder2":
        return tf.Starcoder2Config(sliding_window=r.choice([None, 4]), use_bias=r.random() < .7, **dec), \
            tf.Starcoder2ForCausalLM
    if arch == "mixtral":
        return tf.MixtralConfig(num_local_experts=r.choice([2, 4]), num_experts_per_tok=r.choice([1, 2]),
                                sliding_window=r.choice([None, 5]), **dec), tf.MixtralForCausalLM
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=r.choice([24, 48]),
                                 shared_expert_intermediate_size=r.choice([32, 64]), norm_topk_prob=r.random() < .5,
                                 decoder_sparse_step=r.choice([1, 2]), **dec), tf.Qwen2MoeForCausalLM
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=r.choice([24, 48]),
                                 head_dim=r.choice([8, 16]), norm_topk_prob=r.random() < .5,
                                 mlp_only_layers=r.choice([[], [0]]), **dec), tf.Qwen3MoeForCausalLM
    if arch == "olmoe":
        return tf.OlmoeConfig(num_experts=r.choice([2, 4]), num_experts_per_tok=r.choice([1, 2]),
                              norm_topk_prob=r.random() < .5, attention_bias=r.random() < .3,
                              tie_word_embeddings=r.random() < .3, **dec), tf.OlmoeForCausalLM
    if arch == "phimoe":
        return tf.PhimoeConfig(num_local_experts=r.choice([2, 4]), num_experts_per_tok=2,
                               sliding_window=r.choice([None, 5]), attention_bias=r.random() < .5,
                               lm_head_bias=r.random() < .5, router_jitter_noise=r.choice([0.01, 0.3]), **dec), \
            tf.PhimoeForCausalLM
    if arch == "glm4_moe":
        return tf.Glm4MoeConfig(head_dim=hd, n_routed_experts=4, num_experts_per_tok=r.choice([1, 2]),
                                n_group=r.choice([1, 2]), topk_group=1, n_shared_experts=r.choice([1, 2]),
                                moe_intermediate_size=r.choice([24, 48]), first_k_dense_replace=r.choice([0, 1]),
                                routed_scaling_factor=r.choice([1.0, 2.5]), norm_topk_prob=r.random() < .5,
                                use_qk_norm=r.random() < .5, attention_bias=r.random() < .5,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                 "partial_rotary_factor": r.choice([0.5, 1.0])},
                                **dec), tf.Glm4MoeForCausalLM
    if arch == "dots1":
        return tf.Dots1Config(n_routed_experts=4, num_experts_per_tok=r.choice([1, 2]), n_group=r.choice([1, 2]),
                              topk_group=1, n_shared_experts=r.choice([1, 2]), moe_intermediate_size=r.choice([24, 48]),
                              first_k_dense_replace=r.choice([0, 1]), routed_scaling_factor=r.choice([1.0, 2.5]),
                              norm_topk_prob=r.random() < .5, attention_bias=r.random() < .5,
                              sliding_window=r.choice([None, 5]), max_window_layers=r.choice([0, 1]), **dec), \
            tf.Dots1ForCausalLM
    if arch == "ernie4_5_moe":
        return tf.Ernie4_5_MoeConfig(moe_num_experts=4, moe_k=r.choice([1, 2]), moe_intermediate_size=r.choice([24, 48]),
                                     moe_num_shared_experts=r.choice([0, 1, 2]), moe_layer_start_index=r.choice([0, 1]),
                                     moe_layer_interval=r.choice([1, 2]), tie_word_embeddings=r.random() < .7,
                                     **dec), tf.Ernie4_5_MoeForCausalLM
    if arch == "hunyuan_v1_moe":
        return tf.HunYuanMoEV1Config(head_dim=hd, num_experts=r.choice([2, 4]), moe_topk=r.choice([1, 2]),
                                     attention_bias=r.random() < .5, tie_word_embeddings=r.random() < .3,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e4}, **dec), \
            tf.HunYuanMoEV1ForCausalLM
    if arch == "granitemoe":  # with a shared expert or none (GraniteMoeShared's class either way)
        return tf.GraniteMoeSharedConfig(num_local_experts=r.choice([2, 4]), num_experts_per_tok=r.choice([1, 2]),
                                         shared_intermediate_size=r.choice([0, 48]),
                                         embedding_multiplier=r.choice([1.0, 4.0]), residual_multiplier=r.choice([1.0, 0.3]),
                                         attention_multiplier=r.choice([0.05, 0.2]), logits_scaling=r.choice([1.0, 3.0]),
                                         tie_word_embeddings=r.random() < .3, **dec), tf.GraniteMoeSharedForCausalLM
    if arch == "llama4_text":
        # stacked experts weighed before the expert, NoPE layers with temperature tuning, chunked attention
        return tf.Llama4TextConfig(head_dim=hd, intermediate_size_mlp=r.choice([48, 96]), num_local_experts=r.choice([2, 4]),
                                   num_experts_per_tok=r.choice([1, 2]), interleave_moe_layer_step=r.choice([1, 2]),
                                   no_rope_layer_interval=r.choice([2, 4]), attention_chunk_size=r.choice([3, 8, None]),
                                   use_qk_norm=r.random() < .7, attn_temperature_tuning=r.random() < .7,
                                   floor_scale=r.choice([2, 8192]), attn_scale=r.choice([0.1, 0.5]),
                                   tie_word_embeddings=r.random() < .3, **dec), tf.Llama4ForCausalLM
    if arch in ("deepseek_v2", "deepseek_v3"):
        # multi-head latent attention (every head its own key and value: no grouped-query setting),
        # a dense first layer or none, a YaRN rotary with DeepSeek's mscale_all_dim or the default
        dec.update(num_key_value_heads=heads, first_k_dense_replace=r.choice([0, 1]), kv_lora_rank=r.choice([16, 40]),
                   q_lora_rank=r.choice([None, 24]), qk_nope_head_dim=r.choice([8, 16]),
                   qk_rope_head_dim=r.choice([4, 8, 16]), v_head_dim=r.choice([8, 12, 24]), n_routed_experts=4,
                   num_experts_per_tok=r.choice([1, 2]), n_shared_experts=r.choice([1, 2]),
                   moe_intermediate_size=r.choice([24, 48]), routed_scaling_factor=r.choice([1.0, 2.5]),
                   attention_bias=r.random() < .3)
        if r.random() < .4:
            dec["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                      "original_max_position_embeddings": 32, "mscale": r.choice([0.707, 1.0]),
                                      "mscale_all_dim": r.choice([0.707, 1.0])}
        if arch == "deepseek_v2":
            grouped = r.random() < .5
            return tf.DeepseekV2Config(topk_method="group_limited_greedy" if grouped else "greedy",
                                       n_group=2 if grouped else None, topk_group=1 if grouped else None,
                                       **dec), tf.DeepseekV2ForCausalLM
        return tf.DeepseekV3Config(n_group=r.choice([1, 2]), topk_group=1, norm_topk_prob=r.random() < .5,
                                   rope_interleave=r.random() < .7, **dec), tf.DeepseekV3ForCausalLM
    if arch == "gpt_oss":
        # attention sinks, sliding-window layers, YaRN (truncated or not), stacked experts with biases
        # (a width of 2*I on gate_up_proj's quantized axis), the SwiGLU clamp low enough to matter or not
        rp = {"rope_type": "yarn", "factor": r.choice([1.0, 4.0]), "rope_theta": 1e4, "beta_fast": 32.0,
              "beta_slow": 1.0, "truncate": r.random() < .5, "original_max_position_embeddings": 32}
        return tf.GptOssConfig(head_dim=hd, num_local_experts=r.choice([2, 4]), num_experts_per_tok=r.choice([1, 2]),
                               sliding_window=r.choice([3, 6]), swiglu_limit=r.choice([0.5, 7.0]),
                               attention_bias=r.random() < .8, rope_parameters=rp, **dec), tf.GptOssForCausalLM
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=H, n_layer=L, n_head=heads, n_positions=64,
                             n_inner=inter if r.random() < .5 else None,
                             activation_function=r.choice(["gelu_new", "gelu", "relu"]),
                             scale_attn_by_inverse_layer_idx=r.random() < .3, **common), tf.GPT2LMHeadModel
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=heads, intermediate_size=inter,
                                max_position_embeddings=64, use_parallel_residual=r.random() < .5,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                 "partial_rotary_factor": r.choice([0.25, 0.5, 1.0])},
                                **common), tf.GPTNeoXForCausalLM
    if arch == "opt":
        return tf.OPTConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=heads, ffn_dim=inter,
                            max_position_embeddings=64, do_layer_norm_before=r.random() < .7,
                            word_embed_proj_dim=r.choice([H, 16]), **common), tf.OPTForCausalLM
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=H, n_layer=L, n_head=heads,
                              apply_residual_connection_post_layernorm=r.random() < .3, **common), tf.BloomForCausalLM
    if arch == "gptj":
        return tf.GPTJConfig(n_embd=H, n_layer=L, n_head=heads, rotary_dim=r.choice([2, 8, hd]), n_positions=64,
                             n_inner=inter if r.random() < .5 else None, tie_word_embeddings=r.random() < .3,
                             **common), tf.GPTJForCausalLM
    if arch == "gpt_neo":
        kinds = [r.choice(["global", "local"]) for _ in range(L)]
        return tf.GPTNeoConfig(hidden_size=H, num_layers=L, num_heads=heads, attention_types=[[kinds, 1]],
                               window_size=r.choice([3, 6, 256]), intermediate_size=inter if r.random() < .5 else None,
                               max_position_embeddings=64, **common), tf.GPTNeoForCausalLM
    if arch == "gpt_bigcode":
        return tf.GPTBigCodeConfig(n_embd=H, n_layer=L, n_head=heads, n_positions=64, multi_query=r.random() < .6,
                                   n_inner=inter if r.random() < .5 else None, tie_word_embeddings=r.random() < .7,
                                   **common), tf.GPTBigCodeForCausalLM
    if arch == "falcon":  # 7B (multi-query, parallel), 40B (kv groups, new decoder) or RW (ALiBi, multi-head)
        kw = r.choice([dict(multi_query=True, parallel_attn=True),
                       dict(new_decoder_architecture=True, num_kv_heads=kv,
                            num_ln_in_parallel_attn=r.choice([None, 1])),
                       dict(alibi=True, multi_query=False, parallel_attn=r.random() < .5)])
        return tf.FalconConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=heads, ffn_hidden_size=inter,
                               bias=r.random() < .5, tie_word_embeddings=r.random() < .6, max_position_embeddings=128,
                               **kw, **common), tf.FalconForCausalLM
    if arch in ("cohere", "cohere2"):
        if arch == "cohere":
            return tf.CohereConfig(use_qk_norm=r.random() < .5, attention_bias=r.random() < .3,
                                   logit_scale=r.choice([0.0625, 0.5]), tie_word_embeddings=r.random() < .7,
                                   **dec), tf.CohereForCausalLM
        return tf.Cohere2Config(sliding_window=r.choice([3, 6, 64]), sliding_window_pattern=r.choice([2, 4]),
                                tie_word_embeddings=r.random() < .7, **dec), tf.Cohere2ForCausalLM
    # multimodal: a tiny vision tower (stored, not run) around a random language model
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    if arch == "llava":
        text = dict(model_type=r.choice(["llama", "mistral", "qwen2"]), **dec)
        return tf.LlavaConfig(text_config=text, vision_config=dict(model_type="clip_vision_model", **vision),
                              image_token_index=99), tf.LlavaForConditionalGeneration
    if arch == "mistral3":
        return tf.Mistral3Config(text_config=dict(model_type="mistral", sliding_window=r.choice([None, 5]), **dec),
                                 vision_config=dict(model_type="pixtral", head_dim=16, **vision),
                                 tie_word_embeddings=r.random() < .5, image_token_index=99), \
            tf.Mistral3ForConditionalGeneration
    if arch == "idefics3":
        return tf.Idefics3Config(text_config=dict(model_type="llama", tie_word_embeddings=r.random() < .5, **dec),
                                 vision_config=vision, image_token_id=99, scale_factor=2), \
            tf.Idefics3ForConditionalGeneration
    if arch == "qwen2_5_vl":
        sections = {8: [2, 1, 1], 16: [2, 3, 3], 24: [4, 4, 4], 32: [4, 6, 6]}[hd]
        text = dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections}, **dec)
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=37,
                                                                         num_heads=2, out_hidden_size=H, patch_size=14,
                                                                         fullatt_block_indexes=[0]),
                                   tie_word_embeddings=r.random() < .5, image_token_id=99, video_token_id=98,
                                   vision_start_token_id=97), tf.Qwen2_5_VLForConditionalGeneration
    if arch in ("llava_onevision", "video_llava"):
        text = dict(model_type=r.choice(["llama", "mistral", "qwen2"]), tie_word_embeddings=r.random() < .5, **dec)
        clip = dict(model_type="clip_vision_model", **vision)
        if arch == "llava_onevision":
            return tf.LlavaOnevisionConfig(text_config=text, vision_config=clip, image_token_index=99,
                                           video_token_index=98), tf.LlavaOnevisionForConditionalGeneration
        return tf.VideoLlavaConfig(text_config=text, vision_config=clip, image_token_index=99,
                                   video_token_index=98), tf.VideoLlavaForConditionalGeneration
    if arch == "aya_vision":  # run_case scales transformers' logits by logit_scale (its wrapper drops it)
        text = dict(model_type="cohere2", sliding_window=r.choice([3, 6, 64]), logit_scale=r.choice([0.0625, 0.5]),
                    **dec)
        return tf.AyaVisionConfig(text_config=text, vision_config=dict(model_type="siglip_vision_model", **vision),
                                  tie_word_embeddings=r.random() < .7, image_token_index=99), \
            tf.AyaVisionForConditionalGeneration
    if arch == "internvl":
        mt = r.choice(["qwen2", "qwen3", "llama"])
        text = dict(model_type=mt, **dec, **(dict(head_dim=hd) if mt == "qwen3" else {}))
        return tf.InternVLConfig(text_config=text, vision_config=dict(vision, image_size=[28, 28], patch_size=[14, 14]),
                                 tie_word_embeddings=r.random() < .5, image_token_id=99), \
            tf.InternVLForConditionalGeneration
    if arch == "idefics2":
        perceiver = dict(hidden_size=H, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                         resampler_head_dim=8, num_key_value_heads=1)
        return tf.Idefics2Config(text_config=dict(model_type="mistral", sliding_window=r.choice([None, 5]), **dec),
                                 vision_config=vision, perceiver_config=perceiver,
                                 tie_word_embeddings=r.random() < .3, image_token_id=99), \
            tf.Idefics2ForConditionalGeneration
    if arch == "janus":
        return tf.JanusConfig(text_config=dict(model_type="llama", **dec), vision_config=dict(vision, projection_dim=H),
                              vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32,
                                             channel_multiplier=[1, 1], num_res_blocks=1, num_patches=4,
                                             projection_dim=H, image_token_embed_dim=H),
                              tie_word_embeddings=r.random() < .5, image_token_id=99), tf.JanusForConditionalGeneration
    if arch in ("qwen3_vl", "glm4v"):  # M-RoPE sections: half the rotary's features
        partial = r.choice([0.5, 1.0]) if arch == "glm4v" else 1.0
        t = int(hd * partial) // 2
        rp = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [t - 2 * (t // 3), t // 3, t // 3]}
        if arch == "glm4v":
            text = dict(rope_parameters=dict(rp, partial_rotary_factor=partial), **dec)
            return tf.Glm4vConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=37,
                                                                       num_heads=2, out_hidden_size=H, patch_size=14),
                                  tie_word_embeddings=r.random() < .5, image_token_id=99, video_token_id=98), \
                tf.Glm4vForConditionalGeneration
        text = dict(head_dim=hd, rope_parameters=dict(rp, mrope_interleaved=True), **dec)
        return tf.Qwen3VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, intermediate_size=37,
                                                                     num_heads=2, out_hidden_size=H, patch_size=14,
                                                                     deepstack_visual_indexes=[0]),
                                tie_word_embeddings=r.random() < .5, image_token_id=99, video_token_id=98,
                                vision_start_token_id=97), tf.Qwen3VLForConditionalGeneration
    raise SystemExit(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def kbit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kbitcli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def run_case(r: random.Random, arch: str, d: Path) -> str:
    """'' when every step passes, else what failed."""
    import torch
    from test_runner import _write_tokenizer

    from kbitcli.runner.load import load

    src, out, deq = d / "src", d / "out", d / "deq"
    cfg, cls = model_for(r, arch)
    torch.manual_seed(r.randrange(1 << 30))
    m = cls(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.dim() == 1 and ("norm" in name or "ln" in name)
                    else 0.15 * torch.randn_like(p))
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's routing bias, zero at init
                b.copy_(0.3 * torch.randn_like(b))
    m.to(r.choice([torch.float32, torch.float16, torch.bfloat16])).save_pretrained(src)
    _write_tokenizer(src)
    args = ["quantize", src, out, "-k", r.randint(2, 8),
            "-t", r.choice(["int", "affine", "fp", "nf", "quantile", "lloyd", "dynamic"]),
            "-b", r.choice(["32", "64", "96", "128", "256", "row"]), "--scale", r.choice(["fp16", "fp32", "dq", "e8"]),
            "--json", "-q"]
    if r.random() < .3:
        args += ["--rule", "*.0.*=" + r.choice(["8:int", "3:fp:b32", "keep", "6:nf:row"])]
    if r.random() < .2:
        args += ["--search", "mse"]
    if r.random() < .3:
        args += ["--shard-size", r.choice(["64KB", "200KB", "1MB"])]
    print("   ", " ".join(str(x) for x in args[3:] if x not in ("--json", "-q")), flush=True)
    p = kbit(*args)
    if p.returncode != 0:
        if p.returncode == 1 or "Traceback" in p.stderr:
            return f"quantize crashed: {p.stderr[-1500:]}"
        return ""  # a clean refusal is a pass
    p = kbit("verify", out, "--against", src, "--max-error", "10")
    if p.returncode != 0:
        return f"verify: {p.stdout[-500:]} {p.stderr[-800:]}"
    ids = torch.tensor([[r.randint(3, VOCAB - 1) for _ in range(10)]])
    packed, dense, unfused = load(out)[0], load(out, dequantize_on_load=True)[0], load(out, fuse=False)[0]
    with torch.no_grad():
        a, b, c = packed(ids)[0], dense(ids)[0], unfused(ids)[0]
    if not torch.isfinite(a).all() or (a - b).abs().max() > 1e-4 or (a - c).abs().max() > 1e-4:
        return f"packed / dequantize-on-load / unfused differ: {(a - b).abs().max():.3g} {(a - c).abs().max():.3g}"
    p = kbit("dequantize", out, deq, "--dtype", "float32")
    if p.returncode != 0:
        return f"dequantize: {p.stderr[-800:]}"
    with torch.no_grad():
        # eager experts: torch's grouped_mm (transformers' default on MoE) wants 16-byte aligned widths
        ref = cls.from_pretrained(deq, dtype=torch.float32, experts_implementation="eager").eval()(ids).logits[0]
    if arch == "aya_vision":
        ref = ref * cfg.text_config.logit_scale
    err = (ref - b).abs().max().item()
    if err > 2e-3 * max(1.0, ref.abs().max().item()):
        return f"transformers on the dequantized checkpoint differs from the runner by {err:.3g}"
    p = kbit("generate", out, "--prompt", "t5 t6 t7", "--max-new-tokens", "5", "--json")
    if p.returncode != 0:
        return f"generate: {p.stderr[-800:]}"
    (d / "t.txt").write_text(" ".join(f"t{r.randint(3, 99)}" for _ in range(200)))
    p = kbit("perplexity", out, "--text", d / "t.txt", "--json")
    if p.returncode != 0:
        return f"perplexity: {p.stderr[-800:]}"
    return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures to draw from")
    a = ap.parse_args()
    import transformers
    transformers.logging.set_verbosity_error()
    archs = [x.strip() for x in a.archs.split(",") if x.strip()]
    fails = 0
    for i in range(a.cases):
        r = random.Random(a.seed * 100003 + i)
        arch = r.choice(archs)
        print(f"[{a.seed}.{i}] {arch}", flush=True)
        d = Path(tempfile.mkdtemp(prefix="kbit-fuzz-"))
        try:
            problem = run_case(r, arch, d)
        except Exception:  # noqa: BLE001 - a fuzz case that raises is a finding
            problem = traceback.format_exc()[-2000:]
        finally:
            shutil.rmtree(d, ignore_errors=True)
        print(f"    {'FAIL: ' + problem if problem else 'ok'}", flush=True)
        fails += bool(problem)
    print(f"{a.cases - fails} of {a.cases} cases passed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
