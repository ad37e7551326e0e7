"""ConstantLengthDataset against the reference GPT-2 tokenizer (`tokenizers`) and the book's numbers."""

from __future__ import annotations

import itertools

import pytest
import tokenizers
import torch
from conftest import FIXTURES, stdlib_texts

from minicodeparrot.data.packing import ConstantLengthDataset, estimate_chars_per_token
from minicodeparrot.errors import UserError

EOS = 50256


@pytest.fixture(scope="module")
def reference():
    """The reference GPT-2 tokenizer, with special tokens in the text encoded as plain text."""
    ref = tokenizers.Tokenizer.from_file(str(FIXTURES / "tokenizer.json"))
    ref.encode_special_tokens = True
    return ref


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir):
    from minicodeparrot.tokenizer.bpe import Tokenizer

    return Tokenizer.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def texts():
    return stdlib_texts(limit=60)


def reference_stream(reference, texts, seq_length, num_of_sequences, chars_per_token):
    """The book's algorithm written out plainly with the reference tokenizer: expected blocks and drops."""
    target = seq_length * chars_per_token * num_of_sequences
    blocks, dropped, i = [], 0, 0
    while i < len(texts):
        buffer, chars = [], 0
        while i < len(texts) and chars < target:
            buffer.append(texts[i])
            chars += len(texts[i])
            i += 1
        ids = [t for enc in reference.encode_batch(buffer, add_special_tokens=False) for t in enc.ids + [EOS]]
        n = len(ids) // seq_length
        blocks += [ids[b * seq_length:(b + 1) * seq_length] for b in range(n)]
        dropped += len(ids) - n * seq_length
    return blocks, dropped


def test_blocks_are_the_documents_with_eos_minus_only_the_tails(tokenizer, reference, texts):
    ds = ConstantLengthDataset(tokenizer, texts, seq_length=256, num_of_sequences=20, chars_per_token=3.0)
    got = list(ds)
    assert all(b.dtype == torch.long and b.shape == (256,) for b in got)
    expected, dropped = reference_stream(reference, texts, 256, 20, 3.0)
    assert [b.tolist() for b in got] == expected
    assert ds.tokens_dropped == dropped
    assert ds.tokens_total == len(expected) * 256 + dropped
    assert ds.tokens_total == sum(len(reference.encode(t).ids) + 1 for t in texts)


def test_book_example_buffer_and_first_lengths(tokenizer, texts):
    ds = ConstantLengthDataset(tokenizer, [{"content": t} for t in texts], num_of_sequences=10)
    assert ds.input_characters == pytest.approx(36864)
    lengths = [len(b) for b in itertools.islice(iter(ds), 5)]
    assert lengths == [1024] * 5


def test_dropped_fraction_within_one_percent(tokenizer, texts):
    # The bound is seq_length-1 dropped tokens per buffer of >= num_of_sequences blocks: with
    # num_of_sequences=100 it is < 1% whatever seq_length is, so a small seq_length keeps this fast.
    ds = ConstantLengthDataset(tokenizer, texts, seq_length=64, num_of_sequences=100, chars_per_token=3.6)
    n = sum(1 for _ in ds)
    assert n * 64 + ds.tokens_dropped == ds.tokens_total
    assert 0 < ds.dropped_fraction <= 0.01


def test_literal_endoftext_in_code_is_not_a_boundary(tokenizer, reference):
    doc = 'SPECIAL = "<|endoftext|>"\n' * 40
    ds = ConstantLengthDataset(tokenizer, [doc, doc], seq_length=16, num_of_sequences=1000)
    ids = [t for b in ds for t in b.tolist()]
    doc_ids = reference.encode(doc).ids
    assert EOS not in doc_ids  # the reference, told to treat it as text, agrees
    assert ids == (doc_ids + [EOS] + doc_ids + [EOS])[:len(ids)]
    assert ids.count(EOS) <= 2


def test_estimate_chars_per_token_matches_reference(tokenizer, reference, texts):
    records = [{"content": t} for t in texts]
    got = estimate_chars_per_token(tokenizer, records, n=20)
    expected = sum(len(t) for t in texts[:20]) / sum(len(e.ids) for e in reference.encode_batch(texts[:20]))
    assert got == pytest.approx(expected)
    assert 2.0 < got < 4.0  # GPT-2's tokenizer on Python: fewer chars per token than CodeParrot's 3.6


