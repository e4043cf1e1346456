"""The MATES influence model against independent computations: a learnable synthetic task, the kept
epoch's validation Spearman recomputed with scipy, two training steps by hand (jax.grad with the
documented dropout keys, clipping and AdamW written out), predictions row by row, the pretrained
weights kept, real MiniLM, 8 devices against one, bad input.

Most fits share the tiny encoder, batch shape and dropout switch of `worker.FIT`, so they reuse one
compiled train step (its learning rate, weight decay and clipping norm are inputs)."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxsel import influence_model as im
from jaxsel.model import encoder as encoder_lib
from tests.workers import influence_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    return worker.tiny_encoder()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tiny):
    """The synthetic task fitted on one device, while the 8-device worker fits it too."""
    eight = tmp_path_factory.mktemp("influence") / "eight.npz"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.influence_worker", str(eight)], cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"})
    try:
        result, preds = worker.run()
        yield dict(result=result, preds=preds, data=worker.task_inputs(tiny), worker=process,
                   eight=eight)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _mask(ids_NxM, lengths_N):
    return np.arange(ids_NxM.shape[1])[None, :] < np.asarray(lengths_N)[:, None]


def test_learns_the_synthetic_task_in_original_units(synthetic):
    labels = synthetic["data"]["labels"][worker.NUM_FIT:]
    preds = synthetic["preds"]
    assert preds.shape == labels.shape and preds.dtype == np.float32
    assert scipy.stats.spearmanr(preds, labels).statistic > 0.8
    # Original units, not z-scores: the labels' mean and scale (about -0.15 and 0.15).
    assert abs(preds.mean() - labels.mean()) < 0.25 * labels.std()
    assert 0.6 < preds.std() / labels.std() < 1.4
    result = synthetic["result"]
    fit_labels = synthetic["data"]["labels"][:worker.NUM_FIT]
    assert result.label_mean == pytest.approx(fit_labels[result.train_rows].mean())
    assert result.label_std == pytest.approx(fit_labels[result.train_rows].std())


def test_split_is_90_10_and_disjoint(synthetic):
    result = synthetic["result"]
    assert len(result.val_rows) == 40 and len(result.train_rows) == 360
    assert sorted(np.concatenate([result.train_rows, result.val_rows])) == list(range(400))
    assert [h["epoch"] for h in result.history] == list(range(worker.FIT.epochs))


def test_kept_params_are_the_best_validation_epoch(synthetic, tiny):
    result, data = synthetic["result"], synthetic["data"]
    val = result.val_rows
    preds = im.predict(tiny, result.params, result.label_mean, result.label_std,
                       data["ids"][val], data["lengths"][val], batch_size=32, length_multiple=32,
                       progress=False)
    labels = data["labels"][val]
    z_preds = (preds - result.label_mean) / result.label_std
    z_labels = (labels - result.label_mean) / result.label_std
    best = result.history[result.best_epoch]
    assert scipy.stats.spearmanr(preds, labels).statistic == pytest.approx(best["val_spearman"],
                                                                           abs=1e-6)
    assert scipy.stats.pearsonr(preds, labels).statistic == pytest.approx(best["val_pearson"],
                                                                          abs=1e-4)
    assert np.mean((z_preds - z_labels) ** 2) == pytest.approx(best["val_mse"], rel=1e-4)
    assert best["val_spearman"] == max(h["val_spearman"] for h in result.history)


def test_best_epoch_need_not_be_the_last(synthetic, tiny):
    """On pure-noise labels validation Spearman wanders: the kept epoch is its argmax (here an
    early one), and its parameters are that epoch's (their recomputed Spearman matches)."""
    ids, lengths = synthetic["data"]["ids"][:worker.NUM_FIT], \
        synthetic["data"]["lengths"][:worker.NUM_FIT]
    labels = np.random.default_rng(2).standard_normal(worker.NUM_FIT)
    config = dataclasses.replace(worker.FIT, seed=2)  # The compiled step is reused.
    result = im.fit(tiny, ids, lengths, labels, config, progress=False)
    assert set(result.val_rows) != set(synthetic["result"].val_rows)  # Another seed, split.
    spearman = [h["val_spearman"] for h in result.history]
    assert 0 < result.best_epoch == int(np.argmax(spearman)) < len(spearman) - 1
    val = result.val_rows
    preds = im.predict(tiny, result.params, result.label_mean, result.label_std, ids[val],
                       lengths[val], batch_size=32, length_multiple=32, progress=False)
    assert scipy.stats.spearmanr(preds, labels[val]).statistic == pytest.approx(
        spearman[result.best_epoch], abs=1e-6)


