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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from minicodeparrot.errors import UserError


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
    1 encodes in this process.
    """

    def __init__(self, tokenizer, dataset: Iterable[Any], seq_length: int = 1024,
                 num_of_sequences: int = 1024,
                 chars_per_token: float = 3.6, infinite: bool = False, text_field: str = "content",
                 num_workers: int | None = None):
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
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise UserError("the tokenizer has no <|endoftext|> token; packing needs it between documents")
        self.tokens_total = 0  # tokens produced by the tokenizer, EOS separators included
        self.tokens_dropped = 0  # of those, tokens in the partial tail block of each buffer
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
        """The buffer's token stream, in pieces. In this process (num_workers=1) one document at a time,
        so that blocks leave while the rest of the buffer is still being tokenized: a data worker then
        delivers batches at an even pace, not ~85 at once after a pause of a second or more. Otherwise
        in one call, which the tokenizer may spread over a process pool."""
        if self.num_workers == 1:
            for text in texts:
                yield encode_documents(self.tokenizer, [text], num_workers=1)
        else:
            yield encode_documents(self.tokenizer, texts, self.num_workers)

    # -- the loop --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        resume, self._resume = self._resume, None
        skip_blocks = 0
        if resume is None:
            self.epoch, records = 0, 0
            iterator = iter(self.dataset)
        else:
            self.epoch, records, skip_blocks = resume["epoch"], resume["records"], resume["yielded"]
            # Counters as they were before the buffer that is about to be re-tokenized.
            self.tokens_total, self.tokens_dropped = resume["tokens_total"], resume["tokens_dropped"]
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            if resume["source_state"] is not None:
                # The source restores its own position (file, offset, shuffle RNG).
                self.dataset.load_state_dict(resume["source_state"])
                iterator = iter(self.dataset)
            else:
                # A plain re-iterable (a list) or the start of a pass: replay and skip what was consumed.
                iterator = iter(self.dataset)
                for _ in range(records):
                    next(iterator)

        more = True
        while more:
            self._buffer_state = self._start_state(self.epoch, self._source_state(records), records)
            buffer, buffer_chars, restarted_empty = [], 0, False
            while buffer_chars < self.input_characters:
                try:
                    text = _text(next(iterator), self.text_field)
                except StopIteration:
                    if not self.infinite:
                        more = False
                        break
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
            if not buffer:
                break

            n_blocks, n_tokens, pending = 0, 0, np.empty(0, dtype=np.int64)
            for ids in self._encode(buffer):
                n_tokens += len(ids)
                pending = np.concatenate((pending, ids))
                full = len(pending) // self.seq_length
                for b in range(full):
                    n_blocks += 1
                    if n_blocks > skip_blocks:
                        # Count the block before yielding it: while the consumer holds it, the state says
                        # it is out. A copy, not a view: a view would keep the whole array alive while a
                        # shuffle buffer holds the block.
                        self._buffer_state["yielded"] = n_blocks
                        yield torch.from_numpy(pending[b * self.seq_length:(b + 1) * self.seq_length].copy())
                pending = pending[full * self.seq_length:]
            self.tokens_total += n_tokens
            self.tokens_dropped += len(pending)  # the buffer's partial last block
            skip_blocks = 0
