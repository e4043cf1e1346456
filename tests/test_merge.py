"""Tests of jaxsel.merge against numpy computations."""

import os
import subprocess
import sys
import textwrap
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxsel import merge

BF16 = ml_dtypes.bfloat16


def make_tree(rng, dtype=np.float32):
    """A small transformer-like tree with nested dicts, a list and a scalar leaf."""
    return {
        "embed": rng.standard_normal((6, 4)).astype(dtype),
        "layers": [{"w": rng.standard_normal((4, 4)).astype(dtype),
                    "b": rng.standard_normal(4).astype(dtype)} for _ in range(2)],
        "scale": np.asarray(rng.standard_normal(), dtype),
    }


def numpy_average(trees, weights, dtype=np.float64):
    """`sum_k w_k tree_k / sum_k w_k` leaf by leaf in `dtype`."""
    w = np.asarray(weights, np.float64)
    w = (w / w.sum()).astype(dtype)
    return jax.tree.map(
        lambda *xs: sum(wk * np.asarray(x, dtype) for wk, x in zip(w, xs, strict=True)), *trees)


def assert_trees_close(actual, expected, rtol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol,
                                                         atol=rtol), actual, expected)


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_average_of_identical_trees_is_the_tree(dtype):
    tree = make_tree(np.random.default_rng(0), dtype)
    for result in (merge.average([tree] * 4), merge.average_stream(iter([tree] * 4)),
                   merge.average_grouped([[tree] * 2, [tree] * 2])):
        jax.tree.map(lambda r, t: (np.testing.assert_array_equal(np.asarray(r), t),
                                   np.testing.assert_equal(r.dtype, t.dtype)), result, tree)


def test_weighted_average_matches_numpy():
    rng = np.random.default_rng(1)
    trees = [make_tree(rng) for _ in range(5)]
    weights = [0.5, 2.0, 0.0, 1.0, 3.25]
    expected = numpy_average(trees, weights)
    assert_trees_close(merge.average(trees, weights), expected, rtol=1e-6)
    assert_trees_close(merge.average(trees), numpy_average(trees, [1] * 5), rtol=1e-6)
    # A later tree may store its leaves in another floating dtype; the result keeps trees[0]'s.
    mixed = [trees[0], jax.tree.map(lambda x: x.astype(BF16), trees[1])]
    result = merge.average(mixed, [1.0, 3.0])
    jax.tree.map(lambda r: np.testing.assert_equal(r.dtype, np.float32), result)
    assert_trees_close(result, numpy_average(mixed, [1.0, 3.0]), rtol=1e-6)


def test_bfloat16_average_accumulates_in_float32():
    rng = np.random.default_rng(2)
    trees = [make_tree(rng, BF16) for _ in range(4)]
    weights = [1.0, 3.0, 2.0, 2.0]
    expected_f32 = numpy_average(trees, weights, np.float32)
    result = merge.average(trees, weights)
    jax.tree.map(lambda r: np.testing.assert_equal(r.dtype, BF16), result)
    # Within half a bfloat16 ulp (2**-9 relative) of the float32 result, i.e. its rounding.
    jax.tree.map(lambda r, e: np.testing.assert_allclose(np.asarray(r, np.float32), e,
                                                         rtol=2.0**-8), result, expected_f32)
    # Eight bfloat16 values whose mean needs 8 mantissa bits: accumulating in float32 and rounding
    # once gives 1 + 4/128; summing in bfloat16 loses the low bits of the partial sums.
    ones = [{"x": np.full(3, 1 + k / 128, BF16)} for k in range(8)]
    exact = np.float32(np.mean([1 + k / 128 for k in range(8)])).astype(BF16)
    bf16_sum = ones[0]["x"] / BF16(8)
    for tree in ones[1:]:
        bf16_sum = (bf16_sum + tree["x"] / BF16(8)).astype(BF16)
    assert exact == BF16(1 + 4 / 128) and bf16_sum[0] != exact
    for result in (merge.average(ones), merge.average_stream(ones)):
        np.testing.assert_array_equal(np.asarray(result["x"]), np.full(3, exact))


