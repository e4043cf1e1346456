"""Evals: perplexity per eval set, cloze (last-word) accuracy, multiple choice.

- `sequence_loss_sums` / `scores_by_domain`: per-sequence loss sums over pool ids, aggregated
  per domain into token-weighted perplexities and into bits per byte (the nats over the UTF-8
  bytes of the scored text, `scored_bytes`, in bits: one scale for pools of any tokenizer).
- `cloze_accuracy`: LAMBADA-style items (a `references.Reference`, e.g. from
  `references.cloze_from_pool`): an item is right when the greedy prediction is right at every
  counted position.
- `multiple_choice`: a `tasks.MultipleChoice`, scored as lm-evaluation-harness does: each choice's
  log-likelihood given the context, the argmax (`acc`) and the argmax per unit of length
  (`acc_norm`).

Rows are evaluated in a fixed order by `rowmap.map_rows`, in batches split over the mesh's batch
axes (`batch_size` is rounded up to whole shards of them and must be a multiple of the process
count), the last one padded with rows whose results are dropped, so every number is exact and
independent of the batch size and the process count. Every process passes the same items and gets
the same results. Cloze and multiple-choice rows run through one function jitted once per trainer
(`loss.losses_at`: the LM head only at the scored positions).
"""

from __future__ import annotations

import functools
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxsel import loss, rowmap, sharding, stream


def sequence_loss_sums(trainer, params, pool, ids: np.ndarray, batch_size: int,
                       progress: bool = False, to: stream.Target | None = None) -> np.ndarray:
    """[len(ids), 2] float64: (sum of token losses, number of target tokens) per sequence; or
    streamed `to` a target, float32 and memory-mapped (`jaxsel.stream`)."""
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
        raise ValueError("ids: empty; nothing to evaluate")
    sums = stream.map_rows(functools.partial(trainer.sequence_losses, params),
                           lambda idx: pool.rows(ids[idx]), _whole_shards(trainer, batch_size),
                           trainer.mesh, to=to, num_rows=ids.size, progress=progress,
                           desc="eval")
    return sums if to is not None else sums.astype(np.float64)


def scores_by_domain(trainer, params, pool, ids, batch_size: int
                     ) -> dict[str, dict[str, float]]:
    """Held-out scores of rows `ids` of `pool` (e.g. a held-out role's), per domain and over all
    of them (`"all"`): `perplexity` (token-weighted) and `bits_per_byte` (`domain_scores`; empty
    if the pool's tokenizer is not byte-level)."""
    ids = np.asarray(ids, np.int64)
    sums = sequence_loss_sums(trainer, params, pool, ids, batch_size)
    return domain_scores(sums, scored_bytes(pool, ids), np.asarray(pool.domains)[ids],
                         pool.domain_names)


def domain_scores(sums_Nx2: np.ndarray, bytes_N: np.ndarray | None, domains_N: np.ndarray,
                  domain_names: list[str]) -> dict[str, dict[str, float]]:
    """Per domain (index into `domain_names`) with targets, and over all rows (`"all"`), of rows
    with (loss sum in nats, target tokens) `sums_Nx2` and scored UTF-8 bytes `bytes_N`:
    `perplexity` = exp(nats / tokens) and `bits_per_byte` = nats / bytes / ln 2 (a domain
    without bytes left out; empty if `bytes_N` is None)."""
    masks = {name: domains_N == index for index, name in enumerate(domain_names)}
    masks = {name: mask for name, mask in masks.items() if sums_Nx2[mask, 1].sum() > 0}
    masks["all"] = np.ones(len(sums_Nx2), bool)
    nats, tokens = ({name: x[mask].sum() for name, mask in masks.items()} for x in sums_Nx2.T)
    out = {"perplexity": {name: float(np.exp(nats[name] / max(tokens[name], 1.0)))
                          for name in masks}, "bits_per_byte": {}}
    if bytes_N is not None:
        total = {name: bytes_N[mask].sum() for name, mask in masks.items()}
        out["bits_per_byte"] = {name: float(nats[name] / total[name] / math.log(2))
                                for name in masks if total[name] > 0}
    return out


def scored_bytes(pool, ids, chunk_rows: int = 1024) -> np.ndarray | None:
    """[len(ids)] int64: the UTF-8 bytes of the text each row of `ids` is scored on, the text of
    its next-token targets (`target_bytes`); None (with a warning) if the pool's tokenizer is
    not byte-level (`Pool.token_bytes`). Rows are read `chunk_rows` at a time."""
    bytes_V = pool.token_bytes
    if bytes_V is None:
        logging.warning("%s: the tokenizer is not byte-level; no bits per byte", pool.path)
        return None
    ids = np.asarray(ids, np.int64)
    out = np.zeros(ids.size, np.int64)
    for start in range(0, ids.size, chunk_rows):
        rows = pool.rows(ids[start:start + chunk_rows])
        out[start:start + chunk_rows] = target_bytes(rows["tokens"], rows["segments"], bytes_V)
    return out


