"""Stage 1, sources: bytes from the Hugging Face Hub and from shard files, as a stream of records.

CodeParrot's data is JSON-lines shards (`.json.gz`, one `{"content": ...}` record a line), on the Hub
or on disk. This stage turns a dataset name into an ordered list of files, streams their records
(with retries and resume over HTTP), and shuffles them with a bounded buffer. Nothing here knows
about tokens; every later stage starts from what this one yields.

Read in this order:
1. `shards.py`   - what a dataset name means (`resolve_sources`) and `ShardStream`, the record stream
                   every other stage reads: files dealt to ranks, records shuffled, position resumable.
2. `shuffle.py`  - the streaming shuffle buffer (used for records here and for token blocks later).
3. `hub.py`      - the Hub's HTTP API with `requests`: list, stream, download, retry.
4. `corpus.py`   - a real corpus on every machine: the standard library written as codeparrot shards.
5. `upload.py`   - the other direction: a folder pushed to a Hub model repo as one commit (Git LFS for
                   the weights), with the same retries; `minicodeparrot upload` and --push-to-hub use it.

Skip on a first reading: the retry and range-resume half of `hub.py`.
"""
