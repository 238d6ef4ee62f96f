"""Hugging Face Hub: fetch what a conversion needs (`pull`) and publish a kbit folder (`push`).

    path, provenance = pull("ORG/NAME@v1.0")     # provenance["revision"]: the 40-hex commit
    push("out/model-kbit", "me/model-kbit")

`pull` reads config.json first and refuses an architecture kbit's runner does not support
before any weight file is requested (any_arch=True skips the check). It then downloads only
the files a conversion uses: config, generation config, tokenizer files, chat templates and
the safetensors weights (PyTorch .bin weights only when the repo has no safetensors), through
huggingface_hub's cache (or into local_dir).

The Hub's environment variables are read when these functions are called, not when
huggingface_hub is imported: HF_ENDPOINT (or endpoint=), HF_TOKEN (or token=), HF_HUB_OFFLINE
(cache only), HF_HOME / HF_HUB_CACHE (where the cache lives).

Every failure becomes one HubError line (exit code 6), or an InputError /
UnsupportedArchitectureError (exit code 3) for a repo kbit cannot convert; no
huggingface_hub or HTTP traceback escapes.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

from .architectures import config_architecture, describe_supported, is_supported_config
from .errors import CliError, HubError, InputError, UnsupportedArchitectureError, UsageError

CONFIG = "config.json"
ST_INDEX = "model.safetensors.index.json"
PT_INDEX = "pytorch_model.bin.index.json"
SIDE_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json",
)
SIDE_GLOBS = ("chat_template.*",)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


# ------------------------------------------------------------------------------------------
# environment, read at call time


def _true(v: str | None) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint(endpoint: str | None = None) -> str:
    """endpoint=, else HF_ENDPOINT as it is now, else huggingface_hub's default."""
    if endpoint:
        return endpoint.rstrip("/")
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants
    return constants.ENDPOINT.rstrip("/")


def hub_cache_dir() -> str:
    """HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default (as they are now)."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return os.path.expandvars(os.path.expanduser(env[var]))
    if env.get("HF_HOME"):
        return os.path.join(os.path.expandvars(os.path.expanduser(env["HF_HOME"])), "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) now, or as huggingface_hub read it at import."""
    from huggingface_hub import constants
    return (_true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))
            or bool(constants.HF_HUB_OFFLINE))


def parse_repo(text: str, revision: str | None = None) -> tuple[str, str | None]:
    """'ORG/NAME' or 'ORG/NAME@REV' (+ an explicit revision) -> (repo_id, revision or None)."""
    repo_id, _, rev = text.strip().partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UsageError(f"{text!r} is not a Hub model id; write ORG/NAME or ORG/NAME@REVISION")
    rev = rev or None
    if rev is not None and revision is not None and rev != revision:
        raise UsageError(f"two revisions given: {text!r} and --revision {revision!r}")
    return repo_id, revision or rev


# ------------------------------------------------------------------------------------------
# which files a conversion needs


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def _index_shards(index: dict, index_name: str) -> list[str]:
    try:
        return sorted(set(index["weight_map"].values()))
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"{index_name}: not a weight index (no weight_map)") from None


def select_files(repo_files: Iterable[str], read_index, include: Iterable[str] = (),
                 exclude: Iterable[str] = ()) -> list[str]:
    """The files of a repo that a conversion reads (top level only), plus include, minus exclude.

    read_index(name) returns a parsed index JSON; it is called only when the repo has one, so
    that a sharded checkpoint brings exactly the shards its index names (a repo with both
    model-0000x-of-0000y.safetensors and a consolidated copy downloads the weights once).
    """
    files = list(dict.fromkeys(repo_files))
    top = [f for f in files if "/" not in f]
    chosen = [f for f in top if f in SIDE_FILES or _matches(f, SIDE_GLOBS)]
    weights: list[str] = []
    if ST_INDEX in top:
        weights = [ST_INDEX] + _index_shards(read_index(ST_INDEX), ST_INDEX)
    elif "model.safetensors" in top:
        weights = ["model.safetensors"]
    elif any(f.endswith(".safetensors") for f in top):
        weights = [f for f in top if f.endswith(".safetensors")]
    elif PT_INDEX in top:
        weights = [PT_INDEX] + _index_shards(read_index(PT_INDEX), PT_INDEX)
    elif "pytorch_model.bin" in top:
        weights = ["pytorch_model.bin"]
    else:
        weights = [f for f in top if f.startswith("pytorch_model") and f.endswith(".bin")]
    missing = [w for w in weights if w not in files]
    if missing:
        raise InputError(f"the weight index names {len(missing)} file(s) the repo does not have: "
                         + ", ".join(missing[:5]))
    include, exclude = list(include or ()), list(exclude or ())
    extra = [f for f in files if include and _matches(f, include)]
    out = [f for f in dict.fromkeys(chosen + weights + extra) if not _matches(f, exclude)]
    return sorted(out)


