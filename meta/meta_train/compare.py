"""Adam beside the learned optimizer, its learning rate tuned: the reference
returns ES fitness divides by, and the final comparison on the training envs
(``summary.md``, ``summary.json``, ``comparison.png``)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict

import numpy as np

from agents.ppo import RETURN_MEASURE_WORDS, final_return, measure_fraction
from meta.lr_tuning import select_lr
from meta.meta_train.plan import Plan
from meta.report import comparison_table, plot_curves


def steps_text(config) -> str:
    """``config.timesteps`` (a ``meta.es.ESConfig``) as words: the number, or
    the recipe's per-env totals where it is None."""
    if config.timesteps is not None:
        return f"{config.timesteps:,d}"
    from agents.presets import resolve_config

    return " / ".join(f"{resolve_config(n, recipe=config.recipe).config.total_timesteps:,d}" for n in config.envs)


def tuning_seed(config) -> int:
    """Root seed of Adam's lr tuning runs (``meta.experiment.tuning_keys``: a
    key stream apart from the candidates' and the evaluation seeds')."""
    return config.seed + 10_000


def evaluation_seed(config) -> int:
    """Root seed of the final comparison's agents (``evaluation_keys``)."""
    return config.seed + 20_000


def _choose(lrs, returns, diverged, measure: str) -> Dict[str, Any]:
    choice = select_lr(lrs, returns, diverged, RETURN_MEASURE_WORDS[measure])
    return dict(lr=choice["lr"], lr_grid=[float(x) for x in lrs], mean_return=choice["mean_return"],
                stderr=choice["stderr"], at_edge=choice["at_edge"], rule=choice["rule"],
                reference=float(choice["mean_return"][choice["index"]]))


def _say_tuning(say, name, t, seeds, measure):
    grid = ", ".join(f"{lr:g}: {m:.3f}" for lr, m in zip(t["lr_grid"], t["mean_return"]))
    say(f"Adam tuned on {name}: lr {t['lr']:g} ({measure} {t['reference']:.3f} over {seeds} tuning seeds; {grid})"
        + ("  note: the best lr is at the edge of --adam-lr-grid; widen it" if t["at_edge"] else ""))


def tune_adam(config, grid, tune_seeds: int, say) -> Dict[str, Dict[str, Any]]:
    """Adam's lr per env of ``config`` (a ``meta.es.ESConfig``), tuned as the
    benchmark tunes (``meta.lr_tuning.select_lr``: one vmapped sweep over
    ``grid`` x ``tune_seeds`` PPO agents on the tuning key stream) by the
    measure ES optimises (``config.fitness_measure``). Per env: ``lr``,
    ``lr_grid``, ``mean_return`` and ``stderr`` per lr, ``at_edge``,
    ``rule`` and ``reference`` (the chosen lr's mean: ES fitness divides by
    it)."""
    from agents.presets import resolve_config
    from meta.experiment import train_lr_sweep

    out = {}
    for name in config.envs:
        cfg, hp, preset_lr = resolve_config(name, recipe=config.recipe, total_timesteps=config.timesteps)
        lrs = grid.resolve(preset_lr)
        sweep = train_lr_sweep(name, "adam", cfg, hp, lrs, tune_seeds, seed=tuning_seed(config), log=None,
                               measure=config.fitness_measure)
        out[name] = dict(_choose(lrs, sweep["final_return"], sweep["diverged"], config.fitness_measure),
                         tuning_seeds=tune_seeds, key_stream=sweep["key_stream"], per_seed=sweep["final_return"])
        _say_tuning(say, name, out[name], tune_seeds, config.fitness_measure)
    return out


def agent_dir_for(out: str, envs, name: str) -> str:
    """Where the final comparison saves the learned optimizer's PPO agents on
    env ``name``: ``out/agent`` for the first of ``envs`` (``metarl-eval out``),
    ``out/agents/NAME/agent`` for the others (``metarl-eval out/agents/NAME``)."""
    from meta.experiment import AGENT_DIR

    if name == envs[0]:
        return os.path.join(out, AGENT_DIR)
    return os.path.join(out, "agents", name.replace("/", "_"), AGENT_DIR)


