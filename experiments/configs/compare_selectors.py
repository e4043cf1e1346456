"""The selectors a data-selection paper compares, under one budget, from one seed model.

    python -m experiments.compare_selectors \
        --config=experiments/configs/compare_selectors.py:tiny --workdir=DIR
    python -m experiments.compare_selectors \
        --config=experiments/configs/compare_selectors.py:small,selectors=random,mates ...

`train.steps` follows `compare.seed_steps + compare.select_steps` (set either of those, not it):
one learning-rate schedule that the seed run starts (it stops at `seed_steps`) and every arm
finishes.
The other shared sections (data, model, optim, train.batch_size, train.eval_per_domain) apply to
every model. The `compare` section:

- `seed_size`, `seed_steps`: the seed model trains `seed_steps` steps on a seeded random share of
  `seed_size` train-pool rows.
- `candidates`: rows (seeded, disjoint from the seed's share) every selector chooses from;
  `select_size`: how many each selector picks; `select_steps`: steps each arm trains on its pick,
  continuing the seed model's whole state (params, AdamW moments, step).
- `selectors`: comma-separated, any of `random`, `low_loss` (lowest per-sequence loss under the
  seed model: perplexity filtering), `semdedup` (near-duplicates removed from MiniLM embeddings,
  then a random draw), `nearest` (most similar to the reference items' MiniLM embeddings:
  DSIR-like target matching), `diverse` (evenly over balanced k-means clusters of the MiniLM
  embeddings; Sam et al.), `first_order` (lowest first-order influence on the reference set
  under the seed state), `mates` (Yu et al.: exact oracle on `probe_size` candidates, a data
  influence model fitted on them, Gumbel-top-k on its z-scored predictions).
- `reference_domain`, `reference_items`: the reference set, LAMBADA-style cloze items from that
  held-out domain (as in MATES); what `nearest`, `first_order` and `mates` aim at, and the
  reference loss every arm is ranked by.
- `encoder`: the BERT-family folder (empty: all-MiniLM-L6-v2); `encoder_max_length`: its input
  truncation in encoder tokens.
- `dedup_threshold`: `semdedup`'s cosine similarity at which a row is a near-duplicate of a kept
  one; `clusters`: `diverse`'s balanced k-means clusters.
- `probe_size`, `probe_chunk`, `fit_*`, `predict_batch_size`, `temperature`: `mates` as in
  `experiments/configs/mates.py` (`probe_chunk` also chunks `first_order`).
- `eval_batch_size`: sequences per batch for losses, embeddings and reference evaluation.
"""

import ml_collections

from jaxsel import config as config_lib

COMPARE_PRESETS = {
    # ~5 minutes on 2 CPU cores: 7 arms of 40 steps from a 60-step seed; 256 of 1024 candidates.
    "tiny": dict(seed_size=960, seed_steps=60, candidates=1024, select_size=256,
                 select_steps=40, encoder_max_length=64, clusters=16, probe_size=96,
                 fit_epochs=3, fit_lr=1e-4, fit_batch_size=16),
    # MATES' 160M budget split into a seed and one selected stage.
    "small": dict(seed_size=1_280_000, seed_steps=5_000, candidates=1_920_000,
                  select_size=384_000, select_steps=15_000, encoder_max_length=512,
                  clusters=1000, probe_size=10_000, fit_epochs=5, fit_lr=5e-5,
                  fit_batch_size=64),
    "410m": dict(seed_size=5_120_000, seed_steps=10_000, candidates=5_120_000,
                 select_size=1_024_000, select_steps=40_000, encoder_max_length=512,
                 clusters=1000, probe_size=20_000, fit_epochs=5, fit_lr=5e-5, fit_batch_size=64),
    "1b": dict(seed_size=10_240_000, seed_steps=20_000, candidates=10_240_000,
               select_size=2_048_000, select_steps=80_000, encoder_max_length=512,
               clusters=1000, probe_size=20_000, fit_epochs=5, fit_lr=5e-5, fit_batch_size=64),
}
SELECTORS = "random,low_loss,semdedup,nearest,diverse,first_order,mates"


def get_config(arg=None):
    preset, options = config_lib.parse_arg(arg)
    config = config_lib.base_config(preset)
    scale = dict(COMPARE_PRESETS[preset])
    config.compare = ml_collections.ConfigDict(dict(
        selectors=SELECTORS, reference_domain="reference", reference_items=32, encoder="",
        dedup_threshold=0.9, probe_chunk=16, fit_weight_decay=0.01, fit_val_fraction=0.1,
        predict_batch_size=64, temperature=1.0, eval_batch_size=64, **scale))
    # A reference, so that options and command-line overrides of either count carry over.
    config.train.steps = config.compare.get_ref("seed_steps") + config.compare.get_ref(
        "select_steps")
    config_lib.apply_options(config, options)
    return config
