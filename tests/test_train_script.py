import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "train.py")


def run(*args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env", "CartPol-v1"], "unknown env 'CartPol-v1'"),
        (["--optimizer", "adamm"], "unknown optimizer 'adamm'"),
        (["--optimizer", "adam:lr=abc"], "is not a number"),
        (["--num-envs", "4", "--num-steps", "10", "--minibatches", "3"], "does not divide into num_minibatches"),
        (["--timesteps", "0"], "--timesteps must be positive"),
        (["--timesteps", "-5"], "--timesteps must be positive"),
        (["--seeds", "0"], "--seeds must be >= 1"),
    ],
)
def test_bad_input_one_line_error(args, message):
    out = run(*args, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_small_run_writes_results(tmp_path):
    out = run("--env", "CartPole-v1", "--seeds", "2", "--timesteps", "6144", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steps/s" in out.stdout and "final return" in out.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("env", "optimizer", "seeds", "timesteps_per_seed", "final_return", "env_steps_per_second",
                "compile_seconds", "wall_seconds", "curves"):
        assert key in res
    assert res["seeds"] == 2 and len(res["final_return"]) == 2 and res["timesteps_per_seed"] == 6144
    assert len(res["curves"][0]) == 12
    assert (tmp_path / "curve.png").stat().st_size > 1000
    lines = (tmp_path / "curve.csv").read_text().strip().splitlines()
    assert lines[0].startswith("env_steps,seed0,seed1,mean,std") and len(lines) == 13


def test_learning_rate_precedence():
    from agents.presets import resolve_config
    from learned_optim import registry
    from meta.experiment import learning_rate_for
    from learned_optim.spec import explicit_learning_rate

    preset = 2.5e-4
    assert explicit_learning_rate("adam:eps=1e-5,lr=0.0123") == 0.0123
    assert explicit_learning_rate("kfac:learning_rate=0.2") == 0.2
    assert explicit_learning_rate("adam") is None and explicit_learning_rate("open:/x/lr=1.npy") is None
    assert learning_rate_for("adam", preset) == 2.5e-4
    assert learning_rate_for("adam:lr=0.0123", preset) == 0.0123
    assert learning_rate_for("adam:lr=0.0123", preset, lr=0.5) == 0.5
    # The preset's learning rate stands apart from its hyperparameters.
    _, hp, lr = resolve_config("CartPole-v1", gamma=0.99)
    assert lr == 2.5e-4 and hp["gamma"] == 0.99 and "lr" not in hp
    # Presets are Adam's: other optimizers keep their own default learning rate.
    assert registry.info("adamw").uses_preset_lr and not registry.info("kfac").uses_preset_lr
    assert learning_rate_for("kfac:period=10", preset) == pytest.approx(0.05)
    assert learning_rate_for("sgd", preset) == pytest.approx(0.01)
    assert learning_rate_for("adamw", preset) == 2.5e-4
    assert learning_rate_for("open", preset) == 2.5e-4  # no injected lr: unused


def test_plot_runs_overlays_train_outputs_and_rejects_bad_input(tmp_path, capsys):
    from meta.cli import plot_runs

    run = tmp_path / "run"
    run.mkdir()
    (run / "curve.csv").write_text("env_steps,seed0,seed1,mean,std\n10,1.0,2.0,1.5,0.5\n20,3.0,5.0,4.0,1.0\n")
    (run / "results.json").write_text('{"final_return_mean": 4.0, "final_return": [3.0, 5.0]}')
    out = str(tmp_path / "p.png")
    assert plot_runs.main(["--runs", f"A={run}", "--out", out]) == 0
    assert os.path.getsize(out) > 0 and "A: final return 4.0 per seed [3.0, 5.0]" in capsys.readouterr().out
    assert plot_runs.main(["--runs", "nolabel", "--out", out]) == 2
    assert plot_runs.main(["--runs", f"B={tmp_path / 'missing'}", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "expected LABEL=DIR" in err and "curve.csv not found" in err
