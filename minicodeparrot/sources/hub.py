"""The Hugging Face Hub over plain HTTP (`requests`): list a repo's files, stream or download one.

Three endpoints are all we need:
  GET {endpoint}/api/{datasets|models}/{repo}/tree/{revision}?recursive=true   the file listing, paged
      with a `Link: <...>; rel="next"` header;
  GET {endpoint}/datasets/{repo}/resolve/{revision}/{path}   (models: {endpoint}/{repo}/resolve/...)
      the file; large (LFS) files answer with a 302 to a signed CDN URL on another host.

The token goes only to the endpoint's own host. We follow redirects ourselves instead of letting
`requests` do it, so that the Authorization header is dropped the moment a redirect leaves that host:
the CDN URL is already signed, and a token sent there would leak to a third party.

Long downloads over the internet get cut. `HubStream` retries connection errors, timeouts, 5xx and
429 with bounded exponential backoff, and a body cut half-way is resumed with `Range: bytes=N-`
from the byte already reached, so a 50 MB shard does not restart from zero. A resume must continue
the *same version* of the file: it sends `If-Range: <etag>` and checks the answer's ETag and
Content-Range, because a file replaced on the Hub between two requests (even by one of the same
size) would otherwise be spliced from two versions without any error.
"""

from __future__ import annotations

import datetime
import email.utils
import fnmatch
import io
import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import requests
import urllib3

from minicodeparrot.errors import UserError

RETRY_STATUS = {429, 500, 502, 503, 504}
CHUNK = 1 << 20


class HubError(UserError):
    """A Hub request failed in a way the user can act on (auth, name, network)."""


class HubUnreachable(HubError):
    """Out of retries: network down, Hub overloaded. `download` then falls back to a cached copy."""


class HubNotFound(HubError):
    """404: the repo, revision or file does not exist (callers may try another file name)."""


class HubFileChanged(HubError):
    """The file changed on the Hub while we were reading it: the bytes so far are of another version."""


@dataclass
class RetryPolicy:
    """How hard to try. Tests shrink the delays; Retry-After from the server wins (up to max_delay)."""

    attempts: int = 6  # tries per request without progress; a resumed body that made progress resets it
    base_delay: float = 1.0  # then 2, 4, 8, 16 s: about half a minute before giving up
    max_delay: float = 30.0
    timeout: tuple[float, float] = (10.0, 60.0)  # (connect, read) seconds
    max_redirects: int = 10


RETRY = RetryPolicy()


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    oid: str | None = None


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_home() -> Path:
    """$HF_HOME, else ~/.cache/huggingface: where huggingface_hub keeps the token and the cache."""
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")


def _token_file() -> Path:
    return hf_home() / "token"


