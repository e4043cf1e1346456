"""MATES' selection step (Yu, Das, Xiong, NeurIPS 2024), from one train state to scores for every
candidate, each artifact computed once into a folder (a killed run resumes where it was):

1. `oracle.npz`: the exact one-step oracle influence (`probe.Prober.oracle_influence`) of
   `probe_size` seeded candidates on the target items, from the state;
2. `influence_model.json` and `.msgpack`: the data influence model (`influence_model.fit`: the
   encoder with a regression head, reading up to `encoder_windows` windows of
   `encoder_max_length` tokens, fine-tuned on the probed candidates' z-scored influence, best
   validation Spearman kept), its record and its parameters;
3. its prediction for every candidate (in the oracle's units), streamed to
   `rows/predictions-<key>` (`jaxsel.stream`: resumable chunk by chunk, keyed by the candidates
   and the fitted parameters), and `predictions.npz`: `scores`, the predictions standardised by
   their own mean and spread (see below).

`select.gumbel_top_k(scores, k, seed, temperature)` then picks the stage's data; lower is better.

Where the signal goes (measured on the synthetic corpus, where the oracle ranks the target domain
first): a regressor fine-tuned on a few hundred examples predicts the mean plus a small
correction, so its predictions in z-units of the labels span a fraction of one unit, and Gumbel
noise (standard deviation 1.28 at temperature 1, 0.64 at MATES' 0.5) drowns them: the pick comes
out at the candidates' base rate although the ranking is right. MATES' released code adds the
noise to the raw predictions (its model is trained long enough on 80k probes per stage to predict
on the label scale). Here the predictions are standardised by their own spread before the noise,
so the temperature means the same thing whatever the model's calibration: a deviation from the
reference code, which changes nothing when the model predicts on the label scale.

`overhead` prices the step against training, in matmul FLOPs, for the report.
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import ml_collections
import numpy as np
from flax import serialization

from jaxsel import files, influence_model, probe, references, report, select, stream
from jaxsel.model import encoder as encoder_lib
from jaxsel.model.transformer import matmul_flops_per_token


def encoder_tokens(section: ml_collections.ConfigDict) -> int:
    """The encoder tokens the influence model reads per candidate: windows x window length."""
    return section.encoder_windows * section.encoder_max_length


def predicted_influence(folder: str, section: ml_collections.ConfigDict, prober: probe.Prober,
                        encoder: encoder_lib.Encoder, state_fn, pool, candidates_N: np.ndarray,
                        tokens: dict[str, np.ndarray], reference: references.Reference,
                        probe_seed: int, fit_seed: int) -> tuple[np.ndarray, dict]:
    """Steps 1-3 for the candidates (pool ids `candidates_N`, sorted) from the train state
    `state_fn()` (called only if the oracle must be computed), the target items `reference`,
    and the candidates' encoder inputs `tokens` (`ids`, `lengths`). Returns (scores_N, info):
    `probed_ids`, `oracle` (their influence), `val_spearman` (of the kept epoch), the oracle's
    mean and spread, and `seconds` of each step. `section` holds probe_size, fit_*,
    predict_batch_size."""
    mesh = prober.trainer.mesh

    def oracle():
        rng = np.random.default_rng(probe_seed)
        ids = np.sort(rng.choice(candidates_N, section.probe_size, replace=False))
        start = time.perf_counter()
        influence = prober.oracle_influence(state_fn(), pool.rows(ids), reference)
        return {"ids": ids, "influence": influence,
                "seconds": np.float64(time.perf_counter() - start)}

    probed = report.cached_npz(os.path.join(folder, "oracle.npz"), oracle)
    rows = np.searchsorted(candidates_N, probed["ids"])
    fit_config = influence_model.FitConfig(
        learning_rate=section.fit_lr, weight_decay=section.fit_weight_decay,
        epochs=section.fit_epochs, batch_size=section.fit_batch_size,
        val_fraction=section.fit_val_fraction, seed=fit_seed)

    fitted_params = []  # The parameters, when this process fits them.

    def fitted() -> dict:
        start = time.perf_counter()
        fit = influence_model.fit(encoder, tokens["ids"][rows], tokens["lengths"][rows],
                                  probed["influence"], fit_config, mesh=mesh)
        fitted_params.append(serialization.msgpack_serialize(jax.device_get(fit.params)))
        if jax.process_index() == 0:  # Before the record, which marks the fit as done.
            with files.atomic_path(params_path) as tmp, open(tmp, "wb") as f:
                f.write(fitted_params[0])
        return {"history": fit.history, "best_epoch": fit.best_epoch,
                "label_mean": fit.label_mean, "label_std": fit.label_std,
                "val_spearman": fit.history[fit.best_epoch]["val_spearman"],
                "seconds": time.perf_counter() - start}

    params_path = os.path.join(folder, "influence_model.msgpack")
    fit = report.cached_json(os.path.join(folder, "influence_model.json"), fitted)
    params_bytes = fitted_params[0] if fitted_params else files.path(params_path).read_bytes()

    def predictions():
        start = time.perf_counter()
        predicted = influence_model.predict(
            encoder, serialization.msgpack_restore(params_bytes), fit["label_mean"],
            fit["label_std"], tokens["ids"], tokens["lengths"], section.predict_batch_size,
            mesh=mesh, to=stream.Target(os.path.join(folder, "rows"), "predictions", {
                "ids": stream.ids_key(candidates_N),
                "model": hashlib.sha256(params_bytes).hexdigest()[:16]}))
        mean, spread = _mean_std(predicted)
        return {"scores": ((predicted - mean) / (spread if spread > 0 else 1.0)).astype(
                    np.float32),
                "seconds": np.float64(time.perf_counter() - start)}

    predicted = report.cached_npz(os.path.join(folder, "predictions.npz"), predictions)
    return predicted["scores"], {
        "probed_ids": probed["ids"], "oracle": probed["influence"],
        "probe_size": int(section.probe_size),
        "val_spearman": float(fit["val_spearman"]),
        "oracle_mean": float(probed["influence"].mean()),
        "oracle_std": float(probed["influence"].std()),
        "seconds": {"probe": float(probed["seconds"]), "fit": float(fit["seconds"]),
                    "score": float(predicted["seconds"])}}


def _mean_std(values_N) -> tuple[float, float]:
    """Mean and standard deviation (ddof 0) of a (memory-mapped) vector, read in chunks."""
    total, squares, n = 0.0, 0.0, len(values_N)
    for start in range(0, n, select.CHUNK_ROWS):
        chunk = np.asarray(values_N[start:start + select.CHUNK_ROWS], np.float64)
        total, squares = total + chunk.sum(), squares + (chunk ** 2).sum()
    mean = total / n
    return mean, float(np.sqrt(max(squares / n - mean ** 2, 0.0)))


def overhead(model_cfg, encoder_cfg: encoder_lib.EncoderConfig, *, seq_len: int,
             reference: references.Reference, probes: int, fit_tokens: int, fit_epochs: int,
             scored_tokens: int, window: int) -> dict:
    """Matmul FLOPs of one MATES selection step: `probe` (`probes` exact oracles), `fit`
    (`fit_epochs` passes of forward + backward, 3x the forward, over `fit_tokens` encoder
    tokens) and `score` (the forward over `scored_tokens`), each encoder token costing the
    forward of a `window`-token window."""
    per_token = encoder_lib.matmul_flops_per_token(encoder_cfg, window)
    return {"probe": probes * probe.oracle_matmul_flops(model_cfg, seq_len, reference),
            "fit": 3 * per_token * fit_tokens * fit_epochs,
            "score": per_token * scored_tokens}


def training_flops(model_cfg, seq_len: int, steps: int, batch_size: int) -> int:
    """Matmul FLOPs of `steps` training steps (forward + backward, 3x the forward)."""
    return 3 * matmul_flops_per_token(model_cfg, seq_len) * seq_len * steps * batch_size


def overhead_summary(selection_flops: dict, selection_seconds: dict, train_flops: int,
                     train_seconds: float) -> dict:
    """Each selection step against training, as FLOPs and as seconds, and their totals' ratio."""
    total_flops, total_seconds = sum(selection_flops.values()), sum(selection_seconds.values())
    return {"flops": {**selection_flops, "train": train_flops,
                      "ratio": total_flops / train_flops},
            "seconds": {**selection_seconds, "train": train_seconds,
                        "ratio": total_seconds / train_seconds if train_seconds else None}}
