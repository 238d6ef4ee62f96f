"""A loopback Hugging Face Hub for tests: a real HTTP server that the real huggingface_hub
client talks to (no mocks). Repos live in memory and are built by the tests.

    with HubServer() as hub:
        repo = hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": data})
        sha = repo.commit({"config.json": b'{"v": 2}'})        # a second commit on main
        snapshot_download("org/tiny", endpoint=hub.url, ...)
        hub.requested("resolve")                                # what the client asked for

Routes (what huggingface_hub 2.x uses for downloads and uploads):
  GET  /api/models/{ns}/{name}[/revision/{rev}]        id, 40-hex sha, siblings
  GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]     [{"type": "file", "path", "size", "oid"}, ...]
  HEAD /{ns}/{name}/resolve/{rev}/{path}               X-Repo-Commit, ETag, Content-Length
  GET  /{ns}/{name}/resolve/{rev}/{path}               bytes; Range (206) for resumed downloads
  POST /api/repos/create                               {"name", "organization", "visibility"}
  POST /api/validate-yaml                              README.md front matter check (always fine)
  POST /api/models/{ns}/{name}/preupload/{rev}         every file gets uploadMode "regular"
  POST /api/models/{ns}/{name}/commit/{rev}            NDJSON: header, then file (base64) entries
  POST /api/models/{ns}/{name}/branch/{branch}         create a branch (for push --revision)
Misses answer 404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound; a gated
repo answers 401 (no token) or 403 (a token without access) with X-Error-Code GatedRepo. No Xet
header is ever sent, so the client uses plain HTTP. Every request is logged (hub.requests,
hub.requested_files()) so tests can assert what was, or was not, fetched; hub.drop(path, at)
cuts the next download of a file mid-body to exercise resumed downloads.

Since every preupload answer is "regular", file contents arrive base64 in the commit body and no
LFS (or Xet) transfer is needed; an "lfsFile" commit entry is answered 400.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str  # decoded path, without the query
    query: dict
    headers: dict
    body: bytes = b""

    @property
    def resolve_file(self) -> str | None:
        """The repo file of a /resolve/ request, else None."""
        m = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+)$", self.path)
        return m.group(1) if m else None


@dataclass
class Repo:
    repo_id: str
    gated: bool = False          # resolve needs one of `tokens`
    private: bool = False        # everything needs one of `tokens`
    tokens: set = field(default_factory=set)
    commits: dict = field(default_factory=dict)   # sha -> {path: bytes}
    refs: dict = field(default_factory=dict)      # branch/tag -> sha
    history: list = field(default_factory=list)   # shas, oldest first
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def commit(self, files: dict, branch: str = "main", message: str = "commit", replace: bool = False) -> str:
        """A new commit on `branch` with `files` (path -> bytes; None deletes). Returns its sha."""
        with self._lock:
            parent = self.refs.get(branch)
            tree = {} if replace or parent is None else dict(self.commits[parent])
            for path, data in files.items():
                if data is None:
                    tree.pop(path, None)
                    for p in [p for p in tree if p.startswith(path.rstrip("/") + "/")]:
                        del tree[p]
                else:
                    tree[path] = bytes(data)
            h = hashlib.sha1()
            h.update(f"{self.repo_id}\0{parent}\0{len(self.history)}\0{message}".encode())
            for p in sorted(tree):
                h.update(p.encode() + b"\0" + git_blob_oid(tree[p]).encode())
            sha = h.hexdigest()
            self.commits[sha] = tree
            self.refs[branch] = sha
            self.history.append(sha)
            return sha

    def tag(self, name: str, sha: str) -> None:
        self.refs[name] = sha

    def resolve(self, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in self.refs:
            return self.refs[rev]
        if SHA_RE.match(rev) and rev in self.commits:
            return rev
        return None


class HubServer:
    """A ThreadingHTTPServer on 127.0.0.1 (port 0) serving in-memory repos."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.write_tokens: set[str] | None = None  # None: any (or no) token may create and commit
        self.drops: dict[str, list[int]] = {}      # repo file -> [byte offset, times left]; see drop()
        self.dropped: list[str] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- repos
    def add_repo(self, repo_id: str, files: dict | None = None, *, gated: bool = False, private: bool = False,
                 tokens=()) -> Repo:
        repo = Repo(repo_id, gated=gated, private=private, tokens=set(tokens))
        if files is not None:
            repo.commit(files, message="initial commit")
        self.repos[repo_id] = repo
        return repo

    def drop(self, path: str, at: int, times: int = 1) -> None:
        """Cut the next `times` GETs of repo file `path` after `at` bytes of the body: the
        server sends the full Content-Length, `at` bytes, then closes the connection."""
        self.drops[path] = [at, times]

    def _take_drop(self, path: str) -> int | None:
        with self._lock:
            d = self.drops.get(path)
            if not d:
                return None
            d[1] -= 1
            if d[1] <= 0:
                del self.drops[path]
            self.dropped.append(path)
            return d[0]

    # -- what the client did
    def log(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def requested(self, kind: str | None = None, method: str | None = None) -> list[Request]:
        """Requests seen so far; kind 'resolve' (file downloads), 'api', 'upload' or None (all)."""
        out = []
        for r in list(self.requests):
            if method and r.method != method:
                continue
            if kind == "resolve" and r.resolve_file is None:
                continue
            if kind == "api" and not r.path.startswith("/api/"):
                continue
            if kind == "upload" and not (r.method == "POST" and (r.path.startswith("/api/repos/create")
                                                                   or "/preupload/" in r.path or "/commit/" in r.path)):
                continue
            out.append(r)
        return out

    def requested_files(self) -> list[str]:
        return [r.resolve_file for r in self.requested("resolve")]

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()


def closed_port_url() -> str:
    """An endpoint on 127.0.0.1 where nothing listens (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing
    def _request(self) -> Request:
        u = urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        req = Request(self.command, unquote(u.path), parse_qs(u.query), {k.lower(): v for k, v in self.headers.items()},
                      body)
        self.hub.log(req)
        return req

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None) -> None:
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self._json(status, {"error": message}, h)

    def _token(self, req: Request) -> str | None:
        auth = req.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _repo(self, req: Request, ns: str, name: str, *, content: bool) -> Repo | None:
        """The repo, or None after answering 404/401/403 (content: a file download)."""
        repo = self.hub.repos.get(f"{ns}/{name}")
        tok = self._token(req)
        if repo is None or (repo.private and tok not in repo.tokens):
            self._error(404 if tok else 401, "RepoNotFound", "Repository not found")
            return None
        if content and repo.gated and tok not in repo.tokens:
            msg = (f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated "
                   "to access it. Please log in." if tok is None else
                   f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.")
            self._error(401 if tok is None else 403, "GatedRepo", msg)
            return None
        return repo

    def _revision(self, repo: Repo, rev: str) -> str | None:
        sha = repo.resolve(rev)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
        return sha

    # -- verbs
    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        req = self._request()
        p = req.path
        try:
            if req.method in ("GET", "HEAD"):
                if m := re.match(r"^/api/models/([^/]+)/([^/]+)/tree/([^/]+)(?:/(.*))?$", p):
                    return self._tree(req, *m.groups())
                if m := re.match(r"^/api/models/([^/]+)/([^/]+)(?:/revision/([^/]+))?$", p):
                    return self._info(req, *m.groups())
                if m := re.match(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$", p):
                    return self._resolve(req, *m.groups())
            elif req.method == "POST":
                if p == "/api/repos/create":
                    return self._create(req)
                if p == "/api/validate-yaml":
                    return self._json(200, {"warnings": [], "errors": []})
                if m := re.match(r"^/api/models/([^/]+)/([^/]+)/preupload/([^/]+)$", p):
                    return self._preupload(req, *m.groups())
                if m := re.match(r"^/api/models/([^/]+)/([^/]+)/commit/([^/]+)$", p):
                    return self._commit(req, *m.groups())
                if m := re.match(r"^/api/models/([^/]+)/([^/]+)/branch/([^/]+)$", p):
                    return self._branch(req, *m.groups())
            self._error(404, None, f"no route for {req.method} {p}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- downloads
    def _info(self, req: Request, ns: str, name: str, rev: str | None) -> None:
        repo = self._repo(req, ns, name, content=False)
        if repo is None:
            return
        sha = self._revision(repo, rev or "main")
        if sha is None:
            return
        tree = repo.commits[sha]
        self._json(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                         "gated": "manual" if repo.gated else False, "disabled": False,
                         "siblings": [{"rfilename": f} for f in sorted(tree)], "tags": []})

    def _tree(self, req: Request, ns: str, name: str, rev: str, sub: str | None) -> None:
        repo = self._repo(req, ns, name, content=False)
        if repo is None:
            return
        sha = self._revision(repo, rev)
        if sha is None:
            return
        tree = repo.commits[sha]
        recursive = (req.query.get("recursive", ["false"])[0]).lower() in ("1", "true")
        prefix = (sub.strip("/") + "/") if sub else ""
        if sub and not any(f.startswith(prefix) for f in tree):
            return self._error(404, "EntryNotFound", f"{sub} does not exist on {rev}")
        out, dirs = [], set()
        for f in sorted(tree):
            if not f.startswith(prefix):
                continue
            rest = f[len(prefix):]
            if not recursive and "/" in rest:
                dirs.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(len(parts)):
                    dirs.add(prefix + "/".join(parts[: i + 1]))
            out.append({"type": "file", "path": f, "size": len(tree[f]), "oid": git_blob_oid(tree[f])})
        out = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
               for d in sorted(dirs)] + out
        self._json(200, out)

    def _resolve(self, req: Request, ns: str, name: str, rev: str, path: str) -> None:
        repo = self._repo(req, ns, name, content=True)
        if repo is None:
            return
        sha = self._revision(repo, rev)
        if sha is None:
            return
        tree = repo.commits[sha]
        if path not in tree:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha})
        data = tree[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"', "Accept-Ranges": "bytes"}
        status, body = 200, data
        rng = req.headers.get("range")
        if rng and req.method == "GET":
            m = re.match(r"^bytes=(\d+)-(\d*)$", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}", **headers})
                body = data[start: end + 1]
                status = 206
                headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
        cut = self.hub._take_drop(path) if req.method == "GET" else None
        if cut is not None:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(status, body, headers, ctype="application/octet-stream")

    # -- uploads
    def _writer_ok(self, req: Request) -> bool:
        allowed = self.hub.write_tokens
        if allowed is None or self._token(req) in allowed:
            return True
        self._error(401, None, "Invalid credentials in Authorization header")
        return False

    def _create(self, req: Request) -> None:
        if not self._writer_ok(req):
            return
        body = json.loads(req.body or b"{}")
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}"
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = self.hub.add_repo(repo_id, private=private,
                                 tokens={self._token(req)} if private and self._token(req) else ())
        repo.commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                    message="initial commit")
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _preupload(self, req: Request, ns: str, name: str, rev: str) -> None:
        if not self._writer_ok(req):
            return
        repo = self._repo(req, ns, name, content=False)
        if repo is None:
            return
        sha = repo.resolve(rev)
        tree = repo.commits[sha] if sha else {}
        files = json.loads(req.body)["files"]
        self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": git_blob_oid(tree[f["path"]]) if f["path"] in tree else None}
                                   for f in files]})

    def _branch(self, req: Request, ns: str, name: str, branch: str) -> None:
        if not self._writer_ok(req):
            return
        repo = self._repo(req, ns, name, content=False)
        if repo is None:
            return
        branch = unquote(branch)
        if branch in repo.refs:
            return self._error(409, None, f"Reference refs/heads/{branch} already exists")
        start = json.loads(req.body or b"{}").get("startingPoint") or "main"
        sha = self._revision(repo, start)
        if sha is None:
            return
        repo.refs[branch] = sha
        self._json(200, {})

    def _commit(self, req: Request, ns: str, name: str, rev: str) -> None:
        if not self._writer_ok(req):
            return
        repo = self._repo(req, ns, name, content=False)
        if repo is None:
            return
        branch = unquote(rev)
        if branch not in repo.refs and not (branch == "main" and not repo.refs):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent and parent != repo.refs.get(branch):
            return self._error(412, None, "A commit has happened since. Please refresh and try again.")
        changes: dict = {}
        for item in lines:
            key, v = item["key"], item.get("value", {})
            if key == "file":
                if v.get("encoding", "base64") != "base64":
                    return self._error(400, None, f"unsupported encoding {v.get('encoding')}")
                changes[v["path"]] = base64.b64decode(v["content"])
            elif key in ("deletedFile", "deletedFolder"):
                changes[v["path"]] = None
            elif key == "lfsFile":
                return self._error(400, None, "this test Hub takes regular (base64) files only")
        sha = repo.commit(changes, branch=branch, message=header.get("summary", ""))
        self._json(200, {"commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None, "success": True})


def isolate_hub_env(monkeypatch, home) -> None:
    """HF_HOME at `home`, telemetry and progress bars off, no token / offline / cache /
    endpoint settings inherited from the caller's environment."""
    import logging
    import sys

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "KBIT_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # huggingface_hub logs through a StreamHandler bound to the sys.stderr of whichever test imported it
    # first (a capture stream that is closed by now): point it at this test's stderr.
    import huggingface_hub  # noqa: F401  (configures its logger)
    for h in logging.getLogger("huggingface_hub").handlers:
        if isinstance(h, logging.StreamHandler):
            monkeypatch.setattr(h, "stream", sys.stderr)

