"""KbitLinear: a linear layer that keeps its weight packed (k-bit codes in bit planes,
block scales, optional offsets, the codebook) on the device and dequantizes it inside
forward, with the exact float32 values of kbitformat's numpy reference
(v = cb[code] * s, + o for affine; each operation rounded to float32).

The dequantization is plain torch, so it runs on the CPU and on CUDA alike:
  1. unpack: each uint32 word of plane j holds bit j of 32 consecutive codes. A byte of a
     plane is looked up in a 256-entry table of int64 whose 8 bytes are the 8 bits it holds,
     shifted to position j; summing the k planes' lookups gives 8 codes per int64 (no carries:
     every byte stays below 2**k <= 256), i.e. the codes as bytes, in order.
  2. decode: cb[code] * s (+ o), per block, in float32.

The same values come faster from kbit's Numba kernels (bit-identical by the kernel contract,
and tested against this module): kbitcli.kernels.cpu for CPU tensors, kbitcli.kernels.cuda
for CUDA tensors (handed over through __cuda_array_interface__, no copies). KbitLinear's
kernel "auto" uses them when they can be imported (the CUDA one is imported only when a CUDA
tensor is dequantized; if it fails, the layer falls back to the torch code for good, with a
warning); "torch" forces the torch code, "numba" the Numba kernels.

Decode steps take a fused path. When forward gets few input rows (M = x.numel() // in_features
<= GEMV_MAX_ROWS = 8: a decode step, or a very short prompt), the layout is "out_in" and the
kernel is not "torch", it never builds the weight: a fused dequantize + matrix-vector kernel
reads the packed words and writes y (M, out) directly. On the CPU that is
kbitcli.kernels.cpu.gemv (Numba: each row decoded block by block, dotted with every input
row in float32, the block's scale applied to the block's sum; parallel over rows); on CUDA,
kbitcli.kernels.cuda.gemv_torch (on failure: a warning, and dequantize + matmul from then
on). Decoding is memory-bound, and dequantize + matmul writes and re-reads 4 bytes per weight
where the GEMV reads k/8 (plus the scales). The GEMV sums in another order than F.linear, so
its outputs agree with the dequantized weight's to float32 rounding (about cols * 2**-24
relative to sum|x||w|), not bit for bit; more input rows (prompt passes, perplexity) and the
"in_out" layout (GPT-2's Conv1D) keep dequantize + matmul, bit-identical to a model
dequantized on load. `fused_gemv = False` on a layer switches the fused path off.

Code layouts. The codes buffer starts in the format's bit planes ("planes"). For k = 2, 4, 8 a
layer switches it, at its first forward, to the runner's "bytes" layout (use_byte_layout: the
same int32 tensor of the same shape, converted in place, so memory stays k bits per weight):
the codes of a row little-endian, 8 // k to a byte (code i at bits [(i % (8//k)) * k, +k) of
byte i // (8//k)), i.e. 32 // k consecutive codes per int32 word, code i of the word at bits
[i*k, i*k + k). Decoding it needs no bit-plane unpacking (CPU decode GEMV: one table look-up
per byte, kbitcli.kernels.cpu.gemv(layout="bytes"), ~1.5x faster than the planes'); the
dequantized values are the same, bit for bit. On CUDA the switch happens only when
kbitcli.kernels.cuda has dequantize_bytes_torch and gemv_bytes_torch. k = 3, 5, 6, 7 keep the
planes; so does a layer (or the class) with `byte_layout = False` before its first forward.
state_dict() always holds the format's planes (converted on save; a loaded state dict puts
the layer back on planes until its next forward).
"""
from __future__ import annotations

import functools
import importlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.kernels._checks import BYTE_LAYOUT_BITS, check_byte_bits


def _plane_tables() -> torch.Tensor:
    """(8, 256) int64: table[j, b] has, in its byte i, bit i of b shifted left by j."""
    b = np.arange(256, dtype=np.uint64)
    out = np.zeros((8, 256), dtype=np.uint64)
    for j in range(8):
        for i in range(8):
            out[j] |= ((b >> np.uint64(i)) & np.uint64(1)) << np.uint64(8 * i + j)
    return torch.from_numpy(out.view(np.int64).copy())


_TABLES = _plane_tables()
_TABLES_BY_DEVICE: dict[torch.device, torch.Tensor] = {}


def plane_tables(device: torch.device) -> torch.Tensor:
    t = _TABLES_BY_DEVICE.get(device)
    if t is None:
        t = _TABLES_BY_DEVICE[device] = _TABLES.to(device)
    return t


