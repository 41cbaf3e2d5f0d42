"""Does vmapping a population of learned optimizers cost throughput?

    python scripts/es_throughput.py --env CartPole-v1 --rule open --populations 8,32 \\
        --seeds 1 --timesteps 2e4 --repeats 2

Measures, in one process and alternating so machine noise hits both alike:
(a) one PPO agent trained with the rule's optimizer (meta-parameters at their
initial values), jitted, not vmapped; (b) whole ES generations
(``meta.es.make_es(...).step``, jitted: ask, train every candidate x seed,
tell) for each population size. Prints env steps per second of both, their
ratio (target >= 0.9x), seconds per generation, compile time, XLA's memory
account of the generation program, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--rule", default="open")
    p.add_argument("--populations", default="8,32", help="comma-separated population sizes")
    p.add_argument("--seeds", type=int, default=1, help="agent seeds per candidate")
    p.add_argument("--timesteps", type=float, default=2e4, help="inner env steps per agent")
    p.add_argument("--repeats", type=int, default=2, help="timed generations per population size")
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    return p.parse_args(argv)


def program_mb(compiled):
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20


def _check(a) -> list:
    """Population sizes of ``a``; bad flags -> ``ValueError``."""
    import envs
    from learned_optim import registry

    if a.env not in envs.known_envs():
        raise ValueError(f"unknown env {a.env!r}; known: {', '.join(envs.known_envs())}")
    if a.rule not in registry.rule_names():
        raise ValueError(f"unknown rule {a.rule!r}; allowed: {', '.join(registry.rule_names())}")
    pops = [int(p) for p in a.populations.split(",")]
    if min(pops) < 2 or any(p % 2 for p in pops):
        raise ValueError(f"--populations must be even sizes >= 2, got {a.populations!r}")
    if a.seeds < 1 or a.repeats < 1 or a.timesteps <= 0:
        raise ValueError("--seeds and --repeats must be >= 1 and --timesteps > 0")
    return pops


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    from runtime.cache import enable_compilation_cache

    enable_compilation_cache()  # persistent compilation cache (METARL_NO_COMPILE_CACHE=1: off)
    try:
        pops = _check(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax

    from agents.ppo import make_ppo
    from learned_optim import registry
    from meta.distributed import jit_placed
    from meta.es import ESConfig, inner_setup, make_es
    from meta.host import device_description, peak_memory_mb
    from meta.report import write_json

    rule = registry.make_rule(a.rule)
    env, env_params, cfg, hp, lr = inner_setup(a.env, int(a.timesteps))
    meta_params = rule.init_meta_params(jax.random.key(0))
    agent = make_ppo(cfg, env, env_params, rule.make_optimizer(meta_params))
    single = jax.jit(agent.train).lower(jax.random.key(0), hp, lr).compile()
    single_steps = cfg.num_updates * cfg.batch_size
    jax.block_until_ready(single(jax.random.key(0), hp, lr))

    def time_single():
        t = time.perf_counter()
        jax.block_until_ready(single(jax.random.key(1), hp, lr))
        return single_steps / (time.perf_counter() - t)

    rows = []
    for pop in pops:
        config = ESConfig(envs=(a.env,), population=pop, generations=a.repeats + 1, seeds=a.seeds,
                          timesteps=int(a.timesteps))
        es = make_es(config, rule, reference_returns=[1.0])
        run = jax.device_put(es.init(jax.random.key(config.seed)), es.state_sharding)
        t0 = time.perf_counter()
        step = jit_placed(es.step, es.state_sharding).lower(run).compile()
        compile_s = time.perf_counter() - t0
        run, _ = jax.block_until_ready(step(run))  # warm-up generation
        steps = es.evaluation.env_steps_per_generation
        gen_sps, base_sps, gen_s = [], [], []
        for _ in range(a.repeats):
            base_sps.append(time_single())
            t = time.perf_counter()
            run, _ = jax.block_until_ready(step(run))
            gen_s.append(time.perf_counter() - t)
            gen_sps.append(steps / gen_s[-1])
        row = dict(population=pop, seeds=a.seeds, generation_sps=statistics.median(gen_sps),
                   single_sps=statistics.median(base_sps), seconds_per_generation=statistics.median(gen_s),
                   compile_s=compile_s, program_mb=program_mb(step), steps_per_generation=steps)
        row["ratio"] = row["generation_sps"] / row["single_sps"]
        rows.append(row)
        print(f"population {pop:3d}: generation {row['generation_sps']:,.0f} steps/s "
              f"({row['seconds_per_generation']:.1f} s), single PPO+{a.rule} {row['single_sps']:,.0f} steps/s, "
              f"ratio {row['ratio']:.2f}x", flush=True)

    print(f"\n{a.env}, rule {a.rule}, {a.seeds} seed(s) x {int(a.timesteps):,} steps per candidate, "
          f"{device_description()}")
    print(f"| population | generation steps/s | single PPO+{a.rule} steps/s | ratio | s/generation "
          "| compile s | program MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = f"{r['program_mb']:.0f}" if r["program_mb"] is not None else "n/a"
        print(f"| {r['population']} | {r['generation_sps']:,.0f} | {r['single_sps']:,.0f} | {r['ratio']:.2f}x "
              f"| {r['seconds_per_generation']:.1f} | {r['compile_s']:.1f} | {mem} |")
    peak = peak_memory_mb()
    print(f"process peak RSS {peak['host_peak_rss_mb']:.0f} MiB")
    if a.out:
        write_json(a.out, dict(env=a.env, rule=a.rule, device=device_description(), rows=rows, memory=peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
