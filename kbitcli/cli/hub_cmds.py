"""kbit pull / kbit push: the Hugging Face Hub."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .main import app
from .options import JsonOpt, QuietOpt

TokenOpt = Annotated[Optional[str], typer.Option("--token", help="Hub access token (default: HF_TOKEN or the saved login).")]


@app.command()
def pull(
    repo_id: Annotated[str, typer.Argument(help="Hub model id: ORG/NAME or ORG/NAME@REVISION.")],
    revision: Annotated[Optional[str], typer.Option("--revision", "-r", help="Branch, tag or commit (default: main).")] = None,
    local_dir: Annotated[Optional[Path], typer.Option("--local-dir", help="Put the files in this folder instead of the Hub cache (HF_HOME).")] = None,
    token: TokenOpt = None,
    include: Annotated[list[str], typer.Option("--include", help="Also fetch files matching this glob (e.g. '*.md'). Repeatable.")] = [],  # noqa: B006
    exclude: Annotated[list[str], typer.Option("--exclude", help="Skip files matching this glob. Repeatable; wins over --include. config.json is always read.")] = [],  # noqa: B006
    any_arch: Annotated[bool, typer.Option("--any-arch", help="Fetch even an architecture kbit's runner does not support.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download what converting a Hub model needs (config, tokenizer, safetensors weights) and print the commit.

    Honours HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE (cache only).
    """
    from ..hub import pull as hub_pull
    path, prov = hub_pull(repo_id, revision=revision, local_dir=local_dir, token=token, include=include,
                          exclude=exclude, any_arch=any_arch, quiet=quiet or json_out)
    if json_out:
        print(json.dumps({"path": str(path), **prov}, indent=2))
    else:
        if not quiet:
            print(f"kbit: {prov['source']} at commit {prov['revision']}: {len(prov['files'])} files",
                  file=sys.stderr)
        print(str(path))  # stdout holds just the folder, for $(kbit pull ...)


@app.command()
def push(
    out: Annotated[Path, typer.Argument(help="A kbit model folder (the output of `kbit quantize`).")],
    repo_id: Annotated[str, typer.Argument(help="Hub model id to publish to: ORG/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", "-r", help="Branch to commit to (created if missing; default: main).")] = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Verify a kbit folder (every checksum, every quantized tensor), then upload it to the Hub."""
    from ..hub import push as hub_push
    res = hub_push(out, repo_id, private=private, revision=revision, token=token, quiet=quiet or json_out)
    if json_out:
        print(json.dumps(res, indent=2))
    elif not quiet:
        print(f"pushed {len(res['files'])} files to {res['repo_id']}@{res['revision']}: commit {res['commit']}")
