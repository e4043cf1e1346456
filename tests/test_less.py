"""LESS against a hand computation: Adam directions from the run's moments, the target items'
own gradients, one random projection, the maximum cosine; zero gradients; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax import tree_utils

from jaxsel import less, probe, references
from tests.workers import probe_worker


def _weighted_loss(model, params, tokens_L, segments_L, weights_L):
    """The weighted mean next-token loss of one row, from scratch."""
    logits = model.apply(params, tokens_L[None], segments_L[None])[0, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logp, tokens_L[1:, None], axis=-1)[:, 0]
    pair = (segments_L[1:] == segments_L[:-1]) & (segments_L[:-1] > 0)
    w = pair * weights_L[:-1]
    return -(target * w).sum() / w.sum()


_grad = jax.jit(jax.grad(_weighted_loss, argnums=1), static_argnums=0)


def test_adam_direction_equals_a_loop():
    rng = np.random.default_rng(0)
    g, m, v = (rng.normal(size=5), rng.normal(size=5), rng.random(5))
    found = less.adam_direction({"w": g}, {"w": m}, {"w": v}, 0.9, 0.95, 1e-8)["w"]
    for i in range(5):
        expected = (0.9 * m[i] + 0.1 * g[i]) / np.sqrt(0.95 * v[i] + 0.05 * g[i] ** 2 + 1e-8)
        assert found[i] == pytest.approx(expected, rel=1e-6)


def test_max_cosine_equals_a_loop_and_ranks_zero_gradients_last():
    rng = np.random.default_rng(1)
    c, t = rng.normal(size=(7, 4)), rng.normal(size=(3, 4))
    c[2] = 0.0
    scores, zero = less.max_cosine(c, t)
    assert zero == 1 and scores[2] == less.ZERO_GRADIENT_SCORE
    for i in (0, 1, 3, 4, 5, 6):
        cos = [c[i] @ t[r] / np.linalg.norm(c[i]) / np.linalg.norm(t[r]) for r in range(3)]
        assert scores[i] == pytest.approx(max(cos))
    scores, zero = less.max_cosine(c, t, zero_N=np.arange(7) == 5)
    assert zero == 2 and scores[5] == less.ZERO_GRADIENT_SCORE
    with pytest.raises(ValueError, match="less: every target item's gradient is zero"):
        less.max_cosine(c, np.zeros((3, 4)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _, pools, trainer, state, rng = probe_worker.trained_state(  # Nonzero moments.
        tmp_path_factory.mktemp("less"), 4)
    train_pool, heldout = pools["train"], pools["heldout"]
    candidates = train_pool.rows(rng.choice(len(train_pool), 6, replace=False))
    candidates["segments"][3] = 0  # A row with no token: a zero gradient.
    rows = heldout.rows(heldout.ids_of_domain("prose")[:3])
    weights = rng.integers(0, 2, rows["tokens"].shape).astype(np.float32)
    weights[:, :2] = 1.0
    reference = references.Reference.from_weights(rows["tokens"], rows["segments"], weights)
    return dict(trainer=trainer, state=state, candidates=candidates, reference=reference,
                rows=(rows["tokens"], rows["segments"], weights))


def test_scores_equal_a_hand_computation(run):
    trainer, state = run["trainer"], run["state"]
    model, optim = trainer.model, trainer.config.optim
    projection = probe.GradProjection(k=64, seed=5, normalize=True)
    prober = probe_worker.make_prober(trainer, chunk_size=4)
    scores, zero = less.scores(prober, state, run["candidates"], run["reference"], projection,
                               progress=False)
    mu = tree_utils.tree_get(state.opt_state, "mu")
    nu = tree_utils.tree_get(state.opt_state, "nu")

    def feature(grads):
        return np.asarray(probe.project(jax.tree.map(lambda x: x[None], grads), projection))[0]

    targets = []
    for tokens, segments, weights in zip(*run["rows"], strict=True):
        grads = _grad(model, state.params, jnp.asarray(tokens),
                                                    jnp.asarray(segments), jnp.asarray(weights))
        targets.append(feature(grads))
    assert zero == 1 and scores[3] == less.ZERO_GRADIENT_SCORE
    for i in (0, 1, 2, 4, 5):
        tokens, segments = (jnp.asarray(run["candidates"][k][i]) for k in ("tokens", "segments"))
        g = _grad(model, state.params, tokens, segments,
                                                jnp.ones(tokens.shape))
        direction = jax.tree.map(
            lambda g, m, v: (optim.b1 * m + (1 - optim.b1) * g)
            / jnp.sqrt(optim.b2 * v + (1 - optim.b2) * g * g + optim.eps), g, mu, nu)
        c = feature(direction)
        expected = max(c @ t / np.linalg.norm(c) / np.linalg.norm(t) for t in targets)
        assert scores[i] == pytest.approx(expected, abs=2e-5), i
