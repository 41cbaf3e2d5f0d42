"""--resume in a fresh process continues exactly as the uninterrupted run did:
ES over whole lifetimes, PBT, and ES over pipeline units, through the scripts
users run.

Each test runs a tiny job once, uninterrupted, with a checkpoint every k outer
steps; copies its output directory keeping only the checkpoint at step k
(what a run stopped right after writing it leaves behind; the logs, plots and
outputs written later are removed); resumes that copy with ``--resume`` in a
new process; and compares every generation / round after step k, the
optimizer or population it hands out, and the arrays of the last checkpoint
with the uninterrupted run's, bit for bit. Both runs have the same budget (a
shorter first run is not the same run for PBT: its budget sets PPO's
learning-rate annealing).

RNG keys: the PBT population's keys (every member's, the selection's) and the
pipeline units' keys advance every round, so a resume that kept the fresh
run's keys instead of the saved ones diverges after step k and fails these
tests (``scripts/mutation_check.py``: ``restore_keeps_target_keys``). ES over
whole lifetimes stores its key as raw data that is a fixed function of
``--seed`` (each generation draws from ``fold_in(key, generation)``), so there
the fresh and the saved key are the same; what must come back is the
generation counter and the ES state (``es_resume_keeps_fresh_state``).

The processes of a test share a persistent compilation cache in a temporary
directory, so the resumed process loads its programs instead of compiling.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The subprocesses' environment: a compilation cache of their own."""
    e = {k: v for k, v in os.environ.items() if k not in ("METARL_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    e["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg"))
    return e


def run(script, args, env, timeout=300):
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def stopped_after(src, dst, step, written_later):
    """``dst``: the output directory ``src`` had right after its checkpoint
    ``step``: later checkpoints and the files in ``written_later`` removed."""
    shutil.copytree(src, dst)
    ckpt = os.path.join(dst, "checkpoints")
    later = [n for n in os.listdir(ckpt) if n.isdigit() and int(n) > step]
    assert later and os.path.isdir(os.path.join(ckpt, str(step))), os.listdir(ckpt)
    for name in later:
        shutil.rmtree(os.path.join(ckpt, name))
    for name in written_later:
        path = os.path.join(dst, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return dst


def checkpoint_arrays(out, step):
    """The arrays of checkpoint ``step`` as stored (keys as raw data), by path."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(out, "checkpoints")))
    try:
        tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        mngr.close()
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_checkpoint(a, b, step):
    xa, xb = checkpoint_arrays(a, step), checkpoint_arrays(b, step)
    assert xa.keys() == xb.keys()
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=f"checkpoint {step}, {k}")


def log_rows(out, drop=("seconds", "env_steps_per_second")):
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def assert_same_optimizer(a, b):
    import learned_optim

    ra, pa = learned_optim.load(os.path.join(a, "optimizer"))
    rb, pb = learned_optim.load(os.path.join(b, "optimizer"))
    assert ra == rb
    la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


META_OUTPUTS = ("log.jsonl", "log.csv", "optimizer", "fitness.png")


def check_meta_train(args, env, tmp_path, generations=4, resume_at=2):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("meta_train.py", [*args, "--generations", str(generations), "--out", a], env)
    stopped_after(a, b, resume_at, META_OUTPUTS)
    out = run("meta_train.py", [*args, "--generations", str(generations), "--out", b, "--resume"], env)
    assert f"resumed from generation {resume_at}" in out.stdout, out.stdout[-2000:]
    ra, rb = log_rows(a), log_rows(b)
    assert [r["generation"] for r in ra] == list(range(1, generations + 1))
    # the generations after the resume point, then everything (the earlier rows come from the checkpoint)
    assert rb[resume_at:] == ra[resume_at:]
    assert rb == ra
    assert len({r["fitness_mean"] for r in ra[resume_at - 1:]}) > 1, "fitness did not move, so a mix-up would not show"
    assert_same_optimizer(a, b)
    assert_same_checkpoint(a, b, generations)


ES_LIFETIMES = ["--rule", "optim4rl", "--envs", "CartPole-v1", "--population", "2", "--seeds", "1",
                "--timesteps", "1024", "--reference-returns", "20", "--final-seeds", "0", "--checkpoint-every", "2"]


def test_es_resume_in_a_fresh_process_equals_the_uninterrupted_run(env, tmp_path):
    check_meta_train(ES_LIFETIMES, env, tmp_path)


ES_UNITS = ["--method", "es", "--envs", "CartPole-v1", "--pipeline-units", "2", "--reset-interval", "3",
            "--num-envs", "4", "--num-steps", "10", "--hidden", "8", "--inner-steps", "2", "--population", "2",
            "--final-seeds", "0", "--checkpoint-every", "2"]


def test_es_over_pipeline_units_resume_in_a_fresh_process_equals_the_uninterrupted_run(env, tmp_path):
    """Reset interval 3 over 2 units: unit resets at steps 1 and 3 fall on both
    sides of the resume point (2)."""
    check_meta_train(ES_UNITS, env, tmp_path)


PBT = ["--algo", "pbt", "--env", "CartPole-v1", "--population", "4", "--optimizers", "adam:4", "--interval", "2",
       "--timesteps", "2048", "--num-envs", "4", "--num-steps", "32", "--seed", "0", "--checkpoint-every", "4",
       "--no-time-selection"]


def test_pbt_resume_in_a_fresh_process_equals_the_uninterrupted_run(env, tmp_path):
    """8 rounds of 2 PPO updates, 4 members (one replaced per round); resumed
    from round 4 of 8."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("pbt.py", [*PBT, "--out", a], env)
    stopped_after(a, b, 4, ("results.json", "pbt_returns.png", "pbt_hparams.png"))
    out = run("pbt.py", [*PBT, "--out", b, "--resume"], env)
    assert "resumed from round 4" in out.stdout, out.stdout[-2000:]
    ra = json.load(open(os.path.join(a, "results.json")))
    rb = json.load(open(os.path.join(b, "results.json")))
    assert ra["rounds"] == rb["rounds"] == 8
    for ma, mb in zip(ra["members"], rb["members"]):
        assert len(ma["returns"]) == 8
        assert mb["returns"][4:] == ma["returns"][4:], ma["member"]
        assert mb["lineage"][4:] == ma["lineage"][4:], ma["member"]
        assert mb["hparams"] == ma["hparams"], ma["member"]
        assert mb == ma
    for k in ("final_return", "final_return_best", "final_return_mean", "steps", "diverged_members"):
        assert rb[k] == ra[k], k
    # selection happened after the resume point, so the selection keys mattered too
    assert any(m["lineage"][r] != m["member"] for m in ra["members"] for r in range(4, 8))
    assert_same_checkpoint(a, b, 8)
