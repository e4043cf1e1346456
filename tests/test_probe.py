"""Probes against hand-written loops: one-step oracle influence, first-order influence, per-example
gradients, JL projections, pool losses; 8 devices against one; the synthetic corpus; bad input."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsel import probe, references, stream
from jaxsel.data import tokenizer as tokenizer_lib
from tests.workers import probe_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_loss(model, params, tokens, segments, weights):
    """Weighted mean cross-entropy of next-token pairs inside one document, from scratch."""
    logits = model.apply(params, tokens, segments)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    pair = (segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)
    w = pair * weights[:, :-1]
    return -(target_logp * w).sum() / w.sum()


def _sequence_loss(model, params, tokens_L, segments_L):
    return _reference_loss(model, params, tokens_L[None], segments_L[None],
                           jnp.ones((1, tokens_L.shape[0])))


_reference_loss_jit = jax.jit(_reference_loss, static_argnums=0)
_reference_grad_jit = jax.jit(jax.grad(_reference_loss, argnums=1), static_argnums=0)
_sequence_loss_jit = jax.jit(_sequence_loss, static_argnums=0)
_sequence_grad_jit = jax.jit(jax.grad(_sequence_loss, argnums=1), static_argnums=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The synthetic corpus' pools; a tiny model trained 30 steps on the train pool; 10 train-pool
    candidates and a 5-row held-out prose reference where a random half of the positions count;
    the one-device probe results on them, and the 8-device worker probing the same state (started
    as soon as the state exists, so it runs while this process compiles its own probes)."""
    tmp = tmp_path_factory.mktemp("probe")
    config, pools, trainer, state, rng = probe_worker.trained_state(tmp / "cache", 30)
    train_pool, heldout = pools["train"], pools["heldout"]
    candidates = train_pool.rows(rng.choice(len(train_pool), 10, replace=False))
    rows = heldout.rows(heldout.ids_of_domain("prose")[:5])
    weights = rng.integers(0, 2, rows["tokens"].shape).astype(np.float32)
    reference = references.Reference.from_weights(rows["tokens"], rows["segments"], weights)
    probe_worker.save_inputs(tmp / "inputs.npz", state, candidates, reference)
    eight = tmp / "eight.npz"
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.workers.probe_worker", str(tmp / "inputs.npz"), str(eight),
         "2", "4"], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                   "JAX_NUM_CPU_DEVICES": "8"})
    try:
        params_before = jax.tree.map(np.array, state.params)
        prober = probe_worker.make_prober(trainer, chunk_size=8, eval_batch_size=2)
        found = probe_worker.results(prober, state, candidates, reference)
        found["first_order"] = prober.first_order_influence(state, candidates, reference,
                                                            progress=False)
        yield dict(trainer=trainer, prober=prober, state=state, candidates=candidates,
                   reference=reference, reference_rows=(rows["tokens"], rows["segments"], weights),
                   params_before=params_before, train=train_pool,
                   heldout=heldout, worker=worker, eight=eight, **found)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.fixture(scope="module")
def grads(run):
    """Per-example gradients of the first 6 candidates (vmapped, jitted) and the rows."""
    rows = {k: jnp.asarray(v[:6]) for k, v in run["candidates"].items()}
    per_example = jax.jit(probe.per_example_grads, static_argnums=0)
    return rows, per_example(run["trainer"].model, run["state"].params, rows)


def test_oracle_and_first_order_equal_hand_written_loop(run):
    trainer, state = run["trainer"], run["state"]
    model = trainer.model
    ref = [jnp.asarray(x) for x in run["reference_rows"]]  # Dense weights: every logit.
    update, apply = jax.jit(trainer.tx.update), jax.jit(optax.apply_updates)
    before = _reference_loss_jit(model, state.params, *ref)
    assert run["prober"].reference_loss(state.params, run["reference"]) == pytest.approx(
        float(before), rel=1e-6)
    grad_ref = jax.tree.leaves(_reference_grad_jit(model, state.params, *ref))
    oracle, first_order = [], []
    for tokens_L, segments_L in zip(run["candidates"]["tokens"], run["candidates"]["segments"],
                                    strict=True):
        params, opt_state = jax.tree.map(jnp.array, (state.params, state.opt_state))  # A copy.
        grads = _sequence_grad_jit(model, params, tokens_L, segments_L)
        updates, _ = update(grads, opt_state, params)
        oracle.append(_reference_loss_jit(model, apply(params, updates), *ref) - before)
        first_order.append(sum(np.vdot(np.asarray(g, np.float64), np.asarray(u, np.float64))
                               for g, u in zip(grad_ref, jax.tree.leaves(updates), strict=True)))
    assert run["oracle"].shape == (10,) and run["oracle"].dtype == np.float32
    assert np.ptp(oracle) > 1e-3  # Differences well above the tolerance.
    np.testing.assert_allclose(run["oracle"], oracle, atol=1e-5)
    np.testing.assert_allclose(run["first_order"], first_order, atol=1e-5, rtol=1e-4)
    # One step is small: the linearisation ranks candidates like the exact oracle.
    assert probe.first_order_spearman(run["oracle"], run["first_order"]) > 0.8
    # The pristine state is untouched.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params),
                 run["params_before"])
    assert int(state.step) == 30


