"""Safe XLA defaults, applied before JAX initialises its backend.

jaxlib 0.10.x on small CPUs (2 cores) can deadlock in a jitted ``vmap`` over
a flax init that uses the orthogonal initializer: XLA's concurrency-optimised
CPU scheduler runs two batched LAPACK QR kernels whose inner parallel loops
wait for the same two threads, and the program hangs with no error.  Turning
that scheduler off avoids it.  We add the flag only when the user has not set
it themselves, and only while the backend has not started yet (XLA reads
``XLA_FLAGS`` once, at backend initialisation).

Batched LAPACK. Every jaxlib 0.10.x CPU LAPACK kernel (``qr``, ``eigh``,
``cholesky``, triangular solves, ...) splits a batch of matrices over XLA's
intra-op thread pool and blocks until the pieces finish. Under ``jax.vmap``
(a population, seeds, a grid) a call becomes batched, and when several such
calls run at once -- one per (fake) device under ``shard_map``, or several
independent ones in one program -- every pool thread can end up waiting for
pieces queued behind it: the program hangs with no error (seen: PB2's
Cholesky on 4 fake CPU devices, 3 of 32 runs on a busy 2-core machine; the
orthogonal initializer's QR). The scheduler flag does not help there.
``one_matrix_at_a_time`` wraps such a function so that under ``vmap`` it
runs over the batch with ``lax.map``, one unbatched matrix per call, which
takes the blocking path out. All of the project's LAPACK calls go through
it (``agents.networks.orthogonal``, K-FAC's ``eigh``, PB2's GP).

LAPACK threads. JAX's CPU linear algebra (``eigh``, ``qr``, ``cholesky``)
calls the OpenBLAS that scipy bundles, whose worker threads spin while they
wait. The matrices here are small (K-FAC's Kronecker factors are at most a
few hundred rows), so those threads add CPU time and no speed: a 401 x 401
``eigh`` took 24 ms of wall time either way but 24 ms of CPU time with the
default threads against 12 ms with one, and on a busy 2-core machine PPO+K-FAC
(inverse period 20) spent 19 ms of CPU per optimizer step beyond Adam's with
the default threads against 9.5 ms with one. So we set
``OPENBLAS_NUM_THREADS=1`` unless the user set it (OpenBLAS reads it when the
library loads, so this must happen before scipy or numpy load it).
"""

from __future__ import annotations

import os
import sys
import warnings

SAFE_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_FLAG_NAME = SAFE_CPU_FLAG.split("=")[0]


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except Exception:  # pragma: no cover - private API moved
        return False


def apply_safe_xla_defaults() -> bool:
    """Adds the scheduler flag to ``XLA_FLAGS`` unless the user set it.

    Returns True when the flag is in effect (set by us or by the user).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG_NAME in flags:
        return SAFE_CPU_FLAG in flags
    if _backend_started():
        warnings.warn(
            "JAX's backend started before the project could set "
            f"XLA_FLAGS={SAFE_CPU_FLAG}; on small CPUs a vmapped population "
            "init may deadlock. Import envs/agents/learned_optim/meta before "
            "using JAX, or set the flag yourself.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    os.environ["XLA_FLAGS"] = (flags + " " + SAFE_CPU_FLAG).strip()
    return True


def one_matrix_at_a_time(fn):
    """``fn`` (a function of arrays), whose ``jax.vmap`` is a ``lax.map``.

    Same values as ``fn``; under ``vmap`` each call gets one element of the
    batched arguments (unbatched arguments are passed as they are), so a
    LAPACK kernel inside never sees a batch (see the module docstring).
    Nested ``vmap`` nests the maps. Not differentiable (``custom_vmap``); the
    project only calls it on values it does not differentiate.
    """
    import jax  # here, not at the top: this module must run before JAX loads

    @jax.custom_batching.custom_vmap
    def wrapped(*args):
        return fn(*args)

    @wrapped.def_vmap
    def _mapped(axis_size, in_batched, *args):
        del axis_size
        flat, tree = jax.tree.flatten(args)
        flags = jax.tree.leaves(in_batched)

        def one(batched):
            it = iter(batched)
            full = [next(it) if b else x for x, b in zip(flat, flags)]
            return wrapped(*jax.tree.unflatten(tree, full))

        out = jax.lax.map(one, [x for x, b in zip(flat, flags) if b])
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


def apply_blas_thread_default() -> None:
    """``OPENBLAS_NUM_THREADS=1`` unless the user set it (see the module docstring)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


apply_safe_xla_defaults()
apply_blas_thread_default()
