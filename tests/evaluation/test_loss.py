"""Validation loss: the token mean over uneven batches and ranks, checked against transformers' GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from clirun import one_thread_cli, save_tiny_model, torchrun_cli

from minicodeparrot import cli
from minicodeparrot.data.pipeline import validation_sources


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, gpt2_dir):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), gpt2_dir)


# --- validation loss ---------------------------------------------------------------------------
def test_cli_evaluate_loss_equals_transformers_on_hand_packed_blocks(tmp_path, gpt2_dir, capsys):
    """The expected loss owes nothing to our code: OpenAI's tokenizer files read by `transformers`, the
    book's packing written out by hand, and transformers' GPT2LMHeadModel loaded from our checkpoint."""
    from conftest import stdlib_texts

    from minicodeparrot.model.gpt import GPT

    # Weights scaled up from the random init: the logits then vary a lot with the input, so a packing
    # mistake (a missing separator, a shifted block) moves the loss far beyond the tolerance.
    model_dir = save_tiny_model(tmp_path / "model", gpt2_dir)
    model = GPT.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)
    model.save_pretrained(model_dir)
    # Files cut short, so that the 12 blocks evaluated span several documents and their separators.
    records = [{"content": t[:400], "path": f"f{i}.py"} for i, t in enumerate(stdlib_texts(limit=8))]
    data = tmp_path / "file-000000000001_validation.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cli.main(["evaluate-loss", "--model", str(model_dir), "--dataset", str(data), "--seq-length", "32",
              "--batch-size", "4", "--max-eval-steps", "3", "--output", str(tmp_path / "r.json"),
              "--no-progress"])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())

    reference_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(gpt2_dir)
    reference_model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()

    def loss_of_blocks(separator: list[int]) -> float:
        # The book's packing: every file's tokens followed by <|endoftext|>, cut into seq_length blocks.
        stream = [t for r in records for t in reference_tokenizer(r["content"])["input_ids"] + separator]
        ids = torch.tensor([stream[i:i + 32] for i in range(0, 12 * 32, 32)])
        with torch.no_grad():
            return reference_model(ids, labels=ids).loss.item()

    expected = loss_of_blocks([reference_tokenizer.eos_token_id])
    assert result["batches"] == 3 and result["tokens"] == 12 * 31
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(float(torch.tensor(expected).exp()), rel=1e-5)
    assert f"loss {expected:.4f}" in printed
    assert abs(loss_of_blocks([]) - expected) > 10 * 1e-5 * expected  # the check can tell packings apart


def test_cli_evaluate_loss_per_file_equals_transformers_on_the_course_chunks(tmp_path, gpt2_dir, capsys):
    """--packing per-file: the loss over the course tokenizer's full overflow chunks, by GPT2LMHeadModel."""
    transformers = pytest.importorskip("transformers")
    from conftest import stdlib_texts

    model_dir = save_tiny_model(tmp_path / "model", gpt2_dir)
    records = [{"content": t[:700]} for t in stdlib_texts(limit=6)]
    data = tmp_path / "file-000000000001_validation.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cli.main(["evaluate-loss", "--model", str(model_dir), "--dataset", str(data), "--seq-length", "32",
              "--batch-size", "5", "--packing", "per-file", "--output", str(tmp_path / "r.json"),
              "--no-progress"])
    result = json.loads((tmp_path / "r.json").read_text())

    reference_tokenizer = transformers.GPT2TokenizerFast.from_pretrained(gpt2_dir)
    out = reference_tokenizer([r["content"] for r in records], truncation=True, max_length=32,
                              return_overflowing_tokens=True, return_length=True)
    ids = torch.tensor([c for n, c in zip(out["length"], out["input_ids"], strict=True) if n == 32])
    with torch.no_grad():
        expected = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()(ids, labels=ids).loss.item()
    assert result["tokens"] == len(ids) * 31 and result["packing"] == "per-file"
    assert result["tokens_dropped_rank0"] == sum(n for n in out["length"] if n != 32)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_validation_shards_are_picked_out_of_a_corpus_directory(tmp_path):
    for name in ("file-000000000000.json", "file-000000000001.json", "file-000000000002_validation.json"):
        (tmp_path / name).write_text(json.dumps({"content": "x = 1\n"}) + "\n")
    assert [s.path.name for s in validation_sources(tmp_path)] == ["file-000000000002_validation.json"]
    single = tmp_path / "file-000000000000.json"
    assert [s.path for s in validation_sources(single)] == [single]


# --- under torchrun: 2 ranks (gloo on CPU) must give what 1 process gives -------------------------
def test_evaluate_loss_under_torchrun_reduces_sums_across_ranks(tiny_model_dir, tmp_path):
    import random

    from minicodeparrot.tokenizer.bpe import Tokenizer

    # Every record is exactly 1 or 2 blocks (its tokens + <|endoftext|> = 16 or 32), so packing per
    # rank cuts the same blocks as packing everything in one process and drops nothing. The 7 lines
    # deal unevenly (rank 0: 5 blocks, rank 1: 4), so a mean of per-rank means would differ.
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    words = [" the", " of", " def", " return", " x", " self", " import", " for", " in", " if", " None"]
    rng = random.Random(0)
    blocks_per_record = [1, 2, 1, 1, 2, 1, 1]
    records = []
    for k in blocks_per_record:
        text = "x" + "".join(rng.choice(words) for _ in range(16 * k - 2))
        assert len(tokenizer.encode(text)) == 16 * k - 1
        records.append({"content": text})
    data = tmp_path / "file-000000000001_validation.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Batch size 1: every block's loss is computed alone in both runs, so only the float64 sums differ.
    common = ["evaluate-loss", "--model", str(tiny_model_dir), "--dataset", str(data), "--seq-length", "16",
              "--batch-size", "1", "--no-progress"]
    printed = torchrun_cli(*common, "--output", str(tmp_path / "two.json"), cwd=tmp_path)
    assert "2 rank(s)" in printed
    one_thread_cli(common + ["--output", str(tmp_path / "one.json")])
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["tokens"] == two["tokens"] == sum(blocks_per_record) * 15
    assert one["batches"] == two["batches"] == sum(blocks_per_record)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)
