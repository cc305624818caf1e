"""A small local HTTP server that stands in for the Hugging Face Hub in tests (no real Hub is reachable).

It answers exactly the endpoints huggingface_hub 2.4's upload path calls, with the JSON shapes that client
parses (read from its source: hf_api.py, _commit_api.py, lfs.py):

    POST /api/repos/create                                  create_repo (409 + {"url"} when it exists)
    GET  /api/models/{repo}[/revision/{rev}]                repo_info
    POST /api/validate-yaml                                 create_commit checks README.md metadata first
    POST /api/models/{repo}/paths-info/{rev}                get_paths_info (form-encoded paths)
    POST /api/models/{repo}/preupload/{rev}                 upload mode per file: "lfs" or "regular"
    POST /{repo}.git/info/lfs/objects/batch                 LFS batch API (basic transfer)
    PUT  /lfs-upload/{oid}   POST /lfs-verify               where the batch API sends the bytes
    POST /api/models/{repo}/commit/{rev}                    NDJSON commit (file / lfsFile lines)

Weights (*.safetensors, *.bin, > 10 MB) go through LFS like on the Hub; everything else is "regular"
(base64 inside the commit). The client picks Xet storage on its own when hf_xet is installed, so tests set
HF_HUB_DISABLE_XET=1 to take the plain LFS path. Every /api call needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024
REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{REPO}/paths-info/(?P<rev>[^/]+)$"), "paths_info"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/{REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_upload"),
    ("POST", re.compile(r"^/lfs-verify$"), "lfs_verify"),
]
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {size, sha256, lfs, oid}
    commits: list[str] = field(default_factory=list)


class FakeHub:
    """State of the fake Hub: repos, their files and commits, LFS objects on disk, and a request log."""

    def __init__(self, root: Path, token: str):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self.lock = threading.Lock()
        self.url = ""
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------ storage

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        (self.root / "objects" / sha).write_bytes(data)
        return sha

    def has_object(self, sha: str) -> bool:
        return (self.root / "objects" / sha).is_file()

    def read(self, repo_id: str, path: str) -> bytes:
        """The bytes of a file as the repo's head holds it."""
        return (self.root / "objects" / self.repos[repo_id].files[path]["sha256"]).read_bytes()

    def new_commit(self, repo: Repo) -> str:
        oid = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        repo.commits.append(oid)
        return oid

    def file_record(self, data: bytes, lfs: bool) -> dict[str, Any]:
        sha = self.store(data)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
        return {"size": len(data), "sha256": sha, "lfs": lfs, "oid": git_oid(pointer if lfs else data)}


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub

    def log_message(self, *args: Any) -> None:  # quiet: the tests read state, not logs
        pass

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        path = urlparse(self.path).path
        self.state.requests.append((method, path))
        for verb, pattern, name in ROUTES:
            match = pattern.match(path)
            if verb == method and match:
                body = self._body()
                if path.startswith("/api/") or name == "lfs_batch":
                    auth = self.headers.get("Authorization", "")
                    self.state.auth_headers.append(auth)
                    if auth != f"Bearer {self.state.token}":
                        return self._send(401, {"error": "Invalid credentials in Authorization header"})
                groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self.state.lock:
                    status, payload = getattr(self, name)(body, **groups)
                return self._send(status, payload)
        self._body()
        self._send(404, {"error": f"no route for {method} {path}"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _repo(self, repo_id: str) -> Repo | None:
        return self.state.repos.get(repo_id)

    # ------------------------------------------------------------------ endpoints

    def create_repo(self, body: bytes) -> tuple[int, Any]:
        req = json.loads(body)
        repo_id = f"{req['organization']}/{req['name']}"
        url = f"{self.state.url}/{repo_id}"
        if repo_id in self.state.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        private = req.get("visibility") == "private" or bool(req.get("private"))
        repo = Repo(private=private)
        # Like the Hub: a new repo starts with one commit holding .gitattributes.
        repo.files[".gitattributes"] = self.state.file_record(GITATTRIBUTES, lfs=False)
        self.state.new_commit(repo)
        self.state.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id}

    def repo_info(self, body: bytes, repo: str, rev: str = "main") -> tuple[int, Any]:
        found = self._repo(repo)
        if found is None:
            return 404, {"error": "Repository not found"}
        siblings = [{"rfilename": p} for p in sorted(found.files)]
        return 200, {"id": repo, "sha": found.commits[-1], "private": found.private, "siblings": siblings}

    def validate_yaml(self, body: bytes) -> tuple[int, Any]:
        import yaml

        content = json.loads(body)["content"]
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content.split("\n---\n", 1)[0][4:])
            except yaml.YAMLError as err:
                return 400, {"error": "invalid YAML", "errors": [{"message": str(err)}]}
            if not isinstance(meta, dict):
                return 400, {"error": "metadata must be a mapping", "errors": [{"message": "not a mapping"}]}
        return 200, {"errors": [], "warnings": []}

    def paths_info(self, body: bytes, repo: str, rev: str) -> tuple[int, Any]:
        found = self._repo(repo)
        if found is None:
            return 404, {"error": "Repository not found"}
        form = parse_qs(body.decode())
        out = []
        for path in form.get("paths", []):
            rec = found.files.get(path)
            if rec is None:
                continue
            entry = {"type": "file", "path": path, "size": rec["size"], "oid": rec["oid"]}
            if rec["lfs"]:
                entry["lfs"] = {"oid": rec["sha256"], "size": rec["size"], "pointerSize": 134}
            out.append(entry)
        return 200, out

    def preupload(self, body: bytes, repo: str, rev: str) -> tuple[int, Any]:
        found = self._repo(repo)
        if found is None:
            return 404, {"error": "Repository not found"}
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > LFS_MIN_SIZE
            rec = found.files.get(f["path"])
            oid = (rec["sha256"] if rec["lfs"] else rec["oid"]) if rec else None
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return 200, {"files": files, "commitOid": found.commits[-1]}

    def lfs_batch(self, body: bytes, repo: str) -> tuple[int, Any]:
        if self._repo(repo) is None:
            return 404, {"message": "Repository not found"}
        objects = []
        for obj in json.loads(body)["objects"]:
            if self.state.has_object(obj["oid"]):
                objects.append({"oid": obj["oid"], "size": obj["size"]})  # already stored: no actions
                continue
            actions = {
                "upload": {"href": f"{self.state.url}/lfs-upload/{obj['oid']}"},
                "verify": {"href": f"{self.state.url}/lfs-verify"},
            }
            objects.append(
                {"oid": obj["oid"], "size": obj["size"], "authenticated": True, "actions": actions}
            )
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_upload(self, body: bytes, oid: str) -> tuple[int, Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 does not match the object id"}
        self.state.store(body)
        return 200, {}

    def lfs_verify(self, body: bytes) -> tuple[int, Any]:
        req = json.loads(body)
        return (200, {}) if self.state.has_object(req["oid"]) else (404, {"error": "object not uploaded"})

    def commit(self, body: bytes, repo: str, rev: str) -> tuple[int, Any]:
        found = self._repo(repo)
        if found is None:
            return 404, {"error": "Repository not found"}
        changes: dict[str, dict[str, Any]] = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                data = base64.b64decode(value["content"])
                changes[value["path"]] = self.state.file_record(data, lfs=False)
            elif item["key"] == "lfsFile":
                if not self.state.has_object(value["oid"]):
                    return 400, {"error": f"LFS object {value['oid']} was never uploaded"}
                data = (self.state.root / "objects" / value["oid"]).read_bytes()
                changes[value["path"]] = self.state.file_record(data, lfs=True)
            elif item["key"] == "deletedFile":
                changes[value["path"]] = {}
        for path, rec in changes.items():
            if rec:
                found.files[path] = rec
            else:
                found.files.pop(path, None)
        oid = self.state.new_commit(found)
        return 200, {"commitUrl": f"{self.state.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
