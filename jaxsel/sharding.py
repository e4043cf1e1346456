"""The one mesh helper: distributed init, mesh, logical rules, shardings, global batches.

The mesh has axes `data`, `fsdp`, `tensor`. Batches are split over `data` x `fsdp`; parameters are
sharded by their logical axis names through `config.sharding_rules` (see `jaxsel.config`).

Axis types are set to `Auto` on purpose: with `Explicit` axes, vmapping a per-example gradient
over a batch sharded on `fsdp` while the parameters are also sharded on `fsdp` is rejected by
sharding-in-types. With `Auto`, `jax.jit`'s `in_shardings`/`out_shardings` pin the layouts at
the boundary and XLA's propagation does the rest, for training and per-example probing alike.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxsel import config as config_lib

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
    """One environment switch for multi-host runs.

    `JAXSEL_DISTRIBUTED=1` calls `jax.distributed.initialize()`, which finds the coordinator itself
    on TPU pods, SLURM and Open MPI. For explicit set-ups (and the localhost tests) set also
    `JAXSEL_COORDINATOR=host:port`, `JAXSEL_NUM_PROCESSES` and `JAXSEL_PROCESS_ID`. On CPU the
    collectives go through gloo.
    """
    if os.environ.get("JAXSEL_DISTRIBUTED", "0") != "1" or jax.distributed.is_initialized():
        return
    # Only the CPU backend reads this; asking for the backend here would initialise it too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if "JAXSEL_COORDINATOR" in os.environ:
        kwargs = dict(coordinator_address=os.environ["JAXSEL_COORDINATOR"],
                      num_processes=int(os.environ["JAXSEL_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAXSEL_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = config_lib.mesh_shape(config, len(devices))
    return jax.make_mesh(tuple(shape[a] for a in AXES), AXES,
                         axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def logical_rules(config: ml_collections.ConfigDict) -> tuple:
    """`config.sharding_rules` (a tuple of (logical name, mesh axis / tuple of axes / None)), as
    flax's logical axis rules."""
    return tuple((name, tuple(axes) if isinstance(axes, tuple | list) else axes)
                 for name, axes in config.sharding_rules)


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (`jax.eval_shape(init)`)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: the mesh's `data` x `fsdp`."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, mesh: Mesh):
    """Host-local rows (this process's contiguous slice of the global batch; a dict or other
    pytree of arrays) -> global arrays split over `data` x `fsdp`, in the same pytree."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
                        local_batch)
