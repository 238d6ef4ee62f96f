"""What llama.cpp does per architecture, for gguf_source.py: the tensor names, what its converter
rearranged, and the config.json settings it stores, fixes or leaves to the tensors.

Supported architectures: see SUPPORTED_ARCHITECTURES (llama, qwen2, qwen3: only llama's attn_q /
attn_k are permuted by llama.cpp, and those of the llama-derived granite and smollm3; qwen3 adds
attn_q_norm / attn_k_norm; gemma, gemma2, gemma3: norms shifted by 1, Gemma 2 and 3 with four
norms per block, Gemma 3 with q/k norms; phi3: the fused attn_qkv and gate/up ffn_up, LongRoPE
factors as the tensors rope_factors_long / _short; granite: its four multipliers as metadata;
olmo2: norms after the sublayers, q/k norms over all heads; starcoder2: LayerNorms with biases,
output_norm.bias included, and the c_fc / c_proj MLP as ffn_up / ffn_down; glm4: gate/up in one
ffn_up, post_attention_norm / post_ffw_norm after the sublayers (post_self_attn_layernorm /
post_mlp_layernorm), the rotary on rope.dimension_count features; chatglm: GLM-4-9B's
GlmForCausalLM (q/k/v biases, gate/up in one ffn_up, partial rotary; THUDM's own layout with one
attn_qkv is refused); exaone4: norms after the sublayers only, q/k norms, the sliding layers from
attention.sliding_window_pattern (a list); olmo: q/k permuted as llama's (OlmoModel), no norm
weights, clip_qkv as attention.clamp_kqv; nemotron:
LayerNorm1P weights + 1 (NemotronModel.modify_tensors, taken off as Gemma's), partial rotary, the
squared-ReLU up / down MLP; apertus: attention_layernorm / feedforward_layernorm, q/k norms, xIELU's
four scalars per layer stored as metadata arrays (xielu.alpha_p ...) and listed again as
mlp.act_fn.*, the llama3 RoPE scaling read back from rope_freqs when those are the factors of
ApertusConfig's settings (LLAMA3_SETTINGS), refused otherwise); arcee: q/k permuted (ArceeModel is a
LlamaModel), the squared-ReLU up / down MLP; seed_oss: q/k/v biases, the norm before the MLP stored
as post_attention_norm; ernie4_5: llama's tensors, nothing permuted, use_bias from the tensors.
Mixtures of experts: Mixtral (arch "llama" with {arch}.expert_count), qwen2moe (with a shared
expert), qwen3moe, olmoe (q/k norms over all heads, never renormalised), glm4moe (GLM-4.5:
DeepSeek-V3's sigmoid router with exp_probs_b, shared experts and leading dense layers, partial
rotary; the nextn_predict_layers multi-token-prediction blocks after the model's are skipped),
dots1 (dots.llm1: GLM-4.5's routing, q/k norms, no partial rotary, the groups stored), ernie4_5-moe
(an MoE block every interleave_moe_layer_step-th layer from leading_dense_block_count on, the
routing bias moe_statics.e_score_correction_bias [1, experts], the shared experts as one MLP of
expert_shared_count x expert width; the converter's expert_shared_feed_forward_length is not
used), hunyuan-moe (Hunyuan-A13B: every layer sparse, the shared expert shared_mlp, q/k norms
query_layernorm / key_layernorm; HunYuanMoEModel stores the NTK-alpha RoPE as the base it gives,
read back as rope_theta; experts of a width other than feed_forward_length, which
HunYuanMoEV1ForCausalLM cannot hold, are refused) and deepseek2.
llama.cpp stacks the experts of a layer into one 3-D tensor per projection
(ffn_gate_exps / ffn_up_exps / ffn_down_exps, [expert, rows, columns]; written with
--fuse-gate-up-exps, gate and up as one ffn_gate_up_exps, each expert's gate rows then its up
rows); each expert is listed as its own 2-D tensor under its Hugging Face name, a view of its
slice of the file (one expert is read at a time). Mixtral files from llama.cpp's older convert.py
hold each expert apart (blk.N.ffn_gate.E.weight ...).
llama4 and gpt-oss checkpoints hold their experts stacked themselves, with the input axis in the
middle: gate_up_proj [expert, hidden, 2 x width], down_proj [expert, width, hidden]. Their converters
transpose them to llama.cpp's [expert, out, in] and split gate_up_proj in two: Llama 4's gate then
up halves (or one ffn_gate_up_exps), gpt-oss's alternating columns (gate, up, gate, ...), its biases
alike (ffn_*_exps.bias); both are rebuilt as the checkpoint's 3-D tensors (JOINED: in their float
type, or float32 from gpt-oss's MXFP4 blocks).
granitemoe (Granite MoE; "granitemoeshared", GraniteMoeSharedForCausalLM, when the file stores
expert_shared_feed_forward_length) keeps its experts stacked in llama.cpp's own [expert, out, in]
layout: block_sparse_moe.input_linear [expert, 2 x width, hidden] (gate rows, then up rows), which
GraniteMoeModel splits into ffn_gate_exps / ffn_up_exps (or keeps as one ffn_gate_up_exps), and
output_linear (ffn_down_exps); the shared expert's input_linear is split into ffn_gate_shexp /
ffn_up_shexp. All are rebuilt as the checkpoint's tensors (JOINED); q/k permuted as Granite's, its
four multipliers as metadata; a file without experts (a dense GraniteMoeShared) is refused.
Llama 4 (undo_permute = False: nothing permuted): a
dense feed_forward except every interleave_moe_layer_step-th layer, the shared expert, and what
llama.cpp fixes (chunks of 8192 on three layers of four, the others without rotary and with
attention temperature tuning, the q/k L2 norm except with 128 experts), Scout's llama3 RoPE scaling
read back from rope_freqs (LLAMA3_SETTINGS); a llama4 file without chunks (sliding_window 0,
MobileLLM) is refused. gpt-oss: attn_sinks (self_attn.sinks), q/k/v/o
biases, the router's bias, post_attention_norm before the MLP, every other layer sliding, YaRN
without truncation (as its checkpoints; llama.cpp rounds the correction range).
deepseek2 (DeepSeek-V2 / V3 / R1, Kimi-K2): multi-head latent attention (attn_q, or attn_q_a /
attn_q_a_norm / attn_q_b; attn_kv_a_mqa, attn_kv_a_norm, attn_output), leading dense layers,
shared experts (ffn_*_shexp), V3's routing bias exp_probs_b. Files converted since llama.cpp's
MLA change (spring 2025) split each attn_kv_b into attn_k_b (each head's key rows, transposed:
[head, kv_lora_rank, qk_nope]) and attn_v_b ([head, v_head_dim, kv_lora_rank]) and store
head_count_kv 1 with the MLA sizes as key_length_mla / value_length_mla; kv_b_proj is rebuilt
from the two exactly (their values, or float32 when quantized). A sigmoid router
(expert_gating_func 2) is DeepSeek-V3's class, a softmax one (or none stored) DeepSeek-V2's.
Settings llama.cpp does not store but fixes per architecture (Gemma's attention scale, which
layers slide, Gemma 3's local RoPE base, SmolLM3's NoPE layers, whether Qwen-MoE renormalises
the routing weights) are rebuilt as llama.cpp's llama-model.cpp sets them.
The LayerNorm and GPT-2-like families are read under their checkpoints' names (model.layers.<i>,
transformer.h.<i>, gpt_neox.layers.<i> ...), with what llama.cpp's converter rearranged undone:
* command-r (Cohere) and cohere2: llama's tensors, LayerNorms without bias, the rotary llama.cpp runs
  on adjacent pairs as Cohere does (nothing permuted), tied; Command R+'s attn_q_norm /
  attn_k_norm are [heads, head_dim] as in the checkpoint; Cohere 2's sliding layers from
  attention.sliding_window_pattern (three of every four without it);
* phi2: q/k/v (or the fused attn_qkv of older files, split back into q/k/v rows), the dense /
  fc1 / fc2 names, the head's bias; stablelm: LayerNorms with biases, the per-head q/k norms
  llama.cpp stacks into one [heads, head_dim] tensor listed again as q_layernorm.norms.<h>, a
  parallel block when the layers have no ffn_norm;
* falcon, bloom, gptneox: the converter regroups query_key_value's rows (Falcon: per group of
  query heads sharing a key/value head; BLOOM, GPT-NeoX: per head) into all queries, all keys,
  all values; `load` and `load_raw` restore the checkpoint's order. Falcon-40B's two norms are
  attn_norm_2 (ln_attn) and attn_norm (ln_mlp);
* starcoder (GPTBigCode) with its single key/value head, gpt2: c_attn as stored; llama.cpp
  transposes GPT-2's Conv1D weights, which are transposed back (listed as float32 when quantized);
* mpt (transformer.blocks.<i>): Wqkv as stored, ALiBi (attention.max_alibi_bias; a file without is
  refused), clip_qkv from attention.clamp_kqv, biases when the file has them.
Their converters store no RoPE base for phi2, stablelm and gptneox (llama.cpp's 10000 is used),
and what llama.cpp's graphs decide from the tensors (StableLM's parallel block, Falcon's layout,
Command R+'s q/k norms) is decided here the same way.

Adding a llama.cpp architecture (its converter's Model class in convert_hf_to_gguf.py and its
graph in llama-model.cpp are the references; the runner must support the Hugging Face model,
docs/adding-an-architecture.md):
1. SUPPORTED_ARCHITECTURES and HF_ARCH (the GGUF name -> model_type and class of config.json).
2. The tensor names, where they differ from llama's (_GLOBAL_NAMES, _BLOCK_NAMES):
   _ARCH_BLOCK_NAMES, _ARCH_GLOBAL_NAMES, and _LAYER_PREFIX when the blocks are not model.layers
   (then every block tensor is named in _ARCH_BLOCK_NAMES); _ARCH_LAYER_WEIGHTS when a layer's
   weights are not llama's seven; expected_shape for Hugging Face names it does not know yet.
3. What the converter rearranged: PERMUTED_QK (it permutes attn_q / attn_k), GROUPED_QKV
   (query_key_value rows regrouped), TRANSPOSED, SPLIT (one tensor listed as several),
   EXPERT_NAMES and MOE_ARCHITECTURES (stacked experts), JOINED (a checkpoint tensor rebuilt from
   several GGUF tensors, or rearranged beyond a transpose: stacked experts the checkpoint keeps
   stacked, STACKED_MOE), SHIFTED_NORMS (norms + 1), _PARTIAL_ROTARY (rope.dimension_count below
   the head size), LLAMA3_SETTINGS (the checkpoints' llama3 RoPE, stored only as rope_freqs).
4. config.json: a branch in family_config, with a builder `_<family>_config(src)` for what
   llama.cpp stores under its own keys or fixes without storing; check_hparams for what llama.cpp
   refuses, or runs otherwise than the checkpoint, with an InputError.
5. A test in tests/test_sources.py: copy test_llama_like_gguf_runs_like_transformers (a llama-like
   model: add the architecture to _llama_like_gguf) or test_more_gguf_runs_like_transformers (a
   family with its own names: _more_model / _MORE_GGUF_NAMES) or test_newer_gguf_runs_like_transformers
   (_newer_config: _new_gguf writes the checkpoint with gguf-py's tensor map), which write a tiny transformers
   model as llama.cpp's converter writes it and compare the names, shapes, values and logits.
"""
from __future__ import annotations

