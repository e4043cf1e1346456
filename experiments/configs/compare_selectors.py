"""The selectors a data-selection paper compares, under one budget, from one seed model.

    python -m experiments.compare_selectors \
        --config=experiments/configs/compare_selectors.py:tiny --workdir=DIR
    python -m experiments.compare_selectors \
        --config=experiments/configs/compare_selectors.py:small \
        --config.compare.selectors="('random', 'mates')" ...

`train.steps` follows `compare.seed_steps + compare.select_steps` (set either of those, not it):
one learning-rate schedule that the seed run starts (it stops at `seed_steps`) and every arm
finishes. The other shared sections (data, model, optim, train.batch_size,
train.eval_per_domain) apply to every model; `roles` names the target domain (the local
corpus' `reference`: the Python reference docs), whose `target` items the target-aware selectors
aim at and whose `target_eval` items rank the arms. The `compare` section:

- `seed_size`, `seed_steps`: the seed model trains `seed_steps` steps on a seeded random share of
  `seed_size` train-pool rows.
- `candidates`: rows (seeded, disjoint from the seed's share) every selector chooses from;
  `select_size`: how many each selector picks; `select_steps`: steps each arm trains on its pick,
  continuing the seed model's whole state (params, AdamW moments, step).
- `selectors`: a tuple of names of `jaxsel.selectors` (its docstring says what each picks).
- `encoder`: the BERT-family folder (empty: all-MiniLM-L6-v2); `encoder_max_length`: its input
  window in encoder tokens; the embedding selectors read one window, MATES' influence model
  `encoder_windows` of them (MATES: 2 x 512, mean-pooled).
- `dedup_threshold`: `semdedup`'s cosine similarity at which a row is a near-duplicate of a kept
  one; `clusters`: `cluster_stratified`'s balanced k-means clusters.
- `probe_size`, `probe_chunk`, `fit_*`, `predict_batch_size`, `temperature`: `mates` as in
  `experiments/configs/mates.py` (`probe_chunk` also chunks `first_order` and `less`).
- `dsir_buckets`, `dsir_smoothing`: `dsir`'s hashed n-gram buckets (the paper's 10,000) and the
  Laplace pseudo-count added to the target's (the reference package's default 0).
- `less_dims`: `less`' random projection of gradients (the paper's 8,192).
- `minhash_threshold`, `minhash_shingle`: `minhash`'s estimated Jaccard similarity at which a
  row is a near-duplicate of a kept one, over word shingles of `minhash_shingle` words.
- `group_size`, `group_probes`: `group_mates`' oracle groups (`group_probes` of them, half drawn
  inside one cluster) of `group_size` members, each trained on for one step in turn (the
  paper's rollouts of 10); `group_clusters`: the clusters its greedy picks inside (the paper's
  10,000 for 29M rows) and `group_budget` how k is shared out over them ("cluster": in
  proportion to their sizes, as the paper; "global": to the clusters whose next pick the model
  rates best); `group_fit_steps`, `group_fit_lr`: full-batch Adam on its relational model's 4
  scalars; `group_val_fraction`: the oracle groups held out to report its correlation.
- `eval_batch_size`: sequences per batch for losses, embeddings and probing.
"""

import ml_collections

from jaxsel import config as config_lib

COMPARE_PRESETS = {
    # ~9 minutes on 2 CPU cores: 12 arms of 40 steps from a 60-step seed; 256 of 1024 candidates.
    "tiny": dict(seed_size=960, seed_steps=60, candidates=1024, select_size=256,
                 select_steps=40, encoder_max_length=64, clusters=16, probe_size=256,
                 fit_epochs=5, fit_lr=1e-4, fit_batch_size=16, less_dims=128),
    # MATES' 160M budget split into a seed and one selected stage.
    "small": dict(seed_size=1_280_000, seed_steps=5_000, candidates=1_920_000,
                  select_size=384_000, select_steps=15_000, encoder_max_length=512,
                  clusters=1000, probe_size=2_000, fit_epochs=5, fit_lr=5e-5,
                  fit_batch_size=64, less_dims=8192),
    "410m": dict(seed_size=5_120_000, seed_steps=10_000, candidates=5_120_000,
                 select_size=1_024_000, select_steps=40_000, encoder_max_length=512,
                 clusters=1000, probe_size=4_000, fit_epochs=5, fit_lr=5e-5, fit_batch_size=64,
                 less_dims=8192),
    "1b": dict(seed_size=10_240_000, seed_steps=20_000, candidates=10_240_000,
               select_size=2_048_000, select_steps=80_000, encoder_max_length=512,
               clusters=1000, probe_size=4_000, fit_epochs=5, fit_lr=5e-5, fit_batch_size=64,
               less_dims=8192),
}
SELECTORS = ("random", "low_loss", "semdedup", "nearest", "cluster_stratified", "diverse",
             "first_order", "mates", "dsir", "less", "minhash", "group_mates")
# group_mates: oracle groups and clusters per preset (its oracle costs group_probes x group_size
# one-row steps, as many as MATES' probe_size one-step oracles from `small` up).
GROUP_MATES_PRESETS = {
    "tiny": dict(group_size=4, group_probes=48, group_clusters=64),
    "small": dict(group_size=10, group_probes=200, group_clusters=1000),
    "410m": dict(group_size=10, group_probes=400, group_clusters=1000),
    "1b": dict(group_size=10, group_probes=400, group_clusters=1000),
}


def get_config(arg=None):
    preset, options = config_lib.parse_arg(arg)
    config = config_lib.base_config(preset)
    config.roles.target_domain = "reference"
    scale = dict(COMPARE_PRESETS[preset])
    config.compare = ml_collections.ConfigDict(dict(
        selectors=SELECTORS, encoder="", encoder_windows=2, dedup_threshold=0.9, probe_chunk=16,
        fit_weight_decay=0.01, fit_val_fraction=0.1, predict_batch_size=64, temperature=0.5,
        eval_batch_size=64, dsir_buckets=10_000, dsir_smoothing=0.0, minhash_threshold=0.7,
        minhash_shingle=3,
        group_budget="cluster", group_fit_steps=500, group_fit_lr=0.05, group_val_fraction=0.25,
        **GROUP_MATES_PRESETS[preset],
        **scale))
    if preset == "tiny":
        config.train.eval_every = 20  # Held-out loss points on every arm's curve (curves.png).
    # A reference, so that options and command-line overrides of either count carry over.
    config.train.steps = config.compare.get_ref("seed_steps") + config.compare.get_ref(
        "select_steps")
    config_lib.apply_options(config, options)
    return config
