"""Data ablations by modular training and merging (Na et al., EMNLP 2024).

    python -m experiments.data_ablations \
        --config=experiments/configs/data_ablations.py:tiny --workdir=DIR
    python -m experiments.data_ablations \
        --config=experiments/configs/data_ablations.py:small,partitions=domains:2 \
        --config.data.source=jsonl --config.data.paths=DATA.jsonl \
        --config.data.domain_field=source --config.ablation.domains="('arxiv', 'github', 'wiki')" \
        --workdir=DIR

The `ablation` section (every other section is the shared one of `jaxsel.config`; `train.steps`
is not used: each model's step count comes from `seed_steps` / `partition_steps`):

- `seed_domains`: a tuple of the train-pool domains the seed model is pretrained on, all
  their rows; they must be disjoint from `domains`, so the seed's data is separate from the
  partitions' (as in the paper, where the seed corpus is not among the partitions). `("others",)`:
  every domain not in `domains` (then `domains` must name the partitions' domains). Empty: a
  shared seed, pretrained on a seeded `seed_fraction` of the rows of every domain, the partitions
  drawn from the rest.
- `seed_fraction`: with a shared seed (`seed_domains` empty), the share of the train pool (a
  seeded random subset, by `seed`) the seed model is pretrained on; unused otherwise.
- `domains`: a tuple of the train-pool domains the partitions are made of; empty: all but the
  seed's.
- `seed_steps`: pretraining steps of the seed model (with `optim` as configured).
- `partition_steps`: continued-pretraining steps on each partition; a gold model on a union of m
  partitions trains for m x partition_steps, so its token count is the sum of its partitions'.
- `cpt_lr_ratio`: continued pretraining runs at a constant learning rate of cpt_lr_ratio x
  optim.lr, with no warmup and a fresh optimizer (the paper's defaults: 0.1).
- `max_mixtures`: at most this many unions of 2 partitions and as many of 3, chosen at random
  (seeded); 0: all of them.
- `eval_batch_size`: sequences per batch when evaluating the proxies (merged models); they are
  evaluated, like every model, on the held-out `eval` rows (`jaxsel.roles`), at most the first
  `train.eval_per_domain` of each domain. Every held-out domain is an eval set.
- `bootstrap`: resamples of each correlation's 95% percentile bootstrap interval. The unit drawn
  is a mixture: per eval set the correlation is across mixtures, and the one pooled over
  (mixture, eval set) pairs draws mixtures with all their eval sets.
"""

import ml_collections

from jaxsel import config as config_lib

# Larger presets cannot know a user's domain names: their seed trains on the domains `others`
# than the partitions' `domains`, which the user names (a run that names none is refused, with
# what to set); set `seed_domains=()` for a shared seed over every domain instead.
_LARGE = dict(seed_fraction=0.5, seed_domains=("others",), domains=(), partitions="domains",
              max_mixtures=20, eval_batch_size=256, bootstrap=1000)
ABLATION_PRESETS = {
    # Two domains every Python install has, each in 2 parts: 4 partitions, all 6 unions of 2 and
    # 4 of 3 (10 mixtures). The seed trains on the other domains of the embedded corpus (at
    # least the Python reference docs; man pages and docs where the machine has them). With a
    # fresh cache, 11-13 minutes on 2 CPU cores shared with other jobs: the pool and tokenizer
    # ~35 s, training the 15 models ~6 min, evaluating them and the 10 proxies ~6 min.
    "tiny": dict(seed_fraction=0.3, seed_domains=("others",), domains=("code", "docstrings"),
                 partitions="domains:2", seed_steps=150, partition_steps=30, max_mixtures=0,
                 eval_batch_size=64, bootstrap=1000),
    "small": dict(_LARGE, seed_steps=20_000, partition_steps=2_000),
    "410m": dict(_LARGE, seed_steps=50_000, partition_steps=5_000),
    "1b": dict(_LARGE, seed_steps=100_000, partition_steps=10_000),
}


def get_config(arg=None):
    preset, options = config_lib.parse_arg(arg)
    config = config_lib.base_config(preset)
    config.ablation = ml_collections.ConfigDict(dict(
        cpt_lr_ratio=0.1, **ABLATION_PRESETS[preset]))
    config_lib.apply_options(config, options)
    return config
