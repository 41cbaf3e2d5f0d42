"""The published OPEN weights ship as package data: ``open:NAME`` works from
any directory (and from an installed wheel); ``open:PATH.npy`` still works."""

import glob
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

import learned_optim
from learned_optim.open import PUBLISHED_OPEN, load_open_weights, load_published_open_weights
from tests.conftest import ROOT, SHARED

ANCHOR_DIR = os.path.join(SHARED, "anchors", "open")


@pytest.mark.skipif(not os.path.isdir(ANCHOR_DIR), reason="../shared/anchors/open not present")
@pytest.mark.parametrize("name", PUBLISHED_OPEN)
def test_name_gives_the_published_vector_from_any_directory(name, tmp_path, monkeypatch):
    path = os.path.join(ANCHOR_DIR, f"{name}_OPEN.npy")
    rule_ref, mp_ref = load_open_weights(path)
    monkeypatch.chdir(tmp_path)
    rule, mp = load_published_open_weights(name.upper())  # case-insensitive
    assert rule == rule_ref
    assert jax.tree.structure(mp) == jax.tree.structure(mp_ref)
    for a, b in zip(jax.tree.leaves(mp), jax.tree.leaves(mp_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(rule.flatten(mp)), np.load(path))


@pytest.mark.skipif(not os.path.isdir(ANCHOR_DIR), reason="../shared/anchors/open not present")
def test_spec_by_name_equals_spec_by_path(tmp_path, monkeypatch):
    path = os.path.join(ANCHOR_DIR, "breakout_OPEN.npy")
    dense = lambda k, n: {"kernel": jax.random.normal(jax.random.key(k), (3, n)), "bias": np.zeros(n, np.float32)}  # noqa: E731
    params = {"actor": {"Dense_0": dense(0, 4)}, "critic": {"Dense_0": dense(1, 1)}}
    grads = jax.tree.map(lambda x: 0.1 * np.ones_like(x), params)

    def first_update(spec):
        tx = learned_optim.from_spec(spec)
        u, _ = tx.update(grads, tx.init(params), params, key=jax.random.key(2), train_fraction=0.5)
        return np.concatenate([np.ravel(x) for x in jax.tree.leaves(u)])

    by_path = first_update(f"open:{path}")
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(first_update("open:breakout"), by_path)
    np.testing.assert_array_equal(first_update("open: Breakout "), by_path)


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError) as e:
        learned_optim.from_spec("open:pong")
    msg = str(e.value)
    assert "'open:pong'" in msg and "breakout, freeway, gridworld" in msg and ".npy" in msg


def test_paths_and_fresh_specs_unchanged(tmp_path, monkeypatch):
    vec = np.random.default_rng(0).normal(size=1211).astype(np.float32) * 0.1
    np.save(tmp_path / "mine.npy", vec)
    np.save(tmp_path / "breakout_OPEN.npy", vec)
    monkeypatch.chdir(tmp_path)
    for arg in ("mine.npy", str(tmp_path / "mine.npy"), "breakout_OPEN.npy"):
        learned_optim.from_spec(f"open:{arg}")  # relative and absolute paths
    os.rename("mine.npy", "extensionless")  # an existing file without .npy: still a path
    learned_optim.from_spec("open:extensionless")
    with pytest.raises(ValueError, match="no such file"):
        learned_optim.from_spec("open:missing.npy")
    learned_optim.from_spec("open:seed=3")


def test_package_data_is_installed_beside_the_code():
    here = os.path.join(os.path.dirname(learned_optim.__file__), "weights", "open")
    assert sorted(os.listdir(here)) == sorted(
        ["LICENSE", "README.md"] + [f"{n}_OPEN.npy" for n in PUBLISHED_OPEN])
    readme = open(os.path.join(here, "README.md")).read()
    assert "b65037bd89c09f31e80c5d49f1d78cc9c6dc43e0" in readme and "2407.07082" in readme
    assert "Apache License" in open(os.path.join(here, "LICENSE")).read()


@pytest.mark.slow
def test_wheel_lists_the_weights(tmp_path):
    """The built wheel carries the weights, LICENSE and README. Builds without
    isolation where the environment's setuptools is new enough for
    pyproject.toml (>= 77), else isolated through pip's configured index."""
    import setuptools

    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), ROOT]
    if int(setuptools.__version__.split(".")[0]) >= 77:
        cmd.append("--no-build-isolation")
    out = subprocess.run(cmd, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    if out.returncode and ("No matching distribution" in out.stderr or "Could not find a version" in out.stderr):
        pytest.skip(f"no build backend reachable: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"learned_optim/weights/open/{n}_OPEN.npy" for n in PUBLISHED_OPEN}
    want |= {"learned_optim/weights/open/LICENSE", "learned_optim/weights/open/README.md"}
    assert want <= names, sorted(want - names)
