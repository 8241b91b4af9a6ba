"""A stand-in for the Hugging Face Hub on 127.0.0.1: serves checkpoint folders to the real client.

It speaks what huggingface_hub calls: `GET /api/models/{repo}/revision/{rev}` (with
`blobs=true`: siblings with size and LFS sha256), `HEAD`/`GET /{repo}/resolve/{rev}/{file}`
with Range (206 + Content-Range), ETag / X-Linked-Etag / X-Linked-Size / X-Repo-Commit, and
the X-Error-Code answers the client turns into RepositoryNotFoundError, GatedRepoError,
RevisionNotFoundError and EntryNotFoundError. It logs every byte range it sends, and it can
misbehave on purpose: drop connections after a byte budget, answer short ranges, or serve
other bytes for a pinned file.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

CHUNK = 64 << 10
HASH_LIMIT = 256 << 20  # bigger files (sparse stand-ins of real checkpoints) get a stand-in sha256


@dataclass
class Transfer:
    repo: str
    file: str
    start: int
    end: int  # exclusive: the range asked for
    sent: int = 0  # bytes really sent


@dataclass
class Repo:
    name: str
    folder: Path
    commit: str
    refs: dict[str, str]  # branch or tag -> commit
    gated_token: str | None = None  # a gated repo: served only with this bearer token
    sha256: dict[str, str] = field(default_factory=dict)
    other_bytes: dict[str, bytes] = field(default_factory=dict)  # a pinned file served with other content
    keep_etag: bool = False  # ... under its old ETag (else the ETag of what is served)
    drop_budget: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before connections drop
    short_ranges: set[str] = field(default_factory=set)  # files answered with half the range asked

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*") if p.is_file())

    def content(self, name: str) -> bytes | Path:
        return self.other_bytes.get(name) or self.folder / name

    def size(self, name: str) -> int:
        c = self.content(name)
        return len(c) if isinstance(c, bytes) else c.stat().st_size

    def etag(self, name: str) -> str:
        if name in self.other_bytes and not self.keep_etag:
            return _sha256(self.other_bytes[name]) if _lfs(name) else _git_sha1(self.other_bytes[name])
        if _lfs(name):
            return self.sha256[name]
        return _git_sha1((self.folder / name).read_bytes())


def _lfs(name: str) -> bool:
    return name.endswith(".safetensors")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file_sha256(path: Path) -> str:
    if path.stat().st_size > HASH_LIMIT:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        return _sha256(f"{path.name}:{path.stat().st_size}:".encode() + head)
    return _sha256(path.read_bytes())


def _error(status: int, code: str, message: str) -> Response:
    return Response(message, status_code=status, headers={"X-Error-Code": code, "X-Error-Message": message})


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Transfer] = []
        self._lock = threading.Lock()
        app = Starlette(
            routes=[
                Route("/api/models/{org}/{name}/revision/{revision:path}", self._info),
                Route("/{org}/{name}/resolve/{revision}/{path:path}", self._resolve, methods=["GET", "HEAD"]),
            ]
        )
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="critical", access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("hub server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def add_repo(self, name: str, folder: Path, tags: tuple[str, ...] = (), gated_token: str | None = None) -> Repo:
        commit = hashlib.sha1(f"{name}:{folder}".encode()).hexdigest()
        repo = Repo(name, folder, commit, {"main": commit, **dict.fromkeys(tags, commit)}, gated_token)
        repo.sha256 = {n: _file_sha256(folder / n) for n in repo.files() if _lfs(n)}
        self.repos[name] = repo
        return repo

    def take_log(self) -> list[Transfer]:
        with self._lock:
            out, self.log = self.log, []
        return out

    # endpoints

    def _repo(self, request: Request) -> Repo | Response:
        name = f"{request.path_params['org']}/{request.path_params['name']}"
        repo = self.repos.get(name)
        if repo is None:
            return _error(401, "RepoNotFound", "Repository not found")
        if repo.gated_token and request.headers.get("authorization") != f"Bearer {repo.gated_token}":
            return _error(401, "GatedRepo", f"Access to model {name} is restricted. You must be authenticated.")
        revision = request.path_params["revision"]
        if revision != repo.commit and revision not in repo.refs:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo

    async def _info(self, request: Request) -> Response:
        repo = self._repo(request)
        if isinstance(repo, Response):
            return repo
        blobs = request.query_params.get("blobs") in ("1", "true", "True")
        siblings = []
        for n in repo.files():
            sib: dict = {"rfilename": n}
            if blobs:
                sib.update(size=repo.size(n), blobId=_git_sha1(n.encode()))
                if _lfs(n):
                    sib["lfs"] = {"size": repo.size(n), "sha256": repo.sha256[n], "pointerSize": 134}
            siblings.append(sib)
        return JSONResponse({"id": repo.name, "sha": repo.commit, "private": False, "siblings": siblings})

    async def _resolve(self, request: Request) -> Response:
        repo = self._repo(request)
        if isinstance(repo, Response):
            return repo
        name = request.path_params["path"]
        if not (repo.folder / name).is_file():
            return _error(404, "EntryNotFound", f"{name} does not exist on this revision")
        size = repo.size(name)
        etag = repo.etag(name)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if _lfs(name):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size, 200
        if (ranged := request.headers.get("range")) is not None:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", ranged.strip())
            if not m or int(m[1]) >= size:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
            start, end, status = int(m[1]), min(size, int(m[2]) + 1 if m[2] else size), 206
            if name in repo.short_ranges:
                end = start + max(1, (end - start) // 2)
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        transfer = Transfer(repo.name, name, start, end)
        with self._lock:
            self.log.append(transfer)
        return StreamingResponse(self._body(repo, name, transfer), status_code=status, headers=headers)

    async def _body(self, repo: Repo, name: str, transfer: Transfer) -> AsyncIterator[bytes]:
        content = repo.content(name)
        pos = transfer.start
        f = None if isinstance(content, bytes) else open(content, "rb")  # noqa: SIM115
        try:
            while pos < transfer.end:
                n = min(CHUNK, transfer.end - pos)
                if name in repo.drop_budget:
                    n = min(n, repo.drop_budget[name])
                    if n == 0:
                        raise ConnectionAbortedError("hub server: dropping the connection on purpose")
                    repo.drop_budget[name] -= n
                if f is None:
                    chunk = content[pos : pos + n]
                else:
                    f.seek(pos)
                    chunk = f.read(n)
                pos += len(chunk)
                transfer.sent += len(chunk)
                yield chunk
        finally:
            if f is not None:
                f.close()
