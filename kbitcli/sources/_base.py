"""The common interface of every source reader, and small helpers they share."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from kbitcli.errors import InputError

# dtype names (torch spelling, without the "torch." prefix) that `load` turns into float32.
FLOAT_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
)

# Files next to the weights that belong in the converted model (tokenizer, generation settings,
# chat template). config.json is not among them: `Source.config()` returns it.
EXTRA_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)


_GGUF_QUANT: frozenset[str] | None = None


def gguf_quant_types() -> frozenset[str]:
    """Names of ggml's quantized tensor types ("Q4_1", "Q8_0", "Q4_K", "IQ2_XS", ...)."""
    global _GGUF_QUANT
    if _GGUF_QUANT is None:
        try:
            from gguf import GGMLQuantizationType
        except ImportError:  # pragma: no cover - a dependency
            _GGUF_QUANT = frozenset()
        else:
            plain = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
            _GGUF_QUANT = frozenset(t.name for t in GGMLQuantizationType if t.name not in plain)
    return _GGUF_QUANT


@dataclass(frozen=True)
class SourceTensor:
    """Metadata of one tensor in a source; no data.

    dtype is the dtype the source stores: "float32", "float16", "bfloat16", "float64",
    "float8_e4m3fn", "float8_e5m2", "int8", "uint8", "int16", "int32", "int64", "bool", ...;
    for quantized GGUF tensors the ggml type name ("Q4_1", "Q8_0", "Q4_K", ...).
    shape is the Hugging Face shape (for GGUF: after reversing ggml's dimension order).
    nbytes is the size the tensor takes in the source file.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        """True when `Source.load` can return it as float32 (a float or a GGUF quantized type)."""
        return self.dtype in FLOAT_DTYPES or self.dtype in gguf_quant_types()


@runtime_checkable
class Source(Protocol):
    """A checkpoint to convert from, read one tensor at a time."""

    path: Path
    kind: str  # "safetensors-dir" | "safetensors-file" | "torch-bin" | "gguf"
    warnings: list[str]

    def tensors(self) -> list[SourceTensor]:
        """Every tensor, metadata only, in the order that reads the files front to back."""
        ...

    def tensor(self, name: str) -> SourceTensor:
        """The metadata of one tensor (InputError if there is none of that name)."""
        ...

    def load(self, name: str) -> np.ndarray:
        """One tensor as a new, writable, C-contiguous float32 array.

        Raises InputError naming the tensor when its dtype is not a floating (or, for GGUF,
        quantized) type: use `load_raw` to pass such tensors through unchanged.
        """
        ...

    def load_raw(self, name: str) -> np.ndarray:
        """One tensor as stored: numpy's own dtype where numpy has it; bfloat16 as its uint16
        bit patterns, float8 as uint8 bit patterns, quantized GGUF tensors as their raw block bytes
        (uint8, one row of blocks per output row)."""
        ...

    def config(self) -> dict | None:
        """The Hugging Face config.json contents (rebuilt from metadata for GGUF), or None."""
        ...

    def extra_files(self) -> dict[str, bytes | Path]:
        """Files to copy into the output, by output file name: a Path to copy, or bytes to write."""
        ...

    def total_bytes(self) -> int:
        """Bytes of tensor data in the source."""
        ...

    def close(self) -> None:
        ...


class BaseSource:
    """Shared plumbing: name lookup, context manager, the float32 check."""

    kind = "?"
    #: source dtypes that load(name, out=...) reads into the caller's buffer (_load_float_into)
    load_into_dtypes: frozenset[str] = frozenset()

    def __init__(self, path: Path, folder: Path | None = None) -> None:
        self.path = path
        self.folder = folder  # where config.json and tokenizer files are looked for
        self.warnings: list[str] = []
        self._infos: dict[str, SourceTensor] = {}

    # -- metadata --------------------------------------------------------------------------
    def tensors(self) -> list[SourceTensor]:
        return list(self._infos.values())

    def tensor(self, name: str) -> SourceTensor:
        try:
            return self._infos[name]
        except KeyError:
            raise InputError(f"{self.path}: there is no tensor named {name!r}") from None

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self._infos.values())

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    # -- data ------------------------------------------------------------------------------
    def load(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """See Source.load. `out` (an extension of the protocol, used by the conversion to
        avoid allocating every tensor afresh): a writable, C-contiguous, 1-d float32 scratch
        array of at least the tensor's size, which the source may fill and return a reshaped
        view of instead of a new array. Sources without a fast path ignore it."""
        info = self.tensor(name)
        if not info.is_float:
            raise InputError(
                f"{self.path}: tensor {name!r} has dtype {info.dtype}, not a floating-point type; "
                "it cannot be quantized (pass it through unchanged with load_raw)"
            )
        if (out is not None and info.dtype in self.load_into_dtypes and out.dtype == np.float32
                and out.ndim == 1 and out.size >= info.numel and out.flags.c_contiguous and out.flags.writeable):
            arr = self._load_float_into(info, out[:info.numel])
            if arr is not None:
                return arr.reshape(info.shape)
        arr = self._load_float(info)
        if arr.dtype != np.float32 or not arr.flags.c_contiguous or not arr.flags.writeable:
            arr = np.array(arr, dtype=np.float32, order="C", copy=True)
        return arr

    def load_raw(self, name: str) -> np.ndarray:
        return self._load_raw(self.tensor(name))

    def raw_view(self, name: str) -> np.ndarray:
        """load_raw's array, but possibly a read-only view of the source's bytes (a memory
        map) instead of a copy: for writing a tensor out unchanged. Default: load_raw."""
        return self.load_raw(name)

    def prefetch(self, name: str) -> None:
        """A hint that `name` will be read soon (e.g. start reading it into the page
        cache). Never fails; the default does nothing."""

    def _load_float_into(self, info: SourceTensor, out: np.ndarray) -> np.ndarray | None:
        """Fill `out` (float32, exactly info.numel values) with the tensor and return it
        (called for the dtypes in load_into_dtypes), or None to fall back to _load_float."""
        return None

    def _load_float(self, info: SourceTensor) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_raw(self, info: SourceTensor) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- side files ------------------------------------------------------------------------
    def config(self) -> dict | None:
        return folder_config(self.folder) if self.folder is not None else None

    def extra_files(self) -> dict[str, bytes | Path]:
        return folder_extra_files(self.folder) if self.folder is not None else {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} path={str(self.path)!r} tensors={len(self._infos)}>"


# -- helpers -------------------------------------------------------------------------------

def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file, with InputError for unreadable or invalid JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{what} {path} does not hold a JSON object")
    return obj


def fp8_block_size(config: dict | None, where: object, fp8: bool = True) -> tuple[int, int] | None:
    """How config.json's quantization_config says the checkpoint is stored: None for float
    weights (no quantization_config), (bm, bn) for fp8 weights with a block scale per bm x bn
    block (quant_method "fp8", weight_block_size: DeepSeek-V3 / R1, Kimi-K2, Qwen3 FP8), which a
    source reads as their values when `fp8`; None too for MXFP4 experts (quant_method "mxfp4",
    gpt-oss), which the safetensors source reads as their values when `fp8`. Any other quantized checkpoint (GPTQ, AWQ,
    bitsandbytes, ...) is an InputError: its tensors are not the weights, and converting them
    would give a model that looks complete but is not."""
    qc = (config or {}).get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method") or "unknown") if isinstance(qc, dict) else "unknown"
    block = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if fp8 and method == "mxfp4":  # the safetensors source reads its experts' blocks and scales as values
        return None
    if fp8 and method == "fp8" and isinstance(block, (list, tuple)) and len(block) == 2 \
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
        return int(block[0]), int(block[1])
    kind = f"{method} with weight_block_size {block!r}" if method == "fp8" else method
    can = ("float checkpoints (bf16, fp16, fp32) and safetensors fp8 ones with block scales or MXFP4 experts"
           if fp8 else "float checkpoints (bf16, fp16, fp32)")
    raise InputError(f"{where} is already quantized ({kind}, config.json quantization_config); kbit converts "
                     f"{can}: convert from the original model")


def folder_config(folder: Path) -> dict | None:
    p = folder / "config.json"
    return read_json(p, "config") if p.is_file() else None


def folder_extra_files(folder: Path) -> dict[str, bytes | Path]:
    return {n: folder / n for n in EXTRA_FILE_NAMES if (folder / n).is_file()}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32: the bf16 bits are the high half of a float32."""
    out = bits.astype(np.uint32)
    out <<= 16
    return out.view(np.float32)


def float8_bits_to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    import torch

    tdtype = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}[dtype]
    t = torch.from_numpy(np.array(bits, copy=True, order="C")).view(tdtype)
    return t.float().numpy()


def shard_group(files: list[Path]) -> str | None:
    """Check that shard names "<stem>-0000i-of-0000n.<ext>" are complete; returns an error or None."""
    import re

    pat = re.compile(r"^(.*)-(\d+)-of-(\d+)(\.[^/]+)$")
    groups: dict[tuple[str, str, int], set[int]] = {}
    for f in files:
        m = pat.match(f.name)
        if m:
            groups.setdefault((m.group(1), m.group(4), int(m.group(3))), set()).add(int(m.group(2)))
    for (stem, ext, n), have in groups.items():
        missing = sorted(set(range(1, n + 1)) - have)
        if missing:
            width = max(5, len(str(n)))
            names = ", ".join(f"{stem}-{i:0{width}d}-of-{n:0{width}d}{ext}" for i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            return f"shard(s) missing: {names}{more}"
    return None
