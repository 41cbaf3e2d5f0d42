"""Adam beside the learned optimizer: the reference returns ES fitness
divides by, and the final comparison on the training envs (``summary.md``,
``comparison.png``)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from meta.meta_train.plan import Plan
from meta.report import comparison_table, plot_curves


def steps_text(config) -> str:
    """``config.timesteps`` (a ``meta.es.ESConfig``) as words: the number, or
    the recipe's per-env totals where it is None."""
    if config.timesteps is not None:
        return f"{config.timesteps:,d}"
    from agents.presets import resolve_config

    return " / ".join(f"{resolve_config(n, recipe=config.recipe).config.total_timesteps:,d}" for n in config.envs)


def measure_references(config, log):
    """Adam's final return per env of ``config`` (a ``meta.es.ESConfig``):
    ``config.seeds`` PPO agents of ``config.timesteps`` steps each."""
    from agents.presets import resolve_config
    from meta.experiment import train_seeds

    refs = []
    for name in config.envs:
        cfg, hp, lr = resolve_config(name, recipe=config.recipe, total_timesteps=config.timesteps)
        res = train_seeds(name, "adam", cfg, hp, config.seeds, seed=config.seed + 10_000, log=None, learning_rate=lr)
        refs.append(res["final_return_mean"])
        log(f"reference return of Adam on {name}: {refs[-1]:.2f} ({config.seeds} seeds, {cfg.total_timesteps:,d} steps)")
    return refs


def agent_dir_for(out: str, envs, name: str) -> str:
    """Where the final comparison saves the learned optimizer's PPO agents on
    env ``name``: ``out/agent`` for the first of ``envs`` (``metarl-eval out``),
    ``out/agents/NAME/agent`` for the others (``metarl-eval out/agents/NAME``)."""
    from meta.experiment import AGENT_DIR

    if name == envs[0]:
        return os.path.join(out, AGENT_DIR)
    return os.path.join(out, "agents", name.replace("/", "_"), AGENT_DIR)


def compare_with_adam(out, config, seeds, say):
    """Learned optimizer (ES mean, ``out/optimizer``) vs Adam on the training
    envs, fresh PPO agents with the settings of meta-training (the env preset's
    learning rate for both, as in meta-training), same seeds. The learned
    optimizer's agents are saved (``agent_dir_for``)."""
    from agents.presets import resolve_config
    from meta.experiment import train_seeds

    results, curves = [], {}
    # An absolute path: the saved agents' document rebuilds the optimizer from it in any directory.
    spec_lopt = "lopt:" + os.path.abspath(os.path.join(out, "optimizer"))
    for name in config.envs:
        cfg, hp, lr = resolve_config(name, recipe=config.recipe, total_timesteps=config.timesteps)
        for spec, label in (("adam", "adam"), (spec_lopt, "learned (ES mean)")):
            agent_dir = agent_dir_for(out, config.envs, name) if spec == spec_lopt else None
            res = train_seeds(name, spec, cfg, hp, seeds, seed=config.seed + 20_000, log=None, learning_rate=lr,
                              agent_dir=agent_dir)
            _collect(results, curves, name, label, res, say)
            if agent_dir:
                say(f"learned optimizer's agents on {name} saved to {agent_dir} (play them with metarl-eval "
                    f"{os.path.dirname(agent_dir)})")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Learned optimizer vs Adam\n\n{seeds} seeds, {steps_text(config)} env steps per agent, "
                f"the settings used in meta-training.\n\n" + "\n".join(comparison_table(results)) + "\n")
    plot_curves(os.path.join(out, "comparison.png"), curves, title="learned optimizer vs Adam")


def compare_a2c_with_adam(out, plan: Plan, say):
    """Fresh A2C agents with the learned optimizer and with Adam (the same
    agent learning rate, not tuned for Adam), same seeds, on the training envs."""
    from meta.units import train_a2c_seeds

    options, seeds = plan.options, plan.run.final_seeds
    a2c = plan.a2c
    if options.eval_timesteps is not None:
        a2c = dataclasses.replace(a2c, total_timesteps=int(options.eval_timesteps))
    steps = a2c.num_updates * a2c.batch_size
    results, curves = [], {}
    learned = "learned" if plan.mode == "metagrad" else "learned (ES mean)"
    for name in plan.envs:
        for spec, label in (("adam", "adam"), ("lopt:" + os.path.join(out, "optimizer"), learned)):
            res = train_a2c_seeds(name, spec, a2c, plan.hparams, seeds, seed=plan.run.seed + 20_000,
                                  learning_rate=plan.learning_rate)
            _collect(results, curves, name, label, res, say)
    pc = plan.pipeline
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(f"# Learned optimizer vs Adam (A2C)\n\n{options.LABEL}, rule {options.rule}, "
                f"{pc.num_units} units, reset interval {pc.reset_interval}, pipeline "
                f"{'on (staggered)' if pc.staggered else 'off (all units reset together)'}, "
                f"{options.generations} outer steps.\n\nA2C ({a2c.num_envs} envs x {a2c.num_steps} steps, hidden "
                f"{a2c.hidden_sizes}), {seeds} seeds, {steps:,d} env steps per agent, agent lr "
                f"{float(plan.learning_rate):g} for both"
                + (", meta-trained with scaled rewards, compared on the raw rewards" if plan.env_overrides else "")
                + ".\n\n" + "\n".join(comparison_table(results)) + "\n")
    plot_curves(os.path.join(out, "comparison.png"), curves, title="learned optimizer vs Adam (A2C)")


def _collect(results, curves, name, label, res, say):
    fr = np.asarray(res["final_return"])
    results.append((name, label, fr))
    curves[f"{name}: {label}"] = (res["steps"], res["curves"])
    say(f"final comparison on {name}: {label} {fr.mean():.2f}")
