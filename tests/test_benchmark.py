import json
import os
import subprocess
import sys

import numpy as np
import pytest

from meta import benchmark, lr_tuning, stats
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
    def train(env, spec, config, hp, seeds, seed=0, log=None, learning_rate=None):
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
    md = open(tmp_path / "results.md").read()  # wide summary: optimizers x envs, speed vs the reference
    assert "| optimizer | CartPole-v1 | Catch-bsuite | speed vs adam (mean) |" in md
    assert "| sgd | " in md and " | 0.50x |" in md and "| lr | CartPole-v1 | Catch-bsuite |" in md
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


@pytest.mark.slow  # the tuned-cell end-to-end test covers the same outputs
def test_real_tiny_benchmark_end_to_end(tmp_path):
    from meta.cli.benchmark import main

    assert main(["--envs", "CartPole-v1", "--optimizers", "adam,sgd", "--seeds", "2", "--timesteps", "4096",
                 "--out", str(tmp_path)]) == 0
    res = json.load(open(tmp_path / "results.json"))
    assert [c["optimizer"] for c in res["cells"]] == ["adam", "sgd"]
    for c in res["cells"]:
        assert len(c["final_return"]) == 2 and np.all(np.isfinite(c["final_return"]))
        assert c["env_steps_per_second"] > 0 and c["device"].startswith("cpu")
    assert "| sgd | 2 |" in open(tmp_path / "results.md").read()


# Learning-rate tuning ---------------------------------------------------------------------------


def test_select_lr_on_hand_made_returns():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3]
    # means 1.5, 5.5, 5.5, 7.0 -> the largest lr wins, and it lies on the edge of the grid
    c = lr_tuning.select_lr(lrs, [[1, 2], [5, 6], [9, 2], [7, 7]])
    assert c["index"] == 3 and c["lr"] == 3e-3 and c["at_edge"]
    assert c["mean_return"] == pytest.approx([1.5, 5.5, 5.5, 7.0])
    assert c["stderr"][3] == 0.0 and c["stderr"][0] == pytest.approx(0.5)
    # exact tie between 3e-4 and 1e-3 -> the smaller, also when the grid is given out of order
    c = lr_tuning.select_lr(lrs, [[1, 1], [5, 5], [6, 4], [2, 2]])
    assert c["lr"] == 3e-4 and not c["at_edge"]
    c = lr_tuning.select_lr([1e-3, 1e-4, 3e-4], [[6, 4], [1, 1], [5, 5]])
    assert c["lr"] == 3e-4 and c["index"] == 2
    # the best mean has a diverged seed, the second best a NaN return: both lose to the third
    c = lr_tuning.select_lr([1e-4, 3e-4, 1e-3], [[3, 3], [np.nan, 9], [9, 9]],
                            diverged=[[False, False], [False, False], [True, False]])
    assert c["lr"] == 1e-4 and c["valid"] == [True, False, False]
    # every lr diverged: the best finite mean among them; nothing finite: the smallest lr
    c = lr_tuning.select_lr([1e-4, 3e-4], [[1, 1], [2, 2]], diverged=[[True, False], [False, True]])
    assert c["lr"] == 3e-4
    assert lr_tuning.select_lr([1e-4, 3e-4], [[np.nan, 1], [np.nan, 2]])["lr"] == 1e-4
    with pytest.raises(ValueError, match="returns must be"):
        lr_tuning.select_lr([1e-4, 3e-4], [1.0, 2.0])


