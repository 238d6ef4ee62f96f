"""GGUF files (llama.cpp), read with the `gguf` package and turned back into Hugging Face form.

* Tensors are dequantized one at a time (gguf.quants.dequantize handles every ggml type) and
  renamed to Hugging Face names. GGUF lists dimensions in ggml order (innermost first); the
  numpy array the reader gives is already in row-major Hugging Face order, and every shape is
  checked against what the architecture expects.
* llama.cpp's converter permutes the rows of attn_q / attn_k (weights and biases) so that rotary
  pairs sit next to each other; `load` and `load_raw` undo it.
* It adds 1 to every Gemma and Nemotron norm weight (their norms scale by 1 + weight, llama.cpp's
  by the weight); `load` and `load_raw` subtract it again (those tensors read as float32).
* It splits DeepSeek's kv_b_proj into attn_k_b / attn_v_b (newer files), transposes and splits
  the stacked experts of Llama 4 and gpt-oss, and splits Granite MoE's gate / up rows; `load` and
  `load_raw` put them back together (gguf_archs.JOINED).
* Apertus's xIELU scalars, which it stores as metadata, are listed as tensors of their values.
* config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json and
  generation_config.json are rebuilt from the GGUF metadata.

What llama.cpp does per architecture (the tensor names, what its converter rearranged, the
config.json settings) is in gguf_archs.py, with how to add an architecture; this module reads the
file and applies it.
Supported tokenizers: byte-level BPE (tokenizer.ggml.model = "gpt2") and SentencePiece BPE ("llama").
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from kbitcli.errors import InputError, UnsupportedArchitectureError
from kbitcli.sources import gguf_archs as archs
from kbitcli.sources._base import BaseSource, SourceTensor

_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_INT_TYPES = {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's LlamaModel.permute for attn_q (n_head) / attn_k (n_head_kv), weight or bias.

    llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise InputError(f"cannot un-permute a tensor with {rows} rows for {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=4)
def checkpoint_qkv_rows(rows: int, n_head: int, n_kv: int) -> np.ndarray:
    """Undo the regrouping of query_key_value llama.cpp's converter does for Falcon, BLOOM and
    GPT-NeoX: for each row of the checkpoint's tensor, the GGUF row that holds it.

    The checkpoint's rows go per group of query heads sharing a key/value head: the group's
    n_head / n_kv queries, its key, its value (n_kv = n_head: q, k, v of each head in turn); the
    GGUF's are all queries, all keys, all values."""
    hd = rows // (n_head + 2 * n_kv)
    q = np.arange(n_head * hd).reshape(n_kv, n_head // n_kv, hd)
    k = n_head * hd + np.arange(n_kv * hd).reshape(n_kv, 1, hd)
    return np.concatenate([q, k, k + n_kv * hd], axis=1).ravel()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (Hugging Face -> GGUF); the inverse of unpermute_qk."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclasses.dataclass
class _Value:
    """A value from the metadata, listed as a tensor: what _add needs of a GGUF tensor."""
    name: str
    tensor_type: Any


class GGUFSource(BaseSource):
    kind = "gguf"

    def __init__(self, path: Path) -> None:
        super().__init__(path, None)
        try:
            import gguf
        except ImportError:  # pragma: no cover - a dependency
            raise InputError("reading GGUF files needs the 'gguf' package (run scripts/setup.sh)") from None
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except (ValueError, IndexError, OSError, KeyError, TypeError) as e:
            raise InputError(f"{path} is not a valid GGUF file, or it is truncated ({e})") from None
        r = self.reader
        # The reader keeps several numpy objects per metadata string (~1.5 KB per token of the
        # vocabulary): copy the metadata out as plain Python values and let those go.
        self._metadata: dict[str, Any] = {}
        self._bad_meta: dict[str, str] = {}
        for key, field in r.fields.items():
            try:
                self._metadata[key] = field.contents()
            except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:
                self._bad_meta[key] = str(e)
        r.fields.clear()
        self.arch = self._meta_str("general.architecture")
        if self.arch not in archs.SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{path}: GGUF architecture {self.arch!r} is not supported; supported: "
                + ", ".join(archs.SUPPORTED_ARCHITECTURES)
            )
        if int(self.meta("split.count", 1) or 1) > 1:
            raise InputError(
                f"{path} is one part of a split GGUF ({self.meta('split.count')} parts); merge the parts "
                "first with llama.cpp's `llama-gguf-split --merge`"
            )
        experts = int(self.meta(f"{self.arch}.expert_count", 0) or 0)
        #: the layout: the GGUF architecture, "mixtral" for a "llama" one with experts, "deepseek3" for
        #: a deepseek2 one with a sigmoid router (expert_gating_func 2), "granitemoeshared" for a
        #: granitemoe one with a shared expert
        self.layout = "mixtral" if self.arch == "llama" and experts else self.arch
        if self.arch == "deepseek2" and self.meta("deepseek2.expert_gating_func") == 2:
            self.layout = "deepseek3"
        if self.arch == "granitemoe" and self.meta("granitemoe.expert_shared_feed_forward_length"):
            self.layout = "granitemoeshared"  # llama.cpp reads the shared expert when its width is stored
        if self.arch == "chatglm" and any(t.name == "blk.0.attn_qkv.weight" for t in r.tensors):
            raise UnsupportedArchitectureError(
                f"{path} is a ChatGLM model in THUDM's own layout (one attn_qkv; ChatGLMForConditionalGeneration, "
                "trust_remote_code); only GLM-4's Hugging Face layout (GlmForCausalLM: attn_q / attn_k / attn_v) "
                "is supported")
        if self.arch == "falcon" and any(t.name == "blk.0.attn_norm_2.weight" for t in r.tensors):
            self.layout = "falcon-40b"  # a norm for the attention and one for the MLP
        if experts and self.layout not in archs.MOE_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{path} is a mixture-of-experts {self.arch} model ({self.arch}.expert_count = {experts}); "
                "the supported mixtures of experts are Mixtral (llama), "
                + ", ".join(m for m in archs.MOE_ARCHITECTURES[1:] if m in archs.SUPPORTED_ARCHITECTURES)
            )
        self.hparams = self._hparams()
        self._by_name: dict[str, tuple[Any, np.ndarray]] = {}  # name -> (GGUF tensor, its data)
        self._permute: dict[str, int] = {}
        self._grouped: set[str] = set()  # query_key_value rows to put back in the checkpoint's order
        self._transposed: set[str] = set()
        self._shifted: set[str] = set()
        self._as_float32: set[str] = set()  # listed as float32: values computed from the file's
        #: the tensors rebuilt from several GGUF tensors (archs.JOINED): name -> (the GGUF tensors,
        #: their shapes, join)
        self._joined: dict[str, tuple[list[Any], list[tuple[int, ...]], Any]] = {}
        joined = archs.JOINED.get(self.layout, [])
        joined_parts = {part for _, parts, _, _ in joined for part in parts}
        collected: dict[str, dict[str, Any]] = {}  # block -> {GGUF part: tensor}
        mtp: set[int] = set()
        #: Phi-3's LongRoPE factors, read from their tensors: "long_factor" / "short_factor" -> values
        self.rope_factors: dict[str, list[float]] = {}
        #: rope_freqs (llama.cpp's llama3 scaling factors), read back into rope_scaling (archs.llama3_rope)
        self.rope_freqs: np.ndarray | None = None
        hp = self.hparams
        for t in r.tensors:
            if t.name in archs.ROPE_FACTORS and self.arch == "phi3":
                factors = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
                self.rope_factors[archs.ROPE_FACTORS[t.name]] = [archs.f32(v) for v in factors]
                continue
            if t.name == "rope_freqs.weight":
                self.rope_freqs = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
                continue
            ttype = t.tensor_type.name
            dtype = _FLOAT_TYPES.get(ttype) or _INT_TYPES.get(ttype) or ttype
            shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
            block = re.match(r"blk\.(\d+)\.", t.name)
            if hp.get("n_nextn") and block and int(block.group(1)) >= hp["n_layer"]:
                mtp.add(int(block.group(1)))  # GLM-4.5's multi-token-prediction layers: not the model's
                continue
            m = archs.BLOCK_RE.match(t.name)
            if m and f"{m.group(2)}.{m.group(3)}" in joined_parts:
                collected.setdefault(m.group(1), {})[f"{m.group(2)}.{m.group(3)}"] = t
                continue
            experts = archs.EXPERT_NAMES.get(self.layout, {})
            expert = experts.get(m.group(2)) if m else None
            if m and m.group(2) == archs.FUSED_EXPERTS and experts:  # each expert's gate rows, then its up rows
                self._add_experts(t, m, shape, dtype, (experts["ffn_gate_exps"], experts["ffn_up_exps"]))
                continue
            if expert:  # [expert, rows, columns]: each expert a 2-D view of its slice of the file
                self._add_experts(t, m, shape, dtype, (expert,))
                continue
            old = archs.PER_EXPERT_RE.match(t.name) if self.layout == "mixtral" else None
            if old:  # an older Mixtral file's expert, as its own tensor
                if int(old.group(3)) >= hp["n_expert"]:
                    raise InputError(f"{path}: GGUF tensor {t.name!r} is an expert beyond the {hp['n_expert']} "
                                     "the metadata implies")
                name = experts[f"{old.group(2)}_exps"].format(int(old.group(3)))
                self._add(t, f"model.layers.{old.group(1)}.{name}.weight", shape, dtype, int(t.n_bytes), t.data)
                continue
            split = archs.SPLIT.get(self.layout, {}).get(m.group(2)) if m else None
            if split:
                self._add_rows(t, m, split(hp), shape, dtype)
                continue
            name = archs.hf_name(t.name, self.layout)
            if name is None:
                raise InputError(f"{path}: GGUF tensor {t.name!r} has no Hugging Face {self.layout} counterpart")
            nbytes = int(t.n_bytes)
            if self.arch in archs.SHIFTED_NORMS and name.endswith("norm.weight"):
                self._shifted.add(name)
                self._as_float32.add(name)
                dtype, nbytes = "float32", 4 * int(np.prod(shape))  # the shifted values, computed in float32
            if name.endswith("shared_expert_gate.weight") and shape == (hp["n_embd"],):
                shape = (1, hp["n_embd"])  # llama.cpp stores Qwen2-MoE's [1, hidden] gate as a vector
            if self.layout in archs.PERMUTED_QK and ".attn_q." in t.name:
                self._permute[name] = hp["n_head"]
            elif self.layout in archs.PERMUTED_QK and ".attn_k." in t.name:
                self._permute[name] = hp["n_head_kv"]
            if self.layout in archs.GROUPED_QKV and ".attn_qkv." in t.name:
                self._grouped.add(name)
            transposed = (m is not None and m.group(3) == "weight"
                          and m.group(2) in archs.TRANSPOSED.get(self.layout, ()))
            self._add(t, name, shape, dtype, nbytes, t.data, transposed)
        for layer, parts in collected.items():
            self._add_joined(layer, parts, joined)
        if self.arch == "apertus":
            self._add_xielu()
        if mtp:
            span = f"blk.{min(mtp)}" + (f" to blk.{max(mtp)}" if len(mtp) > 1 else "")
            self.warnings.append(f"the multi-token-prediction layers ({span}) were skipped: "
                                 f"{archs.HF_ARCH[self.layout][1]} does not run them")
        if archs.global_names(self.layout)["token_embd"] + ".weight" not in self._infos:
            raise InputError(f"{path}: the GGUF has no token_embd.weight")
        if len(self.rope_factors) == 1:
            raise InputError(f"{path}: the GGUF has only one of rope_factors_long / rope_factors_short")
        prefix = archs.layer_prefix(self.layout)
        for i in range(hp["n_layer"]):
            for part in archs.layer_weights(self, i):  # a stacked expert tensor or a sink: no .weight
                if f"{prefix}.{i}.{part}.weight" not in self._infos and f"{prefix}.{i}.{part}" not in self._infos:
                    raise InputError(f"{path}: the GGUF lacks the weight for {prefix}.{i}.{part}")

    def _add(self, t: Any, name: str, shape: tuple[int, ...], dtype: str, nbytes: int, data: np.ndarray,
             transposed: bool = False) -> None:
        """List the tensor `name`, read from `data` (the GGUF tensor t's data, or a slice of it);
        `transposed`: the file holds its transpose, [out, in] (GPT-2's Conv1D weights)."""
        want = archs.expected_shape(self, name)  # for a Conv1D weight: as nn.Linear's, the file's
        if want is not None and shape != want:
            raise InputError(f"{self.path}: GGUF tensor {t.name!r} ({name}) has shape {list(shape)} but the "
                             f"metadata implies {list(want)}")
        if transposed:
            self._transposed.add(name)
            shape = shape[::-1]
            if dtype not in _FLOAT_TYPES.values():  # quantized blocks cannot be transposed: float32 values
                dtype, nbytes = "float32", 4 * int(np.prod(shape))
                self._as_float32.add(name)
        if name in self._infos:
            raise InputError(f"{self.path}: tensor {t.name!r} appears twice")
        self._infos[name] = SourceTensor(name, shape, dtype, nbytes)
        self._by_name[name] = (t, data)

    def _add_experts(self, t: Any, m: re.Match, shape: tuple[int, ...], dtype: str, names: tuple[str, ...]) -> None:
        """List the stacked experts t ([expert, rows, columns]) of block m, each expert's rows split
        evenly among `names` (the Hugging Face names of expert {}), each a 2-D view of its slice."""
        n, k = self.hparams["n_expert"], len(names)
        if len(shape) != 3 or shape[0] != n or shape[1] % k:
            raise InputError(f"{self.path}: GGUF tensor {t.name!r} has shape {list(shape)}, not the {n} stacked "
                             "experts the metadata implies")
        rows = shape[1] // k
        for e in range(n):
            for j, name in enumerate(names):
                self._add(t, f"model.layers.{m.group(1)}.{name.format(e)}.{m.group(3)}", (rows, shape[2]), dtype,
                          int(t.n_bytes) // n // k, t.data[e][j * rows:(j + 1) * rows])

    def _add_joined(self, layer: str, parts: dict[str, Any], specs: list) -> None:
        """List the tensors of block `layer` rebuilt from its GGUF `parts` ({"attn_k_b.weight": tensor,
        ...}) as archs.JOINED `specs` say. Their dtype is the parts' when all hold the same float
        type (the join only moves values), float32 otherwise (the dequantized values: MXFP4 ...)."""
        left = dict(parts)
        for suffix, names, shapes, join in specs:
            present = [n for n in names if n in left]
            if not present:
                continue
            if len(present) < len(names):
                have = ", ".join(n.removesuffix(".weight") for n in names if n in left)
                lack = ", ".join(n.removesuffix(".weight") for n in names if n not in left)
                raise InputError(f"{self.path}: block {layer} has {have} without {lack}")
            tensors = [left.pop(n) for n in names]
            part_shapes, shape = shapes(self.hparams)
            for t, want in zip(tensors, part_shapes):
                got = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
                if got != tuple(want):
                    raise InputError(f"{self.path}: GGUF tensor {t.name!r} has shape {list(got)} but the metadata "
                                     f"implies {list(want)}")
            name = f"{archs.layer_prefix(self.layout)}.{layer}.{suffix}"
            types = {t.tensor_type.name for t in tensors}
            if len(types) == 1 and types <= set(_FLOAT_TYPES):
                dtype, nbytes = _FLOAT_TYPES[types.pop()], sum(int(t.n_bytes) for t in tensors)
            else:
                dtype, nbytes = "float32", 4 * int(np.prod(shape))
                self._as_float32.add(name)
            self._add(tensors[0], name, shape, dtype, nbytes, tensors[0].data)
            self._joined[name] = (tensors, part_shapes, join)

    def _add_xielu(self) -> None:
        """Apertus's xIELU scalars (mlp.act_fn.alpha_p, alpha_n [1], beta, eps []), which
        ApertusModel.modify_tensors stores as metadata, one value a layer (xielu.alpha_p ...): listed
        as float32 tensors of those values."""
        n = self.hparams["n_layer"]
        for key, shape in (("alpha_p", (1,)), ("alpha_n", (1,)), ("beta", ()), ("eps", ())):
            values = self.meta(f"xielu.{key}")
            if not isinstance(values, list) or len(values) != n:
                raise InputError(f"{self.path}: the GGUF lacks the metadata 'xielu.{key}' (a value for each of the "
                                 f"{n} layers)")
            for i, v in enumerate(values):
                name = f"model.layers.{i}.mlp.act_fn.{key}"
                value = _Value(name, self._gguf.GGMLQuantizationType.F32)
                self._add(value, name, shape, "float32", 4, np.array(v, dtype=np.float32).reshape(shape))

    def _rebuild(self, info: SourceTensor, raw: bool) -> np.ndarray:
        """A joined tensor from its parts: their float32 values, or their stored values (raw: the same
        float type; bfloat16 as its bits). Stacked experts are joined expert by expert, so that the
        temporaries are one expert's."""
        tensors, shapes, join = self._joined[info.name]

        def parts(index: slice) -> list[np.ndarray]:
            out = []
            for t, shape in zip(tensors, shapes):
                data = np.asarray(t.data)[index]
                shape = (data.shape[0], *shape[1:])
                if raw:
                    out.append((data.view(np.uint16) if t.tensor_type.name == "BF16" else data).reshape(shape))
                else:
                    out.append(self._gguf.quants.dequantize(data, t.tensor_type).astype(np.float32).reshape(shape))
            return out

        if len(info.shape) < 3 or any(s[0] != info.shape[0] for s in shapes):
            return np.ascontiguousarray(join(*parts(slice(None))).reshape(info.shape))
        w: np.ndarray | None = None
        for e in range(info.shape[0]):
            one = join(*parts(slice(e, e + 1))).reshape(info.shape[1:])
            if w is None:
                w = np.empty(info.shape, dtype=one.dtype)
            w[e] = one
        return w

    def _add_rows(self, t: Any, m: re.Match, parts: list[tuple[str, int | None]], shape: tuple[int, ...],
                  dtype: str) -> None:
        """List the GGUF tensor t (of block m) as the Hugging Face tensors `parts`, (name, rows) in
        order, each a view of its rows (rows None: one row, as a vector)."""
        rows = [1 if n is None else n for _, n in parts]
        if not shape or shape[0] != sum(rows):
            raise InputError(f"{self.path}: GGUF tensor {t.name!r} has shape {list(shape)}, not the {sum(rows)} "
                             "rows the metadata implies")
        row_bytes = int(t.n_bytes) // shape[0]
        start = 0
        for (part, n), k in zip(parts, rows):
            name = f"{archs.layer_prefix(self.layout)}.{m.group(1)}.{part}.{m.group(3)}"
            if n is None:
                self._add(t, name, shape[1:], dtype, row_bytes, t.data[start])
            else:
                self._add(t, name, (k, *shape[1:]), dtype, k * row_bytes, t.data[start:start + k])
            start += k

    # -- metadata -------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        """A metadata value as a Python value (str, int, float, bool, list), or default."""
        if key in self._bad_meta:
            raise InputError(f"{self.path}: GGUF metadata {key!r} is unreadable ({self._bad_meta[key]})")
        return self._metadata.get(key, default)

    def _meta_str(self, key: str) -> str:
        v = self.meta(key)
        if not isinstance(v, str):
            raise InputError(f"{self.path}: the GGUF lacks the metadata {key!r}")
        return v

    def need(self, key: str) -> Any:
        """A metadata value the file must have (InputError without it)."""
        v = self.meta(key)
        if v is None:
            raise InputError(f"{self.path}: the GGUF lacks the metadata '{key}'")
        return v

    def _hparams(self) -> dict[str, Any]:
        a = self.arch
        n_embd = int(self.need(f"{a}.embedding_length"))
        n_head = int(self.need(f"{a}.attention.head_count"))
        n_head_kv = self.meta(f"{a}.attention.head_count_kv", n_head)
        if isinstance(n_head_kv, list):  # per-layer list in some files
            if len(set(n_head_kv)) != 1:
                raise InputError(f"{self.path}: a different number of KV heads per layer is not supported")
            n_head_kv = n_head_kv[0]
        head_dim = int(self.meta(f"{a}.attention.key_length", n_embd // n_head))
        embd = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        n_vocab = self.meta(f"{a}.vocab_size")
        if n_vocab is None:
            toks = self.meta("tokenizer.ggml.tokens")
            n_vocab = len(toks) if toks else (int(embd.shape[1]) if embd is not None else None)
        if n_vocab is None:
            raise InputError(f"{self.path}: cannot tell the vocabulary size")
        hp = {
            "n_embd": n_embd,
            "n_head": n_head,
            "n_head_kv": int(n_head_kv),
            "head_dim": head_dim,
            "n_layer": int(self.need(f"{a}.block_count")),
            "n_ff": int(self.need(f"{a}.feed_forward_length")),
            "n_vocab": int(n_vocab),
            "n_ctx": int(self.meta(f"{a}.context_length", 2048)),
            "rms_eps": archs.f32(self.meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "norm_eps": archs.f32(self.meta(f"{a}.attention.layer_norm_epsilon", 1e-5)),  # LayerNorms
            "rope_theta": archs.f32(self.meta(f"{a}.rope.freq_base", 10000.0)),
            "rope_dims": self.meta(f"{a}.rope.dimension_count"),
        }
        if self.layout in archs.MOE_ARCHITECTURES:
            hp.update(archs.moe_hparams(self, hp))
        archs.check_hparams(self, hp)
        return hp

    # -- data -----------------------------------------------------------------------------
    def _load_float(self, info: SourceTensor) -> np.ndarray:
        t, data = self._tensor(info)
        if info.name in self._joined:
            return self._rebuild(info, raw=False)
        transposed = info.name in self._transposed
        out = np.empty(info.shape[::-1] if transposed else info.shape, dtype=np.float32)  # as the file holds it
        # Dequantize a few MB of rows at a time: dequantize's temporaries stay small, and the
        # peak is about the output tensor itself.
        rows = out.reshape(-1, out.shape[-1]) if out.ndim > 1 else out.reshape(1, -1)
        src = data.reshape(rows.shape[0], -1)
        step = max(1, (4 << 20) // max(1, rows.shape[1] * 4))
        try:
            for i in range(0, rows.shape[0], step):
                rows[i : i + step] = self._gguf.quants.dequantize(src[i : i + step], t.tensor_type)
        except NotImplementedError:
            raise InputError(
                f"{self.path}: tensor {info.name!r} is stored as {t.tensor_type.name}, which the installed "
                "gguf package cannot dequantize"
            ) from None
        w = out.T if transposed else out
        n = self._permute.get(info.name)
        if n is not None:
            w = unpermute_qk(w, n)
        if info.name in self._grouped:
            w = w[self._qkv_rows(w.shape[0])]
        if info.name in self._shifted:
            w -= np.float32(1.0)
        return np.ascontiguousarray(w)

    def _load_raw(self, info: SourceTensor) -> np.ndarray:
        if info.name in self._as_float32:  # norms less llama.cpp's 1, quantized transposed or joined weights
            return self._load_float(info)
        _, data = self._tensor(info)
        if info.name in self._joined:
            return self._rebuild(info, raw=True)
        data = np.array(data)  # copy out of the memory map
        transposed = info.name in self._transposed  # float values: transposed back below
        shape = info.shape[::-1] if transposed else info.shape  # as the file holds it
        if info.dtype == "bfloat16":
            data = data.view(np.uint16).reshape(shape)
        elif len(shape) == 2:  # rows of values or of quantized blocks (a [1, n] gate stored as a vector)
            data = data.reshape(shape[0], -1)
        n = self._permute.get(info.name)
        if n is not None:  # reorder whole rows: values, bfloat16 bits or rows of quantized blocks alike
            data = unpermute_qk(data.reshape(shape[0], -1), n).reshape(data.shape)
        if info.name in self._grouped:
            data = data[self._qkv_rows(data.shape[0])]
        return np.ascontiguousarray(data.T) if transposed else data

    def _qkv_rows(self, rows: int) -> np.ndarray:
        return checkpoint_qkv_rows(rows, self.hparams["n_head"], self.hparams["n_head_kv"])

    # -- side files -----------------------------------------------------------------------
    def config(self) -> dict:
        model_type, cls = archs.HF_ARCH[self.layout]
        head = archs.global_names(self.layout)["output"]
        cfg: dict[str, Any] = {"architectures": [cls], "model_type": model_type, "vocab_size": self.hparams["n_vocab"],
                               "tie_word_embeddings": f"{head}.weight" not in self._infos, "torch_dtype": "float32"}
        for key, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
            v = self.meta(f"tokenizer.ggml.{gkey}")
            if v is not None:
                cfg[key] = int(v)
        cfg.update(archs.family_config(self))
        return cfg

    def _token(self, gkey: str) -> str | None:
        idx = self.meta(f"tokenizer.ggml.{gkey}")
        if idx is None:
            return None
        toks = self.meta("tokenizer.ggml.tokens") or []
        if not 0 <= int(idx) < len(toks):
            return None
        return toks[int(idx)]

    def extra_files(self) -> dict[str, bytes | Path]:
        """tokenizer.json and friends, rebuilt from the metadata. InputError when the GGUF's
        tokenizer kind is not supported: call this before a long conversion."""
        from kbitcli.sources.gguf_tokenizer import build_tokenizer

        tok, pre_warning = build_tokenizer(self)
        if pre_warning and pre_warning not in self.warnings:
            self.warnings.append(pre_warning)
        add_bos = bool(self.meta("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(self.meta("tokenizer.ggml.add_eos_token", False))
        special = {k: self._token(g) for k, g in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                   ("unk_token", "unknown_token_id"),
                                                   ("pad_token", "padding_token_id"))}
        special = {k: v for k, v in special.items() if v is not None}
        tcfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": add_bos,
            "add_eos_token": add_eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.hparams["n_ctx"],
            **special,
        }
        template = self.meta("tokenizer.chat_template")
        if isinstance(template, str):
            tcfg["chat_template"] = template
        gen: dict[str, Any] = {"_from_model_config": True}
        cfg = self.config()
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k in cfg:
                gen[k] = cfg[k]
        eot = self.meta("tokenizer.ggml.eot_token_id")
        if eot is not None and "eos_token_id" in gen and int(eot) != gen["eos_token_id"]:
            gen["eos_token_id"] = [gen["eos_token_id"], int(eot)]

        def dump(obj: dict) -> bytes:
            return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

        return {
            "tokenizer.json": tok.to_str(pretty=True).encode("utf-8"),
            "tokenizer_config.json": dump(tcfg),
            "special_tokens_map.json": dump(special),
            "generation_config.json": dump(gen),
        }

    def close(self) -> None:
        # the reader holds a read-only memory map; dropping it unmaps the file once unreferenced
        self._by_name.clear()

    def _tensor(self, info: SourceTensor) -> tuple[Any, np.ndarray]:
        """(the GGUF tensor, the memory-mapped data of `info`: all of it, or one expert's slice)"""
        t = self._by_name.get(info.name)
        if t is None:
            raise InputError(f"{self.path}: the source was closed; cannot read {info.name!r}")
        return t
