"""No batched LAPACK call in the compiled CPU programs (runtime.platform), and
the ordinary batched call in the GPU/TPU ones.

jaxlib 0.10's CPU LAPACK kernels split a batch of matrices over XLA's thread
pool and block on the pieces; several such calls at once (one per fake
device) can hang forever. The hang is rare (3 of 32 runs of the sharded PB2
check on a busy 2-core machine), so a timing test cannot show it is gone.
These tests read the lowered program instead: every LAPACK custom call must get
a single matrix, however the caller vmaps.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

import envs  # noqa: F401
from agents.networks import orthogonal
from runtime.platform import one_matrix_at_a_time
from learned_optim.context import set_hyperparam
from learned_optim.kfac import kfac
from meta import pbt
from tests.test_kfac import batch, grads_like, hand_stats, make_params
from tests.test_pbt import toy_pbt, TOY_SPACE

# e.g. ``stablehlo.custom_call @lapack_spotrf_ffi(%3) {...} : (tensor<3x4x4xf32>) -> ...``
_LAPACK_CALL = re.compile(r"stablehlo\.custom_call @(lapack_\w+)\(.*?\} : \(tensor<((?:\d+x)*)\w+>")


def lapack_calls(fn, *args):
    """(target, first operand shape) of every LAPACK custom call in ``jit(fn)``'s
    lowering (XLA adds no batching later, so the compile is not needed)."""
    text = jax.jit(fn).lower(*args).as_text()
    calls = _LAPACK_CALL.findall(text)
    assert text.count("stablehlo.custom_call @lapack_") == len(calls), "StableHLO format changed"
    return [(target, tuple(int(d) for d in dims.split("x") if d)) for target, dims in calls]


def assert_unbatched(calls, expected_targets):
    assert {t for t, _ in calls} >= set(expected_targets), calls
    batched = [(t, s) for t, s in calls if len(s) > 2]
    assert not batched, f"batched LAPACK calls (can hang jaxlib 0.10 on CPU): {batched}"


def test_plain_vmap_is_batched_so_the_check_can_fail():
    calls = lapack_calls(jax.vmap(jnp.linalg.cholesky), jnp.broadcast_to(jnp.eye(4), (3, 4, 4)))
    assert calls == [("lapack_spotrf_ffi", (3, 4, 4))]


def test_one_matrix_at_a_time_same_values_under_nested_and_partial_vmap():
    key = jax.random.key(0)
    a = jax.random.normal(key, (2, 3, 5, 5))
    spd = a @ jnp.swapaxes(a, -1, -2) + 5 * jnp.eye(5)
    b = jax.random.normal(jax.random.fold_in(key, 1), (5, 2))
    solve = lambda c, y: jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(c), True), y)  # noqa: E731
    ours = one_matrix_at_a_time(solve)
    nested = lambda f: jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(0, None))  # noqa: E731
    np.testing.assert_allclose(jax.jit(nested(ours))(spd, b), jax.jit(nested(solve))(spd, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours(spd[0, 0], b), solve(spd[0, 0], b), rtol=1e-6)
    assert_unbatched(lapack_calls(nested(ours), spd, b), ["lapack_spotrf_ffi", "lapack_strsm_ffi"])
    # Tuple outputs (eigh) and a batched second argument only.
    eig = one_matrix_at_a_time(lambda m: tuple(jnp.linalg.eigh(m)))
    vals, vecs = jax.vmap(eig)(spd[0])
    np.testing.assert_allclose(vals, jnp.linalg.eigh(spd[0])[0], rtol=1e-5)
    bb = jnp.stack([b, 2 * b])
    np.testing.assert_allclose(jax.vmap(ours, in_axes=(None, 0))(spd[0, 0], bb)[1], 2 * solve(spd[0, 0], b), rtol=1e-5)


def _exported(fn, platform, *args):
    """The StableHLO text of ``jit(fn)`` exported for ``platform`` (no device needed)."""
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def _custom_calls(text):
    """(target, first operand shape) of every custom call in a StableHLO text."""
    calls = re.findall(r"stablehlo\.custom_call @(\w+)\(.*?\} : \(tensor<((?:\d+x)*)\w+>", text)
    return [(target, tuple(int(d) for d in dims.split("x") if d)) for target, dims in calls]


def test_one_matrix_at_a_time_is_the_batched_call_on_gpu_and_tpu():
    """One program for every platform: the lax.map is the CPU branch only; an
    export for cuda or tpu holds the ordinary batched eigh and no loop."""
    spd = jnp.eye(4) * jnp.arange(1.0, 4.0)[:, None, None]  # [3, 4, 4]
    eig = jax.vmap(one_matrix_at_a_time(lambda m: tuple(jnp.linalg.eigh(m))))
    plain = jax.vmap(lambda m: tuple(jnp.linalg.eigh(m)))
    for platform, target in (("cuda", "cusolver_syevd_ffi"), ("tpu", "Eigh")):
        text = _exported(eig, platform, spd)
        assert "stablehlo.while" not in text, platform
        assert _custom_calls(text) == [(target, (3, 4, 4))], (platform, _custom_calls(text))
        assert _custom_calls(_exported(plain, platform, spd)) == _custom_calls(text)
    nested = _exported(jax.vmap(eig), "cuda", jnp.stack([spd, spd]))
    assert "stablehlo.while" not in nested and _custom_calls(nested) == [("cusolver_syevd_ffi", (2, 3, 4, 4))]
    # ... while the CPU export of the same function runs one matrix per call
    cpu = _exported(eig, "cpu", spd)
    assert "stablehlo.while" in cpu and _custom_calls(cpu) == [("lapack_ssyevd_ffi", (4, 4))]
    np.testing.assert_allclose(jax.jit(eig)(spd)[0], [[1.0] * 4, [2.0] * 4, [3.0] * 4], rtol=1e-6)


def test_process_settings_only_for_the_affected_jaxlib():
    from runtime import platform

    assert platform.needs_cpu_workarounds("0.10.2") and not platform.needs_cpu_workarounds("0.11.0")
    assert not platform.needs_cpu_workarounds("0.4.38") and not platform.needs_cpu_workarounds("")
    assert platform.needs_cpu_workarounds() == platform.jaxlib_version().startswith("0.10.")


def test_vmapped_orthogonal_init_runs_qr_one_matrix_at_a_time():
    init = orthogonal(1.0)
    keys = jax.random.split(jax.random.key(0), 4)
    calls = lapack_calls(jax.vmap(lambda k: init(k, (6, 4))), keys)
    assert_unbatched(calls, ["lapack_sgeqrf_ffi"])
    out = jax.vmap(lambda k: init(k, (6, 4)))(keys)
    np.testing.assert_allclose(out[2], init(keys[2], (6, 4)), rtol=1e-6)


def test_vmapped_kfac_population_runs_eigh_one_matrix_at_a_time():
    tx = kfac(learning_rate=0.1, damping=1e-2)
    keys = jax.random.split(jax.random.key(5), 3)
    params = [make_params(k) for k in keys]
    stats = [hand_stats(p, *batch(jax.random.fold_in(k, 1)))[0] for p, k in zip(params, keys)]
    grads = [grads_like(p, jax.random.fold_in(k, 2)) for p, k in zip(params, keys)]
    states = [set_hyperparam(tx.init(p), "damping", d) for p, d in zip(params, [1e-3, 1e-2, 1e-1])]
    stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)  # noqa: E731
    step = jax.vmap(lambda g, s, p, st: tx.update(g, s, p, layer_stats=st)[0])
    assert_unbatched(lapack_calls(step, stack(grads), stack(states), stack(params), stack(stats)),
                     ["lapack_ssyevd_ffi"])


def test_pb2_round_runs_its_gp_one_matrix_at_a_time():
    """PB2's kernel grid is vmapped inside a round; here the round is vmapped too."""
    groups = (pbt.Group("a", 4), pbt.Group("b", 4))
    prog = toy_pbt("pb2", groups=groups, spaces=[TOY_SPACE, TOY_SPACE.with_bounds("lr", 1e-2, 1.0)])
    s0 = jax.vmap(prog.init)(jax.random.split(jax.random.key(0), 2))
    assert_unbatched(lapack_calls(jax.vmap(prog.step), s0), ["lapack_spotrf_ffi", "lapack_strsm_ffi"])
