"""Pure-JAX RL agents whose optimizer is injected: PPO (discrete and
continuous actions), A2C and TD3, each ``make_<agent>(config, env,
env_params, tx)`` returning pure functions that ``jax.vmap`` turns into a
population.

Modules: ``core`` (the shared protocol and skeleton), ``ppo``, ``a2c``,
``td3`` (each agent's own algorithm), ``networks`` (MLPs and action
distributions), ``losses`` (GAE, the PPO loss), ``replay_buffer`` (TD3's),
``presets`` (named settings per env family).
"""

import runtime  # noqa: F401  (safe XLA flags before JAX starts)