def unpack_codes(words: torch.Tensor, k: int) -> torch.Tensor:
    """words: int32 (or uint32 viewed as int32) (rows, G*k) -> codes uint8 (rows, G*32).
    The inverse of kbitformat.reference.pack (little-endian byte order, as on every platform
    torch supports)."""
    rows = words.shape[0]
    by = words.contiguous().view(torch.uint8).view(rows, -1, k, 4)       # byte q of plane j: codes 8q..8q+7
    tables = plane_tables(words.device)
    acc = tables[0][by[:, :, 0].long()]
    for j in range(1, k):
        acc += tables[j][by[:, :, j].long()]
    return acc.view(torch.uint8).view(rows, -1)                          # (rows, G, 4) int64 -> (rows, G*32) bytes


def codes_to_bytes(codes: torch.Tensor, k: int) -> torch.Tensor:
    """codes uint8 (rows, n), n a multiple of 32 // k * 4 -> int32 (rows, n * k // 32) in the byte
    layout: 8 // k codes per byte, code i at bits [(i % (8//k)) * k, +k) of byte i // (8//k), the
    bytes read as little-endian int32 words (so a word holds 32 // k consecutive codes, code i of
    the word at bits [i*k, i*k + k))."""
    k = check_byte_bits(k)
    rows = codes.shape[0]
    per = 8 // k
    c = codes.contiguous().view(rows, -1, per)
    b = c[..., 0].clone()
    for t in range(1, per):
        b |= c[..., t] << (t * k)
    return b.view(torch.int32)


