"""The train step against an independent loss + AdamW written here, golden values, schedules,
staged training."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxsel import config as config_lib
from jaxsel import loss, report, train
from jaxsel.data import pipeline
from jaxsel.data import pool as pool_lib
from tests.workers import train_steps


def _independent_loss(model, params, tokens, segments):
    """Mean next-token cross-entropy over pairs inside one document, written from scratch."""
    logits = model.apply(params, tokens, segments)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
    return -(target_logp * same_doc).sum() / same_doc.sum()


def _numpy_adamw(params, grads, mu, nu, count, optim, lr):
    """AdamW with global-norm clipping and decoupled weight decay on matrices only."""
    leaves = jax.tree.leaves(grads)
    norm = np.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in leaves))
    scale = min(1.0, optim.clip / norm)
    new = {}
    for k in params:
        g = np.asarray(grads[k], np.float64) * scale
        mu[k] = optim.b1 * mu[k] + (1 - optim.b1) * g
        nu[k] = optim.b2 * nu[k] + (1 - optim.b2) * g * g
        mhat = mu[k] / (1 - optim.b1 ** count)
        vhat = nu[k] / (1 - optim.b2 ** count)
        decay = optim.weight_decay * params[k] if params[k].ndim >= 2 else 0.0
        new[k] = params[k] - lr * (mhat / (np.sqrt(vhat) + optim.eps) + decay)
    return new


def test_train_step_equals_independent_adamw():
    config = train_steps.tiny_config()
    # eps well above float32 noise in near-zero gradients, where g / (|g| + eps) is ill-conditioned.
    config.optim.update(schedule="constant", warmup_steps=0, lr=1e-2, clip=0.5, eps=1e-6)
    trainer = train.Trainer(config)
    state = trainer.new_state(trainer.init_params(0))
    flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x, np.float64)  # noqa: E731
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    expected = flat(state.params)
    mu = {k: np.zeros_like(v) for k, v in expected.items()}
    nu = {k: np.zeros_like(v) for k, v in expected.items()}
    for count, batch in enumerate(train_steps.batches(), start=1):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        independent = functools.partial(_independent_loss, trainer.model)
        expected_loss, grads = jax.value_and_grad(independent)(
            state.params, batch["tokens"], batch["segments"])
        state, metrics = trainer.train_step(state, batch)
        np.testing.assert_allclose(float(metrics["loss"]), float(expected_loss), rtol=1e-6)
        expected = _numpy_adamw(expected, flat(grads), mu, nu, count, config.optim, 1e-2)
        got = flat(state.params)
        for k in expected:
            # 0.2% of one step's lr: float32 noise in near-zero gradients (rare tokens' rows)
            # moves Adam's g / sqrt(v) a little; a wrong update would be off by ~lr.
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=2e-5, err_msg=k)
    assert int(state.step) == train_steps.STEPS


def test_golden_losses():
    """Golden values of the tiny worker run: the first steps' losses, recorded once. A change in
    initialisation, model, loss or optimizer shows up here."""
    losses, _ = train_steps.run(train_steps.tiny_config())
    np.testing.assert_allclose(losses, [5.552841, 5.558996, 5.562061, 5.545115], atol=2e-5)


def test_loss_ignores_padding_and_cross_document_pairs():
    tokens = jnp.asarray([[3, 4, 5, 6, 7, 0]])
    segments = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    _, mask = loss.next_token_targets(tokens, segments)
    np.testing.assert_array_equal(mask[0], [True, False, True, True, False, False])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_equals_optax_in_value_and_gradient(dtype):
    """`loss.cross_entropy` (its own backward pass, gradient in the logits' dtype) against optax's
    cross-entropy on the same logits taken to float32, differentiated by autodiff."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 3, (3, 5, 37)), dtype)
    targets = jnp.asarray(rng.integers(0, 37, (3, 5)), jnp.int32)
    weights = jnp.asarray(rng.uniform(0, 1, (3, 5)), jnp.float32)

    def reference(x):
        return optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), targets)

    ours, theirs = loss.cross_entropy(logits, targets), reference(logits)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    grad, reference_grad = (jax.grad(lambda x, f=f: (f(x) * weights).sum())(logits)
                            for f in (lambda x: loss.cross_entropy(x, targets), reference))
    assert grad.dtype == dtype
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(grad, np.float32),
                               np.asarray(reference_grad, np.float32), atol=tolerance)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_closed_form(schedule):
    optim = config_lib.base_config("tiny").optim
    optim.update(schedule=schedule, lr=1.0, warmup_steps=10, min_lr_ratio=0.1,
                 decay_steps=20)
    fn, _ = train.make_schedule(optim, 100), None
    assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(0.5)
    assert float(fn(10)) == pytest.approx(1.0)
    if schedule == "cosine":
        assert float(fn(55)) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
        assert float(fn(100)) == pytest.approx(0.1)
    elif schedule == "wsd":
        assert float(fn(79)) == pytest.approx(1.0)
        assert float(fn(90)) == pytest.approx(0.55)
        assert float(fn(100)) == pytest.approx(0.1)
    else:
        assert float(fn(99)) == pytest.approx(1.0)