def test_predict_matches_one_row_at_a_time(synthetic, tiny):
    """Rows come back aligned (shortest-first visiting undone), batches cut and padded without
    effect, z-scores mapped back: against the module applied to each row alone."""
    result, data = synthetic["result"], synthetic["data"]
    rows = np.arange(worker.NUM_FIT, worker.NUM_FIT + 24)
    preds = im.predict(tiny, result.params, result.label_mean, result.label_std,
                       data["ids"][rows], data["lengths"][rows], batch_size=16,
                       length_multiple=16, progress=False)
    apply = jax.jit(im.InfluenceRegressor(tiny.config, "mean").apply)
    for i, row in enumerate(rows):  # Each row alone, at the full width M (padding masked).
        ids = data["ids"][row:row + 1]
        z = float(apply(result.params, ids, _mask(ids, data["lengths"][row:row + 1]))[0])
        assert preds[i] == pytest.approx(z * result.label_std + result.label_mean, abs=1e-5)


def test_eight_devices_match_one_device(synthetic):
    assert synthetic["worker"].wait(timeout=300) == 0
    eight = np.load(synthetic["eight"])
    assert "fit_config.batch_size=12 must be a multiple of 8" in str(eight["refused"])
    history = synthetic["result"].history
    np.testing.assert_allclose(eight["train_loss"], [h["train_loss"] for h in history],
                               rtol=1e-4)
    np.testing.assert_allclose(eight["val_spearman"], [h["val_spearman"] for h in history],
                               atol=1e-3)
    assert int(eight["best_epoch"]) == synthetic["result"].best_epoch
    np.testing.assert_allclose(eight["preds"], synthetic["preds"], atol=1e-4)


@jax.jit
def _hand_adamw(params, grads, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    """Step t (1-based) of AdamW as optax.adamw applies it: decay on arrays of rank >= 2."""
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    params = jax.tree.map(
        lambda p, m, v: p - lr * ((m / (1 - b1**t)) / (jnp.sqrt(v / (1 - b2**t)) + eps)
                                  + (wd * p if p.ndim >= 2 else 0.0)), params, m, v)
    return params, m, v


def test_two_steps_equal_a_hand_computation(tiny):
    """With the whole training split in one batch (one step per epoch), the params after each
    epoch are: the z-scored MSE gradient by jax.grad of a hand-written loss (batch rows in the
    documented order, dropout from key fold_in(key(seed), step)), clipped to global norm 1e-3 by
    hand, then AdamW by hand with the linearly decaying learning rate (lr, then lr / 2)."""
    data = worker.task_inputs(tiny)
    ids, lengths, labels = data["ids"][:40], data["lengths"][:40], data["labels"][:40]
    seed = 7  # Same batch shape and dropout as worker.FIT: its compiled step is reused.
    config = dataclasses.replace(worker.FIT, learning_rate=1e-2, weight_decay=0.1, epochs=2,
                                 val_fraction=0.2, warmup_fraction=0.0, max_grad_norm=1e-3,
                                 seed=seed)
    before = jax.tree.map(np.array, tiny.params)
    result = im.fit(tiny, ids, lengths, labels, config, progress=False)
    jax.tree.map(np.testing.assert_array_equal, tiny.params, before)  # Not donated away.

    train = result.train_rows
    assert len(train) == config.batch_size == 32
    z = np.zeros(40, np.float32)
    z[train] = (labels[train] - labels[train].mean()) / labels[train].std()
    module = im.InfluenceRegressor(tiny.config, "mean")

    @jax.jit
    @jax.value_and_grad
    def loss(params, ids_BxM, mask_BxM, z_B, key):  # Width M = 32, as fit cuts this batch.
        preds = module.apply(params, ids_BxM, mask_BxM, False, rngs={"dropout": key})
        return jnp.mean((preds - z_B) ** 2)

    def by_hand(key_seed):
        params = {"params": {"encoder": tiny.params["params"],
                             "head": im.init_params(tiny, seed)["params"]["head"]}}
        m = jax.tree.map(jnp.zeros_like, params)
        v = jax.tree.map(jnp.zeros_like, params)
        trajectory, losses = [], []
        for step, lr in ((0, 1e-2), (1, 5e-3)):
            rows = np.random.default_rng((seed, step)).permutation(train)
            key = jax.random.fold_in(jax.random.key(key_seed), step)
            value, grads = loss(params, ids[rows], _mask(ids[rows], lengths[rows]), z[rows], key)
            norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
            assert norm > 1e-3  # Clipping is active.
            grads = jax.tree.map(lambda g, norm=norm: g * 1e-3 / norm, grads)
            params, m, v = _hand_adamw(params, grads, m, v, step + 1, lr)
            trajectory.append(params)
            losses.append(float(value))
        return trajectory, losses

    expected, losses = by_hand(seed)
    np.testing.assert_allclose([h["train_loss"] for h in result.history], losses, rtol=1e-5)
    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, result.params, expected[result.best_epoch])
    # Dropout is really on: other dropout keys lead elsewhere.
    other, _ = by_hand(seed + 1)
    head = result.params["params"]["head"]["kernel"]
    assert np.abs(head - other[result.best_epoch]["params"]["head"]["kernel"]).max() > 1e-4


