"""Rendering a saved agent's episodes: ``metarl-eval RUN_DIR --gif PATH``.

The agent of seed ``seed_index`` plays ``frames`` steps of one env (episodes
follow each other, reset automatically) with the same policy as
``metarl-eval`` (``meta.saved_agent.policy``); every step's env state is kept
and handed to the library that draws it:

* gymnax envs: gymnax's own ``gymnax.visualize.Visualizer`` writes a GIF
  (matplotlib + Pillow); the classic-control envs it draws through Gymnasium's
  renderer, which needs ``pygame`` (``pip install -e .[render]``);
* Brax envs: ``brax.io.html.render`` writes an HTML page (PATH ends in ``.html``).

Any other env (gridworlds, gymnax envs the visualiser does not draw) -> a
one-line ``ValueError``, raised by ``check_renderable`` before anything compiles.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import jax
import numpy as np

# The envs gymnax's Visualizer draws (gymnax 1.0.1, visualize/visualizer.py), by drawer.
GYMNAX_GYM = ("Acrobot-v1", "CartPole-v1", "Pendulum-v1", "MountainCar-v0", "MountainCarContinuous-v0")
GYMNAX_DRAWN = GYMNAX_GYM + ("Catch-bsuite", "Asterix-MinAtar", "Breakout-MinAtar", "Freeway-MinAtar",
                             "Seaquest-MinAtar", "SpaceInvaders-MinAtar", "Pong-misc", "PointRobot-misc",
                             "MetaMaze-misc", "FourRooms-misc")


def check_renderable(env_name: str, path: str) -> str:
    """``"gif"`` or ``"html"``: how ``env_name`` renders to ``path``; an env
    without a renderer, a path with the wrong suffix or a missing drawing
    package -> one-line ``ValueError``."""
    if env_name.startswith("brax/"):
        if not path.lower().endswith(".html"):
            raise ValueError(f"--gif {path}: Brax envs render to an HTML page (brax.io.html); "
                             "give a path ending in .html")
        return "html"
    if env_name not in GYMNAX_DRAWN:
        raise ValueError(f"--gif: env {env_name!r} has no renderer (gymnax's visualiser draws "
                         f"{', '.join(GYMNAX_DRAWN)}; Brax envs render to HTML)")
    if not path.lower().endswith(".gif"):
        raise ValueError(f"--gif {path}: gymnax's visualiser writes GIFs; give a path ending in .gif")
    if env_name in GYMNAX_GYM:
        try:
            import pygame  # noqa: F401  (Gymnasium's classic-control renderer draws with it)
        except ImportError:
            raise ValueError(f"--gif: drawing {env_name} needs pygame (Gymnasium's classic-control renderer): "
                             "pip install -e .[render]") from None
    return "gif"


def _inner(state):
    """The innermost env state under the wrappers' states (``EpisodeStats``,
    normalisers): the gymnax state or ``envs.brax_env.EnvState``."""
    while hasattr(state, "env_state"):
        state = state.env_state
    return state


def play_frames(saved, frames: int, seed: int = 0, deterministic: bool = False, seed_index: int = 0):
    """``frames`` steps of one env with seed ``seed_index``'s agent: returns
    ``(states, rewards [T], done [T])``, ``states`` the innermost env state
    before each step (leaves ``[T, ...]``)."""
    from envs.wrappers import VecEnv
    from meta.saved_agent import EVALUATION_STREAM, policy

    vec = VecEnv(saved.env, 1)
    act = policy(saved, deterministic)
    params = jax.tree.map(lambda x: x[seed_index], saved.tree["params"])
    norm = jax.tree.map(lambda x: x[seed_index], saved.tree.get("normalizer", {}))

    def run(key):
        k_reset, key = jax.random.split(key)
        obs, env_state = vec.reset(k_reset, saved.env_params)

        def step(carry, _):
            obs, env_state, key = carry
            key, k_act, k_env = jax.random.split(key, 3)
            shown = jax.tree.map(lambda x: x[0], _inner(env_state))
            obs, env_state, reward, term, trunc, _ = vec.step(k_env, env_state, act(params, norm, obs, k_act),
                                                              saved.env_params)
            return (obs, env_state, key), (shown, reward[0], term[0] | trunc[0])

        _, out = jax.lax.scan(step, (obs, env_state, key), None, length=frames)
        return out

    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), EVALUATION_STREAM), 0x6966)  # "if"
    return jax.device_get(jax.jit(run)(key))


def render(saved, path: str, frames: int = 200, seed: int = 0, deterministic: bool = False,
           seed_index: int = 0) -> Dict[str, Any]:
    """Renders ``frames`` steps of seed ``seed_index``'s agent to ``path`` (see
    the module docstring) and returns ``path``, ``frames``, ``format`` and the
    ``returns`` of the episodes that ended within them."""
    name = saved.document["env"]
    kind = check_renderable(name, path)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"--gif-frames must be a positive integer, got {frames!r}")
    num_seeds = saved.document["seeds"]
    if not 0 <= seed_index < num_seeds:
        raise ValueError(f"--gif-seed-index must be in [0, {num_seeds}), got {seed_index}")
    states, rewards, done = play_frames(saved, frames, seed, deterministic, seed_index)
    rewards, done = np.asarray(rewards, np.float64), np.asarray(done, bool)
    running, shown, returns = 0.0, [], []
    for r, d in zip(rewards, done):
        running += r
        shown.append(running)  # the return so far, as the title of each frame
        if d:
            returns.append(running)
            running = 0.0
    seq: List[Any] = [jax.tree.map(lambda x: x[t], states) for t in range(frames)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if kind == "gif":
        # Gymnasium's renderer starts pygame for every frame: no sound card, no display needed.
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        from meta.report import pyplot

        pyplot()  # the Agg backend before gymnax's visualiser imports pyplot
        from gymnax.visualize import Visualizer

        gymnax_env = saved.env.unwrapped._env
        Visualizer(gymnax_env, saved.env_params, seq, shown).animate(path)
    else:
        from brax.io import html

        brax_env = saved.env.unwrapped._env
        with open(path, "w") as f:
            f.write(html.render(brax_env.sys, [s.brax_state.pipeline_state for s in seq]))
    return dict(path=path, format=kind, frames=frames, seed_index=seed_index, episodes_ended=len(returns),
                returns=[float(x) for x in returns], deterministic=bool(deterministic))