def test_per_example_grads_equal_loop_of_grad(run, grads):
    rows, got = grads
    for i in range(rows["tokens"].shape[0]):
        expected = _sequence_grad_jit(run["trainer"].model, run["state"].params,
                                      rows["tokens"][i], rows["segments"][i])
        jax.tree.map(lambda g, e, i=i: np.testing.assert_allclose(g[i], e, rtol=1e-4, atol=1e-7),
                     got, expected)


def _jl_epsilon(k: int, num_vectors: int, failure: float = 0.01) -> float:
    """The JL distortion eps with which k Gaussian / Rademacher dimensions keep the squared norms
    of `num_vectors` vectors within (1 +- eps) with probability 1 - failure (Dasgupta & Gupta;
    Achlioptas): k (eps^2/2 - eps^3/3) / 2 = ln(2 num_vectors / failure)."""
    target = 2 * np.log(2 * num_vectors / failure) / k
    eps = np.linspace(1e-4, 1, 100_000)
    return float(eps[np.argmax(eps**2 / 2 - eps**3 / 3 >= target)])


def _distortion(f_BxK, g_BxP):
    """max |<f_i, f_j> - <g_i, g_j>| / (|g_i| |g_j|) over all pairs (i = j included)."""
    norms = np.linalg.norm(g_BxP, axis=1)
    return (np.abs(f_BxK @ f_BxK.T - g_BxP @ g_BxP.T) / np.outer(norms, norms)).max()


def test_gradient_features_preserve_inner_products_within_jl_bound(run, grads):
    _, g = grads
    g_BxP = np.concatenate([np.asarray(x).reshape(6, -1) for x in jax.tree.leaves(g)], axis=1)
    # Unit vectors: <Pu, Pv> = (|P(u+v)|^2 - |P(u-v)|^2) / 4 is within eps of <u, v> when the
    # norms of the n vectors and their n(n-1) sums and differences are kept within (1 +- eps).
    eps = _jl_epsilon(probe_worker.PROJECTION.k, 6 + 6 * 5)
    features = run["features"][:6]  # Through the Prober: chunked, vmapped, leaf by leaf.
    assert 1e-3 < _distortion(features, g_BxP) <= eps, (_distortion(features, g_BxP), eps)


def test_rademacher_projection_seed_and_normalisation():
    """`project` on random vectors split over leaves of several blocks (the last one padded);
    the Gaussian kind is checked on real gradients above."""
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(6, 2500)), "b": rng.normal(size=(6, 30, 40)) + 0.5,
            "c": rng.normal(size=(6, 7))}
    g_BxP = np.concatenate([x.reshape(6, -1) for x in jax.tree.leaves(tree)], axis=1)
    project = jax.jit(probe.project, static_argnums=1)
    base = probe.GradProjection(k=512, seed=0, kind="rademacher", block_size=1000)
    eps = _jl_epsilon(base.k, 6 + 6 * 5)
    features = np.asarray(project(tree, base))
    assert 1e-3 < _distortion(features, g_BxP) <= eps
    np.testing.assert_allclose(np.unique(np.abs(project({"x": np.eye(3)}, base))), 512**-0.5,
                               rtol=1e-6)  # Rademacher entries are +-1/sqrt(k).
    # Another seed, normalised: other directions, unit rows, cosines still within the bound.
    other = np.asarray(project(tree, dataclasses.replace(base, seed=1, normalize=True)))
    np.testing.assert_allclose(np.linalg.norm(other, axis=1), 1.0, rtol=1e-5)
    unit_BxP = g_BxP / np.linalg.norm(g_BxP, axis=1)[:, None]
    assert _distortion(other, unit_BxP) <= 2 * eps
    unit = features / np.linalg.norm(features, axis=1)[:, None]
    assert np.abs(other - unit).max() > 0.1


