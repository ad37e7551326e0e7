"""MinHash near-dedup: the original's test, estimator accuracy, LSH banding, and recall/precision
against exact Jaccard similarity on a corpus with planted near duplicates."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from minicodeparrot.data import dedup


def test_original_codeparrot_test():
    # codeparrot's test_minhash_deduplication.py: the two "a" files cluster, "b " * 7 (7 tokens) is exempt.
    texts = ["a " * 20, "a " * 30, "b " * 7]
    sig, exempt = dedup.MinHasher().signatures(texts)
    assert exempt.tolist() == [False, False, True]
    clusters, _ = dedup.make_duplicate_clusters(sig, exempt, 0.85)
    assert clusters == [[0, 1]]
    keep, info = dedup.deduplicate(texts)
    assert keep == [0, 2]
    assert info[0][0] == {"base_index": 0, "is_extreme": True, "copies": 2}
    assert info[0][1] == {"base_index": 1, "is_extreme": False}


def test_tokens_and_exact_jaccard():
    assert dedup.get_tokens("def f(x_1):\n    return x_1 + 2.5") == {"def", "f", "x_1", "return", "2", "5"}
    assert dedup.jaccard_similarity("a b c d", "a b c e") == pytest.approx(3 / 5)
    # the 10-token minimum counts repetitions (as the original): 10 copies of one token are not exempt
    assert dedup.MinHasher().signatures(["x " * 10, "x " * 9])[1].tolist() == [False, True]


def test_lsh_params_for_default_threshold():
    bands, rows = dedup.lsh_params(0.85)
    assert (bands, rows) == (22, 10) and bands * rows <= dedup.NUM_PERM
    p = lambda s: 1 - (1 - s**rows) ** bands
    assert p(0.85) >= 0.99 and p(0.9) > 0.999 and p(0.5) < 0.05


def _random_doc(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    return rng.sample(vocab, n)


def test_minhash_estimates_jaccard_and_is_seeded():
    rng = random.Random(0)
    vocab = [f"tok{i}" for i in range(5000)]
    base = _random_doc(rng, vocab, 300)
    texts, exact = [" ".join(base)], []
    for k in (0, 20, 60, 120, 200, 300):
        other = base[k:] + _random_doc(rng, vocab[3000:], k)  # vocab[3000:] rarely overlaps base
        texts.append("(" + ", ".join(other) + ")")
        exact.append(dedup.jaccard_similarity(texts[0], texts[-1]))
    sig, _ = dedup.MinHasher(seed=1).signatures(texts)
    est = dedup.estimated_jaccard(sig, np.array([[0, i] for i in range(1, len(texts))]))
    # 256 permutations: standard deviation <= 0.031, so 0.1 is more than 3 sigma
    np.testing.assert_allclose(est, exact, atol=0.1)
    assert est[0] == 1.0
    np.testing.assert_array_equal(sig, dedup.MinHasher(seed=1).signatures(texts)[0])
    assert (sig != dedup.MinHasher(seed=2).signatures(texts)[0]).mean() > 0.9


def test_signature_independent_of_batch_and_blocks():
    # A text with more unique tokens than one broadcast block straddles blocks; batching must not matter.
    big = " ".join(f"v{i}" for i in range(dedup._BLOCK_ROWS + 500))
    texts = ["alpha beta gamma " * 5, big, "one two three four five six seven eight nine ten eleven"]
    hasher = dedup.MinHasher(seed=3)
    together = hasher.signatures(texts)[0]
    alone = np.concatenate([hasher.signatures([t])[0] for t in texts])
    np.testing.assert_array_equal(together, alone)
    # and it is the plain definition: min over tokens of (a*x + b) mod p
    x = np.array([np.uint64(__import__("zlib").crc32(t.encode())) % np.uint64(dedup.PRIME)
                  for t in dedup.get_tokens(texts[2])], dtype=np.uint64)
    ref = ((x[:, None] * hasher.a + hasher.b) % np.uint64(dedup.PRIME)).min(axis=0)
    np.testing.assert_array_equal(together[2], ref.astype(np.uint32))


def test_union_find_and_large_buckets():
    pairs = np.array([[0, 1], [2, 3], [1, 3], [5, 6]])
    assert dedup.clusters_from_pairs(pairs) == [[0, 1, 2, 3], [5, 6]]
    # 100 identical signatures: a bucket over the all-pairs limit still forms one cluster
    sig = np.tile(np.arange(dedup.NUM_PERM, dtype=np.uint32), (100, 1))
    pairs = dedup.candidate_pairs(sig, 22, 10)
    assert len(pairs) < 100 * 99 // 2
    assert dedup.clusters_from_pairs(pairs) == [list(range(100))]


def test_find_extremes_keeps_dissimilar_members_of_a_chain():
    a = " ".join(f"t{i}" for i in range(100))
    b = " ".join(f"t{i}" for i in range(10, 110))  # J(a, b) = 90/110 = 0.82 < 0.85: both kept
    c = " ".join(f"t{i}" for i in range(2, 100))  # J(a, c) = 0.98: a copy of a
    info = dedup.find_extremes([[0, 1, 2]], [a, b, c], 0.85)
    assert [e["is_extreme"] for e in info[0]] == [True, True, False]
    assert info[0][0]["copies"] == 2 and info[0][1]["copies"] == 1


def test_recall_and_precision_on_planted_near_duplicates():
    rng = random.Random(42)
    vocab = [f"name_{i}" for i in range(40000)]
    texts, family = [], []
    n = 150
    for fam in range(40):
        base = _random_doc(rng, vocab, n)
        # variants at target similarities to the base: J = (n - k) / (n + k) for k replaced tokens
        for target in (1.0, 0.98, 0.95, 0.92, 0.9, 0.87, 0.8, 0.7, 0.6, 0.5):
            k = round(n * (1 - target) / (1 + target))
            tokens = base[k:] + _random_doc(rng, vocab, k)
            rng.shuffle(tokens)
            texts.append("def f():\n" + "\n".join(f"    {t} = {t}.x" for t in tokens))  # "x" is shared by all
            family.append(fam)
    order = list(range(len(texts)))
    rng.shuffle(order)  # planted duplicates are scattered through the corpus
    texts = [texts[i] for i in order]
    family = [family[i] for i in order]

    sig, exempt = dedup.MinHasher(seed=0).signatures(texts)
    clusters, edges = dedup.make_duplicate_clusters(sig, exempt, 0.85)
    cluster_of = {i: c for c, members in enumerate(clusters) for i in members}
    token_sets = [dedup.get_tokens(t) for t in texts]
    jac = lambda i, j: len(token_sets[i] & token_sets[j]) / len(token_sets[i] | token_sets[j])

    high = [(i, j) for i, j in itertools.combinations(range(len(texts)), 2)
            if family[i] == family[j] and jac(i, j) > 0.9]
    found = sum(1 for i, j in high if i in cluster_of and cluster_of.get(i) == cluster_of.get(j))
    assert len(high) > 200
    assert found / len(high) >= 0.95, (found, len(high))
    # precision: no merge decision (verified edge) between files below 0.7, no cluster across families
    assert len(edges) and min(jac(i, j) for i, j in edges.tolist()) >= 0.7
    assert all(len({family[i] for i in members}) == 1 for members in clusters)
    # removals: each dropped file has exact similarity >= threshold with a kept member of its cluster
    info = dedup.find_extremes(clusters, texts, 0.85)
    for elements in info:
        kept = [e["base_index"] for e in elements if e["is_extreme"]]
        for e in elements:
            if not e["is_extreme"]:
                assert max(jac(e["base_index"], k) for k in kept) >= 0.85
    keep, _ = dedup.deduplicate(texts)
    assert len(texts) - len(keep) == sum(not e["is_extreme"] for c in info for e in c) > 40 * 3
