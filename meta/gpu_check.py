"""The figures a GPU user needs, in one run (``scripts/gpu_check.sh``).

    python -m meta.gpu_check                  # full sizes: under 10 minutes on one GPU
    python -m meta.gpu_check --tiny           # tiny sizes: a CPU smoke test (tests/test_gpu_check.py)

Prints one line per figure, ``FIGURE <name> = <value> <unit>``, after a
line naming the device:

- ``ppo_steps_per_second[<env>,members=N]``: env steps per second of PPO
  (the env's preset, Adam) with ``N`` agents vmapped in one program, for
  ``N`` in ``--members`` (default 1, 64, 256) on ``--env`` (Breakout-MinAtar);
- ``cost_vs_adam[<opt>,members=N]``: seconds per PPO iteration with ``opt``
  (OPEN, K-FAC, diagonal GGN) over Adam's, both at ``N`` =
  ``--ratio-members`` members (1.0 = free, 2.0 = twice as slow);
- ``es_generation_seconds[population=P]`` and ``es_env_steps_per_second``:
  one ES generation (``meta.es``, OPEN over whole PPO lifetimes of
  ``--es-timesteps`` steps, one seed per candidate) of population ``P``
  (64), after compilation;
- ``ppo_steps_per_second[brax/ant,members=1]``: PPO on Brax's ant with its
  preset (2048 envs), a few iterations;
- ``compile_seconds[...]`` beside each.

Each timed call is a compiled program, warmed up once, then timed
``--repeats`` times (median), ``jax.block_until_ready`` around it. The
tiny sizes shrink every config (4 envs x 8 steps, hidden 8, members 1 and 2,
population 4) so that it all runs on a CPU in about a minute; their figures
only show that the script works.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

TINY_PPO = dict(num_envs=4, num_steps=8, num_minibatches=1, update_epochs=1, hidden_sizes=(8, 8))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke test of this script)")
    p.add_argument("--env", default="Breakout-MinAtar")
    p.add_argument("--members", default=None, help="comma-separated vmapped member counts (default 1,64,256)")
    p.add_argument("--ratio-members", type=int, default=None, help="members of the cost ratios (default 64)")
    p.add_argument("--optimizers", default="open,kfac,diag_ggn", help="compared with adam")
    p.add_argument("--updates", type=int, default=None, help="PPO iterations per timed call (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median)")
    p.add_argument("--es-population", type=int, default=None, help="(default 64)")
    p.add_argument("--es-timesteps", type=float, default=None,
                   help="inner PPO lifetime of each ES candidate in env steps (default 2.5e5)")
    p.add_argument("--brax-env", default="brax/ant")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: members, ratios, es, brax")
    return p.parse_args(argv)


def figure(name: str, value: float, unit: str) -> None:
    print(f"FIGURE {name} = {value:.6g} {unit}", flush=True)


def _timed(fn, state, repeats: int):
    """(state after the calls, median seconds of ``repeats`` calls of ``fn``)."""
    import jax

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state = jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - t)
    return state, statistics.median(times)


def _ppo(env_name: str, spec: str, members: int, updates: int, repeats: int, overrides: Dict):
    """(env steps per second, seconds per call, compile seconds) of PPO with ``spec``."""
    from meta.cli.speed import build

    cell = build(env_name, spec, members, updates, **overrides)
    run = cell["run"]
    _, seconds = _timed(lambda s: run(s)[0], cell["state"], repeats)
    return cell["steps"] / seconds, seconds, cell["compile_s"]


def _tiny_evaluation(config, rule):
    """``meta.es.lifetime_evaluation`` with the tiny PPO settings (the ES's own
    inner setup takes the env's preset)."""
    import jax

    import envs
    from agents.ppo import PPOHParams, make_ppo
    from agents.presets import resolve_config
    from meta.es import Evaluation, final_return_jnp

    env, env_params = envs.make(config.envs[0])
    cfg, hp, lr = resolve_config(config.envs[0], total_timesteps=int(config.timesteps), **TINY_PPO)
    hp = PPOHParams.default(**hp)

    def train(meta_params, key):
        agent = make_ppo(cfg, env, env_params, rule.make_optimizer(meta_params))
        keys = jax.random.split(key, config.seeds)
        _, m = jax.vmap(agent.train, in_axes=(0, None, None))(keys, hp, lr)
        return final_return_jnp(m)[None]

    def evaluate(carried, pop, key, mean, map_population):
        keys = jax.random.key_data(jax.random.split(key, config.population))
        return map_population(lambda m, k, _: train(m, jax.random.wrap_key_data(k)), pop, keys, ()), carried, {}

    steps = cfg.num_updates * cfg.batch_size * config.seeds * config.population
    return Evaluation(None, evaluate, steps)


def _es(env_name: str, population: int, timesteps: int, repeats: int, tiny: bool):
    """(seconds per generation, env steps per second, compile seconds)."""
    import jax

    from learned_optim import registry
    from meta.distributed import jit_placed, put
    from meta.es import ESConfig, make_es

    config = ESConfig(envs=(env_name,), population=population, seeds=1, timesteps=timesteps, generations=1)
    rule = registry.make_rule("open")
    es = make_es(config, rule, _tiny_evaluation(config, rule) if tiny else None)
    state = put(es.init(jax.random.key(0)), es.state_sharding)
    t = time.perf_counter()
    step = jit_placed(es.step, es.state_sharding).lower(state).compile()
    compile_s = time.perf_counter() - t
    state = jax.block_until_ready(step(state)[0])  # warm-up generation
    _, seconds = _timed(lambda s: step(s)[0], state, repeats)
    return seconds, es.evaluation.env_steps_per_generation / seconds, compile_s


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    import runtime  # noqa: F401  (the CPU defaults, before JAX starts)
    import jax

    from meta.host import device_description

    tiny = a.tiny
    members: List[int] = [int(m) for m in (a.members or ("1,2" if tiny else "1,64,256")).split(",")]
    ratio_members = a.ratio_members or (2 if tiny else 64)
    updates = a.updates or (1 if tiny else 4)
    population = a.es_population or (4 if tiny else 64)
    es_timesteps = int(a.es_timesteps or (64 if tiny else 2.5e5))
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    unknown = skip - {"members", "ratios", "es", "brax"}
    if unknown:
        print(f"error: --skip {sorted(unknown)}; allowed: members, ratios, es, brax", file=sys.stderr)
        return 2
    overrides = dict(TINY_PPO) if tiny else {}
    print(f"device: {device_description()} ({jax.devices()[0].device_kind}); "
          f"{'tiny sizes (a smoke test, not a measurement)' if tiny else 'full sizes'}", flush=True)

    adam: Dict[int, float] = {}  # members -> seconds per call
    if "members" not in skip:
        for n in members:
            sps, seconds, compile_s = _ppo(a.env, "adam", n, updates, a.repeats, overrides)
            adam[n] = seconds
            figure(f"ppo_steps_per_second[{a.env},members={n}]", sps, "env steps/s")
            figure(f"compile_seconds[ppo,{a.env},members={n}]", compile_s, "s")
    if "ratios" not in skip:
        if ratio_members not in adam:
            adam[ratio_members] = _ppo(a.env, "adam", ratio_members, updates, a.repeats, overrides)[1]
        for spec in [s.strip() for s in a.optimizers.split(",") if s.strip()]:
            _, seconds, compile_s = _ppo(a.env, spec, ratio_members, updates, a.repeats, overrides)
            figure(f"cost_vs_adam[{spec},{a.env},members={ratio_members}]", seconds / adam[ratio_members],
                   "x Adam's time")
            figure(f"compile_seconds[ppo+{spec},{a.env},members={ratio_members}]", compile_s, "s")
    if "es" not in skip:
        seconds, sps, compile_s = _es(a.env, population, es_timesteps, max(1, a.repeats // 2), tiny)
        figure(f"es_generation_seconds[open,{a.env},population={population},lifetime={es_timesteps}]", seconds,
               "s")
        figure(f"es_env_steps_per_second[open,{a.env},population={population}]", sps, "env steps/s")
        figure(f"compile_seconds[es,{a.env},population={population}]", compile_s, "s")
    if "brax" not in skip:
        brax_over = dict(overrides, num_minibatches=1) if tiny else {}
        sps, _, compile_s = _ppo(a.brax_env, "adam", 1, updates, a.repeats, brax_over)
        figure(f"ppo_steps_per_second[{a.brax_env},members=1]", sps, "env steps/s")
        figure(f"compile_seconds[ppo,{a.brax_env},members=1]", compile_s, "s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
