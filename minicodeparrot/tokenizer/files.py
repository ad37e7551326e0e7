"""Hugging Face tokenizer files: tokenizer.json, or vocab.json + merges.txt, on disk or on the Hub.

Kept apart from tokenizer/bpe.py, which holds the algorithm: this module only turns files into the
three things a byte-level BPE tokenizer is made of (vocab, merges in rank order, special tokens)
and back, in the layouts `transformers` and `tokenizers` read.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from minicodeparrot.errors import UserError

EOS_TOKEN = "<|endoftext|>"
TokenizerData = tuple[dict[str, int], list[tuple[str, str]], list[str]]

# `owner/name` or a one-segment legacy name such as `gpt2` (the Hub redirects it to its owner).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def load(name: str | os.PathLike) -> TokenizerData:
    """A directory (tokenizer.json, else vocab.json + merges.txt), a tokenizer.json, or a Hub model repo."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".json":
        return read_tokenizer_json(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return read_tokenizer_json(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return read_vocab_merges(path / "vocab.json", path / "merges.txt")
        raise UserError(f"{str(path)!r} has no tokenizer.json nor vocab.json + merges.txt; "
                        "pass a tokenizer directory")
    if path.exists() or not _REPO_ID.match(os.fspath(name)):
        raise UserError(f"tokenizer directory {os.fspath(name)!r} does not exist; "
                        "pass a tokenizer directory or a Hub repo id (owner/name)")
    return _from_hub(os.fspath(name))


def _from_hub(repo: str) -> TokenizerData:
    """The repo's tokenizer.json, else (older GPT-2-era repos) its vocab.json + merges.txt, via the cache."""
    from minicodeparrot.sources import hub

    try:
        try:
            return read_tokenizer_json(hub.download(repo, "tokenizer.json", repo_type="model"))
        except hub.HubNotFound:
            pass
        try:
            vocab = hub.download(repo, "vocab.json", repo_type="model")
            merges = hub.download(repo, "merges.txt", repo_type="model")
        except hub.HubNotFound:
            raise hub.HubNotFound(f"no tokenizer on the Hub for model repo {repo!r} (no tokenizer.json, no "
                                  "vocab.json + merges.txt): check the repo id") from None
        return read_vocab_merges(vocab, merges)
    except hub.HubError as e:  # maybe it was meant as a local path: say that it is not one either
        raise type(e)(f"{e} ({repo!r} is not a local tokenizer directory either)") from None


def read_tokenizer_json(file: Path) -> TokenizerData:
    data = _read_json(file)
    try:
        model = data["model"]
        if model.get("type", "BPE") != "BPE":
            raise UserError(f"{file} holds a {model.get('type')} model; only BPE is supported")
        pre = data.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel":
            raise UserError(f"{file} has no ByteLevel pre-tokenizer; only GPT-2 style BPE is supported")
        vocab = model["vocab"]
        # Two formats: old files write merges as "a b" strings, newer ones as ["a", "b"] pairs.
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = data.get("added_tokens") or []
        for t in added:
            vocab.setdefault(t["content"], t["id"])
        specials = [t["content"] for t in added]
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{file} is not a valid tokenizer.json ({e!r}); regenerate it") from None
    if any(len(m) != 2 for m in merges):
        raise UserError(f"{file} has a malformed merge (not two tokens); regenerate it")
    return vocab, merges, specials


def read_vocab_merges(vocab_file: Path, merges_file: Path) -> TokenizerData:
    vocab = _read_json(vocab_file)
    if not isinstance(vocab, dict):
        raise UserError(f"{vocab_file} is not a JSON object of token -> id; regenerate it")
    try:
        lines = merges_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{merges_file} is not UTF-8 text; regenerate it") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{merges_file}:{n}: expected two tokens separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    specials = [EOS_TOKEN] if EOS_TOKEN in vocab else []
    return vocab, merges, specials


def write(directory: str | os.PathLike, vocab: dict[str, int], merges: list[tuple[str, str]],
          special_tokens: list[str]) -> Path:
    """vocab.json, merges.txt, tokenizer.json and tokenizer_config.json, as `transformers` writes GPT-2's."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # Special tokens stay in the model vocab too, as in GPT-2's files and the reference trainer's:
    # vocab.json + merges.txt alone then still know <|endoftext|>.
    model_vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out / "vocab.json").write_text(json.dumps(model_vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for t in special_tokens
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        # trim_offsets=False: a token's offsets cover its leading space ("Ġx" -> the span of " x").
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": model_vocab, "merges": [list(m) for m in merges],
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    eos = EOS_TOKEN if EOS_TOKEN in special_tokens else (special_tokens[0] if special_tokens else None)
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 1024,
        "add_prefix_space": False,
        "bos_token": eos, "eos_token": eos, "unk_token": eos,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def _read_json(file: Path):
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{file} does not exist; pass a tokenizer directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); the file is corrupt, regenerate it") from None
