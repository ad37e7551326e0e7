"""The `minicodeparrot` CLI end to end: Hub datasets (tests/hubserver.py on 127.0.0.1) give the same
tokenizer and the same tokens as the local shards they were made from; user errors are one line, exit 2."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stdlib_texts
from hubserver import HubServer, write_shards

from minicodeparrot.cli import main
from minicodeparrot.sources import hub
from minicodeparrot.tokenizer.bpe import Tokenizer

REPO = "owner/codeparrot-mini"
TOKEN = "hf_clitesttoken"
TEXTS = stdlib_texts(24)
COMMANDS = ["train-tokenizer", "tokenize", "tokenizer-report", "make-corpus", "generate", "train", "demo",
            "preprocess", "pretokenize", "evaluate-loss", "humaneval"]


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write_shards(tmp_path / "shards", TEXTS, n_files=3)  # several files: --n-examples crosses a boundary
    return tmp_path / "shards"


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch) -> None:
    """No real token, cache or endpoint leaks in; a bare owner/name is never a local path here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(shard_dir: Path, monkeypatch):
    with HubServer(datasets={REPO: shard_dir}, token=TOKEN, page_size=2) as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield s


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_tokenizer_from_the_hub_equals_local_shards(server: HubServer, shard_dir: Path, tmp_path: Path,
                                                          gpt2_dir: Path, capsys) -> None:
    n = 12
    common = ["--n-examples", str(n), "--vocab-size", "400", "--num-workers", "1", "--no-progress"]
    for name, dataset in (("hub", REPO), ("local", str(shard_dir))):
        code, out, err = run_cli(["train-tokenizer", "--dataset", dataset, *common,
                                  "--output", str(tmp_path / name)], capsys)
        assert code == 0, err
        assert f"vocab 400, {400 - 257} merges, {n} examples" in out
    for fname in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (tmp_path / "hub" / fname).read_bytes() == (tmp_path / "local" / fname).read_bytes()
    assert server.requests_to("/cdn/")  # it really streamed the shards over HTTP
    assert all(r[2].get("Authorization") == f"Bearer {TOKEN}" for r in server.requests_to("/api/"))
    # ...and both are the reference trainer's tokenizer of exactly the first n texts, in order (the book's
    # call: GPT-2's tokenizer retrained with the 256-symbol byte alphabet).
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    gpt2 = PreTrainedTokenizerFast(tokenizer_file=str(gpt2_dir / "tokenizer.json"))
    reference = gpt2.train_new_from_iterator(TEXTS[:n], 400, initial_alphabet=ByteLevel.alphabet())
    model = json.loads(reference.backend_tokenizer.to_str())["model"]
    trained = Tokenizer.from_pretrained(tmp_path / "hub")
    assert trained.vocab == model["vocab"] and [list(m) for m in trained.merges] == model["merges"]


def test_tokenize_dataset_prints_the_tokens_of_the_files(server: HubServer, shard_dir: Path, tmp_path: Path,
                                                         gpt2_dir: Path, capsys) -> None:
    base = ["tokenize", "--tokenizer", str(gpt2_dir)]
    code, hub_out, err = run_cli([*base, "--dataset", REPO, "--n", "2"], capsys)
    assert code == 0, err
    code, local_out, _ = run_cli([*base, "--dataset", str(shard_dir), "--n", "2"], capsys)
    assert code == 0 and hub_out == local_out
    # Each line is what `tokenize FILE` prints for that record's text.
    lines = []
    for i, text in enumerate(TEXTS[:2]):
        (tmp_path / f"doc{i}.py").write_bytes(text.encode())
        code, out, _ = run_cli([*base, str(tmp_path / f"doc{i}.py")], capsys)
        lines.append(out)
    assert hub_out == "".join(lines)
    assert hub_out.splitlines()[0].startswith("['")

    # The same through a real process, as a user runs it.
    command = [sys.executable, "-m", "minicodeparrot", *base, "--dataset", REPO, "--n", "2", "--ids"]
    proc = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stderr
    gpt2 = Tokenizer.from_pretrained(gpt2_dir)
    assert [json.loads(line) for line in proc.stdout.splitlines()] == [gpt2.encode(t) for t in TEXTS[:2]]


@pytest.mark.parametrize("case", ["missing repo", "wrong token"])
def test_hub_errors_are_one_line_exit_2(server: HubServer, gpt2_dir: Path, monkeypatch, capsys,
                                        case: str) -> None:
    repo = "owner/no-such-dataset" if case == "missing repo" else REPO
    if case == "wrong token":
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, out, err = run_cli(["tokenize", "--tokenizer", str(gpt2_dir), "--dataset", repo], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("minicodeparrot tokenize: error: ")
    assert ("not found on the Hub" if case == "missing repo" else "HTTP 401") in err
    assert f"{repo!r} is not a local path either" in err


def test_unresolvable_endpoint_fails_fast(gpt2_dir: Path, monkeypatch, capsys) -> None:
    """A typo of a local path must not wait out the retries when there is no DNS (no network)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # never ask a real resolver: no network in tests
        if str(host).endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("HF_ENDPOINT", "http://nonexistent.invalid")
    monkeypatch.setattr(hub, "RETRY", hub.RetryPolicy())  # the real policy: ~30 s if it retried
    slept = []
    monkeypatch.setattr(hub.time, "sleep", slept.append)  # counted, not timed: a busy machine is slow too
    code, _, err = run_cli(["train-tokenizer", "--dataset", "ownr/typo-dir", "--output", "out"], capsys)
    assert slept == []  # not one retry
    assert code == 2 and err.count("\n") == 1
    assert "http://nonexistent.invalid" in err and "cannot be resolved" in err and "no network" in err
    assert "'ownr/typo-dir' is not a local path either" in err


def test_help_lists_all_subcommands(capsys) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in COMMANDS:
        assert re.search(rf"^ +{command}\s", out, re.MULTILINE), command  # long names wrap: no space


def test_parsing_imports_no_torch() -> None:
    """`--help` and argument errors answer at once: the command bodies (and torch) load only when run."""
    code = ("import sys\n"
            "from minicodeparrot.cli import build_parser\n"
            "build_parser().parse_args(['humaneval', '--samples', 's.jsonl'])\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('minicodeparrot.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # The train command's flags are generated from TrainConfig, a plain dataclass: that module (and its
    # package's docstring-only __init__) is part of the parser, nothing else is.
    assert proc.stdout.strip() == ("['minicodeparrot.cli', 'minicodeparrot.errors', "
                                   "'minicodeparrot.training', 'minicodeparrot.training.config']")


def test_tokenize_rejects_file_and_dataset_together(gpt2_dir: Path, capsys) -> None:
    code, _, err = run_cli(["tokenize", "--tokenizer", str(gpt2_dir), "a.py", "--dataset", REPO], capsys)
    assert code == 2 and "not allowed with" in err
