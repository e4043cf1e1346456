"""The one checkpoint wrapper: orbax `CheckpointManager` over `<workdir>/checkpoints`.

Each step holds three items: `params` and `opt_state` (sharded arrays, restored straight into their
target shardings) and `meta` (JSON: the step, the grain iterator state and anything else small).
Keeping `params` apart lets continued pretraining and model merging read a run's params alone.
Saves are atomic: a run killed mid-save restores from the last complete step.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "meta")


def manager(workdir: str, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                           read_only=read_only)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_names=ITEMS)


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
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        opt_state=ocp.args.StandardRestore(abstract_opt_state),
        meta=ocp.args.JsonRestore()))
    return restored["params"], restored["opt_state"], restored["meta"]


def load_params(workdir: str, abstract_params, step: int | None = None):
    """The params of another run (its latest step by default), e.g. for `init_from` or merging."""
    mngr = manager(workdir, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}")
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
    mngr.close()
    return restored["params"]


def abstract_like(tree, shardings) -> object:
    """ShapeDtypeStructs of `tree` with the given shardings (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
