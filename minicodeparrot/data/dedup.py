"""MinHash near-deduplication, as CodeParrot's `minhash_deduplication.py` does it, in numpy.

Exact dedup (md5 of the content without whitespace) misses files that differ by a renamed
variable or an edited docstring; GitHub is full of those (vendored copies, forks, templates).
CodeParrot treats each file as the *set* of its identifier-like tokens and calls two files near
duplicates when the Jaccard similarity |A & B| / |A | B| of those sets reaches 0.85.

Comparing every pair is quadratic, so, like the original (datasketch's MinHash + MinHashLSH):

1. MinHash: for each of 256 seeded universal hash functions h(x) = (a*x + b) mod p, keep the
   minimum of h over the file's token hashes. Two files agree on one such minimum with
   probability exactly their Jaccard similarity, so the fraction of agreeing minima estimates it.
   The 256 x (#tokens) products are one numpy broadcast per block of files; p = 2**32 - 5 keeps
   (a*x + b) below 2**64, so uint64 arithmetic is exact (no wrap-around, unlike datasketch).
2. LSH banding: cut the signature into `bands` bands of `rows` minima; files whose band is
   identical in at least one band become candidate pairs. A pair of similarity s is a candidate
   with probability 1 - (1 - s**rows)**bands. `lsh_params` picks the banding with the least
   false-positive area under the threshold among those that find >= 99% of pairs *at* the
   threshold: for 0.85 that is 22 bands x 10 rows (pairs at 0.85 found with probability 0.992,
   at 0.9 with 0.9999). datasketch's default weighting (13 x 19) would find pairs at 0.9 only 85%
   of the time.
3. Candidates are verified with the full 256-minimum estimate (>= threshold - 0.05; the estimate's
   standard deviation at 0.85 is 0.022), which removes LSH's false positives, then joined into
   clusters with union-find.
4. Per cluster, the original's `find_extremes`: walk the members in dataset order; a member whose
   *exact* Jaccard similarity with an already-kept member is >= threshold is dropped (and counted
   as a copy of it), otherwise it is kept. So nothing is removed on the estimate alone.

Files with fewer than 10 tokens (counted with repetition, as the original does) are exempt: their
token sets are too small for the similarity to mean anything.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

NON_ALPHA = re.compile(r"[^A-Za-z_0-9]")
_TOKEN = re.compile(r"[A-Za-z_0-9]+")  # the non-empty pieces of NON_ALPHA.split, found directly
MIN_NUM_TOKENS = 10
NUM_PERM = 256
PRIME = 4294967291  # largest prime below 2**32
ESTIMATE_SLACK = 0.05
_BLOCK_ROWS = 1024  # token rows per broadcast: 1024 x 256 x 8 B = 2 MB, stays in cache
_ALL_PAIRS_MAX_BUCKET = 64


def get_tokens(code: str) -> set[str]:
    """The set of identifier-like tokens: the non-empty pieces of `code` split on `[^A-Za-z_0-9]`."""
    return set(_TOKEN.findall(code))


def jaccard_similarity(code1: str, code2: str) -> float:
    t1, t2 = get_tokens(code1), get_tokens(code2)
    union = len(t1 | t2)
    return len(t1 & t2) / union if union else 1.0


@functools.cache
def lsh_params(threshold: float, num_perm: int = NUM_PERM, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm: least false-positive area below `threshold` among the
    bandings that make a pair of similarity exactly `threshold` a candidate with probability >= `recall`."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    s = np.linspace(0.0, threshold, 201)
    best = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            if 1.0 - (1.0 - threshold**rows) ** bands < recall:
                continue
            false_pos = np.trapezoid(1.0 - (1.0 - s**rows) ** bands, s)
            if best is None or false_pos < best[0]:
                best = (false_pos, bands, rows)
    return best[1], best[2]


class MinHasher:
    """Seeded MinHash signatures (num_perm uint32 minima per text) over identifier-token sets."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(1, PRIME, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, PRIME, size=num_perm, dtype=np.uint64)

    def signatures(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures (n, num_perm) uint32, exempt (n,) bool). Rows of exempt texts are all zero."""
        n = len(texts)
        exempt = np.zeros(n, dtype=bool)
        hashes = []
        for i, text in enumerate(texts):
            tokens = _TOKEN.findall(text)
            if len(tokens) < MIN_NUM_TOKENS:
                exempt[i] = True
                hashes.append(np.empty(0, dtype=np.uint64))
                continue
            uniq = set(tokens)
            h = np.fromiter((zlib.crc32(t.encode("ascii")) for t in uniq), dtype=np.uint64, count=len(uniq))
            hashes.append(h % np.uint64(PRIME))
        sig = np.full((n, self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        lengths = np.array([len(h) for h in hashes], dtype=np.int64)
        if lengths.sum():
            flat = np.concatenate(hashes)
            doc = np.repeat(np.arange(n), lengths)
            buf = np.empty((min(_BLOCK_ROWS, len(flat)), self.num_perm), dtype=np.uint64)
            for s in range(0, len(flat), _BLOCK_ROWS):
                x, d = flat[s:s + _BLOCK_ROWS], doc[s:s + _BLOCK_ROWS]
                vals = buf[:len(x)]  # in place: no temporaries of (block x num_perm)
                np.multiply(x[:, None], self.a[None, :], out=vals)
                np.add(vals, self.b[None, :], out=vals)
                np.remainder(vals, np.uint64(PRIME), out=vals)
                starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
                docs = d[starts]  # a text may straddle two blocks: take the minimum of both parts
                sig[docs] = np.minimum(sig[docs], np.minimum.reduceat(vals, starts, axis=0))
        sig[exempt] = 0
        return sig.astype(np.uint32), exempt


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Unique pairs (i < j) of row indices that share a whole band, as an (k, 2) int64 array.

    Buckets larger than 64 contribute a star (first member with each other) plus a chain (each member with
    the next) instead of all pairs: union-find joins them the same way and the pair count stays linear.
    """
    idx = np.arange(len(signatures)) if mask is None else np.flatnonzero(mask)
    if len(idx) < 2:
        return np.empty((0, 2), dtype=np.int64)
    out = []
    for band in range(bands):
        block = np.ascontiguousarray(signatures[idx, band * rows:(band + 1) * rows])
        keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        new = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        starts = np.flatnonzero(new)
        sizes = np.diff(np.r_[starts, len(order)])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
            members = idx[order[start:start + size]]
            if size <= _ALL_PAIRS_MAX_BUCKET:
                i, j = np.triu_indices(size, 1)
                out.append(np.stack([members[i], members[j]], axis=1))
            else:
                out.append(np.stack([np.repeat(members[0], size - 1), members[1:]], axis=1))
                out.append(np.stack([members[:-1], members[1:]], axis=1))
    if not out:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(out).astype(np.int64), axis=1)
    return np.unique(pairs, axis=0)


