"""sources/hub.py against tests/hubserver.py: listing, redirects, auth, retries, Range resume, cache."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest
from conftest import stdlib_texts
from hubserver import HubServer, write_shards

from minicodeparrot.sources import hub, shards
from minicodeparrot.sources.hub import HubError, download, list_files, open_stream

REPO = "owner/codeparrot-mini"
TOKEN = "hf_testtoken123"
TEXTS = stdlib_texts(40)


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    write_shards(root, TEXTS, n_files=3)
    write_shards(root / "data" / "valid", TEXTS[:5], n_files=1, suffix=".jsonl")
    (root / "README.md").write_text("# card\n")
    return root


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch) -> None:
    """No real token or cache can leak in; retries are fast."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "RETRY", hub.RetryPolicy(attempts=5, base_delay=0.001, max_delay=3.0,
                                                       timeout=(5.0, 5.0)))


@pytest.fixture
def server(repo_dir: Path, monkeypatch):
    with HubServer(datasets={REPO: repo_dir}, page_size=2) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        yield s


def etag_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(path: str, **kw) -> bytes:
    with open_stream(REPO, path, **kw) as f:
        return f.read()


def test_list_files_follows_pagination(server: HubServer, repo_dir: Path) -> None:
    files = list_files(REPO)
    expected = sorted(p.relative_to(repo_dir).as_posix() for p in repo_dir.rglob("*") if p.is_file())
    assert [f.path for f in files] == expected  # directories are not files
    assert [f.size for f in files] == [(repo_dir / f.path).stat().st_size for f in files]
    assert len(server.requests_to("/api/")) >= 4  # 8 entries, 2 per page
    assert [f.path for f in list_files(REPO, pattern="*.json.gz")] == [
        f"file-00000000000{k}.json.gz" for k in range(3)]


def test_open_stream_follows_the_redirect(server: HubServer, repo_dir: Path) -> None:
    assert read_all("file-000000000001.json.gz") == (repo_dir / "file-000000000001.json.gz").read_bytes()
    assert read_all("data/valid/file-000000000000.jsonl") == (
        repo_dir / "data/valid/file-000000000000.jsonl").read_bytes()  # non-LFS: served directly
    assert server.requests_to("/cdn/")


def test_token_goes_to_the_hub_host_only(repo_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubServer(datasets={REPO: repo_dir}, token=TOKEN, cross_host=True) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        list_files(REPO)
        assert read_all("file-000000000000.json.gz") == (repo_dir / "file-000000000000.json.gz").read_bytes()
        hub_requests = s.requests_to("/api/") + s.requests_to("/datasets/")
        cdn_requests = s.requests_to("/cdn/")
    assert hub_requests and all(r[2].get("Authorization") == f"Bearer {TOKEN}" for r in hub_requests)
    assert cdn_requests and all(r[2]["Host"].startswith("localhost") for r in cdn_requests)
    assert not any("Authorization" in r[2] for r in cdn_requests)


def test_token_sources_in_order(tmp_path: Path, monkeypatch) -> None:
    assert hub.get_token() == (None, "none")
    token_file = tmp_path / "hf_home" / "token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("from-file\n")
    assert hub.get_token() == ("from-file", str(token_file))
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "legacy")
    assert hub.get_token() == ("legacy", "HUGGING_FACE_HUB_TOKEN")
    monkeypatch.setenv("HF_TOKEN", "new")
    assert hub.get_token() == ("new", "HF_TOKEN")


def test_auth_errors_say_what_to_fix(repo_dir: Path, monkeypatch) -> None:
    with HubServer(datasets={REPO: repo_dir}, token=TOKEN) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        with pytest.raises(HubError, match="HTTP 401.*no token found: set HF_TOKEN"):
            list_files(REPO)
        monkeypatch.setenv("HF_TOKEN", "hf_wrongsecret")
        with pytest.raises(HubError, match="HTTP 401.*token from HF_TOKEN was rejected") as error:
            read_all("file-000000000000.json.gz")
        assert "hf_wrongsecret" not in str(error.value)  # never shown
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert list_files(REPO)


