"""Tests of jaxsel.select and jaxsel.similarity against independent computations: exact
Plackett-Luce probabilities, numpy sorts, a hand-computed water-filling, and brute-force O(N^2)
dedup and nearest search."""

import dataclasses
import itertools
import json
import math
import os
import re

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from jaxsel import report, select, similarity

# ----------------------------------------------------------------------------- references


def plackett_luce_pair_probs(weights):
    """P(first = i, second = j) = w_i / W * w_j / (W - w_i), for every ordered pair i != j."""
    total = sum(weights)
    return {(i, j): weights[i] / total * weights[j] / (total - weights[i])
            for i, j in itertools.permutations(range(len(weights)), 2)}


def brute_cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))


def brute_dedup(emb, threshold, order):
    """The greedy by definition: visit rows in order, keep one unless a kept row is similar."""
    cos = brute_cosines(emb, emb)
    kept = []
    for row in order:
        if not any(cos[row, other] >= threshold for other in kept):
            kept.append(row)
    return np.sort(kept)


def brute_level(sizes, k):
    """The largest L with sum(min(size, L)) <= k, found by counting up."""
    level = 0
    while level < max(sizes) and sum(min(s, level + 1) for s in sizes) <= k:
        level += 1
    return level


def counts_by_label(selection, labels):
    chosen = np.asarray(labels)[selection.ids]
    return {int(c): int(np.sum(chosen == c)) for c in np.unique(labels)}


def chisquare_p(observed, probs):
    observed = np.asarray(observed, np.float64)
    return scipy_stats.chisquare(observed, np.asarray(probs) * observed.sum()).pvalue


# ----------------------------------------------------------------------------- gumbel_top_k


def test_gumbel_top_k_samples_plackett_luce():
    scores = [0.3, -0.5, 1.2, 0.0, 0.8]
    temperature, draws = 0.7, 20_000
    probs = plackett_luce_pair_probs([math.exp(-s / temperature) for s in scores])
    counts = dict.fromkeys(probs, 0)
    for seed in range(draws):
        selection = select.gumbel_top_k(scores, 2, seed, temperature)
        counts[tuple(selection.ids.tolist())] += 1
    pairs = sorted(probs)
    p = chisquare_p([counts[pair] for pair in pairs], [probs[pair] for pair in pairs])
    assert p > 1e-3, f"ordered pairs do not follow Plackett-Luce (p={p:.2g})"
    # The most likely pair is the two lowest scores in order (weights exp(-s/T): lower is better).
    assert max(counts, key=counts.get) == (1, 3)


def test_gumbel_top_k_records_scores_and_params():
    scores = np.random.default_rng(0).standard_normal(50)
    selection = select.gumbel_top_k(scores, 7, seed=3, temperature=0.5)
    assert selection.method == "gumbel_top_k" and selection.pool_size == 50
    assert selection.params == dict(k=7, seed=3, temperature=0.5, lower_is_better=True)
    np.testing.assert_array_equal(selection.scores, scores[selection.ids].astype(np.float32))
    assert selection.ids.dtype == np.int64 and len(np.unique(selection.ids)) == 7


@pytest.mark.parametrize("lower_is_better", [True, False])
def test_gumbel_top_k_at_tiny_temperature_is_top_k(lower_is_better):
    scores = np.random.default_rng(1).permutation(300) * 0.01  # distinct, gaps of 0.01
    expected = select.top_k(scores, 20, lower_is_better).ids
    for seed in range(5):
        selection = select.gumbel_top_k(scores, 20, seed, 1e-6, lower_is_better)
        np.testing.assert_array_equal(selection.ids, expected)


def test_gumbel_top_k_is_seeded():
    scores = np.random.default_rng(2).standard_normal(1000)
    a, b = (select.gumbel_top_k(scores, 50, seed=7) for _ in range(2))
    np.testing.assert_array_equal(a.ids, b.ids)
    assert not np.array_equal(a.ids, select.gumbel_top_k(scores, 50, seed=8).ids)


