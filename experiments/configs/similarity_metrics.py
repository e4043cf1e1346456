"""Similarity metrics for data selection (Sam et al., 2025, arXiv 2502.02494).

    python -m experiments.similarity_metrics \
        --config=experiments/configs/similarity_metrics.py:tiny --workdir=DIR
    python -m experiments.similarity_metrics \
        --config=experiments/configs/similarity_metrics.py:small,select_clusters=500 \
        --workdir=DIR --config.similarity.num_clusters=10,100,1000

`train.steps` is not used (each model's step count is its section's `steps` or
`select_steps`); the rest of the shared sections (data, model, optim, train.batch_size,
train.eval_per_domain) apply to every model. `init_from` is not used: each LM below has its own.
The `similarity` section:

- `loss_model`, `embedding_model`: the LM whose per-sequence losses the embeddings' clusters
  should explain, and the LM whose `lm_token_mean` / `lm_output_mean` embeddings are measured
  (trained only when one of them is used). Each has
  - `fraction`: its share of the train pool (one seeded permutation of `config.seed`: the loss
    model's rows first, then the embedding model's; the analysis sample and the candidates come
    from the rest), on which it is pretrained for `steps` steps with `seed` (its
    initialisation and data order);
  - `init_from`: a finished run's folder (e.g. a pretrain workdir) whose latest params are taken
    instead of training one (`fraction` may then be 0; the run's seed and step are reported).
  By default the two are different runs (other seeds, disjoint rows), so the comparison is not
  circular; point both `init_from` at one run to measure the circular setting.
- `analysis_size`: train-pool rows whose losses the embeddings' clusters should explain.
- `embeddings`: a tuple of any of `lm_token_mean` (mean of the embedding model's input
  token embeddings), `lm_output_mean` (mean of its final hidden states), `encoder` (an
  off-the-shelf sentence encoder), `ngram_hash` (hashed unigram + bigram counts, the no-model
  baseline).
- `encoder`: the encoder's BERT-family folder (empty: all-MiniLM-L6-v2); `encoder_max_length`:
  its input truncation in encoder tokens (special tokens included).
- `ngram_buckets`: hash buckets of `ngram_hash`.
- `pca_dims`: every embedding is standardised, projected on this many principal components
  (fitted on the rows it embeds) and L2-normalised before clustering.
- `num_clusters`: a tuple of cluster counts K of the balanced k-means of the analysis.
- `bootstrap`: resamples of the 95% intervals of the variance reductions and purity (0: none).
- `candidates`: rows (seeded, outside the models' shares) the selections choose from; the
  analysis sample is the first rows of the same draw, so one holds the other.
- `select_embedding`: the embedding (any of the four) the selections use; `select_size`: the
  rows each arm selects. `diverse` (`similarity.threshold_diverse`): one representative per
  cluster of an average-linkage threshold clustering over the `select_neighbors`-nearest-
  neighbour graph, cut at `select_size` clusters; `cluster_stratified`: spread evenly over
  `select_clusters` balanced k-means clusters; `random`: uniform.
- `select_steps`: pretraining steps of a fresh LM on each selection.
- `eval_batch_size`: sequences per batch when computing losses and embeddings.
"""

import ml_collections

from jaxsel import config as config_lib

SIMILARITY_PRESETS = {
    # ~6 minutes on 2 CPU cores: two 150-step LMs, MiniLM on 2000 sequences cut at 64 tokens
    # and three 80-step arms.
    "tiny": dict(loss_model=dict(fraction=0.25, steps=150),
                 embedding_model=dict(fraction=0.25, steps=150), analysis_size=1000,
                 num_clusters=(8, 32), pca_dims=32, encoder_max_length=64, ngram_buckets=1024,
                 candidates=2000, select_clusters=16, select_size=640, select_steps=80,
                 eval_batch_size=64),
    # One epoch of each selection; candidates four times the selection.
    "small": dict(loss_model=dict(fraction=0.1, steps=10_000),
                  embedding_model=dict(fraction=0.1, steps=10_000), analysis_size=50_000,
                  num_clusters=(100, 1000), pca_dims=64, encoder_max_length=256,
                  ngram_buckets=4096, candidates=2_560_000, select_clusters=1000,
                  select_size=640_000, select_steps=2_500, eval_batch_size=256),
    "410m": dict(loss_model=dict(fraction=0.1, steps=20_000),
                 embedding_model=dict(fraction=0.1, steps=20_000), analysis_size=100_000,
                 num_clusters=(100, 1000), pca_dims=64, encoder_max_length=256,
                 ngram_buckets=4096, candidates=5_120_000, select_clusters=1000,
                 select_size=1_280_000, select_steps=2_500, eval_batch_size=256),
    "1b": dict(loss_model=dict(fraction=0.1, steps=20_000),
               embedding_model=dict(fraction=0.1, steps=20_000), analysis_size=100_000,
               num_clusters=(100, 1000), pca_dims=64, encoder_max_length=256, ngram_buckets=4096,
               candidates=10_240_000, select_clusters=1000, select_size=2_560_000,
               select_steps=5_000, eval_batch_size=256),
}


def get_config(arg=None):
    preset, options = config_lib.parse_arg(arg)
    config = config_lib.base_config(preset)
    scale = dict(SIMILARITY_PRESETS[preset])
    models = {role: dict(seed=seed, init_from="", **scale.pop(role))
              for role, seed in (("loss_model", 1), ("embedding_model", 2))}
    config.similarity = ml_collections.ConfigDict(dict(
        embeddings=("lm_token_mean", "lm_output_mean", "encoder", "ngram_hash"), encoder="",
        select_embedding="encoder", select_neighbors=16, bootstrap=1000, **models, **scale))
    config_lib.apply_options(config, options)
    return config
