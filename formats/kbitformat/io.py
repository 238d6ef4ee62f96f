"""Reading and writing kbit files: safetensors shards plus model.safetensors.index.json.

The writer streams: tensor data goes straight to a temporary data file per shard, and
a shard is assembled (header, then data) when it is full, so memory holds one tensor at
a time. The reader parses and validates the safetensors header itself, memory-maps the
data and checks each stored tensor's CRC-32 before handing it out.
See formats/SPEC.md for the byte-level description.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .constants import FORMAT_NAME, FORMAT_VERSION, FORMAT_VERSION_STR
from .errors import KbitChecksumError, KbitFormatError, KbitValueError, KbitVersionError
from .quantize import QuantizedTensor
from .spec import QuantSpec

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # the safetensors limit
COMPONENTS = ("codes", "scales", "dq_absmax", "offsets")

#: safetensors dtype -> numpy dtype of the stored bytes (BF16 is read as raw uint16)
ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,  # read as their raw bit patterns
}
NP_TO_ST = {np.dtype(v): k for k, v in ST_DTYPES.items() if k not in ("BF16", "F8_E4M3", "F8_E5M2")}


def component_name(name: str, component: str) -> str:
    return f"{name}.kbit.{component}"


def crc32(arr: np.ndarray) -> str:
    return f"{zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast('B')) & 0xFFFFFFFF:08x}"


#: bytes written (and checksummed) at a time: the checksum reads each piece while it is
#: still in the CPU cache, and zlib/write release the GIL for every piece
WRITE_CHUNK = 4 * 1024 * 1024


def _copy_rest(src, dst) -> None:
    """Copy the file `src` from its current offset to the end onto `dst` at its current
    offset: in the kernel with copy_file_range where the system offers it (no trip through
    user space), else by reading and writing 16 MB pieces. Both files work on their
    descriptors (flush a buffered `dst` first); an error of the destination (ENOSPC)
    propagates."""
    fi, fo = src.fileno(), dst.fileno()
    left = os.fstat(fi).st_size - os.lseek(fi, 0, os.SEEK_CUR)
    cfr = getattr(os, "copy_file_range", None)
    while cfr is not None and left > 0:
        try:
            n = cfr(fi, fo, min(left, 1 << 30))
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                           errno.EPERM, errno.EBADF):
                break  # not offered here: copy through user space below
            raise
        if n == 0:
            break
        left -= n
    while left > 0:
        buf = os.read(fi, min(left, 16 * 1024 * 1024))
        if not buf:
            break
        left -= len(buf)
        view = memoryview(buf)
        while view:
            view = view[os.write(fo, view):]


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = (u[nan] >> 16).astype(np.uint16) | np.uint16(0x40)
    return r


def parse_version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(text).split("."))
        return major, minor
    except ValueError:
        raise KbitFormatError(f"unreadable kbit format version {text!r}") from None


def check_version(text: str, where: str) -> None:
    major, minor = parse_version(text)
    if major != FORMAT_VERSION[0]:
        raise KbitVersionError(
            f"{where} needs kbit format version {major}.x (written as {text}); this kbit reads "
            f"format {FORMAT_VERSION_STR}. " + ("Upgrade kbit to read it." if major > FORMAT_VERSION[0]
                                                 else "Convert the model again with this kbit."))


# ============================================================================== writer
@dataclass
class _Entry:
    name: str
    dtype: str
    shape: list
    begin: int
    end: int
    crc: str


def header_bound(name: str, bits: int | None = None, ndim: int = 8, parts: int = 4,
                 extra_bytes: int = 64) -> int:
    """An upper bound of the bytes one logical tensor of `ndim` dimensions adds to its shard's
    header: its stored entries, their checksums and its recipe (quantized with `bits`: `parts`
    stored parts (codes, scales, and dq_absmax and offsets where the spec has them; at most
    4) and a 2**bits codebook; None: kept as it is), with room for `extra_bytes` of extra
    recipe keys (64: the conversion's "error"). Every number is counted at 16 digits (sizes up
    to 10**16 bytes) or a float's longest repr, and every string at its longest value, so the
    bound is about 1.2-2.5x what the tensor adds. For KbitWriter(header_reserve=...)."""
    big, flt = 10 ** 15, -1.2345678901234567e-300   # 16 digits; the longest float text
    ndim = max(1, int(ndim))
    parts = ("codes", "scales", "dq_absmax", "offsets")[:max(1, min(4, int(parts)))] if bits is not None else ("",)
    stored = [name + (f".kbit.{p}" if p else "") for p in parts]
    entries = {n: {"dtype": "BF16", "shape": [big] * (2 if bits is not None else ndim),
                   "data_offsets": [big, big]} for n in stored}
    checksums = {n: "crc32:ffffffff" for n in stored}
    if bits is None:
        recipe = {"quantized": False, "shape": [big] * ndim, "orig_dtype": "float8_e4m3fnuz"}
    else:
        recipe = {"quantized": True, "shape": [big] * ndim, "orig_dtype": "float8_e4m3fnuz", "bits": 8,
                  "dtype": "quantile", "block_size": big, "scale": "fp16", "search": "none", "fp_exponent": big,
                  "codebook": [flt] * (2 ** int(bits)),
                  "components": {p: n for p, n in zip(parts, stored)}, "bits_per_weight": flt}
    sep = (",", ":")
    text = json.dumps(entries, separators=sep) + json.dumps(json.dumps(checksums, separators=sep)) + \
        json.dumps(json.dumps({name: recipe}, separators=sep))
    return len(text) + 2 * extra_bytes  # extra keys: escaped inside the metadata string


#: a one-pass shard's data start at a multiple of this (the header's room is rounded up to
#: it), so that its data can be written with O_DIRECT (aligned file offsets)
DATA_ALIGN = 4096


class _DirectFile:
    """A one-pass shard's file: sequential writes of the data from offset `base` (a multiple of
    DATA_ALIGN), then finish() puts the header at offset 0. With `direct`, the writes use
    O_DIRECT: the bytes go from an aligned staging buffer to the device, not through the page
    cache (on a virtual machine's ext4 here: 2.3 GB/s against 0.41 GB/s for buffered writes
    and their fsync, and no kernel writeback threads competing with the conversion for the
    CPU). Without it, or where the system or file system refuses O_DIRECT (no os.O_DIRECT,
    EINVAL at open or at a write: tmpfs, some network file systems), the same buffer goes out
    with plain buffered writes: the same bytes either way. finish() writes the unaligned tail,
    truncates to the exact size, writes the header at offset 0 and fsyncs."""

    CHUNK = 8 * 1024 * 1024

    def __init__(self, path: Path, base: int, direct: bool = True) -> None:
        self.path, self.offset = path, base
        flag = getattr(os, "O_DIRECT", 0) if direct else 0
        self.direct = False
        if flag:
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if not self.direct:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        raw = np.empty(self.CHUNK + DATA_ALIGN, np.uint8)
        start = (-raw.ctypes.data) % DATA_ALIGN
        self.buf = raw[start:start + self.CHUNK]
        self.fill = 0

    def write(self, piece) -> None:
        src = np.frombuffer(piece, np.uint8)
        i = 0
        while i < src.size:
            m = min(src.size - i, self.CHUNK - self.fill)
            self.buf[self.fill:self.fill + m] = src[i:i + m]
            self.fill += m
            i += m
            if self.fill == self.CHUNK:
                self._flush(self.CHUNK)

    def _to_buffered(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY)
        self.direct = False

    def _flush(self, nbytes: int) -> None:
        view = memoryview(self.buf)[:nbytes]
        done = 0
        while done < nbytes:
            try:
                done += os.pwrite(self.fd, view[done:], self.offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._to_buffered()  # O_DIRECT refused at write time: buffered from here on
        self.offset += nbytes
        self.fill = 0

    def finish(self, head: bytes, size: int) -> None:
        """The data's tail, the exact file size `size`, `head` at offset 0, fsync, close."""
        if self.fill:
            n = self.fill
            pad = -n % DATA_ALIGN if self.direct else 0
            self.buf[n:n + pad] = 0
            self._flush(n + pad)
        os.ftruncate(self.fd, size)
        if self.direct:
            self._to_buffered()
        view = memoryview(head)
        while view:
            view = view[os.pwrite(self.fd, view, len(head) - len(view)):]
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KbitWriter:
    """Write tensors into bounded shards in `out_dir` (which must exist and be empty of
    kbit files). Use as a context manager or call close(); abort() removes partial files.

        with KbitWriter(out, max_shard_bytes=2**31, model_metadata={...}) as w:
            w.add_quantized("model.layers.0.mlp.up_proj.weight", qt)
            w.add_tensor("model.norm.weight", norm, orig_dtype="bfloat16")
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3,
                 model_metadata: dict | None = None, tool: str = "kbitformat",
                 resume: bool = False, kbit_metadata: bool = True,
                 header_reserve=None, direct_io: bool = False) -> None:
        """header_reserve: None, or a function of the number of logical tensors added so far
        that returns an upper bound of the header bytes of the shard about to start (e.g.
        the sum of header_bound() over the tensors still to come). With it, a shard's data is
        written straight into the shard file behind that much room, and the header is written
        into the room at the end, padded with spaces (section 3 of SPEC.md): no second pass
        over the data. Without it (or when the header outgrows the room) the data goes to a
        temporary file that is copied behind the header when the shard is finished; both
        give valid shards, and the same bounds give the same bytes. A one-pass shard's data
        start at a multiple of DATA_ALIGN. direct_io: write one-pass shards with O_DIRECT
        where the file system takes it (_DirectFile; the same bytes)."""
        if max_shard_bytes < 1:
            raise KbitValueError("the shard size must be positive")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = int(max_shard_bytes)
        self.model_metadata = dict(model_metadata or {})
        self.tool = tool
        self.kbit_metadata = kbit_metadata  # False: plain safetensors (e.g. a dequantized export)
        self.header_reserve = header_reserve
        self.direct_io = bool(direct_io)
        self._added = 0  # logical tensors added by this writer
        self._shards: list[Path] = []        # finished shards (temporary names)
        self._weight_map: dict[str, int] = {}  # stored name -> shard number
        self._total = 0
        self._state = "open"
        #: logical tensor names found in finished shards adopted by resume
        self.resumed: list[str] = []
        for pattern in (".shard-*.data.tmp", ".shard-*.safetensors.part"):
            for stale in self.out.glob(pattern):
                stale.unlink()
        if resume:
            self._adopt_finished()
        else:
            for stale in self.out.glob(".shard-*.safetensors.tmp"):
                stale.unlink()
        self._data = self._data_path = None  # the shard being written starts with its first tensor

    def _adopt_finished(self) -> None:
        """Take over the finished shards of an interrupted run into the same folder: each
        must parse, pass every checksum and carry the same model metadata; the first
        that does not is removed with everything after it."""
        found = sorted(self.out.glob(".shard-*.safetensors.tmp"))
        for i, path in enumerate(found):
            ok = path.name == f".shard-{i + 1:05d}.safetensors.tmp"
            if ok:
                try:
                    meta, tensors, kb = read_header(path)
                    ok = kb.get("kbit.model") == self.model_metadata
                    if ok:
                        with open(path, "rb") as f:
                            for t in tensors.values():
                                f.seek(t.offset)
                                if t.crc is None or crc32(np.frombuffer(f.read(t.nbytes), np.uint8)) != t.crc:
                                    ok = False
                                    break
                except KbitFormatError:
                    ok = False
            if not ok:
                for p in found[i:]:
                    p.unlink()
                return
            for name, t in tensors.items():
                self._weight_map[name] = i + 1
                self._total += t.nbytes
            self.resumed += list(kb.get("kbit.tensors", {}))
            self._shards.append(path)

    # -- state
    def _start_shard(self) -> None:
        number = len(self._shards) + 1
        room = 0
        if self.header_reserve is not None:
            fixed = len(json.dumps(json.dumps(self.model_metadata, separators=(",", ":")))) + \
                len(json.dumps(self.tool)) + 512  # the metadata every shard carries
            room = int(self.header_reserve(self._added)) + fixed
        #: bytes before the data in the file being written: 8 + the header's room, rounded up
        #: to DATA_ALIGN (one pass), or 0 (a temporary data file, copied behind the header)
        self._base = 8 + room + (-(8 + room) % DATA_ALIGN) if room > 0 else 0
        if self._base:
            self._data_path = self.out / f".shard-{number:05d}.safetensors.part"
            self._data = _DirectFile(self._data_path, self._base, direct=self.direct_io)
        else:
            self._data_path = self.out / f".shard-{number:05d}.data.tmp"
            self._data = open(self._data_path, "wb")
        self._entries: list[_Entry] = []
        self._recipes: dict[str, dict] = {}
        self._pos = 0

    def _require_open(self) -> None:
        if self._state != "open":
            raise KbitValueError(f"the writer is {self._state}; no more tensors can be added")

    def _write_array(self, name: str, arr: np.ndarray, st_dtype: str | None = None) -> None:
        if name in self._weight_map or any(e.name == name for e in self._entries):
            raise KbitValueError(f"tensor {name!r} was already written")
        arr = np.require(arr, requirements="C")  # (np.ascontiguousarray would store a 0-d array as [1])
        if st_dtype is None:
            if arr.dtype not in NP_TO_ST:
                raise KbitValueError(f"{name}: dtype {arr.dtype} cannot be stored in safetensors")
            st_dtype = NP_TO_ST[arr.dtype]
        mv = memoryview(arr).cast("B") if arr.size else memoryview(b"")
        n = len(mv)
        crc = 0
        for i in range(0, n, WRITE_CHUNK):
            piece = mv[i:i + WRITE_CHUNK]
            self._data.write(piece)
            crc = zlib.crc32(piece, crc)
        self._entries.append(_Entry(name, st_dtype, list(arr.shape), self._pos, self._pos + n,
                                    f"{crc & 0xFFFFFFFF:08x}"))
        self._pos += n

    def _make_room(self, nbytes: int) -> None:
        if self._data is None:
            self._start_shard()
        elif self._entries and self._pos + nbytes > self.max_shard_bytes:
            self._finish_shard()
            self._start_shard()

    # -- public API
    def add_quantized(self, name: str, qt: QuantizedTensor, extra: dict | None = None) -> dict:
        """Store a quantized tensor (all its components in one shard). Returns its recipe."""
        self._require_open()
        comps = qt.components()
        self._make_room(sum(a.nbytes for a in comps.values()))
        recipe = {
            "quantized": True,
            "shape": list(qt.shape),
            "orig_dtype": qt.orig_dtype,
            "bits": qt.spec.bits,
            "dtype": qt.spec.dtype,
            "block_size": qt.block_size,
            "scale": qt.spec.scale,
            "search": qt.spec.search,
            "fp_exponent": qt.spec.exponent_bits,
            "codebook": [float(v) for v in qt.codebook.astype(np.float32)],
            "components": {c: component_name(name, c) for c in comps},
            "bits_per_weight": qt.bits_per_weight,
        }
        if extra:
            recipe.update(extra)
        for c, arr in comps.items():
            self._write_array(component_name(name, c), arr)
        self._recipes[name] = recipe
        self._added += 1
        return recipe

    def add_tensor(self, name: str, arr: np.ndarray, orig_dtype: str | None = None,
                   st_dtype: str | None = None, extra: dict | None = None) -> dict:
        """Store a tensor as it is. For bfloat16 pass the raw uint16 bits with st_dtype='BF16'."""
        self._require_open()
        arr = np.asarray(arr)
        self._make_room(arr.nbytes)
        self._write_array(name, arr, st_dtype)
        recipe = {"quantized": False, "shape": list(arr.shape),
                  "orig_dtype": orig_dtype or ("bfloat16" if st_dtype == "BF16" else str(arr.dtype))}
        if extra:
            recipe.update(extra)
        self._recipes[name] = recipe
        self._added += 1
        return recipe

    def _shard_metadata(self) -> dict[str, str]:
        if not self.kbit_metadata:
            return {"format": "pt"}
        return {
            "format": "pt",
            "kbit.format": FORMAT_NAME,
            "kbit.version": FORMAT_VERSION_STR,
            "kbit.tool": self.tool,
            "kbit.tensors": json.dumps(self._recipes, separators=(",", ":")),
            "kbit.checksums": json.dumps({e.name: f"crc32:{e.crc}" for e in self._entries}, separators=(",", ":")),
            "kbit.model": json.dumps(self.model_metadata, separators=(",", ":")),
        }

    def _finish_shard(self) -> None:
        one_pass = isinstance(self._data, _DirectFile)
        if not one_pass:
            self._data.close()
        header = {"__metadata__": self._shard_metadata()}
        for e in self._entries:
            header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [e.begin, e.end]}
        hb = json.dumps(header, separators=(",", ":")).encode()
        number = len(self._shards) + 1
        path = self.out / f".shard-{number:05d}.safetensors.tmp"
        if self._base and 8 + len(hb) <= self._base:  # the header fits the room left for it
            hb += b" " * (self._base - 8 - len(hb))
            self._data.finish(struct.pack("<Q", len(hb)) + hb, self._base + self._pos)
            os.replace(self._data_path, path)
        else:
            if one_pass:  # the header outgrew its room: the data are copied behind it
                self._data.finish(b"", self._base + self._pos)
            hb += b" " * (-len(hb) % 8)  # data starts 8-byte aligned
            with open(path, "wb") as f, open(self._data_path, "rb", buffering=0) as d:
                f.write(struct.pack("<Q", len(hb)))
                f.write(hb)
                f.flush()
                d.seek(self._base)
                _copy_rest(d, f)
                f.flush()
                os.fsync(f.fileno())
            self._data_path.unlink()
        for e in self._entries:
            self._weight_map[e.name] = number
        self._total += self._pos
        self._shards.append(path)

    def close(self) -> Path:
        """Finish the last shard, give shards their final names and write the index."""
        if self._state == "closed":
            return self.out / INDEX_NAME
        self._require_open()
        if self._data is None:
            self._start_shard()  # no tensor added: one shard holding none
        self._finish_shard()
        self._state = "closed"
        n = len(self._shards)
        names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for tmp, final in zip(self._shards, names):
            os.replace(tmp, self.out / final)
        meta = {"total_size": self._total}
        if self.kbit_metadata:
            meta.update({"kbit.format": FORMAT_NAME, "kbit.version": FORMAT_VERSION_STR,
                         "kbit.tool": self.tool, "kbit.model": self.model_metadata})
        index = {
            "metadata": meta,
            "weight_map": {name: names[i - 1] for name, i in sorted(self._weight_map.items())},
        }
        tmp = self.out / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.out / INDEX_NAME)
        return self.out / INDEX_NAME

    def abort(self, keep_finished: bool = False) -> None:
        """Remove every file this writer made (keep_finished: all but the finished shards,
        which a later KbitWriter(..., resume=True) can adopt); the writer is unusable afterwards."""
        if self._state == "open" and self._data is not None:
            self._data.close()
        self._state = "aborted"
        for p in [self._data_path, *([] if keep_finished else self._shards)]:
            if p is None:
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "KbitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(keep_finished=issubclass(exc_type, KeyboardInterrupt))


# ============================================================================== reader
@dataclass
class StoredTensor:
    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int   # absolute byte offset in the file
    nbytes: int
    crc: str | None


def read_header(path: Path, strict_dtypes: bool = True) -> tuple[dict, dict[str, StoredTensor], dict]:
    """Parse and validate one safetensors file's header (also used for plain checkpoints).
    Returns (metadata dict of str, stored tensors by name, parsed kbit fields).
    strict_dtypes=False lets dtypes outside ST_DTYPES through (their sizes unchecked)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise KbitFormatError(f"{path}: too short to be a safetensors file ({size} bytes; truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise KbitFormatError(f"{path}: corrupt safetensors header: its header length field claims a "
                                      f"{n}-byte header but the file is {size} bytes (truncated or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise KbitFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KbitFormatError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise KbitFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise KbitFormatError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start = 8 + n
    data_len = size - data_start
    kb = {}
    for key in ("kbit.tensors", "kbit.checksums", "kbit.model"):
        if key in meta:
            try:
                kb[key] = json.loads(meta[key])
            except json.JSONDecodeError:
                raise KbitFormatError(f"{path}: corrupt safetensors header (field {key} is not JSON)") from None
    checks = kb.get("kbit.checksums", {})
    tensors: dict[str, StoredTensor] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            b, e = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise KbitFormatError(f"{path}: corrupt safetensors header (bad entry for tensor {name!r})") from None
        if dtype not in ST_DTYPES and (strict_dtypes or not isinstance(dtype, str)):
            raise KbitFormatError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or not 0 <= b <= e:
            raise KbitFormatError(f"{path}: corrupt safetensors header: tensor {name!r} has bad offsets or shape")
        if e > data_len:
            raise KbitFormatError(f"{path} is truncated or corrupt: tensor {name!r} ends at data byte {e} "
                                  f"but the file holds only {data_len} data bytes")
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(ST_DTYPES[dtype]).itemsize if dtype in ST_DTYPES else e - b
        if need != e - b:
            raise KbitFormatError(f"{path}: corrupt safetensors header: tensor {name!r} ({dtype}, shape "
                                  f"{list(shape)}) spans {e - b} bytes but needs {need} bytes")
        c = checks.get(name)
        tensors[name] = StoredTensor(path, name, dtype, shape, data_start + b, e - b,
                                     c[6:] if isinstance(c, str) and c.startswith("crc32:") else None)
        spans.append((b, e, name))
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b < pos:
            raise KbitFormatError(f"{path}: tensor {name!r} overlaps another tensor's bytes")
        if b > pos:
            raise KbitFormatError(f"{path}: a gap of {b - pos} bytes precedes tensor {name!r}")
        pos = e
    if pos != data_len:
        raise KbitFormatError(f"{path}: {data_len - pos} bytes after the last tensor (corrupt file)")
    return meta, tensors, kb


def _recipe_spec(name: str, r: dict) -> QuantSpec:
    try:
        return QuantSpec(bits=int(r["bits"]), dtype=r["dtype"],
                         block_size=int(r["block_size"]) if int(r["block_size"]) <= 4096 else 0,
                         scale=r["scale"], search=r.get("search", "none"),
                         fp_exponent=r.get("fp_exponent") if r["dtype"] == "fp" else None)
    except (KeyError, TypeError, ValueError) as e:
        raise KbitFormatError(f"tensor {name!r}: invalid recipe in the header ({e})") from None


class KbitReader:
    """Lazy reader of a kbit model (a folder with an index, or one .safetensors file).

    Nothing is read but headers until a tensor is asked for; each tensor's bytes are
    memory-mapped and their CRC-32 checked (verify=True) before use.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        if not self.path.exists():
            raise KbitFormatError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            idx = self.path / INDEX_NAME
            if idx.exists():
                try:
                    index = json.loads(idx.read_text())
                    files = sorted(set(index["weight_map"].values()))
                    self.index_metadata = index.get("metadata", {})
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise KbitFormatError(f"{idx}: corrupt index ({e})") from None
            else:
                files = sorted(p.name for p in self.path.glob("*.safetensors"))
                self.index_metadata = {}
            if not files:
                raise KbitFormatError(f"{self.path}: no safetensors files")
            paths = [self.path / f for f in files]
        else:
            paths, self.index_metadata = [self.path], {}
        if "kbit.version" in self.index_metadata:
            check_version(self.index_metadata["kbit.version"], str(self.path))
        self.stored: dict[str, StoredTensor] = {}
        self.recipes: dict[str, dict] = {}
        self.file_metadata: dict[Path, dict] = {}
        self.model_metadata: dict = dict(self.index_metadata.get("kbit.model", {}))
        for p in paths:
            if not p.exists():
                raise KbitFormatError(f"{p}: missing shard (named in the index)")
            meta, tensors, kb = read_header(p)
            if meta.get("kbit.format") != FORMAT_NAME:
                raise KbitFormatError(f"{p}: not a kbit file (no kbit.format in its metadata); "
                                      "plain checkpoints are read by the conversion sources")
            check_version(meta.get("kbit.version", "?"), str(p))
            self.file_metadata[p] = meta
            self.model_metadata = self.model_metadata or kb.get("kbit.model", {})
            for name, t in tensors.items():
                if name in self.stored:
                    raise KbitFormatError(f"{p}: tensor {name!r} also appears in {self.stored[name].file}")
                self.stored[name] = t
            for name, r in kb.get("kbit.tensors", {}).items():
                self.recipes[name] = r
        for name, r in self.recipes.items():
            names = r.get("components", {}).values() if r.get("quantized") else [name]
            for c in names:
                if c not in self.stored:
                    raise KbitFormatError(f"{self.path}: tensor {name!r} lacks its stored part {c!r}")

    # -- listing
    def names(self) -> list[str]:
        return list(self.recipes)

    def __contains__(self, name: str) -> bool:
        return name in self.recipes

    def recipe(self, name: str) -> dict:
        try:
            return self.recipes[name]
        except KeyError:
            raise KbitValueError(f"no tensor named {name!r} in {self.path}") from None

    def is_quantized(self, name: str) -> bool:
        return bool(self.recipe(name).get("quantized"))

    # -- bytes
    def stored_array(self, stored_name: str) -> np.ndarray:
        """The stored array (memory-mapped, read-only), checksum-verified."""
        t = self.stored[stored_name]
        dt = np.dtype(ST_DTYPES[t.dtype])
        try:
            mm = np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,)) \
                if t.nbytes else np.zeros(0, np.uint8)
        except (OSError, ValueError) as e:
            raise KbitFormatError(f"{t.file}: cannot map tensor {stored_name!r}: {e}") from None
        if self.verify:
            self.check(stored_name, mm)
        arr = mm.view(dt) if (t.offset % dt.itemsize == 0) else np.frombuffer(mm.tobytes(), dtype=dt)
        return arr.reshape(t.shape)

    def check(self, stored_name: str, mm: np.ndarray | None = None) -> None:
        t = self.stored[stored_name]
        if t.crc is None:
            raise KbitChecksumError(f"{t.file}: tensor {stored_name!r} has no recorded checksum")
        if mm is None:
            mm = np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,)) \
                if t.nbytes else np.zeros(0, np.uint8)
        got = crc32(mm)
        if got != t.crc:
            raise KbitChecksumError(f"{t.file}: tensor {stored_name!r} is corrupt "
                                    f"(checksum {got}, recorded {t.crc})")

    def verify_all(self) -> list[str]:
        """Check every stored tensor's checksum; returns the list of problems found."""
        problems = []
        for name in self.stored:
            try:
                self.check(name)
            except KbitFormatError as e:
                problems.append(str(e))
        return problems

    # -- tensors
    def quantized(self, name: str) -> QuantizedTensor:
        r = self.recipe(name)
        if not r.get("quantized"):
            raise KbitValueError(f"{name!r} is not quantized")
        spec = _recipe_spec(name, r)
        comps = {c: self.stored_array(s) for c, s in r["components"].items()}
        cb = np.asarray(r["codebook"], dtype=np.float32)
        if cb.shape != (2**spec.bits,) or not np.all(np.isfinite(cb)):
            raise KbitFormatError(f"tensor {name!r}: codebook must hold {2**spec.bits} finite values")
        qt = QuantizedTensor(shape=tuple(r["shape"]), spec=spec, codebook=cb,
                             block_size=int(r["block_size"]), codes=comps["codes"],
                             scales={c: comps[c] for c in ("scales", "dq_absmax") if c in comps},
                             offsets=comps.get("offsets"), orig_dtype=r.get("orig_dtype", "float32"))
        _check_layout(name, qt)
        return qt

    def load(self, name: str, ops=None) -> np.ndarray:
        """float32 values of a tensor (dequantized when quantized)."""
        from .quantize import dequantize
        from .reference import NumpyOps
        r = self.recipe(name)
        if r.get("quantized"):
            return dequantize(self.quantized(name), ops or NumpyOps)
        t = self.stored[name]
        arr = self.stored_array(name)
        if t.dtype == "BF16":
            return bf16_to_f32(arr)
        return np.asarray(arr, dtype=np.float32) if np.issubdtype(arr.dtype, np.floating) else np.array(arr)


def _check_layout(name: str, qt: QuantizedTensor) -> None:
    """Component shapes and dtypes must agree with the recipe, so a wrong header can never
    decode into a wrong tensor."""
    rows, nb, k, B = qt.rows, qt.blocks_per_row, qt.spec.bits, qt.block_size
    if B % 32 or B < 32:
        raise KbitFormatError(f"tensor {name!r}: block size {B} is not a positive multiple of 32")
    want = {"codes": ((rows, nb * B // 32 * k), np.uint32)}
    enc = qt.spec.scale
    sdt = {"fp16": np.float16, "fp32": np.float32, "e8": np.uint8, "dq": np.uint8}[enc]
    want["scales"] = ((rows, nb), sdt)
    if enc == "dq":
        from .constants import DQ_GROUP
        want["dq_absmax"] = ((-(-rows * nb // DQ_GROUP),), np.float32)
    if qt.spec.affine:
        want["offsets"] = ((rows, nb), np.uint8 if enc in ("e8", "dq") else sdt)
    have = qt.components()
    if set(have) != set(want):
        raise KbitFormatError(f"tensor {name!r}: stored parts {sorted(have)} do not match its recipe ({sorted(want)})")
    for c, (shape, dt) in want.items():
        a = have[c]
        if tuple(a.shape) != shape or a.dtype != np.dtype(dt):
            raise KbitFormatError(f"tensor {name!r}: part {c} is {a.dtype}{list(a.shape)}, "
                                  f"its recipe needs {np.dtype(dt)}{list(shape)}")
