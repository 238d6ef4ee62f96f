"""kbit pull / kbit push and Hub ids in `kbit quantize`, against a loopback Hub (tests/hub_server.py)
with the real huggingface_hub client: no huggingface_hub function is mocked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save, save_file

from kbitcli.cli.main import main
from kbitcli.errors import EXIT_HUB, EXIT_INPUT, HubError, UnsupportedArchitectureError
from kbitcli.hub import pull, push, select_files

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer, closed_port_url, isolate_hub_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "num_hidden_layers": 1, "vocab_size": 32, "tie_word_embeddings": False}


# ---------------------------------------------------------------------------------------------
# fixtures: a clean Hub environment per test, and the loopback Hub


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """HF_HOME in tmp, telemetry off, no token / offline / cache overrides from the caller."""
    isolate_hub_env(monkeypatch, tmp_path / "hf-home")
    return tmp_path / "hf-home"


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)  # kbitcli.hub reads it at call time
        yield server


# ---------------------------------------------------------------------------------------------
# tiny checkpoints


def _tensors(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    f = lambda *s: g.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "model.embed_tokens.weight": f(32, 64),
        "model.layers.0.self_attn.q_proj.weight": f(64, 64),
        "model.layers.0.self_attn.k_proj.weight": f(64, 64),
        "model.layers.0.mlp.down_proj.weight": f(64, 128),
        "model.layers.0.input_layernorm.weight": np.ones(64, np.float32),
        "model.norm.weight": np.ones(64, np.float32),
        "lm_head.weight": f(32, 64),
    }


def sharded_files(seed: int = 0, config: dict | None = None, **extra: bytes) -> dict[str, bytes]:
    """A two-shard safetensors Llama with its index, config, tokenizer files and a chat template."""
    t = _tensors(seed)
    names = list(t)
    a, b = names[:4], names[4:]
    shard1 = save({n: t[n] for n in a})
    shard2 = save({n: t[n] for n in b})
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    index = {"metadata": {"total_size": sum(v.nbytes for v in t.values())},
             "weight_map": {**{n: s1 for n in a}, **{n: s2 for n in b}}}
    files = {
        "config.json": json.dumps(config or LLAMA).encode(),
        "generation_config.json": b'{"bos_token_id": 1}',
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}',
        "tokenizer_config.json": b'{"model_max_length": 64}',
        "special_tokens_map.json": b"{}",
        "chat_template.jinja": b"{{ messages }}",
        "model.safetensors.index.json": json.dumps(index).encode(),
        s1: shard1,
        s2: shard2,
        "README.md": b"# tiny\n",
        ".gitattributes": b"*.safetensors filter=lfs\n",
        "pytorch_model.bin": b"not needed: the repo has safetensors",
        "consolidated.safetensors": b"not in the index",
        "onnx/model.onnx": b"not needed",
    }
    files.update(extra)
    return files


WEIGHTS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
EXPECTED = sorted(["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json", *WEIGHTS])


def _is_weight(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name.endswith(".index.json")


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# what a conversion needs


def test_select_files_prefers_indexed_safetensors_over_everything_else():
    files = list(sharded_files())
    index = json.loads(sharded_files()["model.safetensors.index.json"])
    assert select_files(files, lambda name: index) == EXPECTED
    only_bin = ["config.json", "pytorch_model.bin", "README.md", "tokenizer.model"]
    assert select_files(only_bin, None) == ["config.json", "pytorch_model.bin", "tokenizer.model"]
    assert select_files(files, lambda n: index, include=["*.md"], exclude=["tokenizer*"]) == sorted(
        [f for f in EXPECTED if not f.startswith("tokenizer")] + ["README.md"])


# ---------------------------------------------------------------------------------------------
# pull


def test_pull_sharded_repo_fetches_only_what_conversion_needs(hub):
    files = sharded_files()
    repo = hub.add_repo("org/tiny", files)
    sha = repo.refs["main"]
    path, prov = pull("org/tiny", quiet=True)
    assert prov["source"] == "org/tiny" and prov["revision"] == sha and prov["requested_revision"] == "main"
    got = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert got == EXPECTED
    for name in EXPECTED:
        assert (path / name).read_bytes() == files[name]
    fetched = hub.requested_files()
    assert fetched[0] == "config.json", "config.json is read before anything else"
    assert not {"pytorch_model.bin", "consolidated.safetensors", "README.md", "onnx/model.onnx"} & set(fetched)
    # the standard cache layout under HF_HOME, with the branch recorded
    storage = Path(os.environ["HF_HOME"]) / "hub" / "models--org--tiny"
    assert path == storage / "snapshots" / sha
    assert (storage / "refs" / "main").read_text() == sha


def test_pull_cli_prints_the_folder_and_the_commit(hub, capsys):
    repo = hub.add_repo("org/tiny", sharded_files())
    code, out, err = _run(["pull", "org/tiny"], capsys)
    assert code == 0
    assert Path(out.strip()).is_dir() and repo.refs["main"] in err
    code, out, _ = _run(["pull", "org/tiny", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["revision"] == repo.refs["main"] and Path(doc["path"]).is_dir()


def test_pull_bin_weights_only_when_there_are_no_safetensors(hub):
    files = {"config.json": json.dumps(LLAMA).encode(), "pytorch_model.bin": b"PK-fake-weights",
             "README.md": b"x"}
    hub.add_repo("org/binonly", files)
    path, prov = pull("org/binonly", quiet=True)
    assert sorted(prov["files"]) == ["config.json", "pytorch_model.bin"]
    assert (path / "pytorch_model.bin").read_bytes() == b"PK-fake-weights"


def test_pull_into_local_dir(hub, tmp_path):
    files = sharded_files()
    hub.add_repo("org/tiny", files)
    dest = tmp_path / "here"
    path, prov = pull("org/tiny", local_dir=dest, quiet=True)
    assert path.resolve() == dest.resolve()
    for name in EXPECTED:
        assert (dest / name).read_bytes() == files[name]
    assert not (dest / "README.md").exists()


def test_revision_pinning_by_commit_branch_and_tag(hub, capsys):
    old = sharded_files(seed=1)
    repo = hub.add_repo("org/tiny", old)
    first = repo.refs["main"]
    repo.refs["v1"] = first  # a branch left at the first commit
    repo.tag("release-1", first)
    new = sharded_files(seed=2)
    second = repo.commit({k: new[k] for k in WEIGHTS})
    assert first != second
    shard = WEIGHTS[0]

    path, prov = pull("org/tiny", quiet=True)
    assert prov["revision"] == second and (path / shard).read_bytes() == new[shard]
    for ref in (first, "v1", "release-1"):
        path, prov = pull(f"org/tiny@{ref}", quiet=True)
        assert prov["revision"] == first and prov["requested_revision"] == ref
        assert (path / shard).read_bytes() == old[shard]
    path, prov = pull("org/tiny", revision="v1", quiet=True)
    assert prov["revision"] == first
    code, out, _ = _run(["pull", "org/tiny", "--revision", first, "--json"], capsys)
    assert code == 0 and json.loads(out)["revision"] == first
    # two different revisions for one pull is a usage error
    code, _, err = _run(["pull", "org/tiny@v1", "--revision", "main"], capsys)
    assert code == 2 and "two revisions" in err


def test_include_and_exclude(hub, capsys):
    files = sharded_files()
    hub.add_repo("org/tiny", files)
    code, out, _ = _run(["pull", "org/tiny", "--include", "*.md", "--include", "onnx/*",
                         "--exclude", "tokenizer*", "--exclude", "chat_template.*", "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    want = sorted([f for f in EXPECTED if not f.startswith(("tokenizer", "chat_template"))]
                  + ["README.md", "onnx/model.onnx"])
    assert sorted(doc["files"]) == want
    fetched = set(hub.requested_files())
    assert {"README.md", "onnx/model.onnx"} <= fetched
    assert not {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} & fetched
    assert (Path(doc["path"]) / "onnx" / "model.onnx").read_bytes() == files["onnx/model.onnx"]


def test_unsupported_architecture_is_refused_before_any_weight_request(hub, capsys):
    t5 = {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}
    hub.add_repo("org/t5", sharded_files(config=t5))
    code, out, err = _run(["pull", "org/t5"], capsys)
    assert code == EXIT_INPUT
    assert "T5ForConditionalGeneration" in err and "not supported" in err
    assert "LlamaForCausalLM" in err and "--any-arch" in err  # lists what is supported and the way out
    assert hub.requested_files() == ["config.json"] or set(hub.requested_files()) == {"config.json"}
    assert not any(_is_weight(f) for f in hub.requested_files())
    with pytest.raises(UnsupportedArchitectureError):
        pull("org/t5", quiet=True)

    hub.clear_log()
    code, out, err = _run(["pull", "org/t5", "--any-arch", "--json"], capsys)
    assert code == 0
    assert set(WEIGHTS) <= set(hub.requested_files())
    assert json.loads(out)["architecture"] == "T5ForConditionalGeneration"


def test_repo_without_config_needs_any_arch(hub, capsys):
    hub.add_repo("org/noconfig", {"model.safetensors": save({"w": np.ones((4, 4), np.float32)})})
    code, _, err = _run(["pull", "org/noconfig"], capsys)
    assert code == EXIT_INPUT and "no config.json" in err
    assert hub.requested_files() == []
    code, _, _ = _run(["pull", "org/noconfig", "--any-arch", "-q"], capsys)
    assert code == 0


def test_missing_repository_and_revision_exit_6_with_distinct_messages(hub, capsys):
    hub.add_repo("org/tiny", sharded_files())
    code, out, err = _run(["pull", "org/nope"], capsys)
    assert code == EXIT_HUB and "repository not found" in err and "org/nope" in err
    assert "Traceback" not in err and err.count("\n") == 1
    code, out, err2 = _run(["pull", "org/tiny@no-such-branch"], capsys)
    assert code == EXIT_HUB and "revision 'no-such-branch' not found" in err2
    code, out, err3 = _run(["pull", "org/tiny", "--revision", "0" * 40], capsys)
    assert code == EXIT_HUB and "not found" in err3
    assert len({err, err2}) == 2
    code, _, err = _run(["pull", "not a repo id"], capsys)
    assert code == 2 and "not a Hub model id" in err


def test_gated_repository(hub, capsys, monkeypatch):
    files = sharded_files()
    hub.add_repo("org/gated", files, gated=True, tokens={"hf_good"})
    code, _, err = _run(["pull", "org/gated"], capsys)
    assert code == EXIT_HUB and "gated" in err and "token" in err
    assert not any(_is_weight(f) for f in hub.requested_files())
    code, _, err = _run(["pull", "org/gated", "--token", "hf_wrong"], capsys)
    assert code == EXIT_HUB and "gated" in err and "no access" in err
    path, prov = pull("org/gated", token="hf_good", quiet=True)
    assert (path / WEIGHTS[1]).read_bytes() == files[WEIGHTS[1]]
    # HF_TOKEN is read at call time
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    code, out, _ = _run(["pull", "org/gated", "--local-dir", str(path.parent / "viaenv"), "-q"], capsys)
    assert code == 0


def test_private_repository_without_token_reads_as_not_found(hub, capsys):
    hub.add_repo("org/private", sharded_files(), private=True, tokens={"hf_me"})
    code, _, err = _run(["pull", "org/private"], capsys)
    assert code == EXIT_HUB and "not found" in err and "private" in err
    assert main(["pull", "org/private", "--token", "hf_me", "-q"]) == 0


def test_interrupted_download_resumes_with_a_range_request(hub):
    from huggingface_hub import constants
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    big = save({"model.embed_tokens.weight": np.arange((chunk + 2_000_000) // 4, dtype=np.float32)})
    files = {"config.json": json.dumps(LLAMA).encode(), "model.safetensors": big}
    hub.add_repo("org/big", files)
    cut = chunk + 1_000_000  # past the first whole chunk, so the client has something to keep
    hub.drop("model.safetensors", at=cut)
    path, prov = pull("org/big", quiet=True)
    assert hub.dropped == ["model.safetensors"]
    gets = [r for r in hub.requested("resolve", method="GET") if r.resolve_file == "model.safetensors"]
    assert len(gets) == 2 and "range" not in gets[0].headers
    start = int(gets[1].headers["range"].split("=")[1].split("-")[0])
    assert 0 < start <= cut, "the second request continues where the first stopped"
    assert (path / "model.safetensors").read_bytes() == big


def test_download_that_keeps_failing_reports_and_a_rerun_completes(hub, capsys):
    files = sharded_files()
    hub.add_repo("org/flaky", files)
    hub.drop(WEIGHTS[1], at=100, times=50)  # every retry huggingface_hub makes is cut too
    code, _, err = _run(["pull", "org/flaky", "-q"], capsys)
    assert code == EXIT_HUB and "run the same command again" in err and "Traceback" not in err
    hub.drops.clear()
    path, prov = pull("org/flaky", quiet=True)
    for name in EXPECTED:
        assert (path / name).read_bytes() == files[name]


def test_offline_with_a_warm_cache_in_a_fresh_process(hub, hub_env, tmp_path):
    files = sharded_files()
    repo = hub.add_repo("org/tiny", files)
    online, prov = pull("org/tiny", quiet=True)
    pull("org/tiny@" + repo.refs["main"], local_dir=tmp_path / "ld", quiet=True)
    hub.clear_log()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hub_env), "HF_ENDPOINT": closed_port_url(),
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", "import sys; from kbitcli.cli.main import main; sys.exit(main(sys.argv[1:]))"]
    for args in (["org/tiny"], ["org/tiny@main"], ["org/tiny", "--revision", repo.refs["main"]]):
        r = subprocess.run(cmd + ["pull", *args, "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["path"] == str(online) and doc["revision"] == prov["revision"] and doc["offline"] is True
    r = subprocess.run(cmd + ["pull", "org/tiny", "--local-dir", str(tmp_path / "ld"), "--json"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["revision"] == prov["revision"]
    r = subprocess.run(cmd + ["pull", "org/other"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_HUB and "offline" in r.stderr and "Traceback" not in r.stderr
    assert hub.requests == [], "offline mode sent no request"


def test_offline_without_cache_in_process(hub, capsys, monkeypatch):
    hub.add_repo("org/tiny", sharded_files())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(["pull", "org/tiny"], capsys)
    assert code == EXIT_HUB and "offline mode (HF_HUB_OFFLINE=1)" in err
    assert hub.requests == []
    # a partly cached snapshot is not good enough offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    pull("org/tiny", exclude=["*.safetensors"], quiet=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(["pull", "org/tiny"], capsys)
    assert code == EXIT_HUB and "offline" in err


def test_connection_refused(capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    code, _, err = _run(["pull", "org/tiny"], capsys)
    assert code == EXIT_HUB and "cannot connect to the Hub" in err and "Traceback" not in err
    with pytest.raises(HubError, match="cannot connect"):
        pull("org/tiny", endpoint=closed_port_url(), quiet=True)


def test_unreachable_hub_falls_back_to_a_complete_cache(hub, capsys, monkeypatch):
    repo = hub.add_repo("org/tiny", sharded_files())
    path, _ = pull("org/tiny", quiet=True)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    code, out, err = _run(["pull", "org/tiny"], capsys)
    assert code == 0 and out.strip() == str(path) and "cannot be reached" in err
    assert repo.refs["main"] in err


def test_explicit_endpoint_beats_hf_endpoint(hub, monkeypatch):
    hub.add_repo("org/tiny", sharded_files())
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    path, prov = pull("org/tiny", endpoint=hub.url, quiet=True)
    assert prov["hub_endpoint"] == hub.url and (path / WEIGHTS[0]).is_file()


# ---------------------------------------------------------------------------------------------
# kbit quantize ORG/NAME


def test_quantize_from_a_hub_id_records_repo_and_commit(hub, tmp_path, capsys):
    from kbitformat.io import INDEX_NAME, KbitReader
    repo = hub.add_repo("org/tiny", sharded_files())
    old = repo.refs["main"]
    repo.commit({"README.md": b"# newer\n"})
    out = tmp_path / "tiny-kbit"
    code, _, err = _run(["quantize", "org/tiny", str(out), "--quiet"], capsys)
    assert code == 0, err
    meta = json.loads((out / INDEX_NAME).read_text())["metadata"]["kbit.model"]
    assert meta["source"] == "org/tiny" and meta["revision"] == repo.refs["main"]
    r = KbitReader(out)
    assert r.verify_all() == [] and set(_tensors(0)) == set(r.names())
    assert r.model_metadata["revision"] == repo.refs["main"]
    out2 = tmp_path / "pinned"
    assert main(["quantize", f"org/tiny@{old}", str(out2), "--quiet"]) == 0
    assert KbitReader(out2).model_metadata["revision"] == old
    capsys.readouterr()
    code, _, err = _run(["quantize", "org/absent", str(tmp_path / "x"), "--quiet"], capsys)
    assert code == EXIT_HUB and "repository not found" in err


# ---------------------------------------------------------------------------------------------
# push


@pytest.fixture
def kbit_folder(tmp_path) -> Path:
    """A kbit model converted from a local tiny checkpoint."""
    src = tmp_path / "src"
    src.mkdir()
    for name, data in sharded_files().items():
        if "/" not in name and not name.startswith(".") and name not in ("pytorch_model.bin",
                                                                         "consolidated.safetensors"):
            (src / name).write_bytes(data)
    out = tmp_path / "tiny-kbit"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 0
    return out


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_the_exact_bytes(hub, kbit_folder, capsys):
    code, out, err = _run(["push", str(kbit_folder), "me/tiny-kbit", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    repo = hub.repos["me/tiny-kbit"]
    assert doc["commit"] == repo.refs["main"] and not repo.private
    remote = {k: v for k, v in repo.commits[repo.refs["main"]].items() if k != ".gitattributes"}
    local = _local_files(kbit_folder)
    assert remote == local and any(k.endswith(".safetensors") for k in local)
    # and it comes back down through pull, byte for byte
    code = main(["pull", "me/tiny-kbit", "--any-arch", "--include", "*", "--local-dir",
                 str(kbit_folder.parent / "back"), "-q"])
    assert code == 0
    assert {k: v for k, v in _local_files(kbit_folder.parent / "back").items()
            if not k.startswith((".cache", ".gitattributes"))} == local


def test_push_private_to_a_branch_of_an_existing_repo(hub, kbit_folder):
    res = push(kbit_folder, "me/tiny-kbit", private=True, token="hf_me", quiet=True)
    repo = hub.repos["me/tiny-kbit"]
    assert repo.private and res["revision"] == "main"
    res2 = push(kbit_folder, "me/tiny-kbit", revision="v2", token="hf_me", quiet=True)
    assert res2["revision"] == "v2" and repo.refs["v2"] == res2["commit"]


def test_push_refuses_a_folder_failing_verification_before_any_request(hub, kbit_folder, capsys):
    from kbitcli.convert import partial_dir
    shard = sorted(kbit_folder.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in tensor data: its CRC-32 fails
    shard.write_bytes(bytes(data))
    code, _, err = _run(["push", str(kbit_folder), "me/bad"], capsys)
    assert code == EXIT_INPUT and "refusing to push" in err
    shard.write_bytes(bytes(data[:-5]) + bytes([data[-5] ^ 0xFF]) + bytes(data[-4:]))
    assert main(["verify", str(kbit_folder), "-q"]) == 0  # repaired

    part = partial_dir(kbit_folder)
    part.mkdir()
    code, _, err = _run(["push", str(kbit_folder), "me/bad"], capsys)
    assert code == EXIT_INPUT and "unfinished conversion" in err
    part.rmdir()

    index = kbit_folder / "model.safetensors.index.json"
    saved = index.read_bytes()
    index.unlink()
    code, _, err = _run(["push", str(kbit_folder), "me/bad"], capsys)
    assert code == EXIT_INPUT and "model.safetensors.index.json" in err
    index.write_bytes(saved)

    shard.rename(shard.with_suffix(".moved"))
    code, _, err = _run(["push", str(kbit_folder), "me/bad"], capsys)
    assert code == EXIT_INPUT and "missing shard" in err
    shard.with_suffix(".moved").rename(shard)

    assert hub.requests == [], "nothing was sent for a folder that fails verification"
    assert "me/bad" not in hub.repos


def test_push_errors_are_one_line(hub, kbit_folder, capsys, monkeypatch):
    hub.write_tokens = {"hf_writer"}
    code, _, err = _run(["push", str(kbit_folder), "me/tiny-kbit", "--token", "hf_reader"], capsys)
    assert code == EXIT_HUB and "credentials" in err and "Traceback" not in err
    assert main(["push", str(kbit_folder), "me/tiny-kbit", "--token", "hf_writer", "-q"]) == 0
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    code, _, err = _run(["push", str(kbit_folder), "me/tiny-kbit"], capsys)
    assert code == EXIT_HUB and "cannot connect" in err