def test_lr_grid_parsing_and_resolution():
    g = lr_tuning.parse_lr_grid(lr_tuning.DEFAULT_LR_GRID)
    assert g.relative and g.resolve(3e-3) == (3e-4, 9e-4, 3e-3, 9e-3, 3e-2)
    g = lr_tuning.parse_lr_grid(" 1e-3, 1e-4 ,3e-4")
    assert not g.relative and g.resolve(0.05) == (1e-4, 3e-4, 1e-3)  # absolute: default ignored, sorted
    for bad, message in [("1e-3", "at least two"), ("", "at least two"), ("x1,1e-3", "mixes"),
                         ("fast,1e-3", "'fast' is not a number"), ("x0.1,xtwo", "multipliers are written"),
                         ("-1e-3,1e-3", "must be positive"), ("nan,1e-3", "must be positive"),
                         ("1e-3,0.001", "repeats")]:
        with pytest.raises(ValueError, match=message):
            lr_tuning.parse_lr_grid(bad)
    # per-optimizer grids after ';', by optimizer name; the unnamed one serves the rest
    gs = lr_tuning.parse_lr_grids("3e-4,1e-3; lion=3e-5,1e-4 ;kfac=x0.3,x3")
    assert gs.for_spec("adam").resolve(3e-3) == (3e-4, 1e-3)
    assert gs.for_spec("lion").resolve(3e-5) == (3e-5, 1e-4)
    assert gs.for_spec("kfac:period=20").resolve(0.05) == (0.015, 0.15)
    assert str(lr_tuning.parse_lr_grids("lion=1e-4,1e-3").default) == lr_tuning.DEFAULT_LR_GRID
    for bad, message in [("1e-3,2e-3;1e-4,2e-4", "two grids without an optimizer name"),
                         ("adamm=1e-3,2e-3", "unknown optimizer 'adamm'"),
                         ("lion=1e-4,1e-3;lion=1e-5,1e-4", "two grids for 'lion'"), ("lion=1e-4", "at least two")]:
        with pytest.raises(ValueError, match=message):
            lr_tuning.parse_lr_grids(bad)


def test_make_cells_centres_grids_on_each_optimizers_default():
    grid = lr_tuning.parse_lr_grid("x0.1,x1,x10")
    cells = benchmark.make_cells(["Breakout-MinAtar", "CartPole-v1"], ["adam", "kfac", "adam:lr=1e-3", "open"],
                                 seeds=3, timesteps=1e5, lr_grid=grid, tune_seeds=2, tune_timesteps=5e4)
    by = {(c.env, c.optimizer): c for c in cells}
    assert by["Breakout-MinAtar", "adam"].lr_grid == (3e-4, 3e-3, 3e-2)  # MinAtar preset lr 3e-3 (tuned for Adam)
    assert by["CartPole-v1", "adam"].lr_grid == (2.5e-5, 2.5e-4, 2.5e-3)  # classic preset lr
    assert by["CartPole-v1", "kfac"].lr_grid == (5e-3, 5e-2, 5e-1)  # kfac's own default 0.05
    assert by["CartPole-v1", "adam:lr=1e-3"].lr_grid == (1e-4, 1e-3, 1e-2)  # the spec's lr=
    open_cell = by["CartPole-v1", "open"]  # no injected learning rate: untuned, settings as before tuning existed
    assert not open_cell.tuned and "lr_grid" not in open_cell.settings()
    c = by["CartPole-v1", "kfac"]
    assert c.tune_seeds == 2 and c.tune_timesteps == 50_000 and c.cost() == 3 * 100_000 + 3 * 2 * 50_000
    with pytest.raises(ValueError, match="--lr and --tune-lr"):
        benchmark.make_cells(["CartPole-v1"], ["adam"], 2, 1e4, lr=1e-3, lr_grid=grid)
    cells = benchmark.make_cells(["CartPole-v1"], ["adam", "lion", "kfac:period=20"], 2, 1e4,
                                 lr_grid=lr_tuning.parse_lr_grids("1e-4,1e-3;kfac=x0.5,x2"))
    assert [c.lr_grid for c in cells] == [(1e-4, 1e-3), (1e-4, 1e-3), (0.025, 0.1)]


def test_tuning_keys_are_disjoint_from_evaluation_keys():
    import jax

    from meta.experiment import evaluation_keys, tuning_keys

    ev = np.asarray(jax.random.key_data(evaluation_keys(0, 4))).reshape(4, -1)
    tu = np.asarray(jax.random.key_data(tuning_keys(0, 4))).reshape(4, -1)
    assert not any((e == t).all() for e in ev for t in tu)
    assert (tu == np.asarray(jax.random.key_data(tuning_keys(0, 4))).reshape(4, -1)).all()  # deterministic


def _fake_sweep(calls, returns):
    def sweep(env, spec, config, hp, lrs, seeds, seed=0, log=None):
        calls.append((env, spec, tuple(lrs), seeds))
        r = np.asarray(returns[spec], float)
        assert r.shape == (len(lrs), seeds)
        return dict(lrs=list(lrs), seeds=seeds, seed=seed, timesteps_per_seed=config.num_updates * config.batch_size,
                    final_return=r.tolist(), diverged=np.zeros(r.shape, bool).tolist())
    return sweep


