"""Our PPO beside purejaxrl's ``ppo.py`` in one run: learning parity (final
return of both at the same settings and seed count) and throughput.

purejaxrl is a baseline a user would otherwise pick; its code is not part of
this project. To run the comparison, get a checkout and distrax:

    git clone https://github.com/luchris429/purejaxrl /tmp/purejaxrl
    python scripts/compare_purejaxrl.py --purejaxrl /tmp/purejaxrl/purejaxrl \
        --env Breakout-MinAtar --timesteps 2e6 --seeds 2

purejaxrl targets gymnax 0.x, whose ``step`` returns five values; gymnax 1.x
returns six. Instead of editing its files, this script hands purejaxrl a thin
shim over ``gymnax.make`` that merges ``terminated``/``truncated`` into the
old ``done`` (dropping the info entries 1.x added, among them a copy of
every final observation, which purejaxrl would keep for every step), and an
empty stand-in for ``navix`` (imported by its
wrappers.py for MiniGrid only), and, where distrax does not import (distrax
0.1.x with the jax installed here), a stand-in for the one class ``ppo.py``
uses, ``distrax.Categorical(logits=...)`` with ``sample(seed=)``,
``log_prob`` and ``entropy`` (``categorical_stand_in``); nothing else changes. Both sides use the same settings (OPEN
paper MinAtar PPO: 64 envs x 128 steps, 4 epochs x 8 minibatches, hidden 64
relu, Adam eps 1e-5, lr 3e-3 annealed); ours is the plain ``adam`` spec, which
PPO builds with eps 1e-5 (``agents.presets.OPTIMIZER_DEFAULTS``), so the run
also checks that default. Each measurement runs in its own
process so peak memory is its own; the order alternates ours/theirs.
purejaxrl's ``ppo.py`` and ``wrappers.py`` are loaded from their files (as
the modules ``ppo`` and ``wrappers`` of that measuring process).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import types


def settings(env_name, timesteps):
    return dict(
        LR=3e-3, NUM_ENVS=64, NUM_STEPS=128, TOTAL_TIMESTEPS=timesteps, UPDATE_EPOCHS=4,
        NUM_MINIBATCHES=8, GAMMA=0.99, GAE_LAMBDA=0.95, CLIP_EPS=0.2, ENT_COEF=0.01, VF_COEF=0.5,
        MAX_GRAD_NORM=0.5, ACTIVATION="relu", ENV_NAME=env_name, ANNEAL_LR=True, DEBUG=False,
    )


def build_ours(cfg, n):
    import jax
    import jax.numpy as jnp

    import envs
    from agents.ppo import PPOConfig, PPOHParams, make_ppo
    from agents.presets import make_optimizer

    env, params = envs.make(cfg["ENV_NAME"])
    config = PPOConfig(
        num_envs=cfg["NUM_ENVS"], num_steps=cfg["NUM_STEPS"], total_timesteps=int(cfg["TOTAL_TIMESTEPS"]),
        update_epochs=cfg["UPDATE_EPOCHS"], num_minibatches=cfg["NUM_MINIBATCHES"], hidden_sizes=(64, 64),
        activation=cfg["ACTIVATION"], max_grad_norm=cfg["MAX_GRAD_NORM"], anneal_lr=cfg["ANNEAL_LR"],
    )
    agent = make_ppo(config, env, params, make_optimizer("adam", "ppo"))
    hp = PPOHParams.default(ent_coef=cfg["ENT_COEF"], clip_eps=cfg["CLIP_EPS"], gamma=cfg["GAMMA"],
                            gae_lambda=cfg["GAE_LAMBDA"], vf_coef=cfg["VF_COEF"])
    hp = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,)), hp)
    keys = jax.random.split(jax.random.key(0), n)
    fn = jax.jit(jax.vmap(agent.train, in_axes=(0, 0, None)))

    def returns(out):
        from agents.ppo import final_return
        return final_return(out[1]).tolist()

    return fn, (keys, hp, cfg["LR"]), config.num_updates * config.batch_size, returns


def _load_module(name, path):
    """Executes the file ``path`` as the module ``name`` (registered in
    ``sys.modules``, so files that import it by that name find it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def categorical_stand_in():
    """A module ``distrax`` holding ``Categorical(logits=...)``: what purejaxrl's
    ``ppo.py`` uses of distrax (``sample(seed=)``, ``log_prob``, ``entropy``),
    with distrax's formulas (``jax.random.categorical`` on the logits, log-softmax)."""
    import jax
    import jax.numpy as jnp

    class Categorical:
        def __init__(self, logits):
            self.logits = logits
            self._log_p = jax.nn.log_softmax(logits, axis=-1)

        def sample(self, seed):
            return jax.random.categorical(seed, self.logits, axis=-1)

        def log_prob(self, value):
            return jnp.take_along_axis(self._log_p, value[..., None].astype(jnp.int32), axis=-1)[..., 0]

        def entropy(self):
            return -jnp.sum(jnp.exp(self._log_p) * self._log_p, axis=-1)

    module = types.ModuleType("distrax")
    module.Categorical = Categorical
    return module


def build_purejaxrl(cfg, n, path):
    import gymnax
    import jax
    import numpy as np

    # purejaxrl's wrappers.py imports navix for its MiniGrid wrappers, unused here.
    sys.modules.setdefault("navix", types.ModuleType("navix"))
    try:
        import distrax  # noqa: F401
    except Exception:  # distrax 0.1.x fails to import on recent jax
        sys.modules["distrax"] = categorical_stand_in()
    _load_module("wrappers", os.path.join(path, "wrappers.py"))  # ppo.py does `from wrappers import ...`
    pjr = _load_module("ppo", os.path.join(path, "ppo.py"))

    class FiveValueStep:
        """gymnax 1.x env seen through the 0.x five-value ``step``."""

        def __init__(self, env):
            self._env = env

        def __getattr__(self, name):
            return getattr(self._env, name)

        def step(self, key, state, action, params=None):
            obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
            # gymnax 1.x adds the final observation to info; purejaxrl keeps all of
            # info for every step, which would hold a full copy of every observation
            # (tens of GB at 8 seeds x 1e6 steps on MinAtar). Keep 0.x's info.
            info = {k: v for k, v in info.items() if k not in ("final_observation", "terminated", "truncated")}
            return obs, state, reward, jax.numpy.logical_or(terminated, truncated), info

    def make(name, **kw):
        env, params = gymnax.make(name, **kw)
        return FiveValueStep(env), params

    pjr.gymnax = type("gymnax_shim", (), {"make": staticmethod(make)})
    fn = jax.jit(jax.vmap(pjr.make_train(dict(cfg))))
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    steps = int(cfg["TOTAL_TIMESTEPS"]) // cfg["NUM_STEPS"] // cfg["NUM_ENVS"] * cfg["NUM_STEPS"] * cfg["NUM_ENVS"]

    def returns(out):
        info = out["metrics"]
        r = np.asarray(info["returned_episode_returns"], np.float64)
        d = np.asarray(info["returned_episode"], bool)
        k = max(1, r.shape[1] // 10)
        r, d = r[:, -k:].reshape(n, -1), d[:, -k:].reshape(n, -1)
        return ((r * d).sum(1) / np.maximum(d.sum(1), 1)).tolist()

    return fn, (keys,), steps, returns


def measure(which, env_name, timesteps, n, path):
    import jax

    from meta.host import peak_memory_mb

    cfg = settings(env_name, timesteps)
    fn, args, steps_per_seed, returns = (
        build_ours(cfg, n) if which == "ours" else build_purejaxrl(cfg, n, path)
    )
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    run_s = time.perf_counter() - t0
    return dict(
        which=which, seeds=n, env=env_name, steps_per_seed=steps_per_seed, compile_s=compile_s, run_s=run_s,
        sps=n * steps_per_seed / run_s, final_return=returns(out), memory=peak_memory_mb(),
    )


def summary_lines(rows, env_name):
    """Markdown: learning parity (final return, mean and per seed, of the
    last repeat of each side) and throughput (mean over repeats, ratio)."""
    steps = {r["seeds"]: r["steps_per_seed"] for r in rows}
    out = [f"Learning parity, {env_name} (final return: mean episode return over the last 10% of training)", "",
           "| seeds | steps per seed | ours | purejaxrl | ours - purejaxrl |", "|---|---|---|---|---|"]
    for n in sorted(steps):
        last = {w: [r for r in rows if r["seeds"] == n and r["which"] == w][-1]["final_return"]
                for w in ("ours", "purejaxrl")}
        mo, mt = (sum(v) / len(v) for v in (last["ours"], last["purejaxrl"]))
        per = {w: ", ".join(f"{x:.1f}" for x in v) for w, v in last.items()}
        out.append(f"| {n} | {steps[n]:.3g} | {mo:.1f} ({per['ours']}) | {mt:.1f} ({per['purejaxrl']}) | {mo - mt:+.1f} |")
    out += ["", "| seeds | ours steps/s | purejaxrl steps/s | ratio |", "|---|---|---|---|"]
    for n in sorted(steps):
        o, t = ([r["sps"] for r in rows if r["seeds"] == n and r["which"] == w] for w in ("ours", "purejaxrl"))
        o, t = sum(o) / len(o), sum(t) / len(t)
        out.append(f"| {n} | {o:,.0f} | {t:,.0f} | {o / t:.2f}x |")
    return out


def main(argv=None) -> int:
    from runtime.cache import enable_compilation_cache

    enable_compilation_cache()  # persistent compilation cache (METARL_NO_COMPILE_CACHE=1: off)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--purejaxrl", required=True, help="path to purejaxrl's purejaxrl/ folder (holding ppo.py)")
    p.add_argument("--env", default="Breakout-MinAtar")
    p.add_argument("--timesteps", type=float, default=1e6, help="env steps per seed")
    p.add_argument("--seeds", default="1,8", help="population sizes to measure")
    p.add_argument("--repeats", type=int, default=1, help="alternating repeats of each pair")
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    p.add_argument("--single", choices=["ours", "purejaxrl"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.single:
        import runtime  # noqa: F401  (safe XLA flags for both sides)

        print(json.dumps(measure(a.single, a.env, a.timesteps, a.n, a.purejaxrl)))
        return 0
    if not os.path.exists(os.path.join(a.purejaxrl, "ppo.py")):
        print(f"error: {a.purejaxrl!r} holds no ppo.py; see this script's docstring", file=sys.stderr)
        return 2
    rows = []
    for n in [int(s) for s in a.seeds.split(",")]:
        for _ in range(a.repeats):
            for which in ("ours", "purejaxrl"):
                cmd = [sys.executable, "-m", "meta.cli.compare_purejaxrl", "--single", which, "--n", str(n), "--env", a.env,
                       "--timesteps", str(a.timesteps), "--purejaxrl", a.purejaxrl]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode:
                    print(res.stderr[-3000:], file=sys.stderr)
                    return 1
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{which:>10} seeds={n:<3} {row['sps']:>10,.0f} steps/s  compile {row['compile_s']:5.1f}s  "
                      f"run {row['run_s']:6.1f}s  peak RSS {row['memory']['host_peak_rss_mb']:6.0f} MiB  "
                      f"final return {sum(row['final_return']) / n:.2f}", flush=True)
    print("\n" + "\n".join(summary_lines(rows, a.env)))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":  # the measuring subprocesses: python -m meta.cli.compare_purejaxrl --single ...
    sys.exit(main())
