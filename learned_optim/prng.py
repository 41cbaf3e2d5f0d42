"""``jax.random.normal``'s exact values, drawn without jaxlib's CPU hash loop.

OPEN draws fresh N(0, 1) noise for every actor parameter at every update
(30,019 numbers per minibatch step for a MinAtar PPO agent). On CPU, jax
lowers its Threefry-2x32 hash as a rolled loop (``fori_loop`` over its five
blocks of four rounds, to keep compile times down), so each draw is a
``while`` loop of small kernels over the whole array; on a 2-core machine
each of those kernels is split over both threads, and waking the second
thread for every one of them costs more than the arithmetic. Measured on this
project's 2-core CPU, 32 OPEN updates on the Breakout PPO agent: the noise
took about 2 ms of a 6.8 ms update with both cores, 0.3-0.4 ms with one.

``standard_normal`` computes the same numbers (bit for bit; the tests compare
them with ``jax.random.normal``) from the same hash written out round by round,
which XLA fuses into one elementwise kernel. It applies where its bits are
jax's own: a Threefry-2x32 key (typed, or a raw ``uint32[2]`` with the default
implementation) and ``jax_threefry_partitionable`` on (jax's default). Any
other key or setting falls back to ``jax.random.normal`` itself, so the
function is always ``jax.random.normal(key, (n,), float32)``.

The hash is the published Threefry-2x32 with 20 rounds (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011); the uniform and
normal transforms are the ones ``jax.random`` documents (23 random mantissa
bits in [1, 2), shifted to (-1, 1), then ``sqrt(2) * erfinv``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_NORMAL_LO = np.nextafter(np.float32(-1.0), np.float32(0.0))  # open interval (-1, 1), as jax.random.normal
_SQRT2 = np.float32(np.sqrt(2.0))


def _rotl(x: jax.Array, r: int) -> jax.Array:
    return lax.shift_left(x, np.uint32(r)) | lax.shift_right_logical(x, np.uint32(32 - r))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array):
    """Threefry-2x32 (20 rounds) of the counter pair ``(x0, x1)`` under key
    ``(k0, k1)``, unrolled; all ``uint32``, ``x0``/``x1`` of one shape."""
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = _rotl(x1, r) ^ x0
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _threefry_key_data(key: jax.Array):
    """The key's two ``uint32`` words when ``jax.random`` would hash it with
    partitionable Threefry-2x32; otherwise None."""
    # (getattr: a later jax may drop these switches; tests/test_prng.py checks the bits either way)
    if not getattr(jax.config, "jax_threefry_partitionable", True):
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    default_impl = getattr(jax.config, "jax_default_prng_impl", "threefry2x32")
    if key.dtype == jnp.uint32 and key.shape == (2,) and default_impl == "threefry2x32":
        return key
    return None


def standard_normal(key: jax.Array, n: int) -> jax.Array:
    """``jax.random.normal(key, (n,), jnp.float32)``, the same values; a single
    fused pass on CPU where jax's own lowering runs a loop (module docstring)."""
    n = int(n)
    data = _threefry_key_data(key) if 0 < n < 2**32 else None
    if data is None:
        return jax.random.normal(key, (n,), jnp.float32)
    # partitionable Threefry: the counter of element i is the 64-bit i (high word 0)
    hi, lo = threefry2x32(data[0], data[1], jnp.zeros((n,), jnp.uint32), lax.iota(jnp.uint32, n))
    bits = hi ^ lo
    one_two = lax.bitcast_convert_type(lax.shift_right_logical(bits, np.uint32(9)) | np.uint32(0x3F800000),
                                       jnp.float32)
    u = lax.max(_NORMAL_LO, (one_two - np.float32(1.0)) * (np.float32(1.0) - _NORMAL_LO) + _NORMAL_LO)
    return _SQRT2 * lax.erf_inv(u)
