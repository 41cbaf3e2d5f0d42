"""The host loop of a meta-training run: references, resume, outer steps with
progress lines, logs, checkpoints, the optimizer handed out, plots, and the
final comparison against Adam. Everything inside an outer step is one jitted
program (``meta.meta_train.drivers``)."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from tqdm import tqdm

import learned_optim
from meta import checkpoint, distributed
from meta.meta_train import compare
from meta.meta_train.drivers import Driver, es_driver, metagrad_driver
from meta.meta_train.plan import Plan, plan_document
from meta.report import write_log_rows


def say(line: str) -> None:
    """A progress line: above the progress bar on a terminal, else printed."""
    if sys.stderr.isatty():
        tqdm.write(line)
    else:
        print(line, flush=True)


def reference_returns(plan: Plan):
    """``(refs, tuning)``: the return per env that ES fitness divides by, and
    (whole lifetimes) Adam's lr tuning per env (``compare.tune_adam``), as
    stored in ``references.json`` when resuming; else refs are
    ``--reference-returns``, the tuned Adam's return (whole lifetimes) or 1
    (pipeline units), written to ``references.json``."""
    path = os.path.join(plan.run.out, "references.json")
    stored = None
    if plan.run.resume and os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if plan.mode != "es" or "adam_tuning" in stored:
            return stored["reference_returns"], stored.get("adam_tuning")
    tuning = None
    # Tuned when ES needs a reference or the final comparison a tuned Adam (a run resumed
    # from before the tuning existed tunes now, its stored refs kept).
    if plan.mode == "es" and (not (plan.es.reference_returns or stored) or plan.run.final_seeds > 0):
        from meta.meta_train.plan import adam_grid

        tuning = compare.tune_adam(plan.es, adam_grid(plan.run), plan.run.tune_seeds, say)
    if stored is not None:
        refs = stored["reference_returns"]
    elif plan.es.reference_returns:
        refs = list(plan.es.reference_returns)
    elif tuning is not None:
        refs = [tuning[name]["reference"] for name in plan.es.envs]
    else:
        refs = [1.0] * len(plan.es.envs)
    if distributed.is_main():
        doc = {"envs": list(plan.es.envs), "reference_returns": refs}
        if tuning is not None:
            doc.update(measure=plan.es.fitness_measure, adam_lr_grid=plan.run.adam_lr_grid, adam_tuning=tuning)
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
    return refs, tuning


def make_driver(plan: Plan):
    """``(driver, Adam's tuning or None)``."""
    if plan.mode == "metagrad":
        return metagrad_driver(plan), None
    refs, tuning = reference_returns(plan)
    return es_driver(plan, refs), tuning


def run(plan: Plan, sink=None) -> None:
    """Runs ``plan`` to its last outer step, then the final comparison.
    Raises ``checkpoint.CheckpointError`` when ``--resume`` cannot restore.
    ``sink`` (``meta.tracking.WandbSink``) gets the ``log.jsonl`` rows."""
    out, generations = plan.run.out, plan.options.generations
    os.makedirs(out, exist_ok=True)
    ckpt_dir = os.path.join(out, "checkpoints")
    document = plan_document(plan)
    driver, tuning = make_driver(plan)

    state = driver.init()
    rows, start = [], 0
    if plan.run.resume:
        start, state, stored = checkpoint.restore(ckpt_dir, state, document)
        state = driver.place(state)
        rows = stored["logs"][:start]
        say(f"resumed from generation {start} in {ckpt_dir}")

    say(driver.describe)
    bar = tqdm(total=generations, initial=start, desc="outer steps", file=sys.stderr,
               disable=not sys.stderr.isatty())
    for gen in range(start, generations):
        t0 = time.perf_counter()
        state, m = driver.step(state)
        rows.append(driver.row(gen, m, time.perf_counter() - t0))
        bar.update(1)
        last = gen + 1 == generations
        show, save = (gen + 1) % driver.log_every == 0 or last, (gen + 1) % plan.options.checkpoint_every == 0 or last
        if show:
            say(driver.line(rows[-1]))
        main = distributed.is_main()  # only process 0 writes; every process checkpoints (orbax)
        if (show or save) and main:
            write_log_rows(out, rows, driver.fields, sink)
        if save:
            checkpoint.save(ckpt_dir, gen + 1, distributed.to_host(state), {"config": document, "logs": rows})
            meta_params = distributed.to_host(driver.meta_params(state))  # every process: it may be a program
            if main:
                learned_optim.save(os.path.join(out, "optimizer"), plan.rule, meta_params, overwrite=True)
                driver.plot(out, rows)
    bar.close()
    if start >= generations:
        say(f"nothing to do: the checkpoint is already at generation {start}")
    if plan.run.final_seeds > 0 and distributed.is_main():  # single-process programs
        if plan.mode == "es":
            compare.compare_with_adam(out, plan.es, plan.run.final_seeds, tuning, say)
        else:
            compare.compare_a2c_with_adam(out, plan, say)
