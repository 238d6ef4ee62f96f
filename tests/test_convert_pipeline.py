"""The overlapped conversion pipeline (kbitcli.convert): read-ahead, one reused float32
buffer, a writer thread. Same bytes as writing in the main thread; errors raised in a
thread reach the caller (never a hang); Ctrl-C keeps a resumable partial folder."""
from __future__ import annotations

import errno
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kbitcli import convert as conv
from kbitcli.errors import OutputError
from kbitcli.recipe import Recipe
from kbitcli.sources import open_source
from kbitformat import KbitValueError, QuantSpec
from kbitformat.io import KbitReader, KbitWriter

rng = np.random.default_rng(11)


def make_bf16(folder: Path, n: int = 6) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    t = {f"model.layers.{i}.mlp.up_proj.weight": torch.from_numpy(rng.standard_normal((96 + 32 * i, 128),
                                                                                        dtype=np.float32) * 0.02)
         .to(torch.bfloat16) for i in range(n)}
    t["model.embed_tokens.weight"] = torch.from_numpy(rng.standard_normal((50, 128), dtype=np.float32)).to(torch.bfloat16)
    t["model.norm.weight"] = torch.ones(128, dtype=torch.float32)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return t


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def serial_convert(src: Path, out: Path, recipe: Recipe, shard_size: int) -> None:
    """The conversion done the plain way (main thread, fresh arrays, load_raw copies)."""
    from kbitcli.kernels import get_ops
    from kbitformat import quantization_error, quantize
    s = open_source(src)
    plans, _, _ = conv.plan_tensors(s, recipe)
    meta = {"source": str(s.path), "source_kind": s.kind, "recipe": recipe.to_dict(),
            "fingerprint": conv.fingerprint(s, plans, recipe)}
    ops = get_ops("cpu")
    bounds = [conv.plan_header_bound(p) for p in plans]
    with KbitWriter(out, max_shard_bytes=shard_size, model_metadata=meta, tool=conv.TOOL,
                    header_reserve=lambda added: sum(bounds[added:])) as w:
        for p in plans:
            if p.spec is None:
                if p.dtype == "bfloat16":
                    w.add_tensor(p.name, s.load_raw(p.name), orig_dtype="bfloat16", st_dtype="BF16")
                else:
                    w.add_tensor(p.name, s.load_raw(p.name), orig_dtype=p.dtype)
            else:
                x = s.load(p.name)
                qt = quantize(x, p.spec, p.name, ops=ops, orig_dtype=p.dtype)
                w.add_quantized(p.name, qt, extra={"error": quantization_error(x, qt, ops)})


@pytest.mark.parametrize("shard_size", [1 << 30, 20_000])
def test_same_bytes_as_the_serial_path(tmp_path, shard_size):
    make_bf16(tmp_path / "src")
    recipe = Recipe(QuantSpec(4, "int", 64))
    conv.convert(tmp_path / "src", tmp_path / "out", recipe, shard_size=shard_size)
    serial_convert(tmp_path / "src", tmp_path / "ref", recipe, shard_size)
    got, want = digests(tmp_path / "out"), digests(tmp_path / "ref")
    assert got == want and (len(got) > 1) == (shard_size < 1 << 30)
    assert (tmp_path / "out" / "model.safetensors.index.json").read_text() == \
        (tmp_path / "ref" / "model.safetensors.index.json").read_text()


def test_load_into_buffer_and_raw_view_equal_the_copies(tmp_path):
    t = make_bf16(tmp_path / "src", n=2)
    s = open_source(tmp_path / "src")
    buf = np.full(1 << 16, np.nan, dtype=np.float32)
    for name in t:
        got = s.load(name, out=buf)
        assert np.array_equal(got, s.load(name)) and got.shape == tuple(t[name].shape)
        assert np.shares_memory(got, buf)
        view = s.raw_view(name)
        assert not view.flags.writeable and np.array_equal(view, s.load_raw(name))
        s.prefetch(name)  # a hint: never fails
    small = np.empty(10, dtype=np.float32)  # too small: a new array, same values
    name = "model.layers.0.mlp.up_proj.weight"
    assert not np.shares_memory(s.load(name, out=small), small)


def test_writer_error_reaches_the_caller_and_removes_the_partial(tmp_path, monkeypatch):
    make_bf16(tmp_path / "src")
    calls = []

    def full(self, *a, **k):
        calls.append(threading.current_thread().name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(KbitWriter, "add_quantized", full)
    with pytest.raises(OutputError, match="disk full"):
        conv.convert(tmp_path / "src", tmp_path / "out", Recipe(QuantSpec(4, "int", 64)))
    assert calls and calls[0] == "kbit-writer"
    assert not (tmp_path / "out").exists() and not conv.partial_dir(tmp_path / "out").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("kbit-")]


