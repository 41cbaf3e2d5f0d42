"""The meta-training comparison against a tuned Adam: the lr picked by the
measure ES optimises on tuning seeds, the reference fitness divides by, the
evaluation on other seeds, ``summary.json``'s schema."""

import json
import os

import numpy as np
import pytest

from meta.cli import meta_train
from meta.es import ESConfig
from meta.lr_tuning import parse_lr_grid
from meta.meta_train import compare


@pytest.mark.parametrize("args, message", [
    (["--adam-lr-grid", "1e-3,1e-2"], "at least 4"),
    (["--adam-lr-grid", "1e-3,x2,1e-2,1e-1"], "mixes absolute values"),
    (["--adam-lr-grid", "1e-3,-1,1e-2,1e-1"], "must be positive"),
    (["--tune-seeds", "0"], "--tune-seeds must be >= 1"),
    (["--fitness-measure", "best"], "--fitness-measure 'best'; allowed: final_window, last_update, training_mean"),
])
def test_bad_tuning_arguments(args, message, tmp_path, capsys):
    assert meta_train.main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "--lr-grid" not in err.replace("--adam-lr-grid", ""), err


def test_tune_adam_picks_the_best_lr_of_the_measure_on_tuning_seeds(monkeypatch):
    """A fake sweep: tune_adam must ask for ES's measure on the tuning seed, pick
    the best non-diverged lr (not the best raw mean) and make its mean the reference."""
    import meta.experiment

    asked = {}

    def fake_sweep(name, spec, cfg, hp, lrs, seeds, seed, log, measure):
        asked.update(name=name, spec=spec, lrs=list(lrs), seeds=seeds, seed=seed, measure=measure,
                     steps=cfg.total_timesteps)
        returns = [[0.1, 0.2], [0.5, 0.7], [0.9, 1.1], [3.0, 1.0]]  # lr 1e-1 is best on average but diverged
        diverged = [[False] * 2, [False] * 2, [False] * 2, [False, True]]
        return dict(final_return=returns, diverged=diverged, key_stream="k")

    monkeypatch.setattr(meta.experiment, "train_lr_sweep", fake_sweep)
    config = ESConfig(envs=("Catch-bsuite",), timesteps=4096, seed=3, fitness_measure="training_mean")
    said = []
    out = compare.tune_adam(config, parse_lr_grid("1e-1,1e-4,1e-3,1e-2"), 2, said.append)["Catch-bsuite"]
    assert asked == dict(name="Catch-bsuite", spec="adam", lrs=[1e-4, 1e-3, 1e-2, 1e-1], seeds=2, seed=10_003,
                         measure="training_mean", steps=4096)
    assert out["lr"] == 1e-2 and out["reference"] == pytest.approx(1.0) and not out["at_edge"]
    assert out["mean_return"] == pytest.approx([0.15, 0.6, 1.0, 2.0])
    assert "training_mean 1.000" in said[0] and "mean return over the whole run" in out["rule"]
    assert compare.tuning_seed(config) != compare.evaluation_seed(config)


def test_summary_document_has_the_issue_schema(tmp_path):
    tuning = dict(lr=1e-2, lr_grid=[1e-3, 1e-2, 1e-1, 3e-1], mean_return=[0.1, 0.5, 0.2, -1.0], stderr=[0.1] * 4,
                  at_edge=False, tuning_seeds=4, rule="r")
    doc = compare.summary_document("training_mean", {"Catch-bsuite": dict(
        learned=[0.8, 0.9, 0.7, 0.8], adam_tuned=[0.5, 0.6, 0.7, 0.6], tuning=tuning)}, seeds=4)
    compare.write_summary(str(tmp_path), "t", "s", doc, [("Catch-bsuite", "learned", [0.8, 0.9, 0.7, 0.8]),
                                                        ("Catch-bsuite", "adam (tuned lr)", [0.5, 0.6, 0.7, 0.6])])
    back = json.load(open(tmp_path / "summary.json"))
    e = back["envs"]["Catch-bsuite"]
    assert back["measure"] == "training_mean"
    assert e["learned"] == {"mean": pytest.approx(0.8), "per_seed": [0.8, 0.9, 0.7, 0.8]}
    assert e["adam_tuned"]["mean"] == pytest.approx(0.6) and e["adam_tuned"]["lr"] == 1e-2
    assert e["adam_tuned"]["lr_grid"] == [1e-3, 1e-2, 1e-1, 3e-1] and len(e["adam_tuned"]["per_seed"]) == 4
    md = open(tmp_path / "summary.md").read()
    assert "learned +0.200 vs tuned Adam" in md and "| Catch-bsuite | adam (tuned lr) | 0.600" in md


@pytest.mark.slow  # ~2 min: an ES generation, an lr sweep and the evaluation runs
def test_main_job_compares_with_adam_at_its_tuned_lr_on_evaluation_seeds(tmp_path):
    """The run's tuned Adam is re-trained here by hand at the lr the tuning
    chose, on the evaluation seeds, and measured by hand (every finished
    episode's return): summary.json's per-seed values must be these."""
    from agents.presets import resolve_config
    from meta.experiment import train_seeds

    out = str(tmp_path / "run")
    grid = "1e-4,1e-3,1e-2,1e-1"
    assert meta_train.main(["--envs", "CartPole-v1", "--population", "2", "--seeds", "1", "--timesteps", "2048",
                            "--generations", "1", "--final-seeds", "2", "--tune-seeds", "2", "--adam-lr-grid", grid,
                            "--fitness-measure", "training_mean", "--out", out]) == 0
    doc = json.load(open(os.path.join(out, "summary.json")))
    refs = json.load(open(os.path.join(out, "references.json")))
    e = doc["envs"]["CartPole-v1"]
    t = refs["adam_tuning"]["CartPole-v1"]
    assert doc["measure"] == refs["measure"] == "training_mean"
    assert e["adam_tuned"]["lr"] == t["lr"] == t["lr_grid"][int(np.argmax(t["mean_return"]))]
    assert refs["reference_returns"] == [pytest.approx(max(t["mean_return"]))]
    cfg, hp, _ = resolve_config("CartPole-v1", total_timesteps=2048)
    res = train_seeds("CartPole-v1", "adam", cfg, hp, 2, seed=20_000, log=None, learning_rate=t["lr"])
    r, c = np.asarray(res["curves"]), np.asarray(res["episode_counts"])
    by_hand = (r * c).sum(-1) / c.sum(-1)
    np.testing.assert_allclose(e["adam_tuned"]["per_seed"], by_hand, rtol=1e-5)
    assert len(e["learned"]["per_seed"]) == 2 and os.path.exists(os.path.join(out, "comparison.png"))
