"""Outer loops: evolution strategies, pipeline training, PBT and friends."""

from envs import _platform  # noqa: F401  (safe XLA flags before JAX starts)
