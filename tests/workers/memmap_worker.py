"""Runs the embedding selectors over a memory-mapped `[N, D]` float32 array and prints, as JSON,
the peak growth of this process's anonymous memory (RssAnon, sampled every 2 ms) during each:
what it holds besides the file's pages. `tests/test_cluster.py` runs it in a process of its own.

Usage: python -m tests.workers.memmap_worker PATH N D
"""

import json
import re
import sys
import threading
import time

import numpy as np

from jaxsel import cluster, embed, search, similarity


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+) kB", f.read()).group(1)) * 1024


def peak_growth(fn) -> int:
    """Peak RssAnon during `fn()` above what it was before."""
    base, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    fn()
    done.set()
    thread.join()
    return max(peak[0], rss_anon()) - base


def main():
    path, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    embed.CHUNK_BYTES = 1 << 20  # Chunks of 1 MB: what they hold is then far below one copy.
    points = np.lib.format.open_memmap(path, "w+", np.float32, (n, d))
    rng = np.random.default_rng(0)
    for start in range(0, n, 65536):
        centres = rng.normal(size=(8, d)).astype(np.float32)
        rows = min(65536, n - start)
        points[start:start + rows] = centres[rng.integers(0, 8, rows)] + rng.normal(
            scale=0.3, size=(rows, d)).astype(np.float32)
    points.flush()
    del points
    points = np.load(path, mmap_mode="r")
    calls = {
        "balanced_kmeans": lambda x: cluster.balanced_kmeans(x, 8, seed=0, num_iters=3,
                                                             init_sample_size=5000),
        "neighbours": lambda x: search.neighbours(x, 5),
        "dedup": lambda x: similarity.dedup(x, 0.999, num_neighbors=4),
    }
    calls["balanced_kmeans"](points)  # Once first: its compilations are not counted.
    growth = {}
    for name, call in calls.items():
        growth[name] = peak_growth(lambda call=call: call(points))
    print(json.dumps({"bytes": n * d * 4, "growth": growth}))


if __name__ == "__main__":
    main()
