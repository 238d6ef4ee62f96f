"""Kernel implementations of the four kbitformat ops (stats, search, quantize_pack,
dequantize), chosen by device name:

  numpy  kbitformat.NumpyOps, the reference (slow, the specification)
  cpu    kbitcli.kernels.cpu.CpuOps, Numba CPU kernels (parallel over blocks)
  cuda   kbitcli.kernels.cuda.CudaOps, Numba CUDA kernels

All three return identical bits. The CUDA module is imported only when "cuda" is asked
for, so importing this package never touches the CUDA driver.
"""
from __future__ import annotations

from kbitformat import KbitValueError, NumpyOps

DEVICES = ("numpy", "cpu", "cuda")


def cuda_usable(allow_simulator: bool = True) -> tuple[bool, str]:
    """(usable, why not). True on a machine with a working CUDA GPU, or (when
    allow_simulator) under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, which the
    test suite sets: it is exact but thousands of times slower than the CPU kernels)."""
    try:
        from numba import config
        from numba import cuda
    except Exception as e:  # pragma: no cover - numba is a dependency
        return False, f"numba's CUDA support could not be imported ({e})"
    if getattr(config, "ENABLE_CUDASIM", False):
        if allow_simulator:
            return True, ""
        return False, "only Numba's CUDA simulator is enabled (NUMBA_ENABLE_CUDASIM=1)"
    try:
        if cuda.is_available():
            return True, ""
    except Exception as e:  # pragma: no cover - depends on the machine
        return False, f"the CUDA driver could not be loaded ({e})"
    return False, "no CUDA GPU (or no usable CUDA driver) was found"


def default_device() -> str:
    """"cuda" when a real CUDA GPU is usable (never the simulator), else "cpu"."""
    return "cuda" if cuda_usable(allow_simulator=False)[0] else "cpu"


def get_ops(device: str = "cpu"):
    """The ops class for `device` ("numpy", "cpu" or "cuda")."""
    dev = (device or "").strip().lower()
    if dev == "numpy":
        return NumpyOps
    if dev == "cpu":
        from .cpu import CpuOps
        return CpuOps
    if dev in ("cuda", "gpu"):
        ok, why = cuda_usable()
        if not ok:
            raise KbitValueError(f"--device cuda: {why}; use --device cpu (Numba CPU kernels, same results)")
        from .cuda import CudaOps
        return CudaOps
    raise KbitValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


__all__ = ["DEVICES", "cuda_usable", "default_device", "get_ops"]