def test_dropout_is_seeded(synthetic, tiny):
    """Refitting with the same seed gives the same split, history and params bit for bit."""
    data = synthetic["data"]
    again = im.fit(tiny, data["ids"][:worker.NUM_FIT], data["lengths"][:worker.NUM_FIT],
                   data["labels"][:worker.NUM_FIT], worker.FIT, progress=False)
    jax.tree.map(np.testing.assert_array_equal, again.params, synthetic["result"].params)
    assert again.history == synthetic["result"].history
    np.testing.assert_array_equal(again.val_rows, synthetic["result"].val_rows)


def test_init_params_keep_the_pretrained_encoder(tiny):
    params = im.init_params(tiny, seed=0)
    assert set(params["params"]) == {"encoder", "head"}
    jax.tree.map(np.testing.assert_array_equal, params["params"]["encoder"],
                 tiny.params["params"])
    head = params["params"]["head"]
    assert head["kernel"].shape == (32, 1) and head["bias"].shape == (1,)
    assert np.all(head["bias"] == 0) and 0 < np.std(head["kernel"]) < 0.05
    assert not np.array_equal(head["kernel"], im.init_params(tiny, seed=1)["params"]["head"]
                              ["kernel"])
    # The regressor is the encoder's mean-pooled embedding through the head.
    assert tiny.pooling == encoder_lib.Pooling("mean", normalize=False)
    data = worker.task_inputs(tiny)
    ids, lengths = data["ids"][:32], data["lengths"][:32]
    pooled = encoder_lib.embed_token_ids(tiny, ids, _mask(ids, lengths))
    want = pooled @ head["kernel"][:, 0] + head["bias"][0]
    got = im.predict(tiny, params, 0.0, 1.0, ids, lengths, batch_size=32, length_multiple=32,
                     progress=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_windows_are_encoded_apart_and_mean_pooled_together(tiny):
    """Inputs longer than the encoder's window (MATES: 1024 tokens as 2 x 512) are read window
    by window, positions restarting, and mean-pooled over every real token: the regressor
    equals the encoder run on each window, the hidden states concatenated, then pooled and the
    head applied by hand; and tokenising with `max_tokens` keeps [CLS] first, [SEP] last."""
    window = tiny.max_length
    texts = [" ".join(["word"] * n) for n in (3, window, 2 * window)]
    ids, lengths = encoder_lib.tokenize(tiny, texts, max_tokens=2 * window)
    assert ids.shape == (3, 2 * window) and lengths[0] < window < lengths[1] <= 2 * window
    assert lengths[2] == 2 * window and ids[2, 0] == ids[0, 0] and ids[2, -1] == ids[0, 4]
    mask = _mask(ids, lengths)
    params = im.init_params(tiny, seed=1)
    got = np.asarray(im.forward(params, ids, mask, module=im.make_module(tiny)))
    bert = encoder_lib.BertEncoder(tiny.config)
    enc = {"params": params["params"]["encoder"]}
    hidden = np.concatenate([np.asarray(bert.apply(enc, ids[:, s:s + window],
                                                   mask[:, s:s + window]))
                             for s in (0, window)], axis=1)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    head = params["params"]["head"]
    want = pooled @ np.asarray(head["kernel"])[:, 0] + np.asarray(head["bias"])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The same rows cut to their own lengths (as predict's batches are) give the same.
    short = np.asarray(im.forward(params, ids[:1, :window], mask[:1, :window],
                                  module=im.make_module(tiny)))
    np.testing.assert_allclose(short, got[:1], rtol=1e-5, atol=1e-6)


def test_real_minilm_composes():
    minilm = encoder_lib.load_encoder(max_length=32)
    assert minilm.pooling.normalize  # The regressor pools without normalising all the same.
    texts, labels = worker.synthetic_task(24, seed=2)
    ids, lengths = encoder_lib.tokenize(minilm, texts)
    # 16 training rows in 2 steps, 8 validation rows: one batch shape for all (fewer compiles).
    config = im.FitConfig(epochs=1, batch_size=8, val_fraction=1 / 3, dropout=False)
    result = im.fit(minilm, ids, lengths, labels, config, progress=False)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
    assert len(result.val_rows) == 8
    preds = im.predict(minilm, result.params, result.label_mean, result.label_std, ids, lengths,
                       batch_size=8, progress=False)
    assert preds.shape == (24,) and np.all(np.isfinite(preds))


@pytest.mark.parametrize("field, value", [
    ("learning_rate", 0.0), ("weight_decay", -0.1), ("epochs", 0), ("batch_size", 0),
    ("val_fraction", 1.0), ("val_fraction", 0.0), ("warmup_fraction", 1.0),
    ("max_grad_norm", -1.0), ("length_multiple", 0), ("seed", -1)])
def test_bad_hyperparameters_are_named(field, value):
    with pytest.raises(ValueError, match=f"fit_config.{field} "):
        im.FitConfig(**{field: value})


@pytest.fixture(scope="module")
def small(tiny):
    data = worker.task_inputs(tiny)
    return data["ids"][:30], data["lengths"][:30], data["labels"][:30]


@pytest.mark.parametrize("case, match", [
    ("ids_1d", "ids_NxM must be a non-empty"),
    ("lengths_short", "lengths_N must be"),
    ("influences_short", "influences_N has shape"),
    ("length_zero", r"lengths_N must lie in \[1, M=32\]"),
    ("length_over", r"lengths_N must lie in \[1, M=32\]"),
    ("id_out_of_vocab", r"ids_NxM: token ids .* \[0, vocab_size=30522\)"),
    ("nan_influence", "influences_N has 1 non-finite"),
    ("constant", "influences_N is constant"),
    ("too_few_val", "influences_N: N=10 .* 9 training and 1 validation"),
    ("too_few_train", "influences_N: N=3 .* 1 training and 2 validation"),
])
def test_bad_fit_input_is_named(tiny, small, case, match):
    ids, lengths, labels = (np.array(x) for x in small)
    config = im.FitConfig(epochs=1, batch_size=8)
    if case == "ids_1d":
        ids = ids[0]
    elif case == "lengths_short":
        lengths = lengths[:-1]
    elif case == "influences_short":
        labels = labels[:-1]
    elif case == "length_zero":
        lengths[3] = 0
    elif case == "length_over":
        lengths[3] = 33
    elif case == "id_out_of_vocab":
        ids[2, 0] = 30522
    elif case == "nan_influence":
        labels[4] = np.nan
    elif case == "constant":
        labels[:] = 1.5
    elif case == "too_few_val":
        ids, lengths, labels = ids[:10], lengths[:10], labels[:10]
    elif case == "too_few_train":
        ids, lengths, labels = ids[:3], lengths[:3], labels[:3]
        config = im.FitConfig(epochs=1, batch_size=8, val_fraction=0.5)
    with pytest.raises(ValueError, match=match):
        im.fit(tiny, ids, lengths, labels, config, progress=False)


def test_bad_predict_input_is_named(tiny, small):
    ids, lengths, _ = small
    params = im.init_params(tiny, 0)
    with pytest.raises(ValueError, match="lengths_N must be"):
        im.predict(tiny, params, 0.0, 1.0, ids, lengths[:-1], progress=False)
    with pytest.raises(ValueError, match="label_std=0.0"):
        im.predict(tiny, params, 0.0, 0.0, ids, lengths, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive multiple"):
        im.predict(tiny, params, 0.0, 1.0, ids, lengths, batch_size=0, progress=False)
