"""Stage 3, data: from records to the token blocks a training step eats.

Two paths lead here. Offline, once: clean the corpus as CodeParrot did (exact dedup, heuristic
filters, MinHash near-dedup) and optionally pretokenize it into binary shards. Online, every step:
tokenize documents, join them with EOS and cut the stream into `seq_length` blocks (the book's
ConstantLengthDataset), shuffle the blocks, batch them, each rank computing its own virtual streams;
data workers do this in the background and hand back their state with every batch, so resume is exact.

Read in this order:
1. `packing.py`     - ConstantLengthDataset: documents in, fixed-length token blocks out (joined, the
                      book's; or each file cut alone, `--packing per-file`, the course's).
2. `pipeline.py`    - one part of the data: read -> pack -> shuffle, and its resumable state.
3. `streams.py`     - training data as S virtual streams: the same global batches on any number of
                      ranks and workers, and a checkpoint any of them can resume.
4. `loader.py`      - background data workers that run pipelines and ship batches with their state.
5. `preprocess.py`  - the `codeparrot-clean` recipe; `dedup.py` - its MinHash near-deduplication.
6. `pretokenize.py` - tokenize once into memory-mapped shards, for when tokenizing cannot keep up.

Skip on a first reading: `loader.py`'s process plumbing (how a worker's death is noticed).
"""