def test_stream_equals_in_memory_and_holds_one_model_besides_the_sum():
    rng = np.random.default_rng(3)
    trees = [make_tree(rng) for _ in range(6)]
    weights = [1.0, 0.5, 2.0, 1.0, 0.25, 4.0]
    alive = []

    def load(tree):
        # Every model yielded before must have been released before the next is loaded.
        assert all(ref() is None for ref in alive)
        copy = jax.tree.map(np.copy, tree)
        alive.append(weakref.ref(copy["embed"]))
        return copy

    def load_one_at_a_time():
        for tree in trees:
            yield load(tree)

    streamed = merge.average_stream(load_one_at_a_time(), weights)
    assert len(alive) == len(trees)
    assert_trees_close(streamed, numpy_average(trees, weights), rtol=1e-6)
    assert_trees_close(merge.average_stream(trees), merge.average(trees), rtol=1e-6)


def test_accumulate_updates_the_running_sum_in_place():
    leaves = [jnp.ones((4, 4)), jnp.ones(3)]
    acc = merge._accumulate(None, leaves, jnp.float32(2.0))
    new_acc = merge._accumulate(acc, leaves, jnp.float32(0.5))
    assert all(a.is_deleted() for a in acc)
    np.testing.assert_array_equal(np.asarray(new_acc[0]), np.full((4, 4), 2.5))


def test_grouped_average_matches_numpy_group_means():
    rng = np.random.default_rng(4)
    groups = {"web": [make_tree(rng) for _ in range(3)], "code": [make_tree(rng)],
              "books": [make_tree(rng) for _ in range(2)]}
    group_weights = {"web": 1.0, "code": 2.0, "books": 0.5}
    means = {name: numpy_average(trees, [1] * len(trees)) for name, trees in groups.items()}
    macro = numpy_average(list(means.values()), list(group_weights.values()))
    assert_trees_close(merge.average_grouped(groups, group_weights), macro, rtol=1e-6)
    assert_trees_close(merge.average_grouped(list(groups.values()), [1.0, 2.0, 0.5]), macro,
                       rtol=1e-6)
    uniform_macro = numpy_average(list(means.values()), [1, 1, 1])
    assert_trees_close(merge.average_grouped(groups), uniform_macro, rtol=1e-6)
    everyone = [tree for trees in groups.values() for tree in trees]
    micro = numpy_average(everyone, [1] * len(everyone))
    assert_trees_close(merge.average_grouped(groups, mode="micro"), micro, rtol=1e-6)
    assert not np.allclose(micro["embed"], uniform_macro["embed"])


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxsel import merge

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {"w": P("data", "fsdp"), "b": P("fsdp"), "scale": P()}
    shapes = {"w": (8, 16), "b": (12,), "scale": ()}
    rng = np.random.default_rng(0)
    host = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            for _ in range(3)]
    trees = [{k: jax.device_put(t[k], NamedSharding(mesh, specs[k])) for k in t} for t in host]
    weights = [1.0, 2.0, 3.0]
    expected = {k: sum(w * t[k].astype(np.float64) for w, t in zip(weights, host)) / 6
                for k in shapes}
    for result in (merge.average(trees, weights), merge.average_stream(iter(trees), weights),
                   merge.average_grouped([[t] for t in trees], weights)):
        for k in shapes:
            assert result[k].sharding == trees[0][k].sharding, (k, result[k].sharding)
            np.testing.assert_allclose(np.asarray(result[k]), expected[k], rtol=1e-6)
    unsharded = merge.average(host, weights)
    for k in shapes:
        np.testing.assert_allclose(np.asarray(unsharded[k]), expected[k], rtol=1e-6)
    # Each device reduces its own shards: the compiled kernels move no data between devices.
    leaves = [jax.tree.leaves(t) for t in trees]
    hlo = merge._weighted_sum.lower(leaves, jnp.ones(3)).compile().as_text()
    hlo += merge._accumulate.lower(leaves[0], leaves[1], jnp.float32(1)).compile().as_text()
    for collective in ("all-gather", "all-reduce", "collective-permute", "all-to-all"):
        assert collective not in hlo, collective
    print("ok")
""")


def test_sharded_average_equals_unsharded_and_keeps_sharding():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def _trees_with(**changes):
    """Three trees like `make_tree`'s; `changes` maps 'k.path' to a replacement for tree k."""
    rng = np.random.default_rng(5)
    trees = [make_tree(rng) for _ in range(3)]
    for where, value in changes.items():
        k, key = where.split(".")
        trees[int(k)][key] = value
    return trees