def test_not_found_names_the_repo_or_file(server: HubServer) -> None:
    with pytest.raises(HubError, match="not found on the Hub: dataset owner/nope@main"):
        list_files("owner/nope")
    with pytest.raises(HubError, match="not found on the Hub: .*missing.json.gz"):
        read_all("missing.json.gz")


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The delays the client sleeps between tries (it still sleeps them): what a test checks instead of a
    stopwatch, which a busy machine would push past any bound."""
    real, slept = time.sleep, []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real(seconds)

    monkeypatch.setattr(hub.time, "sleep", sleep)
    return slept


def test_retries_5xx_and_429_then_succeeds(server: HubServer, repo_dir: Path) -> None:
    server.api_faults.extend([("status", 503), ("status", 502)])
    server.body_faults.extend([("status", 503), ("status", 429, "1")])
    start = time.monotonic()
    assert len(list_files(REPO)) == 5
    assert read_all("file-000000000002.json.gz") == (repo_dir / "file-000000000002.json.gz").read_bytes()
    assert time.monotonic() - start >= 1.0  # Retry-After: 1 was honoured (base delay is 1 ms); a lower bound
    # holds on any machine


@pytest.mark.parametrize("retry_after", ["soon", "nan", "Wed, 32 Foo 2015 07:28:00 GMT"])
def test_malformed_retry_after_counts_as_absent(server: HubServer, repo_dir: Path, retry_after: str,
                                                sleeps: list[float]) -> None:
    server.body_faults.append(("status", 503, retry_after))
    assert read_all("file-000000000001.json.gz") == (repo_dir / "file-000000000001.json.gz").read_bytes()
    assert sleeps == [0.001]  # the base delay, not a crash or max_delay
    assert len(server.requests_to("/cdn/")) == 2


def test_out_of_retries_names_url_and_status(server: HubServer) -> None:
    server.api_faults.extend([("status", 503)] * 10)
    with pytest.raises(HubError, match=r"gave up on http://127\.0\.0\.1:\d+/api/datasets/owner/codeparrot-mini/"
                                       r"tree/main\?recursive=true after 5 attempts \(last: HTTP 503\)"):
        list_files(REPO)


@pytest.mark.parametrize("ignore_range", [False, True])
def test_cut_connection_resumes_with_range(server: HubServer, repo_dir: Path, ignore_range: bool) -> None:
    data = (repo_dir / "file-000000000000.json.gz").read_bytes()
    server.body_faults.append(("cut", 5000))
    # The second answer is cut again, or ignores Range (200, whole file): the client must skip 5000 bytes.
    server.body_faults.append(("ignore_range",) if ignore_range else ("cut", 9000))
    assert read_all("file-000000000000.json.gz", expected_size=len(data)) == data
    ranges = [r[2].get("Range") for r in server.requests_to("/cdn/")]
    assert ranges == [None, "bytes=5000-"] + ([] if ignore_range else ["bytes=14000-"])


def _new_version_of_same_size(data: bytes) -> bytes:
    new = bytearray(data)
    new[-100:] = bytes(b ^ 0xFF for b in new[-100:])  # only bytes after the cut differ
    return bytes(new)


@pytest.mark.parametrize("honour_if_range", [True, False])
def test_file_replaced_between_requests_is_not_spliced(server: HubServer, repo_dir: Path,
                                                       honour_if_range: bool) -> None:
    """Cut at byte 5000, then the file is replaced by one of the same size before the resume: the bytes
    before the cut are the old version's, so the resume must fail, not deliver old[:5000] + new[5000:]."""
    path = repo_dir / "file-000000000000.json.gz"
    old = path.read_bytes()
    new = _new_version_of_same_size(old)
    server.honour_if_range = honour_if_range  # False: a 206 of the new version, caught by its ETag
    server.body_faults.extend([("cut", 5000), ("replace", new)])
    with pytest.raises(hub.HubFileChanged, match="changed on the Hub while it was read.*read it again"):
        read_all("file-000000000000.json.gz", expected_size=len(old))
    resumed = server.requests_to("/cdn/")[1][2]
    assert resumed["Range"] == "bytes=5000-" and resumed["If-Range"] == f'"{etag_of_bytes(old)}"'
    assert read_all("file-000000000000.json.gz") == new  # read again: the new version, whole


def test_download_of_a_file_replaced_half_way_starts_again(server: HubServer, repo_dir: Path) -> None:
    path = repo_dir / "file-000000000000.json.gz"
    new = _new_version_of_same_size(path.read_bytes())
    server.body_faults.extend([("cut", 5000), ("replace", new)])
    assert download(REPO, "file-000000000000.json.gz").read_bytes() == new
    assert [r[2].get("Range") for r in server.requests_to("/cdn/")] == [None, "bytes=5000-", None]
    bodies = len(server.requests_to("/cdn/"))
    download(REPO, "file-000000000000.json.gz")
    assert len(server.requests_to("/cdn/")) == bodies  # the sidecar holds the new version's etag


def test_resume_must_start_where_it_was_cut(server: HubServer, repo_dir: Path) -> None:
    data = (repo_dir / "file-000000000000.json.gz").read_bytes()
    server.body_faults.extend([("cut", 5000), ("shift_range", 7)])
    with pytest.raises(hub.HubFileChanged, match=r"resume at byte 5000.*'bytes 5007-"):
        read_all("file-000000000000.json.gz", expected_size=len(data))