def test_user_error_in_the_writer_is_raised_as_itself(tmp_path, monkeypatch):
    make_bf16(tmp_path / "src")

    def bad(self, name, *a, **k):
        raise KbitValueError(f"tensor {name!r} was already written")

    monkeypatch.setattr(KbitWriter, "add_tensor", bad)
    with pytest.raises(KbitValueError, match="already written"):
        conv.convert(tmp_path / "src", tmp_path / "out", Recipe(QuantSpec(4, "int", 64)))
    assert not conv.partial_dir(tmp_path / "out").exists()


def test_ctrl_c_stops_the_threads_and_keeps_finished_shards(tmp_path, monkeypatch):
    make_bf16(tmp_path / "src", n=8)
    recipe = Recipe(QuantSpec(4, "int", 64))
    real = conv._quantize_tensor
    seen = []

    def interrupt_at_fifth(src, p, *a):
        seen.append(p.name)
        if len(seen) == 5:
            raise KeyboardInterrupt
        return real(src, p, *a)

    monkeypatch.setattr(conv, "_quantize_tensor", interrupt_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(tmp_path / "src", tmp_path / "out", recipe, shard_size=20_000)
    work = conv.partial_dir(tmp_path / "out")
    assert sorted(work.glob(".shard-*.safetensors.tmp")) and not list(work.glob("*.data.tmp"))
    assert not [t for t in threading.enumerate() if t.name.startswith("kbit-")]
    monkeypatch.setattr(conv, "_quantize_tensor", real)
    s = conv.convert(tmp_path / "src", tmp_path / "out", recipe, shard_size=20_000, resume=True)
    assert s.resumed >= 1
    serial_convert(tmp_path / "src", tmp_path / "ref", recipe, 20_000)
    assert digests(tmp_path / "out") == digests(tmp_path / "ref")
    assert KbitReader(tmp_path / "out").verify_all() == []


def test_worker_never_hangs_on_a_failed_job():
    w = conv._Worker("kbit-test", depth=1)
    w.submit(lambda: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        for _ in range(1000):  # the error surfaces at a later hand-over, never a blocked put
            w.submit(lambda: None)
    w.cancel()
    w2 = conv._Worker("kbit-test", depth=1)
    w2.submit(lambda: (_ for _ in ()).throw(ValueError("late")))
    with pytest.raises(ValueError, match="late"):
        w2.finish()


@pytest.mark.parametrize("spec,rules", [(QuantSpec(4, "int", 64), []),
                                        (QuantSpec(4, "affine", 32, "dq"), ["*.layers.1.*=8:quantile:b64"]),
                                        (QuantSpec(3, "fp", 64, "e8"), ["*.layers.2.*=2:affine:b32:fp32"])])
@pytest.mark.parametrize("shard_size", [1 << 30, 20_000])
def test_shards_are_written_in_one_pass(tmp_path, monkeypatch, spec, rules, shard_size):
    """The header room reserved for each shard (header_bound over the tensors still to come)
    holds the real header for every recipe mix: no shard falls back to copying its data
    behind the header; the output reads back and verifies."""
    import kbitformat.io as kio
    make_bf16(tmp_path / "src")
    monkeypatch.setattr(kio, "_copy_rest", lambda *a: pytest.fail("a shard's data was copied"))
    conv.convert(tmp_path / "src", tmp_path / "out", Recipe.build(spec, rules), shard_size=shard_size)
    r = KbitReader(tmp_path / "out")
    assert r.verify_all() == [] and len(r.names()) == 8


def test_read_ahead_window(monkeypatch):
    """The read-ahead hints the tensors in order, at least one and up to READ_AHEAD_BYTES
    past the one being converted, each once."""
    monkeypatch.setattr(conv, "READ_AHEAD_BYTES", 100)
    hinted: list[str] = []

    class Worker:
        def offer(self, fn, name):
            hinted.append(name)

    sizes = [10, 300, 40, 40, 40, 5, 5, 200, 1]
    todo = [conv.Plan(f"t{i}", (n,), "float32", True, n, None) for i, n in enumerate(sizes)]
    ra = conv._ReadAhead(Worker(), None, todo)
    seen = []
    for i in range(len(todo)):
        ra.starting()
        seen.append(list(hinted))
        ahead = [int(n[1:]) for n in hinted if int(n[1:]) > i]
        assert hinted == [f"t{j}" for j in range(len(hinted))]               # in order, each once
        assert f"t{i}" in hinted and (i + 1 == len(todo) or f"t{i + 1}" in hinted)  # at least the next one
        # no more than needed: without the last one hinted, the window would be under the limit
        assert sum(sizes[j] for j in ahead[:-1]) < 100 or len(ahead) <= 1
    assert seen[0] == ["t0", "t1"] and seen[1] == ["t0", "t1", "t2", "t3", "t4"]
    assert conv._ReadAhead(None, None, todo).starting() is None  # no worker: nothing to do
