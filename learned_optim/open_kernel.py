"""OPEN's per-parameter network as one fused CPU kernel (XLA FFI).

``learned_optim.open.open_network`` in JAX is a few skinny matmuls and
elementwise passes over ``[rows, N]`` arrays of several MB; on CPU much of its
time is that memory traffic, and XLA runs its matmuls well below the
machine's multiply-add peak. ``csrc/open_forward.cc`` runs each block of 24
parameters through the whole network (GRU cell, two LayerNorm layers, output
layer) with the parameters on the SIMD lanes and the intermediates in L1.
Same values to float rounding (``tests/test_open_kernel.py`` checks it
against the JAX path, also under ``vmap`` with per-member weights, with NaNs,
and for gradients).

The kernel is compiled on first use with the system's C++ compiler
(``$CXX``, else ``g++``/``c++``/``clang++``) against jaxlib's FFI headers,
for this machine (``-march=native``; it needs x86-64 with AVX2 and FMA), and
cached under ``$XDG_CACHE_HOME/metarl-optim`` (``~/.cache`` by default).
Where that is not possible OPEN uses the JAX path: silently on other CPUs
and accelerators, with one warning per process when the compiler is missing
or the build fails. ``METARL_OPEN_KERNEL=0`` always uses the JAX
path, ``=1`` fails loudly if the kernel cannot be built. Only the CPU backend
uses it (``lax.platform_dependent``); GPUs and TPUs run the JAX path. It is
not differentiable itself: ``jax.grad``/``jvp`` through it use the JAX path's
derivative (``custom_jvp``). ``METARL_OPEN_KERNEL_THREADS`` caps its threads
(default: the size of XLA's CPU thread pool, whose threads it borrows).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp

TARGET = "metarl_open_forward"
SOURCE = Path(__file__).parent / "csrc" / "open_forward.cc"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
         "-std=c++17", "-shared", "-fPIC", "-pthread")
_lock = threading.Lock()
_state: dict = {}


def _compiler() -> Optional[str]:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metarl-optim"


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if sys.platform.startswith("linux"):
        flags = _cpu_tag().split()
        return "avx2" in flags and "fma" in flags
    return True  # elsewhere the compiler decides (the source has an #error without AVX2/FMA)


def build(verbose: bool = False) -> Path:
    """Compiles the kernel (if not cached) and returns the shared library's path."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), jax.ffi.include_dir().encode(),
                                     jax.__version__.encode(), _cpu_tag().encode(), cxx.encode()])).hexdigest()[:16]
    out = _cache_dir() / f"open_forward-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    print(f"learned_optim: compiling OPEN's CPU kernel once, into {out.parent} ...", file=sys.stderr, flush=True)
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{r.stderr[-3000:]}")
    os.replace(tmp, out)  # atomic: parallel builds (pytest-xdist workers) do not clash
    return out


def available() -> bool:
    """Whether the kernel is built, loaded and registered (builds it on first call)."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        mode = os.environ.get("METARL_OPEN_KERNEL", "auto").lower()
        if mode in ("0", "off", "false", "no"):
            _state["ok"] = False
            return False
        if not _cpu_supported():
            _state["ok"] = False  # not x86-64 with AVX2 and FMA: the JAX path
            if mode in ("1", "on", "true", "yes"):
                raise RuntimeError("OPEN's CPU kernel needs an x86-64 CPU with AVX2 and FMA")
            return False
        try:
            if jax.default_backend() != "cpu":
                raise RuntimeError(f"the default backend is {jax.default_backend()}, not the CPU")
            lib = ctypes.cdll.LoadLibrary(str(build()))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MetarlOpenForward), platform="cpu")
            _state["lib"] = lib
            _state["ok"] = True
        except Exception as e:  # no compiler, unsupported platform, ...
            if mode in ("1", "on", "true", "yes"):
                raise
            if isinstance(e, RuntimeError) and "default backend" in str(e):
                _state["ok"] = False  # an accelerator: the JAX path is the fast one there
                return False
            warnings.warn(f"OPEN's fused CPU kernel is not available ({e}); using the JAX path "
                          "(slower on CPU). Set METARL_OPEN_KERNEL=0 to silence this.", RuntimeWarning)
            _state["ok"] = False
        return _state["ok"]


def pack_weights(prep) -> jax.Array:
    """The prepared OPEN weights (``open._Prepared``) as the kernel's flat vector."""
    g = prep.gru
    parts = [g.w_in, g.b_in, g.w_hidden, g.b_hn]
    for w, b, scale, bias in prep.layers:
        parts += [w, b, scale, bias]
    parts += [prep.out_w, prep.out_b]
    return jnp.concatenate([jnp.ravel(p).astype(jnp.float32) for p in parts])


def fused(reference: Callable) -> Callable:
    """``reference(prep, carry, x) -> (carry, o)`` run by the kernel on CPU, as
    ``run(prep, carry, x_a, x_b)`` with ``x = concatenate([x_a, x_b])`` (rows):
    the kernel reads the two parts where they are, so ``x`` is never copied
    into one array.

    Under ``vmap`` every input (weights included) is broadcast to the batch and
    the kernel loops over it; derivatives are ``reference``'s. Where the kernel
    is not ``available()`` it is ``reference`` on the concatenated input."""

    def jax_path(prep, carry, x_a, x_b):
        return reference(prep, carry, jnp.concatenate([x_a, x_b], axis=0))

    if not available():
        return jax_path

    def call(prep, carry, x_a, x_b):
        out = (jax.ShapeDtypeStruct(carry.shape, jnp.float32),
               jax.ShapeDtypeStruct((3,) + carry.shape[1:], jnp.float32))
        return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(
            x_a.astype(jnp.float32), x_b.astype(jnp.float32), carry.astype(jnp.float32), pack_weights(prep))

    @jax.custom_jvp
    def run(prep, carry, x_a, x_b):
        return jax.lax.platform_dependent(prep, carry, x_a, x_b, cpu=call, default=jax_path)

    @run.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(jax_path, primals, tangents)

    return run
