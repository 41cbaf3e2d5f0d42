"""Optim4RL against an independent numpy transcription of the reference code.

Reference: sail-sg/optim4rl at 523d42ecea582d432246e80fce0e88442497a6d0,
``components/optim.py``: ``Optim4RL.__call__`` (two GRUs, one on g and one on
g**2, each followed by its MLP; m = sign(g) exp(o1), update = -lr m
rsqrt(exp(o2) + eps)), ``Optim4RL.init_hidden_state`` (zero carries) and
``OptimizerWrapper.update`` (elementwise gradient clip first, carries kept
across updates), with flax's ``GRUCell`` equations. The update is added to the
parameters (``agents/A2C.py:145-147``: ``optax.apply_updates``), the same sign
convention as an optax update. Constants are typed from those files (the
comment names file:line); nothing is imported from ``learned_optim.optim4rl``.

The GRU and head weights are fixed random values, given to both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from learned_optim import Optim4RLRule
from tests.flax_reference import ref_gru

# ---- constants typed from the reference ------------------------------------------------
REF_HIDDEN = 8        # components/optim.py:79 (hidden_size)
REF_EPS = 1e-8        # components/optim.py:81 (eps, inside the rsqrt at :119)
REF_GRAD_CLIP = 1.0   # configs/meta_rl_grid.json:22 (agent_optim), configs/lopt_rl_ant.json:77 ("grad_clip": [1]);
#                       applied elementwise at optim.py:240-245
REF_LR = 3e-3         # configs/meta_rl_grid.json:21 (one of the per-env learning rates)
# mlp_dims = () (optim.py:78): each MLP is a single Dense(1) (optim.py:91-103, the trailing relu popped).
# rnn_hidden_act = 'Tanh' (optim.py:77, :88): flax GRUCell's candidate activation, tanh.


def ref_dense(p, x):
    return x @ p["kernel"] + p["bias"]


def ref_call(w, h, g, lr):
    """components/optim.py:105-122 for one tensor g [*S]; h = (h1, h2), each [*S, H]."""
    g = g[..., None]                                   # :107
    g_square = np.square(g)                            # :108
    g_sign = np.sign(g)                                # :109
    h1, h2 = h                                         # :111
    h1 = ref_gru(w["rnn1"], h1, g)                     # :113
    o1 = ref_dense(w["mlp1"], h1)                      # :114
    m = g_sign * np.exp(o1)                            # :115
    h2 = ref_gru(w["rnn2"], h2, g_square)              # :117
    o2 = ref_dense(w["mlp2"], h2)                      # :118
    rsqrt_v = 1.0 / np.sqrt(np.exp(o2) + REF_EPS)      # :119
    out = -lr * m * rsqrt_v                            # :121
    return (h1, h2), out[..., 0]                       # :122


def ref_init(grads_like):
    """optim.py:124-132 / :233: zero carries per leaf, [*S, H] each."""
    z = lambda x: np.zeros(np.shape(x) + (REF_HIDDEN,))  # noqa: E731
    return [(z(x), z(x)) for x in jax.tree.leaves(grads_like)]


def ref_update(w, grads, hidden, lr):
    """OptimizerWrapper.update (optim.py:237-256): clip elementwise, then the
    network per leaf with its own carries."""
    out, new_hidden = [], []
    for g, h in zip(jax.tree.leaves(grads), hidden):
        g = np.clip(np.asarray(g, np.float64), -REF_GRAD_CLIP, REF_GRAD_CLIP)   # :240-245
        h, u = ref_call(w, h, g, lr)                                              # :246-250
        out.append(u)
        new_hidden.append(h)
    return out, new_hidden


# ---- fixed random weights, given to both ----------------------------------------------------

def random_gru(rng, scale=0.7):
    H = REF_HIDDEN
    n = lambda *s: rng.normal(size=s) * scale  # noqa: E731
    p = {g: {"kernel": n(1, H), "bias": n(H)} for g in ("ir", "iz", "in")}
    p.update({g: {"kernel": n(H, H)} for g in ("hr", "hz")})
    p["hn"] = {"kernel": n(H, H), "bias": n(H)}
    return p


def random_weights(seed, v_shift=0.0):
    """The reference's names (rnn1/mlp1 for m, rnn2/mlp2 for v). ``v_shift`` is
    added to the v head's bias: -18 puts exp(o2) near eps, where eps matters."""
    rng = np.random.default_rng(seed)
    w = {"rnn1": random_gru(rng), "rnn2": random_gru(rng)}
    w["mlp1"] = {"kernel": rng.normal(size=(REF_HIDDEN, 1)) * 0.5, "bias": rng.normal(size=(1,)) * 0.3}
    w["mlp2"] = {"kernel": rng.normal(size=(REF_HIDDEN, 1)) * 0.5, "bias": rng.normal(size=(1,)) * 0.3 + v_shift}
    return w


def as_ours(w):
    """Our meta-parameter layout: flax GRUCell / Dense variable dicts."""
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    return {"m_gru": {"params": f32(w["rnn1"])}, "m_out": {"params": f32(w["mlp1"])},
            "v_gru": {"params": f32(w["rnn2"])}, "v_out": {"params": f32(w["mlp2"])}}


