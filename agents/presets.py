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
    # The small Brax envs (BRAX_SMALL) on a CPU budget: the brax preset's
    # 2048 x 10 batch makes 10 updates in 2e5 steps; 64 x 32 makes 97, and
    # inverted_pendulum reaches its maximum 1000 by 1.1e5 steps (2 seeds,
    # 34k steps/s on 2 CPU cores; docs/results.md).
    "brax_small": Preset(
        PPOConfig(num_envs=64, num_steps=32, total_timesteps=200_000, update_epochs=4, num_minibatches=4,
                  hidden_sizes=(64, 64), normalize_obs=True, normalize_rewards=True, anneal_lr=False),
        dict(ent_coef=0.0, gamma=0.99, gae_lambda=0.95), 3e-4,
    ),
}
BRAX_SMALL = ("brax/inverted_pendulum", "brax/inverted_double_pendulum", "brax/reacher")

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

# Recipes: a reference's own settings, per agent and env family, in place of
# the CPU-sized presets above. "open-paper": OPEN's PPO
# (AlexGoldie/rl-learned-optimization @ b65037b, rl_optimizer/configs.py; two
# hidden layers of HSIZE, train.py:67-100; actor and critic clipped apart,
# train.py:460-461; training proportion u / (U - 1), train.py:438-441). MinAtar
# as configs.py:4-80 (Breakout's TOTAL_TIMESTEPS 5e5, the others 1e7), the
# gridworld as configs.py:105-124, Brax as Ant's, configs.py:81-104. The lr is
# Adam's for comparisons (OPEN has none): the gridworld's LR 1e-4
# (configs.py:106), our MinAtar and Brax presets' elsewhere.
_OPEN = dict(max_grad_norm=0.5, clip_per_network=True, train_fraction_to_one=True, anneal_lr=True)
RECIPES: Dict[str, Dict[str, Dict[str, Preset]]] = {
    "open-paper": {"ppo": {
        "minatar": Preset(PPOConfig(num_envs=64, num_steps=128, total_timesteps=10_000_000, update_epochs=4,
                                    num_minibatches=8, hidden_sizes=(64, 64), activation="relu", **_OPEN),
                          dict(gamma=0.99, gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01, vf_coef=0.5), 3e-3),
        "gridworld": Preset(PPOConfig(num_envs=1024, num_steps=20, total_timesteps=30_000_000, update_epochs=2,
                                      num_minibatches=16, hidden_sizes=(16, 16), activation="tanh", **_OPEN),
                            dict(gamma=0.99, gae_lambda=0.95, clip_eps=0.2, ent_coef=0.01, vf_coef=0.5), 1e-4),
        "brax": Preset(PPOConfig(num_envs=2048, num_steps=10, total_timesteps=50_000_000, update_epochs=4,
                                 num_minibatches=32, hidden_sizes=(64, 64), activation="tanh", normalize_obs=True,
                                 normalize_rewards=True, **{**_OPEN, "anneal_lr": False}),
                       dict(gamma=0.99, gae_lambda=0.95, clip_eps=0.2, ent_coef=0.0, vf_coef=0.5), 3e-4),
    }},
}
# Per env: the reference's TOTAL_TIMESTEPS where it differs from its family's,
# and PPO_TEMP, the return of PPO with Adam that OPEN's ES divides fitness by
# (configs.py: asterix :19, freeway :39, breakout :58, spaceinvaders :77,
# ant :103, gridworld :122).
RECIPE_ENVS: Dict[str, Dict[str, Dict[str, float]]] = {
    "open-paper": {
        "Asterix-MinAtar": dict(reference_return=15.0353),
        "Freeway-MinAtar": dict(reference_return=61.8369),
        "Breakout-MinAtar": dict(total_timesteps=500_000, reference_return=50.0822),
        "SpaceInvaders-MinAtar": dict(reference_return=167.0913),
        "brax/ant": dict(reference_return=6517.31),
    },
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
    if env_name in BRAX_SMALL and "brax_small" in presets:
        return "brax_small"
    if env_name.startswith("brax/") and "brax" in presets:
        return "brax"
    if env_name.endswith("-MinAtar") and "minatar" in presets:
        return "minatar"
    if env_name.startswith("gridworld/") and "gridworld" in presets:
        return "gridworld"
    return "classic"


def check_recipe(recipe: Optional[str], agent: str = "ppo") -> None:
    """A ``ValueError`` naming the allowed recipes unless ``recipe`` is None or
    one of ``agent``'s."""
    if recipe is None:
        return
    have = sorted(r for r, per_agent in RECIPES.items() if agent in per_agent)
    if recipe not in have:
        raise ValueError(f"unknown {agent.upper()} recipe {recipe!r}; allowed: {', '.join(have) or 'none'}")


def recipe_reference_return(recipe: str, env_name: str) -> Optional[float]:
    """The reference's own return of Adam on ``env_name`` under ``recipe``
    (OPEN's PPO_TEMP), or None where it gives none."""
    return RECIPE_ENVS.get(recipe, {}).get(env_name, {}).get("reference_return")


def resolve_config(env_name: str, preset: Optional[str] = None, agent: str = "ppo", recipe: Optional[str] = None,
                   **overrides) -> Preset:
    """``Preset(config, hparams dict, lr)`` for ``agent`` on ``env_name``: the
    preset (default: the env family's; with ``recipe``, the recipe's preset of
    that family and its per-env settings) with ``overrides`` applied."""
    check_recipe(recipe, agent)
    presets = _presets(agent) if recipe is None else RECIPES[recipe][agent]
    name = preset or preset_for(env_name, agent)
    who = agent.upper()
    if name not in presets:
        where = f" in recipe {recipe!r}" if recipe else ""
        raise ValueError(f"unknown {who} preset {name!r}{where}; allowed: {sorted(presets)}")
    config, hp, lr = presets[name]
    if recipe is not None:
        per_env = {k: v for k, v in RECIPE_ENVS.get(recipe, {}).get(env_name, {}).items() if k != "reference_return"}
        overrides = {**{k: type(getattr(config, k))(v) for k, v in per_env.items()},
                     **{k: v for k, v in overrides.items() if v is not None}}
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
