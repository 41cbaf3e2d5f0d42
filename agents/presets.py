"""Named settings of every agent, per env family: ``Preset(config, hparams, lr)``.

``resolve_config(env_name, agent="ppo", **overrides)`` picks the env family's
preset (``preset_for``) and applies overrides by name (config fields,
hyperparameters and ``lr`` alike; ``None`` values are ignored)::

    cfg, hp, lr = resolve_config("Pendulum-v1", agent="td3", total_timesteps=10_000)
    agent = make_td3(cfg, env, env_params, tx)
    state, metrics = agent.train(key, TD3HParams.default(**hp), lr)

The hyperparameters a preset leaves out take the agent's defaults
(``PPOHParams.default()``, ...). ``lr`` is the family's learning rate, tuned
for Adam; the agent writes it into the optimizer's injected learning rate,
and the host code (``meta.experiment.learning_rate_for``) decides when it
applies to other optimizers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, NamedTuple, Optional

import learned_optim
from learned_optim.spec import with_defaults
from agents.a2c import A2CConfig, A2CHParams
from agents.ppo import PPOConfig, PPOHParams
from agents.td3 import TD3Config, TD3HParams



class Preset(NamedTuple):
    config: Any  # the agent's frozen config
    hparams: Dict[str, float]  # fields of the agent's *HParams
    lr: float  # the learning rate (tuned for Adam)


# PPO. MinAtar follows the OPEN paper's PPO setting.
PPO_PRESETS: Dict[str, Preset] = {
    "classic": Preset(PPOConfig(anneal_lr=True), {}, 2.5e-4),
    "minatar": Preset(
        PPOConfig(num_envs=64, num_steps=128, total_timesteps=10_000_000, update_epochs=4,
                  num_minibatches=8, activation="relu", anneal_lr=True),
        {}, 3e-3,  # best of 3e-4, 1e-3, 3e-3, 1e-2 on Breakout at 2e6 steps
    ),
    "brax": Preset(
        PPOConfig(num_envs=2048, num_steps=10, total_timesteps=50_000_000, update_epochs=4,
                  num_minibatches=32, hidden_sizes=(256, 256), normalize_obs=True, normalize_rewards=True,
                  anneal_lr=False),
        dict(ent_coef=0.0, gamma=0.99, gae_lambda=0.95), 3e-4,
    ),
    "gridworld": Preset(PPOConfig(num_envs=64, num_steps=20, total_timesteps=3_000_000, num_minibatches=4,
                                  activation="relu"), dict(gamma=0.995), 1e-3),
}

# TD3. "classic" (Pendulum) is sized for a CPU: 64x64 networks reach returns of
# about -150 in 1-2e4 env steps there; "brax" follows the TD3 paper (256x256,
# 1e6 buffer, 25e3 random steps).
TD3_PRESETS: Dict[str, Preset] = {
    "classic": Preset(TD3Config(num_envs=4, total_timesteps=50_000, buffer_size=100_000, learning_starts=2_000,
                                gradient_steps=4, hidden_sizes=(64, 64)), {}, 1e-3),
    "brax": Preset(TD3Config(num_envs=16, total_timesteps=1_000_000, buffer_size=1_000_000, learning_starts=25_000,
                             gradient_steps=16, hidden_sizes=(256, 256)), {}, 3e-4),
}

# A2C: Optim4RL's A2C (its defaults). On the gridworlds Optim4RL clips every
# gradient element to [-1, 1] in front of Adam/RMSProp (configs/a2c_grid.json
# "grad_clip": 1, built as optax.clip in components/optim.py:set_optim); on
# Catch it does not (configs/a2c_catch.json "grad_clip": -1).
A2C_PRESETS: Dict[str, Preset] = {
    "classic": Preset(A2CConfig(), {}, 1e-3),
    "gridworld": Preset(A2CConfig(grad_clip=1.0), {}, 1e-3),
}

PRESETS: Dict[str, Dict[str, Preset]] = {"ppo": PPO_PRESETS, "td3": TD3_PRESETS, "a2c": A2C_PRESETS}
_TYPES = {"ppo": (PPOConfig, PPOHParams), "td3": (TD3Config, TD3HParams), "a2c": (A2CConfig, A2CHParams)}


# Each agent's optimizer settings as its reference implementation sets them,
# where they differ from optax's defaults (which ``learned_optim.from_spec``
# keeps). A spec's own settings win (``adam:eps=1e-8``).
#  - PPO: Adam with eps 1e-5, as purejaxrl (ppo.py:92,97,
#    ppo_continuous_action.py:103,108) and CleanRL run it.
#  - TD3: the TD3 authors' code (sfujim/TD3, TD3.py:83,87) uses PyTorch's
#    Adam(lr=3e-4): betas (0.9, 0.999), eps 1e-8, i.e. optax's defaults.
#  - A2C: Optim4RL builds ``optax.<name>(learning_rate)`` with optax's
#    defaults (components/optim.py:set_optim); ours differ only for RMSProp.
OPTIMIZER_DEFAULTS: Dict[str, Dict[str, Mapping[str, float]]] = {
    "ppo": {"adam": {"eps": 1e-5}, "adamw": {"eps": 1e-5}},
    "td3": {},
    "a2c": {"rmsprop": {"decay": 0.9, "eps": 1e-8}},
}


def optimizer_spec(spec: str, agent: str = "ppo") -> str:
    """``spec`` with ``agent``'s reference optimizer settings added where the
    spec sets none: ``optimizer_spec("adam", "ppo")`` -> ``"adam:eps=1e-05"``."""
    _presets(agent)
    return with_defaults(spec, OPTIMIZER_DEFAULTS[agent])


def make_optimizer(spec: str, agent: str = "ppo"):
    """The optax transform of ``spec`` with ``agent``'s reference settings
    (``optimizer_spec``); what every script builds its agents' optimizers with."""
    return learned_optim.from_spec(optimizer_spec(spec, agent))


