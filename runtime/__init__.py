"""Process-wide runtime settings every package of the project may import.

Importing this package applies the platform defaults of ``runtime.platform``
(safe XLA flags and one OpenBLAS thread on CPU) before JAX starts its backend.
It imports no other package of the project.
"""

from runtime import platform  # noqa: F401  (safe XLA flags before JAX starts)
from runtime.platform import one_matrix_at_a_time

__all__ = ["one_matrix_at_a_time", "platform"]
