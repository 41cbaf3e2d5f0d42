"""Outer loops: evolution strategies, pipeline training, PBT and friends."""

import runtime  # noqa: F401  (safe XLA flags before JAX starts)