def test_gumbel_top_k_higher_is_better_mirrors_negated_scores():
    scores = np.random.default_rng(3).standard_normal(200)
    for seed in range(5):
        higher = select.gumbel_top_k(scores, 30, seed, 0.8, lower_is_better=False)
        lower = select.gumbel_top_k(-scores, 30, seed, 0.8, lower_is_better=True)
        np.testing.assert_array_equal(higher.ids, lower.ids)


# ----------------------------------------------------------------------------- top_k, random


@pytest.mark.parametrize("lower_is_better", [True, False])
def test_top_k_matches_numpy_sort_with_ties_to_lower_id(lower_is_better):
    scores = np.random.default_rng(4).integers(0, 20, size=500).astype(np.float32)  # many ties
    selection = select.top_k(scores, 60, lower_is_better)
    key = scores if lower_is_better else -scores
    expected = np.lexsort((np.arange(500), key))[:60]  # by score, then by id
    np.testing.assert_array_equal(selection.ids, expected)
    np.testing.assert_array_equal(selection.scores, scores[expected])
    assert selection.params == dict(k=60, lower_is_better=lower_is_better)


def test_random_ids_are_distinct_in_range_and_seeded():
    selection = select.random_ids(1000, 100, seed=5)
    assert selection.ids.dtype == np.int64 and selection.ids.shape == (100,)
    assert len(set(selection.ids.tolist())) == 100
    assert selection.ids.min() >= 0 and selection.ids.max() < 1000
    assert selection.scores is None and selection.params == dict(k=100, seed=5)
    np.testing.assert_array_equal(selection.ids, select.random_ids(1000, 100, seed=5).ids)
    assert not np.array_equal(selection.ids, select.random_ids(1000, 100, seed=6).ids)
    np.testing.assert_array_equal(np.sort(select.random_ids(30, 30, 0).ids), np.arange(30))


def test_random_ids_are_uniform_over_ordered_pairs():
    pairs = list(itertools.permutations(range(6), 2))
    counts = dict.fromkeys(pairs, 0)
    for seed in range(3000):
        counts[tuple(select.random_ids(6, 2, seed).ids.tolist())] += 1
    p = chisquare_p([counts[pair] for pair in pairs], [1 / len(pairs)] * len(pairs))
    assert p > 1e-3, f"random_ids is not uniform (p={p:.2g})"


# ----------------------------------------------------------------------------- cluster_stratified


def labelled(sizes_by_label, seed=0):
    """Shuffled cluster labels with the given size per label."""
    labels = np.concatenate([[c] * s for c, s in sizes_by_label.items()])
    return np.random.default_rng(seed).permutation(labels)


def test_cluster_stratified_hand_computed_water_filling():
    # Sizes 2, 10, 5, 7 and k = 16: the size-2 cluster gives both members; 14 remain for three
    # clusters, so the level is 4 (12 units) and 2 leftover units go to two of the three.
    labels = labelled({7: 2, -1: 10, 4: 5, 12: 7})
    short_of_leftover = set()
    for seed in range(40):
        counts = counts_by_label(select.cluster_stratified(labels, 16, seed), labels)
        assert counts[7] == 2
        assert sorted(counts[c] for c in (-1, 4, 12)) == [4, 5, 5]
        short_of_leftover |= {c for c in (-1, 4, 12) if counts[c] == 4}
    assert short_of_leftover == {-1, 4, 12}, "leftover units must go in a seeded random order"
    # Sizes 1, 1, 20, 3 and k = 10: 1 + 1, then level 4 > 3 takes all 3, then 5 from the 20.
    labels = labelled({0: 1, 1: 1, 2: 20, 3: 3}, seed=1)
    for seed in range(5):
        counts = counts_by_label(select.cluster_stratified(labels, 10, seed), labels)
        assert counts == {0: 1, 1: 1, 2: 5, 3: 3}


