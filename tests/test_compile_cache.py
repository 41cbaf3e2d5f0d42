"""runtime.cache: where the persistent compilation cache goes, and when it is off.

``enable_compilation_cache`` only sets JAX config values (JAX opens the cache
at the first compile of a process); each test puts them back and compiles
nothing, so the rest of the session is unaffected. That the cache is written
and used by a real run is checked in test_train_resume.py."""

import os

import jax
import pytest

from runtime import cache

NAMES = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs",
         "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def config(monkeypatch):
    saved = {n: getattr(jax.config, n) for n in NAMES}
    for var in ("METARL_NO_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME",
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
                "JAX_ENABLE_COMPILATION_CACHE"):
        monkeypatch.delenv(var, raising=False)
    yield lambda n: getattr(jax.config, n)
    for n, v in saved.items():
        jax.config.update(n, v)


def test_default_dir_is_xdg_cache_home_else_home(config, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_dir() == str(tmp_path / "home" / ".cache" / "metarl" / "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute paths only
    assert cache.default_cache_dir() == str(tmp_path / "home" / ".cache" / "metarl" / "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = cache.enable_compilation_cache()
    assert path == str(tmp_path / "xdg" / "metarl" / "jax") and os.path.isdir(path)
    assert config("jax_compilation_cache_dir") == path and config("jax_enable_compilation_cache")
    # small programs are cached too
    assert config("jax_persistent_cache_min_compile_time_secs") == 0.0
    assert config("jax_persistent_cache_min_entry_size_bytes") == -1


def test_users_directory_and_thresholds_win(config, monkeypatch, tmp_path):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "5")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 5.0)
    assert cache.enable_compilation_cache() == str(tmp_path / "theirs")
    assert config("jax_compilation_cache_dir") is None  # not ours to set: JAX reads their variable itself
    assert config("jax_persistent_cache_min_compile_time_secs") == 5.0
    assert not (tmp_path / "xdg").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_off_by_flag_or_env(config, monkeypatch, tmp_path, how):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))  # off means off, theirs too
    if how == "env":
        monkeypatch.setenv("METARL_NO_COMPILE_CACHE", "1")
    assert cache.enable_compilation_cache(disable=how == "flag") is None
    assert not config("jax_enable_compilation_cache")
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "theirs").exists()


@pytest.mark.parametrize("value, off", [("1", True), ("yes", True), ("0", False), ("", False), ("false", False)])
def test_disable_variable_values(monkeypatch, value, off):
    monkeypatch.setenv("METARL_NO_COMPILE_CACHE", value)
    assert cache.disabled_by_env() is off


def test_train_has_the_flag():
    from meta.cli import train

    assert train.parse_args(["--no-compile-cache"]).no_compile_cache
    assert not train.parse_args([]).no_compile_cache
