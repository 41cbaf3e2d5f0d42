"""scripts/meta_train.py with pipeline units (--method metagrad, --method es
--pipeline-units N) and its alias scripts/meta_train_pipeline.py: bad input,
outputs, bit-for-bit resume in a fresh process."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from meta.cli import meta_train, meta_train_pipeline
from meta.meta_train import build, plan_document
from tests.conftest import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")
TINY_MG = ["--method", "metagrad", "--pipeline-units", "2", "--reset-interval", "3", "--num-envs", "4",
           "--hidden", "16", "--inner-steps", "2", "--checkpoint-every", "2"]
TINY_ES = ["--method", "es", "--pipeline-units", "2", "--reset-interval", "3", "--num-envs", "4", "--hidden", "16",
           "--inner-steps", "2", "--population", "4", "--checkpoint-every", "2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "sgd"], "--method 'sgd'; allowed: es, metagrad"),
        (["--method", "metagrad", "--seeds", "3"], "--seeds does not apply to --method metagrad"),
        (["--method", "metagrad", "--population", "8"], "--population does not apply to --method metagrad"),
        (["--pipeline-units", "2", "--meta-lr", "1e-3"], "--meta-lr does not apply to ES over pipeline units"),
        (["--reset-interval", "5"], "--reset-interval does not apply to ES over whole lifetimes"),
        (["--method", "metagrad", "--reset-interval", "0"], "--reset-interval must be >= 1"),
        (["--method", "metagrad", "--pipeline-units", "0"], "--pipeline-units must be >= 1"),
        (["--method", "metagrad", "--envs", "gridworld/tiny"], "unknown env 'gridworld/tiny'"),
        (["--method", "metagrad", "--rule", "adam"], "unknown rule 'adam'"),
        (["--method", "metagrad", "--meta-lr", "-1"], "--meta-lr must be positive"),
        (["--method", "metagrad", "--eval-timesteps", "10"], "--eval-timesteps must be at least one A2C update"),
        (["--pipeline-units", "2", "--population", "5"], "odd; antithetic"),
        (["--method", "metagrad", "--resume"], "no checkpoint found"),
        (["--method", "metagrad", "--scale-rewards"], "--scale-rewards applies to gridworld envs"),
        (["--scale-rewards"], "--scale-rewards does not apply to ES over whole lifetimes"),
    ],
)
def test_bad_arguments_give_one_error_line(args, message, tmp_path, capsys):
    assert meta_train.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err


def test_scale_rewards_reaches_the_meta_training_envs_only():
    args = meta_train.parse_args(["--method", "metagrad", "--envs", "Catch-bsuite,gridworld/small_dense_short",
                                  "--scale-rewards"])
    plan = build(*meta_train.options(args))
    assert plan.env_overrides == {"gridworld/small_dense_short": {"scale_rewards": True}}
    assert plan_document(plan)["env_overrides"] == plan.env_overrides
    # without the flag the document is as before, so earlier checkpoints still resume
    plain = meta_train.parse_args(["--method", "metagrad", "--envs", "gridworld/small_dense_short"])
    assert "env_overrides" not in plan_document(build(*meta_train.options(plain)))
    import envs
    env, _ = envs.make("gridworld/small_dense_short", **plan.env_overrides["gridworld/small_dense_short"])
    assert env.unwrapped.scale_rewards and env.unwrapped.reward_scale == 100.0


def test_alias_translates_its_flags():
    argv = meta_train_pipeline.translate(["--lr=1e-3", "--seeds", "2", "--meta-steps", "5"])
    args = meta_train.parse_args(argv)
    assert (args.method, args.pipeline_units, args.agent_lr, args.final_seeds, args.generations) == (
        "metagrad", 4, 1e-3, 2, 5)
    assert meta_train.parse_args(meta_train_pipeline.translate(["--method", "es"])).method == "es"


def run(script, *args, cache=None, timeout=900):
    env = dict(os.environ)
    if cache:  # the three runs of a test compile the same programs: share them
        env.pop("METARL_NO_COMPILE_CACHE", None)  # conftest turns the user's cache off; this one is the test's own
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_argument_exit_code_in_a_process(tmp_path):
    out = run("meta_train_pipeline.py", "--meta-steps", "0", "--out", str(tmp_path), timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error:") and "--generations must be >= 1" in out.stderr
    assert "Traceback" not in out.stderr


def _rows(path, drop=("seconds", "env_steps_per_second")):
    rows = [json.loads(line) for line in open(os.path.join(path, "log.jsonl"))]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def _same_optimizer(a, b):
    import learned_optim

    ra, pa = learned_optim.load(os.path.join(a, "optimizer"))
    rb, pb = learned_optim.load(os.path.join(b, "optimizer"))
    assert ra == rb
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("script, tiny, plot", [
    ("meta_train.py", TINY_MG, "objective.png"),
    # ES over units: its resume is also tested in-process in test_pipeline_es.py
    pytest.param("meta_train.py", TINY_ES, "fitness.png", marks=pytest.mark.slow),
], ids=["metagrad", "es-pipeline"])
def test_end_to_end_and_resume_equals_uninterrupted(script, tiny, plot, tmp_path):
    """4 outer steps straight == 2, then --resume to 4 in a new process (unit
    resets at steps 1, 3 fall on both sides); the outputs are written and the
    optimizer loads as an optax transform; a changed setting refuses to resume."""
    a, b, cache = str(tmp_path / "a"), str(tmp_path / "b"), tmp_path / "jax-cache"
    out = run(script, *tiny, "--generations", "4", "--final-seeds", "2", "--eval-timesteps", "320",
              "--out", a, cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run(script, *tiny, "--generations", "2", "--final-seeds", "0", "--out", b, cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run(script, *tiny, "--generations", "4", "--final-seeds", "0", "--out", b, "--resume", cache=cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from generation 2" in out.stdout
    assert _rows(a) == _rows(b) and len(_rows(a)) == 4
    _same_optimizer(a, b)
    for name in ("log.csv", plot, "summary.md", "comparison.png", "checkpoints"):
        assert os.path.exists(os.path.join(a, name)), name
    summary = open(os.path.join(a, "summary.md")).read()
    assert "| Catch-bsuite | adam (tuned lr) |" in summary and "| Catch-bsuite | learned" in summary
    doc = json.load(open(os.path.join(a, "summary.json")))
    entry = doc["envs"]["Catch-bsuite"]
    assert doc["measure"] == "final_window" and len(entry["learned"]["per_seed"]) == 2
    assert len(entry["adam_tuned"]["lr_grid"]) >= 4 and entry["adam_tuned"]["lr"] in entry["adam_tuned"]["lr_grid"]
    import learned_optim

    tx = learned_optim.from_spec("lopt:" + os.path.join(a, "optimizer"))
    params = {"w": np.ones(3, np.float32)}
    updates, _ = tx.update({"w": np.full(3, 0.5, np.float32)}, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"])) and np.all(np.asarray(updates["w"]) < 0)
    changed = [x if x != "3" else "5" for x in tiny]  # another reset interval
    out = run(script, *changed, "--generations", "5", "--final-seeds", "0", "--out", a, "--resume", timeout=300)
    assert out.returncode == 2 and "different config" in out.stderr, out.stderr[-2000:]


def test_eval_a2c_bad_input_and_a_tiny_table(tmp_path, capsys):
    from meta.cli import eval_a2c

    assert eval_a2c.main(["--optimizers", "adam,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nope" in err and err.count("\n") == 1, err
    out = str(tmp_path / "e")
    assert eval_a2c.main(["--envs", "Catch-bsuite", "--optimizers", "adam:lr=1e-2,sgd", "--seeds", "2",
                          "--timesteps", "320", "--num-envs", "4", "--hidden", "8", "--out", out]) == 0
    results = json.load(open(os.path.join(out, "results.json")))["results"]
    assert [(r["optimizer"], len(r["final_return"])) for r in results] == [("adam:lr=1e-2", 2), ("sgd", 2)]
    assert [r["lr"] for r in results] == pytest.approx([1e-2, 3e-3])
    assert all(-1.0 <= r["final_return_mean"] <= 1.0 for r in results)  # Catch returns lie in [-1, 1]
    assert "| Catch-bsuite | adam:lr=1e-2 | 0.01 |" in open(os.path.join(out, "results.md")).read()