def get_token() -> tuple[str | None, str]:
    """(token, where it came from): HF_TOKEN, then HUGGING_FACE_HUB_TOKEN, then $HF_HOME/token."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip(), var
    path = _token_file()
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, str(path)
    return None, "none"


def _repo_prefix(repo_type: str) -> str:
    if repo_type not in ("dataset", "model"):
        raise HubError(f"repo_type must be 'dataset' or 'model', not {repo_type!r}")
    return "datasets/" if repo_type == "dataset" else ""


def tree_url(repo_id: str, revision: str = "main", repo_type: str = "dataset") -> str:
    kind = "datasets" if repo_type == "dataset" else "models"
    return f"{endpoint()}/api/{kind}/{repo_id}/tree/{quote(revision, safe='')}?recursive=true"


def resolve_url(repo_id: str, path: str, revision: str = "main", repo_type: str = "dataset") -> str:
    return (f"{endpoint()}/{_repo_prefix(repo_type)}{repo_id}/resolve/{quote(revision, safe='')}/"
            f"{quote(path, safe='/')}")


def _same_host(url: str) -> bool:
    a, b = urlsplit(url), urlsplit(endpoint())
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def _headers(url: str, extra: dict | None = None) -> dict:
    headers = {"Accept-Encoding": "identity", "User-Agent": "minicodeparrot"}
    token, _ = get_token()
    if token and _same_host(url):
        headers["Authorization"] = f"Bearer {token}"
    return dict(headers, **(extra or {}))


def _retry_after(response: requests.Response | None) -> float | None:
    """Seconds the server asks us to wait (Retry-After: seconds or an HTTP date), None if it does not say.

    A malformed value (`soon`, `nan`) counts as absent: a bad header must not turn an answer that
    is worth retrying into a crash.
    """
    after = response.headers.get("Retry-After", "").strip() if response is not None else ""
    if not after:
        return None
    try:
        seconds = float(after)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(after)
        except (ValueError, TypeError):
            return None
        if when.tzinfo is None:  # "-0000" dates parse naive; HTTP dates are always UTC
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - time.time()
    return seconds if math.isfinite(seconds) else None


def _retry_delay(attempt: int, response: requests.Response | None) -> float:
    after = _retry_after(response)
    delay = RETRY.base_delay * 2 ** attempt if after is None else after
    return min(max(delay, 0.0), RETRY.max_delay)


def _raise_for(response: requests.Response, what: str) -> None:
    """One-line errors for the answers no retry can fix."""
    status = response.status_code
    if status in (401, 403):
        token, where = get_token()
        if token is None:
            hint = "no token found: set HF_TOKEN (or HUGGING_FACE_HUB_TOKEN, or write it to $HF_HOME/token)"
        else:
            hint = (f"the token from {where} was rejected or lacks access "
                    "(gated repos: accept the terms on the Hub)")
        raise HubError(f"HTTP {status} for {what}: private, gated or missing repo; {hint}")
    if status == 404:
        raise HubNotFound(f"not found on the Hub: {what}; check the repo name, revision and path")
    if status >= 400:
        raise HubError(f"HTTP {status} for {what} ({response.reason})")


def _name_not_resolved(error: BaseException) -> bool:
    """Whether a connection error comes from DNS (socket.gaierror somewhere in its causes).

    urllib3 wraps it as MaxRetryError(reason=NameResolutionError(...)) inside requests' ConnectionError,
    so we walk __cause__/__context__ and `.reason`.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror):
            return True
        reason = getattr(e, "reason", None)
        todo += [e.__cause__, e.__context__, reason if isinstance(reason, BaseException) else None]
    return False


def _get(session: requests.Session, url: str, what: str, headers: dict | None = None,
         method: str = "GET", follow: bool = True) -> requests.Response:
    """A request with retries and host-checked redirects; returns the final (2xx or 3xx) response."""
    last = "no answer"
    for attempt in range(RETRY.attempts):
        target = url
        try:
            for _ in range(RETRY.max_redirects + 1):
                response = session.request(method, target, headers=_headers(target, headers), stream=True,
                                           allow_redirects=False, timeout=RETRY.timeout)
                if not (follow and response.is_redirect):
                    break
                response.close()
                target = urljoin(target, response.headers["Location"])
            else:
                raise HubError(f"too many redirects for {what} ({url})")
        except (requests.ConnectionError, requests.Timeout) as e:
            if _name_not_resolved(e):
                # No DNS answer is no network or a wrong host: retrying for half a minute changes neither.
                host = urlsplit(target).hostname
                raise HubUnreachable(f"cannot reach the Hub at {endpoint()}: host {host!r} cannot be "
                                     "resolved (no network, or an unknown host: check HF_ENDPOINT)") from None
            last, response = type(e).__name__, None
        else:
            if response.status_code not in RETRY_STATUS:
                if response.status_code >= 400:
                    response.close()
                    _raise_for(response, what)
                return response
            last = f"HTTP {response.status_code}"
            response.close()
        if attempt + 1 < RETRY.attempts:
            time.sleep(_retry_delay(attempt, response))
    raise HubUnreachable(f"gave up on {url} after {RETRY.attempts} attempts (last: {last}); "
                         "check the network or try again later")


