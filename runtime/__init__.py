"""Process-wide runtime settings every package of the project may import.

Importing this package applies the platform defaults of ``runtime.platform``
(a safe XLA CPU scheduler flag and one OpenBLAS thread, on the jaxlib versions
that need them) before JAX starts its backend. It imports no other package of
the project, and not JAX.
"""

from runtime import platform  # noqa: F401  (safe XLA flags before JAX starts)
from runtime.platform import one_matrix_at_a_time

__all__ = ["one_matrix_at_a_time", "platform"]
