"""Tree-mapped parameter averaging: uniform, weighted, streaming and grouped.

Na et al. (EMNLP 2024) approximate a data ablation by continuing pretraining of one seed model on
each data partition and averaging the partition models' parameters: the perplexity of the average
over a subset of partitions tracks that of a model trained on their union.

Every function here takes pytrees of floating-point arrays (numpy or `jax.Array`, possibly sharded
over a mesh) with one structure and shape per leaf, and returns one such pytree:

- `average(trees, weights)`: all models in memory, one fused jitted pass per leaf that reads each
  input once and writes the output once;
- `average_stream(trees, weights)`: a running sum over a lazy iterable, so averaging K models
  needs the memory of two (the float32 accumulator and the model being added);
- `average_grouped(groups, group_weights, mode)`: the "macro" merge (a weighted average of group
  averages) or the "micro" one (the flat average of every member).

Sums are accumulated in float32 (or wider, for float64 leaves under x64) whatever the stored dtype,
and each leaf of the result is cast back to the dtype of that leaf in the first tree (a later tree
may store a leaf in another floating dtype, e.g. bfloat16 beside float32; it is cast). The kernels
are elementwise, so on sharded inputs every device reduces its own shards: nothing is gathered to
one host and each result leaf keeps its input's sharding (when all models share it).

Bad input (no trees, other structures, shapes or non-floating dtypes, negative / NaN / all-zero
weights, a weights length other than the number of trees) raises a ValueError that names the
argument and, for leaves, the first offending leaf path as `jax.tree_util.keystr` writes it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_MODES = ("macro", "micro")
_END = object()  # Marks the end of the stream in `average_stream`.


def average(trees: Sequence[PyTree], weights: Sequence[float] | None = None) -> PyTree:
    """The weighted mean of `trees`, leaf by leaf, in one fused pass over all of them.

    Args:
      trees: K pytrees of floating-point arrays, all with the structure, and per leaf the shape,
        of `trees[0]`.
      weights: K finite non-negative numbers, not all zero; normalised to sum to one.
        None: uniform.

    Returns:
      A pytree like `trees[0]`: each leaf is `sum_k w_k * trees[k]` accumulated in float32 and cast
      to the dtype of `trees[0]`'s leaf.
    """
    trees = list(trees)
    if not trees:
        raise ValueError("trees is empty: averaging needs at least one tree")
    return _average(trees, weights, [f"trees[{k}]" for k in range(len(trees))])


def average_stream(trees: Iterable[PyTree], weights: Sequence[float] | None = None) -> PyTree:
    """The weighted mean of a lazy stream of trees, holding two models in memory, not K.

    The stream is consumed one tree at a time: each is checked against the first, added into a
    float32 running sum `acc += w_k * tree_k` (jitted, the accumulator donated so the sum is
    updated in place), waited for, and released before the next is pulled. Pass a generator that
    loads each checkpoint and yields it directly (`yield load(path)`), so that nothing else keeps
    a model alive.

    Weights are needed up front: they are checked (finite, non-negative, not all zero) and
    normalised before the first tree is loaded, so a bad weight costs no loading. Their number
    must equal the number of trees, which is known only at the end: a tree beyond `len(weights)`
    raises as it arrives, too few trees raise when the stream ends. With `weights=None` the mean
    is uniform and the count is taken at the end. Either way the sum is divided by the total
    weight consumed.

    Args:
      trees: an iterable of pytrees of floating-point arrays, all like the first.
      weights: one finite non-negative number per tree, not all zero. None: uniform.

    Returns:
      A pytree like the first tree, each leaf in that tree's dtype.
    """
    weights = None if weights is None else _normalised_weights(weights, None, "weights")
    iterator = iter(trees)
    reference = None  # The first tree's _Description.
    acc, total = None, 0.0
    k = 0
    while (tree := next(iterator, _END)) is not _END:
        label = f"trees[{k}]"
        if weights is not None and k == len(weights):
            raise ValueError(f"weights: has {len(weights)} entries but trees yielded more trees")
        description, leaves = _describe(tree, label)
        if reference is None:
            reference = description
            _check_floating(reference, label)
        else:
            _check_like(reference, "trees[0]", description, label)
        weight = 1.0 if weights is None else float(weights[k])
        acc = jax.block_until_ready(_accumulate(acc, leaves, jnp.asarray(weight, jnp.float32)))
        total += weight
        k += 1
        del tree, leaves  # Release this model before the next one is loaded.
    if reference is None:
        raise ValueError("trees is empty: averaging needs at least one tree")
    if weights is not None and k != len(weights):
        raise ValueError(f"weights: has {len(weights)} entries but trees yielded {k} trees")
    result = _scale_and_cast(acc, jnp.asarray(1.0 / total, jnp.float32),
                             tuple(reference.dtypes))
    return jax.tree.unflatten(reference.treedef, result)


def average_grouped(
    groups: Sequence[Sequence[PyTree]] | Mapping[Any, Sequence[PyTree]],
    group_weights: Sequence[float] | Mapping[Any, float] | None = None,
    mode: str = "macro",
) -> PyTree:
    """An average over groups of trees (e.g. the partition models of each data domain).

    `mode="macro"`: the weighted mean of the group means, `sum_g v_g * mean(groups[g])` with
    `group_weights` v normalised (None: uniform), so a group counts the same however many models
    it has. It is computed as one flat weighted average with weight `v_g / len(groups[g])` per
    member, which is the same mean without rounding each group mean to the stored dtype.
    `mode="micro"`: the flat uniform mean of all members, so each model counts the same;
    `group_weights` must then be None.

    Args:
      groups: a sequence of non-empty sequences of trees, or a mapping from group name to one.
      group_weights: one finite non-negative number per group, not all zero; for a mapping of
        groups, either a mapping with the same keys or a sequence in the mapping's order.
      mode: "macro" or "micro".

    Returns:
      A pytree like the first tree of the first group.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: {mode!r} is not one of {list(_MODES)}")
    names = list(groups) if isinstance(groups, Mapping) else list(range(len(groups)))
    members = [list(groups[name]) for name in names]
    if not members:
        raise ValueError("groups is empty: averaging needs at least one group")
    for name, group in zip(names, members, strict=True):
        if not group:
            raise ValueError(f"groups[{name!r}] is empty: every group needs at least one tree")
    if mode == "micro":
        if group_weights is not None:
            raise ValueError("group_weights: only mode='macro' weighs groups; pass None for micro")
        weights = None
    else:
        if isinstance(group_weights, Mapping):
            _check_same_keys(group_weights, names)
            group_weights = [group_weights[name] for name in names]
        per_group = _normalised_weights(group_weights, len(members), "group_weights")
        weights = [w / len(group) for w, group in zip(per_group, members, strict=True)
                   for _ in group]
    trees = [tree for group in members for tree in group]
    labels = [f"groups[{name!r}][{i}]" for name, group in zip(names, members, strict=True)
              for i in range(len(group))]
    return _average(trees, weights, labels)


