"""The tokenizer's speed paths: skip on a first reading.

Each module here makes `tokenizer/bpe.py` faster without changing a single id, and each is tested
against the plain path and the reference library:
- `split.py`           - the GPT-2 split with tiny ASCII classes (the common case for code);
- `piece_cuts.py`      - long non-ASCII pieces cut where no merge can cross, so BPE stays linear
                         (a Chinese clause becomes its characters' cached ids);
- `parallel_encode.py` - many texts encoded in worker processes, results in input order.
"""
