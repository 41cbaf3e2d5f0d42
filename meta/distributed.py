"""Multi-host start-up through JAX's own distributed runtime.

When the usual variables are set (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or a cluster JAX detects by itself
such as SLURM or TPU pods with ``JAX_DISTRIBUTED=1``), call
``jax.distributed.initialize()`` before any computation; the population axis
is then sharded over every device of every host by the ``"pop"`` mesh.
"""

from __future__ import annotations

import os


def maybe_initialize() -> bool:
    wanted = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("JAX_DISTRIBUTED") == "1"
    if not wanted:
        return False
    import jax

    jax.distributed.initialize()
    return True