def _average(trees: list[PyTree], weights: Sequence[float] | None, labels: list[str]) -> PyTree:
    """`average` of a non-empty list of trees; `labels` name them in error messages."""
    weights = _normalised_weights(weights, len(trees), "weights")
    treedef, leaves = _flatten_all(trees, labels)
    return jax.tree.unflatten(treedef, _weighted_sum(leaves, jnp.asarray(weights, jnp.float32)))


# --- Jitted kernels over flat lists of leaves. ---


def _accumulation_dtype(dtype) -> jnp.dtype:
    """float32, or the leaf's own dtype where it is wider (float64 under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _weighted_leaf_sum(weights_K, *leaves_K):
    """`sum_k weights_K[k] * leaves_K[k]`, accumulated wide, cast to `leaves_K[0]`'s dtype."""
    dtype = _accumulation_dtype(leaves_K[0].dtype)
    total = weights_K[0].astype(dtype) * leaves_K[0].astype(dtype)
    for weight, leaf in zip(weights_K[1:], leaves_K[1:], strict=True):
        total = total + weight.astype(dtype) * leaf.astype(dtype)
    return total.astype(leaves_K[0].dtype)


@jax.jit
def _weighted_sum(leaves_KxL: list[list[jax.Array]], weights_K: jax.Array) -> list[jax.Array]:
    """One fused expression per leaf over all K trees: reads each input once, writes once."""
    return jax.tree.map(functools.partial(_weighted_leaf_sum, weights_K), *leaves_KxL)


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(acc_L: list[jax.Array] | None, leaves_L: list[jax.Array],
                weight: jax.Array) -> list[jax.Array]:
    """`acc + weight * leaves` in the accumulation dtype; `acc=None` starts the sum."""
    def scale(x):
        dtype = _accumulation_dtype(x.dtype)
        return weight.astype(dtype) * x.astype(dtype)

    scaled = jax.tree.map(scale, leaves_L)
    return scaled if acc_L is None else jax.tree.map(jnp.add, acc_L, scaled)