def test_resume_from_list_source_gives_identical_blocks(tokenizer, texts):
    kw = dict(seq_length=128, num_of_sequences=8, chars_per_token=3.0)
    whole = ConstantLengthDataset(tokenizer, texts[:25], **kw)
    full = [b.tolist() for b in whole]
    for k in (1, 8, 13, len(full) - 1):
        ds = ConstantLengthDataset(tokenizer, texts[:25], **kw)
        head = [b.tolist() for b in itertools.islice(iter(ds), k)]
        state = ds.state_dict()
        resumed = ConstantLengthDataset(tokenizer, texts[:25], **kw)
        resumed.load_state_dict(state)
        assert head + [b.tolist() for b in resumed] == full
        # The re-tokenized buffer is not counted twice.
        assert (resumed.tokens_total, resumed.tokens_dropped) == (whole.tokens_total, whole.tokens_dropped)


class StatefulSource:
    """A source that restores its own position and reshuffles per epoch, like shards.ShardStream."""

    def __init__(self, texts):
        self.texts, self.epoch, self.pos = texts, 0, 0

    def set_epoch(self, epoch):
        self.epoch, self.pos = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]

    def __iter__(self):
        order = torch.randperm(len(self.texts), generator=torch.Generator().manual_seed(self.epoch)).tolist()
        while self.pos < len(order):
            self.pos += 1
            yield self.texts[order[self.pos - 1]]


def test_resume_infinite_across_epochs_with_stateful_source(tokenizer, texts):
    kw = dict(seq_length=128, num_of_sequences=6, chars_per_token=3.0, infinite=True)
    first = ConstantLengthDataset(tokenizer, StatefulSource(texts[:3]), **kw)
    full = [b.tolist() for b in itertools.islice(iter(first), 120)]
    ds = ConstantLengthDataset(tokenizer, StatefulSource(texts[:3]), **kw)
    head = [b.tolist() for b in itertools.islice(iter(ds), 77)]
    assert ds.epoch >= 1  # the cut is past an epoch boundary
    resumed = ConstantLengthDataset(tokenizer, StatefulSource(texts[:3]), **kw)
    resumed.load_state_dict(ds.state_dict())
    assert head + [b.tolist() for b in itertools.islice(iter(resumed), 120 - 77)] == full


def test_infinite_restarts_and_empty_source_is_an_error(tokenizer):
    ds = ConstantLengthDataset(tokenizer, ["x = 1\n" * 50], seq_length=32, num_of_sequences=2, infinite=True)
    assert len(list(itertools.islice(iter(ds), 50))) == 50
    with pytest.raises(UserError, match="empty"):
        next(iter(ConstantLengthDataset(tokenizer, [], seq_length=32, infinite=True)))
    with pytest.raises(UserError, match="'content'"):
        next(iter(ConstantLengthDataset(tokenizer, [{"text": "x"}], seq_length=1)))