def test_eight_devices_match_one_device(run):
    assert run["worker"].wait(timeout=600) == 0
    eight = np.load(run["eight"])
    np.testing.assert_allclose(eight["oracle"], run["oracle"], atol=1e-5)
    np.testing.assert_allclose(eight["features"], run["features"], rtol=1e-4,
                               atol=1e-5 * np.abs(run["features"]).max())


def test_own_domain_candidates_beat_junk(run):
    train_pool, heldout = run["train"], run["heldout"]
    reference = references.from_rows(heldout.rows(heldout.ids_of_domain("prose")[:5]))
    prose = train_pool.ids_of_domain("prose")[:8]
    junk = np.flatnonzero(train_pool.labels == train_pool.label_names.index("junk"))
    assert junk.size >= 3
    influence = run["prober"].oracle_influence(
        run["state"], train_pool.rows(np.concatenate([prose, junk])), reference, progress=False)
    assert influence[:prose.size].mean() < influence[prose.size:].mean()
    assert influence[:prose.size].mean() < 0  # A step on the reference's domain helps it.


def test_pool_losses_equal_loop_of_sequence_losses(run):
    trainer, params, heldout = run["trainer"], run["state"].params, run["heldout"]
    got = probe.pool_losses(trainer, params, heldout, batch_size=8, progress=False)
    assert got.shape == (len(heldout),) and got.dtype == np.float32
    expected = [_sequence_loss_jit(trainer.model, params, jnp.asarray(t), jnp.asarray(s))
                for t, s in zip(heldout.tokens, heldout.segments, strict=True)]
    # A row without a target (a last row holding one token) has loss 0 by definition.
    np.testing.assert_allclose(got, np.nan_to_num(np.asarray(expected)), rtol=1e-5)
    ids = np.array([5, 0, 2])
    np.testing.assert_allclose(probe.pool_losses(trainer, params, heldout, 8, ids, False),
                               got[ids], rtol=1e-6)