def test_cluster_stratified_allocation_is_water_filling():
    rng = np.random.default_rng(6)
    for trial in range(30):
        sizes = rng.integers(1, 30, size=rng.integers(1, 12)).tolist()
        labels = labelled(dict(enumerate(sizes)), seed=trial)
        k = int(rng.integers(1, len(labels) + 1))
        selection = select.cluster_stratified(labels, k, seed=trial)
        level = brute_level(sizes, k)
        counts = counts_by_label(selection, labels)
        extra = [counts[c] - min(s, level) for c, s in enumerate(sizes)]
        assert sum(counts.values()) == k == len(selection)
        assert all(e in (0, 1) for e in extra)
        assert all(e == 0 for e, s in zip(extra, sizes, strict=True) if s <= level)
        assert selection.params["level"] == level


@pytest.mark.parametrize("lower_is_better", [True, False])
def test_cluster_stratified_takes_the_best_scored_members(lower_is_better):
    rng = np.random.default_rng(7)
    labels = labelled({0: 30, 1: 4, 2: 12, 3: 25}, seed=2)
    scores = rng.integers(0, 8, size=len(labels)).astype(np.float64)  # ties: go to lower id
    selection = select.cluster_stratified(labels, 30, 0, scores, lower_is_better)
    counts = counts_by_label(selection, labels)
    expected = []
    for c in range(4):
        members = np.flatnonzero(labels == c)
        key = scores[members] if lower_is_better else -scores[members]
        expected += members[np.lexsort((members, key))][: counts[c]].tolist()
    np.testing.assert_array_equal(selection.ids, expected)
    np.testing.assert_array_equal(selection.scores, scores[expected])
    assert counts[1] == 4 and sorted(counts.values()) == [4, 8, 9, 9]  # level 8, 2 leftover


def test_cluster_stratified_without_scores_is_a_seeded_uniform_sample():
    labels = labelled({0: 40, 1: 35, 2: 3}, seed=3)
    a, b = (select.cluster_stratified(labels, 20, seed=11) for _ in range(2))
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.scores is None
    assert not np.array_equal(a.ids, select.cluster_stratified(labels, 20, seed=12).ids)
    np.testing.assert_array_equal(np.sort(select.cluster_stratified(labels, 78, 0).ids),
                                  np.arange(78))
    # Sizes 2 and 6, k = 4: both of the first, and a uniform 2 of the 6 others (15 pairs).
    labels = np.array([0, 1, 1, 0, 1, 1, 1, 1])
    second = np.flatnonzero(labels == 1)
    pairs = list(itertools.combinations(second.tolist(), 2))
    counts = dict.fromkeys(pairs, 0)
    for seed in range(3000):
        ids = select.cluster_stratified(labels, 4, seed).ids.tolist()
        assert {0, 3} <= set(ids)
        counts[tuple(sorted(set(ids) - {0, 3}))] += 1
    p = chisquare_p([counts[pair] for pair in pairs], [1 / len(pairs)] * len(pairs))
    assert p > 1e-3, f"within-cluster sample is not uniform (p={p:.2g})"



# ----------------------------------------------------------------------------- threshold_diverse


def nearest_to_centroids(emb, labels):
    """Each cluster's member nearest (float64 squared L2) the mean of its unit rows; ties (within
    1e-12: a two-member cluster's pair) to the lower id."""
    unit = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float64)
    reps = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        d2 = ((unit[members] - unit[members].mean(0)) ** 2).sum(1)
        reps[c] = members[d2 <= d2.min() + 1e-12][0]
    return reps


def test_threshold_diverse_takes_each_clusters_most_central_member():
    rng = np.random.default_rng(21)
    centres = rng.standard_normal((10, 6))
    emb = (centres[rng.integers(10, size=240)] + 0.6 * rng.standard_normal((240, 6))).astype(
        np.float32) * rng.uniform(0.5, 3, size=(240, 1)).astype(np.float32)  # any row norms
    z = linkage(pdist(emb.astype(np.float64), "cosine"), "average")
    selection = similarity.threshold_diverse(emb, 25, num_neighbors=239, missing_distance=2.0)
    labels = fcluster(z, 25, "maxclust")  # exact average linkage cut into 25 clusters
    reps = nearest_to_centroids(emb, labels)
    assert selection.method == "threshold_diverse" and len(selection) == 25
    assert sorted(selection.ids.tolist()) == sorted(reps.values())
    sizes = {reps[c]: np.sum(labels == c) for c in reps}
    np.testing.assert_array_equal(selection.scores, [sizes[i] for i in selection.ids])
    assert np.all(np.diff(selection.scores) <= 0), "largest cluster first"
    assert selection.params["epsilon"] == pytest.approx(np.sort(z[:, 2])[240 - 25 - 1], abs=1e-9)
    assert selection.params["num_clusters"] == 25 and selection.params["pair_coverage"] == 1.0


