"""Train state, optimizer, the jitted train step and the training loop.

`train_step(state, batch, model, tx)` is a pure function; `Trainer` jits it once with the state's
shardings (parameters by logical names, batch over data x fsdp) and donates the old state. The loop
resumes from `<workdir>/checkpoints` (params, optimizer, step and the grain iterator state), logs
to `<workdir>/metrics.jsonl` and TensorBoard event files (`<workdir>/tensorboard`, `run_log`),
traces `train.profile_steps` and draws `<workdir>/loss_curve.png` when it ends.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxsel import checkpoint, figures, files, loss, report, run_log, sharding
from jaxsel.model import attention
from jaxsel.model.transformer import ModelConfig, Transformer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """cosine (warmup, cosine to min), wsd (warmup, stable, then a linear decay to min over the
    last `optim.decay_steps`), or constant."""
    lr, warmup = optim.lr, min(optim.warmup_steps, total_steps)
    end = lr * optim.min_lr_ratio
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                                  end)
    warm = optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    if optim.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(lr)], [warmup])
    decay_steps = max(1, min(optim.decay_steps, total_steps))
    stable_end = max(warmup, total_steps - decay_steps)
    return optax.join_schedules(
        [warm, optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay_steps)],
        [warmup, stable_end])


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping; weight decay on matrices only (not norms)."""
    schedule = make_schedule(optim, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(optim.clip), adamw) if optim.clip > 0 else adamw
    return tx, schedule


def train_step(state: TrainState, batch: loss.Batch, model: nn.Module,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One AdamW step on the batch's mean token loss."""
    (value, aux), grads = jax.value_and_grad(loss.make_loss_fn(model), has_aux=True)(
        state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads),
               "num_tokens": aux["num_tokens"]}
    return TrainState(state.step + 1, params, opt_state), metrics


def has_bf16_matmuls(device) -> bool:
    """TPUs and NVIDIA GPUs from Ampere (compute capability 8.0) on multiply bfloat16 natively."""
    if device.platform == "gpu":
        return float(getattr(device, "compute_capability", "0")) >= 8.0
    return device.platform == "tpu"


@functools.cache
def warn_without_bf16_matmuls(device) -> None:
    """Warns once per device kind that bfloat16 runs emulated (slower than float32) there."""
    if not has_bf16_matmuls(device):
        logging.warning("model.dtype=bfloat16 on %s (%s), which has no bfloat16 matmul units: "
                        "its matmuls are emulated and slower than float32", device.platform,
                        device.device_kind)