def _fake_train_lr(calls):
    def train(env, spec, config, hp, seeds, seed=0, log=None, learning_rate=None):
        calls.append((env, spec, learning_rate))
        curves = np.full((seeds, 5), 1000.0 * learning_rate)
        return dict(env=env, optimizer=spec, final_return=curves[:, -1].tolist(), curves=curves.tolist(),
                    steps=[1, 2, 3, 4, 5], env_steps_per_second=100.0, compile_seconds=1.0, timesteps_per_seed=5,
                    final_return_mean=float(curves[:, -1].mean()), hparams=dict(hp, lr=learning_rate),
                    uses_lr=spec != "open")
    return train


def test_tuned_cells_pick_lr_write_it_and_resume(tmp_path):
    grid = lr_tuning.parse_lr_grid("x0.1,x1,x10")
    cells = benchmark.make_cells(["CartPole-v1"], ["adam", "sgd", "open"], seeds=2, timesteps=2048,
                                 lr_grid=grid, tune_seeds=3, tune_timesteps=1024)
    returns = {"adam": [[1, 1, 1], [4, 5, 6], [9, 0, 0]],  # means 1, 5, 3 -> the middle lr 2.5e-4
               "sgd": [[1, 2, 3], [2, 2, 2], [0, 0, 0]]}   # tie at mean 2 -> the smaller lr 1e-3
    sweeps, trains = [], []
    run = lambda cs: benchmark.run_cells(cs, str(tmp_path), train=_fake_train_lr(trains),  # noqa: E731
                                         sweep=_fake_sweep(sweeps, returns), log=lambda m: None)
    recs = run(cells)
    assert [s[:2] for s in sweeps] == [("CartPole-v1", "adam"), ("CartPole-v1", "sgd")]  # open is not swept
    assert sweeps[0][2:] == ((2.5e-5, 2.5e-4, 2.5e-3), 3)
    assert trains == [("CartPole-v1", "adam", 2.5e-4), ("CartPole-v1", "sgd", 1e-3),
                      ("CartPole-v1", "open", 2.5e-4)]  # evaluation at the chosen lr
    assert recs[0]["lr_tuning"]["chosen_lr"] == 2.5e-4 and recs[1]["lr_tuning"]["chosen_lr"] == 1e-3
    assert "lr_tuning" not in recs[2]
    table = benchmark.write_outputs(recs, str(tmp_path), "adam")
    assert [r["lr"] for r in table["CartPole-v1"]] == [2.5e-4, 1e-3, None]
    res = json.load(open(tmp_path / "results.json"))
    assert res["lr_tuning"]["CartPole-v1"]["adam"]["mean_return"] == pytest.approx([1, 5, 3])
    assert res["lr_tuning"]["CartPole-v1"]["sgd"]["chosen_lr"] == 1e-3
    md = open(tmp_path / "results.md").read()
    assert "| 2.5e-4 (tuned) |" in md and "| 1e-3 (tuned, grid edge) |" in md and "n/a (no injected lr)" in md
    assert "**2.5e-4: 5.00**" in md and os.path.getsize(tmp_path / "lr_sweep_CartPole-v1.png") > 0

    # resume: nothing runs again
    run(cells)
    assert len(sweeps) == 2 and len(trains) == 3
    # interrupted after the sweep (cell file missing, sweep file kept): the sweep is reused
    os.remove(tmp_path / "cells" / "CartPole-v1__adam.json")
    recs = run(cells)
    assert len(sweeps) == 2 and trains[-1] == ("CartPole-v1", "adam", 2.5e-4)
    assert recs[0]["lr_tuning"]["chosen_lr"] == 2.5e-4
    # a changed grid, tuning budget or untuned rerun is refused
    for changed in (benchmark.make_cells(["CartPole-v1"], ["adam"], 2, 2048, lr_grid=lr_tuning.parse_lr_grid(
                        "x0.3,x1,x3"), tune_seeds=3, tune_timesteps=1024),
                    benchmark.make_cells(["CartPole-v1"], ["adam"], 2, 2048, lr_grid=grid, tune_seeds=2,
                                         tune_timesteps=1024),
                    benchmark.make_cells(["CartPole-v1"], ["adam"], 2, 2048)):
        with pytest.raises(ValueError, match="was run with settings"):
            run(changed)
    # --report-only rebuilds the same table from the cell files
    from meta.cli.benchmark import main

    assert main(["--report-only", "--out", str(tmp_path), "--envs", "CartPole-v1",
                 "--optimizers", "adam,sgd,open"]) == 0
    assert json.load(open(tmp_path / "results.json"))["lr_tuning"]["CartPole-v1"]["adam"]["chosen_lr"] == 2.5e-4


