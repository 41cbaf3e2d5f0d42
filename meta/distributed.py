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


_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize() -> bool:
    """Starts JAX's multi-process runtime when the environment asks for it.

    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``: those three are passed to
    ``jax.distributed.initialize`` (it does not read them itself); a missing or
    bad one is a ``ValueError`` naming it. ``JAX_DISTRIBUTED=1`` alone: JAX
    detects the cluster (SLURM, TPU pods, ...). On the CPU backend the
    collectives go through gloo (JAX's own CPU implementation), unless the
    user chose another. Returns whether it initialised; calling it twice is
    harmless."""
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    auto = os.environ.get("JAX_DISTRIBUTED") == "1"
    if not address and not auto:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if address:
        missing = [v for v in _ENV[1:] if os.environ.get(v) is None]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={address} is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not; set all three of {', '.join(_ENV)} "
                             "(or JAX_DISTRIBUTED=1 alone on a cluster JAX detects)")
        try:
            n, i = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except ValueError:
            raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                             f"{os.environ['JAX_NUM_PROCESSES']!r} and {os.environ['JAX_PROCESS_ID']!r}") from None
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES), got {i} of {n}")
        kwargs = dict(coordinator_address=address, num_processes=n, process_id=i)
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


def start_cli() -> None:
    """For a command's ``main``: ``maybe_initialize()``, then every process but
    process 0 prints nothing on stdout (its errors still reach stderr).
    Raises ``ValueError`` for bad multi-process variables."""
    import sys

    if maybe_initialize() and not is_main():
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # also what the runtime's C++ (gloo) prints
        os.close(devnull)


def is_main() -> bool:
    """Process 0: the one that writes logs, plots, results and prints progress."""
    return jax.process_index() == 0


def _key_impl(x):
    return jax.random.key_impl(x)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` for a value every process holds the
    same copy of (built from the same seed). Over several processes each one
    places only its own shards (``jax.make_array_from_callback``), so a state
    holding NaNs (NaN != NaN) places as well as any other."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def one(x, sharding):
        if _is_key(x):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), sharding), impl=_key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def to_host(tree):
    """``jax.device_get(tree)`` that also works for arrays split over several
    processes: those are gathered (every process gets the whole value)."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            if _is_key(x):
                return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=_key_impl(x))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


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
