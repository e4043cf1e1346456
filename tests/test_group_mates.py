"""Group-MATES against hand-written loops: the group oracle against the trainer's own steps, the
relational model's forward against a loop and its fit against a known relational rule, the
greedy step against brute force, and the `group_mates` arm reading its cache and the target
items only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import compare_selectors as cmp_config
from jaxsel import group_mates, references, selectors
from jaxsel.data import pool as pool_lib
from tests.workers import probe_worker


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The synthetic corpus; a tiny model trained 20 steps; 4 held-out prose rows as the
    reference, half of their positions counting; 6 groups of 3 train-pool rows."""
    tmp = tmp_path_factory.mktemp("group_mates")
    config, pools, trainer, state, rng = probe_worker.trained_state(tmp / "cache", 20)
    train_pool, heldout = pools["train"], pools["heldout"]
    rows = heldout.rows(heldout.ids_of_domain("prose")[:4])
    weights = rng.integers(0, 2, rows["tokens"].shape).astype(np.float32)
    reference = references.Reference.from_weights(rows["tokens"], rows["segments"], weights)
    group_ids = rng.choice(len(train_pool), (6, 3), replace=False)
    return dict(config=config, trainer=trainer, state=state, train=train_pool, heldout=heldout,
                reference=reference, reference_rows=(rows["tokens"], rows["segments"], weights),
                group_ids=group_ids,
                prober=probe_worker.make_prober(trainer, chunk_size=4))


def _reference_loss(model, params, tokens, segments, weights):
    """Weighted mean cross-entropy of next-token pairs inside one document, from full logits."""
    logits = model.apply(params, tokens, segments)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target_logp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = ((segments[:, 1:] == segments[:, :-1]) & (segments[:, :-1] > 0)) * weights[:, :-1]
    return -(target_logp * w).sum() / w.sum()


def _read(pool, group_ids):
    def read(idx):
        rows = pool.rows(group_ids[idx].ravel())
        return {k: v.reshape(len(idx), group_ids.shape[1], -1) for k, v in rows.items()}
    return read


def test_group_oracle_equals_the_trainers_own_steps(run):
    trainer, state, reference, pool = run["trainer"], run["state"], run["reference"], run["train"]
    group_ids = run["group_ids"]
    # Two chunks of 4 groups (the last padded), two groups vmapped at a time.
    found = group_mates.group_oracle(run["prober"], state, _read(pool, group_ids), len(group_ids),
                                     reference, reference_batch_size=2, eval_batch_size=2,
                                     progress=False)
    assert found.shape == group_ids.shape and found.dtype == np.float32
    ref = [jnp.asarray(x) for x in run["reference_rows"]]
    loss = jax.jit(lambda params: _reference_loss(trainer.model, params, *ref))
    before = float(loss(state.params))
    expected = np.zeros(group_ids.shape)
    for g, ids in enumerate(group_ids):
        s = jax.tree.map(jnp.array, state)  # A copy: train_step donates its state.
        for m, row_id in enumerate(ids):
            row = {k: jnp.asarray(v) for k, v in pool.rows([row_id]).items()}
            s, _ = trainer.train_step(s, row)
            expected[g, m] = float(loss(s.params)) - before
    assert np.ptp(expected[:, -1]) > 1e-3  # Differences well above the tolerance.
    np.testing.assert_allclose(found, expected, atol=1e-6)
    # The first member's step is MATES' one-step oracle.
    single = run["prober"].oracle_influence(state, pool.rows(group_ids[:, 0]), reference,
                                            progress=False)
    np.testing.assert_allclose(found[:, 0], single, atol=1e-6)
    np.testing.assert_allclose(group_mates.increments(found).sum(1), found[:, -1], atol=1e-6)
    assert int(state.step) == 20  # The pristine state is untouched.


def _hand_increments(params, scores_M, emb_MxD):
    unit = emb_MxD / np.linalg.norm(emb_MxD, axis=1, keepdims=True)
    out = []
    for m in range(len(scores_M)):
        u = params["scale"] * scores_M[m] + params["shift"]
        if m == 0:
            out.append(u)
            continue
        weights = [params["alpha"] * (1 - params["beta"] * float(unit[m] @ unit[j]))
                   for j in range(m)]
        out.append(u * sum(weights) / m)
    return np.array(out)


