"""metarl-speed (meta.cli.speed): bad input gives one error line; a tiny side-by-side run
writes one row per optimizer (and per curvature row count for diag_ggn/kfac)."""

import json

import pytest

from meta.cli import speed


@pytest.mark.parametrize("args, message", [
    (["--optimizers", "adam,bogus"], "unknown optimizer 'bogus'"),
    (["--env", "Nope-v0"], "unknown env 'Nope-v0'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--curvature-batch-size", "-1"], "--curvature-batch-size must be integers >= 0"),
])
def test_bad_input_one_error_line(args, message, capsys):
    assert speed.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err


@pytest.mark.slow  # ~35 s; the script's input checks stay in the default suite, its timing loop is the benchmark itself
def test_tiny_run_rows_and_ratios(tmp_path, capsys):
    out = str(tmp_path / "speed.json")
    assert speed.main(["--env", "CartPole-v1", "--optimizers", "adam,diag_ggn", "--curvature-batch-size", "16",
                       "--updates", "1", "--repeats", "2", "--out", out]) == 0
    rows = json.load(open(out))["rows"]
    assert [r["optimizer"] for r in rows] == ["adam", "diag_ggn [curvature rows 16]"]
    assert rows[0]["ratio"] == 1.0 and rows[0]["cpu_ratio"] == 1.0
    for r in rows:
        assert r["env_steps_per_second"] > 0 and len(r["times"]) == 2 and len(r["cpu_times"]) == 2
    assert "| diag_ggn [curvature rows 16] |" in capsys.readouterr().out
