"""--wandb PROJECT: the rows of OUT/log.jsonl go to Weights & Biases too.

Offline (``WANDB_MODE=offline``, no network); the run's history is read back
from the run file wandb writes (``tests.wandb_offline``) and compared with
the JSONL rows value by value. Without wandb installed, ``--wandb`` is a
one-line error naming the extra, before anything compiles."""

import json
import os
import sys

import pytest

TRAIN = ["--env", "CartPole-v1", "--num-envs", "4", "--num-steps", "32", "--timesteps", str(12 * 128),
         "--hidden", "16,16", "--epochs", "1", "--minibatches", "2", "--seeds", "2"]


def _jsonl(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.fixture
def offline(monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e .[wandb])")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_train_logs_the_jsonl_rows_to_wandb(offline, tmp_path, capsys):
    from meta.cli import train
    from tests.wandb_offline import offline_history

    out = str(tmp_path / "run")
    assert train.main(TRAIN + ["--out", out, "--wandb", "metarl-test"]) == 0
    rows, logged = _jsonl(out), offline_history(out)
    assert [r["update"] for r in rows] == list(range(1, 13))
    assert logged == rows  # every key, every value, in order (row i = wandb step i)
    res = json.load(open(os.path.join(out, "results.json")))
    mean_curve = [sum(c[u] for c in res["curves"]) / 2 for u in range(12)]
    assert [r["return_mean"] for r in logged] == pytest.approx(mean_curve)
    assert logged[-1]["env_steps"] == 12 * 128 and all(r["return_max"] >= r["return_min"] > 0 for r in logged)
    assert capsys.readouterr().out.splitlines()[-1].startswith("final return")  # our lines stay on stdout


def test_sink_sends_each_row_once_and_flattens_lists(offline, tmp_path):
    from meta.report import write_log_rows
    from meta.tracking import open_sink
    from tests.wandb_offline import offline_history

    out = str(tmp_path)
    sink = open_sink("metarl-test", out, "unit", {"flag": 1, "skipped": object()})
    rows = [dict(generation=1, fitness_mean=0.5, mean_candidate_return=[18.5, 20.0], es_mean_return=None)]
    write_log_rows(out, rows, ["generation"], sink)
    rows.append(dict(generation=2, fitness_mean=0.75, mean_candidate_return=[19.0, 21.5], es_mean_return=33.0))
    write_log_rows(out, rows, ["generation"], sink)  # (all rows so far, as the loops pass them)
    sink.finish()
    assert _jsonl(out) == rows
    assert offline_history(out) == [
        {"generation": 1, "fitness_mean": 0.5, "mean_candidate_return/0": 18.5, "mean_candidate_return/1": 20.0},
        {"generation": 2, "fitness_mean": 0.75, "mean_candidate_return/0": 19.0, "mean_candidate_return/1": 21.5,
         "es_mean_return": 33.0},
    ]


@pytest.mark.parametrize("cli", ["train", "pbt", "meta_train"])
def test_without_wandb_the_flag_is_a_one_line_error_before_anything_runs(cli, tmp_path, capsys, monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    module = importlib.import_module(f"meta.cli.{cli}")
    out = tmp_path / "run"
    assert module.main(["--out", str(out), "--wandb", "metarl-test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --wandb needs the wandb package") and \
        "pip install -e .[wandb]" in err[0], err
    assert not out.exists()
