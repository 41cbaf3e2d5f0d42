"""Safe XLA defaults, applied before JAX initialises its backend.

jaxlib 0.10.x on small CPUs (2 cores) can deadlock in a jitted ``vmap`` over
a flax init that uses the orthogonal initializer: XLA's concurrency-optimised
CPU scheduler runs two batched LAPACK QR kernels whose inner parallel loops
wait for the same two threads, and the program hangs with no error.  Turning
that scheduler off avoids it.  We add the flag only when the user has not set
it themselves, and only while the backend has not started yet (XLA reads
``XLA_FLAGS`` once, at backend initialisation).

The agents also avoid the batched QR itself (``agents.networks.orthogonal``
maps it over the batch), which removes the same hang on several (fake)
devices, where this flag alone does not help.

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


def apply_blas_thread_default() -> None:
    """``OPENBLAS_NUM_THREADS=1`` unless the user set it (see the module docstring)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


apply_safe_xla_defaults()
apply_blas_thread_default()
