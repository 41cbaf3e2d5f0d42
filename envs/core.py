"""The one functional environment API of the project.

Every environment, whatever its source (gymnax, Brax, our gridworlds), is a
stateless object with pure functions; state and parameters are pytrees passed
in and out, so ``jax.vmap`` batches envs and population members alike::

    obs, state = env.reset(key, params)
    obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)

``terminated`` marks a true end of the episode (no bootstrapping);
``truncated`` marks a time limit (bootstrap from the final observation).
The bare adapters do not reset by themselves; ``envs.wrappers.AutoReset``
does, and stores the pre-reset observation in ``info["final_obs"]``.
``info`` always has the same keys and shapes from step to step.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax

from envs.spaces import Space

StepResult = Tuple[Any, Any, jax.Array, jax.Array, jax.Array, Dict[str, Any]]


class Env:
    """Base class: stateless; subclasses implement the five methods below."""

    name: str = "env"

    @property
    def default_params(self) -> Any:
        raise NotImplementedError

    def reset(self, key: jax.Array, params: Any) -> Tuple[Any, Any]:
        raise NotImplementedError

    def step(self, key: jax.Array, state: Any, action: jax.Array, params: Any) -> StepResult:
        raise NotImplementedError

    def observation_space(self, params: Any) -> Space:
        raise NotImplementedError

    def action_space(self, params: Any) -> Space:
        raise NotImplementedError

    @property
    def unwrapped(self) -> "Env":
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Wrapper(Env):
    """Forwards everything to the wrapped env; subclasses override what they change."""

    def __init__(self, env: Env):
        self._env = env

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper does not define itself.
        if name.startswith("__") or name == "_env":
            raise AttributeError(name)
        return getattr(self._env, name)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._env.name

    @property
    def default_params(self) -> Any:
        return self._env.default_params

    def reset(self, key, params):
        return self._env.reset(key, params)

    def step(self, key, state, action, params):
        return self._env.step(key, state, action, params)

    def observation_space(self, params):
        return self._env.observation_space(params)

    def action_space(self, params):
        return self._env.action_space(params)

    @property
    def unwrapped(self) -> Env:
        return self._env.unwrapped

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._env!r})"