def bytes_to_codes(words: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of codes_to_bytes: int32 (rows, W) in the byte layout -> codes uint8 (rows, W * 32 // k)."""
    k = check_byte_bits(k)
    rows = words.shape[0]
    b = words.contiguous().view(torch.uint8).view(rows, -1)
    if k == 8:
        return b
    mask = (1 << k) - 1
    return torch.stack([(b >> (t * k)) & mask for t in range(8 // k)], dim=-1).view(rows, -1)


def planes_to_bytes(words: torch.Tensor, k: int) -> torch.Tensor:
    """Bit-plane words (the format: int32 (rows, G*k)) -> the same codes in the byte layout, an
    int32 tensor of the same shape, on the same device (CPU or CUDA)."""
    return codes_to_bytes(unpack_codes(words, k), k)


def bytes_to_planes(words: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of planes_to_bytes: byte-layout words -> the format's bit-plane words (int32)."""
    k = check_byte_bits(k)
    rows = words.shape[0]
    c = bytes_to_codes(words, k).view(rows, -1, 32).to(torch.int64)          # (rows, G, 32)
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    planes = torch.stack([(((c >> j) & 1) << shifts).sum(dim=-1) for j in range(k)], dim=-1)  # (rows, G, k)
    planes = torch.where(planes >= 1 << 31, planes - (1 << 32), planes)    # uint32 -> int32 bits
    return planes.to(torch.int32).view(rows, -1)


def dequantize_torch(words: torch.Tensor, k: int, block: int, cols: int, scales: torch.Tensor,
                     offsets: torch.Tensor | None, codebook: torch.Tensor, layout: str = "planes") -> torch.Tensor:
    """float32 (rows, cols), identical to kbitformat.reference.NumpyOps.dequantize.
    scales/offsets: float32 (rows, blocks) (decoded); codebook: float32 (2**k,); layout: the
    words' code layout ("planes", the format's, or "bytes", see codes_to_bytes)."""
    rows = words.shape[0]
    codes = bytes_to_codes(words, k) if layout == "bytes" else unpack_codes(words, k)
    nb = scales.shape[1]
    v = codebook[codes[:, :nb * block].long()].view(rows, nb, block)
    v = v * scales[..., None]
    if offsets is not None:
        v = v + offsets[..., None]
    v = v.view(rows, nb * block)
    return v if nb * block == cols else v[:, :cols]


KERNELS = ("auto", "torch", "numba")
#: input rows (tokens x batch) up to which forward uses the fused GEMV (decode steps)
GEMV_MAX_ROWS = 8
def _kernels_once(module: str, *names: str):
    """A function that returns the attributes `names` (dotted paths; one name: the attribute,
    several: a tuple) of kbitcli.kernels.<module>, imported on the first call and remembered,
    or None for good when the module cannot be imported or lacks one of them (the caller
    then uses its torch code or another path)."""
    box: list = []

    def get():
        if not box:
            try:
                mod = importlib.import_module(f"kbitcli.kernels.{module}")
                got = tuple(functools.reduce(getattr, n.split("."), mod) for n in names)
                box.append(got[0] if len(got) == 1 else got)
            except Exception:  # noqa: BLE001 - any import problem: the fallback of the caller
                box.append(None)
        return box[0]
    return get


#: kbitcli.kernels.cpu.CpuOps.dequantize (Numba), or None: the torch code
numba_dequantize = _kernels_once("cpu", "CpuOps.dequantize")
#: kbitcli.kernels.cpu.gemv_plan (prepares a packed weight for the fused CPU GEMV of decode
#: steps; the plan is called with x), or None: dequantize + matmul
numba_gemv_plan = _kernels_once("cpu", "gemv_plan")
#: kbitcli.kernels.cpu.planes_to_bytes_inplace, or None: the torch converter
numba_planes_to_bytes = _kernels_once("cpu", "planes_to_bytes_inplace")
#: (dequantize_bytes_torch, gemv_bytes_torch) of kbitcli.kernels.cuda, or None: layers on a
#: GPU keep the bit planes
cuda_byte_kernels = _kernels_once("cuda", "dequantize_bytes_torch", "gemv_bytes_torch")


def dequantize_numba(words: torch.Tensor, k: int, block: int, cols: int, scales: torch.Tensor,
                     offsets: torch.Tensor | None, codebook: torch.Tensor, layout: str = "planes") -> torch.Tensor:
    """The same as dequantize_torch for CPU tensors, with the Numba CPU kernel (byte layout:
    kbitcli.kernels.cpu.dequantize_bytes)."""
    fn = numba_dequantize()
    if fn is None:
        raise RuntimeError("the Numba CPU kernels (kbitcli.kernels.cpu) cannot be imported")
    if layout == "bytes":
        from kbitcli.kernels.cpu import dequantize_bytes as fn
    out = fn(words.numpy().view(np.uint32), k, block, cols, scales.numpy(),
             None if offsets is None else offsets.numpy(), codebook.numpy())
    return torch.from_numpy(out)


def dequantize_numba_cuda(words: torch.Tensor, k: int, block: int, cols: int, scales: torch.Tensor,
                          offsets: torch.Tensor | None, codebook: torch.Tensor, layout: str = "planes") -> torch.Tensor:
    """dequantize_torch with kbitcli.kernels.cuda (imported here, on first use). CUDA tensors go
    to the kernel in place and the result stays on the GPU; CPU tensors (Numba's CUDA simulator
    in the tests) are copied over and back. layout "bytes": dequantize_bytes_torch."""
    if layout == "bytes":
        from kbitcli.kernels.cuda import dequantize_bytes_torch
        return dequantize_bytes_torch(words, k, block, cols, scales, offsets, codebook)
    from kbitcli.kernels.cuda import CudaOps, dequantize_torch as cuda_dequantize
    if words.is_cuda:
        return cuda_dequantize(words, k, block, cols, scales, offsets, codebook)
    out = CudaOps.dequantize_device(words.numpy().view(np.uint32), k, block, cols, scales.numpy(),
                                    None if offsets is None else offsets.numpy(), codebook.numpy())
    return torch.from_numpy(np.asarray(out.copy_to_host(), dtype=np.float32))


class KbitLinear(nn.Module):
    """Linear layer over a packed kbit weight.

    layout "out_in": the stored tensor is nn.Linear's weight (out, in): y = x W^T + b.
    layout "in_out": the stored tensor is (in, out) (GPT-2's Conv1D):   y = x W + b.
    Buffers: codes (int32 view of the uint32 words), scales and offsets (decoded float32),
    codebook (float32). For a few input rows (decode steps) forward runs the fused GEMV on
    the packed words (see the module docstring); otherwise the dequantized weight is built in
    forward and dropped after use. dtype is the compute dtype it is cast to (float32 keeps the
    reference values exactly).
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 codebook: torch.Tensor, bits: int, block_size: int, shape: tuple[int, int],
                 bias: torch.Tensor | None = None, layout: str = "out_in", dtype: torch.dtype = torch.float32,
                 kernel: str = "auto") -> None:
        super().__init__()
        if layout not in ("out_in", "in_out"):
            raise ValueError(f"layout must be 'out_in' or 'in_out', got {layout!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        #: layout of the codes buffer: "planes" (the format's, as loaded) or "bytes" (see
        #: use_byte_layout; chosen at the first forward when byte_layout is True)
        self.code_layout = "planes"
        self._layout_chosen = False
        #: decode steps (few input rows) through a fused dequantize+matvec kernel that reads
        #: only the packed words (the CUDA kernel on a GPU); False: always dequantize the
        #: whole weight and matmul (also what "torch" kernel does)
        self.fused_gemv = True
        self._cpu_plan = None  # (kbitcli.kernels.cpu.GemvPlan, codes.data_ptr(), code_layout) made on first use
        self.bits, self.block_size, self.shape, self.layout, self.dtype = int(bits), int(block_size), tuple(shape), layout, dtype
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("codebook", codebook)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        if layout == "out_in":
            self.out_features, self.in_features = self.shape
        else:
            self.in_features, self.out_features = self.shape

    @classmethod
    def from_quantized(cls, qt, bias: np.ndarray | None = None, layout: str = "out_in",
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       kernel: str = "auto") -> "KbitLinear":
        """From a kbitformat QuantizedTensor (2-D)."""
        if len(qt.shape) != 2:
            raise ValueError(f"KbitLinear needs a 2-D weight, got shape {list(qt.shape)}")
        s = qt.decoded_scales()
        o = qt.decoded_offsets(s)
        t = lambda a: torch.from_numpy(np.array(a, order="C")).to(device)  # noqa: E731
        codes = torch.from_numpy(np.array(qt.codes, dtype=np.uint32, order="C").view(np.int32)).to(device)
        return cls(codes, t(s.astype(np.float32)), None if o is None else t(o.astype(np.float32)),
                   t(qt.codebook.astype(np.float32)), qt.spec.bits, qt.block_size, tuple(qt.shape),
                   None if bias is None else t(np.asarray(bias, np.float32)), layout, dtype, kernel)

    #: class default: at its first forward a layer with k in BYTE_LAYOUT_BITS converts its codes
    #: to the byte layout (use_byte_layout), on a GPU only when kbitcli.kernels.cuda has the byte
    #: kernels. Set False (on the class or on a layer, before its first forward) to keep the planes.
    byte_layout = True

    def use_byte_layout(self) -> bool:
        """Convert the codes buffer to the byte layout in place (the same int32 tensor, the same
        memory: 8 // k codes per byte, 32 // k per word, code i of a word at bits [i*k, i*k + k)).
        The decode GEMV and the dequantizer then skip the bit-plane unpacking; the values are
        the same, bit for bit. False (nothing done) when k is not 2, 4 or 8; True when the codes
        are (already) bytes. The state dict keeps the format's bit planes (converted on save)."""
        self._layout_chosen = True
        if self.code_layout == "bytes":
            return True
        if self.bits not in BYTE_LAYOUT_BITS:
            return False
        with torch.no_grad():
            fn = numba_planes_to_bytes() if self.codes.device.type == "cpu" and self.codes.is_contiguous() else None
            if fn is not None:
                fn(self.codes.numpy(), self.bits)  # in place, row by row
            else:
                self.codes.copy_(planes_to_bytes(self.codes, self.bits))
        self.code_layout = "bytes"
        return True

    def use_plane_layout(self) -> None:
        """Convert the codes buffer back to the format's bit planes in place (and keep them:
        no byte layout at later forwards)."""
        self._layout_chosen = True
        if self.code_layout == "bytes":
            with torch.no_grad():
                self.codes.copy_(bytes_to_planes(self.codes, self.bits))
            self.code_layout = "planes"

    def _choose_layout(self) -> None:
        self._layout_chosen = True
        if not self.byte_layout or self.bits not in BYTE_LAYOUT_BITS or self.code_layout != "planes":
            return
        if self.codes.is_cuda and self.kernel != "torch" and cuda_byte_kernels() is None:
            return  # the bit-plane CUDA kernels beat a torch dequantize of the bytes
        self.use_byte_layout()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.code_layout == "bytes" and prefix + "codes" in destination:  # the format's layout on disk
            destination[prefix + "codes"] = bytes_to_planes(self.codes, self.bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "codes" in state_dict and len(error_msgs) == n_errors:  # bit planes copied into the buffer
            self.code_layout = "planes"
            self._layout_chosen = False
            self._cpu_plan = None

    def dequantized(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The weight in its stored layout, float32 reference values cast to self.dtype (the
        same values from either code layout); only the stored rows start..stop when given (each
        row decodes on its own: the same values as those rows of the whole weight)."""
        rows = slice(start, stop)
        args = (self.codes[rows], self.bits, self.block_size, self.shape[1], self.scales[rows],
                None if self.offsets is None else self.offsets[rows], self.codebook)
        lay = self.code_layout
        if self.kernel == "torch":
            w = dequantize_torch(*args, layout=lay)
        elif self.codes.device.type == "cpu":
            w = (dequantize_numba(*args, layout=lay) if self.kernel == "numba" or numba_dequantize()
                 else dequantize_torch(*args, layout=lay))
        elif self.kernel == "numba":
            w = dequantize_numba_cuda(*args, layout=lay)
        else:  # auto on a GPU: the Numba CUDA kernel, or the torch code if it cannot run
            try:
                w = dequantize_numba_cuda(*args, layout=lay)
            except Exception as e:  # noqa: BLE001 - any failure: the torch code gives the same values
                import warnings
                warnings.warn(f"kbit: the Numba CUDA dequantizer failed ({type(e).__name__}: {e}); "
                              "using the torch code", RuntimeWarning, stacklevel=2)
                self.kernel = "torch"
                w = dequantize_torch(*args, layout=lay)
        return w if self.dtype == torch.float32 else w.to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects .weight (e.g. a tied head)
        return self.dequantized() if self.layout == "out_in" else self.dequantized().t()

    def _gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        """y for a decode step through the fused kernel, or None when it does not apply."""
        if not self.fused_gemv or self.kernel == "torch" or self.layout != "out_in":
            return None
        n = x.numel() // self.in_features if self.in_features else 0
        if not 1 <= n <= GEMV_MAX_ROWS:
            return None
        if x.is_cuda:
            try:
                if self.code_layout == "bytes":
                    fns = cuda_byte_kernels()
                    if fns is None:
                        raise RuntimeError("kbitcli.kernels.cuda has no gemv_bytes_torch")
                    # float16 in and (without a bias, so the result is rounded once) out in
                    # the kernel itself: no conversion kernels around it
                    y = fns[1](self.codes, self.bits, self.block_size, self.shape[1], self.scales, self.offsets,
                               self.codebook, x.reshape(n, self.in_features),
                               out_dtype=self.dtype if self.bias is None else torch.float32)
                else:
                    from kbitcli.kernels.cuda import gemv_torch
                    y = gemv_torch(self.codes, self.bits, self.block_size, self.shape[1], self.scales,
                                   self.offsets, self.codebook, x.reshape(n, self.in_features))
            except Exception as e:  # noqa: BLE001 - any failure: dequantize + matmul gives the same values
                import warnings
                warnings.warn(f"kbit: the fused CUDA GEMV failed ({type(e).__name__}: {e}); dequantizing "
                              "the weight in every forward instead", RuntimeWarning, stacklevel=3)
                self.fused_gemv = False
                return None
        elif x.device.type == "cpu" and self.codes.device.type == "cpu":
            plan = self._cpu_plan
            if plan is None or plan[1] != self.codes.data_ptr() or plan[2] != self.code_layout:
                fn = numba_gemv_plan()
                if fn is None:
                    return None
                plan = self._cpu_plan = (fn(self.codes.numpy().view(np.uint32), self.bits, self.block_size,
                                            self.shape[1], self.scales.numpy(),
                                            None if self.offsets is None else self.offsets.numpy(),
                                            self.codebook.numpy(), self.code_layout),
                                         self.codes.data_ptr(), self.code_layout)
            x2 = x.detach().reshape(n, self.in_features)
            if x2.dtype != torch.float32 or not x2.is_contiguous():
                x2 = x2.to(torch.float32).contiguous()
            y = torch.from_numpy(plan[0](x2.numpy()))
        else:
            return None
        if self.bias is not None:
            y = y + self.bias.float()
        if y.dtype != self.dtype:
            y = y.to(self.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._layout_chosen:
            self._choose_layout()
        y = self._gemv(x)
        if y is not None:
            return y
        w = self.dequantized()
        if self.layout == "out_in":
            return F.linear(x, w, self.bias)
        if self.bias is None:
            return x.matmul(w)
        # exactly what GPT-2's Conv1D does, so packed and dequantized-on-load models agree bit for bit
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)

    @classmethod
    def concat(cls, layers: "list[KbitLinear]") -> "KbitLinear | None":
        """One layer whose output is the layers' outputs concatenated (their weights stacked by
        output row), or None when they cannot share one: they must be "out_in" layers with the
        same bits, block size, in_features, codebook, scale form (offsets or not), bias or not,
        dtype, kernel, code layout and device. Each output row is decoded from the same codes,
        scales and codebook as before, so the fused GEMV gives every row the same value."""
        first = layers[0]
        same = lambda f: all(f(m) == f(first) for m in layers)  # noqa: E731
        if not all(isinstance(m, KbitLinear) for m in layers):
            return None
        if not (same(lambda m: (m.layout, m.bits, m.block_size, m.shape[1], m.dtype, m.kernel, m.code_layout,
                                m._layout_chosen, m.fused_gemv, m.byte_layout, m.offsets is None, m.bias is None,
                                m.codes.device, tuple(m.codes.shape[1:]), tuple(m.scales.shape[1:])))
                and first.layout == "out_in"
                and all(m.codebook.shape == first.codebook.shape and torch.equal(m.codebook, first.codebook)
                        for m in layers)):
            return None
        cat = lambda name: torch.cat([getattr(m, name) for m in layers])  # noqa: E731
        out = sum(m.shape[0] for m in layers)
        fused = cls(cat("codes"), cat("scales"), None if first.offsets is None else cat("offsets"),
                    first.codebook, first.bits, first.block_size, (out, first.shape[1]),
                    None if first.bias is None else cat("bias").detach(), first.layout, first.dtype, first.kernel)
        fused.code_layout, fused._layout_chosen = first.code_layout, first._layout_chosen
        fused.fused_gemv, fused.byte_layout = first.fused_gemv, first.byte_layout
        return fused

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.codes, self.scales, self.offsets, self.codebook)
                   if b is not None) + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"block_size={self.block_size}, layout={self.layout}, bias={self.bias is not None}, "
                f"kernel={self.kernel}, code_layout={self.code_layout}")


class KbitStacked(nn.Module):
    """A quantized stacked tensor [E, R, C] (the E experts' matrices of an MoE layer stored as one
    3-D tensor: gpt-oss's `experts.gate_up_proj`, Llama 4's) kept packed. The format stores it as
    the matrix (E*R, C) (formats/SPEC.md 4.1), so expert e's matrix is its rows e*R..(e+1)*R:
    `stacked[e]` dequantizes only those, like indexing the plain tensor. `packed` is a
    KbitLinear over the whole matrix (its buffers; its forward is not used)."""

    def __init__(self, packed: KbitLinear, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.packed = packed
        self.shape = tuple(shape)
        self.per = int(np.prod(self.shape[1:-1], dtype=np.int64))  # stored rows of one expert

    @classmethod
    def from_quantized(cls, qt, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       kernel: str = "auto") -> "KbitStacked":
        """From a kbitformat QuantizedTensor of 3 or more dimensions."""
        import dataclasses
        flat = dataclasses.replace(qt, shape=(qt.rows, qt.cols))
        return cls(KbitLinear.from_quantized(flat, layout="in_out", device=device, dtype=dtype, kernel=kernel),
                   tuple(qt.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, e: int) -> torch.Tensor:
        e = int(e)
        return self.packed.dequantized(e * self.per, (e + 1) * self.per).view(self.shape[1:])

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}"


def fuse_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One linear layer computing `layers` (all fed the same input) at once: their outputs
    concatenated in order along the last dimension, or None when they cannot be fused (not all
    plain nn.Linear or all KbitLinear, or KbitLinear.concat refuses them: different bits,
    block size, codebook, ...). A decode step then launches one GEMV instead of several: on
    a GPU a wider matrix keeps more of the memory bandwidth busy. nn.Linear: the weights (and
    biases) stacked; the matrix product of a stacked weight may round its sums differently
    from separate products (another blocking), within float rounding."""
    if len(layers) < 2:
        return None
    if all(isinstance(m, KbitLinear) for m in layers):
        return KbitLinear.concat(list(layers))
    if not all(type(m) is nn.Linear for m in layers):
        return None
    w0 = layers[0].weight
    if any(m.in_features != layers[0].in_features or m.weight.dtype != w0.dtype or m.weight.device != w0.device
           or (m.bias is None) != (layers[0].bias is None) for m in layers):
        return None
    out = sum(m.out_features for m in layers)
    fused = nn.Linear(layers[0].in_features, out, bias=layers[0].bias is not None, device="meta", dtype=w0.dtype)
    fused.weight = nn.Parameter(torch.cat([m.weight.detach() for m in layers]), requires_grad=False)
    if layers[0].bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach() for m in layers]), requires_grad=False)
    return fused
