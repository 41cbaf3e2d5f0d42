import os

import runtime  # noqa: F401  (the project's safe XLA defaults, before JAX starts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