def tree_grads(seed):
    """A tiny actor/critic tree; some entries beyond the clip, one exactly zero."""
    rng = np.random.default_rng(seed)
    n = lambda *s: (rng.normal(size=s) * 0.8).astype(np.float32)  # noqa: E731
    g = {"actor": {"Dense_0": {"kernel": n(3, 4), "bias": n(4)}, "Dense_1": {"kernel": n(4, 2), "bias": n(2)}},
         "critic": {"Dense_0": {"kernel": n(3, 4), "bias": n(4)}, "Dense_1": {"kernel": n(4, 1), "bias": n(1)}}}
    g["actor"]["Dense_0"]["kernel"][0, 0] = 2.5     # clipped to 1
    g["actor"]["Dense_0"]["kernel"][0, 1] = -1.7    # clipped to -1
    g["critic"]["Dense_1"]["bias"][0] = 0.0         # sign 0 -> update 0
    return g


@jax.jit
def our_update(meta_params, grads, state):
    tx = Optim4RLRule(learning_rate=REF_LR).make_optimizer(meta_params)
    return tx.update(grads, state, None)


def our_init(meta_params, params):
    return Optim4RLRule(learning_rate=REF_LR).make_optimizer(meta_params).init(params)


def flat(leaves):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("v_shift", [0.0, -18.0], ids=["v~1", "v~eps"])
@pytest.mark.parametrize("seed", [0, 1])
def test_three_steps_equal_the_transcription(seed, v_shift):
    w = random_weights(seed, v_shift)
    meta = as_ours(w)
    grads = [tree_grads(100 * seed + k) for k in range(3)]
    state = our_init(meta, grads[0])
    hidden = ref_init(grads[0])
    for step, g in enumerate(grads):
        ours, state = our_update(meta, g, state)
        ref, hidden = ref_update(w, g, hidden, REF_LR)
        ours_flat, ref_flat = flat(jax.tree.leaves(ours)), flat(ref)
        assert np.all(np.isfinite(ref_flat)) and np.max(np.abs(ref_flat)) > 0
        np.testing.assert_allclose(ours_flat, ref_flat, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref_flat)),
                                   err_msg=f"seed {seed}, v_shift {v_shift}: step {step + 1}")


def test_the_transcription_sees_eps_sqrt_and_input_swap():
    """Sanity of the test itself: in the v~eps case, eps, the square root and
    which GRU sees g vs g**2 each move the transcription far beyond the tolerance."""
    global REF_EPS
    w = random_weights(0, -18.0)
    g = tree_grads(0)
    base = flat(ref_update(w, g, ref_init(g), REF_LR)[0])
    saved = REF_EPS
    try:
        REF_EPS = 1e-7
        assert np.max(np.abs(flat(ref_update(w, g, ref_init(g), REF_LR)[0]) - base)) > 1e-2 * np.max(np.abs(base))
    finally:
        REF_EPS = saved
    swapped = {"rnn1": w["rnn2"], "rnn2": w["rnn1"], "mlp1": w["mlp1"], "mlp2": w["mlp2"]}
    ours_swapped = flat(jax.tree.leaves(our_update(as_ours(swapped), g, our_init(as_ours(swapped), g))[0]))
    assert np.max(np.abs(ours_swapped - base)) > 1e-2 * np.max(np.abs(base))


def test_zero_gradient_gives_zero_update_and_clip_saturates():
    """sign(0) = 0 (optim.py:109,115); |g| > 1 behaves exactly like |g| = 1
    (optim.py:240-245) -- on a fresh state, for ours and the transcription."""
    w = random_weights(3)
    meta = as_ours(w)
    g = {"a": np.array([0.0, 1.0, 2.5, -1.0, -7.0], np.float32)}
    ours = np.asarray(our_update(meta, g, our_init(meta, g))[0]["a"], np.float64)
    ref = ref_update(w, g, ref_init(g), REF_LR)[0][0]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-12)
    assert ours[0] == 0.0 and ours[1] == ours[2] and ours[3] == ours[4]


def test_default_direction_transform_is_the_reference_setting():
    """``scale_by_optim4rl`` with its defaults (no learning rate) gives the
    reference's m * rsqrt(exp(o2) + 1e-8) with clip 1, i.e. ``out`` of
    optim.py:121 with learning_rate = -1; in the v~eps regime, so eps counts."""
    from learned_optim.optim4rl import scale_by_optim4rl
    w = random_weights(1, -18.0)
    meta = as_ours(w)
    tx = scale_by_optim4rl(meta)
    grads = [tree_grads(7 + k) for k in range(2)]
    state, hidden = tx.init(grads[0]), ref_init(grads[0])
    update = jax.jit(tx.update)
    for step, g in enumerate(grads):
        ours, state = update(g, state)
        ref, hidden = ref_update(w, g, hidden, -1.0)
        ref_flat = flat(ref)
        np.testing.assert_allclose(flat(jax.tree.leaves(ours)), ref_flat, rtol=1e-5,
                                   atol=1e-5 * np.max(np.abs(ref_flat)), err_msg=f"default direction, step {step + 1}")
