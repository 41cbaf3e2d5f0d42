"""OPEN against an independent numpy transcription of the reference code.

Reference: AlexGoldie/rl-learned-optimization at b65037bd89c09f31e80c5d49f1d78cc9c6dc43e0,
``rl_optimizer/network.py`` (``GRU_Opt.opt_fn``: momenta, the 19 input
features, GRU + LayerNorm MLP, the step with the learned actor noise, the
global mean removal) and ``rl_optimizer/train.py`` (what the optimizer is fed:
layer proportions, dormancy activations, the actor mask), with the momentum
accumulator of google/learned_optimization
``learned_optimization/learned_optimizers/common.py`` and flax's ``GRUCell`` /
``LayerNorm`` equations. Every constant below is typed from those files (the
comment names file:line); nothing is imported from ``learned_optim.open``.

The published weights are unpacked here from the ``.npy`` by hand (the layout
of ``../shared/anchors/open/README.md``) for the transcription, and loaded with
``learned_optim.from_spec("open:NAME")`` for our transform.

The only convention taken from our side is how the per-element N(0, 1) noise
is drawn from a key (one ``jax.random.normal(key, (n_actor,))`` laid over the
actor leaves in tree order; the reference splits the key per leaf,
network.py:285-286). The noise is compared exactly under that convention and,
independently of any convention, by its scale over many keys.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import learned_optim
from learned_optim.context import LayerStats
from tests.conftest import ROOT, SHARED
from tests.flax_reference import ref_gru

# ---- constants typed from the reference ------------------------------------------------
REF_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)  # network.py:91 ("ALL MOMENTUM TIMESCALES")
REF_STEP_MULT = 0.001                               # network.py:51 (step_mult default; train.py:254-257 uses defaults)
REF_EXP_MULT = 0.001                                # network.py:50
REF_LOG_EPS = 1e-13                                 # network.py:160 (eps1), used at :172,:178,:193
REF_NORM_EPS = 1e-5                                 # network.py:27 (_second_moment_normalizer eps)
REF_DORM_EPS = 1e-11                                # network.py:293 (calc_dormancy)
FLAX_LAYERNORM_EPS = 1e-6                           # flax.linen.LayerNorm default (network.py:67,70 nn.LayerNorm())
GRU_H, MLP_H, N_IN = 8, 16, 19                      # network.py:52-53 (hidden 16, gru 8); network.py:84 (19 inputs)


# ---- the published vector, unpacked by hand -------------------------------------------------

def weights_path(name):
    p = os.path.join(SHARED, "anchors", "open", f"{name}_OPEN.npy")
    if not os.path.isfile(p):  # the same published file, shipped as package data
        p = os.path.join(ROOT, "learned_optim", "weights", "open", f"{name}_OPEN.npy")
    return p


def unpack_published(flat):
    """JAX tree order over {"gru_params": GRUCell(8), "params": Sequential MLP}
    (sorted keys; bias < kernel < scale), each leaf C-raveled."""
    flat = np.asarray(flat, np.float64)
    assert flat.shape == (1211,)
    pos = [0]

    def take(*shape):
        n = int(np.prod(shape))
        out = flat[pos[0]:pos[0] + n].reshape(shape)
        pos[0] += n
        return out

    gru = {}
    gru["hn"] = {"bias": take(GRU_H), "kernel": take(GRU_H, GRU_H)}
    gru["hr"] = {"kernel": take(GRU_H, GRU_H)}
    gru["hz"] = {"kernel": take(GRU_H, GRU_H)}
    for g in ("in", "ir", "iz"):
        gru[g] = {"bias": take(GRU_H), "kernel": take(N_IN, GRU_H)}
    mlp = {}
    mlp["layers_0"] = {"bias": take(MLP_H), "kernel": take(GRU_H, MLP_H)}
    mlp["layers_1"] = {"bias": take(MLP_H), "scale": take(MLP_H)}
    mlp["layers_3"] = {"bias": take(MLP_H), "kernel": take(MLP_H, MLP_H)}
    mlp["layers_4"] = {"bias": take(MLP_H), "scale": take(MLP_H)}
    mlp["layers_6"] = {"bias": take(3), "kernel": take(MLP_H, 3)}
    assert pos[0] == 1211
    return gru, mlp


# ---- the transcription -----------------------------------------------------------------------

def ref_layernorm(x, ln):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + FLAX_LAYERNORM_EPS) * ln["scale"] + ln["bias"]


def ref_mlp(mlp, x):
    """network.py:64-74: Dense(16) LayerNorm relu Dense(16) LayerNorm relu Dense(3)."""
    y = np.maximum(ref_layernorm(x @ mlp["layers_0"]["kernel"] + mlp["layers_0"]["bias"], mlp["layers_1"]), 0.0)
    y = np.maximum(ref_layernorm(y @ mlp["layers_3"]["kernel"] + mlp["layers_3"]["bias"], mlp["layers_4"]), 0.0)
    return y @ mlp["layers_6"]["kernel"] + mlp["layers_6"]["bias"]


def second_moment_normalizer(x, axis):
    """network.py:27-28."""
    return x / np.sqrt(REF_NORM_EPS + np.mean(np.square(x), axis=axis, keepdims=True))


def ref_features(p, g, mom, training_prop, layer_prop, batch_prop, dorm):
    """network.py:176-255 for one tensor: p, g [*S]; mom [*S, 6] -> [*S, 19]."""
    axis = tuple(range(p.ndim))
    inp_stack = np.concatenate([p[..., None], np.sign(mom), np.log(np.abs(mom) + REF_LOG_EPS)], -1)  # :188-197
    inp_stack_g = np.concatenate(
        [inp_stack, np.sign(g)[..., None], np.log(np.abs(g) + REF_LOG_EPS)[..., None]], -1)           # :201-203
    inp_stack_g = second_moment_normalizer(inp_stack_g, axis)                                       # :205
    const = lambda v: np.broadcast_to(np.float64(v), p.shape)[..., None]  # noqa: E731
    batch_dorm = np.broadcast_to(dorm, p.shape)[..., None]  # :246-251 (kernel entry <- its output neuron)
    # :217-253: training prop, layer prop, batch prop, dormancy, appended after the normalised 15
    return np.concatenate([inp_stack_g, const(training_prop), const(layer_prop), const(batch_prop), batch_dorm], -1)


def ref_layer_props(net):
    """train.py:266-277: index of the layer entry / (entries - 1), per network
    (flax creation order: Dense_0, Dense_1, Dense_2, log_std)."""
    names = list(net)
    return {n: i / (len(names) - 1) for i, n in enumerate(names)}


def calc_dormancy(a):
    """network.py:292-304 on a layer's per-neuron activation a [H]."""
    a = a + REF_DORM_EPS
    return a / np.abs(a).sum(-1) * a.shape[-1]