def compare_with_adam(out, config, seeds, tuning, say):
    """Learned optimizer (ES mean, ``out/optimizer``) vs Adam at its tuned lr
    (``tuning``: ``tune_adam``'s, per env) on the training envs: fresh PPO
    agents with the settings of meta-training, on the same evaluation seeds
    (apart from the tuning seeds), measured as ES measured fitness. Writes
    ``summary.md``, ``summary.json`` (``summary_document``) and
    ``comparison.png``; the learned optimizer's agents are saved
    (``agent_dir_for``)."""
    from agents.presets import resolve_config
    from meta.experiment import train_seeds

    results, curves, per_env = [], {}, {}
    # An absolute path: the saved agents' document rebuilds the optimizer from it in any directory.
    spec_lopt = "lopt:" + os.path.abspath(os.path.join(out, "optimizer"))
    measure = config.fitness_measure
    for name in config.envs:
        cfg, hp, preset_lr = resolve_config(name, recipe=config.recipe, total_timesteps=config.timesteps)
        tuned = tuning[name]
        runs = {}
        for spec, label, lr in (("adam", "adam (tuned lr)", tuned["lr"]), (spec_lopt, LEARNED, preset_lr)):
            agent_dir = agent_dir_for(out, config.envs, name) if spec == spec_lopt else None
            res = train_seeds(name, spec, cfg, hp, seeds, seed=evaluation_seed(config), log=None, learning_rate=lr,
                              agent_dir=agent_dir)
            runs[label] = _collect(results, curves, name, label, res, measure, say)
            if agent_dir:
                say(f"learned optimizer's agents on {name} saved to {agent_dir} (play them with metarl-eval "
                    f"{os.path.dirname(agent_dir)})")
        per_env[name] = dict(learned=runs[LEARNED], adam_tuned=runs["adam (tuned lr)"], tuning=tuned)
    doc = summary_document(measure, per_env, seeds=seeds, timesteps=steps_text(config),
                           evaluation_seed=evaluation_seed(config))
    write_summary(out, "Learned optimizer vs tuned Adam",
                  f"{seeds} evaluation seeds, {steps_text(config)} env steps per agent, the settings used in "
                  f"meta-training.", doc, results)
    plot_curves(os.path.join(out, "comparison.png"), curves, title="learned optimizer vs tuned Adam")
    return doc


LEARNED = "learned (ES mean)"


def summary_document(measure: str, per_env: Dict[str, Dict[str, Any]], **extra) -> Dict[str, Any]:
    """``summary.json``: ``{"measure", "envs": {ENV: {"learned": {"mean",
    "per_seed"}, "adam_tuned": {"mean", "lr", "lr_grid", "per_seed"}}}}``
    (``per_env[ENV]`` = ``learned``/``adam_tuned`` per-seed values and
    ``tuning``), plus the tuning's detail per env and ``extra``."""
    envs_doc = {}
    for name, d in per_env.items():
        t = d["tuning"]
        learned, adam = (_side(d[k]) for k in ("learned", "adam_tuned"))
        envs_doc[name] = dict(
            learned=learned, adam_tuned=dict(mean=adam.pop("mean"), lr=t["lr"], lr_grid=t["lr_grid"], **adam),
            tuning={k: t[k] for k in ("mean_return", "stderr", "at_edge", "tuning_seeds", "rule") if k in t},
        )
    return dict(measure=measure, measure_words=RETURN_MEASURE_WORDS[measure], envs=envs_doc, **extra)


def _side(run) -> Dict[str, Any]:
    """``{"mean", "per_seed"}`` (and the final return's mean, for the record)
    of one side: ``_collect``'s dict, or the per-seed values alone."""
    run = run if isinstance(run, dict) else dict(per_seed=run)
    out = dict(mean=float(np.mean(run["per_seed"])), per_seed=[float(x) for x in run["per_seed"]])
    if "final_return" in run:
        out["final_return_mean"] = float(np.mean(run["final_return"]))
    return out


def write_summary(out, title: str, setting: str, doc: Dict[str, Any], results) -> None:
    """``summary.md`` (the table, the tuning, who is ahead per env) and ``summary.json``."""
    lines = [f"# {title}", "", setting, "", f"Measure: {doc['measure_words']} (`{doc['measure']}`).", ""]
    lines += comparison_table(results, value=doc["measure"].replace("_", " "))
    lines += ["", "Adam's learning rate, tuned on seeds apart from the evaluation seeds:", ""]
    for name, e in doc["envs"].items():
        t = e["tuning"]
        grid = ", ".join(f"{lr:g}: {m:.3f}" for lr, m in zip(e["adam_tuned"]["lr_grid"], t["mean_return"]))
        diff = e["learned"]["mean"] - e["adam_tuned"]["mean"]
        lines.append(f"- {name}: lr {e['adam_tuned']['lr']:g} of {grid} ({t.get('tuning_seeds', '?')} tuning seeds"
                     + (", at the grid's edge" if t.get("at_edge") else "") + f"); learned {'+' if diff >= 0 else ''}"
                     f"{diff:.3f} vs tuned Adam"
                     + (f" (final return, last 10% of training: learned {e['learned']['final_return_mean']:.3f}, "
                        f"tuned Adam {e['adam_tuned']['final_return_mean']:.3f})"
                        if "final_return_mean" in e["learned"] and doc["measure"] != "final_window" else ""))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(doc, f, indent=2)