def target_bytes(tokens_NxL: np.ndarray, segments_NxL: np.ndarray,
                 bytes_V: np.ndarray) -> np.ndarray:
    """[N] int64: the sum of `bytes_V` over each row's next-token targets, the tokens its loss is
    on (`loss.next_token_targets`: each token after the first of its document in the row)."""
    tokens_NxL, segments_NxL = np.asarray(tokens_NxL), np.asarray(segments_NxL)
    scored_NxL = (segments_NxL[:, :-1] > 0) & (segments_NxL[:, 1:] == segments_NxL[:, :-1])
    return (np.asarray(bytes_V)[tokens_NxL[:, 1:]] * scored_NxL).sum(axis=1, dtype=np.int64)


def cloze_accuracy(trainer, params, items, batch_size: int, per_item: bool = False,
                   progress: bool = False) -> dict:
    """LAMBADA accuracy and loss of cloze `items` under `params`.

    `items` has the fields of a `references.Reference` (`tokens_RxL`, `segments_RxL`,
    `positions_RxK`, `weights_RxK`), e.g. from `references.cloze` or
    `references.cloze_from_pool`: each row is one item whose counted positions (weight > 0, next
    token in the same document) predict its target word. Returns `accuracy` (the fraction of
    items whose greedy argmax is the target at every counted position), `loss` (the weighted
    mean token loss, `probe.reference_loss` of the same items) and `items`; with `per_item`,
    `correct_I` (bool per item) as well.
    """
    rows = (items.tokens_RxL, items.segments_RxL, items.positions_RxK, items.weights_RxK)
    sums_Rx3 = score_rows(trainer, params, rows, "items", batch_size, progress)
    correct_I = sums_Rx3[:, 2] > 0
    result = {"accuracy": float(correct_I.mean()), "accuracy_stderr": stderr(correct_I),
              "loss": float(sums_Rx3[:, 0].sum() / sums_Rx3[:, 1].sum()),
              "items": len(sums_Rx3)}
    if per_item:
        result["correct_I"] = correct_I
    return result


def multiple_choice(trainer, params, mc, batch_size: int, per_item: bool = False,
                    progress: bool = False) -> dict:
    """Zero-shot multiple-choice accuracy of a `tasks.MultipleChoice` under `params`.

    A choice's log-likelihood is the sum of its tokens' log-probabilities given the context. The
    prediction of an item is its choice of highest log-likelihood (`acc`), or of highest
    log-likelihood / `choice_lengths_C` (`acc_norm`); ties go to the first choice
    (`np.argmax`, as lm-evaluation-harness). Returns `acc`, `acc_norm`, `items`; with `per_item`,
    `pred_I`, `pred_norm_I` (the predicted choice of each item) and `loglik_C` as well.
    """
    item_C, answers_I = np.asarray(mc.item_C), np.asarray(mc.answers_I)
    lengths_C = np.asarray(mc.choice_lengths_C, np.float64)
    rows = (mc.tokens_CxL, mc.segments_CxL, mc.positions_CxK, mc.weights_CxK)
    num_rows = np.asarray(mc.tokens_CxL).shape[0]
    if answers_I.size == 0:
        raise ValueError("mc: no items (see its `skipped` counts)")
    if item_C.shape != (num_rows,) or lengths_C.shape != (num_rows,):
        raise ValueError(f"mc: item_C {item_C.shape} and choice_lengths_C {lengths_C.shape} must "
                         f"have one entry per row ({num_rows})")
    starts_I = np.flatnonzero(np.diff(item_C, prepend=-1))  # First row of each item.
    counts_I = np.diff(np.append(starts_I, num_rows))
    if not np.array_equal(item_C[starts_I], np.arange(answers_I.size)) or \
            starts_I.size != answers_I.size:
        raise ValueError(f"mc: item_C must number the {answers_I.size} items 0, 1, ... with "
                         "each item's rows consecutive")
    if not ((answers_I >= 0) & (answers_I < counts_I)).all():
        raise ValueError("mc: answers_I must index each item's choices")
    if not (lengths_C > 0).all():
        raise ValueError("mc: choice_lengths_C must be positive")
    sums_Cx3 = score_rows(trainer, params, rows, "mc", batch_size, progress)
    loglik_C = -sums_Cx3[:, 0]

    def predictions(scores_C):
        return np.array([np.argmax(scores_C[start:start + count])
                         for start, count in zip(starts_I, counts_I, strict=True)])

    pred_I, pred_norm_I = predictions(loglik_C), predictions(loglik_C / lengths_C)
    hit_I, hit_norm_I = pred_I == answers_I, pred_norm_I == answers_I
    result = {"acc": float(hit_I.mean()), "acc_stderr": stderr(hit_I),
              "acc_norm": float(hit_norm_I.mean()), "acc_norm_stderr": stderr(hit_norm_I),
              "items": int(answers_I.size)}
    if per_item:
        result.update(pred_I=pred_I, pred_norm_I=pred_norm_I, loglik_C=loglik_C)
    return result


