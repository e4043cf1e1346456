"""Diversity selection (Sam et al. 2025) at scale, and its agreement with exact average linkage.

    python -m benchmarks.diversity [--points 1000000] [--dim 64] [--budget 0.1] [--sample 20000]

Data (`make_data`): `--clusters` Gaussian clusters on the unit sphere in `dim` dimensions, with
uniformly random centres, log-normal sizes (sigma 1) and spreads drawn log-uniformly so that the
mean within-cluster cosine distance lies in [0.05, 0.5], plus a fraction `--background` of
uniformly random directions; rows are L2-normalised and shuffled, all from `--seed`.

1. `similarity.threshold_diverse` on all points at k = budget * N, timed end to end (k-nearest-
   neighbour graph by ScaNN, RAC average linkage, the cut at k clusters, the representatives).
2. On a seeded sample of `--sample` rows: the same graph clustering, cut at k = budget * sample
   (its threshold epsilon), against scipy's exact average linkage of all pairwise cosine
   distances cut at the same epsilon: the adjusted Rand index of the two partitions, and both
   run times side by side.

Prints one JSON line per measurement, then a summary object (`points`, `dim`, `seconds`,
`ari_vs_exact`, the thresholds and cluster counts).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import pdist

from benchmarks.common import emit
from jaxsel import linkage, similarity


def make_data(n: int, dim: int, clusters: int, background: float, seed: int) -> np.ndarray:
    """`x_NxD` float32 unit rows: the mixture described in the module docstring."""
    rng = np.random.default_rng(seed)
    centres_CxD = rng.standard_normal((clusters, dim))
    centres_CxD /= np.linalg.norm(centres_CxD, axis=1, keepdims=True)
    num_background = int(round(background * n))
    weights_C = rng.lognormal(0.0, 1.0, clusters)
    sizes_C = rng.multinomial(n - num_background, weights_C / weights_C.sum())
    # A unit centre plus N(0, s^2 I) noise: cosine distance between two members ~ s^2 * dim.
    spread_C = np.sqrt(np.exp(rng.uniform(np.log(0.05), np.log(0.5), clusters)) / dim)
    labels = np.repeat(np.arange(clusters), sizes_C)
    x_NxD = np.empty((n, dim), np.float32)
    for start in range(0, len(labels), 1 << 18):  # in blocks: no float64 N x d array
        block = labels[start : start + (1 << 18)]
        x_NxD[start : start + len(block)] = centres_CxD[block] + spread_C[block, None] * \
            rng.standard_normal((len(block), dim))
    x_NxD[len(labels):] = rng.standard_normal((num_background, dim))
    x_NxD /= np.linalg.norm(x_NxD, axis=1, keepdims=True)
    return x_NxD[rng.permutation(n)]


def adjusted_rand_index(a_N, b_N) -> float:
    """Hubert and Arabie's ARI of two labellings, from their contingency table."""
    _, a_N = np.unique(a_N, return_inverse=True)
    _, b_N = np.unique(b_N, return_inverse=True)
    cells = np.unique(a_N.astype(np.int64) * (b_N.max() + 1) + b_N, return_counts=True)[1]

    def pairs(counts):
        counts = np.asarray(counts, np.float64)
        return float(np.sum(counts * (counts - 1) / 2))

    both, in_a, in_b = pairs(cells), pairs(np.bincount(a_N)), pairs(np.bincount(b_N))
    expected = in_a * in_b / pairs([len(a_N)])
    return (both - expected) / ((in_a + in_b) / 2 - expected)


def bench_full(x_NxD, k: int, num_neighbors: int, missing: float, scann: dict):
    start = time.perf_counter()
    selection = similarity.threshold_diverse(x_NxD, k, num_neighbors, missing, scann, progress=True)
    seconds = time.perf_counter() - start
    return emit({"method": "threshold_diverse", "points": len(x_NxD), "k": k,
                 "seconds": seconds, "selected": len(selection), **selection.params})


def bench_sample(x_NxD, k: int, num_neighbors: int, missing: float, scann: dict):
    start = time.perf_counter()
    edges = linkage.knn_graph(x_NxD, num_neighbors, scann)
    labels, epsilon = linkage.rac(len(x_NxD), *edges, missing).labels_for(k)
    ours_s = time.perf_counter() - start
    coverage = linkage.pair_coverage(labels, *edges[:2])
    start = time.perf_counter()
    exact = hierarchy.linkage(pdist(x_NxD.astype(np.float64), "cosine"), "average")
    exact_s = time.perf_counter() - start
    at_epsilon = hierarchy.fcluster(exact, epsilon, "distance")
    at_k = hierarchy.fcluster(exact, k, "maxclust")
    return emit({"method": "sample_vs_exact", "points": len(x_NxD), "k": k, "epsilon": epsilon,
                 "clusters": int(labels.max()) + 1, "exact_clusters": int(at_epsilon.max()),
                 "pair_coverage": coverage,
                 "ari_vs_exact": adjusted_rand_index(labels, at_epsilon),
                 "ari_vs_exact_at_k": adjusted_rand_index(labels, at_k),
                 "seconds": ours_s, "exact_seconds": exact_s, "speedup": exact_s / ours_s})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--background", type=float, default=0.01)
    parser.add_argument("--budget", type=float, default=0.1, help="fraction selected")
    parser.add_argument("--num_neighbors", type=int, default=64)
    parser.add_argument("--missing_distance", type=float, default=1.0)
    parser.add_argument("--leaves_to_search", type=int, default=0, help="0: scann_params'")
    parser.add_argument("--reorder", type=int, default=0, help="0: scann_params'")
    parser.add_argument("--sample", type=int, default=20_000, help="0 skips the exact check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scann = {key: value for key in ("leaves_to_search", "reorder")
             if (value := getattr(args, key))}

    x_NxD = make_data(args.points, args.dim, args.clusters, args.background, args.seed)
    emit({"data": "gaussian clusters on the sphere + background", "points": args.points,
          "dim": args.dim, "clusters": args.clusters, "background": args.background,
          "cpus": os.cpu_count(), "load_average": os.getloadavg()[0]})
    full = bench_full(x_NxD, max(1, round(args.budget * args.points)), args.num_neighbors,
                      args.missing_distance, scann)
    sample = {}
    if args.sample:
        rows = np.sort(np.random.default_rng(args.seed + 1).choice(
            args.points, min(args.sample, args.points), replace=False))
        sample = bench_sample(x_NxD[rows], max(1, round(args.budget * len(rows))),
                              args.num_neighbors, args.missing_distance, scann)
    emit({
        "summary": "diversity",
        "points": args.points,
        "dim": args.dim,
        "seconds": full["seconds"],
        "selected": full["selected"],
        "epsilon": full["epsilon"],
        "num_clusters": full["num_clusters"],
        "num_edges": full["num_edges"],
        "pair_coverage": full["pair_coverage"],
        "num_neighbors": args.num_neighbors,
        "missing_distance": args.missing_distance,
        "scann_overrides": scann,
        "ari_vs_exact": sample.get("ari_vs_exact"),
        "sample_points": sample.get("points"),
        "sample_epsilon": sample.get("epsilon"),
        "sample_clusters": sample.get("clusters"),
        "sample_exact_clusters": sample.get("exact_clusters"),
        "sample_pair_coverage": sample.get("pair_coverage"),
        "sample_speedup_vs_exact": sample.get("speedup"),
        "load_average_end": os.getloadavg()[0],
    })


if __name__ == "__main__":
    main()
