"""Adapter from gymnax 1.x environments to the project's env API.

The names come from the installed gymnax (``gymnax.registered_envs``), not
from a list of our own: ``registered()`` is every name gymnax knows,
``supported()`` the ones ``envs.make`` accepts and ``unsupported()`` the rest,
each with a one-line reason. An env is supported when its action and
observation spaces convert to ours (``envs.spaces.from_gymnax``: ``Discrete``
and ``Box``; a ``Discrete`` observation is one-hot encoded) and it can be
built here (``MNISTBandit-bsuite`` needs the MNIST data set, which gymnax
downloads into ``/tmp/mnist`` the first time the env is built).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from envs.core import Env
from envs.spaces import Box, Discrete, from_gymnax

# Envs that gymnax builds from downloaded data: name -> (directory, files).
# Without the files, building the env downloads them (gymnax.utils.load_mnist).
_DATA = {
    "MNISTBandit-bsuite": (
        "/tmp/mnist",
        ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ),
}


def registered() -> Tuple[str, ...]:
    """Every env name the installed gymnax registers, in gymnax's order."""
    import gymnax

    return tuple(gymnax.registered_envs)


def problem(name: str, *, download: bool = True) -> Optional[str]:
    """Why ``envs.make(name)`` cannot work for gymnax env ``name`` (one line),
    or None when it works. Builds the env once (cheap; nothing is compiled).
    ``download=False``: report missing downloadable data instead of fetching it."""
    if name not in registered():
        return f"{name!r} is not a gymnax env"
    if not download and name in _DATA:
        directory, files = _DATA[name]
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            return (f"gymnax env {name!r} needs its data set in {directory}, which is not there; "
                    "gymnax downloads it the first time the env is built with network access")
    try:
        GymnaxEnv(name)
    except ValueError as e:
        return str(e)
    return None


def supported() -> Tuple[str, ...]:
    """The gymnax names ``envs.make`` accepts now (downloads nothing)."""
    return tuple(n for n in registered() if problem(n, download=False) is None)


def unsupported() -> Dict[str, str]:
    """``{name: one-line reason}`` for the registered gymnax envs that do not work here."""
    reasons = {n: problem(n, download=False) for n in registered()}
    return {n: r for n, r in reasons.items() if r is not None}


def __getattr__(attr: str):
    # ``GYMNAX_ENVS`` (the supported names) is computed on first use, so that
    # importing ``envs`` neither imports gymnax nor builds its envs.
    if attr == "GYMNAX_ENVS":
        return supported()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _strong(tree):
    """Leaves as strongly typed arrays, so scan carries keep one dtype."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), tree)


def _build(name: str):
    """``gymnax.make(name)``, with failures to fetch an env's data as a one-line ValueError."""
    import gymnax

    try:
        return gymnax.make(name)
    except (OSError, EOFError) as e:  # urllib's URLError is an OSError; so is a bad gzip file
        if name in _DATA:
            directory, _ = _DATA[name]
            detail = " ".join(str(e).split())
            raise ValueError(f"gymnax env {name!r} needs its data set in {directory}, which gymnax downloads "
                             f"when the env is built, and that failed ({type(e).__name__}: {detail})") from None
        raise


class GymnaxEnv(Env):
    """Wraps a gymnax env without its built-in auto-reset.

    gymnax 1.x ``step`` returns six values and resets by itself; we call its
    ``step_env`` and ``is_truncated`` instead so resetting is done once, by
    ``envs.wrappers.AutoReset``, for every env family alike. Observations are
    float32; a ``Discrete(n)`` observation (FrozenLake) becomes a one-hot
    vector of length ``n``. Raises a one-line ``ValueError`` for an env whose
    spaces or API this project cannot use.
    """

    def __init__(self, name: str, **params_overrides):
        self.name = name
        self._env, params = _build(name)
        for method in ("reset_env", "step_env", "is_truncated", "observation_space", "action_space"):
            if not callable(getattr(self._env, method, None)):
                raise ValueError(f"gymnax env {name!r} has no {method}(); this project needs gymnax's Environment API")
        if not dataclasses.is_dataclass(params):
            raise ValueError(f"gymnax env {name!r} has parameters of type {type(params).__name__}, not a dataclass")
        fields = {f.name for f in dataclasses.fields(params)}
        unknown = sorted(set(params_overrides) - fields)
        if unknown:
            raise ValueError(
                f"unknown override(s) {unknown} for env {name!r}; allowed: {sorted(fields)}"
            )
        self._params = params.replace(**params_overrides) if params_overrides else params
        # Spaces are checked here, at make time, so a bad env fails before anything compiles.
        obs_space = from_gymnax(self._env.observation_space(self._params), "observation", name)
        act_space = from_gymnax(self._env.action_space(self._params), "action", name)
        if isinstance(act_space, Box) and len(act_space.shape) != 1:
            raise ValueError(f"gymnax env {name!r} has a Box action space of shape {act_space.shape}; "
                             "this project supports 1-D Box actions")
        self._one_hot = obs_space.n if isinstance(obs_space, Discrete) else 0
        self._obs_shape = (self._one_hot,) if self._one_hot else obs_space.shape
        # MinAtar observations are 0/1 channel maps (returned as float32 like every
        # env's); agents may store them compactly (PPO's rollout buffer keeps bool).
        self.binary_observations = name.endswith("-MinAtar") or bool(self._one_hot)

    @property
    def default_params(self):
        return self._params

    def _obs(self, obs):
        obs = jax.lax.stop_gradient(obs)
        if self._one_hot:
            return jax.nn.one_hot(obs, self._one_hot, dtype=jnp.float32)
        return jnp.asarray(obs).astype(jnp.float32)

    def reset(self, key, params):
        obs, state = self._env.reset_env(key, params)
        return self._obs(obs), _strong(state)

    def step(self, key, state, action, params):
        obs, state, reward, terminated, info = self._env.step_env(key, state, action, params)
        truncated = jnp.logical_and(
            self._env.is_truncated(state, params), jnp.logical_not(terminated)
        )
        info = {"discount": jnp.asarray(info.get("discount", 1.0 - terminated), jnp.float32)}
        return (
            self._obs(obs),
            _strong(state),
            jnp.asarray(reward, jnp.float32),
            jnp.asarray(terminated, bool),
            jnp.asarray(truncated, bool),
            info,
        )

    def observation_space(self, params):
        if self._one_hot:
            return Box(0.0, 1.0, self._obs_shape)
        return Box(-jnp.inf, jnp.inf, self._obs_shape)

    def action_space(self, params):
        # Bounds may depend on (traced) params, e.g. Pendulum's max_torque.
        return from_gymnax(self._env.action_space(params), "action", self.name)
