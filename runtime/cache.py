"""The persistent compilation cache, on by default for the command-line tools.

XLA compiles every jitted program of a run from scratch, which on CPU can
take longer than a short run itself. JAX can keep compiled executables on
disk and load them the next time the same program (same code, shapes, flags,
jax/jaxlib version and backend) is compiled; this module turns that on for
our CLIs, each of which calls ``enable_compilation_cache`` first thing in
``main``, before anything compiles (JAX decides once per process, at the first
compile, whether it uses a cache).

Where: ``$JAX_COMPILATION_CACHE_DIR`` when the user set it (theirs wins; JAX
reads it itself), else ``$XDG_CACHE_HOME/metarl/jax``, else
``~/.cache/metarl/jax``. ``METARL_NO_COMPILE_CACHE=1`` or
``enable_compilation_cache(disable=True)`` (``--no-compile-cache``) turns the
cache off, the user's directory included. JAX's default only caches programs
that took at least a second to compile; we cache every program (the many
small ones of a run add up), unless the user set
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` / ``..._MIN_ENTRY_SIZE_BYTES``.
The directory has no size limit (JAX's LRU eviction needs the optional
``filelock`` package); delete it at any time to reclaim the space.

Like ``runtime.platform`` this imports no other package of the project; it
imports JAX only when called.
"""

from __future__ import annotations

import os
from typing import Optional

DISABLE_ENV = "METARL_NO_COMPILE_CACHE"
_FALSE = ("", "0", "false", "no", "off")


def disabled_by_env() -> bool:
    """``METARL_NO_COMPILE_CACHE`` is set to something other than 0/false/no/off."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in _FALSE


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/metarl/jax`` (an absolute ``XDG_CACHE_HOME`` only, as
    the XDG spec asks), else ``~/.cache/metarl/jax``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "metarl", "jax")


def enable_compilation_cache(disable: bool = False) -> Optional[str]:
    """Turns JAX's persistent compilation cache on (see the module docstring)
    and returns its directory, or None when it is off (``disable``,
    ``METARL_NO_COMPILE_CACHE``, or a directory that cannot be created).
    Call before the first compile of the process."""
    import jax

    if disable or disabled_by_env():
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()
    if "://" not in path:  # a local directory (JAX also takes gs:// and the like)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            return None
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor, no override
    if "JAX_ENABLE_COMPILATION_CACHE" not in os.environ:  # (a user's =false keeps it off)
        jax.config.update("jax_enable_compilation_cache", True)
    return path