def test_threshold_diverse_on_a_disconnected_graph_takes_the_largest_clusters():
    rng = np.random.default_rng(22)
    # Four far-apart groups of sizes 9, 12, 7, 12 (rows shuffled): with 4 neighbours the graph
    # has four components, so at most 36 merges and never fewer than 4 clusters.
    sizes, perm = (9, 12, 7, 12), rng.permutation(40)
    groups = np.repeat(np.arange(4), sizes)[perm]
    emb = (20 * np.eye(6)[groups] + rng.standard_normal((40, 6))).astype(np.float32)
    reps = nearest_to_centroids(emb, groups)
    order = sorted(range(4), key=lambda g: (-sizes[g], np.flatnonzero(groups == g)[0]))
    cos = brute_cosines(emb, emb) - 2 * np.eye(40)
    near = np.argsort(-cos, axis=1)[:, :4]
    edges = {(min(i, j), max(i, j)) for i in range(40) for j in near[i]}
    within = sum(groups[i] == groups[j] for i, j in edges) / sum(s * (s - 1) / 2 for s in sizes)
    for k in (1, 2, 3, 4):
        selection = similarity.threshold_diverse(emb, k, num_neighbors=4)
        assert selection.ids.tolist() == [reps[g] for g in order[:k]]
        assert selection.params["num_clusters"] == 4
        assert selection.params["pair_coverage"] == pytest.approx(within)
    assert len(similarity.threshold_diverse(emb, 5, num_neighbors=4)) == 5  # a group splits


# ----------------------------------------------------------------------------- dedup


@pytest.fixture(scope="module")
def planted():
    """300 rows in d=16: 150 random rows and 150 noisy copies of 50 of them, rows scaled at
    random (cosine ignores scale); copies land on both sides of the threshold 0.95."""
    rng = np.random.default_rng(8)
    base = rng.standard_normal((150, 16))
    parents = rng.integers(0, 50, size=150)
    sigma = rng.uniform(0.05, 0.5, size=(150, 1))
    copies = base[parents] + sigma * rng.standard_normal((150, 16))
    emb = np.concatenate([base, copies]) * rng.uniform(0.5, 3.0, size=(300, 1))
    return rng.permutation(emb).astype(np.float32)


def test_dedup_equals_brute_force_greedy(planted):
    threshold = 0.95
    cos = brute_cosines(planted, planted)
    off_diagonal = cos[~np.eye(len(cos), dtype=bool)]
    assert np.abs(off_diagonal - threshold).min() > 1e-5, "test data too close to the threshold"
    assert ((cos >= threshold).sum(axis=1) - 1).max() <= 16, "groups must fit num_neighbors"
    for order in (np.arange(300), np.random.default_rng(9).permutation(300)):
        kept = similarity.dedup(planted, threshold, order)
        expected = brute_dedup(planted, threshold, order)
        np.testing.assert_array_equal(kept, expected)
        assert 150 < len(kept) < 300  # some copies are removed, some are far enough to stay


def test_dedup_large_group_stays_sound_and_is_exact_with_enough_neighbours():
    rng = np.random.default_rng(10)
    group = rng.standard_normal(16) + 0.02 * rng.standard_normal((40, 16))
    emb = rng.permutation(np.concatenate([group, rng.standard_normal((60, 16))])).astype(
        np.float32)
    threshold, order = 0.9, rng.permutation(100)
    rank = np.argsort(order)
    kept = similarity.dedup(emb, threshold, order, num_neighbors=4)
    cos = brute_cosines(emb, emb)
    for row in sorted(set(range(100)) - set(kept.tolist())):  # every drop is justified
        assert any(cos[row, other] >= threshold and rank[other] < rank[row] for other in kept)
    np.testing.assert_array_equal(similarity.dedup(emb, threshold, order, num_neighbors=99),
                                  brute_dedup(emb, threshold, order))


