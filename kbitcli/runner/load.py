"""Load a model for the runner: a kbit folder (packed k-bit weights, KbitLinear) or any
checkpoint kbit converts from (Hugging Face folder, .safetensors, .bin, GGUF), which gives
the unquantized reference with the same code.

    model, tokenizer, config = load("out/SmolLM2-kbit", device="cpu")
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kbitcli.errors import InputError, UsageError

from .layers import KbitLinear, KbitStacked
from .models import build_args, model_type_of
from .models.base import fuse_projections
from .tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'. UsageError when CUDA is asked
    for but torch cannot use it."""
    text = str(device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "gpu":
        text = "cuda"
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch finds no usable CUDA GPU (a CPU-only torch build, no GPU or "
                             "no driver); use --device cpu")
        return torch.device(text)
    raise UsageError(f"unknown device {device!r}; choose auto, cpu or cuda")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16") from None


def is_kbit(path: Path) -> bool:
    """True for a kbit model (folder or .safetensors file with kbit metadata)."""
    from kbitformat.constants import FORMAT_NAME
    from kbitformat.io import INDEX_NAME, read_header
    if path.is_dir():
        idx = path / INDEX_NAME
        if idx.is_file():
            try:
                meta = json.loads(idx.read_text()).get("metadata", {})
                if "kbit.version" in meta or "kbit.format" in meta:
                    return True
                files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, OSError):
                return False
            first = path / files[0] if files else None
        else:
            st = sorted(path.glob("*.safetensors"))
            first = st[0] if st else None
    else:
        first = path if path.suffix == ".safetensors" else None
    if first is None or not first.is_file():
        return False
    try:
        meta, _, _ = read_header(first)
    except Exception:  # noqa: BLE001 - anything unreadable is "not kbit"; the source reader will explain
        return False
    return meta.get("kbit.format") == FORMAT_NAME


class _KbitWeights:
    """Uniform access to the tensors of a kbit model."""

    def __init__(self, path: Path, verify: bool) -> None:
        from kbitformat.io import KbitReader
        self.reader = KbitReader(path, verify=verify)
        self.folder = path if path.is_dir() else path.parent

    def names(self) -> list[str]:
        return self.reader.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.recipe(name)["shape"])

    def is_quantized(self, name: str) -> bool:
        return self.reader.is_quantized(name)

    def quantized(self, name: str):
        return self.reader.quantized(name)

    def load(self, name: str) -> np.ndarray:
        if self.reader.is_quantized(name):  # the torch dequantizer: the same bits as the reference, faster
            qt = self.reader.quantized(name)
            return KbitLinear.from_quantized(_as_2d(qt)).dequantized().numpy().reshape(qt.shape)
        return self.reader.load(name)


def _as_2d(qt):
    if len(qt.shape) == 2:
        return qt
    import dataclasses
    return dataclasses.replace(qt, shape=(qt.rows, qt.cols))


class _SourceWeights:
    def __init__(self, src) -> None:
        self.src = src
        self._infos = {t.name: t for t in src.tensors()}

    def names(self) -> list[str]:
        return list(self._infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._infos[name].shape)

    def is_quantized(self, name: str) -> bool:
        return False

    def load(self, name: str) -> np.ndarray:
        return self.src.load(name)


def _side_files(folder: Path) -> dict[str, Path]:
    from kbitcli.sources._base import EXTRA_FILE_NAMES
    return {n: folder / n for n in EXTRA_FILE_NAMES if (folder / n).is_file()}


def _read_config(folder: Path) -> dict:
    p = folder / "config.json"
    if not p.is_file():
        raise InputError(f"{folder} has no config.json; the runner needs it to know the architecture")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p} cannot be read as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{p} does not hold a JSON object")
    return cfg


