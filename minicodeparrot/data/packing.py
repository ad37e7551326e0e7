"""Constant-length packing: a stream of documents in, a stream of `seq_length` token blocks out.

The book's `ConstantLengthDataset` (NLP with Transformers, ch. 10). Padding short files to 1024
tokens would waste most of every batch, and truncating long ones would throw code away, so:

1. fill a character buffer with whole documents until it holds about
   `seq_length * chars_per_token * num_of_sequences` characters (enough for `num_of_sequences`
   blocks; 1024 * 3.6 * 1024 by default, about 3.8 M characters);
2. tokenize the buffer's documents in one batch and join them, each followed by `<|endoftext|>`,
   so the model learns where one file ends and the next begins;
3. cut the joined ids into `seq_length` blocks and drop only the last partial block.

Only the tail of each buffer is lost: at most `seq_length - 1` tokens per ~`num_of_sequences`
blocks, i.e. under 1% once `num_of_sequences` is 100 or more (`dropped_fraction` reports it).

Documents are encoded with `parse_special=False`: a file that contains the literal text
`<|endoftext|>` (tokenizer code does) must not be able to inject a document boundary; only the
separator we append is the EOS id.

`packing="per-file"` is the Hugging Face course's recipe instead (chapter 7, "training a causal language
model from scratch"): each file is tokenized alone, exactly as `tokenizer(text, truncation=True,
max_length=seq_length, return_overflowing_tokens=True)` does, i.e. cut into consecutive `seq_length`
pieces, and only the full pieces are kept. Files are never joined, so no EOS is added (the course's
tokenize function adds none, and GPT-2's tokenizer adds no BOS/EOS), and every file's tail is dropped:
a short file gives nothing at all. To give the same ids as the course, special tokens in the text are
parsed as the reference tokenizer parses them (a literal `<|endoftext|>` becomes the EOS id).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from minicodeparrot.errors import UserError

PACKING_MODES = ("concat", "per-file")


def _text(record: Any, text_field: str) -> str:
    if isinstance(record, str):
        return record
    try:
        return record[text_field]
    except (KeyError, TypeError):
        raise UserError(f"record has no '{text_field}' field; pass the right --text-field "
                        f"(record keys: {sorted(record)[:8] if isinstance(record, dict) else type(record)})"
                        ) from None


def encode_documents(tokenizer, texts: list[str], num_workers: int | None = None) -> np.ndarray:
    """The documents' token ids joined into one int64 array, each document followed by EOS.

    The one place where documents become a token stream: the packer and `pretokenize` both call it.
    `num_workers` is passed to `Tokenizer.encode_batch` (None: a process pool for large batches; 1: this
    process, as a long-lived data worker wants, keeping its word cache warm).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no <|endoftext|> token; packing needs it between documents")
    encoded = tokenizer.encode_batch(texts, num_workers=num_workers, parse_special=False)
    out = np.empty(sum(map(len, encoded)) + len(encoded), dtype=np.int64)
    pos = 0
    for ids in encoded:
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
        out[pos] = eos
        pos += 1
    return out


def per_file_chunks(ids: np.ndarray, seq_length: int) -> np.ndarray:
    """One file's full `seq_length` chunks, [n, seq_length]: the overflow chunks of a truncating
    tokenizer (stride 0) without the last, shorter one."""
    n = len(ids) // seq_length
    return ids[:n * seq_length].reshape(n, seq_length)


def encode_per_file(tokenizer, texts: list[str], seq_length: int,
                    num_workers: int | None = None) -> tuple[np.ndarray, int]:
    """(the documents' full chunks joined into one int64 array, tokens before dropping the tails).

    `pretokenize --packing per-file` writes this: every chunk starts at a multiple of `seq_length`, so
    the token shards' windows are exactly the chunks.
    """
    encoded = tokenizer.encode_batch(texts, num_workers=num_workers, parse_special=True)
    chunks = [per_file_chunks(np.asarray(ids, dtype=np.int64), seq_length).reshape(-1) for ids in encoded]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64), sum(map(len, encoded))


