"""lm-evaluation-harness on a trained jaxsel model: `JaxselLM`, registered as the model `jaxsel`.

    python -m jaxsel.lm_eval --model jaxsel --model_args workdir=RUN --tasks arc_easy,piqa \
        --batch_size 64 --output_path results/

    import lm_eval
    import jaxsel.lm_eval  # Registers the model name `jaxsel`.
    lm_eval.simple_evaluate(model="jaxsel", model_args="workdir=RUN", tasks=["arc_easy"])

The command line is lm-eval's own (`python -m jaxsel.lm_eval --help`, `--include_path` for local
task YAMLs...); this module only registers the model first. Model args (`--model_args k=v,...`):

- `workdir`: a run's folder (`config.json` and `checkpoints/`, e.g. `experiments.pretrain`'s) or a
  model's folder in the model pool (`model.json` and `checkpoints/`, `jaxsel.runs.model`). The
  model, its mesh and shardings are the config's `train.Trainer`; the params its latest
  checkpoint (`step=S` for another); the tokenizer the pool's `tokenizer.json` (the pool the
  config names, as `runs.load_data` finds it), or `tokenizer=PATH/tokenizer.json`.
- `max_length`: the context in tokens (default: the length the model was trained on,
  `data.seq_len`, below `model.max_seq_len`). Longer requests lose tokens on the left, as
  lm-eval's own models do.
- `max_gen_toks` (default 256) for `generate_until` when a task does not set it.

Every log-likelihood request (and each of lm-eval's rolling windows, `get_rolling_token_windows`)
is one row scored by `evaluate`'s scorer (`loss.losses_at`: the summed log-probabilities of the
continuation and whether greedy decoding gives it), rows grouped by length into power-of-two
buckets and fed through `rowmap.map_rows` in padded batches of `batch_size`: one compiled shape
per bucket. `generate_until` decodes greedily, all requests at once, one token per step for
every unfinished one (no KV cache: each step reads the last `max_length` tokens again) until an
`until` string, the end-of-document token or `max_gen_toks`. lm-eval is an optional extra:
`pip install -e '.[lm_eval]'`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxsel import checkpoint, evaluate, files, report, rowmap, runs, sharding, train
from jaxsel import config as config_lib
from jaxsel.data import pool as pool_lib
from jaxsel.data import tokenizer as tokenizer_lib

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own model names, registered first)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.models import utils as lm_model_utils
except ImportError as e:  # pragma: no cover
    raise ImportError("jaxsel.lm_eval needs lm-evaluation-harness: pip install -e '.[lm_eval]'"
                      ) from e

MODEL_NAME = "jaxsel"
DEFAULT_BATCH_SIZE = 64  # Rows per batch when lm-eval's batch size is "auto" or unset.
MIN_WIDTH = 16  # The shortest length bucket.
log = logging.getLogger(__name__)


def load(workdir: str, tokenizer: str | None = None, step: int | None = None):
    """(trainer, params, tokenizer, trained length) of a run's folder or a model pool folder
    (see the module docstring); errors name `workdir`."""
    config, pool_name = _config(workdir)
    try:
        trainer = train.Trainer(config)
    except config_lib.ConfigError:  # The run's mesh does not fit these devices: data only.
        config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
        trainer = train.Trainer(config)
    try:
        params = checkpoint.load_params(workdir, trainer.abstract_params(), step)
    except FileNotFoundError:
        models = sorted(str(m.parent) for m in
                        files.path(workdir).glob(f"models/*/{runs.MODEL_FILE}"))
        hint = "".join(f"; a model of this run: workdir={m}" for m in models[:5])
        raise FileNotFoundError(f"workdir={workdir}: no params (no checkpoint"
                                f"{'' if step is None else f' at step {step}'} under "
                                f"{os.path.join(workdir, 'checkpoints')}){hint}") from None
    path = tokenizer or _pool_tokenizer(workdir, config, pool_name)
    tok = tokenizer_lib.load_tokenizer(path)
    if tok.get_vocab_size(with_added_tokens=True) > config.model.vocab_size:
        raise ValueError(f"tokenizer={path}: its vocabulary is larger than the model's "
                         f"vocab_size={config.model.vocab_size}")
    return trainer, params, tok, int(config.data.seq_len)


def _config(workdir: str) -> tuple[ml_collections.ConfigDict, str | None]:
    """The config the model in `workdir` was trained with, and its pool's name when known: a
    run's config.json, or a model's model.json (its identity: model, optimizer, sequence length
    and pool; the data settings of the run it lies in, `<run>/models/<key>`, where there is one)."""
    run_json, model_json = (os.path.join(workdir, f) for f in ("config.json", runs.MODEL_FILE))
    if files.path(run_json).is_file():
        return ml_collections.ConfigDict(report.read_json(run_json)), None
    if not files.path(model_json).is_file():
        raise FileNotFoundError(f"workdir={workdir}: neither a run's folder (config.json) nor a "
                                f"model pool folder ({runs.MODEL_FILE})")
    identity = report.read_json(model_json)["identity"]
    parent = os.path.join(os.path.dirname(os.path.dirname(os.fspath(workdir).rstrip("/"))),
                          "config.json")
    config = (ml_collections.ConfigDict(report.read_json(parent)) if files.path(parent).is_file()
              else config_lib.base_config())
    config.model = ml_collections.ConfigDict(identity["model"])
    config.optim = ml_collections.ConfigDict(identity["optim"])
    config.data.seq_len, config.train.steps = identity["seq_len"], identity["steps"]
    return config, identity["pool"]


def _pool_tokenizer(workdir: str, config, pool_name: str | None) -> str:
    """The tokenizer.json of the pool the config names (`pool.build_pools`' folder), else the
    config's `data.tokenizer`."""
    tried = []
    try:
        name = pool_name or f"{config.data.source}-{pool_lib.pool_key(config)}"
        tried.append(os.path.join(pool_lib.cache_root(config.data), "pools", name,
                                  "tokenizer.json"))
    except (OSError, ValueError) as e:  # E.g. the source's files are gone.
        tried.append(f"the pool ({e})")
    tried += [config.data.tokenizer] if config.data.tokenizer else []
    for path in tried:
        if files.path(path).is_file():
            return path
    raise FileNotFoundError(f"workdir={workdir}: no tokenizer (tried {', '.join(tried)}); pass "
                            "the model arg tokenizer=PATH/tokenizer.json")


def _bucket(length: int, cap: int) -> int:
    """`length` rounded up to a power of two (at least MIN_WIDTH), at most `cap`."""
    return min(cap, max(MIN_WIDTH, 1 << (length - 1).bit_length()))


def _greedy_next(model, params, batch) -> jax.Array:
    """[B] int32: the argmax next token after each row's `positions` (one per row)."""
    logits_BxKxV = model.apply(params, batch["tokens"], batch["segments"],
                               logit_positions_BxK=batch["positions"])
    return jnp.argmax(logits_BxKxV[:, 0], axis=-1).astype(jnp.int32)


class JaxselLM(TemplateLM):
    """lm-eval's `LM` over a jaxsel workdir (see the module docstring). lm-eval's `TemplateLM`
    tokenizes (`_encode_pair`: the context's trailing whitespace moves to the continuation; an
    empty context is the end-of-document token) exactly as `tasks.multiple_choice_from_texts`."""

    def __init__(self, workdir: str, tokenizer: str | None = None, step: int | None = None,
                 max_length: int | None = None, batch_size: int | str | None = None,
                 max_gen_toks: int = 256, max_batch_size=None, device=None):
        super().__init__()
        del max_batch_size, device  # lm-eval passes them to every model; JAX places arrays.
        self.trainer, self.params, self.tokenizer, trained = load(workdir, tokenizer, step)
        # A row holds the `max_length` inputs and the last target, which is never an input.
        limit = self.trainer.model.cfg.max_seq_len - 1
        self.max_length = int(max_length or min(trained, limit))
        if not 1 <= self.max_length <= limit:
            raise ValueError(f"max_length={max_length}: must be in [1, model.max_seq_len - 1 = "
                             f"{limit}]")
        auto = batch_size is None or str(batch_size).startswith("auto")
        size = DEFAULT_BATCH_SIZE if auto else int(batch_size)
        if size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        multiple = rowmap.batch_multiple(self.trainer.mesh)  # Whole shards of the mesh.
        self.batch_size = -(-size // multiple) * multiple
        self.max_gen_toks = int(max_gen_toks)
        self._eot = tokenizer_lib.eos_id(self.tokenizer)
        rows = sharding.batch_sharding(self.trainer.mesh)
        self._greedy = jax.jit(
            functools.partial(_greedy_next, self.trainer.model),
            in_shardings=(self.trainer.param_shardings, dict.fromkeys(
                ("tokens", "segments", "positions"), rows)),
            out_shardings=sharding.replicated(self.trainer.mesh))

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                   ) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each `((context, continuation), context_ids,
        continuation_ids)`."""
        rows = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens is longer than "
                                 f"max_length={self.max_length}")
            rows.append((list(context or [self.prefix_token_id]) + list(continuation),
                         len(continuation)))
        scores = self._score(rows, "loglikelihood", disable_tqdm)
        results = [(float(-s[0]), bool(s[2])) for s in scores]
        for (args, *_), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string given the end-of-document token, over
        lm-eval's disjoint rolling windows of `max_length` tokens (each token predicted once,
        with as much context as fits)."""
        rows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length, 1)
            for context, target in map(lm_utils.make_disjoint_window, windows):
                rows.append((context + target, len(target)))
                owners.append(i)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owners, np.int64),
                  -self._score(rows, "loglikelihood_rolling", disable_tqdm)[:, 0])
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    def _score(self, rows: list[tuple[list[int], int]], desc: str, disable_tqdm: bool
               ) -> np.ndarray:
        """[N, 3] `evaluate` scores (summed loss, weight, all greedy) of rows `(tokens, n)`
        whose last n tokens are scored, left-truncated to `max_length` inputs."""
        out = np.zeros((len(rows), 3))
        out[:, 2] = 1.0  # A row with nothing to score is greedy, with log-likelihood 0.
        truncated = sum(len(tokens) > self.max_length + 1 for tokens, _ in rows)
        if truncated:
            log.warning("%s: %d requests longer than max_length=%d lost tokens on the left",
                        desc, truncated, self.max_length)
        cut = [(tokens[-(self.max_length + 1):], n) for tokens, n in rows]
        widths = np.array([_bucket(len(t), self.max_length + 1) if n else 0 for t, n in cut])
        for width in np.unique(widths[widths > 0]):
            idx = np.flatnonzero(widths == width)
            k = _bucket(max(cut[i][1] for i in idx), int(width))
            tokens, segments = (np.zeros((idx.size, width), np.int32) for _ in range(2))
            positions, weights = np.zeros((idx.size, k), np.int32), np.zeros((idx.size, k))
            for r, i in enumerate(idx):
                row, n = cut[i]
                tokens[r, :len(row)], segments[r, :len(row)] = row, 1
                positions[r, :n], weights[r, :n] = np.arange(len(row) - 1 - n, len(row) - 1), 1
            out[idx] = evaluate.score_rows(
                self.trainer, self.params, (tokens, segments, positions, weights),
                f"{desc} (length {width})", self.batch_size,
                not disable_tqdm and len(idx) > self.batch_size)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut before the first of its `until` strings (lm-eval's
        `gen_kwargs`; sampling is not supported: decoding is greedy)."""
        texts = [""] * len(requests)
        settings, new = [], [[] for _ in requests]
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = lm_model_utils.normalize_gen_kwargs(dict(gen_kwargs or {}),
                                                         self.max_gen_toks)
            if kwargs.get("do_sample"):
                lm_utils.warning_once(log, "jaxsel decodes greedily; do_sample is ignored")
            until = lm_model_utils.handle_stop_sequences(kwargs["until"], eos=None)
            settings.append((self.tok_encode(context) or [self.prefix_token_id], until,
                             kwargs["max_gen_toks"]))
        active = [i for i, (*_, budget) in enumerate(settings) if budget > 0]
        bar = tqdm(total=len(requests), desc="generate_until",
                   disable=disable_tqdm or jax.process_index() != 0)
        bar.update(len(requests) - len(active))
        while active:
            windows = [(settings[i][0] + new[i])[-self.max_length:] for i in active]
            still = []
            for i, token in zip(active, self._next_tokens(windows), strict=True):
                _, until, budget = settings[i]
                if token != self._eot:
                    new[i].append(int(token))
                    texts[i] = self.tok_decode(new[i])
                    if len(new[i]) < budget and not any(u in texts[i] for u in until if u):
                        still.append(i)
            bar.update(len(active) - len(still))
            active = still
        bar.close()
        results = [lm_model_utils.postprocess_generated_text(text, until, None)
                   for text, (_, until, _) in zip(texts, settings, strict=True)]
        for req, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, result)
        return results

    def _next_tokens(self, windows: list[list[int]]) -> np.ndarray:
        """The greedy next token after each window (at most `max_length` tokens), in padded
        batches of one power-of-two length bucket."""
        width = _bucket(max(len(w) for w in windows), self.max_length)
        tokens, segments = (np.zeros((len(windows), width), np.int32) for _ in range(2))
        for r, window in enumerate(windows):
            tokens[r, :len(window)], segments[r, :len(window)] = window, 1
        positions = np.array([[len(w) - 1] for w in windows], np.int32)
        return rowmap.map_rows(functools.partial(self._greedy, self.params),
                               dict(tokens=tokens, segments=segments, positions=positions),
                               self.batch_size, self.trainer.mesh)


# A lazy entry (as lm-eval registers its own models): resolving the name imports this module as
# `jaxsel.lm_eval`, also under `python -m jaxsel.lm_eval`, where this file runs as `__main__`.
model_registry.register(MODEL_NAME, target="jaxsel.lm_eval:JaxselLM")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (`argv`, default `sys.argv[1:]`) with the model `jaxsel`."""
    from lm_eval.__main__ import cli_evaluate

    sharding.maybe_initialize_distributed()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