def _synthetic_groups(rng, num_groups, size, truth, noise=0.02):
    """Candidates in 8 tight directions; half the groups inside one direction (redundant), half
    spread; oracle trajectories from the relational rule `truth` plus noise."""
    centres = rng.normal(size=(8, 16))
    labels = rng.integers(0, 8, 400)
    emb = centres[labels] + 0.3 * rng.normal(size=(400, 16))
    scores = rng.normal(size=400)
    groups = [rng.choice(np.flatnonzero(labels == labels[rng.integers(400)]), size, replace=False)
              if g % 2 else rng.choice(400, size, replace=False) for g in range(num_groups)]
    groups = np.stack(groups)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    inc = np.asarray(group_mates.predicted_increments(truth, scores[groups], unit[groups]))
    inc = inc + noise * rng.normal(size=inc.shape)
    singles = rng.choice(400, 50, replace=False)
    single_oracle = truth["scale"] * scores[singles] + truth["shift"] + noise * rng.normal(size=50)
    return scores, unit, groups, np.cumsum(inc, 1), singles, single_oracle


def test_relational_forward_equals_a_hand_loop():
    rng = np.random.default_rng(0)
    params = {"scale": 0.7, "shift": -0.2, "alpha": 0.9, "beta": 0.6}
    scores, emb = rng.normal(size=(5, 4)), rng.normal(size=(5, 4, 8))
    unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    got = np.asarray(group_mates.predicted_increments(params, scores, unit))
    expected = np.stack([_hand_increments(params, scores[g], emb[g]) for g in range(5)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(group_mates.predicted_group_influence(params, scores, unit),
                               expected.sum(1), rtol=1e-5, atol=1e-6)


def test_fit_recovers_a_known_relational_rule_and_beats_the_sum():
    rng = np.random.default_rng(1)
    truth = {"scale": 1.0, "shift": -0.5, "alpha": 0.8, "beta": 0.9}
    scores, unit, groups, trajectory, singles, single_oracle = _synthetic_groups(
        rng, 200, 5, truth)
    fitted = group_mates.fit(scores[groups], unit[groups], trajectory, scores[singles],
                             single_oracle, steps=800, learning_rate=0.05, val_fraction=0.25,
                             seed=0)
    scale = fitted["label_scale"]
    recovered = {"scale": fitted["params"]["scale"] * scale,
                 "shift": fitted["params"]["shift"] * scale,
                 "alpha": fitted["params"]["alpha"], "beta": fitted["params"]["beta"]}
    for key, value in truth.items():
        assert recovered[key] == pytest.approx(value, abs=0.05), (key, recovered)
    assert fitted["loss"]["last"] < fitted["loss"]["first"]
    val = fitted["val"]
    assert val["groups"] == 50
    assert val["spearman"] > 0.95 and val["pearson"] > 0.95
    assert val["spearman"] > val["baseline"]["spearman"] + 0.1
    assert val["pearson"] > val["baseline"]["pearson"] + 0.1


def test_greedy_steps_equal_brute_force_on_a_tiny_cluster():
    rng = np.random.default_rng(2)
    params = {"scale": 1.0, "shift": -0.3, "alpha": 0.8, "beta": 0.9}
    scores = np.array([-2.0, -1.8, -1.0, -0.6, 0.2, 0.5])
    emb = rng.normal(size=(6, 4))
    emb[1] = emb[0] + 0.01 * rng.normal(size=4)  # The runner-up nearly duplicates the best.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    u = params["scale"] * scores + params["shift"]
    order, marginals = group_mates.greedy(u, unit, 6, params["alpha"], params["beta"])
    assert sorted(order.tolist()) == list(range(6))

    def total(members):
        idx = np.array(members)
        return float(group_mates.predicted_group_influence(params, scores[idx][None],
                                                           unit[idx][None])[0])

    chosen = []
    for t in range(6):
        rest = [i for i in range(6) if i not in chosen]
        gains = {i: total(chosen + [i]) - (total(chosen) if chosen else 0.0) for i in rest}
        best = min(gains, key=gains.get)
        assert order[t] == best, t
        assert marginals[t] == pytest.approx(gains[best], abs=1e-5)
        chosen.append(best)
    # The redundancy matters: the near-duplicate of the first pick is no longer second.
    assert order[0] == 0 and order[1] != 1


def test_select_returns_k_distinct_positions_by_cluster_quota():
    rng = np.random.default_rng(3)
    u, emb = rng.normal(size=50), rng.normal(size=(50, 6))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    clusters = rng.integers(0, 7, 50)
    for k in (1, 13, 50):
        positions, marginals = group_mates.select(u, unit, clusters, k, 0.9, 0.5)
        assert len(positions) == k == len(np.unique(positions)) == len(marginals)
        counts = np.bincount(clusters[positions], minlength=7)
        np.testing.assert_array_equal(counts, group_mates.quotas(np.bincount(clusters), k))
    np.testing.assert_array_equal(group_mates.quotas([5, 3, 2], 5), [3, 1, 1])
    assert group_mates.quotas([5, 3, 2], 5).sum() == 5
    with pytest.raises(ValueError, match="k must be"):
        group_mates.quotas([2, 2], 5)
    with pytest.raises(ValueError, match="budget"):
        group_mates.select(u, unit, clusters, 3, 0.9, 0.5, budget="bogus")
    eligible = np.arange(len(clusters)) % 3 != 0
    groups = group_mates.draw_groups(clusters, eligible, 10, 4, seed=0)
    assert groups.shape == (10, 4) and eligible[groups].all()
    assert all(len(set(g)) == 4 for g in groups.tolist())
    assert all(len(set(clusters[g])) == 1 for g in groups[5:])  # Within one cluster.
    np.testing.assert_array_equal(groups,
                                  group_mates.draw_groups(clusters, eligible, 10, 4, seed=0))
    with pytest.raises(ValueError, match="3 eligible candidates"):
        group_mates.draw_groups(clusters, np.arange(len(clusters)) < 3, 2, 4, seed=0)


def test_arm_reads_only_the_target_items_and_its_cache(run, tmp_path, monkeypatch):
    """`selectors.pick(.., "group_mates", ..)` on 40 candidates with stand-ins for MATES'
    predictions and the encoder embeddings: k distinct candidates, the artifacts written once
    and read back, the oracle read from train-pool candidate rows only."""
    pool, trainer, state = run["train"], run["trainer"], run["state"]
    section = cmp_config.get_config("tiny").compare
    section.update(probe_chunk=4, eval_batch_size=2, group_size=3, group_probes=12,
                   group_clusters=4, group_fit_steps=50)
    ids = np.sort(np.random.default_rng(4).choice(len(pool), 40, replace=False))
    rng = np.random.default_rng(5)
    scores, emb = rng.normal(size=40).astype(np.float32), rng.normal(size=(40, 8))
    reads = []
    rows = pool_lib.Pool.rows

    def recording_rows(self, row_ids):
        reads.append((self.path.name, np.asarray(row_ids).copy()))
        return rows(self, row_ids)

    monkeypatch.setattr(pool_lib.Pool, "rows", recording_rows)

    def candidates():
        c = selectors.Candidates(str(tmp_path), section, pool, ids, trainer, lambda: state,
                                 lambda: "seed", run["reference"], seed=0, progress=False)
        c.mates = lambda: (scores, {"probed_ids": ids[:8], "oracle": rng.normal(size=8)})
        c.embeddings = lambda: {"candidates": emb}
        return c

    chosen = selectors.pick(candidates(), "group_mates", 10, seed=7)
    assert len(chosen) == 10 and len(np.unique(chosen.ids)) == 10
    assert np.isin(chosen.ids, ids).all() and chosen.params["selector"] == "group_mates"
    assert {split for split, _ in reads} == {"train"}
    assert all(np.isin(r, ids).all() for _, r in reads)
    oracle = np.load(tmp_path / "arms/group_mates/oracle.npz")
    assert oracle["trajectory"].shape == (12, 3) and np.isfinite(oracle["trajectory"]).all()
    assert (tmp_path / "arms/group_mates/relational_model.json").exists()
    assert "val_spearman" in chosen.params and "baseline_spearman" in chosen.params
    # Again: everything read back (no oracle, no pool read), the same pick.
    reads.clear()
    monkeypatch.setattr(group_mates, "group_oracle", None)
    again = selectors.pick(candidates(), "group_mates", 10, seed=7)
    np.testing.assert_array_equal(again.ids, chosen.ids)
    assert not reads


def test_global_budget_follows_each_clusters_greedy_order():
    """With `budget="global"` each cluster's picks are a prefix of its own greedy order, taken
    lowest marginal first across clusters: a cluster of helpful candidates (u < 0) is used up
    before one of harmful ones (u > 0)."""
    rng = np.random.default_rng(6)
    u = np.concatenate([-1 - rng.random(10), 1 + rng.random(12), rng.normal(size=8)])
    emb = rng.normal(size=(30, 6))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    clusters = np.repeat([2, 0, 1], [10, 12, 8])
    positions, marginals = group_mates.select(u, unit, clusters, 20, 0.9, 0.5, budget="global")
    assert len(positions) == 20 == len(np.unique(positions)) == len(marginals)
    assert set(range(10)) <= set(positions.tolist())  # The helpful cluster first.
    for label in (0, 1, 2):
        rows = np.flatnonzero(clusters == label)
        mine = positions[clusters[positions] == label]
        order, _ = group_mates.greedy(u[rows], unit[rows], len(rows), 0.9, 0.5)
        np.testing.assert_array_equal(mine, rows[order[:len(mine)]])
    one = np.zeros(30, np.int64)
    np.testing.assert_array_equal(
        group_mates.select(u, unit, one, 12, 0.9, 0.5, budget="global")[0],
        group_mates.greedy(u, unit, 12, 0.9, 0.5)[0])