def estimate_chars_per_token(tokenizer, records: Iterable[Any], n: int = 500,
                             text_field: str = "content") -> float:
    """Characters per token over the first `n` records (the book measures 3.6 for its tokenizer).

    Sizes the packing buffer: too high a value under-fills buffers (more dropped tails), too low
    over-fills them (more memory, nothing else).
    """
    texts = []
    for rec in records:
        if len(texts) >= n:
            break
        texts.append(_text(rec, text_field))
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts, parse_special=False))
    if tokens == 0:
        raise UserError("cannot estimate characters per token: the first records are empty")
    return sum(len(t) for t in texts) / tokens


class ConstantLengthDataset(IterableDataset):
    """Yields `LongTensor(seq_length)` blocks packed from the documents of `dataset`.

    `dataset` is any re-iterable of strings or of records with a `text_field` (a list, a
    `shards.ShardStream`, ...). With `infinite=True` it is restarted when exhausted (and told the
    new epoch through `set_epoch` if it has one), as training wants; otherwise iteration ends with
    the source.

    With data workers (data/loader.py), each worker runs its own copy of this loop (and keeps its own
    `tokens_total`/`tokens_dropped`), so the source must split itself across workers (`ShardStream`
    does). `state_dict()`/`load_state_dict()` give an exact resume when the dataset is iterated in
    the process that holds it (minicodeparrot.data.loader runs it in its workers and carries the state back).
    `num_workers` goes to `encode_documents`: None lets the tokenizer use a process pool per buffer,
    1 encodes in this process. `packing` is "concat" (the book's) or "per-file" (the course's; see the
    module docstring); both keep the same buffers, so resuming works the same way.
    """

    def __init__(self, tokenizer, dataset: Iterable[Any], seq_length: int = 1024,
                 num_of_sequences: int = 1024,
                 chars_per_token: float = 3.6, infinite: bool = False, text_field: str = "content",
                 num_workers: int | None = None, packing: str = "concat"):
        if packing not in PACKING_MODES:
            raise UserError(f"unknown packing {packing!r}; choose one of {', '.join(PACKING_MODES)}")
        if seq_length < 1 or num_of_sequences < 1 or chars_per_token <= 0:
            raise UserError("seq_length and num_of_sequences must be >= 1 and chars_per_token > 0")
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.seq_length = seq_length
        self.num_of_sequences = num_of_sequences
        self.chars_per_token = chars_per_token
        self.input_characters = seq_length * chars_per_token * num_of_sequences
        self.infinite = infinite
        self.text_field = text_field
        self.num_workers = num_workers
        self.packing = packing
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise UserError("the tokenizer has no <|endoftext|> token; packing needs it between documents")
        self.tokens_total = 0  # tokens produced by the tokenizer, EOS separators included
        self.tokens_dropped = 0  # of those, the partial tail block of each buffer (per-file: of each file)
        self.epoch = 0
        # Resume bookkeeping: where the current buffer started, and how many of its blocks are out.
        self._buffer_state: dict = self._start_state(epoch=0, source_state=None, records=0)
        self._resume: dict | None = None

    @property
    def dropped_fraction(self) -> float:
        return self.tokens_dropped / self.tokens_total if self.tokens_total else 0.0

    def _start_state(self, epoch: int, source_state: Any, records: int) -> dict:
        return {"epoch": epoch, "source_state": source_state, "records": records, "yielded": 0,
                "tokens_total": self.tokens_total, "tokens_dropped": self.tokens_dropped}

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The position after the last block handed out: the start of its buffer and how many of
        that buffer's blocks were yielded. Resuming re-reads and re-tokenizes that one buffer.
        """
        return dict(self._buffer_state)

    def load_state_dict(self, state: dict) -> None:
        """The next `iter()` continues with exactly the block that followed when `state` was taken."""
        missing = set(self._start_state(0, None, 0)) - set(state)
        if missing:
            raise UserError(f"packing state lacks {sorted(missing)}; was it saved by ConstantLengthDataset?")
        self._resume = dict(state)

    def _open_source(self, epoch: int) -> Iterator[Any]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return iter(self.dataset)

    def _source_state(self, records: int) -> Any:
        # At the start of a pass (records == 0) a fresh `iter()` after `set_epoch` *is* the position;
        # the source's own state_dict would still describe its previous, finished pass.
        if records == 0 or not hasattr(self.dataset, "state_dict"):
            return None
        return self.dataset.state_dict()

    def _encode(self, texts: list[str]) -> Iterator[np.ndarray]:
        """The buffer's token stream, in pieces (per-file: one piece per document, without EOS). In this
        process (num_workers=1) one document at a time, so that blocks leave while the rest of the buffer
        is still being tokenized: a data worker then delivers batches at an even pace, not ~85 at once
        after a pause of a second or more. Otherwise in one call, which the tokenizer may spread over a
        process pool."""
        if self.packing == "per-file":
            groups = [[t] for t in texts] if self.num_workers == 1 else [texts]
            for group in groups:
                encoded = self.tokenizer.encode_batch(group, num_workers=self.num_workers, parse_special=True)
                for ids in encoded:
                    yield np.asarray(ids, dtype=np.int64)
        elif self.num_workers == 1:
            for text in texts:
                yield encode_documents(self.tokenizer, [text], num_workers=1)
        else:
            yield encode_documents(self.tokenizer, texts, self.num_workers)

    def _blocks(self, texts: list[str]) -> Iterator[np.ndarray]:
        """One buffer's blocks. Concat cuts the joined stream and drops the buffer's tail; per-file cuts
        each document alone and drops each document's tail. The counters move once the buffer is done."""
        n_tokens, dropped, pending = 0, 0, np.empty(0, dtype=np.int64)
        for ids in self._encode(texts):
            n_tokens += len(ids)
            pending = ids if self.packing == "per-file" else np.concatenate((pending, ids))
            full = len(pending) // self.seq_length
            for b in range(full):
                # A copy, not a view: a view would keep the whole array alive while a shuffle buffer holds
                # the block.
                yield pending[b * self.seq_length:(b + 1) * self.seq_length].copy()
            pending = pending[full * self.seq_length:]
            if self.packing == "per-file":  # the file's tail goes; the next file starts a chunk of its own
                dropped += len(pending)
                pending = pending[:0]
        self.tokens_total += n_tokens
        self.tokens_dropped += dropped + len(pending)

    # -- the loop --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        iterator, records, skip_blocks = self._reopen()
        while True:
            self._buffer_state = self._start_state(self.epoch, self._source_state(records), records)
            buffer, iterator, records, more = self._fill_buffer(iterator, records)
            if not buffer:
                break
            n_blocks = 0
            for block in self._blocks(buffer):
                n_blocks += 1
                if n_blocks > skip_blocks:
                    # Count the block before yielding it: while the consumer holds it, the state says it
                    # is out.
                    self._buffer_state["yielded"] = n_blocks
                    yield torch.from_numpy(block)
            skip_blocks = 0
            if not more:
                break

    def _reopen(self) -> tuple[Iterator[Any], int, int]:
        """(source iterator, records read, blocks of the first buffer to skip): the start, or the saved
        position when `load_state_dict` was called."""
        resume, self._resume = self._resume, None
        if resume is None:
            self.epoch = 0
            return iter(self.dataset), 0, 0
        self.epoch, records = resume["epoch"], resume["records"]
        # Counters as they were before the buffer that is about to be re-tokenized.
        self.tokens_total, self.tokens_dropped = resume["tokens_total"], resume["tokens_dropped"]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        if resume["source_state"] is not None:
            # The source restores its own position (file, offset, shuffle RNG).
            self.dataset.load_state_dict(resume["source_state"])
            return iter(self.dataset), records, resume["yielded"]
        # A plain re-iterable (a list) or the start of a pass: replay and skip what was consumed.
        iterator = iter(self.dataset)
        for _ in range(records):
            next(iterator)
        return iterator, records, resume["yielded"]

    def _fill_buffer(self, iterator: Iterator[Any],
                     records: int) -> tuple[list[str], Iterator[Any], int, bool]:
        """(documents of about `input_characters`, the iterator, records read, whether more may follow).
        With `infinite`, the end of the source starts its next epoch."""
        buffer, buffer_chars, restarted_empty = [], 0, False
        while buffer_chars < self.input_characters:
            try:
                text = _text(next(iterator), self.text_field)
            except StopIteration:
                if not self.infinite:
                    return buffer, iterator, records, False
                if restarted_empty:  # a whole pass gave nothing: looping would never end
                    raise UserError("the dataset is empty; packing has no documents to read") from None
                self.epoch, records = self.epoch + 1, 0
                iterator = self._open_source(self.epoch)
                restarted_empty = True
                continue
            restarted_empty = False
            records += 1
            buffer.append(text)
            buffer_chars += len(text)
        return buffer, iterator, records, True
