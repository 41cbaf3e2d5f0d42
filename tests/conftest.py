import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import envs  # noqa: E402,F401  (the project's safe XLA defaults, before JAX starts)

SHARED = os.path.join(os.path.dirname(ROOT), "shared")
