"""A loopback stand-in for the Hugging Face Hub, with fault injection, for offline tests of sources/.

It serves local directories as Hub repos on 127.0.0.1:
  GET /api/{datasets|models}/{owner}/{name}/tree/{rev}?recursive=true  listing, `page_size` entries per page,
      the next page named in a `Link: <...>; rel="next"` header (as the Hub does);
  GET|HEAD /datasets/{owner}/{name}/resolve/{rev}/{path}   (models: /{owner}/{name}/resolve/...)
      "LFS" files (.gz, .safetensors) answer 302 to /cdn/... with X-Linked-Etag/X-Linked-Size, like the
      Hub's redirect to its CDN; with cross_host=True the redirect goes to http://localhost:{port}, which
      is the same server under a different host name, so a client must not send its token there;
  GET /cdn/...   the bytes, with Range (206), ETag and Content-Length; no auth (the URL is "signed").
With `token` set, /api and /resolve need `Authorization: Bearer <token>` (else 401); `read_token` is a second
valid token that may read but not write (writes answer 403).

The write side (`sources/upload.py`), like the Hub:
  POST /api/repos/create {"name", "organization", "private", "type"}: 200, or 409 when it exists; created
      repos live under `upload_dir` and are then served like the others; GET /api/models/{repo}: 200 or 404;
  POST /api/models/{repo}/preupload/{rev}: "lfs" for LFS_SUFFIXES and files of `lfs_threshold` bytes or more;
  POST /{repo}.git/info/lfs/objects/batch: upload + verify actions for objects not yet stored (the upload
      href is /lfs-store/{oid}, on http://localhost:{port} with cross_host=True, and takes no auth, like a
      pre-signed storage URL); PUT /lfs-store/{oid} checks the sha256; POST .../objects/verify;
  POST /api/models/{repo}/commit/{rev}: NDJSON header/file/lfsFile lines, applied at once (all files or
      none) and recorded in `commits[repo]` as {"summary", "files": {path: sha256}}.
`upload_faults` is consumed one per write request: ("status", code[, retry_after]), ("drop",) reads the
request and closes the connection unanswered (nothing applied), ("slow", seconds) sleeps and then applies
and answers (a client that timed out meanwhile retries: the Hub's real behaviour). `upload_fault_rate(rate,
seed)` draws 5xx, 429 and drops at random for the write requests.
`aliases` maps a one-segment legacy model name to its repo (`gpt2` -> `openai-community/gpt2`): like the Hub,
  /{alias}/resolve/... answers 307 with a relative Location under the repo's own name.

Faults: `body_faults` / `api_faults` are queues consumed one per request of that kind (a body request is
one that would send file bytes): ("status", 503), ("status", 429, retry_after), ("cut", n_bytes) sends
n bytes of the body and closes the connection, ("slow", seconds) waits before answering, ("ignore_range",)
answers 200 with the whole file to a Range request, ("replace", data) overwrites the file with `data` (a new
version, so a new ETag) and then answers normally, ("shift_range", k) answers a Range request from k bytes
further on. A Range request with an If-Range ETag that is no longer the file's gets the whole file (200), as
RFC 9110 says; `honour_if_range = False` makes the server ignore If-Range (a resumed answer is then of the
new version). `random_faults(rate, seed)` draws faults at random for body requests. Every request is logged
in `log` as (method, path, headers).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".gz", ".safetensors")


class HubServer:
    def __init__(self, datasets: dict[str, Path] | None = None, models: dict[str, Path] | None = None,
                 token: str | None = None, page_size: int = 3, cross_host: bool = False,
                 aliases: dict[str, str] | None = None, upload_dir: Path | None = None,
                 read_token: str | None = None):
        self.repos = {("datasets", k): Path(v) for k, v in (datasets or {}).items()}
        self.repos.update({("models", k): Path(v) for k, v in (models or {}).items()})
        self.token = token
        self.aliases = dict(aliases or {})
        self.page_size = page_size
        self.cross_host = cross_host
        self.listed_size: dict[str, int] = {}  # path -> size to claim in the listing (size-mismatch tests)
        self.honour_if_range = True
        self.body_faults: deque = deque()
        self.api_faults: deque = deque()
        self.log: list[tuple[str, str, dict]] = []
        self.read_token = read_token
        self.upload_dir = Path(upload_dir) if upload_dir is not None else None
        self.lfs_threshold = 10 * 1024 * 1024
        self.private: dict[str, bool] = {}
        self.commits: dict[str, list[dict]] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.upload_faults: deque = deque()
        self._upload_random: tuple[float, random.Random] | None = None
        self.random_upload_faults = 0  # how many upload_fault_rate drew
        self._write_lock = threading.Lock()
        self._random: tuple[float, random.Random] | None = None
        self._lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.hub = self
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def random_faults(self, rate: float, seed: int = 0) -> None:
        self._random = (rate, random.Random(seed))

    def upload_fault_rate(self, rate: float, seed: int = 0) -> None:
        self._upload_random = (rate, random.Random(seed))

    def next_fault(self, kind: str, size: int):
        with self._lock:
            queue = {"body": self.body_faults, "api": self.api_faults, "upload": self.upload_faults}[kind]
            if queue:
                return queue.popleft()
            if kind == "upload" and self._upload_random is not None:
                rate, rng = self._upload_random
                if rng.random() < rate:
                    self.random_upload_faults += 1
                    return rng.choice([("status", 500), ("status", 502), ("status", 503),
                                       ("status", 429, "0"), ("drop",)])
            if kind == "body" and self._random is not None:
                rate, rng = self._random
                if rng.random() < rate:
                    return rng.choice([("status", 503), ("status", 502), ("status", 429, "0"),
                                       ("cut", rng.randrange(max(size, 1))), ("ignore_range",),
                                       ("cut", rng.randrange(max(size, 1)))])
        return None

    def requests_to(self, prefix: str) -> list[tuple[str, str, dict]]:
        return [r for r in self.log if r[1].startswith(prefix)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def commit_oid(n: int) -> str:
    """A stand-in for the git commit id after the repo's n-th commit."""
    return hashlib.sha1(str(n).encode()).hexdigest()


