"""MATES: model-aware data selection with a data influence model (Yu et al., NeurIPS 2024).

    python -m experiments.mates --config=experiments/configs/mates.py:tiny --workdir=DIR
    python -m experiments.mates --config=experiments/configs/mates.py:small,stages=10 ...

`train.steps` is the whole run, cut into `mates.stages` equal stages, on a warmup-stable-decay
schedule (`optim.schedule = "wsd"`, as MATES): training stays on the stable learning rate, and
every stage is evaluated from a copy that decays over `optim.decay_steps` steps (MATES: 200).
`roles` names the target domain (the local corpus' `reference`): its `target` items (1024 from
`small` up, as MATES' LAMBADA set) are what the oracle is probed on, its `target_eval` items
what the arms are compared on. The `mates` section:

- `stages`: pretraining stages; the first trains on random data, each later one on data selected
  with the model as the previous stage left it.
- `selection_fraction`: each stage draws `stage_steps x batch_size / selection_fraction` fresh
  candidates (rows of the train pool no earlier stage drew) and selects `selection_fraction` of
  them (MATES: 20%).
- `probe_size`: candidates probed per stage for their exact one-step oracle influence on the
  target items; `probe_chunk`: candidates per vmapped probe chunk.
- `encoder`: the influence model's BERT-family folder (empty: all-MiniLM-L6-v2; MATES:
  bert-base-uncased); it reads `encoder_windows` windows of `encoder_max_length` tokens,
  mean-pooled together (MATES: 2 x 512; `small`: 1 x 512, see below).
- `fit_epochs`, `fit_lr`, `fit_batch_size`, `fit_weight_decay`, `fit_val_fraction`: fine-tuning
  of the influence model (MATES: 5 epochs, 5e-5, 0.01, 10% validation; the best validation
  Spearman's epoch is kept).
- `predict_batch_size`: candidates per batch when the influence model scores them.
- `temperature`: Gumbel-top-k temperature (MATES' released code: 0.5).
- `eval_batch_size`: sequences per batch when probing.

Deviations from MATES' released code (cxcscmu/MATES), all deliberate:
- the predictions are standardised by their own spread before the Gumbel noise (see
  `jaxsel.mates`: a small regressor's predictions span a fraction of the labels' scale, and the
  noise would drown them);
- the Gumbel-top-k draw is the exact Plackett-Luce sample (`select.gumbel_top_k`): the k largest
  of -score / T + G, where the released code keeps the k smallest of score / T + G;
- the oracle is the change of the target loss after one step of the run's own optimizer, from
  the state in memory, vmapped over candidates (`probe.Prober`); MATES reloads the checkpoint
  per candidate and records the loss after the step (the same ranking);
- the target items are LAMBADA-style cloze items of the target domain's held-out documents, not
  LAMBADA itself (no download); the influence model is MiniLM by default, not bert-base;
- the selection overhead is kept at or below 10% of training in FLOPs
  (`experiments.mates.planned_overhead`): the presets probe fewer candidates per stage than
  MATES' 80,000 at 410M, the target items are 128-token windows (`roles.item_len`; LAMBADA's
  passages are about that long), and `small` reads one window of 512 tokens, not two: scoring 5
  candidates per trained sequence with two windows costs 12% of a 160M model's training by
  itself (at 410m and 1b, two windows cost 4% and 2%).
"""

import ml_collections

from jaxsel import config as config_lib

MATES_PRESETS = {
    # 3 stages of 40 steps; 640 of 3200 candidates selected per stage; MiniLM on 2 x 64 tokens.
    "tiny": dict(steps=120, stages=3, probe_size=256, decay_steps=10, encoder_max_length=64,
                 encoder_windows=2, fit_epochs=6, fit_lr=1e-4, fit_batch_size=16),
    # MATES' settings at the Pythia-160M scale, divided into 5 stages.
    "small": dict(steps=20_000, stages=5, probe_size=1_500, decay_steps=200,
                  encoder_max_length=512, encoder_windows=1, fit_epochs=5, fit_lr=5e-5,
                  fit_batch_size=64),
    "410m": dict(steps=50_000, stages=5, probe_size=4_000, decay_steps=200,
                 encoder_max_length=512, encoder_windows=2, fit_epochs=5, fit_lr=5e-5,
                 fit_batch_size=64),
    "1b": dict(steps=100_000, stages=5, probe_size=4_000, decay_steps=200,
               encoder_max_length=512, encoder_windows=2, fit_epochs=5, fit_lr=5e-5,
               fit_batch_size=64),
}


def get_config(arg=None):
    preset, options = config_lib.parse_arg(arg)
    config = config_lib.base_config(preset)
    config.roles.target_domain = "reference"
    scale = dict(MATES_PRESETS[preset])
    config.train.steps = scale.pop("steps")
    config.optim.schedule = "wsd"
    config.optim.decay_steps = scale.pop("decay_steps")
    config.mates = ml_collections.ConfigDict(dict(
        selection_fraction=0.2, probe_chunk=16, encoder="",
        fit_weight_decay=0.01, fit_val_fraction=0.1, predict_batch_size=64, temperature=0.5,
        eval_batch_size=64, **scale))
    config_lib.apply_options(config, options)
    return config
