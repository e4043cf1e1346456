"""Data ablations by modular training and merging (Na et al., EMNLP 2024).

    python -m experiments.data_ablations \
        --config=experiments/configs/data_ablations.py:tiny --workdir=DIR
    python -m experiments.data_ablations \
        --config=experiments/configs/data_ablations.py:small,partitions=split:8 --workdir=DIR

The `ablation` section (every other section is the shared one of `jaxsel.config`; `train.steps`
is not used: each model's step count comes from `seed_steps` / `partition_steps`):

- `seed_fraction`: the share of the train pool (a seeded random subset, by `seed`) the seed model
  is pretrained on; partitions are drawn from the rest.
- `domains`: comma-separated train-pool domains the partitions are made of; empty: all of them.
- `partitions`: `domains` (one partition per domain), `split:K` (the rest of the pool in K equal
  random parts) or `domains:K` (each domain in K equal random parts, grouped by domain for the
  "macro" merge). Domain partitions are cut to the size of the smallest, so every partition, and
  every union of m of them, holds the same number of sequences per partition.
- `seed_steps`: pretraining steps of the seed model (with `optim` as configured).
- `partition_steps`: continued-pretraining steps on each partition; a gold model on a union of m
  partitions trains for m x partition_steps, so its token count is the sum of its partitions'.
- `cpt_lr_ratio`: continued pretraining runs at a constant learning rate of cpt_lr_ratio x
  optim.lr, with no warmup and a fresh optimizer (the paper's defaults: 0.1).
- `max_mixtures`: at most this many unions of 2 partitions and as many of 3, chosen at random
  (seeded); 0: all of them.
- `eval_batch_size`: sequences per batch when evaluating the proxies (merged models); they are
  evaluated, like every model, on the first `train.eval_per_domain` held-out sequences of each
  domain.
- `model_pool`: the folder of trained models, found by a key of what and how each was trained, so
  a later experiment with the same seed model and partitions reuses them; empty:
  `<workdir>/model_pool`.
- `bootstrap`: bootstrap resamples of each correlation's confidence interval.
"""

import ml_collections

from jaxsel import config as config_lib

ABLATION_PRESETS = {
    # Three domains every Python install has; the seed has seen a bit of every domain.
    "tiny": dict(seed_fraction=0.3, domains="code,docstrings,reference", partitions="domains",
                 seed_steps=150, partition_steps=30, max_mixtures=0, eval_batch_size=64,
                 bootstrap=1000),
    "small": dict(seed_fraction=0.5, domains="", partitions="domains", seed_steps=20_000,
                  partition_steps=2_000, max_mixtures=20, eval_batch_size=256, bootstrap=1000),
    "410m": dict(seed_fraction=0.5, domains="", partitions="domains", seed_steps=50_000,
                 partition_steps=5_000, max_mixtures=20, eval_batch_size=256, bootstrap=1000),
    "1b": dict(seed_fraction=0.5, domains="", partitions="domains", seed_steps=100_000,
               partition_steps=10_000, max_mixtures=20, eval_batch_size=256, bootstrap=1000),
}


def get_config(arg=None):
    preset, options = config_lib.parse_arg(arg)
    config = config_lib.base_config(preset)
    config.ablation = ml_collections.ConfigDict(dict(
        cpt_lr_ratio=0.1, model_pool="", **ABLATION_PRESETS[preset]))
    config_lib.apply_options(config, options)
    return config
