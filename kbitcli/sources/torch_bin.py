"""PyTorch checkpoints: pytorch_model.bin, its shards + pytorch_model.bin.index.json, or a .pt/.pth.

Always read with `torch.load(..., weights_only=True)`: kbit never unpickles arbitrary Python
objects. `mmap=True` keeps the data on disk until a tensor is asked for; files in the old
(pre-zipfile) format cannot be memory-mapped and are read whole, one shard at a time.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np

from kbitcli.errors import InputError
from kbitcli.sources._base import BaseSource, SourceTensor, fp8_block_size, read_json, shard_group

_WRAPPER_KEYS = ("state_dict", "model", "module")


def _torch_load(file: Path):
    import torch

    try:
        size = file.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read {file}: {e.strerror or e}") from None
    if size == 0:
        raise InputError(f"{file} is empty")
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            msg = str(e)
            if "mmap" not in msg and "zipfile" not in msg:
                raise
        # old, non-zipfile format: cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise InputError(
                f"{file} contains arbitrary Python objects (not only tensors); kbit refuses to unpickle "
                "it because unpickling can run any code. Convert it to safetensors with the code that "
                "made it, or load it yourself if you trust it and save its state_dict with "
                "safetensors.torch.save_file."
            ) from None
        raise InputError(f"{file} is not a readable PyTorch checkpoint (corrupt or truncated): {e}") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{file} is not a readable PyTorch checkpoint (corrupt or truncated): {first}") from None


def _state_dict(obj, file: Path) -> dict:
    import torch

    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for k in _WRAPPER_KEYS:
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict):
        raise InputError(f"{file} does not hold a state dict (a dict of tensors) but a {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"{file} holds no tensors")
    return tensors


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


class TorchBinSource(BaseSource):
    kind = "torch-bin"

    def __init__(self, path: Path, files: list[Path], index: dict[str, str] | None, folder: Path) -> None:
        super().__init__(path, folder)
        fp8_block_size(self.config(), folder, fp8=False)  # a quantized checkpoint is refused
        self.files = files
        self._where: dict[str, Path] = {}
        self._cached: tuple[Path, dict] | None = None
        for file in files:
            sd = self._shard(file)
            for name, t in sd.items():
                if index is not None and index.get(name) != file.name:
                    continue
                if name in self._where:
                    raise InputError(f"tensor {name!r} appears in both {self._where[name].name} and {file.name}")
                self._where[name] = file
                self._infos[name] = SourceTensor(
                    name, tuple(t.shape), _dtype_name(t), t.numel() * t.element_size()
                )
        if index is not None:
            absent = [n for n in index if n not in self._where]
            if absent:
                raise InputError(
                    f"the index says tensor {absent[0]!r} is in {index[absent[0]]}, but that file does not hold it"
                )

    def _shard(self, file: Path) -> dict:
        # One shard at a time: with mmap that costs nothing, for old-format files it is the shard.
        if self._cached is None or self._cached[0] != file:
            self._cached = None
            self._cached = (file, _state_dict(_torch_load(file), file))
        return self._cached[1]

    def _tensor(self, info: SourceTensor):
        return self._shard(self._where[info.name])[info.name]

    def _load_float(self, info: SourceTensor) -> np.ndarray:
        import torch

        t = self._tensor(info)
        return t.to(torch.float32).contiguous().numpy().copy() if t.dtype != torch.float32 else t.numpy().copy()

    def _load_raw(self, info: SourceTensor) -> np.ndarray:
        import torch

        t = self._tensor(info).contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16).copy()
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return t.view(torch.uint8).numpy().copy()
        try:
            return t.numpy().copy()
        except TypeError:
            raise InputError(f"{self._where[info.name]}: tensor {info.name!r} has dtype {info.dtype}, which kbit cannot read") from None

    def close(self) -> None:
        self._cached = None


def open_torch_file(path: Path) -> TorchBinSource:
    return TorchBinSource(path, [path], None, path.parent)


def open_torch_dir(folder: Path, index_file: Path | None, files: list[Path]) -> TorchBinSource:
    if index_file is not None:
        index = read_json(index_file, "PyTorch checkpoint index")
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise InputError(f"PyTorch checkpoint index {index_file} has no valid weight_map")
        names = list(dict.fromkeys(wm.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise InputError(
                f"the index {index_file.name} names shard(s) missing from {folder}: " + ", ".join(missing[:5])
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        return TorchBinSource(folder, [folder / n for n in names], wm, folder)
    problem = shard_group(files)
    if problem:
        raise InputError(f"{folder}: {problem}")
    return TorchBinSource(folder, files, None, folder)
