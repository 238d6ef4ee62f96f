"""Safetensors checkpoints: one file, or a Hugging Face folder (single file or sharded + index).

The header is parsed here (not with safetensors.safe_open) so that every problem gets a clear
InputError and bfloat16 needs no torch: the data is memory-mapped and one tensor at a time is
converted to float32.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from kbitcli.errors import InputError
from kbitformat.errors import KbitFormatError
from kbitformat.io import read_header
from kbitcli.sources._base import (
    BaseSource,
    SourceTensor,
    bf16_bits_to_float32,
    float8_bits_to_float32,
    fp8_block_size,
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

#: the 16 values of an FP4 E2M1 code (MXFP4): sign bit 3, then 2 exponent bits and 1 mantissa bit
_FP4 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


class _Entry:
    __slots__ = ("file", "begin", "end", "np_dtype", "st_dtype")

    def __init__(self, file: Path, begin: int, end: int, np_dtype: str | None, st_dtype: str) -> None:
        self.file, self.begin, self.end, self.np_dtype, self.st_dtype = file, begin, end, np_dtype, st_dtype


def parse_header(file: Path) -> tuple[int, list[tuple[str, str, tuple[int, ...], int, int]]]:
    """Validate a safetensors file's header with the format library's parser (the same checks as
    for kbit files: sizes, offsets, truncation, overlaps). Returns (data start,
    [(name, st_dtype, shape, begin, end)]) sorted by offset, begin/end absolute file offsets."""
    try:
        meta, tensors, _ = read_header(file, strict_dtypes=False)
    except KbitFormatError as e:
        raise InputError(str(e)) from None
    if "kbit.format" in (meta or {}):  # its tensors are packed codes and scales, not weights
        raise InputError(f"{file} is part of a kbit model, not a checkpoint to convert; convert from the original "
                         "checkpoint, or write a plain one first with `kbit dequantize`")
    with open(file, "rb") as f:
        start = 8 + struct.unpack("<Q", f.read(8))[0]
    out = sorted(((t.name, t.dtype, t.shape, t.offset, t.offset + t.nbytes) for t in tensors.values()),
                 key=lambda e: e[3])
    return start, out


class SafetensorsSource(BaseSource):
    load_into_dtypes = frozenset({"bfloat16", "float16", "float32", "float64"})

    def __init__(
        self, path: Path, files: list[Path], kind: str, index: dict[str, str] | None = None,
        folder: Path | None = None,
    ) -> None:
        super().__init__(path, folder)
        self.kind = kind
        self.files = files
        self._entries: dict[str, _Entry] = {}
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
        #: float8 weight -> (its block scale tensor, block rows, block columns), and the scale
        #: tensors, not listed: see _fp8_blocks
        self._fp8_scales: dict[str, tuple[str, int, int]] = {}
        self._scale_infos: dict[str, SourceTensor] = {}
        self._fp8_blocks()
        #: MXFP4 tensor -> (its `_blocks`, its `_scales`), which are not listed: see _mxfp4_tensors
        self._mxfp4: dict[str, tuple[SourceTensor, SourceTensor]] = {}
        self._mxfp4_tensors()

    def _fp8_blocks(self) -> None:
        """A checkpoint quantized to fp8 with block scales (_base.fp8_block_size; any other
        quantized one is refused there): each float8 `X.weight` reads as its values times its
        `X.weight_scale_inv`, block by block, as transformers dequantizes it (load_raw gives the
        stored float8 bits), and the scale tensors are not listed."""
        where = self.folder or self.path
        block = fp8_block_size(self.config(), where)
        if block is None:
            return
        bm, bn = block
        for name, info in list(self._infos.items()):
            if not info.dtype.startswith("float8"):
                continue
            sname = name[:-len("weight")] + "weight_scale_inv"
            scale = self._infos.get(sname) if name.endswith(".weight") else None
            if scale is None or len(info.shape) != 2:
                raise InputError(f"{where}: the float8 tensor {name!r} of this fp8 checkpoint has no block scales "
                                 f"({sname}) for a 2-D weight; kbit cannot read its values")
            want = (-(-info.shape[0] // bm), -(-info.shape[1] // bn))
            if tuple(scale.shape) != want or not scale.is_float:
                raise InputError(f"{where}: {sname} has shape {list(scale.shape)} ({scale.dtype}); the weight "
                                 f"{list(info.shape)} in blocks of {bm}x{bn} needs float scales of shape {list(want)}")
            self._fp8_scales[name] = (sname, bm, bn)
        for sname, _, _ in self._fp8_scales.values():
            self._scale_infos[sname] = self._infos.pop(sname)
        stray = [n for n in self._infos if n.endswith(("_scale_inv", ".weight_scale", ".input_scale"))]
        if stray:
            raise InputError(f"{where}: the scale tensor {stray[0]!r} belongs to no float8 weight kbit knows how "
                             "to read")

    def _mxfp4_tensors(self) -> None:
        """A checkpoint with MXFP4 experts (quant_method "mxfp4": the released gpt-oss models):
        each `X_blocks` (uint8 [E, R, G, 16], two FP4 E2M1 codes a byte, low nibble first) with its
        `X_scales` (uint8 [E, R, G], E8M0 exponents biased by 127: one per 32 values) reads as the
        tensor X [E, G*32, R] (rows and values swapped, the layout transformers' MXFP4
        dequantization gives), with dtype bfloat16: it holds every MXFP4 value exactly, and it is
        what transformers dequantizes to. load_raw gives its bfloat16 bits."""
        qc = (self.config() or {}).get("quantization_config")
        if not (isinstance(qc, dict) and qc.get("quant_method") == "mxfp4"):
            return
        where = self.folder or self.path
        for name, info in list(self._infos.items()):
            if not name.endswith("_blocks"):
                continue
            base = name[:-len("_blocks")]
            scale = self._infos.get(base + "_scales")
            if scale is None or info.dtype != "uint8" or scale.dtype != "uint8" or len(info.shape) != 4 \
                    or tuple(scale.shape) != tuple(info.shape[:3]):
                raise InputError(f"{where}: the MXFP4 tensor {name!r} ({info.dtype} {list(info.shape)}) needs uint8 "
                                 f"blocks [experts, rows, groups, bytes] and uint8 scales {base}_scales of shape "
                                 f"[experts, rows, groups]; got "
                                 f"{'none' if scale is None else f'{scale.dtype} {list(scale.shape)}'}")
            if base in self._infos:
                raise InputError(f"{where}: {base!r} is stored both as a tensor and as MXFP4 blocks")
            E, R, G, B = info.shape
            self._mxfp4[base] = (info, scale)
            self._infos[base] = SourceTensor(base, (E, G * B * 2, R), "bfloat16", info.nbytes + scale.nbytes)
        for info, scale in self._mxfp4.values():
            del self._infos[info.name], self._infos[scale.name]
        stray = [n for n in self._infos if n.endswith(("_blocks", "_scales")) and self._infos[n].dtype == "uint8"]
        if stray:
            raise InputError(f"{where}: the MXFP4 tensor {stray[0]!r} has no matching _blocks / _scales tensor")

    def _mxfp4_values(self, name: str, bf16_bits: bool = False) -> np.ndarray:
        """The float32 values of an MXFP4 tensor (see _mxfp4_tensors), or their bfloat16 bits (the
        high half of each float32, exact), decoded one expert at a time into the output (a
        bfloat16 read never holds the whole tensor in float32)."""
        blocks, scales = (self._bytes(self._entries[t.name]).reshape(t.shape) for t in self._mxfp4[name])
        E, R, G, B = blocks.shape
        out = np.empty((E, G * B * 2, R), np.uint16 if bf16_bits else np.float32)
        for e in range(E):
            b = np.asarray(blocks[e])
            v = np.empty((R, G, B, 2), np.float32)
            v[..., 0], v[..., 1] = _FP4[b & 0x0F], _FP4[b >> 4]
            with np.errstate(over="ignore"):  # exponents past float32's range give inf, as in transformers
                v = np.ldexp(v, (scales[e].astype(np.int32) - 127)[:, :, None, None])
            v = v.reshape(R, G * B * 2).T
            out[e] = (v.view(np.uint32) >> 16).astype(np.uint16) if bf16_bits else v
        return out

    def _bytes(self, e: _Entry) -> np.ndarray:
        """The tensor's bytes, memory-mapped just for this read: the callers copy them out,
        and dropping the map right after keeps the resident memory of a conversion at one
        tensor instead of growing with every shard read (a shard-wide map kept open would)."""
        if e.end == e.begin:
            return np.zeros(0, np.uint8)
        return np.memmap(e.file, dtype=np.uint8, mode="r", offset=e.begin, shape=(e.end - e.begin,))

    def _load_raw(self, info: SourceTensor) -> np.ndarray:
        if info.name in self._mxfp4:  # bfloat16 bits: the high half of the float32 values (exact)
            return self._mxfp4_values(info.name, bf16_bits=True)
        e = self._entries[info.name]
        if e.np_dtype is None:
            raise InputError(f"{e.file}: tensor {info.name!r} has dtype {e.st_dtype}, which kbit cannot read")
        raw = self._bytes(e)
        # np.array copies out of the map: the result is writable and the file can be closed
        return np.array(raw.view(np.dtype(e.np_dtype)).reshape(info.shape))

    def raw_view(self, name: str) -> np.ndarray:
        """The stored values, read-only and memory-mapped (no copy; see load_raw)."""
        info = self.tensor(name)
        if name in self._mxfp4:
            return self._load_raw(info)
        e = self._entries[name]
        if e.np_dtype is None:
            raise InputError(f"{e.file}: tensor {info.name!r} has dtype {e.st_dtype}, which kbit cannot read")
        return self._bytes(e).view(np.dtype(e.np_dtype)).reshape(info.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to read the tensor's bytes into the page cache in the background
        (posix_fadvise WILLNEED), so that a cold file is read while the previous tensor is
        being quantized. Costs no memory of this process."""
        if name in self._mxfp4:
            for t in self._mxfp4[name]:
                self.prefetch(t.name)
            return
        e = self._entries.get(name)
        if e is None or e.end <= e.begin or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(e.file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, e.begin, e.end - e.begin, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _load_float_into(self, info: SourceTensor, out: np.ndarray) -> np.ndarray | None:
        """bfloat16 / float16 / float32 / float64 straight from the mapped bytes into `out`
        (the same values as _load_float, without a new array)."""
        if info.name in self._mxfp4:
            return None
        e = self._entries[info.name]
        vals = self._bytes(e).view(np.dtype(e.np_dtype))
        if info.dtype == "bfloat16":  # the bf16 bits are the high half of a float32
            u = out.view(np.uint32)
            np.copyto(u, vals, casting="unsafe")
            np.left_shift(u, 16, out=u)
        else:
            np.copyto(out, vals, casting="unsafe")
        return out

    def _load_float(self, info: SourceTensor) -> np.ndarray:
        if info.name in self._mxfp4:
            return self._mxfp4_values(info.name)
        e = self._entries[info.name]
        vals = self._bytes(e).view(np.dtype(e.np_dtype)).reshape(info.shape)
        if info.dtype == "bfloat16":
            return bf16_bits_to_float32(vals)
        if info.dtype.startswith("float8"):
            out = float8_bits_to_float32(vals, info.dtype)
            if info.name in self._fp8_scales:  # times its block scales (see _fp8_blocks)
                sname, bm, bn = self._fp8_scales[info.name]
                s = self._load_float(self._scale_infos[sname])
                out *= np.repeat(np.repeat(s, bm, axis=0), bn, axis=1)[:out.shape[0], :out.shape[1]]
            return out
        return vals.astype(np.float32)  # always a copy, even from float32

    def close(self) -> None:
        pass


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