def test_streamed_probes_equal_the_in_memory_ones(run, tmp_path):
    """The same computations streamed to disk in chunks (`jaxsel.stream`): equal results,
    memory-mapped, found again by their inputs."""
    trainer, state, heldout = run["trainer"], run["state"], run["heldout"]
    target = stream.Target(tmp_path, "losses", {"pool": "heldout", "model": "run"}, 16)
    streamed = probe.pool_losses(trainer, state.params, heldout, 8, progress=False, to=target)
    np.testing.assert_allclose(streamed, probe.pool_losses(trainer, state.params, heldout, 8,
                                                           progress=False), rtol=1e-6)
    assert len(os.listdir(os.path.join(target.folder, stream.DONE))) == -(-len(heldout) // 16)
    target = stream.Target(tmp_path, "first_order", {"candidates": 10}, 8)
    found = run["prober"].first_order_influence(state, run["candidates"], run["reference"],
                                                progress=False, to=target)
    assert isinstance(found, np.memmap)
    np.testing.assert_array_equal(found, run["first_order"])


def test_cloze_weights_only_the_last_whole_word(run):
    tokenizer = tokenizer_lib.load_tokenizer(run["heldout"].tokenizer_path)
    eos = tokenizer_lib.eos_id(tokenizer)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    whole = encode("Alpha beta gamma.") + [eos]
    first, second = encode("one two three.") + [eos], encode("four five six seven")
    # Row 1 is full and ends inside the word " seven" (cut after its first token).
    cut = len(second) - len(encode(" seven")) + 1
    row1 = first + second[:cut]
    length = len(row1)
    short = encode("Hi") + [eos]  # No context before its only word: dropped.
    tokens = np.zeros((3, length), np.int32)
    segments = np.zeros((3, length), np.int32)
    for r, docs in enumerate([[whole], [first, second[:cut]], [short]]):
        at = 0
        for doc_index, doc in enumerate(docs, start=1):
            tokens[r, at:at + len(doc)], segments[r, at:at + len(doc)] = doc, doc_index
            at += len(doc)
    reference = references.cloze({"tokens": tokens, "segments": segments}, tokenizer)
    assert reference.tokens_RxL.shape == (2, length)
    positions, weights = reference.positions_RxK, reference.weights_RxK
    targets = [tokenizer.decode(list(reference.tokens_RxL[r][positions[r][weights[r] > 0] + 1]))
               for r in range(2)]
    assert targets == [" gamma", " six"]
    assert positions.shape[1] == max(len(encode(" gamma")), len(encode(" six")))  # K: no more.
    # Windows of n tokens ending with each target: the same targets, predicted from the tokens
    # just before them.
    n = positions.shape[1] + 2
    window = references.cloze({"tokens": tokens, "segments": segments}, tokenizer, n)
    assert window.tokens_RxL.shape == (2, n)
    for r in range(2):
        counted = window.positions_RxK[r][window.weights_RxK[r] > 0]
        assert tokenizer.decode(list(window.tokens_RxL[r][counted + 1])) == targets[r]
        assert counted[-1] + 1 == n - 1  # The window ends with the target.
        end = positions[r][weights[r] > 0][-1] + 1  # The target's last token in the row.
        np.testing.assert_array_equal(window.tokens_RxL[r],
                                      reference.tokens_RxL[r][end - n + 1:end + 1])
    with pytest.raises(ValueError, match="max_len"):
        references.cloze({"tokens": tokens, "segments": segments}, tokenizer, 1)
    prose = run["heldout"].ids_of_domain("prose")
    items = references.cloze_from_pool(run["heldout"], prose, 4)
    assert 1 <= len(items.tokens_RxL) <= 4
    assert (items.weights_RxK.sum(1) >= 1).all()
    later = references.cloze_from_pool(run["heldout"], prose[4:], 3)
    rows = run["heldout"].rows(prose[4:7])["tokens"]
    assert any((r == rows).all(1).any() for r in later.tokens_RxL)
    assert all((r == rows).all(1).any() for r in later.tokens_RxL)  # Only rows 4, 5, 6.
    with pytest.raises(ValueError, match="some rows"):
        references.cloze_from_pool(run["heldout"], prose[:0], 3)
    with pytest.raises(ValueError, match="rows"):
        references.cloze({"tokens": tokens[2:], "segments": segments[2:]}, tokenizer)


def test_bad_input_names_the_argument(run):
    trainer, state, reference = run["trainer"], run["state"], run["reference"]
    candidates = run["candidates"]
    prober = run["prober"]
    for chunk_size in (0, -8):
        with pytest.raises(ValueError, match="chunk_size"):
            probe.Prober(trainer, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="reference_batch_size"):
        probe.Prober(trainer, chunk_size=8, reference_batch_size=0)
    with pytest.raises(ValueError, match="eval_batch_size"):
        probe.Prober(trainer, chunk_size=8, eval_batch_size=9)
    empty = {k: v[:0] for k, v in candidates.items()}
    with pytest.raises(ValueError, match="candidates: empty"):
        prober.oracle_influence(state, empty, reference, progress=False)
    longer = {k: np.pad(v, ((0, 0), (0, 1))) for k, v in candidates.items()}
    with pytest.raises(ValueError, match="candidates: sequences have 33 tokens"):
        prober.oracle_influence(state, longer, reference, progress=False)
    with pytest.raises(ValueError, match="candidates"):
        prober.grad_features(state.params, {"tokens": candidates["tokens"]},
                             probe_worker.PROJECTION, progress=False)
    no_rows = references.Reference(*(np.asarray(x)[:0] for x in jax.tree.leaves(reference)))
    with pytest.raises(ValueError, match="reference: needs"):
        prober.oracle_influence(state, candidates, no_rows, progress=False)
    unweighted = reference.replace(weights_RxK=np.zeros_like(reference.weights_RxK))
    with pytest.raises(ValueError, match="reference: no next-token target"):
        prober.first_order_influence(state, candidates, unweighted, progress=False)
    outside = reference.replace(positions_RxK=reference.positions_RxK + 32)
    with pytest.raises(ValueError, match="reference: positions"):
        prober.oracle_influence(state, candidates, outside, progress=False)
    tokens, segments, weights = run["reference_rows"]
    with pytest.raises(ValueError, match="reference: tokens"):
        references.Reference.from_weights(tokens, segments, weights[:, :-1])
    with pytest.raises(ValueError, match="projection.k"):
        probe.GradProjection(k=0)
    with pytest.raises(ValueError, match="projection.kind"):
        probe.GradProjection(k=8, kind="sparse")
    with pytest.raises(ValueError, match="exact_N"):
        probe.first_order_spearman(np.zeros(3), np.zeros(4))