def test_resume_over_shard_stream_with_shuffle_buffer(tokenizer, texts, tmp_path):
    from minicodeparrot.sources.corpus import make_corpus
    from minicodeparrot.sources.shards import ShardStream

    src = tmp_path / "src"
    src.mkdir()
    small = [t for t in texts if len(t) < 10_000][:12]
    for i, text in enumerate(small):
        (src / f"m{i:02d}.py").write_text(text)
    make_corpus(tmp_path / "c", sources=[src], samples_per_file=3, validation_fraction=0.0,
                show_progress=False)

    def make():
        stream = ShardStream(tmp_path / "c" / "train", seed=1, shuffle_buffer=4)
        return ConstantLengthDataset(tokenizer, stream, seq_length=256, num_of_sequences=4, infinite=True)

    n = 3 * sum(1 for _ in ConstantLengthDataset(tokenizer, small, seq_length=256, num_of_sequences=4))
    full = [b.tolist() for b in itertools.islice(iter(make()), n)]
    for k in (5, n // 2, n - 3):
        ds = make()
        head = [b.tolist() for b in itertools.islice(iter(ds), k)]
        resumed = make()
        resumed.load_state_dict(ds.state_dict())
        assert head + [b.tolist() for b in itertools.islice(iter(resumed), n - k)] == full
    assert ds.epoch >= 1


def test_in_process_encoding_yields_the_same_blocks_document_by_document(tokenizer, texts):
    """num_workers=1 (a data worker) encodes one document at a time; blocks, drops and resume match."""
    kw = dict(seq_length=128, num_of_sequences=30, chars_per_token=3.0)
    bulk = ConstantLengthDataset(tokenizer, texts[:25], **kw)
    expected = [b.tolist() for b in bulk]
    steady = ConstantLengthDataset(tokenizer, texts[:25], num_workers=1, **kw)
    it = iter(steady)
    head = [next(it).tolist() for _ in range(7)]
    resumed = ConstantLengthDataset(tokenizer, texts[:25], num_workers=1, **kw)
    resumed.load_state_dict(steady.state_dict())
    assert head + [b.tolist() for b in resumed] == expected
    assert bulk.tokens_dropped > 0
    assert (resumed.tokens_total, resumed.tokens_dropped) == (bulk.tokens_total, bulk.tokens_dropped)


# --- per-file packing: the Hugging Face course's chunks (issue 22) ------------------------------------------
@pytest.fixture(scope="module")
def course_tokenizer(gpt2_dir):
    """The course's tokenizer call, with the reference GPT-2 tokenizer (transformers' fast tokenizer)."""
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(str(gpt2_dir))


def course_chunks(course_tokenizer, texts, context_length):
    """The course's `tokenize` function: overflow chunks of each file, only the full-length ones kept."""
    outputs = course_tokenizer(texts, truncation=True, max_length=context_length,
                               return_overflowing_tokens=True, return_length=True)
    kept = [ids for length, ids in zip(outputs["length"], outputs["input_ids"], strict=True)
            if length == context_length]
    dropped = sum(length for length in outputs["length"] if length != context_length)
    return kept, dropped


@pytest.mark.parametrize("num_workers", [None, 1])
def test_per_file_chunks_are_the_reference_overflow_chunks(tokenizer, course_tokenizer, num_workers):
    held_out = stdlib_texts(limit=120)[90:120]  # files no other test here packs
    # A file quoting the EOS token: the course's tokenizer parses it as the special token, and so must we.
    held_out.append("marker = '<|endoftext|>'\n" * 40)
    ds = ConstantLengthDataset(tokenizer, held_out, seq_length=128, num_of_sequences=8, chars_per_token=3.0,
                               packing="per-file", num_workers=num_workers)
    got = [b.tolist() for b in ds]
    expected, dropped = course_chunks(course_tokenizer, held_out, 128)
    assert got == expected and len(got) > 300
    assert any(EOS in chunk for chunk in got)  # the quoted token, as the reference encodes it
    assert ds.tokens_dropped == dropped and ds.tokens_total == len(got) * 128 + dropped


def test_per_file_keeps_files_apart_and_drops_short_ones(tokenizer, course_tokenizer):
    # The course's example shape: files of 2.5, 1.6 and 0.6 chunks give 2 + 1 + 0 full chunks.
    short = "x = 1\n"
    texts = [short * 60, short * 38, short * 14]
    lengths = [len(course_tokenizer(t)["input_ids"]) for t in texts]
    ds = ConstantLengthDataset(tokenizer, texts, seq_length=64, packing="per-file")
    got = [b.tolist() for b in ds]
    assert len(got) == sum(n // 64 for n in lengths) and 0 < len(got) < sum(lengths) // 64
    expected, _ = course_chunks(course_tokenizer, texts, 64)
    assert got == expected


def test_per_file_resume_gives_identical_chunks(tokenizer, texts):
    kw = dict(seq_length=128, num_of_sequences=6, chars_per_token=3.0, packing="per-file")
    first = ConstantLengthDataset(tokenizer, texts[:25], **kw)
    whole = [b.tolist() for b in first]
    for cut in (1, 17, len(whole) - 1):
        ds = ConstantLengthDataset(tokenizer, texts[:25], **kw)
        head = [b.tolist() for b in itertools.islice(iter(ds), cut)]
        resumed = ConstantLengthDataset(tokenizer, texts[:25], **kw)
        resumed.load_state_dict(ds.state_dict())
        assert head + [b.tolist() for b in resumed] == whole, cut
        assert (resumed.tokens_total, resumed.tokens_dropped) == (first.tokens_total, first.tokens_dropped)


def test_unknown_packing_is_a_one_line_error(tokenizer):
    with pytest.raises(UserError, match="unknown packing 'per_file'"):
        ConstantLengthDataset(tokenizer, ["x"], packing="per_file")