def test_slow_response_times_out_and_is_retried(server: HubServer, repo_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub, "RETRY", hub.RetryPolicy(attempts=5, base_delay=0.001, timeout=(5.0, 0.3)))
    server.body_faults.append(("slow", 1.0))
    assert read_all("file-000000000001.json.gz") == (repo_dir / "file-000000000001.json.gz").read_bytes()
    assert len(server.requests_to("/cdn/")) >= 2


def test_size_mismatch_is_an_error(server: HubServer, repo_dir: Path) -> None:
    size = (repo_dir / "file-000000000000.json.gz").stat().st_size
    with pytest.raises(HubError, match=f"server has {size} bytes but the listing said {size + 10}"):
        read_all("file-000000000000.json.gz", expected_size=size + 10)
    server.listed_size["file-000000000001.json.gz"] = size - 1
    with pytest.raises(HubError, match="listing said"):
        list(shards.iter_records(f"hub://{REPO}"))


def test_download_caches_atomically_and_revalidates(server: HubServer, repo_dir: Path, tmp_path: Path):
    path = download(REPO, "file-000000000000.json.gz")
    assert path.is_relative_to(tmp_path / "hf_home" / "hub")
    assert path.read_bytes() == (repo_dir / "file-000000000000.json.gz").read_bytes()
    bodies = len(server.requests_to("/cdn/"))
    assert download(REPO, "file-000000000000.json.gz") == path
    assert len(server.requests_to("/cdn/")) == bodies  # reused: etag and size match
    write_shards(repo_dir, TEXTS[:8], n_files=1)  # the file changes on the Hub
    assert download(REPO, "file-000000000000.json.gz").read_bytes() == (
        repo_dir / "file-000000000000.json.gz").read_bytes()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    server.body_faults.extend([("status", 503)] * 10)  # a failed download leaves no file behind
    with pytest.raises(HubError):
        download(REPO, "file-000000000001.json.gz", cache_dir=tmp_path / "c2")
    assert not [p for p in (tmp_path / "c2").rglob("*") if p.is_file()]


def test_download_model_files(tmp_path: Path, monkeypatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"n_layer": 2}')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 100)
    with HubServer(models={"owner/tiny-gpt": model}) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        assert [f.path for f in list_files("owner/tiny-gpt", repo_type="model")] == ["config.json",
                                                                                      "model.safetensors"]
        for name in ("config.json", "model.safetensors"):
            got = download("owner/tiny-gpt", name, cache_dir=tmp_path / "cache", repo_type="model")
            assert got.read_bytes() == (model / name).read_bytes()
        assert s.requests_to("/owner/tiny-gpt/resolve/main/")
    with pytest.warns(UserWarning, match="using the cached"):  # server gone: the cache still answers
        download("owner/tiny-gpt", "config.json", cache_dir=tmp_path / "cache", repo_type="model")
    with pytest.raises(hub.HubUnreachable, match="gave up"):
        download("owner/tiny-gpt", "other.json", cache_dir=tmp_path / "cache", repo_type="model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no request at all
    cached = download("owner/tiny-gpt", "config.json", cache_dir=tmp_path / "cache", repo_type="model")
    assert cached.read_text() == '{"n_layer": 2}'


def _fake_dns(monkeypatch, fail_hosts: str) -> list[str]:
    """Names ending in `fail_hosts` fail as DNS does, without asking a real resolver; logs every lookup."""
    real, lookups = socket.getaddrinfo, []

    def getaddrinfo(host, *args, **kwargs):
        lookups.append(str(host))
        if str(host).endswith(fail_hosts):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_unknown_host_fails_at_once(monkeypatch, sleeps: list[float]) -> None:
    lookups = _fake_dns(monkeypatch, ".invalid")
    monkeypatch.setenv("HF_ENDPOINT", "http://nonexistent.invalid")
    monkeypatch.setattr(hub, "RETRY", hub.RetryPolicy())  # the real backoff: half a minute if it retried
    with pytest.raises(hub.HubUnreachable, match="nonexistent.invalid.*cannot be resolved.*no network"):
        list_files(REPO)
    assert sleeps == [] and len(lookups) == 1  # not one retry
    with pytest.raises(hub.HubUnreachable, match="is not a local path either"):
        shards.resolve_sources(REPO)  # no such local directory: the message says that too


def test_refused_connection_is_still_retried(monkeypatch) -> None:
    lookups = _fake_dns(monkeypatch, ".invalid")
    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://localhost:{port}")
    with pytest.raises(hub.HubUnreachable, match=f"gave up on .* after {hub.RETRY.attempts} attempts"):
        list_files(REPO)
    assert lookups.count("localhost") == hub.RETRY.attempts
