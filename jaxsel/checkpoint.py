"""The one checkpoint wrapper: orbax `CheckpointManager` over `<workdir>/checkpoints`.

Each step holds three items: `params` and `opt_state` (sharded arrays, restored straight into their
target shardings) and `meta` (JSON: the step, the grain iterator state and anything else small).
Keeping `params` apart lets continued pretraining and model merging read a run's params alone.
Saves are atomic: a run killed mid-save restores from the last complete step.

Checkpoints written before the blocks ran under `nn.scan` hold one `block_<i>` subtree per layer;
they are read into that layout and stacked into today's `blocks` (leading `layers` axis) on
restore, optimizer moments included.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxsel import files


def manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only)
    # Handlers named up front, so a fresh manager can read an item's metadata before restoring.
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    folder = files.path(workdir) / "checkpoints"
    return ocp.CheckpointManager(folder if files.is_remote(workdir) else folder.absolute(),
                                 options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, abstract_params, abstract_opt_state,
            step: int | None = None) -> tuple[object, object, dict]:
    """Restores (params, opt_state, meta) at `step` (default: the latest) into the given targets.

    The targets are `jax.ShapeDtypeStruct` trees carrying shardings, so every array lands on its
    devices directly.
    """
    step = mngr.latest_step() if step is None else step
    per_layer = _per_layer(mngr, step)
    targets = {"params": abstract_params, "opt_state": abstract_opt_state}
    restored = mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(),
        **{k: ocp.args.StandardRestore(unstack_layers(v) if per_layer else v)
           for k, v in targets.items()}))
    if per_layer:
        restored = {**restored, **{k: _stacked(restored[k], v) for k, v in targets.items()}}
    return restored["params"], restored["opt_state"], restored["meta"]


def load_params(workdir: str, abstract_params, step: int | None = None):
    """The params of another run (its latest step by default), e.g. for `init_from` or merging."""
    mngr = manager(workdir, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
    per_layer = _per_layer(mngr, step)
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(
        unstack_layers(abstract_params) if per_layer else abstract_params)))
    mngr.close()
    return _stacked(restored["params"], abstract_params) if per_layer else restored["params"]


def abstract_like(tree, shardings) -> object:
    """ShapeDtypeStructs of `tree` with the given shardings (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _per_layer(mngr: ocp.CheckpointManager, step: int) -> bool:
    """Whether the params saved at `step` hold one `block_<i>` subtree per layer."""
    paths = jax.tree_util.tree_flatten_with_path(mngr.item_metadata(step)["params"].tree)[0]
    return any(getattr(key, "key", None) == "block_0" for path, _ in paths for key in path)


def _map_dicts(fn, tree):
    """`tree` with `fn` applied to every dict in it, outermost first (dicts, lists, tuples and
    named tuples, as optax states nest them)."""
    if isinstance(tree, dict):
        return {k: _map_dicts(fn, v) for k, v in fn(tree).items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_dicts(fn, v) for v in tree))
    if isinstance(tree, tuple | list):
        return type(tree)(_map_dicts(fn, v) for v in tree)
    return tree


def unstack_layers(tree):
    """`blocks` ([layers, ...] leaves) -> `block_0`, `block_1`, ... (one layer each); leaves are
    arrays or ShapeDtypeStructs (whose shardings lose their leading axis)."""
    def slice_layer(x, i):
        if isinstance(x, jax.ShapeDtypeStruct):
            sharding = x.sharding
            if isinstance(sharding, jax.sharding.NamedSharding):
                sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
                    *tuple(sharding.spec)[1:]))
            return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
        return x[i]

    def split(d):
        if "blocks" not in d:
            return d
        layers = jax.tree.leaves(d["blocks"])[0].shape[0]
        rest = {k: v for k, v in d.items() if k != "blocks"}
        return rest | {f"block_{i}": jax.tree.map(lambda x, i=i: slice_layer(x, i), d["blocks"])
                       for i in range(layers)}

    return _map_dicts(split, tree)


def stack_layers(tree):
    """The inverse of `unstack_layers`: `block_0`, `block_1`, ... -> `blocks`."""
    def join(d):
        layers = sorted(int(k[len("block_"):]) for k in d if k.startswith("block_"))
        if not layers:
            return d
        rest = {k: v for k, v in d.items() if not k.startswith("block_")}
        return rest | {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs),
                                              *(d[f"block_{i}"] for i in layers))}

    return _map_dicts(join, tree)


def _stacked(tree, abstract):
    """`tree` in today's layout, on the shardings of `abstract`."""
    return jax.device_put(stack_layers(tree), jax.tree.map(lambda a: a.sharding, abstract))
