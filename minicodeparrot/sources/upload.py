"""Upload a folder to a Hugging Face Hub model repo as one commit, over plain HTTP (`requests`).

The Hub's write path is four endpoints (all under HF_ENDPOINT, all with `Authorization: Bearer $HF_TOKEN`):
  POST /api/repos/create        {"name", "organization", "private", "type"}: 200 created, 409 exists;
  POST /api/models/{repo}/preupload/{revision}   each file's path, size and first 512 bytes; the Hub
      answers per file whether it goes into git itself ("regular") or into LFS storage ("lfs"), which
      depends on the repo's .gitattributes and the size, so the client asks instead of guessing;
  POST /{repo}.git/info/lfs/objects/batch   the Git LFS batch API: for each LFS object (sha256, size)
      an `upload` action (a URL, usually a pre-signed storage URL on another host, to PUT the bytes to)
      and maybe a `verify` action, or no action when the Hub already has those bytes;
  POST /api/models/{repo}/commit/{revision}   the commit itself as NDJSON: a `header` line (summary =
      the commit message), then one line per file: `file` (small files, base64 inline) or `lfsFile`
      (path, sha256, size of bytes already uploaded by the batch step).
Nothing appears in the repo until the commit line is accepted, so a push that fails half-way leaves the
repo as it was (uploaded LFS objects are only unreferenced blobs) and can simply be done again.

Every request is retried like a download (`hub.RETRY`: 5xx, 429, timeouts, cut connections). A commit
whose answer was lost may have been applied: its retry then makes a second, identical commit, which is
harmless, where giving up would lose one.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests
from tqdm import tqdm

from minicodeparrot.errors import UserError
from minicodeparrot.sources import hub

LFS_HEADERS = {"Accept": "application/vnd.git-lfs+json", "Content-Type": "application/vnd.git-lfs+json"}
PREUPLOAD_CHUNK = 256  # files per preupload request, as the Hub's own client sends them


@dataclass
class LocalFile:
    path: str  # path in the repo, with "/"
    file: Path
    size: int
    sha256: str
    sample: bytes  # the first 512 bytes: the Hub looks at them to tell text from binary


def _describe(folder: Path) -> tuple[list[LocalFile], list[str]]:
    """The files to upload (sha256 computed) and the hidden ones skipped (.git, .cache, editor files)."""
    files, skipped = [], []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            skipped.append(rel)
            continue
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            sample = f.read(512)
            digest.update(sample)
            while chunk := f.read(hub.CHUNK):
                digest.update(chunk)
        files.append(LocalFile(rel, file, file.stat().st_size, digest.hexdigest(), sample))
    return files, skipped


class _Body:
    """A file as a request body: read from the start on every attempt, with an optional progress bar.

    `__len__` lets `requests` send a Content-Length instead of chunked encoding, which storage
    services refuse for PUTs."""

    def __init__(self, file: Path, size: int, bar: tqdm | None):
        self.f, self.size, self.bar = open(file, "rb"), size, bar

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.bar is not None:
            self.bar.update(len(data))
        return data


def _error_text(response: requests.Response) -> str:
    try:
        text = str(response.json().get("error", ""))
    except (ValueError, AttributeError):
        text = response.text
    return " ".join(text.split())[:200]


def _check(response: requests.Response, what: str, repo_id: str) -> None:
    """One-line errors for answers no retry can fix."""
    status = response.status_code
    if status < 400:
        return
    token, where = hub.get_token()
    if status == 401:
        hint = ("no token found: set HF_TOKEN to a token with write access" if token is None else
                f"the token from {where} was rejected: set HF_TOKEN to a valid token with write access")
        raise hub.HubError(f"HTTP 401 for {what}: {hint}")
    if status == 403:
        raise hub.HubError(f"HTTP 403 for {what}: the token from {where} may not write to {repo_id}; "
                           "use a token with write access to that repo or its owner")
    if status == 404:
        raise hub.HubNotFound(f"not found on the Hub: {what}; check the repo name ({repo_id}) "
                              "and HF_ENDPOINT")
    raise hub.HubError(f"HTTP {status} for {what}: {_error_text(response) or response.reason}")


def _call(session: requests.Session, method: str, url: str, what: str, headers: dict | None = None,
          json_body: object = None, data: bytes | None = None, file: LocalFile | None = None,
          bar: tqdm | None = None) -> requests.Response:
    """One request with the download retry policy; returns the answer (any status the retries leave)."""
    if json_body is not None:
        data = json.dumps(json_body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    last = "no answer"
    for attempt in range(hub.RETRY.attempts):
        response, body = None, None
        try:
            if file is not None:  # a file is re-read from its start on every attempt
                if bar is not None:
                    bar.reset()
                body = _Body(file.file, file.size, bar)
            response = session.request(method, url, data=body if file is not None else data,
                                       headers=hub._headers(url, headers), allow_redirects=False,
                                       timeout=hub.RETRY.timeout)
        except (requests.ConnectionError, requests.Timeout) as e:
            if hub._name_not_resolved(e):
                raise hub.HubUnreachable(f"cannot reach the Hub at {hub.endpoint()}: host cannot be resolved "
                                         "(no network, or an unknown host: check HF_ENDPOINT)") from None
            last = type(e).__name__
        else:
            if response.status_code not in hub.RETRY_STATUS:
                return response
            last = f"HTTP {response.status_code}"
        finally:
            if body is not None:
                body.f.close()
        if attempt + 1 < hub.RETRY.attempts:
            time.sleep(hub._retry_delay(attempt, response))
    raise hub.HubUnreachable(f"gave up on {what} after {hub.RETRY.attempts} attempts (last: {last}); "
                             "check the network or try again later")


def create_repo(session: requests.Session, repo_id: str, private: bool) -> None:
    """Create the model repo unless it exists. A token that may write to a repo but not create repos
    (fine-grained tokens) gets 401/403 here: then the repo only has to exist already."""
    owner, _, name = repo_id.rpartition("/")
    if not owner or not name or "/" in owner:
        raise UserError(f"the Hub repo must be owner/name, not {repo_id!r}")
    url = f"{hub.endpoint()}/api/repos/create"
    body = {"name": name, "organization": owner, "private": private, "type": "model"}
    response = _call(session, "POST", url, f"creating {repo_id}", json_body=body)
    if response.status_code in (401, 403):
        info = _call(session, "GET", f"{hub.endpoint()}/api/models/{repo_id}", f"model {repo_id}")
        if info.status_code == 200:
            return
    if response.status_code != 409:  # 409: it exists already, which is what we need
        _check(response, f"creating {repo_id}", repo_id)


def _upload_modes(session: requests.Session, repo_id: str, revision: str,
                  files: list[LocalFile]) -> dict[str, dict]:
    """path -> {"uploadMode": "regular"|"lfs", "shouldIgnore": bool}, as the Hub decides."""
    url = f"{hub.endpoint()}/api/models/{repo_id}/preupload/{quote(revision, safe='')}"
    modes = {}
    for start in range(0, len(files), PREUPLOAD_CHUNK):
        chunk = files[start:start + PREUPLOAD_CHUNK]
        body = {"files": [{"path": f.path, "size": f.size, "sample": base64.b64encode(f.sample).decode()}
                          for f in chunk]}
        response = _call(session, "POST", url, f"preupload to {repo_id}", json_body=body)
        _check(response, f"preupload to {repo_id}", repo_id)
        modes.update({entry["path"]: entry for entry in response.json()["files"]})
    return modes


def _upload_lfs(session: requests.Session, repo_id: str, revision: str, files: list[LocalFile],
                progress: bool) -> None:
    """The Git LFS batch protocol, basic transfer: ask where each object goes, PUT it there, verify."""
    url = f"{hub.endpoint()}/{repo_id}.git/info/lfs/objects/batch"
    body = {"operation": "upload", "transfers": ["basic"], "hash_algo": "sha256", "ref": {"name": revision},
            "objects": [{"oid": f.sha256, "size": f.size} for f in files]}
    response = _call(session, "POST", url, f"LFS batch for {repo_id}", LFS_HEADERS, json_body=body)
    _check(response, f"LFS batch for {repo_id}", repo_id)
    by_oid = {f.sha256: f for f in files}
    for obj in response.json()["objects"]:
        f = by_oid[obj["oid"]]
        if "error" in obj:
            raise hub.HubError(f"the Hub refused {f.path} for LFS: {obj['error'].get('message')} "
                               f"(code {obj['error'].get('code')})")
        actions = obj.get("actions") or {}
        if "upload" not in actions:
            continue  # the Hub already has these bytes (an unchanged file, or a push that failed later)
        upload = actions["upload"]
        if any(k.isdigit() for k in upload.get("header", {})) or "chunk_size" in upload.get("header", {}):
            raise hub.HubError(f"the Hub asked for a multipart upload of {f.path}; only the basic transfer "
                               "is supported (files under 5 GB)")
        with tqdm(total=f.size, unit="B", unit_scale=True, desc=f.path, disable=not progress) as bar:
            put = _call(session, "PUT", upload["href"], f"uploading {f.path}", upload.get("header"),
                        file=f, bar=bar)
        _check(put, f"uploading {f.path}", repo_id)
        if "verify" in actions:
            verify = actions["verify"]
            answer = _call(session, "POST", verify["href"], f"verifying {f.path}",
                           {**LFS_HEADERS, **verify.get("header", {})},
                           json_body={"oid": f.sha256, "size": f.size})
            _check(answer, f"verifying {f.path}", repo_id)


def _commit(session: requests.Session, repo_id: str, revision: str, message: str,
            regular: list[LocalFile], lfs: list[LocalFile]) -> str:
    lines = [{"key": "header", "value": {"summary": message, "description": ""}}]
    for f in regular:
        content = base64.b64encode(f.file.read_bytes()).decode()
        lines.append({"key": "file", "value": {"path": f.path, "content": content, "encoding": "base64"}})
    for f in lfs:
        lines.append({"key": "lfsFile", "value": {"path": f.path, "algo": "sha256", "oid": f.sha256,
                                                  "size": f.size}})
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    url = f"{hub.endpoint()}/api/models/{repo_id}/commit/{quote(revision, safe='')}"
    response = _call(session, "POST", url, f"commit to {repo_id}", {"Content-Type": "application/x-ndjson"},
                     data=data)
    _check(response, f"commit to {repo_id}", repo_id)
    return response.json().get("commitUrl", url)


def upload_folder(folder: str | Path, repo_id: str, message: str, private: bool = False,
                  revision: str = "main", progress: bool = False) -> str:
    """Upload every (non-hidden) file under `folder` to model repo `repo_id` as one commit; the commit URL.

    Files already in the repo but not in `folder` stay. The repo is created (private if asked) when
    missing; an existing repo keeps its visibility."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{str(folder)!r} is not a directory; pass the folder to upload")
    files, skipped = _describe(folder)
    if not files:
        raise UserError(f"{str(folder)!r} has no files to upload (hidden files are skipped)")
    with requests.Session() as session:
        create_repo(session, repo_id, private)
        modes = _upload_modes(session, repo_id, revision, files)
        ignored = [f.path for f in files if modes[f.path].get("shouldIgnore")]
        files = [f for f in files if not modes[f.path].get("shouldIgnore")]
        # Empty files cannot go through LFS (storage refuses empty PUTs), so they go inline.
        lfs = [f for f in files if modes[f.path]["uploadMode"] == "lfs" and f.size > 0]
        regular = [f for f in files if f not in lfs]
        if lfs:
            _upload_lfs(session, repo_id, revision, lfs, progress)
        url = _commit(session, repo_id, revision, message, regular, lfs)
    if skipped or ignored:
        warnings.warn(f"not uploaded: {len(skipped)} hidden file(s) ({', '.join(skipped[:3])}) and "
                          f"{len(ignored)} ignored by the repo's .gitignore ({', '.join(ignored[:3])})",
                          stacklevel=2)
    return url


def upload_command(args: argparse.Namespace) -> None:
    """`minicodeparrot upload DIR owner/name`: the same push training does at a checkpoint, once."""
    url = upload_folder(args.directory, args.repo_id, args.message or f"upload {Path(args.directory).name}",
                        private=args.private, progress=not args.no_progress)
    print(f"pushed {args.directory} to {args.repo_id}: {url}")
