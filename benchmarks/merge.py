"""Bandwidth of parameter averaging against a numpy copy of the same bytes, in one run.

    python -m benchmarks.merge [--k 8] [--layers 12] [--repeats 5]

Averages K float32 models of a GPT-2-small-like pytree (~100M parameters each) held in memory
and prints one JSON line per measurement, then a summary object with:

- `average_gb_per_s`: bytes of all K input models read per second by `merge.average`;
- `memcpy_gb_per_s`: the same bytes copied by numpy (`np.copyto` into one preallocated model) per
  second, the measured machine peak for one read and one write of each byte;
- `bandwidth_fraction`: their ratio;
- `stream_gb_per_s`: the same for `merge.average_stream` over the in-memory models, the K-pass
  running sum (each pass reads the accumulator and one model and writes the accumulator).

Each timing is the median of `--repeats` runs after one warm-up run (which compiles).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from benchmarks.common import emit
from jaxsel import merge


def transformer_shapes(layers: int, d_model: int = 768, vocab: int = 16384) -> dict:
    """Leaf shapes of a decoder-only transformer: ~7.1M parameters per layer at d_model 768."""
    layer = {
        "attn": {"qkv": (d_model, 3 * d_model), "out": (d_model, d_model)},
        "mlp": {"up": (d_model, 4 * d_model), "down": (4 * d_model, d_model)},
        "ln1": {"scale": (d_model,), "bias": (d_model,)},
        "ln2": {"scale": (d_model,), "bias": (d_model,)},
    }
    return {"embed": (vocab, d_model), "layers": [layer] * layers,
            "final_ln": {"scale": (d_model,), "bias": (d_model,)}}


def make_models(k: int, layers: int, seed: int = 0) -> list:
    """K float32 models on the default device: one random model plus k, for k in 0..K-1."""
    rng = np.random.default_rng(seed)
    shapes = transformer_shapes(layers)
    base = jax.tree.map(lambda s: rng.standard_normal(s, dtype=np.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
    return [jax.tree.map(lambda x, i=i: jax.device_put(x + np.float32(i)), base)
            for i in range(k)]


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_average(models) -> None:
    jax.block_until_ready(merge.average(models))


def run_average_stream(models) -> None:
    jax.block_until_ready(merge.average_stream(iter(models)))


def measure(models: list, repeats: int) -> dict:
    """Prints one JSON line per measurement; returns the sizes and GB/s of each."""
    params = sum(x.size for x in jax.tree.leaves(models[0]))
    total_bytes = sum(x.nbytes for model in models for x in jax.tree.leaves(model))
    emit({"models": len(models), "params_per_model": params, "bytes_read": total_bytes,
          "device": str(jax.devices()[0]), "cpu_count": os.cpu_count()})

    # Host views of the same buffers (zero-copy on CPU) and one model-sized destination.
    sources = [[np.asarray(x) for x in jax.tree.leaves(model)] for model in models]
    destination = [np.empty_like(x) for x in sources[0]]

    def memcpy() -> None:
        for model in sources:
            for dst, src in zip(destination, model, strict=True):
                np.copyto(dst, src)

    results = {"models": len(models), "params_per_model": params}
    for name, fn in (("memcpy", memcpy), ("average", lambda: run_average(models)),
                     ("average_stream", lambda: run_average_stream(models))):
        seconds = median_seconds(fn, repeats)
        results[name] = total_bytes / seconds / 1e9
        emit({"name": name, "median_s": round(seconds, 4), "gb_per_s": round(results[name], 3)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8, help="number of models averaged")
    parser.add_argument("--layers", type=int, default=12, help="transformer layers per model")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    args = parser.parse_args()

    results = measure(make_models(args.k, args.layers), args.repeats)  # Models freed on return.
    emit({
        "summary": "merge", "models": results["models"],
        "params_per_model": results["params_per_model"],
        "average_gb_per_s": round(results["average"], 3),
        "memcpy_gb_per_s": round(results["memcpy"], 3),
        "bandwidth_fraction": round(results["average"] / results["memcpy"], 3),
        "stream_gb_per_s": round(results["average_stream"], 3),
    })


if __name__ == "__main__":
    main()