import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np

from kbitcli.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from kbitcli.sources.gguf_source import GGUFSource

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "qwen2moe",
                           "qwen3moe", "granite", "olmo2", "smollm3", "starcoder2", "command-r", "cohere2", "phi2",
                           "stablelm", "falcon", "starcoder", "gpt2", "bloom", "gptneox", "deepseek2", "llama4",
                           "gpt-oss", "glm4", "glm4moe", "chatglm", "exaone4", "olmoe", "olmo", "nemotron", "mpt",
                           "apertus", "granitemoe", "ernie4_5", "ernie4_5-moe", "arcee", "seed_oss", "dots1",
                           "hunyuan-moe")
#: GGUF architecture ("mixtral": "llama" with experts) -> (Hugging Face model_type, class)
HF_ARCH = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
           "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma": ("gemma", "GemmaForCausalLM"),
           "gemma2": ("gemma2", "Gemma2ForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
           "phi3": ("phi3", "Phi3ForCausalLM"), "mixtral": ("mixtral", "MixtralForCausalLM"),
           "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"), "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
           "granite": ("granite", "GraniteForCausalLM"), "olmo2": ("olmo2", "Olmo2ForCausalLM"),
           "smollm3": ("smollm3", "SmolLM3ForCausalLM"), "starcoder2": ("starcoder2", "Starcoder2ForCausalLM"),
           "command-r": ("cohere", "CohereForCausalLM"), "cohere2": ("cohere2", "Cohere2ForCausalLM"),
           "phi2": ("phi", "PhiForCausalLM"), "stablelm": ("stablelm", "StableLmForCausalLM"),
           "falcon": ("falcon", "FalconForCausalLM"), "falcon-40b": ("falcon", "FalconForCausalLM"),
           "starcoder": ("gpt_bigcode", "GPTBigCodeForCausalLM"), "gpt2": ("gpt2", "GPT2LMHeadModel"),
           "bloom": ("bloom", "BloomForCausalLM"), "gptneox": ("gpt_neox", "GPTNeoXForCausalLM"),
           # "deepseek3": deepseek2 with a sigmoid router
           "deepseek2": ("deepseek_v2", "DeepseekV2ForCausalLM"), "deepseek3": ("deepseek_v3", "DeepseekV3ForCausalLM"),
           "llama4": ("llama4_text", "Llama4ForCausalLM"), "gpt-oss": ("gpt_oss", "GptOssForCausalLM"),
           "glm4": ("glm4", "Glm4ForCausalLM"), "glm4moe": ("glm4_moe", "Glm4MoeForCausalLM"),
           "exaone4": ("exaone4", "Exaone4ForCausalLM"),
           "olmoe": ("olmoe", "OlmoeForCausalLM"), "olmo": ("olmo", "OlmoForCausalLM"),
           "nemotron": ("nemotron", "NemotronForCausalLM"), "mpt": ("mpt", "MptForCausalLM"),
           "apertus": ("apertus", "ApertusForCausalLM"), "chatglm": ("glm", "GlmForCausalLM"),
           # "granitemoeshared": granitemoe with expert_shared_feed_forward_length (a shared expert)
           "granitemoe": ("granitemoe", "GraniteMoeForCausalLM"),
           "granitemoeshared": ("granitemoeshared", "GraniteMoeSharedForCausalLM"),
           "ernie4_5": ("ernie4_5", "Ernie4_5ForCausalLM"), "ernie4_5-moe": ("ernie4_5_moe", "Ernie4_5_MoeForCausalLM"),
           "arcee": ("arcee", "ArceeForCausalLM"), "seed_oss": ("seed_oss", "SeedOssForCausalLM"),
           "dots1": ("dots1", "Dots1ForCausalLM"), "hunyuan-moe": ("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM")}
#: llama.cpp's converter permutes the attn_q / attn_k rows of LlamaModel and its subclasses
#: (LlamaModel.permute; Mixtral is "llama"; Llama4Model sets undo_permute = False: GraniteMoeModel and
#: ArceeModel are LlamaModels), and OlmoModel's, not of the others
PERMUTED_QK = ("llama", "mixtral", "granite", "smollm3", "olmo", "granitemoe", "granitemoeshared", "arcee")
MOE_ARCHITECTURES = ("mixtral", "qwen2moe", "qwen3moe", "deepseek2", "deepseek3", "olmoe", "llama4", "gpt-oss",
                     "glm4moe", "granitemoe", "granitemoeshared", "ernie4_5-moe", "dots1", "hunyuan-moe")
GRANITE_MOE = ("granitemoe", "granitemoeshared")
DEEPSEEK = ("deepseek2", "deepseek3")
#: the mixtures of experts whose checkpoints hold the experts stacked, as 3-D tensors (JOINED)
STACKED_MOE = ("llama4", "gpt-oss")
#: GemmaModel / Gemma2Model / Gemma3Model add 1 to every tensor whose name ends in norm.weight, and
#: NemotronModel to its LayerNorm1P weights (which scale by 1 + weight)
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
SHIFTED_NORMS = GEMMA_ARCHITECTURES + ("nemotron",)

#: the tensors outside the blocks, without .weight / .bias (output_norm.bias: LayerNorms)
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_GLOBALS = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
                 "output": "lm_head"}
_FALCON_GLOBALS = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f", "output": "lm_head"}
_ARCH_GLOBAL_NAMES = {"phi2": {**_GLOBAL_NAMES, "output_norm": "model.final_layernorm"},
                      "starcoder": _GPT2_GLOBALS, "gpt2": _GPT2_GLOBALS, "falcon": _FALCON_GLOBALS,
                      "falcon-40b": _FALCON_GLOBALS,
                      "bloom": {**_FALCON_GLOBALS, "token_embd_norm": "transformer.word_embeddings_layernorm"},
                      "gptneox": {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm",
                                  "output": "embed_out"},
                      "mpt": {"token_embd": "transformer.wte", "output_norm": "transformer.norm_f",
                              "output": "lm_head"}}