def ref_activations(params, outputs):
    """train.py:83-110, 147-165: per dense layer mean over the batch of
    |layer output| (post-relu; raw for the last Dense); log_std's entry is
    expand_dims(mean(exp(log_std)), 0) (train.py:108-110)."""
    acts = {}
    for part, net in params.items():
        for name, leaf in net.items():
            if name == "log_std":
                acts[(part, name)] = np.mean(np.exp(np.asarray(leaf, np.float64)), axis=0, keepdims=True)
            else:
                acts[(part, name)] = np.mean(np.abs(np.asarray(outputs[part][name], np.float64)), axis=0)
    return acts


def leaves_with_paths(tree):
    """[(('actor', 'Dense_0', 'bias'), leaf), ...] in jax.tree.leaves order."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append((tuple(str(getattr(k, "key", k)) for k in path), leaf))
    return out


def ref_init(params):
    """Zero momenta (common.py:33-36, vmapped over decays on a trailing axis,
    common.py:68-69) and zero GRU carries (flax carry_init zeros; network.py:116-120)."""
    return {path: (np.zeros(np.shape(x) + (len(REF_DECAYS),)), np.zeros(np.shape(x) + (GRU_H,)))
            for path, x in leaves_with_paths(params)}


def ref_update(theta, params, grads, state, outputs, training_prop, batch_prop, eps, decays=REF_DECAYS):
    """One OPEN step (network.py:130-355). Returns (optax update = -update,
    new state, o2 * step_mult per element). ``eps``: {path: N(0,1) array} for
    actor leaves."""
    gru, mlp = theta
    decays = np.asarray(decays)
    acts = ref_activations(params, outputs)
    props = {part: ref_layer_props(net) for part, net in params.items()}
    g_by = dict(leaves_with_paths(grads))
    upd, new_state, noise_scale = {}, {}, {}
    for path, p in leaves_with_paths(params):
        part, layer = path[0], path[1]
        p = np.asarray(p, np.float64)
        g = np.asarray(g_by[path], np.float64)
        mom, carry = state[path]
        mom = decays * mom + (1 - decays) * g[..., None]          # common.py:39-40 via network.py:145-151
        dorm = calc_dormancy(acts[(part, layer)])
        x = ref_features(p, g, mom, training_prop, props[part][layer], batch_prop, dorm)
        carry = ref_gru(gru, carry, x)                             # network.py:257
        o = ref_mlp(mlp, carry)                                    # network.py:260
        mask = 1.0 if part == "actor" else 0.0                     # train.py:462-501 (actor 1, critic 0, log_std 1)
        noise = eps[path] if mask else np.zeros(p.shape)
        update_ = o[..., 0] * REF_STEP_MULT * np.exp(o[..., 1] * REF_EXP_MULT)     # network.py:262-264
        upd[path] = update_ + o[..., 2] * mask * noise * REF_STEP_MULT            # network.py:267-273
        noise_scale[path] = o[..., 2] * mask * REF_STEP_MULT
        new_state[path] = (mom, carry)
    mean = np.mean(np.concatenate([u.ravel() for u in upd.values()]))            # network.py:339-340
    return {k: -(u - mean) for k, u in upd.items()}, new_state, noise_scale      # :345-351 (p - update)


# ---- fixtures -----------------------------------------------------------------------------

def make_params(key, continuous=True):
    k = iter(jax.random.split(key, 16))
    n = lambda s: np.asarray(jax.random.normal(next(k), s), np.float32) * 0.5  # noqa: E731
    actor = {"Dense_0": {"kernel": n((3, 4)), "bias": n((4,))},
             "Dense_1": {"kernel": n((4, 4)), "bias": n((4,))},
             "Dense_2": {"kernel": n((4, 2)), "bias": n((2,))}}
    if continuous:
        actor["log_std"] = n((2,))
    critic = {"Dense_0": {"kernel": n((3, 4)), "bias": n((4,))},
              "Dense_1": {"kernel": n((4, 4)), "bias": n((4,))},
              "Dense_2": {"kernel": n((4, 1)), "bias": n((1,))}}
    return {"actor": actor, "critic": critic}


def make_grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (rng.normal(size=np.shape(x)) * 0.3).astype(np.float32), params)


def make_outputs(params, seed):
    """Per-layer outputs [B=5, out]: relu-like (non-negative, one dead neuron)
    for hidden layers, signed for the last Dense."""
    rng = np.random.default_rng(seed)
    out = {}
    for part, net in params.items():
        out[part] = {}
        dense = [n for n in net if n.startswith("Dense_")]
        for name in dense:
            width = net[name]["kernel"].shape[1]
            h = rng.normal(size=(5, width)).astype(np.float32)
            if name != dense[-1]:
                h = np.abs(h)
                h[:, 0] = 0.0  # a fully dormant neuron
            out[part][name] = h
    return out


def as_stats(outputs):
    return {part: {name: LayerStats(outputs=jnp.asarray(h)) for name, h in net.items()}
            for part, net in outputs.items()}


def ours_eps(params, key):
    """Our noise convention: one N(0,1) draw over all actor elements, laid over
    the actor leaves in tree order."""
    items = leaves_with_paths(params)
    sizes = [int(np.size(x)) for path, x in items if path[0] == "actor"]
    e = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32), np.float64)
    out, start = {}, 0
    for path, x in items:
        if path[0] == "actor":
            out[path] = e[start:start + np.size(x)].reshape(np.shape(x))
            start += np.size(x)
    return out


def flat(tree_or_dict, params):
    if isinstance(tree_or_dict, dict) and tree_or_dict and isinstance(next(iter(tree_or_dict)), tuple):
        return np.concatenate([np.ravel(tree_or_dict[path]) for path, _ in leaves_with_paths(params)])
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree_or_dict)])


def apply(params, upd_by_path):
    return jax.tree.unflatten(jax.tree.structure(params),
                              [(np.asarray(x, np.float64) + upd_by_path[path]).astype(np.float32)
                               for path, x in leaves_with_paths(params)])


def _make_update(actor_noise):
    def update(meta_params, grads, state, params, stats, key, tf, bf):
        rule = learned_optim.open.OpenRule(actor_noise=actor_noise)
        tx = rule.make_optimizer(meta_params)
        return tx.update(grads, state, params, layer_stats=stats, key=key, train_fraction=tf, batch_fraction=bf)
    return jax.jit(update)


UPDATE = {True: _make_update(True), False: _make_update(False)}
SCHEDULE = [(0.25, 0.0), (0.25, 2 / 3), (0.5, 1.0)]  # (training_prop, batch_prop) of 3 successive steps


def published(name):
    tx_meta = learned_optim.open.load_published_open_weights(name)[1]  # what from_spec("open:NAME") uses
    theta = unpack_published(np.load(weights_path(name)))
    return tx_meta, theta


def assert_close(ours, ref, what):
    scale = np.max(np.abs(ref))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


# ---- tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["breakout", "freeway", "gridworld"])
def test_three_steps_equal_the_transcription_with_the_same_noise(name):
    meta, theta = published(name)
    params = make_params(jax.random.key(1))
    ref_params, ref_state = params, ref_init(params)
    state = jax.jit(learned_optim.open.OpenRule().make_optimizer(meta).init)(params)
    for step, (tf, bf) in enumerate(SCHEDULE):
        grads, outputs = make_grads(params, 10 + step), make_outputs(params, 20 + step)
        key = jax.random.key(100 + step)
        ours, state = UPDATE[True](meta, grads, state, params, as_stats(outputs), key, tf, bf)
        ref, ref_state, _ = ref_update(theta, ref_params, grads, ref_state, outputs, tf, bf, ours_eps(params, key))
        assert_close(flat(ours, params), flat(ref, params), f"{name}: step {step + 1} (with actor noise)")
        params, ref_params = apply(params, {p: np.asarray(x, np.float64) for p, x in leaves_with_paths(ours)}), \
            apply(ref_params, ref)


def test_noise_scale_over_many_keys_is_o2_times_step_mult():
    """Convention-free: (update with noise) - (update without) over 512 keys
    has per-element std |o2| * 0.001 on the actor (network.py:267-273) and is
    one shared value (minus the global mean) on the critic."""
    meta, theta = published("breakout")
    params = make_params(jax.random.key(1))
    grads, outputs = make_grads(params, 10), make_outputs(params, 20)
    state = learned_optim.open.OpenRule().make_optimizer(meta).init(params)
    stats = as_stats(outputs)
    det, _ = UPDATE[False](meta, grads, state, params, stats, jax.random.key(0), 0.25, 0.0)
    keys = jax.random.split(jax.random.key(5), 512)
    noisy = jax.vmap(lambda k: UPDATE[True](meta, grads, state, params, stats, k, 0.25, 0.0)[0])(keys)
    diff = np.concatenate([np.asarray(x, np.float64).reshape(512, -1) for x in jax.tree.leaves(noisy)], 1)
    diff = diff - flat(det, params)[None]
    zero_eps = {p: np.zeros(np.shape(x)) for p, x in leaves_with_paths(params) if p[0] == "actor"}
    ref_det, _, scale = ref_update(theta, params, grads, ref_init(params), outputs, 0.25, 0.0, zero_eps)
    assert_close(flat(det, params), flat(ref_det, params), "deterministic part")
    scale = flat(scale, params)
    actor = np.concatenate([np.full(np.size(x), p[0] == "actor") for p, x in leaves_with_paths(params)])
    std = diff.std(0)
    ratio = np.sum(std[actor] ** 2) / np.sum(scale[actor] ** 2)
    assert abs(ratio - 1.0) < 0.1, f"actor noise variance / (o2 * step_mult)^2 = {ratio}"
    assert np.corrcoef(std[actor], np.abs(scale[actor]))[0, 1] > 0.95, "actor noise std not proportional to |o2|"
    crit = diff[:, ~actor]
    np.testing.assert_allclose(crit, np.broadcast_to(crit[:, :1], crit.shape), atol=1e-9,
                               err_msg="critic elements get only the shared mean correction")


def test_the_transcription_sees_each_timescale_and_the_dormancy():
    """Sanity of the test itself: the transcription's output moves by far more
    than the tolerance when one momentum timescale or the dormancy changes, so
    the equality tests above can see such a change in our code."""
    _, theta = published("breakout")
    params = make_params(jax.random.key(1))
    grads, outputs = make_grads(params, 10), make_outputs(params, 20)
    zero_eps = {p: np.zeros(np.shape(x)) for p, x in leaves_with_paths(params) if p[0] == "actor"}

    def run(outputs=outputs, decays=REF_DECAYS):
        u = ref_update(theta, params, grads, ref_init(params), outputs, 0.25, 0.5, zero_eps, decays)[0]
        return flat(u, params)

    base = run()
    for i, b in enumerate(REF_DECAYS):
        moved = tuple(1 - 0.5 * (1 - d) if j == i else d for j, d in enumerate(REF_DECAYS))
        assert np.max(np.abs(run(decays=moved) - base)) > 1e-3 * np.max(np.abs(base)), f"decay {b}"
    ones = {part: {n: np.ones_like(h) for n, h in net.items()} for part, net in outputs.items()}
    assert np.max(np.abs(run(outputs=ones) - base)) > 1e-3 * np.max(np.abs(base)), "dormancy"


# Golden numbers, computed by the transcription above (not by learned_optim) for
# the published breakout weights on GOLDEN_TREE / GOLDEN_GRADS / GOLDEN_OUTPUTS,
# two steps at (training_prop, batch_prop) = (0.5, 1/3) then (0.75, 2/3).
GOLDEN_TREE = {"actor": {"Dense_0": {"kernel": [[0.3, -0.2], [0.1, 0.5]], "bias": [0.05, -0.1]},
                         "Dense_1": {"kernel": [[0.4], [-0.6]], "bias": [0.0]}},
               "critic": {"Dense_0": {"kernel": [[-0.5, 0.1], [0.25, 0.3]], "bias": [0.2, 0.0]},
                          "Dense_1": {"kernel": [[0.8], [-0.4]], "bias": [0.1]}}}
GOLDEN_GRADS = [
    {"actor": {"Dense_0": {"kernel": [[0.01, -0.02], [0.03, 0.0]], "bias": [0.2, -0.05]},
               "Dense_1": {"kernel": [[-0.1], [0.07]], "bias": [0.3]}},
     "critic": {"Dense_0": {"kernel": [[0.5, 0.0], [-0.25, 0.06]], "bias": [0.004, -0.3]},
                "Dense_1": {"kernel": [[0.02], [-0.6]], "bias": [0.15]}}},
    {"actor": {"Dense_0": {"kernel": [[-0.02, 0.01], [0.05, -0.01]], "bias": [0.1, 0.05]},
               "Dense_1": {"kernel": [[0.2], [-0.03]], "bias": [-0.1]}},
     "critic": {"Dense_0": {"kernel": [[0.3, -0.1], [0.1, 0.02]], "bias": [-0.02, 0.2]},
                "Dense_1": {"kernel": [[-0.05], [0.4]], "bias": [0.01]}}},
]
GOLDEN_OUTPUTS = {"actor": {"Dense_0": [[1.0, 0.0], [0.5, 0.0], [2.0, 0.1]], "Dense_1": [[0.3], [-0.2], [0.1]]},
                  "critic": {"Dense_0": [[0.7, 0.0], [1.1, 0.2], [0.4, 0.0]], "Dense_1": [[0.5], [-0.9], [0.3]]}}
GOLDEN_SCHEDULE = [(0.5, 1 / 3), (0.75, 2 / 3)]
# Elements in jax.tree.leaves order: actor Dense_0 bias(2) kernel(4), Dense_1 bias(1) kernel(2),
# critic Dense_0 bias(2) kernel(4), Dense_1 bias(1) kernel(2).
# [step][element] deterministic optax update (noise eps = 0), i.e. -(update - mean(update)):
GOLDEN_UPDATES = [
    [-0.0005097153527, 0.0005027854615, -0.0006946869028, 0.0004466153665, -0.0006489204917, 0.000322218894,
     -5.502272825e-05, 0.0005584021356, 0.0003448721677, -0.0002404582946, 0.0004560625999, -0.0005292581419,
     0.000369695131, 0.0001808591111, -0.0007231980209, -0.0003308469319, 6.282821115e-06, 0.0005443131764],
    [-0.0006146605182, 0.0002933466572, -8.810929692e-05, 0.000390027744, -0.0006753544097, 0.0002993941231,
     -0.0001128787221, -0.0004760075789, 0.0002813681669, 0.0001221625844, 0.0002194039563, -0.0007683031068,
     0.0004083067102, 0.0004162195041, 9.233747459e-05, -0.0003244853884, 0.0002734561739, 0.0002637759262],
]
# [step][element] o2 * step_mult, the std of the actor noise term (0 on the critic):
GOLDEN_NOISE_SCALE = [
    [0.000169222396, 0.0005277606265, 6.192561147e-05, 0.0004973612173, 7.526343674e-05, 0.0005036382956,
     0.000393035884, 0.0005836419698, 0.0005207976402] + [0.0] * 9,
    [0.0001464574721, 0.000603616164, 0.000431768043, 0.0005643897267, 0.0001116697028, 0.0005598949315,
     0.000342662544, 0.0002437963751, 0.0005565441122] + [0.0] * 9,
]


def golden_inputs():
    def f32(t):
        return jax.tree.map(lambda x: np.asarray(x, np.float32), t, is_leaf=lambda x: isinstance(x, list))
    return f32(GOLDEN_TREE), [f32(g) for g in GOLDEN_GRADS], f32(GOLDEN_OUTPUTS)


def golden_transcription():
    _, theta = published("breakout")
    params, grads, outputs = golden_inputs()
    state, ups, scales = ref_init(params), [], []
    zero_eps = {p: np.zeros(np.shape(x)) for p, x in leaves_with_paths(params) if p[0] == "actor"}
    for g, (tf, bf) in zip(grads, GOLDEN_SCHEDULE):
        u, state, s = ref_update(theta, params, g, state, outputs, tf, bf, zero_eps)
        ups.append(flat(u, params))
        scales.append(flat(s, params))
        params = apply(params, u)
    return np.stack(ups), np.stack(scales)


def test_golden_transcription_numbers():
    ups, scales = golden_transcription()
    np.testing.assert_allclose(ups, GOLDEN_UPDATES, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(scales, GOLDEN_NOISE_SCALE, rtol=1e-6, atol=1e-12)


def test_golden_numbers_from_our_transform():
    meta, _ = published("breakout")
    params, grads, outputs = golden_inputs()
    tx = learned_optim.from_spec("open:breakout")
    state = tx.init(params)
    stats = as_stats(outputs)
    golden_up = np.asarray(GOLDEN_UPDATES)
    for step, (g, (tf, bf)) in enumerate(zip(grads, GOLDEN_SCHEDULE)):
        key = jax.random.key(7 + step)
        det, _ = UPDATE[False](meta, g, state, params, stats, key, tf, bf)
        noisy, state_n = UPDATE[True](meta, g, state, params, stats, key, tf, bf)
        spec_u, _ = tx.update(g, state, params, layer_stats=stats, key=key, train_fraction=tf, batch_fraction=bf)
        assert_close(flat(spec_u, params), flat(noisy, params), "from_spec('open:breakout') = published rule")
        assert_close(flat(det, params), golden_up[step], f"golden deterministic update, step {step + 1}")
        eps = ours_eps(params, key)
        e = np.concatenate([np.ravel(eps.get(p, np.zeros(np.shape(x)))) for p, x in leaves_with_paths(params)])
        n = np.asarray(GOLDEN_NOISE_SCALE[step]) * e
        assert_close(flat(noisy, params) - flat(det, params), -(n - n.mean()), f"golden noise term, step {step + 1}")
        state = state_n
        params = jax.tree.map(lambda p, u: p + u, params, jax.tree.map(lambda x: np.asarray(x), det))