def open_model_files(path: str | os.PathLike) -> tuple[Any, dict, dict, str]:
    """(weights, config, side files, kind) for a kbit model or a checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if is_kbit(p):
        folder = p if p.is_dir() else p.parent
        cfg = _read_config(folder)
        return None, cfg, _side_files(folder), "kbit"
    from kbitcli.sources import open_source
    src = open_source(p)
    cfg = src.config()
    if cfg is None:
        raise InputError(f"{p} has no config.json beside its weights; the runner needs it to know the architecture")
    return src, dict(cfg), dict(src.extra_files()), src.kind


def _set_param(model: nn.Module, pname: str, value: torch.Tensor) -> None:
    mod_name, _, attr = pname.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    setattr(mod, attr, nn.Parameter(value, requires_grad=False))


def _linear_modules(model: nn.Module) -> dict[str, str]:
    """weight parameter name -> layout, for every layer a KbitLinear can replace."""
    from .models.gpt2 import Conv1D
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[f"{name}.weight"] = "out_in"
        elif isinstance(m, Conv1D):
            out[f"{name}.weight"] = "in_out"
    return out


def load_weights(model: nn.Module, weights, device: torch.device, dtype: torch.dtype, where: str,
                 arch: str, packed: bool, kernel: str = "auto") -> dict[str, int]:
    """Fill the (meta) model from `weights`; returns counts. Errors name the tensor."""
    params = dict(model.named_parameters())
    tied = model.tied_weights()
    linears = _linear_modules(model) if packed else {}
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for name in weights.names():
        pname = model.checkpoint_name(name)
        if pname is None or pname in tied:
            continue
        if pname in params:
            mapping[pname] = name
        else:
            unexpected.append(name)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise InputError(f"{where}: the tensor {unexpected[0]!r}{more} does not belong to the {arch} "
                         "architecture that config.json describes")
    missing = [p for p in params if p not in mapping]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{where}: the tensor {missing[0]!r}{more} is missing; config.json describes a {arch} "
                         "model that needs it")
    for pname, p in params.items():
        name = mapping[pname]
        shape = tuple(weights.shape(name))
        if shape != tuple(p.shape):
            raise InputError(f"{where}: tensor {name!r} has shape {list(shape)} but the {arch} architecture of "
                             f"config.json needs {list(p.shape)}")
    counts = {"packed": 0, "dense": 0}
    done: set[str] = set()
    for wname, layout in linears.items():
        name = mapping.get(wname)
        if name is None or not weights.is_quantized(name):
            continue
        mod_name = wname.rsplit(".", 1)[0]
        mod = model.get_submodule(mod_name)
        bias = None
        bname = f"{mod_name}.bias"
        if getattr(mod, "bias", None) is not None:
            bias = weights.load(mapping[bname])
            done.add(bname)
        kl = KbitLinear.from_quantized(weights.quantized(name), bias=bias, layout=layout, device=device, dtype=dtype,
                                       kernel=kernel)
        parent_name, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, kl)
        done.add(wname)
        counts["packed"] += 1
    if packed:  # a quantized stacked tensor (an MoE layer's experts as one 3-D tensor) stays packed
        for pname, p in params.items():
            name = mapping[pname]
            if pname in done or p.dim() < 3 or not weights.is_quantized(name):
                continue
            mod_name, _, attr = pname.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            delattr(mod, attr)
            setattr(mod, attr, KbitStacked.from_quantized(weights.quantized(name), device=device, dtype=dtype,
                                                          kernel=kernel))
            done.add(pname)
            counts["packed"] += 1
    # parameters the model keeps in float32 whatever the compute dtype (DeepSeek's routers, as transformers does)
    float32 = tuple(getattr(model, "float32_parameters", ()))
    for pname in params:
        if pname in done:
            continue
        arr = weights.load(mapping[pname])
        t = torch.from_numpy(np.array(arr, dtype=np.float32, order="C")).to(
            device=device, dtype=torch.float32 if pname.endswith(float32) else dtype)
        _set_param(model, pname, t)
        counts["dense"] += 1
    return counts


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         dequantize_on_load: bool = False, verify: bool = True,
         kernel: str = "auto", fuse: bool = True) -> tuple[nn.Module, Tokenizer, dict]:
    """(model, tokenizer, config) for a kbit model or a checkpoint.

    device: "auto", "cpu" or "cuda"; dtype: compute dtype (default float32 on the CPU, float16
    on CUDA). A kbit model keeps its quantized linear layers packed (KbitLinear, dequantized
    in forward) unless dequantize_on_load, which builds plain weights once at load time.
    verify checks every kbit tensor's CRC-32 as it is read. kernel picks KbitLinear's CPU
    dequantizer: "auto" (Numba when importable), "torch" or "numba"; all give the same bits.
    fuse: run the linear layers that share an input (q/k/v; a gated MLP's gate/up) as one
    layer where they are compatible (models.base.fuse_projections): one GEMV per group in a
    decode step instead of two or three. Every output row of a fused GEMV is computed as
    before; a prompt pass's matrix product over a stacked weight may round differently (float
    rounding), in both the packed and the plain model alike."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    p = Path(path).expanduser()
    src, config, files, kind = open_model_files(p)
    arch = model_type_of(config)  # UnsupportedArchitectureError before any weight is read
    module, args = build_args(config)
    where = str(p)
    tokenizer = load_tokenizer(files, config, where)
    weights = _KbitWeights(p, verify) if kind == "kbit" else _SourceWeights(src)
    if hasattr(module, "for_checkpoint"):  # settings that depend on the stored tensors (multimodal.py)
        args = module.for_checkpoint(args, weights.names())
    with torch.device("meta"):
        model = module.Model(args)
    try:
        counts = load_weights(model, weights, dev, dt, where, arch, packed=(kind == "kbit" and not dequantize_on_load),
                              kernel=kernel)
    finally:
        if src is not None:
            src.close()
    counts["fused"] = fuse_projections(model) if fuse else 0
    model.to(dev)  # the buffers (rotary tables, ALiBi slopes); parameters are already there
    model.eval()
    model.requires_grad_(False)
    model.kbit_info = {"path": where, "kind": kind, "model_type": arch, "device": str(dev),
                       "dtype": str(dt).replace("torch.", ""), **counts}
    if getattr(model, "language_model_type", None):  # a multimodal checkpoint, run text only
        model.kbit_info["language_model"] = model.language_model_type
    return model, tokenizer, config


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of weights held by the model (packed components for KbitLinear)."""
    total = 0
    for m in model.modules():
        if isinstance(m, KbitLinear):
            total += m.packed_bytes()
        else:
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total