def test_dedup_threshold_one_removes_identical_rows():
    rng = np.random.default_rng(11)
    distinct = rng.standard_normal((40, 8)).astype(np.float32)
    emb = distinct[rng.integers(0, 40, size=120)]
    order = rng.permutation(120)
    kept = similarity.dedup(emb, 1.0, order)
    _, first_in_order = np.unique(emb[order], axis=0, return_index=True)
    np.testing.assert_array_equal(kept, np.sort(order[first_in_order]))


# ----------------------------------------------------------------------------- nearest_to_target


def test_nearest_to_target_matches_brute_force():
    rng = np.random.default_rng(12)
    pool = (rng.standard_normal((400, 16)) * rng.uniform(0.2, 5, (400, 1))).astype(np.float32)
    target = rng.standard_normal((7, 16)).astype(np.float32)
    selection = similarity.nearest_to_target(pool, target, 25, query_batch=64)
    best = brute_cosines(pool, target).max(axis=1)
    expected = np.lexsort((np.arange(400), -best))[:25]
    assert np.sort(best)[::-1][24] - np.sort(best)[::-1][25] > 1e-6, "ambiguous k-th place"
    np.testing.assert_array_equal(selection.ids, expected)
    np.testing.assert_allclose(selection.scores, best[expected], rtol=1e-6)
    assert selection.method == "nearest_to_target" and selection.pool_size == 400
    assert selection.params == dict(k=25, num_targets=7)


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("make", [
    lambda: select.gumbel_top_k(np.random.default_rng(0).standard_normal(100), 10, 1),
    lambda: select.random_ids(100, 10, 2),
    lambda: select.cluster_stratified(np.arange(100) % 7, 10, 3),
    lambda: similarity.threshold_diverse(np.random.default_rng(4).standard_normal((50, 3)), 5),
])
def test_selection_save_load_round_trip(tmp_path, make):
    selection = make()
    path = tmp_path / "selection.json"
    selection.save(path)
    assert os.listdir(tmp_path) == ["selection.json"]  # the temp file was renamed
    raw = report.read_json(str(path))
    assert set(raw) == {"ids", "method", "pool_size", "params", "scores"}
    assert raw["ids"] == selection.ids.tolist() and all(type(i) is int for i in raw["ids"])
    loaded = select.Selection.load(path)
    np.testing.assert_array_equal(loaded.ids, selection.ids)
    assert (loaded.method, loaded.pool_size, loaded.params) == (
        selection.method, selection.pool_size, selection.params)
    if selection.scores is None:
        assert loaded.scores is None
    else:
        np.testing.assert_array_equal(loaded.scores, selection.scores)  # float32 exact


def test_selection_is_immutable_and_normalises_params():
    selection = select.Selection(np.array([3, 1]), "manual", 5, dict(seed=np.int64(4)))
    assert selection.params == {"seed": 4} and type(selection.params["seed"]) is int
    with pytest.raises(ValueError):
        selection.ids[0] = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        selection.method = "other"


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps(dict(ids=[0, 1], method="m", pool_size=5, params={})), "missing keys"),
    (json.dumps(dict(ids=[0, 5], method="m", pool_size=5, params={}, scores=None)),
     r"pool_size=5"),
    (json.dumps(dict(ids=[0, -1], method="m", pool_size=5, params={}, scores=None)),
     r"pool_size=5"),
    (json.dumps(dict(ids=[2, 2], method="m", pool_size=5, params={}, scores=None)), "unique"),
    (json.dumps(dict(ids=[0.5], method="m", pool_size=5, params={}, scores=None)), "ints"),
    (json.dumps(dict(ids=[0], method="m", pool_size=5, params={}, scores=[1.0, 2.0])),
     "scores"),
])
def test_selection_load_rejects_bad_files_naming_them(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + problem):
        select.Selection.load(path)


# ----------------------------------------------------------------------------- bad input


