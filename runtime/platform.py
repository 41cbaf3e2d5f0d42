"""Workarounds for jaxlib 0.10.x on the CPU backend, in one place.

Each is gated to where it is needed: the process-wide settings to the jaxlib
versions that need them (read from the installed package's metadata, without
importing JAX, since they must be in place before JAX starts), and the
program-level one to the CPU backend (``jax.lax.platform_dependent``), so one
exported program is right on CPU, GPU and TPU. Both settings name CPU-only
machinery, so they change nothing on an accelerator.

The scheduler flag. jaxlib 0.10.x on small CPUs (2 cores) can deadlock in a
jitted ``vmap`` over a flax init that uses the orthogonal initializer: XLA's
concurrency-optimised CPU scheduler runs two batched LAPACK QR kernels whose
inner parallel loops wait for the same two threads, and the program hangs
with no error. Turning that scheduler off avoids it. We add the flag to
``XLA_FLAGS`` only when the user has not set it themselves; XLA reads
``XLA_FLAGS`` once, when JAX starts its backend, so import this module (any
package of the project does) before using JAX.

Batched LAPACK. Every jaxlib 0.10.x CPU LAPACK kernel (``qr``, ``eigh``,
``cholesky``, triangular solves, ...) splits a batch of matrices over XLA's
intra-op thread pool and blocks until the pieces finish. Under ``jax.vmap``
(a population, seeds, a grid) a call becomes batched, and when several such
calls run at once -- one per (fake) device under ``shard_map``, or several
independent ones in one program -- every pool thread can end up waiting for
pieces queued behind it: the program hangs with no error (seen: PB2's
Cholesky on 4 fake CPU devices, 3 of 32 runs on a busy 2-core machine; the
orthogonal initializer's QR). The scheduler flag does not help there.
``one_matrix_at_a_time`` wraps such a function so that under ``vmap`` on CPU
it runs over the batch with ``lax.map``, one unbatched matrix per call, which
takes the blocking path out; on GPU and TPU it is the ordinary batched call.
All of the project's LAPACK calls go through it (``agents.networks.orthogonal``,
K-FAC's ``eigh``, PB2's GP).

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

import importlib.metadata
import os

SAFE_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_FLAG_NAME = SAFE_CPU_FLAG.split("=")[0]
AFFECTED_JAXLIB = ("0.10.",)  # version prefixes with the CPU deadlocks above


def jaxlib_version() -> str:
    """The installed jaxlib's version string ("" if none), read without importing it."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def needs_cpu_workarounds(version: str | None = None) -> bool:
    """Whether jaxlib ``version`` (default: the installed one) has the CPU deadlocks."""
    version = jaxlib_version() if version is None else version
    return version.startswith(AFFECTED_JAXLIB)


def apply_safe_xla_defaults() -> bool:
    """Adds the scheduler flag to ``XLA_FLAGS`` unless the user set it or this
    jaxlib does not need it. Returns True when the flag is in effect."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG_NAME in flags:
        return SAFE_CPU_FLAG in flags
    if not needs_cpu_workarounds():
        return False
    os.environ["XLA_FLAGS"] = (flags + " " + SAFE_CPU_FLAG).strip()
    return True


def apply_blas_thread_default() -> None:
    """``OPENBLAS_NUM_THREADS=1`` unless the user set it or this jaxlib does
    not need it (see the module docstring)."""
    if needs_cpu_workarounds():
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def one_matrix_at_a_time(fn):
    """``fn`` (a function of arrays) whose ``jax.vmap`` on CPU is a ``lax.map``.

    Same values as ``fn``. Under ``vmap``, on the CPU backend each call gets
    one element of the batched arguments (unbatched arguments are passed as
    they are), so a LAPACK kernel inside never sees a batch (see the module
    docstring); nested ``vmap`` nests the maps. On every other backend it is
    ``jax.vmap(fn)``, the batched call (``lax.platform_dependent``: one
    program, the branch chosen when it is lowered). Not differentiable
    (``custom_vmap``); the project only calls it on values it does not
    differentiate.
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

        def cpu(*xs):
            def one(batched):
                it = iter(batched)
                full = [next(it) if b else x for x, b in zip(xs, flags)]
                return wrapped(*jax.tree.unflatten(tree, full))

            return jax.lax.map(one, [x for x, b in zip(xs, flags) if b])

        def batched(*xs):
            call = lambda *ys: fn(*jax.tree.unflatten(tree, list(ys)))  # noqa: E731
            return jax.vmap(call, in_axes=[0 if b else None for b in flags])(*xs)

        out = jax.lax.platform_dependent(*flat, cpu=cpu, default=batched)
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


apply_safe_xla_defaults()
apply_blas_thread_default()
