"""Tokenizers from the Hub (tests/hubserver.py on 127.0.0.1): repo ids, legacy names, the cache, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hubserver import HubServer

from minicodeparrot.cli import main
from minicodeparrot.errors import UserError
from minicodeparrot.sources import hub
from minicodeparrot.tokenizer.bpe import Tokenizer

TOKEN = "hf_toktesttoken"
TEXT = 'def say_hello():\n    print("Hello, World!") # Print it\n'
IDS = [4299, 910, 62, 31373, 33529, 198, 220, 220, 220, 3601, 7203, 15496, 11, 2159, 2474, 8, 1303, 12578,
       340, 198]


@pytest.fixture
def repos(tmp_path: Path, gpt2_dir: Path) -> dict[str, Path]:
    """codeparrot/codeparrot has a tokenizer.json; openai-community/gpt2 only vocab.json + merges.txt."""
    new, old = tmp_path / "repo_new", tmp_path / "repo_old"
    new.mkdir()
    old.mkdir()
    shutil.copy(gpt2_dir / "tokenizer.json", new)
    (new / "config.json").write_text("{}")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_dir / f, old)
    return {"codeparrot/codeparrot": new, "openai-community/gpt2": old}


@pytest.fixture
def server(repos, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bare repo id is never a local path here
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub, "RETRY", hub.RetryPolicy(attempts=2, base_delay=0.001, timeout=(5.0, 5.0)))
    with HubServer(models=repos, token=TOKEN, aliases={"gpt2": "openai-community/gpt2"}) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        yield s


def test_repo_ids_and_legacy_names_download_into_the_cache(server: HubServer, tmp_path: Path) -> None:
    assert Tokenizer.from_pretrained("codeparrot/codeparrot").encode(TEXT) == IDS
    assert (tmp_path / "cache" / "models--codeparrot--codeparrot" / "main" / "tokenizer.json").is_file()
    # A repo without tokenizer.json: vocab.json + merges.txt; a one-segment name follows the Hub's redirect.
    for name in ("openai-community/gpt2", "gpt2"):
        tok = Tokenizer.from_pretrained(name)
        assert tok.encode(TEXT + "<|endoftext|>") == IDS + [50256]
    assert server.requests_to("/gpt2/resolve/main/vocab.json")
    assert (tmp_path / "cache" / "models--gpt2" / "main" / "merges.txt").is_file()
    # The cached copy is revalidated (HEAD, through the redirect), not downloaded again.
    n_get = len([r for r in server.log if r[0] == "GET"])
    Tokenizer.from_pretrained("gpt2")
    assert len([r for r in server.log if r[0] == "GET"]) == n_get
    # Offline: the cached copies serve.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert Tokenizer.from_pretrained("codeparrot/codeparrot").encode(TEXT) == IDS


def one_line_error(name: str) -> str:
    with pytest.raises(UserError) as e:
        Tokenizer.from_pretrained(name)
    message = str(e.value)
    assert "\n" not in message and f"{name!r} is not a local tokenizer directory either" in message
    return message


def test_errors_are_one_line(server: HubServer, monkeypatch, tmp_path: Path) -> None:
    assert "no tokenizer on the Hub for model repo 'owner/missing'" in one_line_error("owner/missing")
    assert "check the repo id" in one_line_error("missing-legacy-name")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert "HTTP 401" in one_line_error("codeparrot/codeparrot")
    monkeypatch.delenv("HF_TOKEN")
    assert "no token found" in one_line_error("codeparrot/codeparrot")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE=1" in one_line_error("codeparrot/codeparrot")  # nothing cached yet
    monkeypatch.delenv("HF_HUB_OFFLINE")
    server.close()  # the network is gone and nothing is cached
    assert "gave up" in one_line_error("codeparrot/codeparrot")
    # Not a repo id and not a path: a plain error, without a request.
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.from_pretrained("./no/such/dir")


def test_every_tokenizer_option_takes_a_repo_id(server: HubServer, capsys, tmp_path: Path) -> None:
    (tmp_path / "f.py").write_text(TEXT, encoding="utf-8")
    main(["tokenize", "f.py", "--tokenizer", "codeparrot/codeparrot", "--ids"])
    assert capsys.readouterr().out == f"{IDS}\n"
    main(["tokenizer-report", "gpt2", "--dataset", "f.py", "--n", "1",
          "--compare-with", "codeparrot/codeparrot"])
    assert "vocab size: 50,257" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["tokenize", "f.py", "--tokenizer", "owner/missing"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "owner/missing" in err