def _has_weights(files: Iterable[str]) -> bool:
    return any(f.endswith((".safetensors", ".bin", ".gguf", ".pt", ".pth")) for f in files)


def check_architecture(config: dict, repo: str) -> str:
    """The config's architecture label; UnsupportedArchitectureError if the runner lacks it."""
    arch = config_architecture(config)
    if not is_supported_config(config):
        raise UnsupportedArchitectureError(
            f"{repo}: architecture {arch} (model_type {config.get('model_type', '?')}) is not supported by kbit's "
            f"runner; supported: {describe_supported()}. Pass --any-arch to download and convert it anyway")
    return arch


def _read_json(path: str | Path, what: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{what}: cannot read it as JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{what}: not a JSON object")
    return doc


# ------------------------------------------------------------------------------------------
# errors: one line each, never a traceback


def _httpx():
    try:
        import httpx2 as httpx  # what huggingface_hub 2.x uses
    except ImportError:  # pragma: no cover - older stacks
        import httpx  # type: ignore[no-redef]
    return httpx


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def translate(e: BaseException, *, repo_id: str, revision: str | None, endpoint: str, cache_dir: str,
              offline: bool, action: str = "download") -> CliError:
    """A huggingface_hub / HTTP exception -> one CliError with a clear message."""
    from huggingface_hub import errors as he
    httpx = _httpx()
    rev = revision or "main"
    where = f"{repo_id}@{rev}" if revision else repo_id
    if isinstance(e, CliError):
        return e
    for x in _chain(e):
        if isinstance(x, he.GatedRepoError):
            status = x.response.status_code if x.response is not None else None
            if status == 403:
                return HubError(f"{repo_id} is a gated repository and the token given has no access to it: "
                                "accept its terms on the model's Hub page with that account")
            return HubError(f"{repo_id} is a gated repository: accept its terms on the model's Hub page, then "
                            "pass a token of that account (--token or HF_TOKEN)")
        if isinstance(x, he.RepositoryNotFoundError):
            return HubError(f"{repo_id}: repository not found on {endpoint} (check the id; if it is private, "
                            "pass a token that can read it with --token or HF_TOKEN)")
        if isinstance(x, he.RevisionNotFoundError):
            return HubError(f"{repo_id}: revision {rev!r} not found (no such branch, tag or commit)")
        if isinstance(x, he.RemoteEntryNotFoundError):
            name = str(x.response.url).rsplit("/", 1)[-1] if x.response is not None else "a file"
            return HubError(f"{where}: file {name} not found in the repository")
        if isinstance(x, (he.OfflineModeIsEnabled, he.LocalEntryNotFoundError, he.CachedRepoTreeNotFoundError)) \
                and offline:
            return HubError(f"offline mode (HF_HUB_OFFLINE=1) and {where} is not (completely) in the cache at "
                            f"{cache_dir}: run `kbit pull {where}` once with network access, or unset "
                            "HF_HUB_OFFLINE")
        if isinstance(x, httpx.ConnectError):
            cached = f" and {where} is not in the cache" if action == "download" else ""
            return HubError(f"cannot connect to the Hub at {endpoint} ({_short(x) or 'connection failed'}){cached}: "
                            "check the network, proxy or HF_ENDPOINT")
        if isinstance(x, httpx.TimeoutException):
            return HubError(f"the Hub at {endpoint} did not answer in time ({type(x).__name__}); try again later")
        if isinstance(x, he.HfHubHTTPError):
            status = x.response.status_code if x.response is not None else 0
            srv = f": {x.server_message.strip()}" if getattr(x, "server_message", None) else ""
            if status == 401:
                return HubError(f"the Hub at {endpoint} refused the credentials for {repo_id} (401{srv}); "
                                "check --token / HF_TOKEN")
            if status == 403:
                return HubError(f"the token has no permission to {action} {repo_id} (403{srv}); use a token "
                                "with write access" if action == "push" else
                                f"the token has no permission to read {repo_id} (403{srv})")
            if status >= 500:
                return HubError(f"the Hub at {endpoint} failed with HTTP {status}{srv}; try again later")
            return HubError(f"the Hub at {endpoint} answered HTTP {status} for {where}{srv}")
        if isinstance(x, httpx.HTTPError):
            return HubError(f"network error while talking to the Hub at {endpoint} ({type(x).__name__}: "
                            f"{_short(x)}); run the same command again to continue")
        if isinstance(x, OSError) and "Consistency check failed" in str(x):
            return HubError(f"a file of {where} arrived incomplete ({_short(x)}); run the same command again")
    if any(isinstance(x, he.LocalEntryNotFoundError) for x in _chain(e)):
        return HubError(f"{where} could not be fetched from {endpoint} and is not in the cache at {cache_dir}")
    return HubError(f"Hub {action} of {where} failed: {type(e).__name__}: {_short(e)}")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _is_hub_exception(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return mod.startswith(("huggingface_hub", "httpx", "httpcore", "hf_xet")) or \
        (isinstance(e, OSError) and "Consistency check failed" in str(e))


@contextlib.contextmanager
def _hub_errors(**ctx) -> Iterator[None]:
    try:
        yield
    except CliError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one line
        from huggingface_hub import errors as he
        if _is_hub_exception(e) or isinstance(e, (he.HfHubHTTPError, he.LocalEntryNotFoundError,
                                                  he.OfflineModeIsEnabled, he.CachedRepoTreeNotFoundError)):
            raise translate(e, **ctx) from None
        if isinstance(e, ValueError) and type(e).__name__ == "HFValidationError":
            raise UsageError(f"{ctx.get('repo_id')}: {_short(e)}") from None
        raise


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    was_disabled = are_progress_bars_disabled()
    if not show and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            enable_progress_bars()


def _note(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"kbit: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# pull


def _storage_folder(cache_dir: str, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def _write_ref(cache_dir: str, repo_id: str, ref: str, sha: str) -> None:
    """Record ref -> commit in the cache (refs/REF), as huggingface_hub does, so that an offline
    pull by branch or tag name finds the snapshot we fetched by its commit."""
    if _SHA.match(ref):
        return
    path = _storage_folder(cache_dir, repo_id) / "refs" / ref
    try:
        if path.is_file() and path.read_text() == sha:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(sha)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache still serves this run


def pull(repo_id_or_id_at_rev: str, revision: str | None = None, local_dir: str | os.PathLike | None = None,
         token: str | None = None, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
         any_arch: bool = False, endpoint: str | None = None, quiet: bool = False) -> tuple[Path, dict]:
    """Download what converting a Hub model needs; return (local folder, provenance).

    provenance: {"source": repo id, "revision": the resolved 40-hex commit, "requested_revision",
    "hub_endpoint", "files", "architecture", "offline"}; `kbit quantize` records it in the output.
    """
    repo_id, revision = parse_repo(repo_id_or_id_at_rev, revision)
    ep, cache_dir, offline = hub_endpoint(endpoint), hub_cache_dir(), hub_offline()
    ctx = dict(repo_id=repo_id, revision=revision, endpoint=ep, cache_dir=cache_dir, offline=offline)
    local = str(Path(local_dir).expanduser()) if local_dir is not None else None
    include, exclude = list(include or ()), list(exclude or ())
    with _hub_errors(**ctx), _progress_bars(not quiet):
        if offline:
            return _pull_cached(repo_id, revision, local, include, exclude, any_arch, ep, cache_dir, quiet,
                                offline=True)
        httpx = _httpx()
        try:
            return _pull_online(repo_id, revision, local, token, include, exclude, any_arch, ep, cache_dir, quiet)
        except (httpx.ConnectError, httpx.TimeoutException) as net:
            # The Hub cannot be reached: a complete cached copy still serves (as huggingface_hub does).
            try:
                path, prov = _pull_cached(repo_id, revision, local, include, exclude, any_arch, ep, cache_dir,
                                          quiet=True, offline=False)
            except Exception:  # noqa: BLE001 - report the network failure, not the cache miss
                raise net from None
            _note(f"the Hub at {ep} cannot be reached ({_short(net)}); using the cached copy of "
                  f"{repo_id} at commit {prov['revision']}", quiet)
            return path, prov


def _pull_online(repo_id, revision, local, token, include, exclude, any_arch, ep, cache_dir, quiet):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    api = HfApi(endpoint=ep, token=token)
    info = api.model_info(repo_id, revision=revision)
    sha = info.sha
    if not sha or not _SHA.match(sha):
        raise HubError(f"the Hub at {ep} gave no commit for {repo_id}@{revision or 'main'}")
    files = [s.rfilename for s in (info.siblings or [])] or list(api.list_repo_files(repo_id, revision=sha))
    _write_ref(cache_dir, repo_id, revision or "main", sha)
    common = dict(repo_id=repo_id, revision=sha, cache_dir=cache_dir, local_dir=local, endpoint=ep, token=token)

    # 1. config.json first: refuse an unsupported architecture before any weight request
    arch = None
    if CONFIG in files:
        cfg_path = hf_hub_download(filename=CONFIG, **common)
        config = _read_json(cfg_path, f"{repo_id}@{sha[:12]}/{CONFIG}")
        arch = config_architecture(config)
        if not any_arch:
            check_architecture(config, repo_id)
    elif not any_arch:
        raise UnsupportedArchitectureError(
            f"{repo_id}: no config.json at commit {sha[:12]}, so kbit cannot tell the architecture; supported: "
            f"{describe_supported()}. Pass --any-arch to download it anyway")

    # 2. the rest of what a conversion reads
    def read_index(name: str) -> dict:
        return _read_json(hf_hub_download(filename=name, **common), f"{repo_id}@{sha[:12]}/{name}")

    wanted = select_files(files, read_index, include, exclude)
    if not _has_weights(wanted) and not exclude and not include:
        raise InputError(f"{repo_id}@{sha[:12]} holds no safetensors or PyTorch weights at the top level "
                         f"(files: {', '.join(sorted(files)[:8])}{', ...' if len(files) > 8 else ''}); "
                         "use --include to pick the files to fetch")
    if not quiet:
        _note(f"pulling {repo_id} at commit {sha} ({len(wanted)} files)", quiet)
    out = snapshot_download(allow_patterns=[_escape(f) for f in wanted] or ["\0none"], **common)
    return Path(out), _provenance(repo_id, revision, sha, ep, wanted, arch, offline=False)


def _pull_cached(repo_id, revision, local, include, exclude, any_arch, ep, cache_dir, quiet, offline):
    """The same selection from the cache, without any network request."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError

    rev = revision or "main"
    if _SHA.match(rev):
        sha = rev
    else:
        ref = _storage_folder(cache_dir, repo_id) / "refs" / rev
        if not ref.is_file():
            raise LocalEntryNotFoundError(f"no cached ref {rev} for {repo_id}")
        sha = ref.read_text().strip()
    base = Path(local) if local is not None else _storage_folder(cache_dir, repo_id) / "snapshots" / sha
    try:
        files = [f.path for f in get_cached_repo_tree(repo_id, revision=sha, cache_dir=cache_dir, local_dir=local)]
    except CachedRepoTreeNotFoundError:
        if not base.is_dir():
            raise LocalEntryNotFoundError(f"no cached snapshot {sha} of {repo_id}") from None
        files = [p.relative_to(base).as_posix() for p in base.rglob("*")
                 if p.is_file() and ".cache" not in p.relative_to(base).parts]

    def read_index(name: str) -> dict:
        if not (base / name).is_file():
            raise LocalEntryNotFoundError(f"{name} is not cached")
        return _read_json(base / name, f"{repo_id}@{sha[:12]}/{name}")

    arch = None
    if (base / CONFIG).is_file():
        config = _read_json(base / CONFIG, f"{repo_id}@{sha[:12]}/{CONFIG}")
        arch = config_architecture(config)
        if not any_arch:
            check_architecture(config, repo_id)
    elif CONFIG in files:
        raise LocalEntryNotFoundError(f"{CONFIG} is not cached")
    elif not any_arch:
        raise UnsupportedArchitectureError(f"{repo_id}: no config.json at commit {sha[:12]}, so kbit cannot tell "
                                           "the architecture; pass --any-arch to use it anyway")
    wanted = select_files(files, read_index, include, exclude)
    out = snapshot_download(repo_id, revision=sha, cache_dir=cache_dir, local_dir=local, endpoint=ep,
                            local_files_only=True, allow_patterns=[_escape(f) for f in wanted] or ["\0none"])
    missing = [f for f in wanted if not (Path(out) / f).is_file()]
    if missing:
        raise LocalEntryNotFoundError(f"{len(missing)} file(s) are not cached: {', '.join(missing[:3])}")
    _note(f"using the cached copy of {repo_id} at commit {sha}", quiet or not offline)
    return Path(out), _provenance(repo_id, revision, sha, ep, wanted, arch, offline=True)


def _escape(name: str) -> str:
    """An exact file name as an fnmatch pattern (huggingface_hub filters with fnmatch)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _provenance(repo_id, revision, sha, ep, files, arch, offline) -> dict:
    return {"source": repo_id, "revision": sha, "requested_revision": revision or "main",
            "hub_endpoint": ep, "architecture": arch, "files": list(files), "offline": offline}


# ------------------------------------------------------------------------------------------
# push


def check_folder(folder: str | os.PathLike) -> list[str]:
    """Why a kbit folder must not be published (empty: it is complete and every check passes)."""
    from kbitformat.io import INDEX_NAME, KbitReader

    from .convert import partial_dir
    f = Path(folder)
    if not f.is_dir():
        return [f"{f}: not a folder (push takes the output folder of `kbit quantize`)"]
    problems = []
    if f.name.startswith(".") and f.name.endswith(".kbit-partial"):
        problems.append(f"{f} is the work folder of an unfinished conversion")
    part = partial_dir(f.resolve())
    if part.exists():
        problems.append(f"an unfinished conversion sits beside it ({part.name}): finish it with "
                        "`kbit quantize ... --resume` or remove it")
    tmp = sorted(p.name for p in f.glob(".shard-*.tmp"))
    if tmp:
        problems.append(f"unfinished shard files inside: {', '.join(tmp[:3])}")
    if not (f / INDEX_NAME).is_file():
        problems.append(f"no {INDEX_NAME}: not a complete kbit model folder")
        return problems
    try:
        reader = KbitReader(f, verify=True)
    except Exception as e:  # noqa: BLE001 - KbitFormatError and friends: report, don't raise
        return problems + [_short(e)]
    problems += reader.verify_all()
    for name in reader.names():
        if reader.is_quantized(name):
            try:
                reader.quantized(name)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{name}: {_short(e)}")
    named = {p.name for p in reader.file_metadata}
    stray = sorted(p.name for p in f.glob("*.safetensors") if p.name not in named)
    if stray:
        problems.append(f"shards not named in the index: {', '.join(stray[:3])}")
    return problems


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, revision: str | None = None,
         token: str | None = None, endpoint: str | None = None, commit_message: str | None = None,
         quiet: bool = False) -> dict:
    """Verify a kbit folder completely, then create the repo (if needed) and upload the folder.

    Returns {"repo_id", "revision", "commit", "commit_url", "files"}.
    """
    repo_id, rev_in_id = parse_repo(repo_id, None)
    revision = revision or rev_in_id
    problems = check_folder(folder)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(f"refusing to push {folder}: it fails verification: {'; '.join(problems[:3])}{more}")
    ep, offline = hub_endpoint(endpoint), hub_offline()
    if offline:
        raise HubError(f"offline mode (HF_HUB_OFFLINE=1): cannot push to {repo_id}; unset HF_HUB_OFFLINE")
    from huggingface_hub import HfApi
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    with _hub_errors(repo_id=repo_id, revision=revision, endpoint=ep, cache_dir=hub_cache_dir(), offline=False,
                     action="push"), _progress_bars(not quiet):
        api = HfApi(endpoint=ep, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        _note(f"uploading {len(files)} files to {repo_id}" + (f"@{revision}" if revision else ""), quiet)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload kbit model ({len(files)} files)",
                                 ignore_patterns=[".*", "**/.*", "*.tmp"])
    return {"repo_id": repo_id, "revision": revision or "main", "commit": info.oid, "commit_url": info.commit_url,
            "files": files}