@pytest.mark.parametrize("args, message", [
    (["--tune-lr", "--lr-grid", "1e-3"], "--lr-grid needs at least two values"),
    (["--tune-lr", "--lr-grid", "fast,slow"], "'fast' is not a number"),
    (["--tune-lr", "--lr-grid", "1e-3,-1"], "must be positive"),
    (["--lr-grid", "1e-3,3e-3"], "--lr-grid only works with --tune-lr"),
    (["--tune-lr", "--lr", "1e-3"], "--lr and --tune-lr exclude each other"),
    (["--tune-lr", "--tune-seeds", "0"], "--tune-seeds must be >= 1"),
    (["--tune-lr", "--lr-grid", "1e-3,1e-2;adamm=1e-3,1e-2"], "unknown optimizer 'adamm'"),
])
def test_bad_tuning_input_one_line_error(args, message, tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--envs", "CartPole-v1", "--optimizers", "adam", *args,
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error:") and message in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "cells")  # refused before anything ran


def test_real_tiny_tuned_cell_end_to_end(tmp_path, capsys):
    from meta.cli.benchmark import main

    args = ["--envs", "CartPole-v1", "--optimizers", "adam", "--tune-lr", "--lr-grid", "1e-6,3e-3",
            "--tune-seeds", "2", "--seeds", "2", "--timesteps", "8192", "--out", str(tmp_path)]
    assert main(args) == 0
    res = json.load(open(tmp_path / "results.json"))
    (cell,) = res["cells"]
    t = cell["lr_tuning"]
    assert t["lrs"] == [1e-6, 3e-3] and np.asarray(t["final_return"]).shape == (2, 2)
    # lr 1e-6 leaves the policy random (CartPole about 22); 3e-3 learns within 8192 steps
    assert t["mean_return"][0] < 35 and t["mean_return"][1] > 60, t["mean_return"]
    assert t["chosen_lr"] == 3e-3 and cell["hparams"]["lr"] == pytest.approx(3e-3)
    assert len(cell["final_return"]) == 2 and np.all(np.isfinite(cell["final_return"]))
    assert cell["env_steps_per_second"] > 0 and cell["device"].startswith("cpu")
    assert res["lr_tuning"]["CartPole-v1"]["adam"]["chosen_lr"] == 3e-3
    # evaluation seeds are not the tuning seeds: different runs, different returns
    assert not np.allclose(sorted(cell["final_return"]), sorted(t["final_return"][1]))
    assert "| 3e-3 (tuned, grid edge) |" in open(tmp_path / "results.md").read()
    capsys.readouterr()
    assert main(args) == 0  # resume: nothing trains again
    assert "done earlier, skipped" in capsys.readouterr().out
    assert main(args[:6] + ["1e-6,1e-3"] + args[7:]) == 2  # a changed grid is refused
    assert "was run with settings" in capsys.readouterr().err


def test_dry_run_prints_grids_and_trains_nothing(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--envs", "Breakout-MinAtar", "--optimizers",
                          "adam,kfac,open", "--tune-lr", "--lr-grid", "1e-3,3e-3;kfac=x0.5,x2", "--seeds", "3",
                          "--timesteps", "1e5", "--dry-run", "--out", str(tmp_path / "b")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Breakout-MinAtar | adam: lr sweep over 0.001, 0.003 (2 tuning seeds x 100,000 steps each)" in out.stdout
    assert "Breakout-MinAtar | kfac: lr sweep over 0.025, 0.1" in out.stdout
    assert "Breakout-MinAtar | open: no injected learning rate" in out.stdout and "rough estimate" in out.stdout
    assert not os.path.exists(tmp_path / "b")
