#!/usr/bin/env python
"""Meta-train a learned optimizer with pipeline training (Optim4RL style).

    python scripts/meta_train_pipeline.py --method metagrad --rule optim4rl --envs Catch-bsuite \
        --pipeline-units 4 --reset-interval 40 --meta-steps 300 --out runs/o4rl-catch
    python scripts/meta_train_pipeline.py ... --no-pipeline      # ablation: all units reset together

Writes to --out: log.jsonl, log.csv, objective.png, checkpoints/ (resume with
--resume: meta-parameters and meta-optimizer state are restored; the training
units restart fresh), optimizer/ (use as ``lopt:DIR/optimizer``), and at the
end summary.md (A2C with the learned optimizer vs Adam on every env).
Only --method metagrad is implemented here; --method es is rejected.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import envs  # noqa: E402  (safe XLA flags before JAX starts)

RULES = ("optim4rl", "open", "mlp", "gru", "lstm")
METHODS = ("metagrad", "es")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="metagrad", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--rule", default="optim4rl", help=f"learned rule: {', '.join(RULES)}")
    p.add_argument("--envs", default="Catch-bsuite", help="comma-separated env names or suites")
    p.add_argument("--pipeline-units", type=int, default=4)
    p.add_argument("--reset-interval", type=int, default=40, help="meta-steps between resets of one unit")
    p.add_argument("--no-pipeline", action="store_true", help="all units reset together (ablation)")
    p.add_argument("--inner-steps", type=int, default=4, help="K inner A2C updates per meta-step")
    p.add_argument("--meta-steps", type=int, default=300)
    p.add_argument("--meta-lr", type=float, default=3e-3)
    p.add_argument("--lr", type=float, default=3e-3, help="agent learning rate given to the rule")
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--eval-timesteps", type=float, default=16000, help="A2C env steps in the final comparison")
    p.add_argument("--seeds", type=int, default=4, help="seeds of the final comparison (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/meta_train_pipeline")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=100)
    return p.parse_args(argv)


def build(args):
    from agents.a2c import A2CConfig, A2CHParams
    from learned_optim.base import rule_class
    from meta.metagrad import MetaGradConfig
    from meta.pipeline import PipelineConfig

    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r}; allowed: {', '.join(METHODS)}")
    if args.method == "es":
        raise ValueError("--method es is not implemented in meta_train_pipeline.py yet; use --method metagrad")
    if args.rule not in RULES:
        raise ValueError(f"--rule {args.rule!r}; allowed: {', '.join(RULES)}")
    for name in ("pipeline_units", "reset_interval", "inner_steps", "meta_steps", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    names = envs.expand_suites(args.envs.split(","))
    env_pairs = [envs.make(n) for n in names]
    pipe = PipelineConfig(num_units=args.pipeline_units, reset_interval=args.reset_interval,
                          staggered=not args.no_pipeline)
    cfg = MetaGradConfig(num_inner=args.inner_steps, meta_lr=args.meta_lr, pipeline=pipe)
    acfg = A2CConfig(num_envs=args.num_envs, num_steps=args.num_steps, hidden_sizes=(args.hidden,))
    hp = A2CHParams.default(lr=args.lr, gamma=args.gamma)
    return names, env_pairs, cfg, acfg, hp, rule_class(args.rule)()


def compare(args, names, env_pairs, acfg, hp, rule, meta_params):
    """Final return of A2C with the learned rule and with Adam (same lr, same seeds)."""
    import dataclasses
    import jax
    import numpy as np
    import learned_optim
    from agents.a2c import make_a2c
    from agents.ppo import final_return

    ecfg = dataclasses.replace(acfg, total_timesteps=int(args.eval_timesteps))
    keys = jax.random.split(jax.random.key(args.seed + 1000), args.seeds)
    rows = []
    for name, (env, ep) in zip(names, env_pairs):
        res = {}
        for label, tx in (("learned", rule.make_optimizer(meta_params)),
                          ("adam", learned_optim.from_spec(f"adam:lr={args.lr}"))):
            ag = make_a2c(ecfg, env, ep, tx)
            _, m = jax.jit(jax.vmap(ag.train, (0, None)))(keys, hp)
            r = final_return(m, 0.1)
            res[label] = (float(np.mean(r)), float(np.std(r)))
        rows.append((name, res))
    return rows


def main(argv=None):
    args = parse_args(argv)
    try:
        names, env_pairs, cfg, acfg, hp, rule = build(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    import numpy as np
    import learned_optim
    from meta import checkpoint
    from meta.metagrad import make_metagrad

    os.makedirs(args.out, exist_ok=True)
    trainer = make_metagrad(cfg, rule, env_pairs, acfg, hp)
    state = trainer.init(jax.random.key(args.seed))
    doc_config = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "seeds", "eval_timesteps", "meta_steps", "checkpoint_every")}
    ckpt_dir = os.path.join(args.out, "checkpoints")
    rows, start = [], 0
    if args.resume:
        try:
            start, saved, document = checkpoint.restore(
                ckpt_dir, {"meta_params": state.meta_params, "meta_opt_state": state.meta_opt_state}, doc_config)
        except checkpoint.CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows = document.get("logs", [])
        state = state._replace(meta_params=saved["meta_params"], meta_opt_state=saved["meta_opt_state"],
                               step=jax.numpy.asarray(start, jax.numpy.int32))
    step = jax.jit(trainer.step)
    t0 = time.time()
    for i in range(start, args.meta_steps):
        state, m = step(state)
        row = dict(meta_step=i + 1, meta_loss=float(m["meta_loss"]),
                   unit_return=float(np.mean(m["unit_returns"])), grad_norm=float(m["grad_norm"]),
                   seconds=time.time() - t0)
        rows.append(row)
        last = i + 1 == args.meta_steps
        if (i + 1) % 20 == 0 or last:
            print(f"meta-step {i + 1}/{args.meta_steps} loss {row['meta_loss']:.4f} "
                  f"unit return {row['unit_return']:.3f}", flush=True)
        if (i + 1) % args.checkpoint_every == 0 or last:
            checkpoint.save(ckpt_dir, i + 1, {"meta_params": state.meta_params,
                                              "meta_opt_state": state.meta_opt_state},
                            {"config": doc_config, "logs": rows})
            learned_optim.save(os.path.join(args.out, "optimizer"), rule, state.meta_params, overwrite=True)
    with open(os.path.join(args.out, "log.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if rows:
        with open(os.path.join(args.out, "log.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        from meta.report import plot_curves
        x = np.array([r["meta_step"] for r in rows])
        plot_curves(os.path.join(args.out, "objective.png"),
                    {"unit return": (x, np.array([[r["unit_return"] for r in rows]])),
                     "meta loss": (x, np.array([[r["meta_loss"] for r in rows]]))},
                    title="pipeline meta-gradient", xlabel="meta-step", ylabel="value")
    learned_optim.save(os.path.join(args.out, "optimizer"), rule, state.meta_params, overwrite=True)
    if args.seeds > 0:
        table = compare(args, names, env_pairs, acfg, hp, rule, state.meta_params)
        lines = ["# Pipeline meta-gradient run", "", f"method {args.method}, rule {args.rule}, "
                 f"units {args.pipeline_units}, reset interval {args.reset_interval}, "
                 f"pipeline {'off' if args.no_pipeline else 'on'}, meta-steps {args.meta_steps}", "",
                 f"A2C final return over {args.seeds} seeds, {int(args.eval_timesteps)} steps:", "",
                 "| env | learned | adam |", "|---|---|---|"]
        for name, res in table:
            lines.append(f"| {name} | {res['learned'][0]:.3f} ± {res['learned'][1]:.3f} | "
                         f"{res['adam'][0]:.3f} ± {res['adam'][1]:.3f} |")
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