BAD_TREES = {
    "missing key": (_trees_with(**{"1.layers": [{"w": np.ones((4, 4))}] * 2}),
                    r"trees\[1\]: leaf \['layers'\]\[0\]\['b'\] of trees\[0\] is missing"),
    "extra key": ([{"a": np.ones(2)}, {"a": np.ones(2), "d": np.ones(2)}],
                  r"trees\[1\]: leaf \['d'\] is not in trees\[0\]"),
    "other node type": ([{"a": [np.ones(2)]}, {"a": (np.ones(2),)}],
                        r"trees\[1\]: tree structure"),
    "shape": (_trees_with(**{"2.embed": np.ones((4, 6), np.float32)}),
              r"trees\[2\]: leaf \['embed'\] has shape \(4, 6\) but trees\[0\]'s has "
              r"shape \(6, 4\)"),
    "int leaf": (_trees_with(**{"1.scale": np.asarray(3, np.int32)}),
                 r"trees\[1\]: leaf \['scale'\] has dtype int32; averaging needs floating"),
    "int first": (_trees_with(**{"0.scale": np.asarray(3, np.int32)}),
                  r"trees\[0\]: leaf \['scale'\] has dtype int32"),
    "no leaves": ([{}, {}], r"trees\[0\] has no array leaves"),
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_mismatched_trees_name_the_first_offending_leaf(case):
    trees, message = BAD_TREES[case]
    with pytest.raises(ValueError, match=message):
        merge.average(trees)
    with pytest.raises(ValueError, match=message):
        merge.average_stream(iter(trees))


BAD_WEIGHTS = {
    "negative": ([1.0, -0.5, 1.0], r"weights\[1\] is -0.5; weights must be non-negative"),
    "nan": ([float("nan"), 1.0, 1.0], r"weights\[0\] is nan; weights must be finite"),
    "infinite": ([1.0, 1.0, float("inf")], r"weights\[2\] is inf"),
    "all zero": ([0.0, 0.0, 0.0], r"weights: all are zero"),
    "not numbers": (["a", 1, 1], r"weights: not a sequence of numbers"),
    "2-d": ([[1.0, 1.0, 1.0]], r"weights: must be one number per tree, got shape \(1, 3\)"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weights_are_refused_before_any_tree_is_loaded(case):
    weights, message = BAD_WEIGHTS[case]
    trees = _trees_with()
    with pytest.raises(ValueError, match=message):
        merge.average(trees, weights)

    def never_loaded():
        raise AssertionError("a tree was loaded before the weights were checked")
        yield

    with pytest.raises(ValueError, match=message):
        merge.average_stream(never_loaded(), weights)


def test_weights_length_and_empty_inputs_are_refused():
    trees = _trees_with()
    with pytest.raises(ValueError, match=r"weights: has 2 entries but there are 3 trees"):
        merge.average(trees, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights: has 2 entries but trees yielded more"):
        merge.average_stream(iter(trees), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights: has 4 entries but trees yielded 3 trees"):
        merge.average_stream(iter(trees), [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights is empty"):
        merge.average_stream(iter(trees), [])
    with pytest.raises(ValueError, match=r"trees is empty"):
        merge.average([])
    with pytest.raises(ValueError, match=r"trees is empty"):
        merge.average_stream(iter([]))


def test_bad_groups_are_refused_naming_the_group():
    a, b, c = _trees_with()
    groups = {"web": [a, b], "code": [c]}
    with pytest.raises(ValueError, match=r"groups is empty"):
        merge.average_grouped([])
    with pytest.raises(ValueError, match=r"groups\['code'\] is empty"):
        merge.average_grouped({"web": [a], "code": []})
    with pytest.raises(ValueError, match=r"groups\[1\]\[0\]: leaf \['d'\] is not in groups\[0\]"):
        merge.average_grouped([[a], [{**b, "d": np.ones(1)}]])
    with pytest.raises(ValueError, match=r"group_weights: has 3 entries but there are 2 groups"):
        merge.average_grouped(groups, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"group_weights\[1\] is -1.0"):
        merge.average_grouped(groups, [1.0, -1.0])
    with pytest.raises(ValueError, match=r"group_weights: no weight for group 'code'"):
        merge.average_grouped(groups, {"web": 1.0})
    with pytest.raises(ValueError, match=r"group_weights: 'books' is not a group"):
        merge.average_grouped(groups, {"web": 1.0, "code": 1.0, "books": 1.0})
    with pytest.raises(ValueError, match=r"group_weights: only mode='macro'"):
        merge.average_grouped(groups, [1.0, 1.0], mode="micro")
    with pytest.raises(ValueError, match=r"mode: 'mean' is not one of \['macro', 'micro'\]"):
        merge.average_grouped(groups, mode="mean")
