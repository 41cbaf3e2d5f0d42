import json
import os
import subprocess
import sys

import numpy as np
import pytest

from meta.cli import meta_train
from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "meta_train.py")
TINY = ["--rule", "open", "--envs", "CartPole-v1", "--population", "2", "--seeds", "1", "--timesteps", "2048",
        "--reference-returns", "20", "--final-seeds", "0", "--checkpoint-every", "1"]


def run(*args, timeout=900):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--population", "5"], "odd; antithetic"),
        (["--rule", "adam"], "unknown rule 'adam'"),
        (["--envs", "CartPol"], "unknown env 'CartPol'"),
        (["--algorithm", "NopeES"], "unknown ES algorithm"),
        (["--timesteps", "0"], "--timesteps must be positive"),
    ],
)
def test_bad_arguments(args, message, tmp_path, capsys):
    assert meta_train.main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err, err
    assert "Traceback" not in err


def test_resume_without_checkpoint(tmp_path):
    """In a fresh process, as a user runs it (the script, no sys.path edits)."""
    out = run("--resume", "--out", str(tmp_path / "empty"), timeout=120)
    assert out.returncode == 2 and "no checkpoint found" in out.stderr
    assert out.stderr.startswith("error:") and "Traceback" not in out.stderr


def _rows(path):
    rows = [json.loads(line) for line in open(os.path.join(path, "log.jsonl"))]
    return [(r["generation"], r["fitness_mean"], r["fitness_max"], r["fitness_min"]) for r in rows]


@pytest.mark.slow  # ES resume is also checked in-process (test_es.py) and the script's resume path by the metagrad end-to-end test
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    out = run(*TINY, "--generations", "3", "--out", a)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run(*TINY, "--generations", "2", "--out", b)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run(*TINY, "--generations", "3", "--out", b, "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from generation 2" in out.stdout
    assert _rows(a) == _rows(b) and len(_rows(a)) == 3
    import learned_optim

    _, pa = learned_optim.load(os.path.join(a, "optimizer"))
    _, pb = learned_optim.load(os.path.join(b, "optimizer"))
    import jax

    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    for name in ("log.csv", "fitness.png", "references.json"):
        assert os.path.exists(os.path.join(a, name)), name
    # a different config must not resume from this checkpoint
    out = run(*[x if x != "2048" else "4096" for x in TINY], "--generations", "4", "--out", a, "--resume")
    assert out.returncode == 2 and "different config" in out.stderr and "timesteps" in out.stderr
