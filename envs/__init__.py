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

Names: every env the installed gymnax registers, by its gymnax name
(``CartPole-v1``, ``Seaquest-MinAtar``, ...), except those whose spaces or
API this project cannot use, which ``make`` rejects with a one-line
``ValueError`` saying why; Brax envs as ``brax/NAME``; the gridworlds as
``gridworld/SIZE_DENSITY_LENGTH``. ``python -m envs`` lists them all.
"""

import runtime  # noqa: F401  (safe XLA flags before JAX starts)
from envs.core import Env, Wrapper
from envs.spaces import Box, Discrete
from envs.wrappers import AutoReset, ClipAction, EpisodeStats, NormalizeObservation, NormalizeReward, VecEnv
from envs import gymnax_env

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
    "minatar": ("Asterix-MinAtar", "Breakout-MinAtar", "Freeway-MinAtar", "Seaquest-MinAtar",
                "SpaceInvaders-MinAtar"),
    "classic": ("CartPole-v1", "Acrobot-v1", "Pendulum-v1"),
    "bsuite": ("Catch-bsuite",),
    "brax": tuple(f"brax/{n}" for n in BRAX_ENVS),
    "gridworlds": GRIDWORLD_ENVS,
}


def known_envs() -> tuple:
    """All names ``make`` accepts: the supported gymnax envs (``gymnax_env.supported()``;
    builds each once, ~1 s, nothing compiled), then Brax and the gridworlds."""
    return gymnax_env.supported() + tuple(f"brax/{n}" for n in BRAX_ENVS) + GRIDWORLD_ENVS


def check_name(name: str) -> None:
    """Raises a one-line ``ValueError`` unless ``make(name)`` will work: an
    unknown name lists the known ones; a registered gymnax env we cannot use
    says why. Builds a gymnax env once; compiles nothing."""
    if name.startswith("brax/"):
        if name.split("/", 1)[1] in BRAX_ENVS:
            return
    elif name.startswith("gridworld/"):
        if name in GRIDWORLD_ENVS:
            return
    elif name in gymnax_env.registered():
        reason = gymnax_env.problem(name)
        if reason is not None:
            raise ValueError(reason)
        return
    raise ValueError(f"unknown env {name!r}; known envs: {', '.join(known_envs())}")


_check_name = check_name  # the older private name


def make_bare(name: str, **overrides):
    """The adapter alone (no auto-reset, no statistics): ``(env, params)``."""
    if name.startswith("brax/"):
        from envs.brax_env import BraxEnv

        check_name(name)
        env = BraxEnv(name.split("/", 1)[1], **overrides)
    elif name.startswith("gridworld/"):
        from envs.gridworld import Gridworld

        check_name(name)
        env = Gridworld(name.split("/", 1)[1], **overrides)
    elif name in gymnax_env.registered():
        # Raises the same one-line ValueError as check_name for an env we cannot use.
        env = gymnax_env.GymnaxEnv(name, **overrides)
    else:
        check_name(name)  # unknown: raises, listing the known names
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
            check_name(m)
            out.append(m)
    return out


__all__ = [
    "Env", "Wrapper", "Box", "Discrete", "AutoReset", "ClipAction", "EpisodeStats",
    "NormalizeObservation", "NormalizeReward", "VecEnv", "make", "make_bare", "known_envs", "check_name",
    "expand_suites", "SUITES", "GYMNAX_ENVS", "BRAX_ENVS", "GRIDWORLD_ENVS",
]


def __getattr__(attr: str):
    # ``GYMNAX_ENVS``: the supported gymnax names, computed on first use
    # (importing ``envs`` neither imports gymnax nor builds its envs).
    if attr == "GYMNAX_ENVS":
        return gymnax_env.supported()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