#: where the blocks are, when not model.layers; these layouts name every block tensor in
#: _ARCH_BLOCK_NAMES (no fallback to the llama names of _BLOCK_NAMES)
_LAYER_PREFIX = {"starcoder": "transformer.h", "gpt2": "transformer.h", "falcon": "transformer.h",
                 "falcon-40b": "transformer.h", "bloom": "transformer.h", "gptneox": "gpt_neox.layers",
                 "mpt": "transformer.blocks"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # qwen3, gemma3
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 2 and 3: a norm after the attention and one on each side of the MLP (ffn_norm is the one
# before it); Phi-3: q, k, v rows in one tensor, and gate then up rows in ffn_up.
_GEMMA2_NAMES = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
_GPT2_NAMES = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_FALCON_NAMES = {"attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value",
                 "attn_output": "self_attention.dense", "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}
# Mixture of experts: the router, and Qwen2-MoE's shared expert and its gate.
_QWEN_MOE_NAMES = {"ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
                   "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                   "ffn_down_shexp": "mlp.shared_expert.down_proj"}
# DeepSeek: multi-head latent attention, the router and its bias (the converter renames
# e_score_correction_bias to e_score_correction.bias: hf_name), the shared experts
_DEEPSEEK_NAMES = {"attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
                   "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
                   "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
                   "ffn_gate_inp": "mlp.gate", "exp_probs_b": "mlp.gate.e_score_correction",
                   "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                   "ffn_down_shexp": "mlp.shared_experts.down_proj"}
# Llama 4: the feed-forward is `feed_forward` (a dense SwiGLU, or the router, the shared expert and
# the stacked experts); gpt-oss: a norm after the attention (before the MLP), a sink logit per head
_LLAMA4_NAMES = {"ffn_gate": "feed_forward.gate_proj", "ffn_up": "feed_forward.up_proj",
                 "ffn_down": "feed_forward.down_proj", "ffn_gate_inp": "feed_forward.router",
                 "ffn_gate_shexp": "feed_forward.shared_expert.gate_proj",
                 "ffn_up_shexp": "feed_forward.shared_expert.up_proj",
                 "ffn_down_shexp": "feed_forward.shared_expert.down_proj"}
_GPT_OSS_NAMES = {"post_attention_norm": "post_attention_layernorm", "attn_sinks": "self_attn.sinks",
                  "ffn_gate_inp": "mlp.router"}
# GLM-4 (-0414): norms after the attention and after the MLP too; gate and up rows in one ffn_up
_GLM4_NAMES = {"post_attention_norm": "post_self_attn_layernorm", "post_ffw_norm": "post_mlp_layernorm",
               "ffn_up": "mlp.gate_up_proj"}
# OLMo 2 and EXAONE 4: norms after the sublayers only
_POST_NORM_NAMES = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# Granite MoE: the router, the experts' down projections as stacked in the checkpoint ([expert,
# hidden, width]: output_linear, JOINED) and the shared expert's; ERNIE 4.5 MoE: the routing bias of
# moe_statics, [1, experts]
_GRANITE_MOE_NAMES = {"ffn_gate_inp": "block_sparse_moe.router.layer", "ffn_down_shexp": "shared_mlp.output_linear"}
# Hunyuan MoE: the router mlp.gate.wg, the shared expert shared_mlp, the q/k norms (after the rotary)
_HUNYUAN_MOE_NAMES = {"ffn_gate_inp": "mlp.gate.wg", "ffn_gate_shexp": "mlp.shared_mlp.gate_proj",
                      "ffn_up_shexp": "mlp.shared_mlp.up_proj", "ffn_down_shexp": "mlp.shared_mlp.down_proj",
                      "attn_q_norm": "self_attn.query_layernorm", "attn_k_norm": "self_attn.key_layernorm"}
_ERNIE_MOE_NAMES = {**{k: v for k, v in _DEEPSEEK_NAMES.items() if k.startswith("ffn")},
                    "exp_probs_b": "mlp.moe_statics.e_score_correction"}
_ARCH_BLOCK_NAMES = {"gemma2": _GEMMA2_NAMES, "gemma3": _GEMMA2_NAMES, "deepseek2": _DEEPSEEK_NAMES,
                     "llama4": _LLAMA4_NAMES, "gpt-oss": _GPT_OSS_NAMES, "glm4": _GLM4_NAMES,
                     "chatglm": {"ffn_up": "mlp.gate_up_proj"},
                     "exaone4": _POST_NORM_NAMES, "olmoe": {"ffn_gate_inp": "mlp.gate"},
                     "apertus": {"attn_norm": "attention_layernorm", "ffn_norm": "feedforward_layernorm"},
                     # GLM-4.5: DeepSeek-V3's router and shared experts, one norm before the MLP
                     "glm4moe": {**{k: v for k, v in _DEEPSEEK_NAMES.items() if k.startswith(("ffn", "exp"))},
                                 "post_attention_norm": "post_attention_layernorm"},
                     "deepseek3": _DEEPSEEK_NAMES, "granitemoe": _GRANITE_MOE_NAMES,
                     "granitemoeshared": _GRANITE_MOE_NAMES, "ernie4_5-moe": _ERNIE_MOE_NAMES,
                     "hunyuan-moe": _HUNYUAN_MOE_NAMES,
                     # dots.llm1: DeepSeek-V3's router and shared experts; Seed-OSS: the norm before the MLP
                     # is post_attention_norm (SEED_OSS has no ffn_norm in gguf-py's table)
                     "dots1": {k: v for k, v in _DEEPSEEK_NAMES.items() if k.startswith(("ffn", "exp"))},
                     "seed_oss": {"post_attention_norm": "post_attention_layernorm"},
                     "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
                     "mixtral": {"ffn_gate_inp": "block_sparse_moe.gate"},
                     "qwen2moe": _QWEN_MOE_NAMES, "qwen3moe": _QWEN_MOE_NAMES,
                     "olmo2": _POST_NORM_NAMES,
                     "starcoder2": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
                     "phi2": {"attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
                     "starcoder": _GPT2_NAMES, "gpt2": _GPT2_NAMES, "falcon": _FALCON_NAMES,
                     # llama.cpp's Falcon-40B graph: attn_norm_2 before the attention, attn_norm before the MLP
                     "falcon-40b": {**_FALCON_NAMES, "attn_norm": "ln_mlp", "attn_norm_2": "ln_attn"},
                     "bloom": {**_FALCON_NAMES, "ffn_norm": "post_attention_layernorm"},
                     "gptneox": {"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value",
                                 "attn_output": "attention.dense", "ffn_norm": "post_attention_layernorm",
                                 "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"},
                     "mpt": {"attn_norm": "norm_1", "attn_qkv": "attn.Wqkv", "attn_output": "attn.out_proj",
                             "ffn_norm": "norm_2", "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj"}}
#: GGUF tensors listed as several Hugging Face tensors, each a block of their rows (None: one row,
#: as a vector): older phi2 files' fused attn_qkv (q, k, v rows), StableLM's per-head q/k norms
#: (llama.cpp stacks them, StableLMModel._stack_qk_norm)
SPLIT = {"phi2": {"attn_qkv": lambda hp: [("self_attn.q_proj", hp["n_head"] * hp["head_dim"]),
                                          ("self_attn.k_proj", hp["n_head_kv"] * hp["head_dim"]),
                                          ("self_attn.v_proj", hp["n_head_kv"] * hp["head_dim"])]},
         "stablelm": {"attn_q_norm": lambda hp: [(f"self_attn.q_layernorm.norms.{h}", None)
                                                 for h in range(hp["n_head"])],
                      "attn_k_norm": lambda hp: [(f"self_attn.k_layernorm.norms.{h}", None)
                                                 for h in range(hp["n_head_kv"])]}}
#: the converter regroups these query_key_value rows (weight and bias) as all queries, all keys, all
#: values (FalconModel / BloomModel / GPTNeoXModel.modify_tensors)
GROUPED_QKV = ("falcon", "falcon-40b", "bloom", "gptneox")
#: GPT-2's Conv1D weights, which GPT2Model.modify_tensors transposes to [out, in]
TRANSPOSED = {"gpt2": ("attn_qkv", "attn_output", "ffn_up", "ffn_down")}
#: the families whose rotary may cover part of each head (rope.dimension_count)
_PARTIAL_ROTARY = ("phi3", "phi2", "stablelm", "gptneox", "glm4", "glm4moe", "chatglm", "nemotron")
#: the stacked experts: GGUF name -> Hugging Face name of expert {}
_QWEN_EXPERTS = {"ffn_gate_exps": "mlp.experts.{}.gate_proj", "ffn_up_exps": "mlp.experts.{}.up_proj",
                 "ffn_down_exps": "mlp.experts.{}.down_proj"}
EXPERT_NAMES = {"mixtral": {"ffn_gate_exps": "block_sparse_moe.experts.{}.w1",
                            "ffn_down_exps": "block_sparse_moe.experts.{}.w2",
                            "ffn_up_exps": "block_sparse_moe.experts.{}.w3"},
                "qwen2moe": _QWEN_EXPERTS, "qwen3moe": _QWEN_EXPERTS, "deepseek2": _QWEN_EXPERTS,
                "deepseek3": _QWEN_EXPERTS, "olmoe": _QWEN_EXPERTS, "glm4moe": _QWEN_EXPERTS,
                "ernie4_5-moe": _QWEN_EXPERTS, "dots1": _QWEN_EXPERTS, "hunyuan-moe": _QWEN_EXPERTS}
#: --fuse-gate-up-exps: [expert, gate rows then up rows, columns]
FUSED_EXPERTS = "ffn_gate_up_exps"
#: older Mixtral files, one tensor an expert: blk.N.ffn_gate.E.weight ...
PER_EXPERT_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_down|ffn_up)\.(\d+)\.weight$")


def _kv_b_shapes(hp: dict[str, Any]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    nh, r, nope, v = hp["n_head"], hp["kv_lora_rank"], hp["qk_nope"], hp["v_head_dim"]
    return [(nh, r, nope), (nh, v, r)], (nh * (nope + v), r)


def _gate_up_shapes(n: int) -> Any:
    """n GGUF parts [expert, their share of 2 x expert width, hidden] -> [expert, hidden, 2 x width]"""
    def shapes(hp: dict[str, Any]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        e, h, i = hp["n_expert"], hp["n_embd"], hp["n_ff_exp"]
        return [(e, 2 * i // n, h)] * n, (e, h, 2 * i)
    return shapes


def _down_shapes(hp: dict[str, Any]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    e, h, i = hp["n_expert"], hp["n_embd"], hp["n_ff_exp"]
    return [(e, h, i)], (e, i, h)


def _granite_experts(n: int, what: str) -> Any:
    """Granite MoE's stacked experts from n GGUF parts [expert, rows / n, columns]: input_linear
    [expert, 2 x width, hidden], output_linear [expert, hidden, width]"""
    def shapes(hp: dict[str, Any]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        e, h, i = hp["n_expert"], hp["n_embd"], hp["n_ff_exp"]
        shape = (e, 2 * i, h) if what == "input" else (e, h, i)
        return [(e, shape[1] // n, shape[2])] * n, shape
    return shapes


def _oss_bias_shapes(hp: dict[str, Any]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    e, i = hp["n_expert"], hp["n_ff_exp"]
    return [(e, i), (e, i)], (e, 2 * i)


def _swap_last(*parts: np.ndarray) -> np.ndarray:
    """[expert, out, in] GGUF parts, one after the other on out -> the checkpoint's [expert, in, out]"""
    return np.concatenate(parts, axis=1).transpose(0, 2, 1)


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gpt-oss's gate and up: the checkpoint alternates them (gate, up, gate, ...) on the out axis,
    the last one of its weights [expert, in, out], the only one of its biases [expert, out]"""
    both = np.stack([gate, up], axis=2)  # [expert, width, 2, (in)]
    both = both.reshape(gate.shape[0], -1, *gate.shape[2:])
    return both.transpose(0, 2, 1) if both.ndim == 3 else both


#: Hugging Face tensors that llama.cpp's converter splits or rearranges beyond a transpose, rebuilt
#: from their GGUF parts: layout -> [(Hugging Face name in the block, its GGUF parts in the block,
#: ((the parts' shapes), its shape) from the hyperparameters, join(*parts) -> it)].
#: DeepSeek: DeepseekV2Model.modify_tensors splits kv_b_proj into attn_k_b (each head's key rows,
#: transposed: [head, kv_lora_rank, qk_nope]) and attn_v_b ([head, v_head_dim, kv_lora_rank]).
#: Llama 4 and gpt-oss keep their experts stacked with the input axis in the middle; llama.cpp
#: transposes them to [expert, out, in] and splits gate_up_proj into ffn_gate_exps / ffn_up_exps:
#: Llama 4's gate then up (or, with --fuse-gate-up-exps, one ffn_gate_up_exps), gpt-oss's
#: alternating (Llama4Model / GptOssModel.modify_tensors). Granite MoE keeps its experts stacked in
#: llama.cpp's [expert, out, in] layout, gate rows then up rows in input_linear, which
#: GraniteMoeModel.modify_tensors splits into ffn_gate_exps / ffn_up_exps (--fuse-gate-up-exps: one
#: ffn_gate_up_exps), and the shared expert's input_linear into ffn_gate_shexp / ffn_up_shexp.
JOINED: dict[str, list[tuple[str, tuple[str, ...], Any, Any]]] = {
    "deepseek2": [("self_attn.kv_b_proj.weight", ("attn_k_b.weight", "attn_v_b.weight"), _kv_b_shapes,
                   lambda k, v: np.concatenate([k.transpose(0, 2, 1), v], axis=1))],
    "llama4": [("feed_forward.experts.gate_up_proj", ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
                _gate_up_shapes(2), _swap_last),
               ("feed_forward.experts.gate_up_proj", ("ffn_gate_up_exps.weight",), _gate_up_shapes(1), _swap_last),
               ("feed_forward.experts.down_proj", ("ffn_down_exps.weight",), _down_shapes, _swap_last)],
    "gpt-oss": [("mlp.experts.gate_up_proj", ("ffn_gate_exps.weight", "ffn_up_exps.weight"), _gate_up_shapes(2),
                 _interleave),
                ("mlp.experts.gate_up_proj_bias", ("ffn_gate_exps.bias", "ffn_up_exps.bias"), _oss_bias_shapes,
                 _interleave),
                ("mlp.experts.down_proj", ("ffn_down_exps.weight",), _down_shapes, _swap_last),
                ("mlp.experts.down_proj_bias", ("ffn_down_exps.bias",),
                 lambda hp: ([(hp["n_expert"], hp["n_embd"])], (hp["n_expert"], hp["n_embd"])), lambda b: b)]}
JOINED["deepseek3"] = JOINED["deepseek2"]
JOINED["granitemoe"] = [
    ("block_sparse_moe.input_linear.weight", ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
     _granite_experts(2, "input"), lambda gate, up: np.concatenate([gate, up], axis=1)),
    ("block_sparse_moe.input_linear.weight", ("ffn_gate_up_exps.weight",), _granite_experts(1, "input"), lambda w: w),
    ("block_sparse_moe.output_linear.weight", ("ffn_down_exps.weight",), _granite_experts(1, "output"), lambda w: w)]
JOINED["granitemoeshared"] = JOINED["granitemoe"] + [
    ("shared_mlp.input_linear.weight", ("ffn_gate_shexp.weight", "ffn_up_shexp.weight"),
     lambda hp: ([(hp["n_ff_shexp"], hp["n_embd"])] * 2, (2 * hp["n_ff_shexp"], hp["n_embd"])),
     lambda gate, up: np.concatenate([gate, up], axis=0))]
_LAYER_WEIGHTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_ATTENTION_WEIGHTS = _LAYER_WEIGHTS[:4]
_FALCON_LAYER_WEIGHTS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                         "mlp.dense_4h_to_h")
_GPT2_LAYER_WEIGHTS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
#: the weights every layer must have, where not llama's (_LAYER_WEIGHTS) or the experts'
_ARCH_LAYER_WEIGHTS = {"phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
                       "starcoder2": _ATTENTION_WEIGHTS + ("mlp.c_fc", "mlp.c_proj"),
                       "phi2": _LAYER_WEIGHTS[:3] + ("self_attn.dense", "mlp.fc1", "mlp.fc2"),
                       "falcon": _FALCON_LAYER_WEIGHTS, "falcon-40b": _FALCON_LAYER_WEIGHTS,
                       "bloom": _FALCON_LAYER_WEIGHTS, "starcoder": _GPT2_LAYER_WEIGHTS, "gpt2": _GPT2_LAYER_WEIGHTS,
                       "gptneox": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                   "mlp.dense_4h_to_h"),
                       "glm4": _ATTENTION_WEIGHTS + ("mlp.gate_up_proj", "mlp.down_proj"),
                       "chatglm": _ATTENTION_WEIGHTS + ("mlp.gate_up_proj", "mlp.down_proj"),
                       "nemotron": _ATTENTION_WEIGHTS + ("mlp.up_proj", "mlp.down_proj"),
                       "apertus": _ATTENTION_WEIGHTS + ("mlp.up_proj", "mlp.down_proj"),
                       "arcee": _ATTENTION_WEIGHTS + ("mlp.up_proj", "mlp.down_proj"),
                       "mpt": ("attn.Wqkv", "attn.out_proj", "ffn.up_proj", "ffn.down_proj")}
#: Phi-3's LongRoPE factors (Phi3MiniModel.generate_extra_tensors): config values, not weights
ROPE_FACTORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def f32(v: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (1e-05, not
    9.999999747378752e-06): what the original config.json said."""
    return float(str(np.float32(v)))


# -- tensor names ---------------------------------------------------------------------------
def global_names(layout: str) -> dict[str, str]:
    """GGUF name -> Hugging Face name of the tensors outside the blocks (without .weight / .bias)."""
    return _ARCH_GLOBAL_NAMES.get(layout, _GLOBAL_NAMES)


def layer_prefix(layout: str) -> str:
    """The Hugging Face name of the blocks, before their index."""
    return _LAYER_PREFIX.get(layout, "model.layers")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor name of layout `arch`, or None if there is none."""
    base, _, kind = gguf_name.rpartition(".")
    glob = global_names(arch).get(base)
    if glob and kind in ("weight", "bias"):
        return f"{glob}.{kind}"
    m = BLOCK_RE.match(gguf_name)
    names = _ARCH_BLOCK_NAMES.get(arch, {})
    part = m and (names.get(m.group(2)) or (None if arch in _LAYER_PREFIX else _BLOCK_NAMES.get(m.group(2))))
    if part and part.endswith("e_score_correction"):  # the converter's e_score_correction_bias
        return f"{layer_prefix(arch)}.{m.group(1)}.{part}_bias"
    if part == "self_attn.sinks":  # gpt-oss's parameter, which GptOssModel.filter_tensors names .weight
        return f"{layer_prefix(arch)}.{m.group(1)}.{part}"
    return f"{layer_prefix(arch)}.{m.group(1)}.{part}.{m.group(3)}" if part else None


def layer_weights(src: GGUFSource, layer: int) -> tuple[str, ...]:
    """The weights layer `layer` must have (without ".weight")."""
    if src.layout in _ARCH_LAYER_WEIGHTS:
        return _ARCH_LAYER_WEIGHTS[src.layout]
    if src.layout not in MOE_ARCHITECTURES:
        return _LAYER_WEIGHTS
    names = _ARCH_BLOCK_NAMES[src.layout]
    if src.layout == "gpt-oss":
        return _ATTENTION_WEIGHTS + ("self_attn.sinks", "mlp.router", "mlp.experts.gate_up_proj",
                                     "mlp.experts.down_proj")
    if src.layout == "llama4":  # llama.cpp: an MoE block on every n_moe_layer_step-th layer
        if (layer + 1) % src.hparams["moe_step"]:
            return _ATTENTION_WEIGHTS + tuple(_LLAMA4_NAMES[k] for k in ("ffn_gate", "ffn_up", "ffn_down"))
        return _ATTENTION_WEIGHTS + tuple(v for k, v in names.items() if k.endswith(("inp", "shexp"))) + (
            "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")
    if src.layout in GRANITE_MOE:
        shared = ("shared_mlp.input_linear", "shared_mlp.output_linear") if src.layout == "granitemoeshared" else ()
        return _ATTENTION_WEIGHTS + ("block_sparse_moe.router.layer", "block_sparse_moe.input_linear",
                                     "block_sparse_moe.output_linear") + shared
    n = src.hparams["n_expert"]
    experts = tuple(name.format(e) for name in EXPERT_NAMES[src.layout].values() for e in range(n))
    if src.layout in ("glm4moe", "dots1", "ernie4_5-moe"):
        if not is_moe_layer(src, layer):
            return _LAYER_WEIGHTS
        shared = tuple(v for k, v in names.items() if k.endswith("shexp")) if src.hparams["n_shared"] else ()
        return _ATTENTION_WEIGHTS + ("mlp.gate",) + shared + experts
    if src.layout in DEEPSEEK:
        hp = src.hparams
        q = ("self_attn.q_a_proj", "self_attn.q_a_layernorm", "self_attn.q_b_proj") if hp["q_lora_rank"] else \
            ("self_attn.q_proj",)
        attn = q + ("self_attn.kv_a_proj_with_mqa", "self_attn.kv_a_layernorm", "self_attn.kv_b_proj",
                    "self_attn.o_proj")
        if layer < hp["n_dense_lead"]:
            return attn + _LAYER_WEIGHTS[4:]
        shared = tuple(v for k, v in names.items() if k.endswith("shexp")) if hp["n_shared"] else ()
        return attn + ("mlp.gate",) + shared + experts
    shared = tuple(v for k, v in names.items() if k.endswith("shexp")) if src.layout in ("qwen2moe", "hunyuan-moe") \
        else ()
    return _ATTENTION_WEIGHTS + (names["ffn_gate_inp"],) + shared + experts


def is_moe_layer(src: GGUFSource, layer: int) -> bool:
    """Whether llama.cpp runs layer `layer` of a model with leading dense layers as an MoE block
    (ERNIE 4.5 MoE: also only every interleave_moe_layer_step-th layer)."""
    hp = src.hparams
    return layer >= hp["n_dense_lead"] and (layer + 1) % hp.get("moe_step", 1) == 0


# -- hyperparameters ------------------------------------------------------------------------
def moe_hparams(src: GGUFSource, hp: dict[str, Any]) -> dict[str, Any]:
    """The expert counts and widths of a mixture of experts."""
    a = src.arch
    if src.layout in GRANITE_MOE and not src.meta(f"{a}.expert_count"):
        raise InputError(f"{src.path}: a granitemoe GGUF without experts (expert_count 0 or none: a dense "
                         "GraniteMoeShared model, its shared_mlp stored as ffn_gate / ffn_up / ffn_down); kbit "
                         "runs Granite MoE models with experts only")
    moe = {"n_expert": int(src.need(f"{a}.expert_count")), "n_expert_used": int(src.need(f"{a}.expert_used_count"))}
    # Mixtral's, OLMoE's, Granite MoE's and Hunyuan MoE's (HunYuanMoEV1's, by its class) experts are n_ff
    # wide; Qwen's as llama.cpp reads them (n_ff / k without
    # the key); Llama 4's dense layers are n_ff wide, its experts and shared expert n_ff_exp
    moe["n_ff_exp"] = hp["n_ff"] if src.layout in ("mixtral", "olmoe", "hunyuan-moe", *GRANITE_MOE) else int(
        src.meta(f"{a}.expert_feed_forward_length", 0) or hp["n_ff"] // moe["n_expert_used"])
    moe["n_ff_shexp"] = int(src.meta(f"{a}.expert_shared_feed_forward_length", 0) or hp["n_ff"])
    if src.layout == "llama4":
        moe.update(n_ff_shexp=moe["n_ff_exp"], moe_step=int(src.need(f"{a}.interleave_moe_layer_step")))
    if src.layout in DEEPSEEK:
        moe.update(_deepseek_hparams(src, hp))
    if src.layout == "ernie4_5-moe":  # ERNIE 4.5: the MoE blocks from leading_dense_block_count on, every step-th
        moe.update(n_dense_lead=int(src.meta(f"{a}.leading_dense_block_count", 0) or 0),
                   moe_step=int(src.need(f"{a}.interleave_moe_layer_step")),
                   n_shared=int(src.meta(f"{a}.expert_shared_count", 0) or 0))
    if src.layout in ("glm4moe", "dots1"):  # the multi-token-prediction layers come after the model's
        nextn = int(src.meta(f"{a}.nextn_predict_layers", 0) or 0)
        moe.update(n_layer=hp["n_layer"] - nextn, n_nextn=nextn,
                   n_dense_lead=int(src.meta(f"{a}.leading_dense_block_count", 0) or 0),
                   n_shared=int(src.meta(f"{a}.expert_shared_count", 0) or 0),
                   weights_norm=bool(src.meta(f"{a}.expert_weights_norm", False)),
                   weights_scale=f32(src.meta(f"{a}.expert_weights_scale", 0.0)) or 1.0)
    if src.layout in DEEPSEEK or src.layout in ("glm4moe", "dots1", "ernie4_5-moe"):
        moe["n_ff_shexp"] = moe["n_ff_exp"] * moe["n_shared"]  # the shared experts as one MLP
    return moe


def _deepseek_hparams(src: GGUFSource, hp: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek's MLA sizes and routing. The converter stores head_count_kv 1, key_length
    kv_lora_rank + qk_rope and value_length kv_lora_rank, the per-head sizes as key_length_mla /
    value_length_mla; files from before llama.cpp's MLA change store the per-head sizes as
    key_length / value_length. No q_lora_rank (or 0): V2-Lite's direct attn_q."""
    a = src.arch
    rope = int(src.need(f"{a}.rope.dimension_count"))
    key = int(src.meta(f"{a}.attention.key_length_mla", 0) or src.need(f"{a}.attention.key_length"))
    value = int(src.meta(f"{a}.attention.value_length_mla", 0) or src.need(f"{a}.attention.value_length"))
    n_group = int(src.meta(f"{a}.expert_group_count", 1) or 1)
    gating = int(src.meta(f"{a}.expert_gating_func", 0) or 1)  # llama.cpp: softmax when not stored
    if gating not in (1, 2):
        raise InputError(f"{src.path}: {a}.expert_gating_func {gating} is neither softmax (1) nor sigmoid (2)")
    if key <= rope:
        raise InputError(f"{src.path}: a {a} key length of {key} leaves nothing beside the {rope} rotated features")
    return {"q_lora_rank": int(src.meta(f"{a}.attention.q_lora_rank", 0) or 0) or None,
            "kv_lora_rank": int(src.need(f"{a}.attention.kv_lora_rank")), "qk_rope": rope, "qk_nope": key - rope,
            "v_head_dim": value, "n_dense_lead": int(src.meta(f"{a}.leading_dense_block_count", 0) or 0),
            "n_shared": int(src.meta(f"{a}.expert_shared_count", 0) or 0), "n_group": n_group,
            "topk_group": int(src.meta(f"{a}.expert_group_used_count", 0) or n_group),
            "sigmoid": gating == 2, "weights_norm": bool(src.meta(f"{a}.expert_weights_norm", False)),
            "weights_scale": f32(src.meta(f"{a}.expert_weights_scale", 0.0)) or 1.0}


def check_hparams(src: GGUFSource, hp: dict[str, Any]) -> None:
    """InputError for what llama.cpp refuses, or would run otherwise than the checkpoint, or a
    checkpoint class cannot hold."""
    a = src.arch
    if src.layout in GROUPED_QKV and (hp["n_head_kv"] < 1 or hp["n_head"] % hp["n_head_kv"]):
        raise InputError(f"{src.path}: {hp['n_head']} attention heads are not groups of {hp['n_head_kv']} "
                         "key/value heads")
    if a == "cohere2" and not src.meta(f"{a}.attention.sliding_window"):  # llama.cpp requires it
        raise InputError(f"{src.path}: the GGUF lacks the metadata '{a}.attention.sliding_window'")
    if a == "starcoder" and hp["n_head_kv"] != 1:  # llama.cpp reads c_attn as all queries, one key, one value
        raise InputError(f"{src.path}: a starcoder GGUF with {hp['n_head_kv']} key/value heads: llama.cpp runs "
                         "GPTBigCode only with multi-query attention (one key/value head)")
    if a == "bloom" and hp["n_ff"] != 4 * hp["n_embd"]:  # BloomConfig has no feed-forward size of its own
        raise InputError(f"{src.path}: a bloom GGUF with a feed-forward of {hp['n_ff']}, not 4 x {hp['n_embd']}")
    if a == "llama4" and (hp["moe_step"] < 1 or src.meta(f"{a}.attention.sliding_window") == 0):
        # sliding_window 0: MobileLLM's layout, which llama.cpp runs with its own rotary settings
        raise InputError(f"{src.path}: a llama4 GGUF with interleave_moe_layer_step {hp['moe_step']} and "
                         f"attention.sliding_window {src.meta(f'{a}.attention.sliding_window')}: only Llama 4's "
                         "chunked attention with an MoE block every step >= 1 layers is supported")
    if a == "mpt":  # MptForCausalLM: ALiBi always, q / k / v of n_head heads each, a whole MLP ratio
        if not src.meta(f"{a}.attention.max_alibi_bias"):
            raise InputError(f"{src.path}: an mpt GGUF without ALiBi (attention.max_alibi_bias 0 or none): "
                             "MptForCausalLM has no other positions")
        if hp["n_head_kv"] != hp["n_head"] or hp["n_ff"] % hp["n_embd"]:
            raise InputError(f"{src.path}: an mpt GGUF with {hp['n_head_kv']} key/value heads for {hp['n_head']} and a "
                             f"feed-forward of {hp['n_ff']} for {hp['n_embd']}: MptForCausalLM has as many key/value "
                             "heads as query heads and a whole expansion_ratio")
    width = src.meta(f"{a}.expert_feed_forward_length")
    if a == "hunyuan-moe" and width is not None and int(width) != hp["n_ff"]:
        raise InputError(f"{src.path}: a hunyuan-moe GGUF with experts {width} wide and a feed-forward of "
                         f"{hp['n_ff']}: HunYuanMoEV1ForCausalLM's experts are intermediate_size wide")
    if a in ("glm4moe", "dots1") and int(src.meta(f"{a}.expert_gating_func", 2) or 2) != 2:  # llama.cpp: sigmoid
        name = {"glm4moe": "GLM-4.5", "dots1": "dots.llm1"}[a]
        raise InputError(f"{src.path}: a {a} GGUF with expert_gating_func {src.meta(f'{a}.expert_gating_func')}: "
                         f"{name}'s router is a sigmoid (2)")
    if src.layout in DEEPSEEK:
        if hp["weights_norm"] and not hp["sigmoid"]:  # transformers' DeepSeek-V2 never renormalises
            raise InputError(f"{src.path}: a softmax-routed {a} GGUF with expert_weights_norm: llama.cpp "
                             "renormalises the top-k weights, DeepSeek-V2's classes do not")
        if src.meta(f"{a}.rope.scaling.type") == "yarn" and src.meta(f"{a}.rope.scaling.yarn_log_multiplier") is None:
            raise InputError(f"{src.path}: a {a} GGUF with YaRN but no rope.scaling.yarn_log_multiplier (the "
                             "checkpoint's mscale_all_dim)")
        return  # the rotary covers qk_rope features of each head by design
    if hp["rope_dims"] is not None and int(hp["rope_dims"]) != hp["head_dim"] and a not in _PARTIAL_ROTARY:
        raise InputError(
            f"{src.path}: partial rotary embeddings ({a}.rope.dimension_count = {hp['rope_dims']}, "
            f"head size {hp['head_dim']}) are not supported for {a}"
        )


def expected_shape(src: GGUFSource, name: str) -> tuple[int, ...] | None:
    """The shape the hyperparameters imply for the Hugging Face tensor `name` (None: unknown)."""
    hp = src.hparams
    e, v, f = hp["n_embd"], hp["n_vocab"], hp["n_ff"]
    q, kv = hp["n_head"] * hp["head_dim"], hp["n_head_kv"] * hp["head_dim"]
    glob = {"token_embd": (v, e), "output": (v, e), "position_embd": (hp["n_ctx"], e)}
    for gguf_base, base in global_names(src.layout).items():
        if name.rpartition(".")[0] == base:  # norms: (e,); a bias: the first dimension
            shape = glob.get(gguf_base, (e,))
            return shape if name.endswith(".weight") else shape[:1]
    suffix = re.sub(r"(experts|norms)\.\d+\.", r"\1.E.", name.split(".", 3)[-1])
    if src.arch in ("olmo2", "olmoe") and suffix in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        return (q,) if suffix.startswith("self_attn.q") else (kv,)  # over all heads of a token
    if src.arch == "command-r" and suffix in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        return (hp["n_head"] if suffix.startswith("self_attn.q") else hp["n_head_kv"], hp["head_dim"])
    if src.layout in DEEPSEEK:
        mla = _deepseek_shapes(hp).get(suffix)
        if mla:
            return mla
    if src.layout in MOE_ARCHITECTURES:
        n, fe, fs = hp["n_expert"], hp["n_ff_exp"], hp["n_ff_shexp"]
        moe = {"block_sparse_moe.gate.weight": (n, e), "mlp.gate.weight": (n, e),
               "block_sparse_moe.experts.E.w1.weight": (fe, e), "block_sparse_moe.experts.E.w3.weight": (fe, e),
               "block_sparse_moe.experts.E.w2.weight": (e, fe), "mlp.experts.E.gate_proj.weight": (fe, e),
               "mlp.experts.E.up_proj.weight": (fe, e), "mlp.experts.E.down_proj.weight": (e, fe),
               "mlp.shared_expert.gate_proj.weight": (fs, e), "mlp.shared_expert.up_proj.weight": (fs, e),
               "mlp.shared_expert.down_proj.weight": (e, fs), "mlp.shared_expert_gate.weight": (1, e),
               "mlp.shared_experts.gate_proj.weight": (fs, e), "mlp.shared_experts.up_proj.weight": (fs, e),
               "mlp.shared_experts.down_proj.weight": (e, fs), "mlp.gate.e_score_correction_bias": (n,),
               "mlp.moe_statics.e_score_correction_bias": (1, n), "block_sparse_moe.router.layer.weight": (n, e),
               "shared_mlp.output_linear.weight": (e, fs), "mlp.gate.wg.weight": (n, e),
               "mlp.shared_mlp.gate_proj.weight": (fs, e), "mlp.shared_mlp.up_proj.weight": (fs, e),
               "mlp.shared_mlp.down_proj.weight": (e, fs),
               "feed_forward.router.weight": (n, e), "feed_forward.shared_expert.gate_proj.weight": (fs, e),
               "feed_forward.shared_expert.up_proj.weight": (fs, e),
               "feed_forward.shared_expert.down_proj.weight": (e, fs), "mlp.router.weight": (n, e),
               "mlp.router.bias": (n,)}
        if suffix in moe:
            return moe[suffix]
    return {
        "self_attn.q_proj.weight": (q, e),
        "self_attn.k_proj.weight": (kv, e),
        "self_attn.v_proj.weight": (kv, e),
        "self_attn.o_proj.weight": (e, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (e,),
        "self_attn.qkv_proj.weight": (q + 2 * kv, e),
        "mlp.gate_up_proj.weight": (2 * f, e),
        "mlp.gate_proj.weight": (f, e),
        "mlp.up_proj.weight": (f, e),
        "mlp.down_proj.weight": (e, f),
        "feed_forward.gate_proj.weight": (f, e),
        "feed_forward.up_proj.weight": (f, e),
        "feed_forward.down_proj.weight": (e, f),
        "self_attn.sinks": (hp["n_head"],),
        "post_self_attn_layernorm.weight": (e,),
        "attention_layernorm.weight": (e,),
        "feedforward_layernorm.weight": (e,),
        "post_mlp_layernorm.weight": (e,),
        "mlp.c_fc.weight": (f, e),
        "mlp.c_proj.weight": (e, f),
        "mlp.c_fc.bias": (f,),
        "mlp.c_proj.bias": (e,),
        "input_layernorm.bias": (e,),
        "post_attention_layernorm.bias": (e,),
        "input_layernorm.weight": (e,),
        "post_attention_layernorm.weight": (e,),
        "pre_feedforward_layernorm.weight": (e,),
        "post_feedforward_layernorm.weight": (e,),
        "self_attn.q_norm.weight": (hp["head_dim"],),
        "self_attn.query_layernorm.weight": (hp["head_dim"],),
        "self_attn.key_layernorm.weight": (hp["head_dim"],),
        "self_attn.k_norm.weight": (hp["head_dim"],),
        "self_attn.q_layernorm.norms.E.weight": (hp["head_dim"],),
        "self_attn.k_layernorm.norms.E.weight": (hp["head_dim"],),
        "self_attn.dense.weight": (e, q),
        "self_attn.dense.bias": (e,),
        "mlp.fc1.weight": (f, e),
        "mlp.fc1.bias": (f,),
        "mlp.fc2.weight": (e, f),
        "mlp.fc2.bias": (e,),
        # the GPT-2-like families' fused q, k, v rows and their output projection
        "attn.c_attn.weight": (q + 2 * kv, e),
        "attn.c_attn.bias": (q + 2 * kv,),
        "attn.c_proj.weight": (e, q),
        "attn.c_proj.bias": (e,),
        "self_attention.query_key_value.weight": (q + 2 * kv, e),
        "self_attention.query_key_value.bias": (q + 2 * kv,),
        "attention.query_key_value.weight": (q + 2 * kv, e),
        "attention.query_key_value.bias": (q + 2 * kv,),
        "self_attention.dense.weight": (e, q),
        "self_attention.dense.bias": (e,),
        "attention.dense.weight": (e, q),
        "attention.dense.bias": (e,),
        "mlp.dense_h_to_4h.weight": (f, e),
        "mlp.dense_h_to_4h.bias": (f,),
        "mlp.dense_4h_to_h.weight": (e, f),
        "mlp.dense_4h_to_h.bias": (e,),
        **{f"{n}.{k}": (e,) for n in ("ln_1", "ln_2", "ln_attn", "ln_mlp", "norm_1", "norm_2")
           for k in ("weight", "bias")},
        # MPT's
        "attn.Wqkv.weight": (q + 2 * kv, e),
        "attn.out_proj.weight": (e, q),
        "ffn.up_proj.weight": (f, e),
        "ffn.down_proj.weight": (e, f),
    }.get(suffix)


def _deepseek_shapes(hp: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes of DeepSeek's attention weights."""
    e, nh, r, rope, v = hp["n_embd"], hp["n_head"], hp["kv_lora_rank"], hp["qk_rope"], hp["v_head_dim"]
    qk = nh * (hp["qk_nope"] + rope)
    shapes = {"self_attn.q_proj.weight": (qk, e), "self_attn.kv_a_proj_with_mqa.weight": (r + rope, e),
              "self_attn.kv_a_layernorm.weight": (r,), "self_attn.kv_b_proj.weight": (nh * (hp["qk_nope"] + v), r),
              "self_attn.o_proj.weight": (e, nh * v)}
    qr = hp["q_lora_rank"]
    if qr:
        shapes.update({"self_attn.q_a_proj.weight": (qr, e), "self_attn.q_a_layernorm.weight": (qr,),
                       "self_attn.q_b_proj.weight": (qk, qr)})
    return shapes


# -- config.json ----------------------------------------------------------------------------
def family_config(src: GGUFSource) -> dict[str, Any]:
    """config.json's sizes and settings, past the class and the token ids, in the family's keys."""
    hp, a = src.hparams, src.arch
    if src.layout in _LAYER_PREFIX:  # the GPT-2-like families, in their own keys
        return _gpt_config(src)
    cfg: dict[str, Any] = {
        "hidden_size": hp["n_embd"],
        "intermediate_size": hp["n_ff"],
        "num_hidden_layers": hp["n_layer"],
        "num_attention_heads": hp["n_head"],
        "num_key_value_heads": hp["n_head_kv"],
        "head_dim": hp["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": hp["rms_eps"],
        "rope_theta": hp["rope_theta"],
        "max_position_embeddings": hp["n_ctx"],
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in src,
        "mlp_bias": False,
    }
    scaling = src.meta(f"{a}.rope.scaling.type")
    factor = src.meta(f"{a}.rope.scaling.factor")
    if scaling and scaling != "none" and factor:
        rs: dict[str, Any] = {"type": scaling, "rope_type": scaling, "factor": float(factor)}
        orig = src.meta(f"{a}.rope.scaling.original_context_length")
        if orig:
            rs["original_max_position_embeddings"] = int(orig)
        cfg["rope_scaling"] = rs
    if a in GEMMA_ARCHITECTURES:
        cfg.update(_gemma_config(src))
    elif a == "phi3":
        cfg.update(_phi3_config(src))
    elif src.layout in DEEPSEEK:
        cfg.update(_deepseek_config(src, cfg.get("rope_scaling")))
    elif a in STACKED_MOE:
        cfg.update(_stacked_moe_config(src, cfg.get("rope_scaling")))
    elif a in ("glm4moe", "dots1"):  # DeepSeek-V3's sigmoid routing
        cfg.update(n_routed_experts=hp["n_expert"], num_experts_per_tok=hp["n_expert_used"],
                   moe_intermediate_size=hp["n_ff_exp"], n_shared_experts=hp["n_shared"],
                   first_k_dense_replace=hp["n_dense_lead"], routed_scaling_factor=hp["weights_scale"],
                   norm_topk_prob=hp["weights_norm"])
        if a == "glm4moe":  # in one group; part of each head rotated
            cfg.update(n_group=1, topk_group=1, use_qk_norm="model.layers.0.self_attn.q_norm.weight" in src,
                       partial_rotary_factor=int(hp["rope_dims"] or hp["head_dim"]) / hp["head_dim"])
        else:  # dots.llm1: the groups TextModel stores; llama.cpp attends over the whole context (no window)
            n_group = int(src.meta(f"{a}.expert_group_count", 1) or 1)
            cfg.update(n_group=n_group, topk_group=int(src.meta(f"{a}.expert_group_used_count", 0) or n_group),
                       sliding_window=None, layer_types=["full_attention"] * hp["n_layer"])
    elif a in ("granite", "granitemoe"):
        # the multipliers llama.cpp stores as scales; without a key, llama.cpp scales by 1 and the
        # attention by 1/sqrt(head_dim)
        cfg.update(embedding_multiplier=f32(src.meta(f"{a}.embedding_scale", 1.0)),
                   residual_multiplier=f32(src.meta(f"{a}.residual_scale", 1.0)),
                   attention_multiplier=f32(src.meta(f"{a}.attention.scale", 0.0)) or hp["head_dim"] ** -0.5,
                   logits_scaling=f32(src.meta(f"{a}.logit_scale", 1.0)))
        if a == "granitemoe":  # the experts are n_ff wide; the shared expert's width is stored
            cfg.update(num_local_experts=hp["n_expert"], num_experts_per_tok=hp["n_expert_used"],
                       shared_intermediate_size=hp["n_ff_shexp"] if src.layout == "granitemoeshared" else 0)
    elif a in ("ernie4_5", "ernie4_5-moe"):  # biases on every projection or on none (use_bias)
        cfg["use_bias"] = cfg["attention_bias"]
        if a == "ernie4_5-moe":  # the MoE blocks from leading_dense_block_count to the last, every step-th
            cfg.update(moe_num_experts=hp["n_expert"], moe_k=hp["n_expert_used"], moe_intermediate_size=hp["n_ff_exp"],
                       moe_num_shared_experts=hp["n_shared"], moe_layer_start_index=hp["n_dense_lead"],
                       moe_layer_end_index=hp["n_layer"] - 1, moe_layer_interval=hp["moe_step"])
    elif a == "hunyuan-moe":  # every layer sparse; the q/k norms; rope_theta: the base HunYuanMoEModel
        # stores, the NTK-alpha one already (as the runner's default rotary with rope_theta * alpha ** ...)
        cfg.update(num_experts=hp["n_expert"], moe_topk=hp["n_expert_used"], moe_intermediate_size=hp["n_ff"],
                   num_shared_expert=int(src.meta(f"{a}.expert_shared_count", 1) or 1), use_qk_norm=True)
    elif src.layout in MOE_ARCHITECTURES:
        cfg.update(_moe_config(src, cfg["attention_bias"]))
    elif a == "arcee":  # llama.cpp's Arcee: the squared-ReLU up / down MLP
        cfg["hidden_act"] = "relu2"
    elif a == "seed_oss":  # q/k/v biases (attention_bias), the output projection's apart
        cfg["attention_out_bias"] = "model.layers.0.self_attn.o_proj.bias" in src
    elif a == "starcoder2":  # LayerNorms; llama.cpp attends over the whole context (no window)
        cfg.update(hidden_act="gelu_pytorch_tanh", use_bias=cfg["attention_bias"], sliding_window=None,
                   norm_epsilon=f32(src.meta(f"{a}.attention.layer_norm_epsilon", 1e-5)))
    elif a in ("command-r", "cohere2", "phi2", "stablelm"):  # LayerNorms
        del cfg["rms_norm_eps"]
        cfg.update(_cohere_config(src) if a in ("command-r", "cohere2") else _stablelm_config(src))
    elif a in ("glm4", "chatglm"):  # the rotary on the first rope.dimension_count features of each head
        cfg["partial_rotary_factor"] = int(hp["rope_dims"] or hp["head_dim"]) / hp["head_dim"]
    elif a == "exaone4":  # a window on the layers attention.sliding_window_pattern marks, if any
        window = src.meta(f"{a}.attention.sliding_window")
        cfg["sliding_window"] = int(window) if window else None
        cfg["layer_types"] = ["sliding_attention" if window and s else "full_attention" for s in _sliding(src)]
    elif a in ("olmo", "nemotron"):  # LayerNorms: OLMo's without weights (eps 1e-5), Nemotron's LayerNorm1P
        del cfg["rms_norm_eps"]
        if a == "olmo":
            clip = src.meta(f"{a}.attention.clamp_kqv")
            cfg["clip_qkv"] = f32(clip) if clip else None
        else:  # llama.cpp's Nemotron: squared ReLU, the rotary on part of each head
            cfg.update(norm_eps=hp["norm_eps"], hidden_act="relu2",
                       partial_rotary_factor=int(hp["rope_dims"] or hp["head_dim"]) / hp["head_dim"])
    elif a == "apertus":
        cfg.update(hidden_act="xielu", rope_scaling=llama3_rope(src))
    elif a == "smollm3":  # llama.cpp: no rotary on every 4th layer (n_no_rope_layer_step), no window
        cfg.update(no_rope_layer_interval=4, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(hp["n_layer"])],
                   use_sliding_window=False)
    if src.rope_freqs is not None and (cfg.get("rope_scaling") or {}).get("rope_type") != "llama3":
        if cfg.get("rope_scaling"):
            raise InputError(f"{src.path}: the GGUF has both rope_freqs (llama3 scaling) and a "
                             f"{cfg['rope_scaling']['rope_type']} RoPE scaling in its metadata; kbit cannot tell "
                             "which the checkpoint used")
        cfg["rope_scaling"] = llama3_rope(src)  # Llama 3.1-3.3, EXAONE 4, ...
    return cfg


def _cohere_config(src: GGUFSource) -> dict[str, Any]:
    """Cohere's LayerNorm epsilon and logit scale (llama.cpp scales by 1 without one), Command R+'s
    q/k norms, and Cohere 2's window, on the layers attention.sliding_window_pattern marks (a
    list, or every n-th layer full) or, llama.cpp's default, on three of every four."""
    a, hp = src.arch, src.hparams
    cfg: dict[str, Any] = {"layer_norm_eps": hp["norm_eps"],
                           "logit_scale": f32(src.meta(f"{a}.logit_scale", 0.0)) or 1.0}
    if a == "command-r":
        cfg["use_qk_norm"] = "model.layers.0.self_attn.q_norm.weight" in src
        return cfg
    cfg.update(sliding_window=int(src.meta(f"{a}.attention.sliding_window")),
               layer_types=["sliding_attention" if s else "full_attention" for s in _sliding(src)])
    return cfg


def _sliding(src: GGUFSource) -> list[bool]:
    """Which layers slide: attention.sliding_window_pattern, a list or every n-th layer full, or by
    default (llama.cpp's Cohere 2 and EXAONE 4) three of every four."""
    a, n = src.arch, src.hparams["n_layer"]
    pattern = src.meta(f"{a}.attention.sliding_window_pattern", 4)
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise InputError(f"{src.path}: {a}.attention.sliding_window_pattern has {len(pattern)} entries for "
                             f"{n} layers")
        return [bool(p) for p in pattern]
    every = int(pattern)  # llama_hparams::set_swa_pattern: the last layer of every `pattern` is full (0: all slide)
    return [every == 0 or i % every < every - 1 for i in range(n)]


#: the llama3 RoPE scaling of the checkpoints (Llama 4 Scout's; ApertusConfig's defaults), which
#: llama.cpp's converter stores only as the factors rope_freqs (LlamaModel.generate_extra_tensors)
LLAMA3_SETTINGS = {"llama4": {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                              "original_max_position_embeddings": 8192},
                   "apertus": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}


def _llama3_factors(theta: float, dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: int) -> np.ndarray:
    """What the llama3 RoPE scaling divides each rotary frequency by (the factors llama.cpp's
    converter stores as rope_freqs): 1 below a wavelength of context / high_freq_factor, `factor`
    above context / low_freq_factor, a smooth blend between."""
    freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freq
    ctx = original_max_position_embeddings
    with np.errstate(divide="ignore", invalid="ignore"):  # no blend when the two factors are equal
        smooth = (ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blend = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < ctx / high_freq_factor, 1.0, np.where(wavelen > ctx / low_freq_factor, factor, blend))


#: the llama3 settings tried for the other families' rope_freqs (Llama 3.1 / 3.3: factor 8, 3.2:
#: factor 32, EXAONE 4: 16, all with low 1, high 4 and a context of 8192); the factor itself is
#: read from the largest stored value, and any of these thresholds that reproduces every stored
#: factor gives the same rotary
_LLAMA3_LOW, _LLAMA3_HIGH = (1.0, 2.0), (1.0, 2.0, 4.0, 8.0)
_LLAMA3_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def llama3_rope(src: GGUFSource) -> dict[str, Any]:
    """The RoPE of a file whose llama3 scaling llama.cpp's converter stored only as the factors
    rope_freqs: the settings that give exactly those factors (a family with known settings,
    LLAMA3_SETTINGS: those; else the factor from the largest value and the thresholds searched),
    an InputError when none does (the checkpoint's RoPE cannot be told from them); without
    rope_freqs, no scaling."""
    a, hp = src.arch, src.hparams
    base = {"rope_theta": hp["rope_theta"]}
    if src.rope_freqs is None:
        return {**base, "rope_type": "default"}
    dim, freqs = int(hp["rope_dims"] or hp["head_dim"]), src.rope_freqs
    if a in LLAMA3_SETTINGS:
        candidates = [LLAMA3_SETTINGS[a]]
    else:
        top = float(freqs.max()) if freqs.size else 1.0  # the factor, rounded to float32 in the file
        candidates = [{"factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
                       "original_max_position_embeddings": ctx}
                      for factor in dict.fromkeys((round(top, 3), top))
                      for ctx in _LLAMA3_CONTEXTS for lo in _LLAMA3_LOW for hi in _LLAMA3_HIGH if hi >= lo]
    for settings in candidates:
        want = _llama3_factors(hp["rope_theta"], dim, **settings)
        if freqs.shape == want.shape and np.allclose(freqs, want, rtol=1e-6, atol=0):
            return {**base, "rope_type": "llama3", **settings}
    what = f"the llama3 factors of {candidates[0]}" if a in LLAMA3_SETTINGS else "llama3 factors kbit can rebuild"
    raise InputError(f"{src.path}: this {a} GGUF's rope_freqs are not {what}: the checkpoint's RoPE scaling "
                     "cannot be told from them")


def _stacked_moe_config(src: GGUFSource, rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    """Llama 4's and gpt-oss's experts and what llama.cpp fixes for them. Llama 4 (llama-model.cpp):
    an MoE block every interleave_moe_layer_step-th layer, the rotary on three of every four layers,
    which attend in chunks of 8192 positions, the others with attention temperature tuning (floor
    8192, scale 0.1), and the L2 q/k norm except on the 128-expert model (Maverick). gpt-oss: every
    other layer slides, starting with the first; its clamped SwiGLU (limit 7); its YaRN as the
    checkpoints set it (without truncation of the correction range)."""
    a, hp = src.arch, src.hparams
    n, k = hp["n_expert"], hp["n_expert_used"]
    if a == "llama4":
        step, rope = hp["moe_step"], [int((i + 1) % 4 != 0) for i in range(hp["n_layer"])]
        return {"intermediate_size": hp["n_ff_exp"], "intermediate_size_mlp": hp["n_ff"], "num_local_experts": n,
                "num_experts_per_tok": k, "interleave_moe_layer_step": step,
                "moe_layers": [i for i in range(hp["n_layer"]) if (i + 1) % step == 0],
                "no_rope_layers": rope, "no_rope_layer_interval": 4, "use_qk_norm": n != 128,
                "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
                "layer_types": ["chunked_attention" if r else "full_attention" for r in rope],
                "rope_scaling": llama3_rope(src)}
    rs: dict[str, Any] = {"rope_type": "default", "rope_theta": hp["rope_theta"]}
    if rope_scaling and rope_scaling["type"] == "yarn":
        rs = {**rope_scaling, "rope_theta": hp["rope_theta"], "truncate": False,
              "beta_fast": f32(src.meta(f"{a}.rope.scaling.yarn_beta_fast", 32.0)),
              "beta_slow": f32(src.meta(f"{a}.rope.scaling.yarn_beta_slow", 1.0))}
    return {"num_local_experts": n, "num_experts_per_tok": k, "intermediate_size": hp["n_ff_exp"],
            "sliding_window": int(src.need(f"{a}.attention.sliding_window")),
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hp["n_layer"])],
            "swiglu_limit": 7.0, "rope_scaling": rs}


def _stablelm_config(src: GGUFSource) -> dict[str, Any]:
    """StableLM's and Phi's LayerNorm epsilon and partial rotary; for StableLM what the tensors
    tell, as llama.cpp's graph reads them: q/k/v biases, per-head q/k norms, and a parallel
    block when the layers have no ffn_norm (post_attention_layernorm)."""
    a, hp = src.arch, src.hparams
    cfg: dict[str, Any] = {"layer_norm_eps": hp["norm_eps"],
                           "partial_rotary_factor": int(hp["rope_dims"] or hp["head_dim"]) / hp["head_dim"]}
    if a == "phi2":
        return {**cfg, "hidden_act": "gelu_new", "qk_layernorm": False}
    layer = "model.layers.0."
    return {**cfg, "use_qkv_bias": f"{layer}self_attn.q_proj.bias" in src,
            "qk_layernorm": f"{layer}self_attn.q_layernorm.norms.0.weight" in src,
            "use_parallel_residual": f"{layer}post_attention_layernorm.weight" not in src}


def _gpt_config(src: GGUFSource) -> dict[str, Any]:
    """config.json's sizes and settings for the GPT-2-like families, in their own keys, with what
    llama.cpp fixes: GPT-2's and StarCoder's GELUs (tanh), multi-query StarCoder, GPT-NeoX's GELU
    and its parallel residual (use_parallel_residual), and Falcon's layout from its key/value
    heads and norms."""
    a, hp = src.arch, src.hparams
    e, eps = hp["n_embd"], hp["norm_eps"]
    if a in ("gpt2", "starcoder"):
        cfg: dict[str, Any] = {"n_embd": e, "n_layer": hp["n_layer"], "n_head": hp["n_head"],
                               "n_positions": hp["n_ctx"], "n_inner": hp["n_ff"], "layer_norm_epsilon": eps}
        if a == "gpt2":
            return {**cfg, "activation_function": "gelu_new"}
        return {**cfg, "activation_function": "gelu_pytorch_tanh", "multi_query": True}
    if a == "bloom":
        return {"hidden_size": e, "n_layer": hp["n_layer"], "n_head": hp["n_head"], "layer_norm_epsilon": eps}
    if a == "mpt":  # ALiBi (MptForCausalLM has no other positions), biases when the file has them
        clip = src.meta(f"{a}.attention.clamp_kqv")
        return {"d_model": e, "n_heads": hp["n_head"], "n_layers": hp["n_layer"], "expansion_ratio": hp["n_ff"] // e,
                "max_seq_len": hp["n_ctx"], "layer_norm_epsilon": eps,
                "no_bias": "transformer.blocks.0.attn.Wqkv.bias" not in src,
                "attn_config": {"alibi": True, "alibi_bias_max": f32(src.meta(f"{a}.attention.max_alibi_bias")),
                                "clip_qkv": f32(clip) if clip else None}}
    cfg = {"hidden_size": e, "num_hidden_layers": hp["n_layer"], "num_attention_heads": hp["n_head"],
           "max_position_embeddings": hp["n_ctx"], "rope_theta": hp["rope_theta"]}
    if a == "gptneox":
        return {**cfg, "intermediate_size": hp["n_ff"], "hidden_act": "gelu", "layer_norm_eps": eps,
                "partial_rotary_factor": int(hp["rope_dims"] or hp["head_dim"]) / hp["head_dim"],
                "use_parallel_residual": bool(src.meta(f"{a}.use_parallel_residual", True)),
                "attention_bias": "gpt_neox.layers.0.attention.query_key_value.bias" in src}
    # Falcon, always parallel: 7B (one key/value head, one norm), 40B / 180B (key/value groups, two
    # norms: the falcon-40b layout), 11B (groups, one norm)
    nkv = hp["n_head_kv"]
    new = src.layout == "falcon-40b" or nkv > 1
    cfg.update(new_decoder_architecture=new, parallel_attn=True, bias=False, alibi=False,
               ffn_hidden_size=hp["n_ff"], activation="gelu", layer_norm_epsilon=eps)
    if new:
        cfg.update(num_kv_heads=nkv, num_ln_in_parallel_attn=2 if src.layout == "falcon-40b" else 1)
    else:
        cfg["multi_query"] = True
    return cfg


def _deepseek_config(src: GGUFSource, rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    """DeepSeek's MLA sizes, its dense leading layers and its routing, in DeepseekV2Config's /
    DeepseekV3Config's keys. llama.cpp's YaRN keeps the rotary's cos / sin unscaled and scales the
    softmax by the square of (1 + yarn_log_multiplier * ln factor), the converter's
    0.1 * mscale_all_dim: the checkpoint's mscale_all_dim, with mscale equal to it."""
    a, hp = src.arch, src.hparams
    cfg: dict[str, Any] = {
        "num_key_value_heads": hp["n_head"], "head_dim": hp["qk_rope"], "attention_bias": False,
        "q_lora_rank": hp["q_lora_rank"], "kv_lora_rank": hp["kv_lora_rank"], "qk_nope_head_dim": hp["qk_nope"],
        "qk_rope_head_dim": hp["qk_rope"], "v_head_dim": hp["v_head_dim"],
        "n_routed_experts": hp["n_expert"], "num_experts_per_tok": hp["n_expert_used"],
        "moe_intermediate_size": hp["n_ff_exp"], "n_shared_experts": hp["n_shared"],
        "first_k_dense_replace": hp["n_dense_lead"], "moe_layer_freq": 1,
        "routed_scaling_factor": hp["weights_scale"], "norm_topk_prob": hp["weights_norm"],
        "n_group": hp["n_group"], "topk_group": hp["topk_group"]}
    if hp["sigmoid"]:  # llama.cpp's graph turns adjacent pairs, as V3's rope_interleave does
        cfg.update(scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True)
    else:
        cfg.update(scoring_func="softmax", topk_method="group_limited_greedy" if hp["n_group"] > 1 else "greedy")
    if rope_scaling and rope_scaling["type"] == "yarn":
        # 0.1 * mscale_all_dim: the stored value's shortest decimal, shifted (0.08 -> 0.8)
        mscale = float(Decimal(str(f32(src.meta(f"{a}.rope.scaling.yarn_log_multiplier")))).scaleb(1))
        cfg["rope_scaling"] = {**rope_scaling, "mscale": mscale, "mscale_all_dim": mscale,
                               "beta_fast": f32(src.meta(f"{a}.rope.scaling.yarn_beta_fast", 32.0)),
                               "beta_slow": f32(src.meta(f"{a}.rope.scaling.yarn_beta_slow", 1.0))}
    return cfg


def _moe_config(src: GGUFSource, bias: bool) -> dict[str, Any]:
    """The expert counts and widths; how llama.cpp routes: every layer sparse, the top-k weights
    renormalised for Mixtral and Qwen3-MoE but not Qwen2-MoE (build_moe_ffn's norm_w)."""
    hp = src.hparams
    if src.layout == "mixtral":
        return {"num_local_experts": hp["n_expert"], "num_experts_per_tok": hp["n_expert_used"],
                "sliding_window": None}
    if src.layout == "olmoe":  # llama.cpp's OLMoE never renormalises
        return {"num_experts": hp["n_expert"], "num_experts_per_tok": hp["n_expert_used"], "norm_topk_prob": False}
    cfg: dict[str, Any] = {"num_experts": hp["n_expert"], "num_experts_per_tok": hp["n_expert_used"],
                           "moe_intermediate_size": hp["n_ff_exp"], "norm_topk_prob": src.layout == "qwen3moe",
                           "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}
    if src.layout == "qwen2moe":
        # Qwen2MoeConfig: biases on q, k, v (qkv_bias), none on o_proj
        cfg.update(shared_expert_intermediate_size=hp["n_ff_shexp"], qkv_bias=bias, attention_bias=False)
    return cfg


def _gemma_config(src: GGUFSource) -> dict[str, Any]:
    """What Gemma adds to config.json: the GELU, and for Gemma 2 and 3 the attention scale, the
    soft-capping and which layers slide, as llama.cpp's llama-model.cpp reads or fixes them."""
    a, hp = src.arch, src.hparams
    cfg: dict[str, Any] = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
    if a == "gemma":
        return cfg
    # the scores are scaled by 1/sqrt(head_dim), but by 1/sqrt(n_embd / n_head) for the 27B
    # models, which llama.cpp tells by their layer count
    big = hp["n_layer"] == {"gemma2": 46, "gemma3": 62}[a]
    cfg["query_pre_attn_scalar"] = hp["n_embd"] // hp["n_head"] if big else hp["head_dim"]
    window = src.meta(f"{a}.attention.sliding_window")
    final_cap = src.meta(f"{a}.final_logit_softcapping")
    if a == "gemma2":  # llama.cpp's defaults: a window of 4096, caps 50 and 30; every other layer slides
        window = 4096 if window is None else window
        cfg["attn_logit_softcapping"] = f32(src.meta(f"{a}.attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = f32(30.0 if final_cap is None else final_cap)
        every = 2
    else:  # Gemma 3: five of every six layers slide, with a RoPE base of 10000; none without a window
        cfg["attn_logit_softcapping"] = None
        cfg["final_logit_softcapping"] = f32(final_cap) if final_cap else None
        cfg["rope_local_base_freq"] = 10000.0
        every = 6 if window else 0
    cfg["sliding_window"] = int(window) if window else None
    cfg["layer_types"] = ["sliding_attention" if every and (i + 1) % every else "full_attention"
                          for i in range(hp["n_layer"])]
    return cfg


def _phi3_config(src: GGUFSource) -> dict[str, Any]:
    """What Phi-3 adds to config.json: partial rotary embeddings, the sliding window (llama.cpp's
    converter writes 0 for none) and LongRoPE (the factors from their tensors)."""
    a, hp = src.arch, src.hparams
    cfg: dict[str, Any] = {}
    if hp["rope_dims"] is not None and int(hp["rope_dims"]) != hp["head_dim"]:
        cfg["partial_rotary_factor"] = int(hp["rope_dims"]) / hp["head_dim"]
    window = src.meta(f"{a}.attention.sliding_window")
    cfg["sliding_window"] = int(window) if window else None
    orig = src.meta(f"{a}.rope.scaling.original_context_length")
    if orig:
        cfg["original_max_position_embeddings"] = int(orig)
    if src.rope_factors:
        rs = {"type": "longrope", "rope_type": "longrope", **src.rope_factors}
        attn = src.meta(f"{a}.rope.scaling.attn_factor")
        if attn is not None:
            rs["attention_factor"] = f32(attn)
        cfg["rope_scaling"] = rs
    return cfg