class Trainer:
    """Everything a run needs that follows from its config: model, optimizer, mesh, shardings and
    the jitted step functions. Pure functions underneath; this only holds them together."""

    def __init__(self, config: ml_collections.ConfigDict, mesh=None):
        self.config = config
        self.mesh = sharding.make_mesh(config) if mesh is None else mesh
        model_config = ModelConfig.from_config(config.model)
        self.model = Transformer(model_config, mesh=self.mesh)
        self.attention = attention.resolve(model_config.attention, jax.default_backend(),
                                           model_config.dtype, model_config.head_dim,
                                           config.data.seq_len)
        if model_config.dtype == "bfloat16":
            warn_without_bf16_matmuls(jax.devices()[0])
        self.tx, self.schedule = make_optimizer(config.optim, config.train.steps)
        self.rules = sharding.logical_rules(config)
        boxed_params = jax.eval_shape(self._init_boxed, jax.random.key(0))
        self.param_shardings = sharding.logical_shardings(boxed_params, self.mesh, self.rules)
        abstract_params = nn.unbox(boxed_params)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        # Optimizer moments follow the params' shardings; scalars (counts) are replicated.
        opt_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
            transform_non_params=lambda _: sharding.replicated(self.mesh))
        self.state_shardings = TrainState(sharding.replicated(self.mesh), self.param_shardings,
                                          opt_shardings)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt),
            self.state_shardings)
        batch_shardings = {"tokens": sharding.batch_sharding(self.mesh),
                           "segments": sharding.batch_sharding(self.mesh)}
        self.train_step = jax.jit(
            functools.partial(train_step, model=self.model, tx=self.tx),
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
            donate_argnums=0)
        self.sequence_losses = jax.jit(
            self._sequence_losses, in_shardings=(self.param_shardings, batch_shardings),
            out_shardings=sharding.replicated(self.mesh))

    def _init_boxed(self, rng):
        """Params with their logical axis names (shapes do not depend on the sequence length)."""
        tokens = jnp.zeros((1, 8), jnp.int32)
        return self.model.init(rng, tokens, jnp.ones_like(tokens))

    def _sequence_losses(self, params, batch):
        """[B, 2]: the sum of token losses and the number of target tokens of each sequence."""
        logits = self.model.apply(params, batch["tokens"], batch["segments"])
        losses_BxL, mask_BxL = loss.token_losses(logits, batch["tokens"], batch["segments"])
        return jnp.stack([losses_BxL.sum(-1), mask_BxL.sum(-1)], axis=-1)

    def init_params(self, seed: int):
        init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)),
                       out_shardings=self.param_shardings)
        return init(jax.random.key(seed))

    def new_state(self, params) -> TrainState:
        """A fresh optimizer on the given params (a new run, or continued pretraining)."""
        make = jax.jit(lambda p: TrainState(jnp.zeros((), jnp.int32), p, self.tx.init(p)),
                       in_shardings=(self.param_shardings,), out_shardings=self.state_shardings)
        return make(params)

    def abstract_params(self):
        return self.abstract_state.params


def run(config: ml_collections.ConfigDict, workdir: str, batches: Iterator[dict],
        trainer: Trainer | None = None, evaluate_fn=None) -> dict:
    """The training loop. `batches` is a grain iterator over this process's slice of each global
    batch; its state is checkpointed beside the model so a resumed run sees the same data.

    Resumes from the latest checkpoint in `workdir`; otherwise continues the state of
    `config.continue_from`, or starts from `config.init_from`'s params, or a fresh init.
    `evaluate_fn(params, step) -> dict` runs every `train.eval_every` steps (its numbers go to
    metrics.jsonl). Training stops after step `train.stop_at` (0: `train.steps`, which the
    learning-rate schedule spans either way). Returns the last logged loss, the step count and the
    final state.
    """
    trainer = trainer or Trainer(config)
    t = config.train
    mngr = checkpoint.manager(workdir, keep=t.keep_checkpoints)
    state = _initial_state(config, trainer, mngr, batches)
    start = int(state.step)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() == 0:
        _truncate_metrics(metrics_path, start)
    tokens_per_step = t.batch_size * config.data.seq_len
    events, profile = run_log.Events(workdir, start), run_log.Profile(workdir, t.profile_steps)
    pending: list[tuple[int, dict]] = []
    last_loss = float("nan")
    clock = time.perf_counter()
    clock_step = start
    end = t.stop_at or t.steps
    for step in range(start + 1, end + 1):
        host_batch = next(batches)
        if trainer.attention == "cudnn":
            attention.check_runs(host_batch["segments"], config.model.max_segments)
        batch = sharding.global_batch(host_batch, trainer.mesh)
        profile.before(step)
        state, metrics = trainer.train_step(state, {"tokens": batch["tokens"],
                                                    "segments": batch["segments"]})
        profile.after(step, state)
        pending.append((step, metrics))
        log_now = step % t.log_every == 0 or step == end
        save_now = step % t.checkpoint_every == 0 or step == end
        eval_now = t.eval_every and step % t.eval_every == 0
        if not (log_now or save_now or eval_now):
            continue
        # One host sync per interval: fetch the losses, refuse to save a non-finite state.
        rows = [{"step": s, **{k: float(v) for k, v in jax.device_get(m).items()}}
                for s, m in pending]
        pending = []
        bad = [r["step"] for r in rows if not np.isfinite(r["loss"])]
        if bad:
            _drop_bad_checkpoints(mngr, bad[0])
            raise FloatingPointError(
                f"non-finite loss at step {bad[0]}; the last good checkpoint is step "
                f"{mngr.latest_step()} in {workdir}/checkpoints")
        last_loss = rows[-1]["loss"]
        now = time.perf_counter()
        steps_per_s = (step - clock_step) / max(now - clock, 1e-9)
        clock, clock_step = now, step
        row = {**rows[-1], "lr": float(trainer.schedule(step - 1)), "steps_per_s": steps_per_s,
               "tokens_per_s": steps_per_s * tokens_per_step}
        if eval_now and evaluate_fn is not None:
            row["eval"] = evaluate_fn(state.params, step)
        if jax.process_index() == 0:
            files.append_text(metrics_path, json.dumps(row) + "\n")
        events.write(row)
        if log_now:
            eta = (end - step) / max(steps_per_s, 1e-9)
            logging.info("step %d/%d loss %.4f lr %.2e %.2f steps/s %.0f tokens/s ETA %s",
                         step, end, last_loss, row["lr"], steps_per_s, row["tokens_per_s"],
                         _format_seconds(eta))
        if save_now:
            checkpoint.save(mngr, step, state.params, state.opt_state,
                            {"step": step, "data": batches.get_state()})
    mngr.wait_until_finished()
    mngr.close()
    profile.close()
    events.close()
    run_log.log_model_and_memory(state.params)
    if jax.process_index() == 0:
        figures.loss_curves({os.path.basename(workdir.rstrip("/")) or "run":
                             report.read_jsonl(metrics_path)},
                            os.path.join(workdir, "loss_curve.png"))
    return {"final_loss": last_loss, "steps": end, "state": state, "trainer": trainer}


