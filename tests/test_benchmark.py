import json
import os
import subprocess
import sys

import numpy as np
import pytest

from meta import benchmark, stats
from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")


def test_stats_against_hand_computed_values():
    assert stats.iqm(np.arange(1, 9)) == pytest.approx(4.5)  # middle four of 1..8
    assert stats.iqm([0.0, 0.0, 0.0, 100.0]) == pytest.approx(0.0)  # the outlier is cut
    assert stats.iqm([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # fractional weights, symmetric
    assert stats.stderr([1.0, 3.0]) == pytest.approx(1.0)
    x = np.random.default_rng(0).normal(5.0, 1.0, size=20)
    lo, hi = stats.bootstrap_ci(x)
    assert lo < np.mean(x) < hi
    lo2, hi2 = stats.bootstrap_ci(np.random.default_rng(1).normal(5.0, 1.0, size=500))
    assert hi2 - lo2 < (hi - lo) / 2


def _fake_train(calls):
    def train(env, spec, config, hp, seeds, seed=0, log=None):
        calls.append((env, spec))
        rng = np.random.default_rng(len(calls))
        curves = rng.normal(1.0 if spec == "adam" else 2.0, 0.1, size=(seeds, 5))
        return dict(env=env, optimizer=spec, final_return=curves[:, -1].tolist(), curves=curves.tolist(),
                    steps=[1, 2, 3, 4, 5], env_steps_per_second=100.0 if spec == "adam" else 50.0,
                    compile_seconds=1.0, timesteps_per_seed=5, final_return_mean=float(curves[:, -1].mean()))
    return train


def test_cells_resume_and_refuse_changed_settings(tmp_path):
    cells = [benchmark.Cell(e, s, 2, 1000) for e in ("CartPole-v1", "Catch-bsuite") for s in ("adam", "sgd")]
    calls = []
    recs = benchmark.run_cells(cells[:3], str(tmp_path), train=_fake_train(calls), log=lambda m: None)
    assert len(calls) == 3 and len(recs) == 3
    recs = benchmark.run_cells(cells, str(tmp_path), train=_fake_train(calls), log=lambda m: None)
    assert len(calls) == 4 and calls[-1] == ("Catch-bsuite", "sgd")  # only the missing cell ran
    assert [r["optimizer"] for r in recs] == ["adam", "sgd", "adam", "sgd"]
    table = benchmark.write_outputs(recs, str(tmp_path), "adam")
    row = table["CartPole-v1"][1]
    assert row["speed_ratio"] == pytest.approx(0.5) and row["normalised"] == pytest.approx(2.0, rel=0.2)
    assert table["CartPole-v1"][0]["normalised"] == pytest.approx(1.0)
    for f in ("results.json", "results.md", "aggregate.png", "curves_CartPole-v1.png", "curves_Catch-bsuite.png"):
        assert os.path.getsize(tmp_path / f) > 0
    assert len(json.load(open(tmp_path / "results.json"))["cells"]) == 4
    with pytest.raises(ValueError, match="was run with settings"):
        benchmark.run_cells([benchmark.Cell("CartPole-v1", "adam", 3, 1000)], str(tmp_path),
                            train=_fake_train(calls), log=lambda m: None)


@pytest.mark.parametrize("args, message", [
    (["--envs", "CartPol"], "unknown env 'CartPol'"),
    (["--optimizers", "adamm"], "unknown optimizer 'adamm'"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--timesteps", "0"], "--timesteps must be positive"),
    (["--reference", "lion"], "--reference 'lion' is not one of"),
])
def test_bad_input_one_line_error(args, message, tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, *args, "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error:") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_real_tiny_benchmark_end_to_end(tmp_path):
    from scripts.benchmark import main

    assert main(["--envs", "CartPole-v1", "--optimizers", "adam,sgd", "--seeds", "2", "--timesteps", "4096",
                 "--out", str(tmp_path)]) == 0
    res = json.load(open(tmp_path / "results.json"))
    assert [c["optimizer"] for c in res["cells"]] == ["adam", "sgd"]
    for c in res["cells"]:
        assert len(c["final_return"]) == 2 and np.all(np.isfinite(c["final_return"]))
        assert c["env_steps_per_second"] > 0 and c["device"].startswith("cpu")
    assert "| sgd | 2 |" in open(tmp_path / "results.md").read()
