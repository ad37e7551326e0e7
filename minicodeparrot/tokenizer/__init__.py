"""Stage 2, tokenizer: GPT-2's byte-level BPE, encode/decode and a trainer, exact to the reference library.

Text becomes token ids in three moves: bytes are mapped to printable characters (GPT-2's
`bytes_to_unicode`), the text is split into pieces by GPT-2's pre-tokenizer pattern, and each piece
is merged pair by pair in the order the merges were learned. Training learns those merges from a
corpus, and ours gives the reference trainer's merges and ids exactly.

Read in this order:
1. `reference.py`      - BPE training and encoding in a few plain lines: the algorithm, nothing else.
2. `bpe.py`            - the real tokenizer: `Tokenizer.encode`/`decode`, the byte map, the split.
3. `trainer.py`        - the same training as `reference.py`, fast enough for gigabytes, same merges.
4. `files.py`          - tokenizer.json / vocab.json + merges.txt, on disk or on the Hub.
5. `report.py`         - the book's look at a trained tokenizer (`tokenize`, `tokenizer-report`).

Skip on a first reading: `fast/` (speed paths: an ASCII-class split, cutting long non-ASCII pieces,
encoding in worker processes; each is tested to give the plain path's ids) and `unicode_tables.py`
(generated tables of what the reference calls a letter, a number and a space).

`from minicodeparrot.tokenizer import Tokenizer` is the public path.
"""

from minicodeparrot.tokenizer.bpe import Tokenizer, bytes_to_unicode, split_pieces

__all__ = ["Tokenizer", "bytes_to_unicode", "split_pieces"]