def stderr(hits_I: np.ndarray) -> float | None:
    """The standard error of an accuracy, `std(hits, ddof=1) / sqrt(n)` as lm-evaluation-harness
    reports it; None (JSON null) below 2 items."""
    hits_I = np.asarray(hits_I, np.float64)
    return float(hits_I.std(ddof=1) / np.sqrt(hits_I.size)) if hits_I.size >= 2 else None


def _row_scores(model, params, batch) -> jax.Array:
    """[B, 3] float32 per row: the sum of weighted next-token losses at its positions, the sum of
    their weights (pairs inside one document only), and 1 if the greedy prediction is right at
    every position that counts (weight > 0), else 0."""
    losses_BxK, correct_BxK, mask_BxK = loss.losses_at(
        model, params, batch["tokens"], batch["segments"], batch["positions"])
    w_BxK = mask_BxK * batch["weights"]
    all_correct_B = jnp.all(correct_BxK | (w_BxK <= 0), axis=1)
    return jnp.stack([(losses_BxK * w_BxK).sum(1), w_BxK.sum(1),
                      all_correct_B.astype(jnp.float32)], axis=-1)


_ROW_KEYS = ("tokens", "segments", "positions", "weights")
_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _scorer(trainer):
    """`_row_scores` jitted once per trainer: params in its shardings, rows split over the batch
    axes, results replicated."""
    if trainer not in _SCORERS:
        rows = sharding.batch_sharding(trainer.mesh)
        _SCORERS[trainer] = jax.jit(
            functools.partial(_row_scores, trainer.model),
            in_shardings=(trainer.param_shardings, dict.fromkeys(_ROW_KEYS, rows)),
            out_shardings=sharding.replicated(trainer.mesh))
    return _SCORERS[trainer]


def score_rows(trainer, params, rows: tuple, name: str, batch_size: int, progress: bool
                ) -> np.ndarray:
    """[R, 3] float64 `_row_scores` of `rows` (tokens, segments, positions, weights); errors
    name the argument `name`."""
    arrays = dict(zip(_ROW_KEYS, check_rows(trainer, name, *rows), strict=True))
    sums = rowmap.map_rows(functools.partial(_scorer(trainer), params), arrays,
                           _whole_shards(trainer, batch_size), trainer.mesh, progress=progress,
                           desc=name)
    return sums.astype(np.float64)


def _whole_shards(trainer, batch_size: int) -> int:
    """`batch_size` rounded up to whole shards of the mesh's batch axes (the rows added are
    padding), so that any batch size fits any mesh; `rowmap` checks the rest."""
    shards = sharding.batch_parallel_size(trainer.mesh)
    return -(-batch_size // shards) * shards


def check_rows(trainer, name: str, tokens, segments, positions, weights, every_row: bool = True):
    """The four row arrays of a reference or task set as int32 / float32 numpy, after checking
    shapes, the model's limits and that targets count: in every row (`every_row`, as an accuracy
    needs), else somewhere in the set (as a weighted mean loss needs). Errors name `name`."""
    tokens, segments, positions = (np.asarray(x, np.int32) for x in (tokens, segments, positions))
    weights = np.asarray(weights, np.float32)
    cfg = trainer.model.cfg
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"{name}: needs [R, L] rows with R >= 1, got tokens of shape "
                         f"{tokens.shape}")
    if segments.shape != tokens.shape or positions.ndim != 2 or \
            weights.shape != positions.shape or positions.shape[0] != tokens.shape[0]:
        raise ValueError(f"{name}: tokens {tokens.shape} and segments {segments.shape} must be "
                         f"[R, L], positions {positions.shape} and weights {weights.shape} [R, K]")
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{name}: rows have {tokens.shape[1]} tokens, more than the model's "
                         f"max_seq_len {cfg.max_seq_len}")
    if not 0 <= tokens.min() <= tokens.max() < cfg.vocab_size:
        raise ValueError(f"{name}: token ids must be in [0, vocab_size={cfg.vocab_size})")
    if positions.size and not 0 <= positions.min() <= positions.max() < tokens.shape[1]:
        raise ValueError(f"{name}: positions must be in [0, L={tokens.shape[1]})")
    _, mask = loss.next_token_targets(tokens, segments)
    counted_R = (np.take_along_axis(np.asarray(mask), positions, 1) & (weights > 0)).any(1)
    if every_row and not counted_R.all():
        raise ValueError(f"{name}: row {int(np.argmin(counted_R))} has no next-token target "
                         "with a positive weight")
    if not counted_R.any():
        raise ValueError(f"{name}: no next-token target has a positive weight")
    return tokens, segments, positions, weights