def load_state(trainer: Trainer, workdir: str, mngr=None) -> tuple[TrainState, dict]:
    """The latest train state (params, optimizer state, step) saved in `workdir` (or by `mngr`),
    in the trainer's shardings, and its meta."""
    own = mngr is None
    mngr = checkpoint.manager(workdir, read_only=True) if own else mngr
    if mngr.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    params, opt_state, meta = checkpoint.restore(
        mngr, trainer.abstract_state.params, trainer.abstract_state.opt_state)
    if own:
        mngr.close()
    step = jax.device_put(jnp.asarray(meta["step"], jnp.int32), trainer.state_shardings.step)
    return TrainState(step, params, opt_state), meta


def _initial_state(config, trainer: Trainer, mngr, batches) -> TrainState:
    if mngr.latest_step() is not None:
        state, meta = load_state(trainer, mngr.directory, mngr)
        batches.set_state(meta["data"])
        logging.info("resumed from step %d", meta["step"])
        return state
    if config.continue_from:
        try:
            state, meta = load_state(trainer, config.continue_from)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"config.continue_from: {e}") from None
        logging.info("continuing %s from step %d", config.continue_from, meta["step"])
        return state
    if config.init_from:
        params = checkpoint.load_params(config.init_from, trainer.abstract_params())
        logging.info("continued pretraining from %s", config.init_from)
    else:
        params = trainer.init_params(config.seed)
    return trainer.new_state(params)


def _drop_bad_checkpoints(mngr, bad_step: int) -> None:
    """The loss of step s is computed with the params saved at step s - 1, so a non-finite loss
    at `bad_step` condemns the checkpoint of `bad_step - 1` (and any later one)."""
    mngr.wait_until_finished()
    for step in mngr.all_steps():
        if step >= bad_step - 1:
            mngr.delete(step)


def _truncate_metrics(path: str, step: int) -> None:
    """Drops rows logged after `step` (a resumed run will log them again)."""
    if not files.path(path).exists():
        return
    rows = [json.dumps(row) + "\n" for row in report.read_jsonl(path) if row["step"] <= step]
    with files.atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(rows)


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