def etag_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up (timeouts, size errors) are part of the tests, not server errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        self.hub.log.append((self.command, url.path, dict(self.headers)))
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        try:
            if parts[:1] == ["api"] and len(parts) >= 6 and parts[4] == "tree":
                if self._fault("api", 0) or not self._authorized():
                    return
                self._tree((parts[1], f"{parts[2]}/{parts[3]}"), parse_qs(url.query))
            elif parts[:2] == ["api", "models"] and len(parts) == 4:
                if self._authorized():
                    found = ("models", f"{parts[2]}/{parts[3]}") in self.hub.repos
                    self._send(200 if found else 404, json.dumps({"id": f"{parts[2]}/{parts[3]}"}).encode())
            elif parts[:1] == ["cdn"]:
                self._body(self._file((parts[1], f"{parts[2]}/{parts[3]}"), "/".join(parts[4:])), head)
            elif len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
                self._resolve(("datasets", f"{parts[1]}/{parts[2]}"), "/".join(parts[5:]), head)
            elif len(parts) >= 4 and parts[1] == "resolve" and parts[0] in self.hub.aliases:
                rest = "/".join(quote(p) for p in parts[1:])
                self._send(307, b"", {"Location": f"/{self.hub.aliases[parts[0]]}/{rest}"}, head=True)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(("models", f"{parts[0]}/{parts[1]}"), "/".join(parts[4:]), head)
            else:
                self._send(404, b"no such endpoint")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _authorized(self) -> bool:
        tokens = {f"Bearer {t}" for t in (self.hub.token, self.hub.read_token) if t is not None}
        if self.hub.token is None or self.headers.get("Authorization") in tokens:
            return True
        self._send(401, b'{"error":"Invalid credentials in Authorization header"}')
        return False

    def _file(self, repo: tuple[str, str], path: str) -> Path | None:
        root = self.hub.repos.get(repo)
        if root is None:
            return None
        file = (root / path).resolve()
        return file if file.is_file() and root.resolve() in file.parents else None

    def _tree(self, repo: tuple[str, str], query: dict) -> None:
        root = self.hub.repos.get(repo)
        if root is None:
            self._send(404, b'{"error":"Repository not found"}')
            return
        entries = []
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_dir():
                entries.append({"type": "directory", "path": rel, "oid": "0" * 40, "size": 0})
            else:
                size = self.hub.listed_size.get(rel, p.stat().st_size)
                entry = {"type": "file", "path": rel, "size": size, "oid": etag_of(p)[:40]}
                if p.name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": etag_of(p), "size": size, "pointerSize": 134}
                entries.append(entry)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + self.hub.page_size]
        headers = {"Content-Type": "application/json"}
        if start + self.hub.page_size < len(entries):
            base = urlsplit(self.path).path
            cursor = start + self.hub.page_size
            headers["Link"] = f'<{self.hub.url}{quote(base)}?recursive=true&cursor={cursor}>; rel="next"'
        self._send(200, json.dumps(page).encode(), headers)

    def _resolve(self, repo: tuple[str, str], path: str, head: bool) -> None:
        if not self._authorized():
            return
        file = self._file(repo, path)
        if file is None:
            what = b"Repository not found" if repo not in self.hub.repos else b"Entry not found"
            self._send(404, b'{"error":"' + what + b'"}')
            return
        # huggingface_hub refuses answers without X-Repo-Commit (the commit the revision points to).
        commit = {"X-Repo-Commit": commit_oid(len(self.hub.commits.get(repo[1], [])))}
        if not file.name.endswith(LFS_SUFFIXES):
            self._body(file, head, commit)
            return
        host = f"http://localhost:{self.hub.port}" if self.hub.cross_host else self.hub.url
        location = f"{host}/cdn/{repo[0]}/{repo[1]}/{quote(path)}?X-Signature=abc123"
        self._send(302, b"", {"Location": location, "X-Linked-Etag": f'"{etag_of(file)}"',
                              "X-Linked-Size": str(file.stat().st_size), **commit}, head=True)

    def _fault(self, kind: str, size: int):
        fault = self.hub.next_fault(kind, size)
        if fault is None:
            return None
        if fault[0] == "status":
            headers = {"Retry-After": fault[2]} if len(fault) > 2 else {}
            self._send(fault[1], b"injected fault", headers)
            return fault
        if fault[0] == "slow":
            time.sleep(fault[1])
            return None  # then answer normally (the client may have given up by then)
        return fault  # "cut", "ignore_range", "shift_range" and "replace" act in _body

    def _body(self, file: Path | None, head: bool, extra_headers: dict | None = None) -> None:
        if file is None:
            self._send(404, b'{"error":"Entry not found"}')
            return
        fault = None if head else self._fault("body", file.stat().st_size)
        if fault is not None and fault[0] == "status":
            return
        if fault is not None and fault[0] == "replace":
            file.write_bytes(fault[1])
        data = file.read_bytes()
        etag = f'"{etag_of(file)}"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   **(extra_headers or {})}
        status, start = 200, 0
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if self.hub.honour_if_range and if_range is not None and if_range != etag:
            range_header = None  # another version than the client has: send it whole
        if range_header and not (fault and fault[0] == "ignore_range"):
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if fault and fault[0] == "shift_range":
                start += fault[1]
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if fault is not None and fault[0] == "cut":
            self._send(status, body, headers, cut_after=fault[1])
        else:
            self._send(status, body, headers, head=head)

    # --- the write side ---------------------------------------------------------------------------
    def do_POST(self) -> None:
        self._route_write()

    def do_PUT(self) -> None:
        self._route_write()

    def _route_write(self) -> None:
        url = urlsplit(self.path)
        self.hub.log.append((self.command, url.path, dict(self.headers)))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        try:
            fault = self.hub.next_fault("upload", 0)
            if fault is not None and fault[0] == "status":
                headers = {"Retry-After": fault[2]} if len(fault) > 2 else {}
                self._send(fault[1], b'{"error":"injected fault"}', headers)
                return
            if fault is not None and fault[0] == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault is not None and fault[0] == "slow":
                time.sleep(fault[1])
            if self.command == "PUT" and parts[:1] == ["lfs-store"] and len(parts) == 2:
                self._lfs_put(parts[1], body)  # a pre-signed storage URL: no token needed
            elif not self._authorized() or not self._may_write():
                return
            elif self.command == "POST" and parts == ["api", "repos", "create"]:
                self._create(json.loads(body))
            elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
                repo = ("models", f"{parts[2]}/{parts[3]}")
                if repo not in self.hub.repos:
                    self._send(404, b'{"error":"Repository not found"}')
                elif parts[4] == "preupload":
                    self._preupload(json.loads(body))
                else:
                    self._commit(repo, body)
            elif len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
                repo = ("models", f"{parts[0]}/{parts[1].removesuffix('.git')}")
                if repo not in self.hub.repos:
                    self._send(404, b'{"message":"Repository not found"}')
                elif parts[5] == "batch":
                    self._lfs_batch(repo, json.loads(body))
                else:
                    self._lfs_verify(json.loads(body))
            else:
                self._send(404, b"no such endpoint")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _may_write(self) -> bool:
        read_only = self.hub.read_token is not None
        if read_only and self.headers.get("Authorization") == f"Bearer {self.hub.read_token}":
            self._send(403, b'{"error":"You don\'t have the rights to write to this repo"}')
            return False
        return True

    def _create(self, request: dict) -> None:
        repo_id = f"{request['organization']}/{request['name']}"
        if ("models", repo_id) in self.hub.repos:
            self._send(409, b'{"error":"You already created this model repo"}')
            return
        with self.hub._write_lock:
            root = self.hub.upload_dir / repo_id
            root.mkdir(parents=True)
            self.hub.repos[("models", repo_id)] = root
            self.hub.private[repo_id] = bool(request.get("private"))
            self.hub.commits[repo_id] = []
        self._send(200, json.dumps({"url": f"{self.hub.url}/{repo_id}", "name": repo_id}).encode())

    def _preupload(self, request: dict) -> None:
        def mode(f: dict) -> str:
            large = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= self.hub.lfs_threshold
            return "lfs" if large else "regular"

        files = [{"path": f["path"], "uploadMode": mode(f), "shouldIgnore": False, "oid": None}
                 for f in request["files"]]
        self._send(200, json.dumps({"files": files}).encode(), {"Content-Type": "application/json"})

    def _lfs_batch(self, repo: tuple[str, str], request: dict) -> None:
        assert request["operation"] == "upload" and "basic" in request["transfers"], request
        host = f"http://localhost:{self.hub.port}" if self.hub.cross_host else self.hub.url
        objects = []
        for obj in request["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_store:
                entry["actions"] = {
                    "upload": {"href": f"{host}/lfs-store/{obj['oid']}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/{repo[1]}.git/info/lfs/objects/verify", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if not body:  # storage services refuse empty uploads (S3: 501)
            self._send(501, b'{"error":"empty body"}')
            return
        if hashlib.sha256(body).hexdigest() != oid:
            self._send(400, b'{"error":"sha256 mismatch"}')
            return
        self.hub.lfs_store[oid] = body
        self._send(200, b"")

    def _lfs_verify(self, request: dict) -> None:
        stored = self.hub.lfs_store.get(request["oid"])
        ok = stored is not None and len(stored) == request["size"]
        self._send(200 if ok else 404, b"{}" if ok else b'{"message":"object not found"}')

    def _commit(self, repo: tuple[str, str], body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            self._send(400, b'{"error":"the first line must be the header"}')
            return
        files: dict[str, bytes] = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                assert value["encoding"] == "base64"
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                data = self.hub.lfs_store.get(value["oid"])
                if data is None or len(data) != value["size"]:
                    self._send(422, b'{"error":"LFS object not uploaded"}')
                    return
                files[value["path"]] = data
            else:
                self._send(400, b'{"error":"unknown line"}')
                return
        root = self.hub.repos[repo]
        with self.hub._write_lock:
            for path, data in files.items():
                target = root / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self.hub.commits.setdefault(repo[1], []).append(
                {"summary": lines[0]["value"]["summary"],
                 "files": {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}})
            oid = commit_oid(len(self.hub.commits[repo[1]]))
        self._send(200, json.dumps({"commitUrl": f"{self.hub.url}/{repo[1]}/commit/{oid}",
                                    "commitOid": oid}).encode(), {"Content-Type": "application/json"})

    def _send(self, status: int, body: bytes, headers: dict | None = None, head: bool = False,
              cut_after: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head or self.command == "HEAD":  # a HEAD answer has no body, whatever its status
            return
        if cut_after is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut_after])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def write_shards(directory: Path, texts: list[str], n_files: int, suffix: str = ".json.gz") -> list[Path]:
    """Codeparrot-format shards file-000000000000{suffix}...: the texts dealt in contiguous blocks."""
    import gzip

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    per_file = -(-len(texts) // n_files)
    for k in range(n_files):
        path = directory / f"file-{k:012d}{suffix}"
        lines = []
        for i, text in enumerate(texts[k * per_file:(k + 1) * per_file], k * per_file):
            record = {"repo_name": f"owner{i % 7}/repo{i}", "path": f"pkg/mod_{i}.py",
                      "copies": str(1 + i % 3), "size": str(len(text.encode())), "content": text,
                      "license": "mit"}
            lines.append(json.dumps(record) + "\n")
        data = "".join(lines).encode()
        path.write_bytes(gzip.compress(data, mtime=0) if suffix.endswith(".gz") else data)
        paths.append(path)
    return paths


def offline_hub_env(monkeypatch, tmp_path, token: str, max_delay: float) -> None:
    """For tests that talk to this server: no real token or cache can leak in, and retries are fast."""
    from minicodeparrot.sources import hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(hub, "RETRY", hub.RetryPolicy(attempts=5, base_delay=0.001, max_delay=max_delay,
                                                       timeout=(5.0, 5.0)))
