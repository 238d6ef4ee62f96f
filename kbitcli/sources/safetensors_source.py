"""Safetensors checkpoints: one file, or a Hugging Face folder (single file or sharded + index).

The header is parsed here (not with safetensors.safe_open) so that every problem gets a clear
InputError and bfloat16 needs no torch: the data is memory-mapped and one tensor at a time is
converted to float32.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from kbitcli.errors import InputError
from kbitcli.sources._base import (
    BaseSource,
    SourceTensor,
    bf16_bits_to_float32,
    float8_bits_to_float32,
    read_json,
    shard_group,
)

# safetensors dtype -> (our dtype name, numpy dtype of the stored values or of their bit patterns)
_DTYPES: dict[str, tuple[str, str]] = {
    "F64": ("float64", "<f8"),
    "F32": ("float32", "<f4"),
    "F16": ("float16", "<f2"),
    "BF16": ("bfloat16", "<u2"),
    "F8_E4M3": ("float8_e4m3fn", "u1"),
    "F8_E5M2": ("float8_e5m2", "u1"),
    "I64": ("int64", "<i8"),
    "U64": ("uint64", "<u8"),
    "I32": ("int32", "<i4"),
    "U32": ("uint32", "<u4"),
    "I16": ("int16", "<i2"),
    "U16": ("uint16", "<u2"),
    "I8": ("int8", "i1"),
    "U8": ("uint8", "u1"),
    "BOOL": ("bool", "?"),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


class _Entry:
    __slots__ = ("file", "begin", "end", "np_dtype", "st_dtype")

    def __init__(self, file: Path, begin: int, end: int, np_dtype: str | None, st_dtype: str) -> None:
        self.file, self.begin, self.end, self.np_dtype, self.st_dtype = file, begin, end, np_dtype, st_dtype


def parse_header(file: Path) -> tuple[int, list[tuple[str, str, tuple[int, ...], int, int]]]:
    """Validate a safetensors file's header. Returns (data start, [(name, st_dtype, shape, begin, end)])
    sorted by offset, with begin/end absolute file offsets."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{file} is not a safetensors file: it is only {size} bytes long (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(
                    f"{file} has a corrupt safetensors header: it claims a {n}-byte header but the file "
                    f"is {size} bytes (not a safetensors file, or truncated)"
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read {file}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{file} has a corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{file} has a corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    data_len = size - data_start
    out = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            st_dtype = spec["dtype"]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
            if not isinstance(st_dtype, str) or any(d < 0 for d in shape):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise InputError(f"{file} has a corrupt safetensors header (bad entry for tensor {name!r})") from None
        if not 0 <= begin <= end:
            raise InputError(f"{file} has a corrupt safetensors header (bad offsets for tensor {name!r})")
        if end > data_len:
            raise InputError(
                f"{file} is truncated or corrupt: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has only {size} bytes"
            )
        if st_dtype in _DTYPES:
            numel = 1
            for d in shape:
                numel *= d
            want = numel * np.dtype(_DTYPES[st_dtype][1]).itemsize
            if end - begin != want:
                raise InputError(
                    f"{file} has a corrupt safetensors header: tensor {name!r} ({st_dtype}, shape "
                    f"{list(shape)}) needs {want} bytes but its offsets span {end - begin}"
                )
        out.append((name, st_dtype, shape, data_start + begin, data_start + end))
    out.sort(key=lambda e: e[3])
    return data_start, out


class SafetensorsSource(BaseSource):
    def __init__(
        self, path: Path, files: list[Path], kind: str, index: dict[str, str] | None = None,
        folder: Path | None = None,
    ) -> None:
        super().__init__(path, folder)
        self.kind = kind
        self.files = files
        self._entries: dict[str, _Entry] = {}
        self._maps: dict[Path, np.memmap] = {}
        where: dict[str, Path] = {}
        for file in files:
            if not file.is_file():
                raise InputError(f"shard {file.name} is missing from {file.parent}")
            _, entries = parse_header(file)
            for name, st_dtype, shape, begin, end in entries:
                if index is not None and index.get(name) != file.name:
                    continue  # the index is the authority on which shard holds a tensor
                if name in where:
                    raise InputError(f"tensor {name!r} appears in both {where[name].name} and {file.name}")
                where[name] = file
                dtype, np_dtype = _DTYPES.get(st_dtype, (st_dtype, None))
                self._infos[name] = SourceTensor(name, shape, dtype, end - begin)
                self._entries[name] = _Entry(file, begin, end, np_dtype, st_dtype)
        if index is not None:
            absent = [n for n in index if n not in self._entries]
            if absent:
                n = absent[0]
                raise InputError(
                    f"the index says tensor {n!r} is in {index[n]}, but that file does not hold it"
                    + (f" ({len(absent) - 1} more tensors missing)" if len(absent) > 1 else "")
                )

    def _bytes(self, e: _Entry) -> np.ndarray:
        mm = self._maps.get(e.file)
        if mm is None:
            if e.file.stat().st_size == 0:
                return np.zeros(0, np.uint8)
            mm = self._maps[e.file] = np.memmap(e.file, dtype=np.uint8, mode="r")
        return mm[e.begin : e.end]

    def _load_raw(self, info: SourceTensor) -> np.ndarray:
        e = self._entries[info.name]
        if e.np_dtype is None:
            raise InputError(f"{e.file}: tensor {info.name!r} has dtype {e.st_dtype}, which kbit cannot read")
        raw = self._bytes(e)
        # np.array copies out of the map: the result is writable and the file can be closed
        return np.array(raw.view(np.dtype(e.np_dtype)).reshape(info.shape))

    def _load_float(self, info: SourceTensor) -> np.ndarray:
        e = self._entries[info.name]
        vals = self._bytes(e).view(np.dtype(e.np_dtype)).reshape(info.shape)
        if info.dtype == "bfloat16":
            return bf16_bits_to_float32(vals)
        if info.dtype.startswith("float8"):
            return float8_bits_to_float32(vals, info.dtype)
        return vals.astype(np.float32)  # always a copy, even from float32

    def close(self) -> None:
        self._maps.clear()


def open_safetensors_file(path: Path) -> SafetensorsSource:
    return SafetensorsSource(path, [path], "safetensors-file", folder=path.parent)


def open_safetensors_dir(folder: Path, index_file: Path | None, files: list[Path]) -> SafetensorsSource:
    """A Hugging Face folder: `index_file` (sharded) or `files` (one file, or complete shards)."""
    if index_file is not None:
        index = read_json(index_file, "safetensors index")
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise InputError(f"safetensors index {index_file} has no valid weight_map")
        names = list(dict.fromkeys(wm.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise InputError(
                f"the index {index_file.name} names shard(s) missing from {folder}: " + ", ".join(missing[:5])
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        return SafetensorsSource(folder, [folder / n for n in names], "safetensors-dir", index=wm, folder=folder)
    else:
        problem = shard_group(files)
        if problem:
            raise InputError(f"{folder}: {problem}")
        return SafetensorsSource(folder, files, "safetensors-dir", folder=folder)