def compare_a2c_with_adam(out, plan: Plan, say):
    """Fresh A2C agents with the learned optimizer (at the agent lr it was
    meta-trained with) and with Adam at its lr tuned over ``--adam-lr-grid``
    on ``--tune-seeds`` seeds apart from the evaluation seeds, on the training
    envs; measured by the final return. Writes ``summary.md``,
    ``summary.json`` and ``comparison.png``."""
    from meta.meta_train.plan import adam_grid
    from meta.units import train_a2c_lr_sweep, train_a2c_seeds

    options, seeds = plan.options, plan.run.final_seeds
    a2c = plan.a2c
    if options.eval_timesteps is not None:
        a2c = dataclasses.replace(a2c, total_timesteps=int(options.eval_timesteps))
    steps = a2c.num_updates * a2c.batch_size
    results, curves, per_env = [], {}, {}
    learned = "learned" if plan.mode == "metagrad" else LEARNED
    measure, tune_seeds = "final_window", plan.run.tune_seeds
    for name in plan.envs:
        lrs = adam_grid(plan.run).resolve(float(plan.learning_rate))
        sweep = train_a2c_lr_sweep(name, "adam", a2c, plan.hparams, lrs, tune_seeds, seed=plan.run.seed + 10_000)
        tuned = dict(_choose(lrs, sweep["final_return"], sweep["diverged"], measure), tuning_seeds=tune_seeds)
        _say_tuning(say, name, tuned, tune_seeds, measure)
        runs = {}
        for spec, label, lr in (("adam", "adam (tuned lr)", tuned["lr"]),
                                ("lopt:" + os.path.join(out, "optimizer"), learned, float(plan.learning_rate))):
            res = train_a2c_seeds(name, spec, a2c, plan.hparams, seeds, seed=plan.run.seed + 20_000,
                                  learning_rate=lr)
            runs[label] = _collect(results, curves, name, label, res, measure, say)
        per_env[name] = dict(learned=runs[learned], adam_tuned=runs["adam (tuned lr)"], tuning=tuned)
    pc = plan.pipeline
    doc = summary_document(measure, per_env, seeds=seeds, timesteps=steps, evaluation_seed=plan.run.seed + 20_000)
    write_summary(out, "Learned optimizer vs tuned Adam (A2C)",
                  f"{options.LABEL}, rule {options.rule}, {pc.num_units} units, reset interval {pc.reset_interval}, "
                  f"pipeline {'on (staggered)' if pc.staggered else 'off (all units reset together)'}, "
                  f"{options.generations} outer steps.\n\nA2C ({a2c.num_envs} envs x {a2c.num_steps} steps, hidden "
                  f"{a2c.hidden_sizes}), {seeds} evaluation seeds, {steps:,d} env steps per agent; the learned "
                  f"optimizer at the agent lr {float(plan.learning_rate):g} it was meta-trained with"
                  + (", meta-trained with scaled rewards, compared on the raw rewards" if plan.env_overrides else "")
                  + ".", doc, results)
    plot_curves(os.path.join(out, "comparison.png"), curves, title="learned optimizer vs tuned Adam (A2C)")
    return doc


def _collect(results, curves, name, label, res, measure, say):
    """Adds one run (``train_seeds``/``train_a2c_seeds``'s result) to the
    table and the plot; returns its per-seed values by ``measure``."""
    counts = res.get("episode_counts")
    fr = (np.asarray(res["final_return"]) if counts is None and measure == "final_window"
          else final_return({"episode_return": res["curves"], "episodes": counts}, measure_fraction(measure)))
    results.append((name, label, fr))
    curves[f"{name}: {label}"] = (res["steps"], res["curves"])
    say(f"final comparison on {name}: {label} {fr.mean():.3f} ({measure})")
    return dict(per_seed=[float(x) for x in fr], final_return=[float(x) for x in res["final_return"]])
