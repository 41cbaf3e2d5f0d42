"""One driver per mode: what the host loop (``meta.meta_train.loop``) needs
from ES or meta-gradient training. Each wraps the mode's pure ``init``/``step``
(``meta.es.make_es``, ``meta.metagrad.make_metagrad``), jitted here, and says
how a step becomes a log row, a progress line and a plot."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import numpy as np

import envs
from meta.distributed import jit_placed, put
from meta.meta_train.plan import Plan
from meta.report import plot_fitness, plot_objective

LOG_FIELDS = ["generation", "fitness_mean", "fitness_max", "fitness_min", "nan_count", "sigma", "seconds",
              "env_steps_per_second", "mean_candidate_return", "es_mean_return"]
METAGRAD_FIELDS = ["meta_step", "meta_loss", "unit_return", "grad_norm", "seconds", "env_steps_per_second"]


class Driver(NamedTuple):
    """What the host loop needs from one mode."""

    init: Callable  # () -> state, placed as the step expects
    step: Callable  # state -> (state, metrics on the host), jitted
    place: Callable  # restored state -> state placed as the step expects
    meta_params: Callable  # state -> meta-parameters handed out as the optimizer
    row: Callable  # (outer step, metrics, seconds) -> log row
    line: Callable  # row -> progress line
    plot: Callable  # (out, rows) -> None
    fields: list  # log.csv columns
    describe: str
    log_every: int  # outer steps between progress lines (the last one is always shown)


def _staggered(pc) -> str:
    return "staggered" if pc.staggered else "all together"


def es_driver(plan: Plan, refs) -> Driver:
    """ES over whole lifetimes or over pipeline units, with ``refs`` the
    reference return per env that fitness divides by."""
    from meta.es import lifetime_evaluation, make_es, make_evaluator
    from meta.meta_train.compare import steps_text

    options, config = plan.options, plan.es
    if plan.mode == "es":
        evaluation = lifetime_evaluation(config, plan.rule)
        what = (f"{config.seeds} seeds x {len(config.envs)} env(s) {list(config.envs)}, "
                f"{steps_text(config)} steps per agent")
        evaluate_mean = jax.jit(make_evaluator(config, plan.rule)) if options.eval_every else None
    else:
        from meta.pipeline_es import unit_evaluation

        evaluation = unit_evaluation(config, plan.rule, plan.pipeline_es, plan.a2c, plan.hparams,
                                     plan.env_overrides, plan.learning_rate)
        pc = plan.pipeline_es.pipeline
        what = (f"{pc.num_units} pipeline units x {len(config.envs)} env(s) {list(config.envs)}, "
                f"window {plan.pipeline_es.window} A2C updates, reset every {pc.reset_interval} generations "
                f"({_staggered(pc)})")
        evaluate_mean = None
    es = make_es(config, plan.rule, evaluation, refs)
    steps_per_gen = evaluation.env_steps_per_generation
    ref_scale = np.maximum(np.abs(np.asarray(refs, np.float64)), 1e-6)
    step_jit = jit_placed(es.step, es.state_sharding)

    def place(state):
        return put(state, es.state_sharding)

    def step(state):
        state, m = step_jit(state)
        m = dict(jax.device_get(m), sigma=jax.device_get(getattr(state.es_state, "std", np.nan)))
        gen = int(state.generation)
        if evaluate_mean is not None and gen % options.eval_every == 0:
            m["es_mean_eval"] = jax.device_get(evaluate_mean(es.mean_meta_params(state), jax.random.key(gen - 1)))
        return state, m

    def row(gen, m, seconds):
        fit = np.asarray(m["fitness"], np.float64)
        ok = fit[fit > -1e5]
        r = dict(generation=gen + 1, fitness_mean=float(ok.mean()) if ok.size else float("nan"),
                 fitness_max=float(fit.max()), fitness_min=float(ok.min()) if ok.size else float("nan"),
                 nan_count=int(m["nan_count"]), sigma=float(np.mean(m["sigma"])), seconds=seconds,
                 env_steps_per_second=steps_per_gen / seconds,
                 mean_candidate_return=[float(x) for x in np.nanmean(m.get("candidate_return", m["returns"]), axis=0)],
                 es_mean_return=None, es_mean_fitness=None)
        if "es_mean_return" in m:  # pipeline units: the mean's own window, free
            r["es_mean_return"] = [float(x) for x in m["es_mean_return"]]
        elif "es_mean_eval" in m:
            r["es_mean_return"] = [float(x) for x in np.asarray(m["es_mean_eval"]).mean(-1)]
        if r["es_mean_return"] is not None:
            r["es_mean_fitness"] = float(np.mean(np.asarray(r["es_mean_return"]) / ref_scale))
        return r

    def line(r):
        return (f"gen {r['generation']:4d}/{options.generations}  fitness mean {r['fitness_mean']:.3f}  max "
                f"{r['fitness_max']:.3f}  min {r['fitness_min']:.3f}  NaN {r['nan_count']}  "
                f"{r['seconds']:.1f}s  {r['env_steps_per_second']:,.0f} env steps/s"
                + (f"  ES-mean fitness {r['es_mean_fitness']:.3f}" if r["es_mean_fitness"] is not None else ""))

    describe = (f"ES ({config.algorithm}) over {options.rule}: population {config.population} x {what} "
                f"({steps_per_gen:,d} env steps per generation), {jax.device_count()} device(s); "
                f"output in {plan.run.out}")
    return Driver(lambda: place(es.init(jax.random.key(config.seed))), step, place, es.mean_meta_params,
                  row, line, plot_fitness, LOG_FIELDS, describe, log_every=1)


def metagrad_driver(plan: Plan) -> Driver:
    from meta.metagrad import make_metagrad

    cfg, options = plan.metagrad, plan.options
    trainer = make_metagrad(cfg, plan.rule, [envs.make(n, **plan.env_overrides.get(n, {})) for n in plan.envs],
                            plan.a2c, plan.hparams, plan.learning_rate)
    n_env = len(plan.envs)
    steps = n_env * cfg.pipeline.num_units * (cfg.num_inner + 1) * plan.a2c.batch_size
    step_jit = jax.jit(trainer.step)

    def step(state):
        state, m = step_jit(state)
        return state, jax.device_get(m)

    def row(i, m, seconds):
        return dict(meta_step=i + 1, meta_loss=float(m["meta_loss"]), unit_return=float(np.mean(m["unit_returns"])),
                    grad_norm=float(m["grad_norm"]), seconds=seconds, env_steps_per_second=steps / seconds)

    def line(r):
        return (f"meta-step {r['meta_step']:5d}/{options.generations}  loss {r['meta_loss']:.4f}  unit return "
                f"{r['unit_return']:.3f}  grad norm {r['grad_norm']:.3g}  {r['env_steps_per_second']:,.0f} env steps/s")

    pc = cfg.pipeline
    describe = (f"meta-gradients over {options.rule}: {pc.num_units} units x {n_env} env(s) {list(plan.envs)}, "
                f"K={cfg.num_inner}, reset every {pc.reset_interval} meta-steps ({_staggered(pc)}), "
                f"{steps:,d} env steps per meta-step; output in {plan.run.out}")
    return Driver(lambda: trainer.init(jax.random.key(plan.run.seed)), step, lambda s: s, lambda s: s.meta_params,
                  row, line, plot_objective, METAGRAD_FIELDS, describe, log_every=20)