def estimated_jaccard(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """The fraction of agreeing minima of each pair: an unbiased estimate of its Jaccard similarity."""
    out = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), chunk):
        p = pairs[s:s + chunk]
        out[s:s + chunk] = (signatures[p[:, 0]] == signatures[p[:, 1]]).mean(axis=1)
    return out


def clusters_from_pairs(pairs: np.ndarray) -> list[list[int]]:
    """Connected components (union-find) of the pair graph, each sorted, ordered by their first member."""
    nodes = np.unique(pairs).tolist()
    parent = {x: x for x in nodes}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the smallest index is the root: clusters come out ordered
    groups: dict[int, list[int]] = {}
    for x in nodes:  # ascending, so each cluster is sorted and keyed by its first member
        groups.setdefault(find(x), []).append(x)
    return [groups[r] for r in sorted(groups)]


def make_duplicate_clusters(signatures: np.ndarray, exempt: np.ndarray, threshold: float = 0.85,
                            ) -> tuple[list[list[int]], np.ndarray]:
    """(clusters of row indices, verified edges (k, 2)) from MinHash signatures."""
    bands, rows = lsh_params(threshold, signatures.shape[1])
    pairs = candidate_pairs(signatures, bands, rows, mask=~exempt)
    edges = pairs[estimated_jaccard(signatures, pairs) >= threshold - ESTIMATE_SLACK]
    return clusters_from_pairs(edges), edges


def find_extremes(clusters: Iterable[list[int]], texts: Mapping[int, str] | Callable[[int], str],
                  threshold: float = 0.85) -> list[list[dict]]:
    """The original's find_extremes: per cluster, one dict per member with `base_index`, `is_extreme`
    and, for extremes, `copies` (itself plus the members dropped as its near duplicates)."""
    get = texts if callable(texts) else texts.__getitem__
    result = []
    for cluster in clusters:
        kept: list[tuple[dict, set[str]]] = []
        elements = []
        for index in cluster:
            tokens = get_tokens(get(index))
            element = {"base_index": int(index), "is_extreme": True, "copies": 1}
            for extreme, ext_tokens in kept:
                union = len(tokens | ext_tokens)
                if (len(tokens & ext_tokens) / union if union else 1.0) >= threshold:
                    extreme["copies"] += 1
                    element = {"base_index": int(index), "is_extreme": False}
                    break
            else:
                kept.append((element, tokens))
            elements.append(element)
        result.append(elements)
    return result


def deduplicate(texts: Sequence[str], threshold: float = 0.85, seed: int = 0,
                ) -> tuple[list[int], list[list[dict]]]:
    """In-memory near-dedup: (indices to keep, duplicate clusters). The pipeline in preprocess.py does the
    same with signatures computed in worker processes and texts re-read from disk."""
    sig, exempt = MinHasher(seed=seed).signatures(texts)
    clusters, _ = make_duplicate_clusters(sig, exempt, threshold)
    clusters_info = find_extremes(clusters, texts, threshold)
    removed = {e["base_index"] for c in clusters_info for e in c if not e["is_extreme"]}
    return [i for i in range(len(texts)) if i not in removed], clusters_info