def list_files(repo_id: str, revision: str = "main", repo_type: str = "dataset",
               pattern: str | None = None) -> list[HubFile]:
    """All files of a repo (recursively), optionally only those whose path matches a glob pattern."""
    url: str | None = tree_url(repo_id, revision, repo_type)
    files = []
    with requests.Session() as session:
        while url:
            response = _get(session, url, f"{repo_type} {repo_id}@{revision}")
            try:
                entries = response.json()
            except ValueError as e:
                raise HubError(f"the Hub answered {url} with something that is not JSON; is HF_ENDPOINT "
                               f"({endpoint()}) right?") from e
            for entry in entries:
                wanted = pattern is None or fnmatch.fnmatch(entry["path"], pattern)
                if entry.get("type") == "file" and wanted:
                    lfs = entry.get("lfs") or {}
                    files.append(HubFile(entry["path"], int(entry.get("size", lfs.get("size", 0))),
                                         entry.get("oid")))
            url = response.links.get("next", {}).get("url")
    return sorted(files, key=lambda f: f.path)


class HubStream(io.RawIOBase):
    """The bytes of one Hub file, resuming with Range requests when the connection is cut.

    Reads are sequential only. At the end the number of bytes received must equal the expected
    size (the listing's, else the first response's Content-Length), or HubError is raised: a short
    file must never be parsed as if it were complete.

    A resume continues the version whose first bytes we already handed out, or fails: the first
    answer's (strong) ETag goes out as If-Range, so a server holding another version answers 200
    with the whole new file, and every resumed answer must carry that same ETag and, for a 206,
    start exactly at our position. The bytes already read cannot be taken back, so a changed file
    is a `HubFileChanged` error (read it again), never a splice of two versions.
    """

    def __init__(self, url: str, what: str, expected_size: int | None = None):
        super().__init__()
        self.url, self.what, self.expected_size = url, what, expected_size
        self.pos = 0
        self.etag: str | None = None  # the version being read; None before the first answer
        self._session = requests.Session()
        self._response: requests.Response | None = None
        try:
            self._open()
        except BaseException:
            self._session.close()
            raise

    def _open(self) -> None:
        headers = None
        if self.pos:
            if self.etag is None:  # no (strong) validator: a resumed body could be of another version
                raise HubFileChanged(f"{self.what}: the connection was cut at byte {self.pos} and the server "
                                     "gave no ETag to resume the same version with; read the file again")
            headers = {"Range": f"bytes={self.pos}-", "If-Range": self.etag}
        response = _get(self._session, self.url, self.what, headers)
        try:
            etag = response.headers.get("ETag")
            if not self.pos:
                self.etag = etag if etag and not etag.startswith("W/") else None  # If-Range takes strong ones
            elif etag != self.etag:
                raise HubFileChanged(f"{self.what} changed on the Hub while it was read (ETag {self.etag} at "
                                     f"byte {self.pos}, now {etag}); read it again to get the new version")
            if response.status_code == 206:
                content_range = response.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
                start, _, total = content_range.removeprefix("bytes ").partition("-")
                if start != str(self.pos):
                    raise HubFileChanged(f"{self.what}: asked to resume at byte {self.pos}, the server sent "
                                         f"Content-Range {content_range!r}; read the file again")
                total = total.rpartition("/")[2]
                self._check_size(int(total) if total.isdigit() else None)
            elif "Content-Length" in response.headers:
                self._check_size(int(response.headers["Content-Length"]))
        except HubError:
            response.close()
            raise
        if self.pos and response.status_code == 200:
            # The same version (its ETag matched) sent whole: the server ignored Range. Skip what we have.
            skip = self.pos
            while skip:
                chunk = response.raw.read(min(skip, CHUNK), decode_content=False)
                if not chunk:
                    response.close()
                    raise requests.ConnectionError("connection cut while skipping")
                skip -= len(chunk)
        elif self.pos and response.status_code != 206:
            response.close()
            raise HubError(f"unexpected HTTP {response.status_code} resuming {self.what}")
        self._response = response

    def _check_size(self, size: int | None) -> None:
        if self.expected_size is None:
            self.expected_size = size
        elif size is not None and size != self.expected_size:
            raise HubError(f"{self.what}: the server has {size} bytes but the listing said "
                           f"{self.expected_size}; the file changed, list the repo again")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        failures = 0
        while True:
            try:
                if self._response is None:
                    self._open()
                data = self._response.raw.read(len(buffer), decode_content=False)
            except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError, OSError) as e:
                error = e
            else:
                if data:
                    buffer[: len(data)] = data
                    self.pos += len(data)
                    if self.expected_size is not None and self.pos > self.expected_size:
                        raise HubError(f"{self.what}: received more than {self.expected_size} bytes")
                    return len(data)
                # A clean end of the body: the server says this is all of the file.
                if self.expected_size is not None and self.pos != self.expected_size:
                    raise HubError(f"{self.what}: received {self.pos} bytes, expected {self.expected_size}")
                return 0
            # Cut mid-body: reconnect and continue from self.pos.
            failures += 1
            self._drop_response()
            if failures >= RETRY.attempts:
                raise HubUnreachable(f"gave up on {self.url} after {failures} broken connections at byte "
                               f"{self.pos} (last: {type(error).__name__}); check the network")
            time.sleep(_retry_delay(failures - 1, None))

    def _drop_response(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def close(self) -> None:
        self._drop_response()
        self._session.close()
        super().close()


def open_stream(repo_id: str, path: str, revision: str = "main", expected_size: int | None = None,
                repo_type: str = "dataset") -> io.BufferedReader:
    """A buffered binary stream of one file of a Hub repo (see `HubStream`)."""
    url = resolve_url(repo_id, path, revision, repo_type)
    raw = HubStream(url, f"{repo_type} {repo_id}@{revision}: {path}", expected_size)
    return io.BufferedReader(raw, buffer_size=CHUNK)


def default_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return hf_home() / "hub"


def _remote_meta(repo_id: str, path: str, revision: str, repo_type: str) -> tuple[str | None, int | None]:
    """(etag, size) from a HEAD without following the LFS redirect: the Hub puts the real file's
    etag and size in X-Linked-Etag/X-Linked-Size on the 302 itself."""
    url = resolve_url(repo_id, path, revision, repo_type)
    with requests.Session() as session:
        what = f"{repo_type} {repo_id}@{revision}: {path}"
        response = _get(session, url, what, method="HEAD", follow=False)
        for _ in range(RETRY.max_redirects):  # a renamed repo (gpt2) redirects to its new name, same host
            location = response.headers.get("Location", "")
            if not (response.is_redirect and location.startswith("/")):
                break
            response = _get(session, urljoin(url, location), what, method="HEAD", follow=False)
    etag = response.headers.get("X-Linked-Etag") or response.headers.get("ETag")
    size = response.headers.get("X-Linked-Size")
    if size is None and not response.is_redirect:
        size = response.headers.get("Content-Length")
    return etag, int(size) if size is not None else None


def _copy(stream: io.BufferedReader, destination: Path) -> None:
    with stream, open(destination, "wb") as out:
        while chunk := stream.read(CHUNK):
            out.write(chunk)


def download(repo_id: str, path: str, cache_dir: str | os.PathLike | None = None, revision: str = "main",
             repo_type: str = "dataset") -> Path:
    """A local copy of one file, reused while its size and etag match the Hub's.

    Layout: {cache_dir}/{datasets|models}--owner--name/{revision}/{path}, with the etag in a sidecar
    under .../.meta/. The file is written to a temporary name and renamed, so an interrupted download
    never leaves a half file that a later run would trust.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    repo_dir = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    target = repo_dir / revision.replace("/", "--") / path
    meta_file = repo_dir / ".meta" / revision.replace("/", "--") / (path + ".json")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        if target.is_file():
            return target
        raise HubError(f"HF_HUB_OFFLINE=1 but {repo_id}: {path} is not in the cache {root}")
    try:
        etag, size = _remote_meta(repo_id, path, revision, repo_type)
    except HubUnreachable as e:
        if not target.is_file():
            raise
        warnings.warn(f"using the cached {target} unchecked: {e}", stacklevel=2)
        return target
    if target.is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("etag") == etag and target.stat().st_size == (size if size is not None else meta["size"]):
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        try:
            _copy(open_stream(repo_id, path, revision, size, repo_type), tmp)
        except HubFileChanged:
            # Replaced on the Hub half-way: unlike a stream being parsed, a download has handed nothing
            # out yet, so it starts again from zero (once), checked against the new version's size.
            etag, size = _remote_meta(repo_id, path, revision, repo_type)
            _copy(open_stream(repo_id, path, revision, size, repo_type), tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    meta_file.parent.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps({"etag": etag, "size": target.stat().st_size}))
    return target
