"""The one eval function: per-sequence loss sums over pool ids, aggregated into perplexities.

Sequences are evaluated in a fixed order in batches padded with empty rows (segment 0, which carry
no target), so every number is exact and independent of the batch size and the process count.
"""

from __future__ import annotations

import jax
import numpy as np
from tqdm import tqdm

from jaxsel import sharding


def sequence_loss_sums(trainer, params, pool, ids: np.ndarray, batch_size: int,
                       progress: bool = False) -> np.ndarray:
    """[len(ids), 2] float64: (sum of token losses, number of target tokens) per sequence."""
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
        raise ValueError("ids: empty; nothing to evaluate")
    procs, proc = jax.process_count(), jax.process_index()
    if batch_size % procs:
        raise ValueError(f"batch_size {batch_size} is not divisible by {procs} processes")
    local = batch_size // procs
    out = np.zeros((ids.size, 2))
    starts = range(0, ids.size, batch_size)
    for start in tqdm(starts, desc="eval", disable=not progress):
        chunk = ids[start:start + batch_size]
        mine = chunk[proc * local:(proc + 1) * local]
        rows = pool.rows(mine)
        pad = local - mine.size
        rows = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in rows.items()}
        batch = sharding.global_batch(rows, trainer.mesh)
        sums = np.asarray(jax.device_get(trainer.sequence_losses(params, batch)))
        # Process p's slice holds chunk[p*local:(p+1)*local], so real rows come first.
        out[start:start + chunk.size] = sums[:chunk.size]
    return out


def perplexity_by_domain(trainer, params, pool, batch_size: int, max_per_domain: int = 0
                         ) -> dict[str, float]:
    """Token-weighted perplexity of each domain of `pool` and of all of it (`"all"`)."""
    ids = np.concatenate([_first(pool.ids_of_domain(d), max_per_domain)
                          for d in pool.domain_names])
    sums = sequence_loss_sums(trainer, params, pool, ids, batch_size)
    domains = np.asarray(pool.domains)[ids]
    result = {}
    for index, name in enumerate(pool.domain_names):
        mine = sums[domains == index]
        if mine[:, 1].sum() > 0:
            result[name] = float(np.exp(mine[:, 0].sum() / mine[:, 1].sum()))
    result["all"] = float(np.exp(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0)))
    return result


def _first(ids: np.ndarray, n: int) -> np.ndarray:
    return ids if n <= 0 else ids[:n]