EMB = np.random.default_rng(13).standard_normal((10, 4)).astype(np.float32)
ZERO_ROW = np.vstack([EMB[:3], np.zeros((1, 4), np.float32)])
NAN_ROW = np.vstack([EMB[:3], np.full((1, 4), np.nan, np.float32)])

BAD_INPUTS = {
    "random k=0": (lambda: select.random_ids(10, 0, 0), r"k must be in \[1, 10\], got 0"),
    "random k>N": (lambda: select.random_ids(10, 11, 0), r"k must be in \[1, 10\], got 11"),
    "random pool": (lambda: select.random_ids(0, 1, 0), "pool_size"),
    "random seed": (lambda: select.random_ids(10, 2, -1), "seed"),
    "top_k empty": (lambda: select.top_k([], 1), "scores_N"),
    "top_k 2-D": (lambda: select.top_k([[1.0, 2.0]], 1), "scores_N"),
    "top_k nan": (lambda: select.top_k([1.0, np.nan], 1), "scores_N"),
    "top_k text": (lambda: select.top_k(["a", "b"], 1), "scores_N"),
    "top_k k>N": (lambda: select.top_k([1.0, 2.0], 3), r"k must be in \[1, 2\], got 3"),
    "gumbel T=0": (lambda: select.gumbel_top_k([1.0, 2.0], 1, 0, 0.0), "temperature"),
    "gumbel T<0": (lambda: select.gumbel_top_k([1.0, 2.0], 1, 0, -1.0), "temperature"),
    "gumbel T=nan": (lambda: select.gumbel_top_k([1.0, 2.0], 1, 0, np.nan), "temperature"),
    "gumbel T=inf": (lambda: select.gumbel_top_k([1.0, 2.0], 1, 0, np.inf), "temperature"),
    "gumbel overflow": (lambda: select.gumbel_top_k([1e300, 0.0], 1, 0, 1e-300), "temperature"),
    "gumbel inf score": (lambda: select.gumbel_top_k([1.0, np.inf], 1, 0), "scores_N"),
    "gumbel k=0": (lambda: select.gumbel_top_k([1.0, 2.0], 0, 0), r"k must be in \[1, 2\]"),
    "cluster empty": (lambda: select.cluster_stratified([], 1, 0), "cluster_ids_N"),
    "cluster float": (lambda: select.cluster_stratified([0.5, 1.0], 1, 0), "cluster_ids_N"),
    "cluster k>N": (lambda: select.cluster_stratified([0, 1, 1], 4, 0), r"k must be in \[1, 3\]"),
    "cluster scores shape": (lambda: select.cluster_stratified([0, 1, 1], 2, 0, [1.0, 2.0]),
                             "scores_N"),
    "cluster scores nan": (lambda: select.cluster_stratified([0, 1], 1, 0, [1.0, np.nan]),
                           "scores_N"),
    "dedup empty": (lambda: similarity.dedup(np.zeros((0, 4)), 0.9), "emb_NxD"),
    "dedup zero row": (lambda: similarity.dedup(ZERO_ROW, 0.9), "emb_NxD"),
    "dedup nan row": (lambda: similarity.dedup(NAN_ROW, 0.9), "emb_NxD"),
    "dedup threshold>1": (lambda: similarity.dedup(EMB, 1.5), "threshold"),
    "dedup threshold=-1": (lambda: similarity.dedup(EMB, -1.0), "threshold"),
    "dedup threshold nan": (lambda: similarity.dedup(EMB, np.nan), "threshold"),
    "dedup order repeat": (lambda: similarity.dedup(EMB, 0.9, [0] * 10), "order_N"),
    "dedup order length": (lambda: similarity.dedup(EMB, 0.9, np.arange(9)), "order_N"),
    "dedup neighbours": (lambda: similarity.dedup(EMB, 0.9, num_neighbors=0), "num_neighbors"),
    "nearest dims": (lambda: similarity.nearest_to_target(EMB, EMB[:, :3], 2), "target_TxD"),
    "nearest empty target": (lambda: similarity.nearest_to_target(EMB, np.zeros((0, 4)), 2),
                             "target_TxD"),
    "nearest k=0": (lambda: similarity.nearest_to_target(EMB, EMB[:2], 0),
                    r"k must be in \[1, 10\]"),
    "diverse empty": (lambda: similarity.threshold_diverse(np.zeros((0, 4)), 1), "emb_NxD"),
    "diverse nan row": (lambda: similarity.threshold_diverse(NAN_ROW, 2), "emb_NxD"),
    "diverse zero row": (lambda: similarity.threshold_diverse(ZERO_ROW, 2), "emb_NxD"),
    "diverse k=0": (lambda: similarity.threshold_diverse(EMB, 0),
                    r"k must be in \[1, 10\], got 0"),
    "diverse k>N": (lambda: similarity.threshold_diverse(EMB, 11),
                    r"k must be in \[1, 10\], got 11"),
    "diverse neighbours": (lambda: similarity.threshold_diverse(EMB, 2, num_neighbors=0),
                           "num_neighbors"),
    "diverse missing": (lambda: similarity.threshold_diverse(EMB, 2, missing_distance=-1.0),
                        "missing_distance"),
    "selection repeats": (lambda: select.Selection([0, 0], "m", 5, {}), "ids must be unique"),
    "selection range": (lambda: select.Selection([5], "m", 5, {}), "pool_size=5"),
    "selection empty": (lambda: select.Selection([], "m", 5, {}), "ids"),
    "selection scores": (lambda: select.Selection([0, 1], "m", 5, {}, [1.0]), "scores"),
    "selection params": (lambda: select.Selection([0], "m", 5, {"f": object()}), "params"),
    "selection method": (lambda: select.Selection([0], "", 5, {}), "method"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(name):
    call, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        call()


def test_score_selectors_read_memory_mapped_scores_in_chunks(tmp_path):
    """10M memory-mapped scores: top-k and Gumbel-top-k give the same ids for every chunk size
    (and as the scores held in memory), without a second full copy in memory."""
    import tracemalloc

    n, k = 10_000_000, 1000
    path = tmp_path / "scores.npy"
    scores = np.lib.format.open_memmap(path, "w+", np.float32, (n,))
    for start in range(0, n, 1 << 21):
        rows = slice(start, start + (1 << 21))
        scores[rows] = np.random.default_rng(start).standard_normal(len(scores[rows]))
    scores.flush()
    mapped = np.load(path, mmap_mode="r")
    for select_fn in (lambda x, c: select.top_k(x, k, chunk_rows=c),
                      lambda x, c: select.gumbel_top_k(x, k, seed=3, temperature=0.5,
                                                       chunk_rows=c)):
        tracemalloc.start()
        chosen = select_fn(mapped, 1 << 18)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 16 * 2**20, peak  # A full float64 copy would be 80 MB.
        for chunk in (1 << 16, 3_000_001, n):
            assert np.array_equal(select_fn(mapped, chunk).ids, chosen.ids)
    in_memory = np.asarray(mapped)
    assert np.array_equal(select.top_k(mapped, k).ids, np.argsort(in_memory, kind="stable")[:k])


def test_nearest_to_target_reads_memory_mapped_rows_in_chunks(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "emb.npy"
    emb = np.lib.format.open_memmap(path, "w+", np.float32, (5000, 8))
    emb[:] = rng.standard_normal((5000, 8))
    emb.flush()
    mapped, target = np.load(path, mmap_mode="r"), rng.standard_normal((7, 8))
    whole = similarity.nearest_to_target(np.asarray(mapped), target, 300, chunk_rows=5000)
    for chunk in (64, 999):
        chosen = similarity.nearest_to_target(mapped, target, 300, chunk_rows=chunk)
        assert np.array_equal(chosen.ids, whole.ids)
        np.testing.assert_array_equal(chosen.scores, whole.scores)
    bad = np.array(mapped)
    bad[3001] = 0.0
    with pytest.raises(ValueError, match=r"emb_NxD has 1 all-zero rows, e.g. rows \[3001\]"):
        similarity.nearest_to_target(bad, target, 3, chunk_rows=1000)
