"""One functional env API over gymnax, Brax and the Optim4RL gridworlds.

>>> import envs
>>> env, params = envs.make("CartPole-v1")
>>> obs, state = env.reset(key, params)
>>> obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

``make`` returns the env wrapped for training (action clipping for
continuous actions, ``AutoReset`` and ``EpisodeStats``); pass
``wrappers=False`` for the bare adapter. Keyword overrides go to the env's
parameters (gymnax ``EnvParams`` fields such as ``max_steps_in_episode``) or
constructor (Brax ``backend``, gridworld ``horizon``).
"""

import runtime  # noqa: F401  (safe XLA flags before JAX starts)
from envs.core import Env, Wrapper
from envs.spaces import Box, Discrete
from envs.wrappers import AutoReset, ClipAction, EpisodeStats, NormalizeObservation, NormalizeReward, VecEnv
from envs.gymnax_env import GYMNAX_ENVS

BRAX_ENVS = (
    "ant",
    "halfcheetah",
    "hopper",
    "walker2d",
    "humanoid",
    "inverted_pendulum",
    "inverted_double_pendulum",
    "reacher",
)
GRIDWORLD_ENVS = tuple(
    f"gridworld/{size}_{density}_{length}"
    for size in ("small", "big")
    for density in ("sparse", "dense")
    for length in ("short", "long")
)

SUITES = {
    "minatar": ("Asterix-MinAtar", "Breakout-MinAtar", "Freeway-MinAtar", "SpaceInvaders-MinAtar"),
    "classic": ("CartPole-v1", "Acrobot-v1", "Pendulum-v1"),
    "bsuite": ("Catch-bsuite",),
    "brax": tuple(f"brax/{n}" for n in BRAX_ENVS),
    "gridworlds": GRIDWORLD_ENVS,
}


def known_envs() -> tuple:
    """All names ``make`` accepts."""
    return GYMNAX_ENVS + tuple(f"brax/{n}" for n in BRAX_ENVS) + GRIDWORLD_ENVS


def _check_name(name: str) -> None:
    if name not in known_envs():
        raise ValueError(f"unknown env {name!r}; known envs: {', '.join(known_envs())}")


def make_bare(name: str, **overrides):
    """The adapter alone (no auto-reset, no statistics): ``(env, params)``."""
    _check_name(name)
    if name in GYMNAX_ENVS:
        from envs.gymnax_env import GymnaxEnv

        env = GymnaxEnv(name, **overrides)
    elif name.startswith("brax/"):
        from envs.brax_env import BraxEnv

        env = BraxEnv(name.split("/", 1)[1], **overrides)
    else:
        from envs.gridworld import Gridworld

        env = Gridworld(name.split("/", 1)[1], **overrides)
    return env, env.default_params


def make(name: str, *, wrappers: bool = True, **overrides):
    """``(env, env_params)`` for a known env name; see the module docstring."""
    env, params = make_bare(name, **overrides)
    if wrappers:
        if isinstance(env.action_space(params), Box):
            env = ClipAction(env)
        env = EpisodeStats(AutoReset(env))
    return env, params


def expand_suites(names) -> list:
    """``"minatar,CartPole-v1"`` or a list -> env names, suites expanded, checked."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    out = []
    for n in names:
        for m in SUITES.get(n, (n,)):
            _check_name(m)
            out.append(m)
    return out


__all__ = [
    "Env", "Wrapper", "Box", "Discrete", "AutoReset", "ClipAction", "EpisodeStats",
    "NormalizeObservation", "NormalizeReward", "VecEnv", "make", "make_bare", "known_envs", "expand_suites",
    "SUITES", "GYMNAX_ENVS", "BRAX_ENVS", "GRIDWORLD_ENVS",
]