def test_continue_from_carries_params_optimizer_and_step(tmp_path):
    """Staged training: a first stage stops at `train.stop_at` on a schedule spanning
    `train.steps`; a run with `continue_from` goes on from its params, AdamW moments and step (so
    the schedule), on its own data; equal to stepping the restored state."""
    config = train_steps.tiny_config()
    config.model.vocab_size = 512  # A byte-level BPE needs more than 256.
    config.data.update(source="synthetic", synthetic_docs_per_domain=20,
                       cache_dir=str(tmp_path / "cache"))
    config.train.update(steps=6, stop_at=3, log_every=1, checkpoint_every=3)
    config.optim.update(schedule="cosine", warmup_steps=2)
    train_pool = pool_lib.build_pools(config)["train"]
    data = lambda ids, seed: iter(pipeline.make_batches(  # noqa: E731
        train_pool, ids, config.train.batch_size, seed, 0, 1))
    first_ids, second_ids = np.arange(0, 30), np.arange(30, 60)
    trainer = train.Trainer(config)
    first = train.run(config, str(tmp_path / "first"), data(first_ids, 0), trainer)
    assert first["steps"] == int(first["state"].step) == 3
    lrs = [row["lr"] for row in report.read_jsonl(tmp_path / "first" / "metrics.jsonl")]
    np.testing.assert_allclose(lrs, [trainer.schedule(s) for s in range(3)], rtol=1e-6)
    assert lrs[-1] == pytest.approx(config.optim.lr)  # Warmup done, the 6-step cosine not.
    second_config = ml_collections.ConfigDict(config.to_dict())
    second_config.continue_from = str(tmp_path / "first")
    second_config.train.stop_at = 0
    second = train.run(second_config, str(tmp_path / "second"), data(second_ids, 1))
    assert int(second["state"].step) == 6
    state = jax.tree.map(jnp.array, first["state"])
    steps = train.Trainer(second_config)
    for _, batch in zip(range(3), data(second_ids, 1), strict=False):
        state, _ = steps.train_step(state, {k: jnp.asarray(batch[k])
                                            for k in ("tokens", "segments")})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 jax.tree.map(np.asarray, second["state"].params),
                 jax.tree.map(np.asarray, state.params))
    with pytest.raises(FileNotFoundError, match="continue_from"):
        second_config.continue_from = str(tmp_path / "nothing")
        train.run(second_config, str(tmp_path / "third"), data(second_ids, 1))
    second_config.init_from = str(tmp_path / "first")
    with pytest.raises(config_lib.ConfigError, match="continue_from"):
        config_lib.validate(second_config, jax.device_count())


def test_mixed_precision_keeps_params_optimizer_and_loss_in_float32():
    """The accelerator presets compute in bfloat16 with float32 params, optimizer state and
    loss (the logits stay bfloat16); a bfloat16 model's loss stays near the float32 model's on
    the same params."""
    for preset in ("small", "410m", "1b"):
        assert config_lib.base_config(preset).model.dtype == "bfloat16"
    assert config_lib.base_config("tiny").model.dtype == "float32"
    config = train_steps.tiny_config()
    batch = next(train_steps.batches())
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    f32 = train.Trainer(config)
    params = f32.init_params(0)
    config.model.dtype = "bfloat16"
    bf16 = train.Trainer(config)
    logits = bf16.model.apply(params, batch["tokens"], batch["segments"])
    assert logits.dtype == jnp.bfloat16
    state, metrics = bf16.train_step(bf16.new_state(params), batch)
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)} and metrics["loss"].dtype == jnp.float32
    _, reference = f32.train_step(f32.new_state(f32.init_params(0)), batch)
    assert float(metrics["loss"]) == pytest.approx(float(reference["loss"]), rel=1e-2)


def test_checkpoints_of_per_layer_blocks_load_stacked(tmp_path):
    """A checkpoint written before the layer scan (one `block_<i>` subtree per layer, in params
    and in the AdamW moments) restores into today's stacked `blocks`, as a train state and as
    params alone."""
    from jaxsel import checkpoint

    config = train_steps.tiny_config()
    trainer = train.Trainer(config)
    state = trainer.new_state(trainer.init_params(0))
    batch = {k: jnp.asarray(v) for k, v in next(train_steps.batches()).items()}
    state, _ = trainer.train_step(state, batch)  # Non-zero moments.
    old_params = checkpoint.unstack_layers(state.params)
    layers = config.model.num_layers
    assert sorted(k for k in old_params["params"] if k.startswith("block")) == [
        f"block_{i}" for i in range(layers)]
    last = old_params["params"][f"block_{layers - 1}"]
    np.testing.assert_array_equal(last["mlp"]["up"]["kernel"],
                                  state.params["params"]["blocks"]["mlp"]["up"]["kernel"][-1])
    mngr = checkpoint.manager(str(tmp_path))
    checkpoint.save(mngr, 1, old_params, checkpoint.unstack_layers(state.opt_state),
                    {"step": 1, "data": {}})
    mngr.wait_until_finished()
    mngr.close()
    restored, meta = train.load_state(trainer, str(tmp_path))
    assert meta["step"] == 1 and int(restored.step) == 1
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    same(jax.tree.map(np.asarray, restored.params), jax.tree.map(np.asarray, state.params))
    same(jax.tree.map(np.asarray, restored.opt_state), jax.tree.map(np.asarray, state.opt_state))
    params = checkpoint.load_params(str(tmp_path), trainer.abstract_params())
    same(jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, state.params))


def test_bfloat16_warns_once_where_matmuls_lack_it(caplog):
    device = jax.devices()[0]
    train.warn_without_bf16_matmuls.cache_clear()
    config = train_steps.tiny_config()
    config.model.dtype = "bfloat16"
    with caplog.at_level("WARNING"):
        train.Trainer(config)
        train.Trainer(config)
    warnings = [r for r in caplog.records if "no bfloat16 matmul units" in r.getMessage()]
    assert len(warnings) == (0 if train.has_bf16_matmuls(device) else 1)
