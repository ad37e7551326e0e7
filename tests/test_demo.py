"""The quickstart, end to end: `minicodeparrot demo` learns (loss below the unigram baseline) and its
completions of the book's prompts are code, not blank lines."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import tokenizers

from minicodeparrot.cli import main
from minicodeparrot.demo import PROMPTS
from minicodeparrot.sources.shards import iter_texts

# The smallest budget that still learns enough to write code on a busy 2-core machine (see the report in
# docs/benchmarks.md); the demo's default is 3 minutes.
MINUTES = "1"


def _reference_baseline(demo_dir) -> float:
    """The unigram entropy of the validation split, tokenized by the `tokenizers` library."""
    ref = tokenizers.Tokenizer.from_file(str(demo_dir / "tokenizer" / "tokenizer.json"))
    eos = ref.token_to_id("<|endoftext|>")
    counts: Counter = Counter()
    for text in iter_texts(demo_dir / "corpus" / "valid"):
        counts.update(ref.encode(text).ids + [eos])
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


@pytest.mark.slow
def test_demo_learns_and_completes_with_code(tmp_path, capsys):
    demo_dir = tmp_path / "demo"
    main(["demo", "--minutes", MINUTES, "--output-dir", str(demo_dir), "--no-progress"])
    out = capsys.readouterr().out
    baseline = float(re.search(r"unigram baseline: ([\d.]+) nats/token", out).group(1))
    loss = float(re.search(r"validation loss ([\d.]+)", out).group(1))
    assert baseline == pytest.approx(_reference_baseline(demo_dir), abs=1e-3)
    assert loss < baseline - 0.5, out
    blocks = out.split("-" * 60 + "\n")[1:-1]
    assert len(blocks) == len(PROMPTS)
    for prompt, block in zip(PROMPTS, blocks, strict=True):
        assert block.startswith(prompt)
        completion = block[len(prompt):]
        assert re.search(r"[A-Za-z_]\w*", completion), f"no code after {prompt!r}: {completion!r}"