def preset_for(env_name: str, agent: str = "ppo") -> str:
    """The preset name of ``env_name``'s family for ``agent``."""
    presets = _presets(agent)
    if env_name.startswith("brax/") and "brax" in presets:
        return "brax"
    if env_name.endswith("-MinAtar") and "minatar" in presets:
        return "minatar"
    if env_name.startswith("gridworld/") and "gridworld" in presets:
        return "gridworld"
    return "classic"


def resolve_config(env_name: str, preset: Optional[str] = None, agent: str = "ppo", **overrides) -> Preset:
    """``Preset(config, hparams dict, lr)`` for ``agent`` on ``env_name``: the
    preset (default: the env family's) with ``overrides`` applied."""
    presets = _presets(agent)
    name = preset or preset_for(env_name, agent)
    who = agent.upper()
    if name not in presets:
        raise ValueError(f"unknown {who} preset {name!r}; allowed: {sorted(presets)}")
    config, hp, lr = presets[name]
    config_cls, hparams_cls = _TYPES[agent]
    cfg_fields = {f.name for f in dataclasses.fields(config_cls)}
    hp_fields = set(hparams_cls._fields)
    unknown = set(overrides) - cfg_fields - hp_fields - {"lr"}
    if unknown:
        raise ValueError(f"unknown {who} setting(s) {sorted(unknown)}; "
                         f"allowed: {sorted(cfg_fields | hp_fields | {'lr'})}")
    cfg_over = {k: v for k, v in overrides.items() if k in cfg_fields and v is not None}
    hp_over = {k: v for k, v in overrides.items() if k in hp_fields and v is not None}
    lr = overrides["lr"] if overrides.get("lr") is not None else lr
    return Preset(dataclasses.replace(config, **cfg_over), {**hp, **hp_over}, lr)


def a2c_grad_clip(env_names) -> float:
    """The elementwise gradient clip of A2C on ``env_names`` (one env or
    several): the env family's preset (1 on the gridworlds, as Optim4RL, else
    0); several envs whose presets disagree -> 0 (no clip)."""
    names = [env_names] if isinstance(env_names, str) else list(env_names)
    clips = {resolve_config(n, agent="a2c").config.grad_clip for n in names}
    return clips.pop() if len(clips) == 1 else 0.0


def _presets(agent: str) -> Dict[str, Preset]:
    if agent not in PRESETS:
        raise ValueError(f"unknown agent {agent!r}; allowed: {', '.join(sorted(PRESETS))}")
    return PRESETS[agent]
