"""kbitformat: the kbit file format, numpy + safetensors only.

    from kbitformat import QuantSpec, quantize, dequantize
    qt = quantize(w, QuantSpec(bits=4, dtype="nf", block_size=64))
    w2 = dequantize(qt)
"""
from __future__ import annotations

from .constants import FORMAT_NAME, FORMAT_VERSION, FORMAT_VERSION_STR
from .errors import (KbitChecksumError, KbitError, KbitFormatError, KbitValueError,
                     KbitVersionError)
from .quantize import QuantizedTensor, dequantize, quantization_error, quantize, relative_error
from .reference import NumpyOps
from .spec import QuantSpec

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "FORMAT_VERSION_STR", "KbitChecksumError", "KbitError",
    "KbitFormatError", "KbitValueError", "KbitVersionError", "NumpyOps", "QuantSpec",
    "QuantizedTensor", "dequantize", "quantization_error", "quantize", "relative_error",
]
