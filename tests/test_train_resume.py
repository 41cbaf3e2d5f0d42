"""metarl-train keeps its agents and resumes killed runs; metarl-eval plays them.

One uninterrupted run, one run killed with SIGKILL once it has written a
checkpoint, then ``--resume`` of the killed run: the results must be equal bit
for bit. The three runs share a persistent compilation cache in a temporary
directory (so the later two load their programs from it)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT

TRAIN = os.path.join(ROOT, "scripts", "train.py")
# 40 updates of 4 envs x 32 steps, a checkpoint every 2 (20 checkpoints, ~0.2 s each): the
# run lasts seconds after its first checkpoint, so the kill lands mid-run.
TINY = ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "32", "--timesteps", str(40 * 128),
        "--hidden", "16,16", "--epochs", "1", "--minibatches", "2", "--seeds", "2", "--checkpoint-every", "2"]


def _env(cache_home):
    env = {k: v for k, v in os.environ.items() if k not in ("METARL_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(cache_home)
    return env


def _train(out, *extra, env, timeout=300):
    return subprocess.run([sys.executable, TRAIN, *TINY, "--out", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _steps(ckpt_dir):
    """The finished checkpoints (orbax renames a step's directory when it is complete)."""
    try:
        return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    env = _env(base / "xdg")
    whole, killed = base / "whole", base / "killed"
    r = _train(whole, env=env)
    assert r.returncode == 0, r.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, TRAIN, *TINY, "--out", str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not _steps(killed / "checkpoints") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    steps = _steps(killed / "checkpoints")
    assert proc.returncode == -signal.SIGKILL and steps and steps[-1] < 40, (proc.returncode, steps)
    assert not (killed / "results.json").exists() and not (killed / "agent").exists()

    r = _train(killed, "--resume", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at update" in r.stdout
    return dict(base=base, env=env, whole=whole, killed=killed, killed_at=steps[-1])


def test_sigkilled_run_resumes_to_the_uninterrupted_results(runs):
    a = json.loads((runs["whole"] / "results.json").read_text())
    b = json.loads((runs["killed"] / "results.json").read_text())
    assert b["resumed_from_update"] == runs["killed_at"] > 0 and a["resumed_from_update"] == 0
    for key in ("curves", "episode_counts", "final_return", "steps", "diverged_seeds"):
        assert a[key] == b[key], key
    assert len(a["curves"]) == 2 and len(a["curves"][0]) == 40
    assert (runs["whole"] / "curve.csv").read_text() == (runs["killed"] / "curve.csv").read_text()
    # The persistent cache was written to the temporary XDG_CACHE_HOME.
    assert os.listdir(runs["base"] / "xdg" / "metarl" / "jax")


def test_saved_agents_equal_and_rebuild_from_their_document(runs):
    import jax

    from meta.saved_agent import load_agent

    a, b = load_agent(str(runs["whole"])), load_agent(str(runs["killed"]))
    assert a.document == b.document and a.document["env"] == "CartPole-v1" and a.config.hidden_sizes == (16, 16)
    assert set(a.tree) >= {"params", "opt_state", "hparams", "update_step"}
    assert np.asarray(a.tree["update_step"]).tolist() == [40, 40]
    la, lb = jax.tree.leaves(a.tree), jax.tree.leaves(b.tree)
    assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert np.asarray(la[0]).shape[0] == 2  # one agent per seed


def test_resume_with_other_settings_or_nothing_to_resume_is_a_one_line_error(runs, tmp_path, capsys):
    from meta.cli import train

    for argv, message in [
        ([*TINY, "--out", str(runs["killed"]), "--resume", "--lr", "1e-3"],
         "different config (differs in: learning_rate (checkpoint 0.00025, now 0.001))"),
        ([*TINY, "--out", str(runs["killed"]), "--resume", "--timesteps", "6400"], "ppo_config.total_timesteps"),
        ([*TINY, "--out", str(tmp_path / "none"), "--resume"], "--resume: no checkpoint found"),
        ([*TINY, "--out", str(tmp_path / "none"), "--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    ]:
        assert train.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_eval_prints_one_json_line_per_seed(runs, capsys):
    from meta.cli import eval as eval_cli

    assert eval_cli.main([str(runs["whole"]), "--episodes", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["seed_index"] for r in rows] == [0, 1]
    for r in rows:
        assert r["deterministic"] is False and r["actions"] == "sampled" and r["episodes"] == 3
        assert len(r["returns"]) == 3 and all(np.isfinite(x) and 1 <= x <= 500 for x in r["returns"])
        assert r["mean_return"] == pytest.approx(np.mean(r["returns"]))
    assert eval_cli.main([str(runs["killed"]), "--episodes", "3", "--deterministic", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and all(r["deterministic"] and r["actions"] == "greedy" for r in rows)


def test_eval_bad_input_exits_2(tmp_path, capsys):
    from meta.cli import eval as eval_cli

    (tmp_path / "empty").mkdir()
    for argv, message in [([str(tmp_path / "missing")], "does not exist"),
                          ([str(tmp_path / "empty")], "holds no saved agent"),
                          ([str(tmp_path / "empty"), "--episodes", "0"], "--episodes must be >= 1")]:
        assert eval_cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_update_chunks_put_checkpoints_on_chunk_boundaries():
    from meta.experiment import update_chunks

    assert update_chunks(39) == [1] * 39  # meta.host.chunk_sizes: 20 chunks at most
    assert update_chunks(100) == [5] * 20
    assert update_chunks(100, checkpoint_every=3) == [3] * 33 + [1]  # shorter than a chunk: chunks of it
    assert update_chunks(100, checkpoint_every=50) == [5] * 20  # longer: the chunks stay
    assert update_chunks(100, checkpoint_every=3, start=30) == [3] * 23 + [1]
    assert update_chunks(100, start=32) == [3] + [5] * 13  # resumed off the boundaries: one short chunk
    assert update_chunks(100, start=100) == []


def test_continuous_agent_with_normalisers_saves_and_plays(tmp_path):
    import dataclasses

    from agents.presets import resolve_config
    from meta.experiment import train_seeds
    from meta.saved_agent import evaluate_agent, load_agent

    cfg, hp, lr = resolve_config("Pendulum-v1", total_timesteps=4 * 32 * 3, num_envs=4, num_steps=32,
                                 hidden_sizes=(8,), update_epochs=1, num_minibatches=2)
    cfg = dataclasses.replace(cfg, normalize_obs=True, normalize_rewards=True)
    train_seeds("Pendulum-v1", "adam", cfg, hp, 2, 0, log=None, learning_rate=lr, run_dir=str(tmp_path))
    saved = load_agent(str(tmp_path))
    norm = saved.tree["normalizer"]
    # the running statistics of training: 4 envs x (1 reset + 96 steps), per seed
    assert np.allclose(np.asarray(norm["obs_rms"].count), 4 * 97 + 1e-4) and "return_rms" in norm
    rows = evaluate_agent(saved, episodes=2, deterministic=True)
    assert [r["actions"] for r in rows] == ["mean", "mean"]
    assert all(r["unfinished"] == 0 and all(np.isfinite(x) and x < 0 for x in r["returns"]) for r in rows)
