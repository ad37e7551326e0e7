"""sources/upload.py against tests/hubserver.py: create, preupload, LFS batch + PUT, NDJSON commit, faults.

The pushed repo is read back through the download side (`GPT.from_pretrained("owner/name")`) and, in a
subprocess pointed at the loopback Hub, through `transformers` itself."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clirun import save_tiny_model
from hubserver import HubServer, offline_hub_env

from minicodeparrot import cli
from minicodeparrot.model.gpt import GPT
from minicodeparrot.sources import hub
from minicodeparrot.sources.upload import upload_folder
from minicodeparrot.tokenizer.bpe import Tokenizer

REPO = "me/tiny-codeparrot"
TOKEN = "hf_write123"
METRICS = '{"step": 10, "loss": 7.5}\n'


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch) -> None:
    offline_hub_env(monkeypatch, tmp_path, TOKEN, max_delay=1.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpt2_dir: Path) -> Path:
    out = save_tiny_model(tmp_path_factory.mktemp("model") / "run", gpt2_dir)
    (out / "metrics.jsonl").write_text(METRICS)
    return out


@pytest.fixture
def server(tmp_path: Path, monkeypatch):
    # cross_host: the LFS upload URL is on another host name, as the Hub's pre-signed storage URLs are.
    with HubServer(upload_dir=tmp_path / "hub", token=TOKEN, read_token="hf_readonly", cross_host=True) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        yield s


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hub_files(server: HubServer, repo: str = REPO) -> dict[str, str]:
    root = server.upload_dir / repo
    return {p.relative_to(root).as_posix(): sha(p) for p in root.rglob("*") if p.is_file()}


def local_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha(p) for p in folder.rglob("*") if p.is_file()}


def test_upload_creates_repo_and_loads_back(server: HubServer, model_dir: Path, gpt2_dir: Path) -> None:
    url = upload_folder(model_dir, REPO, "step 10", private=True)
    assert url.startswith(f"{server.url}/{REPO}/commit/")
    assert server.private == {REPO: True}
    assert [c["summary"] for c in server.commits[REPO]] == ["step 10"]
    assert hub_files(server) == local_files(model_dir)
    # The weights went through LFS (batch, PUT, verify), the small files inline in the commit.
    puts = [path for method, path, _ in server.log if method == "PUT"]
    assert puts == [f"/lfs-store/{sha(model_dir / 'model.safetensors')}"]
    put_headers = next(h for m, _, h in server.log if m == "PUT")
    assert "Authorization" not in put_headers  # the storage host is not the Hub: no token there
    commit_headers = next(h for m, p, h in server.log if p.endswith("/commit/main"))
    assert commit_headers["Authorization"] == f"Bearer {TOKEN}"
    # Read back by Hub id through the download side.
    local, pushed = GPT.from_pretrained(model_dir).state_dict(), GPT.from_pretrained(REPO).state_dict()
    assert local.keys() == pushed.keys() and all(torch.equal(local[k], pushed[k]) for k in local)
    text = "def add(a, b):\n    return a + b\n"
    assert Tokenizer.from_pretrained(REPO).encode(text) == Tokenizer.from_pretrained(gpt2_dir).encode(text)


def test_second_upload_reuses_repo_and_lfs_objects(server: HubServer, model_dir: Path,
                                                   tmp_path: Path) -> None:
    upload_folder(model_dir, REPO, "step 10")
    folder = tmp_path / "again"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    (folder / "metrics.jsonl").write_text(METRICS + '{"step": 20, "loss": 6.0}\n')
    upload_folder(folder, REPO, "step 20")
    assert [c["summary"] for c in server.commits[REPO]] == ["step 10", "step 20"]
    assert sum(m == "PUT" for m, _, _ in server.log) == 1  # the Hub had those bytes: no second PUT
    assert (server.upload_dir / REPO / "metrics.jsonl").read_text().count("\n") == 2
    assert (server.upload_dir / REPO / "config.json").is_file()  # files not in the folder stay


def test_large_text_file_goes_through_lfs(server: HubServer, tmp_path: Path) -> None:
    server.lfs_threshold = 1000  # the Hub decides; the client follows its preupload answer
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "big.txt").write_text("x" * 5000)
    (folder / "small.txt").write_text("y")
    (folder / "empty.safetensors").write_bytes(b"")  # "lfs" by name, but empty: it must go inline
    (folder / ".hidden").write_text("secret")
    with pytest.warns(UserWarning, match="1 hidden file"):
        upload_folder(folder, REPO, "texts")
    assert [p for m, p, _ in server.log if m == "PUT"] == [f"/lfs-store/{sha(folder / 'big.txt')}"]
    assert set(hub_files(server)) == {"big.txt", "small.txt", "empty.safetensors"}


def test_every_request_kind_retried_on_5xx_and_drops(server: HubServer, model_dir: Path) -> None:
    # One fault in front of each of the six requests of a push: create, preupload, batch, PUT, verify, commit.
    faults = [("status", 503), ("status", 500), ("drop",), ("status", 502), ("status", 429, "0"), ("drop",)]
    for fault in faults:
        server.upload_faults.extend([fault, None])  # None: the retry goes through
    upload_folder(model_dir, REPO, "step 10")
    assert not server.upload_faults
    assert [c["summary"] for c in server.commits[REPO]] == ["step 10"]
    assert hub_files(server) == local_files(model_dir)


def test_timeout_is_retried(server: HubServer, model_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub, "RETRY", hub.RetryPolicy(attempts=3, base_delay=0.001, timeout=(5.0, 0.5)))
    server.upload_faults.append(("slow", 1.5))  # the create request: the client gives up waiting, retries
    upload_folder(model_dir, REPO, "step 10")
    assert sum(p == "/api/repos/create" for _, p, _ in server.log) == 2
    assert hub_files(server) == local_files(model_dir)


def test_gives_up_after_the_retries(server: HubServer, model_dir: Path) -> None:
    server.upload_faults.extend([("status", 503)] * 5)
    with pytest.raises(hub.HubUnreachable, match="gave up on creating me/tiny-codeparrot after 5 attempts"):
        upload_folder(model_dir, REPO, "step 10")
    assert server.commits == {}


@pytest.mark.parametrize("case, pattern", [
    ("no token", "HTTP 401 for creating me/tiny-codeparrot: no token found: set HF_TOKEN"),
    ("bad token", "HTTP 401 .* token from HF_TOKEN was rejected"),
    ("read-only token", "HTTP 403 .* may not write to me/tiny-codeparrot; use a token with write access"),
    ("wrong endpoint", "not found on the Hub: creating me/tiny-codeparrot; check the repo name.*HF_ENDPOINT"),
])
def test_auth_and_404_are_one_line_errors(server: HubServer, model_dir: Path, monkeypatch, capsys,
                                          case: str, pattern: str) -> None:
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "bad token":
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    elif case == "read-only token":
        monkeypatch.setenv("HF_TOKEN", "hf_readonly")
    else:
        monkeypatch.setenv("HF_ENDPOINT", server.url + "/not-the-hub")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["upload", str(model_dir), REPO, "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minicodeparrot upload: error: ")
    assert re.search(pattern, err), err
    assert server.commits.get(REPO, []) == []


def test_upload_command(server: HubServer, model_dir: Path, capsys) -> None:
    cli.main(["upload", str(model_dir), REPO, "--private", "--no-progress", "--message", "final model"])
    assert f"pushed {model_dir} to {REPO}" in capsys.readouterr().out
    assert server.private == {REPO: True}
    assert [c["summary"] for c in server.commits[REPO]] == ["final model"]
    assert hub_files(server) == local_files(model_dir)


@pytest.mark.slow
def test_transformers_loads_the_pushed_repo(server: HubServer, model_dir: Path) -> None:
    """The real huggingface_hub client (in a subprocess: it reads HF_ENDPOINT at import) downloads what we
    pushed, and GPT2LMHeadModel gives the logits our model gives."""
    pytest.importorskip("transformers")
    upload_folder(model_dir, REPO, "step 10")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({REPO!r}).eval()\n"
        f"ids = AutoTokenizer.from_pretrained({REPO!r})('def add(a, b):', return_tensors='pt')['input_ids']\n"
        "torch.save({'ids': ids, 'logits': m(ids).logits.detach()}, sys.argv[1])\n"
    )
    out = model_dir.parent / "hf_out.pt"
    env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(out)
    assert got["ids"].tolist()[0] == Tokenizer.from_pretrained(model_dir).encode("def add(a, b):")
    with torch.no_grad():
        ours, _ = GPT.from_pretrained(model_dir).eval()(got["ids"])
    torch.testing.assert_close(ours, got["logits"], rtol=1e-5, atol=1e-5)
