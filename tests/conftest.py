import os

import pytest

import runtime  # noqa: F401  (the project's safe XLA defaults, before JAX starts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


@pytest.fixture(autouse=True)
def _no_persistent_compile_cache(monkeypatch):
    """The CLIs turn on a persistent compilation cache under ~/.cache by default;
    tests (and the CLI subprocesses they start, which inherit the environment)
    must not write there. Tests of the cache set their own XDG_CACHE_HOME."""
    monkeypatch.setenv("METARL_NO_COMPILE_CACHE", "1")
