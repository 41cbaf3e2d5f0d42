"""Devices for a population: multi-host start-up and the ``"pop"`` mesh.

When the usual variables are set (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or a cluster JAX detects by itself
such as SLURM or TPU pods with ``JAX_DISTRIBUTED=1``), call
``jax.distributed.initialize()`` before any computation; the population axis
is then sharded over every device of every host by the ``"pop"`` mesh.

Every outer loop shards its population the same way: a one-axis ``Mesh``
named ``"pop"`` over all devices, member-stacked arrays ``[P, ...]`` split
along their leading axis (``split_sharding``), everything else replicated
(``replicated_sharding``). XLA inserts the collectives where a step gathers
across members.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

POP = "pop"  # the population axis of every mesh


def maybe_initialize() -> bool:
    wanted = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAX_DISTRIBUTED") == "1"
    if not wanted:
        return False
    jax.distributed.initialize()
    return True


def _sizes(num_members: Union[None, int, Sequence[int]]) -> Sequence[int]:
    if num_members is None:
        return ()
    return (int(num_members),) if isinstance(num_members, int) else tuple(int(n) for n in num_members)


def population_mesh(num_members: Union[None, int, Sequence[int]] = None, devices=None):
    """A ``Mesh`` with one ``"pop"`` axis over ``devices`` (default: every
    device of every process). ``num_members`` (a population size, or the
    sizes of several stacked groups) must divide over the devices; else a
    ``ValueError`` names the population and the device count."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for size in _sizes(num_members):
        if size % n:
            raise ValueError(f"--population {size} does not divide over {n} devices; use a multiple of {n}")
    return Mesh(np.array(devices), (POP,))


def population_mesh_or_none(num_members: Union[int, Sequence[int]], devices=None):
    """``population_mesh(num_members)`` when there are at least two devices
    and every size divides over them; None otherwise (run on one device)."""
    n = len(jax.devices() if devices is None else devices)
    if n < 2 or any(size % n for size in _sizes(num_members)):
        return None
    return population_mesh(num_members, devices)


def split_sharding(mesh):
    """Leading (member) axis split over ``"pop"``."""
    return NamedSharding(mesh, PartitionSpec(POP))


def replicated_sharding(mesh):
    """The same value on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def shard_population(tree, mesh):
    """``tree`` (every leaf ``[P, ...]``) placed with its member axis split over ``mesh``."""
    return jax.device_put(tree, jax.tree.map(lambda _: split_sharding(mesh), tree))


def replicate(tree, mesh):
    """``tree`` placed whole on every device of ``mesh``."""
    return jax.device_put(tree, replicated_sharding(mesh))


def jit_placed(step: Callable, state_shardings=None):
    """``jax.jit(step)`` for ``step(state) -> (state, info)``. With
    ``state_shardings`` (a pytree of ``NamedSharding`` like ``state``) the
    state keeps its placement from call to call, so the step compiles once;
    ``info`` comes back replicated."""
    if state_shardings is None:
        return jax.jit(step)
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    return jax.jit(step, in_shardings=(state_shardings,), out_shardings=(state_shardings, replicated_sharding(mesh)))