@functools.partial(jax.jit, static_argnums=2)
def _scale_and_cast(acc_L: list[jax.Array], scale: jax.Array,
                    dtypes: tuple[np.dtype, ...]) -> list[jax.Array]:
    """`acc * scale`, each leaf cast to its stored dtype."""
    return [(a * scale.astype(a.dtype)).astype(d) for a, d in zip(acc_L, dtypes, strict=True)]


# --- Validation. ---


@dataclasses.dataclass(frozen=True)
class _Description:
    """A tree's structure, leaf paths, shapes and dtypes (no reference to its data)."""

    treedef: Any
    paths: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype]


def _describe(tree: PyTree, label: str) -> tuple[_Description, list[Any]]:
    """The description of `tree` and its leaves, read without touching the data."""
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not path_leaves:
        raise ValueError(f"{label} has no array leaves")
    leaves = [leaf for _, leaf in path_leaves]
    description = _Description(
        treedef=treedef,
        paths=[jax.tree_util.keystr(path) for path, _ in path_leaves],
        shapes=[np.shape(leaf) for leaf in leaves],
        dtypes=[np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
                for leaf in leaves])
    return description, leaves


def _check_floating(tree: _Description, label: str) -> None:
    for path, dtype in zip(tree.paths, tree.dtypes, strict=True):
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{label}: leaf {path} has dtype {dtype}; averaging needs "
                             f"floating-point leaves")


def _check_like(reference: _Description, reference_label: str, tree: _Description,
                label: str) -> None:
    """Raises unless `tree` has `reference`'s structure and shapes and floating-point leaves."""
    if tree.treedef != reference.treedef:
        present = set(tree.paths)
        missing = [p for p in reference.paths if p not in present]
        expected = set(reference.paths)
        extra = [p for p in tree.paths if p not in expected]
        if missing:
            raise ValueError(f"{label}: leaf {missing[0]} of {reference_label} is missing")
        if extra:
            raise ValueError(f"{label}: leaf {extra[0]} is not in {reference_label}")
        raise ValueError(f"{label}: tree structure {tree.treedef} differs from "
                         f"{reference_label}'s {reference.treedef}")
    for path, shape, ref_shape in zip(tree.paths, tree.shapes, reference.shapes, strict=True):
        if shape != ref_shape:
            raise ValueError(f"{label}: leaf {path} has shape {shape} but {reference_label}'s "
                             f"has shape {ref_shape}")
    _check_floating(tree, label)


def _flatten_all(trees: list[PyTree], labels: list[str]) -> tuple[Any, list[list[Any]]]:
    """Checks every tree against the first; returns the treedef and each tree's leaves."""
    reference, first_leaves = _describe(trees[0], labels[0])
    _check_floating(reference, labels[0])
    leaves_KxL = [first_leaves]
    for tree, label in zip(trees[1:], labels[1:], strict=True):
        description, tree_leaves = _describe(tree, label)
        _check_like(reference, labels[0], description, label)
        leaves_KxL.append(tree_leaves)
    return reference.treedef, leaves_KxL


def _normalised_weights(weights: Any, count: int | None, name: str) -> np.ndarray:
    """`weights / sum(weights)` as float64, after checking them (and their number, unless `count`
    is None); `weights=None` gives uniform weights."""
    if weights is None:
        return np.full(count, 1.0 / count)
    try:
        array = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: not a sequence of numbers ({error})") from None
    if array.ndim != 1:
        raise ValueError(f"{name}: must be one number per tree, got shape {array.shape}")
    if count is not None and len(array) != count:
        raise ValueError(f"{name}: has {len(array)} entries but there are {count} "
                         f"{'groups' if name == 'group_weights' else 'trees'}")
    for i, w in enumerate(array):
        if not np.isfinite(w):
            raise ValueError(f"{name}[{i}] is {w}; weights must be finite")
        if w < 0:
            raise ValueError(f"{name}[{i}] is {w}; weights must be non-negative")
    if len(array) == 0:
        raise ValueError(f"{name} is empty")
    if array.sum() == 0:
        raise ValueError(f"{name}: all are zero; at least one weight must be positive")
    return array / array.sum()


def _check_same_keys(group_weights: Mapping[Any, float], names: list[Any]) -> None:
    missing = [name for name in names if name not in group_weights]
    if missing:
        raise ValueError(f"group_weights: no weight for group {missing[0]!r}")
    extra = [key for key in group_weights if key not in set(names)]
    if extra:
        raise ValueError(f"group_weights: {extra[0]!r} is not a group")
