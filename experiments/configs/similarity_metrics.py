"""Similarity metrics for data selection (Sam et al., 2025, arXiv 2502.02494).

    python -m experiments.similarity_metrics \
        --config=experiments/configs/similarity_metrics.py:tiny --workdir=DIR
    python -m experiments.similarity_metrics \
        --config=experiments/configs/similarity_metrics.py:small,select_clusters=500 \
        --workdir=DIR --config.similarity.num_clusters=10,100,1000

`train.steps` is not used (each model's step count is `proxy_steps` or `select_steps`); the rest
of the shared sections (data, model, optim, train.batch_size, train.eval_per_domain) apply to
every model. `init_from=WORKDIR` takes that run's params as the proxy LM instead of training
one. The `similarity` section:

- `proxy_fraction`: the share of the train pool (seeded) the proxy LM is pretrained on; the
  analysis sample and the candidates are drawn from the rest (may be 0 with `init_from`).
- `proxy_steps`: pretraining steps of the proxy LM.
- `analysis_size`: train-pool rows whose proxy losses the embeddings' clusters should explain.
- `embeddings`: comma-separated, any of `lm_token_mean` (mean of the proxy's input token
  embeddings), `lm_output_mean` (mean of its final hidden states), `encoder` (an off-the-shelf
  sentence encoder), `ngram_hash` (hashed unigram + bigram counts, the no-model baseline).
- `encoder`: the encoder's BERT-family folder (empty: all-MiniLM-L6-v2); `encoder_max_length`:
  its input truncation in encoder tokens (special tokens included).
- `ngram_buckets`: hash buckets of `ngram_hash`.
- `pca_dims`: every embedding is standardised, projected on this many principal components
  (fitted on the rows it embeds) and L2-normalised before clustering.
- `num_clusters`: comma-separated cluster counts K of the balanced k-means of the analysis.
- `bootstrap`: resamples of the 95% bootstrap CIs of variance reduction and purity (0: none).
- `candidates`: rows (seeded, outside the proxy's share) the selections choose from; the
  analysis sample is the first rows of the same draw, so one holds the other.
- `select_embedding`: the embedding (any of the four) of the diversity-based selection;
  `select_clusters`: its balanced k-means clusters of the candidates; `select_size`: the rows
  selected (`select.cluster_diverse`), and as many drawn at random for the baseline.
- `select_steps`: pretraining steps of a fresh LM on each selection.
- `eval_batch_size`: sequences per batch when computing losses and embeddings.
"""

import ml_collections

from jaxsel import config as config_lib

SIMILARITY_PRESETS = {
    # ~5 minutes on 2 CPU cores: MiniLM on 2000 sequences cut at 64 tokens is the costly part.
    "tiny": dict(proxy_fraction=0.5, proxy_steps=150, analysis_size=1000, num_clusters="8,32",
                 pca_dims=32, encoder_max_length=64, ngram_buckets=1024, candidates=2000,
                 select_clusters=16, select_size=640, select_steps=80, eval_batch_size=64),
    # One epoch of each selection; candidates four times the selection.
    "small": dict(proxy_fraction=0.2, proxy_steps=10_000, analysis_size=50_000,
                  num_clusters="100,1000", pca_dims=64, encoder_max_length=256,
                  ngram_buckets=4096, candidates=2_560_000, select_clusters=1000,
                  select_size=640_000, select_steps=2_500, eval_batch_size=256),
    "410m": dict(proxy_fraction=0.2, proxy_steps=20_000, analysis_size=100_000,
                 num_clusters="100,1000", pca_dims=64, encoder_max_length=256,
                 ngram_buckets=4096, candidates=5_120_000, select_clusters=1000,
                 select_size=1_280_000, select_steps=2_500, eval_batch_size=256),
    "1b": dict(proxy_fraction=0.2, proxy_steps=20_000, analysis_size=100_000,
               num_clusters="100,1000", pca_dims=64, encoder_max_length=256, ngram_buckets=4096,
               candidates=10_240_000, select_clusters=1000, select_size=2_560_000,
               select_steps=5_000, eval_batch_size=256),
}


def get_config(arg=None):
    preset, options = config_lib.parse_arg(arg)
    config = config_lib.base_config(preset)
    config.similarity = ml_collections.ConfigDict(dict(
        embeddings="lm_token_mean,lm_output_mean,encoder,ngram_hash", encoder="",
        select_embedding="encoder", bootstrap=1000, **SIMILARITY_PRESETS[preset]))
    config_lib.apply_options(config, options)
    return config
