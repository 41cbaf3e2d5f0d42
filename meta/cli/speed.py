"""What an optimizer costs: env steps per second of PPO with each optimizer,
measured side by side in one process, as a ratio to the first one.

    metarl-speed --env Breakout-MinAtar \\
        --optimizers adam,open:../shared/anchors/open/breakout_OPEN.npy,optim4rl,kfac:period=10,diag_ggn \\
        --seeds 1 --updates 8 --repeats 3

Every optimizer trains ``--seeds`` vmapped PPO agents with the env's preset
(``agents.presets.resolve_config``) for ``--updates`` PPO iterations per
timed call. Calls alternate between optimizers (round robin, ``--repeats``
rounds) so a noisy, shared machine disturbs all of them alike; the median
round is reported, both by wall clock and by the process's CPU time (CPU time
is the steadier figure on a shared machine when the process is pinned to one
core, e.g. ``taskset -c 0``). Memory is XLA's own account of each compiled program
(arguments + outputs + temporaries), so one process can compare them; the
process's peak RSS is printed at the end. From a checkout, ``python
scripts/speed.py`` is the same command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import envs
import learned_optim
from agents.ppo import PPOHParams, make_ppo
from agents.presets import make_optimizer, resolve_config
from learned_optim.spec import split_spec, split_spec_list
from meta.host import device_description, peak_memory_mb
from meta.report import speed_markdown, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="Breakout-MinAtar")
    p.add_argument("--optimizers", default="adam,open,optim4rl,kfac,diag_ggn",
                   help="comma-separated optimizer specs (a spec's own settings may follow with commas: "
                        "adam,kfac:period=20,fperiod=2); the first is the baseline")
    p.add_argument("--seeds", type=int, default=1, help="vmapped agents per optimizer")
    p.add_argument("--updates", type=int, default=8, help="PPO iterations per timed call")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (round robin over optimizers)")
    p.add_argument("--curvature-batch-size", default=None,
                   help="PPOConfig.curvature_batch_size: rows of each minibatch for K-FAC / diag_ggn statistics "
                        "(default 256; 0 = all); a comma list times kfac / diag_ggn once per value")
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    return p.parse_args(argv)


def build(env_name, spec, seeds, updates, **overrides):
    """A compiled, warmed-up ``vmap`` of ``updates`` PPO iterations over
    ``seeds`` agents with ``spec``, and its timing record."""
    config, hp, preset_lr = resolve_config(env_name, **overrides)
    env, env_params = envs.make(env_name)
    agent = make_ppo(config, env, env_params, make_optimizer(spec, "ppo"))
    hp = jax.tree.map(lambda x: jnp.broadcast_to(x, (seeds,)), PPOHParams.default(**hp))
    state = jax.jit(jax.vmap(agent.init, in_axes=(0, 0, None)))(
        jax.random.split(jax.random.key(0), seeds), hp, preset_lr)
    t0 = time.perf_counter()
    run = jax.jit(jax.vmap(agent.run, in_axes=(0, None)), static_argnums=1).lower(state, updates).compile()
    compile_s = time.perf_counter() - t0
    mem = run.memory_analysis()
    mem_mb = None
    if mem is not None:
        mem_mb = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20
    state, _ = jax.block_until_ready(run(state))  # warm-up call
    return dict(run=run, state=state, compile_s=compile_s, program_mb=mem_mb,
                steps=seeds * updates * config.batch_size, times=[], cpu=[])


def main(argv=None) -> int:
    a = parse_args(argv)
    from runtime.cache import enable_compilation_cache

    enable_compilation_cache()  # persistent compilation cache (METARL_NO_COMPILE_CACHE=1: off)
    specs = list(split_spec_list(a.optimizers))
    try:
        rows = [None]
        if a.curvature_batch_size is not None:
            try:
                rows = [int(r) for r in a.curvature_batch_size.split(",") if r.strip()]
            except ValueError:
                raise ValueError(f"--curvature-batch-size must be integers >= 0, got {a.curvature_batch_size!r}")
            if not rows or min(rows) < 0:
                raise ValueError(f"--curvature-batch-size must be integers >= 0, got {a.curvature_batch_size!r}")
        if a.env not in envs.known_envs():
            raise ValueError(f"unknown env {a.env!r}; known: {', '.join(envs.known_envs())}")
        for s in specs:
            learned_optim.from_spec(s)
        for name in ("seeds", "updates", "repeats"):
            if getattr(a, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(a, name)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    cells = {}
    runs = []  # (label, spec, curvature rows)
    for s in specs:
        curvature = split_spec(s)[0] in ("kfac", "diag_ggn")  # the optimizers PPOConfig.curvature_batch_size feeds
        for r in (rows if curvature else [None]):
            runs.append((s if r is None else f"{s} [curvature rows {r}]", s, r))
    for label, s, r in runs:
        print(f"compiling {label} ...", flush=True)
        cells[label] = build(a.env, s, a.seeds, a.updates, curvature_batch_size=r)
    specs = [label for label, _, _ in runs]
    for r in range(a.repeats):
        for s in specs:
            c = cells[s]
            t, tc = time.perf_counter(), time.process_time()
            c["state"], _ = jax.block_until_ready(c["run"](c["state"]))
            c["times"].append(time.perf_counter() - t)
            c["cpu"].append(time.process_time() - tc)
        print(f"round {r + 1}/{a.repeats}: " + ", ".join(
            f"{s} {cells[s]['steps'] / cells[s]['times'][-1]:,.0f}" for s in specs) + " steps/s", flush=True)

    base = cells[specs[0]]["steps"] / statistics.median(cells[specs[0]]["times"])
    base_cpu = cells[specs[0]]["steps"] / statistics.median(cells[specs[0]]["cpu"])
    rows = []
    for s in specs:
        c = cells[s]
        sps = c["steps"] / statistics.median(c["times"])
        cpu_ratio = c["steps"] / statistics.median(c["cpu"]) / base_cpu
        rows.append(dict(optimizer=s, env_steps_per_second=sps, ratio=sps / base, cpu_ratio=cpu_ratio, cpu_times=c["cpu"], compile_s=c["compile_s"],
                         program_mb=c["program_mb"], times=c["times"]))
    print(f"\n{a.env}, {a.seeds} seed(s), {a.updates} PPO iterations per call, {device_description()}")
    print("\n".join(speed_markdown(rows)))
    peak = peak_memory_mb()
    print(f"process peak RSS {peak['host_peak_rss_mb']:.0f} MiB")
    if a.out:
        write_json(a.out, dict(env=a.env, seeds=a.seeds, updates=a.updates, device=device_description(),
                               rows=rows, memory=peak))
    return 0
