"""The reader against golden files written independently of kbitformat (make_vectors.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kbitformat.io import KbitReader

VECTORS = Path(__file__).resolve().parents[1] / "formats" / "vectors"
NAMES = sorted(p.name[: -len(".safetensors")] for p in VECTORS.glob("*.safetensors"))


def test_vectors_exist():
    assert len(NAMES) >= 7


@pytest.mark.parametrize("name", NAMES)
def test_golden_vector_decodes_exactly(name):
    r = KbitReader(VECTORS / f"{name}.safetensors")
    expected = np.load(VECTORS / f"{name}.expected.npy")
    got = r.load(name)
    assert got.shape == expected.shape
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(r.load("plain"), np.arange(6, dtype=np.float32).reshape(2, 3) / 4)
    assert r.verify_all() == []
