"""MATES: model-aware data selection with a data influence model (Yu et al., NeurIPS 2024).

    python -m experiments.mates --config=experiments/configs/mates.py:tiny --workdir=DIR
    python -m experiments.mates --config=experiments/configs/mates.py:small,stages=10 ...

`train.steps` is the whole run, cut into `mates.stages` equal stages (one learning-rate schedule
over all of them). The `mates` section:

- `stages`: pretraining stages; the first trains on random data, each later one on data selected
  with the model as the previous stage left it.
- `selection_fraction`: each stage draws `stage_steps x batch_size / selection_fraction` fresh
  candidates (rows of the train pool no earlier stage drew) and selects `selection_fraction` of
  them (MATES: 20%).
- `probe_size`: candidates probed per stage for their exact one-step oracle influence on the
  reference set; `probe_chunk`: candidates per vmapped probe chunk.
- `reference_domain`, `reference_items`: the reference set, LAMBADA-style cloze items (only the
  last word counts) from that held-out domain (MATES: LAMBADA).
- `encoder`: the influence model's BERT-family folder (empty: all-MiniLM-L6-v2; MATES:
  bert-base-uncased); `encoder_max_length`: its input truncation in encoder tokens.
- `fit_epochs`, `fit_lr`, `fit_batch_size`, `fit_weight_decay`, `fit_val_fraction`: fine-tuning
  of the influence model (MATES: 5 epochs, 5e-5, 0.01, 10% validation; the best validation
  Spearman's epoch is kept).
- `predict_batch_size`: candidates per batch when the influence model scores them.
- `temperature`: Gumbel-top-k temperature on the z-scored predicted influences (MATES: 1).
- `eval_batch_size`: sequences per batch in held-out and reference evaluation.
"""

import ml_collections

from jaxsel import config as config_lib

MATES_PRESETS = {
    # 3 stages of 40 steps; 640 of 3200 candidates selected per stage; MiniLM on 64 tokens.
    "tiny": dict(steps=120, stages=3, probe_size=160, encoder_max_length=64, fit_epochs=4,
                 fit_lr=1e-4, fit_batch_size=16),
    # MATES' 410M setting divided into 5 stages; probes and the encoder at the paper's scale.
    "small": dict(steps=20_000, stages=5, probe_size=10_000, encoder_max_length=512,
                  fit_epochs=5, fit_lr=5e-5, fit_batch_size=64),
    "410m": dict(steps=50_000, stages=5, probe_size=20_000, encoder_max_length=512,
                 fit_epochs=5, fit_lr=5e-5, fit_batch_size=64),
    "1b": dict(steps=100_000, stages=5, probe_size=20_000, encoder_max_length=512,
               fit_epochs=5, fit_lr=5e-5, fit_batch_size=64),
}


def get_config(arg=None):
    preset, options = config_lib.parse_arg(arg)
    config = config_lib.base_config(preset)
    scale = dict(MATES_PRESETS[preset])
    config.train.steps = scale.pop("steps")
    config.mates = ml_collections.ConfigDict(dict(
        selection_fraction=0.2, probe_chunk=16, reference_domain="reference",
        reference_items=32, encoder="", fit_weight_decay=0.01, fit_val_fraction=0.1,
        predict_batch_size=64, temperature=1.0, eval_batch_size=64, **scale))
    config_lib.apply_options(config, options)
    return config
